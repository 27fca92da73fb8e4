//! Deterministic simulation of the copy engine over in-memory devices with injected faults.
//!
//! Each seed builds a random engine configuration, a source with random content (some of it
//! unreadable), up to eight destinations (some with unwritable extents, all with random
//! completion delays that reorder I/O), and a batch of random jobs of both priorities with
//! and without `ignore_errors`, each writing its own slot of the destinations. Everything
//! runs on one thread in FIFO order, so a seed replays exactly.
//!
//! Invariants checked: a successful copy's destinations equal the source; errors are
//! reported on exactly the destinations that failed (with `ignore_errors`), and never on one
//! that did not; memory never exceeds the budget; a seed run twice gives the same completions.
//!
//! `SEED=n` replays one seed; `SIM_SEEDS=n` runs n seeds (default 200).

use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ublkdm::copy::{Completions, CopyConfig, CopyDone, CopyEngine, CopyJob, Location, Priority};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{DeviceRef, FaultConfig, FaultyDevice, MemDevice, OpKind};
use ublkdm::units::{Extent, Sector, SectorCount};

/// Sectors each job may write on every destination: job `i` owns `[i * SLOT, (i + 1) * SLOT)`.
const SLOT: u64 = 512;

struct World {
    source: Arc<FaultyDevice<MemDevice>>,
    dests: Vec<Arc<FaultyDevice<MemDevice>>>,
    /// Per destination: the extents whose writes fail.
    bad_writes: Vec<Vec<Extent>>,
    /// Extents of the source whose reads fail.
    bad_reads: Vec<Extent>,
    config: CopyConfig,
    jobs: Vec<(u64, CopyJob)>,
}

fn overlaps(a: Extent, b: Extent) -> bool {
    a.start < b.end() && b.start < a.end()
}

fn random_extent_within(rng: &mut ChaCha8Rng, base: u64, span: u64) -> Extent {
    let start = rng.gen_range(0..span);
    let len = rng.gen_range(1..=(span - start).min(24));
    Extent::new(Sector(base + start), SectorCount(len))
}

fn build_world(seed: u64) -> World {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nr_jobs = rng.gen_range(1..=6u64);
    let size = SectorCount(SLOT * nr_jobs);
    let faults = |rng: &mut ChaCha8Rng| FaultConfig {
        seed: rng.gen(),
        max_delay_turns: rng.gen_range(0..6),
        ..Default::default()
    };

    let source = FaultyDevice::new(MemDevice::new("src", size), faults(&mut rng));
    let mut content = vec![0u8; size.to_usize_bytes()];
    rng.fill_bytes(&mut content);
    source.inner().poke(Sector(0), &content);
    let mut bad_reads = Vec::new();
    if rng.gen_bool(0.3) {
        let bad = random_extent_within(&mut rng, 0, size.0);
        source.fail_extent(OpKind::Read, bad);
        bad_reads.push(bad);
    }

    let nr_dests = rng.gen_range(1..=8usize);
    let mut dests = Vec::new();
    let mut bad_writes = Vec::new();
    for d in 0..nr_dests {
        let mem = if rng.gen_bool(0.5) {
            MemDevice::new(&format!("d{d}"), size)
        } else {
            MemDevice::new_without_write_zeroes(&format!("d{d}"), size)
        };
        let dev = FaultyDevice::new(mem, faults(&mut rng));
        let mut bad = Vec::new();
        if rng.gen_bool(0.25) {
            let extent = random_extent_within(&mut rng, 0, size.0);
            dev.fail_extent(OpKind::Write, extent);
            bad.push(extent);
        }
        dests.push(dev);
        bad_writes.push(bad);
    }

    let sub_job = SectorCount(8 * rng.gen_range(1..=8u64));
    let config = CopyConfig {
        sub_job_sectors: sub_job,
        memory_budget_bytes: sub_job.to_usize_bytes() * rng.gen_range(1..=6usize),
        sub_jobs_per_job: rng.gen_range(1..=8),
        jobs_in_flight_max: rng.gen_range(1..=4),
        queue_max: rng.gen_range(1..=4),
        ..CopyConfig::default()
    };

    let jobs = (0..nr_jobs)
        .map(|slot| {
            let within = random_extent_within_len(&mut rng);
            let src_start = rng.gen_range(0..=size.0 - within.1);
            let dest_start = slot * SLOT + within.0;
            let len = SectorCount(within.1);
            let take = rng.gen_range(1..=nr_dests);
            let dest_locs = dests[..take]
                .iter()
                .map(|d| {
                    let dev: DeviceRef = d.clone();
                    Location::new(&dev, Extent::new(Sector(dest_start), len))
                })
                .collect();
            let src_dev: DeviceRef = source.clone();
            let mut job = if rng.gen_bool(0.15) {
                CopyJob::zero(dest_locs)
            } else {
                CopyJob::copy(
                    Location::new(&src_dev, Extent::new(Sector(src_start), len)),
                    dest_locs,
                )
            };
            if rng.gen_bool(0.5) {
                job = job.ignoring_errors();
            }
            if rng.gen_bool(0.3) {
                job = job.with_priority(Priority::Foreground);
            }
            (slot, job)
        })
        .collect();
    World {
        source,
        dests,
        bad_writes,
        bad_reads,
        config,
        jobs,
    }
}

