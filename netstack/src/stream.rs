//! The application side of connections: [`TcpStream`] and [`TcpListener`].
//!
//! A stream and the driver share one [`StreamShared`]: a bounded byte queue per direction, the
//! way each direction ended, and the wakers. The stream fills `tx` and drains `rx`; the driver
//! moves bytes between these queues and the smoltcp socket buffers.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::{Command, ConnId, ConnectError, Link, Registered};

/// How one direction of a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The peer sent FIN and every byte before it was delivered.
    Eof,
    /// The connection was reset (RST from the peer, the peer stopped answering, or this stack
    /// aborted it).
    Reset,
    /// The driver stopped.
    StackClosed,
}

impl End {
    fn error(self) -> io::Error {
        match self {
            End::Eof | End::Reset => io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset (RST from the peer, or the peer stopped answering)",
            ),
            End::StackClosed => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the userspace network stack has stopped",
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shutdown {
    Open,
    /// `poll_shutdown` was called; FIN goes out once `tx` is drained.
    Requested,
    /// The FIN is queued in the socket.
    Done,
}

pub(crate) struct StreamShared {
    pub(crate) id: ConnId,
    pub(crate) state: Mutex<StreamState>,
}

pub(crate) struct StreamState {
    /// Received bytes not yet read by the application.
    pub(crate) rx: VecDeque<u8>,
    pub(crate) rx_capacity: usize,
    pub(crate) rx_end: Option<End>,
    /// The driver holds more received data than fits into `rx`: reading must wake it.
    pub(crate) rx_blocked: bool,
    /// Written bytes not yet moved into the socket.
    pub(crate) tx: VecDeque<u8>,
    pub(crate) tx_capacity: usize,
    pub(crate) tx_error: Option<End>,
    pub(crate) shutdown: Shutdown,
    /// The stream was dropped: close gracefully, discard what arrives.
    pub(crate) dropped: bool,
    /// Abort (RST) instead of closing gracefully.
    pub(crate) abort: bool,
    /// The id is in the driver's dirty list already.
    pub(crate) queued: bool,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
}

impl StreamShared {
    pub(crate) fn new(id: ConnId, queue_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(StreamState {
                rx: VecDeque::new(),
                rx_capacity: queue_capacity,
                rx_end: None,
                rx_blocked: false,
                tx: VecDeque::new(),
                tx_capacity: queue_capacity,
                tx_error: None,
                shutdown: Shutdown::Open,
                dropped: false,
                abort: false,
                queued: false,
                read_waker: None,
                write_waker: None,
            }),
        })
    }

    /// The connection is gone from the driver: settle both directions (keeping what is
    /// already queued for reading) and wake the application.
    pub(crate) fn detach(&self, end: End) {
        let mut st = self.state.lock();
        if st.rx_end.is_none() {
            st.rx_end = Some(end);
        }
        if st.tx_error.is_none() && st.shutdown != Shutdown::Done {
            st.tx_error = Some(end);
        }
        st.tx.clear();
        let wakers = (st.read_waker.take(), st.write_waker.take());
        drop(st);
        wake(wakers);
    }
}

impl StreamState {
    /// Marks the stream for the driver's attention; true if the caller must schedule it.
    fn request_service(&mut self) -> bool {
        !std::mem::replace(&mut self.queued, true)
    }
}

