//! The node link of a cluster: a broker session for a device whose WireGuard session another
//! node holds. The node the operator reached authorizes, caps and audits the session as for
//! a device of its own, then asks the holding node (found from the device's session row) to
//! dial the device, over QUIC on the broker's port with ALPN `floto-node/1` and mutual TLS
//! with node certificates ([`floto_pki::Ca::issue_node`]); the bytes then flow through both
//! nodes. The holding node dials only a device it holds itself and never relays further
//! (the loop guard); when it no longer holds the device, the asking node reads the session
//! row again and tries once more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

use floto_proto::broker::{decode_header, encode_header, BrokerResponse, NodeRequest, MAX_HEADER};
use floto_proto::{ApiError, DeviceId, ErrorCode};
use floto_registry::cluster::{Cluster, SessionRecord};
use floto_registry::StoreError;

use super::{Broker, Refusal, DIAL_TIMEOUT};
use crate::netstack::TcpStream;

/// How long a node gets to answer on the node link (connect, header, its own dial).
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// The bytes of a broker session: a device dialled here, or through the node holding it.
pub enum DeviceStream {
    Local(TcpStream),
    Remote(tokio::io::Join<quinn::RecvStream, quinn::SendStream>),
}

impl std::fmt::Debug for DeviceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local(_) => "DeviceStream(local)",
            Self::Remote(_) => "DeviceStream(through another node)",
        })
    }
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Local(s) => Pin::new(s).poll_read(cx, buf),
            Self::Remote(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Local(s) => Pin::new(s).poll_write(cx, buf),
            Self::Remote(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Local(s) => Pin::new(s).poll_flush(cx),
            Self::Remote(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Local(s) => Pin::new(s).poll_shutdown(cx),
            Self::Remote(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Who holds a device's session, as the cluster says.
#[derive(Debug, Clone)]
pub struct Holder {
    pub node: String,
    pub name: String,
    pub address: String,
}

/// This node's end of the node link.
pub struct NodeLink {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    cluster: Arc<dyn Cluster>,
    online_window: Duration,
    /// This node's id: it changes when the node rejoins after losing its lease.
    this_node: Box<dyn Fn() -> Arc<str> + Send + Sync>,
    /// Connections to other nodes, by address, reused across sessions.
    connections: Mutex<HashMap<String, quinn::Connection>>,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLink").finish_non_exhaustive()
    }
}

impl NodeLink {
    pub fn new(
        endpoint: quinn::Endpoint,
        client: rustls::ClientConfig,
        cluster: Arc<dyn Cluster>,
        online_window: Duration,
        this_node: Box<dyn Fn() -> Arc<str> + Send + Sync>,
    ) -> anyhow::Result<Self> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| anyhow::anyhow!("node link TLS config: {e}"))?;
        Ok(Self {
            endpoint,
            client: quinn::ClientConfig::new(Arc::new(crypto)),
            cluster,
            online_window,
            this_node,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// The other node holding `device`'s session, if one does (`None` when this node or
    /// no live node holds it).
    pub async fn holder(&self, device: &DeviceId) -> Result<Option<Holder>, StoreError> {
        let session = self
            .cluster
            .online_session(device, self.online_window)
            .await?;
        Ok(session.and_then(|s| self.other(s)))
    }

    fn other(&self, s: SessionRecord) -> Option<Holder> {
        if *s.node == *(self.this_node)() {
            return None;
        }
        Some(Holder {
            name: s.node_name.unwrap_or_else(|| s.node.clone()),
            address: s.node_address?,
            node: s.node,
        })
    }

    /// Asks `holder` to dial `port` of `device`; when it no longer holds the device, reads
    /// the session row again and asks the new holder once.
    pub async fn dial(
        &self,
        holder: Holder,
        device: DeviceId,
        port: u16,
        operator: &str,
        session: u64,
    ) -> Result<DeviceStream, Refusal> {
        let request = NodeRequest {
            device,
            port,
            operator: operator.to_owned(),
            session,
        };
        match self.ask(&holder, &request).await {
            Err(e) if e.error == ErrorCode::Conflict => {
                debug!(node = %holder.name, "the node no longer holds the device; asking again");
                match self.holder(&device).await {
                    Ok(Some(again)) => self.ask(&again, &request).await.map_err(refused),
                    Ok(None) => Err(refused(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("device {device} went offline"),
                    ))),
                    Err(e) => Err(Refusal::internal(&e)),
                }
            }
            other => other.map_err(refused),
        }
    }

    async fn ask(&self, holder: &Holder, request: &NodeRequest) -> Result<DeviceStream, ApiError> {
        let unreachable = |e: &dyn std::fmt::Display| {
            warn!(node = %holder.name, address = %holder.address, error = %e, "node link failed");
            ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "device {} is held by node {}, which cannot be reached just now; try again",
                    request.device, holder.name
                ),
            )
        };
        let conn = self.connection(holder).await.map_err(|e| unreachable(&e))?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
            send.write_all(&encode_header(request))
                .await
                .map_err(|e| unreachable(&e))?;
            let (response, leftover) = read_header::<BrokerResponse>(&mut recv)
                .await
                .map_err(|e| unreachable(&e))?;
            if !response.ok {
                return Err(response.error.unwrap_or_else(ApiError::internal));
            }
            if !leftover.is_empty() {
                // The device cannot have spoken before its node answered.
                return Err(unreachable(&"bytes after the node's answer"));
            }
            Ok(DeviceStream::Remote(tokio::io::join(recv, send)))
        };
        tokio::time::timeout(LINK_TIMEOUT + DIAL_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(unreachable(&"no answer in time")))
    }

    async fn connection(&self, holder: &Holder) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.connections.lock().get(&holder.address) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let (host, port) = holder
            .address
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("node address {:?} has no port", holder.address))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse()?;
        let addr: SocketAddr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{host} does not resolve"))?;
        let conn = tokio::time::timeout(
            LINK_TIMEOUT,
            self.endpoint
                .connect_with(self.client.clone(), addr, host)?,
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??;
        info!(node = %holder.name, %addr, "node link connected");
        self.connections
            .lock()
            .insert(holder.address.clone(), conn.clone());
        Ok(conn)
    }
}

