//! The broker: puts an operator into one port of one device, through the device's tunnel.
//! Two front ends, QUIC ([`quic`]) and HTTPS CONNECT (in the API, `crate::api::connect`),
//! share what is here: resolve the device, authorize, dial it through the netstack, splice,
//! and write an audit record of every session and every refusal. Its refusals are its own
//! ([`Refusal`]); each front end tells the operator in its own way.

pub mod quic;
pub mod refusals;
pub mod relay;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use floto_proto::{ApiError, DeviceId, ErrorCode};
use floto_registry::{AuditRecord, Device, OperatorInfo, Registry, StoreError};

use crate::audit::Auditor;
use crate::authz::{allowed, allowed_anywhere, Action};
use crate::events::WallClock;
use crate::limits::{PerKeyCap, Place};
use crate::metrics::Metrics;
use crate::netstack::{ConnectError, NetstackHandle};
use crate::wg::PeerTable;
use refusals::RefusalLog;
use relay::{DeviceStream, NodeLink};

/// Broker sessions open at once; more are refused with 429.
pub const MAX_SESSIONS: usize = 4096;
/// Time a device has to accept the TCP connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker would not open a session.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The `result` label of `floto_broker_sessions_total` and of the audit record.
    pub result: &'static str,
    /// What the operator is told.
    pub error: ApiError,
}

impl Refusal {
    fn new(result: &'static str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            result,
            error: ApiError::new(code, message),
        }
    }

    /// The broker is full: the operator should retry later.
    pub fn is_shed(&self) -> bool {
        self.error.error == ErrorCode::TooManyRequests
    }

    /// A registry fault: logged here with the detail, the operator gets a pointer to the log.
    fn internal(e: &StoreError) -> Self {
        tracing::error!(error = %e, "broker request failed");
        Self {
            result: "error",
            error: ApiError::internal(),
        }
    }
}

/// Sessions one operator, and one device, may have open at once.
#[derive(Debug, Clone, Copy)]
pub struct SessionCaps {
    pub per_operator: usize,
    pub per_device: usize,
}

/// What the broker needs from the rest of the server.
pub struct BrokerDeps {
    pub caps: SessionCaps,
    pub registry: Arc<dyn Registry>,
    pub table: Arc<PeerTable>,
    pub clock: WallClock,
    pub netstack: NetstackHandle,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
}

/// Open sessions, so that revocations can close them.
pub struct Broker {
    sessions: DashMap<u64, SessionHandle>,
    next_id: AtomicU64,
    slots: Arc<Semaphore>,
    /// Set at shutdown: open sessions may finish, new ones are refused.
    draining: AtomicBool,
    /// Set while this node of a cluster has no live lease: new sessions are refused.
    fenced: AtomicBool,
    /// Woken whenever a session ends, for the drain.
    ended: tokio::sync::Notify,
    /// Front-end connections that carry an operator's identity for their whole life (QUIC),
    /// so that revoking the operator closes them.
    connections: DashMap<u64, (String, CancellationToken)>,
    /// Sessions open (or being opened) per operator and per device.
    per_operator: Arc<PerKeyCap<String>>,
    per_device: Arc<PerKeyCap<DeviceId>>,
    /// Refusals counted for the audit log.
    refusals: parking_lot::Mutex<RefusalLog>,
    /// In a cluster: the way to devices held by other nodes.
    relay: std::sync::OnceLock<Arc<NodeLink>>,
    deps: BrokerDeps,
}

/// An operator's front-end connection, registered while it is held: its token is
/// cancelled when the operator is revoked.
#[derive(Debug)]
pub struct HeldConnection {
    broker: Arc<Broker>,
    id: u64,
    /// Cancelled when the operator is revoked.
    pub revoked: CancellationToken,
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.broker.connections.remove(&self.id);
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct SessionHandle {
    device: DeviceId,
    operator: String,
    cancel: CancellationToken,
}

/// A dialled device connection, ready to splice.
#[derive(Debug)]
pub struct OpenSession {
    guard: SessionGuard,
    pub device: Device,
    pub port: u16,
    pub operator: String,
    /// Carries the device and operator through the session's logs.
    span: tracing::Span,
    pub via: &'static str,
    stream: DeviceStream,
    started: OffsetDateTime,
    cancel: CancellationToken,
}

/// Unregisters a session however it ends (also when it is dropped before splicing).
struct SessionGuard {
    id: u64,
    broker: Arc<Broker>,
    result: &'static str,
    _places: (Place<String>, Place<DeviceId>),
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.broker.sessions.remove(&self.id);
        self.broker.ended.notify_waiters();
        self.broker.deps.metrics.broker_session_ended(self.result);
    }
}

