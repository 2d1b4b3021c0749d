//! The WireGuard link's supervisor: decides when the session is dead, when to handshake
//! again, when to re-resolve the server's name, when to probe and when to send keepalives.
//!
//! No sockets, no clock, no boringtun: the shell reports what happened (`handle_*`, with
//! `now`) and asks what to do (`poll_action`, `poll_timeout`). Randomness (the backoff's
//! jitter) comes from the caller's RNG, so tests run on virtual time with a fixed seed.
//!
//! The rules:
//! - The server sends nothing unasked (no persistent keepalive on its side), so liveness is
//!   checked by asking: after a keepalive interval without an authenticated packet from the
//!   server, the agent sends a probe (an ICMP echo to the server's overlay address, which
//!   the server's userspace stack answers), and repeats it every few seconds.
//! - No authenticated packet for two keepalive intervals plus [`DEAD_SLACK`]: the session is
//!   dead. The agent resolves the server's name again and sends a fresh handshake
//!   initiation at once.
//! - An attempt with no answer within [`LinkParams::handshake_timeout`] failed; attempt
//!   `n + 1` starts a full-jitter delay after that: uniform in
//!   `[0, min(cap - handshake_timeout, base * 2^n)]`. So attempts start at most `cap` apart
//!   (a server that returns is tried within one cap), and a fleet that lost its server
//!   spreads its retries.
//! - Any authenticated packet (a handshake response, or data after the server itself
//!   initiated a handshake, as it does after a restart) brings the link up in any state.
//! - A change of the device's own address sends a keepalive at once (the server learns the
//!   new endpoint from it), and while backing off starts the next attempt at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

use super::backoff::Backoff;

/// Slack on top of two keepalive intervals before a silent session is declared dead.
pub const DEAD_SLACK: Duration = Duration::from_secs(5);

/// WireGuard's REKEY_TIMEOUT: how long an initiation waits for its response.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first retry's delay ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// Timing of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// The persistent keepalive interval (the server's `persistent_keepalive`, 25 s).
    pub keepalive: Duration,
    /// How long an initiation waits for its response before the attempt failed.
    pub handshake_timeout: Duration,
    pub backoff: Backoff,
}

impl LinkParams {
    /// `backoff_cap` bounds the time between the starts of two attempts (the handshake
    /// timeout included).
    pub fn new(keepalive: Duration, backoff_cap: Duration) -> Self {
        let handshake_timeout = HANDSHAKE_TIMEOUT.min(backoff_cap / 2);
        Self {
            keepalive: keepalive.max(Duration::from_secs(1)),
            handshake_timeout,
            backoff: Backoff::new(
                BACKOFF_BASE.min(backoff_cap / 2),
                backoff_cap.saturating_sub(handshake_timeout),
            ),
        }
    }

    /// Silence from the server after which the agent starts probing.
    pub fn probe_after(&self) -> Duration {
        self.keepalive
    }

    /// Probes repeat this often while the server stays silent.
    pub fn probe_every(&self) -> Duration {
        (self.keepalive / 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    /// Silence from the server after which the session is dead.
    pub fn dead_after(&self) -> Duration {
        self.keepalive * 2 + DEAD_SLACK
    }
}

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Attempt number `attempt` (0-based): resolving the server's name (`started` is
    /// `None`), or waiting for the handshake response to the initiation sent at `started`.
    Connecting {
        attempt: u32,
        started: Option<Instant>,
    },
    /// Waiting until `until` before attempt number `attempt`.
    BackingOff { attempt: u32, until: Instant },
    /// Authenticated packets arrive from the server; up since `since`.
    Up { since: Instant },
    /// Not trying at all (the device was revoked); the tunnel still answers the server.
    Suspended,
}

/// What the shell should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// Resolve the server's endpoint again and send a fresh handshake initiation, then
    /// report [`LinkSupervisor::handle_attempt_started`] or
    /// [`LinkSupervisor::handle_attempt_failed`].
    Connect,
    /// Send a liveness probe through the tunnel.
    Probe,
    /// Send a WireGuard keepalive (nothing went out for a keepalive interval).
    Keepalive,
}

