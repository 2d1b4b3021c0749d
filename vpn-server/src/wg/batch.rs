//! The netstack's datagrams, sent in batches. A run of equal-size datagrams to one device (a
//! TCP stream's full segments, encrypted) goes out as one `sendmsg` with UDP segmentation
//! offload (`UDP_SEGMENT`, Linux 4.18): the kernel walks its UDP, IP and routing path once per
//! run instead of once per datagram, and the device receives the same datagrams as before.
//!
//! Measured before this: 53% of the server's CPU time, during a transfer to one device, was
//! inside `sendto`. Kernels before 4.18 do not know `UDP_SEGMENT` (they would ignore it and
//! send one oversized datagram), so there the batch never segments. Where the kernel refuses a
//! segmented send for good (a route through a device without checksum offload), the batch says
//! so once and sends datagram by datagram from then on; other refusals (a path MTU below the
//! segment) send that run datagram by datagram.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::OnceLock;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// Most segments the kernel takes in one send (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one UDP payload over IPv4 (65,535 minus the IP and UDP headers).
const MAX_PAYLOAD: usize = 65_507;

/// Datagrams waiting to be sent: one run at a time (same destination, all the size of the
/// first but the last, which may be shorter).
#[derive(Debug)]
pub struct SendBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// The run ended with a shorter datagram: nothing more joins it.
    closed: bool,
    /// Segmentation offload works (until the kernel says otherwise).
    gso: bool,
    stats: BatchStats,
}

/// What a batch did, for tests and debugging.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Datagrams handed to the kernel.
    pub datagrams: u64,
    /// System calls that sent them.
    pub sends: u64,
    /// Datagrams the kernel did not take (a full socket buffer): dropped, as UDP would.
    pub dropped: u64,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(MAX_PAYLOAD),
            to: None,
            segment: 0,
            count: 0,
            closed: false,
            gso: kernel_segments_udp(),
            stats: BatchStats::default(),
        }
    }

    /// A batch that never uses segmentation offload (what it falls back to).
    pub fn without_offload() -> Self {
        Self {
            gso: false,
            ..Self::new()
        }
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Whether runs still go out with segmentation offload.
    pub fn offloading(&self) -> bool {
        self.gso
    }

    /// Adds a datagram for `to`; sends the run before it when this one cannot join it.
    pub fn push(&mut self, socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
        let joins = self.gso
            && self.count > 0
            && self.to == Some(to)
            && !self.closed
            && datagram.len() <= self.segment
            && self.count < MAX_SEGMENTS
            && self.buf.len() + datagram.len() <= MAX_PAYLOAD;
        if !joins {
            self.flush(socket);
            self.to = Some(to);
            self.segment = datagram.len();
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        if datagram.len() < self.segment {
            self.closed = true;
        }
    }

    /// Sends what is waiting.
    pub fn flush(&mut self, socket: &UdpSocket) {
        if self.count == 0 {
            return;
        }
        if let Some(to) = self.to {
            if self.count > 1 && self.gso {
                match send_segmented(socket, to, &self.buf, self.segment) {
                    Ok(()) => {
                        self.stats.sends += 1;
                        self.stats.datagrams += self.count as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        debug!(%to, datagrams = self.count, "socket buffer full; datagrams dropped");
                        self.stats.dropped += self.count as u64;
                    }
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                        ) =>
                    {
                        warn!(
                            error = %e,
                            "UDP segmentation offload refused; sending datagrams one by one"
                        );
                        self.gso = false;
                        self.send_one_by_one(socket, to);
                    }
                    Err(e) => {
                        debug!(%to, error = %e, "segmented send refused; this run one by one");
                        self.send_one_by_one(socket, to);
                    }
                }
            } else {
                self.send_one_by_one(socket, to);
            }
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.to = None;
    }

    fn send_one_by_one(&mut self, socket: &UdpSocket, to: SocketAddr) {
        for datagram in self.buf.chunks(self.segment.max(1)) {
            self.stats.sends += 1;
            match socket.try_send_to(datagram, to) {
                Ok(_) => self.stats.datagrams += 1,
                Err(e) => {
                    // UDP: a full send buffer drops, as the kernel would.
                    debug!(%to, error = %e, "datagram not sent");
                    self.stats.dropped += 1;
                }
            }
        }
    }
}

/// Whether the running kernel knows `UDP_SEGMENT` (Linux 4.18 or later).
fn kernel_segments_udp() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        release_segments_udp(&release)
    })
}

fn release_segments_udp(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (4, 18),
        _ => false,
    }
}

