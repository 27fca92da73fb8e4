//! A structure-aware fuzzer of the snapshot COW store's metadata (issue 11, section 2), on the
//! stable toolchain: proptest strategies build whole COW store images, mutate them, seal every
//! checksum again, and open them through the real open path.
//!
//! A case starts from a real store: a group created on `MemDevice`s with a random origin size
//! (often not a whole number of chunks), chunk size and COW size, given random snapshots,
//! origin and snapshot writes, deletions and merges over one or two sessions (a second
//! session compacts, so both superblock slots and a checkpoint are in play). Then:
//! - `snapshot-superblock`: one to three superblock fields of the newest, the other or both
//!   slots (sequence, chunk size, origin size, COW size, `area_blocks`, `data_start`,
//!   `data_chunks`, active area, epoch, a UUID byte, the version) set to boundary values (0,
//!   1, u64::MAX, 2^61-1, 2^63, powers of two), to values relative to the field, the COW
//!   device or the origin, or to random ones; each slot sealed again;
//! - `snapshot-log`: the active log's records (parsed from the image) with hostile records
//!   injected anywhere (out-of-range COW chunks, origin chunks and slots, a COW chunk mapped
//!   twice, masks naming empty slots, origin copies out of order or for creation numbers
//!   at their maximum, snapshot images and merged marks for empty or unmerging slots, names with a NUL, a control character, too long, empty,
//!   not UTF-8 or taken, creation numbers at their maximum, unknown types, states and
//!   reasons, records for empty slots, a record cut short), some records dropped or doubled,
//!   and some block's `used` length changed; packed again into blocks of the superblock's
//!   UUID and epoch numbered from 0, each sealed.
//!
//! Every case opens the image through `SnapshotGroup::open` with the COW device behind a fence
//! that fails the test on any request outside the device, and asserts: either the open
//! succeeds and the state is consistent (`check_invariants`; every snapshot reads, the origin
//! takes a write, a snapshot can be created, `check_invariants` again, and the store this
//! leaves reopens), or it fails with `Corrupt` (`Unsupported` for a changed version, invalid
//! argument for a changed origin size) in one line. A panic anywhere fails the case (proptest
//! then shrinks it and prints it).
//!
//! `UBLKDM_FUZZ_CASES=n` sets the cases per target (default 2000 each: about 6 s each in the
//! dev profile on a 2-core machine); `PROPTEST_RNG_SEED=n` fixes the seed; `UBLKDM_FUZZ_TRACE=1` prints each refusal. Each target prints `FUZZ: NAME cases=N
//! opened=A refused=B` to the test's stdout (past the harness's capture, so CI logs show it).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use ublkdm::copy::{CopyConfig, CopyEngine};
use ublkdm::device::reactor::{run_local, spawn};
use ublkdm::device::{
    AlignedBuf, BlockDevice, DeviceRef, IoFuture, MemDevice, ReadDone, WriteFlags,
};
use ublkdm::error::{ErrorKind, Result};
use ublkdm::format::{crc, magic};
use ublkdm::target::Target;
use ublkdm::targets::snapshot::{GroupOptions, SnapshotGroup};
use ublkdm::units::{Extent, Sector, SectorCount};

use ublkdm::device::{Forward, Forwarding};

/// Bytes of a superblock slot and of a log block.
const BLOCK: usize = 4096;
const BLOCK_SECTORS: u64 = 8;
/// Bytes of a log block's header; its records follow.
const LOG_HEADER: usize = 48;
const PAYLOAD: usize = BLOCK - LOG_HEADER;
/// Bytes of the longest record (a format 2 `Create` with a 64-byte name).
const MAX_RECORD: u64 = 86;
/// Snapshot slots of a format 2 store.
const MAX_SLOTS: usize = 1024;
/// Where the crc field of a superblock slot and of a log block is.
const SB_CRC: usize = 12;
const LOG_CRC: usize = 8;
/// The u64 fields of a superblock slot: (offset, name).
const SB_FIELDS: [(usize, &str); 9] = [
    (32, "sequence"),
    (40, "chunk"),
    (48, "origin_size"),
    (56, "cow_size"),
    (64, "area_blocks"),
    (72, "data_start"),
    (80, "data_chunks"),
    (88, "active_area"),
    (96, "epoch"),
];
const SB_VERSION: usize = 8;
const SB_UUID: usize = 16;