impl Broker {
    pub fn new(deps: BrokerDeps) -> Self {
        Self {
            sessions: DashMap::new(),
            next_id: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(MAX_SESSIONS)),
            draining: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            connections: DashMap::new(),
            per_operator: PerKeyCap::new(deps.caps.per_operator),
            per_device: PerKeyCap::new(deps.caps.per_device),
            refusals: parking_lot::Mutex::new(RefusalLog::default()),
            relay: std::sync::OnceLock::new(),
            deps,
        }
    }

    /// In a cluster: reach devices held by other nodes through `link`.
    pub fn set_relay(&self, link: Arc<NodeLink>) {
        let _ = self.relay.set(link);
    }

    /// Registers a front-end connection of `operator` for as long as the returned value is
    /// held.
    pub fn hold_connection(self: &Arc<Self>, operator: &str) -> HeldConnection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.connections
            .insert(id, (operator.to_owned(), revoked.clone()));
        HeldConnection {
            broker: self.clone(),
            id,
            revoked,
        }
    }

    /// Refuses new sessions from now on; open ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// In a cluster: refuse new sessions while this node holds no live lease.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
    }

    /// Returns once no session is open.
    pub async fn idle(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.sessions.is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Closes every open session (the grace period of a shutdown is over).
    pub fn close_all(&self) -> usize {
        self.close_where(|_| true)
    }

    /// Sessions open now.
    pub fn active(&self) -> usize {
        self.sessions.len()
    }

    /// Closes every session to a device (it was revoked).
    pub fn close_device(&self, id: &DeviceId) -> usize {
        self.close_where(|s| s.device == *id)
    }

    /// Closes every session and front-end connection of an operator (it was revoked).
    /// Returns the number of sessions closed.
    pub fn close_operator(&self, name: &str) -> usize {
        // Sessions first: by the time closing a connection can break a session's stream,
        // the session knows it was cancelled (and is audited so).
        let closed = self.close_where(|s| s.operator == name);
        for c in self.connections.iter().filter(|c| c.value().0 == name) {
            c.value().1.cancel();
        }
        closed
    }

    fn close_where(&self, pred: impl Fn(&SessionHandle) -> bool) -> usize {
        let mut n = 0;
        for s in self.sessions.iter().filter(|s| pred(s.value())) {
            s.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Writes the refusals counted in closed windows (one record per operator and result,
    /// with their count) until `shutdown`, then all that are left.
    pub async fn audit_repeated_refusals(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(refusals::WINDOW / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            let closed = {
                let mut log = self.refusals.lock();
                if stopping {
                    log.poll_all()
                } else {
                    log.poll_closed(OffsetDateTime::now_utc())
                }
            };
            for r in closed {
                self.deps
                    .audit
                    .record(AuditRecord {
                        at: r.until,
                        actor: r.operator,
                        action: "broker.refused".into(),
                        device: None,
                        detail: serde_json::json!({
                            "result": r.result,
                            "repeated": r.count,
                            "since": r.since.unix_timestamp(),
                            "until": r.until.unix_timestamp(),
                        })
                        .to_string(),
                    })
                    .await;
            }
            if stopping {
                return;
            }
        }
    }

    /// Resolves, authorizes and dials. Every refusal is audited (repeated ones together).
    pub async fn open(
        self: &Arc<Self>,
        op: &OperatorInfo,
        target: &str,
        port: u16,
        via: &'static str,
    ) -> Result<OpenSession, Refusal> {
        let now = OffsetDateTime::now_utc();
        let deps = &self.deps;
        let refuse = |f: Refusal, device: Option<DeviceId>| {
            let operator = op.name.clone();
            async move {
                deps.metrics.broker_refused(f.result);
                // The first of its kind in a window now; the rest counted (see `refusals`).
                let first = self.refusals.lock().note(&operator, f.result, now);
                if first {
                    deps.audit
                        .record(AuditRecord {
                            at: now,
                            actor: operator,
                            action: "broker.refused".into(),
                            device,
                            detail: serde_json::json!({"port": port, "via": via, "result": f.result, "message": f.error.message}).to_string(),
                        })
                        .await;
                }
                f
            }
        };
        if self.is_draining() {
            let f = Refusal::new(
                "shutting_down",
                ErrorCode::Unavailable,
                "the server is shutting down and takes no new sessions; try again in a few seconds",
            );
            return Err(refuse(f, DeviceId::from_host(target).ok()).await);
        }
        if self.fenced.load(Ordering::SeqCst) {
            let f = Refusal::new(
                "fenced",
                ErrorCode::Unavailable,
                "this node has lost its lease on the cluster's database and takes no new sessions; try another node",
            );
            return Err(refuse(f, DeviceId::from_host(target).ok()).await);
        }
        let id = match DeviceId::from_host(target) {
            Ok(id) => id,
            Err(e) => {
                let f = Refusal::new(
                    "bad_request",
                    ErrorCode::BadRequest,
                    format!("{e}; use the device UUID, UUID.floto or UUID.balena"),
                );
                return Err(refuse(f, None).await);
            }
        };
        if port == 0 {
            let f = Refusal::new("bad_request", ErrorCode::BadRequest, "port 0 is not a port");
            return Err(refuse(f, Some(id)).await);
        }
        if !allowed_anywhere(op.role, &op.fleets, Action::Connect) {
            let f = Refusal::new(
                "forbidden",
                ErrorCode::Forbidden,
                format!(
                    "operator {:?} ({}) may not open broker sessions",
                    op.name, op.role
                ),
            );
            return Err(refuse(f, Some(id)).await);
        }
        let device = match deps.registry.device(&id).await {
            Ok(d) => d,
            Err(e) => return Err(Refusal::internal(&e)),
        };
        let unknown = || {
            Refusal::new(
                "unknown_device",
                ErrorCode::NotFound,
                format!("unknown device {id}: no device with this UUID is enrolled"),
            )
        };
        let device = match device {
            None => return Err(refuse(unknown(), Some(id)).await),
            // Outside the operator's fleets: told exactly what an unknown device gets, so
            // that it learns nothing of the device; the audit record says what happened.
            Some(d) if !allowed(op.role, &op.fleets, Action::Connect, Some(&d.fleet)) => {
                let f = Refusal {
                    result: "forbidden",
                    ..unknown()
                };
                return Err(refuse(f, Some(id)).await);
            }
            Some(d) if d.is_revoked() => {
                let f = Refusal::new(
                    "unknown_device",
                    ErrorCode::NotFound,
                    format!("device {id} was revoked"),
                );
                return Err(refuse(f, Some(id)).await);
            }
            Some(d) => d,
        };
        let status = deps.table.status(&id);
        let here = status.as_ref().is_some_and(|s| s.online);
        // Not held here: in a cluster, another node may hold it.
        let elsewhere = match (here, self.relay.get()) {
            (false, Some(link)) => match link.holder(&id).await {
                Ok(h) => h.map(|h| (link.clone(), h)),
                Err(e) => return Err(Refusal::internal(&e)),
            },
            _ => None,
        };
        if !here && elsewhere.is_none() {
            let seen = status
                .and_then(|s| s.last_seen)
                .map(|t| deps.clock.wall(t))
                .or(device.last_seen);
            let when = match seen {
                Some(t) => format!("last seen {} ago", humanize(now - t)),
                None => "never seen by this server".to_owned(),
            };
            let f = Refusal::new(
                "offline",
                ErrorCode::Unavailable,
                format!("device {id} is offline ({when})"),
            );
            return Err(refuse(f, Some(id)).await);
        }
        let Some(operator_place) = self.per_operator.take(op.name.clone()) else {
            let f = Refusal::new(
                "operator_limit",
                ErrorCode::TooManyRequests,
                format!(
                    "operator {:?} has {} broker sessions open, the most one operator may (--max-sessions-per-operator); close one first",
                    op.name,
                    self.per_operator.cap()
                ),
            );
            return Err(refuse(f, Some(id)).await);
        };
        let Some(device_place) = self.per_device.take(id) else {
            let f = Refusal::new(
                "device_limit",
                ErrorCode::TooManyRequests,
                format!(
                    "device {id} has {} broker sessions open, the most one device may (--max-sessions-per-device); try again when one has closed",
                    self.per_device.cap()
                ),
            );
            return Err(refuse(f, Some(id)).await);
        };
        let places = (operator_place, device_place);
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let f = Refusal::new(
                "shed",
                ErrorCode::TooManyRequests,
                format!("the broker has {MAX_SESSIONS} sessions open; retry later"),
            );
            return Err(refuse(f, Some(id)).await);
        };
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dialled = match elsewhere {
            None => deps
                .netstack
                .connect(device.overlay_ip, port, DIAL_TIMEOUT)
                .await
                .map(DeviceStream::Local)
                .map_err(|e| dial_refusal(e, &id, port)),
            Some((link, holder)) => link.dial(holder, id, port, &op.name, session_id).await,
        };
        let stream = match dialled {
            Ok(s) => s,
            Err(f) => return Err(refuse(f, Some(id)).await),
        };
        // No session without its record: written before a byte is spliced, so that a crash
        // mid-session still leaves it.
        let started = AuditRecord {
            at: now,
            actor: op.name.clone(),
            action: "broker.started".into(),
            device: Some(id),
            detail: serde_json::json!({"session": session_id, "port": port, "via": via})
                .to_string(),
        };
        if let Err(e) = deps.audit.try_record(started).await {
            tracing::error!(error = %e, device = %id, "the audit log cannot be written; broker session refused");
            deps.metrics.broker_refused("audit_unavailable");
            return Err(Refusal::new(
                "audit_unavailable",
                ErrorCode::Unavailable,
                "the audit log cannot be written, and no session opens without its record; try again later",
            ));
        }
        let cancel = CancellationToken::new();
        self.sessions.insert(
            session_id,
            SessionHandle {
                device: id,
                operator: op.name.clone(),
                cancel: cancel.clone(),
            },
        );
        deps.metrics.broker_session_started();
        let span = tracing::info_span!("broker", device = %id, operator = %op.name, port, via);
        span.in_scope(|| info!("broker session opened"));
        Ok(OpenSession {
            guard: SessionGuard {
                id: session_id,
                broker: self.clone(),
                result: "aborted",
                _places: places,
                _slot: slot,
            },
            device,
            port,
            operator: op.name.clone(),
            span,
            via,
            stream,
            started: now,
            cancel,
        })
    }

    /// Copies bytes both ways until both sides close, or the session is cancelled (a
    /// revocation or shutdown), then writes the session's audit record.
    pub async fn splice<C>(&self, session: OpenSession, mut client: C, leftover: &[u8])
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let OpenSession {
            mut guard,
            device,
            port,
            operator,
            span,
            via,
            mut stream,
            started,
            cancel,
        } = session;
        let mut client = Counted::new(&mut client);
        let result = async {
            if !leftover.is_empty() {
                stream.write_all(leftover).await?;
            }
            // A cancelled session is `cancelled`, even when its streams break at the same
            // time (revoking an operator also closes its QUIC connections).
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Ok("cancelled"),
                r = tokio::io::copy_bidirectional(&mut client, &mut stream) => r.map(|_| "closed"),
            }
        }
        .await;
        let result = match result {
            Ok(r) => r,
            // A client that exits without closing its stream (ssh kills its ProxyCommand) has
            // still ended its session normally.
            Err(e) if is_hangup(&e) => "closed",
            Err(e) => {
                span.in_scope(|| warn!(error = %e, "broker session failed"));
                "error"
            }
        };
        // Bytes the client wrote went to the device (plus what came with the header).
        let up = client.read + leftover.len() as u64;
        let down = client.written;
        guard.result = result;
        let session_id = guard.id;
        drop(guard);
        let ended = OffsetDateTime::now_utc();
        span.in_scope(|| info!(up, down, result, "broker session ended"));
        self.deps
            .audit
            .record(AuditRecord {
                at: ended,
                actor: operator,
                action: "broker.session".into(),
                device: Some(device.id),
                detail: serde_json::json!({
                    "session": session_id,
                    "port": port,
                    "via": via,
                    "start": started.unix_timestamp(),
                    "end": ended.unix_timestamp(),
                    "bytes_to_device": up,
                    "bytes_from_device": down,
                    "result": result,
                })
                .to_string(),
            })
            .await;
    }
}

