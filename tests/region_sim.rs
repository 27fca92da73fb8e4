//! A deterministic simulation of a mirror's region bookkeeping: concurrent writers, a lazy
//! cleaner and a resync worker drive one `RegionMap` and one `DirtyLog` (over a delaying,
//! failing `FaultyDevice`) the way a mirror would, on `run_local`.
//!
//! The invariant checked after every step is the mirror's safety rule: a region whose legs
//! may differ (a write past its mark, or out of sync) has its dirty-log bit durable. At the
//! end, the log reopened from the device holds every out-of-sync region.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smol::future::yield_now;
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{DeviceRef, FaultConfig, FaultyDevice, MemDevice};
use ublkdm::region::{DirtyLog, RegionGeometry, RegionIndex, RegionMap, WriteAdmission};
use ublkdm::units::{Extent, Sector, SectorCount};

const REGIONS: u64 = 24;
const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 40;

/// What the tasks share: the map (behind a RefCell, as a mirror would use a mutex), the log,
/// the writes past their mark, and a seeded PRNG.
struct World {
    map: RefCell<RegionMap>,
    log: Arc<DirtyLog>,
    writing: RefCell<BTreeMap<RegionIndex, u32>>,
    rng: RefCell<ChaCha8Rng>,
}

impl World {
    fn chance(&self, p: f64) -> bool {
        self.rng.borrow_mut().gen_bool(p)
    }

    async fn pause(&self) {
        let turns = self.rng.borrow_mut().gen_range(0..4);
        for _ in 0..turns {
            yield_now().await;
        }
    }

    /// The safety rule (module doc).
    fn check(&self) {
        for (&region, _) in self.writing.borrow().iter() {
            assert!(
                self.log.is_durable(region),
                "{region} is written with a clear bit"
            );
        }
        let map = self.map.borrow();
        for region in map.geometry().all() {
            if !map.in_sync(region) {
                assert!(
                    self.log.is_durable(region),
                    "{region} is out of sync, bit clear"
                );
            }
        }
    }
}

async fn writer(world: Rc<World>) {
    for _ in 0..WRITES_PER_WRITER {
        let region = RegionIndex(world.rng.borrow_mut().gen_range(0..REGIONS));
        let needs_mark = loop {
            match world.map.borrow_mut().begin_write(region) {
                WriteAdmission::Proceed { needs_mark } => break needs_mark,
                WriteAdmission::Wait => {}
            }
            yield_now().await;
        };
        if needs_mark {
            if world.log.mark(&[region]).await.is_err() {
                world.map.borrow_mut().abort_write(region);
                continue;
            }
            world.map.borrow_mut().marked(&[region]);
        }
        *world.writing.borrow_mut().entry(region).or_insert(0) += 1;
        world.check();
        world.pause().await; // the legs' writes
        world.check();
        leave(&world.writing, region);
        let ok = !world.chance(0.05);
        world.map.borrow_mut().end_write(region, ok);
        world.check();
    }
}

fn leave(writing: &RefCell<BTreeMap<RegionIndex, u32>>, region: RegionIndex) {
    let mut writing = writing.borrow_mut();
    let count = writing.get_mut(&region).expect("write in flight");
    *count -= 1;
    if *count == 0 {
        writing.remove(&region);
    }
}

async fn cleaner(world: Rc<World>, done: Rc<RefCell<bool>>) {
    while !*done.borrow() {
        let regions = {
            let mut map = world.map.borrow_mut();
            let regions = map.regions_to_clear(6);
            world.log.clear(&regions);
            regions
        };
        let flush_ok = !world.chance(0.1);
        let w = Rc::clone(&world);
        let flush = async move {
            w.pause().await;
            if flush_ok {
                Ok(())
            } else {
                Err(std::io::Error::from_raw_os_error(5))
            }
        };
        match world.log.commit_clears(flush).await {
            Ok(()) => world.map.borrow_mut().cleared(&regions),
            Err(_) => world.map.borrow_mut().clear_failed(&regions),
        }
        world.check();
        world.pause().await;
    }
}

async fn resyncer(world: Rc<World>, done: Rc<RefCell<bool>>) {
    while !*done.borrow() {
        let next = world.map.borrow_mut().next_to_recover();
        if let Some(region) = next {
            world.map.borrow_mut().begin_recovery(region);
            world.pause().await; // the copy
            let ok = !world.chance(0.1);
            world.map.borrow_mut().recovery_done(region, ok);
            world.check();
        }
        yield_now().await;
    }
}

fn simulate(seed: u64) {
    let geometry = RegionGeometry::new(SectorCount(REGIONS * 8), SectorCount(8)).expect("geometry");
    let area = Extent::new(Sector(0), DirtyLog::area_sectors(geometry.count()));
    let mem = MemDevice::new("log", area.len);
    let uuid = uuid::Uuid::from_u128(u128::from(seed));
    // Create without faults, then run over a faulty view of the same memory.
    run_local(DirtyLog::create(mem.clone(), area, geometry, uuid)).expect("create");
    let config = FaultConfig {
        seed,
        write_error_rate: 0.05,
        max_delay_turns: 3,
        ..Default::default()
    };
    let faulty: DeviceRef = FaultyDevice::new(mem.clone(), config);
    let out_of_sync = run_local(async move {
        let (log, bits) = DirtyLog::open(faulty, area).await.expect("open");
        assert!(bits.none());
        let world = Rc::new(World {
            map: RefCell::new(RegionMap::new(geometry)),
            log: Arc::new(log),
            writing: RefCell::new(BTreeMap::new()),
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
        });
        let done = Rc::new(RefCell::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| spawn(writer(Rc::clone(&world))))
            .collect();
        let cleaner = spawn(cleaner(Rc::clone(&world), Rc::clone(&done)));
        let resyncer = spawn(resyncer(Rc::clone(&world), Rc::clone(&done)));
        for task in writers {
            task.await;
        }
        *done.borrow_mut() = true;
        cleaner.await;
        resyncer.await;
        world.check();
        let map = world.map.borrow();
        let out: Vec<RegionIndex> = map.geometry().all().filter(|&r| !map.in_sync(r)).collect();
        out
    });
    let (_, bits) = run_local(DirtyLog::open(mem, area)).expect("reopen");
    for region in out_of_sync {
        assert!(
            bits.get(region),
            "seed {seed}: {region} out of sync but clear on disk"
        );
    }
}

#[test]
fn mirror_bookkeeping_keeps_bits_durable_under_faults() {
    for seed in 0..40 {
        simulate(seed);
    }
}