fn cases() -> u32 {
    std::env::var("UBLKDM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u64(b: &mut [u8], at: usize, value: u64) {
    b[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// The base store: a real one, built by the target itself.

/// How to build a base store.
#[derive(Clone, Debug)]
struct BaseSpec {
    origin_sectors: u64,
    chunk: u64,
    /// COW data chunks asked for (the COW size is the metadata plus these).
    data_chunks: u64,
    /// Seeds the snapshots, writes, deletions and merges.
    seed: u64,
    sessions: u8,
}

fn base_spec() -> impl Strategy<Value = BaseSpec> {
    (
        prop_oneof![1u64..64, 64u64..2048],
        prop::sample::select(vec![8u64, 16, 32, 64]),
        prop_oneof![1u64..4, 4u64..96],
        any::<u64>(),
        1u8..=2,
    )
        .prop_map(
            |(origin_sectors, chunk, data_chunks, seed, sessions)| BaseSpec {
                origin_sectors,
                chunk,
                data_chunks,
                seed,
                sessions,
            },
        )
}

/// The COW size that gives about `data_chunks` chunks after the metadata (the plan's rule:
/// each log area holds two checkpoints of a full store).
fn cow_sectors(chunk: u64, data_chunks: u64) -> u64 {
    let mut size = 2 * BLOCK_SECTORS + data_chunks * chunk;
    loop {
        let chunks_max = size / chunk;
        // Snapshot records planned: as many as 1/64 of the device holds 4 times, 64 to 1024.
        let snapshots = (size * 512 / 64 / (4 * MAX_RECORD)).clamp(64, 1024);
        let checkpoint = chunks_max * 25 + snapshots * MAX_RECORD;
        let area_blocks = 2 * checkpoint.div_ceil(PAYLOAD as u64) + 8;
        let meta_end = 2 * BLOCK_SECTORS + 2 * area_blocks * BLOCK_SECTORS;
        let need = meta_end.next_multiple_of(chunk) + data_chunks * chunk;
        if need <= size {
            return size;
        }
        size = need;
    }
}

fn engine_config() -> CopyConfig {
    CopyConfig {
        sub_job_sectors: SectorCount(8),
        memory_budget_bytes: 8 * 4096,
        ..CopyConfig::default()
    }
}

/// Opens a group over `origin` and `cow` on a local engine, with its merge driver, and runs
/// `body` with it; the open's error otherwise.
fn with_group<T: 'static>(
    origin: DeviceRef,
    cow: DeviceRef,
    chunk: Option<u64>,
    body: impl AsyncFnOnce(Arc<SnapshotGroup>) -> T + 'static,
) -> Result<T> {
    run_local(async move {
        let (engine, run) = CopyEngine::new_local(engine_config()).expect("engine");
        let runner = spawn(run);
        let options = GroupOptions {
            chunk_size: chunk.map(SectorCount),
            force: false,
            ..GroupOptions::default()
        };
        let group = SnapshotGroup::open(origin, cow, &options, engine.clone()).await;
        drop(engine);
        let out = match group {
            Ok(group) => {
                let merger = spawn(group.merge_task());
                let out = body(Arc::clone(&group)).await;
                group.check_invariants();
                group.stop();
                merger.await;
                drop(group);
                Ok(out)
            }
            Err(err) => Err(err),
        };
        runner.await;
        out
    })
}

async fn command(group: &SnapshotGroup, name: &str, args: serde_json::Value) {
    // Refusals (a name taken, a merge running, a full store) are fine here.
    let _ = group.command_async(name, &args).await;
}

async fn write(dev: &dyn BlockDevice, sector: u64, sectors: u64, byte: u8) {
    let buf = AlignedBuf::from_slice(&vec![byte; sectors as usize * 512]);
    let _ = dev
        .write(Sector(sector), Arc::new(buf), WriteFlags::default())
        .await;
}

/// A random extent of a device of `size` sectors.
fn extent(rng: &mut ChaCha8Rng, size: u64) -> (u64, u64) {
    let start = rng.gen_range(0..size);
    (start, rng.gen_range(1..=(size - start).min(256)))
}

/// One session of random work on a base store.
async fn base_session(group: Arc<SnapshotGroup>, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = group.origin().info().size.0;
    for step in 0..rng.gen_range(2..10) {
        match rng.gen_range(0..10) {
            0..=2 => {
                let name = format!("s{}", rng.gen_range(0..6));
                command(&group, "snapshot-create", json!({ "name": name })).await;
            }
            3..=5 => {
                let (at, len) = extent(&mut rng, size);
                write(&*group.origin(), at, len, step as u8).await;
            }
            6 | 7 => {
                let names = group.origin().child_names();
                if let Some(name) = names.get(rng.gen_range(0..names.len().max(1))) {
                    let snap = group.snapshot(name).expect("listed");
                    let (at, len) = extent(&mut rng, size);
                    write(&*snap, at, len, step as u8).await;
                }
            }
            8 => {
                let name = format!("s{}", rng.gen_range(0..6));
                command(&group, "snapshot-delete", json!({ "name": name })).await;
            }
            _ => {
                let name = format!("s{}", rng.gen_range(0..6));
                command(&group, "merge", json!({ "name": name })).await;
            }
        }
    }
}

/// A base store image and what the fuzzer needs of it.
#[derive(Clone)]
struct Base {
    origin_sectors: u64,
    cow: Vec<u8>,
    sb: SbView,
    /// The sealed slot the superblock came from (0 or 1).
    newest: usize,
    /// The active log's records, raw, in order.
    records: Vec<Vec<u8>>,
    /// Slots that hold a snapshot after the replay, and their names.
    slots: Vec<(u16, String)>,
}

/// The fields of a sealed superblock slot that the fuzzer uses.
#[derive(Clone, Copy, Debug)]
struct SbView {
    uuid: [u8; 16],
    chunk: u64,
    area_blocks: u64,
    data_chunks: u64,
    active_area: u64,
    epoch: u64,
}

fn build_base(spec: &BaseSpec) -> Base {
    let cow_size = cow_sectors(spec.chunk, spec.data_chunks);
    let origin = MemDevice::new("origin", SectorCount(spec.origin_sectors));
    let cow = MemDevice::new("cow", SectorCount(cow_size));
    for session in 0..u64::from(spec.sessions) {
        let seed = spec.seed.wrapping_add(session);
        with_group(
            origin.clone(),
            cow.clone(),
            Some(spec.chunk),
            async move |g| base_session(g, seed).await,
        )
        .expect("a base store opens");
    }
    let image = cow.contents();
    let (newest, sb) = newest_slot(&image).expect("a base store has a sealed slot");
    let records = read_log(&image, &sb);
    let slots = live_slots(&records);
    Base {
        origin_sectors: spec.origin_sectors,
        cow: image,
        sb,
        newest,
        records,
        slots,
    }
}

/// The sealed superblock slot with the highest sequence.
fn newest_slot(image: &[u8]) -> Option<(usize, SbView)> {
    (0..2)
        .filter_map(|i| {
            let b = &image[i * BLOCK..(i + 1) * BLOCK];
            let ok = b[..8] == magic::SNAPSHOT_SUPERBLOCK && crc::verify(b, SB_CRC);
            ok.then(|| (u64_at(b, 32), i, view(b)))
        })
        .max_by_key(|&(seq, _, _)| seq)
        .map(|(_, i, v)| (i, v))
}

fn view(b: &[u8]) -> SbView {
    SbView {
        uuid: b[SB_UUID..SB_UUID + 16].try_into().expect("16 bytes"),
        chunk: u64_at(b, 40),
        area_blocks: u64_at(b, 64),
        data_chunks: u64_at(b, 80),
        active_area: u64_at(b, 88),
        epoch: u64_at(b, 96),
    }
}

/// Byte offset of block `index` of the active log area.
fn log_at(sb: &SbView, index: u64) -> usize {
    let sector = 2 * BLOCK_SECTORS + (sb.active_area * sb.area_blocks + index) * BLOCK_SECTORS;
    sector as usize * 512
}

/// The records of the active log, raw (the run of blocks of its epoch and index).
fn read_log(image: &[u8], sb: &SbView) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    for index in 0..sb.area_blocks {
        let b = &image[log_at(sb, index)..log_at(sb, index) + BLOCK];
        let ours = b[..8] == magic::SNAPSHOT_LOG
            && crc::verify(b, LOG_CRC)
            && b[16..32] == sb.uuid
            && u64_at(b, 32) == sb.epoch
            && u64_at(b, 40) == index;
        if !ours {
            break;
        }
        let used = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        let mut payload = &b[LOG_HEADER..LOG_HEADER + used];
        while !payload.is_empty() {
            let len = record_len(payload).expect("the target writes whole records");
            records.push(payload[..len].to_vec());
            payload = &payload[len..];
        }
    }
    records
}

/// Bytes of the record at the start of `payload` (by its type: format 1's codes 1 to 6,
/// format 2's 5 and 7 to 13).
fn record_len(payload: &[u8]) -> Option<usize> {
    match payload[0] {
        1 => payload.get(20).map(|&n| 21 + usize::from(n)),
        7 => payload.get(21).map(|&n| 22 + usize::from(n)),
        2 => Some(2),
        3 | 8 => Some(3),
        9 => Some(4),
        4 | 6 => Some(10),
        10 | 11 => Some(11),
        13 => Some(19),
        5 | 12 => Some(25),
        14 => Some(33),
        15 => Some(17),
        _ => None,
    }
}

/// The slots the raw `records` (written in format 2) leave holding a snapshot, with their
/// names.
fn live_slots(records: &[Vec<u8>]) -> Vec<(u16, String)> {
    let mut slots: Vec<Option<String>> = vec![None; MAX_SLOTS];
    let slot = |r: &[u8]| usize::from(u16::from_le_bytes([r[1], r[2]]));
    for r in records {
        match r[0] {
            7 => slots[slot(r)] = Some(String::from_utf8_lossy(&r[22..]).into()),
            8 => slots[slot(r)] = None,
            _ => {}
        }
    }
    (0u16..)
        .zip(slots)
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Opening a mutated image, and what must hold.

/// The COW device behind a fence: any request outside the device fails the case.
struct Fence(DeviceRef);

impl Fence {
    fn check(&self, extent: Extent) {
        let size = self.0.info().size;
        assert!(
            extent.end().0 <= size.0,
            "I/O outside the COW device ({} sectors): {extent}",
            size.0
        );
    }
}

impl Forward for Fence {
    fn inner(&self) -> &DeviceRef {
        &self.0
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        self.check(Extent::new(offset, buf.sectors()));
        self.0.read(offset, buf)
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        self.check(Extent::new(offset, buf.sectors()));
        self.0.write(offset, buf, flags)
    }
    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.check(extent);
        self.0.discard(extent)
    }
    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.check(extent);
        self.0.write_zeroes(extent)
    }
}