pub(crate) fn wake((read, write): (Option<Waker>, Option<Waker>)) {
    if let Some(w) = read {
        w.wake();
    }
    if let Some(w) = write {
        w.wake();
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A TCP connection of the userspace stack.
///
/// `poll_shutdown` sends FIN once everything written before it is in the socket (half-close:
/// reading continues until the peer's FIN, which reads as EOF). `poll_flush` waits until written
/// bytes have been handed to the socket (not until the peer acknowledged them). Dropping the
/// stream closes gracefully: written data is still delivered, then FIN; a connection that has
/// not finished closing after 60 s is aborted with RST. A reset connection fails reads and
/// writes with `ConnectionReset`; a stopped stack with `ConnectionAborted`.
pub struct TcpStream {
    shared: Arc<StreamShared>,
    link: Arc<Link>,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl TcpStream {
    pub(crate) fn new(
        shared: Arc<StreamShared>,
        link: Arc<Link>,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Self {
        Self {
            shared,
            link,
            local,
            peer,
        }
    }

    /// The remote end of the connection.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    /// This stack's end of the connection.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Drop with RST instead of a graceful close (used when nobody will accept it).
    pub(crate) fn abort_on_drop(&self) {
        self.shared.state.lock().abort = true;
    }

    fn schedule(&self) {
        self.link.wake.schedule(self.shared.id);
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut st = this.shared.state.lock();
        if !st.rx.is_empty() {
            let n = buf.remaining().min(st.rx.len());
            let (front, back) = st.rx.as_slices();
            let from_front = n.min(front.len());
            buf.put_slice(&front[..from_front]);
            buf.put_slice(&back[..n - from_front]);
            st.rx.drain(..n);
            let schedule = st.rx_blocked && st.request_service();
            drop(st);
            if schedule {
                this.schedule();
            }
            return Poll::Ready(Ok(()));
        }
        match st.rx_end {
            Some(End::Eof) => Poll::Ready(Ok(())),
            Some(end) => Poll::Ready(Err(end.error())),
            None => {
                register(&mut st.read_waker, cx);
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.shared.state.lock();
        if let Some(end) = st.tx_error {
            return Poll::Ready(Err(end.error()));
        }
        if st.shutdown != Shutdown::Open {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = st.tx_capacity.saturating_sub(st.tx.len());
        if room == 0 {
            register(&mut st.write_waker, cx);
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        st.tx.extend(&buf[..n]);
        let schedule = st.request_service();
        drop(st);
        if schedule {
            this.schedule();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.state.lock();
        if st.tx.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(end) = st.tx_error {
            return Poll::Ready(Err(end.error()));
        }
        register(&mut st.write_waker, cx);
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.shared.state.lock();
        if st.shutdown == Shutdown::Done {
            return Poll::Ready(Ok(()));
        }
        if let Some(end) = st.tx_error {
            return Poll::Ready(Err(end.error()));
        }
        register(&mut st.write_waker, cx);
        let schedule = if st.shutdown == Shutdown::Open {
            st.shutdown = Shutdown::Requested;
            st.request_service()
        } else {
            false
        };
        drop(st);
        if schedule {
            this.schedule();
        }
        Poll::Pending
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.dropped = true;
        st.read_waker = None;
        st.write_waker = None;
        let schedule = st.request_service();
        drop(st);
        if schedule {
            self.schedule();
        }
    }
}

/// Accepts TCP connections on one port. Dropping it stops listening: later SYNs are refused
/// (RST) and connections not yet accepted are closed.
pub struct TcpListener {
    port: u16,
    id: u64,
    accepted: mpsc::Receiver<(TcpStream, SocketAddrV4)>,
    link: Arc<Link>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TcpListener {
    pub(crate) fn new(registered: Registered, link: Arc<Link>) -> Self {
        Self {
            port: registered.port,
            id: registered.id,
            accepted: registered.accepted,
            link,
        }
    }

    /// The next established connection and its peer's address. Fails only with
    /// [`ConnectError::StackClosed`].
    pub async fn accept(&mut self) -> Result<(TcpStream, SocketAddrV4), ConnectError> {
        self.accepted.recv().await.ok_or(ConnectError::StackClosed)
    }

    /// The port this listener accepts on.
    pub fn local_port(&self) -> u16 {
        self.port
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        // If the driver is gone there is nothing left to stop.
        let _ = self.link.commands.send(Command::Unlisten {
            port: self.port,
            id: self.id,
        });
    }
}
