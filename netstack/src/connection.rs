//! One established connection on the driver's side: moves bytes between its smoltcp socket and
//! its stream's queues (no more unacknowledged than the flight cap allows, the receive window
//! kept aligned), turns the socket's state into EOF, resets and wake-ups for the stream, and
//! closes it (FIN, TIME-WAIT, the linger of a dropped stream).
//!
//! It does not dial, accept or free sockets: the driver hands it an established socket, looks
//! up the socket for every round of service, and acts on the [`Verdict`].

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use smoltcp::socket::tcp;
use tokio::time::Instant;
use tracing::debug;

use crate::clock::smol_duration;
use crate::flight::Flight;
use crate::stream::{self, End, Shutdown, StreamShared, StreamState};
use crate::{Config, ConnId, Counters, Link, TcpStream};

/// The flight cap of a connection never goes below this (bytes): on a fast path nearby, whose
/// bandwidth-delay product is smaller, this much in flight keeps it busy without overflowing
/// a WireGuard device's socket. See `flight.rs`.
const FLIGHT_FLOOR: usize = 64 * 1024;
/// A dropped stream that has not finished closing after this long is aborted (RST).
const CLOSE_LINGER: Duration = Duration::from_secs(60);
/// How long a connection we closed first stays in TIME-WAIT (smoltcp would keep it 10 s): long
/// enough for the final ACK to leave and to answer one retransmitted FIN.
const TIME_WAIT: Duration = Duration::from_secs(2);
/// Bytes queued between a stream and its socket, per direction (the socket buffers hold the
/// TCP window; these only decouple the application from the driver).
const APP_QUEUE: usize = 64 * 1024;
/// How far a stream's receive queue may exceed its capacity to keep the window aligned (see
/// `rx_take`).
const ALIGN_OVERFLOW: usize = 4 * 1024;

/// What servicing decided about a connection.
pub(crate) enum Verdict {
    Keep,
    /// Wait for the RST to be sent, then reap.
    Closing,
    Reap,
}

/// A TCP socket with `buffer` bytes each way, set up as every connection of the stack is
/// (dialed, or a listening slot that will take a SYN).
pub(crate) fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    // The application decides when to write; forwarding keystrokes must not wait for ACKs.
    socket.set_nagle_enabled(false);
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    socket
}

/// An established connection's state on the driver's side.
pub(crate) struct Connection {
    shared: Arc<StreamShared>,
    fin_queued: bool,
    /// When a dropped stream's connection is reset if it has not closed by then.
    linger: Option<Instant>,
    /// When the connection leaves TIME-WAIT.
    time_wait: Option<Instant>,
    /// How much of the stream may be unacknowledged.
    flight: Flight,
}

