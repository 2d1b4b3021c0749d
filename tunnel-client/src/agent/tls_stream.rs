//! The TLS transport's I/O: opens a stream (TCP, an HTTP proxy's tunnel, TLS with the device
//! certificate, the upgrade) and moves frames between it and the driver, in two tasks per
//! stream. What to send and how to read the answers is [`super::wg_tls`]'s; when to open
//! and close a stream is [`super::transport`]'s.
//!
//! Datagrams to the server wait in a bounded queue and are dropped when it is full, as a
//! full UDP socket buffer drops them: WireGuard carries TCP, and TCP over a TCP stream must
//! not build a queue of its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::trace;

use floto_proto::ApiError;

use super::wg_tls::{
    self, authority, check_connect, check_upgrade, connect_request, encode_frame, parse_head,
    refusal, upgrade_request, Frame, FrameDecoder, ProxyUrl, ResponseHead, UpgradeAnswer,
    MAX_DATAGRAM, MAX_HEAD,
};
use crate::servers::ServerUrl;

/// Opening a stream (every step) takes at most this long.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Datagrams waiting for a stream's writer at most; more are dropped.
pub(super) const WRITE_QUEUE: usize = 256;

/// Bytes the writer puts in one TLS write at most (the queue drained at once).
const WRITE_BATCH: usize = 64 * 1024;

/// Where and how a stream is opened.
#[derive(Clone)]
pub(super) struct StreamTarget {
    pub(super) server: ServerUrl,
    pub(super) proxy: Option<ProxyUrl>,
    /// Trusts the server's CA, presents the device certificate, ALPN `http/1.1`.
    pub(super) tls: Arc<ClientConfig>,
}

impl StreamTarget {
    /// `HOST:PORT` of the server, and the proxy it goes through: for logs and the status.
    pub(super) fn describe(&self) -> String {
        let server = authority(self.server.host(), self.server.port());
        match &self.proxy {
            Some(p) => format!("{server} through proxy {p}"),
            None => server,
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The server or the proxy could not be reached.
    #[error("cannot reach {what}: {detail}")]
    Unreachable { what: String, detail: String },
    /// The proxy did not open the tunnel.
    #[error("proxy {proxy}: {detail}")]
    Proxy { proxy: String, detail: String },
    /// TLS with the server failed.
    #[error("TLS with {server}: {detail}")]
    Tls { server: String, detail: String },
    /// The server refused the device (revoked, unknown certificate...).
    #[error("the server refused WireGuard over TLS: {} (HTTP {status})", error.message)]
    Refused { status: u16, error: ApiError },
    /// The server's answer was not the protocol.
    #[error("unexpected answer from {server}: {detail}")]
    Protocol { server: String, detail: String },
    /// Opening took longer than [`OPEN_TIMEOUT`].
    #[error("opening a stream to {0} timed out")]
    TimedOut(String),
}

/// What a stream's tasks report to the driver.
pub(super) enum StreamEvent {
    /// The stream `id` is open, or could not be opened.
    Opened {
        id: u64,
        result: Result<StreamHandle, OpenError>,
    },
    /// A datagram came from the server over a stream.
    Datagram(Vec<u8>),
    /// Stream `id` closed, and why.
    Closed { id: u64, reason: String },
}

/// An open stream. Dropping it closes the stream.
pub(super) struct StreamHandle {
    pub(super) id: u64,
    to_server: mpsc::Sender<Vec<u8>>,
    _stop: DropGuard,
}

impl StreamHandle {
    /// Queues one datagram for the server. `false` when it was dropped: the queue is full,
    /// the stream is gone, or the datagram does not fit a frame.
    pub(super) fn send(&self, datagram: &[u8]) -> bool {
        if datagram.is_empty() || datagram.len() > MAX_DATAGRAM {
            return false;
        }
        self.to_server.try_send(datagram.to_vec()).is_ok()
    }
}

/// Opens stream `id` to `target` in a task of its own, which reports on `events` (first
/// [`StreamEvent::Opened`]) and ends with `stop`.
pub(super) fn spawn(
    id: u64,
    target: StreamTarget,
    events: mpsc::Sender<StreamEvent>,
    stop: &CancellationToken,
) {
    let stop = stop.child_token();
    tokio::spawn(async move {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(OPEN_TIMEOUT, open(&target)) => {
                r.unwrap_or_else(|_| Err(OpenError::TimedOut(target.describe())))
            }
        };
        let (stream, leftover) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let _ = events
                    .send(StreamEvent::Opened { id, result: Err(e) })
                    .await;
                return;
            }
        };
        let (to_server, queue) = mpsc::channel(WRITE_QUEUE);
        let handle = StreamHandle {
            id,
            to_server,
            _stop: stop.clone().drop_guard(),
        };
        if events
            .send(StreamEvent::Opened {
                id,
                result: Ok(handle),
            })
            .await
            .is_err()
        {
            return;
        }
        let (read, write) = tokio::io::split(stream);
        tokio::spawn(write_frames(id, write, queue, events.clone(), stop.clone()));
        read_frames(id, read, leftover, events, stop).await;
    });
}

