//! `UringDevice` on real loop devices and files (root only for loop devices; prints `SKIP:`).
//!
//! Geometry comes from the block ioctls, exclusive opens refuse a second user, data round
//! trips with and without FUA, discard and write-zeroes zero what they cover, and requests
//! off the device fail with EINVAL without touching it.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ublkdm::device::reactor::block_on;
use ublkdm::device::{AlignedBuf, BlockDevice, OpenOptions, UringDevice, WriteFlags};
use ublkdm::error::ErrorKind;
use ublkdm::units::{Extent, Sector, SectorCount};

use common::{scratch_dir, LoopDev};

const MIB: u64 = 1 << 20;

fn blockdev(arg: &str, dev: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg(arg)
        .arg(dev)
        .output()
        .expect("blockdev");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .parse()
        .expect("number")
}

/// Writes a pattern at `sector`, reads it back, then zeroes it with `zero` and checks.
fn round_trip_and_zero(dev: UringDevice, sector: u64, use_discard: bool) {
    block_on(async move {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let buf = Arc::new(AlignedBuf::from_slice(&data));
        dev.write(Sector(sector), Arc::clone(&buf), WriteFlags::FUA)
            .await
            .expect("write");
        let (res, back) = dev.read(Sector(sector), AlignedBuf::new(data.len())).await;
        res.expect("read");
        assert_eq!(back.as_slice(), &data[..]);
        let extent = Extent::new(Sector(sector), SectorCount(128));
        let zeroed = if use_discard {
            dev.discard(extent).await
        } else {
            dev.write_zeroes(extent).await
        };
        zeroed.expect("zeroing");
        dev.flush().await.expect("flush");
        let (res, back) = dev.read(Sector(sector), back).await;
        res.expect("read");
        assert!(
            back.as_slice().iter().all(|&b| b == 0),
            "zeroed range reads zero"
        );
        // Off the end: EINVAL, nothing written.
        let past = Sector(dev.info().size.0 - 8);
        let err = dev
            .write(past, buf, WriteFlags::default())
            .await
            .expect_err("past the end");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    });
}

#[test]
fn loop_device_geometry_io_and_exclusivity() {
    require_loop_devices!();
    let dir = scratch_dir();
    let lo = LoopDev::new(dir.path(), "disk", 64 * MIB);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).expect("open");
    let info = dev.info().clone();
    assert_eq!(info.size.to_bytes(), blockdev("--getsize64", &lo.path));
    assert_eq!(
        u64::from(info.logical_block_bytes),
        blockdev("--getss", &lo.path)
    );
    assert_eq!(
        u64::from(info.physical_block_bytes),
        blockdev("--getpbsz", &lo.path)
    );
    assert!(
        info.write_zeroes,
        "loop devices offload write-zeroes: {info:?}"
    );

    let second =
        UringDevice::open(&lo.path, OpenOptions::default()).expect_err("second exclusive open");
    assert_eq!(second.kind(), ErrorKind::Busy, "{second}");
    assert!(second.to_string().contains("in use"), "{second}");

    round_trip_and_zero(dev, 2048, false);
}

#[test]
fn loop_device_discard() {
    require_loop_devices!();
    let dir = scratch_dir();
    let lo = LoopDev::new(dir.path(), "disk", 16 * MIB);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).expect("open");
    assert!(
        dev.info().discard,
        "loop over a file supports discard: {:?}",
        dev.info()
    );
    round_trip_and_zero(dev, 4096, true);
}

#[test]
fn regular_file_backs_a_device() {
    let dir = scratch_dir();
    let file = dir.path().join("file");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(8 * MIB + 1000))
        .expect("file");
    let dev = UringDevice::open(&file, OpenOptions::default()).expect("open file");
    assert_eq!(
        dev.info().size.to_bytes(),
        8 * MIB,
        "size rounds down to whole 4 KiB blocks"
    );
    round_trip_and_zero(dev, 8, true);
}

#[test]
fn bad_paths_are_clear_errors() {
    let dir = scratch_dir();
    let missing =
        UringDevice::open(&dir.path().join("nope"), OpenOptions::default()).expect_err("missing");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let empty = dir.path().join("empty");
    std::fs::File::create(&empty).expect("file");
    let err = UringDevice::open(&empty, OpenOptions::default()).expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("empty"), "{err}");
    let err = UringDevice::open(dir.path(), OpenOptions::default()).expect_err("a folder");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}
