//! Tests of growing the origin (`grow.rs`) over memory devices: the origin grows, snapshots
//! made before keep their size and content and need no copy of the new area, a snapshot made
//! after covers all of it, a merge of an older snapshot rolls back only its range, the size
//! survives a reopen, limits are refused, and a crash at any write of a growth replays to the
//! old size or the new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::*;
use crate::device::reactor::{run_local, spawn};
use crate::device::{Forward, Forwarding, MemDevice};

/// A memory origin whose present size (`size`) is less than the memory behind it until a test
/// grows it, as a block device extended under the group is.
struct Growing {
    mem: DeviceRef,
    size: AtomicU64,
}

impl Growing {
    fn new(sectors: u64, memory: u64) -> Arc<Forwarding<Growing>> {
        Arc::new(Forwarding(Growing {
            mem: MemDevice::new("origin", SectorCount(memory)),
            size: AtomicU64::new(sectors),
        }))
    }
}

impl Forward for Growing {
    fn inner(&self) -> &DeviceRef {
        &self.mem
    }
    fn size(&self) -> SectorCount {
        SectorCount(self.size.load(Ordering::Relaxed))
    }
    /// A memory device has no size to read again: the present one.
    fn refresh_size(&self) -> std::io::Result<SectorCount> {
        Ok(Forward::size(self))
    }
}

/// Opens a group over `origin` and `cow` on a local engine and runs `body` with it.
fn with<T: 'static>(
    origin: DeviceRef,
    cow: DeviceRef,
    body: impl AsyncFnOnce(Arc<SnapshotGroup>) -> T + 'static,
) -> Result<T> {
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(CopyConfig::default()).expect("engine");
        let runner = spawn(run);
        let options = GroupOptions::default();
        let group = SnapshotGroup::open(origin, cow, &options, engine.clone()).await;
        drop(engine);
        let out = match group {
            Ok(group) => {
                let merger = spawn(group.merge_task());
                let out = body(Arc::clone(&group)).await;
                group.check_invariants();
                group.stop();
                merger.await;
                Ok(out)
            }
            Err(e) => Err(e),
        };
        runner.await;
        out
    })
}

async fn put(dev: &dyn BlockDevice, sector: u64, sectors: u64, byte: u8) {
    let buf = Arc::new(AlignedBuf::from_slice(&vec![byte; sectors as usize * 512]));
    dev.write(Sector(sector), buf, WriteFlags::default())
        .await
        .expect("write");
}

async fn get(dev: &dyn BlockDevice, sector: u64, sectors: u64) -> std::io::Result<Vec<u8>> {
    let (res, buf) = dev
        .read(
            Sector(sector),
            AlignedBuf::for_sectors(SectorCount(sectors)),
        )
        .await;
    res.map(|()| buf.as_slice().to_vec())
}

async fn create(group: &SnapshotGroup, name: &str) {
    group
        .command_async("snapshot-create", &json!({ "name": name }))
        .await
        .expect("create");
}

fn exceptions(group: &SnapshotGroup) -> u64 {
    group.status()["exceptions"].as_u64().expect("a count")
}

/// Whether `data` is `byte` in sectors `from..to`.
fn all(data: &[u8], from: u64, to: u64, byte: u8) -> bool {
    data[from as usize * 512..to as usize * 512]
        .iter()
        .all(|&b| b == byte)
}

