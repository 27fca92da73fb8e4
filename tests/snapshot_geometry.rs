//! The snapshot target over devices of different geometry: every device of a group (the origin
//! and each snapshot) advertises what is true of every device under it (the largest logical
//! block of origin and COW store, a volatile cache if either has one), and an origin whose size
//! is not a whole number of chunks (or of the COW store's blocks) keeps its last, short chunk.
//!
//! The kernel is modelled by [`Kernel`]: it sends I/O in whole logical blocks of what the
//! device advertises, sends FLUSH only to a device that advertises a volatile cache, and turns
//! a FUA write into a write and a flush when the device does not advertise FUA (or drops the
//! FUA when it advertises no cache), as the block layer does.

use std::sync::Arc;

use rand::SeedableRng;
use serde_json::json;
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{AlignedBuf, BlockDevice, DeviceRef, MemDevice, WriteFlags};
use ublkdm::targets::snapshot::{GroupOptions, SnapshotGroup};
use ublkdm::units::{Sector, SectorCount};

/// Chunks of 16 KiB.
const CHUNK: u64 = 32;

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 8 * 4096,
        ..CopyConfig::default()
    }
}

/// Opens a group over `origin` and `cow` on a local engine (with its merge driver) and runs
/// `body` with it.
fn with_group<T: 'static>(
    origin: &Arc<MemDevice>,
    cow: &Arc<MemDevice>,
    body: impl AsyncFnOnce(Arc<SnapshotGroup>) -> T + 'static,
) -> T {
    let (origin, cow): (DeviceRef, DeviceRef) = (origin.clone(), cow.clone());
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let options = GroupOptions {
            chunk_size: Some(SectorCount(CHUNK)),
            force: false,
            ..GroupOptions::default()
        };
        let group = SnapshotGroup::open(origin, cow, &options, engine.clone())
            .await
            .expect("open the group");
        drop(engine);
        let merger = spawn(group.merge_task());
        let out = body(Arc::clone(&group)).await;
        group.check_invariants();
        group.stop();
        merger.await;
        drop(group);
        runner.await;
        out
    })
}

/// What the kernel does with a device, given only what it advertises.
struct Kernel<'a>(&'a dyn BlockDevice);

impl Kernel<'_> {
    /// Sectors per logical block.
    fn block(&self) -> u64 {
        u64::from(self.0.info().logical_block_bytes) / 512
    }

    /// Writes `blocks` logical blocks of `byte` from block `at`; `fua` as an application's
    /// O_DSYNC write asks.
    async fn write(&self, at: u64, blocks: u64, byte: u8, fua: bool) -> std::io::Result<()> {
        let info = self.0.info();
        let b = self.block();
        let buf = Arc::new(AlignedBuf::from_slice(&vec![
            byte;
            (blocks * b * 512) as usize
        ]));
        let native_fua = fua && info.volatile_cache && info.fua;
        let flags = WriteFlags { fua: native_fua };
        self.0.write(Sector(at * b), buf, flags).await?;
        if fua && info.volatile_cache && !info.fua {
            self.0.flush().await?;
        }
        Ok(())
    }

    /// fsync: a FLUSH when the device says it has a volatile cache, nothing otherwise.
    async fn fsync(&self) -> std::io::Result<()> {
        if self.0.info().volatile_cache {
            self.0.flush().await?;
        }
        Ok(())
    }

    async fn read(&self, at: u64, blocks: u64) -> Vec<u8> {
        let b = self.block();
        let (res, buf) = self
            .0
            .read(
                Sector(at * b),
                AlignedBuf::for_sectors(SectorCount(blocks * b)),
            )
            .await;
        res.expect("read");
        buf.as_slice().to_vec()
    }
}

async fn create(group: &SnapshotGroup, name: &str) {
    group
        .command_async("snapshot-create", &json!({ "name": name }))
        .await
        .expect("snapshot-create");
}

/// The state of snapshot `name` in the status.
fn state(group: &SnapshotGroup, name: &str) -> String {
    let status = group.status();
    let snap = status["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no snapshot {name} in {status}"));
    snap["state"].as_str().expect("a state").to_owned()
}

fn all(data: &[u8], byte: u8) -> bool {
    data.iter().all(|&b| b == byte)
}

/// An origin of 512-byte blocks with no volatile cache, a COW store of 4 KiB blocks with one
/// (a regular file, say): the origin and the snapshot both advertise 4 KiB blocks and a
/// volatile cache, and a one-block write to the snapshot works, first write and in place.
#[test]
fn every_device_advertises_the_largest_block_and_any_volatile_cache() {
    let origin = MemDevice::with_geometry("origin", SectorCount(64 * CHUNK), 512, false);
    let cow = MemDevice::with_geometry("cow", SectorCount(4096), 4096, true);
    with_group(&origin, &cow, async |group| {
        create(&group, "s").await;
        let snap = group.snapshot("s").expect("snapshot");
        let origin_target = group.origin();
        for info in [snap.info(), origin_target.info()] {
            assert_eq!(info.logical_block_bytes, 4096, "{info:?}");
            assert!(info.physical_block_bytes >= 4096, "{info:?}");
            assert!(
                info.volatile_cache,
                "the COW store's cache is hidden: {info:?}"
            );
            assert_eq!(info.size, SectorCount(64 * CHUNK), "{info:?}");
        }
        let k = Kernel(&*snap);
        // Block 1: the first write takes a chunk of its own; then a rewrite in place.
        k.write(1, 1, 7, false)
            .await
            .expect("first write to the snapshot");
        k.write(1, 1, 8, false)
            .await
            .expect("in-place write to the snapshot");
        assert!(all(&k.read(1, 1).await, 8));
        assert!(all(&k.read(0, 1).await, 0));
        assert_eq!(state(&group, "s"), "valid");
    });
}

