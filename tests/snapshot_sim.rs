//! A deterministic, seeded simulation of the snapshot target: concurrent origin and
//! snapshot reads, writes (some FUA) and flushes over
//! `FaultyDevice<MemDevice::new_volatile>` origin and COW devices with random completion
//! delays, snapshot create/delete (between batches or with requests in flight), merges
//! (started between batches or with requests in flight), COW overflow (a small store in
//! some seeds), origins whose last chunk is short and ends inside a 4 KiB block (a quarter
//! of the seeds), seeded read and write errors on both devices (half the seeds; some failed
//! writes land in part first, as a real device's may), FUA done as write-then-flush (half
//! the seeds, so a power cut can tear a log block or a superblock), and power cuts at
//! random points (between batches, with requests and a command in flight, in the middle of a
//! merge, and after an orderly stop, which must have made every acknowledged write durable),
//! after which the group is reopened from the two devices (each instance sees
//! them through a fence that a power cut closes, so nothing the old one had going, such as
//! a copy job, lands afterwards).
//!
//! Everything runs on `run_local` (a local copy engine, the merge driver as a local task),
//! so a seed replays exactly: `SEED=n` runs one seed, `SEEDS=n` the first n, `BATCHES=n`
//! sets their length, `TRACE=1` prints what happens; a failure prints the seed.
//!
//! Oracle, per sector and per image (the origin and each snapshot), each write stamping a
//! unique tag: a read returns the last acknowledged tag, or one of the tags the sector may
//! hold: after a power cut the last durable one or any written since; after a write that
//! failed, the old ones or the failed write's. A snapshot starts as the origin's image when
//! it was taken; taken with origin writes in flight, each of them is wholly in the image or
//! wholly out (checked on a full read of the new snapshot), and one issued after the
//! command returned is out (for a merge: wholly in the origin, or wholly overwritten by the
//! snapshot's image; one issued after it is in). A snapshot the store reports invalid fails
//! every request with EIO (one invalidated only in memory because its metadata could not be
//! written may come back after a power cut, and must then read right). Without injected
//! errors the origin never fails and a snapshot that failed a request must be invalid; a
//! command that failed on an I/O error may still have taken effect if a power cut comes
//! before the next successful commit. After a merge starts the origin's image is the
//! snapshot's (in-flight writes to either wholly before or after), and it stays so through
//! power cuts in the middle of the merge and after it ends. While no merge, torn batch or
//! error muddies it, the COW chunks in use must equal a model of sharing: one chunk per
//! distinct copied image, whatever the number of snapshots. After every reopen every image
//! is read whole and checked. At the end the errors are healed, a stalled merge is resumed
//! by a restart, and everything is read once more.

mod common;

use std::cell::{Cell as Flag, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_task::Task;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use smol::future::yield_now;
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{
    AlignedBuf, BlockDevice, DeviceRef, FaultConfig, FaultyDevice, IoFuture, MemDevice, ReadDone,
    WriteFlags,
};
use ublkdm::error::ErrorKind;
use ublkdm::target::Target;
use ublkdm::targets::snapshot::{GroupOptions, SnapshotGroup};
use ublkdm::units::{Extent, Sector, SectorCount};

use common::oracle::{trace, Cell, Sectors};
use common::{sectors as range, stamp, tag_of};
use ublkdm::device::{Forward, Forwarding};

/// How one write in a batch went, for the checks of a command run beside it.
#[derive(Default)]
struct Flight {
    failed: bool,
    /// Issued after the command beside it returned: it must come after it.
    late: bool,
}

/// A write in flight when a snapshot was taken or a merge started: wholly in the new image
/// or wholly out, checked on the next full read.
struct Pending {
    extent: Extent,
    tag: u64,
    flight: Rc<RefCell<Flight>>,
    /// Coming after the command puts it in the image (a merge), not out of it (a create).
    after_is_in: bool,
}

struct Model {
    sectors: Sectors,
    pending: Vec<Pending>,
    /// Bumped when the image is replaced (a merge): requests issued before that are judged
    /// by the pending checks, not by the cells.
    generation: u64,
}

impl Model {
    fn new(sectors: Sectors) -> Model {
        Model {
            sectors,
            pending: Vec::new(),
            generation: 0,
        }
    }
    /// A durable copy of this image.
    fn image(&self) -> Model {
        Model::new(self.sectors.image())
    }
    fn issue(&mut self, e: Extent, tag: u64) {
        self.sectors.issue(e, tag);
    }
    fn ack(&mut self, e: Extent, tag: u64, fua: bool) {
        self.sectors.ack(e, tag, fua);
    }
    fn fail(&mut self, e: Extent, tag: u64) {
        self.sectors.fail(e, tag);
    }
    fn acked(&self) -> Vec<u64> {
        self.sectors.acked()
    }
    fn flushed(&mut self, acked: &[u64]) {
        self.sectors.flushed(acked);
    }
    /// A power cut. A snapshot's image is durable when taken, so its pending checks stay; the
    /// origin's writes may be torn by the cut, so its own go.
    fn crash(&mut self, keep_pending: bool) {
        self.sectors.crash();
        if !keep_pending {
            self.pending.clear();
        }
    }
    fn check(&self, at: u64, tag: u64, what: &str) {
        self.sectors.check(at, tag, what);
    }
    /// After a full read: checks it (with the pending writes) and settles every sector on it.
    /// `durable`: right after a reopen, when what was read is durable.
    fn settle(&mut self, data: &[u8], what: &str, durable: bool) {
        let tags: Vec<u64> = data
            .chunks(512)
            .enumerate()
            .map(|(i, s)| tag_of(s, i as u64, what))
            .collect();
        for (at, &tag) in tags.iter().enumerate() {
            self.check(at as u64, tag, what);
        }
        for p in self.pending.drain(..) {
            let f = p.flight.borrow();
            if f.failed {
                continue;
            }
            let n = range(p.extent).filter(|&s| tags[s] == p.tag).count();
            let len = p.extent.len.0 as usize;
            trace(format_args!(
                "{what}: write {} beside the command is {}",
                p.tag,
                if n == 0 { "out" } else { "in" }
            ));
            assert!(
                n == 0 || n == len,
                "{what}: write {} at {} is torn by the command beside it: {n} of {len} \
                 sectors in the image",
                p.tag,
                p.extent
            );
            assert!(
                !f.late || n == if p.after_is_in { len } else { 0 },
                "{what}: write {} at {} issued after the command returned is {} its image",
                p.tag,
                p.extent,
                if n == 0 { "not in" } else { "in" }
            );
        }
        for (c, &tag) in self.sectors.cells.iter_mut().zip(&tags) {
            if durable {
                *c = Cell::settled(tag);
            } else {
                c.acked = tag;
                c.possible.clear();
            }
        }
    }
}

type ModelRef = Rc<RefCell<Model>>;

/// The sharing model: per snapshot, origin chunk -> image id.
#[derive(Default)]
struct Sharing {
    maps: BTreeMap<String, HashMap<u64, u64>>,
    next: u64,
}

impl Sharing {
    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
    fn origin_write(&mut self, chunks: std::ops::RangeInclusive<u64>) {
        for c in chunks {
            let g = self.fresh();
            for map in self.maps.values_mut() {
                map.entry(c).or_insert(g);
            }
        }
    }
    fn snap_write(&mut self, name: &str, chunks: std::ops::RangeInclusive<u64>) {
        if !self.maps.contains_key(name) {
            return;
        }
        for c in chunks {
            let current = self.maps[name].get(&c).copied();
            let shared = current.is_some_and(|g| {
                self.maps
                    .iter()
                    .any(|(n, m)| n != name && m.get(&c) == Some(&g))
            });
            if current.is_none() || shared {
                let g = self.fresh();
                self.maps.get_mut(name).expect("snapshot").insert(c, g);
            }
        }
    }
    fn used(&self) -> u64 {
        let all: BTreeSet<u64> = self
            .maps
            .values()
            .flat_map(|m| m.values().copied())
            .collect();
        all.len() as u64
    }
}

/// A FUA write done the way the block layer does it for a device without FUA: a plain write,
/// then a flush. A power cut in between can tear it (a log block, a superblock).
struct SplitFua {
    inner: DeviceRef,
    max_turns: u32,
    rng: Mutex<ChaCha8Rng>,
}

impl Forward for SplitFua {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        let write = self.inner.write(offset, buf, WriteFlags::default());
        if !flags.fua {
            return write;
        }
        let turns = self.rng.lock().expect("rng").gen_range(0..=self.max_turns);
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            write.await?;
            for _ in 0..turns {
                yield_now().await;
            }
            inner.flush().await
        })
    }
}