/// Why dialling a device through the netstack failed, as the operator is told.
fn dial_refusal(e: ConnectError, id: &DeviceId, port: u16) -> Refusal {
    match e {
        ConnectError::Refused => Refusal::new(
            "port_unreachable",
            ErrorCode::BadGateway,
            format!("port {port} on device {id} is unreachable: the device refused the connection (is the service running?)"),
        ),
        ConnectError::TimedOut => Refusal::new(
            "timeout",
            ErrorCode::GatewayTimeout,
            format!(
                "device {id} did not answer on port {port} within {}s",
                DIAL_TIMEOUT.as_secs()
            ),
        ),
        e => Refusal::new(
            "error",
            ErrorCode::Unavailable,
            format!("could not dial device {id}: {e}"),
        ),
    }
}

fn is_hangup(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        // NotConnected: quinn's word for a QUIC connection the client closed while a
        // stream's last bytes were in flight.
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected
    )
}

/// Counts the bytes read from and written to a stream, so that a session's audit record
/// has them however the session ends.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: u64,
    written: u64,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: &'a mut S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// "4 min", "2 h", "3 d".
pub fn humanize(d: time::Duration) -> String {
    let s = d.whole_seconds().max(0);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanized_durations() {
        assert_eq!(humanize(time::Duration::seconds(5)), "5 s");
        assert_eq!(humanize(time::Duration::seconds(240)), "4 min");
        assert_eq!(humanize(time::Duration::seconds(3 * 3600)), "3 h");
        assert_eq!(humanize(time::Duration::seconds(3 * 86_400)), "3 d");
    }
}
