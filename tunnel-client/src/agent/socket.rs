//! The agent's WireGuard UDP socket, with buffers that hold a burst from the server.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;

use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// Asked for in each direction. The server keeps up to 256 KiB of a TCP stream in flight per
/// connection (more on a long path) and sends it as fast as it can encrypt: the kernel's
/// default receive buffer (`net.core.rmem_default`, 208 KiB of *memory*, about 50 datagrams
/// over a veth) drops part of a 256 KiB burst, and each drop costs the operator's transfer a
/// retransmission. wireguard-go asks for 7 MiB for the same reason.
const BUFFER: libc::c_int = 8 << 20;

/// Below this, the agent says that bursts will be dropped.
const WARN_BELOW: usize = 1 << 20;

/// An unconnected IPv4 UDP socket on an ephemeral port.
pub(super) fn wireguard_socket() -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    grow_buffers(&socket);
    let got = socket2::SockRef::from(&socket)
        .recv_buffer_size()
        .unwrap_or(0);
    if got < WARN_BELOW {
        warn!(
            bytes = got,
            "the WireGuard socket's receive buffer is small (raise net.core.rmem_max, or run \
             with CAP_NET_ADMIN): bursts from the server will be dropped and retransmitted"
        );
    } else {
        debug!(bytes = got, "WireGuard socket receive buffer");
    }
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Asks for `BUFFER` bytes each way: past `net.core.{r,w}mem_max` with `SO_*BUFFORCE` where
/// the agent may (CAP_NET_ADMIN, which it has when it manages a kernel interface), else up
/// to those limits. Failure only costs speed, so it is not an error.
fn grow_buffers(socket: &std::net::UdpSocket) {
    let fd = socket.as_raw_fd();
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    let value = (&BUFFER as *const libc::c_int).cast::<libc::c_void>();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: `fd` is an open socket owned by `socket`, which outlives the calls; `value`
        // points to a live c_int and `len` is its size.
        let forced = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, force, value, len) } == 0;
        if !forced {
            // SAFETY: as above.
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, plain, value, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_gets_more_than_the_default_buffers() {
        let plain = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let plain = socket2::SockRef::from(&plain);
        let ours = wireguard_socket().unwrap();
        let ours = socket2::SockRef::from(&ours);
        // Without privileges the kernel still doubles what it grants up to rmem_max, so even
        // then the buffer is larger than a socket that asked for nothing.
        let (rcv, snd) = (
            ours.recv_buffer_size().unwrap(),
            ours.send_buffer_size().unwrap(),
        );
        assert!(
            rcv > plain.recv_buffer_size().unwrap(),
            "receive buffer {rcv}"
        );
        assert!(snd > plain.send_buffer_size().unwrap(), "send buffer {snd}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(rcv >= BUFFER as usize, "root got only {rcv} bytes");
        }
    }
}
