//! Unit tests of the snapshot target: the shared-copy rule, reopening, torn metadata,
//! refusals and overflow. The seeded whole-system simulation is `tests/snapshot_sim.rs`.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::copy::{CopyConfig, CopyEngine};
use crate::device::reactor::{run_local, spawn};
use crate::device::{AlignedBuf, BlockDevice, DeviceRef, MemDevice, WriteFlags};
use crate::units::{Sector, SectorCount};

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
    let origin: DeviceRef = devs.origin.clone();
    let cow: DeviceRef = devs.cow.clone();
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
        // The next commit overwrites the torn block.
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

#[test]
fn bad_arguments_are_refused() {
    let small = Devs::new(256, 64);
    let err = with_group(&small, GroupOptions::default(), async |_| ()).expect_err("small");
    assert!(err.to_string().contains("too small"), "{err}");
    let devs = Devs::new(256, 4096);
    let options = GroupOptions {
        chunk_size: Some(SectorCount(12)),
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
