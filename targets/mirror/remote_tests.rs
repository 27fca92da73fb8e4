//! Tests of the legs a remote host adds, over in-memory legs on the deterministic executor:
//! write-mostly and write-behind (`behind.rs`: reads stay off a write-mostly leg, writes
//! behind are acknowledged early but bounded, never overtaken, waited for by a flush, and
//! keep their regions dirty until the leg has them), and split brain on a leg's return
//! (`resolve.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::tests::{
    self, data_of, devs, mem, options, pattern, read, settle, turns, with_mirror,
    with_mirror_tuned, write,
};
use super::*;
use crate::device::reactor::spawn;
use crate::device::{Forward, Forwarding, MemDevice};
use crate::region::RegionIndex;
use crate::task::Notify;

/// Holds the writes to the data area until the test lets them go, in the order the test
/// picks: a slow link whose server may run requests in any order. (Metadata writes pass: the
/// dirty log is written before the data, synchronously, on every leg.)
struct Held {
    inner: DeviceRef,
    /// The writes waiting, each with its gate (opened: the generation moved).
    waiting: Mutex<Vec<Arc<Notify>>>,
    /// Writes at or past this sector are held (`u64::MAX`: none).
    from: AtomicU64,
}

impl Held {
    fn new(inner: DeviceRef) -> Arc<Forwarding<Held>> {
        Arc::new(Forwarding(Held {
            inner,
            waiting: Mutex::new(Vec::new()),
            from: AtomicU64::new(u64::MAX),
        }))
    }

    /// Holds the writes to the mirror's data area from now on.
    fn hold(&self, t: &MirrorTarget) {
        self.from.store(t.layout().data_offset.0, Ordering::SeqCst);
    }

    fn waiting(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }

    /// Lets the newest waiting write go (so writes complete in reverse order).
    fn release_newest(&self) -> bool {
        let gate = self.waiting.lock().unwrap().pop();
        gate.map(|g| g.notify_all()).is_some()
    }

    /// Stops holding, and lets every waiting write go.
    fn open(&self) {
        self.from.store(u64::MAX, Ordering::SeqCst);
        while self.release_newest() {}
    }
}

impl Forward for Held {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        let inner = Arc::clone(&self.inner);
        if offset.0 < self.from.load(Ordering::SeqCst) {
            return inner.write(offset, buf, flags);
        }
        let gate = Arc::new(Notify::default());
        let seen = gate.generation();
        self.waiting.lock().unwrap().push(Arc::clone(&gate));
        Box::pin(async move {
            gate.wait(seen).await;
            inner.write(offset, buf, flags).await
        })
    }
}

fn tuning(slot: usize, options: LegOptions) -> Tuning {
    Tuning {
        leg_options: BTreeMap::from([(slot, options)]),
        ..Tuning::default()
    }
}

fn behind(n: u32) -> LegOptions {
    LegOptions {
        write_mostly: true,
        write_behind: n,
    }
}

fn nosync() -> CreateOptions {
    CreateOptions {
        nosync: true,
        ..options(64)
    }
}

fn lag(t: &MirrorTarget, slot: usize) -> (u64, u64) {
    let status = t.status();
    let lag = &status["legs"][slot]["lag"];
    (
        lag["writes"].as_u64().expect("writes"),
        lag["bytes"].as_u64().expect("bytes"),
    )
}

#[test]
fn a_write_mostly_leg_serves_reads_only_when_no_other_leg_can() {
    let legs = vec![mem("a"), mem("b"), mem("c")];
    let wm = LegOptions {
        write_mostly: true,
        write_behind: 0,
    };
    let l = legs.clone();
    with_mirror_tuned(devs(&legs), nosync(), tuning(2, wm), move |t| async move {
        write(&t, 0, &pattern(1, 512)).await;
        for _ in 0..8 {
            assert_eq!(read(&t, 0, 512).await, pattern(1, 512), "split read");
            assert_eq!(
                read(&t, 16, 8).await[..],
                pattern(1, 512)[16 * 512..24 * 512]
            );
        }
        let reads = |slot: usize| {
            t.inner.lock().legs[slot]
                .stats
                .reads
                .load(Ordering::Relaxed)
        };
        assert!(
            reads(0) > 0 && reads(1) > 0,
            "the other legs share the reads"
        );
        assert_eq!(reads(2), 0, "the write-mostly leg is never read");
        assert_eq!(t.status()["legs"][2]["options"], "write-mostly");
        // With the others gone, it serves.
        t.fail_leg(0).await.expect("fail 0");
        t.fail_leg(1).await.expect("fail 1");
        assert_eq!(read(&t, 0, 512).await, pattern(1, 512));
        assert!(reads(2) > 0);
        let layout = t.layout();
        assert_eq!(data_of(&l[2], layout), data_of(&l[0], layout));
    })
    .expect("mirror");
}

