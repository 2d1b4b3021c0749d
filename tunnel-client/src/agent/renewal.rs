//! When to renew the device certificate, when to re-enroll instead, and how to retry.
//!
//! Wall-clock time (certificates expire by the calendar), passed in as `now`; randomness from
//! the caller's RNG. No I/O: the shell performs the [`CertAction`] and reports the outcome.
//!
//! - Renew at 2/3 of the certificate's lifetime, jittered by ±1/12 of the lifetime so that
//!   devices enrolled together do not renew together.
//! - A certificate that is expired (or about to be) cannot renew over mTLS: re-enroll with
//!   the provisioning key, which keeps the UUID and overlay address because the CSR carries
//!   the key of the current certificate.
//! - Transient failures (server unreachable, shedding load) retry with full-jitter backoff.
//! - Revoked: retry rarely ([`REVOKED_RETRY`], jittered); the shell logs one clear error.
//! - Refusals a retry will not fix soon (wrong provisioning key, conflicts) retry as rarely.
//! - When the tunnel keeps failing while the API answers, a renewal doubles as a check-in
//!   (it re-registers the WireGuard key and reveals a revocation), at most every
//!   [`CHECK_IN_EVERY`].

use std::time::Duration;

use rand::Rng;
use time::OffsetDateTime;

use super::backoff::{jittered, Backoff};

/// How rarely a revoked device (or one whose requests are refused) tries again.
pub const REVOKED_RETRY: Duration = Duration::from_secs(30 * 60);

/// Failed tunnel attempts in a row after which the agent checks in with a renewal.
pub const CHECK_IN_AFTER_FAILURES: u32 = 3;

/// At most one check-in renewal this often.
pub const CHECK_IN_EVERY: Duration = Duration::from_secs(30 * 60);

/// First retry delay ceiling after a transient failure.
const RETRY_BASE: Duration = Duration::from_secs(5);

/// What to do with the certificate now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAction {
    /// `POST /v1/renew` over mTLS with a fresh key.
    Renew,
    /// `POST /v1/enroll` with the provisioning key and the current (or pending) key.
    Reenroll,
}

/// How a [`CertAction`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFailure {
    /// Unreachable, timed out, shedding load, server error: retry soon.
    Transient,
    /// The server says the device is revoked.
    Revoked,
    /// mTLS refused the certificate (expired, unknown): re-enrolling may help.
    CertificateRefused,
    /// Renewal refused because the certificate was superseded (a renewal the device did not
    /// finish storing): re-enrolling with the pending key may help.
    Superseded,
    /// Any other refusal (bad provisioning key, conflict, malformed): retry rarely.
    Refused,
}

/// Where the planner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertPhase {
    /// Waiting for the renewal time.
    Waiting,
    /// An action is being performed.
    InFlight(CertAction),
    /// Retrying at the given time.
    Retrying { at: OffsetDateTime },
    /// Revoked; asking again at the given time.
    Revoked { at: OffsetDateTime },
}

/// The renewal planner.
#[derive(Debug, Clone)]
pub struct RenewalPlanner {
    expires_at: OffsetDateTime,
    renew_at: OffsetDateTime,
    /// Within this of expiry, re-enroll rather than renew.
    margin: Duration,
    phase: CertPhase,
    can_reenroll: bool,
    reenroll_next: bool,
    failures: u32,
    backoff: Backoff,
    last_check_in: Option<OffsetDateTime>,
    /// The last answer was "revoked" (kept while an action is in flight).
    revoked: bool,
}

/// The lifetime implied by the server's `renew_after` (2/3 of the lifetime) and `expires_at`.
fn lifetime(expires_at: OffsetDateTime, renew_after: OffsetDateTime) -> Duration {
    let third = expires_at - renew_after;
    if third.is_positive() {
        Duration::try_from(third * 3).unwrap_or(Duration::from_secs(3600))
    } else {
        Duration::from_secs(60)
    }
}

