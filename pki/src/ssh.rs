//! OpenSSH certificate authorities: one signs operators' user certificates, the other
//! devices' host certificates. Ed25519 CA keys; the wire format is the `ssh-key` crate's.
//!
//! A user certificate names its operator and audit session in its key ID, carries the logins
//! its operator may use as principals, and a `source-address` critical option so that it is
//! accepted only from the server's overlay addresses (through the broker). A host certificate
//! names its device (`<uuid>.floto` and `<uuid>`).

use std::net::IpAddr;

use ssh_key::certificate::{Builder, CertType};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, EcdsaCurve, LineEnding, PrivateKey, PublicKey};
use time::OffsetDateTime;

pub use ssh_key::Certificate;

/// Longest public key line accepted (an RSA-16384 key is about 2.8 KB).
pub const MAX_PUBLIC_KEY: usize = 8192;
/// Shortest RSA key accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// How far back a certificate is valid from, for devices whose clocks run a little behind.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Why a key or a certificate request is refused.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "not an OpenSSH public key ({0}); expected one line such as `ssh-ed25519 AAAA... comment`"
    )]
    Malformed(String),
    #[error("{0} keys are not accepted: use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa of at least {MIN_RSA_BITS} bits")]
    Unsupported(String),
    #[error("an RSA key of {0} bits is too weak: at least {MIN_RSA_BITS} are needed")]
    WeakRsa(usize),
    #[error("{0:?} is not a login name (letters, digits, `_`, `-`, `.`, up to 32, not starting with `-`)")]
    BadLogin(String),
    #[error("the SSH CA key is unusable: {0}")]
    CaKey(String),
    #[error("signing the certificate failed: {0}")]
    Sign(String),
}

/// The public key of an OpenSSH `authorized_keys`-style line, checked: one line, a key type
/// we sign (Ed25519, ECDSA, RSA of at least [`MIN_RSA_BITS`]), no certificates.
pub fn parse_public_key(line: &str) -> Result<PublicKey, SshError> {
    let line = line.trim();
    if line.len() > MAX_PUBLIC_KEY {
        return Err(SshError::Malformed(format!(
            "{} bytes, more than {MAX_PUBLIC_KEY}",
            line.len()
        )));
    }
    if line.contains('\n') {
        return Err(SshError::Malformed("more than one line".into()));
    }
    let key = PublicKey::from_openssh(line).map_err(|e| {
        // The type word, if it is a type we do not know, is the clearer reason.
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(kind), Some(_)) if Algorithm::new(kind).is_err() => {
                SshError::Unsupported(kind.chars().take(64).collect())
            }
            _ => SshError::Malformed(e.to_string()),
        }
    })?;
    match key.algorithm() {
        Algorithm::Ed25519 => {}
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384 | EcdsaCurve::NistP521,
        } => {}
        Algorithm::Rsa { .. } => {
            let bits = key
                .key_data()
                .rsa()
                .map(|k| rsa_bits(k.n.as_positive_bytes().unwrap_or_default()))
                .unwrap_or(0);
            if bits < MIN_RSA_BITS {
                return Err(SshError::WeakRsa(bits));
            }
        }
        other => return Err(SshError::Unsupported(other.as_str().to_owned())),
    }
    Ok(key)
}

fn rsa_bits(modulus: &[u8]) -> usize {
    match modulus.iter().position(|b| *b != 0) {
        None => 0,
        Some(i) => (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize,
    }
}

/// Whether `login` may be a principal of a user certificate: a POSIX-ish user name.
pub fn check_login(login: &str) -> Result<(), SshError> {
    let ok = !login.is_empty()
        && login.len() <= 32
        && !login.starts_with('-')
        && login
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SshError::BadLogin(login.chars().take(64).collect()))
    }
}

/// A new Ed25519 key pair: the private key file's text (OpenSSH, unencrypted) and the
/// public line.
pub fn new_key(comment: &str) -> Result<(String, String), SshError> {
    let ca = SshCa::generate(comment)?;
    Ok((ca.to_openssh()?, ca.public_line()))
}