#[test]
fn writes_behind_are_acknowledged_early_and_bounded() {
    let (a, b) = (mem("a"), mem("b"));
    let held = Held::new(b.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let (h, a2, b2) = (Arc::clone(&held), a.clone(), b.clone());
    with_mirror_tuned(legs, nosync(), tuning(1, behind(2)), move |t| async move {
        h.hold(&t);
        write(&t, 0, &pattern(1, 8)).await;
        write(&t, 512, &pattern(2, 8)).await;
        turns(20).await;
        assert_eq!(h.waiting(), 2, "both acknowledged while leg 1 holds them");
        assert_eq!(lag(&t, 1), (2, 8192));
        // The budget is spent: the third write waits for leg 1 in the foreground.
        let t3 = Arc::clone(&t);
        let third = spawn(async move { write(&t3, 1024, &pattern(3, 8)).await });
        turns(50).await;
        assert!(
            !third.is_finished(),
            "a third write behind would exceed write-behind=2"
        );
        h.open();
        third.await;
        settle(&t).await;
        assert_eq!(lag(&t, 1), (0, 0));
        let layout = t.layout();
        assert_eq!(data_of(&b2, layout), data_of(&a2, layout));
        assert_eq!(read(&t, 512, 8).await, pattern(2, 8));
    })
    .expect("mirror");
}

/// Two writes to one sector, the second issued after the first was acknowledged: the leg
/// behind must end with the second, even on a device that completes the newest first.
#[test]
fn a_later_write_behind_is_never_overtaken() {
    let (a, b) = (mem("a"), mem("b"));
    let held = Held::new(b.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let (h, a2, b2) = (Arc::clone(&held), a.clone(), b.clone());
    with_mirror_tuned(legs, nosync(), tuning(1, behind(8)), move |t| async move {
        h.hold(&t);
        write(&t, 0, &pattern(1, 8)).await;
        write(&t, 0, &pattern(2, 8)).await;
        write(&t, 4, &pattern(3, 8)).await;
        turns(20).await;
        assert_eq!(h.waiting(), 1, "the overlapping writes wait their turn");
        assert_eq!(lag(&t, 1).0, 3);
        while lag(&t, 1).0 > 0 {
            h.release_newest();
            turns(20).await;
        }
        let layout = t.layout();
        assert_eq!(
            data_of(&b2, layout),
            data_of(&a2, layout),
            "leg 1 is current"
        );
        let mut expect = pattern(2, 8);
        expect[4 * 512..].copy_from_slice(&pattern(3, 8)[..4 * 512]);
        assert_eq!(read(&t, 0, 8).await, expect);
    })
    .expect("mirror");
}

#[test]
fn a_flush_and_a_fua_write_wait_for_every_leg() {
    let (a, b) = (mem("a"), mem("b"));
    let held = Held::new(b.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let (h, b2) = (Arc::clone(&held), b.clone());
    with_mirror_tuned(legs, nosync(), tuning(1, behind(8)), move |t| async move {
        h.hold(&t);
        write(&t, 64, &pattern(4, 8)).await;
        let t2 = Arc::clone(&t);
        let flush = spawn(async move { t2.flush().await });
        let t3 = Arc::clone(&t);
        let fua = spawn(async move {
            let buf = Arc::new(AlignedBuf::from_slice(&pattern(5, 8)));
            t3.write(Sector(256), buf, WriteFlags::FUA).await
        });
        turns(50).await;
        assert!(!flush.is_finished(), "a flush waits for the write behind");
        assert!(!fua.is_finished(), "a FUA write is not left behind");
        h.open();
        flush.await.expect("flush");
        fua.await.expect("fua write");
        let at = t.layout().data_offset + SectorCount(64);
        assert_eq!(b2.snapshot(Extent::new(at, SectorCount(8))), pattern(4, 8));
    })
    .expect("mirror");
}

/// A change of the region map (a grow, a split-brain resolution) waits for writes behind,
/// which outlive their requests and end their regions in the map they began in.
#[test]
fn a_map_change_waits_for_the_writes_behind() {
    let (a, b) = (mem("a"), mem("b"));
    let held = Held::new(b.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let h = Arc::clone(&held);
    with_mirror_tuned(legs, nosync(), tuning(1, behind(8)), move |t| async move {
        h.hold(&t);
        write(&t, 64, &pattern(8, 8)).await;
        let inner = Arc::clone(&t.inner);
        let change = spawn(async move {
            let _quiet = inner.exclusive().await.expect("exclusive");
        });
        turns(50).await;
        assert!(
            !change.is_finished(),
            "the write behind has not ended its region"
        );
        h.open();
        change.await;
    })
    .expect("mirror");
}

/// The dirty bit of a region written behind stays set, through clean passes, until the leg
/// has the write: a crash meanwhile resyncs it.
#[test]
fn a_region_written_behind_stays_dirty_until_the_leg_has_it() {
    let (a, b) = (mem("a"), mem("b"));
    let held = Held::new(b.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let h = Arc::clone(&held);
    with_mirror_tuned(legs, nosync(), tuning(1, behind(8)), move |t| async move {
        h.hold(&t);
        write(&t, 64 * 5, &pattern(6, 8)).await;
        for _ in 0..20 {
            t.inner.clean_pass().await;
            turns(5).await;
        }
        let dirty = t.inner.log().dirty_regions();
        assert!(dirty.contains(&RegionIndex(5)), "{dirty:?}");
        h.open();
        turns(50).await;
        for _ in 0..20 {
            t.inner.clean_pass().await;
            turns(5).await;
        }
        assert!(
            t.inner.log().dirty_regions().is_empty(),
            "cleared once the leg has it"
        );
    })
    .expect("mirror");
}

/// A leg written behind that fails is failed (durably) once its write ends; the write was
/// acknowledged from the other leg, which keeps it.
#[test]
fn a_write_behind_that_fails_fails_the_leg_not_the_write() {
    let (a, b) = (mem("a"), mem("b"));
    let faulty = crate::device::FaultyDevice::new(b.clone(), Default::default());
    let held = Held::new(faulty.clone());
    let legs: Vec<DeviceRef> = vec![a.clone(), held.clone()];
    let (h, f) = (Arc::clone(&held), Arc::clone(&faulty));
    with_mirror_tuned(legs, nosync(), tuning(1, behind(8)), move |t| async move {
        h.hold(&t);
        write(&t, 0, &pattern(7, 8)).await;
        f.set_dead(true);
        h.open();
        turns(100).await;
        assert_eq!(t.leg_states()[1], LegState::Failed);
        assert_eq!(read(&t, 0, 8).await, pattern(7, 8));
        assert_eq!(t.status()["degraded"], true);
    })
    .expect("mirror");
}

// ---------------------------------------------------------------------------------------------
// Split brain on a leg's return (`resolve.rs`).

/// Makes the two sides of a split brain: a mirror over `a` and `b` with `first` at sector 0;
/// then `b` alone (the other host) writes `theirs` at 64, and `a` alone writes `ours` at 128.
fn split(a: &Arc<MemDevice>, b: &Arc<MemDevice>) {
    with_mirror(devs(&[a.clone(), b.clone()]), options(64), |t| async move {
        settle(&t).await;
        write(&t, 0, &pattern(1, 8)).await;
        t.flush().await.expect("flush");
    })
    .expect("create");
    with_mirror(devs(std::slice::from_ref(b)), options(64), |t| async move {
        assert_eq!(t.status()["degraded"], true);
        write(&t, 64, &pattern(2, 8)).await;
        t.flush().await.expect("flush");
    })
    .expect("the other host runs b alone");
}

async fn refused_then_resolved(t: Arc<MirrorTarget>, b: Arc<MemDevice>, keep_remote: bool) {
    write(&t, 128, &pattern(3, 8)).await;
    let err = t
        .add_leg(b.clone(), AddLegOptions::default())
        .await
        .expect_err("split brain");
    assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("split brain"), "{err}");
    assert_eq!(t.status()["split_brain"].as_array().map(Vec::len), Some(1));
    assert_eq!(t.leg_states()[1], LegState::Stale, "nothing joined");
    Arc::clone(&t.inner)
        .resolve(keep_remote)
        .await
        .expect("resolve");
    settle(&t).await;
    assert_eq!(t.status()["split_brain"].as_array().map(Vec::len), Some(0));
    assert_eq!(t.leg_states()[..2], [LegState::InSync; 2]);
    let (theirs, ours) = (read(&t, 64, 8).await, read(&t, 128, 8).await);
    if keep_remote {
        assert_eq!(theirs, pattern(2, 8), "the other side's write is kept");
        assert_ne!(ours, pattern(3, 8), "this side's write is discarded");
    } else {
        assert_ne!(theirs, pattern(2, 8), "the other side's write is discarded");
        assert_eq!(ours, pattern(3, 8), "this side's write is kept");
    }
    assert_eq!(read(&t, 0, 8).await, pattern(1, 8), "from before the split");
}

#[test]
fn a_split_brain_leg_is_held_until_resolved_either_way() {
    for keep_remote in [false, true] {
        let (a, b) = (mem("a"), mem("b"));
        split(&a, &b);
        let (a2, b2) = (a.clone(), b.clone());
        with_mirror(devs(std::slice::from_ref(&a)), options(64), move |t| {
            refused_then_resolved(t, b2, keep_remote)
        })
        .expect("this host runs a alone");
        let layout = Layout::compute(tests::LEG, Some(SectorCount(64))).expect("layout");
        assert_eq!(
            data_of(&a2, layout),
            data_of(&b, layout),
            "keep_remote {keep_remote}"
        );
    }
}

/// A leg that merely missed writes (failed here, never run elsewhere) is no split brain.
#[test]
fn a_leg_that_only_missed_writes_is_not_a_split_brain() {
    let (a, b) = (mem("a"), mem("b"));
    with_mirror(devs(&[a.clone(), b.clone()]), options(64), |t| async move {
        settle(&t).await;
    })
    .expect("create");
    let b2 = b.clone();
    with_mirror(
        devs(std::slice::from_ref(&a)),
        options(64),
        move |t| async move {
            write(&t, 64, &pattern(4, 8)).await;
            t.add_leg(b2, AddLegOptions::default())
                .await
                .expect("re-add");
            settle(&t).await;
            assert_eq!(read(&t, 64, 8).await, pattern(4, 8));
        },
    )
    .expect("assemble a alone");
}

// ---------------------------------------------------------------------------------------------
// The command line: remote legs and leg options.

fn add_spec(args: &[&str]) -> crate::error::Result<MirrorSpec> {
    use crate::registry::TargetKind;
    let matches = MirrorKind
        .add_command()
        .try_get_matches_from(std::iter::once("mirror").chain(args.iter().copied()))
        .map_err(crate::cli::clap_error)?;
    MirrorKind.add_spec(&matches)?.parse()
}

#[test]
fn add_mirror_takes_remote_legs_and_leg_options() {
    let spec = add_spec(&[
        "--leg",
        "/dev/vda",
        "--leg",
        "nbd://far.example:10810/disk",
        "--leg-options",
        "1=write-behind=64",
    ])
    .expect("spec");
    assert_eq!(
        spec.legs[1],
        std::path::PathBuf::from("nbd://far.example:10810/disk")
    );
    assert_eq!(spec.leg_options[&1], behind(64));
    let bad: [&[&str]; 4] = [
        &["--leg", "/dev/vda", "--leg", "nbd://[::1/x"],
        &[
            "--leg",
            "/dev/vda",
            "--leg",
            "/dev/vdb",
            "--leg-options",
            "2=write-mostly",
        ],
        &[
            "--leg",
            "/dev/vda",
            "--leg",
            "/dev/vdb",
            "--leg-options",
            "1=fast",
        ],
        &["--leg", "nbd://a/x", "--leg", "nbd://a/x"],
    ];
    for args in bad {
        let err = add_spec(args).expect_err("refused");
        assert_eq!(
            err.kind(),
            crate::error::ErrorKind::InvalidArgument,
            "{args:?}: {err}"
        );
    }
}