/// When to renew a certificate: 2/3 of its lifetime, ±1/12 of the lifetime.
pub fn renewal_time(
    expires_at: OffsetDateTime,
    renew_after: OffsetDateTime,
    rng: &mut impl Rng,
) -> OffsetDateTime {
    let life = lifetime(expires_at, renew_after);
    let issued = expires_at - life;
    let fraction = rng.random_range((7.0 / 12.0)..=(9.0 / 12.0));
    issued + life.mul_f64(fraction)
}

/// Time before expiry within which renewal over mTLS is not attempted any more.
pub fn expiry_margin(expires_at: OffsetDateTime, renew_after: OffsetDateTime) -> Duration {
    (lifetime(expires_at, renew_after) / 20).min(Duration::from_secs(60))
}

impl RenewalPlanner {
    /// `can_reenroll`: a provisioning key is configured. `pending`: a renewal was cut short
    /// (keys waiting in the state dir), so act at once.
    pub fn new(
        expires_at: OffsetDateTime,
        renew_after: OffsetDateTime,
        can_reenroll: bool,
        backoff_cap: Duration,
        pending: bool,
        rng: &mut impl Rng,
    ) -> Self {
        let mut renew_at = renewal_time(expires_at, renew_after, rng);
        if pending {
            renew_at = OffsetDateTime::UNIX_EPOCH;
        }
        Self {
            expires_at,
            renew_at,
            margin: expiry_margin(expires_at, renew_after),
            phase: CertPhase::Waiting,
            can_reenroll,
            reenroll_next: false,
            failures: 0,
            backoff: Backoff::new(RETRY_BASE, backoff_cap),
            last_check_in: None,
            revoked: false,
        }
    }

    pub fn phase(&self) -> CertPhase {
        self.phase
    }