/// Writes that fail after part of them landed (any subset of their sectors), as a real
/// device's may: `FaultyDevice`'s failed writes never reach the device.
struct PartialOnError {
    inner: DeviceRef,
    /// The PRNG and the rate of such failures (0 once healed).
    state: Mutex<(ChaCha8Rng, f64)>,
}

impl PartialOnError {
    fn heal(&self) {
        self.state.lock().expect("state").1 = 0.0;
    }
}

impl Forward for PartialOnError {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        let keep: Option<Vec<bool>> = {
            let mut state = self.state.lock().expect("state");
            let rate = state.1;
            let rng = &mut state.0;
            rng.gen_bool(rate)
                .then(|| (0..buf.sectors().0).map(|_| rng.gen_bool(0.5)).collect())
        };
        let Some(keep) = keep else {
            return self.inner.write(offset, buf, flags);
        };
        // The sectors that land, as runs of single writes issued now.
        let mut writes = Vec::new();
        let mut i = 0;
        while i < keep.len() {
            if !keep[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < keep.len() && keep[i] {
                i += 1;
            }
            let bytes = &buf.as_slice()[start * 512..i * 512];
            writes.push(self.inner.write(
                offset + SectorCount(start as u64),
                Arc::new(AlignedBuf::from_slice(bytes)),
                WriteFlags::default(),
            ));
        }
        Box::pin(async move {
            for w in writes {
                let _ = w.await;
            }
            Err(eio())
        })
    }
}

/// What one instance of the group sees of a device: cut off at a power cut, so that nothing
/// the old instance still had going (a copy job of the engine) reaches the device after it.
struct Fenced {
    inner: DeviceRef,
    cut: Arc<AtomicBool>,
}

impl Fenced {
    fn gone<T: 'static>(value: T) -> IoFuture<T> {
        Box::pin(std::future::ready(value))
    }
    fn cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Forward for Fenced {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        if self.cut() {
            return Fenced::gone((Err(eio()), buf));
        }
        self.inner.read(offset, buf)
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if self.cut() {
            return Fenced::gone(Err(eio()));
        }
        self.inner.write(offset, buf, flags)
    }
    fn flush(&self) -> IoFuture<io::Result<()>> {
        if self.cut() {
            return Fenced::gone(Err(eio()));
        }
        self.inner.flush()
    }
    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if self.cut() {
            return Fenced::gone(Err(eio()));
        }
        self.inner.discard(extent)
    }
    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if self.cut() {
            return Fenced::gone(Err(eio()));
        }
        self.inner.write_zeroes(extent)
    }
}

struct Instance {
    /// Set at a power cut: the devices as this instance sees them go dead.
    cut: Arc<AtomicBool>,
    group: Arc<SnapshotGroup>,
    merger: Task<()>,
    runner: Task<()>,
}

/// A command run beside a batch.
enum Beside {
    Create(String, ModelRef),
    Delete(String),
    Merge(String),
}

/// What `spawn_batch` hands back.
struct Batch {
    tasks: Vec<Task<()>>,
    /// The extents of its requests, per image (`None`: the origin).
    taken: Vec<(Option<String>, Extent)>,
    /// Origin writes: extent, tag, how they went.
    origin_writes: Vec<(Extent, u64, Rc<RefCell<Flight>>)>,
    /// Snapshot writes: snapshot, extent, tag, how they went.
    snap_writes: Vec<(String, Extent, u64, Rc<RefCell<Flight>>)>,
    /// Set when the command beside the batch returns.
    command_done: Rc<Flag<bool>>,
    /// Snapshots that failed a request (without injected errors they must be invalid).
    failed: Rc<RefCell<BTreeSet<String>>>,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    origin_mem: Arc<MemDevice>,
    cow_mem: Arc<MemDevice>,
    origin_faulty: Arc<FaultyDevice<MemDevice>>,
    cow_faulty: Arc<FaultyDevice<MemDevice>>,
    origin_partial: Arc<Forwarding<PartialOnError>>,
    cow_partial: Arc<Forwarding<PartialOnError>>,
    origin_dev: DeviceRef,
    cow_dev: DeviceRef,
    /// Errors are injected (until the end).
    faults: bool,
    chunk: u64,
    /// Sectors the group serves: the origin's, in whole blocks of `block` sectors (the larger
    /// of the origin's and the COW device's).
    size: u64,
    block: u64,
    origin: ModelRef,
    snaps: BTreeMap<String, ModelRef>,
    /// Snapshots reported invalid (their requests must fail), with their reason and image
    /// when invalidated.
    invalid: BTreeMap<String, (String, ModelRef)>,
    merging: Option<String>,
    /// Snapshots a create or delete cut short by a power cut may have left: they may or may
    /// not exist after the reopen.
    limbo: BTreeMap<String, ModelRef>,
    /// Commands that failed on an I/O error: part of their record may have landed, so until
    /// a commit succeeds (which starts a new log area) a power cut may find them done.
    uncertain: Vec<Beside>,
    /// A merge that failed so, before a power cut: it may be running after it.
    maybe_merge: Option<String>,
    sharing: Rc<RefCell<Sharing>>,
    /// The sharing model still tracks the store exactly.
    exact: bool,
    next_tag: u64,
    next_name: u64,
    /// Snapshots at most (and, for the seeds with many, taken at the start): more than a
    /// format 1 store held in a tenth of the seeds.
    max_snapshots: usize,
}

