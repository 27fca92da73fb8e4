//! Unit tests of the snapshot target: the shared-copy rule, reopening, torn metadata,
//! refusals and overflow. The seeded whole-system simulation is `tests/snapshot_sim.rs`.

use std::sync::Arc;

use serde_json::json;

use super::exceptions::MAX_CREATION;
use super::*;
use crate::copy::{CopyConfig, CopyEngine};
use crate::device::reactor::{run_local, spawn};
use crate::device::{
    AlignedBuf, BlockDevice, DeviceRef, FaultConfig, FaultyDevice, Forward, Forwarding, MemDevice,
    OpKind, WriteFlags,
};
use crate::units::{Extent, Sector, SectorCount};

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 8 * 4096,
        ..CopyConfig::default()
    }
}

struct Devs {
    origin: Arc<MemDevice>,
    cow: Arc<MemDevice>,
}

impl Devs {
    fn new(origin: u64, cow: u64) -> Devs {
        Devs {
            origin: MemDevice::new_volatile("origin", SectorCount(origin)),
            cow: MemDevice::new_volatile("cow", SectorCount(cow)),
        }
    }
}

/// Opens a group over `devs` on a local engine and runs `body` with it.
fn with_group<T: 'static>(
    devs: &Devs,
    options: GroupOptions,
    body: impl AsyncFnOnce(Arc<SnapshotGroup>) -> T + 'static,
) -> Result<T> {
    with_devices(devs.origin.clone(), devs.cow.clone(), options, body)
}

/// [`with_group`] over any two devices.
fn with_devices<T: 'static>(
    origin: DeviceRef,
    cow: DeviceRef,
    options: GroupOptions,
    body: impl AsyncFnOnce(Arc<SnapshotGroup>) -> T + 'static,
) -> Result<T> {
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let group = SnapshotGroup::open(origin, cow, &options, engine.clone()).await;
        drop(engine);
        let out = match group {
            Ok(group) => {
                let merger = spawn(group.merge_task());
                let out = body(Arc::clone(&group)).await;
                group.check_invariants();
                group.stop();
                merger.await;
                drop(group);
                Ok(out)
            }
            Err(e) => Err(e),
        };
        runner.await;
        out
    })
}

async fn write(dev: &dyn BlockDevice, sector: u64, sectors: u64, byte: u8) {
    let buf = AlignedBuf::from_slice(&vec![byte; sectors as usize * 512]);
    dev.write(Sector(sector), Arc::new(buf), WriteFlags::default())
        .await
        .expect("write");
}

async fn read(dev: &dyn BlockDevice, sector: u64, sectors: u64) -> std::io::Result<Vec<u8>> {
    let (res, buf) = dev
        .read(
            Sector(sector),
            AlignedBuf::for_sectors(SectorCount(sectors)),
        )
        .await;
    res.map(|()| buf.as_slice().to_vec())
}

async fn create(group: &SnapshotGroup, name: &str) {
    let reply = group
        .command_async("snapshot-create", &json!({ "name": name }))
        .await
        .expect("create");
    assert_eq!(reply, json!({ "name": name }));
}

#[test]
fn a_snapshot_without_a_name_gets_the_next_free_one() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        create(&group, "snap2").await;
        for (args, expect) in [(json!({ "name": null }), "snap3"), (json!({}), "snap4")] {
            let reply = group
                .command_async("snapshot-create", &args)
                .await
                .expect("create");
            assert_eq!(reply, json!({ "name": expect }));
        }
        // The origin target lists them as its children, oldest first.
        assert_eq!(group.origin().child_names(), ["snap2", "snap3", "snap4"]);
    })
    .expect("group");
}

#[test]
fn one_copy_serves_every_snapshot() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        write(&*origin, 0, 64, 1).await;
        for i in 0..5 {
            create(&group, &format!("s{i}")).await;
        }
        write(&*origin, 3, 2, 9).await;
        let status = group.status();
        assert_eq!(status["cow"]["used"], 1, "{status}");
        assert_eq!(status["exceptions"], 5, "{status}");
        // A second write to the chunk copies nothing more.
        write(&*origin, 10, 2, 8).await;
        assert_eq!(group.status()["cow"]["used"], 1);
        for i in 0..5 {
            let snap = group.snapshot(&format!("s{i}")).expect("snapshot");
            let data = read(&*snap, 0, 64).await.expect("read");
            assert!(data.iter().all(|&b| b == 1), "snapshot s{i} changed");
        }
        // A snapshot write unshares its chunk (and the others keep the old image).
        let s0 = group.snapshot("s0").expect("s0");
        write(&*s0, 4, 1, 7).await;
        assert_eq!(group.status()["cow"]["used"], 2);
        assert_eq!(read(&*s0, 4, 1).await.expect("read")[0], 7);
        let s1 = group.snapshot("s1").expect("s1");
        assert_eq!(read(&*s1, 4, 1).await.expect("read")[0], 1);
        let data = read(&*origin, 0, 16).await.expect("read");
        assert_eq!((data[3 * 512], data[10 * 512], data[0]), (9, 8, 1));
    })
    .expect("open");
}

#[test]
fn reopen_restores_snapshots_and_refuses_foreign_stores() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        write(&*origin, 0, 512, 1).await;
        create(&group, "a").await;
        write(&*origin, 0, 100, 2).await;
        create(&group, "b").await;
        write(&*group.snapshot("b").expect("b"), 200, 40, 3).await;
        group.origin().flush().await.expect("flush");
        group
            .snapshot("b")
            .expect("b")
            .flush()
            .await
            .expect("flush");
    })
    .expect("create");
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
    devs.origin.crash(&mut rng);
    devs.cow.crash(&mut rng);
    with_group(&devs, GroupOptions::default(), async |group| {
        let status = group.status();
        assert_eq!(status["snapshots"][0]["name"], "a", "{status}");
        assert_eq!(status["snapshots"][1]["name"], "b", "{status}");
        let a = read(&*group.snapshot("a").expect("a"), 0, 512)
            .await
            .expect("a");
        assert!(a.iter().all(|&b| b == 1));
        let b = read(&*group.snapshot("b").expect("b"), 0, 512)
            .await
            .expect("b");
        assert!(b[..100 * 512].iter().all(|&x| x == 2));
        assert!(b[200 * 512..240 * 512].iter().all(|&x| x == 3));
        assert!(b[240 * 512..].iter().all(|&x| x == 1));
    })
    .expect("reopen");
    // Same COW device, an origin of another size: refused.
    let other = Devs {
        origin: MemDevice::new("other", SectorCount(1024)),
        cow: Arc::clone(&devs.cow),
    };
    let err = with_group(&other, GroupOptions::default(), async |_| ()).expect_err("foreign");
    assert!(err.to_string().contains("another origin"), "{err}");
    let options = GroupOptions {
        chunk_size: Some(SectorCount(64)),
        force: false,
        ..GroupOptions::default()
    };
    let err = with_group(&devs, options, async |_| ()).expect_err("chunk size");
    assert!(err.to_string().contains("created with chunks"), "{err}");
}

