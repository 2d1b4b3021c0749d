//! Certificate serial numbers.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

use crate::PkiError;

/// RFC 5280 §4.1.2.2: conforming CAs MUST NOT use serials longer than 20 octets.
const MAX_SERIAL_LEN: usize = 20;
/// Random serials carry 16 bytes (128 bits, top bit cleared: 127 bits of entropy).
const RANDOM_SERIAL_LEN: usize = 16;
const TOO_LONG: &str =
    "a certificate serial is at most 20 bytes as a DER integer (up to 7f followed by 19 bytes)";

/// A certificate serial number: a positive integer whose DER encoding fits 20 bytes.
///
/// Stored as a big-endian magnitude, zero-padded on the left to 20 bytes, so the derived
/// ordering is numeric and the type is `Copy`. The canonical text form ([`Serial::to_hex`],
/// also `Display`) is lowercase hex of the magnitude without leading zero bytes: exactly what
/// the DER INTEGER of a certificate issued with this serial decodes to, so a serial read back
/// from a certificate ([`crate::parse_cert_der`]) prints the same string as the one used to
/// issue it. The registry stores that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial([u8; MAX_SERIAL_LEN]);

impl Serial {
    /// A fresh random serial: 16 bytes from the system CSPRNG with the top bit cleared (so
    /// the DER INTEGER is positive and at most 16 bytes), never zero.
    ///
    /// # Panics
    /// If the operating system's random number generator fails, which `ring` treats as
    /// unrecoverable as well.
    pub fn random() -> Self {
        let rng = SystemRandom::new();
        loop {
            let mut bytes = [0u8; RANDOM_SERIAL_LEN];
            // getrandom(2) does not fail once the kernel pool is initialised; ring has no
            // fallback either, and a CA without randomness must not issue anything.
            rng.fill(&mut bytes)
                .expect("the system random number generator failed");
            bytes[0] &= 0x7f;
            if let Ok(serial) = Self::from_bytes(&bytes) {
                return serial;
            }
            // All 16 bytes were zero (probability 2^-127): draw again.
        }
    }

    /// A serial from its big-endian unsigned magnitude. Leading zero bytes are ignored.
    /// Refuses zero and values whose DER INTEGER would exceed 20 bytes (RFC 5280).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let magnitude = &bytes[start..];
        if magnitude.is_empty() {
            return Err(PkiError::BadSerial {
                input: hex::encode(bytes),
                reason: "a certificate serial must not be zero",
            });
        }
        // The DER INTEGER (with its 00 sign byte when the top bit is set) must fit 20 octets.
        if magnitude.len() > MAX_SERIAL_LEN
            || (magnitude.len() == MAX_SERIAL_LEN && magnitude[0] & 0x80 != 0)
        {
            return Err(PkiError::BadSerial {
                input: hex::encode(bytes),
                reason: TOO_LONG,
            });
        }
        let mut out = [0u8; MAX_SERIAL_LEN];
        out[MAX_SERIAL_LEN - magnitude.len()..].copy_from_slice(magnitude);
        Ok(Self(out))
    }

    /// The serial from the content octets of a DER INTEGER (two's complement, as found in
    /// a certificate or CRL). Refuses negative and zero serials.
    pub(crate) fn from_der_integer(content: &[u8]) -> Result<Self, PkiError> {
        if content.first().is_some_and(|b| b & 0x80 != 0) {
            return Err(PkiError::BadSerial {
                input: hex::encode(content),
                reason: "the serial is a negative integer, which RFC 5280 forbids",
            });
        }
        Self::from_bytes(content)
    }

    /// The big-endian magnitude, without leading zero bytes (1 to 20 bytes).
    pub fn as_bytes(&self) -> &[u8] {
        let start = self
            .0
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(MAX_SERIAL_LEN - 1);
        &self.0[start..]
    }

    /// The serial as rcgen writes it (a positive DER INTEGER of these bytes).
    pub(crate) fn to_rcgen(self) -> rcgen::SerialNumber {
        rcgen::SerialNumber::from_slice(self.as_bytes())
    }

    /// Canonical lowercase hex of [`Serial::as_bytes`]: even length, no leading `00`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.as_bytes())
    }

    /// Parses hex digits in either case. `:` separators (as printed by some tools) and
    /// leading zeros are accepted; the result prints back in canonical form.
    pub fn from_hex(s: &str) -> Result<Self, PkiError> {
        let bad = |reason| PkiError::BadSerial {
            input: s.chars().take(64).collect(),
            reason,
        };
        let digits: String = s.trim().chars().filter(|&c| c != ':').collect();
        if digits.is_empty() {
            return Err(bad("a serial needs at least one hex digit"));
        }
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("a serial is written in hex digits (0-9, a-f)"));
        }
        let digits = digits.trim_start_matches('0');
        if digits.len() > 2 * MAX_SERIAL_LEN {
            return Err(bad(TOO_LONG));
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits.to_owned()
        };
        let bytes = hex::decode(&padded).map_err(|_| bad("not valid hex"))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            PkiError::BadSerial { reason, .. } => bad(reason),
            other => other,
        })
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

