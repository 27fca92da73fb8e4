//! Unit tests of the mirror in zero copy: registered buffers (user memory registered on the
//! test thread's ring, standing in for a ublk request's pages) over file-backed legs, with the
//! mirror, its copy engine and its resync driver as tasks on that same ring. Legs that fail
//! reads, or refuse registered buffers, are wrappers around the files.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use super::state::LegStats;
use super::*;
use crate::copy::CopyConfig;
use crate::device::reactor::{block_on_registered, sleep, spawn};
use crate::device::{
    errno, is_needs_copy, Forward, Forwarding, IoBuf, IoReadDone, RegBuf, WriteBuf,
};
use crate::region::{RegionIndex, RegionState};

/// Region size of every mirror here, in sectors (128 KiB).
const REGION: u64 = 256;
/// Size of every leg file.
const LEG_BYTES: u64 = 8 << 20;

/// `n` leg files in a directory under `target/` (tmpfs refuses `O_DIRECT`); `None` (the
/// caller skips) when this file system refuses `O_DIRECT` anyway.
fn leg_files(n: usize) -> Option<(tempfile::TempDir, Vec<PathBuf>)> {
    let dir =
        tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).expect("temp dir");
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("leg{i}"))).collect();
    for path in &paths {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(LEG_BYTES))
            .expect("leg file");
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&paths[0]);
    if direct.is_err() {
        eprintln!("SKIP: this filesystem refuses O_DIRECT");
        return None;
    }
    Some((dir, paths))
}

fn file_leg(path: &std::path::Path) -> DeviceRef {
    open_leg(path).expect("open a leg file")
}

/// `len` bytes of leg file `path` at byte `at`, read past the mirror.
fn file_bytes(path: &std::path::Path, at: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("open leg file");
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, at).expect("read leg file");
    out
}

fn pattern(seed: u8, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Runs `body` on a new (nosync) mirror over `legs`, with `bufs` registered on the ring it
/// runs on; returns its output and the buffers.
fn with_registered<T: 'static, F>(
    legs: Vec<DeviceRef>,
    tuning: Tuning,
    bufs: Vec<AlignedBuf>,
    body: impl FnOnce(Arc<MirrorTarget>, Vec<RegBuf>) -> F + 'static,
) -> (T, Vec<AlignedBuf>)
where
    F: std::future::Future<Output = T> + 'static,
{
    block_on_registered(bufs, move |regs| async move {
        let (engine, run) = CopyEngine::new_local(CopyConfig::default()).expect("engine");
        let runner = spawn(run);
        let options = CreateOptions {
            region_size: Some(SectorCount(REGION)),
            nosync: true,
            force: false,
        };
        let env = MirrorEnv { engine, tuning };
        let target = Arc::new(
            MirrorTarget::open(legs, &options, env)
                .await
                .expect("create the mirror"),
        );
        let driver = spawn(target.resync_task());
        let out = body(Arc::clone(&target), regs).await;
        target.stop();
        driver.await;
        drop(target);
        runner.await;
        out
    })
}

/// Waits (on the ring: the legs' I/O must complete) until every region is in sync.
async fn settle(target: &MirrorTarget) {
    for _ in 0..10_000 {
        if target.is_synced() {
            return;
        }
        sleep(Duration::from_millis(1)).await;
    }
    panic!("resync did not finish: {}", target.status());
}

async fn write_reg(t: &MirrorTarget, sector: u64, reg: &RegBuf) -> std::io::Result<()> {
    t.write_buf(
        Sector(sector),
        IoBuf::Registered(reg.clone()),
        WriteFlags::FUA,
    )
    .await
}

async fn read_reg(t: &MirrorTarget, sector: u64, reg: &RegBuf) -> std::io::Result<()> {
    let (res, back) = t
        .read_buf(Sector(sector), IoBuf::Registered(reg.clone()))
        .await;
    assert!(back.is_registered(), "the buffer comes back as it went");
    res
}