#[test]
fn torn_metadata_block_is_ignored() {
    let devs = Devs::new(256, 4096);
    let layout = with_group(&devs, GroupOptions::default(), async |group| {
        create(&group, "a").await;
        group.layout().clone()
    })
    .expect("create");
    // The block after the tail: a valid next block, torn (half of it never landed).
    let next = format::encode_blocks(
        layout.uuid,
        1,
        1,
        &[Record::Create {
            slot: 5,
            seq: 99,
            state: SnapState::Valid,
            merge_total: 0,
            name: "ghost".into(),
        }],
    );
    let mut torn = next.clone();
    torn[2048..].fill(0xee);
    devs.cow.poke(layout.area_start(0) + SectorCount(8), &torn);
    with_group(&devs, GroupOptions::default(), async |group| {
        let list = group
            .command_async("snapshot-list", &json!({}))
            .await
            .expect("list");
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        assert_eq!(list[0]["name"], "a");
        // The next commit writes past it (in the other area).
        create(&group, "b").await;
    })
    .expect("reopen");
    with_group(&devs, GroupOptions::default(), async |group| {
        let list = group.status()["snapshots"].clone();
        assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    })
    .expect("reopen again");
    // A damaged superblock slot: the other one serves.
    devs.cow.poke(Sector(0), &[0x55; 64]);
    with_group(&devs, GroupOptions::default(), async |_| ()).expect("other slot");
}

/// The daemon's orderly stop (`del`) ends with the origin target's `shutdown()`, after the
/// snapshot devices are stopped: every acknowledged write, to the origin or to a snapshot (in
/// place in the COW store, sitting in its volatile cache), survives a power cut after it.
#[test]
fn an_orderly_stop_makes_every_acknowledged_write_durable() {
    let devs = Devs::new(512, 4096);
    let cow = Arc::clone(&devs.cow);
    with_group(&devs, GroupOptions::default(), async move |group| {
        let origin = group.origin();
        write(&*origin, 0, 512, 1).await;
        create(&group, "s").await;
        let snap = group.snapshot("s").expect("s");
        write(&*origin, 256, 128, 4).await;
        // The first write takes the chunks (copy, then a commit, which flushes the COW); the
        // second goes in place, into the COW's volatile cache.
        write(&*snap, 0, 128, 2).await;
        write(&*snap, 0, 128, 3).await;
        assert!(
            cow.unflushed_sectors() > 0,
            "the test needs unflushed COW writes"
        );
        origin.shutdown().await.expect("orderly stop");
    })
    .expect("run");
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(11);
    devs.origin.crash(&mut rng);
    devs.cow.crash(&mut rng);
    with_group(&devs, GroupOptions::default(), async |group| {
        let snap = read(&*group.snapshot("s").expect("s"), 0, 512)
            .await
            .expect("s");
        let lost = snap[..128 * 512].iter().filter(|&&b| b != 3).count();
        assert_eq!(lost, 0, "bytes of acknowledged snapshot writes lost");
        assert!(
            snap[128 * 512..].iter().all(|&b| b == 1),
            "the snapshot's image"
        );
        let origin = read(&*group.origin(), 256, 128).await.expect("origin");
        assert!(
            origin.iter().all(|&b| b == 4),
            "acknowledged origin write lost"
        );
    })
    .expect("reopen");
}

/// A merge changes what the origin reads at once: the daemon must refuse it while the
/// origin's device is open (it asks the target), and says how to proceed. Other commands run
/// under an open origin.
#[test]
fn only_a_merge_needs_the_origin_closed() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        let advice = origin
            .command_needs_closed("merge", &json!({ "name": "s" }))
            .expect("a merge needs the origin closed");
        assert!(advice.contains("unmount"), "{advice}");
        for (name, args) in [
            ("snapshot-create", json!({ "name": "s" })),
            ("snapshot-delete", json!({ "name": "s" })),
            ("snapshot-list", json!({})),
            ("status", json!({})),
        ] {
            assert_eq!(origin.command_needs_closed(name, &args), None, "{name}");
        }
    })
    .expect("group");
}

#[test]
fn bad_arguments_are_refused() {
    let small = Devs::new(256, 64);
    let err = with_group(&small, GroupOptions::default(), async |_| ()).expect_err("small");
    assert!(err.to_string().contains("too small"), "{err}");
    let devs = Devs::new(256, 4096);
    let options = GroupOptions {
        chunk_size: Some(SectorCount(12)),
        force: false,
        ..GroupOptions::default()
    };
    let err = with_group(&devs, options, async |_| ()).expect_err("chunk");
    assert!(err.to_string().contains("power of two"), "{err}");
    with_group(&devs, GroupOptions::default(), async |group| {
        let err = group.snapshot("nope").err().expect("unknown");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        for cmd in ["snapshot-delete", "merge"] {
            let err = group
                .command_async(cmd, &json!({ "name": "nope" }))
                .await
                .expect_err("unknown");
            assert!(
                err.to_string().contains("no snapshot named 'nope'"),
                "{err}"
            );
        }
        create(&group, "x").await;
        let err = group
            .command_async("snapshot-create", &json!({ "name": "x" }))
            .await
            .expect_err("duplicate");
        assert_eq!(err.kind(), ErrorKind::Busy);
        let err = group
            .command_async("frobnicate", &json!({}))
            .await
            .expect_err("unknown command");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    })
    .expect("open");
}

#[test]
fn overflow_invalidates_the_snapshot_and_spares_the_origin() {
    // Room for few chunks only.
    let devs = Devs::new(2048, 400);
    with_group(&devs, GroupOptions::default(), async |group| {
        let chunks = group.layout().data_chunks;
        assert!((1..20).contains(&chunks), "{chunks}");
        let origin = group.origin();
        create(&group, "s").await;
        let snap = group.snapshot("s").expect("s");
        for c in 0..(2048 / 32) {
            write(&*origin, c * 32, 32, 5).await;
        }
        let status = group.status();
        assert_eq!(status["snapshots"][0]["state"], "invalid", "{status}");
        assert_eq!(status["cow"]["used"], 0, "{status}");
        assert!(read(&*snap, 0, 8).await.is_err());
        let data = read(&*origin, 0, 2048).await.expect("origin");
        assert!(data.iter().all(|&b| b == 5));
    })
    .expect("open");
    with_group(&devs, GroupOptions::default(), async |group| {
        let status = group.status();
        assert_eq!(status["snapshots"][0]["state"], "invalid", "{status}");
        assert!(status["snapshots"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("overflow")));
    })
    .expect("reopen");
}

