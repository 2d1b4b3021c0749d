//! The operator's side: `floto login` and the config dir it fills
//! (`$XDG_CONFIG_HOME/floto/`): the server, the operator certificate and key, and the CA
//! that the server's TLS certificate chains to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use floto_client::broker::BrokerTarget;
use floto_client::{ApiClient, ClientError, Identity};
use floto_files::FileError;
use floto_proto::admin::{LoginRequest, RenewLoginRequest, Role};
use floto_proto::rfc3339;

use crate::servers::ServerUrl;

/// Why the operator config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("not logged in ({} has no config.json); run `floto login --server URL --token TOKEN`", .0.display())]
    NotLoggedIn(PathBuf),
    #[error(
        "the operator certificate expired at {0}; run `floto login` with a new token from an admin"
    )]
    Expired(String),
    #[error("operator config {}: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
}

/// `config.json`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorConfig {
    pub server: String,
    pub quic_port: u16,
    pub name: String,
    pub role: Role,
    pub fleets: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// The default config dir: `$XDG_CONFIG_HOME/floto`, else `~/.config/floto`.
pub fn default_config_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("floto");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config").join("floto")
}

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Operator {
    pub config: OperatorConfig,
    pub identity: Identity,
    pub server_ca_pem: String,
}

impl Operator {
    pub fn load(dir: &Path) -> Result<Self, OperatorError> {
        let path = dir.join("config.json");
        let text = match floto_files::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => return Err(OperatorError::NotLoggedIn(dir.to_owned())),
            Err(e) => return Err(e.into()),
        };
        let config: OperatorConfig =
            serde_json::from_str(&text).map_err(|e| OperatorError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let identity = Identity {
            cert_pem: floto_files::read_to_string(&dir.join("operator.pem"))?,
            key_pem: floto_files::read_secret(&dir.join("operator.key"))?,
        };
        let server_ca_pem = floto_files::read_to_string(&dir.join("server-ca.pem"))?;
        if config.expires_at <= OffsetDateTime::now_utc() {
            return Err(OperatorError::Expired(rfc3339(config.expires_at)));
        }
        Ok(Self {
            config,
            identity,
            server_ca_pem,
        })
    }

    /// As [`load`](Self::load), renewing the certificate first when less than a third of
    /// its lifetime is left (a failed renewal is logged; the current one still works).
    pub async fn load_renewing(dir: &Path) -> Result<Self, OperatorError> {
        let op = Self::load(dir)?;
        let cert = floto_pki::parse_cert_pem(&op.identity.cert_pem).map_err(|e| {
            OperatorError::Damaged {
                path: dir.join("operator.pem"),
                reason: e.to_string(),
            }
        })?;
        let lifetime = cert.not_after - cert.not_before;
        if cert.not_after - OffsetDateTime::now_utc() > lifetime / 3 {
            return Ok(op);
        }
        match op.renew(dir).await {
            Ok(renewed) => Ok(renewed),
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the operator certificate; using the current one");
                Ok(op)
            }
        }
    }

    /// A new certificate for a new key, over mTLS with the current one.
    async fn renew(&self, dir: &Path) -> Result<Self, OperatorError> {
        let key = floto_pki::generate_key().map_err(|e| OperatorError::Usage(e.to_string()))?;
        let csr = floto_pki::make_csr(&key, "operator")
            .map_err(|e| OperatorError::Usage(e.to_string()))?;
        let resp = self
            .api()?
            .renew_login(&RenewLoginRequest { csr_pem: csr })
            .await?;
        let config = OperatorConfig {
            expires_at: resp.expires_at,
            role: resp.role,
            fleets: resp.fleets,
            ..self.config.clone()
        };
        save(
            dir,
            &config,
            &key,
            &resp.certificate_pem,
            &self.server_ca_pem,
        )?;
        tracing::info!(expires_at = %resp.expires_at, "renewed the operator certificate");
        Self::load(dir)
    }

    pub fn api(&self) -> Result<ApiClient, ClientError> {
        ApiClient::new(
            &self.config.server,
            &self.server_ca_pem,
            Some(&self.identity),
        )
    }

    /// Where the broker is: the API's host, its port, and the QUIC port.
    pub fn broker_target(&self) -> Result<BrokerTarget, OperatorError> {
        let (host, api_port) = split_server(&self.config.server)?;
        Ok(BrokerTarget {
            host,
            api_port,
            quic_port: self.config.quic_port,
            ca_pem: self.server_ca_pem.clone(),
            identity: self.identity.clone(),
        })
    }
}

/// `https://HOST[:PORT][/]` into host (an IPv6 address in brackets) and port (default 8443).
pub fn split_server(server: &str) -> Result<(String, u16), OperatorError> {
    let url: ServerUrl = server.parse().map_err(OperatorError::Usage)?;
    let host = if url.host().contains(':') {
        format!("[{}]", url.host())
    } else {
        url.host().to_owned()
    };
    Ok((host, url.port()))
}

/// `floto login`: trades the one-time token and a fresh key's CSR for a certificate.
pub async fn login(
    dir: &Path,
    server: &str,
    token: &str,
    server_ca_pem: &str,
) -> Result<OperatorConfig, OperatorError> {
    split_server(server)?;
    let key = floto_pki::generate_key().map_err(|e| OperatorError::Usage(e.to_string()))?;
    let csr =
        floto_pki::make_csr(&key, "operator").map_err(|e| OperatorError::Usage(e.to_string()))?;
    let api = ApiClient::new(server, server_ca_pem, None)?;
    let resp = api
        .login(&LoginRequest {
            token: token.to_owned(),
            csr_pem: csr,
        })
        .await?;
    let config = OperatorConfig {
        server: server.trim_end_matches('/').to_owned(),
        quic_port: resp.quic_port,
        name: resp.name,
        role: resp.role,
        fleets: resp.fleets,
        expires_at: resp.expires_at,
    };
    save(dir, &config, &key, &resp.certificate_pem, server_ca_pem)?;
    Ok(config)
}

/// Writes the operator's files; config.json last, as the mark that the rest is complete.
fn save(
    dir: &Path,
    config: &OperatorConfig,
    key_pem: &str,
    cert_pem: &str,
    server_ca_pem: &str,
) -> Result<(), OperatorError> {
    floto_files::create_private_dir(dir)?;
    floto_files::write_secret(&dir.join("operator.key"), key_pem.as_bytes())?;
    floto_files::write_public(&dir.join("operator.pem"), cert_pem.as_bytes())?;
    floto_files::write_public(&dir.join("server-ca.pem"), server_ca_pem.as_bytes())?;
    let json =
        serde_json::to_vec_pretty(config).map_err(|e| OperatorError::Usage(e.to_string()))?;
    floto_files::write_public(&dir.join("config.json"), &json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            split_server("https://vpn.example.org").unwrap(),
            ("vpn.example.org".into(), 8443)
        );
        assert_eq!(
            split_server("https://10.0.0.1:9443/").unwrap(),
            ("10.0.0.1".into(), 9443)
        );
        assert_eq!(
            split_server("https://[::1]:8443").unwrap(),
            ("[::1]".into(), 8443)
        );
        assert!(split_server("http://x").is_err());
        assert!(split_server("https://").is_err());
        assert!(split_server("https://x:notaport").is_err());
    }
}
