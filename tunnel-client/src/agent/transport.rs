//! Which transport carries the WireGuard datagrams, UDP or a TLS stream to the server's HTTPS
//! port ([`super::wg_tls`]), and the stream's life: when to open it, when to give it up, when
//! to look whether UDP works again.
//!
//! No sockets, no clock: the shell reports what happened (`handle_*`, with `now`) and asks
//! what to do (`poll_action`, `poll_event`, `poll_timeout`), as with [`super::link`], which
//! still decides *when* attempts are made; this decides *where* they go.
//!
//! The rules (`--transport auto`):
//! - Attempts go over UDP first. When every UDP endpoint got no answer (with one endpoint,
//!   after one unanswered attempt; with several, after one round, so that a dead node is
//!   left for the next one, not for TLS), the next attempt goes over TLS; when every server
//!   got no answer over TLS, back to UDP: a network that changed is found within a round of
//!   each, and the link's backoff paces both.
//! - An authenticated packet over UDP while on TLS (an answer to a UDP probe) moves the
//!   session back to UDP; the stream stays open [`STREAM_GRACE`] longer for datagrams
//!   already on their way, then closes.
//! - While the session is up over TLS, a probe goes out over UDP every `udp_probe_every`: a
//!   handshake initiation. The server answers an initiation where it came from but moves
//!   the session's endpoint only on authenticated packets, so a probe never takes the
//!   session away from the stream; its answer comes over UDP only when UDP works both ways.
//!   Unanswered, boringtun sends the initiation again after 5 s over what carries the
//!   datagrams, the stream: the session goes on there with new keys.
//! - A session that dies starts again from UDP.
//! - A stream is opened when an attempt needs it, or, while the session is up over TLS, again
//!   after it broke: after a full-jitter backoff that grows with each stream that fails
//!   before carrying an authenticated packet, so a server that refuses the device (or a
//!   proxy that cuts streams) is not hammered.
//!
//! `--transport udp` never opens a stream; `--transport tls` never uses UDP.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;

use super::backoff::Backoff;
use super::config::TransportChoice;

/// How long a stream stays open after the session moved back to UDP.
pub const STREAM_GRACE: Duration = Duration::from_secs(5);

/// The default of `udp_probe_every`.
pub const UDP_PROBE_EVERY: Duration = Duration::from_secs(180);

/// The shortest `udp_probe_every`: a probe's handshake must be over (answered, or sent
/// again over the stream after WireGuard's 5 s REKEY_TIMEOUT and answered there) before the
/// next probe starts another. Probes that kept a handshake in progress for 90 s would make
/// boringtun drop the session (REKEY_ATTEMPT_TIME).
pub const MIN_UDP_PROBE_EVERY: Duration = Duration::from_secs(10);

/// What carries the datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tls,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tls => "tls",
        })
    }
}

/// Settings of the selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportParams {
    pub choice: TransportChoice,
    /// While on TLS (auto), how often UDP is tried again.
    pub udp_probe_every: Duration,
    /// Delays before a broken stream is opened again.
    pub stream_backoff: Backoff,
}

impl TransportParams {
    /// Streams are reopened with the link's backoff: 1 s base, `backoff_cap` at most.
    pub fn new(choice: TransportChoice, udp_probe_every: Duration, backoff_cap: Duration) -> Self {
        Self {
            choice,
            udp_probe_every: udp_probe_every.max(MIN_UDP_PROBE_EVERY),
            stream_backoff: Backoff::new(Duration::from_secs(1).min(backoff_cap), backoff_cap),
        }
    }
}

/// The stream's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// None, and none wanted until an attempt needs one.
    Closed,
    /// Broken while the session was up over TLS: opened again at `until`.
    Waiting { until: Instant },
    /// Being opened (TCP, proxy, TLS, upgrade).
    Opening,
    /// Open; `proven` once an authenticated packet came over it.
    Open { proven: bool },
}

/// Where the initiation of an attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptVia {
    /// The UDP socket, to the endpoint the rotation picks.
    Udp,
    /// The open stream.
    Stream,
    /// The stream, once it is open: [`TransportAction::SendInitiation`] or
    /// [`TransportAction::AttemptFailed`] follows.
    StreamWhenOpen,
}

