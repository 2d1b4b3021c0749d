//! The broker's HTTPS front end (the broker itself is [`crate::broker`]), for networks that block UDP: `CONNECT UUID:PORT` (also
//! `UUID.floto:PORT` and `UUID.balena:PORT`) on the API port, with the operator's client
//! certificate.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use time::OffsetDateTime;

use floto_proto::ErrorCode;

use super::{bearer, AppState, ConnInfo, Failure};

/// Answers a CONNECT: 200 and then a spliced byte stream, or a JSON error.
pub async fn http_connect(
    state: Arc<AppState>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    let target = match req.uri().authority() {
        Some(a) => match a.port_u16() {
            Some(port) => (a.host().to_owned(), port),
            None => return bad("CONNECT needs a target of the form UUID:PORT").into_response(),
        },
        None => return bad("CONNECT needs a target of the form UUID:PORT").into_response(),
    };
    // Who is asking (certificate or API token); what they may do is decided by `open`,
    // which audits refusals.
    let op = match state
        .identify
        .operator(
            &conn.peer_cert,
            bearer(req.headers()),
            OffsetDateTime::now_utc(),
        )
        .await
    {
        Ok(op) => op,
        Err(e) => return Failure::from(e).into_response(),
    };
    let broker = state.broker.clone();
    let session = match broker.open(&op, &target.0, target.1, "connect").await {
        Ok(s) => s,
        Err(refusal) => return Failure::from(refusal).into_response(),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => broker.splice(session, TokioIo::new(upgraded), &[]).await,
            Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

fn bad(message: &str) -> Failure {
    Failure::new(ErrorCode::BadRequest, message)
}
