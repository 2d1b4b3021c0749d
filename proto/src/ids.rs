//! Device identifiers and WireGuard keys, parsed strictly.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a UUID in either accepted form.
    #[error("{0:?} is not a device UUID (expected 8-4-4-4-12 hex digits, or 32 hex digits)")]
    BadUuid(String),
    /// The nil or max UUID, which no device may use.
    #[error("{0} is reserved and cannot be a device UUID")]
    ReservedUuid(String),
    /// Not standard base64.
    #[error("WireGuard key is not base64: {0}")]
    KeyNotBase64(String),
    /// Decoded, but not 32 bytes.
    #[error("WireGuard key must be 32 bytes, got {0}")]
    KeyLength(usize),
    /// All zeros: not a usable Curve25519 public key.
    #[error("WireGuard key is all zeros")]
    KeyZero,
}

/// A device UUID. Accepts the hyphenated form (`3f2a…-…`) and balena's 32-hex-digit
/// form, in either case; always displayed lowercase and hyphenated, which is the form
/// that goes into certificates (`CN`, `urn:uuid:`) and the registry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Uuid);

impl DeviceId {
    /// A new random (v4) device id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 32-hex-digit form balena uses.
    pub fn simple(&self) -> String {
        self.0.simple().to_string()
    }

    /// Parses a host name of the forms `UUID`, `UUID.floto` and `UUID.balena`
    /// (as used by ssh host aliases and HTTPS CONNECT).
    pub fn from_host(host: &str) -> Result<Self, IdError> {
        let host = host.trim_end_matches('.');
        let bare = host
            .strip_suffix(".floto")
            .or_else(|| host.strip_suffix(".balena"))
            .unwrap_or(host);
        bare.parse()
    }
}

impl FromStr for DeviceId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let hex_digits = s.bytes().filter(u8::is_ascii_hexdigit).count();
        let well_formed = match s.len() {
            32 => hex_digits == 32,
            36 => {
                hex_digits == 32
                    && s.bytes()
                        .enumerate()
                        .all(|(i, b)| matches!(i, 8 | 13 | 18 | 23) == (b == b'-'))
            }
            _ => false,
        };
        if !well_formed {
            return Err(IdError::BadUuid(truncate(s)));
        }
        let uuid = Uuid::parse_str(s).map_err(|_| IdError::BadUuid(truncate(s)))?;
        if uuid.is_nil() || uuid.is_max() {
            return Err(IdError::ReservedUuid(s.to_owned()));
        }
        Ok(Self(uuid))
    }
}

impl From<Uuid> for DeviceId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A WireGuard (Curve25519) key, 32 bytes, written as standard base64 like `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgKey(pub [u8; 32]);

impl WgKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl FromStr for WgKey {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| IdError::KeyNotBase64(e.to_string()))?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| IdError::KeyLength(bytes.len()))?;
        if key == [0; 32] {
            return Err(IdError::KeyZero);
        }
        Ok(Self(key))
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({})", self.to_base64())
    }
}

impl Serialize for WgKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Keeps hostile input out of error messages at a readable length.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_forms_normalise_to_hyphenated_lowercase() {
        let a: DeviceId = "3F2A6B1C-0D4E-4F5A-8B6C-7D8E9F0A1B2C".parse().unwrap();
        let b: DeviceId = "3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
        assert_eq!(a.simple(), "3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c");
    }

    #[test]
    fn uuid_rejects_other_shapes() {
        for bad in [
            "",
            "not-a-uuid",
            "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2",
            "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2cc",
            "{3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c}",
            "urn:uuid:3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c",
            "3f2a6b1c0d4e-4f5a-8b6c-7d8e9f0a1b2c",
            "3f2a6b1c-0d4e4f5a-8b6c-7d8e-9f0a1b2c",
            "zz2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c",
            "3f2a6b1c\n0d4e4f5a8b6c7d8e9f0a1b2",
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            "00000000-0000-0000-0000-000000000000".parse::<DeviceId>(),
            Err(IdError::ReservedUuid(_))
        ));
    }

    #[test]
    fn uuid_error_message_is_bounded() {
        let long = "x".repeat(10_000);
        let msg = long.parse::<DeviceId>().unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn uuid_host_forms() {
        let id: DeviceId = "3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c".parse().unwrap();
        for host in [
            "3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c.balena",
            "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c.floto",
            "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c",
        ] {
            assert_eq!(DeviceId::from_host(host).unwrap(), id);
        }
        assert!(DeviceId::from_host("3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c.example").is_err());
    }

    #[test]
    fn wg_key_round_trip_and_rejections() {
        let key = WgKey([7; 32]);
        let s = key.to_base64();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<WgKey>().unwrap(), key);
        assert!(matches!(
            "AAAA".parse::<WgKey>(),
            Err(IdError::KeyLength(3))
        ));
        assert!(matches!(
            "!!!!".parse::<WgKey>(),
            Err(IdError::KeyNotBase64(_))
        ));
        assert!(matches!(
            WgKey([0; 32]).to_base64().parse::<WgKey>(),
            Err(IdError::KeyZero)
        ));
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<WgKey>(&json).unwrap(), key);
    }
}
