//! The broker's QUIC front end on UDP 8443, ALPN `floto-broker/1`. An operator connects
//! with its certificate; each bidirectional stream starts with a [`BrokerRequest`] line,
//! gets a [`BrokerResponse`] line, and then carries the device connection's bytes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::crypto::rustls::QuicServerConfig;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use floto_proto::broker::{encode_header, BrokerRequest, BrokerResponse, NodeRequest};
use floto_proto::{ApiError, ErrorCode};

use floto_pki::Ca;
use floto_registry::OperatorInfo;

use super::Broker;
use crate::identify::{Identifier, IdentifyError, PeerCert};

/// QUIC application close codes.
pub mod close {
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The operator's credential was refused; the reason says why.
    pub const UNAUTHORIZED: u32 = 1;
}

/// A quinn endpoint on an already-bound socket.
pub fn endpoint(
    socket: std::net::UdpSocket,
    tls: rustls::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).context("QUIC TLS config")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(256u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).context("idle timeout")?,
        ));
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")
}

/// What the QUIC front end needs: the CA to check client certificates, who they name, and
/// the broker.
#[derive(Debug, Clone)]
pub struct QuicFrontEnd {
    pub ca: Arc<Ca>,
    pub identify: Arc<Identifier>,
    pub broker: Arc<Broker>,
}

/// Accepts operator connections until `shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, state: QuicFrontEnd, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            serve_connection(conn, state, shutdown).await;
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn serve_connection(
    conn: quinn::Connection,
    state: QuicFrontEnd,
    shutdown: CancellationToken,
) {
    let now = OffsetDateTime::now_utc();
    let presented = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let peer_cert = PeerCert::verify(&state.ca, presented.as_ref(), now);
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(floto_proto::broker::ALPN_NODE) {
        serve_node_connection(conn, state, peer_cert, shutdown).await;
        return;
    }
    let op = match state.identify.operator(&peer_cert, None, now).await {
        Ok(op) => op,
        Err(e) => {
            close_refused(&conn, &e.into_api_error());
            return;
        }
    };
    debug!(operator = %op.name, remote = %conn.remote_address(), "operator connected over QUIC");
    let held = state.broker.hold_connection(&op.name);
    // The connection lives no longer than the certificate it was made with.
    let until_expiry = match &peer_cert {
        PeerCert::Valid(info) => (info.not_after - now).try_into().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    loop {
        let (mut send, recv) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = held.revoked.cancelled() => {
                let why = ApiError::new(ErrorCode::Revoked, format!("operator {:?} was revoked", op.name));
                close_refused(&conn, &why);
                return;
            }
            _ = &mut expiry => {
                let why = ApiError::new(
                    ErrorCode::Unauthorized,
                    "the client certificate of this connection expired; connect again with a renewed one",
                );
                close_refused(&conn, &why);
                return;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        // Every stream is the caller's again: revoked or expired since the connection was
        // made, it gets no session.
        let op = match state
            .identify
            .operator(&peer_cert, None, OffsetDateTime::now_utc())
            .await
        {
            Ok(op) => op,
            Err(IdentifyError::Refused(why)) => {
                let _ = respond(&mut send, Err(why.clone())).await;
                close_refused(&conn, &why);
                return;
            }
            // A registry fault refuses this stream only.
            Err(e) => {
                let _ = respond(&mut send, Err(e.into_api_error())).await;
                continue;
            }
        };
        let broker = state.broker.clone();
        tokio::spawn(async move { serve_stream(broker, op, send, recv).await });
    }
}

/// The node link: another node of the cluster asks this one to dial a device it holds. Only
/// node certificates are taken here (an operator's or a device's is refused); the asking
/// node has authorized and audited the operator.
async fn serve_node_connection(
    conn: quinn::Connection,
    state: QuicFrontEnd,
    peer_cert: PeerCert,
    shutdown: CancellationToken,
) {
    let node = match &peer_cert {
        PeerCert::Valid(info) => info.node_name().map(str::to_owned),
        _ => None,
    };
    let Some(node) = node else {
        let why = ApiError::new(
            ErrorCode::Unauthorized,
            "the node link takes node certificates only",
        );
        debug!(remote = %conn.remote_address(), "node link refused: not a node certificate");
        close_refused(&conn, &why);
        return;
    };
    debug!(node = %node, remote = %conn.remote_address(), "node connected");
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let broker = state.broker.clone();
        tokio::spawn(async move {
            let request = match super::relay::read_header::<NodeRequest>(&mut recv).await {
                Ok((r, _)) => r,
                Err(e) => {
                    let _ = respond(&mut send, Err(e)).await;
                    return;
                }
            };
            let mut device = match broker.dial_for_node(&request).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = respond(&mut send, Err(e)).await;
                    return;
                }
            };
            if respond(&mut send, Ok(())).await.is_err() {
                return;
            }
            let mut link = tokio::io::join(recv, send);
            let _ = tokio::io::copy_bidirectional(&mut link, &mut device).await;
        });
    }
}

/// Closes a connection whose operator is refused; the reason is the refusal, as JSON.
fn close_refused(conn: &quinn::Connection, why: &ApiError) {
    let reason = serde_json::to_vec(why).unwrap_or_default();
    conn.close(close::UNAUTHORIZED.into(), &reason);
}

async fn serve_stream(
    broker: Arc<Broker>,
    op: OperatorInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (request, leftover) = match super::relay::read_header::<BrokerRequest>(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            let _ = respond(&mut send, Err(e)).await;
            return;
        }
    };
    let session = match broker
        .open(&op, &request.device, request.port, "quic")
        .await
    {
        Ok(s) => s,
        Err(refusal) => {
            let _ = respond(&mut send, Err(refusal.error)).await;
            return;
        }
    };
    if respond(&mut send, Ok(())).await.is_err() {
        return;
    }
    broker
        .splice(session, tokio::io::join(recv, send), &leftover)
        .await;
    info!(operator = %op.name, "QUIC stream done");
}

async fn respond(
    send: &mut quinn::SendStream,
    result: Result<(), ApiError>,
) -> Result<(), quinn::WriteError> {
    let ok = result.is_ok();
    let resp = BrokerResponse {
        ok,
        error: result.err(),
    };
    send.write_all(&encode_header(&resp)).await?;
    if !ok {
        let _ = send.finish();
    }
    Ok(())
}
