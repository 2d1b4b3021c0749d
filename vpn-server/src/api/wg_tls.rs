//! WireGuard over TLS, for devices on networks that block UDP: `GET /v1/wg` with
//! `Upgrade: floto-wg/1` on the HTTPS port (HTTP/1.1, so it passes HTTP proxies and
//! TLS-inspecting middleboxes that allow HTTPS), with the device's certificate. The
//! certificate is checked before the upgrade, so no datagram of a stranger, an operator or a
//! revoked device is ever read.
//!
//! After `101 Switching Protocols` both directions carry frames: a 2-byte big-endian length
//! (1 to [`MAX_FRAME`]) and one WireGuard datagram. A frame from the server whose first byte
//! is 0 is a close reason (UTF-8 after the 0; WireGuard messages start with 1 to 4), sent
//! before the server closes the stream. The stream is one more endpoint of the device's
//! WireGuard session ([`crate::wg::streams`]). A stream is closed, with its reason, when it
//! sends a frame of the wrong size or that is no WireGuard message, when it sends nothing
//! within [`FIRST_FRAME`] of the upgrade or for [`IDLE`] after, and when the device's
//! certificate is revoked or expires.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use http::{header, HeaderValue, Request, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use tracing::{debug, info};

use floto_proto::{DeviceId, ErrorCode};

use super::{AppState, ConnInfo, Failure};
use crate::wg::{peers::MAX_DATAGRAM, Effects};

/// The `Upgrade` protocol token.
pub const PROTOCOL: &str = floto_proto::wireguard::TLS_UPGRADE;
/// Largest frame accepted (a WireGuard datagram of a 1420-byte MTU is 1452 bytes).
pub const MAX_FRAME: usize = floto_proto::wireguard::TLS_MAX_FRAME;
/// A new stream must send its first datagram within this.
pub const FIRST_FRAME: Duration = Duration::from_secs(10);
/// A stream silent this long is closed (a device's keepalives come every 25 s).
pub const IDLE: Duration = Duration::from_secs(90);
/// How often an open stream checks that its device's certificate still holds.
const RECHECK: Duration = Duration::from_secs(1);

/// Whether `req` asks for the WireGuard stream (`GET /v1/wg`).
pub fn is_wg_request<B>(req: &Request<B>) -> bool {
    req.uri().path() == floto_proto::paths::WG
}

