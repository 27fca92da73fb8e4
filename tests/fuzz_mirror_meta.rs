//! A structure-aware fuzzer of the mirror's on-disk decoders (issue 11, section 2): the
//! mirror superblock (alone, through `probe`, and in a whole assembly with its dirty log),
//! the dirty log (`DirtyLog::open`) and the region bitmap (`RegionBitmap::from_le_bytes`).
//!
//! Each case starts from a valid image made by the real encoders (a mirror created on
//! in-memory legs, a dirty log created and committed), mutates chosen fields (each value
//! drawn from: the valid one, boundaries such as 0, 1, `u64::MAX`, 2^61-1, 2^62, values
//! near the device size or near the valid value, random), and then re-seals the crc, so
//! that what is tested is every check behind the checksum. The real decode path then runs on
//! in-memory devices of random sizes, each behind a wrapper that records any request outside
//! the device (or, for the dirty log, outside its area). A case passes when the result is
//! `Ok` with values consistent with the devices (and a working device or log), or an error
//! of an expected kind (`Corrupt`; `NotFound` and `InvalidArgument` where that is the
//! documented outcome: no leg is a current in-sync copy, a device too small to be a leg, an
//! area the caller gave past the device) whose message is one line. A panic fails the case,
//! and proptest prints the smallest failing input it finds.
//!
//! `UBLKDM_FUZZ_CASES=n` sets the cases per decoder (default [`DEFAULT_CASES`], about a
//! minute in all in a debug build on a 2-core machine), `UBLKDM_FUZZ_SEED=n` replays a run.
//! Each decoder prints `FUZZ: NAME cases=N ... seed=S secs=T` straight to stderr (not through
//! the test harness's capture), so the count run shows in the CI log of `cargo test`.
//!
//! The first tests are regressions: defects the fuzzer's checks found, each failing before
//! its fix.

mod common;

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{
    AlignedBuf, BlockDevice, DeviceRef, IoFuture, MemDevice, ReadDone, WriteFlags,
};
use ublkdm::error::{Error, ErrorKind};
use ublkdm::format::crc;
use ublkdm::region::{
    image_sectors, DirtyLog, RegionBitmap, RegionCount, RegionGeometry, RegionIndex,
    MAX_REGION_COUNT,
};
use ublkdm::target::Target;
use ublkdm::targets::mirror::{
    probe, CreateOptions, GivenLeg, Layout, LegSet, LegState, MirrorEnv, MirrorTarget, Probe,
    Superblock, Tuning, MAX_LEGS,
};
use ublkdm::units::{Extent, Sector, SectorCount, SECTOR_BYTES};
use uuid::Uuid;

use ublkdm::device::{Forward, Forwarding};

/// Cases per decoder when `UBLKDM_FUZZ_CASES` is not set.
const DEFAULT_CASES: u32 = 2000;
/// Where every crc field of ours sits (the mirror superblock's and the dirty log's).
const CRC_AT: usize = 12;
/// The template mirror's legs, and its region size.
const LEG: SectorCount = SectorCount(8192);
const REGION: SectorCount = SectorCount(64);
/// The dirty log's area on a leg (`superblock.rs`).
const LOG_START: Sector = Sector(16);
/// The largest device a case makes (in-memory: kept small).
const MAX_DEV: u64 = 3 * LEG.0;
const SLOT_BYTES: usize = 4096;

// -------------------------------------------------------------------------------------------
// Devices that record requests outside where they are allowed.

/// A device that forwards everything and records each request outside `allowed`.
struct Bounded {
    inner: DeviceRef,
    allowed: Extent,
    outside: Mutex<Vec<String>>,
}

impl Bounded {
    fn new(inner: DeviceRef, allowed: Extent) -> Arc<Forwarding<Bounded>> {
        Arc::new(Forwarding(Bounded {
            inner,
            allowed,
            outside: Mutex::new(Vec::new()),
        }))
    }

    fn check(&self, op: &str, extent: Extent) {
        let inside = extent.start >= self.allowed.start
            && extent.start.0.checked_add(extent.len.0).is_some()
            && extent.end() <= self.allowed.end();
        if !inside {
            let name = &self.inner.info().name;
            let line = format!("{op} {extent} outside {} of {name}", self.allowed);
            self.outside.lock().expect("outside").push(line);
        }
    }

    fn outside(&self) -> Vec<String> {
        self.outside.lock().expect("outside").clone()
    }
}

impl Forward for Bounded {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        self.check("read", Extent::new(offset, buf.sectors()));
        self.inner.read(offset, buf)
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        self.check("write", Extent::new(offset, buf.sectors()));
        self.inner.write(offset, buf, flags)
    }

    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.check("discard", extent);
        self.inner.discard(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.check("write-zeroes", extent);
        self.inner.write_zeroes(extent)
    }
}

// -------------------------------------------------------------------------------------------
// Running a decoder's cases and reporting the count.

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name} is a number")),
    )
}

fn cases() -> u32 {
    env_u64("UBLKDM_FUZZ_CASES").map_or(DEFAULT_CASES, |n| {
        u32::try_from(n).expect("UBLKDM_FUZZ_CASES fits in u32")
    })
}

