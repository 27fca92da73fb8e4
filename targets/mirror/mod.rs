//! The mirror target: N-way RAID1 (2..=8 legs) with persistent, self-describing metadata on
//! every leg, a write-intent bitmap, background resync through the copy engine, read
//! balancing with repair, scrubbing, and runtime leg management.
//!
//! # Files
//! - `superblock.rs`: the on-disk layout of a leg, the superblock (two torn-write-safe
//!   slots), and the probe for blank, foreign and damaged devices.
//! - `meta.rs`: the replicated metadata device that carries the one dirty log to every
//!   live leg (and why one replicated log rather than one log per leg).
//! - `state.rs`: the in-memory state under the mirror's lock (region map + slot table).
//! - `io.rs`: reads (balancing, splitting, retry and repair), writes (the region protocol),
//!   in copy mode and zero copy (registered buffers, the fallback to copy mode),
//!   flushes, discards; leg failure and superblock updates.
//! - `resync.rs`: the resync driver (copies, lazy clearing, scrub), run as a local task or on
//!   its own thread.
//! - `survey.rs`: what the given legs are (members, missing, unreadable, blank...) and the
//!   assembly plan: which legs run, which slots are absent and why, split brain.
//! - `discover.rs`: finding legs by the mirror's UUID on the machine's block devices, the
//!   scan of `assemble --scan`, and the spec that follows the legs.
//! - `assemble.rs`: create, assemble (degraded when legs are absent), and adding legs (new or
//!   returning).
//! - `grow.rs`: growing the mirror onto bigger legs (`mirror grow`): the swap of its
//!   geometry under a live device, and the crash-safe order of the metadata updates.
//! - `commands.rs`: runtime commands and the status report (JSON).
//! - `report.rs`: what a person reads: each command's line and the `ublkdm status` report.
//!
//! # How the pieces follow the region protocol
//! - **Writes** are cut into pieces of at most `Tuning::write_piece_regions` regions, written
//!   one after another (a large discard moves on while the resync runs), and each piece
//!   splits at regions; `begin_write` for each (waiting while a region recovers),
//!   one `DirtyLog::mark` for the regions that need it, then the legs (every in-sync leg, and
//!   recovering legs where the region is already copied: one I/O per leg for each run of
//!   regions that go to the same legs, so one in all unless a leg recovers), then `end_write`
//!   with whether every leg took the piece. A leg that fails is failed at once (in memory, then in the
//!   superblocks of the survivors), and the write is acknowledged only after that update is
//!   durable, so no acknowledged write can later be "resynced away" from a stale leg. A
//!   write that no in-sync leg took fails with EIO, even if a recovering leg took it.
//! - **Reads** of an in-sync region go to any active leg (least in flight first; large reads
//!   split across legs); reads of an out-of-sync region go to its resync source only.
//! - **Zero copy** ([`Target::zero_copy`]): a request's buffer may be a kernel buffer
//!   registered on the queue's ring. A write hands the one buffer to every leg, a split read
//!   fills slices of it from several legs; the bitmap, retries, repair and leg failures are
//!   as in copy mode. A leg refusing the buffer sends the request back to copy mode
//!   (`NeedsCopy`), regions a leg may have written left out of sync (see `io.rs`). Resync,
//!   scrub and metadata always use owned memory.
//! - **Resync** copies out-of-sync regions from the source (the first in-sync leg, or the
//!   leg a read-error repair named) to every other active leg, one engine job per region. A
//!   recovering leg is promoted to in sync only once every region is, after a flush.
//! - **Degraded** (a stale or failed leg in the table): no dirty bit is cleared; a leg that
//!   returns is resynced from the bitmap if its event counter is at least `events_cleared`,
//!   else fully. A recovering leg is present, not missing: bits of regions already copied to
//!   it are cleared as usual, so a crash resumes its resync where it was.
//!
//! # Invariants across a power cut
//! - acknowledged writes followed by a completed flush (or FUA) survive on every leg the
//!   slot table calls in sync: a resync source after the crash never lacks them;
//! - every region whose legs may differ has its dirty bit set on every live leg's log copy;
//! - assembly starts from the freshest legs: a leg it cannot open or read, or one that is
//!   behind, is left out (the mirror runs degraded, `status` says why); it refuses when no
//!   current in-sync leg is present and on split brain (two legs each written while the other
//!   was away), the only cases where starting could lose acknowledged writes. A leg left out
//!   was behind or absent when the present ones were last written, so they hold every
//!   acknowledged write it holds.
//!
//! # Threads
//! Every future is `!Send` and runs on the thread that awaits it; the state is behind a
//! `std::sync::Mutex` never held across an await, the dirty log and the copy engine are
//! shared, and wakers may fire across threads. [`MirrorTarget::resync_task`] is the resync
//! driver as a future: the daemon runs it on a thread of its own
//! ([`MirrorTarget::start_resync_thread`]), simulations spawn it as a local task and call
//! [`MirrorTarget::tick`] themselves.

