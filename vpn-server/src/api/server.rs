//! The accept loops: HTTPS (with per-connection client-certificate checks and the CONNECT
//! broker), and plain-HTTP metrics and health.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse as _;
use axum::routing::get;
use axum::Router;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use floto_proto::paths;

use super::{AppState, ConnInfo};
use crate::identify::PeerCert;

/// TLS connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16_384;
/// Time a client has to finish the TLS handshake, and to send request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, time open connections get to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves HTTPS on `listener` until `shutdown`.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let router = super::router(state.clone());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(_) => continue,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let peer_cert = PeerCert::verify(
                &state.ca,
                session.peer_certificates().and_then(|c| c.first()),
                OffsetDateTime::now_utc(),
            );
            let info = ConnInfo {
                remote,
                local,
                host: session.server_name().map(str::to_owned),
                peer_cert,
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut info = info.clone();
                if let Some(host) = request_host(&req) {
                    info.host = Some(host);
                }
                let router = router.clone();
                let state = state.clone();
                async move {
                    if req.method() == Method::CONNECT {
                        return Ok::<_, Infallible>(
                            super::connect::http_connect(state, info, req).await,
                        );
                    }
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(info);
                    Ok(router.oneshot(req).await.into_response())
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(32 * 1024)
                .max_concurrent_streams(256);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        info!("HTTPS connections still open after the drain period; closing them");
    }
}

/// The host of a request without its port: `Host` (HTTP/1) or `:authority` (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            let h: http::uri::Authority = h.parse().ok()?;
            Some(h.host().to_owned())
        })?;
    let host = raw.trim_start_matches('[').trim_end_matches(']').to_owned();
    (!host.is_empty()).then_some(host)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on plain HTTP until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route(paths::METRICS, get(metrics))
        .route(paths::HEALTHZ, get(|| async { "ok\n" }))
        .route(paths::READYZ, get(ready))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        warn!(error = %e, "metrics server failed");
    }
}

/// OpenMetrics for clients that ask for it (Prometheus does), the classic text format
/// otherwise (curl, promtool, older scrapers).
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    let openmetrics = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (encoded, content_type) = if openmetrics {
        (
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            state.metrics.encode_classic(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    match encoded {
        Ok(text) => ([(http::header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(e) => super::Failure::internal(format!("encoding metrics: {e}")).into_response(),
    }
}

async fn ready(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> axum::response::Response {
    if state.broker.is_draining() {
        return (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: finishing open broker sessions\n",
        )
            .into_response();
    }
    match state.store.count_devices().await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("registry unavailable: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_requests() {
        let r = Request::get("/")
            .header("host", "vpn.example.org:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("vpn.example.org"));
        let r = Request::get("/")
            .header("host", "[::1]:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("::1"));
        let r = Request::get("https://10.0.0.1:8443/v1/enroll")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("10.0.0.1"));
        let r = Request::get("/").body(()).unwrap();
        assert_eq!(request_host(&r), None);
    }
}
