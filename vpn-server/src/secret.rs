//! Bearer secrets (provisioning keys, login tokens): made random, shown once, stored as
//! SHA-256. They carry 192 bits of entropy, so a fast hash is the right one.

use base64::Engine as _;

/// A new secret `PREFIX_<32 base64url chars>`; the prefix tells a reader what it is.
pub fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::random();
    format!(
        "{prefix}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// SHA-256 of a secret, as stored.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The public id of a secret: the first 6 bytes of its hash, hex. Safe to log and list.
pub fn secret_id(hash: &[u8; 32]) -> String {
    hex::encode(&hash[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_hash_stably() {
        let a = new_secret("fpk");
        let b = new_secret("fpk");
        assert_ne!(a, b);
        assert!(a.starts_with("fpk_") && a.len() == 4 + 32, "{a}");
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert_eq!(secret_id(&hash_secret(&a)).len(), 12);
    }
}
