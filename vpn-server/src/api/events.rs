//! `GET /v1/events`: server-sent events of devices going online, offline and revoked, each
//! with its session generation and a sequence number as the SSE `id`. A client that
//! reconnects with `Last-Event-ID` gets every event after that one still in the buffer,
//! then the live stream. An operator sees the events of the devices it may see.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt as _};
use tokio::sync::broadcast;

use floto_proto::devices::DeviceEvent;

use super::{AppState, Caller, Failure};
use crate::authz::{allowed, Action};

/// `GET /v1/events`
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Caller(op): Caller,
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
    let live = stream::unfold((live, visible), |(mut rx, visible)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if visible(&e) => return Some((to_sse(e), (rx, visible))),
                Ok(_) => continue,
                // Fell behind the buffer: end the stream so the client reconnects with its
                // Last-Event-ID and reads what it missed from the buffer.
                Err(
                    broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed,
                ) => return None,
            }
        }
    });
    Ok(
        Sse::new(backlog.chain(live))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
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
