//! The copy engine's time: a [`Clock`] it reads and sleeps on, passed in at construction so
//! that a simulation controls time instead of the wall clock.
//!
//! [`SystemClock`] is the real one: monotonic time since the engine started, and sleeps on the
//! thread's io_uring. [`ManualClock`] (simulations and tests) moves only when slept on or
//! advanced, so a throttled copy runs at once and its pacing is exact and replayable.
//! Invariant of every clock: [`Clock::now`] never goes backwards.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::reactor;

/// The future of [`Clock::sleep`]; it runs on the engine's thread.
pub type SleepFuture = Pin<Box<dyn Future<Output = ()> + 'static>>;

/// A source of time for the copy engine and its throttle.
pub trait Clock: Send + Sync {
    /// Time since the clock's epoch; never decreases.
    fn now(&self) -> Duration;
    /// Waits until [`Clock::now`] has moved on by at least `duration`.
    fn sleep(&self, duration: Duration) -> SleepFuture;
}

/// The wall clock: monotonic time since it was made; sleeps on the thread's ring.
#[derive(Debug)]
pub struct SystemClock {
    epoch: Instant,
}

impl SystemClock {
    pub fn new() -> Arc<SystemClock> {
        Arc::new(SystemClock {
            epoch: Instant::now(),
        })
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn sleep(&self, duration: Duration) -> SleepFuture {
        Box::pin(reactor::sleep(duration))
    }
}

/// A simulated clock: it starts at zero and moves only by [`ManualClock::advance`] or when a
/// task sleeps, which moves it to that sleep's deadline at once (never back) and yields.
#[cfg(feature = "sim")]
#[derive(Debug, Default)]
pub struct ManualClock {
    now: std::sync::Mutex<Duration>,
}

#[cfg(feature = "sim")]
impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock::default())
    }

    /// Moves the clock on by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().expect("manual clock");
        *now = now.checked_add(by).expect("manual clock overflow");
    }

    /// Moves the clock to `to` unless it is already past it.
    fn advance_to(&self, to: Duration) {
        let mut now = self.now.lock().expect("manual clock");
        *now = (*now).max(to);
    }
}

#[cfg(feature = "sim")]
impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.now.lock().expect("manual clock")
    }

    fn sleep(&self, duration: Duration) -> SleepFuture {
        let deadline = self.now().checked_add(duration).expect("sleep overflow");
        self.advance_to(deadline);
        // Let the other tasks run, as a real sleep would.
        Box::pin(smol::future::yield_now())
    }
}