mod assemble;
mod behind;
pub mod commands;
pub mod discover;
mod grow;
mod io;
mod kind;
mod meta;
mod remote;
mod report;
mod resolve;
mod resync;
mod state;
mod superblock;
mod survey;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use smol::lock::{Mutex as AsyncMutex, RwLock as AsyncRwLock};
use uuid::Uuid;

pub use behind::{LegOptions, WRITE_BEHIND_MAX};
pub use commands::MirrorCommand;
pub use kind::{MirrorKind, MirrorSpec};
pub use remote::{is_remote, leg_path};
pub use superblock::{
    own_metadata, probe, Layout, LegState, Probe, Superblock, MAX_LEGS, MIN_LEGS,
};
pub use survey::{GivenLeg, LegSet};

/// The kind, for the registry.
pub fn kind() -> Box<dyn crate::registry::TargetKind> {
    Box::new(MirrorKind)
}

use self::meta::MetaDevice;
use self::state::State;
use crate::copy::{Completions, CopyConfig, CopyEngine, ThrottleConfig};
use crate::device::reactor;
use crate::device::{
    check_distinct, owned_read, AlignedBuf, BlockDevice, DeviceInfo, DeviceRef, IoBuf, IoFuture,
    IoReadDone, OpenOptions, ReadDone, UringDevice, WriteBuf, WriteFlags,
};
use crate::error::Result;
use crate::region::{DirtyLog, RegionGeometry};
use crate::target::{Target, TargetSpec};
use crate::task::{join_all, Notify};
use crate::units::{Extent, Sector, SectorCount};

/// How to create a mirror.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Region size in sectors (a power of two, at least 8); `None` for the default.
    pub region_size: Option<SectorCount>,
    /// Declare the legs identical: no initial copy.
    pub nosync: bool,
    /// Create over legs that carry foreign metadata (a file system, LVM, md, a damaged
    /// mirror superblock). Never over a leg that carries a valid mirror superblock, and it
    /// plays no part in an assembly.
    pub force: bool,
}

/// Knobs of the running mirror.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Resync copies in flight at once.
    pub resync_depth: usize,
    /// Reads at least this long are split across the legs.
    pub read_split: SectorCount,
    /// Dirty bits are cleared at a tick with no write since the previous tick, or at the
    /// latest every this many ticks.
    pub clean_every_ticks: u64,
    /// Most bits cleared by one commit.
    pub clear_batch: usize,
    /// The resync thread's tick (lazy clearing, retrying stuck regions).
    pub tick: Duration,
    /// Most regions one piece of a write, discard or write-zeroes covers: a larger request is
    /// written piece by piece, so it makes progress while the resync runs.
    pub write_piece_regions: u64,
    /// Write-mostly and write-behind legs, by slot (see `behind.rs`).
    pub leg_options: BTreeMap<usize, LegOptions>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            resync_depth: 4,
            read_split: SectorCount(256),
            clean_every_ticks: 5,
            clear_batch: 4096,
            tick: Duration::from_secs(1),
            write_piece_regions: 64,
            leg_options: BTreeMap::new(),
        }
    }
}

/// What a mirror runs with: its copy engine (owned: it is closed when the mirror is
/// dropped) and its knobs.
pub struct MirrorEnv {
    pub engine: CopyEngine,
    pub tuning: Tuning,
}

impl MirrorEnv {
    /// An environment with a copy engine of its own thread.
    pub fn start(throttle: ThrottleConfig, tuning: Tuning) -> Result<MirrorEnv> {
        let config = CopyConfig {
            throttle,
            ..CopyConfig::default()
        };
        Ok(MirrorEnv {
            engine: CopyEngine::start(config)?,
            tuning,
        })
    }
}

