//! Unit tests of the mirror over in-memory legs on the deterministic executor: creation and
//! its refusals, assembly, read balancing and repair, degraded operation and leg changes,
//! scrub. The seeded whole-system simulation is `tests/mirror_sim.rs`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::superblock::{self, SlotEntry, SB_SECTORS};
use super::*;
use crate::copy::CopyConfig;
use crate::device::reactor::{run_local, spawn};
use crate::device::{FaultConfig, FaultyDevice, Forward, Forwarding, MemDevice, OpKind};
use crate::error::{Error, ErrorKind};
use crate::region::{RegionIndex, MAX_REGION_COUNT};
use proptest::prelude::*;

pub(super) const LEG: SectorCount = SectorCount(4096);

pub(super) fn mem(name: &str) -> Arc<MemDevice> {
    MemDevice::new(name, LEG)
}

pub(super) fn devs(legs: &[Arc<MemDevice>]) -> Vec<DeviceRef> {
    legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect()
}

fn small_engine() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(16),
        memory_budget_bytes: 8 * 16 * 512,
        ..CopyConfig::default()
    }
}

pub(super) fn options(region: u64) -> CreateOptions {
    CreateOptions {
        region_size: Some(SectorCount(region)),
        nosync: false,
        force: false,
    }
}

/// Runs `body` with the mirror on `legs` (opened: created or assembled), its engine and its
/// resync driver as local tasks; stops everything afterwards.
pub(super) fn with_mirror<T: 'static, F>(
    legs: Vec<DeviceRef>,
    opts: CreateOptions,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T>
where
    F: Future<Output = T> + 'static,
{
    with_mirror_tuned(legs, opts, Tuning::default(), body)
}

/// [`with_mirror`] with `tuning`.
pub(super) fn with_mirror_tuned<T: 'static, F>(
    legs: Vec<DeviceRef>,
    opts: CreateOptions,
    tuning: Tuning,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T>
where
    F: Future<Output = T> + 'static,
{
    with_set_tuned(LegSet::opened(legs), opts, tuning, body)
}

/// Runs `body` with the mirror opened from `set` (created or assembled), its engine and its
/// resync driver as local tasks; stops everything afterwards.
pub(super) fn with_set_tuned<T: 'static, F>(
    set: LegSet,
    opts: CreateOptions,
    tuning: Tuning,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T>