/// The run's seed: `UBLKDM_FUZZ_SEED`, else the clock (printed, so that a run replays).
fn base_seed() -> u64 {
    env_u64("UBLKDM_FUZZ_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(1, |d| d.as_nanos() as u64)
    })
}

/// What a case ended as, for the counts printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Decoded (or assembled) and checked.
    Ok,
    /// Refused with one of the expected error kinds (or a damaged or foreign probe).
    Refused,
}

/// Runs `cases()` cases of `strategy` through `check`, then prints the `FUZZ:` line.
fn fuzz<S: Strategy>(
    name: &str,
    salt: u64,
    strategy: S,
    check: impl Fn(S::Value) -> Result<Outcome, TestCaseError>,
) {
    let cases = cases();
    let seed = base_seed();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&salt.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let counts = RefCell::new((0u64, 0u64));
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        let outcome = check(value)?;
        let mut c = counts.borrow_mut();
        match outcome {
            Outcome::Ok => c.0 += 1,
            Outcome::Refused => c.1 += 1,
        }
        Ok(())
    });
    let (ok, refused) = *counts.borrow();
    let line = format!(
        "FUZZ: {name} cases={} ok={ok} refused={refused} seed={seed} secs={:.1}{}\n",
        ok + refused,
        started.elapsed().as_secs_f64(),
        if result.is_ok() { "" } else { " FAILED" }
    );
    // Straight to the process's stderr: the harness captures only the print macros.
    std::io::stderr()
        .write_all(line.as_bytes())
        .expect("stderr");
    if let Err(err) = result {
        panic!("{name}: {err} (replay with UBLKDM_FUZZ_SEED={seed})");
    }
    assert!(
        ok + refused >= u64::from(cases),
        "{name}: {ok} + {refused} cases run"
    );
}

/// Checks a refusal: an expected kind and a message of one line.
fn refused(err: &Error, kinds: &[ErrorKind]) -> Result<Outcome, TestCaseError> {
    prop_assert!(
        kinds.contains(&err.kind()),
        "unexpected {:?}: {}",
        err.kind(),
        err.chain().join(": ")
    );
    for line in err.chain() {
        prop_assert!(!line.contains('\n'), "a message of several lines: {line:?}");
    }
    Ok(Outcome::Refused)
}

// -------------------------------------------------------------------------------------------
// Field values.

/// A value for a field read from disk, resolved against its valid value and a device size.
#[derive(Clone, Debug)]
enum Val {
    Valid,
    Const(u64),
    /// The device size plus this.
    DevRel(i64),
    /// The valid value plus this.
    ValidRel(i64),
    Double,
    Half,
    Random(u64),
}

impl Val {
    fn resolve(&self, valid: u64, dev: u64) -> u64 {
        match *self {
            Val::Valid => valid,
            Val::Const(c) => c,
            Val::DevRel(d) => dev.wrapping_add_signed(d),
            Val::ValidRel(d) => valid.wrapping_add_signed(d),
            Val::Double => valid.wrapping_mul(2),
            Val::Half => valid / 2,
            Val::Random(r) => r,
        }
    }
}

fn val() -> impl Strategy<Value = Val> {
    let boundary = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / SECTOR_BYTES),
        Just(u64::MAX / SECTOR_BYTES + 1),
        Just((1 << 61) - 1),
        Just(1 << 61),
        Just(1 << 62),
        Just((1 << 62) + 1),
        Just(u64::from(u32::MAX)),
        Just(MAX_REGION_COUNT.0),
        Just(MAX_REGION_COUNT.0 + 1),
        (0u32..64).prop_map(|s| 1u64 << s),
    ];
    let delta = prop_oneof![
        -16i64..=16,
        (-16i64..=16).prop_map(|d| d * 8),
        (-4i64..=4).prop_map(|d| d * 2048)
    ];
    prop_oneof![
        3 => Just(Val::Valid),
        4 => boundary.prop_map(Val::Const),
        2 => delta.clone().prop_map(Val::DevRel),
        3 => delta.prop_map(Val::ValidRel),
        1 => Just(Val::Double),
        1 => Just(Val::Half),
        2 => any::<u64>().prop_map(Val::Random),
    ]
}

fn get(bytes: &[u8], at: usize, width: usize) -> u64 {
    let mut word = [0u8; 8];
    word[..width].copy_from_slice(&bytes[at..at + width]);
    u64::from_le_bytes(word)
}

fn put(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
}

// -------------------------------------------------------------------------------------------
// The mirror template: a mirror made by the real code, whose legs' metadata every case
// starts from.

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(16),
        memory_budget_bytes: 8 * 16 * 512,
        ..CopyConfig::default()
    }
}

/// Opens (assembles) the mirror on `legs` with a local engine, runs `body` on it, stops it.
fn with_assembled<T: 'static, F>(
    legs: Vec<DeviceRef>,
    body: impl FnOnce(Arc<MirrorTarget>) -> F + 'static,
) -> Result<T, Error>
where
    F: std::future::Future<Output = T> + 'static,
{
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let env = MirrorEnv {
            engine,
            tuning: Tuning::default(),
        };
        let target = match MirrorTarget::assemble(legs, env).await {
            Ok(t) => Arc::new(t),
            Err(err) => {
                runner.await;
                return Err(err);
            }
        };
        let driver = spawn(target.resync_task());
        let out = body(Arc::clone(&target)).await;
        target.stop();
        driver.await;
        drop(target);
        runner.await;
        Ok(out)
    })
}