/// Options of `add-leg` and `replace-leg`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AddLegOptions {
    /// Overwrite a device that carries other metadata.
    pub force: bool,
    /// Put the leg in this slot (which must be empty).
    pub slot: Option<usize>,
    /// The leg is the other side of a split brain and the user chose this side
    /// (`resolve --keep-local`): it joins with a full resync, its own writes discarded.
    pub discard_theirs: bool,
}

/// A running mirror (see the module doc). Dropping it stops the resync driver and the copy
/// engine.
pub struct MirrorTarget {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

/// What the target, its futures and its resync driver share.
pub(crate) struct Inner {
    uuid: Uuid,
    /// What a grow changes (see `grow.rs`): replaced only while `gate` is held exclusively,
    /// so a request or a resync step reads the same shape for its whole life.
    shape: RwLock<Shape>,
    /// Held shared by every request and by the resync driver while it works; a grow holds
    /// it exclusively (it waits for them to end and holds new ones back).
    gate: AsyncRwLock<()>,
    /// A grow waits for the gate: the resync driver starts no copy and lets the gate go.
    growing: AtomicBool,
    /// What the mirror was built with; its size is the size then (see [`BlockDevice::size`]).
    info: DeviceInfo,
    state: Mutex<State>,
    meta: Arc<MetaDevice>,
    engine: CopyEngine,
    completions: Completions,
    tuning: Tuning,
    /// Wakes the resync driver: new work, a tick, a stop.
    kick: Notify,
    /// A region's recovery ended: writes waiting for it retry.
    recovered: Notify,
    /// Serialises superblock updates.
    sb_lock: AsyncMutex<()>,
    stopping: AtomicBool,
    ticks: AtomicU64,
    /// The legs the assembly left out and why (for `status`).
    report: survey::AssemblyReport,
    /// The I/O in flight to write-behind legs, in issue order (see `behind.rs`).
    behind: Arc<behind::BehindLedger>,
    /// Remote legs away: failed ones waiting for their link, absent ones being reached.
    remotes: remote::Remotes,
    /// Legs refused for split brain, waiting for `resolve` (see `resolve.rs`).
    held: Mutex<Vec<resolve::HeldLeg>>,
}

/// The geometry-dependent part of a mirror: its layout, regions and dirty log.
pub(crate) struct Shape {
    layout: Layout,
    geometry: RegionGeometry,
    log: Arc<DirtyLog>,
}

impl Shape {
    fn new(layout: Layout, log: DirtyLog) -> Shape {
        assert_eq!(log.geometry(), &layout.geometry(), "a log of the layout");
        Shape {
            layout,
            geometry: layout.geometry(),
            log: Arc::new(log),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("mirror state")
    }

    fn shape(&self) -> RwLockReadGuard<'_, Shape> {
        self.shape.read().expect("mirror shape")
    }

    /// The layout now (stable while the caller holds `gate`).
    fn layout(&self) -> Layout {
        self.shape().layout
    }

    /// The region geometry now (stable while the caller holds `gate`).
    fn geometry(&self) -> RegionGeometry {
        self.shape().geometry
    }

    /// The dirty log now (the same one while the caller holds `gate`).
    fn log(&self) -> Arc<DirtyLog> {
        Arc::clone(&self.shape().log)
    }

    /// Runs `work` holding the gate shared: a grow waits for it, and holds it back.
    async fn gated<T>(self: Arc<Self>, work: impl std::future::Future<Output = T>) -> T {
        let _gate = self.gate.read().await;
        work.await
    }

    fn kick(&self) {
        self.kick.notify_all();
    }

    /// Where the data of the mirror's sector `at` is on every leg.
    fn leg_sector(&self, at: Sector) -> Sector {
        self.layout().data_offset + (at - Sector(0))
    }
}

impl MirrorTarget {
    fn from_inner(inner: Arc<Inner>) -> MirrorTarget {
        MirrorTarget {
            inner,
            thread: Mutex::new(None),
        }
    }

    /// [`MirrorTarget::open_set`] over devices that all opened.
    pub async fn open(
        legs: Vec<DeviceRef>,
        options: &CreateOptions,
        env: MirrorEnv,
    ) -> Result<MirrorTarget> {
        MirrorTarget::open_set(LegSet::opened(legs), options, env).await
    }

