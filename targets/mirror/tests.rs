//! Unit tests of the mirror over in-memory legs on the deterministic executor: creation and
//! its refusals, assembly, read balancing and repair, degraded operation and leg changes,
//! scrub. The seeded whole-system simulation is `tests/mirror_sim.rs`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::copy::CopyConfig;
use crate::device::reactor::{run_local, spawn};
use crate::device::{FaultConfig, FaultyDevice, MemDevice, OpKind};
use crate::error::ErrorKind;

const LEG: SectorCount = SectorCount(4096);

fn mem(name: &str) -> Arc<MemDevice> {
    MemDevice::new(name, LEG)
}

fn devs(legs: &[Arc<MemDevice>]) -> Vec<DeviceRef> {
    legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect()
}

fn small_engine() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(16),
        memory_budget_bytes: 8 * 16 * 512,
        ..CopyConfig::default()
    }
}

fn options(region: u64) -> CreateOptions {
    CreateOptions {
        region_size: Some(SectorCount(region)),
        nosync: false,
        force: false,
    }
}

/// Runs `body` with the mirror on `legs` (opened: created or assembled), its engine and its
/// resync driver as local tasks; stops everything afterwards.
fn with_mirror<T: 'static, F>(
    legs: Vec<DeviceRef>,
    opts: CreateOptions,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T>
where
    F: Future<Output = T> + 'static,
{
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(small_engine()).expect("engine");
        let runner = spawn(run);
        let env = MirrorEnv {
            engine,
            tuning: Tuning::default(),
        };
        let target = match MirrorTarget::open(legs, &opts, env).await {
            Ok(t) => Arc::new(t),
            Err(err) => {
                runner.await;
                return Err(err);
            }
        };
        let driver = spawn(target.resync_task());
        let out = body(Arc::clone(&target)).await;
        target.stop();
        driver.await;
        drop(target);
        runner.await;
        Ok(out)
    })
}

/// Lets the driver run until every leg is in sync.
async fn settle(target: &MirrorTarget) {
    for _ in 0..100_000 {
        if target.is_synced() {
            return;
        }
        smol::future::yield_now().await;
    }
    panic!("resync did not finish: {}", target.status());
}

async fn write(target: &MirrorTarget, sector: u64, data: &[u8]) {
    let buf = Arc::new(AlignedBuf::from_slice(data));
    target
        .write(Sector(sector), buf, WriteFlags::default())
        .await
        .expect("write");
}

async fn read(target: &MirrorTarget, sector: u64, sectors: u64) -> Vec<u8> {
    let (res, buf) = target
        .read(
            Sector(sector),
            AlignedBuf::for_sectors(SectorCount(sectors)),
        )
        .await;
    res.expect("read");
    buf.as_slice().to_vec()
}

fn data_of(leg: &MemDevice, layout: Layout) -> Vec<u8> {
    leg.snapshot(Extent::new(layout.data_offset, layout.data_size))
}

fn pattern(seed: u8, sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn create_syncs_then_the_same_open_assembles() {
    let legs = vec![mem("a"), mem("b"), mem("c")];
    legs[0].poke(Sector(2048), &pattern(5, 64));
    let uuid = with_mirror(devs(&legs), options(64), |t| async move {
        settle(&t).await;
        assert_eq!(t.info().size, SectorCount(2048));
        write(&t, 100, &pattern(9, 8)).await;
        t.flush().await.expect("flush");
        t.uuid()
    })
    .expect("create");
    let layout = Layout::compute(LEG, Some(SectorCount(64))).expect("layout");
    assert_eq!(data_of(&legs[1], layout), data_of(&legs[0], layout));
    assert_eq!(data_of(&legs[2], layout), data_of(&legs[0], layout));
    // The same command again assembles, keeping the data.
    let again = with_mirror(devs(&legs), options(64), |t| async move {
        assert_eq!(read(&t, 100, 8).await, pattern(9, 8));
        assert_eq!(read(&t, 0, 64).await, pattern(5, 64));
        assert_eq!(t.leg_states()[..3], [LegState::InSync; 3]);
        t.uuid()
    })
    .expect("assemble");
    assert_eq!(again, uuid);
}

#[test]
fn foreign_and_other_mirrors_legs_are_refused_without_force() {
    let legs = vec![mem("a"), mem("b")];
    let mut sector = vec![0u8; 512];
    sector[1080 - 1024..1082 - 1024].copy_from_slice(&[0x53, 0xef]);
    legs[1].poke(Sector(2), &sector);
    let err = with_mirror(devs(&legs), options(64), |_| async {}).expect_err("ext4 leg");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("an ext2 file system"), "{err}"); // libblkid: a bare ext magic
    let forced = CreateOptions {
        force: true,
        ..options(64)
    };
    with_mirror(devs(&legs), forced, |_| async {}).expect("force overwrites");
    // Now a leg of that mirror, next to a blank device, is refused for a new mirror.
    let others = vec![Arc::clone(&legs[0]), mem("c")];
    let err = with_mirror(devs(&others), options(64), |_| async {}).expect_err("mixed");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("not a leg of mirror"), "{err}");
}