#[test]
fn merge_rolls_the_origin_back_and_survives_restart() {
    let devs = Devs::new(1024, 8192);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        write(&*origin, 0, 1024, 1).await;
        create(&group, "m").await;
        create(&group, "keep").await;
        write(&*origin, 0, 512, 2).await;
        write(&*group.snapshot("m").expect("m"), 600, 10, 3).await;
        group
            .command_async("merge", &json!({ "name": "m" }))
            .await
            .expect("merge");
        // Reads as the snapshot at once, even before the merge copied anything.
        let data = read(&*origin, 0, 1024).await.expect("read");
        assert!(data[..600 * 512].iter().all(|&b| b == 1));
        assert!(data[600 * 512..610 * 512].iter().all(|&b| b == 3));
        let status = group.status();
        assert_eq!(status["merge"]["active"], true, "{status}");
    })
    .expect("open");
    // Restarted: the merge resumes and finishes.
    with_group(&devs, GroupOptions::default(), async |group| {
        for _ in 0..10_000 {
            if group.status()["merge"]["active"] == false {
                break;
            }
            smol::future::yield_now().await;
        }
        let status = group.status();
        assert_eq!(status["merge"]["active"], false, "{status}");
        assert_eq!(status["snapshots"].as_array().map(Vec::len), Some(1));
        let origin = group.origin();
        let data = read(&*origin, 0, 1024).await.expect("read");
        assert!(data[..600 * 512].iter().all(|&b| b == 1));
        assert!(data[600 * 512..610 * 512].iter().all(|&b| b == 3));
        let keep = read(&*group.snapshot("keep").expect("keep"), 0, 1024)
            .await
            .expect("keep");
        assert!(keep.iter().all(|&b| b == 1));
    })
    .expect("reopen");
}

/// The COW device behind a fault injector, and the extent of its superblocks and log.
fn faulty_cow(devs: &Devs) -> (Arc<FaultyDevice<MemDevice>>, Extent) {
    let cow = FaultyDevice::new(Arc::clone(&devs.cow), FaultConfig::default());
    let layout = Layout::plan(
        uuid::Uuid::nil(),
        DEFAULT_CHUNK,
        devs.origin.info().size,
        devs.cow.info().size,
    )
    .expect("layout");
    let metadata = Extent::new(Sector(0), SectorCount(layout.data_start.0));
    (cow, metadata)
}

#[test]
fn failed_metadata_write_keeps_the_merge_going() {
    let devs = Devs::new(1024, 8192);
    let (cow, metadata) = faulty_cow(&devs);
    let faults = Arc::clone(&cow);
    with_devices(
        devs.origin.clone(),
        cow,
        GroupOptions::default(),
        async move |group| {
            let origin = group.origin();
            write(&*origin, 0, 1024, 1).await;
            create(&group, "m").await;
            create(&group, "other").await;
            write(&*origin, 0, 512, 2).await;
            write(&*group.snapshot("m").expect("m"), 600, 10, 3).await;
            group
                .command_async("merge", &json!({ "name": "m" }))
                .await
                .expect("merge");
            // No metadata write works from now on: neither a merge step nor an origin write to
            // an unmerged chunk can record its progress.
            faults.fail_extent(OpKind::Write, metadata);
            let res = origin
                .write(
                    Sector(0),
                    Arc::new(AlignedBuf::new(4096)),
                    WriteFlags::default(),
                )
                .await;
            assert!(res.is_err());
            for _ in 0..1000 {
                smol::future::yield_now().await;
            }
            let status = group.status();
            assert_eq!(status["merge"]["active"], true, "{status}");
            assert_eq!(status["snapshots"][1]["state"], "invalid", "{status}");
            // The origin still reads as the snapshot being merged.
            let data = read(&*origin, 0, 1024).await.expect("read");
            assert!(data[..600 * 512].iter().all(|&b| b == 1));
            assert!(data[600 * 512..610 * 512].iter().all(|&b| b == 3));
            assert!(data[610 * 512..].iter().all(|&b| b == 1));
            group.check_invariants();
        },
    )
    .expect("open");
}

#[test]
fn failed_metadata_write_is_recorded_before_the_origin_changes() {
    let devs = Devs::new(512, 4096);
    let (cow, metadata) = faulty_cow(&devs);
    let faults = Arc::clone(&cow);
    let origin_dev: DeviceRef = devs.origin.clone();
    with_devices(
        origin_dev,
        cow,
        GroupOptions::default(),
        async move |group| {
            let origin = group.origin();
            write(&*origin, 0, 512, 1).await;
            create(&group, "s").await;
            faults.fail_extent(OpKind::Write, metadata);
            // The copy for "s" cannot be recorded: "s" is invalid, but only in memory so far,
            // so the origin must not change yet.
            for c in 0..4 {
                let buf = Arc::new(AlignedBuf::from_slice(&[2; 32 * 512]));
                let res = origin
                    .write(Sector(c * 32), buf, WriteFlags::default())
                    .await;
                assert!(res.is_err(), "chunk {c} written");
            }
            let status = group.status();
            assert_eq!(status["snapshots"][0]["state"], "invalid", "{status}");
            // Once metadata can be written again, the origin works.
            faults.heal();
            write(&*origin, 0, 128, 2).await;
            origin.flush().await.expect("flush");
            let status = group.status();
            assert_eq!(status["metadata_failed"], false, "{status}");
        },
    )
    .expect("open");
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    devs.origin.crash(&mut rng);
    devs.cow.crash(&mut rng);
    with_group(&devs, GroupOptions::default(), async |group| {
        // Invalid after the restart too (were it valid, it would read the new data).
        let status = group.status();
        assert_eq!(status["snapshots"][0]["state"], "invalid", "{status}");
        let data = read(&*group.origin(), 0, 512).await.expect("origin");
        assert!(data[..128 * 512].iter().all(|&b| b == 2));
        assert!(data[128 * 512..].iter().all(|&b| b == 1));
    })
    .expect("reopen");
}

/// A Create record for a snapshot that was never made.
fn ghost() -> Record {
    Record::Create {
        slot: 5,
        seq: 99,
        state: SnapState::Valid,
        merge_total: 0,
        name: "ghost".into(),
    }
}

