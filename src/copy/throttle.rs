//! The background-copy throttle: a bandwidth limit in MB/s that yields to foreground I/O.
//!
//! kcopyd's throttle is a duty cycle that ignores the rest of the system. Ours is a pacing
//! clock, like md's `sync_speed_min/max` and DRBD's `c-min-rate`: background copies run at up
//! to the **ceiling** while the device is otherwise idle, and drop to the **floor** while
//! foreground I/O was seen within [`FOREGROUND_WINDOW`]. Foreground-priority copies (a write
//! waits for them) are never throttled. Pure: callers pass the time in.

use std::time::Duration;

/// Foreground I/O this recent makes the throttle use its floor.
pub const FOREGROUND_WINDOW: Duration = Duration::from_millis(200);

/// Bandwidth limits for background copies, in MB/s (10^6 bytes per second). `None`: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThrottleConfig {
    /// The rate kept while foreground I/O is active (at least this much progress).
    pub floor_mbps: Option<u64>,
    /// The rate used while the device is idle.
    pub ceiling_mbps: Option<u64>,
}

impl ThrottleConfig {
    pub const UNLIMITED: ThrottleConfig = ThrottleConfig {
        floor_mbps: None,
        ceiling_mbps: None,
    };

    /// Checks that the floor is not above the ceiling and neither is zero.
    pub fn validate(&self) -> Result<(), String> {
        if self.floor_mbps == Some(0) || self.ceiling_mbps == Some(0) {
            return Err(
                "a throttle rate of 0 MB/s would stop copying; leave it unset for no limit".into(),
            );
        }
        match (self.floor_mbps, self.ceiling_mbps) {
            (Some(f), Some(c)) if f > c => Err(format!(
                "throttle floor {f} MB/s is above the ceiling {c} MB/s"
            )),
            _ => Ok(()),
        }
    }

    /// The rate in bytes per second that applies now, or `None` for no limit.
    pub fn rate_bytes_per_sec(&self, foreground_busy: bool) -> Option<u64> {
        let mbps = if foreground_busy {
            self.floor_mbps.or(self.ceiling_mbps)
        } else {
            self.ceiling_mbps
        };
        mbps.map(|m| m * 1_000_000)
    }
}

/// A pacing clock: the earliest time (since the engine started) the next copy may start.
#[derive(Debug, Default)]
pub struct Pacer {
    next_free: Duration,
}

impl Pacer {
    /// Accounts `bytes` about to be copied at `rate` bytes/s; returns how long to wait first.
    /// With no rate, returns zero and forgets any debt.
    pub fn admit(&mut self, now: Duration, bytes: u64, rate: Option<u64>) -> Duration {
        let Some(rate) = rate else {
            self.next_free = now;
            return Duration::ZERO;
        };
        assert!(rate > 0, "zero rate");
        // A clock that fell behind (idle time) is not credit for a burst.
        let start = self.next_free.max(now);
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next_free = start + cost;
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_holds_the_rate() {
        let mut pacer = Pacer::default();
        let rate = Some(10_000_000); // 10 MB/s
        let mut now = Duration::ZERO;
        for _ in 0..100 {
            now += pacer.admit(now, 1_000_000, rate);
        }
        // 100 MB at 10 MB/s: the last MB starts after 9.9 s, the first at once.
        assert!((now.as_secs_f64() - 9.9).abs() < 1e-6, "{now:?}");
        // Idle time is not credit for a burst.
        now += Duration::from_secs(60);
        assert_eq!(pacer.admit(now, 1_000_000, rate), Duration::ZERO);
        assert_eq!(
            pacer.admit(now, 1_000_000, rate),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn foreground_uses_the_floor() {
        let t = ThrottleConfig {
            floor_mbps: Some(5),
            ceiling_mbps: Some(100),
        };
        assert_eq!(t.rate_bytes_per_sec(true), Some(5_000_000));
        assert_eq!(t.rate_bytes_per_sec(false), Some(100_000_000));
        assert_eq!(ThrottleConfig::UNLIMITED.rate_bytes_per_sec(true), None);
        assert!(ThrottleConfig {
            floor_mbps: Some(9),
            ceiling_mbps: Some(3)
        }
        .validate()
        .is_err());
    }

    #[test]
    fn no_rate_means_no_wait() {
        let mut pacer = Pacer::default();
        assert_eq!(
            pacer.admit(Duration::from_secs(1), u64::MAX / 2, None),
            Duration::ZERO
        );
    }
}