#[test]
fn legs_of_very_different_sizes_are_refused() {
    let legs: Vec<DeviceRef> = vec![mem("a"), MemDevice::new("big", SectorCount(9000))];
    let err = with_mirror(legs, options(64), |_| async {}).expect_err("sizes");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("more than twice"), "{err}");
    let ok: Vec<DeviceRef> = vec![mem("a"), MemDevice::new("bigger", SectorCount(8000))];
    let size = with_mirror(ok, options(64), |t| async move { t.info().size }).expect("2x is ok");
    assert_eq!(size, SectorCount(2048), "the smallest leg decides");
    let one: Vec<DeviceRef> = vec![mem("a")];
    let err = with_mirror(one, options(64), |_| async {}).expect_err("one leg");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn a_large_read_is_split_across_legs() {
    let legs = vec![mem("a"), mem("b"), mem("c")];
    let nosync = CreateOptions {
        nosync: true,
        ..options(1024)
    };
    with_mirror(devs(&legs), nosync, |t| async move {
        write(&t, 0, &pattern(1, 512)).await;
        let before: Vec<u64> = reads(&t);
        assert_eq!(read(&t, 0, 512).await, pattern(1, 512));
        let after = reads(&t);
        let used = before.iter().zip(&after).filter(|(b, a)| a > b).count();
        assert_eq!(
            used, 3,
            "a 256 KiB read uses every leg: {before:?} -> {after:?}"
        );
        // A small read goes to one leg.
        let before = reads(&t);
        read(&t, 8, 8).await;
        let after = reads(&t);
        let used = before.iter().zip(&after).filter(|(b, a)| a > b).count();
        assert_eq!(used, 1);
    })
    .expect("mirror");
}

fn reads(t: &MirrorTarget) -> Vec<u64> {
    let st = t.inner.lock();
    (0..3)
        .map(|s| st.legs[s].stats.reads.load(Ordering::Relaxed))
        .collect()
}

#[test]
fn a_read_error_is_retried_and_repaired_from_the_good_leg() {
    let inner = [mem("a"), mem("b")];
    let faulty: Vec<_> = inner
        .iter()
        .map(|m| FaultyDevice::new(Arc::clone(m), FaultConfig::default()))
        .collect();
    let legs: Vec<DeviceRef> = faulty.iter().map(|f| Arc::clone(f) as DeviceRef).collect();
    let nosync = CreateOptions {
        nosync: true,
        ..options(64)
    };
    let f = faulty.clone();
    let inner2 = inner.clone();
    with_mirror(legs, nosync, move |t| async move {
        write(&t, 128, &pattern(3, 8)).await;
        t.flush().await.expect("flush");
        let layout = t.layout();
        // Leg 0's copy rots, and reading it fails.
        let at = layout.data_offset + SectorCount(128);
        inner2[0].poke(at, &[0u8; 4096]);
        f[0].fail_extent(OpKind::Read, Extent::new(at, SectorCount(8)));
        for _ in 0..4 {
            assert_eq!(read(&t, 128, 8).await, pattern(3, 8), "served by leg 1");
        }
        settle(&t).await;
        let repaired = inner2[0].snapshot(Extent::new(at, SectorCount(8)));
        assert_eq!(repaired, pattern(3, 8), "the good data was written back");
        let status = t.status();
        let errors: u64 = status["legs"][0]["read_errors"].as_u64().expect("count");
        assert!(errors >= 1, "{status}");
        assert_eq!(status["legs"][1]["read_errors"], 0);
        assert_eq!(status["legs"][0]["state"], "in-sync");
    })
    .expect("mirror");
}

#[test]
fn a_failed_leg_comes_back_with_an_incremental_resync() {
    let inner = [mem("a"), mem("b")];
    let faulty: Vec<_> = inner
        .iter()
        .map(|m| FaultyDevice::new(Arc::clone(m), FaultConfig::default()))
        .collect();
    let legs: Vec<DeviceRef> = faulty.iter().map(|f| Arc::clone(f) as DeviceRef).collect();
    let f = faulty.clone();
    let i2 = inner.clone();
    with_mirror(legs, options(64), move |t| async move {
        settle(&t).await;
        for _ in 0..8 {
            t.tick();
            smol::future::yield_now().await;
        }
        settle(&t).await;
        f[1].set_dead(true);
        write(&t, 0, &pattern(7, 8)).await; // fails on leg 1: degraded
        assert_eq!(t.leg_states()[1], LegState::Failed);
        assert_eq!(t.status()["degraded"], true);
        write(&t, 1024, &pattern(8, 8)).await;
        f[1].heal();
        let copied_before = t.inner.engine.stats().bytes_done;
        let dev: DeviceRef = f[1].clone();
        let slot = t
            .add_leg(dev, AddLegOptions::default())
            .await
            .expect("re-add");
        assert_eq!(slot, 1);
        settle(&t).await;
        let copied = t.inner.engine.stats().bytes_done - copied_before;
        assert!(
            copied <= 2 * 64 * 512,
            "only the two written regions are copied, not {copied} bytes"
        );
        let layout = t.layout();
        assert_eq!(data_of(&i2[1], layout), data_of(&i2[0], layout));
        assert_eq!(t.status()["degraded"], false);
    })
    .expect("mirror");
}