/// What happened, for logs and the status file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link came up after `failed_attempts` failed attempts.
    Connected { failed_attempts: u32 },
    /// The session was declared dead after this much silence.
    Lost { silent_for: Duration },
    /// Attempt number `attempt` failed; the next one starts in `retry_in`.
    AttemptFailed { attempt: u32, retry_in: Duration },
}

/// The link supervisor. See the module documentation for its rules.
#[derive(Debug)]
pub struct LinkSupervisor {
    params: LinkParams,
    state: LinkState,
    /// Last authenticated packet from the server.
    last_rx: Option<Instant>,
    /// Last datagram sent to the server.
    last_tx: Option<Instant>,
    /// When the next probe may go out (while the server is silent).
    next_probe: Option<Instant>,
    /// Attempts that failed since the link was last up.
    failures: u32,
    actions: VecDeque<LinkAction>,
    events: VecDeque<LinkEvent>,
}

impl LinkSupervisor {
    /// A link that is down and wants to connect at once.
    pub fn new(params: LinkParams) -> Self {
        let mut link = Self {
            params,
            state: LinkState::Connecting {
                attempt: 0,
                started: None,
            },
            last_rx: None,
            last_tx: None,
            next_probe: None,
            failures: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        };
        link.actions.push_back(LinkAction::Connect);
        link
    }