    /// Probes the legs of `set`: if any carries a mirror superblock (or `set.uuid` names a
    /// mirror), assembles that mirror from the legs that are current, degraded without the
    /// missing, unreadable and stale ones ([`MirrorTarget::assemble_set`]); otherwise
    /// creates a new mirror, which needs every leg present and blank (`force`: or foreign).
    /// Running the same command twice assembles what the first created.
    pub async fn open_set(
        set: LegSet,
        options: &CreateOptions,
        env: MirrorEnv,
    ) -> Result<MirrorTarget> {
        assemble::open(set, options, env)
            .await
            .map(MirrorTarget::from_inner)
    }

    /// Writes new metadata on `legs` and starts a mirror over them; unless `nosync`, leg 0
    /// is copied to the others in the background.
    pub async fn create(
        legs: Vec<DeviceRef>,
        options: &CreateOptions,
        env: MirrorEnv,
    ) -> Result<MirrorTarget> {
        assemble::create(legs, options, env)
            .await
            .map(MirrorTarget::from_inner)
    }

    /// [`MirrorTarget::assemble_set`] over devices that all opened.
    pub async fn assemble(legs: Vec<DeviceRef>, env: MirrorEnv) -> Result<MirrorTarget> {
        MirrorTarget::assemble_set(LegSet::opened(legs), env).await
    }

    /// Starts the mirror the legs of `set` carry (`set.uuid`, or the one mirror their
    /// superblocks name); never creates and never writes to a leg it does not take in. The
    /// freshest legs decide; legs missing, unreadable or stale are left out and the mirror
    /// runs degraded (`status` names them and why). Refuses when no current in-sync leg is
    /// present (not found) and on split brain (corrupt).
    pub async fn assemble_set(set: LegSet, env: MirrorEnv) -> Result<MirrorTarget> {
        assemble::assemble(set, env)
            .await
            .map(MirrorTarget::from_inner)
    }

    /// The resync driver (copies, lazy clearing, scrub), to run as a task on any executor.
    /// It ends after [`MirrorTarget::stop`] once its copies in flight have completed.
    pub fn resync_task(&self) -> impl std::future::Future<Output = ()> + 'static {
        Arc::clone(&self.inner).drive()
    }

    /// Runs the resync driver on a thread of its own, with a ticker every `Tuning::tick`.
    pub fn start_resync_thread(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let handle = reactor::spawn_ring_thread("ublkdm-mirror", move || async move {
            let ticker = reactor::spawn(Arc::clone(&inner).ticker());
            inner.drive().await;
            ticker.await;
        })?;
        *self.thread.lock().expect("resync thread") = Some(handle);
        Ok(())
    }

    /// One tick of the cleaner's clock: dirty bits of quiet regions may be cleared, and
    /// regions that could not be read are retried.
    pub fn tick(&self) {
        self.inner.ticks.fetch_add(1, Ordering::Relaxed);
        self.inner.kick();
    }

    /// Asks the resync driver to finish.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.inner.kick();
    }

    pub fn uuid(&self) -> Uuid {
        self.inner.uuid
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout()
    }

    /// The state of every slot.
    pub fn leg_states(&self) -> Vec<LegState> {
        self.inner.lock().legs.iter().map(|l| l.state).collect()
    }

    /// Whether every region is in sync and every present leg is in sync.
    pub fn is_synced(&self) -> bool {
        let st = self.inner.lock();
        st.map.sync_count() == st.map.geometry().count()
            && st.legs.iter().all(|l| l.state != LegState::Recovering)
    }

    /// Adds a leg: a returning leg of this mirror is resynced from the bitmap when it can be,
    /// any other device fully. Returns its slot.
    pub async fn add_leg(&self, dev: DeviceRef, options: AddLegOptions) -> Result<usize> {
        Arc::clone(&self.inner).add_leg(dev, options).await
    }

    /// Stops using the leg in `slot` (it stays in the table as failed, so the mirror is
    /// degraded until it is added back or removed).
    pub async fn fail_leg(&self, slot: usize) -> Result<()> {
        self.inner.fail_leg_command(slot).await
    }

    /// Takes the leg in `slot` out of the mirror altogether.
    pub async fn remove_leg(&self, slot: usize) -> Result<()> {
        self.inner.remove_leg(slot).await
    }

    /// Replaces the leg in `slot` with `dev`, which is resynced fully.
    pub async fn replace_leg(&self, slot: usize, dev: DeviceRef, force: bool) -> Result<usize> {
        Arc::clone(&self.inner).replace_leg(slot, dev, force).await
    }

    /// Starts a scrub pass: check counts regions whose legs differ; repair also resyncs them.
    pub fn start_scrub(&self, repair: bool) -> Result<()> {
        self.inner.start_scrub(repair)
    }

    /// Runs a command (see [`Target::command`]) on the calling executor.
    pub async fn command_async(
        &self,
        name: &str,
        args: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        Arc::clone(&self.inner).command(name, args).await
    }
}