/// Snapshots the seeds with many of them take first: past format 1's 64.
const MANY_SNAPSHOTS: usize = 72;

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 8 * 4096,
        ..CopyConfig::default()
    }
}

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // A few seeds have a bigger origin in small chunks: checkpoints of several blocks.
        let big = rng.gen_bool(0.1);
        let chunk = if big { 8 } else { 8u64 << rng.gen_range(0..3) };
        // A quarter of the seeds end the origin 1 to 7 sectors past a 4 KiB block, so its last
        // chunk is short and ends inside a block; half of those have a COW device of 4 KiB
        // blocks (so the group serves 4 KiB blocks, and the last chunk's image in the COW
        // store is padded). Chosen without the generator, so a seed's other choices stay.
        let odd = if seed % 4 == 3 { (seed / 4) % 7 + 1 } else { 0 };
        let block = if seed % 8 == 7 { 8 } else { 1 };
        let raw = odd
            + 8 * if big {
                rng.gen_range(256..512u64)
            } else {
                rng.gen_range(24..96u64)
            };
        // Most seeds have room for everything; some overflow.
        let cow_chunks = if rng.gen_bool(0.3) {
            rng.gen_range(2..12)
        } else {
            raw / chunk * 8
        };
        let faults = rng.gen_bool(0.5);
        let split = rng.gen_bool(0.5);
        let size = raw / block * block;
        let origin_mem = MemDevice::new_volatile("origin", SectorCount(raw));
        // A tenth of the seeds take more snapshots than format 1 held; their COW device has
        // room in its log areas for them (a store plans snapshot records for 1/64 of it).
        let many = seed % 10 == 3;
        let headroom = if many { 8192 } else { 0 };
        let cow_size = SectorCount(1024 + headroom + cow_chunks * chunk);
        let cow_mem = MemDevice::with_geometry("cow", cow_size, block as u32 * 512, true);
        let config = |i: u64, rng: &mut ChaCha8Rng| {
            let mut rate = || {
                if faults && rng.gen_bool(0.8) {
                    rng.gen_range(0.0005..0.01)
                } else {
                    0.0
                }
            };
            let (read_error_rate, write_error_rate) = (rate(), rate());
            FaultConfig {
                seed: seed * 4 + i,
                max_delay_turns: rng.gen_range(0..4),
                read_error_rate,
                write_error_rate,
                ..FaultConfig::default()
            }
        };
        let origin_faulty = FaultyDevice::new(Arc::clone(&origin_mem), config(0, &mut rng));
        let cow_faulty = FaultyDevice::new(Arc::clone(&cow_mem), config(1, &mut rng));
        let mut partial = |dev: DeviceRef, i: u64| {
            let rate = if faults && rng.gen_bool(0.5) {
                rng.gen_range(0.0005..0.005)
            } else {
                0.0
            };
            Arc::new(Forwarding(PartialOnError {
                inner: dev,
                state: Mutex::new((ChaCha8Rng::seed_from_u64(seed * 8 + i), rate)),
            }))
        };
        let origin_partial = partial(origin_faulty.clone(), 4);
        let cow_partial = partial(cow_faulty.clone(), 5);
        let wrap = |dev: DeviceRef, i: u64| -> DeviceRef {
            if split {
                Arc::new(Forwarding(SplitFua {
                    inner: dev,
                    max_turns: 3,
                    rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed * 4 + i)),
                }))
            } else {
                dev
            }
        };
        let origin_dev = wrap(origin_partial.clone(), 2);
        let cow_dev = wrap(cow_partial.clone(), 3);
        trace(format_args!(
            "seed {seed}: chunk {chunk}, origin {raw} sectors ({size} served), COW blocks of \
             {block} sectors, {cow_chunks} COW chunks, errors {faults}, split FUA {split}"
        ));
        Sim {
            seed,
            rng,
            origin_mem,
            cow_mem,
            origin_faulty,
            cow_faulty,
            origin_partial,
            cow_partial,
            origin_dev,
            cow_dev,
            faults,
            chunk,
            size,
            block,
            origin: Rc::new(RefCell::new(Model::new(Sectors::zeroed(size)))),
            snaps: BTreeMap::new(),
            invalid: BTreeMap::new(),
            merging: None,
            limbo: BTreeMap::new(),
            uncertain: Vec::new(),
            maybe_merge: None,
            sharing: Rc::new(RefCell::new(Sharing::default())),
            exact: !faults,
            next_tag: 1,
            next_name: 0,
            max_snapshots: if many { MANY_SNAPSHOTS + 4 } else { 8 },
        }
    }

    /// Opens the group; with injected errors an open that fails on an I/O error is retried
    /// (it must not fail any other way).
    async fn open(&mut self) -> Instance {
        for attempt in 0.. {
            let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
            let runner = spawn(run);
            // Every third seed writes its checkpoints a block at a time, so power cuts and
            // errors land between the pieces of one (chosen without the generator).
            let options = GroupOptions {
                chunk_size: Some(SectorCount(self.chunk)),
                force: false,
                checkpoint_piece_blocks: (self.seed % 3 == 1).then_some(1),
            };
            let cut = Arc::new(AtomicBool::new(false));
            let fenced = |dev: &DeviceRef| -> DeviceRef {
                Arc::new(Forwarding(Fenced {
                    inner: Arc::clone(dev),
                    cut: Arc::clone(&cut),
                }))
            };
            let opened = SnapshotGroup::open(
                fenced(&self.origin_dev),
                fenced(&self.cow_dev),
                &options,
                engine,
            )
            .await;
            let group = match opened {
                Ok(group) => group,
                Err(e) if self.faults && e.kind() == ErrorKind::Io && attempt < 100 => {
                    trace(format_args!("open failed: {e}"));
                    runner.await;
                    continue;
                }
                Err(e) => panic!("seed {}: open: {e}", self.seed),
            };
            group.check_invariants();
            let merger = spawn(group.merge_task());
            return Instance {
                cut,
                group,
                merger,
                runner,
            };
        }
        unreachable!()
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// An extent of whole blocks (of 1 sector in most seeds, as before).
    fn random_extent(&mut self) -> Extent {
        let b = self.block;
        let start = self.rng.gen_range(0..self.size / b);
        let max = if self.rng.gen_bool(0.2) { 96 } else { 24 };
        let len = self.rng.gen_range(1..=(max / b).min(self.size / b - start));
        Extent::new(Sector(start * b), SectorCount(len * b))
    }

    fn chunks(&self, e: Extent) -> std::ops::RangeInclusive<u64> {
        e.start.0 / self.chunk..=(e.end().0 - 1) / self.chunk
    }

    fn known(&self) -> BTreeSet<String> {
        self.snaps
            .keys()
            .chain(self.invalid.keys())
            .chain(self.merging.iter())
            .cloned()
            .collect()
    }

    /// Spawns a batch of requests, non-overlapping per image.
    fn spawn_batch(&mut self, group: &Arc<SnapshotGroup>) -> Batch {
        let mut batch = Batch {
            tasks: Vec::new(),
            taken: Vec::new(),
            origin_writes: Vec::new(),
            snap_writes: Vec::new(),
            command_done: Rc::new(Flag::new(false)),
            failed: Rc::new(RefCell::new(BTreeSet::new())),
        };
        for _ in 0..self.rng.gen_range(1..=6) {
            self.spawn_request(group, &mut batch, false);
        }
        batch
    }

    /// Spawns a request into `batch` (an origin write if `origin_write`) unless it would
    /// overlap one of it on the same image; returns the extent and tag of a write spawned.
    fn spawn_request(
        &mut self,
        group: &Arc<SnapshotGroup>,
        batch: &mut Batch,
        origin_write: bool,
    ) -> Option<(Extent, u64)> {
        let faults = self.faults;
        let mut spawned = None;
        {
            // The target: the origin, a snapshot, an invalid or merging one.
            let names: Vec<String> = self.known().into_iter().collect();
            let target = if origin_write || names.is_empty() || self.rng.gen_bool(0.45) {
                None
            } else {
                Some(names[self.rng.gen_range(0..names.len())].clone())
            };
            let extent = self.random_extent();
            if batch
                .taken
                .iter()
                .any(|(t, e)| *t == target && e.start < extent.end() && extent.start < e.end())
            {
                return None;
            }
            batch.taken.push((target.clone(), extent));
            let seed = self.seed;
            let kind = if origin_write {
                0
            } else {
                self.rng.gen_range(0..100)
            };
            let chunks = self.chunks(extent);
            let command_done = Rc::clone(&batch.command_done);
            match target {
                None => {
                    let dev = group.origin();
                    let model = Rc::clone(&self.origin);
                    let generation = model.borrow().generation;
                    let sharing = Rc::clone(&self.sharing);
                    batch.tasks.push(match kind {
                        0..=54 => {
                            let tag = self.tag();
                            let fua = self.rng.gen_bool(0.15);
                            let buf = stamped(extent, tag);
                            model.borrow_mut().issue(extent, tag);
                            let flight = Rc::new(RefCell::new(Flight::default()));
                            batch.origin_writes.push((extent, tag, Rc::clone(&flight)));
                            spawned = Some((extent, tag));
                            trace(format_args!("origin write {extent} tag {tag} fua {fua}"));
                            spawn(async move {
                                flight.borrow_mut().late = command_done.get();
                                let res = dev.write(extent.start, buf, WriteFlags { fua }).await;
                                let mut m = model.borrow_mut();
                                // Issued before a merge replaced the image: judged by the
                                // merge's pending checks.
                                let current = m.generation == generation;
                                match res {
                                    Ok(()) if current => {
                                        m.ack(extent, tag, fua);
                                        sharing.borrow_mut().origin_write(chunks);
                                    }
                                    Ok(()) => {}
                                    Err(e) if faults => {
                                        trace(format_args!("origin write tag {tag}: {e}"));
                                        flight.borrow_mut().failed = true;
                                        if current {
                                            m.fail(extent, tag);
                                        }
                                    }
                                    Err(e) => panic!("seed {seed}: origin write: {e}"),
                                }
                            })
                        }
                        55..=89 => {
                            trace(format_args!("origin read {extent}"));
                            spawn(async move {
                                let (res, buf) = dev
                                    .read(extent.start, AlignedBuf::for_sectors(extent.len))
                                    .await;
                                match res {
                                    Ok(()) => {
                                        let m = model.borrow();
                                        if m.generation == generation {
                                            check(&m, extent, buf.as_slice(), "origin read");
                                        }
                                    }
                                    Err(e) if faults && is_eio(&e) => {}
                                    Err(e) => panic!("seed {seed}: origin read: {e}"),
                                }
                            })
                        }
                        _ => spawn(async move {
                            let acked = model.borrow().acked();
                            trace(format_args!("origin flush"));
                            let res = dev.flush().await;
                            res.unwrap_or_else(|e| panic!("seed {seed}: origin flush: {e}"));
                            let mut m = model.borrow_mut();
                            if m.generation == generation {
                                m.flushed(&acked);
                            }
                        }),
                    });
                }
                Some(name) => {
                    let dev = match group.snapshot(&name) {
                        Ok(dev) => dev,
                        // A merge ends by deleting the snapshot.
                        Err(_) if self.merging.as_ref() == Some(&name) => return None,
                        Err(e) => panic!("seed {seed}: snapshot {name}: {e}"),
                    };
                    let model = self.snaps.get(&name).cloned();
                    let sharing = Rc::clone(&self.sharing);
                    let failed = Rc::clone(&batch.failed);
                    batch.tasks.push(match kind {
                        0..=49 => {
                            let tag = self.tag();
                            let fua = self.rng.gen_bool(0.15);
                            let buf = stamped(extent, tag);
                            if let Some(m) = &model {
                                m.borrow_mut().issue(extent, tag);
                            }
                            let flight = Rc::new(RefCell::new(Flight::default()));
                            batch
                                .snap_writes
                                .push((name.clone(), extent, tag, Rc::clone(&flight)));
                            trace(format_args!("{name} write {extent} tag {tag}"));
                            spawn(async move {
                                flight.borrow_mut().late = command_done.get();
                                let res = dev.write(extent.start, buf, WriteFlags { fua }).await;
                                match (res, model) {
                                    (Ok(()), Some(m)) => {
                                        m.borrow_mut().ack(extent, tag, fua);
                                        sharing.borrow_mut().snap_write(&name, chunks);
                                    }
                                    (Ok(()), None) => {
                                        panic!("seed {seed}: write to dead snapshot {name} worked")
                                    }
                                    (Err(e), m) => {
                                        assert!(is_eio(&e), "seed {seed}: {name} write: {e}");
                                        trace(format_args!("{name} write tag {tag}: {e}"));
                                        flight.borrow_mut().failed = true;
                                        // Some of it may have landed (it may come back).
                                        if let Some(m) = m {
                                            m.borrow_mut().fail(extent, tag);
                                        }
                                        failed.borrow_mut().insert(name);
                                    }
                                }
                            })
                        }
                        50..=59 => spawn(async move {
                            let acked = model.as_ref().map(|m| m.borrow().acked());
                            let res = dev.flush().await;
                            res.unwrap_or_else(|e| panic!("seed {seed}: snapshot flush: {e}"));
                            if let (Some(m), Some(acked)) = (model, acked) {
                                m.borrow_mut().flushed(&acked);
                            }
                        }),
                        _ => {
                            trace(format_args!("{name} read {extent}"));
                            spawn(async move {
                                let (res, buf) = dev
                                    .read(extent.start, AlignedBuf::for_sectors(extent.len))
                                    .await;
                                match (res, model) {
                                    (Ok(()), Some(m)) => {
                                        check(&m.borrow(), extent, buf.as_slice(), &name)
                                    }
                                    (Ok(()), None) => {
                                        panic!("seed {seed}: read of dead snapshot {name} worked")
                                    }
                                    (Err(e), _) => {
                                        assert!(is_eio(&e), "seed {seed}: {name} read: {e}");
                                        failed.borrow_mut().insert(name);
                                    }
                                }
                            })
                        }
                    });
                }
            }
        }
        spawned
    }

    /// Marks snapshots the store reports invalid, checks the list against the model.
    fn sync_states(&mut self, group: &SnapshotGroup) {
        let status = group.status();
        if status["metadata_failed"] == false {
            self.uncertain.clear();
        }
        let snaps = status["snapshots"].as_array().expect("snapshots").clone();
        for s in &snaps {
            let name = s["name"].as_str().expect("name").to_owned();
            if s["state"] == "invalid" {
                if let Some(model) = self.snaps.remove(&name) {
                    let reason = s["reason"].as_str().unwrap_or_default().to_owned();
                    trace(format_args!("{name} invalid: {reason}"));
                    // Without injected errors only a full store invalidates a snapshot.
                    assert!(
                        self.faults || reason.contains("overflowed"),
                        "seed {}: {name} invalid without an injected error: {reason}",
                        self.seed
                    );
                    self.sharing.borrow_mut().maps.remove(&name);
                    self.invalid.insert(name, (reason, model));
                }
            }
        }
        if let Some(m) = &self.merging {
            if status["merge"]["active"] == false {
                trace(format_args!("merge of {m} done"));
                self.merging = None;
            }
        }
        let listed: BTreeSet<String> = snaps
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_owned())
            .collect();
        assert_eq!(
            listed,
            self.known(),
            "seed {}: snapshot list {status}",
            self.seed
        );
        for s in &snaps {
            let name = s["name"].as_str().expect("name");
            let state = s["state"].as_str().expect("state");
            let expected = if self.snaps.contains_key(name) {
                "valid"
            } else if self.invalid.contains_key(name) {
                "invalid"
            } else {
                "merging"
            };
            assert_eq!(state, expected, "seed {}: {name}: {status}", self.seed);
        }
        group.check_invariants();
        if self.exact && self.merging.is_none() {
            assert_eq!(
                status["cow"]["used"].as_u64(),
                Some(self.sharing.borrow().used()),
                "seed {}: COW chunks used vs distinct copied images: {status}",
                self.seed
            );
        }
    }

    /// After a reopen: takes in what commands cut short left, and snapshots invalidated only
    /// in memory that the store brought back.
    fn adopt(&mut self, group: &SnapshotGroup) {
        let status = group.status();
        let snaps = status["snapshots"].as_array().expect("snapshots").clone();
        if let Some(name) = self.maybe_merge.take() {
            if status["merge"]["active"] == true && status["merge"]["snapshot"] == name.as_str() {
                trace(format_args!("the merge of {name} that failed is running"));
                let model = match self.snaps.remove(&name) {
                    Some(m) => m,
                    None => self.invalid.remove(&name).expect("snapshot").1,
                };
                self.sharing.borrow_mut().maps.remove(&name);
                let mut origin = self.origin.borrow_mut();
                origin.sectors = model.borrow().image().sectors;
                origin.pending.clear();
                origin.generation += 1;
                drop(origin);
                self.merging = Some(name);
                self.exact = false;
            }
        }
        let limbo = std::mem::take(&mut self.limbo);
        for s in &snaps {
            let name = s["name"].as_str().expect("name").to_owned();
            let valid = s["state"] == "valid";
            if let Some(model) = limbo.get(&name) {
                trace(format_args!("{name} survived the cut ({})", s["state"]));
                self.exact = false;
                if valid {
                    self.snaps.insert(name, Rc::clone(model));
                } else {
                    let reason = s["reason"].as_str().unwrap_or_default().to_owned();
                    self.invalid.insert(name, (reason, Rc::clone(model)));
                }
            } else if valid && self.invalid.contains_key(&name) {
                let (reason, model) = self.invalid.remove(&name).expect("invalid");
                assert!(
                    reason.contains("metadata"),
                    "seed {}: {name} invalid ({reason}) is valid again after a power cut",
                    self.seed
                );
                trace(format_args!("{name} valid again after the cut"));
                self.snaps.insert(name, model);
            }
        }
        for name in limbo.keys() {
            if !snaps.iter().any(|s| s["name"] == name.as_str()) {
                trace(format_args!("{name} gone after the cut"));
            }
        }
    }

    /// Picks a command and updates the model for it, as taken at this instant: origin writes
    /// in `batch` not yet acknowledged are pending (wholly in or out).
    fn pick_command(&mut self, batch: Option<&Batch>) -> Option<Beside> {
        let roll = self.rng.gen_range(0..100);
        let total = self.snaps.len() + self.invalid.len() + self.merging.iter().count();
        if roll < 35 && self.merging.is_none() && total < self.max_snapshots {
            Some(self.create_command(batch))
        } else if roll < 55 {
            let names: Vec<String> = self
                .snaps
                .keys()
                .chain(self.invalid.keys())
                .cloned()
                .collect();
            if names.is_empty() {
                return None;
            }
            let name = names[self.rng.gen_range(0..names.len())].clone();
            Some(Beside::Delete(name))
        } else if roll < 65 && self.merging.is_none() && !self.snaps.is_empty() {
            let names: Vec<String> = self.snaps.keys().cloned().collect();
            Some(Beside::Merge(
                names[self.rng.gen_range(0..names.len())].clone(),
            ))
        } else {
            None
        }
    }

    /// A snapshot create, with its model as taken at this instant: origin writes in `batch`
    /// not yet acknowledged are pending (wholly in or out).
    fn create_command(&mut self, batch: Option<&Batch>) -> Beside {
        let name = format!("s{}", self.next_name);
        self.next_name += 1;
        let mut model = self.origin.borrow().image();
        for (extent, tag, flight) in batch.iter().flat_map(|b| &b.origin_writes) {
            let unacked = range(*extent).any(|s| model.sectors.cells[s].acked != *tag);
            if unacked {
                for s in range(*extent) {
                    model.sectors.cells[s].widen(*tag);
                }
                model.pending.push(Pending {
                    extent: *extent,
                    tag: *tag,
                    flight: Rc::clone(flight),
                    after_is_in: false,
                });
            }
        }
        Beside::Create(name, Rc::new(RefCell::new(model)))
    }

    /// Runs `command`; `batch` is the batch in flight beside it, if any. `Err` when it was
    /// cut short (it may or may not have taken effect).
    async fn command(
        &mut self,
        group: &Arc<SnapshotGroup>,
        command: Beside,
        mut batch: Option<&mut Batch>,
        cut_after: Option<usize>,
    ) -> Result<(), ()> {
        let (verb, name) = match &command {
            Beside::Create(n, _) => ("snapshot-create", n.clone()),
            Beside::Delete(n) => ("snapshot-delete", n.clone()),
            Beside::Merge(n) => ("merge", n.clone()),
        };
        // For a merge: the origin's image becomes the snapshot's, as it is at this instant.
        let mut merge_image = match &command {
            Beside::Merge(n) => {
                let mut model = self.snaps[n].borrow().image();
                let view = batch.as_deref();
                for (target, extent, tag, flight) in view.iter().flat_map(|b| &b.snap_writes) {
                    if target == n && !flight.borrow().failed {
                        for s in range(*extent) {
                            model.sectors.cells[s].widen(*tag);
                        }
                    }
                }
                let origin = self.origin.borrow();
                for (extent, tag, flight) in view.iter().flat_map(|b| &b.origin_writes) {
                    // Acknowledged already: the snapshot's image replaces it.
                    if range(*extent).all(|s| origin.sectors.cells[s].acked == *tag) {
                        continue;
                    }
                    for s in range(*extent) {
                        model.sectors.cells[s].widen(*tag);
                    }
                    model.pending.push(Pending {
                        extent: *extent,
                        tag: *tag,
                        flight: Rc::clone(flight),
                        after_is_in: true,
                    });
                }
                Some(model)
            }
            _ => None,
        };
        trace(format_args!("{verb} {name}"));
        // With the origin's acknowledged writes when it returns (before any other task runs):
        // a create's flush made them durable.
        let task = {
            let group = Arc::clone(group);
            let name = name.clone();
            let origin = Rc::clone(&self.origin);
            spawn(async move {
                let result = group.command_async(verb, &json!({ "name": name })).await;
                (result, origin.borrow().acked())
            })
        };
        let (result, acked) = match cut_after {
            None => {
                // More origin writes while it runs: each wholly before or after it.
                let mut turns = 0;
                while let Some(b) = batch.as_deref_mut() {
                    if task.is_finished() {
                        break;
                    }
                    turns += 1;
                    assert!(turns < 1_000_000, "seed {}: {verb} never ends", self.seed);
                    yield_now().await;
                    if !self.rng.gen_bool(0.3) {
                        continue;
                    }
                    let Some((extent, tag)) = self.spawn_request(group, b, true) else {
                        continue;
                    };
                    let flight = Rc::clone(&b.origin_writes.last().expect("spawned").2);
                    let pend = |m: &mut Model, after_is_in| {
                        for s in range(extent) {
                            m.sectors.cells[s].widen(tag);
                        }
                        m.pending.push(Pending {
                            extent,
                            tag,
                            flight,
                            after_is_in,
                        });
                    };
                    match &command {
                        Beside::Create(_, m) => pend(&mut m.borrow_mut(), false),
                        Beside::Merge(_) => pend(merge_image.as_mut().expect("merge image"), true),
                        Beside::Delete(_) => {}
                    }
                }
                task.await
            }
            Some(turns) => {
                for _ in 0..turns {
                    if task.is_finished() {
                        break;
                    }
                    yield_now().await;
                }
                if !task.is_finished() {
                    trace(format_args!("{verb} {name} cut short"));
                    drop(task);
                    match command {
                        Beside::Create(name, model) => {
                            self.limbo.insert(name, model);
                        }
                        Beside::Delete(name) => {
                            if let Some(m) = self.snaps.remove(&name) {
                                self.limbo.insert(name.clone(), m);
                            } else if let Some((_, m)) = self.invalid.remove(&name) {
                                self.limbo.insert(name.clone(), m);
                            }
                            self.sharing.borrow_mut().maps.remove(&name);
                            self.exact = false;
                        }
                        Beside::Merge(_) => unreachable!("a merge is never cut short"),
                    }
                    return Err(());
                }
                task.await
            }
        };
        if let Some(b) = batch.as_deref() {
            b.command_done.set(true);
        }
        if let Err(e) = &result {
            trace(format_args!("{verb} {name}: {e}"));
            if e.kind() == ErrorKind::Io {
                assert!(self.faults, "seed {}: {verb} {name}: {e}", self.seed);
                self.uncertain.push(command);
                return Ok(());
            }
            // A snapshot invalidated by a request beside it cannot be merged.
            let invalidated = verb == "merge"
                && e.kind() == ErrorKind::InvalidArgument
                && group.status()["snapshots"]
                    .as_array()
                    .expect("snapshots")
                    .iter()
                    .any(|s| s["name"] == name.as_str() && s["state"] == "invalid");
            assert!(invalidated, "seed {}: {verb} {name}: {e}", self.seed);
            return Ok(());
        }
        match command {
            Beside::Create(name, model) => {
                if batch.is_some() {
                    // The sharing model cannot tell which writes came first.
                    self.exact = false;
                }
                self.origin.borrow_mut().flushed(&acked);
                self.sharing
                    .borrow_mut()
                    .maps
                    .insert(name.clone(), HashMap::new());
                self.snaps.insert(name, model);
            }
            Beside::Delete(name) => {
                self.snaps.remove(&name);
                self.invalid.remove(&name);
                self.sharing.borrow_mut().maps.remove(&name);
            }
            Beside::Merge(name) => {
                self.snaps.remove(&name).expect("snapshot");
                self.sharing.borrow_mut().maps.remove(&name);
                let mut origin = self.origin.borrow_mut();
                let image = merge_image.expect("merge image");
                origin.sectors = image.sectors;
                origin.pending = image.pending;
                origin.generation += 1;
                drop(origin);
                self.merging = Some(name);
                self.exact = false;
            }
        }
        // And some after it returned: those must come after it.
        if let Some(b) = batch {
            for _ in 0..self.rng.gen_range(0..3) {
                self.spawn_request(group, b, true);
            }
        }
        Ok(())
    }

    /// Reads a whole image, a chunk at a time, retrying reads that fail on injected errors.
    async fn read_all(&self, dev: &dyn BlockDevice) -> io::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(self.size as usize * 512);
        let mut at = 0;
        while at < self.size {
            let len = SectorCount(self.chunk.min(self.size - at));
            let mut tries = 0;
            loop {
                let (res, buf) = dev.read(Sector(at), AlignedBuf::for_sectors(len)).await;
                match res {
                    Ok(()) => {
                        data.extend_from_slice(buf.as_slice());
                        break;
                    }
                    Err(e) if self.faults && tries < 50 => {
                        tries += 1;
                        trace(format_args!("read at {at} failed ({e}), again"));
                    }
                    Err(e) => return Err(e),
                }
            }
            at += len.0;
        }
        Ok(data)
    }

    /// Reads every image whole: checks it and settles the model on it.
    async fn scan(&mut self, group: &Arc<SnapshotGroup>, reopened: bool) {
        let data = self
            .read_all(&*group.origin())
            .await
            .unwrap_or_else(|e| panic!("seed {}: origin scan: {e}", self.seed));
        self.origin
            .borrow_mut()
            .settle(&data, "origin scan", reopened);
        let names: Vec<String> = self.snaps.keys().cloned().collect();
        for name in names {
            let dev = group.snapshot(&name).expect("snapshot");
            let data = match self.read_all(&*dev).await {
                Ok(data) => data,
                Err(e) => {
                    // Only a snapshot the store invalidated meanwhile.
                    self.sync_states(group);
                    assert!(
                        self.invalid.contains_key(&name),
                        "seed {}: scan {name}: {e}: {}",
                        self.seed,
                        group.status()
                    );
                    continue;
                }
            };
            let model = Rc::clone(&self.snaps[&name]);
            model.borrow_mut().settle(&data, &name, reopened);
        }
        for name in self.invalid.keys() {
            let dev = group.snapshot(name).expect("snapshot");
            let (res, _) = dev
                .read(Sector(0), AlignedBuf::for_sectors(SectorCount(self.size)))
                .await;
            assert!(res.is_err(), "seed {}: invalid {name} reads", self.seed);
        }
    }

    fn crash(&mut self) {
        trace(format_args!(
            "power cut: {} origin and {} COW sectors at risk",
            self.origin_mem.unflushed_sectors(),
            self.cow_mem.unflushed_sectors()
        ));
        self.origin_mem.crash(&mut self.rng);
        self.cow_mem.crash(&mut self.rng);
        self.origin.borrow_mut().crash(false);
        for m in self
            .snaps
            .values()
            .chain(self.invalid.values().map(|(_, m)| m))
            .chain(self.limbo.values())
        {
            m.borrow_mut().crash(true);
        }
        self.exact = false;
    }

    /// Drops the instance (a power cut when `cut`), then opens the group again and reads
    /// everything.
    async fn restart(&mut self, inst: Instance, cut: bool) -> Instance {
        inst.cut.store(true, Ordering::Relaxed);
        drop(inst);
        if cut {
            self.crash();
            for command in std::mem::take(&mut self.uncertain) {
                match command {
                    Beside::Create(name, model) => {
                        self.limbo.insert(name, model);
                    }
                    Beside::Delete(name) => {
                        if let Some(m) = self.snaps.remove(&name) {
                            self.limbo.insert(name.clone(), m);
                        } else if let Some((_, m)) = self.invalid.remove(&name) {
                            self.limbo.insert(name.clone(), m);
                        }
                        self.sharing.borrow_mut().maps.remove(&name);
                    }
                    Beside::Merge(name) => self.maybe_merge = Some(name),
                }
            }
        }
        let inst = self.open().await;
        let merge = &inst.group.status()["merge"];
        if merge["active"] == true {
            trace(format_args!(
                "merge resumes at {} of {}",
                merge["done"], merge["total"]
            ));
        }
        self.adopt(&inst.group);
        self.sync_states(&inst.group);
        self.scan(&inst.group, cut).await;
        inst
    }

    /// The daemon's orderly stop (`ublkdm del`): the origin target's `shutdown()` with no
    /// request in flight (the snapshot devices are stopped first), then a power cut. Every
    /// write acknowledged to the origin or to a snapshot must survive it.
    async fn orderly_stop(&mut self, inst: Instance) -> Instance {
        trace(format_args!(
            "orderly stop with {} origin and {} COW sectors unflushed, then a power cut",
            self.origin_mem.unflushed_sectors(),
            self.cow_mem.unflushed_sectors()
        ));
        let models: Vec<ModelRef> = std::iter::once(&self.origin)
            .chain(self.snaps.values())
            .cloned()
            .collect();
        let acked: Vec<Vec<u64>> = models.iter().map(|m| m.borrow().acked()).collect();
        let origin = inst.group.origin();
        let res = origin.shutdown().await;
        res.unwrap_or_else(|e| panic!("seed {}: orderly stop: {e}", self.seed));
        for (model, acked) in models.iter().zip(&acked) {
            model.borrow_mut().flushed(acked);
        }
        self.restart(inst, true).await
    }

    /// Waits for every task of `batch`, then checks what the snapshots that failed requests
    /// have become.
    async fn finish(&mut self, batch: Batch, group: &Arc<SnapshotGroup>) {
        for t in batch.tasks {
            t.await;
        }
        self.sync_states(group);
        if !self.faults {
            for name in batch.failed.borrow().iter() {
                assert!(
                    !self.snaps.contains_key(name),
                    "seed {}: {name} failed a request yet is valid: {}",
                    self.seed,
                    group.status()
                );
            }
        }
    }

    async fn run(&mut self, batches: usize) {
        let mut inst = self.open().await;
        if self.max_snapshots > MANY_SNAPSHOTS {
            trace(format_args!("taking {MANY_SNAPSHOTS} snapshots"));
        }
        while self.max_snapshots > MANY_SNAPSHOTS && self.next_name < MANY_SNAPSHOTS as u64 {
            // Origin writes between them, so that copies serve ranges of snapshots.
            let batch = self.spawn_batch(&inst.group);
            self.finish(batch, &inst.group).await;
            let cmd = self.create_command(None);
            let _ = self.command(&inst.group, cmd, None, None).await;
            self.sync_states(&inst.group);
        }
        if self.max_snapshots > MANY_SNAPSHOTS && !self.faults {
            let status = inst.group.status();
            let n = status["snapshots"].as_array().map_or(0, Vec::len);
            assert_eq!(n, MANY_SNAPSHOTS, "seed {}: {status}", self.seed);
        }
        for _ in 0..batches {
            let batch = self.spawn_batch(&inst.group);
            let roll = self.rng.gen_range(0..100);
            if roll < 4 {
                // A power cut with requests in flight.
                for _ in 0..self.rng.gen_range(0..40) {
                    yield_now().await;
                }
                trace(format_args!("power cut mid-batch"));
                drop(batch);
                inst = self.restart(inst, true).await;
                continue;
            }
            if roll < 16 {
                // A command with requests in flight, sometimes cut short by a power cut.
                for _ in 0..self.rng.gen_range(0..12) {
                    yield_now().await;
                }
                let Some(cmd) = self.pick_command(Some(&batch)) else {
                    self.finish(batch, &inst.group).await;
                    continue;
                };
                let cut = !matches!(cmd, Beside::Merge(_)) && self.rng.gen_bool(0.25);
                let cut_after = cut.then(|| self.rng.gen_range(0..30));
                let mut batch = batch;
                let res = self
                    .command(&inst.group, cmd, Some(&mut batch), cut_after)
                    .await;
                if res.is_err() {
                    trace(format_args!("power cut beside a command"));
                    drop(batch);
                    inst = self.restart(inst, true).await;
                    continue;
                }
                self.finish(batch, &inst.group).await;
                // The new image's pending writes are checked by a full read.
                self.scan(&inst.group, false).await;
                continue;
            }
            self.finish(batch, &inst.group).await;
            if self.rng.gen_bool(0.2) {
                if let Some(cmd) = self.pick_command(None) {
                    let _ = self.command(&inst.group, cmd, None, None).await;
                    self.sync_states(&inst.group);
                }
            }
            if self.merging.is_some() && self.rng.gen_bool(0.1) {
                // A power cut in the middle of the merge.
                for _ in 0..self.rng.gen_range(0..200) {
                    yield_now().await;
                }
                trace(format_args!("power cut while merging"));
                inst = self.restart(inst, true).await;
            } else if self.rng.gen_bool(0.03) {
                trace(format_args!("power cut between batches"));
                inst = self.restart(inst, true).await;
            } else if self.rng.gen_bool(0.03) {
                inst = self.orderly_stop(inst).await;
            }
        }
        // No more errors; let a running merge finish (a stalled one resumes on a restart),
        // then check every image once more.
        self.origin_faulty.heal();
        self.cow_faulty.heal();
        self.origin_partial.heal();
        self.cow_partial.heal();
        for round in 0.. {
            for _ in 0..200_000 {
                if self.merging.is_none() {
                    break;
                }
                yield_now().await;
                if inst.group.status()["merge"]["active"] == false {
                    self.sync_states(&inst.group);
                }
            }
            if self.merging.is_none() {
                break;
            }
            let status = inst.group.status();
            assert!(
                round < 2 && self.faults && !status["merge"]["error"].is_null(),
                "seed {}: merge never ended: {status}",
                self.seed
            );
            trace(format_args!("restart to resume a stalled merge"));
            inst = self.restart(inst, false).await;
        }
        self.scan(&inst.group, false).await;
        inst.group.stop();
        inst.merger.await;
        drop(inst.group);
        inst.runner.await;
    }
}

