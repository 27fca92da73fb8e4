//! The mirror as the daemon runs it: `open_mirror` over regular files (io_uring, `O_DIRECT`),
//! its own copy-engine thread and resync thread with a ticker, I/O from another thread, and
//! commands through `Target::command`. Then the same spec again assembles what was created.
//!
//! Identity: the spec the daemon stores follows `replace-leg`, records the mirror's UUID, and
//! finds the legs by their superblocks wherever they now are (files given as hints, loop
//! devices found by the scan); a cloned leg is refused, naming both copies.
//!
//! Regular files need no privileges; a filesystem that refuses `O_DIRECT` (tmpfs) makes the
//! test print `SKIP:` and return. The loop-device test needs root and `losetup`, else it
//! prints `SKIP:`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublkdm::copy::ThrottleConfig;
use ublkdm::device::reactor::block_on;
use ublkdm::target::{Target, TargetSpec};
use ublkdm::targets::mirror::{open_mirror_with, LegOptions, MirrorSpec, Tuning};

use common::target_io::{read, write};

const LEG_BYTES: u64 = 8 << 20;

fn spec(legs: &[PathBuf]) -> MirrorSpec {
    MirrorSpec {
        uuid: None,
        legs: legs.to_vec(),
        region_size_sectors: 256,
        nosync: false,
        force: false,
        resync_throttle: Default::default(),
        leg_options: Default::default(),
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

/// A scratch folder for leg files, or `None` (after printing `SKIP:`) where the filesystem
/// refuses `O_DIRECT` (tmpfs).
fn direct_io_dir() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    if direct_io_works(dir.path()) {
        Some(dir)
    } else {
        eprintln!("SKIP: this filesystem refuses O_DIRECT");
        None
    }
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

/// The leg options a spec carries are those the mirror runs with, whatever the tuning says
/// (`open_mirror_with` used to drop them: only `open_mirror` passed them on).
#[test]
fn open_mirror_with_runs_with_the_specs_leg_options() {
    let Some(dir) = direct_io_dir() else {
        return;
    };
    let legs = make_legs(dir.path(), &["leg0", "leg1"]);
    let mut spec = spec(&legs);
    let mostly = LegOptions::parse("write-mostly").expect("options");
    spec.leg_options.insert(1, mostly);
    let target =
        open_mirror_with(&spec, ThrottleConfig::UNLIMITED, tuning()).expect("open the mirror");
    let status = target.status();
    assert_eq!(status["legs"][1]["options"], "write-mostly", "{status}");
    assert_eq!(
        status["legs"][0]["options"],
        serde_json::Value::Null,
        "{status}"
    );
}

#[test]
fn open_mirror_over_files_resyncs_on_its_own_threads_and_reassembles() {
    let Some(dir) = direct_io_dir() else {
        return;
    };
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
        write(&target, 1024, &data);
        let status = wait_in_sync(&target);
        assert_eq!(read(&target, 1024, 64), data);
        // Commands run from this (control) thread.
        let reply = target
            .command("fail-leg", &serde_json::json!({ "slot": 2 }))
            .expect("fail-leg");
        assert_eq!(reply["failed"], 2);
        write(&target, 2048, &data);
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

fn make_legs(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let file = std::fs::File::create(&path).expect("create a leg");
            file.set_len(LEG_BYTES).expect("size a leg");
            path
        })
        .collect()
}

fn shut(target: Arc<dyn Target>) {
    block_on({
        let t = Arc::clone(&target);
        async move { t.shutdown().await }
    })
    .expect("shutdown");
}

fn open_spec(spec: &MirrorSpec) -> ublkdm::error::Result<Arc<dyn Target>> {
    open_mirror_with(spec, ThrottleConfig::UNLIMITED, tuning())
}

fn spec_legs(spec: &TargetSpec) -> (Option<uuid::Uuid>, Vec<PathBuf>) {
    let spec: MirrorSpec = spec.parse().expect("a mirror spec");
    (spec.uuid, spec.legs)
}

#[test]
fn the_stored_spec_follows_replace_leg_and_finds_moved_legs_by_uuid() {
    let Some(dir) = direct_io_dir() else {
        return;
    };
    let legs = make_legs(dir.path(), &["a", "b", "c"]);
    let data: Vec<u8> = (0..64 * 512).map(|i| (i % 239) as u8).collect();
    let given = spec(&legs[..2]);
    let target = open_spec(&given).expect("create");
    write(&target, 512, &data);
    wait_in_sync(&target);
    let created = target.spec(&given.clone().into());
    let (uuid, paths) = spec_legs(&created);
    let uuid = uuid.expect("a created mirror records its uuid");
    assert_eq!(target.status()["uuid"], uuid.to_string());
    assert_eq!(paths, legs[..2]);
    let reply = target
        .command(
            "replace-leg",
            &serde_json::json!({ "slot": 1, "device": legs[2].to_str().expect("utf-8") }),
        )
        .expect("replace-leg");
    assert_eq!(reply["replaced"], 1);
    wait_in_sync(&target);
    let replaced = target.spec(&created);
    assert_eq!(
        spec_legs(&replaced),
        (Some(uuid), vec![legs[0].clone(), legs[2].clone()])
    );
    // add-leg and remove-leg are followed too.
    let extra = make_legs(dir.path(), &["d"]).remove(0);
    let reply = target
        .command(
            "add-leg",
            &serde_json::json!({ "device": extra.to_str().expect("utf-8") }),
        )
        .expect("add-leg");
    let added = reply["added"].as_u64().expect("a slot");
    let grown = target.spec(&replaced);
    assert_eq!(
        spec_legs(&grown).1,
        [legs[0].clone(), legs[2].clone(), extra.clone()]
    );
    target
        .command("remove-leg", &serde_json::json!({ "slot": added }))
        .expect("remove-leg");
    assert_eq!(target.spec(&grown), replaced);
    shut(target);
    // Rename leg 0: the stored path is gone; the new name, given as one more hint among
    // others (the old leg b, replaced, still carries the mirror's uuid), is found by identity.
    let moved = dir.path().join("a-moved");
    std::fs::rename(&legs[0], &moved).expect("rename");
    let MirrorSpec {
        uuid: u,
        legs: _,
        region_size_sectors,
        nosync,
        force,
        resync_throttle,
        leg_options,
    } = replaced.parse().expect("a mirror spec");
    let hints = vec![
        legs[0].clone(),
        legs[1].clone(),
        legs[2].clone(),
        moved.clone(),
    ];
    let again = MirrorSpec {
        uuid: u,
        legs: hints,
        region_size_sectors,
        nosync,
        force,
        resync_throttle,
        leg_options: leg_options.clone(),
    };
    let target = open_spec(&again).expect("assemble by uuid");
    let status = wait_in_sync(&target);
    assert_eq!(status["uuid"], uuid.to_string());
    let devices: Vec<String> = status["legs"]
        .as_array()
        .expect("legs")
        .iter()
        .map(|l| l["device"].as_str().expect("device").to_owned())
        .collect();
    let expect: Vec<String> = [&moved, &legs[2]]
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        devices, expect,
        "the moved leg and the replacement, not the old leg b"
    );
    assert_eq!(read(&target, 512, 64), data);
    assert_eq!(
        spec_legs(&target.spec(&again.clone().into())),
        (Some(uuid), vec![moved.clone(), legs[2].clone()])
    );
    shut(target);
    // A copy of leg c claims the same slot and leg: refused, naming both, never merged.
    let clone = dir.path().join("c-clone");
    std::fs::copy(&legs[2], &clone).expect("clone a leg");
    let cloned = MirrorSpec {
        uuid: Some(uuid),
        legs: vec![moved.clone(), legs[2].clone(), clone.clone()],
        region_size_sectors,
        nosync,
        force,
        resync_throttle,
        leg_options,
    };
    let err = match open_spec(&cloned) {
        Ok(_) => panic!("a cloned leg was accepted"),
        Err(err) => err,
    };
    let line = err.to_string();
    assert!(line.contains(&legs[2].display().to_string()), "{line}");
    assert!(line.contains(&clone.display().to_string()), "{line}");
    assert!(line.contains("cloned"), "{line}");
    assert_eq!(err.kind().exit_code(), 7);
}

