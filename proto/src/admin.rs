//! Admin and operator requests: provisioning keys, operators, login.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What an operator may do. Ordered: each role can do what the ones below it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read-only API and metrics.
    Viewer,
    /// List devices, ssh and tunnel into devices of its fleets.
    Operator,
    /// Everything.
    Admin,
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "operator" => Ok(Self::Operator),
            "viewer" => Ok(Self::Viewer),
            other => Err(format!(
                "unknown role {other:?}: expected admin, operator or viewer"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        })
    }
}

/// `POST /v1/keys`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub fleet: String,
    /// How many devices the key may enroll; unlimited when absent.
    #[serde(default)]
    pub uses: Option<u32>,
    /// Lifetime in seconds; no expiry when absent.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Response of `POST /v1/keys`. `key` is shown this once; the server keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKeyResponse {
    pub id: String,
    pub key: String,
    pub fleet: String,
    pub uses: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub expires_at: Option<OffsetDateTime>,
}

/// `POST /v1/operators`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddOperatorRequest {
    pub name: String,
    pub role: Role,
    /// Fleets the operator may reach; ignored for admins, who reach all.
    #[serde(default)]
    pub fleets: Vec<String>,
    /// Lifetime of a viewer's API token in seconds; no expiry when absent. (Login tokens
    /// of admins and operators always expire after 24 h.)
    #[serde(default)]
    pub token_expires_in_secs: Option<u64>,
}

/// `POST /v1/login/renew` (over mTLS with the current operator certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewLoginRequest {
    pub csr_pem: String,
}

/// One audit record, as `GET /v1/audit` returns it (newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Operator name, `device:<uuid>`, `key:<id>` or `system`.
    pub actor: String,
    /// e.g. `broker.session`, `broker.refused`, `device.revoked`, `key.created`.
    pub action: String,
    pub device: Option<crate::DeviceId>,
    /// The action's details (for a broker session: port, start, end, bytes, result).
    pub detail: serde_json::Value,
}

/// What an operator's token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// One-time: `floto login` trades it for an operator certificate.
    Login,
    /// A bearer token for machine clients (viewers: Prometheus, the FLOTO API), sent as
    /// `Authorization: Bearer <token>` until it expires or the operator is revoked.
    Api,
}

/// Response of `POST /v1/operators`: the operator's token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddOperatorResponse {
    pub name: String,
    pub role: Role,
    pub fleets: Vec<String>,
    pub token_kind: TokenKind,
    pub token: String,
    /// `None` for an API token without expiry.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub token_expires_at: Option<OffsetDateTime>,
}

/// `POST /v1/login`: trade a one-time token and a CSR for an operator certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub token: String,
    pub csr_pem: String,
}

/// Response of `POST /v1/login` and of operator certificate renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResponse {
    pub name: String,
    pub role: Role,
    pub fleets: Vec<String>,
    pub certificate_pem: String,
    pub ca_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The QUIC broker's UDP port on the same host as the API.
    pub quic_port: u16,
}

/// An operator as `GET /v1/operators` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub name: String,
    pub role: Role,
    pub fleets: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
}

/// A provisioning key as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: String,
    pub fleet: String,
    pub uses_left: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
}

/// A server node as `GET /v1/nodes` lists it. A single node lists itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique per process start (a restarted node is a new node); `local` on a single node.
    pub id: String,
    pub name: String,
    /// Where other nodes reach it.
    pub address: String,
    /// Whether its lease is alive.
    pub alive: bool,
    /// The node answering the request.
    pub this: bool,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub lease_expires_at: Option<OffsetDateTime>,
    /// Devices whose session it holds.
    pub devices: u64,
}

/// Fleet names: what `--fleet` accepts.
pub fn validate_fleet_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "fleet name {name:?} must be 1 to 63 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Longest operator name.
pub const MAX_OPERATOR_NAME: usize = 64;

/// Why `name` is not a valid operator name, if it is not. Operator names are 1 to 64
/// characters from `A-Z a-z 0-9 . _ - @ +`, starting with a letter or digit (an e-mail
/// address works; no spaces, slashes or control characters). This is the one rule: `operator
/// add`, the API and the CA (which names operators in their certificates) all apply it.
pub fn operator_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_OPERATOR_NAME {
        return Some(format!(
            "it must be 1 to {MAX_OPERATOR_NAME} characters long"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some("it must start with a letter or a digit".to_owned());
    }
    name.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+')))
        .map(|c| format!("{c:?} is not allowed; use letters, digits and . _ - @ +"))
}

/// Checks an operator name (see [`operator_name_problem`]), with a message naming it.
pub fn validate_operator_name(name: &str) -> Result<(), String> {
    match operator_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(format!("operator name {name:?} is not valid: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_order() {
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn operator_names() {
        for good in ["alice", "alice@example.com", "ops-team_1.x+y", "7"] {
            assert!(validate_operator_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-alice",
            ".x",
            "_x",
            "a b",
            "a/b",
            "a\nb",
            "\u{e4}",
            &"a".repeat(65),
        ] {
            let err = validate_operator_name(bad).unwrap_err();
            assert!(err.starts_with("operator name"), "{err}");
        }
        assert!(validate_operator_name(".alice")
            .unwrap_err()
            .contains("start with a letter or a digit"));
    }

    #[test]
    fn fleet_names() {
        assert!(validate_fleet_name("lab-01").is_ok());
        assert!(validate_fleet_name("").is_err());
        assert!(validate_fleet_name("a b").is_err());
        assert!(validate_fleet_name(&"a".repeat(64)).is_err());
    }
}