/// TCP (through the proxy when there is one), TLS and the upgrade. Returns the stream and
/// the bytes that came after the `101` (the start of the first frames).
async fn open(target: &StreamTarget) -> Result<(TlsStream<TcpStream>, Vec<u8>), OpenError> {
    let server = &target.server;
    let server_at = authority(server.host(), server.port());
    let tcp = match &target.proxy {
        None => dial(server.host(), server.port(), &server_at).await?,
        Some(proxy) => {
            let proxy_failed = |detail: String| OpenError::Proxy {
                proxy: proxy.to_string(),
                detail,
            };
            let mut tcp = dial(proxy.host(), proxy.port(), &format!("proxy {proxy}")).await?;
            tcp.write_all(connect_request(server.host(), server.port()).as_bytes())
                .await
                .map_err(|e| proxy_failed(format!("sending CONNECT: {e}")))?;
            // Byte by byte: the TLS handshake's bytes that follow are not ours to read.
            let (head, _) = read_head(&mut tcp, true).await.map_err(proxy_failed)?;
            check_connect(&head).map_err(proxy_failed)?;
            tcp
        }
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server.host().to_owned()).map_err(|e| OpenError::Tls {
        server: server_at.clone(),
        detail: format!("{} is not a valid server name: {e}", server.host()),
    })?;
    let mut tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| OpenError::Tls {
            server: server_at.clone(),
            detail: e.to_string(),
        })?;
    let protocol = |detail: String| OpenError::Protocol {
        server: server_at.clone(),
        detail,
    };
    tls.write_all(upgrade_request(server).as_bytes())
        .await
        .map_err(|e| protocol(format!("sending the upgrade request: {e}")))?;
    tls.flush()
        .await
        .map_err(|e| protocol(format!("sending the upgrade request: {e}")))?;
    let (head, mut rest) = read_head(&mut tls, false).await.map_err(protocol)?;
    match check_upgrade(&head).map_err(protocol)? {
        UpgradeAnswer::Switched => Ok((tls, rest)),
        UpgradeAnswer::Refused {
            status,
            body_length,
        } => {
            let mut chunk = [0u8; 4096];
            while rest.len() < body_length {
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
            rest.truncate(body_length);
            Err(OpenError::Refused {
                status,
                error: refusal(status, &rest),
            })
        }
    }
}

/// A TCP connection to `host:port`, trying its addresses in turn.
async fn dial(host: &str, port: u16, what: &str) -> Result<TcpStream, OpenError> {
    let unreachable = |detail: String| OpenError::Unreachable {
        what: what.to_owned(),
        detail,
    };
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| unreachable(format!("resolving {host}: {e}")))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(unreachable(last))
}

