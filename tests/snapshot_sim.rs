//! A deterministic, seeded simulation of the snapshot target: concurrent origin and snapshot
//! reads, writes (some FUA) and flushes over `FaultyDevice<MemDevice::new_volatile>` origin
//! and COW devices with random completion delays, snapshot create/delete between batches,
//! merges, COW overflow (a small store in some seeds), and power cuts at random points
//! (between batches or with requests in flight), after which the group is reopened from the
//! two devices.
//!
//! Everything runs on `run_local` (a local copy engine, the merge driver as a local task), so
//! a seed replays exactly: `SEED=n` runs one seed; a failure prints the seed.
//!
//! Oracle, per sector and per image (the origin and each snapshot), each write stamping a
//! unique tag: a read returns the last acknowledged tag, or after a power cut one of the tags
//! the sector may hold (the last durable one or any written since). A snapshot starts as the
//! origin's image when it was taken. A snapshot whose request failed must be reported invalid
//! (and then fails every request with EIO); the origin never fails. After a merge starts the
//! origin's image is the snapshot's, and when it ends the origin still reads as that. While
//! no merge or torn batch muddies it, the COW chunks in use must equal a model of sharing:
//! one chunk per distinct copied image, whatever the number of snapshots. After every reopen
//! every image is read whole and checked.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_task::Task;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use smol::future::yield_now;
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{
    errno, AlignedBuf, BlockDevice, DeviceInfo, DeviceRef, FaultConfig, FaultyDevice, IoFuture,
    MemDevice, ReadDone, WriteFlags,
};
use ublkdm::targets::snapshot::{GroupOptions, SnapshotGroup};
use ublkdm::units::{Extent, Sector, SectorCount};

use common::{sectors as range, stamp, tag_of};

fn trace(what: std::fmt::Arguments<'_>) {
    if std::env::var_os("TRACE").is_some() {
        eprintln!("{what}");
    }
}

/// One instance's view of a device. A power cut fences it: whatever of that instance still
/// runs (a copy the engine had started: its tasks outlive the instance on this executor)
/// fails from then on instead of reaching the device, as no I/O outlives a real power cut.
struct Fenced {
    inner: DeviceRef,
    cut: Arc<AtomicBool>,
}

impl Fenced {
    fn check(&self) -> std::io::Result<()> {
        if self.cut.load(Ordering::Relaxed) {
            Err(errno(libc::EIO))
        } else {
            Ok(())
        }
    }
}

fn fail<T: 'static>(value: T) -> IoFuture<T> {
    Box::pin(std::future::ready(value))
}

impl BlockDevice for Fenced {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        match self.check() {
            Ok(()) => self.inner.read(offset, buf),
            Err(e) => fail((Err(e), buf)),
        }
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        match self.check() {
            Ok(()) => self.inner.write(offset, buf, flags),
            Err(e) => fail(Err(e)),
        }
    }
    fn flush(&self) -> IoFuture<std::io::Result<()>> {
        match self.check() {
            Ok(()) => self.inner.flush(),
            Err(e) => fail(Err(e)),
        }
    }
    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        match self.check() {
            Ok(()) => self.inner.discard(extent),
            Err(e) => fail(Err(e)),
        }
    }
    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        match self.check() {
            Ok(()) => self.inner.write_zeroes(extent),
            Err(e) => fail(Err(e)),
        }
    }
}

#[derive(Clone, Debug)]
struct Cell {
    acked: u64,
    possible: Vec<u64>,
    durable: Vec<u64>,
    volatile: Vec<u64>,
}

impl Cell {
    fn settled(tag: u64) -> Cell {
        Cell {
            acked: tag,
            possible: Vec::new(),
            durable: vec![tag],
            volatile: Vec::new(),
        }
    }
}

#[derive(Clone)]
struct Model {
    cells: Vec<Cell>,
}