/// Answers `GET /v1/wg`: `101` and the stream, or a JSON error (nothing is upgraded).
pub async fn upgrade(
    state: Arc<AppState>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let wants = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if req.version() != Version::HTTP_11
        || !wants(header::CONNECTION, "upgrade")
        || !wants(header::UPGRADE, PROTOCOL)
    {
        return Failure::new(
            ErrorCode::BadRequest,
            format!(
                "WireGuard over TLS is an HTTP/1.1 upgrade: GET {} with `Connection: Upgrade` and `Upgrade: {PROTOCOL}` (ALPN http/1.1)",
                floto_proto::paths::WG
            ),
        )
        .into_response();
    }
    let device = match state
        .identify
        .device(&conn.peer_cert, OffsetDateTime::now_utc())
    {
        Ok((device, _)) => device,
        Err(e) => return Failure::from(e).into_response(),
    };
    if state.wg.table.status(&device).is_none() {
        return Failure::new(
            ErrorCode::Forbidden,
            format!("device {device} is not served here (revoked, or not enrolled yet)"),
        )
        .into_response();
    }
    let upgrading = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => serve(state, conn, device, TokioIo::new(upgraded)).await,
            Err(e) => debug!(%device, error = %e, "the WireGuard stream's upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
    resp
}

/// Why a stream ended.
#[derive(Debug)]
enum End {
    /// The device closed it, or the connection broke.
    Closed(String),
    /// We close it, and tell the device why.
    Refused(String),
}

/// Carries one device's stream until it ends.
async fn serve<S>(state: Arc<AppState>, conn: ConnInfo, device: DeviceId, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let streams = state.wg.streams.clone();
    let (endpoint, mut to_device) = streams.open(conn.remote);
    info!(%device, remote = %conn.remote, %endpoint, "WireGuard stream open");
    let (reason_tx, mut reason_rx) = oneshot::channel::<String>();
    let writing = tokio::spawn(async move {
        let mut frame = Vec::with_capacity(MAX_FRAME + 2);
        loop {
            tokio::select! {
                biased;
                reason = &mut reason_rx => {
                    if let Ok(reason) = reason {
                        let mut text = vec![0u8];
                        text.extend_from_slice(reason.as_bytes());
                        frame.clear();
                        push_frame(&mut frame, &text);
                        let _ = writer.write_all(&frame).await;
                    }
                    let _ = writer.shutdown().await;
                    return;
                }
                datagram = to_device.recv() => {
                    let Some(datagram) = datagram else { return };
                    frame.clear();
                    push_frame(&mut frame, &datagram);
                    // What else waits goes in the same write.
                    while frame.len() < 64 * 1024 {
                        match to_device.try_recv() {
                            Ok(d) => push_frame(&mut frame, &d),
                            Err(_) => break,
                        }
                    }
                    if writer.write_all(&frame).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let end = read_frames(&state, &conn, device, endpoint, &mut reader).await;
    streams.close(&endpoint);
    let reason = match &end {
        End::Closed(why) => {
            debug!(%device, %endpoint, why, "WireGuard stream closed");
            None
        }
        End::Refused(why) => {
            info!(%device, remote = %conn.remote, why, "WireGuard stream closed by the server");
            Some(why.clone())
        }
    };
    if matches!(end, End::Refused(_)) {
        streams
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(reason) = reason {
        let _ = reason_tx.send(reason);
    } else {
        drop(reason_tx);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writing).await;
}

fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Whether `payload` has the shape of a WireGuard message: type 1 to 4, three reserved zero
/// bytes, and at least a header's length.
pub fn is_wireguard_message(payload: &[u8]) -> bool {
    payload.len() >= 32 && (1..=4).contains(&payload[0]) && payload[1..4] == [0, 0, 0]
}

/// Reads frames and hands their datagrams to the concentrator until the stream ends. Reads
/// are cancel-safe (`read` into a buffer, frames cut out of it), so the deadline and the
/// credential checks never lose a byte of a frame.
async fn read_frames<R>(
    state: &AppState,
    conn: &ConnInfo,
    device: DeviceId,
    endpoint: std::net::SocketAddr,
    reader: &mut R,
) -> End
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut fx = Effects::new();
    let mut buf: Vec<u8> = Vec::with_capacity(4 * MAX_FRAME);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut first = true;
    let mut last_frame = tokio::time::Instant::now();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Every complete frame in the buffer.
        let mut at = 0;
        while buf.len() - at >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[at], buf[at + 1]]));
            if len == 0 || len > MAX_FRAME {
                return End::Refused(format!(
                    "a frame of {len} bytes: frames carry 1 to {MAX_FRAME} bytes"
                ));
            }
            if buf.len() - at < 2 + len {
                break;
            }
            let datagram = &buf[at + 2..at + 2 + len];
            if !is_wireguard_message(datagram) {
                return End::Refused("a frame that is no WireGuard message".into());
            }
            state
                .wg
                .receive_from_stream(endpoint, datagram, &mut scratch, &mut fx);
            at += 2 + len;
            first = false;
            last_frame = tokio::time::Instant::now();
        }
        buf.drain(..at);
        let limit = if first { FIRST_FRAME } else { IDLE };
        tokio::select! {
            r = reader.read(&mut chunk) => match r {
                Ok(0) => return End::Closed("the device closed the stream".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return End::Closed(e.to_string()),
            },
            _ = tokio::time::sleep_until(last_frame + limit) => {
                return End::Refused(if first {
                    format!("no datagram within {} s of the upgrade", limit.as_secs())
                } else {
                    format!("no datagram for {} s", limit.as_secs())
                });
            }
            _ = recheck.tick() => {
                if let Err(e) = state.identify.device(&conn.peer_cert, OffsetDateTime::now_utc()) {
                    return End::Refused(format!(
                        "the device's certificate no longer holds: {}",
                        e.message
                    ));
                }
                if state.wg.table.status(&device).is_none() {
                    return End::Refused(format!("device {device} is no longer served (revoked)"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_message_shapes() {
        let mut out = Vec::new();
        push_frame(&mut out, b"abc");
        assert_eq!(out, [0, 3, b'a', b'b', b'c']);
        let mut init = vec![1u8, 0, 0, 0];
        init.resize(148, 7);
        assert!(is_wireguard_message(&init));
        for bad in [
            &b""[..],
            &[0u8; 40][..],
            &[
                5u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0,
            ][..],
            &[
                1u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0,
            ][..],
            &[4u8, 0, 0, 0][..],
        ] {
            assert!(!is_wireguard_message(bad), "{bad:?}");
        }
    }
}