/// Reads a response head; returns it and the bytes read after it. `exact` reads one byte at
/// a time, so that nothing after the head is consumed.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    exact: bool,
) -> Result<(ResponseHead, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        // Byte by byte, the head can only have ended on its last four bytes.
        if !exact || buf.ends_with(b"\r\n\r\n") || buf.len() > MAX_HEAD {
            if let Some((head, len)) = parse_head(&buf).map_err(|e| e.to_string())? {
                return Ok((head, buf.split_off(len)));
            }
        }
        let want = if exact { 1 } else { chunk.len() };
        let n = s
            .read(&mut chunk[..want])
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("the connection closed before an answer".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Frames from the server, to the driver; ends when the stream closes, breaks or is stopped.
async fn read_frames(
    id: u64,
    mut read: ReadHalf<TlsStream<TcpStream>>,
    leftover: Vec<u8>,
    events: mpsc::Sender<StreamEvent>,
    stop: CancellationToken,
) {
    let mut decoder = FrameDecoder::new();
    decoder.push(&leftover);
    let mut chunk = vec![0u8; 16 * 1024];
    let reason = 'stream: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(Frame::Datagram(d))) => {
                    let datagram = d.to_vec();
                    if events.send(StreamEvent::Datagram(datagram)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Frame::Close(why))) => {
                    break 'stream format!("the server closed it: {why}")
                }
                Ok(None) => break,
                Err(e) => break 'stream format!("a bad frame from the server: {e}"),
            }
        }
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = read.read(&mut chunk) => n,
        };
        match n {
            Ok(0) => break "the server closed the connection".to_owned(),
            Ok(n) => decoder.push(&chunk[..n]),
            Err(e) => break format!("reading: {e}"),
        }
    };
    stop.cancel();
    let _ = events.send(StreamEvent::Closed { id, reason }).await;
}

/// Datagrams from the queue, as frames, to the server; ends when the stream breaks or is
/// stopped.
async fn write_frames(
    id: u64,
    mut write: WriteHalf<TlsStream<TcpStream>>,
    mut queue: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<StreamEvent>,
    stop: CancellationToken,
) {
    let mut out = Vec::with_capacity(WRITE_BATCH + 2 + MAX_DATAGRAM);
    let reason = loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            d = queue.recv() => d,
        };
        let Some(first) = first else {
            return;
        };
        out.clear();
        let mut next = Some(first);
        while let Some(d) = next.take() {
            if let Err(e) = encode_frame(&d, &mut out) {
                trace!(error = %e, "datagram dropped");
            }
            if out.len() < WRITE_BATCH {
                next = queue.try_recv().ok();
            }
        }
        let written = tokio::select! {
            _ = stop.cancelled() => return,
            r = write_all_and_flush(&mut write, &out) => r,
        };
        if let Err(e) = written {
            break format!("writing: {e}");
        }
    };
    stop.cancel();
    let _ = events.send(StreamEvent::Closed { id, reason }).await;
}

