//! Wall-clock time that tokio's test clock can drive. Production: real time. Under
//! `tokio::time::pause()`: the wall clock at first use plus tokio's elapsed time, so tasks in one
//! test share one clock that advances as the paused runtime does.
//!
//! The base is kept per thread: each `#[tokio::test]` runs its own paused clock on its own thread,
//! and a base shared between them would freeze one test's clock while another's ran ahead. In
//! production every base is real time, so every thread computes the same wall clock.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

thread_local! {
    static BASE: Cell<Option<(Duration, Instant)>> = const { Cell::new(None) };
}

/// Time since the Unix epoch.
pub fn wall_now() -> Duration {
    let (wall, at) = BASE.with(|b| {
        b.get().unwrap_or_else(|| {
            let base = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(), Instant::now());
            b.set(Some(base));
            base
        })
    });
    wall + Instant::now().saturating_duration_since(at)
}

/// Milliseconds since the Unix epoch (the unit of permit expiry times).
pub fn wall_ms() -> u64 {
    wall_now().as_millis() as u64
}
