//! The copy engine: dm-kcopyd's job, done in userspace, with what kcopyd lacks.
//!
//! A client submits a [`CopyJob`]: copy one source extent to 1..=[`MAX_DESTS`] destination
//! extents of the same length, or zero the destinations (no source). The engine splits the
//! job into sub-jobs of [`CopyConfig::sub_job_sectors`] and runs up to
//! [`CopyConfig::sub_jobs_per_job`] of them at once for each of up to
//! [`CopyConfig::jobs_in_flight_max`] jobs; each sub-job reads into a buffer from a pool that is
//! the whole memory budget, allocated once, then writes that one buffer to every destination
//! concurrently. The completion, [`CopyDone`], is data: the job's token, a read error, and a
//! mask of the destinations whose writes failed, drained from a [`Completions`] queue.
//!
//! Beyond kcopyd: cancel ([`CopyEngine::cancel`]); two priorities (a copy that a foreground
//! write waits for goes before background resync, for both job slots and buffers); a bandwidth
//! throttle with a floor and a ceiling in MB/s that drops to the floor while foreground I/O is
//! active ([`CopyEngine::note_foreground_io`]); progress counters ([`CopyEngine::stats`]);
//! backpressure instead of unbounded queues ([`CopyEngine::submit`] waits for room,
//! [`CopyEngine::try_submit`] says `Busy`).
//!
//! Threads: the engine runs on its own thread with its own io_uring ([`CopyEngine::start`]),
//! like a kcopyd client's workqueue, so every sub-job and completion is handled on one thread.
//! Clients may await it from any thread, including ublk queue threads whose ring sleeps in
//! `io_uring_enter`: the reactor's executor turns the engine's off-thread wake into an eventfd
//! completion on the waiting ring (see [`crate::device::reactor`]). For deterministic
//! simulation, [`CopyEngine::new_local`] returns the engine's future to run on the caller's
//! executor instead.
//!
//! Time: the throttle reads and sleeps on the engine's [`Clock`], given at construction: the
//! wall clock ([`SystemClock`]) for a real engine, a `ManualClock` (feature `sim`) for a
//! simulation that controls time ([`CopyEngine::new_local_with_clock`]).
//!
//! Errors: without `ignore_errors`, the first error stops the job from starting more
//! sub-jobs (those in flight finish) and the destinations may be partly written. With it, the
//! job runs to the end and reports every failure. A piece whose read failed is never written:
//! writing unknown data is worse than leaving the old.

mod clock;
mod engine;
mod pool;
mod split;
mod throttle;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[cfg(feature = "sim")]
pub use clock::ManualClock;
pub use clock::{Clock, SleepFuture, SystemClock};
pub use split::{piece, piece_count, pieces, Piece};
pub use throttle::{Pacer, ThrottleConfig, FOREGROUND_WINDOW};

use crate::device::DeviceRef;
use crate::error::{Error, ErrorKind, Result};
use crate::units::{Extent, SectorCount};

/// The most destinations one job may write (kcopyd's limit too; a 9-leg mirror's resync).
pub const MAX_DESTS: usize = 8;

/// Default sub-job size: 512 KiB, kcopyd's default since it was raised from 64 KiB.
pub const DEFAULT_SUB_JOB: SectorCount = SectorCount(1024);

/// Which queue a job waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Priority {
    /// A foreground request waits for this copy (copy-on-write, a write to a region being
    /// resynced). Served first and never throttled.
    Foreground,
    /// Resync, scrub, merge: served after foreground copies, throttled.
    Background,
}

impl Priority {
    fn queue_index(self) -> usize {
        match self {
            Priority::Foreground => 0,
            Priority::Background => 1,
        }
    }
}