impl std::str::FromStr for Serial {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, PkiError> {
        Self::from_hex(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_16_bytes_at_most_and_distinct() {
        let a = Serial::random();
        let b = Serial::random();
        assert_ne!(a, b);
        for s in [a, b] {
            let magnitude = s.as_bytes();
            assert!(magnitude.len() <= 16);
            // Below 2^127: the top bit of 16 bytes is clear. A shorter magnitude (its first
            // byte drawn as zero and dropped) may start with any bit.
            if magnitude.len() == 16 {
                assert_eq!(magnitude[0] & 0x80, 0, "top bit must be clear");
            }
            assert_ne!(magnitude[0], 0, "no leading zero byte");
        }
        // The case above happens once in 128 draws: check it on purpose.
        let short = Serial::from_bytes(&[0, 0x80, 1]).unwrap();
        assert_eq!(short.as_bytes(), [0x80, 1]);
    }

    #[test]
    fn hex_round_trip_is_canonical() {
        for _ in 0..100 {
            let s = Serial::random();
            let hex = s.to_hex();
            assert_eq!(hex.len() % 2, 0);
            assert!(!hex.starts_with("00"));
            assert_eq!(hex, hex.to_lowercase());
            assert_eq!(Serial::from_hex(&hex).unwrap(), s);
            assert_eq!(s.to_string(), hex);
        }
    }

    #[test]
    fn from_hex_normalises() {
        let s = Serial::from_hex("00:0A:BC").unwrap();
        assert_eq!(s.to_hex(), "0abc");
        assert_eq!(s.as_bytes(), &[0x0a, 0xbc]);
        assert_eq!(Serial::from_hex("abc").unwrap(), s);
        assert_eq!(Serial::from_bytes(&[0, 0, 0x0a, 0xbc]).unwrap(), s);
    }

    #[test]
    fn from_hex_refuses_bad_input() {
        for bad in ["", "  ", "0", "0000", "xyz", "12 34", &"7f".repeat(21)] {
            let err = Serial::from_hex(bad).unwrap_err();
            assert!(matches!(err, PkiError::BadSerial { .. }), "{bad:?}: {err}");
        }
        assert!(Serial::from_hex(&"7f".repeat(20)).is_ok());
        assert!(Serial::from_hex(&"80".repeat(20)).is_err());
        assert!(Serial::from_hex(&"80".repeat(19)).is_ok());
    }

    #[test]
    fn der_integer_sign_is_checked() {
        assert!(Serial::from_der_integer(&[0x00, 0x80, 0x01]).is_ok());
        assert!(Serial::from_der_integer(&[0x80, 0x01]).is_err());
        assert!(Serial::from_der_integer(&[0x00]).is_err());
    }

    #[test]
    fn ordering_is_numeric() {
        let small = Serial::from_hex("ff").unwrap();
        let big = Serial::from_hex("0100").unwrap();
        assert!(small < big);
    }
}