/// What the opens of a target's cases came to.
#[derive(Default)]
struct Tally {
    opened: AtomicUsize,
    refused: AtomicUsize,
}

/// Work on a store that opened: every snapshot reads, the origin takes a write, a snapshot
/// is created; whatever fails does so as a value.
async fn exercise(group: Arc<SnapshotGroup>) {
    group.check_invariants();
    let _ = group.status();
    let origin = group.origin();
    let size = origin.info().size;
    let read_all = async |dev: &dyn BlockDevice| {
        let _ = dev.read(Sector(0), AlignedBuf::for_sectors(size)).await;
    };
    for name in origin.child_names() {
        read_all(&*group.snapshot(&name).expect("listed")).await;
    }
    write(&*origin, 0, size.0.min(256), 0xf0).await;
    command(&group, "snapshot-create", json!({ "name": "fuzz" })).await;
    group.check_invariants();
    for name in origin.child_names() {
        read_all(&*group.snapshot(&name).expect("listed")).await;
    }
}

/// Opens `image` (with an origin of `origin_sectors`) and checks the outcome; `allowed` are
/// the error kinds this mutation may cause besides `Corrupt`.
fn open_mutated(image: &[u8], origin_sectors: u64, allowed: &[ErrorKind], tally: &Tally) {
    let origin = MemDevice::new("origin", SectorCount(origin_sectors));
    let cow = MemDevice::new("cow", SectorCount((image.len() / 512) as u64));
    cow.poke(Sector(0), image);
    let fenced = |cow: &Arc<MemDevice>| -> DeviceRef {
        let inner: DeviceRef = cow.clone();
        Arc::new(Forwarding(Fence(inner)))
    };
    let opened = with_group(origin.clone(), fenced(&cow), None, exercise);
    match opened {
        Ok(()) => {
            tally.opened.fetch_add(1, Ordering::Relaxed);
            // What this build wrote over an image it accepted, it reads back.
            with_group(origin, fenced(&cow), None, async |g| g.check_invariants())
                .expect("a store this build wrote to reopens");
        }
        Err(err) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            let text = err.chain().join(": ");
            if std::env::var_os("UBLKDM_FUZZ_TRACE").is_some() {
                eprintln!("refused: {text}");
            }
            assert!(!text.contains('\n'), "a one-line error: {text:?}");
            assert!(
                err.kind() == ErrorKind::Corrupt || allowed.contains(&err.kind()),
                "refused as {:?}, not as corrupt metadata: {text}",
                err.kind()
            );
        }
    }
}