/// What the shell should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportAction {
    /// Open a stream, then report [`TransportSelector::handle_stream_opened`] or
    /// [`TransportSelector::handle_stream_failed`].
    OpenStream,
    /// Close the stream (datagrams on their way over it are lost).
    CloseStream,
    /// Send the waiting attempt's handshake initiation over the stream that just opened.
    SendInitiation,
    /// The waiting attempt could not get a stream: it failed (tell the link).
    AttemptFailed,
    /// Send a keepalive over the stream that just opened: the server learns that the
    /// session goes on there.
    StreamKeepalive,
    /// Send a handshake initiation over UDP.
    ProbeUdp,
}

/// What happened, for logs and the status file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportEvent {
    /// Datagrams go over `to` from now on.
    Switched { to: Transport, why: &'static str },
}

/// The transport selector. See the module documentation for its rules.
#[derive(Debug)]
pub struct TransportSelector {
    params: TransportParams,
    current: Transport,
    stream: StreamState,
    /// Streams that failed or broke since one carried an authenticated packet.
    stream_failures: u32,
    /// An attempt waits for the stream to open.
    attempt_waiting: bool,
    link_up: bool,
    next_udp_probe: Option<Instant>,
    /// The stream closes then (the session moved back to UDP).
    close_stream_at: Option<Instant>,
    actions: VecDeque<TransportAction>,
    events: VecDeque<TransportEvent>,
}

