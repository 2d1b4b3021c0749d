//! Opening a broker stream to one port of one device: over QUIC (ALPN `floto-broker/1`),
//! or, where UDP is blocked, over HTTPS `CONNECT`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

use floto_proto::broker::{
    decode_header, encode_header, BrokerRequest, BrokerResponse, ALPN, MAX_HEADER,
};
use floto_proto::{ApiError, ErrorCode};

use crate::tls::{client_config, Identity};

/// How long QUIC gets to connect before `Auto` falls back to CONNECT.
pub const QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// A byte stream to one port of a device. Call [`BrokerStream::close`] when done, so the
/// broker sees a clean end rather than a dropped connection.
pub struct BrokerStream {
    inner: Inner,
}

enum Inner {
    Quic(Prefixed<QuicStream>),
    // Boxed: a TLS stream is ~1 KB, a QUIC one ~200 bytes.
    Tls(Box<Prefixed<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl std::fmt::Debug for BrokerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Quic(_) => "BrokerStream(quic)",
            Inner::Tls(_) => "BrokerStream(connect)",
        })
    }
}

impl BrokerStream {
    /// Which front end carries the stream: "quic" or "connect".
    pub fn transport(&self) -> &'static str {
        match self.inner {
            Inner::Quic(_) => "quic",
            Inner::Tls(_) => "connect",
        }
    }

    /// Ends the stream cleanly (QUIC: finish the stream and close the connection; TLS:
    /// close_notify), waiting briefly for that to reach the broker.
    pub async fn close(mut self) {
        use tokio::io::AsyncWriteExt as _;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shutdown()).await;
        if let Inner::Quic(q) = self.inner {
            q.inner._conn.close(0u32.into(), b"done");
            let _ =
                tokio::time::timeout(Duration::from_secs(1), q.inner._endpoint.wait_idle()).await;
        }
    }
}

impl AsyncRead for BrokerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Quic(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BrokerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.inner {
            Inner::Quic(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Quic(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Which front end to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Connect,
    /// QUIC, falling back to CONNECT when QUIC cannot connect.
    Auto,
}

/// Where the broker is and who we are.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    /// Host of the server (name or IP), as in its API URL.
    pub host: String,
    pub api_port: u16,
    pub quic_port: u16,
    pub ca_pem: String,
    pub identity: Identity,
}

/// Why the broker stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker answered with a refusal (unknown device, offline, forbidden, port unreachable...).
    #[error("{}", .0.message)]
    Refused(ApiError),
    /// The broker could not be reached.
    #[error("cannot reach the broker: {0}")]
    Transport(String),
}

impl BrokerError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused(e) => Some(e.error),
            Self::Transport(_) => None,
        }
    }
}

