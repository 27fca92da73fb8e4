//! A deterministic, seeded simulation of the mirror target: random concurrent writes (some
//! FUA), reads, flushes, write-zeroes and discards over 2..=5 legs of
//! `FaultyDevice<MemDevice::new_volatile>`, with leg faults (dead legs, bad extents, the
//! fail-leg and remove-leg commands), legs healed and added back, scrubs, lazy clearing, and
//! power cuts at random points (between batches and with requests in flight), after which
//! the mirror is assembled again from its legs, sometimes without one of them.
//!
//! Everything runs on `run_local`: the copy engine (`CopyEngine::new_local`) and the resync
//! driver (`MirrorTarget::resync_task`) are local tasks, and ticks come from the test, so a
//! seed replays exactly. `SEED=n` runs one seed; a failure prints the seed.
//!
//! The oracle is a per-sector model. Each write stamps every sector with a unique tag (and the
//! sector's number, to catch misdirected I/O). A read must return the last acknowledged tag,
//! or, for a sector not written since a power cut, one of the tags it could hold after it:
//! the last durable one (acknowledged before a completed flush, or FUA) or any written since.
//! So reads never see a stale leg's data or lose an acknowledged durable write. At the end
//! every fault is healed, every leg added back, the resync runs to completion, and the data
//! areas of all legs must be identical and match the model.
//!
//! Fault policy (so that the data can always survive): a leg is faulted only while another
//! in-sync leg without faults remains. A leg that has not been promoted to in sync before a
//! crash may not be the only copy, so an assembly that finds no in-sync leg is retried with
//! every member.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use async_task::Task;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smol::future::yield_now;
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{
    AlignedBuf, BlockDevice, DeviceRef, FaultConfig, FaultyDevice, MemDevice, OpKind, WriteFlags,
};
use ublkdm::target::Target;
use ublkdm::targets::mirror::{
    AddLegOptions, CreateOptions, LegState, MirrorEnv, MirrorTarget, Tuning,
};
use ublkdm::units::{Extent, Sector, SectorCount};

use common::oracle::{trace, Sectors as Model};
use common::{stamp, tag_of};

/// Batches per seed; `BATCHES=n` overrides it for long hunts.
fn batches() -> usize {
    std::env::var("BATCHES").map_or(120, |b| b.parse().expect("BATCHES is a number"))
}

struct SimLeg {
    mem: Arc<MemDevice>,
    dev: Arc<FaultyDevice<MemDevice>>,
    /// Faults are injected on it.
    faulty: bool,
    /// Its slot while it is a member of the mirror.
    slot: Option<usize>,
}

impl SimLeg {
    fn dev(&self) -> DeviceRef {
        self.dev.clone()
    }
}

/// A runtime command the simulation issues.
#[derive(Clone, Copy, Debug)]
enum Command {
    Fail(usize),
    /// Remove sim leg `i` (missing) from its slot.
    Remove(usize),
    /// Heal sim leg `i` and add it.
    Add(usize),
    /// Put sim leg `new` in the slot of the missing sim leg `old`.
    Replace {
        old: usize,
        new: usize,
    },
    Scrub(bool),
}

/// What a command changed in the simulation's view of the legs.
enum Outcome {
    Nothing,
    /// (sim leg, its new slot).
    Slots(Vec<(usize, Option<usize>)>),
}