/// The engine's bounds, fixed at construction.
#[derive(Clone, Debug)]
pub struct CopyConfig {
    /// Sub-job size; a multiple of 8 sectors (4 KiB) so pieces stay block aligned.
    pub sub_job_sectors: SectorCount,
    /// All the buffer memory the engine may hold: `memory_budget_bytes / sub-job bytes`
    /// buffers, allocated at start.
    pub memory_budget_bytes: usize,
    /// Sub-jobs of one job in flight at once (kcopyd: 8).
    pub sub_jobs_per_job: usize,
    /// Jobs running at once.
    pub jobs_in_flight_max: usize,
    /// Jobs waiting to start, beyond which submitters wait (or get `Busy`).
    pub queue_max: usize,
    pub throttle: ThrottleConfig,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            sub_job_sectors: DEFAULT_SUB_JOB,
            memory_budget_bytes: 16 << 20,
            sub_jobs_per_job: 8,
            jobs_in_flight_max: 8,
            queue_max: 64,
            throttle: ThrottleConfig::UNLIMITED,
        }
    }
}

impl CopyConfig {
    /// Checks the bounds; errors are the user's (they come from options).
    pub fn validate(&self) -> Result<()> {
        let sub_bytes = self.sub_job_sectors.to_bytes();
        if self.sub_job_sectors.is_zero() || self.sub_job_sectors.0 % 8 != 0 || sub_bytes > 64 << 20
        {
            return Err(Error::invalid(
                "the copy sub-job size must be a multiple of 4 KiB, at most 64 MiB",
            ));
        }
        if (self.memory_budget_bytes as u64) < sub_bytes {
            return Err(Error::invalid(format!(
                "the copy memory budget ({} bytes) is smaller than one sub-job ({sub_bytes} bytes)",
                self.memory_budget_bytes
            )));
        }
        if self.sub_jobs_per_job == 0 || self.jobs_in_flight_max == 0 || self.queue_max == 0 {
            return Err(Error::invalid("copy engine limits must be positive"));
        }
        self.throttle.validate().map_err(Error::invalid)
    }

    /// How many buffers the budget buys.
    pub fn buffer_count(&self) -> usize {
        self.memory_budget_bytes / self.sub_job_sectors.to_usize_bytes()
    }
}

/// A place on a device.
#[derive(Clone)]
pub struct Location {
    pub dev: DeviceRef,
    pub extent: Extent,
}

impl Location {
    pub fn new(dev: &DeviceRef, extent: Extent) -> Location {
        Location {
            dev: Arc::clone(dev),
            extent,
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.dev.info().name, self.extent)
    }
}

/// One copy (or zeroing) to submit.
#[derive(Clone, Debug)]
pub struct CopyJob {
    /// `None` zeroes the destinations.
    pub source: Option<Location>,
    pub dests: Vec<Location>,
    pub priority: Priority,
    /// Run on past errors, reporting them all.
    pub ignore_errors: bool,
    /// Flush every destination once all its writes succeeded (its flush error counts as a
    /// write error on it).
    pub flush: bool,
}

impl CopyJob {
    /// Copies `source` to every destination, in the background, stopping at the first error.
    pub fn copy(source: Location, dests: Vec<Location>) -> CopyJob {
        CopyJob {
            source: Some(source),
            dests,
            priority: Priority::Background,
            ignore_errors: false,
            flush: false,
        }
    }

    /// Zeroes every destination.
    pub fn zero(dests: Vec<Location>) -> CopyJob {
        CopyJob {
            source: None,
            dests,
            priority: Priority::Background,
            ignore_errors: false,
            flush: false,
        }
    }

    pub fn with_priority(mut self, priority: Priority) -> CopyJob {
        self.priority = priority;
        self
    }

    pub fn ignoring_errors(mut self) -> CopyJob {
        self.ignore_errors = true;
        self
    }

    pub fn flushing(mut self) -> CopyJob {
        self.flush = true;
        self
    }