impl Connection {
    /// An established socket gets its stream: the connection's driver side and the
    /// [`TcpStream`] for the application.
    pub(crate) fn establish(
        id: ConnId,
        socket: &mut tcp::Socket<'_>,
        link: Arc<Link>,
        config: &Config,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> (Box<Self>, TcpStream) {
        // smoltcp aborts a socket whose peer has been silent for the timeout, even an idle
        // one: only with keep-alives does silence mean the peer is gone.
        let keep_alive = config.keep_alive.map(smol_duration);
        socket.set_keep_alive(keep_alive);
        socket.set_timeout(keep_alive.map(|_| smol_duration(config.peer_timeout)));
        let shared = StreamShared::new(id, APP_QUEUE.min(config.tcp_buffer));
        let stream = TcpStream::new(shared.clone(), link, local, remote);
        let connection = Box::new(Self {
            shared,
            fin_queued: false,
            linger: None,
            time_wait: None,
            flight: Flight::new(
                FLIGHT_FLOOR,
                config.tcp_buffer,
                config.mtu.saturating_sub(40),
            ),
        });
        (connection, stream)
    }

    /// The handshake of a dialed connection took `handshake`: a first round trip, unless the
    /// SYN had to be sent again (smoltcp waits at least 1 s for that).
    pub(crate) fn handshake_took(&mut self, handshake: Duration, now: Instant) {
        if handshake < Duration::from_secs(1) {
            self.flight.round_trip(handshake, now);
        }
    }

    /// When the driver must look at this connection again at the latest (the end of a dropped
    /// stream's linger, or of TIME-WAIT).
    pub(crate) fn deadlines(&self) -> impl Iterator<Item = Instant> {
        [self.linger, self.time_wait].into_iter().flatten()
    }

    /// The connection is gone from the driver: settle the stream (see
    /// [`StreamShared::detach`]).
    pub(crate) fn detach(&self, end: End) {
        self.shared.detach(end);
    }

    /// Brings the connection up to date with its socket and its stream: the application's
    /// bytes into the socket and the socket's into the application, FIN when the stream is
    /// done writing, and how each direction ended. A connection to reap has its stream
    /// detached already.
    pub(crate) fn service(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        now: Instant,
        window_align: usize,
        counters: &Counters,
    ) -> Verdict {
        self.flight.acked(socket.send_queue(), now);
        let mut st = self.shared.state.lock();
        st.queued = false;

        if st.abort {
            socket.abort();
            st.rx_end.get_or_insert(End::Reset);
            st.tx_error.get_or_insert(End::Reset);
            st.tx.clear();
            let wakers = (st.read_waker.take(), st.write_waker.take());
            drop(st);
            stream::wake(wakers);
            Counters::add(&counters.aborted, 1);
            return Verdict::Closing;
        }

        let mut wake_write = transmit(&mut st, &mut self.flight, &mut self.fin_queued, socket, now);
        let wake_read = receive(&mut st, socket, window_align);

        let state = socket.state();
        if state == tcp::State::Closed && !self.fin_queued && st.tx_error.is_none() {
            st.tx_error = Some(End::Reset);
            st.tx.clear();
            wake_write = true;
        }

        let mut verdict = match state {
            tcp::State::Closed if socket.remote_endpoint().is_none() && !socket.can_recv() => {
                Verdict::Reap
            }
            tcp::State::TimeWait if !socket.can_recv() => {
                if now >= *self.time_wait.get_or_insert(now + TIME_WAIT) {
                    Verdict::Reap
                } else {
                    Verdict::Keep
                }
            }
            _ => Verdict::Keep,
        };
        if st.dropped && matches!(verdict, Verdict::Keep) {
            let deadline = *self.linger.get_or_insert(now + CLOSE_LINGER);
            if now >= deadline {
                debug!("netstack: connection did not finish closing in time, resetting");
                socket.abort();
                Counters::add(&counters.aborted, 1);
                verdict = Verdict::Closing;
            }
        }
        let wakers = (
            if wake_read {
                st.read_waker.take()
            } else {
                None
            },
            if wake_write {
                st.write_waker.take()
            } else {
                None
            },
        );
        drop(st);
        stream::wake(wakers);
        if let Verdict::Reap = verdict {
            self.shared.detach(End::Reset);
        }
        verdict
    }
}

/// Application -> socket, as far as the flight cap allows, then FIN once the stream is done
/// writing. True if the writer must be woken.
fn transmit(
    st: &mut StreamState,
    flight: &mut Flight,
    fin_queued: &mut bool,
    socket: &mut tcp::Socket<'_>,
    now: Instant,
) -> bool {
    let mut wake_write = false;
    let queued = socket.send_queue();
    let room = flight.room(queued);
    if !st.tx.is_empty() && room > 0 && socket.may_send() {
        let (front, back) = st.tx.as_slices();
        let front = &front[..front.len().min(room)];
        let mut moved = socket.send_slice(front).unwrap_or(0);
        if moved == front.len() && moved < room && !back.is_empty() {
            let back = &back[..back.len().min(room - moved)];
            moved += socket.send_slice(back).unwrap_or(0);
        }
        if moved > 0 {
            st.tx.drain(..moved);
            flight.wrote(moved, queued, now);
            wake_write = true;
        }
    }
    let closing = st.dropped || st.shutdown == Shutdown::Requested;
    if closing && st.tx.is_empty() && !*fin_queued && socket.state() != tcp::State::Closed {
        socket.close();
        *fin_queued = true;
        if st.shutdown == Shutdown::Requested {
            st.shutdown = Shutdown::Done;
            wake_write = true;
        }
    }
    wake_write
}

/// Socket -> application (or discarded, if the stream was dropped), then the end of the
/// receiving direction (EOF or reset). True if the reader must be woken.
fn receive(st: &mut StreamState, socket: &mut tcp::Socket<'_>, window_align: usize) -> bool {
    let mut wake_read = false;
    if st.dropped {
        // Nobody reads any more: discard, so that the window stays open and the peer's
        // FIN can arrive.
        while socket.can_recv() {
            if !matches!(socket.recv(|data| (data.len(), data.len())), Ok(n) if n > 0) {
                break;
            }
        }
    } else {
        let want = rx_take(
            socket.recv_queue(),
            st.rx.len(),
            st.rx_capacity,
            window_align,
        );
        let mut moved_total = 0;
        while moved_total < want {
            let left = want - moved_total;
            let rx = &mut st.rx;
            match socket.recv(|data| {
                let n = data.len().min(left);
                rx.extend(&data[..n]);
                (n, n)
            }) {
                Ok(n) if n > 0 => moved_total += n,
                _ => break,
            }
        }
        st.rx_blocked = socket.can_recv();
        if moved_total > 0 {
            wake_read = true;
        }
    }
    if st.rx_end.is_none() && !socket.can_recv() {
        match socket.recv(|_| (0, ())) {
            Err(tcp::RecvError::Finished) => {
                st.rx_end = Some(End::Eof);
                wake_read = true;
            }
            Err(tcp::RecvError::InvalidState) if socket.state() == tcp::State::Closed => {
                st.rx_end = Some(End::Reset);
                wake_read = true;
            }
            _ => {}
        }
    }
    wake_read
}

/// How many received bytes to move from a socket holding `queued` bytes into a stream queue
/// holding `app_len` of `app_capacity`.
///
/// As many as fit, and then some: smoltcp advertises its window in units of `align` bytes,
/// rounded down. When the socket's free space is not a multiple of the unit, the advertised
/// right edge moves left (the window "shrinks"), a smoltcp peer may hold data beyond our
/// window, and once our window is zero we ignore its ACKs (smoltcp drops the ACK field of
/// segments outside the window) while it never rewinds: both ends stall for good. Taking the
/// few bytes that keep the free space a multiple of `align` (the socket capacity is one)
/// prevents that; the stream queue may exceed its capacity by up to `ALIGN_OVERFLOW` for it.
fn rx_take(queued: usize, app_len: usize, app_capacity: usize, align: usize) -> usize {
    let fits = app_capacity.saturating_sub(app_len).min(queued);
    let misaligned = (queued - fits) % align.max(1);
    if app_len + fits + misaligned <= app_capacity + ALIGN_OVERFLOW {
        fits + misaligned
    } else {
        fits
    }
}

/// The unit in which smoltcp advertises a receive window of `capacity` bytes: it scales the
/// window by as many bits as the capacity needs beyond 16.
pub(crate) fn window_granularity(capacity: usize) -> usize {
    let bits = usize::BITS - capacity.leading_zeros();
    1 << bits.saturating_sub(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_take_keeps_the_socket_free_space_aligned() {
        let align = 8;
        for queued in 0..200 {
            for app_len in [0, 1, 50, 99, 100, 101, 150, 100 + ALIGN_OVERFLOW - 3] {
                let take = rx_take(queued, app_len, 100, align);
                assert!(take <= queued);
                assert!(
                    take >= 100usize.saturating_sub(app_len).min(queued),
                    "fills the queue"
                );
                assert!(
                    app_len + take <= (100 + ALIGN_OVERFLOW).max(app_len),
                    "bounded"
                );
                if app_len + take + align <= 100 + ALIGN_OVERFLOW {
                    assert_eq!(
                        (queued - take) % align,
                        0,
                        "queued {queued} app_len {app_len}"
                    );
                }
            }
        }
        // Without window scaling nothing extra is taken.
        assert_eq!(rx_take(1000, 100, 100, 1), 0);
        assert_eq!(rx_take(1000, 0, 100, 1), 100);
    }

    #[test]
    fn window_granularity_matches_smoltcp_window_scaling() {
        for capacity in [4096, 65535, 65536, 131071, 256 * 1024, 300_000] {
            let align = window_granularity(capacity);
            // smoltcp keeps the shift private; its Debug output shows it.
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; capacity]),
                tcp::SocketBuffer::new(vec![0u8; 1]),
            );
            let shift = align.trailing_zeros();
            assert!(
                format!("{socket:?}").contains(&format!("remote_win_shift: {shift},")),
                "capacity {capacity}: expected shift {shift}"
            );
        }
    }
}