    pub fn renew_at(&self) -> OffsetDateTime {
        self.renew_at
    }

    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }

    /// The server's last answer was that the device is revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }

    /// The action due at `now`, if any; the planner then waits for its outcome.
    #[must_use]
    pub fn poll_action(&mut self, now: OffsetDateTime) -> Option<CertAction> {
        let due = match self.phase {
            CertPhase::Waiting => now >= self.renew_at,
            CertPhase::Retrying { at } | CertPhase::Revoked { at } => now >= at,
            CertPhase::InFlight(_) => false,
        };
        if !due {
            return None;
        }
        let expired = now >= self.expires_at - self.margin;
        let action = if self.can_reenroll && (expired || self.reenroll_next) {
            CertAction::Reenroll
        } else {
            CertAction::Renew
        };
        self.phase = CertPhase::InFlight(action);
        Some(action)
    }

    /// When [`poll_action`](Self::poll_action) will next have something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<OffsetDateTime> {
        match self.phase {
            CertPhase::Waiting => Some(self.renew_at),
            CertPhase::Retrying { at } | CertPhase::Revoked { at } => Some(at),
            CertPhase::InFlight(_) => None,
        }
    }

    /// The action succeeded with a certificate valid until `expires_at`.
    pub fn handle_success(
        &mut self,
        expires_at: OffsetDateTime,
        renew_after: OffsetDateTime,
        rng: &mut impl Rng,
    ) {
        self.expires_at = expires_at;
        self.margin = expiry_margin(expires_at, renew_after);
        self.renew_at = renewal_time(expires_at, renew_after, rng);
        self.phase = CertPhase::Waiting;
        self.failures = 0;
        self.reenroll_next = false;
        self.revoked = false;
    }

    /// The action failed. Returns `true` when this failure newly revoked the device (log it
    /// once, loudly).
    pub fn handle_failure(
        &mut self,
        failure: CertFailure,
        now: OffsetDateTime,
        rng: &mut impl Rng,
    ) -> bool {
        let was_revoked = self.revoked;
        self.revoked = failure == CertFailure::Revoked;
        self.failures = self.failures.saturating_add(1);
        let rare = now + jittered(REVOKED_RETRY, 0.25, rng);
        let soon = now + self.backoff.delay(self.failures - 1, rng);
        let rarely = || rare;
        self.phase = match failure {
            CertFailure::Transient => CertPhase::Retrying { at: soon },
            CertFailure::Revoked => CertPhase::Revoked { at: rarely() },
            CertFailure::CertificateRefused | CertFailure::Superseded if self.can_reenroll => {
                if self.reenroll_next {
                    // Re-enrolling failed the same way already.
                    CertPhase::Retrying { at: rarely() }
                } else {
                    self.reenroll_next = true;
                    CertPhase::Retrying { at: now }
                }
            }
            CertFailure::CertificateRefused | CertFailure::Superseded | CertFailure::Refused => {
                CertPhase::Retrying { at: rarely() }
            }
        };
        failure == CertFailure::Revoked && !was_revoked
    }

    /// The tunnel failed `failures` attempts in a row. Returns `true` when this starts a
    /// check-in renewal.
    pub fn handle_link_failing(&mut self, failures: u32, now: OffsetDateTime) -> bool {
        if failures < CHECK_IN_AFTER_FAILURES || self.phase != CertPhase::Waiting {
            return false;
        }
        if self
            .last_check_in
            .is_some_and(|t| now - t < time::Duration::try_from(CHECK_IN_EVERY).unwrap_or_default())
        {
            return false;
        }
        self.last_check_in = Some(now);
        self.phase = CertPhase::Retrying { at: now };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;
    use time::macros::datetime;

    const CAP: Duration = Duration::from_secs(120);

    fn t0() -> OffsetDateTime {
        datetime!(2026-03-01 12:00 UTC)
    }

    /// A certificate issued at `issued` for `life`, as the server describes it.
    fn cert(issued: OffsetDateTime, life: Duration) -> (OffsetDateTime, OffsetDateTime) {
        let expires = issued + life;
        (expires, issued + life * 2 / 3)
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime_with_jitter() {
        let mut rng = StdRng::seed_from_u64(1);
        let life = Duration::from_secs(30 * 24 * 3600);
        let (exp, after) = cert(t0(), life);
        let mut fractions: Vec<f64> = (0..1000)
            .map(|_| {
                let at = renewal_time(exp, after, &mut rng);
                (at - t0()).as_seconds_f64() / life.as_secs_f64()
            })
            .collect();
        fractions.sort_by(f64::total_cmp);
        assert!(fractions[0] >= 7.0 / 12.0 - 1e-9, "{}", fractions[0]);
        assert!(fractions[999] <= 9.0 / 12.0 + 1e-9);
        let median = fractions[500];
        assert!((median - 2.0 / 3.0).abs() < 0.01, "{median}");
        assert!(fractions[999] - fractions[0] > 0.15, "jitter is spread");
    }

    #[test]
    fn renews_on_time_and_then_waits_for_the_next_certificate() {
        let mut rng = StdRng::seed_from_u64(2);
        let life = Duration::from_secs(60);
        let (exp, after) = cert(t0(), life);
        let mut p = RenewalPlanner::new(exp, after, true, CAP, false, &mut rng);
        let at = p.renew_at();
        assert!(at >= t0() + Duration::from_secs(35) && at <= t0() + Duration::from_secs(45));
        assert_eq!(p.poll_action(at - Duration::from_millis(1)), None);
        assert_eq!(p.poll_action(at), Some(CertAction::Renew));
        assert_eq!(p.poll_action(at), None, "one at a time");
        let (exp2, after2) = cert(at, life);
        p.handle_success(exp2, after2, &mut rng);
        assert_eq!(p.phase(), CertPhase::Waiting);
        assert!(p.renew_at() > at + Duration::from_secs(30));
    }

    #[test]
    fn an_expired_certificate_re_enrolls_when_a_key_is_configured() {
        let mut rng = StdRng::seed_from_u64(3);
        let (exp, after) = cert(t0(), Duration::from_secs(60));
        // The device was off for an hour.
        let now = t0() + Duration::from_secs(3600);
        let mut p = RenewalPlanner::new(exp, after, true, CAP, false, &mut rng);
        assert_eq!(p.poll_action(now), Some(CertAction::Reenroll));
        let mut q = RenewalPlanner::new(exp, after, false, CAP, false, &mut rng);
        assert_eq!(
            q.poll_action(now),
            Some(CertAction::Renew),
            "nothing else to try"
        );
        q.handle_failure(CertFailure::CertificateRefused, now, &mut rng);
        let CertPhase::Retrying { at } = q.phase() else {
            panic!("{:?}", q.phase())
        };
        assert!(at - now >= Duration::from_secs(20 * 60), "retries rarely");
    }

    #[test]
    fn a_refused_renewal_falls_back_to_re_enrollment_once() {
        let mut rng = StdRng::seed_from_u64(4);
        let (exp, after) = cert(t0(), Duration::from_secs(3600));
        let mut p = RenewalPlanner::new(exp, after, true, CAP, true, &mut rng);
        let now = t0() + Duration::from_secs(10);
        assert_eq!(
            p.poll_action(now),
            Some(CertAction::Renew),
            "a cut-short renewal resumes at once"
        );
        p.handle_failure(CertFailure::Superseded, now, &mut rng);
        assert_eq!(p.poll_action(now), Some(CertAction::Reenroll));
        p.handle_failure(CertFailure::CertificateRefused, now, &mut rng);
        assert_eq!(p.poll_action(now + Duration::from_secs(60)), None);
    }

    #[test]
    fn transient_failures_retry_with_backoff_before_expiry() {
        let mut rng = StdRng::seed_from_u64(5);
        let (exp, after) = cert(t0(), Duration::from_secs(24 * 3600));
        let mut p = RenewalPlanner::new(exp, after, true, CAP, false, &mut rng);
        let mut now = p.renew_at();
        let mut tries = 0;
        while now < exp {
            if let Some(a) = p.poll_action(now) {
                tries += 1;
                if now < exp - Duration::from_secs(3600) {
                    assert_eq!(a, CertAction::Renew);
                }
                p.handle_failure(CertFailure::Transient, now, &mut rng);
                let CertPhase::Retrying { at } = p.phase() else {
                    panic!()
                };
                assert!(at - now <= CAP);
            }
            now += Duration::from_secs(1);
        }
        // Eight hours of 2-minute-capped retries: hundreds, not millions.
        assert!((200..=1000).contains(&tries), "{tries}");
        assert_eq!(
            p.poll_action(exp + Duration::from_secs(300)),
            Some(CertAction::Reenroll)
        );
    }

    #[test]
    fn revocation_is_reported_once_and_retried_rarely() {
        let mut rng = StdRng::seed_from_u64(6);
        let (exp, after) = cert(t0(), Duration::from_secs(3600));
        let mut p = RenewalPlanner::new(exp, after, true, CAP, false, &mut rng);
        let mut now = p.renew_at();
        let mut newly = 0;
        let mut tries = 0;
        let end = now + Duration::from_secs(24 * 3600);
        while now < end {
            if p.poll_action(now).is_some() {
                tries += 1;
                if p.handle_failure(CertFailure::Revoked, now, &mut rng) {
                    newly += 1;
                }
            }
            now += Duration::from_secs(10);
        }
        assert_eq!(newly, 1, "one error line, not one per retry");
        assert!((30..=70).contains(&tries), "{tries} tries in a day");
        assert!(p.is_revoked());
    }

    #[test]
    fn a_failing_tunnel_checks_in_at_most_every_half_hour() {
        let mut rng = StdRng::seed_from_u64(7);
        let (exp, after) = cert(t0(), Duration::from_secs(30 * 24 * 3600));
        let mut p = RenewalPlanner::new(exp, after, true, CAP, false, &mut rng);
        let now = t0() + Duration::from_secs(100);
        assert!(!p.handle_link_failing(2, now));
        assert!(p.handle_link_failing(3, now));
        assert_eq!(p.poll_action(now), Some(CertAction::Renew));
        p.handle_success(exp, after, &mut rng);
        assert!(!p.handle_link_failing(10, now + Duration::from_secs(600)));
        assert!(p.handle_link_failing(10, now + Duration::from_secs(1801)));
    }
}
