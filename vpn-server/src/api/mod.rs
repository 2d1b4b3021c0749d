//! The HTTPS API on TCP 8443 (enrollment, REST, admin, and the broker's CONNECT), and the
//! plain-HTTP metrics and health endpoints on 9090.
//!
//! TLS asks every client for a certificate but does not require one; what a client
//! presented is checked against our CA here, per request, so that a device with an expired
//! or revoked certificate gets an HTTP answer that says so (and a route that needs no
//! certificate, like enrollment, still works).

pub mod admin;
pub mod connect;
pub mod devices;
pub mod enroll;
pub mod events;
pub mod server;
pub mod ssh;
pub mod state;
pub mod wg_tls;

pub use state::AppState;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tracing::error;

use floto_proto::{paths, ApiError, DeviceId, ErrorCode};
use floto_registry::{OperatorInfo, StoreError};

use crate::authz::{allowed, Action};
use crate::broker::Refusal;
use crate::identify::{IdentifyError, PeerCert};

/// Largest request body any route accepts.
pub const MAX_BODY: usize = 64 * 1024;

/// An error answer: status from the code, JSON body, and `Retry-After` when shedding.
#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ApiError::new(code, message),
            retry_after: None,
        }
    }

    /// 500: logged here with the detail; the client gets a pointer to the log.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        error!(error = %detail, "request failed");
        Self::from(ApiError::internal())
    }

    /// 429 with a randomised `Retry-After`.
    pub fn shed(message: impl Into<String>) -> Self {
        Self {
            error: ApiError::new(ErrorCode::TooManyRequests, message),
            retry_after: Some(retry_after_jitter()),
        }
    }

    /// The `result` label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self.error.error {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Revoked => "revoked",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "too_large",
            ErrorCode::TooManyRequests => "shed",
            ErrorCode::Unavailable => "unavailable",
            _ => "error",
        }
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::internal(e)
    }
}

impl From<IdentifyError> for Failure {
    fn from(e: IdentifyError) -> Self {
        Self::from(e.into_api_error())
    }
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Self {
            retry_after: r.is_shed().then(retry_after_jitter),
            error: r.error,
        }
    }
}

/// Time before a shed request should be retried, randomised so that shed clients do not
/// come back together.
pub fn retry_after_jitter() -> Duration {
    Duration::from_secs(rand::random_range(1..=5))
}

/// Reads `Authorization: Bearer <secret>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A device UUID from a path or query (also `UUID.floto`, `UUID.balena`, 32 hex digits).
pub fn parse_uuid(s: &str) -> Result<DeviceId, Failure> {
    DeviceId::from_host(s).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))
}

/// The 404 for a device the registry does not have.
pub fn unknown_device(id: &DeviceId) -> Failure {
    Failure::new(ErrorCode::NotFound, format!("no device {id} is enrolled"))
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.error.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.error)).into_response();
        if let Some(after) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Parses a JSON body, with a message that names what is wrong.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            ErrorCode::BadRequest,
            format!("request body is not valid JSON for this route: {e}"),
        )
    })
}

/// What a connection brought: addresses, the host asked for, and the client certificate.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// Host of this request (from `Host`/`:authority`, else SNI), without the port.
    pub host: Option<String>,
    /// The client certificate as checked against our CA at handshake time.
    pub peer_cert: PeerCert,
}

/// The operator behind a request, resolved once per request (client certificate or
/// API bearer token). Routes then ask [`Caller::require`] for what they do.
#[derive(Debug, Clone)]
pub struct Caller(pub OperatorInfo);

impl Caller {
    /// Allowed, or the 403 that says who may not do what.
    pub fn require(&self, action: Action, device_fleet: Option<&str>) -> Result<(), Failure> {
        let op = &self.0;
        if allowed(op.role, &op.fleets, action, device_fleet) {
            return Ok(());
        }
        let what = match (action, device_fleet) {
            (Action::Administer, _) => "administer this server".to_owned(),
            (Action::ViewDevice, Some(f)) => format!("see devices of fleet {f:?}"),
            (Action::Connect, Some(f)) => format!("connect to devices of fleet {f:?}"),
            (_, None) => "do this".to_owned(),
        };
        Err(Failure::new(
            ErrorCode::Forbidden,
            format!("operator {:?} ({}) may not {what}", op.name, op.role),
        ))
    }
}

