//! The server's WireGuard over TLS transport (`GET /v1/wg`, `Upgrade: floto-wg/1`), driven
//! by a raw client: TLS with the device certificate, the upgrade, length-prefixed frames and
//! boringtun for the WireGuard side. A datagram stream carries a real session (handshake,
//! ping of the server's overlay address, the device online with transport `tls`); strangers,
//! operators and revoked devices are refused before any datagram is read; garbage, oversized
//! frames and silence close a stream with their reason while other streams go on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use floto_e2e::fleet::icmp_echo;
use floto_e2e::server::{metric, Server};
use floto_e2e::{bin, last_line, run, stdout};
use floto_proto::WgKey;

const SERVER_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);

/// A device enrolled over loopback with `floto-tunnel enroll`.
struct Device {
    _dir: tempfile::TempDir,
    state: PathBuf,
    uuid: String,
    overlay_ip: Ipv4Addr,
}

fn enroll(server: &Server, key: &str) -> Device {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = run(std::process::Command::new(bin("floto-tunnel"))
        .args(["enroll", "--server", &server.local_url(), "--ca"])
        .arg(server.ca_path())
        .args(["--provisioning-key", key, "--state-dir"])
        .arg(&state));
    let uuid = last_line(&out);
    let status = run(std::process::Command::new(bin("floto-tunnel"))
        .args(["status", "--json", "--state-dir"])
        .arg(&state));
    let v: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    Device {
        _dir: dir,
        uuid,
        overlay_ip: v["overlay_ip"].as_str().unwrap().parse().unwrap(),
        state,
    }
}

/// What presents itself to the server.
enum Identity<'a> {
    None,
    Files(&'a Path, &'a Path),
}

/// An open TLS connection to the API, before or after the upgrade.
struct Conn {
    tls: TlsStream<TcpStream>,
}

impl Conn {
    async fn open(server: &Server, who: Identity<'_>) -> Self {
        Self::open_at(server, server.bound.api, who).await
    }

    async fn open_at(server: &Server, at: std::net::SocketAddr, who: Identity<'_>) -> Self {
        let ca = std::fs::read_to_string(server.ca_path()).unwrap();
        let identity = match who {
            Identity::None => None,
            Identity::Files(cert, key) => Some(floto_client::Identity {
                cert_pem: std::fs::read_to_string(cert).unwrap(),
                key_pem: std::fs::read_to_string(key).unwrap(),
            }),
        };
        let config =
            floto_client::tls::client_config(&ca, identity.as_ref(), &[b"http/1.1"]).unwrap();
        let tcp = TcpStream::connect(at).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        Self { tls }
    }

