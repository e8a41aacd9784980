//! Wall-clock time. Production reads the system clock at every call, so an NTP step or time spent
//! suspended shows at once and every instance of a fleet computes permit expiry times on the same
//! clock. Tests and the fleet model drive time through tokio's paused clock instead, with a clock
//! value anchored once (`WallClock::tokio`) and handed to whatever needs it: no hidden global or
//! per-thread state.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where wall-clock time comes from.
#[derive(Debug, Clone, Copy, Default)]
pub enum WallClock {
    /// The system clock, read at every call.
    #[default]
    System,
    /// `base` when tokio's clock read `at`, advancing with tokio's (possibly paused) clock.
    Tokio { base: Duration, at: tokio::time::Instant },
}

impl WallClock {
    /// A clock anchored at the system time now that then advances with tokio's clock (a paused
    /// runtime's simulated time). Share one value between simulated instances that should agree.
    pub fn tokio() -> Self {
        WallClock::Tokio { base: system_now(), at: tokio::time::Instant::now() }
    }

    /// Time since the Unix epoch.
    pub fn now(&self) -> Duration {
        match self {
            WallClock::System => system_now(),
            WallClock::Tokio { base, at } => *base + tokio::time::Instant::now().saturating_duration_since(*at),
        }
    }

    /// Milliseconds since the Unix epoch (the unit of permit expiry times).
    pub fn ms(&self) -> u64 {
        self.now().as_millis() as u64
    }
}

fn system_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Production time is the system clock whatever tokio's clock does: a listener running for
    /// months (or a paused runtime an hour ahead) computes the same expiry times as its peers.
    #[tokio::test(start_paused = true)]
    async fn the_system_clock_is_read_at_every_call() {
        let tokio_clock = WallClock::tokio();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (system, real) = (WallClock::System.ms(), system_now().as_millis() as u64);
        assert!(system.abs_diff(real) < 1000, "system clock: {system} vs {real}");
        let simulated = tokio_clock.ms();
        assert!(simulated.abs_diff(real + 3_600_000) < 1000, "the tokio clock advances with the runtime: {simulated}");
    }
}
