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

    /// Device ids from anyone (API paths, CONNECT targets, ssh host names) against the
    /// forms the docs give.
    mod proptests {
        use proptest::prelude::*;
        use proptest::sample::Index;

        use super::*;

        const HYPHENS: [usize; 4] = [8, 13, 18, 23];

        /// What the docs accept: 8-4-4-4-12 or 32 hex digits, either case, neither the nil
        /// nor the max UUID. Returns the lowercase hyphenated form it stands for.
        fn documented_uuid(s: &str) -> Option<String> {
            let b = s.as_bytes();
            let digits: String = match b.len() {
                32 => s.to_owned(),
                36 if HYPHENS.iter().all(|&i| b[i] == b'-') => s.replace('-', ""),
                _ => return None,
            };
            if digits.len() != 32 || !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            let d = digits.to_ascii_lowercase();
            if d.bytes().all(|c| c == b'0') || d.bytes().all(|c| c == b'f') {
                return None;
            }
            Some(format!(
                "{}-{}-{}-{}-{}",
                &d[..8],
                &d[8..12],
                &d[12..16],
                &d[16..20],
                &d[20..]
            ))
        }

        /// Strings around the UUID forms: real ones in any case, with a character replaced,
        /// dropped or added, in braces or as a URN (which the `uuid` crate reads), the
        /// reserved ones, and anything at all.
        fn uuid_like() -> impl Strategy<Value = String> {
            let real = (
                any::<u128>(),
                any::<bool>(),
                prop::collection::vec(any::<bool>(), 36),
            )
                .prop_map(|(n, simple, upper)| {
                    let u = Uuid::from_u128(n);
                    let s = if simple {
                        u.simple().to_string()
                    } else {
                        u.hyphenated().to_string()
                    };
                    s.chars()
                        .zip(upper)
                        .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
                        .collect::<String>()
                });
            let edited = (real.clone(), any::<Index>(), any::<char>(), 0..3u8).prop_map(
                |(s, at, c, how)| {
                    let mut chars: Vec<char> = s.chars().collect();
                    let at = at.index(chars.len());
                    match how {
                        0 => chars[at] = c,
                        1 => {
                            chars.remove(at);
                        }
                        _ => chars.insert(at, c),
                    }
                    chars.into_iter().collect()
                },
            );
            prop_oneof![
                3 => real.clone(),
                3 => edited,
                1 => real.clone().prop_map(|s| format!("{{{s}}}")),
                1 => real.prop_map(|s| format!("urn:uuid:{s}")),
                1 => prop::sample::select(vec![
                    "00000000-0000-0000-0000-000000000000",
                    "00000000000000000000000000000000",
                    "ffffffff-ffff-ffff-ffff-ffffffffffff",
                    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
                ])
                .prop_map(str::to_owned),
                2 => any::<String>(),
                1 => "[0-9a-fA-F-]{30,38}",
            ]
        }

        proptest! {
            /// A device id is accepted exactly in a documented form, and stands for the UUID
            /// it spells: it displays as that, lowercase and hyphenated, and its display and
            /// its 32-digit form both read back as the same id.
            #[test]
            fn a_device_id_is_accepted_exactly_in_a_documented_form(s in uuid_like()) {
                let parsed = s.parse::<DeviceId>();
                prop_assert_eq!(parsed.as_ref().ok().map(DeviceId::to_string), documented_uuid(&s));
                match parsed {
                    Ok(id) => {
                        prop_assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
                        prop_assert_eq!(id.simple().parse::<DeviceId>(), Ok(id));
                    }
                    Err(e) => prop_assert!(e.to_string().len() < 200, "{}", e),
                }
            }

            /// A host name is accepted exactly as `UUID`, `UUID.floto` or `UUID.balena`, with
            /// any trailing dots of a fully qualified name, and names that UUID.
            #[test]
            fn a_host_is_accepted_exactly_as_a_uuid_with_a_documented_suffix(
                uuid in uuid_like(),
                suffix in prop::sample::select(vec![
                    "", ".floto", ".balena", ".", ".floto.", ".balena..", ".FLOTO", ".Balena",
                    ".example", ".floto.balena", ".balena.floto", "floto", "-floto", " .floto",
                    ".floto ", "..floto",
                ]),
                anything in any::<String>(),
            ) {
                let host = format!("{uuid}{suffix}");
                let bare = host.trim_end_matches('.');
                let documented = [".floto", ".balena", ""]
                    .iter()
                    .find_map(|s| bare.strip_suffix(s))
                    .and_then(documented_uuid);
                let parsed = DeviceId::from_host(&host);
                prop_assert_eq!(parsed.as_ref().ok().map(DeviceId::to_string), documented);
                if let Ok(id) = parsed {
                    prop_assert_eq!(DeviceId::from_host(&id.to_string()), Ok(id));
                }
                if let Ok(id) = DeviceId::from_host(&anything) {
                    prop_assert_eq!(DeviceId::from_host(&id.to_string()), Ok(id));
                }
            }
        }
    }
}
