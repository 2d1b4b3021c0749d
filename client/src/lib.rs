//! floto-client: the client side of the floto-connect API over HTTPS (JSON routes, with or
//! without a client certificate) and of the broker (QUIC streams and HTTPS CONNECT). Used by
//! `floto`, `floto-tunnel`, the server's admin subcommands, the benches and the e2e tests.
//! It trusts only the CA it is given, never the system roots. Also what the three
//! command-line programs share: their start and end ([`cli`]) and their tables ([`table`]).

pub mod broker;
pub mod cli;
pub mod table;
pub mod tls;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use floto_proto::admin::{
    AddOperatorRequest, AddOperatorResponse, AuditEntry, CreateKeyRequest, CreateKeyResponse,
    KeyInfo, LoginRequest, LoginResponse, OperatorInfo, RenewLoginRequest,
};
use floto_proto::devices::DeviceInfo;
use floto_proto::enroll::{EnrollRequest, EnrollResponse, RenewRequest};
use floto_proto::{paths, ApiError, DeviceId, ErrorCode};

pub use tls::Identity;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{} (HTTP {status})", error.message)]
    Api { status: u16, error: ApiError },
    /// The server could not be reached or the connection failed.
    #[error("cannot reach {server}: {detail}")]
    Transport { server: String, detail: String },
    /// The server's answer was not what this client understands.
    #[error("unexpected answer from {server}: {detail}")]
    Decode { server: String, detail: String },
    /// The client's own configuration is unusable (bad CA file, bad URL...).
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The API error code, when the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { error, .. } => Some(error.error),
            _ => None,
        }
    }

    /// True when trying again later may help (unreachable, shed, unavailable).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// Filters of [`ApiClient::audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub device: Option<DeviceId>,
    pub operator: Option<String>,
    pub since: Option<time::OffsetDateTime>,
    pub limit: Option<u32>,
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// `server` is `https://HOST[:PORT]`; `ca_pem` the CA the server's certificate chains to.
    /// No proxy: the environment's is not read.
    pub fn new(
        server: &str,
        ca_pem: &str,
        identity: Option<&Identity>,
    ) -> Result<Self, ClientError> {
        Self::via_proxy(server, ca_pem, identity, None)
    }

    /// As [`ApiClient::new`], through the HTTP proxy `proxy` (`http://HOST:PORT`, which must
    /// allow `CONNECT`) when one is given.
    pub fn via_proxy(
        server: &str,
        ca_pem: &str,
        identity: Option<&Identity>,
        proxy: Option<&str>,
    ) -> Result<Self, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(ClientError::Config(format!(
                "server URL {server:?} must start with https://"
            )));
        }
        let tls = tls::client_config(ca_pem, identity, &[b"h2", b"http/1.1"])?;
        let builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy();
        let builder = match proxy {
            None => builder,
            Some(url) => builder.proxy(
                reqwest::Proxy::all(url)
                    .map_err(|e| ClientError::Config(format!("proxy {url:?}: {e}")))?,
            ),
        };
        let http = builder
            .build()
            .map_err(|e| ClientError::Config(format!("building the HTTPS client: {e}")))?;
        Ok(Self { base, http })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        bearer: Option<&str>,
    ) -> Result<(StatusCode, T), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        if !status.is_success() {
            let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                ApiError::new(
                    ErrorCode::from_http_status(status.as_u16()),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                        .trim()
                        .to_owned(),
                )
            });
            return Err(ClientError::Api {
                status: status.as_u16(),
                error,
            });
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            server: self.base.clone(),
            detail: e.to_string(),
        })?;
        Ok((status, value))
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        // reqwest's own message is terse; its sources say what happened (refused, TLS...).
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        ClientError::Transport {
            server: self.base.clone(),
            detail,
        }
    }

    /// `POST /v1/enroll`. Returns the HTTP status (201 new, 200 re-enrolled) too.
    pub async fn enroll(
        &self,
        provisioning_key: &str,
        req: &EnrollRequest,
    ) -> Result<(u16, EnrollResponse), ClientError> {
        let (status, resp) = self
            .call(
                Method::POST,
                paths::ENROLL,
                Some(req),
                Some(provisioning_key),
            )
            .await?;
        Ok((status.as_u16(), resp))
    }

    /// `POST /v1/renew` (needs the device identity).
    pub async fn renew(&self, req: &RenewRequest) -> Result<EnrollResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::RENEW, Some(req), None)
            .await?
            .1)
    }

    pub async fn create_key(
        &self,
        req: &CreateKeyRequest,
    ) -> Result<CreateKeyResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::KEYS, Some(req), None)
            .await?
            .1)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, paths::KEYS, None, None)
            .await?
            .1)
    }

    /// `GET /v1/nodes`
    pub async fn nodes(&self) -> Result<Vec<floto_proto::admin::NodeInfo>, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, paths::NODES, None, None)
            .await?
            .1)
    }

    /// `POST /v1/keys/{id}/revoke`
    pub async fn revoke_key(&self, id: &str) -> Result<KeyInfo, ClientError> {
        Ok(self
            .call::<(), _>(Method::POST, &paths::key_revoke(id), None, None)
            .await?
            .1)
    }

    pub async fn add_operator(
        &self,
        req: &AddOperatorRequest,
    ) -> Result<AddOperatorResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::OPERATORS, Some(req), None)
            .await?
            .1)
    }

    pub async fn list_operators(&self) -> Result<Vec<OperatorInfo>, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, paths::OPERATORS, None, None)
            .await?
            .1)
    }

    pub async fn login(&self, req: &LoginRequest) -> Result<LoginResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::LOGIN, Some(req), None)
            .await?
            .1)
    }

    /// `POST /v1/login/renew` (needs the operator identity).
    pub async fn renew_login(&self, req: &RenewLoginRequest) -> Result<LoginResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::LOGIN_RENEW, Some(req), None)
            .await?
            .1)
    }

    pub async fn revoke_operator(&self, name: &str) -> Result<OperatorInfo, ClientError> {
        Ok(self
            .call::<(), _>(Method::POST, &paths::operator_revoke(name), None, None)
            .await?
            .1)
    }

    /// `GET /v1/audit`, newest first.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, ClientError> {
        let mut params = Vec::new();
        if let Some(d) = &query.device {
            params.push(format!("device={d}"));
        }
        if let Some(o) = &query.operator {
            params.push(format!("operator={}", percent_encode(o)));
        }
        if let Some(s) = query.since {
            params.push(format!(
                "since={}",
                percent_encode(&floto_proto::rfc3339(s))
            ));
        }
        if let Some(l) = query.limit {
            params.push(format!("limit={l}"));
        }
        let path = if params.is_empty() {
            paths::AUDIT.to_owned()
        } else {
            format!("{}?{}", paths::AUDIT, params.join("&"))
        };
        Ok(self.call::<(), _>(Method::GET, &path, None, None).await?.1)
    }

    pub async fn devices(&self, online: Option<bool>) -> Result<Vec<DeviceInfo>, ClientError> {
        let path = match online {
            Some(o) => format!("{}?online={o}", paths::DEVICES),
            None => paths::DEVICES.to_owned(),
        };
        Ok(self.call::<(), _>(Method::GET, &path, None, None).await?.1)
    }

    pub async fn device(&self, id: &DeviceId) -> Result<DeviceInfo, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, &paths::device(id), None, None)
            .await?
            .1)
    }

    pub async fn revoke_device(&self, id: &DeviceId) -> Result<DeviceInfo, ClientError> {
        Ok(self
            .call::<(), _>(Method::POST, &paths::device_revoke(id), None, None)
            .await?
            .1)
    }

    /// `POST /v1/ssh/user-cert` (needs the operator identity).
    pub async fn ssh_user_cert(
        &self,
        req: &floto_proto::ssh::UserCertRequest,
    ) -> Result<floto_proto::ssh::UserCertResponse, ClientError> {
        Ok(self
            .call(Method::POST, paths::SSH_USER_CERT, Some(req), None)
            .await?
            .1)
    }

    /// `GET /v1/ssh/device` (needs the device identity).
    pub async fn ssh_device_policy(
        &self,
    ) -> Result<floto_proto::ssh::DeviceSshPolicy, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, paths::SSH_DEVICE, None, None)
            .await?
            .1)
    }

    /// `GET /v1/fleets`
    pub async fn fleets(&self) -> Result<Vec<floto_proto::ssh::FleetSettings>, ClientError> {
        Ok(self
            .call::<(), _>(Method::GET, paths::FLEETS, None, None)
            .await?
            .1)
    }

    /// `PUT /v1/fleets/{name}`
    pub async fn set_fleet(
        &self,
        name: &str,
        settings: &floto_proto::ssh::FleetSettings,
    ) -> Result<floto_proto::ssh::FleetSettings, ClientError> {
        let path = format!("{}/{}", paths::FLEETS, percent_encode(name));
        Ok(self.call(Method::PUT, &path, Some(settings), None).await?.1)
    }
}