fn names(group: &SnapshotGroup) -> Vec<String> {
    let status = group.status();
    let list = status["snapshots"].as_array().expect("list");
    list.iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn stale_block_past_the_end_of_the_log_stays_out() {
    let devs = Devs::new(256, 4096);
    let layout = with_group(&devs, GroupOptions::default(), async |group| {
        create(&group, "a").await;
        group.layout().clone()
    })
    .expect("create");
    // A two-block append cut by a power cut: the second block landed, the first did not.
    let stale = format::encode_blocks(layout.uuid, 1, 2, &[ghost()]);
    devs.cow
        .poke(layout.area_start(0) + SectorCount(2 * 8), &stale);
    with_group(&devs, GroupOptions::default(), async |group| {
        assert_eq!(names(&group), ["a"]);
        // Appending at the end of the log must not bring the stale block back.
        create(&group, "b").await;
    })
    .expect("reopen");
    with_group(&devs, GroupOptions::default(), async |group| {
        assert_eq!(names(&group), ["a", "b"]);
    })
    .expect("reopen again");
}

#[test]
fn checkpoint_that_never_took_over_stays_out() {
    let devs = Devs::new(256, 4096);
    let layout = with_group(&devs, GroupOptions::default(), async |group| {
        create(&group, "a").await;
        group.layout().clone()
    })
    .expect("create");
    // A compaction cut short before its superblock landed: its checkpoint, three blocks of
    // the next epoch, sits in the other area (the ghost in its last block).
    let mut records: Vec<Record> = (0..400)
        .map(|i| Record::Map {
            cow: i,
            origin: i,
            mask: 0,
        })
        .collect();
    records.push(ghost());
    let sb = [Sector(0), BLOCK_SECTORS.to_sector()]
        .into_iter()
        .filter_map(|at| {
            let slot = devs.cow.snapshot(Extent::new(at, BLOCK_SECTORS));
            Superblock::decode(&slot).ok().flatten()
        })
        .max_by_key(|sb| sb.sequence)
        .expect("superblock");
    let stale = format::encode_blocks(layout.uuid, sb.epoch + 1, 0, &records);
    assert_eq!(stale.len(), 3 * BLOCK);
    devs.cow.poke(layout.area_start(1 - sb.active_area), &stale);
    with_group(&devs, GroupOptions::default(), async |group| {
        assert_eq!(names(&group), ["a"]);
        // Compacts into that area, with a shorter checkpoint.
        create(&group, "b").await;
    })
    .expect("reopen");
    with_group(&devs, GroupOptions::default(), async |group| {
        assert_eq!(names(&group), ["a", "b"]);
    })
    .expect("reopen again");
}

/// What [`SuperblockTrap`] does to the next superblock write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trap {
    Off,
    /// It lands (durably), yet fails.
    LandThenFail,
    /// It fails without landing.
    Fail,
}

/// A COW device whose superblock writes fail as set.
struct SuperblockTrap {
    inner: DeviceRef,
    traps: std::sync::Mutex<Vec<Trap>>,
}

impl Forward for SuperblockTrap {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        let superblock = offset.0 < 2 * BLOCK_SECTORS.0;
        let trap = if superblock {
            let mut traps = self.traps.lock().expect("traps");
            if traps.is_empty() {
                Trap::Off
            } else {
                traps.remove(0)
            }
        } else {
            Trap::Off
        };
        match trap {
            Trap::Off => self.inner.write(offset, buf, flags),
            Trap::LandThenFail => {
                let landed = self.inner.write(offset, buf, WriteFlags::FUA);
                Box::pin(async move {
                    landed.await?;
                    Err(errno(libc::EIO))
                })
            }
            Trap::Fail => Box::pin(std::future::ready(Err(errno(libc::EIO)))),
        }
    }
}

#[test]
fn superblock_write_that_failed_yet_landed_is_not_overwritten() {
    let devs = Devs::new(256, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        write(&*group.origin(), 0, 256, 1).await;
        create(&group, "a").await;
        write(&*group.origin(), 0, 32, 2).await;
    })
    .expect("create");
    // The first commit after the reopen compacts. Its superblock write lands yet fails; the
    // next compaction's fails outright.
    let cow = Arc::new(Forwarding(SuperblockTrap {
        inner: Arc::clone(&devs.cow) as DeviceRef,
        traps: std::sync::Mutex::new(vec![Trap::LandThenFail, Trap::Fail]),
    }));
    with_devices(
        devs.origin.clone(),
        cow,
        GroupOptions::default(),
        async |group| {
            let buf = Arc::new(AlignedBuf::from_slice(&[3; 32 * 512]));
            let _ = group
                .origin()
                .write(Sector(64), buf, WriteFlags::default())
                .await;
        },
    )
    .expect("reopen");
    with_group(&devs, GroupOptions::default(), async |group| {
        // Still there (valid or not), never an empty store.
        assert_eq!(names(&group), ["a"], "{}", group.status());
        let a = group.snapshot("a").expect("a");
        if let Ok(data) = read(&*a, 0, 256).await {
            assert!(data.iter().all(|&b| b == 1));
        }
    })
    .expect("reopen again");
}

/// A device that passes everything to a memory device and keeps the largest write it saw.
struct LargestWrite {
    inner: DeviceRef,
    sectors: std::sync::atomic::AtomicU64,
}

impl Forward for LargestWrite {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> crate::device::IoFuture<std::io::Result<()>> {
        let sectors = (buf.len() / 512) as u64;
        self.sectors
            .fetch_max(sectors, std::sync::atomic::Ordering::Relaxed);
        self.inner.write(offset, buf, flags)
    }
}