impl Model {
    fn issue(&mut self, e: Extent, tag: u64) {
        for s in range(e) {
            self.cells[s].volatile.push(tag);
        }
    }
    fn ack(&mut self, e: Extent, tag: u64, fua: bool) {
        for s in range(e) {
            let c = &mut self.cells[s];
            c.acked = tag;
            c.possible.clear();
            if fua {
                c.durable = vec![tag];
                c.volatile.clear();
            }
        }
    }
    /// The acknowledged tags now: what a flush issued now makes durable.
    fn acked(&self) -> Vec<u64> {
        self.cells.iter().map(|c| c.acked).collect()
    }
    /// A flush issued when the acknowledged tags were `acked` completed. Tags grow with issue
    /// order and one sector's writes are issued in order, so later ones stay volatile.
    fn flushed(&mut self, acked: &[u64]) {
        for (c, &a) in self.cells.iter_mut().zip(acked) {
            // A FUA write acknowledged meanwhile may already be durable and newer.
            if c.durable.iter().any(|&d| d > a) {
                // keep it
            } else if c.possible.is_empty() {
                c.durable = vec![a];
            } else if c.acked == a {
                c.durable = c.possible.clone();
            }
            c.volatile.retain(|&t| t > a);
        }
    }
    fn crash(&mut self) {
        for c in &mut self.cells {
            let set: BTreeSet<u64> = c.durable.iter().chain(&c.volatile).copied().collect();
            c.possible = set.into_iter().collect();
            c.durable = c.possible.clone();
            c.volatile.clear();
        }
    }
    fn check(&self, at: u64, tag: u64, what: &str) {
        let c = &self.cells[at as usize];
        let ok = if c.possible.is_empty() {
            tag == c.acked
        } else {
            c.possible.contains(&tag)
        };
        assert!(
            ok,
            "{what}: sector {at} holds tag {tag}, expected {} (possible {:?})",
            c.acked, c.possible
        );
    }
    /// After a full read following a reopen: the sector holds `tag` from now on.
    fn settle(&mut self, at: u64, tag: u64) {
        self.cells[at as usize] = Cell::settled(tag);
    }
}

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

struct SnapModel {
    model: Rc<RefCell<Model>>,
}