/// One `sendmsg` of `buf` to `to`, cut by the kernel into datagrams of `segment` bytes.
fn send_segmented(
    socket: &UdpSocket,
    to: SocketAddr,
    buf: &[u8],
    segment: usize,
) -> io::Result<()> {
    let segment = u16::try_from(segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment over 64 KiB"))?;
    let addr = socket2::SockAddr::from(to);
    let fd = socket.as_raw_fd();
    socket.try_io(Interest::WRITABLE, || {
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        // u64s keep the control buffer aligned for `cmsghdr`.
        let mut control = [0u64; 4];
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_ptr().cast_mut().cast();
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
        // SAFETY: `msg` points to `control`, which has room for one cmsghdr carrying a u16
        // (32 bytes >= CMSG_SPACE(2)), so CMSG_FIRSTHDR is non-null and in bounds; the data is
        // written unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
        // SAFETY: `fd` is the socket's open descriptor; `msg` and everything it points to
        // (address, iovec over `buf`, control) live until the call returns.
        let sent = unsafe { libc::sendmsg(fd, &msg, 0) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    async fn receiver() -> (UdpSocket, SocketAddr) {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    async fn receive(socket: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        for _ in 0..n {
            let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
                .await
                .expect("a datagram did not arrive")
                .unwrap();
            got.push(buf[..len].to_vec());
        }
        got
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    /// 40 full datagrams and a short one, as a TCP stream's segments would be, to one device,
    /// then one to another device.
    async fn send_a_stream(batch: &mut SendBatch) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        // tokio's try_* calls see the socket as writable once the reactor has said so.
        sender.writable().await.unwrap();
        let (a, a_addr) = receiver().await;
        let (b, b_addr) = receiver().await;
        let mut sent: Vec<Vec<u8>> = (0..40).map(|i| datagram(i, 1456)).collect();
        sent.push(datagram(40, 92));
        for d in &sent {
            batch.push(&sender, a_addr, d);
        }
        let other = datagram(99, 1456);
        batch.push(&sender, b_addr, &other);
        batch.flush(&sender);
        (sent, receive(&a, 41).await, receive(&b, 1).await)
    }

    #[tokio::test]
    async fn a_run_goes_out_in_one_send_and_arrives_as_the_same_datagrams() {
        let mut batch = SendBatch::new();
        let (sent, got_a, got_b) = send_a_stream(&mut batch).await;
        assert_eq!(
            got_a, sent,
            "the device must receive exactly the datagrams, in order"
        );
        assert_eq!(got_b, vec![datagram(99, 1456)]);
        assert!(
            batch.offloading(),
            "this kernel refused UDP_SEGMENT on loopback (Linux 4.18 or later has it)"
        );
        // One send for the 41 datagrams to the first device, one for the other device.
        assert_eq!(
            batch.stats(),
            BatchStats {
                datagrams: 42,
                sends: 2,
                dropped: 0
            }
        );
    }

    #[tokio::test]
    async fn without_offload_the_same_datagrams_go_one_by_one() {
        let mut batch = SendBatch::without_offload();
        let (sent, got_a, got_b) = send_a_stream(&mut batch).await;
        assert_eq!(got_a, sent);
        assert_eq!(got_b, vec![datagram(99, 1456)]);
        assert_eq!(batch.stats().sends, 42);
    }

    #[test]
    fn segmentation_needs_linux_4_18() {
        for (release, has) in [
            ("6.18.0-1-amd64\n", true),
            ("4.19.0-27-amd64", true),
            ("4.18.0", true),
            ("5.4", true),
            ("4.17.3", false),
            ("3.10.0-1160.el7.x86_64", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(release_segments_udp(release), has, "{release:?}");
        }
    }

    #[tokio::test]
    async fn a_longer_datagram_or_a_full_run_starts_a_new_run() {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        // tokio's try_* calls see the socket as writable once the reactor has said so.
        sender.writable().await.unwrap();
        let (a, a_addr) = receiver().await;
        let mut batch = SendBatch::new();
        // A short one first (a keepalive or an ACK), then 70 full ones: the short one cannot
        // lead a run of longer ones, and a run holds at most 65,507 bytes (44 of 1,456).
        let mut sent = vec![datagram(0, 32)];
        sent.extend((1..=70).map(|i| datagram(i, 1456)));
        for d in &sent {
            batch.push(&sender, a_addr, d);
        }
        batch.flush(&sender);
        assert_eq!(receive(&a, sent.len()).await, sent);
        // 32 alone; then 44 + 26.
        assert_eq!(batch.stats().sends, 3);
        // A run holds at most 64 segments: 100 small ones go in 64 + 36.
        let small: Vec<Vec<u8>> = (0..100).map(|i| datagram(i, 200)).collect();
        for d in &small {
            batch.push(&sender, a_addr, d);
        }
        batch.flush(&sender);
        assert_eq!(receive(&a, small.len()).await, small);
        assert_eq!(batch.stats().sends, 5);
        // Nothing is left over for a later flush.
        batch.flush(&sender);
        assert_eq!(batch.stats().sends, 5);
        assert_eq!(batch.stats().dropped, 0);
    }
}