impl MirrorTarget {
    /// A request's future, holding the grow gate shared for its whole life.
    fn gated<T: 'static>(
        &self,
        work: impl std::future::Future<Output = T> + 'static,
    ) -> IoFuture<T> {
        Box::pin(Arc::clone(&self.inner).gated(work))
    }
}

impl Drop for MirrorTarget {
    fn drop(&mut self) {
        self.stop();
        let thread = self.thread.lock().expect("resync thread").take();
        if let Some(thread) = thread {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    log::error!("the mirror's resync thread: {}", err.chain().join(": "))
                }
                Err(_) => log::error!("the mirror's resync thread panicked"),
            }
        }
        self.inner.engine.shutdown();
    }
}

impl BlockDevice for MirrorTarget {
    fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// The data size now: `mirror grow` raises it.
    fn size(&self) -> SectorCount {
        self.inner.geometry().device_size()
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        self.gated(Arc::clone(&self.inner).read_op(offset, buf))
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        let extent = Extent::new(offset, buf.sectors());
        let buf = IoBuf::Owned(buf);
        self.gated(Arc::clone(&self.inner).write_op(extent, io::LegOp::Write { buf, flags }))
    }

    /// Owned memory as [`BlockDevice::read`]; a registered buffer is filled by the legs
    /// themselves, part by part (zero copy, see `io.rs`).
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        match buf {
            IoBuf::Owned(owned) => owned_read(self.read(offset, owned)),
            IoBuf::Registered(reg) => {
                self.gated(Arc::clone(&self.inner).read_registered(offset, reg))
            }
        }
    }

    /// Owned memory as [`BlockDevice::write`]; a registered buffer goes, the same one, to
    /// every leg that takes the write (zero copy, see `io.rs`).
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        match buf {
            IoBuf::Owned(owned) => self.write(offset, owned, flags),
            reg @ IoBuf::Registered(_) => {
                // A registered buffer's length comes from a request: checked, not asserted.
                let sectors = match reg.sectors() {
                    Ok(sectors) => sectors,
                    Err(err) => return Box::pin(std::future::ready(Err(err))),
                };
                let extent = Extent::new(offset, sectors);
                let op = io::LegOp::Write { buf: reg, flags };
                self.gated(Arc::clone(&self.inner).write_op(extent, op))
            }
        }
    }

    fn flush(&self) -> IoFuture<std::io::Result<()>> {
        Box::pin(Arc::clone(&self.inner).flush_op())
    }

    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        if !self.inner.info.discard {
            return Box::pin(std::future::ready(Err(crate::device::errno(
                libc::EOPNOTSUPP,
            ))));
        }
        self.gated(Arc::clone(&self.inner).write_op(extent, io::LegOp::Discard))
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.gated(Arc::clone(&self.inner).write_op(extent, io::LegOp::WriteZeroes))
    }
}

