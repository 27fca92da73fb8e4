//! Zero-copy tests of the snapshot target: an origin and a snapshot over files (`UringDevice`),
//! served registered buffers (user memory registered on a test ring stands in for a ublk
//! request's pages, `block_on_registered`): origin writes copy the old chunk first, snapshot
//! reads and origin reads while merging fill parts of one buffer from both devices, and a
//! snapshot write is refused with `NeedsCopy` before any I/O.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::device::reactor::{block_on, block_on_registered};
use crate::device::{is_needs_copy, IoBuf, RegBuf};

/// The origin's bytes before any write: 0x11.
const OLD: u8 = 0x11;
/// The bytes written to the origin in zero copy.
const NEW: u8 = 0xc3;
/// 16 KiB chunks, the default.
const CHUNK_BYTES: usize = 16 << 10;

/// A temporary directory with an origin file (1 MiB of [`OLD`]) and a blank 4 MiB COW file.
fn files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("origin"), vec![OLD; 1 << 20]).expect("origin");
    let cow = std::fs::File::create(dir.path().join("cow")).expect("cow");
    cow.set_len(4 << 20).expect("cow size");
    dir
}

/// Opens the group over the files in `dir`, with a copy engine on its own thread and no merge
/// thread (a merge started stays pending).
fn open(dir: &Path) -> Arc<SnapshotGroup> {
    let dev = |name: &str| -> DeviceRef {
        Arc::new(UringDevice::open(&dir.join(name), OpenOptions::default()).expect("open"))
    };
    let (origin, cow) = (dev("origin"), dev("cow"));
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    block_on(
        async move { SnapshotGroup::open(origin, cow, &GroupOptions::default(), engine).await },
    )
    .expect("group")
}

fn command(group: &Arc<SnapshotGroup>, name: &'static str, args: serde_json::Value) {
    let group = Arc::clone(group);
    block_on(async move { group.command_async(name, &args).await }).expect(name);
}

/// Writes `NEW` over sectors 48..80 of the origin (the second half of chunk 1 and the first
/// of chunk 2) from a registered buffer.
fn write_origin_zero_copy(group: &Arc<SnapshotGroup>) {
    let origin = group.origin();
    let bufs = vec![AlignedBuf::from_slice(&[NEW; CHUNK_BYTES])];
    let (res, _) = block_on_registered(bufs, move |regs| async move {
        origin
            .write_buf(
                Sector(48),
                IoBuf::Registered(regs[0].clone()),
                WriteFlags::FUA,
            )
            .await
    });
    res.expect("an origin write in zero copy");
}

/// Reads the first 64 KiB (chunks 0..4) of `dev` into a registered buffer.
fn read_zero_copy(dev: Arc<dyn Target>) -> Vec<u8> {
    let bufs = vec![AlignedBuf::new(4 * CHUNK_BYTES)];
    let (res, bufs) = block_on_registered(bufs, move |regs| async move {
        let (res, back) = dev
            .read_buf(Sector(0), IoBuf::Registered(regs[0].clone()))
            .await;
        assert!(back.is_registered(), "the buffer comes back");
        res
    });
    res.expect("a read in zero copy");
    bufs[0].as_slice().to_vec()
}

/// The first 64 KiB after [`write_origin_zero_copy`].
fn written() -> Vec<u8> {
    let mut want = vec![OLD; 4 * CHUNK_BYTES];
    want[48 * 512..80 * 512].fill(NEW);
    want
}

#[test]
fn an_origin_write_in_zero_copy_copies_the_old_chunks_first() {
    let dir = files();
    let group = open(dir.path());
    assert!(group.origin().zero_copy(), "the origin asks for zero copy");
    command(&group, "snapshot-create", json!({ "name": "s1" }));
    write_origin_zero_copy(&group);
    let on_disk = std::fs::read(dir.path().join("origin")).expect("read the origin");
    assert_eq!(
        on_disk[..4 * CHUNK_BYTES],
        written()[..],
        "the new data landed"
    );
    assert_eq!(
        group.status()["exceptions"],
        2,
        "chunks 1 and 2 were copied"
    );
    // The snapshot reads chunks 0 and 3 from the origin, 1 and 2 from the COW store, into
    // parts of one registered buffer.
    let snap = group.snapshot("s1").expect("s1");
    assert!(snap.zero_copy(), "a snapshot asks for zero copy");
    assert_eq!(read_zero_copy(snap.clone()), vec![OLD; 4 * CHUNK_BYTES]);
    assert_eq!(read_zero_copy(group.origin()), written());
    // Copy mode reads the same.
    let (res, owned) = block_on(async move { snap.read(Sector(0), AlignedBuf::new(65536)).await });
    res.expect("an owned read");
    assert_eq!(owned.as_slice(), vec![OLD; 4 * CHUNK_BYTES]);
    group.check_invariants();
}

#[test]
fn a_snapshot_write_in_zero_copy_falls_back_before_any_io() {
    let dir = files();
    let group = open(dir.path());
    command(&group, "snapshot-create", json!({ "name": "s1" }));
    let snap = group.snapshot("s1").expect("s1");
    let bufs = vec![AlignedBuf::from_slice(&[NEW; CHUNK_BYTES])];
    let target = Arc::clone(&snap);
    let (res, _) = block_on_registered(bufs, move |regs: Vec<RegBuf>| async move {
        target
            .write_buf(
                Sector(0),
                IoBuf::Registered(regs[0].clone()),
                WriteFlags::default(),
            )
            .await
    });
    let err = res.expect_err("refused");
    assert!(is_needs_copy(&err), "{err}");
    assert_eq!(group.status()["exceptions"], 0, "nothing was copied");
    assert_eq!(read_zero_copy(snap.clone()), vec![OLD; 4 * CHUNK_BYTES]);
    // The same write in copy mode (what the front end does next) goes through.
    let data = Arc::new(AlignedBuf::from_slice(&[NEW; CHUNK_BYTES]));
    let target = Arc::clone(&snap);
    block_on(async move { target.write(Sector(0), data, WriteFlags::default()).await })
        .expect("an owned snapshot write");
    let mut want = vec![OLD; 4 * CHUNK_BYTES];
    want[..CHUNK_BYTES].fill(NEW);
    assert_eq!(read_zero_copy(snap), want);
    assert_eq!(read_zero_copy(group.origin()), vec![OLD; 4 * CHUNK_BYTES]);
}

/// While a merge is pending the origin reads as the snapshot: in zero copy, its unmerged
/// chunks come from the COW store into their parts of the buffer.
#[test]
fn an_origin_read_while_merging_fills_one_buffer_from_both_devices() {
    let dir = files();
    let group = open(dir.path());
    command(&group, "snapshot-create", json!({ "name": "s1" }));
    write_origin_zero_copy(&group);
    command(&group, "merge", json!({ "name": "s1" }));
    assert_eq!(read_zero_copy(group.origin()), vec![OLD; 4 * CHUNK_BYTES]);
    // An origin write to an unmerged chunk merges it first, then lands.
    write_origin_zero_copy(&group);
    assert_eq!(read_zero_copy(group.origin()), written());
    group.check_invariants();
}