/// The metadata areas (sector 0 to the data offset) of the two legs of a mirror made by the
/// real code, with a few regions dirty, and its layout.
struct Template {
    meta: Vec<Vec<u8>>,
    layout: Layout,
}

fn template() -> Template {
    let legs: Vec<Arc<MemDevice>> = (0..2)
        .map(|i| MemDevice::new(&format!("leg{i}"), LEG))
        .collect();
    let devs: Vec<DeviceRef> = legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect();
    let layout = run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let env = MirrorEnv {
            engine,
            tuning: Tuning::default(),
        };
        let options = CreateOptions {
            region_size: Some(REGION),
            nosync: true,
            force: false,
        };
        let target = MirrorTarget::create(devs, &options, env)
            .await
            .expect("template mirror");
        for at in [0u64, 640, 4096] {
            let buf = Arc::new(AlignedBuf::for_sectors(SectorCount(8)));
            target
                .write(Sector(at), buf, WriteFlags::default())
                .await
                .expect("write");
        }
        let layout = target.layout();
        target.stop();
        drop(target);
        runner.await;
        layout
    });
    // Assembled once more, so that both superblock slots hold a valid superblock.
    let devs: Vec<DeviceRef> = legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect();
    with_assembled(devs, |_| async {}).expect("the template assembles");
    let len = layout.data_offset - Sector(0);
    let meta = legs
        .iter()
        .map(|l| l.snapshot(Extent::new(Sector(0), len)))
        .collect();
    Template { meta, layout }
}

// -------------------------------------------------------------------------------------------
// Mutations of a mirror superblock slot.

/// The fields of a superblock slot: (name, byte offset, width).
const SB_FIELDS: &[(&str, usize, usize)] = &[
    ("version", 8, 4),
    ("mirror uuid", 16, 8),
    ("slot", 32, 4),
    ("zero", 36, 4),
    ("events", 40, 8),
    ("events_cleared", 48, 8),
    ("region size", 56, 8),
    ("data offset", 64, 8),
    ("data size", 72, 8),
    ("log start", 80, 8),
    ("log length", 88, 8),
    ("reserved", 96, 8),
];

/// A field of the slot table: (offset in the entry, width).
const ENTRY_FIELDS: &[(usize, usize)] = &[(0, 1), (1, 7), (8, 8), (24, 8), (32, 8)];

#[derive(Clone, Debug)]
enum SbField {
    Header(usize),
    Entry(usize, usize),
}

impl SbField {
    fn at(&self) -> (usize, usize) {
        match *self {
            SbField::Header(i) => (SB_FIELDS[i].1, SB_FIELDS[i].2),
            SbField::Entry(slot, i) => (128 + 48 * slot + ENTRY_FIELDS[i].0, ENTRY_FIELDS[i].1),
        }
    }
}

fn sb_field() -> impl Strategy<Value = SbField> {
    prop_oneof![
        3 => (0..SB_FIELDS.len()).prop_map(SbField::Header),
        1 => (0..MAX_LEGS, 0..ENTRY_FIELDS.len()).prop_map(|(s, i)| SbField::Entry(s, i)),
    ]
}

/// Sets `fields` of the 4 KiB slot `image` (resolved against `dev` sectors) and re-seals it.
fn mutate_slot(image: &mut [u8], fields: &[(SbField, Val)], dev: u64) {
    for (field, value) in fields {
        let (at, width) = field.at();
        let valid = get(image, at, width);
        put(image, at, width, value.resolve(valid, dev));
    }
    crc::seal(image, CRC_AT);
}

/// What a decoded superblock must satisfy, whatever the bytes were.
fn check_superblock(sb: &Superblock) -> Result<(), TestCaseError> {
    prop_assert!(sb.slot < MAX_LEGS);
    prop_assert!(sb.own().state != LegState::Empty);
    prop_assert!(sb.events <= 1 << 62 && sb.events_cleared <= sb.events);
    prop_assert!(sb.events.checked_add(2).is_some());
    check_layout(&sb.layout)?;
    for entry in &sb.table {
        prop_assert!(entry.leg_size.0 <= u64::MAX / SECTOR_BYTES);
        if entry.state != LegState::Empty {
            prop_assert!(entry.leg_size >= sb.layout.leg_sectors());
        }
    }
    let round = Superblock::decode(sb.encode().as_slice());
    prop_assert_eq!(round.as_ref(), Ok(sb));
    Ok(())
}

