//! Nobody can starve the HTTPS API: a connection with nothing in flight (after its TLS
//! handshake, before or between requests, a half-sent HTTP/2 preface) is closed after
//! `--client-idle-timeout`, a body sent a byte at a time is refused after the same time, and
//! one source address holds at most `--max-connections-per-address` connections, so that
//! enrollment and the admin commands (which go through the API) keep working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use floto_e2e::server::Server;
use floto_e2e::{bin, output, stdout};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the API from `source` (a loopback address), its handshake done.
/// `None` when the server closed it or did not finish the handshake within 2 s.
fn tls_from(server: &Server, source: IpAddr, config: &Arc<rustls::ClientConfig>) -> Option<Tls> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::new(source, 0).into()).ok()?;
    let api = SocketAddr::from(([127, 0, 0, 1], server.bound.api.port()));
    socket
        .connect_timeout(&api.into(), Duration::from_secs(2))
        .ok()?;
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::StreamOwned::new(
        rustls::ClientConnection::new(config.clone(), name).ok()?,
        tcp,
    );
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).ok()?;
    }
    Some(tls)
}

/// Whether the server has closed `tls` (reading gives end of stream or a reset) within
/// `limit`; reads nothing else.
fn closed_within(tls: &mut Tls, limit: Duration) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match tls.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn client_config(server: &Server, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read_to_string(server.ca_path()).unwrap();
    Arc::new(floto_client::tls::client_config(&ca, None, alpn).unwrap())
}

#[test]
fn idle_connections_from_one_address_cannot_starve_the_api() {
    let server = Server::start(&[
        "--max-connections",
        "300",
        "--max-connections-per-address",
        "100",
        "--client-idle-timeout",
        "4s",
    ]);
    let pkey = server.create_key("lab", None);
    let http1 = client_config(&server, &[b"http/1.1"]);
    let h2 = client_config(&server, &[b"h2"]);
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();

    // A thousand TLS connections from one address that say nothing (some with half an
    // HTTP/2 preface), within a time budget.
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..1000 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let config = if i % 2 == 0 { &http1 } else { &h2 };
        if let Some(mut tls) = tls_from(&server, attacker, config) {
            if i % 2 == 1 {
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n");
                let _ = tls.flush();
            }
            held.push(tls);
        }
    }
    assert!(
        held.len() <= 100,
        "one address holds {} connections, more than --max-connections-per-address",
        held.len()
    );
    assert!(
        held.len() >= 50,
        "only {} connections were served",
        held.len()
    );

    // Meanwhile a device enrolls and an admin revokes it, both at once.
    let state = tempfile::tempdir().unwrap();
    let uuid = "5b8e3c1a-7d2f-4e6a-9c0b-1f2e3d4c5b6a";
    let clock = Instant::now();
    let enrolled = output(
        Command::new(bin("floto-tunnel"))
            .args(["enroll", "--server", &server.local_url(), "--ca"])
            .arg(server.ca_path())
            .args(["--provisioning-key", &pkey, "--uuid", uuid, "--state-dir"])
            .arg(state.path()),
    );
    assert!(enrolled.status.success(), "{enrolled:?}");
    assert_eq!(stdout(&enrolled).lines().last(), Some(uuid));
    let revoked = server.admin(&["device", "revoke", uuid]);
    assert!(revoked.status.success(), "{revoked:?}");
    let took = clock.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "enroll and revoke took {took:?}"
    );

    // The idle ones are closed once they have sat --client-idle-timeout.
    let waited = Instant::now();
    for tls in held.iter_mut().take(20) {
        assert!(
            closed_within(tls, Duration::from_secs(10)),
            "an idle connection was still open {:?} later",
            waited.elapsed()
        );
    }

    // A body sent a byte at a time is refused once the same time has passed.
    let mut slow = tls_from(&server, "127.0.0.3".parse().unwrap(), &http1).unwrap();
    slow.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {pkey}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.flush().unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not arrive within 4s"), "{answer}");
}