impl TransportSelector {
    pub fn new(params: TransportParams) -> Self {
        Self {
            current: match params.choice {
                TransportChoice::Tls => Transport::Tls,
                TransportChoice::Auto | TransportChoice::Udp => Transport::Udp,
            },
            params,
            stream: StreamState::Closed,
            stream_failures: 0,
            attempt_waiting: false,
            link_up: false,
            next_udp_probe: None,
            close_stream_at: None,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // ---- getters ------------------------------------------------------------------

    /// What carries the datagrams now.
    pub fn current(&self) -> Transport {
        self.current
    }

    pub fn stream(&self) -> StreamState {
        self.stream
    }

    pub fn params(&self) -> &TransportParams {
        &self.params
    }

    /// Whether datagrams may come over `via` (with `--transport tls`, a datagram over UDP,
    /// say the server calling back a restarted device at its last UDP address, is not
    /// answered).
    pub fn allows(&self, via: Transport) -> bool {
        match self.params.choice {
            TransportChoice::Auto => true,
            TransportChoice::Udp => via == Transport::Udp,
            TransportChoice::Tls => via == Transport::Tls,
        }
    }

    fn auto(&self) -> bool {
        self.params.choice == TransportChoice::Auto
    }

    // ---- inputs -------------------------------------------------------------------

    /// The link starts an attempt: where its initiation goes.
    #[must_use]
    pub fn handle_connect(&mut self, _now: Instant) -> AttemptVia {
        match (self.current, self.stream) {
            (Transport::Udp, _) => AttemptVia::Udp,
            (Transport::Tls, StreamState::Open { .. }) => AttemptVia::Stream,
            (Transport::Tls, StreamState::Opening) => {
                self.attempt_waiting = true;
                AttemptVia::StreamWhenOpen
            }
            (Transport::Tls, StreamState::Closed | StreamState::Waiting { .. }) => {
                // The link's backoff paces attempts: no stream backoff on top.
                self.attempt_waiting = true;
                self.open_stream();
                AttemptVia::StreamWhenOpen
            }
        }
    }

    /// The link's attempt got no answer (or could not send its initiation). `tried_all`:
    /// every endpoint of the transport in use (the UDP endpoint candidates, or the servers
    /// for TLS) got no answer since one last answered.
    pub fn handle_attempt_failed(&mut self, _now: Instant, tried_all: bool) {
        // An attempt is made only while the link is not up (a key change reconnects a link
        // that was).
        self.link_up = false;
        self.next_udp_probe = None;
        match self.current {
            Transport::Udp if self.auto() && tried_all => {
                self.switch(Transport::Tls, "no answer over UDP");
            }
            Transport::Udp => {}
            Transport::Tls => {
                // No answer over this stream: the next attempt gets a fresh one (a stream
                // can look open long after its path died).
                if matches!(self.stream, StreamState::Open { .. }) {
                    self.stream_failures = self.stream_failures.saturating_add(1);
                }
                self.close_stream();
                if self.auto() && tried_all {
                    self.switch(Transport::Udp, "no answer over TLS");
                }
            }
        }
    }

    /// An authenticated packet came over `via`.
    pub fn handle_authenticated(&mut self, via: Transport, now: Instant) {
        match via {
            Transport::Tls => {
                if let StreamState::Open { proven } = &mut self.stream {
                    *proven = true;
                    self.stream_failures = 0;
                }
            }
            Transport::Udp => {
                if self.current == Transport::Tls && self.auto() {
                    self.switch(Transport::Udp, "UDP answers again");
                    if self.stream != StreamState::Closed {
                        self.close_stream_at = Some(now + STREAM_GRACE);
                    }
                }
            }
        }
    }

    /// The link came up.
    pub fn handle_link_up(&mut self, now: Instant) {
        self.link_up = true;
        if self.current == Transport::Tls && self.auto() {
            self.next_udp_probe = Some(now + self.params.udp_probe_every);
        }
    }

    /// The link's session died (or the link stopped trying).
    pub fn handle_link_down(&mut self, _now: Instant) {
        self.link_up = false;
        self.next_udp_probe = None;
        if self.current == Transport::Tls {
            // A session that died over this stream says little for it.
            self.close_stream();
            if self.auto() {
                self.switch(Transport::Udp, "the session over TLS died");
            }
        }
    }

    /// The stream asked for with [`TransportAction::OpenStream`] is open.
    pub fn handle_stream_opened(&mut self, _now: Instant) {
        if self.stream != StreamState::Opening {
            return;
        }
        self.stream = StreamState::Open { proven: false };
        if std::mem::take(&mut self.attempt_waiting) {
            self.actions.push_back(TransportAction::SendInitiation);
        } else if self.link_up {
            // The session goes on over the new stream; the server must hear from it.
            self.actions.push_back(TransportAction::StreamKeepalive);
        }
    }

    /// The stream could not be opened.
    pub fn handle_stream_failed(&mut self, now: Instant, rng: &mut impl Rng) {
        if self.stream != StreamState::Opening {
            return;
        }
        self.stream = StreamState::Closed;
        let attempt = self.stream_failures;
        self.stream_failures = self.stream_failures.saturating_add(1);
        if std::mem::take(&mut self.attempt_waiting) {
            self.actions.push_back(TransportAction::AttemptFailed);
        } else {
            self.wait_before_reopening(attempt, now, rng);
        }
    }

    /// The open stream broke (closed by the server or the network).
    pub fn handle_stream_closed(&mut self, now: Instant, rng: &mut impl Rng) {
        let StreamState::Open { proven } = self.stream else {
            return;
        };
        self.stream = StreamState::Closed;
        self.close_stream_at = None;
        if proven {
            self.stream_failures = 0;
        }
        let attempt = self.stream_failures;
        self.stream_failures = self.stream_failures.saturating_add(1);
        self.wait_before_reopening(attempt, now, rng);
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let StreamState::Waiting { until } = self.stream {
            if now >= until {
                self.open_stream();
            }
        }
        if self.close_stream_at.is_some_and(|t| now >= t) {
            self.close_stream_at = None;
            if self.current == Transport::Udp {
                self.close_stream();
            }
        }
        if let Some(at) = self.next_udp_probe {
            if now >= at && self.current == Transport::Tls && self.link_up && self.auto() {
                self.actions.push_back(TransportAction::ProbeUdp);
                self.next_udp_probe = Some(now + self.params.udp_probe_every);
            }
        }
    }

    fn open_stream(&mut self) {
        self.stream = StreamState::Opening;
        self.close_stream_at = None;
        self.actions.push_back(TransportAction::OpenStream);
    }

    fn close_stream(&mut self) {
        self.close_stream_at = None;
        if self.stream != StreamState::Closed {
            self.stream = StreamState::Closed;
            self.actions.push_back(TransportAction::CloseStream);
        }
        if std::mem::take(&mut self.attempt_waiting) {
            self.actions.push_back(TransportAction::AttemptFailed);
        }
    }

    /// After a stream failed or broke: while the session is up over TLS, open another after
    /// a backoff; otherwise the next attempt opens one.
    fn wait_before_reopening(&mut self, attempt: u32, now: Instant, rng: &mut impl Rng) {
        if self.link_up && self.current == Transport::Tls {
            let until = now + self.params.stream_backoff.delay(attempt, rng);
            self.stream = StreamState::Waiting { until };
        }
    }

    fn switch(&mut self, to: Transport, why: &'static str) {
        if self.current == to {
            return;
        }
        self.current = to;
        self.next_udp_probe = None;
        self.events.push_back(TransportEvent::Switched { to, why });
    }

    // ---- outputs ------------------------------------------------------------------

    /// The next thing to do, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<TransportAction> {
        self.actions.pop_front()
    }

    /// The next event to report, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let mut next: Option<(Instant, &'static str)> = None;
        let mut consider = |t: Option<Instant>, why| {
            if let Some(t) = t {
                if next.is_none_or(|(n, _)| t < n) {
                    next = Some((t, why));
                }
            }
        };
        if let StreamState::Waiting { until } = self.stream {
            consider(Some(until), "reopen the stream");
        }
        consider(self.close_stream_at, "close the stream");
        if self.current == Transport::Tls && self.link_up && self.auto() {
            consider(self.next_udp_probe, "probe UDP");
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    use super::*;

    const EVERY: Duration = Duration::from_secs(60);

    fn selector(choice: TransportChoice) -> TransportSelector {
        TransportSelector::new(TransportParams::new(
            choice,
            EVERY,
            Duration::from_secs(120),
        ))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn drain(t: &mut TransportSelector) -> Vec<TransportAction> {
        std::iter::from_fn(|| t.poll_action()).collect()
    }

    fn events(t: &mut TransportSelector) -> Vec<TransportEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }

    /// An auto selector whose first UDP attempt failed and whose TLS attempt succeeded.
    fn up_over_tls(t0: Instant) -> TransportSelector {
        let mut t = selector(TransportChoice::Auto);
        assert_eq!(t.handle_connect(t0), AttemptVia::Udp);
        t.handle_attempt_failed(t0 + secs(5), true);
        assert_eq!(t.handle_connect(t0 + secs(6)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_opened(t0 + secs(6));
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_authenticated(Transport::Tls, t0 + secs(6));
        t.handle_link_up(t0 + secs(6));
        let _ = events(&mut t);
        t
    }

    #[test]
    fn auto_starts_with_udp_and_moves_to_tls_after_one_unanswered_attempt() {
        let t0 = Instant::now();
        let mut t = selector(TransportChoice::Auto);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.handle_connect(t0), AttemptVia::Udp);
        assert_eq!(drain(&mut t), []);
        t.handle_attempt_failed(t0 + secs(5), true);
        assert_eq!(
            events(&mut t),
            [TransportEvent::Switched {
                to: Transport::Tls,
                why: "no answer over UDP"
            }]
        );
        // The next attempt waits for a stream, and goes over it once it is open.
        assert_eq!(t.handle_connect(t0 + secs(6)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        assert_eq!(t.stream(), StreamState::Opening);
        t.handle_stream_opened(t0 + secs(6));
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_authenticated(Transport::Tls, t0 + secs(6));
        assert_eq!(t.stream(), StreamState::Open { proven: true });
        // Attempts after that (a rekey the link asks for) go straight over it.
        assert_eq!(t.handle_connect(t0 + secs(7)), AttemptVia::Stream);
    }

    #[test]
    fn while_on_tls_udp_is_probed_and_an_answer_over_udp_moves_the_session_back() {
        let t0 = Instant::now();
        let mut t = up_over_tls(t0);
        let up = t0 + secs(6);
        assert_eq!(t.poll_timeout(), Some((up + EVERY, "probe UDP")));
        t.handle_timeout(up + EVERY - secs(1));
        assert_eq!(drain(&mut t), []);
        // The first probe gets no answer: nothing changes, the next comes one interval later.
        t.handle_timeout(up + EVERY);
        assert_eq!(drain(&mut t), [TransportAction::ProbeUdp]);
        assert_eq!(t.poll_timeout(), Some((up + EVERY * 2, "probe UDP")));
        t.handle_timeout(up + EVERY + secs(5));
        assert_eq!(drain(&mut t), []);
        assert_eq!(t.current(), Transport::Tls);
        // The second is answered over UDP: back to UDP, the stream closes a little later.
        let second = up + EVERY * 2;
        t.handle_timeout(second);
        assert_eq!(drain(&mut t), [TransportAction::ProbeUdp]);
        t.handle_authenticated(Transport::Udp, second + secs(1));
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(
            events(&mut t),
            [TransportEvent::Switched {
                to: Transport::Udp,
                why: "UDP answers again"
            }]
        );
        // Late datagrams over the stream do not move the session back.
        t.handle_authenticated(Transport::Tls, second + secs(2));
        assert_eq!(t.current(), Transport::Udp);
        t.handle_timeout(second + secs(1) + STREAM_GRACE - Duration::from_millis(1));
        assert_eq!(drain(&mut t), []);
        t.handle_timeout(second + secs(1) + STREAM_GRACE);
        assert_eq!(drain(&mut t), [TransportAction::CloseStream]);
        assert_eq!(t.stream(), StreamState::Closed);
        assert_eq!(t.poll_timeout(), None, "no probing on UDP");
        assert_eq!(t.handle_connect(second + secs(60)), AttemptVia::Udp);
    }

    #[test]
    fn with_several_endpoints_each_gets_its_attempt_before_the_transport_changes() {
        let t0 = Instant::now();
        let mut t = selector(TransportChoice::Auto);
        // Two UDP endpoints: a dead one, then the next, before TLS.
        assert_eq!(t.handle_connect(t0), AttemptVia::Udp);
        t.handle_attempt_failed(t0 + secs(5), false);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.handle_connect(t0 + secs(6)), AttemptVia::Udp);
        t.handle_attempt_failed(t0 + secs(11), true);
        assert_eq!(t.current(), Transport::Tls);
        // Two servers over TLS: each gets a fresh stream, then back to UDP.
        assert_eq!(t.handle_connect(t0 + secs(12)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_opened(t0 + secs(12));
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_attempt_failed(t0 + secs(17), false);
        assert_eq!(drain(&mut t), [TransportAction::CloseStream]);
        assert_eq!(t.current(), Transport::Tls);
        assert_eq!(t.handle_connect(t0 + secs(18)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_failed(t0 + secs(18), &mut StdRng::seed_from_u64(9));
        assert_eq!(drain(&mut t), [TransportAction::AttemptFailed]);
        t.handle_attempt_failed(t0 + secs(18), true);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.handle_connect(t0 + secs(19)), AttemptVia::Udp);
    }

    #[test]
    fn a_session_that_dies_over_tls_starts_again_from_udp() {
        let t0 = Instant::now();
        let mut t = up_over_tls(t0);
        t.handle_link_down(t0 + secs(70));
        assert_eq!(drain(&mut t), [TransportAction::CloseStream]);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.handle_connect(t0 + secs(70)), AttemptVia::Udp);
        // And alternates while nothing answers.
        t.handle_attempt_failed(t0 + secs(75), true);
        assert_eq!(t.handle_connect(t0 + secs(76)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_opened(t0 + secs(76));
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_attempt_failed(t0 + secs(81), true);
        assert_eq!(drain(&mut t), [TransportAction::CloseStream]);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.handle_connect(t0 + secs(82)), AttemptVia::Udp);
    }

    #[test]
    fn a_stream_that_cannot_open_fails_the_attempt_that_waits_for_it() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut t = selector(TransportChoice::Tls);
        assert_eq!(t.current(), Transport::Tls);
        assert_eq!(t.handle_connect(t0), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_failed(t0 + secs(1), &mut rng);
        assert_eq!(drain(&mut t), [TransportAction::AttemptFailed]);
        // The link's backoff decides when the next attempt is; the selector adds nothing.
        assert_eq!(t.stream(), StreamState::Closed);
        assert_eq!(t.poll_timeout(), None);
        t.handle_attempt_failed(t0 + secs(1), true);
        assert_eq!(t.current(), Transport::Tls, "tls mode never uses UDP");
        assert_eq!(t.handle_connect(t0 + secs(2)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
    }

    #[test]
    fn udp_mode_never_opens_a_stream() {
        let t0 = Instant::now();
        let mut t = selector(TransportChoice::Udp);
        assert!(t.allows(Transport::Udp) && !t.allows(Transport::Tls));
        assert!(selector(TransportChoice::Tls).allows(Transport::Tls));
        assert!(!selector(TransportChoice::Tls).allows(Transport::Udp));
        assert!(selector(TransportChoice::Auto).allows(Transport::Udp));
        for i in 0..10 {
            assert_eq!(t.handle_connect(t0 + secs(i * 5)), AttemptVia::Udp);
            t.handle_attempt_failed(t0 + secs(i * 5 + 5), true);
            t.handle_timeout(t0 + secs(i * 5 + 5));
        }
        t.handle_link_up(t0 + secs(60));
        t.handle_timeout(t0 + secs(6000));
        assert_eq!(drain(&mut t), []);
        assert_eq!(events(&mut t), []);
        assert_eq!(t.current(), Transport::Udp);
    }

    #[test]
    fn a_stream_that_breaks_while_up_is_reopened_after_a_growing_backoff() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(2);
        // TLS only, so that no UDP probe comes in between.
        let mut t = selector(TransportChoice::Tls);
        assert_eq!(t.handle_connect(t0), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
        t.handle_stream_opened(t0);
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_authenticated(Transport::Tls, t0);
        t.handle_link_up(t0);
        let mut now = t0 + secs(10);
        // The server cuts every new stream before anything authenticated comes over it (a
        // proxy that closes streams, a server that refuses the device).
        let mut gaps = Vec::new();
        for i in 0..12 {
            if i == 0 {
                t.handle_stream_closed(now, &mut rng);
            } else {
                t.handle_stream_failed(now, &mut rng);
            }
            let broke_at = now;
            let StreamState::Waiting { until } = t.stream() else {
                panic!("not waiting: {:?}", t.stream());
            };
            assert_eq!(
                t.poll_timeout().map(|(_, why)| why),
                Some("reopen the stream")
            );
            t.handle_timeout(until - Duration::from_millis(1));
            assert_eq!(drain(&mut t), []);
            now = until;
            t.handle_timeout(now);
            assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
            gaps.push(now - broke_at);
        }
        let cap = t.params().stream_backoff;
        for (i, gap) in gaps.iter().enumerate() {
            assert!(
                *gap <= cap.ceiling(u32::try_from(i).unwrap()),
                "{i}: {gap:?}"
            );
        }
        assert!(
            gaps[8..].iter().any(|g| *g > secs(20)),
            "later reopenings spread up to the cap: {gaps:?}"
        );
        // A stream that opens gets a keepalive (the server learns it), and once something
        // authenticated came over it, the next break is reopened quickly again.
        t.handle_stream_opened(now);
        assert_eq!(drain(&mut t), [TransportAction::StreamKeepalive]);
        t.handle_authenticated(Transport::Tls, now);
        t.handle_stream_closed(now + secs(1), &mut rng);
        let StreamState::Waiting { until } = t.stream() else {
            panic!("not waiting");
        };
        assert!(until <= now + secs(2), "{:?}", until - now);
    }

    #[test]
    fn a_stream_that_breaks_while_the_link_is_down_waits_for_the_next_attempt() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut t = selector(TransportChoice::Tls);
        assert_eq!(t.handle_connect(t0), AttemptVia::StreamWhenOpen);
        let _ = drain(&mut t);
        t.handle_stream_opened(t0);
        assert_eq!(drain(&mut t), [TransportAction::SendInitiation]);
        t.handle_stream_closed(t0 + secs(1), &mut rng);
        assert_eq!(t.stream(), StreamState::Closed);
        assert_eq!(t.poll_timeout(), None);
        t.handle_timeout(t0 + secs(600));
        assert_eq!(drain(&mut t), []);
    }

    #[test]
    fn an_unanswered_attempt_over_an_open_stream_gets_a_fresh_stream_next() {
        let t0 = Instant::now();
        let mut t = selector(TransportChoice::Tls);
        assert_eq!(t.handle_connect(t0), AttemptVia::StreamWhenOpen);
        let _ = drain(&mut t);
        t.handle_stream_opened(t0);
        let _ = drain(&mut t);
        t.handle_attempt_failed(t0 + secs(5), true);
        assert_eq!(drain(&mut t), [TransportAction::CloseStream]);
        assert_eq!(t.handle_connect(t0 + secs(6)), AttemptVia::StreamWhenOpen);
        assert_eq!(drain(&mut t), [TransportAction::OpenStream]);
    }

    #[test]
    fn late_reports_of_a_stream_no_longer_wanted_change_nothing() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(4);
        let mut t = up_over_tls(t0);
        t.handle_link_down(t0 + secs(60));
        let _ = drain(&mut t);
        t.handle_stream_opened(t0 + secs(61));
        t.handle_stream_failed(t0 + secs(61), &mut rng);
        t.handle_stream_closed(t0 + secs(61), &mut rng);
        assert_eq!(drain(&mut t), []);
        assert_eq!(t.stream(), StreamState::Closed);
        assert_eq!(t.current(), Transport::Udp);
    }

    /// A simulated device on a network whose UDP comes and goes, driven in 100 ms steps
    /// with a link-like loop: it is on TLS only while UDP is blocked (plus the probe
    /// interval), and never opens a stream while UDP works.
    #[test]
    fn on_a_network_whose_udp_comes_and_goes_the_session_follows() {
        let t0 = Instant::now();
        let mut t = selector(TransportChoice::Auto);
        // UDP blocked during [100 s, 400 s).
        let udp_ok = |now: Instant| !(t0 + secs(100)..t0 + secs(400)).contains(&now);
        let mut now = t0;
        let mut link_up = false;
        let mut attempt: Option<(Instant, Transport)> = None;
        let mut last_rx = now;
        let mut on_tls = Vec::new();
        let mut opens = 0;
        while now < t0 + secs(800) {
            t.handle_timeout(now);
            if !link_up && attempt.is_none() {
                match t.handle_connect(now) {
                    AttemptVia::Udp => attempt = Some((now, Transport::Udp)),
                    AttemptVia::Stream => attempt = Some((now, Transport::Tls)),
                    AttemptVia::StreamWhenOpen => {}
                }
            }
            while let Some(a) = t.poll_action() {
                match a {
                    TransportAction::OpenStream => {
                        opens += 1;
                        t.handle_stream_opened(now);
                    }
                    TransportAction::SendInitiation => attempt = Some((now, Transport::Tls)),
                    TransportAction::ProbeUdp if udp_ok(now) => {
                        t.handle_authenticated(Transport::Udp, now);
                        last_rx = now;
                    }
                    _ => {}
                }
            }
            if let Some((started, via)) = attempt {
                if via == Transport::Tls || udp_ok(now) {
                    attempt = None;
                    t.handle_authenticated(via, now);
                    t.handle_link_up(now);
                    link_up = true;
                    last_rx = now;
                } else if now >= started + secs(5) {
                    attempt = None;
                    t.handle_attempt_failed(now, true);
                }
            }
            // Traffic: the server answers over whatever carries it, if it can.
            if link_up && (t.current() == Transport::Tls || udp_ok(now)) {
                last_rx = now;
            }
            if link_up && now >= last_rx + secs(9) {
                link_up = false;
                t.handle_link_down(now);
            }
            if t.current() == Transport::Tls {
                on_tls.push(now);
            }
            now += Duration::from_millis(100);
        }
        let first = on_tls.first().map(|t| (*t - t0).as_secs_f64());
        let last = on_tls.last().map(|t| (*t - t0).as_secs_f64());
        // Blocked at 100 s: dead after 9 s, one UDP attempt (5 s), then TLS.
        assert!(
            first.is_some_and(|f| (113.0..116.0).contains(&f)),
            "{first:?}"
        );
        // Unblocked at 400 s: back within one probe interval.
        assert!(
            last.is_some_and(|l| (400.0..400.0 + EVERY.as_secs_f64() + 0.2).contains(&l)),
            "{last:?}"
        );
        assert_eq!(opens, 1);
        assert_eq!(t.current(), Transport::Udp);
        assert_eq!(t.stream(), StreamState::Closed);
    }
}