impl Target for MirrorTarget {
    fn kind(&self) -> &'static str {
        "mirror"
    }

    /// The mirror never needs a request's bytes: the legs read and write the request's own
    /// buffer (`io.rs`), and whatever must see data (resync, scrub, metadata) uses memory of
    /// its own through the copy engine.
    fn zero_copy(&self) -> bool {
        true
    }

    fn status(&self) -> serde_json::Value {
        self.inner.status()
    }

    /// Runs a command. Commands that touch devices block the calling thread on a ring of its
    /// own: call this from the control thread, never from a thread serving this mirror's I/O.
    fn command(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value> {
        let command = MirrorCommand::parse(name, args)?;
        let inner = Arc::clone(&self.inner);
        reactor::try_block_on(async move { inner.run(command).await })?
    }

    /// `ublkdm resize` of a mirror is `mirror grow`: to all the legs hold (`None`), or to
    /// `to` sectors only when that is what they hold (or the present size: nothing to do).
    fn resize(&self, to: Option<SectorCount>) -> Result<SectorCount> {
        if to == Some(self.size()) {
            return Ok(self.size());
        }
        let inner = Arc::clone(&self.inner);
        reactor::try_block_on(async move { inner.grow(to).await })??;
        Ok(self.size())
    }

    fn command_grows(&self, name: &str, _args: &serde_json::Value) -> bool {
        name == "grow"
    }

    fn spec(&self, built_from: &TargetSpec) -> TargetSpec {
        self.current_spec(built_from)
    }

    fn shutdown(&self) -> IoFuture<std::io::Result<()>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let res = Arc::clone(&inner).flush_op().await;
            inner.stopping.store(true, Ordering::Relaxed);
            inner.kick();
            res
        })
    }
}

/// Opens the legs of `spec` and creates or assembles the mirror, with its own copy engine
/// and resync thread.
pub fn open_mirror(spec: &MirrorSpec) -> Result<Arc<dyn Target>> {
    open_mirror_with(spec, spec.resync_throttle, Tuning::default())
}

/// [`open_mirror`] with a resync throttle (floor and ceiling) and tuning. The spec's leg
/// options are the user's and win over those of `tuning` for the same slot.
pub fn open_mirror_with(
    spec: &MirrorSpec,
    throttle: ThrottleConfig,
    mut tuning: Tuning,
) -> Result<Arc<dyn Target>> {
    tuning.leg_options.extend(&spec.leg_options);
    let options = CreateOptions {
        region_size: (spec.region_size_sectors != 0)
            .then_some(SectorCount(spec.region_size_sectors)),
        nosync: spec.nosync,
        force: spec.force,
    };
    // With the mirror's UUID in the spec, its legs are found by their superblocks.
    let found = discover::leg_paths(spec)?;
    check_distinct(&found)?;
    let set = LegSet {
        legs: open_legs(&found),
        uuid: spec.uuid,
    };
    start_mirror(set, &options, throttle, tuning)
}

/// Creates or assembles the mirror of `set` ([`MirrorTarget::open_set`]) with its own copy
/// engine and resync thread.
pub fn start_mirror(
    set: LegSet,
    options: &CreateOptions,
    throttle: ThrottleConfig,
    tuning: Tuning,
) -> Result<Arc<dyn Target>> {
    let env = MirrorEnv::start(throttle, tuning)?;
    let options = options.clone();
    let unreached: Vec<PathBuf> = set
        .legs
        .iter()
        .filter_map(|leg| match leg {
            GivenLeg::Unopened { path, .. } if is_remote(path) => Some(path.clone()),
            _ => None,
        })
        .collect();
    let target =
        reactor::try_block_on(async move { MirrorTarget::open_set(set, &options, env).await })??;
    target.inner.remotes.retry(unreached);
    target.start_resync_thread()?;
    Ok(Arc::new(target))
}

/// Opens every leg of `paths`, exclusively; a leg that cannot be opened is kept with its
/// error rather than failing the request, so an assembly can go on without it (a create
/// then refuses with that error).
pub fn open_legs(paths: &[PathBuf]) -> Vec<GivenLeg> {
    paths
        .iter()
        .map(|path| match open_leg(path) {
            Ok(dev) => GivenLeg::Opened(dev),
            Err(error) => {
                log::warn!(
                    "cannot open leg {}: {}",
                    path.display(),
                    error.chain().join(": ")
                );
                GivenLeg::Unopened {
                    path: path.clone(),
                    error,
                }
            }
        })
        .collect()
}

/// Opens a leg: a local device exclusively, a remote one (an NBD URL) by connecting to it.
pub fn open_leg(path: &Path) -> Result<DeviceRef> {
    if is_remote(path) {
        return remote::open_remote(path);
    }
    Ok(Arc::new(UringDevice::open(path, OpenOptions::default())?))
}

#[cfg(test)]
mod grow_tests;
#[cfg(test)]
mod remote_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod zc_tests;
