//! `GET /v1/events`: server-sent events of devices going online, offline and revoked, each
//! with its session generation and a sequence number as the SSE `id`. A client that
//! reconnects with `Last-Event-ID` gets every event after that one still in the buffer,
//! then the live stream. An operator sees the events of the devices it may see, for as long
//! as its credential holds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt as _};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use floto_proto::devices::DeviceEvent;

use super::{bearer, AppState, Caller, ConnInfo, Failure};
use crate::authz::{allowed, Action};
use crate::identify::{IdentifyError, PeerCert};

/// How often an open stream checks that its caller may still read it.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// `GET /v1/events`. The stream ends within [`RECHECK_EVERY`] of its caller's credential
/// ending: the operator or its token revoked, the certificate or token expired.
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Caller(op): Caller,
    conn: axum::Extension<ConnInfo>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (backlog, live) = state.events.subscribe(last_seen);
    let visible =
        move |e: &DeviceEvent| allowed(op.role, &op.fleets, Action::ViewDevice, Some(&e.fleet));
    let backlog = stream::iter(backlog.into_iter().filter(visible.clone()).map(to_sse));
    let credential = Credential {
        state,
        cert: conn.peer_cert.clone(),
        bearer: bearer(&headers).map(str::to_owned),
    };
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live = stream::unfold(
        (live, visible, credential, recheck),
        |(mut rx, visible, credential, mut recheck)| async move {
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(e) if visible(&e) => {
                            return Some((to_sse(e), (rx, visible, credential, recheck)))
                        }
                        Ok(_) => continue,
                        // Fell behind the buffer: end the stream so the client reconnects
                        // with its Last-Event-ID and reads what it missed from the buffer.
                        Err(
                            broadcast::error::RecvError::Lagged(_)
                            | broadcast::error::RecvError::Closed,
                        ) => return None,
                    },
                    _ = recheck.tick() => {
                        if !credential.still_valid().await {
                            return None;
                        }
                    }
                }
            }
        },
    );
    Ok(
        Sse::new(backlog.chain(live))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
}

/// What a stream's caller presented, to check it again while the stream is open.
struct Credential {
    state: Arc<AppState>,
    cert: PeerCert,
    bearer: Option<String>,
}

impl Credential {
    /// False once the credential is refused (revoked, expired); a registry fault does not
    /// end the stream.
    async fn still_valid(&self) -> bool {
        let checked = self
            .state
            .identify
            .operator(
                &self.cert,
                self.bearer.as_deref(),
                OffsetDateTime::now_utc(),
            )
            .await;
        !matches!(checked, Err(IdentifyError::Refused(_)))
    }
}

fn to_sse(e: DeviceEvent) -> Result<Event, Infallible> {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let data = serde_json::to_string(&e).unwrap_or_default();
    Ok(Event::default()
        .id(e.seq.to_string())
        .event(kind)
        .data(data))
}
