//! A deterministic fault injector around any block device.
//!
//! [`FaultyDevice`] decides each request's fate when it is submitted, from a seeded PRNG, so a
//! run over in-memory devices on [`super::reactor::run_local`] replays exactly from its seed:
//! - errors on chosen extents (per operation kind), at a rate, or for the whole device;
//! - dropped writes: reported done, never applied (a lying disk);
//! - delays: a completion waits a random number of executor turns, which reorders
//!   completions of concurrent requests.
//!
//! Crashes (lost or torn unflushed writes) are [`super::MemDevice::crash`]'s job.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{errno, AlignedBuf, BlockDevice, DeviceInfo, IoFuture, ReadDone, WriteFlags};
use crate::units::{Extent, Sector};

/// The kind of a request, for choosing which requests fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    /// Writes, write-zeroes and discards.
    Write,
    Flush,
}

/// Faults to inject; the default injects none.
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability that a read fails with `EIO`.
    pub read_error_rate: f64,
    /// Probability that a write fails with `EIO`.
    pub write_error_rate: f64,
    /// Probability that a write is acknowledged but not applied.
    pub drop_write_rate: f64,
    /// A completion waits up to this many executor turns (0: complete in order).
    pub max_delay_turns: u32,
}

struct FaultState {
    rng: ChaCha8Rng,
    config: FaultConfig,
    bad_extents: Vec<(OpKind, Extent)>,
    dead: bool,
}

/// Counters of what a [`FaultyDevice`] did.
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub requests: AtomicU64,
    pub injected_errors: AtomicU64,
    pub dropped_writes: AtomicU64,
}

/// What happens to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Pass { delay: u32 },
    Fail { delay: u32 },
    Drop { delay: u32 },
}

/// A block device that fails, drops and delays requests as configured.
pub struct FaultyDevice<D: BlockDevice> {
    inner: Arc<D>,
    state: Mutex<FaultState>,
    counters: FaultCounters,
}

impl<D: BlockDevice> FaultyDevice<D> {
    pub fn new(inner: Arc<D>, config: FaultConfig) -> Arc<FaultyDevice<D>> {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let state = FaultState { rng, config, bad_extents: Vec::new(), dead: false };
        Arc::new(FaultyDevice { inner, state: Mutex::new(state), counters: FaultCounters::default() })
    }

    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }

    /// Makes every `kind` request touching `extent` fail with `EIO`.
    pub fn fail_extent(&self, kind: OpKind, extent: Extent) {
        self.state.lock().expect("fault state").bad_extents.push((kind, extent));
    }

    /// Makes every request fail (`true`) or clears that (`false`): a leg that died.
    pub fn set_dead(&self, dead: bool) {
        self.state.lock().expect("fault state").dead = dead;
    }

    /// Removes every injected fault, keeping the PRNG's position.
    pub fn heal(&self) {
        let mut state = self.state.lock().expect("fault state");
        state.bad_extents.clear();
        state.dead = false;
        state.config.read_error_rate = 0.0;
        state.config.write_error_rate = 0.0;
        state.config.drop_write_rate = 0.0;
    }

    pub fn counters(&self) -> &FaultCounters {
        &self.counters
    }

    fn decide(&self, kind: OpKind, extent: Option<Extent>) -> Fate {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("fault state");
        let delay = match state.config.max_delay_turns {
            0 => 0,
            max => state.rng.gen_range(0..=max),
        };
        let on_bad_extent =
            extent.is_some_and(|e| state.bad_extents.iter().any(|(k, bad)| *k == kind && overlaps(*bad, e)));
        let rate = match kind {
            OpKind::Read => state.config.read_error_rate,
            OpKind::Write => state.config.write_error_rate,
            OpKind::Flush => 0.0,
        };
        // Draw even when the outcome is already known, so one fault does not shift the others.
        let random_error = state.rng.gen_bool(rate.clamp(0.0, 1.0));
        let drop_rate = if kind == OpKind::Write { state.config.drop_write_rate } else { 0.0 };
        let random_drop = state.rng.gen_bool(drop_rate.clamp(0.0, 1.0));
        if state.dead || on_bad_extent || random_error {
            self.counters.injected_errors.fetch_add(1, Ordering::Relaxed);
            Fate::Fail { delay }
        } else if random_drop {
            self.counters.dropped_writes.fetch_add(1, Ordering::Relaxed);
            Fate::Drop { delay }
        } else {
            Fate::Pass { delay }
        }
    }
}