    /// The length every extent of the job has.
    pub fn len(&self) -> SectorCount {
        self.source
            .as_ref()
            .or(self.dests.first())
            .map_or(SectorCount::ZERO, |l| l.extent.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len().is_zero()
    }

    /// Checks the job's shape: 1..=8 destinations, one length, every extent on its device and
    /// aligned to its logical block.
    pub fn validate(&self) -> Result<()> {
        if self.dests.is_empty() || self.dests.len() > MAX_DESTS {
            return Err(Error::invalid(format!(
                "a copy needs 1 to {MAX_DESTS} destinations, not {}",
                self.dests.len()
            )));
        }
        let len = self.len();
        if len.is_zero() {
            return Err(Error::invalid("a copy of zero sectors"));
        }
        for loc in self.source.iter().chain(&self.dests) {
            if loc.extent.len != len {
                return Err(Error::invalid(format!(
                    "copy extents differ in length: {loc:?} is not {len}"
                )));
            }
            // The present size: a device grown in place (`BlockDevice::refresh_size`) is
            // copied to and from beyond the size it was opened with.
            let size = loc.dev.size();
            loc.dev
                .info()
                .check_extent_in(loc.extent, size)
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::InvalidArgument,
                        format!("copy extent {loc:?} is off the device or unaligned"),
                        e,
                    )
                })?;
        }
        Ok(())
    }
}

/// A set of destinations, by their index in [`CopyJob::dests`].
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DestMask(pub u8);

impl DestMask {
    pub fn contains(self, dest: usize) -> bool {
        dest < MAX_DESTS && self.0 & (1 << dest) != 0
    }

    pub fn insert(&mut self, dest: usize) {
        assert!(dest < MAX_DESTS, "destination {dest} out of range");
        self.0 |= 1 << dest;
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_DESTS).filter(move |&d| self.contains(d))
    }
}

impl fmt::Debug for DestMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A job's identity, for [`CopyEngine::cancel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// The completion of one job: data, delivered through [`Completions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyDone {
    pub job: JobId,
    /// The token the client submitted the job with.
    pub token: u64,
    /// The errno of the first failed source read, if any.
    pub read_error: Option<i32>,
    /// Destinations with a failed write (or flush).
    pub write_errors: DestMask,
    /// The job was cancelled before it finished.
    pub cancelled: bool,
    /// Sectors read and written to every destination that did not fail.
    pub sectors_done: SectorCount,
}

impl CopyDone {
    /// The whole job was copied to every destination.
    pub fn is_ok(&self) -> bool {
        self.read_error.is_none() && self.write_errors.is_empty() && !self.cancelled
    }
}

/// A client's completion queue: every job submitted with it completes here, in completion
/// order, to be drained by one thread. Unbounded, but it holds at most the jobs its client
/// submitted and has not drained.
pub struct Completions {
    tx: smol::channel::Sender<CopyDone>,
    rx: smol::channel::Receiver<CopyDone>,
}

impl Default for Completions {
    fn default() -> Self {
        Completions::new()
    }
}

impl Completions {
    pub fn new() -> Completions {
        let (tx, rx) = smol::channel::unbounded();
        Completions { tx, rx }
    }

    /// Waits for the next completion.
    pub async fn next(&self) -> CopyDone {
        // The queue holds a sender itself, so it never closes.
        self.rx
            .recv()
            .await
            .expect("completion queue holds its own sender")
    }

    /// The next completion, if one is ready.
    pub fn try_next(&self) -> Option<CopyDone> {
        self.rx.try_recv().ok()
    }
}

/// Progress counters, readable from any thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    /// Bytes copied (counted once per sub-job, whatever the number of destinations).
    pub bytes_done: u64,
    pub jobs_queued: u64,
    pub jobs_in_flight: u64,
    pub jobs_done: u64,
    pub memory_in_use: usize,
    pub memory_peak: usize,
    pub memory_budget: usize,
}

/// Why [`CopyEngine::try_submit`] did not take a job.
#[derive(Debug)]
pub enum TrySubmitError {
    /// The queue is full; here is the job back.
    Busy(Box<CopyJob>),
    /// The job is malformed, or the engine has shut down.
    Rejected(Error),
}