/// What a decoded layout must satisfy: the one `Layout::compute` could make.
fn check_layout(l: &Layout) -> Result<(), TestCaseError> {
    prop_assert_eq!(l.log_area.start, LOG_START);
    prop_assert_eq!(l.log_area.len.0 % 8, 0);
    prop_assert!(l.log_area.end() <= l.data_offset);
    prop_assert_eq!(l.data_offset.0 % 2048, 0);
    prop_assert!(!l.data_size.is_zero() && l.data_size.0 % 8 == 0);
    let end = l.data_offset.0.checked_add(l.data_size.0);
    prop_assert!(end.is_some_and(|e| e <= u64::MAX / SECTOR_BYTES));
    let geometry = RegionGeometry::new(l.data_size, l.region_size);
    prop_assert!(geometry.is_ok(), "{:?}", geometry);
    let count = geometry.expect("checked").count();
    prop_assert!(count <= MAX_REGION_COUNT);
    prop_assert!(DirtyLog::area_sectors(count) <= l.log_area.len);
    Ok(())
}

/// A device size for a case: near the template's legs, small, or random.
fn dev_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(LEG.0),
        2 => LEG.0 - 64..=LEG.0 + 64,
        2 => LEG.0..=MAX_DEV,
        1 => 1u64..=2100,
        1 => 1u64..=MAX_DEV,
    ]
}

/// A MemDevice of `size` sectors holding as much of `meta` as fits, behind a `Bounded`.
fn leg_device(name: &str, case: &LegCase, meta: &[u8]) -> Arc<Forwarding<Bounded>> {
    let size = case.size;
    let block = if case.block_4k { 4096 } else { 512 };
    let mem = MemDevice::with_geometry(name, SectorCount(size), block, false);
    let room = usize::try_from(size * SECTOR_BYTES).expect("small device");
    mem.poke(Sector(0), &meta[..meta.len().min(room)]);
    let whole = Extent::new(Sector(0), SectorCount(size));
    Bounded::new(mem, whole)
}

// -------------------------------------------------------------------------------------------
// Mutations of a dirty log image.

/// The header fields of a dirty log image: (byte offset, width).
const LOG_FIELDS: &[(usize, usize)] = &[
    (0, 8),  // magic
    (8, 4),  // version
    (16, 8), // uuid
    (32, 8), // sequence
    (40, 8), // events
    (48, 8), // device size
    (56, 8), // region size
    (64, 8), // region count
    (72, 8), // area length
    (80, 8), // reserved
];

#[derive(Clone, Debug)]
enum LogField {
    Header(usize),
    /// A bitmap byte: a fraction of the bitmap's length in 1/256 (256: its last byte).
    Bitmap(u16),
}

fn log_field() -> impl Strategy<Value = LogField> {
    prop_oneof![
        3 => (0..LOG_FIELDS.len()).prop_map(LogField::Header),
        1 => (0u16..=256).prop_map(LogField::Bitmap),
    ]
}

/// Sets `fields` of the image at `at` of `dev` (an area of `half` sectors per slot), then
/// re-seals it over the length a decoder would read (`reseal`).
fn mutate_log_slot(
    dev: &MemDevice,
    at: Sector,
    half: SectorCount,
    fields: &[(LogField, Val)],
    reseal: bool,
) {
    let first = dev.snapshot(Extent::new(at, SectorCount(8)));
    let count = RegionCount(get(&first, 64, 8));
    let old_image = if count <= MAX_REGION_COUNT && image_sectors(count) <= half {
        image_sectors(count)
    } else {
        SectorCount(8)
    };
    let mut image = dev.snapshot(Extent::new(at, old_image));
    let size = dev.info().size.0;
    for (field, value) in fields {
        match *field {
            LogField::Header(i) => {
                let (off, width) = LOG_FIELDS[i];
                let valid = get(&image, off, width);
                put(&mut image, off, width, value.resolve(valid, size));
            }
            LogField::Bitmap(frac) => {
                let bitmap = RegionBitmap::byte_len(count.min(MAX_REGION_COUNT));
                let room = image.len() - 512;
                let k = (bitmap.max(1) - 1).min(room - 1) * usize::from(frac) / 256;
                image[512 + k] = value.resolve(u64::from(image[512 + k]), size) as u8;
            }
        }
    }
    // The decoder reads (and sums) the image its header now claims, when that fits.
    let count = RegionCount(get(&image, 64, 8));
    let new_image = if count <= MAX_REGION_COUNT && image_sectors(count) <= half {
        image_sectors(count)
    } else {
        old_image
    };
    let mut whole = dev.snapshot(Extent::new(at, new_image.max(old_image)));
    whole[..image.len()].copy_from_slice(&image);
    if reseal {
        crc::seal(&mut whole[..new_image.to_usize_bytes()], CRC_AT);
    }
    dev.poke(at, &whole);
}

// -------------------------------------------------------------------------------------------
// Regressions: defects found by reading and by these checks, each failing before its fix.

/// The superblock slots of `leg` decoded, re-encoded after `edit`, and written back to both
/// slots.
fn rewrite_superblocks(leg: &MemDevice, edit: impl Fn(&mut Superblock)) {
    let bytes = leg.snapshot(Extent::new(Sector(0), SectorCount(16)));
    for (i, slot) in bytes.chunks(SLOT_BYTES).enumerate() {
        let Ok(mut sb) = Superblock::decode(slot) else {
            continue;
        };
        edit(&mut sb);
        leg.poke(Sector(8 * i as u64), sb.encode().as_slice());
    }
}

fn template_legs(t: &Template) -> Vec<Arc<MemDevice>> {
    (0..2)
        .map(|i| {
            let mem = MemDevice::new(&format!("leg{i}"), LEG);
            mem.poke(Sector(0), &t.meta[i]);
            mem
        })
        .collect()
}