#[test]
fn a_removed_leg_comes_back_with_a_full_resync() {
    let legs = vec![mem("a"), mem("b")];
    let l = legs.clone();
    with_mirror(devs(&legs), options(64), move |t| async move {
        settle(&t).await;
        let err = t.fail_leg(0).await;
        assert!(err.is_ok());
        let err = t
            .remove_leg(1)
            .await
            .expect_err("leg 1 is the last in-sync leg");
        assert_eq!(err.kind(), ErrorKind::Busy);
        t.remove_leg(0).await.expect("remove the failed leg");
        write(&t, 8, &pattern(2, 8)).await;
        for _ in 0..8 {
            t.tick();
            smol::future::yield_now().await;
        }
        let before = t.inner.engine.stats().bytes_done;
        let dev: DeviceRef = l[0].clone();
        t.add_leg(dev, AddLegOptions::default())
            .await
            .expect("add back");
        settle(&t).await;
        let copied = t.inner.engine.stats().bytes_done - before;
        assert_eq!(copied, 2048 * 512, "a full resync");
        let layout = t.layout();
        assert_eq!(data_of(&l[0], layout), data_of(&l[1], layout));
    })
    .expect("mirror");
}

#[test]
fn scrub_counts_mismatches_and_repair_fixes_them() {
    let legs = vec![mem("a"), mem("b")];
    let nosync = CreateOptions {
        nosync: true,
        ..options(64)
    };
    let l = legs.clone();
    with_mirror(devs(&legs), nosync, move |t| async move {
        let layout = t.layout();
        l[1].poke(layout.data_offset + SectorCount(70), &[1u8; 512]);
        l[1].poke(layout.data_offset + SectorCount(700), &[1u8; 512]);
        t.start_scrub(false).expect("check");
        while t.status()["scrub"] != serde_json::Value::Null {
            smol::future::yield_now().await;
        }
        assert_eq!(t.status()["mismatch_count"], 2);
        assert_ne!(
            data_of(&l[0], layout),
            data_of(&l[1], layout),
            "check changes nothing"
        );
        t.start_scrub(true).expect("repair");
        while t.status()["scrub"] != serde_json::Value::Null {
            smol::future::yield_now().await;
        }
        settle(&t).await;
        assert_eq!(data_of(&l[0], layout), data_of(&l[1], layout));
        t.start_scrub(false).expect("check again");
        while t.status()["scrub"] != serde_json::Value::Null {
            smol::future::yield_now().await;
        }
        assert_eq!(t.status()["mismatch_count"], 0);
    })
    .expect("mirror");
}

#[test]
fn a_leg_missing_at_assembly_is_stale_and_resynced_when_added() {
    let legs = vec![mem("a"), mem("b"), mem("c")];
    with_mirror(
        devs(&legs),
        options(64),
        |t| async move { settle(&t).await },
    )
    .expect("create");
    let two = vec![Arc::clone(&legs[0]), Arc::clone(&legs[1])];
    let err = with_mirror(devs(&two), options(64), |_| async {}).expect_err("leg 2 is missing");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("force to start degraded"), "{err}");
    let forced = CreateOptions {
        force: true,
        ..options(64)
    };
    let l = legs.clone();
    with_mirror(devs(&two), forced, move |t| async move {
        assert_eq!(t.leg_states()[2], LegState::Stale);
        write(&t, 300, &pattern(4, 16)).await;
        let dev: DeviceRef = l[2].clone();
        assert_eq!(
            t.add_leg(dev, AddLegOptions::default()).await.expect("add"),
            2
        );
        settle(&t).await;
        let layout = t.layout();
        assert_eq!(data_of(&l[2], layout), data_of(&l[0], layout));
    })
    .expect("assemble degraded");
    let status =
        with_mirror(devs(&legs), options(64), |t| async move { t.status() }).expect("all three");
    assert_eq!(status["degraded"], false);
}

#[test]
fn commands_parse_their_arguments() {
    let legs = vec![mem("a"), mem("b")];
    with_mirror(devs(&legs), options(64), |t| async move {
        let err = t
            .command_async("fail-leg", &serde_json::json!({}))
            .await
            .expect_err("no slot");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = t
            .command_async("frobnicate", &serde_json::json!({}))
            .await
            .expect_err("unknown");
        assert!(err.to_string().contains("no command"), "{err}");
        let status = t
            .command_async("status", &serde_json::json!({}))
            .await
            .expect("status");
        assert_eq!(status["legs"].as_array().map(Vec::len), Some(2));
        assert!(status["resync"]["regions_total"].as_u64().is_some());
    })
    .expect("mirror");
}