#[test]
fn an_origin_grows_and_its_older_snapshots_keep_their_size() {
    let origin = Growing::new(512, 1024);
    let cow = MemDevice::new("cow", SectorCount(8192));
    let grown = Arc::clone(&origin);
    with(origin.clone(), cow.clone(), async move |group| {
        let target = group.origin();
        put(&*target, 0, 512, 1).await;
        create(&group, "a").await;
        grown.size.store(1024, Ordering::Relaxed);
        assert_eq!(group.inner.grow(None).await.expect("grow"), 1024);
        assert_eq!(target.size(), SectorCount(1024));
        let a = group.snapshot("a").expect("a");
        assert_eq!(a.size(), SectorCount(512), "a keeps its size");
        // The new area needs no copy for a.
        put(&*target, 512, 512, 2).await;
        assert_eq!(exceptions(&group), 0);
        assert!(get(&*a, 512, 8).await.is_err(), "past a's end");
        create(&group, "b").await;
        let b = group.snapshot("b").expect("b");
        assert_eq!(b.size(), SectorCount(1024), "b has the new size");
        put(&*target, 600, 100, 3).await; // copies for b only
        put(&*target, 0, 32, 4).await; // one copy for a and b
                                       // a: chunk 0; b: chunks 18..=21 and 0.
        assert_eq!(exceptions(&group), 1 + 5, "{}", group.status());
        let a_data = get(&*a, 0, 512).await.expect("a");
        assert!(all(&a_data, 0, 512, 1));
        let b_data = get(&*b, 0, 1024).await.expect("b");
        assert!(all(&b_data, 0, 512, 1) && all(&b_data, 512, 1024, 2));
        // Refused: shrinking, more than the device holds; the same size changes nothing.
        let err = group.inner.grow(Some(SectorCount(512))).await.unwrap_err();
        assert!(err.to_string().contains("cannot shrink"), "{err}");
        let err = group.inner.grow(Some(SectorCount(2048))).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(group.inner.grow(None).await.expect("no-op"), 1024);
    })
    .expect("group");
    // Reopened on the grown origin: the sizes were recorded.
    with(origin.clone(), cow.clone(), async |group| {
        assert_eq!(group.origin().size(), SectorCount(1024));
        assert_eq!(group.snapshot("a").expect("a").size(), SectorCount(512));
        assert_eq!(group.snapshot("b").expect("b").size(), SectorCount(1024));
        let a = get(&*group.snapshot("a").expect("a"), 0, 512).await;
        assert!(all(&a.expect("a"), 0, 512, 1));
        // A merge of the older snapshot rolls back its range only.
        group
            .command_async("merge", &json!({ "name": "a" }))
            .await
            .expect("merge");
        for _ in 0..10_000 {
            if group.status()["merge"]["active"] == false {
                break;
            }
            smol::future::yield_now().await;
        }
        assert_eq!(group.status()["merge"]["active"], false);
        let data = get(&*group.origin(), 0, 1024).await.expect("origin");
        assert!(all(&data, 0, 512, 1), "a's range rolled back");
        assert!(all(&data, 512, 600, 2) && all(&data, 600, 700, 3) && all(&data, 700, 1024, 2));
        let b = get(&*group.snapshot("b").expect("b"), 0, 1024).await;
        let b = b.expect("b");
        assert!(all(&b, 0, 512, 1) && all(&b, 512, 1024, 2), "b untouched");
    })
    .expect("reopen");
    // An origin of the size before the growth is another origin's.
    let small = Growing::new(512, 1024);
    let err = with(small, cow, async |_| ()).expect_err("refused");
    assert!(err.to_string().contains("another origin"), "{err}");
}

#[test]
fn an_origin_ending_inside_a_chunk_cannot_grow() {
    let origin = Growing::new(520, 1024);
    let cow = MemDevice::new("cow", SectorCount(8192));
    let grown = Arc::clone(&origin);
    with(origin, cow, async move |group| {
        grown.size.store(1024, Ordering::Relaxed);
        let err = group.inner.grow(None).await.unwrap_err();
        assert!(err.to_string().contains("inside a chunk"), "{err}");
        assert_eq!(group.origin().size(), SectorCount(520));
    })
    .expect("group");
}

/// A COW device that records every write it passes on.
struct Recorder {
    mem: DeviceRef,
    writes: Mutex<Vec<(Sector, Vec<u8>)>>,
}

impl Forward for Recorder {
    fn inner(&self) -> &DeviceRef {
        &self.mem
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        let bytes = buf.as_slice().to_vec();
        self.writes.lock().expect("writes").push((offset, bytes));
        self.mem.write(offset, buf, flags)
    }
}

/// A crash after any prefix of a growth's writes (the first commit after an open writes a
/// checkpoint and a superblock before the `Grow`; a write torn in half too) replays to the
/// old size or the new one, never to a corrupt store.
#[test]
fn a_crash_during_a_growth_leaves_the_old_size_or_the_new() {
    let cow = MemDevice::new("cow", SectorCount(8192));
    with(Growing::new(512, 1024), cow.clone(), async |group| {
        put(&*group.origin(), 0, 512, 1).await;
        create(&group, "a").await;
    })
    .expect("group");
    let before = cow.contents();
    let recorder = Arc::new(Forwarding(Recorder {
        mem: cow,
        writes: Mutex::new(Vec::new()),
    }));
    let origin = Growing::new(512, 1024);
    let grown = Arc::clone(&origin);
    with(origin, recorder.clone(), async move |group| {
        grown.size.store(1024, Ordering::Relaxed);
        group.inner.grow(None).await.expect("grow");
    })
    .expect("grow");
    let writes = recorder.writes.lock().expect("writes").clone();
    assert!(
        writes.len() >= 2,
        "a checkpoint, a superblock and the record"
    );
    let mut sizes = Vec::new();
    for cut in 0..=writes.len() {
        for torn in [false, true] {
            let cow = MemDevice::new("cow", SectorCount(8192));
            cow.poke(Sector(0), &before);
            for (i, (at, data)) in writes.iter().take(cut).enumerate() {
                let half = if torn && i + 1 == cut {
                    data.len() / 2
                } else {
                    data.len()
                };
                cow.poke(*at, &data[..half.next_multiple_of(512).min(data.len())]);
            }
            let grown = Growing::new(1024, 1024);
            let size = match with(grown, cow.clone(), async |g| g.origin().size()) {
                Ok(size) => size,
                Err(err) => {
                    assert!(
                        err.to_string().contains("another origin"),
                        "cut {cut}: {err}"
                    );
                    with(Growing::new(512, 1024), cow, async |g| g.origin().size())
                        .expect("the old size opens")
                }
            };
            sizes.push(size.0);
        }
    }
    assert!(sizes.iter().all(|&s| s == 512 || s == 1024), "{sizes:?}");
    assert_eq!(sizes.first(), Some(&512));
    assert_eq!(sizes.last(), Some(&1024));
}