    // ---- getters ------------------------------------------------------------------

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up { .. })
    }

    /// Attempts that failed since the link was last up.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Last authenticated packet from the server.
    pub fn last_rx(&self) -> Option<Instant> {
        self.last_rx
    }

    /// Whether handshake initiations that boringtun makes on its own (retransmits, rekeys,
    /// a packet queued without a session) may go out. Not while backing off or suspended:
    /// the backoff decides when the next attempt is.
    pub fn allows_initiation(&self) -> bool {
        matches!(
            self.state,
            LinkState::Up { .. }
                | LinkState::Connecting {
                    started: Some(_),
                    ..
                }
        )
    }

    // ---- inputs -------------------------------------------------------------------

    /// An authenticated packet came from the server (a handshake response, data or a
    /// keepalive that decrypted).
    pub fn handle_authenticated(&mut self, now: Instant) {
        self.last_rx = Some(now);
        self.next_probe = None;
        if !self.is_up() {
            self.events.push_back(LinkEvent::Connected {
                failed_attempts: self.failures,
            });
            self.state = LinkState::Up { since: now };
            self.failures = 0;
            self.actions.retain(|a| *a != LinkAction::Connect);
        }
    }

    /// A datagram went out to the server.
    pub fn handle_sent(&mut self, now: Instant) {
        self.last_tx = Some(now);
    }

    /// The initiation of the current attempt went out.
    pub fn handle_attempt_started(&mut self, now: Instant) {
        if let LinkState::Connecting { attempt, started } = self.state {
            if started.is_none() {
                self.state = LinkState::Connecting {
                    attempt,
                    started: Some(now),
                };
            }
        }
    }

    /// The current attempt could not even send its initiation (the name did not resolve,
    /// the network is unreachable).
    pub fn handle_attempt_failed(&mut self, now: Instant, rng: &mut impl Rng) {
        if let LinkState::Connecting { attempt, .. } = self.state {
            self.fail_attempt(attempt, now, rng);
        }
    }

    /// The device's own address (the source of datagrams to the server) changed.
    pub fn handle_local_address_changed(&mut self, now: Instant) {
        match self.state {
            LinkState::Up { .. } => self.actions.push_back(LinkAction::Keepalive),
            LinkState::BackingOff { attempt, .. } => self.start_attempt(attempt, now),
            LinkState::Connecting { .. } | LinkState::Suspended => {}
        }
    }

    /// Stop trying (the device was revoked). Answers to the server's own handshakes still
    /// bring the link up.
    pub fn suspend(&mut self) {
        self.state = LinkState::Suspended;
        self.actions.clear();
    }

    /// Try again after [`suspend`](Self::suspend), or at once after a key change.
    pub fn reconnect(&mut self, now: Instant) {
        self.state = LinkState::Connecting {
            attempt: 0,
            started: None,
        };
        self.failures = 0;
        self.next_probe = None;
        self.actions.retain(|a| *a != LinkAction::Connect);
        self.actions.push_back(LinkAction::Connect);
        let _ = now;
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl Rng) {
        match self.state {
            LinkState::Connecting {
                attempt,
                started: Some(started),
            } if now >= started + self.params.handshake_timeout => {
                self.fail_attempt(attempt, now, rng);
            }
            LinkState::Connecting { .. } | LinkState::Suspended => {}
            LinkState::BackingOff { attempt, until } => {
                if now >= until {
                    self.start_attempt(attempt, now);
                }
            }
            LinkState::Up { since } => {
                let heard = self.last_rx.unwrap_or(since);
                let silent_for = now.saturating_duration_since(heard);
                if silent_for >= self.params.dead_after() {
                    self.events.push_back(LinkEvent::Lost { silent_for });
                    self.failures = 0;
                    self.start_attempt(0, now);
                    return;
                }
                let last_tx = self.last_tx.unwrap_or(since).max(since);
                let tx_idle = now.saturating_duration_since(last_tx) >= self.params.keepalive;
                let probe_due = silent_for >= self.params.probe_after()
                    && self.next_probe.is_none_or(|t| now >= t);
                // A probe is a datagram too, so it doubles as the keepalive; when a keepalive
                // is due and a probe nearly so, the probe goes out instead of both.
                let probe_soon =
                    silent_for + self.params.probe_every() >= self.params.probe_after();
                if probe_due || (tx_idle && probe_soon) {
                    self.actions.push_back(LinkAction::Probe);
                    self.next_probe = Some(now + self.params.probe_every());
                    self.last_tx = Some(now);
                } else if tx_idle {
                    self.actions.push_back(LinkAction::Keepalive);
                    self.last_tx = Some(now);
                }
            }
        }
    }

    fn start_attempt(&mut self, attempt: u32, _now: Instant) {
        self.state = LinkState::Connecting {
            attempt,
            started: None,
        };
        self.next_probe = None;
        self.actions.push_back(LinkAction::Connect);
    }

    fn fail_attempt(&mut self, attempt: u32, now: Instant, rng: &mut impl Rng) {
        self.failures += 1;
        let delay = self.params.backoff.delay(attempt, rng);
        let until = now + delay;
        self.events.push_back(LinkEvent::AttemptFailed {
            attempt,
            retry_in: delay,
        });
        self.state = LinkState::BackingOff {
            attempt: attempt.saturating_add(1),
            until,
        };
    }

    // ---- outputs ------------------------------------------------------------------

    /// The next thing to do, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<LinkAction> {
        self.actions.pop_front()
    }

    /// The next event to report, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        match self.state {
            LinkState::Connecting {
                started: Some(started),
                ..
            } => Some((started + self.params.handshake_timeout, "handshake timeout")),
            LinkState::Connecting { started: None, .. } | LinkState::Suspended => None,
            LinkState::BackingOff { until, .. } => Some((until, "backoff")),
            LinkState::Up { since } => {
                let heard = self.last_rx.unwrap_or(since);
                let mut next = (heard + self.params.dead_after(), "dead session");
                let probe = match self.next_probe {
                    Some(t) => t.max(heard + self.params.probe_after()),
                    None => heard + self.params.probe_after(),
                };
                if probe < next.0 {
                    next = (probe, "probe");
                }
                let keepalive = self.last_tx.unwrap_or(since) + self.params.keepalive;
                if keepalive < next.0 {
                    next = (keepalive, "keepalive");
                }
                Some(next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    const CAP: Duration = Duration::from_secs(120);

    fn params() -> LinkParams {
        LinkParams::new(Duration::from_secs(25), CAP)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn drain(link: &mut LinkSupervisor) -> Vec<LinkAction> {
        std::iter::from_fn(|| link.poll_action()).collect()
    }

    /// A link that connected at `t0`.
    fn up_at(t0: Instant) -> LinkSupervisor {
        let mut link = LinkSupervisor::new(params());
        assert_eq!(drain(&mut link), [LinkAction::Connect]);
        link.handle_attempt_started(t0);
        link.handle_authenticated(t0);
        assert!(link.is_up());
        link
    }

    #[test]
    fn a_new_link_connects_at_once_and_comes_up_on_the_response() {
        let t0 = Instant::now();
        let mut link = LinkSupervisor::new(params());
        assert!(
            !link.allows_initiation(),
            "not before the endpoint is resolved"
        );
        assert_eq!(drain(&mut link), [LinkAction::Connect]);
        link.handle_attempt_started(t0);
        assert!(link.allows_initiation());
        link.handle_authenticated(t0 + Duration::from_millis(3));
        assert_eq!(
            link.state(),
            LinkState::Up {
                since: t0 + Duration::from_millis(3)
            }
        );
        assert_eq!(
            link.poll_event(),
            Some(LinkEvent::Connected { failed_attempts: 0 })
        );
    }

    #[test]
    fn an_answering_server_is_probed_about_once_per_keepalive_and_never_declared_dead() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut link = up_at(t0);
        let mut probes = 0;
        let mut keepalives = 0;
        let mut now = t0;
        while now < t0 + secs(600) {
            now += Duration::from_millis(200);
            link.handle_timeout(now, &mut rng);
            for action in drain(&mut link) {
                match action {
                    LinkAction::Probe => {
                        probes += 1;
                        // The server answers 20 ms later.
                        link.handle_authenticated(now + Duration::from_millis(20));
                    }
                    LinkAction::Keepalive => keepalives += 1,
                    LinkAction::Connect => panic!("reconnected at {:?}", now - t0),
                }
            }
        }
        assert!(link.is_up());
        assert!((22..=25).contains(&probes), "{probes} probes in 600 s");
        assert_eq!(keepalives, 0, "the probes are the keepalives");
        assert_eq!(
            link.poll_event(),
            Some(LinkEvent::Connected { failed_attempts: 0 })
        );
        assert_eq!(link.poll_event(), None);
    }

    #[test]
    fn a_silent_server_is_probed_then_declared_dead_after_two_keepalives_and_slack() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(2);
        let mut link = up_at(t0);
        let _ = link.poll_event();
        let mut probe_times = Vec::new();
        let mut now = t0;
        let lost_at = loop {
            now += Duration::from_millis(100);
            link.handle_timeout(now, &mut rng);
            let actions = drain(&mut link);
            if actions.contains(&LinkAction::Probe) {
                probe_times.push((now - t0).as_secs_f64());
            }
            if actions.contains(&LinkAction::Connect) {
                break now - t0;
            }
            assert!(now < t0 + secs(120), "never declared dead");
        };
        assert_eq!(link.params().dead_after(), secs(55));
        assert!(lost_at >= secs(55) && lost_at < secs(55) + Duration::from_millis(150));
        assert_eq!(probe_times.first().copied(), Some(25.0));
        assert_eq!(probe_times.len(), 6, "{probe_times:?}");
        assert!(matches!(link.poll_event(), Some(LinkEvent::Lost { .. })));
        assert_eq!(
            link.state(),
            LinkState::Connecting {
                attempt: 0,
                started: None
            }
        );
    }

    #[test]
    fn failed_attempts_back_off_with_full_jitter_up_to_the_cap() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut link = LinkSupervisor::new(params());
        let mut now = t0;
        let mut starts = Vec::new();
        let mut delays = Vec::new();
        while now < t0 + secs(3600) {
            link.handle_timeout(now, &mut rng);
            for action in drain(&mut link) {
                if action == LinkAction::Connect {
                    link.handle_attempt_started(now);
                    starts.push(now);
                }
            }
            while let Some(event) = link.poll_event() {
                if let LinkEvent::AttemptFailed { attempt, retry_in } = event {
                    assert!(retry_in <= params().backoff.ceiling(attempt));
                    delays.push(retry_in);
                }
            }
            now += Duration::from_millis(100);
        }
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| *g <= CAP + Duration::from_millis(100)),
            "{gaps:?}"
        );
        assert!(gaps.iter().all(|g| *g >= HANDSHAKE_TIMEOUT));
        // Early attempts are close together, later ones spread over [0, cap].
        assert!(gaps[..3].iter().all(|g| *g <= secs(10)), "{:?}", &gaps[..3]);
        let late: Vec<f64> = delays[10..].iter().map(Duration::as_secs_f64).collect();
        let (min, max) = late
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &g| (a.min(g), b.max(g)));
        assert!(min < 20.0 && max > 100.0, "late delays {min}..{max}");
        // Every attempt but possibly the last (still waiting for its answer) failed.
        let failed = link.consecutive_failures() as usize;
        assert!(
            failed == starts.len() || failed == starts.len() - 1,
            "{failed} of {}",
            starts.len()
        );
    }

    #[test]
    fn a_handshake_from_the_server_ends_the_backoff_at_once() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(4);
        let mut link = LinkSupervisor::new(params());
        let _ = drain(&mut link);
        link.handle_attempt_started(t0);
        link.handle_timeout(t0 + secs(6), &mut rng);
        assert!(matches!(
            link.state(),
            LinkState::BackingOff { attempt: 1, .. }
        ));
        assert!(
            !link.allows_initiation(),
            "boringtun's retransmits are held back"
        );
        // The restarted server calls the device back: its data after our response decrypts.
        link.handle_authenticated(t0 + secs(7));
        assert!(link.is_up());
        assert_eq!(link.consecutive_failures(), 0);
    }

    #[test]
    fn an_address_change_sends_a_keepalive_or_cuts_the_backoff_short() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(5);
        let mut link = up_at(t0);
        link.handle_local_address_changed(t0 + secs(3));
        assert_eq!(drain(&mut link), [LinkAction::Keepalive]);

        // A link down long enough to back off for more than ten seconds.
        let mut down = LinkSupervisor::new(params());
        let mut now = t0;
        loop {
            down.handle_timeout(now, &mut rng);
            if drain(&mut down).contains(&LinkAction::Connect) {
                down.handle_attempt_started(now);
            }
            if let LinkState::BackingOff { until, .. } = down.state() {
                if until > now + secs(10) {
                    break;
                }
            }
            now += Duration::from_millis(100);
            assert!(now < t0 + secs(3600));
        }
        down.handle_local_address_changed(now);
        assert_eq!(drain(&mut down), [LinkAction::Connect]);
        assert!(matches!(
            down.state(),
            LinkState::Connecting { started: None, .. }
        ));
    }

    #[test]
    fn a_suspended_link_does_nothing() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(6);
        let mut link = LinkSupervisor::new(params());
        link.suspend();
        for s in 0..7200 {
            link.handle_timeout(t0 + secs(s), &mut rng);
        }
        assert_eq!(drain(&mut link), []);
        assert_eq!(link.poll_timeout(), None);
        link.reconnect(t0 + secs(7200));
        assert_eq!(drain(&mut link), [LinkAction::Connect]);
    }

    #[test]
    fn poll_timeout_names_the_next_deadline() {
        let t0 = Instant::now();
        let link = up_at(t0);
        assert_eq!(link.poll_timeout(), Some((t0 + secs(25), "probe")));
    }

    /// What a fleet of simulated agents did (see [`simulate_fleet`]).
    struct FleetRun {
        /// Every retry delay drawn while the server was unreachable, seconds.
        delays: Vec<f64>,
        /// Handshake attempts per whole second since the start, while the server was away.
        attempts_per_second: std::collections::BTreeMap<u64, usize>,
        /// Longest time between two attempts of one agent while the server was away.
        longest_gap: f64,
        /// Per agent: seconds from the server's return to the agent being up again.
        returns: Vec<f64>,
        all_up: bool,
    }

    /// `agents` agents boot at `t0` plus a random offset in `[0, boot_spread)`; the server
    /// answers before `down` and from `back` on; 100 ms steps of virtual time.
    fn simulate_fleet(agents: usize, boot_spread: Duration, down: u64, back: u64) -> FleetRun {
        let t0 = Instant::now();
        let down_at = t0 + secs(down);
        let back_at = t0 + secs(back);
        let end = back_at + CAP + secs(30);
        let server_up = |t: Instant| t < down_at || t >= back_at;
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let spread_ms = u64::try_from(boot_spread.as_millis()).unwrap_or(0);
        let boot: Vec<Instant> = (0..agents)
            .map(|_| t0 + Duration::from_millis(rng.random_range(0..=spread_ms)))
            .collect();
        let mut links: Vec<LinkSupervisor> =
            (0..agents).map(|_| LinkSupervisor::new(params())).collect();
        let mut attempts: Vec<Vec<Instant>> = vec![Vec::new(); agents];
        let mut delays = Vec::new();
        let mut back_up: Vec<Option<Instant>> = vec![None; agents];
        let mut now = t0;
        while now < end {
            for (i, link) in links.iter_mut().enumerate() {
                if now < boot[i] {
                    continue;
                }
                link.handle_timeout(now, &mut rng);
                while let Some(action) = link.poll_action() {
                    match action {
                        LinkAction::Connect => {
                            link.handle_attempt_started(now);
                            if !server_up(now) {
                                attempts[i].push(now);
                            } else {
                                link.handle_authenticated(now + Duration::from_millis(5));
                            }
                        }
                        LinkAction::Probe if server_up(now) => {
                            link.handle_authenticated(now + Duration::from_millis(5));
                        }
                        LinkAction::Probe | LinkAction::Keepalive => {}
                    }
                }
                while let Some(event) = link.poll_event() {
                    match event {
                        LinkEvent::AttemptFailed { retry_in, .. } if now < back_at => {
                            delays.push(retry_in.as_secs_f64());
                        }
                        LinkEvent::Connected { .. } if now >= back_at && back_up[i].is_none() => {
                            back_up[i] = Some(now);
                        }
                        _ => {}
                    }
                }
            }
            now += Duration::from_millis(100);
        }
        let mut attempts_per_second = std::collections::BTreeMap::new();
        for t in attempts.iter().flatten() {
            *attempts_per_second.entry((*t - t0).as_secs()).or_default() += 1;
        }
        let longest_gap = attempts
            .iter()
            .flat_map(|a| a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .fold(0.0, f64::max);
        FleetRun {
            delays,
            attempts_per_second,
            longest_gap,
            returns: back_up
                .iter()
                .map(|t| t.map_or(f64::INFINITY, |t| (t - back_at).as_secs_f64()))
                .collect(),
            all_up: links.iter().all(LinkSupervisor::is_up),
        }
    }

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }

    /// Fifty agents boot at the same instant (a site's power returns) while their server is
    /// unreachable, for ten minutes. Their retries spread out (without jitter all fifty
    /// would retry in the same instant every time), no delay exceeds the cap, and every agent
    /// is back within one cap of the server's return. Prints the spread
    /// (`cargo test -p floto-tunnel-client fifty -- --nocapture`).
    #[test]
    #[allow(clippy::print_stdout)]
    fn fifty_agents_spread_their_retries_and_return_within_one_cap() {
        const AGENTS: usize = 50;
        let run = simulate_fleet(AGENTS, Duration::ZERO, 0, 600);
        let cap = CAP.as_secs_f64();
        let mut delays = run.delays.clone();
        delays.sort_by(f64::total_cmp);
        println!(
            "\n{AGENTS} agents booted together, server unreachable for 600 s, backoff cap {cap} s:"
        );
        println!(
            "  {} retry delays: min {:.2} s, median {:.1} s, 90th percentile {:.1} s, max {:.1} s",
            delays.len(),
            delays[0],
            percentile(&delays, 0.5),
            percentile(&delays, 0.9),
            delays[delays.len() - 1]
        );
        println!("  delay (s)   | retries");
        let buckets = 12usize;
        let mut histogram = vec![0usize; buckets];
        for &d in &delays {
            histogram[((d / cap * buckets as f64) as usize).min(buckets - 1)] += 1;
        }
        for (b, n) in histogram.iter().enumerate() {
            let lo = b as f64 * cap / buckets as f64;
            println!(
                "  {:>4.0} - {:<4.0} | {:>4} {}",
                lo,
                lo + cap / buckets as f64,
                n,
                "#".repeat(n.div_ceil(4))
            );
        }
        assert!(
            delays[delays.len() - 1] <= cap,
            "a delay exceeds the cap of {cap} s"
        );
        // Full jitter: the delays fill the whole range up to the cap, not a few fixed steps.
        assert!(histogram.iter().all(|&n| n > 0), "{histogram:?}");

        // The herd disperses: after the first minute, few attempts share a second.
        let first = run.attempts_per_second.get(&0).copied().unwrap_or(0);
        let busiest_later = run
            .attempts_per_second
            .range(60..)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let seconds_with_attempts = run.attempts_per_second.range(60..600).count();
        println!(
            "  attempts in the first second: {first} (all boot together); after the first minute the busiest second has {busiest_later}, and {seconds_with_attempts} of 540 seconds see an attempt"
        );
        println!(
            "  longest gap between the starts of one agent's attempts: {:.1} s (cap {cap} s: delay up to cap - 5 s, plus the 5 s handshake timeout)",
            run.longest_gap,
        );
        assert_eq!(first, AGENTS);
        assert!(busiest_later <= 8, "{busiest_later} attempts in one second");
        assert!(
            run.longest_gap <= cap + 0.1,
            "attempts {} s apart",
            run.longest_gap
        );

        // Everyone is back within one cap of the server's return.
        let mut returns = run.returns.clone();
        returns.sort_by(f64::total_cmp);
        println!(
            "  back after the server returned: median {:.1} s, 90th percentile {:.1} s, last {:.1} s (cap {cap} s)",
            percentile(&returns, 0.5),
            percentile(&returns, 0.9),
            returns[AGENTS - 1]
        );
        assert!(
            returns[AGENTS - 1] <= cap,
            "an agent took {} s",
            returns[AGENTS - 1]
        );
        assert!(run.all_up);
    }

    /// The same fleet, up and answering, loses its server mid-session: sessions are
    /// declared dead, retries spread, everyone is back within one cap of the return.
    #[test]
    fn fifty_connected_agents_lose_their_server_and_come_back_within_one_cap() {
        let run = simulate_fleet(50, secs(30), 60, 660);
        let cap = CAP.as_secs_f64();
        assert!(run.delays.iter().all(|d| *d <= cap));
        assert!(run.returns.iter().all(|r| *r <= cap), "{:?}", run.returns);
        assert!(run.all_up);
        let busiest = run.attempts_per_second.values().max().copied().unwrap_or(0);
        assert!(busiest <= 15, "{busiest} attempts in one second");
    }
}