struct Instance {
    /// Set at a power cut: this instance's I/O no longer reaches the devices.
    cut: Arc<AtomicBool>,
    group: Arc<SnapshotGroup>,
    merger: Task<()>,
    runner: Task<()>,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    origin_mem: Arc<MemDevice>,
    cow_mem: Arc<MemDevice>,
    origin_dev: DeviceRef,
    cow_dev: DeviceRef,
    chunk: u64,
    size: u64,
    origin: Rc<RefCell<Model>>,
    snaps: BTreeMap<String, SnapModel>,
    /// Snapshots reported invalid: their requests must fail.
    invalid: BTreeSet<String>,
    merging: Option<String>,
    sharing: Rc<RefCell<Sharing>>,
    /// The sharing model still tracks the store exactly.
    exact: bool,
    next_tag: u64,
    next_name: u64,
}

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 8 * 4096,
        ..CopyConfig::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let chunk = 8u64 << rng.gen_range(0..3);
        let size = 8 * rng.gen_range(24..96u64);
        // Most seeds have room for everything; some overflow.
        let cow_chunks = if rng.gen_bool(0.3) {
            rng.gen_range(2..12)
        } else {
            size / chunk * 8
        };
        let origin_mem = MemDevice::new_volatile("origin", SectorCount(size));
        let cow_mem = MemDevice::new_volatile("cow", SectorCount(1024 + cow_chunks * chunk));
        let faults = |i: u64, rng: &mut ChaCha8Rng| FaultConfig {
            seed: seed * 4 + i,
            max_delay_turns: rng.gen_range(0..4),
            ..FaultConfig::default()
        };
        let origin_dev: DeviceRef = FaultyDevice::new(Arc::clone(&origin_mem), faults(0, &mut rng));
        let cow_dev: DeviceRef = FaultyDevice::new(Arc::clone(&cow_mem), faults(1, &mut rng));
        Sim {
            seed,
            rng,
            origin_mem,
            cow_mem,
            origin_dev,
            cow_dev,
            chunk,
            size,
            origin: Rc::new(RefCell::new(Model {
                cells: vec![Cell::settled(0); size as usize],
            })),
            snaps: BTreeMap::new(),
            invalid: BTreeSet::new(),
            merging: None,
            sharing: Rc::new(RefCell::new(Sharing::default())),
            exact: true,
            next_tag: 1,
            next_name: 0,
        }
    }

    async fn open(&mut self) -> Instance {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let options = GroupOptions {
            chunk_size: Some(SectorCount(self.chunk)),
        };
        let cut = Arc::new(AtomicBool::new(false));
        let fenced = |inner: &DeviceRef| -> DeviceRef {
            Arc::new(Fenced {
                inner: Arc::clone(inner),
                cut: Arc::clone(&cut),
            })
        };
        let group = SnapshotGroup::open(
            fenced(&self.origin_dev),
            fenced(&self.cow_dev),
            &options,
            engine,
        )
        .await
        .unwrap_or_else(|e| panic!("seed {}: open: {e}", self.seed));
        group.check_invariants();
        let merger = spawn(group.merge_task());
        Instance {
            cut,
            group,
            merger,
            runner,
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn random_extent(&mut self) -> Extent {
        let start = self.rng.gen_range(0..self.size);
        let max = if self.rng.gen_bool(0.2) { 96 } else { 24 };
        let len = self.rng.gen_range(1..=max.min(self.size - start));
        Extent::new(Sector(start), SectorCount(len))
    }

    fn chunks(&self, e: Extent) -> std::ops::RangeInclusive<u64> {
        e.start.0 / self.chunk..=(e.end().0 - 1) / self.chunk
    }

    /// Spawns a batch of requests, non-overlapping per image.
    fn spawn_batch(&mut self, group: &Arc<SnapshotGroup>) -> Vec<Task<()>> {
        let mut taken: Vec<(Option<String>, Extent)> = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..self.rng.gen_range(1..=5) {
            // The target: the origin, a snapshot, an invalid or merging one.
            let names: Vec<String> = self
                .snaps
                .keys()
                .chain(&self.invalid)
                .chain(self.merging.iter())
                .cloned()
                .collect();
            let target = if names.is_empty() || self.rng.gen_bool(0.45) {
                None
            } else {
                Some(names[self.rng.gen_range(0..names.len())].clone())
            };
            let extent = self.random_extent();
            if taken
                .iter()
                .any(|(t, e)| *t == target && e.start < extent.end() && extent.start < e.end())
            {
                continue;
            }
            taken.push((target.clone(), extent));
            let seed = self.seed;
            let kind = self.rng.gen_range(0..100);
            let chunks = self.chunks(extent);
            match target {
                None => {
                    let dev = group.origin();
                    let model = Rc::clone(&self.origin);
                    let sharing = Rc::clone(&self.sharing);
                    tasks.push(match kind {
                        0..=54 => {
                            let tag = self.tag();
                            let fua = self.rng.gen_bool(0.15);
                            let buf = stamped(extent, tag);
                            model.borrow_mut().issue(extent, tag);
                            trace(format_args!("origin write {extent} tag {tag}"));
                            spawn(async move {
                                let res = dev.write(extent.start, buf, WriteFlags { fua }).await;
                                res.unwrap_or_else(|e| panic!("seed {seed}: origin write: {e}"));
                                model.borrow_mut().ack(extent, tag, fua);
                                sharing.borrow_mut().origin_write(chunks);
                            })
                        }
                        55..=89 => spawn(async move {
                            let (res, buf) = dev
                                .read(extent.start, AlignedBuf::for_sectors(extent.len))
                                .await;
                            res.unwrap_or_else(|e| panic!("seed {seed}: origin read: {e}"));
                            check(&model.borrow(), extent, buf.as_slice(), "origin read");
                        }),
                        _ => spawn(async move {
                            let acked = model.borrow().acked();
                            dev.flush().await.expect("origin flush");
                            model.borrow_mut().flushed(&acked);
                        }),
                    });
                }
                Some(name) => {
                    let dev = match group.snapshot(&name) {
                        Ok(dev) => dev,
                        // A merge ends by deleting the snapshot.
                        Err(_) if self.merging.as_ref() == Some(&name) => continue,
                        Err(e) => panic!("seed {seed}: snapshot {name}: {e}"),
                    };
                    let model = self.snaps.get(&name).map(|s| Rc::clone(&s.model));
                    let sharing = Rc::clone(&self.sharing);
                    let failed = Rc::new(RefCell::new(false));
                    tasks.push(match kind {
                        0..=49 => {
                            let tag = self.tag();
                            let fua = self.rng.gen_bool(0.15);
                            let buf = stamped(extent, tag);
                            if let Some(m) = &model {
                                m.borrow_mut().issue(extent, tag);
                            }
                            trace(format_args!("{name} write {extent} tag {tag}"));
                            spawn(async move {
                                let res = dev.write(extent.start, buf, WriteFlags { fua }).await;
                                match (res, model) {
                                    (Ok(()), Some(m)) => {
                                        m.borrow_mut().ack(extent, tag, fua);
                                        sharing.borrow_mut().snap_write(&name, chunks);
                                    }
                                    (Ok(()), None) => {
                                        panic!("seed {seed}: write to dead snapshot {name} worked")
                                    }
                                    (Err(e), _) => {
                                        assert_eq!(e.raw_os_error(), Some(libc::EIO));
                                        *failed.borrow_mut() = true;
                                    }
                                }
                            })
                        }
                        50..=59 => spawn(async move {
                            let acked = model.as_ref().map(|m| m.borrow().acked());
                            dev.flush().await.expect("snapshot flush");
                            if let (Some(m), Some(acked)) = (model, acked) {
                                m.borrow_mut().flushed(&acked);
                            }
                        }),
                        _ => spawn(async move {
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
                                    assert_eq!(e.raw_os_error(), Some(libc::EIO));
                                    *failed.borrow_mut() = true;
                                }
                            }
                        }),
                    });
                }
            }
        }
        tasks
    }

    /// Marks snapshots the store reports invalid; a snapshot that failed a request must be
    /// among them.
    fn sync_states(&mut self, group: &SnapshotGroup) {
        let status = group.status();
        let snaps = status["snapshots"].as_array().expect("snapshots").clone();
        for s in &snaps {
            let name = s["name"].as_str().expect("name").to_owned();
            if s["state"] == "invalid" && self.snaps.remove(&name).is_some() {
                trace(format_args!("{name} invalid: {}", s["reason"]));
                self.sharing.borrow_mut().maps.remove(&name);
                self.invalid.insert(name);
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
        let known: BTreeSet<String> = self
            .snaps
            .keys()
            .chain(&self.invalid)
            .chain(self.merging.iter())
            .cloned()
            .collect();
        assert_eq!(listed, known, "seed {}: snapshot list {status}", self.seed);
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

    async fn command(&mut self, group: &Arc<SnapshotGroup>) {
        let roll = self.rng.gen_range(0..100);
        if roll < 30 && self.merging.is_none() && self.snaps.len() + self.invalid.len() < 8 {
            let name = format!("s{}", self.next_name);
            self.next_name += 1;
            group
                .command_async("snapshot-create", &json!({ "name": name }))
                .await
                .unwrap_or_else(|e| panic!("seed {}: create: {e}", self.seed));
            trace(format_args!("created {name}"));
            let acked = self.origin.borrow().acked();
            self.origin.borrow_mut().flushed(&acked);
            let model = Model {
                cells: self
                    .origin
                    .borrow()
                    .cells
                    .iter()
                    .map(|c| Cell::settled(c.acked))
                    .collect(),
            };
            self.sharing
                .borrow_mut()
                .maps
                .insert(name.clone(), HashMap::new());
            self.snaps.insert(
                name,
                SnapModel {
                    model: Rc::new(RefCell::new(model)),
                },
            );
        } else if roll < 45 {
            let names: Vec<String> = self.snaps.keys().chain(&self.invalid).cloned().collect();
            if names.is_empty() {
                return;
            }
            let name = names[self.rng.gen_range(0..names.len())].clone();
            group
                .command_async("snapshot-delete", &json!({ "name": name }))
                .await
                .unwrap_or_else(|e| panic!("seed {}: delete: {e}", self.seed));
            trace(format_args!("deleted {name}"));
            self.snaps.remove(&name);
            self.invalid.remove(&name);
            self.sharing.borrow_mut().maps.remove(&name);
        } else if roll < 55 && self.merging.is_none() && !self.snaps.is_empty() {
            let names: Vec<String> = self.snaps.keys().cloned().collect();
            let name = names[self.rng.gen_range(0..names.len())].clone();
            group
                .command_async("merge", &json!({ "name": name }))
                .await
                .unwrap_or_else(|e| panic!("seed {}: merge: {e}", self.seed));
            trace(format_args!("merging {name}"));
            let snap = self.snaps.remove(&name).expect("snapshot");
            let cells = snap
                .model
                .borrow()
                .cells
                .iter()
                .map(|c| Cell::settled(c.acked))
                .collect();
            self.origin.borrow_mut().cells = cells;
            self.merging = Some(name);
            self.exact = false;
        }
    }

    /// Reads every image whole after a reopen: checks it and settles the model on it.
    async fn scan(&mut self, group: &Arc<SnapshotGroup>) {
        let len = SectorCount(self.size);
        let (res, buf) = group
            .origin()
            .read(Sector(0), AlignedBuf::for_sectors(len))
            .await;
        res.expect("origin scan");
        settle(&mut self.origin.borrow_mut(), buf.as_slice(), "origin scan");
        let names: Vec<String> = self.snaps.keys().cloned().collect();
        for name in names {
            let dev = group.snapshot(&name).expect("snapshot");
            let (res, buf) = dev.read(Sector(0), AlignedBuf::for_sectors(len)).await;
            if let Err(e) = res {
                // Only a snapshot the store invalidated meanwhile (a merge step overflowed).
                self.sync_states(group);
                assert!(
                    self.invalid.contains(&name),
                    "seed {}: scan {name}: {e}: {}",
                    self.seed,
                    group.status()
                );
                continue;
            }
            let model = Rc::clone(&self.snaps[&name].model);
            settle(&mut model.borrow_mut(), buf.as_slice(), &name);
        }
        for name in &self.invalid {
            let dev = group.snapshot(name).expect("snapshot");
            let (res, _) = dev.read(Sector(0), AlignedBuf::for_sectors(len)).await;
            assert!(res.is_err(), "seed {}: invalid {name} reads", self.seed);
        }
    }

    fn crash(&mut self) {
        self.origin_mem.crash(&mut self.rng);
        self.cow_mem.crash(&mut self.rng);
        self.origin.borrow_mut().crash();
        for s in self.snaps.values() {
            s.model.borrow_mut().crash();
        }
    }

    async fn run(&mut self, batches: usize) {
        let mut inst = self.open().await;
        for _ in 0..batches {
            let tasks = self.spawn_batch(&inst.group);
            let cut = self.rng.gen_bool(0.04);
            if cut {
                // A power cut with requests in flight.
                for _ in 0..self.rng.gen_range(0..40) {
                    yield_now().await;
                }
                trace(format_args!("power cut mid-batch"));
                drop(tasks);
                inst.cut.store(true, Ordering::Relaxed);
                drop(inst);
                self.crash();
                self.exact = false;
                inst = self.open().await;
                self.sync_states(&inst.group);
                self.scan(&inst.group).await;
                continue;
            }
            for t in tasks {
                t.await;
            }
            self.sync_states(&inst.group);
            if self.rng.gen_bool(0.2) {
                self.command(&inst.group).await;
                self.sync_states(&inst.group);
            }
            if self.rng.gen_bool(0.03) {
                trace(format_args!("power cut between batches"));
                inst.cut.store(true, Ordering::Relaxed);
                drop(inst);
                self.crash();
                inst = self.open().await;
                self.sync_states(&inst.group);
                self.scan(&inst.group).await;
            }
        }
        // Let a running merge finish, then check every image once more.
        for _ in 0..200_000 {
            if self.merging.is_none() {
                break;
            }
            yield_now().await;
            if inst.group.status()["merge"]["active"] == false {
                self.sync_states(&inst.group);
            }
        }
        assert!(
            self.merging.is_none(),
            "seed {}: merge never ended",
            self.seed
        );
        self.scan(&inst.group).await;
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

fn settle(model: &mut Model, data: &[u8], what: &str) {
    for (i, s) in data.chunks(512).enumerate() {
        let at = i as u64;
        let tag = tag_of(s, at, what);
        model.check(at, tag, what);
        model.settle(at, tag);
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