/// Runs `cases` cases of `strategy` through `case`, then prints the count line.
fn fuzz<S: Strategy>(name: &str, strategy: S, case: impl Fn(S::Value, &Tally))
where
    S::Value: std::fmt::Debug,
{
    let cases = cases();
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let tally = Tally::default();
    let started = Instant::now();
    let result = TestRunner::new(config).run(&strategy, |value| {
        case(value, &tally);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
    let (opened, refused) = (
        tally.opened.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
    );
    // Past the harness's capture, so that a CI log shows it.
    let _ = writeln!(
        std::io::stdout().lock(),
        "FUZZ: {name} cases={cases} opened={opened} refused={refused} secs={:.1}",
        started.elapsed().as_secs_f64()
    );
    // Both outcomes occur, or the strategies test nothing.
    if cases >= 32 {
        assert!(
            opened > 0 && refused > 0,
            "{name}: opened {opened}, refused {refused}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Superblocks.

/// A value for a superblock field.
#[derive(Clone, Debug)]
enum FieldValue {
    /// A boundary value.
    Const(u64),
    /// The field's own value plus this (wrapping).
    Delta(i64),
    /// The COW device's size in sectors plus this.
    CowSize(i64),
    /// The origin's size in sectors plus this.
    OriginSize(i64),
    Random(u64),
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            2,
            4,
            7,
            8,
            1 << 21,
            1 << 22,
            1 << 40,
            (1 << 61) - 1,
            1 << 63,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ])
        .prop_map(FieldValue::Const),
        (-64i64..=64).prop_map(FieldValue::Delta),
        (-64i64..=64).prop_map(FieldValue::CowSize),
        (-8i64..=8).prop_map(FieldValue::OriginSize),
        any::<u64>().prop_map(FieldValue::Random),
    ]
}

/// Which slots a mutation changes.
#[derive(Clone, Copy, Debug)]
enum Slots {
    Newest,
    Other,
    Both,
}

/// What a superblock mutation changes: a u64 field (index into [`SB_FIELDS`]), a UUID
/// byte, or the version.
#[derive(Clone, Debug)]
enum SbEdit {
    Field(usize, FieldValue),
    Uuid(usize),
    Version(u32),
}

#[derive(Clone, Debug)]
struct SbCase {
    base: BaseSpec,
    slots: Slots,
    edits: Vec<SbEdit>,
}

fn sb_case() -> impl Strategy<Value = SbCase> {
    let edit = prop_oneof![
        8 => (0..SB_FIELDS.len(), field_value()).prop_map(|(i, v)| SbEdit::Field(i, v)),
        1 => (0usize..16).prop_map(SbEdit::Uuid),
        1 => prop::sample::select(vec![0u32, 2, u32::MAX]).prop_map(SbEdit::Version),
    ];
    (
        base_spec(),
        prop::sample::select(vec![Slots::Newest, Slots::Other, Slots::Both]),
        prop::collection::vec(edit, 1..=3),
    )
        .prop_map(|(base, slots, edits)| SbCase { base, slots, edits })
}

fn apply_sb_edit(slot: &mut [u8], edit: &SbEdit, cow_sectors: u64, origin_sectors: u64) {
    let add = |base: u64, delta: i64| base.wrapping_add_signed(delta);
    match edit {
        SbEdit::Field(i, value) => {
            let at = SB_FIELDS[*i].0;
            let value = match *value {
                FieldValue::Const(v) | FieldValue::Random(v) => v,
                FieldValue::Delta(d) => add(u64_at(slot, at), d),
                FieldValue::CowSize(d) => add(cow_sectors, d),
                FieldValue::OriginSize(d) => add(origin_sectors, d),
            };
            put_u64(slot, at, value);
        }
        SbEdit::Uuid(i) => slot[SB_UUID + i] ^= 0x5a,
        SbEdit::Version(v) => slot[SB_VERSION..SB_VERSION + 4].copy_from_slice(&v.to_le_bytes()),
    }
}

fn run_sb_case(case: SbCase, tally: &Tally) {
    let base = build_base(&case.base);
    let mut image = base.cow.clone();
    let cow_sectors = (image.len() / 512) as u64;
    let slots = match case.slots {
        Slots::Newest => vec![base.newest],
        Slots::Other => vec![1 - base.newest],
        Slots::Both => vec![0, 1],
    };
    for i in slots {
        let slot = &mut image[i * BLOCK..(i + 1) * BLOCK];
        for edit in &case.edits {
            apply_sb_edit(slot, edit, cow_sectors, base.origin_sectors);
        }
        crc::seal(slot, SB_CRC);
    }
    let mut allowed = Vec::new();
    for edit in &case.edits {
        match edit {
            SbEdit::Version(_) => allowed.push(ErrorKind::Unsupported),
            SbEdit::Field(2, _) => allowed.push(ErrorKind::InvalidArgument),
            _ => {}
        }
    }
    open_mutated(&image, base.origin_sectors, &allowed, tally);
}

#[test]
fn fuzz_snapshot_superblock() {
    fuzz("snapshot-superblock", sb_case(), run_sb_case);
}

// ---------------------------------------------------------------------------------------
// Log records.

/// A slot number: one that holds a snapshot in the base (by index, modulo), any, or one out
/// of range.
#[derive(Clone, Debug)]
enum SlotValue {
    Live(usize),
    Any(u16),
}

fn slot_value() -> impl Strategy<Value = SlotValue> {
    prop_oneof![
        3 => any::<usize>().prop_map(SlotValue::Live),
        2 => (0u16..64).prop_map(SlotValue::Any),
        1 => (64u16..1024).prop_map(SlotValue::Any),
        1 => (1024u16..=u16::MAX).prop_map(SlotValue::Any),
    ]
}

/// A chunk number relative to a limit (the data chunks or the origin's chunks).
#[derive(Clone, Debug)]
enum ChunkValue {
    Below(u64),
    /// The limit plus this (wrapping): -1 is the last chunk, 0 the first past the end.
    Limit(i64),
    Const(u64),
}

fn chunk_value() -> impl Strategy<Value = ChunkValue> {
    prop_oneof![
        4 => (0u64..1 << 20).prop_map(ChunkValue::Below),
        2 => (-2i64..=2).prop_map(ChunkValue::Limit),
        1 => prop::sample::select(vec![1u64 << 40, (1 << 61) - 1, 1 << 63, u64::MAX])
            .prop_map(ChunkValue::Const),
    ]
}

#[derive(Clone, Debug)]
enum MaskValue {
    /// The slots holding a snapshot in the base, and these bits too.
    Live(u64),
    One(u8),
    Const(u64),
}

fn mask_value() -> impl Strategy<Value = MaskValue> {
    prop_oneof![
        3 => prop::sample::select(vec![0u64, 0, 0, 1 << 7, 1 << 63]).prop_map(MaskValue::Live),
        2 => (0u8..64).prop_map(MaskValue::One),
        1 => prop::sample::select(vec![0u64, u64::MAX]).prop_map(MaskValue::Const),
        1 => any::<u64>().prop_map(MaskValue::Const),
    ]
}

fn name_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z0-9]{1,8}".prop_map(String::into_bytes),
        1 => Just(b"s0".to_vec()),
        1 => Just(b"s1".to_vec()),
        1 => Just(b"a\0b".to_vec()),
        1 => Just(b"line\nbreak".to_vec()),
        1 => Just(Vec::new()),
        1 => Just(vec![b'x'; 64]),
        1 => (65usize..=255).prop_map(|n| vec![b'y'; n]),
        1 => Just(vec![0x61, 0xff, 0xfe]),
        1 => prop::collection::vec(any::<u8>(), 1..12),
    ]
}