/// Opens a stream to `port` of `device`.
pub async fn open(
    target: &BrokerTarget,
    device: &str,
    port: u16,
    transport: Transport,
) -> Result<BrokerStream, BrokerError> {
    match transport {
        Transport::Quic => open_quic(target, device, port, None).await,
        Transport::Connect => open_connect(target, device, port).await,
        Transport::Auto => match open_quic(target, device, port, Some(QUIC_FALLBACK_AFTER)).await {
            Err(BrokerError::Transport(e)) => {
                tracing::info!(error = %e, "QUIC broker unreachable; using HTTPS CONNECT");
                open_connect(target, device, port).await
            }
            other => other,
        },
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, BrokerError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| BrokerError::Transport(format!("resolving {host}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| BrokerError::Transport(format!("{host} has no address")))
}

fn server_name(host: &str) -> Result<ServerName<'static>, BrokerError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| BrokerError::Transport(format!("{host} is not a valid server name: {e}")))
}

async fn open_quic(
    target: &BrokerTarget,
    device: &str,
    port: u16,
    connect_within: Option<Duration>,
) -> Result<BrokerStream, BrokerError> {
    QuicBroker::connect(target, connect_within)
        .await?
        .open(device, port)
        .await
}

/// A QUIC connection to the broker, authenticated by the operator's certificate, over
/// which any number of streams to devices can be opened. The server checks the operator
/// again for every stream, and closes the connection when the operator is revoked or its
/// certificate expires.
#[derive(Debug, Clone)]
pub struct QuicBroker {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl QuicBroker {
    /// Connects (within `connect_within`, when given).
    pub async fn connect(
        target: &BrokerTarget,
        connect_within: Option<Duration>,
    ) -> Result<Self, BrokerError> {
        let addr = resolve(&target.host, target.quic_port).await?;
        let tls = client_config(&target.ca_pem, Some(&target.identity), &[ALPN])
            .map_err(|e| BrokerError::Transport(e.to_string()))?;
        let quic = QuicClientConfig::try_from(tls)
            .map_err(|e| BrokerError::Transport(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(10)));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| BrokerError::Transport(format!("QUIC socket: {e}")))?;
        endpoint.set_default_client_config(config);
        let name = target.host.trim_start_matches('[').trim_end_matches(']');
        let connecting = endpoint
            .connect(addr, name)
            .map_err(|e| BrokerError::Transport(format!("QUIC connect: {e}")))?;
        let conn = match connect_within {
            Some(limit) => tokio::time::timeout(limit, connecting).await.map_err(|_| {
                BrokerError::Transport(format!(
                    "no QUIC answer from {addr} within {}s",
                    limit.as_secs()
                ))
            })?,
            None => connecting.await,
        }
        .map_err(|e| quic_error(&e))?;
        Ok(Self { conn, endpoint })
    }

    /// Opens a stream to `port` of `device`.
    pub async fn open(&self, device: &str, port: u16) -> Result<BrokerStream, BrokerError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| quic_error(&e))?;
        send.write_all(&encode_header(&BrokerRequest {
            device: device.to_owned(),
            port,
        }))
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => quic_error(&e),
            e => BrokerError::Transport(format!("sending the request: {e}")),
        })?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 2048];
        let leftover = loop {
            match decode_header::<BrokerResponse>(&buf) {
                Ok(Some((resp, used))) => {
                    if !resp.ok {
                        return Err(BrokerError::Refused(resp.error.unwrap_or_else(|| {
                            ApiError::new(
                                ErrorCode::Internal,
                                "the broker refused without a reason",
                            )
                        })));
                    }
                    break Bytes::copy_from_slice(&buf[used..]);
                }
                Ok(None) => {}
                Err(e) => return Err(BrokerError::Transport(format!("bad broker answer: {e}"))),
            }
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(None) => {
                    return Err(BrokerError::Transport(
                        "the broker closed the stream without answering".into(),
                    ))
                }
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(quic_error(&e)),
                Err(e) => return Err(BrokerError::Transport(format!("reading the answer: {e}"))),
            }
        };
        Ok(BrokerStream {
            inner: Inner::Quic(Prefixed {
                prefix: leftover,
                inner: QuicStream {
                    send,
                    recv,
                    _conn: self.conn.clone(),
                    _endpoint: self.endpoint.clone(),
                },
            }),
        })
    }

    /// Completes when the server (or the network) has closed the connection, with why.
    pub async fn closed(&self) -> BrokerError {
        quic_error(&self.conn.closed().await)
    }
}

/// A refused QUIC connection carries the server's JSON reason.
fn quic_error(e: &quinn::ConnectionError) -> BrokerError {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        if let Ok(api) = serde_json::from_slice::<ApiError>(&close.reason) {
            return BrokerError::Refused(api);
        }
    }
    BrokerError::Transport(e.to_string())
}

async fn open_connect(
    target: &BrokerTarget,
    device: &str,
    port: u16,
) -> Result<BrokerStream, BrokerError> {
    let addr = resolve(&target.host, target.api_port).await?;
    let tls = client_config(&target.ca_pem, Some(&target.identity), &[b"http/1.1"])
        .map_err(|e| BrokerError::Transport(e.to_string()))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| BrokerError::Transport(format!("connecting to {addr} timed out")))?
        .map_err(|e| BrokerError::Transport(format!("connecting to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut stream = connector
        .connect(server_name(&target.host)?, tcp)
        .await
        .map_err(|e| BrokerError::Transport(format!("TLS with {addr}: {e}")))?;
    let request = format!("CONNECT {device}:{port} HTTP/1.1\r\nHost: {device}:{port}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| BrokerError::Transport(format!("sending CONNECT: {e}")))?;
    // Read the response head.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEADER * 4 {
            return Err(BrokerError::Transport(
                "CONNECT response head too long".into(),
            ));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| BrokerError::Transport(format!("reading the CONNECT answer: {e}")))?;
        if n == 0 {
            return Err(BrokerError::Transport(
                "the server closed the connection during CONNECT".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            BrokerError::Transport(format!("bad CONNECT answer: {:?}", head.lines().next()))
        })?;
    if status == 200 {
        return Ok(BrokerStream {
            inner: Inner::Tls(Box::new(Prefixed {
                prefix: Bytes::copy_from_slice(&buf[head_end..]),
                inner: stream,
            })),
        });
    }
    // An error: read the JSON body (Content-Length bytes).
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let error = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| {
        ApiError::new(
            ErrorCode::from_http_status(status),
            format!("CONNECT refused with HTTP {status}"),
        )
    });
    Err(BrokerError::Refused(error))
}

/// Both halves of a QUIC stream, keeping the connection and endpoint alive.
struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// A stream that first yields bytes already read past a header.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
