//! Admission: the cheap checks every datagram passes before any Diffie-Hellman is spent on
//! it. Its shape and, for handshake messages, their MAC1; then, under load, their MAC2 (a
//! sender without a valid cookie gets a cookie reply instead). "Under load" is decided here
//! too, counting only handshake messages whose MAC1 is right.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519::PublicKey;
use parking_lot::Mutex;

use super::counters::{bump, Counters, DropReason};
use super::effects::Effects;

/// Default handshake messages per second (all peers together) admitted before the server
/// answers with cookies, requiring initiators to prove their address (WireGuard's DoS
/// defence). A ceiling far above what a node answers (a 2-core node about 4,000 a second):
/// what the workers can take on is decided by the queue's drain time, and a flood by its
/// failures ([`STRANGER_LIMIT`]), both of which put the server under load first. At 20,000
/// (before), the first second of a 50,000-device storm, whose initiations arrive faster than
/// that, sent 220 devices through a 5 s cookie round (t100 14.6 s, against 12.1 s at this
/// ceiling with 2 cookies).
pub const DEFAULT_HANDSHAKE_RATE: u64 = 100_000;

/// Initiations per second that cost a Diffie-Hellman and led nowhere (an unknown or
/// revoked key, an undecryptable or replayed initiation) before the server asks every
/// initiator for a cookie, until the next second. Real devices rarely fail; a flood of
/// made-up initiations fails every time, so it is held to about this many
/// Diffie-Hellmans a second (a few percent of a core) whatever its rate.
pub const STRANGER_LIMIT: u64 = 1000;

/// The gates and the per-second counts that decide whether the server is under load.
pub(super) struct Admission {
    /// Checks MAC1 and always MAC2: answers a cookie reply unless the sender has a valid
    /// cookie. Used under load (boringtun's limiter with a count limit of 0).
    cookie_gate: Arc<RateLimiter>,
    /// Checks MAC1 only (a count limit never reached). Also the `Tunn`s' own limiter, so a
    /// handshake admitted here is never answered with a cookie after its Diffie-Hellmans.
    mac1_gate: Arc<RateLimiter>,
    /// Handshake messages per second admitted without a cookie when there is no backlog
    /// (`--handshake-rate-limit`).
    rate_limit: u64,
    /// Handshake messages checked since `second_started`.
    rate_count: AtomicU64,
    /// Initiations that failed after their Diffie-Hellmans since `second_started`.
    strangers: AtomicU64,
    /// When the current second of counting started (`None` before the first timeout).
    second_started: Mutex<Option<Instant>>,
}

impl Admission {
    pub(super) fn new(public: &PublicKey, rate_limit: u64) -> Self {
        Self {
            cookie_gate: Arc::new(RateLimiter::new(public, 0)),
            mac1_gate: Arc::new(RateLimiter::new(public, u64::MAX)),
            rate_limit: rate_limit.max(1),
            rate_count: AtomicU64::new(0),
            strangers: AtomicU64::new(0),
            second_started: Mutex::new(None),
        }
    }

    /// The limiter a new `Tunn` shares (MAC1 checks only).
    pub(super) fn tunn_limiter(&self) -> Arc<RateLimiter> {
        self.mac1_gate.clone()
    }

    /// An initiation cost a Diffie-Hellman and led nowhere.
    pub(super) fn count_failure(&self) {
        bump(&self.strangers, 1);
    }

    /// Starts a new second of counting when one has passed (and resets the gates' own
    /// counts, which boringtun never does for a shared limiter).
    pub(super) fn tick(&self, now: Instant) {
        {
            let mut started = self.second_started.lock();
            if started.is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1)) {
                self.rate_count.store(0, Ordering::Relaxed);
                self.strangers.store(0, Ordering::Relaxed);
                *started = Some(now);
            }
        }
        self.cookie_gate.reset_count();
        self.mac1_gate.reset_count();
    }

    /// See [`super::PeerTable::recheck`].
    pub(super) fn recheck(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        counters: &Counters,
        fx: &mut Effects,
    ) -> bool {
        if self.strangers.load(Ordering::Relaxed) < STRANGER_LIMIT {
            return true;
        }
        self.require_cookie(from, datagram, scratch, counters, fx)
    }

    /// Lets a handshake message through only with a valid cookie (MAC2); answers a cookie
    /// reply to one without.
    fn require_cookie(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        counters: &Counters,
        fx: &mut Effects,
    ) -> bool {
        // boringtun's limiter cannot check MAC2 alone, so MAC1 is checked a second time
        // here (one keyed BLAKE2s, against the Diffie-Hellmans it saves).
        match self
            .cookie_gate
            .verify_packet(Some(from.ip()), datagram, scratch)
        {
            Ok(_) => true,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                bump(&counters.cookie_replies, 1);
                fx.send_datagram(from, cookie);
                false
            }
            Err(_) => {
                counters.drop(DropReason::Malformed);
                false
            }
        }
    }

    /// See [`super::PeerTable::admit`].
    pub(super) fn admit(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        backlogged: bool,
        scratch: &mut [u8],
        counters: &Counters,
        fx: &mut Effects,
    ) -> bool {
        // MAC1 first, for every datagram: junk that is not for our key costs one keyed hash,
        // is dropped, and never counts toward "under load" (a flood of it must not send
        // honest devices through a cookie round).
        match self
            .mac1_gate
            .verify_packet(Some(from.ip()), datagram, scratch)
        {
            Ok(_) => {}
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                counters.drop(DropReason::BadMac);
                return false;
            }
            Err(_) => {
                counters.drop(DropReason::Malformed);
                return false;
            }
        }
        let handshake = matches!(datagram.first(), Some(1 | 2));
        if !handshake {
            return true;
        }
        let over_rate = self.rate_count.fetch_add(1, Ordering::Relaxed) >= self.rate_limit;
        let under_load =
            backlogged || over_rate || self.strangers.load(Ordering::Relaxed) >= STRANGER_LIMIT;
        if !under_load {
            return true;
        }
        self.require_cookie(from, datagram, scratch, counters, fx)
    }
}