/// A checkpoint many blocks long is written a bounded piece at a time (it was one buffer, as
/// large as the whole state), and the store it leaves reads back whole.
#[test]
fn a_checkpoint_is_written_in_bounded_pieces() {
    const ORIGIN: u64 = 2048;
    let devs = Devs::new(ORIGIN, 16384);
    let options = GroupOptions {
        chunk_size: Some(SectorCount(8)),
        checkpoint_piece_blocks: Some(2),
        ..GroupOptions::default()
    };
    with_group(&devs, options.clone(), async |group| {
        for i in 0..4u8 {
            create(&group, &format!("s{i}")).await;
            write(&*group.origin(), 0, ORIGIN, i + 1).await;
        }
        assert_eq!(group.status()["cow"]["used"], 4 * ORIGIN / 8);
    })
    .expect("fill");
    let cow = Arc::new(Forwarding(LargestWrite {
        inner: Arc::clone(&devs.cow) as DeviceRef,
        sectors: Default::default(),
    }));
    let spied: DeviceRef = cow.clone();
    with_devices(devs.origin.clone(), spied, options.clone(), async |group| {
        // The first commit after opening writes a checkpoint of 1024 maps (7 blocks).
        create(&group, "s4").await;
    })
    .expect("compact");
    let largest = cow.sectors.load(std::sync::atomic::Ordering::Relaxed);
    assert!(largest <= 2 * 8, "a write of {largest} sectors");
    with_group(&devs, options, async |group| {
        assert_eq!(group.status()["cow"]["used"], 4 * ORIGIN / 8);
        for i in 0..4u8 {
            let snap = group.snapshot(&format!("s{i}")).expect("snapshot");
            let data = read(&*snap, 0, ORIGIN).await.expect("read");
            assert!(data.iter().all(|&b| b == i), "snapshot s{i}");
        }
    })
    .expect("reopen");
}

/// A discard on the origin copies what the snapshots need first, then reaches the origin
/// device (it was refused with EOPNOTSUPP and not advertised).
#[test]
fn a_discard_on_the_origin_keeps_what_the_snapshots_need() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        assert!(origin.info().discard, "the origin advertises discard");
        write(&*origin, 0, 512, 1).await;
        create(&group, "s").await;
        // Chunks of 32 sectors: a whole chunk (32..64) and parts of two others.
        origin
            .discard(Extent::new(Sector(20), SectorCount(60)))
            .await
            .expect("discard");
        let data = read(&*origin, 0, 512).await.expect("origin");
        assert!(
            data[20 * 512..80 * 512].iter().all(|&b| b == 0),
            "discarded"
        );
        assert!(data[..20 * 512].iter().all(|&b| b == 1));
        assert!(data[80 * 512..].iter().all(|&b| b == 1));
        let snap = group.snapshot("s").expect("s");
        let data = read(&*snap, 0, 512).await.expect("snapshot");
        assert!(data.iter().all(|&b| b == 1), "the snapshot kept its image");
        assert_eq!(group.status()["cow"]["used"], 3);
    })
    .expect("group");
}

/// A discard on a snapshot releases its images of the whole chunks discarded (not the parts,
/// nor what another snapshot shares), durably; it was refused with EOPNOTSUPP.
#[test]
fn a_discard_on_a_snapshot_releases_its_chunks() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        let origin = group.origin();
        write(&*origin, 0, 512, 1).await;
        create(&group, "a").await;
        create(&group, "b").await;
        // Chunks 0..4 copied once for both; then "a" gets chunks 4..8 of its own.
        write(&*origin, 0, 128, 2).await;
        let a = group.snapshot("a").expect("a");
        write(&*a, 128, 128, 3).await;
        assert_eq!(group.status()["cow"]["used"], 8);
        a.discard(Extent::new(Sector(16), SectorCount(240)))
            .await
            .expect("discard");
        // Chunk 0 is kept (only half of it was discarded); chunks 1..4 stay for "b" (and
        // "a" goes on reading them: after a discard any content will do, and this one costs
        // nothing); chunks 4..8 were "a"'s alone.
        let status = group.status();
        assert_eq!(status["cow"]["used"], 4, "{status}");
        assert_eq!(status["exceptions"], 8, "{status}");
        let b = group.snapshot("b").expect("b");
        let data = read(&*b, 0, 512).await.expect("b");
        assert!(data.iter().all(|&x| x == 1), "b is untouched");
        let data = read(&*a, 0, 32).await.expect("a");
        assert!(data.iter().all(|&x| x == 1), "a keeps its part chunk");
        // A discarded chunk of its own reads the origin's image again, and is copied again
        // when the origin changes.
        let data = read(&*a, 32, 224).await.expect("a");
        assert!(data.iter().all(|&x| x == 1));
        write(&*origin, 128, 32, 4).await;
        assert_eq!(read(&*a, 128, 1).await.expect("a")[0], 1);
    })
    .expect("group");
    with_group(&devs, GroupOptions::default(), async |group| {
        // Chunk 4's new copy serves both ("b" never had one): a and b {0..5}.
        let status = group.status();
        assert_eq!(status["exceptions"], 10, "{status}");
        assert_eq!(status["cow"]["used"], 5, "{status}");
    })
    .expect("reopen");
}

// Hostile metadata: values behind valid checksums (issue 11, section 2). Each case crafts a
// store, seals what it changed, and expects the open to fail as corrupt metadata in one line
// naming what is wrong: never a panic, nor an allocation or I/O the devices cannot back.

/// A fresh store on devices of 256 and 4096 sectors (16 KiB chunks: 8 origin chunks, 120 data
/// chunks), with nothing logged yet (epoch 1, area 0).
fn fresh_store() -> (Devs, Layout) {
    let devs = Devs::new(256, 4096);
    let layout = with_group(&devs, GroupOptions::default(), async |group| {
        group.layout().clone()
    })
    .expect("create");
    assert_eq!((layout.origin_chunks(), layout.data_chunks), (8, 120));
    (devs, layout)
}

/// Makes the sealed log `blocks` the log of a [`fresh_store`], ending it after them.
fn poke_log(devs: &Devs, layout: &Layout, blocks: &[u8]) {
    devs.cow.poke(layout.area_start(0), blocks);
    let after = SectorCount((blocks.len() / 512) as u64);
    devs.cow.poke(layout.area_start(0) + after, &[0; BLOCK]);
}

/// Opening the store on `devs` fails as corrupt metadata, in one line containing `what`.
fn assert_refused(devs: &Devs, what: &str) {
    let err = with_group(devs, GroupOptions::default(), async |_| ()).expect_err("refused");
    let text = err.chain().join(": ");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains(what), "'{what}' in: {text}");
}

/// A valid snapshot `name` in `slot`.
fn snap(slot: u16, name: &str) -> Record {
    Record::Create {
        slot,
        seq: u64::from(slot) + 1,
        state: SnapState::Valid,
        merge_total: 0,
        name: name.into(),
    }
}

/// A fresh store whose log holds `records`: refused, naming `what`.
fn refuse_log(records: &[Record], what: &str) {
    let (devs, layout) = fresh_store();
    poke_log(
        &devs,
        &layout,
        &format::encode_blocks(layout.uuid, 1, 0, records),
    );
    assert_refused(&devs, what);
}