/// Per slot: reads served, read errors.
fn leg_reads(t: &MirrorTarget) -> Vec<(u64, u64)> {
    let st = t.inner.lock();
    st.legs
        .iter()
        .map(|l| {
            (
                l.stats.reads.load(Ordering::Relaxed),
                l.stats.read_errors.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn region_state(t: &MirrorTarget, region: u64) -> RegionState {
    t.inner.lock().map.state(RegionIndex(region))
}

/// A registered write reaches every leg from the one buffer, whole and cut into pieces of a
/// region (slices of the buffer), and registered reads give it back.
#[test]
fn registered_writes_reach_every_leg() {
    let Some((_dir, paths)) = leg_files(3) else {
        return;
    };
    let legs = paths.iter().map(|p| file_leg(p)).collect();
    let tuning = Tuning {
        write_piece_regions: 1,
        ..Tuning::default()
    };
    // 384 KiB from sector 128: pieces of half a region, a region, a region, half a region.
    let data = pattern(7, 384 << 10);
    let bufs = vec![AlignedBuf::from_slice(&data), AlignedBuf::new(384 << 10)];
    let ((offset, zc), bufs) = with_registered(legs, tuning, bufs, |t, regs| async move {
        write_reg(&t, 128, &regs[0])
            .await
            .expect("registered write");
        read_reg(&t, 128, &regs[1]).await.expect("registered read");
        (t.layout().data_offset.to_bytes(), t.zero_copy())
    });
    assert!(zc, "the mirror asks for zero copy");
    assert!(bufs[1].as_slice() == data.as_slice(), "read back");
    for path in &paths {
        let on_leg = file_bytes(path, offset + 128 * 512, data.len());
        assert!(on_leg == data, "{} holds the write", path.display());
    }
}

/// A large registered read is split across the legs, each filling its part of the one buffer.
#[test]
fn split_registered_reads_fill_one_buffer_from_several_legs() {
    let Some((_dir, paths)) = leg_files(3) else {
        return;
    };
    let legs = paths.iter().map(|p| file_leg(p)).collect();
    let tuning = Tuning {
        read_split: SectorCount(32),
        ..Tuning::default()
    };
    let data = pattern(3, 96 << 10);
    let bufs = vec![AlignedBuf::from_slice(&data), AlignedBuf::new(96 << 10)];
    let (used, bufs) = with_registered(legs, tuning, bufs, |t, regs| async move {
        write_reg(&t, 512, &regs[0])
            .await
            .expect("registered write");
        let before = leg_reads(&t);
        read_reg(&t, 512, &regs[1]).await.expect("registered read");
        let after = leg_reads(&t);
        before.iter().zip(&after).filter(|(b, a)| a.0 > b.0).count()
    });
    assert_eq!(used, 3, "a 96 KiB read over 3 legs uses every leg");
    assert!(bufs[1].as_slice() == data.as_slice(), "the parts assemble");
}

/// A file leg whose reads fail in one extent (owned or registered alike).
struct FailingReads {
    inner: DeviceRef,
    bad: StdMutex<Option<Extent>>,
}

impl FailingReads {
    fn fails(&self, offset: Sector, len: usize) -> bool {
        let sectors = SectorCount::from_bytes_floor(len as u64);
        let bad = *self.bad.lock().expect("bad extent");
        bad.is_some_and(|b| offset < b.end() && b.start < offset + sectors)
    }
}

impl Forward for FailingReads {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        if self.fails(offset, buf.len()) {
            return Box::pin(std::future::ready((Err(errno(libc::EIO)), buf)));
        }
        self.inner.read(offset, buf)
    }
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        if self.fails(offset, buf.len()) {
            return Box::pin(std::future::ready((Err(errno(libc::EIO)), buf)));
        }
        self.inner.read_buf(offset, buf)
    }
    /// Straight down, owned memory too.
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        self.inner.write_buf(offset, buf, flags)
    }
}

/// A read error on one leg is retried on the other into the same registered buffer, and the
/// failing leg is repaired (the region resynced from the leg that answered).
#[test]
fn a_registered_read_error_is_retried_and_repaired() {
    let Some((_dir, paths)) = leg_files(2) else {
        return;
    };
    let failing = Arc::new(Forwarding(FailingReads {
        inner: file_leg(&paths[0]),
        bad: StdMutex::new(None),
    }));
    let legs = vec![Arc::clone(&failing) as DeviceRef, file_leg(&paths[1])];
    let data = pattern(11, 16 << 10);
    let bufs = vec![AlignedBuf::from_slice(&data), AlignedBuf::new(16 << 10)];
    let f = Arc::clone(&failing);
    let path0 = paths[0].clone();
    let (out, bufs) = with_registered(legs, Tuning::default(), bufs, move |t, regs| async move {
        write_reg(&t, 1024, &regs[0])
            .await
            .expect("registered write");
        let at = t.layout().data_offset + SectorCount(1024);
        // Leg 0's copy rots, and reading it fails.
        let file = std::fs::OpenOptions::new().write(true).open(&path0);
        let file = file.expect("leg 0 file");
        file.write_all_at(&[0u8; 16 << 10], at.to_bytes())
            .and_then(|()| file.sync_all())
            .expect("rot leg 0");
        *f.bad.lock().expect("bad") = Some(Extent::new(at, SectorCount(32)));
        for _ in 0..4 {
            read_reg(&t, 1024, &regs[1]).await.expect("served by leg 1");
        }
        settle(&t).await;
        (at.to_bytes(), leg_reads(&t), t.leg_states())
    });
    let (at, counts, states) = out;
    assert!(
        bufs[1].as_slice() == data.as_slice(),
        "the read came from leg 1"
    );
    assert!(counts[0].1 >= 1, "leg 0 saw the read error: {counts:?}");
    assert_eq!(counts[1].1, 0, "leg 1 never failed: {counts:?}");
    assert_eq!(states[..2], [LegState::InSync; 2], "no leg failed");
    let repaired = file_bytes(&paths[0], at, data.len());
    assert!(
        repaired == data,
        "the good data was written back over leg 0"
    );
}

/// How a [`Refusing`] leg answers a registered buffer.
#[derive(Clone, Copy)]
enum Refusal {
    /// `NeedsCopy`, before any I/O (the default of a device that cannot take one).
    NeedsCopy,
    /// `EINVAL`, as `O_DIRECT` answers memory it cannot use.
    Einval,
}

/// A file leg that serves owned memory and refuses registered buffers.
struct Refusing {
    inner: DeviceRef,
    how: Refusal,
}

impl Refusing {
    fn leg(path: &std::path::Path, how: Refusal) -> DeviceRef {
        Arc::new(Forwarding(Refusing {
            inner: file_leg(path),
            how,
        }))
    }

    fn refusal(&self) -> std::io::Error {
        match self.how {
            Refusal::NeedsCopy => crate::device::needs_copy(),
            Refusal::Einval => errno(libc::EINVAL),
        }
    }
}

impl Forward for Refusing {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        match buf {
            IoBuf::Owned(owned) => crate::device::owned_read(self.inner.read(offset, owned)),
            reg => Box::pin(std::future::ready((Err(self.refusal()), reg))),
        }
    }
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        match buf {
            IoBuf::Owned(owned) => self.inner.write(offset, owned, flags),
            IoBuf::Registered(_) => Box::pin(std::future::ready(Err(self.refusal()))),
        }
    }
}

