//! Copy completions drive the region map: a resync of out-of-sync regions through the copy
//! engine, over in-memory devices with injected faults and delays, seeded.
//!
//! One loop submits a job per region (token = region index) while the engine has room and
//! drains completions on the same thread, recording each with `region::record_recovery`. A
//! leg with an unwritable extent keeps exactly the regions that touch it out of sync; every
//! other region ends in sync with identical legs. `SEED=n` replays one seed.

use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ublkdm::copy::{Completions, CopyConfig, CopyEngine, CopyJob, Location};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{DeviceRef, FaultConfig, FaultyDevice, MemDevice, OpKind};
use ublkdm::region::{record_recovery, RegionGeometry, RegionIndex, RegionMap, RegionRange};
use ublkdm::units::{Extent, Sector, SectorCount};

/// Jobs the resync loop keeps in flight.
const RESYNC_DEPTH: usize = 4;

fn run_seed(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = SectorCount(8 * rng.gen_range(64..512u64));
    let region_size = SectorCount(8 << rng.gen_range(0..4u32));
    let geometry = RegionGeometry::new(size, region_size).expect("geometry");
    let source = MemDevice::new("leg0", size);
    let mut content = vec![0u8; size.to_usize_bytes()];
    rng.fill_bytes(&mut content);
    source.poke(Sector(0), &content);
    let faults = FaultConfig {
        seed,
        max_delay_turns: 4,
        ..Default::default()
    };
    let legs: Vec<_> = (1..=rng.gen_range(1..=3))
        .map(|i| FaultyDevice::new(MemDevice::new(&format!("leg{i}"), size), faults.clone()))
        .collect();
    let bad = Extent::new(Sector(rng.gen_range(0..size.0)), SectorCount(1));
    let broken_leg = rng.gen_range(0..legs.len() + 1); // == len: no broken leg
    if let Some(leg) = legs.get(broken_leg) {
        leg.fail_extent(OpKind::Write, bad);
    }
    let config = CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 3 * 4096,
        ..CopyConfig::default()
    };

    let (map, legs) = run_local({
        let legs = legs.clone();
        let source: DeviceRef = source.clone();
        async move {
            let (engine, run) = CopyEngine::new_local(config).expect("config");
            let runner = spawn(run);
            let mut map = RegionMap::new(geometry);
            map.mark_out_of_sync(geometry.all());
            let completions = Completions::new();
            let mut in_flight = 0usize;
            let mut failed = std::collections::HashSet::new();
            loop {
                while in_flight < RESYNC_DEPTH {
                    let Some(region) = map.next_to_recover() else {
                        break;
                    };
                    // A region that failed stays out of sync; retrying it forever would spin.
                    if failed.contains(&region) {
                        break;
                    }
                    map.begin_recovery(region);
                    let extent = geometry.extent_of(region);
                    let dests = legs
                        .iter()
                        .map(|l| {
                            let d: DeviceRef = l.clone();
                            Location::new(&d, extent)
                        })
                        .collect();
                    let job =
                        CopyJob::copy(Location::new(&source, extent), dests).ignoring_errors();
                    engine
                        .submit(job, region.0, &completions)
                        .await
                        .expect("submit");
                    in_flight += 1;
                }
                if in_flight == 0 {
                    break;
                }
                let done = completions.next().await;
                in_flight -= 1;
                if !record_recovery(&mut map, RegionIndex(done.token), &done) {
                    failed.insert(RegionIndex(done.token));
                }
            }
            engine.close();
            drop(engine);
            runner.await;
            (map, legs)
        }
    });

    let bad_region = geometry.region_of(bad.start);
    for region in RegionRange::new(RegionIndex(0), RegionIndex(geometry.count().0)) {
        let broken = broken_leg < legs.len() && region == bad_region;
        assert_eq!(
            map.in_sync(region),
            !broken,
            "seed {seed}: region {region:?}"
        );
        if !broken {
            let extent = geometry.extent_of(region);
            for leg in &legs {
                assert!(
                    leg.inner().snapshot(extent) == source.snapshot(extent),
                    "seed {seed}: leg differs in {region:?}"
                );
            }
        }
    }
    let expected_in_sync = geometry.count().0 - u64::from(broken_leg < legs.len());
    assert_eq!(map.sync_count().0, expected_in_sync);
    let _ = Arc::strong_count(&source);
}

#[test]
fn resync_through_the_copy_engine_updates_the_map() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(s) => vec![s.parse().expect("SEED is a number")],
        Err(_) => (0..100).collect(),
    };
    for seed in seeds {
        if let Err(panic) = std::panic::catch_unwind(|| run_seed(seed)) {
            eprintln!("resync simulation failed with seed {seed}; replay with SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
}