fn stamped(e: Extent, tag: u64) -> Arc<AlignedBuf> {
    let mut buf = AlignedBuf::for_sectors(e.len);
    for (i, s) in buf.as_mut_slice().chunks_mut(512).enumerate() {
        stamp(s, e.start.0 + i as u64, tag);
    }
    Arc::new(buf)
}

fn check(model: &Model, e: Extent, data: &[u8], what: &str) {
    for (i, s) in data.chunks(512).enumerate() {
        let at = e.start.0 + i as u64;
        model.check(at, tag_of(s, at, what), what);
    }
}

fn run_seed(seed: u64, batches: usize) {
    let result = std::panic::catch_unwind(|| {
        run_local(async move {
            let mut sim = Sim::new(seed);
            sim.run(batches).await;
        })
    });
    if let Err(panic) = result {
        eprintln!("snapshot_sim failed: replay with SEED={seed}");
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn snapshot_simulation() {
    let batches = std::env::var("BATCHES").map_or(150, |b| b.parse().expect("BATCHES"));
    if let Ok(seed) = std::env::var("SEED") {
        run_seed(seed.parse().expect("SEED is a number"), batches);
        return;
    }
    let seeds = std::env::var("SEEDS").map_or(150, |s| s.parse().expect("SEEDS"));
    for seed in 0..seeds {
        run_seed(seed, batches);
    }
}