fn as_devs(legs: &[Arc<MemDevice>]) -> Vec<DeviceRef> {
    legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect()
}

/// Two legs of one mirror whose superblocks disagree on the layout (each valid alone) were
/// assembled, the second leg's data then read at the first one's offsets. The layout is
/// fixed at creation, so one of them is corrupt: refused, naming the field and both legs.
#[test]
fn legs_whose_layouts_differ_are_refused() {
    let t = template();
    let legs = template_legs(&t);
    assert!(
        with_assembled(as_devs(&legs), |_| async {}).is_ok(),
        "the template assembles"
    );
    let other = Layout::compute(LEG, Some(REGION + REGION)).expect("layout");
    assert_eq!(
        t.layout.difference(&other).as_deref(),
        Some("the region size (64 vs 128 sectors)")
    );
    rewrite_superblocks(&legs[1], |sb| sb.layout = other);
    let err = with_assembled(as_devs(&legs), |_| async {}).expect_err("layouts differ");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let line = err.to_string();
    for part in ["region size", "leg0", "leg1"] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert_eq!(err.chain().len(), 1, "{line}");
}

/// Legs whose event counter was at the limit a superblock may carry assembled, and the
/// mirror's next update (one more) wrote superblocks that fail to decode: the next assembly
/// silently took the older slot, whose table may name a leg in sync that was failed since.
/// A mirror is assembled only with room to count on now; what it writes then decodes, so an
/// assembly sees the newest superblock, or refuses with one line naming the counter.
#[test]
fn legs_whose_counter_has_no_room_are_refused() {
    let t = template();
    for value in [(1 << 61) - 1, 1 << 61, 1 << 62] {
        let legs = template_legs(&t);
        for leg in &legs {
            rewrite_superblocks(leg, |sb| sb.events = value);
        }
        let mut last = None;
        for round in 0..3 {
            let status = with_assembled(as_devs(&legs), |t| async move { t.status() });
            match status {
                Ok(status) => {
                    let events = status["events"].as_u64().expect("events");
                    if let Some(before) = last {
                        assert!(
                            events > before,
                            "{value} round {round}: an older superblock"
                        );
                    }
                    last = Some(events);
                }
                Err(err) => {
                    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
                    assert!(err.to_string().contains("event counter"), "{err}");
                    assert_eq!(err.chain().len(), 1, "{err}");
                    // Refused at once only beyond the limit; below it, once the mirror's
                    // own updates passed it.
                    assert!(value > 1 << 61 || round > 0, "{value} round {round}: {err}");
                    break;
                }
            }
        }
    }
}

/// Legs whose superblocks are all damaged (an impossible field behind a valid checksum)
/// were refused as "no leg carries a mirror superblock" (not found, exit 3): now corrupt
/// metadata (exit 7) naming the field; with a leg merely missing, still not found.
#[test]
fn legs_with_damaged_superblocks_are_corrupt_not_missing() {
    let t = template();
    let legs = template_legs(&t);
    for leg in &legs {
        for slot in [Sector(0), Sector(8)] {
            let mut image = leg.snapshot(Extent::new(slot, SectorCount(8)));
            mutate_slot(&mut image, &[(SbField::Header(6), Val::Const(3))], LEG.0);
            leg.poke(slot, &image);
        }
    }
    let err = with_assembled(as_devs(&legs), |_| async {}).expect_err("damaged");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("region size"), "{err}");
    assert_eq!(err.chain().len(), 1, "{err}");
    // Only one leg given, the other missing: not found, since the missing one may be whole.
    let set = LegSet {
        legs: vec![
            GivenLeg::Opened(Arc::clone(&legs[0]) as DeviceRef),
            GivenLeg::Unopened {
                path: "/dev/gone".into(),
                error: Error::new(ErrorKind::NotFound, "cannot open /dev/gone"),
            },
        ],
        uuid: None,
    };
    let err = run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let env = MirrorEnv {
            engine,
            tuning: Tuning::default(),
        };
        let res = MirrorTarget::assemble_set(set, env).await.map(|_| ());
        runner.await;
        res.expect_err("damaged and missing")
    });
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A dirty log of another mirror was refused as "another mirror or geometry": now the
/// message names the field.
#[test]
fn a_dirty_log_of_another_mirror_is_refused_naming_the_field() {
    let t = template();
    let legs = template_legs(&t);
    let half = t.layout.log_area.len.0 / 2 / 8 * 8;
    for leg in &legs {
        for at in [LOG_START, LOG_START + SectorCount(half)] {
            let fields = [(LogField::Header(2), Val::Const(0x5eed))];
            mutate_log_slot(leg, at, SectorCount(half), &fields, true);
        }
    }
    let err = with_assembled(as_devs(&legs), |_| async {}).expect_err("another log");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("UUID"), "{err}");
}

// -------------------------------------------------------------------------------------------
// The fuzzers.