/// A record to inject: structurally whole, with hostile values.
#[derive(Clone, Debug)]
enum Hostile {
    Create {
        slot: SlotValue,
        seq: u64,
        state: u8,
        reason: u8,
        merge_total: u64,
        name: Vec<u8>,
    },
    Delete(SlotValue),
    Invalidate(SlotValue, u8),
    MergeStart(SlotValue, u64),
    Map {
        cow: ChunkValue,
        origin: ChunkValue,
        mask: MaskValue,
    },
    Unmap(SlotValue, ChunkValue),
    Copy {
        cow: ChunkValue,
        origin: ChunkValue,
        newest: u64,
        merging: Option<u64>,
    },
    /// `merged`: the merged mark instead of a COW chunk.
    Private {
        cow: ChunkValue,
        merged: bool,
        origin: ChunkValue,
        slot: SlotValue,
    },
    /// The origin grew to `size` (chunks, relative to the origin's) for snapshots from
    /// creation number `since` on.
    Grow {
        size: ChunkValue,
        since: u64,
    },
    /// An unknown type byte and what follows it.
    Unknown(u8, Vec<u8>),
    /// A copy of the base's record at this index (a COW chunk mapped twice, a second Create).
    Repeat(usize),
}

fn seq_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..16,
        1 => prop::sample::select(vec![(1 << 24) - 1, 1 << 24, u64::MAX - 1, u64::MAX, 1 << 63]),
        1 => any::<u64>(),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let create = (
        slot_value(),
        seq_value(),
        prop_oneof![4 => Just(0u8), 1 => 0u8..4, 1 => any::<u8>()],
        prop_oneof![4 => Just(0u8), 2 => 1u8..=3, 1 => any::<u8>()],
        seq_value(),
        name_value(),
    )
        .prop_map(
            |(slot, seq, state, reason, merge_total, name)| Hostile::Create {
                slot,
                seq,
                state,
                reason,
                merge_total,
                name,
            },
        );
    let map = (chunk_value(), chunk_value(), mask_value())
        .prop_map(|(cow, origin, mask)| Hostile::Map { cow, origin, mask });
    prop_oneof![
        3 => create,
        1 => slot_value().prop_map(Hostile::Delete),
        1 => (slot_value(), 0u8..6).prop_map(|(s, r)| Hostile::Invalidate(s, r)),
        1 => (slot_value(), seq_value()).prop_map(|(s, t)| Hostile::MergeStart(s, t)),
        4 => map,
        1 => (slot_value(), chunk_value()).prop_map(|(s, c)| Hostile::Unmap(s, c)),
        3 => (chunk_value(), chunk_value(), seq_value(), prop::option::weighted(0.3, seq_value()))
            .prop_map(|(cow, origin, newest, merging)| Hostile::Copy { cow, origin, newest, merging }),
        3 => (chunk_value(), prop::bool::weighted(0.2), chunk_value(), slot_value())
            .prop_map(|(cow, merged, origin, slot)| Hostile::Private { cow, merged, origin, slot }),
        2 => (chunk_value(), seq_value()).prop_map(|(size, since)| Hostile::Grow { size, since }),
        1 => (prop_oneof![Just(0u8), 16u8..=255], prop::collection::vec(any::<u8>(), 0..30))
            .prop_map(|(t, rest)| Hostile::Unknown(t, rest)),
        2 => any::<usize>().prop_map(Hostile::Repeat),
    ]
}