impl Caller {
    /// The operator behind a request with these headers on connection `conn`. A handler
    /// with a request body calls it after taking the body: answering before the body was
    /// read makes HTTP/2 reset the stream, and some clients (curl) then report a framing
    /// error instead of the answer.
    pub async fn of(
        state: &AppState,
        conn: &ConnInfo,
        headers: &HeaderMap,
    ) -> Result<Self, Failure> {
        let op = state
            .identify
            .operator(&conn.peer_cert, bearer(headers), OffsetDateTime::now_utc())
            .await?;
        Ok(Caller(op))
    }
}

impl axum::extract::FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Failure> {
        let conn = parts
            .extensions
            .get::<ConnInfo>()
            .ok_or_else(|| Failure::internal("request without connection info"))?;
        Caller::of(state, conn, &parts.headers).await
    }
}

/// The API routes (the CONNECT broker is dispatched before these; see [`server`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(paths::ENROLL, post(enroll::enroll_handler))
        .route(paths::RENEW, post(enroll::renew_handler))
        .route(paths::DEVICES, get(devices::list))
        .route("/v1/devices/{uuid}", get(devices::show))
        .route("/v1/devices/{uuid}/revoke", post(admin::revoke_device))
        .route(paths::KEYS, post(admin::create_key).get(admin::list_keys))
        .route("/v1/keys/{id}/revoke", post(admin::revoke_key))
        .route(
            paths::OPERATORS,
            post(admin::add_operator).get(admin::list_operators),
        )
        .route("/v1/operators/{name}/revoke", post(admin::revoke_operator))
        .route(paths::LOGIN, post(admin::login))
        .route(paths::LOGIN_RENEW, post(admin::renew_login))
        .route(paths::AUDIT, get(admin::audit))
        .route(paths::NODES, get(admin::nodes))
        .route(paths::EVENTS, get(events::stream))
        .route(paths::CA, get(admin::ca_pem))
        .route(paths::CRL, get(admin::crl_pem))
        .route(paths::SSH_USER_CERT, post(ssh::user_cert))
        .route(paths::SSH_USER_CA, get(ssh::user_ca))
        .route(paths::SSH_HOST_CA, get(ssh::host_ca))
        .route(paths::SSH_DEVICE, get(ssh::device_policy))
        .route(paths::FLEETS, get(ssh::list_fleets))
        .route("/v1/fleets/{name}", axum::routing::put(ssh::set_fleet))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> Failure {
    Failure::new(
        ErrorCode::NotFound,
        "no such route; see the API paths in DESIGN.md",
    )
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ApiError::new(
            ErrorCode::BadRequest,
            "method not allowed on this route",
        )),
    )
        .into_response()
}

/// A request body of at most [`MAX_BODY`] bytes; larger ones get a JSON 413 before they
/// are read to the end.
#[derive(Debug)]
pub struct LimitedBody(pub bytes::Bytes);

impl axum::extract::FromRequest<Arc<AppState>> for LimitedBody {
    type Rejection = Failure;

    async fn from_request(
        req: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Self, Failure> {
        use http_body_util::BodyExt as _;
        let too_large = || {
            Failure::new(
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than the {MAX_BODY}-byte limit"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body = req.into_body();
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            tokio::spawn(drain(body, declared.unwrap_or(0)));
            return Err(too_large());
        }
        // A body sent a byte a minute must not hold its connection (and a slot) forever.
        let deadline = state.config.client_idle_timeout;
        let read = async {
            let mut collected = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Failure::new(
                        ErrorCode::BadRequest,
                        format!("could not read the request body: {e}"),
                    )
                })?;
                if let Ok(data) = frame.into_data() {
                    collected.extend_from_slice(&data);
                    if collected.len() > MAX_BODY {
                        return Ok(None);
                    }
                }
            }
            Ok(Some(collected))
        };
        match tokio::time::timeout(deadline, read).await {
            Ok(Ok(Some(collected))) => Ok(LimitedBody(collected.into())),
            Ok(Ok(None)) => {
                tokio::spawn(drain(body, 0));
                Err(too_large())
            }
            Ok(Err(f)) => Err(f),
            Err(_) => Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "the request body did not arrive within {}s",
                    deadline.as_secs()
                ),
            )),
        }
    }
}

/// Reads and discards the rest of an oversized body (up to 16 MiB, for up to 10 s) while
/// the 413 is sent, so that the client, still sending, reads the 413 instead of a reset
/// connection (HTTP/1) or stream (HTTP/2: curl reports a reset stream as a framing error even
/// after a complete answer). Bigger or slower bodies are cut off.
async fn drain(mut body: axum::body::Body, declared: u64) {
    use http_body_util::BodyExt as _;
    const DRAIN_MAX: u64 = 16 << 20;
    if declared > DRAIN_MAX {
        return;
    }
    let mut seen = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > DRAIN_MAX {
                    break;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