/// A fresh store whose log is one block holding the raw `payload`: refused, naming `what`.
fn refuse_payload(payload: &[u8], what: &str) {
    let (devs, layout) = fresh_store();
    poke_log(
        &devs,
        &layout,
        &format::log_block(layout.uuid, 1, 0, payload),
    );
    assert_refused(&devs, what);
}

/// The raw bytes of a `Create` of slot 0 with the name bytes `name`.
fn raw_create(name: &[u8]) -> Vec<u8> {
    let mut out = vec![1, 0];
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out
}

#[test]
fn hostile_log_map_beyond_the_data_area() {
    refuse_log(
        &[
            snap(0, "a"),
            Record::Map {
                cow: 120,
                origin: 0,
                mask: 1,
            },
        ],
        "COW chunk 120",
    );
}

/// Before the fix this one built a set of 2^40 free chunks at open.
#[test]
fn hostile_log_map_far_beyond_the_data_area() {
    refuse_log(
        &[
            snap(0, "a"),
            Record::Map {
                cow: 1 << 40,
                origin: 0,
                mask: 1,
            },
        ],
        "COW chunk 1099511627776",
    );
}

#[test]
fn hostile_log_map_beyond_the_origin() {
    refuse_log(
        &[
            snap(0, "a"),
            Record::Map {
                cow: 0,
                origin: 8,
                mask: 1,
            },
        ],
        "origin chunk 8",
    );
}

#[test]
fn hostile_log_cow_chunk_mapped_twice() {
    let map = |origin, mask| Record::Map {
        cow: 3,
        origin,
        mask,
    };
    refuse_log(
        &[snap(0, "a"), snap(1, "b"), map(0, 1), map(1, 2)],
        "COW chunk 3",
    );
}

#[test]
fn hostile_log_map_for_an_empty_slot() {
    let map = Record::Map {
        cow: 0,
        origin: 0,
        mask: 1 << 5,
    };
    refuse_log(&[snap(0, "a"), map], "slot 5");
}

#[test]
fn hostile_log_name_with_a_nul() {
    refuse_log(&[snap(0, "a\0b")], "name");
}

#[test]
fn hostile_log_name_too_long() {
    refuse_log(&[snap(0, &"x".repeat(MAX_NAME + 1))], "name");
}

#[test]
fn hostile_log_name_not_utf8() {
    refuse_payload(&raw_create(&[0x61, 0xff, 0xfe]), "name");
}

#[test]
fn hostile_log_empty_name() {
    refuse_payload(&raw_create(b""), "name");
}

#[test]
fn hostile_log_duplicate_name() {
    refuse_log(&[snap(0, "a"), snap(1, "a")], "name");
}

#[test]
fn hostile_log_creation_number_past_what_the_index_names() {
    for seq in [MAX_CREATION, u64::MAX] {
        let create = Record::Create {
            slot: 0,
            seq,
            state: SnapState::Valid,
            merge_total: 0,
            name: "a".into(),
        };
        refuse_log(&[create], "creation number");
        let copy = Record::Copy {
            cow: 0,
            origin: 0,
            newest: seq,
            merging: None,
        };
        refuse_log(&[snap(0, "a"), copy], "creation number");
    }
}

#[test]
fn hostile_log_records_for_empty_slots() {
    refuse_log(&[snap(0, "a"), Record::Delete { slot: 3 }], "slot 3");
    let invalidate = Record::Invalidate {
        slot: 3,
        reason: Reason::Overflow,
    };
    refuse_log(&[snap(0, "a"), invalidate], "slot 3");
    refuse_log(&[Record::MergeStart { slot: 3, total: 0 }], "slot 3");
    refuse_log(&[Record::Unmap { slot: 3, origin: 0 }], "slot 3");
    // A record after the snapshot's deletion.
    refuse_log(
        &[
            snap(0, "a"),
            Record::Delete { slot: 0 },
            Record::Delete { slot: 0 },
        ],
        "slot 0",
    );
}

#[test]
fn hostile_log_unmap_beyond_the_origin() {
    let unmap = Record::Unmap {
        slot: 0,
        origin: 1 << 40,
    };
    refuse_log(&[snap(0, "a"), unmap], "beyond the origin");
}

/// A discard's `Unmap` committed after the snapshot's invalidation (or of a chunk it maps no
/// more) replays as nothing: it is no sign of a damaged store.
#[test]
fn an_unmap_after_an_invalidation_replays_as_nothing() {
    let devs = Devs::new(512, 4096);
    with_group(&devs, GroupOptions::default(), async |group| {
        write(&*group.origin(), 0, 512, 1).await;
        create(&group, "a").await;
        create(&group, "b").await;
        write(&*group.origin(), 0, 64, 2).await;
        let invalidate = Record::Invalidate {
            slot: 0,
            reason: Reason::Overflow,
        };
        let unmaps = [
            Record::Unmap { slot: 0, origin: 0 },
            Record::Unmap { slot: 1, origin: 9 },
        ];
        group
            .inner
            .commit([invalidate].into_iter().chain(unmaps).collect())
            .await
            .expect("commit");
    })
    .expect("group");
    with_group(&devs, GroupOptions::default(), async |group| {
        let status = group.status();
        assert_eq!(status["snapshots"][0]["state"], "invalid", "{status}");
        assert_eq!(status["snapshots"][1]["exceptions"], 2, "{status}");
    })
    .expect("the store opens");
}

#[test]
fn hostile_log_two_merges() {
    let records = [
        snap(0, "a"),
        snap(1, "b"),
        Record::MergeStart { slot: 0, total: 0 },
        Record::MergeStart { slot: 1, total: 0 },
    ];
    refuse_log(&records, "merg");
}

#[test]
fn hostile_log_merge_total_below_the_exceptions() {
    let records = [
        Record::Create {
            slot: 0,
            seq: 1,
            state: SnapState::Merging,
            merge_total: 0,
            name: "a".into(),
        },
        Record::Map {
            cow: 0,
            origin: 0,
            mask: 1,
        },
    ];
    refuse_log(&records, "merge_total");
}

#[test]
fn hostile_log_unknown_record_type() {
    refuse_payload(&[99, 0, 0], "type");
}

#[test]
fn hostile_log_unknown_reason() {
    let mut payload = raw_create(b"a");
    payload.extend_from_slice(&[3, 0, 9]);
    refuse_payload(&payload, "reason");
}

