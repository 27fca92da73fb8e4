//! The copy engine on real loop devices with O_DIRECT (root only; prints `SKIP:` otherwise).
//!
//! Checks against what the kernel stored, read back independently of the engine: a 1 GiB
//! copy's checksums match; one source reaches three destinations; zeroing zeroes; and a
//! destination whose backing filesystem is full is reported in the write-error mask while
//! the others complete.

mod common;

use std::path::Path;
use std::sync::Arc;

use ublkdm::copy::{CopyConfig, CopyEngine, CopyJob, Location, Priority};
use ublkdm::device::reactor::block_on;
use ublkdm::device::{AlignedBuf, BlockDevice, DeviceRef, OpenOptions, UringDevice};
use ublkdm::units::{Extent, Sector, SectorCount};

use common::{fill_random, scratch_dir, LoopDev, SmallTmpfs};

const MIB: u64 = 1 << 20;

fn open(path: &Path) -> DeviceRef {
    Arc::new(UringDevice::open(path, OpenOptions::default()).expect("open loop device"))
}

fn whole(dev: &DeviceRef, bytes: u64) -> Location {
    Location::new(
        dev,
        Extent::new(
            Sector(0),
            SectorCount::from_bytes_exact(bytes).expect("whole sectors"),
        ),
    )
}

/// crc32c of `len` bytes of `dev` from `start`, read with O_DIRECT through a fresh open.
fn checksum(path: &Path, start: Sector, len: u64) -> u32 {
    let dev = UringDevice::open(
        path,
        OpenOptions {
            exclusive: false,
            read_only: true,
        },
    )
    .expect("open");
    block_on(async move {
        let mut crc = 0u32;
        let mut buf = AlignedBuf::new(4 * MIB as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(4 * MIB);
            buf.set_len(n as usize);
            let (res, back) = dev.read(start + SectorCount(done / 512), buf).await;
            res.expect("read back");
            crc = crc32c::crc32c_append(crc, back.as_slice());
            buf = back;
            done += n;
        }
        crc
    })
}

#[test]
fn copy_one_gib_and_compare_checksums() {
    require_loop_devices!();
    let dir = scratch_dir();
    let size = 1024 * MIB;
    let src = LoopDev::new(dir.path(), "src", size);
    fill_random(&src.file, size, 1);
    let dst = LoopDev::new(dir.path(), "dst", size);
    let (s, d) = (open(&src.path), open(&dst.path));
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    let job = CopyJob::copy(whole(&s, size), vec![whole(&d, size)]).flushing();
    let e = engine.clone();
    let done = block_on(async move { e.copy(job).await.expect("submit") });
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(done.sectors_done.to_bytes(), size);
    let stats = engine.stats();
    assert!(stats.memory_peak <= stats.memory_budget, "{stats:?}");
    engine.shutdown();
    drop((s, d));
    assert_eq!(
        checksum(&src.path, Sector(0), size),
        checksum(&dst.path, Sector(0), size)
    );
}

#[test]
fn one_source_to_three_destinations() {
    require_loop_devices!();
    let dir = scratch_dir();
    let size = 64 * MIB;
    let src = LoopDev::new(dir.path(), "src", size);
    fill_random(&src.file, size, 2);
    let dsts: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("d{i}"), size + 8 * MIB))
        .collect();
    let s = open(&src.path);
    let ds: Vec<DeviceRef> = dsts.iter().map(|l| open(&l.path)).collect();
    // Each destination gets the copy at a different offset.
    let len = SectorCount::from_bytes_exact(size - MIB).expect("sectors");
    let dest_locs = ds
        .iter()
        .enumerate()
        .map(|(i, d)| Location::new(d, Extent::new(Sector(i as u64 * 2048), len)))
        .collect();
    let job = CopyJob::copy(Location::new(&s, Extent::new(Sector(2048), len)), dest_locs)
        .with_priority(Priority::Foreground);
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    let e = engine.clone();
    let done = block_on(async move { e.copy(job).await.expect("submit") });
    assert!(done.is_ok(), "{done:?}");
    engine.shutdown();
    drop((s, ds));
    let want = checksum(&src.path, Sector(2048), len.to_bytes());
    for (i, d) in dsts.iter().enumerate() {
        assert_eq!(
            checksum(&d.path, Sector(i as u64 * 2048), len.to_bytes()),
            want,
            "destination {i}"
        );
    }
}

#[test]
fn zeroing_zeroes() {
    require_loop_devices!();
    let dir = scratch_dir();
    let size = 32 * MIB;
    let dst = LoopDev::new(dir.path(), "dst", size);
    fill_random(&dst.file, size, 3);
    let d = open(&dst.path);
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    let region = Extent::new(
        Sector(8),
        SectorCount::from_bytes_exact(16 * MIB).expect("sectors"),
    );
    let job = CopyJob::zero(vec![Location::new(&d, region)]).flushing();
    let e = engine.clone();
    let done = block_on(async move { e.copy(job).await.expect("submit") });
    assert!(done.is_ok(), "{done:?}");
    engine.shutdown();
    drop(d);
    let zero_crc = crc32c::crc32c(&vec![0u8; 16 * MIB as usize]);
    assert_eq!(checksum(&dst.path, region.start, 16 * MIB), zero_crc);
    assert_ne!(
        checksum(&dst.path, region.end(), MIB),
        crc32c::crc32c(&vec![0u8; MIB as usize]),
        "beyond untouched"
    );
}

#[test]
fn a_destination_on_a_full_filesystem_is_reported() {
    require_loop_devices!();
    let dir = scratch_dir();
    let size = 16 * MIB;
    let src = LoopDev::new(dir.path(), "src", size);
    fill_random(&src.file, size, 4);
    let good = LoopDev::new(dir.path(), "good", size);
    // 16 MiB of loop device over 2 MiB of space: writes past the space fail.
    let full = SmallTmpfs::new(2 * MIB);
    let bad_file = full.dir.path().join("bad");
    std::fs::File::create(&bad_file)
        .and_then(|f| f.set_len(size))
        .expect("sparse file");
    let bad = LoopDev::over_buffered(&bad_file);
    let (s, g, b) = (open(&src.path), open(&good.path), open(&bad.path));
    let job = CopyJob::copy(whole(&s, size), vec![whole(&g, size), whole(&b, size)])
        .ignoring_errors()
        .flushing();
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    let e = engine.clone();
    let done = block_on(async move { e.copy(job).await.expect("submit") });
    engine.shutdown();
    assert_eq!(done.read_error, None);
    assert_eq!(
        done.write_errors.iter().collect::<Vec<_>>(),
        vec![1],
        "{done:?}"
    );
    drop((s, g, b));
    assert_eq!(
        checksum(&src.path, Sector(0), size),
        checksum(&good.path, Sector(0), size)
    );
}