/// A submission on its way to the engine thread.
struct Submission {
    id: JobId,
    token: u64,
    job: CopyJob,
    reply: smol::channel::Sender<CopyDone>,
    cancel: Arc<AtomicBool>,
}

/// State shared by the engine thread and its clients.
struct Shared {
    config: CopyConfig,
    /// The engine's time: the throttle reads it and sleeps on it.
    clock: Arc<dyn Clock>,
    next_id: AtomicU64,
    bytes_done: AtomicU64,
    jobs_queued: AtomicU64,
    jobs_in_flight: AtomicU64,
    jobs_done: AtomicU64,
    memory_in_use: AtomicUsize,
    memory_peak: AtomicUsize,
    /// Nanoseconds on `clock` of the last foreground I/O (0: none yet).
    last_foreground_ns: AtomicU64,
    cancels: Mutex<HashMap<JobId, Arc<AtomicBool>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle to a copy engine; clone it freely.
#[derive(Clone)]
pub struct CopyEngine {
    shared: Arc<Shared>,
    tx: smol::channel::Sender<Submission>,
}

impl CopyEngine {
    /// Starts an engine on its own thread with its own io_uring. Fails if the thread or its
    /// ring cannot be created.
    pub fn start(config: CopyConfig) -> Result<CopyEngine> {
        let (engine, run) = CopyEngine::build(config, SystemClock::new())?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("ublkdm-copy".into())
            .spawn(move || engine::run_thread(run, ready_tx))
            .map_err(|e| Error::io("cannot start the copy engine thread", e))?;
        // The thread answers before it runs a job; it aborts the process rather than panic.
        let ready = ready_rx.recv().expect("the copy engine thread answers");
        if let Err(err) = ready {
            let _ = handle.join();
            return Err(err.context("cannot start the copy engine"));
        }
        *engine.shared.thread.lock().expect("engine thread") = Some(handle);
        Ok(engine)
    }

    /// An engine whose future the caller runs on its own executor (deterministic tests).
    /// The future ends once every handle is dropped (or [`CopyEngine::close`]d) and all
    /// submitted jobs have completed.
    pub fn new_local(
        config: CopyConfig,
    ) -> Result<(CopyEngine, impl std::future::Future<Output = ()>)> {
        CopyEngine::new_local_with_clock(config, SystemClock::new())
    }

