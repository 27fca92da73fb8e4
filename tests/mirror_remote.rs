//! A mirror with a remote leg, end to end on real threads: a file leg and the NBD client
//! against the model server (`device::nbd::model`). The server is stopped and started again,
//! and its connections are killed, while the mirror runs: the leg absent at assembly is
//! reached in the background, the leg whose link drops is failed and comes back by itself
//! with only the regions written meanwhile, and the stored spec names the remote leg once.
//! (The same against nbdkit, over veth with netem delay, is `tests/vm/mirror_remote.sh`.)

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublkdm::copy::ThrottleConfig;
use ublkdm::device::nbd::model::{ModelConfig, ModelServer};
use ublkdm::device::reactor::block_on;
use ublkdm::target::{Target, TargetSpec};
use ublkdm::targets::mirror::{open_mirror_with, MirrorSpec, Tuning};

use common::target_io::{read, write};

const LEG_BYTES: u64 = 8 << 20;

fn tuning() -> Tuning {
    Tuning {
        tick: Duration::from_millis(50),
        ..Tuning::default()
    }
}

fn spec(legs: Vec<PathBuf>, uuid: Option<uuid::Uuid>) -> MirrorSpec {
    MirrorSpec {
        uuid,
        legs,
        region_size_sectors: 256,
        nosync: false,
        force: false,
        resync_throttle: Default::default(),
        leg_options: Default::default(),
    }
}

fn open(spec: &MirrorSpec) -> Arc<dyn Target> {
    open_mirror_with(spec, ThrottleConfig::UNLIMITED, tuning()).expect("open the mirror")
}

/// Waits until `check` holds of the status (20 s at most).
fn wait_for(target: &Arc<dyn Target>, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = target.status();
        if check(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_sync(status: &serde_json::Value) -> bool {
    let legs = status["legs"].as_array().expect("legs");
    status["regions"]["in_sync"] == status["regions"]["total"]
        && legs.len() == 2
        && legs.iter().all(|l| l["state"] == "in-sync")
}

fn shut(target: Arc<dyn Target>) {
    block_on(async move { target.shutdown().await }).expect("shutdown");
}

fn stored(target: &Arc<dyn Target>, built_from: &MirrorSpec) -> MirrorSpec {
    let from: TargetSpec = built_from.clone().into();
    target.spec(&from).parse().expect("a mirror spec")
}

#[test]
fn a_remote_leg_is_reached_later_fails_with_its_link_and_comes_back() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let local = dir.path().join("local");
    std::fs::File::create(&local)
        .and_then(|f| f.set_len(LEG_BYTES))
        .expect("local leg");
    let mut server = ModelServer::start(ModelConfig::new(LEG_BYTES, "leg"));
    let url = PathBuf::from(server.address().to_string());
    // Created with both legs, in sync, a first write.
    let first = spec(vec![local.clone(), url.clone()], None);
    let target = open(&first);
    wait_for(&target, "the initial resync", in_sync);
    write(&target, 0, &[0x11; 64 * 512]);
    let uuid = target.status()["uuid"].as_str().expect("uuid").parse().ok();
    shut(target);

    // The far server is down at assembly: degraded, then the leg is reached once it is back.
    server.stop_listening();
    let again = spec(vec![local.clone(), url.clone()], uuid);
    let target = open(&again);
    assert_eq!(target.status()["degraded"], true);
    assert_eq!(
        stored(&target, &again).legs,
        vec![local.clone(), url.clone()],
        "the remote leg is named once, and kept while it is away"
    );
    write(&target, 1024, &[0x22; 64 * 512]);
    server.listen();
    wait_for(&target, "the remote leg reached in the background", in_sync);

    // Every bit cleared (lazily, on ticks) first, so that what resyncs below is what was
    // written while the leg was away.
    wait_for(&target, "the bits cleared", |s| s["regions"]["dirty"] == 0);
    // The link drops: the leg fails on the next write, then comes back by itself.
    server.kill_connections();
    server.stop_listening();
    write(&target, 2048, &[0x33; 64 * 512]);
    wait_for(&target, "the leg failed", |s| {
        s["legs"][1]["state"] == "failed"
    });
    write(&target, 4096, &[0x44; 64 * 512]);
    let copied_before = target.status()["copy"]["bytes_done"].as_u64().unwrap_or(0);
    server.listen();
    wait_for(&target, "the leg back by itself", in_sync);
    let status = target.status();
    assert!(
        status["legs"][1]["link"]["epoch"].as_u64() >= Some(2),
        "{status}"
    );
    let copied = status["copy"]["bytes_done"].as_u64().unwrap_or(0) - copied_before;
    assert!(
        copied <= 3 * 256 * 512,
        "only the regions written while it was away resync, not {copied} bytes"
    );
    for (sector, byte) in [(0, 0x11), (1024, 0x22), (2048, 0x33), (4096, 0x44)] {
        assert_eq!(read(&target, sector, 64), vec![byte; 64 * 512]);
    }
    let data_offset = status["data_offset_sectors"].as_u64().expect("data offset") as usize * 512;
    shut(target);
    let local_bytes = std::fs::read(&local).expect("read the local leg");
    let remote_bytes = server.contents();
    assert_eq!(
        local_bytes[data_offset..].len(),
        remote_bytes[data_offset..].len()
    );
    assert!(
        local_bytes[data_offset..] == remote_bytes[data_offset..],
        "the legs differ"
    );
}