/// One running incarnation of the mirror (until a crash or the end).
struct Instance {
    target: Arc<MirrorTarget>,
    driver: Task<()>,
    runner: Task<()>,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    legs: Vec<SimLeg>,
    model: Rc<RefCell<Model>>,
    next_tag: u64,
    size: SectorCount,
    tuning: Tuning,
    region: SectorCount,
}

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 6 * 4096,
        ..CopyConfig::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let count = rng.gen_range(2..=5);
        let data = 8 * rng.gen_range(32..128u64);
        let legs = (0..count)
            .map(|i| {
                let extra = 8 * rng.gen_range(0..8u64);
                let mem =
                    MemDevice::new_volatile(&format!("leg{i}"), SectorCount(2048 + data + extra));
                let faults = FaultConfig {
                    seed: seed * 16 + i as u64,
                    max_delay_turns: rng.gen_range(0..4),
                    ..FaultConfig::default()
                };
                SimLeg {
                    dev: FaultyDevice::new(Arc::clone(&mem), faults),
                    mem,
                    faulty: false,
                    slot: None,
                }
            })
            .collect();
        let tuning = Tuning {
            resync_depth: rng.gen_range(1..=4),
            read_split: SectorCount(32),
            clean_every_ticks: 2,
            clear_batch: rng.gen_range(1..64),
            // Requests of up to 20 regions are cut into pieces (without drawing from the rng,
            // so that every seed replays as before the knob existed).
            write_piece_regions: 1 + seed % 8,
            ..Tuning::default()
        };
        Sim {
            region: SectorCount(8 << rng.gen_range(0..4)),
            seed,
            rng,
            legs,
            model: Rc::new(RefCell::new(Model::zeroed(0))),
            next_tag: 1,
            size: SectorCount(0),
            tuning,
        }
    }

    fn env(&self) -> (MirrorEnv, Task<()>) {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine config");
        let runner = spawn(run);
        let env = MirrorEnv {
            engine,
            tuning: self.tuning.clone(),
        };
        (env, runner)
    }

    fn start(&self, target: MirrorTarget, runner: Task<()>) -> Instance {
        let target = Arc::new(target);
        let driver = spawn(target.resync_task());
        Instance {
            target,
            driver,
            runner,
        }
    }

    async fn create(&mut self) -> Instance {
        let nosync = self.rng.gen_bool(0.3);
        let options = CreateOptions {
            region_size: Some(self.region),
            nosync,
            force: false,
        };
        let devs = self.legs.iter().map(SimLeg::dev).collect();
        let (env, runner) = self.env();
        let target = MirrorTarget::open(devs, &options, env)
            .await
            .expect("create");
        for (slot, leg) in self.legs.iter_mut().enumerate() {
            leg.slot = Some(slot);
        }
        self.size = target.info().size;
        self.model = Rc::new(RefCell::new(Model::zeroed(self.size.0)));
        self.start(target, runner)
    }

    /// Assembles from the members, maybe leaving one out (a degraded start). The leg left
    /// out is never the only one that was in sync: that would lose data (assembly refuses
    /// only when no in-sync leg is given at all).
    async fn assemble(&mut self, leave_one_out: bool, states: &[LegState]) -> Instance {
        let members: Vec<usize> = (0..self.legs.len())
            .filter(|&i| self.legs[i].slot.is_some())
            .collect();
        let in_sync = |i: usize| {
            self.legs[i]
                .slot
                .is_some_and(|s| states[s] == LegState::InSync)
        };
        let mut chosen = members.clone();
        if leave_one_out && chosen.len() > 1 {
            let i = self.rng.gen_range(0..chosen.len());
            let others_in_sync = chosen.iter().any(|&j| j != chosen[i] && in_sync(j));
            if others_in_sync {
                chosen.remove(i);
            }
        }
        for attempt in [chosen, members] {
            let devs = attempt.iter().map(|&i| self.legs[i].dev()).collect();
            let (env, runner) = self.env();
            match MirrorTarget::assemble(devs, env).await {
                Ok(target) => {
                    trace(format_args!("assembled {attempt:?}: {}", target.status()));
                    self.refresh_slots(&target);
                    return self.start(target, runner);
                }
                Err(err) if err.to_string().contains("complete copy") => {
                    trace(format_args!("assembly of {attempt:?} refused: {err}"));
                    runner.await;
                }
                Err(err) => panic!("assembly failed: {err}"),
            }
        }
        panic!("no assembly worked");
    }

    /// Members whose slot the mirror emptied are members no more.
    fn refresh_slots(&mut self, target: &MirrorTarget) {
        let states = target.leg_states();
        for leg in &mut self.legs {
            if let Some(slot) = leg.slot {
                if states[slot] == LegState::Empty {
                    leg.slot = None;
                }
            }
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn random_extent(&mut self, max: u64) -> Extent {
        let start = self.rng.gen_range(0..self.size.0);
        let len = self.rng.gen_range(1..=max.min(self.size.0 - start));
        Extent::new(Sector(start), SectorCount(len))
    }

    /// Spawns a batch of non-overlapping requests.
    fn spawn_batch(&mut self, target: &Arc<MirrorTarget>) -> Vec<Task<()>> {
        let mut taken: Vec<Extent> = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..self.rng.gen_range(1..=4) {
            let kind = self.rng.gen_range(0..100);
            let max = if kind < 60 { 48 } else { 160 };
            let extent = self.random_extent(max);
            if taken
                .iter()
                .any(|t| t.start < extent.end() && extent.start < t.end())
            {
                continue;
            }
            taken.push(extent);
            let t = Arc::clone(target);
            let model = Rc::clone(&self.model);
            let seed = self.seed;
            let task = match kind {
                0..=59 => {
                    let tag = self.tag();
                    let fua = self.rng.gen_bool(0.15);
                    let mut buf = AlignedBuf::for_sectors(extent.len);
                    for (i, chunk) in buf.as_mut_slice().chunks_mut(512).enumerate() {
                        stamp(chunk, extent.start.0 + i as u64, tag);
                    }
                    model.borrow_mut().issue(extent, tag);
                    trace(format_args!("write {extent} tag {tag} fua {fua}"));
                    spawn(async move {
                        let flags = WriteFlags { fua };
                        let res = t.write(extent.start, Arc::new(buf), flags).await;
                        res.unwrap_or_else(|e| panic!("seed {seed}: write {extent}: {e}"));
                        trace(format_args!("ack {extent} tag {tag}"));
                        model.borrow_mut().ack(extent, tag, fua);
                    })
                }
                60..=89 => spawn(async move {
                    let (res, buf) = t
                        .read(extent.start, AlignedBuf::for_sectors(extent.len))
                        .await;
                    res.unwrap_or_else(|e| panic!("seed {seed}: read {extent}: {e}"));
                    let model = model.borrow();
                    for (i, chunk) in buf.as_slice().chunks(512).enumerate() {
                        let at = extent.start.0 + i as u64;
                        model.check(at, tag_of(chunk, at, "read"), "read");
                    }
                }),
                _ => {
                    let discard = kind >= 95;
                    model.borrow_mut().issue(extent, 0);
                    spawn(async move {
                        let res = if discard {
                            t.discard(extent).await
                        } else {
                            t.write_zeroes(extent).await
                        };
                        res.unwrap_or_else(|e| panic!("seed {seed}: zero {extent}: {e}"));
                        model.borrow_mut().ack(extent, 0, false);
                    })
                }
            };
            tasks.push(task);
        }
        tasks
    }

    /// Legs that may be faulted now: some other in-sync leg without faults stays.
    fn faultable(&self, target: &MirrorTarget) -> Vec<usize> {
        let states = target.leg_states();
        let healthy_in_sync = |i: usize| {
            let leg = &self.legs[i];
            !leg.faulty && leg.slot.is_some_and(|s| states[s] == LegState::InSync)
        };
        (0..self.legs.len())
            .filter(|&i| (0..self.legs.len()).any(|j| j != i && healthy_in_sync(j)))
            .collect()
    }

    /// Injects a fault now, or plans a command to run (maybe alongside the next batch).
    fn plan_fault(&mut self, target: &Arc<MirrorTarget>) -> Option<Command> {
        let states = target.leg_states();
        let action = self.rng.gen_range(0..9);
        trace(format_args!("fault {action}, states {states:?}"));
        let missing: Vec<usize> = (0..self.legs.len())
            .filter(|&i| self.legs[i].slot.is_some_and(|s| states[s].is_missing()))
            .collect();
        let away: Vec<usize> = (0..self.legs.len())
            .filter(|&i| self.legs[i].slot.is_none_or(|s| !states[s].is_active()))
            .collect();
        match action {
            0 | 1 => {
                // A leg dies, or grows a bad spot (in its data or, for writes, its metadata).
                let ok = self.faultable(target);
                if ok.is_empty() {
                    return None;
                }
                let i = ok[self.rng.gen_range(0..ok.len())];
                let leg = &self.legs[i];
                if self.rng.gen_bool(0.3) {
                    leg.dev.set_dead(true);
                } else if self.rng.gen_bool(0.2) {
                    let start = Sector(self.rng.gen_range(0..2048));
                    leg.dev
                        .fail_extent(OpKind::Write, Extent::new(start, SectorCount(1)));
                } else {
                    let start = Sector(2048 + self.rng.gen_range(0..self.size.0));
                    let kind = if self.rng.gen_bool(0.5) {
                        OpKind::Read
                    } else {
                        OpKind::Write
                    };
                    leg.dev
                        .fail_extent(kind, Extent::new(start, SectorCount(4)));
                }
                self.legs[i].faulty = true;
                None
            }
            2 => {
                let ok = self.faultable(target);
                let slots: Vec<usize> = ok
                    .into_iter()
                    .filter_map(|i| self.legs[i].slot)
                    .filter(|&s| states[s].is_active())
                    .collect();
                slots.first().map(|&slot| Command::Fail(slot))
            }
            3 => missing.first().map(|&i| Command::Remove(i)),
            4 | 5 => away.first().map(|&i| Command::Add(i)),
            6 => {
                // Replace a missing leg by another leg that is away (healed first).
                let new = away
                    .iter()
                    .copied()
                    .find(|&j| Some(&j) != missing.first())?;
                let old = *missing.first()?;
                Some(Command::Replace { old, new })
            }
            7 => Some(Command::Scrub(false)),
            _ => Some(Command::Scrub(true)),
        }
    }

    /// The devices a command touches, healed (a leg comes back repaired).
    fn prepare(&mut self, command: &Command) -> Vec<usize> {
        let legs = match *command {
            Command::Add(i) => vec![i],
            Command::Remove(i) => vec![i],
            Command::Replace { old, new } => vec![old, new],
            Command::Fail(_) | Command::Scrub(_) => Vec::new(),
        };
        for &i in &legs {
            if !matches!(command, Command::Remove(_)) {
                self.legs[i].dev.heal();
                self.legs[i].faulty = false;
            }
        }
        legs
    }

    /// Runs `command` against the mirror.
    async fn execute(
        target: Arc<MirrorTarget>,
        command: Command,
        slots: Vec<Option<usize>>,
        devs: Vec<DeviceRef>,
        seed: u64,
    ) -> Outcome {
        trace(format_args!("command {command:?}"));
        match command {
            Command::Fail(slot) => {
                let _ = target.fail_leg(slot).await;
                Outcome::Nothing
            }
            Command::Remove(i) => {
                let slot = slots[i].expect("a member");
                target.remove_leg(slot).await.expect("remove a missing leg");
                Outcome::Slots(vec![(i, None)])
            }
            Command::Add(i) => match target
                .add_leg(Arc::clone(&devs[i]), AddLegOptions::default())
                .await
            {
                Ok(slot) => Outcome::Slots(vec![(i, Some(slot))]),
                Err(err) => panic!("seed {seed}: add leg {i}: {err}"),
            },
            Command::Replace { old, new } => {
                let slot = slots[old].expect("a member");
                match target
                    .replace_leg(slot, Arc::clone(&devs[new]), false)
                    .await
                {
                    Ok(got) => Outcome::Slots(vec![(old, None), (new, Some(got))]),
                    Err(err) => panic!("seed {seed}: replace slot {slot}: {err}"),
                }
            }
            Command::Scrub(repair) => {
                let _ = target.start_scrub(repair);
                Outcome::Nothing
            }
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        if let Outcome::Slots(changes) = outcome {
            for (i, slot) in changes {
                self.legs[i].slot = slot;
            }
        }
    }

    /// Heals one (or every) faulty or absent leg and adds it back.
    async fn heal_and_add(&mut self, target: &Arc<MirrorTarget>, all: bool) {
        let states = target.leg_states();
        let away: Vec<usize> = (0..self.legs.len())
            .filter(|&i| match self.legs[i].slot {
                None => true,
                Some(s) => !states[s].is_active(),
            })
            .collect();
        let picked: Vec<usize> = if all {
            away
        } else {
            away.into_iter().take(1).collect()
        };
        for i in picked {
            self.legs[i].dev.heal();
            self.legs[i].faulty = false;
            match target
                .add_leg(self.legs[i].dev(), AddLegOptions::default())
                .await
            {
                Ok(slot) => self.legs[i].slot = Some(slot),
                Err(err) => panic!("seed {}: add leg {i}: {err}", self.seed),
            }
        }
    }

    /// A power cut: cancel everything in flight, stop the legs, lose their caches.
    /// Returns the slot states just before the cut.
    async fn crash(&mut self, inst: Instance, tasks: Vec<Task<()>>) -> Vec<LegState> {
        trace(format_args!("CRASH: {}", inst.target.status()));
        let states = inst.target.leg_states();
        drop(tasks);
        inst.target.stop();
        drop(inst.driver);
        drop(inst.runner);
        drop(inst.target);
        // Copies the old engine left running must not land after the cut.
        for leg in &self.legs {
            leg.dev.set_dead(true);
        }
        for _ in 0..2000 {
            yield_now().await;
        }
        for leg in &mut self.legs {
            leg.mem.crash(&mut self.rng);
            leg.dev.heal();
            leg.faulty = false;
        }
        self.model.borrow_mut().crash();
        states
    }

    /// Waits for the resync to finish, ticking the cleaner.
    async fn settle(&mut self, target: &MirrorTarget) {
        for turn in 0..200_000u32 {
            if target.is_synced() {
                return;
            }
            if turn % 500 == 0 {
                target.tick();
            }
            yield_now().await;
        }
        panic!("seed {}: resync stalled: {}", self.seed, target.status());
    }

    /// Reads the whole device and checks every sector against the model.
    async fn check_all(&self, target: &MirrorTarget, what: &str) {
        let (res, buf) = target
            .read(Sector(0), AlignedBuf::for_sectors(self.size))
            .await;
        res.unwrap_or_else(|e| panic!("seed {}: {what}: full read: {e}", self.seed));
        let model = self.model.borrow();
        for (i, chunk) in buf.as_slice().chunks(512).enumerate() {
            model.check(i as u64, tag_of(chunk, i as u64, what), what);
        }
    }

    /// Every member's data area is the same.
    fn check_legs_identical(&self, target: &MirrorTarget) {
        let layout = target.layout();
        let area = Extent::new(layout.data_offset, layout.data_size);
        let copies: Vec<(usize, Vec<u8>)> = self
            .legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.slot.is_some())
            .map(|(i, l)| (i, l.mem.snapshot(area)))
            .collect();
        for pair in copies.windows(2) {
            if pair[0].1 != pair[1].1 {
                let at = pair[0]
                    .1
                    .iter()
                    .zip(&pair[1].1)
                    .position(|(a, b)| a != b)
                    .expect("differ");
                panic!(
                    "seed {}: legs {} and {} differ at data sector {}: {}",
                    self.seed,
                    pair[0].0,
                    pair[1].0,
                    at / 512,
                    target.status()
                );
            }
        }
    }

    async fn run(mut self) {
        let mut inst = self.create().await;
        for _ in 0..batches() {
            let target = Arc::clone(&inst.target);
            let mut command = None;
            if self.rng.gen_bool(0.12) {
                if let Some(c) = self.plan_fault(&target) {
                    let legs = self.prepare(&c);
                    let slots = self.legs.iter().map(|l| l.slot).collect();
                    let devs = self.legs.iter().map(SimLeg::dev).collect();
                    let run = Self::execute(Arc::clone(&target), c, slots, devs, self.seed);
                    if self.rng.gen_bool(0.5) {
                        let outcome = run.await;
                        self.apply(outcome);
                    } else {
                        command = Some((spawn(run), legs));
                    }
                }
            }
            if self.rng.gen_bool(0.3) {
                target.tick();
            }
            if self.rng.gen_bool(0.08) {
                target.flush().await.expect("flush");
                trace(format_args!("flushed"));
                self.model.borrow_mut().flushed_all();
                if let Some((task, _)) = command.take() {
                    let outcome = task.await;
                    self.apply(outcome);
                }
                continue;
            }
            let tasks = self.spawn_batch(&target);
            if self.rng.gen_bool(0.04) {
                for _ in 0..self.rng.gen_range(0..60) {
                    yield_now().await;
                }
                // A command cut short leaves its legs' membership unknown: they are left out
                // of the assembly and added back later.
                if let Some((task, legs)) = command.take() {
                    match task.cancel().await {
                        Some(outcome) => self.apply(outcome),
                        None => legs.into_iter().for_each(|i| self.legs[i].slot = None),
                    }
                }
                drop(target);
                let states = self.crash(inst, tasks).await;
                let leave = self.rng.gen_bool(0.3);
                inst = self.assemble(leave, &states).await;
                continue;
            }
            for task in tasks {
                task.await;
            }
            if let Some((task, _)) = command.take() {
                let outcome = task.await;
                self.apply(outcome);
            }
            if self.rng.gen_bool(0.03) {
                drop(target);
                let states = self.crash(inst, Vec::new()).await;
                let leave = self.rng.gen_bool(0.3);
                inst = self.assemble(leave, &states).await;
                self.check_all(&inst.target, "after a power cut").await;
            }
        }
        // Heal everything, bring every leg back, and let the resync finish.
        // A copy or write issued before the heal may still fail a leg: repeat until none did.
        let target = Arc::clone(&inst.target);
        for round in 0.. {
            assert!(
                round < 5,
                "seed {}: legs keep failing after healing",
                self.seed
            );
            for leg in &mut self.legs {
                leg.dev.heal();
                leg.faulty = false;
            }
            self.heal_and_add(&target, true).await;
            self.settle(&target).await;
            let states = target.leg_states();
            if self
                .legs
                .iter()
                .all(|l| l.slot.is_some_and(|s| states[s].is_active()))
            {
                break;
            }
        }
        target.flush().await.expect("final flush");
        self.model.borrow_mut().flushed_all();
        self.check_all(&target, "at the end").await;
        self.check_legs_identical(&target);
        for _ in 0..4 {
            target.tick();
            for _ in 0..50 {
                yield_now().await;
            }
        }
        // A clean restart assembles in sync, with the same data.
        drop(target);
        let states = inst.target.leg_states();
        target_stop(inst).await;
        let inst = self.assemble(false, &states).await;
        self.check_all(&inst.target, "after a restart").await;
        self.settle(&inst.target).await;
        self.check_legs_identical(&inst.target);
        target_stop(inst).await;
    }
}

async fn target_stop(inst: Instance) {
    inst.target.stop();
    inst.driver.await;
    drop(inst.target);
    inst.runner.await;
}

fn run_seed(seed: u64) {
    if std::env::var_os("TRACE").is_some() {
        let _ = env_logger::builder().is_test(true).try_init();
    }
    let sim = Sim::new(seed);
    run_local(sim.run());
}

#[test]
fn mirror_survives_faults_crashes_and_leg_changes() {
    // SEED=n replays one seed; SEEDS=a..b runs a range (for long hunts).
    let seeds: Vec<u64> = match (std::env::var("SEED"), std::env::var("SEEDS")) {
        (Ok(s), _) => vec![s.parse().expect("SEED is a number")],
        (_, Ok(range)) => {
            let (a, b) = range.split_once("..").expect("SEEDS=a..b");
            (a.parse().expect("a number")..b.parse().expect("a number")).collect()
        }
        _ => (0..150).collect(),
    };
    for seed in seeds {
        if let Err(panic) = std::panic::catch_unwind(|| run_seed(seed)) {
            eprintln!("mirror simulation failed with seed {seed}; replay with SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
}
