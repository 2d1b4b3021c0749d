//! The error body every API route returns: `{"error": "<code>", "message": "<what to do>"}`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Machine-readable error codes. Each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (bad JSON, PEM, CSR, UUID or key).
    BadRequest,
    /// 401: no credential, or one that is unknown, expired, used up or revoked.
    Unauthorized,
    /// 403: a valid credential that is not allowed to do this.
    Forbidden,
    /// 403: the device or operator was revoked; retrying will not help until an admin acts.
    Revoked,
    /// 404: no such device, operator or route.
    NotFound,
    /// 409: the UUID or WireGuard key is held by another device or key.
    Conflict,
    /// 413: the body is over the size limit.
    PayloadTooLarge,
    /// 429: the server sheds load; retry after `Retry-After` seconds.
    TooManyRequests,
    /// 500: a server fault; the server log has the details.
    Internal,
    /// 502: the device was reached but refused or reset the connection (port unreachable).
    BadGateway,
    /// 503: a resource is exhausted (no overlay address left) or the server is not ready.
    Unavailable,
    /// 504: the device is offline or did not answer in time.
    GatewayTimeout,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::Revoked => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::TooManyRequests => 429,
            Self::Internal => 500,
            Self::BadGateway => 502,
            Self::Unavailable => 503,
            Self::GatewayTimeout => 504,
        }
    }

    /// The code for an HTTP status, for clients that got a body they could not parse.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            400 => Self::BadRequest,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            429 => Self::TooManyRequests,
            502 => Self::BadGateway,
            503 => Self::Unavailable,
            504 => Self::GatewayTimeout,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// The JSON error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({error})")]
pub struct ApiError {
    pub error: ErrorCode,
    /// A sentence a person can act on.
    pub message: String,
}

impl ApiError {
    pub fn new(error: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error,
            message: message.into(),
        }
    }

    /// A server fault. The client is pointed to the server's log, where the server has
    /// written the detail (never in the answer).
    pub fn internal() -> Self {
        Self::new(
            ErrorCode::Internal,
            "internal server error; the server log has the details",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_snake_case_and_map_to_status() {
        let e = ApiError::new(ErrorCode::PayloadTooLarge, "body over 64 KiB");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"error":"payload_too_large","message":"body over 64 KiB"}"#
        );
        assert_eq!(ErrorCode::PayloadTooLarge.to_string(), "payload_too_large");
        assert_eq!(ErrorCode::Revoked.http_status(), 403);
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::TooManyRequests,
            ErrorCode::BadGateway,
            ErrorCode::Unavailable,
            ErrorCode::GatewayTimeout,
        ] {
            assert_eq!(ErrorCode::from_http_status(code.http_status()), code);
        }
    }
}