/// One leg's edits: its size, and the fields set in each superblock slot and log slot.
#[derive(Clone, Debug)]
struct LegCase {
    /// Sectors; a whole number of blocks.
    size: u64,
    /// Logical blocks of 4 KiB (else 512 bytes).
    block_4k: bool,
    sb: [Vec<(SbField, Val)>; 2],
    log: [Vec<(LogField, Val)>; 2],
    reseal_log: bool,
}

fn leg_case(log_edits: bool) -> impl Strategy<Value = LegCase> {
    let sb_edits = || proptest::collection::vec((sb_field(), val()), 0..4);
    let log_max = if log_edits { 3 } else { 0 };
    let log = move || proptest::collection::vec((log_field(), val()), 0..=log_max);
    (
        dev_size(),
        sb_edits(),
        sb_edits(),
        log(),
        log(),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(size, a, b, la, lb, reseal_log, block_4k)| LegCase {
            size: if block_4k { size.max(8) / 8 * 8 } else { size },
            block_4k,
            sb: [a, b],
            log: [la, lb],
            reseal_log,
        })
}

/// The template's metadata of leg `i` with `case`'s edits.
fn edited_meta(t: &Template, i: usize, case: &LegCase) -> Vec<u8> {
    let mut meta = t.meta[i].clone();
    for (slot, fields) in case.sb.iter().enumerate() {
        if !fields.is_empty() {
            let image = &mut meta[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES];
            mutate_slot(image, fields, case.size);
        }
    }
    if case.log.iter().any(|f| !f.is_empty()) {
        let sectors = SectorCount((meta.len() / 512) as u64);
        let scratch = MemDevice::new("scratch", sectors);
        scratch.poke(Sector(0), &meta);
        let half = SectorCount(t.layout.log_area.len.0 / 2 / 8 * 8);
        for (slot, fields) in case.log.iter().enumerate() {
            if !fields.is_empty() {
                let at = LOG_START + SectorCount(half.0 * slot as u64);
                mutate_log_slot(&scratch, at, half, fields, case.reseal_log);
            }
        }
        meta = scratch.contents();
    }
    meta
}

/// The mirror superblock through `probe` on one device: `Ours` with a superblock that
/// keeps every invariant, `Damaged` (refused as Corrupt, one line), `Blank`/`Foreign` when
/// the magic was changed, or an error only for a device too small to be a leg.
#[test]
fn fuzz_mirror_superblock_probe() {
    let t = template();
    fuzz("mirror-superblock", 1, leg_case(false), |case| {
        let meta = edited_meta(&t, 0, &case);
        let dev = leg_device("leg0", &case, &meta);
        let d: DeviceRef = dev.clone();
        let probed = run_local(async move { probe(&d).await });
        prop_assert!(dev.outside().is_empty(), "{:?}", dev.outside());
        match probed {
            Ok(Probe::Ours(sb)) => {
                check_superblock(&sb)?;
                Ok(Outcome::Ok)
            }
            Ok(Probe::Damaged(why)) => {
                prop_assert!(!why.contains('\n'), "{why}");
                Ok(Outcome::Refused)
            }
            Ok(Probe::Blank | Probe::Foreign(_)) => Ok(Outcome::Refused),
            Err(err) => {
                prop_assert!(case.size < 16, "only a tiny device is an error: {err}");
                refused(&err, &[ErrorKind::InvalidArgument])
            }
        }
    });
}

/// Whole assemblies: both legs' superblocks and dirty logs edited, legs of random sizes.
/// `Ok`: the layout keeps every invariant, every leg that runs holds the layout, no request
/// left a device, and the mirror's last block writes and reads back. Errors: `Corrupt`, or
/// `NotFound` (no current in-sync leg: a damaged or too small leg is left out) or
/// `InvalidArgument` (legs claiming one slot, or of two mirrors), one line each.
#[test]
fn fuzz_mirror_assembly() {
    let t = template();
    // Two legs, and sometimes a third device holding a copy of either one's metadata (a
    // cloned disk, or an older copy of a leg), each with its own edits.
    let third = prop::option::weighted(0.25, (0usize..2, leg_case(true)));
    let strategy = (leg_case(true), leg_case(true), third);
    fuzz("mirror-assembly", 2, strategy, |(a, b, third)| {
        let mut cases = vec![(0, a), (1, b)];
        cases.extend(third);
        let legs: Vec<Arc<Forwarding<Bounded>>> = cases
            .iter()
            .enumerate()
            .map(|(i, (from, case))| {
                leg_device(&format!("leg{i}"), case, &edited_meta(&t, *from, case))
            })
            .collect();
        let cases: Vec<LegCase> = cases.into_iter().map(|(_, case)| case).collect();
        let devs: Vec<DeviceRef> = legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect();
        let assembled = with_assembled(devs, |target| async move {
            let layout = target.layout();
            let status = target.status();
            let size = target.info().size;
            let last = Sector(size.0 - 8);
            let data = Arc::new(AlignedBuf::from_slice(&[0xa5; 4096]));
            let wrote = target.write(last, data, WriteFlags::FUA).await;
            let (read, buf) = target
                .read(last, AlignedBuf::for_sectors(SectorCount(8)))
                .await;
            let same = buf.as_slice().iter().all(|&b| b == 0xa5);
            (layout, status, size, wrote.is_ok() && read.is_ok() && same)
        });
        for leg in &legs {
            prop_assert!(leg.outside().is_empty(), "{:?}", leg.outside());
        }
        let (layout, status, size, io_ok) = match assembled {
            Ok(out) => out,
            Err(err) => {
                let kinds = [
                    ErrorKind::Corrupt,
                    ErrorKind::NotFound,
                    ErrorKind::InvalidArgument,
                ];
                return refused(&err, &kinds);
            }
        };
        prop_assert!(
            io_ok,
            "the last block of the mirror does not write and read back"
        );
        prop_assert_eq!(size, layout.data_size);
        check_layout(&layout)?;
        check_running_legs(&status, &cases, &layout)?;
        check_reassembles(&legs, &status)?;
        Ok(Outcome::Ok)
    });
}