    /// Sends the upgrade request; returns the status line and, for a refusal, the body.
    async fn upgrade(&mut self, headers: &str) -> (u16, String) {
        let req = format!("GET /v1/wg HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        self.tls.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.tls.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        if status == 101 {
            return (status, head);
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn send_frame(&mut self, payload: &[u8]) {
        let mut frame = (payload.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        self.tls.write_all(&frame).await.unwrap();
    }

    /// The next frame, `None` at the end of the stream.
    async fn frame(&mut self) -> Option<Vec<u8>> {
        let len = self.tls.read_u16().await.ok()?;
        let mut payload = vec![0u8; usize::from(len)];
        self.tls.read_exact(&mut payload).await.ok()?;
        Some(payload)
    }

    /// Reads until the server's close reason (a frame starting with 0) and the end.
    async fn close_reason(&mut self, within: Duration) -> String {
        tokio::time::timeout(within, async {
            while let Some(f) = self.frame().await {
                if f.first() == Some(&0) {
                    let reason = String::from_utf8_lossy(&f[1..]).into_owned();
                    assert!(
                        self.frame().await.is_none(),
                        "frames after the close reason"
                    );
                    return reason;
                }
            }
            panic!("the stream ended without a reason");
        })
        .await
        .expect("no close reason in time")
    }
}

/// A device's WireGuard side over an upgraded stream.
struct WgClient {
    conn: Conn,
    tunn: Tunn,
    buf: Vec<u8>,
}

impl WgClient {
    async fn connect(server: &Server, device: &Device) -> Self {
        Self::connect_at(server, server.bound.api, device).await
    }

    async fn connect_at(server: &Server, at: std::net::SocketAddr, device: &Device) -> Self {
        let mut conn = Conn::open_at(
            server,
            at,
            Identity::Files(
                &device.state.join("device.pem"),
                &device.state.join("device.key"),
            ),
        )
        .await;
        let (status, head) = conn
            .upgrade("Connection: Upgrade\r\nUpgrade: floto-wg/1\r\n")
            .await;
        assert_eq!(status, 101, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: floto-wg/1"),
            "{head}"
        );
        let wg: WgKey = std::fs::read_to_string(device.state.join("wg.key"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(device.state.join("state.json")).unwrap(),
        )
        .unwrap();
        let server_key: WgKey = state["server_public_key"]
            .as_str()
            .or_else(|| state["assignment"]["server_public_key"].as_str())
            .expect("the server's key in state.json")
            .parse()
            .unwrap();
        let tunn = Tunn::new(
            StaticSecret::from(wg.0),
            PublicKey::from(server_key.0),
            None,
            None,
            7,
            None,
        );
        Self {
            conn,
            tunn,
            buf: vec![0u8; 65_536],
        }
    }

    async fn handshake(&mut self) {
        let init = match self.tunn.format_handshake_initiation(&mut self.buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        };
        self.conn.send_frame(&init).await;
        let response = tokio::time::timeout(Duration::from_secs(5), self.conn.frame())
            .await
            .expect("no handshake response")
            .expect("the stream ended");
        match self.tunn.decapsulate(None, &response, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                let keepalive = p.to_vec();
                self.conn.send_frame(&keepalive).await;
            }
            TunnResult::Done => {}
            other => panic!("unexpected answer to the initiation: {other:?}"),
        }
    }

    /// An ICMP echo to the server's overlay address and its reply, through the stream.
    async fn ping(&mut self, from: Ipv4Addr, seq: u16) -> Duration {
        let started = Instant::now();
        let packet = icmp_echo(from, SERVER_OVERLAY, seq);
        let datagram = match self.tunn.encapsulate(&packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("cannot encapsulate: {other:?}"),
        };
        self.conn.send_frame(&datagram).await;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.conn.frame())
                .await
                .expect("no echo reply")
                .expect("the stream ended");
            if let TunnResult::WriteToTunnelV4(p, src) =
                self.tunn.decapsulate(None, &frame, &mut self.buf)
            {
                if src == SERVER_OVERLAY && p.get(20) == Some(&0) {
                    return started.elapsed();
                }
            }
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Through the extra listener (`--wg-tls-listen`, as for TCP 443), too.
#[test]
fn a_device_session_runs_over_a_tls_stream() {
    let server = Server::start(&["--wg-tls-listen", "127.0.0.1:0"]);
    let key = server.create_key("lab", None);
    let device = enroll(&server, &key);
    let extra = server
        .bound
        .wg_tls
        .expect("the extra listener in server.json");
    rt().block_on(async {
        let mut wg = WgClient::connect_at(&server, extra, &device).await;
        wg.handshake().await;
        let rtt = wg.ping(device.overlay_ip, 1).await;
        eprintln!("ping through the TLS stream: {rtt:?}");
        let view = server.device(&device.uuid);
        assert_eq!(view["online"], true, "{view}");
        assert_eq!(view["transport"], "tls", "{view}");
        assert!(
            view["endpoint"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{view}"
        );
        let m = server.metrics();
        assert_eq!(
            metric(&m, "floto_wg_sessions{transport=\"tls\"}"),
            Some(1.0),
            "{m}"
        );
        assert_eq!(metric(&m, "floto_wg_tls_streams"), Some(1.0));
        assert!(metric(&m, "floto_wg_tls_bytes_total{direction=\"rx\"}").unwrap() > 0.0);
    });
}

#[test]
fn streams_of_strangers_and_bad_frames_are_refused_with_their_reason() {
    let server = Server::start(&[]);
    let key = server.create_key("lab", None);
    let good = enroll(&server, &key);
    let revoked = enroll(&server, &key);
    let ops = tempfile::tempdir().unwrap();
    server.login_operator("alice", "admin", &[], ops.path());
    let upgrade = "Connection: Upgrade\r\nUpgrade: floto-wg/1\r\n";
    rt().block_on(async {
        // A device whose stream runs beside the bad ones, undisturbed.
        let mut wg = WgClient::connect(&server, &good).await;
        wg.handshake().await;
        wg.ping(good.overlay_ip, 1).await;

        let refused = |status: u16, body: &str, want: u16, words: &str| {
            assert_eq!(status, want, "{body}");
            assert!(body.contains(words), "{body} should say {words:?}");
        };
        let mut c = Conn::open(&server, Identity::None).await;
        let (s, b) = c.upgrade(upgrade).await;
        refused(s, &b, 401, "needs a client certificate");
        let mut c = Conn::open(
            &server,
            Identity::Files(
                &ops.path().join("operator.pem"),
                &ops.path().join("operator.key"),
            ),
        )
        .await;
        let (s, b) = c.upgrade(upgrade).await;
        refused(s, &b, 403, "not a device certificate");
        server.admin(&["device", "revoke", &revoked.uuid]);
        let mut c = Conn::open(
            &server,
            Identity::Files(
                &revoked.state.join("device.pem"),
                &revoked.state.join("device.key"),
            ),
        )
        .await;
        let (s, b) = c.upgrade(upgrade).await;
        refused(s, &b, 403, "revoked");
        let device_files = Identity::Files(
            &good.state.join("device.pem"),
            &good.state.join("device.key"),
        );
        let mut c = Conn::open(&server, device_files).await;
        let (s, b) = c.upgrade("").await;
        refused(s, &b, 400, "Upgrade: floto-wg/1");

        // After the upgrade: each bad stream is closed with its reason.
        let stream = || async {
            let mut c = Conn::open(
                &server,
                Identity::Files(
                    &good.state.join("device.pem"),
                    &good.state.join("device.key"),
                ),
            )
            .await;
            assert_eq!(c.upgrade(upgrade).await.0, 101);
            c
        };
        let mut c = stream().await;
        c.send_frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n plus some more bytes")
            .await;
        assert_eq!(
            c.close_reason(Duration::from_secs(5)).await,
            "a frame that is no WireGuard message"
        );
        let mut c = stream().await;
        c.tls.write_all(&3000u16.to_be_bytes()).await.unwrap();
        c.tls.write_all(&[1u8; 100]).await.unwrap();
        let reason = c.close_reason(Duration::from_secs(5)).await;
        assert!(reason.contains("a frame of 3000 bytes"), "{reason}");
        let mut c = stream().await;
        c.tls.write_all(&0u16.to_be_bytes()).await.unwrap();
        let reason = c.close_reason(Duration::from_secs(5)).await;
        assert!(reason.contains("a frame of 0 bytes"), "{reason}");
        let mut c = stream().await;
        let silent = Instant::now();
        let reason = c.close_reason(Duration::from_secs(15)).await;
        assert!(reason.contains("no datagram within 10 s"), "{reason}");
        assert!(silent.elapsed() < Duration::from_secs(13));

        // The good stream never noticed.
        wg.ping(good.overlay_ip, 2).await;
        let m = server.metrics();
        assert_eq!(
            metric(&m, "floto_wg_tls_streams_refused_total"),
            Some(4.0),
            "{m}"
        );
        // Revoking the device closes its open stream, with the reason.
        server.admin(&["device", "revoke", &good.uuid]);
        let reason = wg.conn.close_reason(Duration::from_secs(5)).await;
        assert!(reason.contains("revoked"), "{reason}");
    });
}
