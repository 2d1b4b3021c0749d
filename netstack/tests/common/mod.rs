//! Two stacks wired back to back through tokio channels.

#![allow(dead_code)] // each test binary uses a different part

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use floto_netstack::{Config, NetstackHandle, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) const A: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
pub(crate) const B: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);

pub(crate) fn b_port(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(B, port)
}

pub(crate) struct Stack {
    pub(crate) handle: NetstackHandle,
    /// Sends packets into this stack as if they came from the network.
    pub(crate) inject: mpsc::Sender<Vec<u8>>,
}

pub(crate) struct Pair {
    pub(crate) a: Stack,
    pub(crate) b: Stack,
    /// Stops A's driver.
    pub(crate) stop_a: CancellationToken,
    /// Stops B's driver.
    pub(crate) stop_b: CancellationToken,
    /// Packets lost because a channel was full.
    pub(crate) overflow: Arc<AtomicU64>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop_a.cancel();
        self.stop_b.cancel();
    }
}

pub(crate) fn pair() -> Pair {
    pair_with(Config::new(A, 16), Config::new(B, 16), |_| true)
}

/// A pair whose A -> B direction passes only the packets `a_to_b` lets through.
pub(crate) fn pair_with(
    config_a: Config,
    config_b: Config,
    a_to_b: impl FnMut(&[u8]) -> bool + Send + 'static,
) -> Pair {
    pair_filtered(config_a, config_b, a_to_b, |_| true)
}

/// A pair whose directions pass only the packets their filters let through.
pub(crate) fn pair_filtered(
    config_a: Config,
    config_b: Config,
    mut a_to_b: impl FnMut(&[u8]) -> bool + Send + 'static,
    mut b_to_a: impl FnMut(&[u8]) -> bool + Send + 'static,
) -> Pair {
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let overflow = Arc::new(AtomicU64::new(0));
    let (to_a, from_b) = mpsc::channel::<Vec<u8>>(4096);
    let (to_b, from_a) = mpsc::channel::<Vec<u8>>(4096);
    let sink_a = {
        let to_b = to_b.clone();
        let overflow = overflow.clone();
        move |packet: &[u8]| {
            if a_to_b(packet) && to_b.try_send(packet.to_vec()).is_err() {
                overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let sink_b = {
        let to_a = to_a.clone();
        let overflow = overflow.clone();
        move |packet: &[u8]| {
            if b_to_a(packet) && to_a.try_send(packet.to_vec()).is_err() {
                overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let (a, driver_a) = floto_netstack::new(config_a, from_b, sink_a);
    let (b, driver_b) = floto_netstack::new(config_b, from_a, sink_b);
    tokio::spawn(driver_a.run(stop_a.clone()));
    tokio::spawn(driver_b.run(stop_b.clone()));
    Pair {
        a: Stack {
            handle: a,
            inject: to_a,
        },
        b: Stack {
            handle: b,
            inject: to_b,
        },
        stop_a,
        stop_b,
        overflow,
    }
}

/// Waits until `stats` satisfies `done`, or panics after `limit` with the last stats.
pub(crate) async fn wait_for_stats(
    handle: &NetstackHandle,
    limit: Duration,
    done: impl Fn(&Stats) -> bool,
) -> Stats {
    let start = tokio::time::Instant::now();
    loop {
        let stats = handle.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            start.elapsed() < limit,
            "stats did not settle within {limit:?}: {stats:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic test data: `len` bytes derived from `seed`.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Serves one echo per connection: reads until EOF, writes it all back, closes.
pub(crate) async fn echo_until_eof<S>(mut stream: S) -> std::io::Result<usize>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    stream.read_to_end(&mut data).await?;
    stream.write_all(&data).await?;
    stream.shutdown().await?;
    Ok(data.len())
}

/// The TCP header fields of an IPv4 packet: (seq, ack, flags, payload length).
pub(crate) fn tcp_fields(p: &[u8]) -> Option<(u32, u32, u8, usize)> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let tcp = p.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let offset = usize::from(tcp[12] >> 4) * 4;
    Some((seq, ack, tcp[13], tcp.len().saturating_sub(offset)))
}

/// A minimal IPv4 + TCP segment (checksums left zero unless `fix_checksums`).
pub(crate) struct Segment {
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) payload: Vec<u8>,
}

pub(crate) const SYN: u8 = 0x02;
pub(crate) const RST: u8 = 0x04;
pub(crate) const ACK: u8 = 0x10;

impl Segment {
    pub(crate) fn build(&self, fix_checksums: bool) -> Vec<u8> {
        let total = 40 + self.payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&self.src.ip().octets());
        p[16..20].copy_from_slice(&self.dst.ip().octets());
        p[20..22].copy_from_slice(&self.src.port().to_be_bytes());
        p[22..24].copy_from_slice(&self.dst.port().to_be_bytes());
        p[24..28].copy_from_slice(&self.seq.to_be_bytes());
        p[28..32].copy_from_slice(&self.ack.to_be_bytes());
        p[32] = 0x50;
        p[33] = self.flags;
        p[34..36].copy_from_slice(&65535u16.to_be_bytes());
        p[40..].copy_from_slice(&self.payload);
        if fix_checksums {
            let ip = checksum(&[&p[..20]]);
            p[10..12].copy_from_slice(&ip.to_be_bytes());
            let mut pseudo = [0u8; 12];
            pseudo[..4].copy_from_slice(&self.src.ip().octets());
            pseudo[4..8].copy_from_slice(&self.dst.ip().octets());
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&((total - 20) as u16).to_be_bytes());
            let tcp = checksum(&[&pseudo, &p[20..]]);
            p[36..38].copy_from_slice(&tcp.to_be_bytes());
        } else {
            p[10..12].copy_from_slice(&0xdeadu16.to_be_bytes());
            p[36..38].copy_from_slice(&0xbeefu16.to_be_bytes());
        }
        p
    }
}

pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