/// A change to one log block's `used` length.
#[derive(Clone, Debug)]
enum UsedEdit {
    Delta(i64),
    Const(u32),
}

#[derive(Clone, Debug)]
struct LogCase {
    base: BaseSpec,
    /// Records to inject, each at (index modulo the records + 1).
    inject: Vec<(usize, Hostile)>,
    /// Base records to drop (index modulo the records).
    drop: Vec<usize>,
    /// Cut the last record short by this many bytes.
    cut: Option<usize>,
    /// A block (index modulo the blocks) whose `used` length changes.
    used: Option<(usize, UsedEdit)>,
}

fn log_case() -> impl Strategy<Value = LogCase> {
    let used_edit = prop_oneof![
        (-30i64..=30).prop_map(UsedEdit::Delta),
        prop::sample::select(vec![
            0u32,
            PAYLOAD as u32,
            PAYLOAD as u32 + 1,
            4096,
            u32::MAX
        ])
        .prop_map(UsedEdit::Const),
    ];
    (
        base_spec(),
        prop::collection::vec((any::<usize>(), hostile()), 0..=3),
        prop::collection::vec(any::<usize>(), 0..=1),
        prop::option::weighted(0.1, 1usize..8),
        prop::option::weighted(0.15, (any::<usize>(), used_edit)),
    )
        .prop_map(|(base, inject, drop, cut, used)| LogCase {
            base,
            inject,
            drop,
            cut,
            used,
        })
}

