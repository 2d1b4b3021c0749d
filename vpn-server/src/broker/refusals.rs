//! Refused broker requests, audited without letting one caller flood the audit log (every
//! record is a registry write and an fsync). The first refusal of a kind (operator and
//! result) in a window is written at once; the ones that follow within [`WINDOW`] are counted
//! and written as one record with their count (`repeated`) when the window closes. Nothing
//! is lost: the records' counts add up to the refusals, as `floto_broker_sessions_total`
//! does. Time is an input.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

/// How long refusals of one kind are gathered into one record.
pub const WINDOW: Duration = Duration::from_secs(10);

/// A closed window's refusals, beyond the first (which was written at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeated {
    pub operator: String,
    pub result: &'static str,
    /// Refusals counted in the window after the first.
    pub count: u64,
    pub since: OffsetDateTime,
    pub until: OffsetDateTime,
}

#[derive(Debug)]
struct Window {
    opened: OffsetDateTime,
    last: OffsetDateTime,
    repeated: u64,
}

/// Open windows, per operator and result.
#[derive(Debug, Default)]
pub struct RefusalLog {
    open: HashMap<(String, &'static str), Window>,
}

impl RefusalLog {
    /// Notes a refusal; true when it is the first of its kind in its window and must be
    /// written now, false when it was counted into the window (also one that has closed
    /// but was not polled yet: [`Self::poll_closed`] reports it).
    #[must_use]
    pub fn note(&mut self, operator: &str, result: &'static str, now: OffsetDateTime) -> bool {
        match self.open.entry((operator.to_owned(), result)) {
            Entry::Occupied(mut w) => {
                let w = w.get_mut();
                w.repeated += 1;
                w.last = now;
                false
            }
            Entry::Vacant(v) => {
                v.insert(Window {
                    opened: now,
                    last: now,
                    repeated: 0,
                });
                true
            }
        }
    }

    /// Windows that closed by `now` and counted refusals after their first; closed windows
    /// are forgotten (with or without a count).
    #[must_use]
    pub fn poll_closed(&mut self, now: OffsetDateTime) -> Vec<Repeated> {
        let mut out = Vec::new();
        self.open.retain(|(operator, result), w| {
            if now - w.opened < WINDOW {
                return true;
            }
            if w.repeated > 0 {
                out.push(Repeated {
                    operator: operator.clone(),
                    result,
                    count: w.repeated,
                    since: w.opened,
                    until: w.last,
                });
            }
            false
        });
        out
    }

    /// Every window, closed or not (at shutdown).
    #[must_use]
    pub fn poll_all(&mut self) -> Vec<Repeated> {
        let far = self
            .open
            .values()
            .map(|w| w.opened + WINDOW)
            .max()
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        self.poll_closed(far)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_written_and_the_rest_counted_into_one_record() {
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut log = RefusalLog::default();
        assert!(log.note("eve", "forbidden", t0));
        for i in 1..=100u64 {
            assert!(!log.note("eve", "forbidden", t0 + Duration::from_millis(i * 50)));
        }
        // Another kind has its own window.
        assert!(log.note("eve", "offline", t0));
        assert!(log.note("mallory", "forbidden", t0));
        assert!(log.poll_closed(t0 + Duration::from_secs(9)).is_empty());
        let closed = log.poll_closed(t0 + WINDOW);
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert_eq!(closed[0].operator, "eve");
        assert_eq!(closed[0].count, 100);
        assert_eq!(closed[0].until, t0 + Duration::from_millis(5000));
        // After its window closed, a refusal is written at once again.
        assert!(log.note("eve", "forbidden", t0 + WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn a_refusal_after_the_window_but_before_the_poll_is_counted_not_lost() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut log = RefusalLog::default();
        assert!(log.note("eve", "forbidden", t0));
        assert!(!log.note("eve", "forbidden", t0 + WINDOW + Duration::from_secs(1)));
        let closed = log.poll_all();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 1);
        assert!(log.poll_all().is_empty());
    }
}
