//! `GET /v1/events`: server-sent events of devices going online, offline and revoked, each
//! with its session generation and a sequence number as the SSE `id`. A client that
//! reconnects with `Last-Event-ID` gets every event after that one still in the buffer,
//! then the live stream. An operator sees the events of the devices it may see, for as long
//! as its credential holds. In a cluster the stream and its numbers are the cluster's, the
//! same on every node, so a reader may reconnect to any node.

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
    let (backlog, live) = state.events.subscribe(last_event_id(&headers));
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

/// The `Last-Event-ID` a reconnecting client sends: one of our sequence numbers. Anything
/// else (not ASCII, not a number, out of range) is no ID at all, and the client gets the
/// whole buffer, as a new client does: a bad header costs a replay, never an error or a gap.
fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn with_id(value: &[u8]) -> Option<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_bytes(value).ok()?);
        Some(headers)
    }

    #[test]
    fn ids_we_sent_come_back() {
        for (value, id) in [
            (&b"0"[..], Some(0)),
            (b"42", Some(42)),
            (b" 42 ", Some(42)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"-1", None),
            (b"4 2", None),
            (b"", None),
            (b"\xff", None),
        ] {
            let headers = with_id(value).unwrap();
            assert_eq!(last_event_id(&headers), id, "{value:?}");
        }
        assert_eq!(last_event_id(&HeaderMap::new()), None);
    }

    mod proptests {
        use super::*;

        proptest! {
            /// Any header value a client can send: no panic, and a number back only for the
            /// decimal form of one.
            #[test]
            fn any_header_value(value in proptest::collection::vec(any::<u8>(), 0..64)) {
                if let Some(headers) = with_id(&value) {
                    if last_event_id(&headers).is_some() {
                        let text = std::str::from_utf8(&value).unwrap().trim();
                        let digits = text.strip_prefix('+').unwrap_or(text);
                        prop_assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
                    }
                }
            }

            /// Whatever the ID, the replay is the buffered events after it, in order.
            #[test]
            fn replay_is_what_follows_the_id(
                published in 0usize..300,
                id in prop_oneof![any::<u64>(), 0u64..320],
            ) {
                use crate::events::{EventHub, WallClock};
                use crate::wg::PeerEvent;
                let hub = EventHub::new(WallClock::new());
                let device = floto_proto::DeviceId::new_random();
                for generation in 0..published as u64 {
                    hub.publish_peer(PeerEvent::Offline {
                        id: device,
                        fleet: "lab".into(),
                        generation,
                        at: std::time::Instant::now(),
                    });
                }
                let (all, _) = hub.subscribe(None);
                let (after, _) = hub.subscribe(Some(id));
                prop_assert!(after.windows(2).all(|w| w[0].seq < w[1].seq));
                prop_assert!(after.iter().all(|e| e.seq > id));
                prop_assert_eq!(after.len(), all.iter().filter(|e| e.seq > id).count());
            }
        }
    }
}
