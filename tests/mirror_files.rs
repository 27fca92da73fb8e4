//! The mirror as the daemon runs it: `open_mirror` over regular files (io_uring, `O_DIRECT`),
//! its own copy-engine thread and resync thread with a ticker, I/O from another thread, and
//! commands through `Target::command`. Then the same spec again assembles what was created.
//!
//! Regular files need no privileges; a filesystem that refuses `O_DIRECT` (tmpfs) makes the
//! test print `SKIP:` and return.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublkdm::copy::ThrottleConfig;
use ublkdm::device::reactor::block_on;
use ublkdm::device::{AlignedBuf, WriteFlags};
use ublkdm::target::{Target, TargetSpec};
use ublkdm::targets::mirror::{open_mirror_with, Tuning};
use ublkdm::units::{Sector, SectorCount};

const LEG_BYTES: u64 = 8 << 20;

fn spec(legs: &[PathBuf]) -> TargetSpec {
    TargetSpec::Mirror {
        legs: legs.to_vec(),
        region_size_sectors: 256,
        nosync: false,
        force: false,
        resync_throttle: Default::default(),
    }
}

fn tuning() -> Tuning {
    Tuning {
        tick: Duration::from_millis(50),
        ..Tuning::default()
    }
}

fn open(legs: &[PathBuf]) -> Arc<dyn Target> {
    open_mirror_with(&spec(legs), ThrottleConfig::UNLIMITED, tuning()).expect("open the mirror")
}

fn wait_in_sync(target: &Arc<dyn Target>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = target.status();
        let regions = &status["regions"];
        let legs_in_sync = status["legs"]
            .as_array()
            .expect("legs")
            .iter()
            .all(|l| l["state"] == "in-sync");
        if regions["in_sync"] == regions["total"] && legs_in_sync {
            return status;
        }
        assert!(Instant::now() < deadline, "resync did not finish: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(target: &Arc<dyn Target>, sector: u64, data: Vec<u8>) {
    let t = Arc::clone(target);
    block_on(async move {
        let buf = Arc::new(AlignedBuf::from_slice(&data));
        t.write(Sector(sector), buf, WriteFlags::FUA).await
    })
    .expect("write");
}

fn read(target: &Arc<dyn Target>, sector: u64, sectors: u64) -> Vec<u8> {
    let t = Arc::clone(target);
    block_on(async move {
        let (res, buf) = t
            .read(
                Sector(sector),
                AlignedBuf::for_sectors(SectorCount(sectors)),
            )
            .await;
        res.map(|()| buf.as_slice().to_vec())
    })
    .expect("read")
}

fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("probe");
    std::fs::write(&probe, vec![0u8; 4096]).expect("write a probe file");
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok()
}

#[test]
fn open_mirror_over_files_resyncs_on_its_own_threads_and_reassembles() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    if !direct_io_works(dir.path()) {
        eprintln!("SKIP: this filesystem refuses O_DIRECT");
        return;
    }
    let legs: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("leg{i}"))).collect();
    for (i, leg) in legs.iter().enumerate() {
        let file = std::fs::File::create(leg).expect("create a leg");
        file.set_len(LEG_BYTES + i as u64 * (1 << 20))
            .expect("size a leg");
    }
    let data: Vec<u8> = (0..64 * 512).map(|i| (i % 251) as u8).collect();
    let uuid = {
        let target = open(&legs);
        assert_eq!(target.kind(), "mirror");
        write(&target, 1024, data.clone());
        let status = wait_in_sync(&target);
        assert_eq!(read(&target, 1024, 64), data);
        // Commands run from this (control) thread.
        let reply = target
            .command("fail-leg", &serde_json::json!({ "slot": 2 }))
            .expect("fail-leg");
        assert_eq!(reply["failed"], 2);
        write(&target, 2048, data.clone());
        assert_eq!(target.status()["degraded"], true);
        let path = legs[2].to_str().expect("utf-8 path");
        let reply = target
            .command(
                "replace-leg",
                &serde_json::json!({ "slot": 2, "device": path }),
            )
            .expect("replace-leg");
        assert_eq!(reply["replaced"], 2);
        wait_in_sync(&target);
        target
            .command("scrub", &serde_json::json!({ "repair": false }))
            .expect("scrub");
        let deadline = Instant::now() + Duration::from_secs(20);
        while target.status()["scrub"] != serde_json::Value::Null {
            assert!(Instant::now() < deadline, "scrub did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(target.status()["mismatch_count"], 0);
        block_on({
            let t = Arc::clone(&target);
            async move { t.shutdown().await }
        })
        .expect("shutdown");
        status["uuid"].clone()
    };
    // The same spec again assembles the mirror, in sync, with the data.
    let target = open(&legs);
    let status = wait_in_sync(&target);
    assert_eq!(status["uuid"], uuid);
    assert_eq!(read(&target, 1024, 64), data);
    assert_eq!(read(&target, 2048, 64), data);
}