/// Attaches `file` to a free loop device; its path.
fn losetup(file: &Path) -> Option<PathBuf> {
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(file)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn detach(dev: &Path) {
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(dev)
        .status();
}

/// Loop devices that are detached when dropped (also when the test fails).
struct Loops(Vec<PathBuf>);

impl Drop for Loops {
    fn drop(&mut self) {
        for dev in &self.0 {
            detach(dev);
        }
    }
}

#[test]
fn loop_legs_that_moved_are_found_by_the_scan_and_a_clone_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: loop devices need root");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let files = make_legs(dir.path(), &["l0", "l1"]);
    let mut loops = Loops(Vec::new());
    for file in &files {
        match losetup(file) {
            Some(dev) => loops.0.push(dev),
            None => {
                eprintln!("SKIP: losetup failed");
                return;
            }
        }
    }
    let data: Vec<u8> = (0..64 * 512).map(|i| (i % 241) as u8).collect();
    let given = spec(&loops.0);
    let target = open_spec(&given).expect("create on loop devices");
    write(&target, 4096, &data);
    wait_in_sync(&target);
    let stored = target.spec(&given.clone().into());
    shut(target);
    // The same files on other loop devices: the stored paths now name detached loops.
    let mut moved = Loops(Vec::new());
    for file in files.iter().rev() {
        moved.0.push(losetup(file).expect("losetup again"));
    }
    for old in std::mem::take(&mut loops.0) {
        detach(&old);
    }
    let target = open_spec(&stored.parse().expect("a mirror spec"))
        .expect("the scan finds the legs by uuid");
    let status = wait_in_sync(&target);
    let mut devices: Vec<String> = status["legs"]
        .as_array()
        .expect("legs")
        .iter()
        .map(|l| l["device"].as_str().expect("device").to_owned())
        .collect();
    devices.sort();
    let mut expect: Vec<String> = moved.0.iter().map(|p| p.display().to_string()).collect();
    expect.sort();
    assert_eq!(devices, expect);
    assert_eq!(read(&target, 4096, 64), data);
    shut(target);
    // A cloned disk: the copy is found by the scan and refused with the original.
    let clone = dir.path().join("l1-clone");
    std::fs::copy(&files[1], &clone).expect("clone");
    let clone_dev = losetup(&clone).expect("losetup the clone");
    moved.0.push(clone_dev.clone());
    let err = match open_spec(&stored.parse().expect("a mirror spec")) {
        Ok(_) => panic!("a cloned leg was accepted"),
        Err(err) => err,
    };
    let line = err.to_string();
    assert!(line.contains(&clone_dev.display().to_string()), "{line}");
    assert!(line.contains(&moved.0[0].display().to_string()), "{line}");
    // The scan of assemble --scan refuses it the same way.
    let report = ublkdm::targets::scan().expect("scan");
    let uuid = spec_legs(&stored).0.expect("uuid").to_string();
    let found = report
        .found
        .iter()
        .find(|f| f.identity == uuid)
        .expect("the scan finds the mirror");
    assert!(found.spec.is_err(), "{found:?}");
}