/// What resolves relative values against the base.
struct Limits<'a> {
    base: &'a Base,
    origin_chunks: u64,
}

impl Limits<'_> {
    /// The slot `s` names, as a record carries it.
    fn slot(&self, s: &SlotValue) -> [u8; 2] {
        let slot = match *s {
            SlotValue::Live(i) if !self.base.slots.is_empty() => {
                self.base.slots[i % self.base.slots.len()].0
            }
            SlotValue::Live(i) => (i % 64) as u16,
            SlotValue::Any(s) => s,
        };
        slot.to_le_bytes()
    }

    fn chunk(c: &ChunkValue, limit: u64) -> u64 {
        match *c {
            ChunkValue::Below(n) => n % limit.max(1),
            ChunkValue::Limit(d) => limit.wrapping_add_signed(d),
            ChunkValue::Const(v) => v,
        }
    }

    fn mask(&self, m: &MaskValue) -> u64 {
        match *m {
            MaskValue::Live(extra) => self
                .base
                .slots
                .iter()
                .filter(|(s, _)| *s < 64)
                .fold(extra, |m, (s, _)| m | 1 << s),
            MaskValue::One(s) => 1 << s,
            MaskValue::Const(v) => v,
        }
    }

    /// The raw bytes of `h`.
    fn encode(&self, h: &Hostile) -> Vec<u8> {
        let mut out = Vec::new();
        let u64s = |out: &mut Vec<u8>, values: &[u64]| {
            values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
        };
        match h {
            Hostile::Create {
                slot,
                seq,
                state,
                reason,
                merge_total,
                name,
            } => {
                out.push(7);
                out.extend_from_slice(&self.slot(slot));
                u64s(&mut out, &[*seq]);
                out.extend_from_slice(&[*state, *reason]);
                u64s(&mut out, &[*merge_total]);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
            Hostile::Delete(s) => {
                out.push(8);
                out.extend_from_slice(&self.slot(s));
            }
            Hostile::Invalidate(s, r) => {
                out.push(9);
                out.extend_from_slice(&self.slot(s));
                out.push(*r);
            }
            Hostile::MergeStart(s, total) => {
                out.push(10);
                out.extend_from_slice(&self.slot(s));
                u64s(&mut out, &[*total]);
            }
            Hostile::Map { cow, origin, mask } => {
                out.push(5);
                let cow = Self::chunk(cow, self.base.sb.data_chunks);
                let origin = Self::chunk(origin, self.origin_chunks);
                u64s(&mut out, &[cow, origin, self.mask(mask)]);
            }
            Hostile::Unmap(s, c) => {
                out.push(11);
                out.extend_from_slice(&self.slot(s));
                u64s(&mut out, &[Self::chunk(c, self.origin_chunks)]);
            }
            Hostile::Copy {
                cow,
                origin,
                newest,
                merging,
            } => {
                out.push(if merging.is_some() { 14 } else { 12 });
                let cow = Self::chunk(cow, self.base.sb.data_chunks);
                let origin = Self::chunk(origin, self.origin_chunks);
                u64s(&mut out, &[cow, origin, *newest]);
                u64s(&mut out, merging.as_slice());
            }
            Hostile::Private {
                cow,
                merged,
                origin,
                slot,
            } => {
                out.push(13);
                let cow = match merged {
                    true => u64::MAX,
                    false => Self::chunk(cow, self.base.sb.data_chunks),
                };
                u64s(&mut out, &[cow, Self::chunk(origin, self.origin_chunks)]);
                out.extend_from_slice(&self.slot(slot));
            }
            Hostile::Grow { size, since } => {
                out.push(15);
                let chunks = Self::chunk(size, 2 * self.origin_chunks);
                u64s(&mut out, &[chunks.wrapping_mul(self.base.sb.chunk), *since]);
            }
            Hostile::Unknown(t, rest) => {
                out.push(*t);
                out.extend_from_slice(rest);
            }
            Hostile::Repeat(i) if !self.base.records.is_empty() => {
                out = self.base.records[i % self.base.records.len()].clone();
            }
            Hostile::Repeat(_) => out.extend_from_slice(&[8, 0, 0]),
        }
        out
    }
}