/// What a refused registered write left: the region's state right after it, the leg states
/// and write errors, and (after the copy-mode retry and the resync) each leg's bytes.
struct Refused {
    state: RegionState,
    legs: Vec<LegState>,
    write_errors: u64,
    read_errors: u64,
    /// A registered read of an in-sync region was refused too (`NeedsCopy`).
    read_refused: Vec<bool>,
}

/// Writes `old` at region 1 in copy mode, then `new` there from a registered buffer, which
/// a leg refuses: the request must fail with `NeedsCopy`; then, as the front end would, the
/// same write again in copy mode. `reads` registered reads of region 0 follow.
fn refused_write(legs: Vec<DeviceRef>, old: &[u8], new: &[u8], reads: usize) -> Refused {
    let bufs = vec![AlignedBuf::from_slice(new), AlignedBuf::new(4096)];
    let (old, new) = (old.to_vec(), new.to_vec());
    let (out, _) = with_registered(legs, Tuning::default(), bufs, move |t, regs| async move {
        let copy = |data: Vec<u8>| Arc::new(AlignedBuf::from_slice(&data));
        let t2 = Arc::clone(&t);
        t2.write(Sector(REGION), copy(old), WriteFlags::FUA)
            .await
            .expect("copy-mode write");
        let err = write_reg(&t, REGION, &regs[0]).await.expect_err("refused");
        assert!(is_needs_copy(&err), "NeedsCopy, not {err}");
        // Nothing awaited since: the state the write left.
        let state = region_state(&t, 1);
        let mut read_refused = Vec::new();
        for _ in 0..reads {
            let res = read_reg(&t, 0, &regs[1]).await;
            read_refused.push(res.is_err_and(|e| is_needs_copy(&e)));
        }
        t.write(Sector(REGION), copy(new), WriteFlags::FUA)
            .await
            .expect("the copy-mode retry");
        settle(&t).await;
        let st = t.inner.lock();
        let errors = |f: fn(&LegStats) -> &std::sync::atomic::AtomicU64| {
            st.legs
                .iter()
                .map(|l| f(&l.stats).load(Ordering::Relaxed))
                .sum()
        };
        Refused {
            state,
            legs: st.legs.iter().map(|l| l.state).collect(),
            write_errors: errors(|s| &s.write_errors),
            read_errors: errors(|s| &s.read_errors),
            read_refused,
        }
    });
    out
}