where
    F: Future<Output = T> + 'static,
{
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(small_engine()).expect("engine");
        let runner = spawn(run);
        let env = MirrorEnv { engine, tuning };
        let target = match MirrorTarget::open_set(set, &opts, env).await {
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

/// Each of `inner` behind a fault injector: the injectors, and the same as legs.
fn faulty_legs(inner: &[Arc<MemDevice>]) -> (Vec<Arc<FaultyDevice<MemDevice>>>, Vec<DeviceRef>) {
    let faulty: Vec<_> = inner
        .iter()
        .map(|m| FaultyDevice::new(Arc::clone(m), FaultConfig::default()))
        .collect();
    let legs = faulty.iter().map(|f| Arc::clone(f) as DeviceRef).collect();
    (faulty, legs)
}

/// Lets the driver run until every leg is in sync.
pub(super) async fn settle(target: &MirrorTarget) {
    for _ in 0..100_000 {
        if target.is_synced() {
            return;
        }
        smol::future::yield_now().await;
    }
    panic!("resync did not finish: {}", target.status());
}

pub(super) async fn write(target: &MirrorTarget, sector: u64, data: &[u8]) {
    let buf = Arc::new(AlignedBuf::from_slice(data));
    target
        .write(Sector(sector), buf, WriteFlags::default())
        .await
        .expect("write");
}

pub(super) async fn read(target: &MirrorTarget, sector: u64, sectors: u64) -> Vec<u8> {
    let (res, buf) = target
        .read(
            Sector(sector),
            AlignedBuf::for_sectors(SectorCount(sectors)),
        )
        .await;
    res.expect("read");
    buf.as_slice().to_vec()
}

pub(super) fn data_of(leg: &MemDevice, layout: Layout) -> Vec<u8> {
    leg.snapshot(Extent::new(layout.data_offset, layout.data_size))
}

pub(super) fn pattern(seed: u8, sectors: usize) -> Vec<u8> {
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
    // Now a leg of that mirror next to a blank device is an assembly of that mirror (issue
    // 9: assembling never creates): degraded, the blank device left alone.
    let blank = mem("c");
    let others = vec![Arc::clone(&legs[0]), Arc::clone(&blank)];
    let status = with_mirror(devs(&others), options(64), |t| async move { t.status() })
        .expect("assembles degraded");
    assert_eq!(status["degraded"], true);
    assert!(blank.contents().iter().all(|&b| b == 0), "c is not written");
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
    let (faulty, legs) = faulty_legs(&inner);
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
    let (faulty, legs) = faulty_legs(&inner);
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
    // Leg 2 is missing: the mirror starts degraded without it, no force needed (issue 9).
    let two = vec![Arc::clone(&legs[0]), Arc::clone(&legs[1])];
    let l = legs.clone();
    with_mirror(devs(&two), options(64), move |t| async move {
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

// ---------------------------------------------------------------------------------------------
// Issue 9, section 4: regressions, each failing before its fix.

/// A gate a test opens once: tasks wait on it.
struct Gate {
    notify: Notify,
    seen: u64,
}

impl Gate {
    fn new() -> Arc<Gate> {
        let notify = Notify::default();
        let seen = notify.generation();
        Arc::new(Gate { notify, seen })
    }

    async fn wait(&self) {
        self.notify.wait(self.seen).await;
    }

    fn open(&self) {
        self.notify.notify_all();
    }
}

pub(super) async fn turns(n: usize) {
    for _ in 0..n {
        smol::future::yield_now().await;
    }
}

/// A leg that fails after a clean pass picked its regions and before the legs' flush must
/// not let the clear commit: its writes to those regions were never flushed, and when it
/// returns (its cache lost meanwhile) the incremental resync must still copy them.
#[test]
fn a_leg_failing_during_a_clear_keeps_its_regions_dirty() {
    let legs = vec![
        MemDevice::new_volatile("a", LEG),
        MemDevice::new_volatile("b", LEG),
    ];
    let nosync = CreateOptions {
        nosync: true,
        ..options(64)
    };
    let l = legs.clone();
    with_mirror(devs(&legs), nosync, move |t| async move {
        write(&t, 0, &pattern(1, 8)).await;
        write(&t, 320, &pattern(2, 8)).await;
        // Hold the log's clearer, so that the clean pass below stops between its pick and its
        // flush, as it may on a multi-threaded daemon when a leg fails at that moment.
        let gate = Gate::new();
        t.inner.log().clear(&[RegionIndex(5)]);
        let (inner, g) = (Arc::clone(&t.inner), Arc::clone(&gate));
        let holder = spawn(async move {
            let flush = async move {
                g.wait().await;
                Err(crate::device::errno(libc::EIO))
            };
            inner.log().commit_clears(flush).await
        });
        turns(4).await;
        let inner = Arc::clone(&t.inner);
        let pass = spawn(async move { inner.clean_pass().await });
        turns(4).await;
        t.fail_leg(1).await.expect("fail leg 1");
        gate.open();
        holder.await.expect_err("the holder's flush fails");
        pass.await;
        // Leg 1 lost power while it was away: its unflushed writes are gone.
        l[1].crash(&mut rand::rngs::mock::StepRng::new(0, 0));
        let dev: DeviceRef = l[1].clone();
        t.add_leg(dev, AddLegOptions::default())
            .await
            .expect("add back");
        settle(&t).await;
        let layout = t.layout();
        assert!(
            data_of(&l[1], layout) == data_of(&l[0], layout),
            "the returning leg lacks writes whose bits were cleared after it failed"
        );
        assert_eq!(read(&t, 0, 8).await, pattern(1, 8));
    })
    .expect("mirror");
}

/// When every in-sync leg fails a write that a recovering leg took, the write is on no leg
/// an assembly could read: it must fail with EIO, not be acknowledged.
#[test]
fn a_write_only_a_recovering_leg_took_fails() {
    let inner = [mem("a"), mem("b")];
    let (faulty, legs) = faulty_legs(&inner);
    let layout = Layout::compute(LEG, Some(SectorCount(64))).expect("layout");
    // Region 10 of leg a cannot be read: the initial resync of leg b never finishes, so b
    // stays recovering while every other region is copied to it.
    // The fault goes in once the mirror is open (its create probes every leg's head for
    // signatures, which would fail) and before the resync driver runs its first copy.
    let stuck = Extent::new(layout.data_offset + SectorCount(640), SectorCount(64));
    let f = faulty.clone();
    with_mirror(legs, options(64), move |t| async move {
        f[0].fail_extent(OpKind::Read, stuck);
        let count = t.inner.geometry().count().0;
        for _ in 0..100_000 {
            if t.inner.lock().map.sync_count().0 == count - 1 {
                break;
            }
            smol::future::yield_now().await;
        }
        assert_eq!(t.inner.lock().map.sync_count().0, count - 1);
        assert_eq!(
            t.leg_states()[..2],
            [LegState::InSync, LegState::Recovering]
        );
        // Region 3 is copied: a write goes to both legs. Leg a, the only in-sync one, fails it.
        let region3 = Extent::new(layout.data_offset + SectorCount(192), SectorCount(64));
        f[0].fail_extent(OpKind::Write, region3);
        let buf = Arc::new(AlignedBuf::from_slice(&pattern(6, 8)));
        let res = t.write(Sector(192), buf, WriteFlags::default()).await;
        assert_eq!(
            res.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EIO)),
            "acknowledged though only the recovering leg holds it"
        );
        assert_eq!(t.leg_states()[0], LegState::Failed);
    })
    .expect("mirror");
}

/// Delays every read by some executor turns: a slow resync source.
struct SlowReads {
    inner: DeviceRef,
    turns: usize,
}

impl Forward for SlowReads {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        let (inner, n) = (Arc::clone(&self.inner), self.turns);
        Box::pin(async move {
            turns(n).await;
            inner.read(offset, buf).await
        })
    }
}

/// A write-zeroes of the whole device during a resync makes progress while the resync runs:
/// it does not wait until the resync walk has passed all of its regions. Nor does it race a
/// copy: afterwards both legs hold zeroes. `piece_regions` cuts it into pieces.
fn large_zeroing_during_resync(piece_regions: u64) {
    let legs = vec![mem("a"), mem("b")];
    legs[0].poke(Sector(2048), &pattern(3, 2048));
    let slow: DeviceRef = Arc::new(Forwarding(SlowReads {
        inner: legs[0].clone(),
        turns: 40,
    }));
    let devices = vec![slow, legs[1].clone() as DeviceRef];
    let l = legs.clone();
    let tuning = Tuning {
        write_piece_regions: piece_regions,
        ..Tuning::default()
    };
    with_mirror_tuned(devices, options(64), tuning, move |t| async move {
        let count = t.inner.geometry().count().0;
        turns(10).await;
        let size = t.info().size;
        t.write_zeroes(Extent::new(Sector(0), size))
            .await
            .expect("write zeroes");
        let synced = t.inner.lock().map.sync_count().0;
        assert!(
            synced < count / 2,
            "the write waited for the resync: {synced} of {count} regions in sync when it ended"
        );
        settle(&t).await;
        let layout = t.layout();
        let zero = vec![0u8; layout.data_size.to_usize_bytes()];
        assert!(data_of(&l[0], layout) == zero, "leg a holds zeroes");
        assert!(data_of(&l[1], layout) == zero, "leg b holds zeroes");
    })
    .expect("mirror");
}

#[test]
fn a_large_write_zeroes_proceeds_while_resync_runs() {
    large_zeroing_during_resync(Tuning::default().write_piece_regions);
}

#[test]
fn a_large_write_zeroes_in_pieces_proceeds_while_resync_runs() {
    large_zeroing_during_resync(3);
}

// ---------------------------------------------------------------------------------------------
// Hostile metadata: every length read from a superblock is bounded.

fn sample_superblock() -> Superblock {
    let layout = Layout::compute(SectorCount(8192), Some(SectorCount(64))).expect("layout");
    let mut table = [SlotEntry::EMPTY; MAX_LEGS];
    table[0] = SlotEntry {
        state: LegState::InSync,
        leg_uuid: uuid::Uuid::from_u128(1),
        leg_size: SectorCount(8192),
    };
    table[3] = SlotEntry {
        state: LegState::Recovering,
        leg_uuid: uuid::Uuid::from_u128(2),
        leg_size: SectorCount(9000),
    };
    Superblock {
        uuid: uuid::Uuid::from_u128(0xabc),
        slot: 3,
        events: 7,
        events_cleared: 5,
        layout,
        table,
    }
}

/// Refills the crc of a superblock slot image (its field is at byte 12).
fn fix_crc(b: &mut [u8]) {
    crate::format::crc::seal(b, 12);
}

/// What assembly sizes from a decoded superblock stays within the named limits.
fn check_decoded_bounds(sb: &Superblock) {
    let l = sb.layout;
    let geometry = l.geometry();
    assert!(geometry.count() <= MAX_REGION_COUNT);
    // The log area is read whole into one buffer when a leg joins.
    assert!(
        l.log_area.len <= DirtyLog::area_sectors(MAX_REGION_COUNT),
        "{l:?}"
    );
    assert!(
        l.log_area.len >= DirtyLog::area_sectors(geometry.count()),
        "{l:?}"
    );
    assert!(l.log_area.end() <= l.data_offset);
    assert!(l.data_offset.0.checked_add(l.data_size.0).is_some());
    assert!(l.leg_sectors().0 <= u64::MAX / 512);
    assert!(sb.events.checked_add(2).is_some() && sb.events_cleared <= sb.events);
    assert!(sb.slot < MAX_LEGS);
    for entry in &sb.table {
        assert!(entry.leg_size.0 <= u64::MAX / 512);
    }
    assert_eq!(Superblock::decode(sb.encode().as_slice()).as_ref(), Ok(sb));
}

#[test]
fn superblocks_with_impossible_lengths_are_refused_naming_the_field() {
    type Craft = fn(&mut Superblock);
    let cases: Vec<(&str, Craft)> = vec![
        ("log area length", |sb| {
            // A log area of 512 GiB, with the data after it: a read of it all at assembly.
            sb.layout.log_area.len = SectorCount(1 << 30);
            sb.layout.data_offset = Sector((16 + (1 << 30) as u64).next_multiple_of(2048));
        }),
        ("log area length", |sb| {
            // Too short for the bitmap of the data's regions.
            sb.layout.region_size = SectorCount(8);
            sb.layout.data_size = SectorCount(1 << 20);
            sb.layout.log_area.len = SectorCount(16);
        }),
        ("data offset", |sb| {
            sb.layout.data_offset = Sector(1 << 40);
        }),
        ("data size", |sb| {
            sb.layout.data_size = SectorCount(u64::MAX - 4096);
        }),
        ("leg size", |sb| {
            sb.table[0].leg_size = SectorCount(u64::MAX);
        }),
        ("event counter", |sb| {
            sb.events = u64::MAX;
        }),
        ("events_cleared", |sb| {
            sb.events_cleared = sb.events + 1;
        }),
    ];
    for (field, craft) in cases {
        let mut sb = sample_superblock();
        craft(&mut sb);
        let err = Superblock::decode(sb.encode().as_slice()).expect_err(field);
        assert!(err.contains(field), "{field}: {err}");
        assert!(!err.contains('\n'), "{err}");
        // On a device, both slots crafted: a one-line Corrupt error (exit 7) naming it.
        let dev = MemDevice::new("crafted", LEG);
        dev.poke(Sector(0), sb.encode().as_slice());
        dev.poke(Sector(SB_SECTORS.0), sb.encode().as_slice());
        let dev: DeviceRef = dev;
        let d = Arc::clone(&dev);
        let probed = run_local(async move { probe(&d).await }).expect("probe");
        let err = superblock::refuse(&dev, &probed);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{field}: {err}");
        assert_eq!(err.kind().exit_code(), 7);
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    check_decoded_bounds(&sample_superblock());
}

/// Interesting values for a u64 field read from disk.
fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(u64::MAX / 512),
        (0u32..64).prop_map(|s| 1u64 << s),
        (0u32..64).prop_map(|s| (1u64 << s) - 1),
        0u64..1 << 16,
    ]
}

/// Offsets of the u64 fields of a superblock: counters, layout, and every leg size.
fn u64_field() -> impl Strategy<Value = usize> {
    prop_oneof![
        (0usize..7).prop_map(|i| 40 + 8 * i),
        (0usize..MAX_LEGS).prop_map(|i| 128 + 48 * i + 24),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Fields set to hostile values (with a valid crc) decode to an error or to a
    /// superblock whose every length is within bounds; never a panic.
    #[test]
    fn hostile_superblock_fields_decode_within_bounds(
        fields in proptest::collection::vec((u64_field(), hostile_u64()), 1..6),
        slot in 0u32..12,
    ) {
        let mut bytes = sample_superblock().encode().as_slice().to_vec();
        for (at, value) in fields {
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        bytes[32..36].copy_from_slice(&slot.to_le_bytes());
        fix_crc(&mut bytes);
        if let Ok(sb) = Superblock::decode(&bytes) {
            check_decoded_bounds(&sb);
        }
    }

    /// Random bytes anywhere in the first sector (magic and version kept, crc fixed or not).
    #[test]
    fn mutated_superblocks_decode_within_bounds(
        edits in proptest::collection::vec((12usize..512, any::<u8>()), 1..32),
        crc in any::<bool>(),
    ) {
        let mut bytes = sample_superblock().encode().as_slice().to_vec();
        for (at, value) in edits {
            bytes[at] = value;
        }
        if crc {
            fix_crc(&mut bytes);
        }
        if let Ok(sb) = Superblock::decode(&bytes) {
            check_decoded_bounds(&sb);
        }
    }

    /// A whole slot of random bytes behind our magic and version.
    #[test]
    fn random_superblocks_decode_within_bounds(
        body in proptest::collection::vec(any::<u8>(), 4096 - 16),
    ) {
        let mut bytes = sample_superblock().encode().as_slice()[..16].to_vec();
        bytes.extend_from_slice(&body);
        fix_crc(&mut bytes);
        if let Ok(sb) = Superblock::decode(&bytes) {
            check_decoded_bounds(&sb);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Degraded assembly (issue 9, section 2): legs missing, unreadable or stale are left out; split
// brain is refused; a create never writes over a mirror leg.

/// Runs `body` with the mirror opened from `set` (created or assembled), as [`with_mirror`].
fn with_set<T: 'static, F>(
    set: LegSet,
    opts: CreateOptions,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T>
where
    F: Future<Output = T> + 'static,
{
    with_set_tuned(set, opts, Tuning::default(), body)
}

pub(super) fn given(legs: &[DeviceRef]) -> Vec<GivenLeg> {
    legs.iter()
        .map(|l| GivenLeg::Opened(Arc::clone(l)))
        .collect()
}

pub(super) fn set_of(legs: Vec<GivenLeg>) -> LegSet {
    LegSet { legs, uuid: None }
}

fn unopened(path: &str, errno: i32) -> GivenLeg {
    GivenLeg::Unopened {
        path: path.into(),
        error: Error::io(
            format!("cannot open {path}"),
            std::io::Error::from_raw_os_error(errno),
        ),
    }
}

/// A 2-leg mirror over `legs`, in sync, with `pattern(seed, 16)` at sector 200 (region 3)
/// and every dirty bit but region 3's cleared; returns its uuid.
fn make_synced(legs: &[DeviceRef], seed: u8) -> Uuid {
    with_mirror(legs.to_vec(), options(64), move |t| async move {
        settle(&t).await;
        for _ in 0..8 {
            t.tick();
            smol::future::yield_now().await;
        }
        settle(&t).await;
        write(&t, 200, &pattern(seed, 16)).await;
        t.flush().await.expect("flush");
        t.uuid()
    })
    .expect("create")
}

fn missing_lines(status: &serde_json::Value) -> Vec<String> {
    status["missing_legs"]
        .as_array()
        .expect("missing_legs")
        .iter()
        .map(|l| l.as_str().expect("a line").to_owned())
        .collect()
}

fn head(leg: &MemDevice) -> Vec<u8> {
    leg.snapshot(Extent::new(Sector(0), SectorCount(16)))
}

#[test]
fn a_missing_leg_is_left_out_and_named_in_status() {
    let legs = vec![mem("a"), mem("b")];
    let uuid = make_synced(&devs(&legs), 3);
    // The same legs again, but the second cannot be opened (the disk is gone).
    let set = set_of(vec![
        GivenLeg::Opened(legs[0].clone()),
        unopened("/dev/vdb", libc::ENXIO),
    ]);
    let status = with_set(set, options(64), |t| async move {
        assert_eq!(
            read(&t, 200, 16).await,
            pattern(3, 16),
            "data from the survivor"
        );
        write(&t, 400, &pattern(4, 8)).await;
        assert_eq!(t.leg_states()[..2], [LegState::InSync, LegState::Stale]);
        t.status()
    })
    .expect("comes up degraded without force");
    assert_eq!(status["uuid"], uuid.to_string());
    assert_eq!(status["degraded"], true);
    assert_eq!(
        missing_lines(&status),
        ["slot 1 (/dev/vdb): missing: cannot open: No such device or address"]
    );
    assert_eq!(status["legs"][1]["device"], "/dev/vdb");
    assert_eq!(
        status["legs"][1]["reason"],
        "missing: cannot open: No such device or address"
    );
}

#[test]
fn an_unreadable_leg_is_left_out_and_resyncs_from_the_bitmap_when_added_back() {
    let inner = [mem("a"), mem("b")];
    let (faulty, legs) = faulty_legs(&inner);
    make_synced(&legs, 5);
    // The second leg's superblocks cannot be read: "cannot read the metadata", exit 6 before.
    faulty[1].fail_extent(OpKind::Read, Extent::new(Sector(0), SectorCount(16)));
    let f = faulty.clone();
    let i2 = inner.clone();
    let (status, copied) = with_set(set_of(given(&legs)), options(64), move |t| async move {
        let status = t.status();
        for region in [0u64, 10, 20] {
            write(&t, region * 64, &pattern(region as u8, 8)).await;
        }
        for _ in 0..8 {
            t.tick();
            smol::future::yield_now().await;
        }
        f[1].heal();
        let before = t.inner.engine.stats().bytes_done;
        let dev: DeviceRef = f[1].clone();
        let slot = t
            .add_leg(dev, AddLegOptions::default())
            .await
            .expect("add back");
        assert_eq!(slot, 1);
        settle(&t).await;
        let layout = t.layout();
        assert_eq!(data_of(&i2[1], layout), data_of(&i2[0], layout));
        assert_eq!(t.status()["degraded"], false);
        assert_eq!(missing_lines(&t.status()), Vec::<String>::new());
        (status, t.inner.engine.stats().bytes_done - before)
    })
    .expect("comes up degraded");
    assert_eq!(
        missing_lines(&status),
        ["slot 1 (b): unreadable: Input/output error"]
    );
    // The 3 regions written while degraded, and region 3 (written just before, its bit not
    // yet cleared), not the 32 of the whole mirror.
    assert!(
        (3 * 64 * 512..=4 * 64 * 512).contains(&copied),
        "only the regions written while degraded are copied, not {copied} bytes"
    );
}

#[test]
fn a_stale_leg_is_left_out_with_its_event_counter() {
    let legs = vec![mem("a"), mem("b")];
    let l = legs.clone();
    let (events, stale_at) = with_mirror(devs(&legs), options(64), move |t| async move {
        settle(&t).await;
        let stale_at = t.status()["events"].as_u64().expect("events");
        t.fail_leg(1).await.expect("fail leg 1");
        write(&t, 64, &pattern(6, 8)).await;
        (t.status()["events"].as_u64().expect("events"), stale_at)
    })
    .expect("create");
    assert!(events > stale_at);
    let b_head = head(&l[1]);
    // Both legs given: the second is behind, so it is left out (not written) and named.
    let status = with_mirror(devs(&legs), options(64), |t| async move {
        assert_eq!(read(&t, 64, 8).await, pattern(6, 8));
        t.status()
    })
    .expect("assembles from the fresh leg");
    let lines = missing_lines(&status);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("slot 1 (b): stale: event {stale_at} < ")),
        "{lines:?}"
    );
    assert_eq!(status["legs"][1]["state"], "failed");
    assert_eq!(head(&l[1]), b_head, "the stale leg is left untouched");
}

#[test]
fn split_brain_is_refused_and_writes_nothing() {
    let legs = vec![mem("a"), mem("b")];
    make_synced(&devs(&legs), 1);
    // Each leg runs alone once and takes a write the other never sees.
    for (i, seed) in [(0usize, 10u8), (1, 11)] {
        let one = vec![Arc::clone(&legs[i]) as DeviceRef];
        with_mirror(one, options(64), move |t| async move {
            assert_eq!(t.leg_states()[1 - i], LegState::Stale);
            write(&t, 512, &pattern(seed, 8)).await;
            t.flush().await.expect("flush");
        })
        .expect("degraded on one leg");
    }
    let heads = [head(&legs[0]), head(&legs[1])];
    let err = with_mirror(devs(&legs), options(64), |_| async {}).expect_err("split brain");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("split brain"), "{err}");
    assert_eq!(err.chain().len(), 1, "one line: {err}");
    // force changes nothing: no create, nothing written.
    let forced = CreateOptions {
        force: true,
        ..options(64)
    };
    let err = with_mirror(devs(&legs), forced, |_| async {}).expect_err("still split brain");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!([head(&legs[0]), head(&legs[1])], heads);
    let layout = Layout::compute(LEG, Some(SectorCount(64))).expect("layout");
    let at = Extent::new(layout.data_offset + SectorCount(512), SectorCount(8));
    assert_eq!(legs[0].snapshot(at), pattern(10, 8));
    assert_eq!(legs[1].snapshot(at), pattern(11, 8));
}

#[test]
fn a_blank_leg_given_first_never_wipes_the_survivor() {
    let legs = vec![mem("a"), mem("b")];
    let uuid = make_synced(&devs(&legs), 7);
    let blank = mem("c");
    let layout = Layout::compute(LEG, Some(SectorCount(64))).expect("layout");
    let survivor = data_of(&legs[0], layout);
    // The old second leg is dead; a blank replacement is given first, with force.
    let set = set_of(vec![
        GivenLeg::Opened(blank.clone()),
        GivenLeg::Opened(legs[0].clone()),
        unopened("/dev/old-b", libc::ENOENT),
    ]);
    let forced = CreateOptions {
        force: true,
        ..options(64)
    };
    let status = with_set(set, forced, |t| async move {
        assert_eq!(read(&t, 200, 16).await, pattern(7, 16));
        t.status()
    })
    .expect("an assembly, not a create");
    assert_eq!(status["uuid"], uuid.to_string());
    assert_eq!(
        missing_lines(&status),
        ["slot 1 (/dev/old-b): missing: cannot open: No such file or directory"]
    );
    let notes = status["not_members"].to_string();
    assert!(notes.contains("c: blank, not a member"), "{notes}");
    assert!(
        blank.contents().iter().all(|&b| b == 0),
        "the blank leg is not written"
    );
    assert_eq!(
        data_of(&legs[0], layout),
        survivor,
        "the survivor keeps its data"
    );
}

#[test]
fn a_create_never_overwrites_a_mirror_leg_even_with_force() {
    let (x, y) = (vec![mem("xa"), mem("xb")], vec![mem("ya"), mem("yb")]);
    make_synced(&devs(&x), 1);
    make_synced(&devs(&y), 2);
    let heads = [head(&x[0]), head(&y[0])];
    let forced = CreateOptions {
        force: true,
        ..options(64)
    };
    // Legs of two mirrors: refused, whatever force says.
    let mixed: Vec<DeviceRef> = vec![x[0].clone(), y[0].clone()];
    let err = with_mirror(mixed, forced.clone(), |_| async {}).expect_err("two mirrors");
    assert!(err.to_string().contains("different mirrors"), "{err}");
    // The explicit create: refused on a mirror leg, with the way to reuse it.
    let err = run_local({
        let legs: Vec<DeviceRef> = vec![x[0].clone(), mem("blank")];
        let forced = forced.clone();
        async move {
            let (engine, run) = CopyEngine::new_local(small_engine()).expect("engine");
            let runner = spawn(run);
            let env = MirrorEnv {
                engine,
                tuning: Tuning::default(),
            };
            let res = MirrorTarget::create(legs, &forced, env).await.map(|_| ());
            runner.await;
            res.expect_err("a mirror leg")
        }
    });
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(
        err.to_string().contains("never overwrites a mirror leg"),
        "{err}"
    );
    assert!(err.to_string().contains("remove-leg"), "{err}");
    assert_eq!([head(&x[0]), head(&y[0])], heads);
}

#[test]
fn no_current_in_sync_leg_is_refused() {
    let legs = vec![mem("a"), mem("b")];
    // Created without settling: leg 1 is still recovering.
    with_mirror(devs(&legs), options(64), |_| async {}).expect("create");
    let only_b: Vec<DeviceRef> = vec![legs[1].clone()];
    let err = with_mirror(only_b, options(64), |_| async {}).expect_err("no in-sync leg");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("complete copy"), "{err}");
    assert!(err.to_string().contains("slot 0"), "{err}");
}

#[test]
fn an_expected_uuid_never_creates_and_leaves_other_mirrors_alone() {
    let (x, y) = (vec![mem("xa"), mem("xb")], vec![mem("ya"), mem("yb")]);
    let ux = make_synced(&devs(&x), 1);
    make_synced(&devs(&y), 2);
    // Blank legs with an expected mirror: not found, nothing created.
    let blanks = vec![mem("c"), mem("d")];
    let set = LegSet {
        legs: given(&devs(&blanks)),
        uuid: Some(ux),
    };
    let err = with_set(set, options(64), |_| async {}).expect_err("nothing of mirror x");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(blanks.iter().all(|b| b.contents().iter().all(|&v| v == 0)));
    // A leg of another mirror beside a leg of x: x assembles, the other is not a member.
    let set = LegSet {
        legs: given(&devs(&[y[0].clone(), x[1].clone()])),
        uuid: Some(ux),
    };
    let y_head = head(&y[0]);
    let status = with_set(set, options(64), |t| async move { t.status() }).expect("x");
    assert_eq!(status["uuid"], ux.to_string());
    let lines = missing_lines(&status);
    assert!(
        lines.len() == 1
            && lines[0].starts_with("slot 0 (leg ")
            && lines[0].ends_with("missing: not given"),
        "{lines:?}"
    );
    assert!(status["not_members"]
        .to_string()
        .contains("ya: a leg of mirror"));
    assert_eq!(head(&y[0]), y_head);
}

/// The daemon's path (`add` and `recover` both go through `open_mirror_with`): a leg file
/// that is gone does not fail the open; the mirror comes up degraded and says why.
#[test]
fn open_mirror_with_a_leg_gone_comes_up_degraded() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir =
        tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).expect("temp dir");
    let legs: Vec<std::path::PathBuf> =
        (0..2).map(|i| dir.path().join(format!("leg{i}"))).collect();
    for leg in &legs {
        std::fs::File::create(leg)
            .and_then(|f| f.set_len(8 << 20))
            .expect("leg file");
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&legs[0]);
    if direct.is_err() {
        eprintln!("SKIP: this filesystem refuses O_DIRECT");
        return;
    }
    let spec = MirrorSpec {
        uuid: None,
        legs: legs.clone(),
        region_size_sectors: 256,
        nosync: true,
        force: false,
        resync_throttle: Default::default(),
        leg_options: Default::default(),
    };
    let open = || open_mirror_with(&spec, ThrottleConfig::UNLIMITED, Tuning::default());
    let target = open().expect("create");
    let t = Arc::clone(&target);
    reactor::block_on(async move {
        let buf = Arc::new(AlignedBuf::from_slice(&pattern(9, 8)));
        t.write(Sector(64), buf, WriteFlags::FUA).await
    })
    .expect("write");
    drop(target);
    std::fs::remove_file(&legs[1]).expect("the second leg goes away");
    let target = open().expect("comes up degraded");
    let status = target.status();
    assert_eq!(status["degraded"], true, "{status}");
    assert_eq!(
        missing_lines(&status),
        [format!(
            "slot 1 ({}): missing: cannot open: No such file or directory",
            legs[1].display()
        )]
    );
    let t = Arc::clone(&target);
    let data = reactor::block_on(async move {
        let (res, buf) = t
            .read(Sector(64), AlignedBuf::for_sectors(SectorCount(8)))
            .await;
        res.map(|()| buf.as_slice().to_vec())
    })
    .expect("read");
    assert_eq!(data, pattern(9, 8));
}

/// A write over several regions of an in-sync mirror is one I/O per leg (as md sends one bio
/// per disk), not one per region: the per-request cost of the legs' devices is what bounds
/// large writes.
#[test]
fn a_write_over_several_regions_is_one_io_per_leg() {
    let legs = vec![mem("a"), mem("b")];
    let (faulty, devices) = faulty_legs(&legs);
    let requests = move || -> Vec<u64> {
        faulty
            .iter()
            .map(|f| f.counters().requests.load(Ordering::Relaxed))
            .collect()
    };
    with_mirror(devices, options(64), move |t| async move {
        settle(&t).await;
        // The first write marks its four regions (log writes on every leg); the second finds
        // them marked and writes only the data.
        write(&t, 32, &pattern(3, 256)).await;
        let before = requests();
        write(&t, 32, &pattern(4, 256)).await;
        let after = requests();
        for (leg, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a - b, 1, "leg {leg}: one write for five regions");
        }
        assert_eq!(read(&t, 32, 256).await, pattern(4, 256));
    })
    .expect("mirror");
    let layout = Layout::compute(LEG, Some(SectorCount(64))).expect("layout");
    assert_eq!(data_of(&legs[1], layout), data_of(&legs[0], layout));
}