/// fsync'd and O_DSYNC snapshot writes in place on the COW store survive a power cut of a COW
/// store with a volatile cache, though the origin has none (both of 512-byte blocks): the
/// snapshot device must say it has one, or the kernel sends no FLUSH.
#[test]
fn synced_snapshot_writes_survive_a_cow_power_cut() {
    let origin = MemDevice::with_geometry("origin", SectorCount(64 * CHUNK), 512, false);
    let cow = MemDevice::with_geometry("cow", SectorCount(4096), 512, true);
    let cow_mem = Arc::clone(&cow);
    with_group(&origin, &cow, async move |group| {
        create(&group, "s").await;
        let snap = group.snapshot("s").expect("snapshot");
        let k = Kernel(&*snap);
        // Own chunks first (committed, so durable), then writes in place.
        k.write(0, 8, 1, false).await.expect("write");
        k.write(0, 1, 2, false).await.expect("write in place");
        k.fsync().await.expect("fsync");
        assert_eq!(
            cow_mem.unflushed_sectors(),
            0,
            "fsync left the COW store unflushed"
        );
        k.write(1, 1, 3, true)
            .await
            .expect("O_DSYNC write in place");
        assert_eq!(
            cow_mem.unflushed_sectors(),
            0,
            "a FUA write left the COW store unflushed"
        );
    });
    cow.crash(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    with_group(&origin, &cow, async |group| {
        let snap = group.snapshot("s").expect("snapshot");
        let k = Kernel(&*snap);
        assert!(all(&k.read(0, 1).await, 2), "the fsync'd write was lost");
        assert!(all(&k.read(1, 1).await, 3), "the O_DSYNC write was lost");
        assert!(all(&k.read(2, 6).await, 1));
    });
}

/// Fills the origin with `byte` through the group, whole blocks as the kernel sends them.
async fn fill(group: &Arc<SnapshotGroup>, byte: u8) {
    let origin = group.origin();
    let k = Kernel(&*origin);
    let blocks = origin.info().size.0 / k.block();
    k.write(0, blocks, byte, false).await.expect("fill");
}

/// An origin of `size` sectors in 512-byte blocks beside a COW store of `cow_block` bytes:
/// after a snapshot, a write to the origin's last block copies the last (short) chunk first,
/// the snapshot still reads the old tail and stays valid, the snapshot's own write to its
/// tail works, and merging it back rolls the origin's tail back without touching the sectors
/// past what the group serves.
fn the_last_short_chunk_works(size: u64, cow_block: u32) {
    let origin = MemDevice::with_geometry("origin", SectorCount(size), 512, true);
    let cow = MemDevice::with_geometry("cow", SectorCount(4096), cow_block, true);
    origin.poke(Sector(0), &vec![0xee; size as usize * 512]);
    let served = with_group(&origin, &cow, async move |group| {
        fill(&group, 1).await;
        create(&group, "s").await;
        create(&group, "keep").await;
        let origin_target = group.origin();
        let served = origin_target.info().size.0;
        let block = u64::from(origin_target.info().logical_block_bytes) / 512;
        assert_eq!(served % block, 0, "a size of whole blocks");
        assert!(served + block > size, "at most a block is not served");
        let k = Kernel(&*origin_target);
        let last = served / block - 1;
        assert!(
            last * block >= size / CHUNK * CHUNK,
            "the last block is in the short chunk"
        );
        k.write(last, 1, 2, false)
            .await
            .expect("origin write to the last block");
        assert!(all(&k.read(last, 1).await, 2));
        for name in ["s", "keep"] {
            let snap = group.snapshot(name).expect("snapshot");
            let tail = Kernel(&*snap).read(last, 1).await;
            assert!(all(&tail, 1), "snapshot {name} lost the old tail");
            assert_eq!(state(&group, name), "valid");
        }
        let snap = group.snapshot("s").expect("snapshot");
        Kernel(&*snap)
            .write(last, 1, 3, false)
            .await
            .expect("snapshot write to the tail");
        assert!(all(&Kernel(&*snap).read(last, 1).await, 3));
        group
            .command_async("merge", &json!({ "name": "s" }))
            .await
            .expect("merge");
        for _ in 0..10_000 {
            if group.status()["merge"]["active"] == false {
                break;
            }
            smol::future::yield_now().await;
        }
        let status = group.status();
        assert_eq!(status["merge"]["active"], false, "{status}");
        assert!(
            all(&k.read(last, 1).await, 3),
            "the merge rolled the tail back"
        );
        assert!(all(&k.read(0, last).await, 1));
        let keep = group.snapshot("keep").expect("keep");
        assert!(all(&Kernel(&*keep).read(last, 1).await, 1));
        assert_eq!(state(&group, "keep"), "valid");
        served
    });
    // Past what the group serves, the origin is never written.
    let rest = origin.snapshot(ublkdm::units::Extent::new(
        Sector(served),
        SectorCount(size - served),
    ));
    assert!(all(&rest, 0xee), "the unserved tail of the origin changed");
}

/// A short last chunk of 11 sectors, a COW store of 4 KiB blocks: the group serves whole
/// 4 KiB blocks, and the chunk's copy must write whole blocks to the COW store.
#[test]
fn an_origin_not_a_whole_number_of_chunks_or_cow_blocks() {
    the_last_short_chunk_works(4 * CHUNK + 11, 4096);
}

/// A short last chunk of 3 sectors beside a COW store of 512-byte blocks.
#[test]
fn an_origin_not_a_whole_number_of_chunks() {
    the_last_short_chunk_works(4 * CHUNK + 3, 512);
}
