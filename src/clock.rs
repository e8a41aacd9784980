//! Wall-clock time that tokio's test clock can drive. Production: real time. Under
//! `tokio::time::pause()`: the wall clock at first use plus tokio's elapsed time, so tasks in one
//! test share one clock that advances as the paused runtime does.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Time since the Unix epoch.
pub fn wall_now() -> Duration {
    static BASE: OnceLock<(Duration, Instant)> = OnceLock::new();
    let (wall, at) =
        *BASE.get_or_init(|| (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(), Instant::now()));
    wall + Instant::now().saturating_duration_since(at)
}

/// Milliseconds since the Unix epoch (the unit of permit expiry times).
pub fn wall_ms() -> u64 {
    wall_now().as_millis() as u64
}