/// Every leg that runs (in sync or recovering) holds the layout.
fn check_running_legs(
    status: &serde_json::Value,
    cases: &[LegCase],
    layout: &Layout,
) -> Result<(), TestCaseError> {
    for leg in status["legs"].as_array().expect("legs") {
        let state = leg["state"].as_str().unwrap_or_default();
        if state == "in-sync" || state == "recovering" {
            let name = leg["device"].as_str().unwrap_or_default();
            let i: usize = name.trim_start_matches("leg").parse().unwrap_or(usize::MAX);
            prop_assert!(i < cases.len(), "{name}");
            prop_assert!(
                cases[i].size >= layout.leg_sectors().0,
                "{name} is too small"
            );
        }
    }
    Ok(())
}

/// What the mirror wrote assembles again, from the newest superblock (its counter went
/// up), or is refused whole when the counter has no room left; no request leaves a device.
fn check_reassembles(
    legs: &[Arc<Forwarding<Bounded>>],
    status: &serde_json::Value,
) -> Result<(), TestCaseError> {
    let devs: Vec<DeviceRef> = legs.iter().map(|l| Arc::clone(l) as DeviceRef).collect();
    let events = status["events"].as_u64().expect("events");
    match with_assembled(devs, |t| async move { t.status() }) {
        Ok(again) => {
            let later = again["events"].as_u64().expect("events");
            prop_assert!(later > events, "an older superblock: {later} <= {events}");
        }
        Err(err) => {
            prop_assert!(err.to_string().contains("any mirror reaches"), "{}", err);
            refused(&err, &[ErrorKind::Corrupt])?;
        }
    }
    for leg in legs {
        prop_assert!(leg.outside().is_empty(), "{:?}", leg.outside());
    }
    Ok(())
}

/// One dirty log case: its geometry and area, the device around it, the history written,
/// then the fields set in each slot.
#[derive(Clone, Debug)]
struct LogCase {
    region_shift: u32,
    count: u64,
    /// The last region's length, as a fraction of the region size in 1/256 (at least 1).
    tail: u16,
    area_start_blocks: u64,
    area_extra: u64,
    /// Sectors of device after the area; `None`: the device ends 8 sectors inside it (the
    /// caller's area past the device: an invalid argument, not corrupt metadata).
    slack: Option<u64>,
    marks: Vec<u16>,
    bumps: u8,
    edits: [Vec<(LogField, Val)>; 2],
    reseal: bool,
}

fn log_case() -> impl Strategy<Value = LogCase> {
    let count = prop_oneof![3 => 1u64..=64, 2 => 1u64..=5000, 1 => 1u64..=40_000];
    let extra = prop_oneof![3 => Just(0u64), 2 => (0u64..=4).prop_map(|b| 8 * b), 1 => 0u64..=31];
    let slack = prop_oneof![19 => (0u64..=64).prop_map(Some), 1 => Just(None)];
    let edits = || proptest::collection::vec((log_field(), val()), 0..4);
    (
        (0u32..=24, count, 1u16..=256, 0u64..=3, extra, slack),
        (proptest::collection::vec(any::<u16>(), 0..6), 0u8..3),
        (edits(), edits(), prop::bool::weighted(0.9)),
    )
        .prop_map(
            |(
                (region_shift, count, tail, area_start_blocks, area_extra, slack),
                (marks, bumps),
                (a, b, reseal),
            )| LogCase {
                region_shift,
                count,
                tail,
                area_start_blocks,
                area_extra,
                slack,
                marks,
                bumps,
                edits: [a, b],
                reseal,
            },
        )
}

impl LogCase {
    fn geometry(&self) -> RegionGeometry {
        let region = 8u64 << self.region_shift;
        let last = (region * u64::from(self.tail) / 256).max(1);
        let last = if self.count == 1 { region } else { last };
        let size = (self.count - 1) * region + last;
        RegionGeometry::new(SectorCount(size), SectorCount(region)).expect("a valid geometry")
    }

    fn area(&self) -> Extent {
        let len = DirtyLog::area_sectors(self.geometry().count()) + SectorCount(self.area_extra);
        Extent::new(Sector(8 * self.area_start_blocks), len)
    }
}