fn overlaps(a: Extent, b: Extent) -> bool {
    a.start < b.end() && b.start < a.end()
}

/// Waits `turns` executor turns: other ready tasks run first, reordering completions.
async fn delay(turns: u32) {
    for _ in 0..turns {
        smol::future::yield_now().await;
    }
}

/// Runs `op` unless `fate` says otherwise, after the fate's delay.
fn with_fate(fate: Fate, op: IoFuture<io::Result<()>>) -> IoFuture<io::Result<()>> {
    Box::pin(async move {
        match fate {
            Fate::Pass { delay: d } => {
                let res = op.await;
                delay(d).await;
                res
            }
            Fate::Fail { delay: d } => {
                delay(d).await;
                Err(errno(libc::EIO))
            }
            Fate::Drop { delay: d } => {
                delay(d).await;
                Ok(())
            }
        }
    })
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        let fate = self.decide(OpKind::Read, Some(Extent::new(offset, buf.sectors())));
        let op = self.inner.read(offset, buf);
        Box::pin(async move {
            let (res, buf) = op.await;
            match fate {
                Fate::Pass { delay: d } | Fate::Drop { delay: d } => {
                    delay(d).await;
                    (res, buf)
                }
                Fate::Fail { delay: d } => {
                    delay(d).await;
                    (Err(errno(libc::EIO)), buf)
                }
            }
        })
    }

    fn write(&self, offset: Sector, buf: Arc<AlignedBuf>, flags: WriteFlags) -> IoFuture<io::Result<()>> {
        let fate = self.decide(OpKind::Write, Some(Extent::new(offset, buf.sectors())));
        let op = match fate {
            Fate::Pass { .. } => self.inner.write(offset, buf, flags),
            _ => Box::pin(std::future::ready(Ok(()))),
        };
        with_fate(fate, op)
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        let fate = self.decide(OpKind::Flush, None);
        with_fate(fate, self.inner.flush())
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        let fate = self.decide(OpKind::Write, Some(extent));
        let op = match fate {
            Fate::Pass { .. } => self.inner.discard(extent),
            _ => Box::pin(std::future::ready(Ok(()))),
        };
        with_fate(fate, op)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        let fate = self.decide(OpKind::Write, Some(extent));
        let op = match fate {
            Fate::Pass { .. } => self.inner.write_zeroes(extent),
            _ => Box::pin(std::future::ready(Ok(()))),
        };
        with_fate(fate, op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use crate::device::MemDevice;
    use crate::units::SectorCount;

    #[test]
    fn bad_extent_fails_only_its_kind() {
        let dev = FaultyDevice::new(MemDevice::new("m", SectorCount(64)), FaultConfig::default());
        dev.fail_extent(OpKind::Write, Extent::new(Sector(8), SectorCount(8)));
        let buf = Arc::new(AlignedBuf::new(4096));
        assert!(run_local(dev.write(Sector(0), Arc::clone(&buf), WriteFlags::default())).is_ok());
        assert!(run_local(dev.write(Sector(12), Arc::clone(&buf), WriteFlags::default())).is_err());
        let (res, _) = run_local(dev.read(Sector(8), AlignedBuf::new(4096)));
        assert!(res.is_ok());
    }

    #[test]
    fn same_seed_same_fates() {
        let fates = |seed| {
            let config = FaultConfig { seed, read_error_rate: 0.3, max_delay_turns: 5, ..Default::default() };
            let dev = FaultyDevice::new(MemDevice::new("m", SectorCount(8)), config);
            (0..64).map(|_| dev.decide(OpKind::Read, None)).collect::<Vec<_>>()
        };
        assert_eq!(fates(42), fates(42));
        assert_ne!(fates(42), fates(43));
    }
}