/// Packs raw `records` into payloads of at most a block's worth (a record never split; one
/// larger than a block goes alone, cut to fit).
fn pack(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut payload = Vec::new();
    for r in records {
        if !payload.is_empty() && payload.len() + r.len() > PAYLOAD {
            blocks.push(std::mem::take(&mut payload));
        }
        payload.extend_from_slice(&r[..r.len().min(PAYLOAD - payload.len())]);
    }
    if !payload.is_empty() || blocks.is_empty() {
        blocks.push(payload);
    }
    blocks
}

/// Log block `index` of `sb`'s log holding `payload`, with `used` saying how much, sealed.
fn seal_block(sb: &SbView, index: u64, payload: &[u8], used: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(&magic::SNAPSHOT_LOG);
    b[12..16].copy_from_slice(&used.to_le_bytes());
    b[16..32].copy_from_slice(&sb.uuid);
    put_u64(&mut b, 32, sb.epoch);
    put_u64(&mut b, 40, index);
    b[LOG_HEADER..LOG_HEADER + payload.len()].copy_from_slice(payload);
    crc::seal(&mut b, LOG_CRC);
    b
}

fn run_log_case(case: LogCase, tally: &Tally) {
    let base = build_base(&case.base);
    let limits = Limits {
        base: &base,
        origin_chunks: base.origin_sectors.div_ceil(base.sb.chunk),
    };
    let mut records = base.records.clone();
    for &i in &case.drop {
        if !records.is_empty() {
            records.remove(i % records.len());
        }
    }
    for (at, h) in &case.inject {
        let raw = limits.encode(h);
        records.insert(at % (records.len() + 1), raw);
    }
    if let (Some(cut), Some(last)) = (case.cut, records.last_mut()) {
        last.truncate(last.len().saturating_sub(cut).max(1));
    }
    let payloads = pack(&records);
    let sb = &base.sb;
    let n = (payloads.len() as u64).min(sb.area_blocks);
    let mut image = base.cow.clone();
    for (index, payload) in (0..n).zip(&payloads) {
        let mut used = payload.len() as u32;
        if let Some((i, edit)) = &case.used {
            if (*i as u64) % n == index {
                used = match *edit {
                    UsedEdit::Delta(d) => used.wrapping_add_signed(d as i32),
                    UsedEdit::Const(v) => v,
                };
            }
        }
        let at = log_at(sb, index);
        image[at..at + BLOCK].copy_from_slice(&seal_block(sb, index, payload, used));
    }
    // End the log after the new blocks (an old block there would carry on its run).
    if n < sb.area_blocks {
        let at = log_at(sb, n);
        image[at..at + BLOCK].fill(0);
    }
    // A growth that holds is refused for the origin it was not made for (another size).
    let grows = case
        .inject
        .iter()
        .any(|(_, h)| matches!(h, Hostile::Grow { .. }));
    let allowed: &[ErrorKind] = if grows {
        &[ErrorKind::InvalidArgument]
    } else {
        &[]
    };
    open_mutated(&image, base.origin_sectors, allowed, tally);
}

#[test]
fn fuzz_snapshot_log() {
    fuzz("snapshot-log", log_case(), run_log_case);
}

/// The fuzzer's own reading of the format agrees with the target's: a base image's log,
/// packed and sealed again unchanged (in blocks cut elsewhere: the target starts a block per
/// commit), opens to the same snapshots.
#[test]
fn an_unchanged_log_packed_again_opens_the_same() {
    let spec = BaseSpec {
        origin_sectors: 1000,
        chunk: 16,
        data_chunks: 40,
        seed: 7,
        sessions: 2,
    };
    let base = build_base(&spec);
    assert!(
        !base.slots.is_empty() && base.records.len() > 2,
        "a base with content"
    );
    let mut image = base.cow.clone();
    let payloads = pack(&base.records);
    for (index, payload) in (0u64..).zip(&payloads) {
        let at = log_at(&base.sb, index);
        let block = seal_block(&base.sb, index, payload, payload.len() as u32);
        image[at..at + BLOCK].copy_from_slice(&block);
    }
    let end = log_at(&base.sb, payloads.len() as u64);
    image[end..end + BLOCK].fill(0);
    let origin = MemDevice::new("origin", SectorCount(spec.origin_sectors));
    let cow = MemDevice::new("cow", SectorCount((image.len() / 512) as u64));
    cow.poke(Sector(0), &image);
    let names = with_group(origin, cow, None, async |g| g.origin().child_names()).expect("opens");
    let mut want: Vec<String> = base.slots.iter().map(|(_, n)| n.clone()).collect();
    want.sort();
    let mut got = names;
    got.sort();
    // A merging snapshot is not a child; the base may hold one.
    assert!(
        want.iter().filter(|n| !got.contains(n)).count() <= 1,
        "{want:?} vs {got:?}"
    );
}