    /// [`CopyEngine::new_local`] on `clock` (a [`ManualClock`] in simulations).
    pub fn new_local_with_clock(
        config: CopyConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(CopyEngine, impl std::future::Future<Output = ()>)> {
        let (engine, run) = CopyEngine::build(config, clock)?;
        Ok((engine, run.into_future()))
    }

    fn build(config: CopyConfig, clock: Arc<dyn Clock>) -> Result<(CopyEngine, engine::EngineRun)> {
        config.validate()?;
        let (tx, rx) = smol::channel::bounded(config.queue_max);
        let shared = Arc::new(Shared {
            config,
            clock,
            next_id: AtomicU64::new(1),
            bytes_done: AtomicU64::new(0),
            jobs_queued: AtomicU64::new(0),
            jobs_in_flight: AtomicU64::new(0),
            jobs_done: AtomicU64::new(0),
            memory_in_use: AtomicUsize::new(0),
            memory_peak: AtomicUsize::new(0),
            last_foreground_ns: AtomicU64::new(0),
            cancels: Mutex::new(HashMap::new()),
            thread: Mutex::new(None),
        });
        let run = engine::EngineRun::new(rx, Arc::clone(&shared));
        Ok((CopyEngine { shared, tx }, run))
    }

    /// Submits `job`; waits while the queue is full (backpressure). Its completion, carrying
    /// `token`, goes to `completions`.
    pub async fn submit(
        &self,
        job: CopyJob,
        token: u64,
        completions: &Completions,
    ) -> Result<JobId> {
        job.validate()?;
        let sub = self.submission(job, token, completions);
        let id = sub.id;
        self.shared.jobs_queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(sub).await.is_err() {
            self.forget(id);
            return Err(Error::new(
                ErrorKind::Daemon,
                "the copy engine has shut down",
            ));
        }
        Ok(id)
    }

    /// Submits `job` if the queue has room.
    pub fn try_submit(
        &self,
        job: CopyJob,
        token: u64,
        completions: &Completions,
    ) -> Result<JobId, TrySubmitError> {
        job.validate().map_err(TrySubmitError::Rejected)?;
        let sub = self.submission(job, token, completions);
        let id = sub.id;
        self.shared.jobs_queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(sub) {
            Ok(()) => Ok(id),
            Err(err) => {
                self.forget(id);
                match err {
                    smol::channel::TrySendError::Full(sub) => {
                        Err(TrySubmitError::Busy(Box::new(sub.job)))
                    }
                    smol::channel::TrySendError::Closed(_) => Err(TrySubmitError::Rejected(
                        Error::new(ErrorKind::Daemon, "the copy engine has shut down"),
                    )),
                }
            }
        }
    }

    /// Submits `job` and waits for its completion.
    pub async fn copy(&self, job: CopyJob) -> Result<CopyDone> {
        let completions = Completions::new();
        self.submit(job, 0, &completions).await?;
        Ok(completions.next().await)
    }

    fn submission(&self, job: CopyJob, token: u64, completions: &Completions) -> Submission {
        let id = JobId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let cancel = Arc::new(AtomicBool::new(false));
        self.shared
            .cancels
            .lock()
            .expect("cancel map")
            .insert(id, Arc::clone(&cancel));
        Submission {
            id,
            token,
            job,
            reply: completions.tx.clone(),
            cancel,
        }
    }

    fn forget(&self, id: JobId) {
        self.shared.jobs_queued.fetch_sub(1, Ordering::Relaxed);
        self.shared.cancels.lock().expect("cancel map").remove(&id);
    }

    /// Cancels a job: it starts no more sub-jobs and completes with `cancelled` once those in
    /// flight finish. False if the job already completed.
    pub fn cancel(&self, id: JobId) -> bool {
        match self.shared.cancels.lock().expect("cancel map").get(&id) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Tells the throttle that foreground I/O is happening now.
    pub fn note_foreground_io(&self) {
        let now = self.shared.clock.now().as_nanos().max(1) as u64;
        self.shared.last_foreground_ns.store(now, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CopyStats {
        let s = &self.shared;
        CopyStats {
            bytes_done: s.bytes_done.load(Ordering::Relaxed),
            jobs_queued: s.jobs_queued.load(Ordering::Relaxed),
            jobs_in_flight: s.jobs_in_flight.load(Ordering::Relaxed),
            jobs_done: s.jobs_done.load(Ordering::Relaxed),
            memory_in_use: s.memory_in_use.load(Ordering::Relaxed),
            memory_peak: s.memory_peak.load(Ordering::Relaxed),
            memory_budget: s.config.buffer_count() * s.config.sub_job_sectors.to_usize_bytes(),
        }
    }

    pub fn config(&self) -> &CopyConfig {
        &self.shared.config
    }

    /// Stops taking jobs; those already submitted still complete.
    pub fn close(&self) {
        self.tx.close();
    }

    /// Closes the engine and waits for its thread to finish every submitted job. Must not be
    /// called from the engine's own thread.
    pub fn shutdown(&self) {
        self.close();
        let handle = self.shared.thread.lock().expect("engine thread").take();
        if let Some(handle) = handle {
            handle.join().expect("the copy engine thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::{block_on, run_local, spawn};
    use crate::device::{FaultConfig, FaultyDevice, MemDevice, OpKind};
    use crate::units::Sector;

    fn mem(name: &str, sectors: u64) -> Arc<MemDevice> {
        MemDevice::new(name, SectorCount(sectors))
    }

    fn patterned(name: &str, sectors: u64) -> Arc<MemDevice> {
        let dev = mem(name, sectors);
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i * 7 % 251) as u8).collect();
        dev.poke(Sector(0), &data);
        dev
    }

    fn loc(dev: &Arc<MemDevice>, start: u64, len: u64) -> Location {
        let dev: DeviceRef = dev.clone();
        Location::new(&dev, Extent::new(Sector(start), SectorCount(len)))
    }

    fn small_config() -> CopyConfig {
        CopyConfig {
            sub_job_sectors: SectorCount(16),
            memory_budget_bytes: 4 * 16 * 512,
            ..CopyConfig::default()
        }
    }

    /// Runs `body` with a local engine on a deterministic executor.
    fn with_local_engine<T: 'static>(
        config: CopyConfig,
        body: impl AsyncFnOnce(CopyEngine) -> T + 'static,
    ) -> T {
        run_local(async move {
            let (engine, run) = CopyEngine::new_local(config).expect("config");
            let runner = spawn(run);
            let out = body(engine.clone()).await;
            engine.close();
            drop(engine);
            runner.await;
            out
        })
    }

    /// The throttle paces background copies on the engine's clock: on a manual clock a
    /// throttled copy runs at once, and the time it took is exact: every piece after the first
    /// waits one piece's worth at the ceiling, or at the floor after foreground I/O.
    #[test]
    fn throttle_paces_on_the_engine_clock() {
        const PIECES: u64 = 16;
        let config = CopyConfig {
            throttle: ThrottleConfig {
                floor_mbps: Some(1),
                ceiling_mbps: Some(1000),
            },
            ..small_config()
        };
        let sectors = config.sub_job_sectors.0 * PIECES;
        let piece_bytes = config.sub_job_sectors.to_bytes() as f64;
        for (foreground, rate) in [(false, 1e9), (true, 1e6)] {
            let clock = ManualClock::new();
            let (src, dst) = (patterned("src", sectors), mem("dst", sectors));
            let done = run_local({
                let (config, clock) = (config.clone(), clock.clone());
                let job = CopyJob::copy(loc(&src, 0, sectors), vec![loc(&dst, 0, sectors)]);
                async move {
                    let (engine, run) =
                        CopyEngine::new_local_with_clock(config, clock).expect("config");
                    let runner = spawn(run);
                    if foreground {
                        engine.note_foreground_io();
                    }
                    let done = engine.copy(job).await.expect("submit");
                    engine.close();
                    drop(engine);
                    runner.await;
                    done
                }
            });
            assert!(done.is_ok(), "{done:?}");
            let cost = std::time::Duration::from_secs_f64(piece_bytes / rate);
            let pieces_after_first = u32::try_from(PIECES - 1).expect("small");
            assert_eq!(
                clock.now(),
                cost * pieces_after_first,
                "foreground {foreground}"
            );
            let all = Extent::new(Sector(0), SectorCount(sectors));
            assert_eq!(dst.snapshot(all), src.snapshot(all));
        }
    }

    #[test]
    fn copies_to_every_destination() {
        let src = patterned("src", 1000);
        let (a, b) = (mem("a", 1000), mem("b", 2000));
        let done = with_local_engine(small_config(), {
            let (src, a, b) = (src.clone(), a.clone(), b.clone());
            async move |engine: CopyEngine| {
                let job =
                    CopyJob::copy(loc(&src, 8, 600), vec![loc(&a, 8, 600), loc(&b, 1000, 600)]);
                engine.copy(job).await.expect("submit")
            }
        });
        assert!(done.is_ok(), "{done:?}");
        assert_eq!(done.sectors_done, SectorCount(600));
        let want = src.snapshot(Extent::new(Sector(8), SectorCount(600)));
        assert_eq!(a.snapshot(Extent::new(Sector(8), SectorCount(600))), want);
        assert_eq!(
            b.snapshot(Extent::new(Sector(1000), SectorCount(600))),
            want
        );
        assert!(
            a.snapshot(Extent::new(Sector(0), SectorCount(8)))
                .iter()
                .all(|&x| x == 0),
            "outside untouched"
        );
    }

    #[test]
    fn zeroes_with_and_without_offload() {
        let offloads = patterned("t", 256);
        let plain = MemDevice::new_without_write_zeroes("p", SectorCount(256));
        plain.poke(Sector(0), &offloads.contents());
        let done = with_local_engine(small_config(), {
            let (a, b) = (offloads.clone(), plain.clone());
            async move |engine: CopyEngine| {
                engine
                    .copy(CopyJob::zero(vec![loc(&a, 16, 100), loc(&b, 16, 100)]))
                    .await
                    .expect("zero")
            }
        });
        assert!(done.is_ok());
        for target in [&offloads, &plain] {
            assert!(target
                .snapshot(Extent::new(Sector(16), SectorCount(100)))
                .iter()
                .all(|&x| x == 0));
            assert!(target
                .snapshot(Extent::new(Sector(116), SectorCount(1)))
                .iter()
                .any(|&x| x != 0));
        }
    }

    #[test]
    fn write_errors_name_the_failed_destination() {
        let src = patterned("src", 512);
        let good = mem("good", 512);
        let bad = FaultyDevice::new(mem("bad", 512), FaultConfig::default());
        bad.fail_extent(OpKind::Write, Extent::new(Sector(100), SectorCount(1)));
        let done = with_local_engine(small_config(), {
            let (src, good, bad) = (src.clone(), good.clone(), bad.clone());
            async move |engine: CopyEngine| {
                let bad: DeviceRef = bad;
                let dests = vec![
                    loc(&good, 0, 512),
                    Location::new(&bad, Extent::new(Sector(0), SectorCount(512))),
                ];
                engine
                    .copy(CopyJob::copy(loc(&src, 0, 512), dests).ignoring_errors())
                    .await
                    .expect("copy")
            }
        });
        assert_eq!(done.write_errors.iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(done.read_error, None);
        assert_eq!(
            good.contents(),
            src.contents(),
            "the good destination is complete"
        );
    }

    #[test]
    fn read_error_stops_the_job_and_writes_nothing_unknown() {
        let src = FaultyDevice::new(patterned("src", 512), FaultConfig::default());
        src.fail_extent(OpKind::Read, Extent::new(Sector(0), SectorCount(16)));
        let dest = mem("d", 512);
        let config = CopyConfig {
            sub_jobs_per_job: 1,
            ..small_config()
        };
        let done = with_local_engine(config, {
            let (src, dest) = (src.clone(), dest.clone());
            async move |engine: CopyEngine| {
                let src: DeviceRef = src;
                let job = CopyJob::copy(
                    Location::new(&src, Extent::new(Sector(0), SectorCount(512))),
                    vec![loc(&dest, 0, 512)],
                );
                engine.copy(job).await.expect("copy")
            }
        });
        assert_eq!(done.read_error, Some(libc::EIO));
        assert_eq!(done.sectors_done, SectorCount(0));
        assert!(dest.contents().iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_jobs_are_refused() {
        let (a, b) = (mem("a", 64), mem("b", 32));
        assert!(
            CopyJob::copy(loc(&a, 0, 64), vec![loc(&b, 0, 64)])
                .validate()
                .is_err(),
            "off the end"
        );
        assert!(
            CopyJob::copy(loc(&a, 0, 16), vec![loc(&b, 0, 8)])
                .validate()
                .is_err(),
            "lengths differ"
        );
        assert!(
            CopyJob::copy(loc(&a, 0, 16), vec![]).validate().is_err(),
            "no destination"
        );
        assert!(
            CopyJob::copy(loc(&a, 0, 1), vec![loc(&b, 0, 1); 9])
                .validate()
                .is_err(),
            "nine"
        );
        let bad = CopyConfig {
            sub_job_sectors: SectorCount(12),
            ..CopyConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn cancel_stops_a_job() {
        let src = patterned("src", 4096);
        let dest = FaultyDevice::new(
            mem("d", 4096),
            FaultConfig {
                max_delay_turns: 3,
                ..Default::default()
            },
        );
        let config = CopyConfig {
            sub_jobs_per_job: 1,
            ..small_config()
        };
        let done = with_local_engine(config, {
            let (src, dest) = (src.clone(), dest.clone());
            async move |engine: CopyEngine| {
                let dest: DeviceRef = dest;
                let completions = Completions::new();
                let job = CopyJob::copy(
                    loc(&src, 0, 4096),
                    vec![Location::new(
                        &dest,
                        Extent::new(Sector(0), SectorCount(4096)),
                    )],
                );
                let id = engine.submit(job, 9, &completions).await.expect("submit");
                for _ in 0..20 {
                    smol::future::yield_now().await;
                }
                assert!(engine.cancel(id));
                completions.next().await
            }
        });
        assert!(done.cancelled);
        assert_eq!(done.token, 9);
        assert!(
            done.sectors_done.0 > 0 && done.sectors_done.0 < 4096,
            "{done:?}"
        );
    }

    #[test]
    fn foreground_jobs_overtake_background_ones() {
        let src = patterned("src", 64);
        let dest = mem("d", 64 * 16);
        let config = CopyConfig {
            jobs_in_flight_max: 1,
            ..small_config()
        };
        let order = with_local_engine(config, {
            let (src, dest) = (src.clone(), dest.clone());
            async move |engine: CopyEngine| {
                let completions = Completions::new();
                for token in 0..6u64 {
                    let prio = if token == 5 {
                        Priority::Foreground
                    } else {
                        Priority::Background
                    };
                    let job = CopyJob::copy(loc(&src, 0, 64), vec![loc(&dest, token * 64, 64)])
                        .with_priority(prio);
                    engine
                        .submit(job, token, &completions)
                        .await
                        .expect("submit");
                }
                let mut order = Vec::new();
                for _ in 0..6 {
                    order.push(completions.next().await.token);
                }
                order
            }
        });
        // Job 0 was already running; the foreground job goes next, before jobs 1..=4.
        assert_eq!(order, vec![0, 5, 1, 2, 3, 4]);
    }

    #[test]
    fn a_full_queue_says_busy() {
        let src = patterned("src", 64);
        let dest = mem("d", 64);
        let config = CopyConfig {
            queue_max: 1,
            jobs_in_flight_max: 1,
            ..small_config()
        };
        with_local_engine(config, {
            let (src, dest) = (src.clone(), dest.clone());
            async move |engine: CopyEngine| {
                let completions = Completions::new();
                let job = || CopyJob::copy(loc(&src, 0, 64), vec![loc(&dest, 0, 64)]);
                // The engine has not run yet, so the channel (capacity 1) fills at once.
                engine
                    .try_submit(job(), 1, &completions)
                    .map_err(|_| ())
                    .expect("first fits");
                assert!(matches!(
                    engine.try_submit(job(), 2, &completions),
                    Err(TrySubmitError::Busy(_))
                ));
                assert!(completions.next().await.is_ok());
            }
        });
    }

    /// The engine runs on its own thread and ring; the client awaits it from another thread
    /// whose ring sleeps in io_uring_enter, as a ublk queue thread's does. The completion's
    /// off-thread wake must reach that ring.
    #[test]
    fn engine_thread_wakes_a_sleeping_client_ring() {
        let src = patterned("src", 2048);
        let dest = mem("d", 2048);
        let engine = CopyEngine::start(small_config()).expect("start");
        let client = {
            let (engine, src, dest) = (engine.clone(), src.clone(), dest.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    let job = CopyJob::copy(loc(&src, 0, 2048), vec![loc(&dest, 0, 2048)])
                        .with_priority(Priority::Foreground);
                    engine.copy(job).await.expect("copy")
                })
            })
        };
        let done = client.join().expect("client thread");
        assert!(done.is_ok());
        assert_eq!(dest.contents(), src.contents());
        let stats = engine.stats();
        assert_eq!(stats.bytes_done, 2048 * 512);
        assert!(stats.memory_peak <= stats.memory_budget);
        engine.shutdown();
    }
}
