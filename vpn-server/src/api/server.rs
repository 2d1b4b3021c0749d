//! The accept loops: HTTPS (with per-connection client-certificate checks and the CONNECT
//! broker), and plain-HTTP metrics and health.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

use http_body_util::BodyExt as _;

use super::{AppState, ConnInfo};
use crate::identify::PeerCert;
use crate::limits::PerKeyCap;

/// Time a client has to finish the TLS handshake, and to send request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings a quiet connection this often, and closes it when a ping goes unanswered
/// this long.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
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
    let slots = Arc::new(Semaphore::new(state.config.max_connections));
    let per_address = PerKeyCap::new(state.config.max_connections_per_address);
    let idle_limit = state.config.client_idle_timeout;
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
        // One address cannot hold every connection slot.
        let Some(place) = per_address.take(remote.ip()) else {
            debug!(%remote, "too many connections from this address; closed at accept");
            drop(tcp);
            continue;
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
            let _held = (permit, place);
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
            let activity = Activity::new();
            let watched = activity.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let request = activity.begin();
                let mut info = info.clone();
                if let Some(host) = request_host(&req) {
                    info.host = Some(host);
                }
                let router = router.clone();
                let state = state.clone();
                async move {
                    if req.method() == Method::CONNECT {
                        // The connection becomes a broker session: never idle.
                        request.keep_forever();
                        return Ok::<_, Infallible>(
                            super::connect::http_connect(state, info, req).await,
                        );
                    }
                    if super::wg_tls::is_wg_request(&req) {
                        // The connection becomes a WireGuard stream, which times out by itself.
                        request.keep_forever();
                        return Ok(super::wg_tls::upgrade(state, info, req).await);
                    }
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(info);
                    let response = router.oneshot(req).await.into_response();
                    // In flight until its body is sent (an event stream, for its whole life).
                    Ok(response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _in_flight = &request;
                            frame
                        }))
                    }))
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
                .max_concurrent_streams(256)
                .keep_alive_interval(Some(HTTP2_KEEPALIVE))
                .keep_alive_timeout(HTTP2_KEEPALIVE);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::select! {
                served = watcher.watch(conn.into_owned()) => {
                    if let Err(e) = served {
                        debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
                // Dropping the connection closes it: nothing is in flight on it.
                _ = watched.idle_for(idle_limit) => {
                    debug!(%remote, ?idle_limit, "closed an idle connection");
                }
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

/// What a connection is doing: requests in flight (until their response body is sent) and
/// when the last one ended, so that a connection with nothing in flight for too long (before
/// its first request, or between two: an idle client, a half-sent HTTP/2 preface) is closed.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Set once the connection carries a broker session (CONNECT): never closed as idle.
    forever: AtomicBool,
    quiet_since: parking_lot::Mutex<Instant>,
}

/// A request in flight on a connection.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            forever: AtomicBool::new(false),
            quiet_since: parking_lot::Mutex::new(Instant::now()),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Completes once nothing has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let quiet = *self.quiet_since.lock();
            let busy =
                self.in_flight.load(Ordering::SeqCst) > 0 || self.forever.load(Ordering::SeqCst);
            if !busy && quiet.elapsed() >= limit {
                return;
            }
            let next = if busy {
                limit
            } else {
                limit.saturating_sub(quiet.elapsed())
            };
            tokio::time::sleep(next.max(Duration::from_millis(100))).await;
        }
    }
}

impl InFlight {
    fn keep_forever(&self) {
        self.0.forever.store(true, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.quiet_since.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
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
    if state.node.as_ref().is_some_and(|n| n.is_fenced()) {
        return (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "fenced: this node cannot renew its lease on the cluster's database\n",
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