/// What a certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub serial: u64,
    /// Shown in the server's sshd log (`ID ...`).
    pub key_id: String,
    pub principals: Vec<String>,
    pub valid_after: OffsetDateTime,
    pub valid_before: OffsetDateTime,
    /// User certificates: the only addresses the certificate is accepted from.
    pub source_addresses: Vec<IpAddr>,
}

/// An SSH certificate authority (Ed25519).
pub struct SshCa {
    key: PrivateKey,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("public", &self.public_line())
            .finish_non_exhaustive()
    }
}

impl SshCa {
    /// A new CA key, with `comment` on its public line.
    pub fn generate(comment: &str) -> Result<Self, SshError> {
        let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .map_err(|e| SshError::CaKey(e.to_string()))?;
        key.set_comment(comment);
        Ok(Self { key })
    }

    /// A CA from its OpenSSH private key file (unencrypted Ed25519, as `ssh-keygen -t
    /// ed25519 -N ''` writes it).
    pub fn from_openssh(text: &str) -> Result<Self, SshError> {
        let key = PrivateKey::from_openssh(text).map_err(|e| SshError::CaKey(e.to_string()))?;
        if key.is_encrypted() {
            return Err(SshError::CaKey(
                "the key is encrypted; decrypt it with `ssh-keygen -p -N ''` first".into(),
            ));
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SshError::CaKey(format!(
                "a {} key; the SSH CAs are Ed25519",
                key.algorithm().as_str()
            )));
        }
        Ok(Self { key })
    }

    /// The private key file's text (keep it 0600).
    pub fn to_openssh(&self) -> Result<String, SshError> {
        self.key
            .to_openssh(LineEnding::LF)
            .map(|text| text.as_str().to_owned())
            .map_err(|e| SshError::CaKey(e.to_string()))
    }

    /// `ssh-ed25519 AAAA... comment`: the line devices trust (`TrustedUserCAKeys`) or
    /// operators put after `@cert-authority`.
    pub fn public_line(&self) -> String {
        self.key
            .public_key()
            .to_openssh()
            .unwrap_or_else(|_| String::from("ssh-ed25519 (unencodable)"))
    }

    /// The CA's public key.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// A user certificate for `subject`: `permit-pty`, `permit-port-forwarding` and
    /// `permit-user-rc`, and `source-address` when the spec names addresses.
    pub fn sign_user(&self, subject: &PublicKey, spec: &CertSpec) -> Result<Certificate, SshError> {
        for login in &spec.principals {
            check_login(login)?;
        }
        let mut b = self.builder(subject, spec)?;
        let sign = |e: ssh_key::Error| SshError::Sign(e.to_string());
        b.cert_type(CertType::User).map_err(sign)?;
        if !spec.source_addresses.is_empty() {
            let list: Vec<String> = spec
                .source_addresses
                .iter()
                .map(|a| match a {
                    IpAddr::V4(v4) => format!("{v4}/32"),
                    IpAddr::V6(v6) => format!("{v6}/128"),
                })
                .collect();
            b.critical_option("source-address", list.join(","))
                .map_err(sign)?;
        }
        for ext in ["permit-port-forwarding", "permit-pty", "permit-user-rc"] {
            b.extension(ext, "").map_err(sign)?;
        }
        b.sign(&self.key).map_err(sign)
    }

    /// A host certificate for `subject` with the spec's principals (host names).
    pub fn sign_host(&self, subject: &PublicKey, spec: &CertSpec) -> Result<Certificate, SshError> {
        let mut b = self.builder(subject, spec)?;
        let sign = |e: ssh_key::Error| SshError::Sign(e.to_string());
        b.cert_type(CertType::Host).map_err(sign)?;
        b.sign(&self.key).map_err(sign)
    }

    fn builder(&self, subject: &PublicKey, spec: &CertSpec) -> Result<Builder, SshError> {
        let sign = |e: ssh_key::Error| SshError::Sign(e.to_string());
        let secs = |t: OffsetDateTime| u64::try_from(t.unix_timestamp()).unwrap_or(0);
        let mut b = Builder::new_with_random_nonce(
            &mut OsRng,
            subject.key_data().clone(),
            secs(spec.valid_after),
            secs(spec.valid_before),
        )
        .map_err(sign)?;
        b.serial(spec.serial).map_err(sign)?;
        b.key_id(spec.key_id.clone()).map_err(sign)?;
        if spec.principals.is_empty() {
            return Err(SshError::Sign("a certificate needs a principal".into()));
        }
        for p in &spec.principals {
            b.valid_principal(p.clone()).map_err(sign)?;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(principals: &[&str]) -> CertSpec {
        let now = OffsetDateTime::now_utc();
        CertSpec {
            serial: 7,
            key_id: "floto:alice:42".into(),
            principals: principals.iter().map(|p| p.to_string()).collect(),
            valid_after: now - BACKDATE,
            valid_before: now + time::Duration::hours(1),
            source_addresses: vec!["10.240.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn user_and_host_certificates_say_what_was_asked() {
        let ca = SshCa::generate("floto user CA").unwrap();
        let again = SshCa::from_openssh(&ca.to_openssh().unwrap()).unwrap();
        assert_eq!(again.public_line(), ca.public_line());
        assert!(ca.public_line().starts_with("ssh-ed25519 "));
        let subject = SshCa::generate("x").unwrap().public_key().clone();
        let line = subject.to_openssh().unwrap();
        let subject = parse_public_key(&line).unwrap();
        let cert = ca.sign_user(&subject, &spec(&["root", "pi"])).unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_principals(), ["root", "pi"]);
        assert_eq!(cert.key_id(), "floto:alice:42");
        assert_eq!(cert.serial(), 7);
        assert_eq!(
            cert.critical_options()
                .get("source-address")
                .map(String::as_str),
            Some("10.240.0.1/32")
        );
        assert!(cert.extensions().contains_key("permit-pty"));
        assert!(!cert.extensions().contains_key("permit-agent-forwarding"));
        cert.validate([&ca.public_key().fingerprint(Default::default())])
            .unwrap();
        let host = ca.sign_host(&subject, &spec(&["u.floto", "u"])).unwrap();
        assert_eq!(host.cert_type(), CertType::Host);
        assert!(host.critical_options().is_empty());
        // What OpenSSH reads back is what we wrote.
        let text = host.to_openssh().unwrap();
        assert_eq!(Certificate::from_openssh(&text).unwrap(), host);
    }

    #[test]
    fn bad_keys_and_logins_are_refused_with_a_reason() {
        let too_long = format!("ssh-ed25519 {}", "A".repeat(MAX_PUBLIC_KEY));
        for (line, why) in [
            ("", "not an OpenSSH public key"),
            ("ssh-ed25519", "not an OpenSSH public key"),
            ("ssh-ed25519 !!!notbase64", "not an OpenSSH public key"),
            ("ssh-foo AAAAB3NzaC1yc2E= x", "ssh-foo keys are not accepted"),
            (
                "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAPFLsUyB4J2/yCaIhd2x1I7FHrnjbtCkGNntkyGrk4JNyRSNqoZYvtnj0cMXhO2OPLQkthVd36sjbmNivNzNIsUCnONvgbbK9Cto9bD8cAXGsDRiMtFoIIO9sYJ5KtbTGQ5DuP6c5cOMX8TWmv0N+3gMpsAx8pRL1odxhvSp+fzQ x",
                "ssh-dss keys are not accepted",
            ),
            (too_long.as_str(), "more than 8192"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==\nssh-ed25519 x", "more than one line"),
        ] {
            let e = parse_public_key(line).unwrap_err().to_string();
            assert!(e.contains(why), "{line:?}: {e}");
        }
        for bad in ["", "-rf", "a b", "r\u{f6}ot", &"x".repeat(33), "a;b"] {
            assert!(check_login(bad).is_err(), "{bad:?}");
        }
        for good in ["root", "pi", "svc-user_1", "first.last"] {
            check_login(good).unwrap();
        }
        let ca = SshCa::generate("c").unwrap();
        let subject = SshCa::generate("x").unwrap().public_key().clone();
        let e = ca.sign_user(&subject, &spec(&["root; rm"])).unwrap_err();
        assert!(e.to_string().contains("not a login name"), "{e}");
        assert!(ca.sign_user(&subject, &spec(&[])).is_err());
        assert!(SshCa::from_openssh("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n").is_err());
    }
}
