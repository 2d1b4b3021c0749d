//! Time on both sides of the bridge: smoltcp's clock runs on tokio's (so tests may pause
//! time), counted in microseconds since the driver was created, and durations convert to
//! smoltcp's.

use std::time::Duration;

use tokio::time::Instant;

/// smoltcp time is microseconds since the driver was created, on tokio's clock.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    pub(crate) base: Instant,
}

impl Clock {
    pub(crate) fn smol(&self, at: Instant) -> smoltcp::time::Instant {
        let micros = at.saturating_duration_since(self.base).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    pub(crate) fn tokio(&self, at: smoltcp::time::Instant) -> Instant {
        let since_base = Duration::from_micros(u64::try_from(at.total_micros()).unwrap_or(0));
        self.base
            .checked_add(since_base)
            .unwrap_or_else(|| far_future(self.base))
    }
}

pub(crate) fn far_future(from: Instant) -> Instant {
    from + Duration::from_secs(365 * 24 * 3600)
}

pub(crate) fn smol_duration(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