fn refused(e: ApiError) -> Refusal {
    let result = match e.error {
        ErrorCode::BadGateway => "port_unreachable",
        ErrorCode::GatewayTimeout => "timeout",
        ErrorCode::Unavailable | ErrorCode::Conflict => "offline",
        _ => "error",
    };
    Refusal { result, error: e }
}

/// Reads one header line from a QUIC stream; returns it and whatever followed it.
pub(super) async fn read_header<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<(T, Vec<u8>), ApiError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            match decode_header::<T>(&buf) {
                Ok(Some((value, used))) => return Ok((value, buf[used..].to_vec())),
                Ok(None) => {}
                Err(e) => return Err(ApiError::new(ErrorCode::BadRequest, e.to_string())),
            }
            let want = (MAX_HEADER + 1 - buf.len()).min(chunk.len());
            match recv.read(&mut chunk[..want]).await {
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(None) => {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        "stream ended before the header",
                    ))
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        format!("reading the header: {e}"),
                    ))
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                ErrorCode::BadRequest,
                "no header within 10 s",
            ))
        })
}

impl Broker {
    /// On the node asked over the node link: dials `request`'s device if this node holds
    /// it. Never relays further: a device held elsewhere is refused with `Conflict`, and the
    /// asking node reads the session row again.
    pub async fn dial_for_node(&self, request: &NodeRequest) -> Result<TcpStream, ApiError> {
        let deps = &self.deps;
        let id = request.device;
        if !deps.table.status(&id).is_some_and(|s| s.online) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("device {id} is not held by this node"),
            ));
        }
        let device = match deps.registry.device(&id).await {
            Ok(Some(d)) if !d.is_revoked() => d,
            Ok(_) => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("unknown device {id}"),
                ))
            }
            Err(e) => return Err(Refusal::internal(&e).error),
        };
        info!(device = %id, port = request.port, operator = %request.operator, session = request.session, "dialling for another node");
        deps.netstack
            .connect(device.overlay_ip, request.port, DIAL_TIMEOUT)
            .await
            .map_err(|e| super::dial_refusal(e, &id, request.port).error)
    }
}