/// An offset into a slot and a length that fits in the slot.
fn random_extent_within_len(rng: &mut ChaCha8Rng) -> (u64, u64) {
    let offset = rng.gen_range(0..SLOT / 2);
    let len = rng.gen_range(1..=SLOT - offset);
    (offset, len)
}

/// Runs the world's jobs; returns the completions in the order they arrived and the peak memory.
fn run_world(world: &World) -> (Vec<CopyDone>, usize, usize) {
    let config = world.config.clone();
    let jobs = world.jobs.clone();
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(config).expect("valid config");
        let runner = spawn(run);
        let completions = Completions::new();
        for (token, job) in jobs.iter().cloned() {
            engine
                .submit(job, token, &completions)
                .await
                .expect("submit");
        }
        let mut done = Vec::new();
        for _ in 0..jobs.len() {
            done.push(completions.next().await);
        }
        let stats = engine.stats();
        engine.close();
        drop(engine);
        runner.await;
        (done, stats.memory_peak, stats.memory_budget)
    })
}

fn check_world(world: &World, done: &[CopyDone]) {
    for d in done {
        let job = &world.jobs[d.token as usize].1;
        let len = job.len();
        let read_extent = job.source.as_ref().map(|s| s.extent);
        let read_fails =
            read_extent.is_some_and(|e| world.bad_reads.iter().any(|b| overlaps(*b, e)));
        if d.read_error.is_some() {
            assert!(
                read_fails,
                "job {}: read error reported on a clean source",
                d.token
            );
        }
        for (i, dest) in job.dests.iter().enumerate() {
            let dest_fails = world.bad_writes[i]
                .iter()
                .any(|b| overlaps(*b, dest.extent));
            if d.write_errors.contains(i) {
                assert!(
                    dest_fails,
                    "job {}: error reported on healthy destination {i}",
                    d.token
                );
            } else if job.ignore_errors && !read_fails {
                assert!(
                    !dest_fails,
                    "job {}: failed destination {i} not reported",
                    d.token
                );
            }
            if d.is_ok() {
                let got = world.dests[i].inner().snapshot(dest.extent);
                let want = match read_extent {
                    Some(src) => world.source.inner().snapshot(src),
                    None => vec![0; len.to_usize_bytes()],
                };
                assert!(
                    got == want,
                    "job {}: destination {i} differs from the source",
                    d.token
                );
            }
        }
        assert!(d.write_errors.iter().all(|i| i < job.dests.len()));
    }
}

fn run_seed(seed: u64) {
    let world = build_world(seed);
    let (done, peak, budget) = run_world(&world);
    assert_eq!(done.len(), world.jobs.len(), "every job completes once");
    assert!(peak <= budget, "memory peak {peak} above budget {budget}");
    check_world(&world, &done);
    // Replay: the same seed gives the same completions, in the same order.
    let again = build_world(seed);
    let (done_again, _, _) = run_world(&again);
    let key = |d: &CopyDone| {
        (
            d.token,
            d.read_error,
            d.write_errors,
            d.cancelled,
            d.sectors_done,
        )
    };
    assert_eq!(
        done.iter().map(key).collect::<Vec<_>>(),
        done_again.iter().map(key).collect::<Vec<_>>(),
        "seed does not replay"
    );
}

#[test]
fn copy_engine_simulation() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(s) => vec![s.parse().expect("SEED is a number")],
        Err(_) => {
            let n = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u64);
            let random_base: u64 = rand::random::<u32>() as u64;
            (0..n).chain(random_base..random_base + 20).collect()
        }
    };
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed));
        if let Err(panic) = result {
            eprintln!("copy simulation failed with seed {seed}; replay with SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
}