/// The dirty log: a log created and committed by the real code, its slots' fields edited
/// and re-sealed, then `DirtyLog::open` over its area. `Ok`: a geometry within bounds whose
/// bitmap fits the area, bits of its length, and a log that marks, bumps and clears, and
/// reopens with what it wrote; no request outside the area. Errors: `Corrupt` (one line), or
/// `InvalidArgument` only for the caller's area past the device.
#[test]
fn fuzz_dirty_log_open() {
    fuzz("dirty-log", 3, log_case(), |case| {
        let geometry = case.geometry();
        let area = case.area();
        let size = match case.slack {
            Some(slack) => area.end().0 + slack,
            None => area.end().0 - 8,
        };
        let mem = MemDevice::new("log", SectorCount(size));
        let creator = Arc::clone(&mem) as DeviceRef;
        let count = geometry.count().0;
        let marks: Vec<RegionIndex> = case
            .marks
            .iter()
            .map(|&m| RegionIndex(u64::from(m) % count))
            .collect();
        let bumps = case.bumps;
        let created = run_local(async move {
            let log = DirtyLog::create(creator, area, geometry, Uuid::from_u128(7)).await?;
            log.mark(&marks).await.expect("mark");
            for _ in 0..bumps {
                log.bump_event().await.expect("bump");
            }
            Ok::<_, Error>(())
        });
        if case.slack.is_none() {
            let err = created.expect_err("an area past the device");
            return refused(&err, &[ErrorKind::InvalidArgument]);
        }
        created.expect("a new log");
        let half = SectorCount(area.len.0 / 2 / 8 * 8);
        for (slot, fields) in case.edits.iter().enumerate() {
            if !fields.is_empty() || !case.reseal {
                let at = area.start + SectorCount(half.0 * slot as u64);
                mutate_log_slot(&mem, at, half, fields, case.reseal);
            }
        }
        let dev = Bounded::new(Arc::clone(&mem) as DeviceRef, area);
        let d: DeviceRef = dev.clone();
        let opened = run_local(async move { DirtyLog::open(d, area).await });
        prop_assert!(dev.outside().is_empty(), "{:?}", dev.outside());
        let (log, bits) = match opened {
            Ok(opened) => opened,
            Err(err) => return refused(&err, &[ErrorKind::Corrupt]),
        };
        let g = *log.geometry();
        prop_assert!(g.count() <= MAX_REGION_COUNT);
        prop_assert_eq!(bits.len(), g.count());
        prop_assert!(DirtyLog::area_sectors(g.count()) <= area.len);
        prop_assert_eq!(log.area(), area);
        let last = RegionIndex(g.count().0 - 1);
        let events = log.events();
        prop_assert!(events.checked_add(2).is_some());
        let worked = run_local(async move {
            log.mark(&[RegionIndex(0), last]).await?;
            log.bump_event().await?;
            log.clear(&[RegionIndex(0)]);
            log.commit_clears(async { Ok(()) }).await?;
            Ok::<_, std::io::Error>(log.uuid())
        });
        prop_assert!(worked.is_ok(), "{:?}", worked);
        let d: DeviceRef = dev.clone();
        let again = run_local(async move { DirtyLog::open(d, area).await });
        prop_assert!(dev.outside().is_empty(), "{:?}", dev.outside());
        let (log2, bits2) = match again {
            Ok(again) => again,
            // A log opened near its counters' limit: what it wrote is refused as a whole,
            // never passed over for an older image.
            Err(err) if err.to_string().contains("any log reaches") => {
                return refused(&err, &[ErrorKind::Corrupt]);
            }
            Err(err) => return Err(TestCaseError::fail(err.to_string())),
        };
        prop_assert_eq!(log2.uuid(), worked.expect("checked"));
        prop_assert_eq!(*log2.geometry(), g);
        prop_assert_eq!(log2.events(), events + 1);
        prop_assert!(!bits2.get(RegionIndex(0)), "region 0 was cleared");
        prop_assert!(last.0 == 0 || bits2.get(last), "the last region was marked");
        Ok(Outcome::Ok)
    });
}

/// The region bitmap's on-disk form: random counts and bytes (bits past the count set or
/// not). `Some` exactly when no bit past the count is set, and then it round-trips.
#[test]
fn fuzz_region_bitmap_decode() {
    let strategy = (
        1u64..=70_000,
        proptest::collection::vec((any::<u16>(), any::<u8>()), 0..16),
        any::<u8>(),
    );
    fuzz("region-bitmap", 4, strategy, |(count, edits, tail)| {
        let count = RegionCount(count);
        let len = RegionBitmap::byte_len(count);
        let mut bytes = vec![0u8; len];
        for (at, value) in edits {
            bytes[usize::from(at) % len] = value;
        }
        bytes[len - 1] |= tail;
        let used = count.0 % 8;
        let stray = used != 0 && bytes[len - 1] >> used != 0;
        match RegionBitmap::from_le_bytes(count, &bytes) {
            Some(bits) => {
                prop_assert!(!stray);
                prop_assert_eq!(bits.len(), count);
                let ones: u32 = bytes.iter().map(|b| b.count_ones()).sum();
                prop_assert_eq!(bits.count_ones().0, u64::from(ones));
                let mut back = vec![0u8; len];
                bits.write_le_bytes(&mut back);
                prop_assert_eq!(back, bytes);
                Ok(Outcome::Ok)
            }
            None => {
                prop_assert!(stray);
                Ok(Outcome::Refused)
            }
        }
    });
}