#[test]
fn hostile_log_block_used_past_the_block() {
    let (devs, layout) = fresh_store();
    let mut block = format::log_block(layout.uuid, 1, 0, &[]);
    block[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    crate::format::crc::seal(&mut block, 8);
    poke_log(&devs, &layout, &block);
    assert_refused(&devs, "bytes");
}

/// Both superblock slots of `devs` edited by `edit` (each slot's bytes and its letter) and
/// sealed again.
fn edit_superblocks(devs: &Devs, edit: impl Fn(&mut [u8], char)) {
    for (at, letter) in [(Sector(0), 'A'), (BLOCK_SECTORS.to_sector(), 'B')] {
        let mut slot = devs.cow.snapshot(Extent::new(at, BLOCK_SECTORS));
        edit(&mut slot, letter);
        crate::format::crc::seal(&mut slot, 12);
        devs.cow.poke(at, &slot);
    }
}

fn put(slot: &mut [u8], at: usize, value: u64) {
    slot[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// A fresh store whose superblocks have `fields` (offset, value) set: refused, naming `what`.
fn refuse_superblock(fields: &[(usize, u64)], what: &str) {
    let (devs, _) = fresh_store();
    edit_superblocks(&devs, |slot, _| {
        for &(at, value) in fields {
            put(slot, at, value);
        }
    });
    assert_refused(&devs, what);
}

// Superblock field offsets (see the module doc).
const SB_SEQUENCE: usize = 32;
const SB_CHUNK: usize = 40;
const SB_ORIGIN: usize = 48;
const SB_AREA_BLOCKS: usize = 64;
const SB_DATA_START: usize = 72;
const SB_DATA_CHUNKS: usize = 80;
const SB_ACTIVE_AREA: usize = 88;

#[test]
fn hostile_superblock_chunk_below_the_minimum() {
    refuse_superblock(&[(SB_CHUNK, 4)], "chunk size");
}

#[test]
fn hostile_superblock_chunk_above_the_maximum() {
    refuse_superblock(
        &[
            (SB_CHUNK, 1 << 22),
            (SB_DATA_START, 1 << 22),
            (SB_DATA_CHUNKS, 0),
        ],
        "chunk size",
    );
}

#[test]
fn hostile_superblock_empty_origin() {
    refuse_superblock(&[(SB_ORIGIN, 0)], "origin size");
}

#[test]
fn hostile_superblock_no_data_chunks() {
    refuse_superblock(&[(SB_DATA_CHUNKS, 0)], "data_chunks");
}

#[test]
fn hostile_superblock_data_start_off_a_chunk() {
    refuse_superblock(&[(SB_DATA_START, 257), (SB_DATA_CHUNKS, 119)], "data_start");
}

#[test]
fn hostile_superblock_sequence_at_its_maximum() {
    refuse_superblock(&[(SB_SEQUENCE, u64::MAX)], "sequence");
}

#[test]
fn hostile_superblock_huge_log_areas() {
    refuse_superblock(
        &[(SB_AREA_BLOCKS, (1 << 61) - 1), (SB_ACTIVE_AREA, 1)],
        "area_blocks",
    );
}

/// The two slots of one store always describe the same layout.
#[test]
fn hostile_superblock_slots_of_two_stores() {
    let (devs, _) = fresh_store();
    edit_superblocks(&devs, |slot, letter| {
        if letter == 'B' {
            slot[16] ^= 0xff;
        }
    });
    assert_refused(&devs, "slots");
}

/// A sealed slot is never skipped for the other one (which may be older): only a torn one
/// (its checksum fails) is.
#[test]
fn hostile_superblock_newer_slot_impossible() {
    let (devs, _) = fresh_store();
    edit_superblocks(&devs, |slot, letter| {
        if letter == 'A' {
            put(slot, SB_SEQUENCE, 2);
            put(slot, SB_DATA_CHUNKS, u64::MAX / 8);
        }
    });
    assert_refused(&devs, "data_chunks");
}

// Store format 2 (issue 11, sections 3 and 4): stores of format 1 still open, and are
// rewritten in format 2; a thousand snapshots share one copy per origin chunk.

/// `records` as format 1 wrote them (slots of one byte; `Create`, `Map`, `Unmap` only).
fn format1_payload(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::Create {
                slot, seq, name, ..
            } => {
                out.extend_from_slice(&[1, *slot as u8]);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&0u64.to_le_bytes());
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Record::Map { cow, origin, mask } => {
                out.push(5);
                for v in [cow, origin, mask] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Record::Unmap { slot, origin } => {
                out.extend_from_slice(&[6, *slot as u8]);
                out.extend_from_slice(&origin.to_le_bytes());
            }
            other => panic!("not written by this test: {other:?}"),
        }
    }
    out
}

/// What snapshot `name` reads, one byte per 16 KiB chunk (the chunks are filled whole).
async fn chunk_bytes(group: &Arc<SnapshotGroup>, name: &str) -> Vec<u8> {
    let snap = group.snapshot(name).expect(name);
    let data = read(&*snap, 0, 256).await.expect(name);
    data.chunks(32 * 512)
        .map(|c| {
            assert!(c.iter().all(|&b| b == c[0]), "{name}: a chunk read whole");
            c[0]
        })
        .collect()
}

/// The format version in the newest superblock slot of `devs`.
fn store_version(devs: &Devs) -> u32 {
    [Sector(0), BLOCK_SECTORS.to_sector()]
        .into_iter()
        .filter_map(|at| {
            let b = devs.cow.snapshot(Extent::new(at, BLOCK_SECTORS));
            match format::Superblock::read_slot(&b).expect("a slot") {
                format::Slot::Sealed(sb) => Some((sb.sequence, sb.version)),
                _ => None,
            }
        })
        .max()
        .expect("a sealed slot")
        .1
}

/// A store written by format 1 (three snapshots; chunk 0 copied once for all three, chunk 1
/// for "a" and "c" while "b" has its own, chunk 2 for "a" alone; "c" discarded chunk 0)
/// opens, every snapshot reads what format 1 said, and the first commit rewrites the store
/// in format 2, which reopens the same.
#[test]
fn a_format_1_store_opens_and_is_rewritten_in_format_2() {
    let (devs, layout) = fresh_store();
    edit_superblocks(&devs, |slot, _| {
        slot[8..12].copy_from_slice(&1u32.to_le_bytes())
    });
    let mut records: Vec<Record> = ["a", "b", "c"]
        .iter()
        .zip(0u16..)
        .map(|(name, slot)| snap(slot, name))
        .collect();
    let map = |cow, origin, mask| Record::Map { cow, origin, mask };
    records.extend([
        map(0, 0, 0b111),
        map(1, 1, 0b101),
        map(2, 1, 0b010),
        map(3, 2, 0b001),
    ]);
    records.push(Record::Unmap { slot: 2, origin: 0 });
    poke_log(
        &devs,
        &layout,
        &format::log_block(layout.uuid, 1, 0, &format1_payload(&records)),
    );
    devs.origin.poke(Sector(0), &[0xee; 256 * 512]);
    for k in 0..4u64 {
        let at = layout.data_start + SectorCount(k * 32);
        devs.cow.poke(at, &[0x10 + k as u8; 32 * 512]);
    }
    assert_eq!(store_version(&devs), 1);
    async fn check(group: &Arc<SnapshotGroup>) {
        let want = |first: [u8; 3]| {
            let mut v = first.to_vec();
            v.resize(8, 0xee);
            v
        };
        assert_eq!(chunk_bytes(group, "a").await, want([0x10, 0x11, 0x13]));
        assert_eq!(chunk_bytes(group, "b").await, want([0x10, 0x12, 0xee]));
        assert_eq!(chunk_bytes(group, "c").await, want([0xee, 0x11, 0xee]));
    }
    with_group(&devs, GroupOptions::default(), async move |group| {
        check(&group).await;
        let status = group.status();
        assert_eq!(status["cow"]["used"], 4, "{status}");
        assert_eq!(status["exceptions"], 6, "{status}");
        // Chunk 3 copied once for all three (format 2's shared copy); chunk 0 for "c".
        write(&*group.origin(), 96, 32, 0x77).await;
        write(&*group.origin(), 0, 32, 0x66).await;
        check(&group).await;
        assert_eq!(group.status()["cow"]["used"], 6);
    })
    .expect("a format 1 store opens");
    assert_eq!(
        store_version(&devs),
        format::VERSION,
        "rewritten by the first commit"
    );
    with_group(&devs, GroupOptions::default(), async move |group| {
        check(&group).await;
        let status = group.status();
        assert_eq!(status["cow"]["used"], 6, "{status}");
        assert_eq!(status["exceptions"], 10, "{status}");
    })
    .expect("reopen in format 2");
}

/// A thousand and more snapshots: an origin first write makes one copy and one index entry
/// per chunk whatever their number, every snapshot reads its image, and the store refuses
/// the snapshot past its room with Busy.
#[test]
fn a_thousand_snapshots_share_one_copy_per_chunk() {
    // 24 MiB of COW store: room for format::MAX_SNAPSHOTS snapshots.
    let devs = Devs::new(256, 48 * 1024);
    with_group(&devs, GroupOptions::default(), async move |group| {
        let origin = group.origin();
        write(&*origin, 0, 256, 1).await;
        for i in 0..format::MAX_SNAPSHOTS {
            create(&group, &format!("s{i}")).await;
        }
        let err = group
            .command_async("snapshot-create", &json!({ "name": "one-too-many" }))
            .await
            .expect_err("full");
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        write(&*origin, 0, 128, 2).await;
        let status = group.status();
        assert_eq!(status["cow"]["used"], 4, "one copy per chunk");
        assert_eq!(status["cow"]["index_entries"], 4, "one entry per copy");
        assert_eq!(status["exceptions"], 4 * format::MAX_SNAPSHOTS as u64);
        for name in ["s0", "s511", "s1023"] {
            assert_eq!(chunk_bytes(&group, name).await, vec![1; 8], "{name}");
        }
        // A write through one snapshot gives it its own image; the others keep the copy.
        write(&*group.snapshot("s7").expect("s7"), 0, 32, 3).await;
        assert_eq!(chunk_bytes(&group, "s7").await[..2], [3, 1]);
        assert_eq!(chunk_bytes(&group, "s8").await[..2], [1, 1]);
        group
            .command_async("snapshot-delete", &json!({ "name": "s0" }))
            .await
            .expect("delete");
        assert_eq!(group.status()["cow"]["used"], 5);
    })
    .expect("group");
    with_group(&devs, GroupOptions::default(), async move |group| {
        assert_eq!(chunk_bytes(&group, "s1023").await, vec![1; 8]);
        assert_eq!(chunk_bytes(&group, "s7").await[..2], [3, 1]);
        assert_eq!(
            group.status()["snapshots"].as_array().map(Vec::len),
            Some(1023)
        );
    })
    .expect("reopen");
}

/// Hostile growth records: each refused as corrupt, naming what is wrong (the fresh store's
/// origin has 256 sectors, 8 chunks of 32).
#[test]
fn hostile_log_growths() {
    let grow = |size, since| Record::Grow { size, since };
    refuse_log(&[grow(200, 1)], "from 256 sectors to 200");
    refuse_log(&[grow(1000, 1), grow(2000, 1)], "not from whole chunks");
    let huge = (super::exceptions::MAX_ORIGIN_CHUNKS + 1) * 32;
    refuse_log(&[grow(huge, 1)], "more than");
    refuse_log(&[snap(0, "a"), grow(512, 1)], "before the next");
    refuse_log(&[grow(512, MAX_CREATION)], "past the last");
    refuse_log(&[grow(512, 3), grow(1024, 2)], "before an earlier growth");
    let many: Vec<Record> = (0..=super::state::MAX_GROWTHS as u64)
        .map(|i| grow(256 + 32 * (i + 1), 1))
        .collect();
    refuse_log(&many, "growths a store holds");
}

/// A store that grew (a `Grow` in its log) opens on an origin of the new size, where copies
/// of its new chunks are valid, and is another origin's for the size before.
#[test]
fn a_grown_store_opens_on_the_grown_origin_only() {
    let (devs, layout) = fresh_store();
    let copy = Record::Copy {
        cow: 0,
        origin: 12,
        newest: 2,
        merging: None,
    };
    let records = [
        snap(0, "a"),
        Record::Grow {
            size: 512,
            since: 2,
        },
        snap(1, "b"),
        copy,
    ];
    poke_log(
        &devs,
        &layout,
        &format::encode_blocks(layout.uuid, 1, 0, &records),
    );
    let err = with_group(&devs, GroupOptions::default(), async |_| ()).expect_err("old size");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("another origin"), "{err}");
    let grown = Devs {
        origin: MemDevice::new_volatile("origin", SectorCount(512)),
        cow: Arc::clone(&devs.cow),
    };
    with_group(&grown, GroupOptions::default(), async |group| {
        assert_eq!(group.origin().size(), SectorCount(512));
        assert_eq!(group.snapshot("a").expect("a").size(), SectorCount(256));
        assert_eq!(group.snapshot("b").expect("b").size(), SectorCount(512));
        assert_eq!(group.status()["origin_sectors"], 512);
        // The copy of chunk 12 is b's: a does not hold it.
        assert_eq!(group.status()["exceptions"], 1, "{}", group.status());
    })
    .expect("the grown origin");
}