async fn write_all_and_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// The TLS client config of a stream: the server's CA, the device certificate.
pub(super) fn client_config(
    ca_pem: &str,
    identity: &floto_client::Identity,
) -> Result<Arc<ClientConfig>, String> {
    floto_client::tls::client_config(ca_pem, Some(identity), &[wg_tls::ALPN])
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;

    #[tokio::test]
    async fn the_proxy_answer_is_read_exactly_and_the_upgrade_answer_keeps_what_follows() {
        let (mut client, mut server) = duplex(1024);
        let ok = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
        server.write_all(ok).await.unwrap();
        server.write_all(b"\x16\x03\x01").await.unwrap();
        let (head, rest) = read_head(&mut client, true).await.unwrap();
        assert_eq!(head.status, 200);
        assert!(rest.is_empty());
        // What followed the head is still there.
        let mut next = [0u8; 3];
        client.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"\x16\x03\x01");

        server
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: floto-wg/1\r\n\r\n\x00\x02\x04\x04",
            )
            .await
            .unwrap();
        let (head, rest) = read_head(&mut client, false).await.unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(rest, b"\x00\x02\x04\x04");

        drop(server);
        let e = read_head(&mut client, false).await.unwrap_err();
        assert!(e.contains("closed before an answer"), "{e}");
    }

    #[tokio::test]
    async fn an_endless_head_is_refused() {
        let (mut client, mut server) = duplex(64 * 1024);
        tokio::spawn(async move {
            let line = [b'a'; 1024];
            while server.write_all(&line).await.is_ok() {}
        });
        for exact in [false, true] {
            let e = read_head(&mut client, exact).await.unwrap_err();
            assert!(e.contains("longer than"), "{e}");
        }
    }

    /// What the fake server does after reading the upgrade request.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// `101`, a frame at once (in the same write as the head), then echoes one frame
        /// and closes with a reason.
        Echo,
        /// `403` with the server's JSON refusal of a revoked device.
        Revoked,
    }

    /// A CA, and a TLS server on 127.0.0.1 with a certificate from it (also used as the
    /// client's identity: the fake server does not ask for one).
    fn pki() -> (String, floto_client::Identity) {
        let now = time::OffsetDateTime::now_utc();
        let day = Duration::from_secs(86_400);
        let ca = floto_pki::Ca::generate("test CA", now, day).unwrap();
        let (cert, key_pem) = ca
            .issue_server(
                &["127.0.0.1".into()],
                &floto_pki::Serial::random(),
                now,
                day,
            )
            .unwrap();
        let identity = floto_client::Identity {
            cert_pem: cert.pem,
            key_pem,
        };
        (ca.cert_pem().to_owned(), identity)
    }

    async fn fake_server(identity: &floto_client::Identity, behaviour: Behaviour) -> u16 {
        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(
            floto_client::tls::provider(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![wg_tls::ALPN.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(tls.read_u8().await.unwrap());
            }
            let request = String::from_utf8(request).unwrap();
            assert!(request.starts_with("GET /v1/wg HTTP/1.1\r\n"), "{request}");
            assert!(request.contains("\r\nUpgrade: floto-wg/1\r\n"), "{request}");
            assert!(
                request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
                "{request}"
            );
            match behaviour {
                Behaviour::Echo => {
                    let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: floto-wg/1\r\n\r\n".to_vec();
                    encode_frame(&[4; 32], &mut answer).unwrap();
                    tls.write_all(&answer).await.unwrap();
                    let n = usize::from(tls.read_u16().await.unwrap());
                    let mut datagram = vec![0u8; n];
                    tls.read_exact(&mut datagram).await.unwrap();
                    let mut out = Vec::new();
                    encode_frame(&datagram, &mut out).unwrap();
                    encode_frame(b"\x00bye for now", &mut out).unwrap();
                    tls.write_all(&out).await.unwrap();
                    let _ = tls.shutdown().await;
                }
                Behaviour::Revoked => {
                    let body = r#"{"error":"revoked","message":"device d1 was revoked"}"#;
                    let answer = format!(
                        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    tls.write_all(answer.as_bytes()).await.unwrap();
                    let _ = tls.shutdown().await;
                }
            }
        });
        port
    }

    /// An HTTP proxy on 127.0.0.1 that opens one tunnel; reports the CONNECT it got.
    async fn fake_proxy() -> (ProxyUrl, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(client.read_u8().await.unwrap());
            }
            let request = String::from_utf8(request).unwrap();
            let target = request
                .strip_prefix("CONNECT ")
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .to_owned();
            let mut server = TcpStream::connect(&target).await.unwrap();
            let _ = tx.send(request);
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        (format!("http://127.0.0.1:{port}").parse().unwrap(), rx)
    }

    async fn next(events: &mut mpsc::Receiver<StreamEvent>) -> StreamEvent {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the stream's task is alive")
    }

    fn target(
        port: u16,
        proxy: Option<ProxyUrl>,
        ca_pem: &str,
        id: &floto_client::Identity,
    ) -> StreamTarget {
        StreamTarget {
            server: format!("https://127.0.0.1:{port}").parse().unwrap(),
            proxy,
            tls: client_config(ca_pem, id).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_stream_through_a_proxy_carries_datagrams_both_ways_and_ends_with_the_servers_reason()
    {
        let (ca_pem, identity) = pki();
        let port = fake_server(&identity, Behaviour::Echo).await;
        let (proxy, connect) = fake_proxy().await;
        let (tx, mut events) = mpsc::channel(16);
        let stop = CancellationToken::new();
        spawn(7, target(port, Some(proxy), &ca_pem, &identity), tx, &stop);
        let handle = match next(&mut events).await {
            StreamEvent::Opened {
                id: 7,
                result: Ok(handle),
            } => handle,
            StreamEvent::Opened { result: Err(e), .. } => panic!("not opened: {e}"),
            _ => panic!("not the Opened event"),
        };
        let request = connect.await.unwrap();
        assert_eq!(
            request,
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
        );
        // The frame that came in the same write as the 101.
        assert!(matches!(next(&mut events).await, StreamEvent::Datagram(d) if d == [4; 32]));
        assert!(!handle.send(&[]), "an empty datagram is no frame");
        assert!(!handle.send(&[1; MAX_DATAGRAM + 1]), "too long for a frame");
        assert!(handle.send(&[1, 0, 0, 0, 9]));
        assert!(
            matches!(next(&mut events).await, StreamEvent::Datagram(d) if d == [1, 0, 0, 0, 9])
        );
        match next(&mut events).await {
            StreamEvent::Closed { id: 7, reason } => {
                assert!(reason.contains("bye for now"), "{reason}");
            }
            _ => panic!("not the Closed event"),
        }
    }

    #[tokio::test]
    async fn a_refusal_says_what_the_server_said() {
        let (ca_pem, identity) = pki();
        let port = fake_server(&identity, Behaviour::Revoked).await;
        let (tx, mut events) = mpsc::channel(16);
        spawn(
            1,
            target(port, None, &ca_pem, &identity),
            tx,
            &CancellationToken::new(),
        );
        match next(&mut events).await {
            StreamEvent::Opened {
                result: Err(OpenError::Refused { status, error }),
                ..
            } => {
                assert_eq!(status, 403);
                assert_eq!(error.error, floto_proto::ErrorCode::Revoked);
                assert_eq!(error.message, "device d1 was revoked");
            }
            _ => panic!("not a refusal"),
        }
    }

    #[tokio::test]
    async fn a_server_with_another_ca_or_nobody_listening_is_an_error_that_says_so() {
        let (_, identity) = pki();
        let (other_ca, _) = pki();
        let port = fake_server(&identity, Behaviour::Echo).await;
        let (tx, mut events) = mpsc::channel(16);
        spawn(
            1,
            target(port, None, &other_ca, &identity),
            tx.clone(),
            &CancellationToken::new(),
        );
        match next(&mut events).await {
            StreamEvent::Opened {
                result: Err(e @ OpenError::Tls { .. }),
                ..
            } => {
                assert!(
                    e.to_string()
                        .contains(&format!("TLS with 127.0.0.1:{port}")),
                    "{e}"
                );
            }
            _ => panic!("not a TLS error"),
        }
        // A port nobody listens on.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        spawn(
            2,
            target(closed, None, &other_ca, &identity),
            tx,
            &CancellationToken::new(),
        );
        match next(&mut events).await {
            StreamEvent::Opened {
                result: Err(e @ OpenError::Unreachable { .. }),
                ..
            } => {
                assert!(e.to_string().contains("cannot reach 127.0.0.1:"), "{e}");
            }
            _ => panic!("not unreachable"),
        }
    }
}