/// The leg files' bytes of region 1's data.
fn region1(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    let layout = Layout::compute(
        SectorCount::from_bytes_floor(LEG_BYTES),
        Some(SectorCount(REGION)),
    )
    .expect("layout");
    let at = (layout.data_offset + SectorCount(REGION)).to_bytes();
    paths
        .iter()
        .map(|p| file_bytes(p, at, REGION as usize * 512))
        .collect()
}

/// One leg takes registered buffers, the other refuses them: the write falls back to copy
/// mode, no leg is failed, and the region the first leg wrote is left out of sync (dirty) so
/// no bit is cleared while the legs differ; after the copy-mode write both legs hold it.
#[test]
fn a_leg_refusing_registered_buffers_sends_the_write_to_copy_mode() {
    let Some((_dir, paths)) = leg_files(2) else {
        return;
    };
    let legs = vec![
        file_leg(&paths[0]),
        Refusing::leg(&paths[1], Refusal::NeedsCopy),
    ];
    let (old, new) = (pattern(1, 128 << 10), pattern(2, 128 << 10));
    let out = refused_write(legs, &old, &new, 0);
    assert_eq!(
        out.state,
        RegionState::OutOfSync,
        "leg 0 wrote, leg 1 did not"
    );
    assert_eq!(
        out.legs[..2],
        [LegState::InSync; 2],
        "a refusal fails no leg"
    );
    assert_eq!(out.write_errors, 0);
    for (slot, bytes) in region1(&paths).iter().enumerate() {
        assert!(
            *bytes == new,
            "leg {slot} holds the write after the copy-mode retry"
        );
    }
}

/// Every leg refuses with `NeedsCopy` (before any I/O): nothing was written, so the region
/// stays in sync; registered reads are refused too, without read errors.
#[test]
fn legs_refusing_before_any_io_leave_the_region_in_sync() {
    let Some((_dir, paths)) = leg_files(2) else {
        return;
    };
    let legs = paths
        .iter()
        .map(|p| Refusing::leg(p, Refusal::NeedsCopy))
        .collect();
    let (old, new) = (pattern(3, 128 << 10), pattern(4, 128 << 10));
    let out = refused_write(legs, &old, &new, 2);
    assert_eq!(out.state, RegionState::Dirty, "in sync, its bit still set");
    assert_eq!(out.read_refused, [true, true], "registered reads refused");
    assert_eq!((out.write_errors, out.read_errors), (0, 0));
    assert_eq!(out.legs[..2], [LegState::InSync; 2]);
    for bytes in region1(&paths) {
        assert!(bytes == new, "the copy-mode retry wrote every leg");
    }
}

/// Every leg refuses with `EINVAL`, which may come after a part of the transfer: the region
/// is left out of sync all the same (the legs may differ), and no leg is failed.
#[test]
fn legs_refusing_with_einval_leave_the_region_out_of_sync() {
    let Some((_dir, paths)) = leg_files(2) else {
        return;
    };
    let legs = paths
        .iter()
        .map(|p| Refusing::leg(p, Refusal::Einval))
        .collect();
    let (old, new) = (pattern(5, 128 << 10), pattern(6, 128 << 10));
    let out = refused_write(legs, &old, &new, 1);
    assert_eq!(out.state, RegionState::OutOfSync);
    assert_eq!(
        out.read_refused,
        [true],
        "EINVAL on a registered read falls back"
    );
    assert_eq!((out.write_errors, out.read_errors), (0, 0));
    assert_eq!(out.legs[..2], [LegState::InSync; 2]);
    for bytes in region1(&paths) {
        assert!(bytes == new);
    }
}
