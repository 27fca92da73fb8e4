//! The snapshot target: one origin device, up to 1024 writable snapshots of it, and one COW
//! store holding what the snapshots need, with background merge (rolling the origin back to a
//! snapshot).
//!
//! A [`SnapshotGroup`] owns the shared state and hands out targets: the origin
//! ([`SnapshotGroup::origin`], kind `snapshot-origin`, which takes the commands) and each
//! snapshot by name ([`SnapshotGroup::snapshot`], kind `snapshot`), so one daemon can serve
//! them all.
//!
//! # Files
//! - `format.rs`: the on-disk layout, superblock, log blocks and records.
//! - `state.rs`: the in-memory tables, changed only by applying durable records.
//! - `exceptions.rs`: the exception index: every snapshot's images, an origin copy shared by
//!   any number of snapshots in one entry.
//! - `free.rs`: the free COW chunks, one bit each.
//! - `grow.rs`: growing the origin (`Target::resize`), its snapshots keeping their size.
//! - `io.rs`: origin and snapshot I/O, copy-on-write, merge steps, per-chunk locks.
//! - `commands.rs`: `snapshot-create`, `-activate`, `-deactivate`, `-delete`, `-list`, `merge`,
//!   `status`, and which snapshots are active (served as devices; kept in the origin's spec).
//! - `kind.rs`: the origin's kind: spec, `add origin` arguments, the `ublkdm snapshot` CLI.
//! - `report.rs`: what a person reads: the origin's `ublkdm status` lines and command lines.
//!
//! # COW store format
//! All integers little-endian; the device is cut into:
//!
//! | sectors                      | what                                                  |
//! |------------------------------|-------------------------------------------------------|
//! | 0..8, 8..16                  | superblock slots A and B (4 KiB each)                 |
//! | 16..16+8n, 16+8n..16+16n     | log areas 0 and 1, `n` = `area_blocks` 4 KiB blocks   |
//! | `data_start`.. (chunk aligned)| `data_chunks` data chunks                            |
//!
//! A superblock slot: magic `UBDMSNAP` (0), format version u32 = 2 (8; a store of format 1
//! still opens, and the first commit rewrites it in format 2), crc32c of the 4 KiB slot
//! computed with this field zero (12), store UUID (16), then u64s: sequence (32), chunk size
//! in sectors (40), origin size in sectors (48), COW size at creation (56), `area_blocks`
//! (64), `data_start` (72), `data_chunks` (80), active log area 0/1 (88), log epoch (96).
//! Open reads both slots and takes the valid one with the higher sequence; a slot is only
//! rewritten (alternately, FUA) when the log is compacted, so a torn superblock write leaves
//! the other slot intact.
//!
//! A log block: magic `UBDMSLOG` (0), crc32c of the block with this field zero (8), bytes of
//! records (12, u32), store UUID (16), epoch (32, u64), index of the block in its area (40,
//! u64), records from byte 48. The log of the active area is the run of blocks 0, 1, 2, ...
//! that carry the superblock's epoch, their own index and a good checksum; the first block
//! that does not ends it. So a torn last block, a never-written one and a stale block of an
//! earlier epoch all read as "end of log", never as records. A block that passes those checks
//! was written whole by a writer of this store, so if its length or a record is impossible,
//! or a record cannot follow the state the log built before it (a chunk outside the data area
//! or the origin, a COW chunk in use mapped again, a record for an empty slot, a second
//! merge, a name `snapshot create` refuses), the open fails as corrupt metadata (exit 7) in
//! one line naming the record and the field; so does a sealed superblock slot with an
//! impossible field, or two sealed slots with different layouts (a torn slot yields to the
//! other). A store that opens thus never panics, allocates or reads beyond what its devices
//! hold. Records of format 2 (type byte first; slots u16 below 1024, `seq` a creation number):
//! `Create{slot, seq u64, state u8, reason u8, merge_total u64, name_len u8, name}` (7),
//! `Delete{slot}` (8), `Invalidate{slot, reason u8}` (9), `MergeStart{slot, total u64}` (10),
//! `Unmap{slot, origin u64}` (11: a merged or discarded chunk), `Copy{cow u64, origin u64,
//! newest u64}` (12: COW chunk `cow` holds origin chunk `origin` as it was before an origin
//! write, for every snapshot created after the chunk's previous copy and up to creation
//! number `newest` that had no image of its own), the same with the creation number of a
//! merging snapshot it does not serve (14), `Private{cow u64, origin u64, slot}` (13: a
//! snapshot's own image, written through it; `cow` = u64::MAX marks a merged chunk), and
//! `Map{cow u64, origin u64, mask u64}` (5: one COW chunk as the own image of every snapshot
//! in a 64-bit mask of slots, format 1's origin copy, kept so by format 2), and `Grow{size
//! u64, since u64}` (15: the origin grew to `size` sectors, from a whole number of chunks; the
//! snapshots of creation number `since` on have that size, older ones keep theirs; written
//! only by a store whose origin grew, so a store that never grew stays readable by older
//! builds; at most 64, checked on replay to grow, by whole chunks, within the index's 2^40
//! chunks, for creation numbers not taken yet; a checkpoint writes them first). The
//! superblock's origin size is the size at creation; the origin's size now is the last
//! `Grow`'s, and the open refuses an origin device of any other size. Format 1 wrote
//! codes 1 to 6 with slots of one byte (`Create` 1, `Delete` 2, `Invalidate` 3,
//! `MergeStart` 4, `Map` 5, `Unmap` 6); they are still read. A new store plans its log areas
//! for 1024 snapshots (fewer on a COW device under 22 MiB, at least 64); its limit is what
//! a checkpoint has room for.
//!
//! Commits: each commit (a *batch* of every record queued meanwhile: group commit) flushes the
//! COW device when it maps chunks, so the data chunks the records point at are durable first,
//! then writes new blocks after the tail with FUA. A committed block is never rewritten. When
//! the area is full the state is compacted: a checkpoint (its `Create`s, then one `Copy`,
//! `Private` or `Map` per used COW chunk and the merged marks) goes
//! to the other area with a new epoch, written in pieces of a bounded number of blocks as it
//! is read from the state, so that compaction's memory does not grow with the store (the last one plus a random step, so that no earlier
//! attempt cut short before its superblock landed used it), is flushed, and then the superblock
//! switches to it (when that superblock
//! write fails, the slot is read back: a failed write may have landed, and the area it names
//! is then the live one). The first commit after opening the store compacts too: a power cut in the
//! middle of a multi-block append can leave a later block of it without an earlier one, past
//! the end of the log, and appending there would join it to the log. Free chunks are not
//! recorded: a chunk is free when no record maps it, so a chunk copied before a crash but never
//! committed is simply free again (no leak), and a chunk is reused only after the record
//! releasing it is durable (the in-memory state changes only then).
//!
//! # Copy-on-write, shared across snapshots
//! The exception index (`exceptions.rs`) keeps origin copies by (origin chunk, newest
//! snapshot served) and snapshots' own images by (snapshot, origin chunk): a lookup is one
//! B-tree search, whatever the number of snapshots. An origin write to chunk `c` first asks
//! for the newest valid snapshot created after `c`'s last copy that has no image of its own
//! (they all still read `c` from the origin, so they share one image of it), copies `c` once
//! to a free COW chunk through the copy engine (foreground priority), commits one `Copy`
//! record for all of them, and only then writes the origin: with `k` snapshots a first write
//! costs one copy, one record and one index entry. A write over many
//! chunks copies them all at once (chunks that are neighbours on both devices as one copy job)
//! and commits their records in one batch. A write whose chunks need no copy (a rewrite) goes
//! straight to the origin. A snapshot write to a chunk it shares takes a chunk of its own first
//! (copying the shared image, or nothing when the write covers the whole chunk; a `Private`
//! record); to a chunk only it reads it writes in place. A copy that no live snapshot reads
//! any more is released at once.
//!
//! # Ordering
//! - Per chunk, a reader/writer lock: snapshot reads and origin reads/writes that need no
//!   copy share it; copies, merges and snapshot writes take it exclusively. A snapshot read
//!   that reads the origin therefore finishes before an origin write to that chunk can copy
//!   and overwrite it (dm-snapshot's exception race), and a write waits for the chunk's
//!   pending copy. A request takes its chunks' locks in ascending order, and holds them all
//!   until it is done. An origin write none of whose chunks needs a copy or merge takes no
//!   chunk lock: while it holds the gate no chunk can come to need one again, and whatever
//!   copied or merged a chunk finished its I/O before the record saying so was applied.
//! - A group-wide gate: every request holds it shared; `snapshot-create`, `snapshot-delete`
//!   and `merge` hold it exclusively, so a snapshot is taken between requests, never in the
//!   middle of one. Taking a snapshot flushes the origin first, so its image is durable.
//!
//! # Overflow and failures
//! No free chunk when a copy is needed: the snapshots that needed it are invalidated
//! (`Invalidate` record; their chunks are released), their I/O fails with EIO, and the
//! origin write proceeds. A failed copy invalidates the same way. A failed metadata write
//! invalidates every valid snapshot in memory (a merging one stays merging, so the origin
//! still reads as it). That is durable only once the next commit has written a checkpoint of
//! the in-memory state to the other area (which also leaves behind whatever part of the
//! failed write landed); until then an origin write (or merge step) tries that commit first
//! and fails if it cannot, since those snapshots still hold on disk what it would overwrite.
//! So the origin keeps working as soon as metadata can be written again.
//!
//! # Merge
//! `merge {name}` makes the origin read as the snapshot at once (unmerged chunks are read
//! from the COW store) and starts copying its chunks back in the background, in steps of up
//! to 4 MiB (256 chunks at most). Each step, under its chunks' exclusive locks: copy the
//! origin chunks for the other snapshots that still read them from the origin, copy the COW
//! chunks to the origin (all at once, neighbours as one job), flush the origin once, commit
//! their `Unmap`s in one batch (each marks the chunk merged for the snapshot). An origin write
//! to unmerged chunks does that first, in the foreground; a copy an origin write makes during
//! the merge names the merging snapshot when its range would take it in, so that a replay does
//! not count that copy as an image to merge. When nothing is left to merge the snapshot is
//! deleted. Progress is the `Unmap`
//! records, so a restart resumes. While merging, the snapshot's own I/O fails, and no
//! snapshot can be created. Since the origin's data changes when the merge starts, a merge is
//! refused while the origin's device is open (mounted, or open in a process: the daemon asks
//! `Target::command_needs_closed`); a merge already started (or resumed after a crash) changes
//! nothing an opener sees, so it goes on.
//!
//! # Zero copy
//! The origin and every snapshot ask for zero copy (`Target::zero_copy`): where the kernel
//! offers automatic buffer registration a request's own pages reach the target as a
//! registered buffer (`IoBuf::Registered`), which only fixed-buffer I/O on the queue's ring
//! can read or write. What each path does with one:
//! - an origin read passes it to the origin device; while a merge runs, each run of chunks
//!   (from the origin, or unmerged from the COW store) is read into its part of it
//!   (`RegBuf::slice`);
//! - an origin write first makes its chunks ready as in copy mode (the copies the snapshots
//!   need and any merge go through the copy engine, in memory of its own, and are durable
//!   first: the ordering is the same), then passes the buffer to the origin device. The new
//!   data is never seen, so nothing is copied;
//! - a snapshot read fills parts of the one buffer from the origin and the COW store, as an
//!   owned read fills parts of its buffer;
//! - a snapshot write is refused with `NeedsCopy` before any I/O, and the front end serves
//!   that request alone in copy mode (counted in `zero_copy_fallbacks`). It could be done
//!   without seeing the data (a partial chunk is merged by copying the old image through the
//!   engine, not in memory), but snapshot writes are rare, and one path keeps them simple;
//! - discards and write-zeroes carry no data buffer (write-zeroes writes owned zeroes).
//!
//! A registered read or write that fails with `EINVAL` (memory a backing `O_DIRECT` device
//! refuses) is served again in copy mode by the front end: every path above can run twice,
//! since a copy-on-write already done makes the second write a rewrite. Copy mode (owned
//! memory: the copy engine, metadata, the simulations) is unchanged.
//!
//! # Growth
//! `Target::resize` grows the origin (`grow.rs`): one durable `Grow` record, between requests,
//! then the origin serves the new size. Snapshots keep theirs (`Store::size_of`): an
//! origin write to a chunk beyond an older snapshot's end copies nothing for it, and its merge
//! rolls back only its range. A copy made for later snapshots of a chunk in the new area may
//! take older ones in by its creation-number range; they never read it (their I/O is bounded
//! by their size, their merge and exception counts by their chunks), but it stays allocated
//! until the older snapshots that it takes in are gone too.
//!
//! # Threads
//! Futures are `!Send` and run where awaited; state sits behind `std::sync::Mutex`es never
//! held across an await. [`SnapshotGroup::merge_task`] is the merge driver as a future: the
//! daemon runs it on a thread of its own ([`SnapshotGroup::start_merge_thread`]), simulations
//! spawn it locally.
//!
//! # Geometry
//! The origin and every snapshot advertise what is true of both devices (`group_info`): the
//! larger logical block, a volatile cache if either has one, and the origin's size in whole
//! such blocks. The last origin chunk may be short; its image in the COW store is its length
//! in whole COW blocks, the padding zeroed and never read as data.

pub mod commands;
mod exceptions;
mod format;
mod free;
mod grow;
mod io;
mod kind;
mod packed;
mod report;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use smol::lock::{Mutex as AsyncMutex, RwLock};
use uuid::Uuid;

pub use commands::SnapshotCommand;
pub use format::{Layout, Reason, SnapState, MAX_NAME, MAX_SNAPSHOTS};
pub use kind::{parse_chunk_size, OriginKind, OriginSpec};

/// The kind, for the registry.
pub fn kind() -> Box<dyn crate::registry::TargetKind> {
    Box::new(OriginKind)
}

use self::commands::Activation;
use self::format::{Record, Slot, Superblock, BLOCK, BLOCK_SECTORS};
use self::io::ChunkLocks;
use self::state::Store;
use crate::copy::{CopyConfig, CopyEngine};
use crate::device::{
    errno, needs_copy, open_distinct, reactor, AlignedBuf, BlockDevice, DeviceInfo, DeviceRef,
    IoBuf, IoFuture, IoReadDone, OpenOptions, ReadDone, UringDevice, WriteBuf, WriteFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::target::{Target, TargetSpec};
use crate::task::Notify;
use crate::units::{Extent, Sector, SectorCount};

/// Blocks a checkpoint is written in at most at once (1 MiB): what compaction holds in memory,
/// whatever the size of the state it records.
const CHECKPOINT_PIECE_BLOCKS: usize = 256;

/// Records taken from the state at once while a checkpoint is written (under the state's
/// lock, which I/O paths wait on meanwhile).
const CHECKPOINT_BATCH_RECORDS: usize = 4096;

/// The default chunk size: 16 KiB.
pub const DEFAULT_CHUNK: SectorCount = SectorCount(32);

/// How to open a group.
#[derive(Clone, Debug, Default)]
pub struct GroupOptions {
    /// Chunk size of a new store (a power of two, at least 4 KiB); `None` for the default.
    /// An existing store keeps its own; giving a different one is an error.
    pub chunk_size: Option<SectorCount>,
    /// Create a store on a COW device that carries foreign metadata (a file system, LVM, md,
    /// a mirror leg) instead of refusing it.
    pub force: bool,
    /// Blocks a checkpoint is written in at most at once; `None` for
    /// [`CHECKPOINT_PIECE_BLOCKS`] (tests make it small to cut checkpoints into many pieces).
    pub checkpoint_piece_blocks: Option<usize>,
}

/// Where the log stands (owned by the committer).
struct LogWriter {
    sb_sequence: u64,
    active_area: u8,
    epoch: u64,
    /// The next block to write in the active area.
    tail: u64,
    /// A log write failed, so the active area may hold blocks that were never applied: the
    /// next commit first writes a checkpoint of the in-memory state to the other area.
    checkpoint_first: bool,
    /// A superblock write failed and whether it landed is unknown: no compaction can tell
    /// which area it may overwrite, so none is tried until the store is opened again.
    unsure: bool,
    /// Blocks a checkpoint is written in at most at once (at least 1).
    piece_blocks: usize,
}

/// Records waiting for a commit.
#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// Whether the batch the queued records will go in was made durable: set once written.
    outcome: Arc<OnceLock<bool>>,
    /// A metadata write failed: snapshots are invalid in memory only until a checkpoint
    /// records it, and the origin must not change before that.
    failed: bool,
}

/// The state every target of a group shares.
pub(crate) struct Inner {
    origin: DeviceRef,
    cow: DeviceRef,
    layout: Layout,
    engine: CopyEngine,
    store: Mutex<Store>,
    writer: AsyncMutex<LogWriter>,
    queue: Mutex<Queue>,
    gate: RwLock<()>,
    locks: ChunkLocks,
    kick: Notify,
    stopping: AtomicBool,
    merge_error: Mutex<Option<String>>,
    /// What the origin and every snapshot advertise (see [`group_info`]); its size is the
    /// origin's at open.
    origin_info: DeviceInfo,
    /// The origin's size now, in sectors: the store's ([`Store::origin_size`]), set when a
    /// growth is durable; it never shrinks.
    size: AtomicU64,
}

/// A snapshot group: an origin, its snapshots and their COW store (see the module doc).
pub struct SnapshotGroup {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl SnapshotGroup {
    /// Creates a store on a COW device without one, or opens the store it holds (which must
    /// belong to an origin of this size). Phases: find the superblock (writing a new store's
    /// on a blank device), check the store fits this origin, replay its log, build the state.
    pub async fn open(
        origin: DeviceRef,
        cow: DeviceRef,
        options: &GroupOptions,
        engine: CopyEngine,
    ) -> Result<Arc<SnapshotGroup>> {
        let origin_size = origin.size();
        let info = group_info(origin.info(), origin_size, cow.info())?;
        let found = load_superblock(&cow, origin_size, options).await?;
        if !found.fresh {
            check_layout(&found.sb.layout, cow.info().size, options)
                .map_err(|e| on_store(&cow, e))?;
        }
        let layout = &found.sb.layout;
        let mut store = Store::new(
            layout.data_chunks,
            layout.snapshot_capacity(),
            layout.chunk.0,
            layout.origin_size.0,
        );
        let tail = replay(&cow, layout, &found.sb, &mut store).await?;
        check_origin_size(&store, origin_size, layout).map_err(|e| on_store(&cow, e))?;
        // A store of an older format is rewritten in this one before anything is appended:
        // the first commit after an open always compacts.
        let writer = LogWriter {
            sb_sequence: found.sb.sequence,
            active_area: found.sb.active_area,
            epoch: found.sb.epoch,
            tail,
            // Blocks past the end of the log may be a torn append's: never append there.
            checkpoint_first: !found.fresh,
            unsure: false,
            piece_blocks: options
                .checkpoint_piece_blocks
                .unwrap_or(CHECKPOINT_PIECE_BLOCKS)
                .max(1),
        };
        let devices = Devices { origin, cow, info };
        let inner = Inner::new(devices, engine, store, writer, found.sb.layout);
        Ok(Arc::new(SnapshotGroup {
            inner: Arc::new(inner),
            thread: Mutex::new(None),
        }))
    }

    /// The origin target (it takes the group's commands), serving every snapshot as a
    /// child until a command through it fixes which are active.
    pub fn origin(self: &Arc<Self>) -> Arc<OriginTarget> {
        self.origin_serving(None)
    }

    /// The origin target with the snapshots `active` names active (`None`: every one, as a
    /// spec stored by older code means).
    pub fn origin_serving(self: &Arc<Self>, active: Option<Vec<String>>) -> Arc<OriginTarget> {
        let active = match active {
            Some(names) => Activation::of(names),
            None => Activation::every(),
        };
        Arc::new(OriginTarget {
            group: Arc::clone(self),
            active: Arc::new(active),
        })
    }

    /// The snapshot named `name`.
    pub fn snapshot(self: &Arc<Self>, name: &str) -> Result<Arc<SnapshotTarget>> {
        let store = self.inner.store();
        let slot = store.find(name).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no snapshot named '{name}'"))
        })?;
        let seq = store.snap(slot).expect("found").seq;
        let info = DeviceInfo {
            name: format!("snapshot {name}"),
            // The origin's size when it was taken.
            size: self.inner.served(store.size_of(seq)),
            ..self.inner.origin_info.clone()
        };
        Ok(Arc::new(SnapshotTarget {
            group: Arc::clone(self),
            slot,
            seq,
            name: name.to_owned(),
            info,
        }))
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// Runs a command on the calling executor (see [`OriginTarget`]'s `command`).
    pub async fn command_async(
        &self,
        name: &str,
        args: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        Arc::clone(&self.inner).command(name, args).await
    }

    pub fn status(&self) -> serde_json::Value {
        self.inner.status()
    }

    /// The merge driver: merges whatever snapshot is merging, then waits for the next merge;
    /// ends after [`SnapshotGroup::stop`].
    pub fn merge_task(&self) -> impl std::future::Future<Output = ()> + 'static {
        Arc::clone(&self.inner).merge_task()
    }

    /// Runs [`SnapshotGroup::merge_task`] on a thread of its own.
    pub fn start_merge_thread(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let handle = reactor::spawn_ring_thread("ublkdm-merge", move || inner.merge_task())?;
        *self.thread.lock().expect("merge thread") = Some(handle);
        Ok(())
    }

    /// Asks the merge driver to finish.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.inner.kick.notify_all();
    }

    /// Panics unless the in-memory tables agree with each other (for tests).
    pub fn check_invariants(&self) {
        self.inner.store().check();
    }
}

impl Drop for SnapshotGroup {
    fn drop(&mut self) {
        self.stop();
        let thread = self.thread.lock().expect("merge thread").take();
        if let Some(thread) = thread {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    log::error!("the snapshot merge thread: {}", err.chain().join(": "))
                }
                Err(_) => log::error!("the snapshot merge thread panicked"),
            }
        }
        self.inner.engine.shutdown();
    }
}

trait ToSector {
    fn to_sector(self) -> Sector;
}

impl ToSector for SectorCount {
    fn to_sector(self) -> Sector {
        Sector(self.0)
    }
}

async fn read_block(dev: &DeviceRef, at: Sector) -> Result<Vec<u8>> {
    let buf = crate::format::read::read_at(dev, at, BLOCK_SECTORS, BLOCK_SECTORS, || {
        format!("cannot read the COW device at {at}")
    })
    .await?;
    Ok(buf.as_slice().to_vec())
}

/// The superblock a group opens with, and whether this open created the store.
struct FoundSuperblock {
    sb: Superblock,
    fresh: bool,
}

/// Reads both superblock slots: a blank COW device gets a new store (unless it carries
/// foreign metadata and `force` is not set), otherwise the newest valid slot wins.
async fn load_superblock(
    cow: &DeviceRef,
    origin_size: SectorCount,
    options: &GroupOptions,
) -> Result<FoundSuperblock> {
    let cow_size = cow.info().size;
    if cow_size < BLOCK_SECTORS + BLOCK_SECTORS {
        return Err(Error::invalid(format!(
            "the COW device {} is too small ({} sectors): it cannot even hold the store's \
             superblocks",
            cow.info().name,
            cow_size.0
        )));
    }
    let slots = [
        read_block(cow, Sector(0)).await?,
        read_block(cow, BLOCK_SECTORS.to_sector()).await?,
    ];
    let read = slots.map(|b| Superblock::read_slot(&b));
    if read.iter().all(|d| matches!(d, Ok(Slot::Blank))) {
        if !options.force {
            refuse_foreign_cow(cow).await?;
        }
        let sb = create_store(cow, origin_size, options).await?;
        return Ok(FoundSuperblock { sb, fresh: true });
    }
    let sb = newest_superblock(read).map_err(|e| on_store(cow, e))?;
    Ok(FoundSuperblock { sb, fresh: false })
}

/// Plans a new store on the blank `cow` and writes its superblock to both slots.
async fn create_store(
    cow: &DeviceRef,
    origin_size: SectorCount,
    options: &GroupOptions,
) -> Result<Superblock> {
    let chunk = options.chunk_size.unwrap_or(DEFAULT_CHUNK);
    let layout = Layout::plan(Uuid::new_v4(), chunk, origin_size, cow.info().size)?;
    let sb = Superblock {
        layout,
        sequence: 1,
        active_area: 0,
        epoch: 1,
        version: format::VERSION,
    };
    let bytes = Arc::new(AlignedBuf::from_slice(&sb.encode()));
    for at in [Sector(0), BLOCK_SECTORS.to_sector()] {
        cow.write(at, Arc::clone(&bytes), WriteFlags::FUA)
            .await
            .map_err(|e| Error::io("cannot write the COW superblock", e))?;
    }
    Ok(sb)
}

/// The sealed superblock slot with the highest sequence (a torn slot yields to the other;
/// at least one slot is not blank). A sealed slot that is impossible fails the open, as do
/// two sealed slots that disagree on what only a compaction changes: both carry the layout
/// fixed at creation, and one sequence is one compaction's.
fn newest_superblock(slots: [Result<Slot>; 2]) -> Result<Superblock> {
    let mut sealed = Vec::with_capacity(2);
    for (slot, letter) in slots.into_iter().zip(['A', 'B']) {
        match slot.map_err(|e| e.context(format!("superblock slot {letter}")))? {
            Slot::Sealed(sb) => sealed.push((sb, letter)),
            Slot::Blank | Slot::Torn => {}
        }
    }
    if let [(a, _), (b, _)] = &sealed[..] {
        if a.layout != b.layout {
            return Err(format::corrupt(
                "superblock slots A and B describe different layouts (or stores)",
            ));
        }
        if a.sequence == b.sequence && a != b {
            return Err(format::corrupt(format!(
                "superblock slots A and B both have sequence {} but different logs",
                a.sequence
            )));
        }
    }
    sealed
        .into_iter()
        .map(|(sb, _)| sb)
        .max_by_key(|sb| sb.sequence)
        .ok_or_else(|| format::corrupt("no superblock slot passes its checksum"))
}

/// `err`, about the store on `cow`, in one line that names the device.
fn on_store(cow: &DeviceRef, err: Error) -> Error {
    let text = err.chain().join(": ");
    Error::new(
        err.kind(),
        format!("the snapshot store on {}: {text}", cow.info().name),
    )
}

/// Refuses a store replayed for another origin: the size it records (at creation, or after
/// its last growth) must be the origin's.
fn check_origin_size(store: &Store, origin_size: SectorCount, layout: &Layout) -> Result<()> {
    let recorded = store.origin_size();
    if recorded != origin_size.0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "the COW device holds the store of another origin ({recorded} sectors, this one \
                 has {}; store {})",
                origin_size.0, layout.uuid
            ),
        ));
    }
    Ok(())
}

/// Refuses an existing store that does not fit: one on a COW device that shrank, or one made
/// with another chunk size than `options` asks for. (Its origin's size is checked once the
/// log, which records growths, is replayed: [`check_origin_size`].)
fn check_layout(layout: &Layout, cow_size: SectorCount, options: &GroupOptions) -> Result<()> {
    if cow_size < layout.cow_size {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "the COW device shrank: the store's cow_size is {} sectors, the device has {}",
                layout.cow_size.0, cow_size.0
            ),
        ));
    }
    if let Some(chunk) = options.chunk_size {
        if chunk != layout.chunk {
            return Err(Error::invalid(format!(
                "the COW store was created with chunks of {} sectors, not {}",
                layout.chunk.0, chunk.0
            )));
        }
    }
    Ok(())
}

/// Applies the log of the active area to `store`, checking each record against the state
/// before it (see `state.rs`); returns the index of the first block after it. The area lies
/// within the COW device (`check_layout` ran).
async fn replay(
    cow: &DeviceRef,
    layout: &Layout,
    sb: &Superblock,
    store: &mut Store,
) -> Result<u64> {
    const READ_BLOCKS: u64 = 64;
    let start = layout.area_start(sb.active_area);
    let corrupt = |what: String| on_store(cow, format::corrupt(what));
    let mut index = 0;
    let mut number = 0u64;
    while index < layout.area_blocks {
        let n = READ_BLOCKS.min(layout.area_blocks - index);
        let at = start + SectorCount(index * BLOCK_SECTORS.0);
        let len = SectorCount(n * BLOCK_SECTORS.0);
        let max = SectorCount(READ_BLOCKS * BLOCK_SECTORS.0);
        let buf = crate::format::read::read_at(cow, at, len, max, || {
            "cannot read the COW store's log".to_owned()
        })
        .await?;
        for block in buf.as_slice().chunks(BLOCK) {
            let records = match format::decode_block(block, layout.uuid, sb.epoch, index) {
                Ok(Some(records)) => records,
                Ok(None) => return end_of_replay(cow, store, index),
                Err(what) => return Err(corrupt(format!("log block {index}: {what}"))),
            };
            for r in &records {
                store
                    .check_replay(r, store.origin_chunks())
                    .map_err(|what| {
                        corrupt(format!("log record {number} (block {index}) {what}"))
                    })?;
                store.apply(r, false);
                number += 1;
            }
            index += 1;
        }
    }
    end_of_replay(cow, store, index)
}

/// The end of a replay at block `tail`: what the whole log built must hold too.
fn end_of_replay(cow: &DeviceRef, store: &mut Store, tail: u64) -> Result<u64> {
    store
        .finish_replay()
        .map_err(|what| on_store(cow, format::corrupt(format!("the log: {what}"))))?;
    Ok(tail)
}

/// What every device of a group (the origin and each snapshot) advertises, from what is true of
/// both devices under it: a snapshot reads and writes the COW store as well as the origin, and
/// the origin reads the COW store while merging, so each serves
/// - the larger logical (and physical) block of the two, so that no request it passes on is
///   smaller than a block of either device; and, to whole such blocks, the origin's size (a
///   last part of a block is not served, and is never written);
/// - a volatile cache if either has one, so that the kernel sends FLUSH (which each device
///   passes to the devices it writes) instead of taking acknowledged writes as durable;
/// - FUA, which every path honours: passed on with the write, or made durable by the commit
///   that flushes the COW store before acknowledging a write to a chunk new to a snapshot;
/// - discard: the origin passes it on (when the origin device takes discard) once the
///   snapshots have their copies, and a snapshot releases its images of the whole chunks
///   discarded; neither promises zeroes. No write-zeroes offload (it is emulated with writes).
///
/// Fails when the origin is smaller than one such block.
fn group_info(origin: &DeviceInfo, size: SectorCount, cow: &DeviceInfo) -> Result<DeviceInfo> {
    let logical = origin.logical_block_bytes.max(cow.logical_block_bytes);
    let block = u64::from(logical) / crate::units::SECTOR_BYTES;
    assert!(
        block.is_power_of_two(),
        "a logical block of {logical} bytes"
    );
    let served = SectorCount(size.0 / block * block);
    if served.is_zero() {
        return Err(Error::invalid(format!(
            "the origin {} ({} sectors) is smaller than one {logical}-byte block of the COW \
             device {}",
            origin.name, size.0, cow.name
        )));
    }
    Ok(DeviceInfo {
        name: format!("snapshot-origin of {}", origin.name),
        size: served,
        logical_block_bytes: logical,
        physical_block_bytes: origin
            .physical_block_bytes
            .max(cow.physical_block_bytes)
            .max(logical),
        discard: true,
        write_zeroes: false,
        volatile_cache: origin.volatile_cache || cow.volatile_cache,
        fua: true,
        rotational: origin.rotational || cow.rotational,
    })
}

/// The two devices of a group and what the group's devices advertise ([`group_info`]).
struct Devices {
    origin: DeviceRef,
    cow: DeviceRef,
    info: DeviceInfo,
}

impl Inner {
    /// The shared state of a group whose store was opened and replayed.
    fn new(
        devices: Devices,
        engine: CopyEngine,
        store: Store,
        writer: LogWriter,
        layout: Layout,
    ) -> Inner {
        let Devices {
            origin,
            cow,
            info: origin_info,
        } = devices;
        let store_size = store.origin_size();
        Inner {
            origin,
            cow,
            engine,
            store: Mutex::new(store),
            writer: AsyncMutex::new(writer),
            queue: Mutex::new(Queue::default()),
            gate: RwLock::new(()),
            locks: ChunkLocks::default(),
            kick: Notify::default(),
            stopping: AtomicBool::new(false),
            merge_error: Mutex::new(None),
            size: AtomicU64::new(store_size),
            origin_info,
            layout,
        }
    }

    /// The origin's size now, in sectors (see [`Inner::size`]).
    fn origin_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// What a group device serves of `raw` sectors (an origin's, or a snapshot's): whole
    /// logical blocks of the group ([`group_info`]).
    fn served(&self, raw: u64) -> SectorCount {
        let block = self.origin_info.logical_block_sectors().0.max(1);
        SectorCount(raw / block * block)
    }

    /// Fails with `EINVAL` unless `extent` lies within what a device of `raw` sectors serves,
    /// on logical-block boundaries.
    fn check_within(&self, extent: Extent, raw: u64) -> std::io::Result<()> {
        self.origin_info.check_extent_in(extent, self.served(raw))
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("snapshot store")
    }

    /// Makes `records` durable (with whatever else is queued: group commit), then applies
    /// them to the in-memory state. When that fails, every valid snapshot becomes invalid
    /// in memory, and the next commit makes that durable first (a checkpoint).
    async fn commit(&self, records: Vec<Record>) -> std::io::Result<()> {
        let mine = {
            let mut q = self.queue.lock().expect("commit queue");
            q.records.extend(records);
            Arc::clone(&q.outcome)
        };
        let mut writer = self.writer.lock().await;
        let batch = {
            let mut q = self.queue.lock().expect("commit queue");
            match mine.get() {
                Some(true) => return Ok(()),
                Some(false) => return Err(errno(libc::EIO)),
                None => debug_assert!(Arc::ptr_eq(&mine, &q.outcome)),
            }
            q.outcome = Arc::default();
            std::mem::take(&mut q.records)
        };
        match self.write_batch(&mut writer, &batch).await {
            Ok(()) => {
                let mut store = self.store();
                for record in &batch {
                    store.apply(record, true);
                }
                drop(store);
                self.queue.lock().expect("commit queue").failed = false;
                let _ = mine.set(true);
                Ok(())
            }
            Err(err) => {
                log::error!("snapshot metadata commit failed: {err}");
                writer.checkpoint_first = true;
                // Before the store changes: whoever sees the snapshots invalid sees this.
                self.queue.lock().expect("commit queue").failed = true;
                self.store().fail_metadata(&batch);
                let _ = mine.set(false);
                Err(err)
            }
        }
    }

    /// Waits until no snapshot is invalid in memory only (see [`Inner::commit`]): call before
    /// changing the origin, which such a snapshot may still need on disk.
    async fn catch_up(&self) -> std::io::Result<()> {
        let failed = self.queue.lock().expect("commit queue").failed;
        if failed {
            self.commit(Vec::new()).await?;
        }
        Ok(())
    }

    async fn write_batch(&self, w: &mut LogWriter, records: &[Record]) -> std::io::Result<()> {
        let l = &self.layout;
        if w.checkpoint_first {
            self.compact(w).await?;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = format::encode_blocks(l.uuid, w.epoch, w.tail, records);
        if w.tail + (bytes.len() / BLOCK) as u64 > l.area_blocks {
            self.compact(w).await?;
            bytes = format::encode_blocks(l.uuid, w.epoch, w.tail, records);
            if w.tail + (bytes.len() / BLOCK) as u64 > l.area_blocks {
                return Err(errno(libc::ENOSPC));
            }
        }
        // The data the records point at is durable before the records. Only records giving
        // a COW chunk its data point at data in the COW store (an `Unmap`'s merged data is
        // flushed to the origin first; a discard's points at none).
        if records.iter().any(|r| r.cow_chunk().is_some()) {
            self.cow.flush().await?;
        }
        w.tail = self
            .write_log_blocks(w.active_area, w.tail, &bytes, WriteFlags::FUA)
            .await?;
        Ok(())
    }

    /// Writes a checkpoint of the in-memory state into the other area and switches to it.
    async fn compact(&self, w: &mut LogWriter) -> std::io::Result<()> {
        let l = &self.layout;
        if w.unsure {
            return Err(errno(libc::EIO));
        }
        let area = 1 - w.active_area;
        // An epoch no earlier compaction can have used: one whose superblock never landed left
        // its checkpoint in this area under the epoch it took, and had this one taken the same,
        // that checkpoint's blocks past the end of this one would read as log.
        let epoch = w
            .epoch
            .wrapping_add(1 + u64::from(uuid::Uuid::new_v4().as_u128() as u32));
        // No sequence is left after u64::MAX - 1 (a slot of u64::MAX is refused on open).
        let sequence = match w.sb_sequence.checked_add(1) {
            Some(s) if s < u64::MAX => s,
            _ => return Err(errno(libc::EOVERFLOW)),
        };
        let n = self.write_checkpoint(area, epoch, w.piece_blocks).await?;
        self.cow.flush().await?;
        let sb = Superblock {
            layout: l.clone(),
            sequence,
            active_area: area,
            epoch,
            version: format::VERSION,
        };
        let slot = Sector((sb.sequence % 2) * BLOCK_SECTORS.0);
        let sb_bytes = sb.encode();
        let written = self
            .cow
            .write(
                slot,
                Arc::new(AlignedBuf::from_slice(&sb_bytes)),
                WriteFlags::FUA,
            )
            .await;
        if let Err(err) = written {
            // A failed write may have landed all the same. Then this area is the live one, and
            // the next compaction (into the other area) would be fine, but one into this area
            // would overwrite the live log: find out which it is, or stop compacting.
            match read_block(&self.cow, slot).await {
                Ok(back) if back != sb_bytes => return Err(err),
                Ok(_) if self.cow.flush().await.is_ok() => {}
                _ => {
                    w.unsure = true;
                    return Err(err);
                }
            }
        }
        *w = LogWriter {
            sb_sequence: sb.sequence,
            active_area: area,
            epoch,
            tail: n,
            checkpoint_first: false,
            unsure: false,
            piece_blocks: w.piece_blocks,
        };
        self.store().compacted();
        Ok(())
    }
}

impl Inner {
    /// Writes a checkpoint of the in-memory state to the start of `area` under `epoch`, in
    /// pieces of at most `piece_blocks` blocks (so its memory is bounded whatever the number
    /// of exceptions); returns its length in blocks. Not flushed. The caller holds the log
    /// writer, so the state does not change meanwhile.
    async fn write_checkpoint(
        &self,
        area: u8,
        epoch: u64,
        piece_blocks: usize,
    ) -> std::io::Result<u64> {
        let l = &self.layout;
        let mut packer = format::LogPacker::new(l.uuid, epoch, 0);
        let mut cursor = self.store().checkpoint_cursor();
        let mut written = 0;
        loop {
            let records = self
                .store()
                .checkpoint_piece(&mut cursor, CHECKPOINT_BATCH_RECORDS);
            if records.is_empty() {
                let bytes = packer.finish();
                return self
                    .write_log_blocks(area, written, &bytes, WriteFlags::default())
                    .await;
            }
            for record in &records {
                packer.push(record);
                if packer.ready_blocks() >= piece_blocks {
                    let bytes = packer.take_blocks();
                    written = self
                        .write_log_blocks(area, written, &bytes, WriteFlags::default())
                        .await?;
                }
            }
        }
    }

    /// Writes whole log `blocks` to `area` from block `index`; returns the index after them.
    /// ENOSPC when they would pass the area's end.
    async fn write_log_blocks(
        &self,
        area: u8,
        index: u64,
        blocks: &[u8],
        flags: WriteFlags,
    ) -> std::io::Result<u64> {
        let l = &self.layout;
        assert_eq!(blocks.len() % BLOCK, 0, "log writes are whole blocks");
        let end = index + (blocks.len() / BLOCK) as u64;
        if end > l.area_blocks {
            return Err(errno(libc::ENOSPC));
        }
        let at = l.area_start(area) + SectorCount(index * BLOCK_SECTORS.0);
        let buf = Arc::new(AlignedBuf::from_slice(blocks));
        self.cow.write(at, buf, flags).await?;
        Ok(end)
    }
}

/// The origin of a group: reads and writes the origin device, copying chunks the snapshots
/// need first. Takes the group's commands.
pub struct OriginTarget {
    group: Arc<SnapshotGroup>,
    /// Which snapshots are served as devices (see [`Activation`]).
    active: Arc<Activation>,
}

impl OriginTarget {
    pub fn group(&self) -> &Arc<SnapshotGroup> {
        &self.group
    }
}

/// The owned read an [`IoBuf::Owned`] read of a group's device is: the buffer comes back
/// owned (the read paths hand back the buffer they were given).
fn owned(read: IoFuture<IoReadDone>) -> IoFuture<ReadDone> {
    Box::pin(async move {
        match read.await {
            (res, IoBuf::Owned(buf)) => (res, buf),
            (_, IoBuf::Registered(_)) => unreachable!("an owned read came back registered"),
        }
    })
}

/// A buffer of zeroes for `extent` (write-zeroes is emulated with writes).
fn zeroes(extent: Extent) -> Arc<AlignedBuf> {
    Arc::new(AlignedBuf::for_sectors(extent.len))
}

impl BlockDevice for OriginTarget {
    fn info(&self) -> &DeviceInfo {
        &self.group.inner.origin_info
    }

    /// The origin's size now: it grows by [`Target::resize`].
    fn size(&self) -> SectorCount {
        let inner = &self.group.inner;
        inner.served(inner.origin_size())
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        owned(self.read_buf(offset, IoBuf::Owned(buf)))
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        self.write_buf(offset, IoBuf::Owned(buf), flags)
    }

    /// Owned memory or a registered buffer (zero copy) alike: see [`Inner::origin_read`].
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        Box::pin(Arc::clone(&self.group.inner).origin_read(offset, buf))
    }

    /// Owned memory or a registered buffer (zero copy) alike: the copy-on-write the write
    /// needs goes through the copy engine first, then the data goes to the origin.
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        Box::pin(Arc::clone(&self.group.inner).origin_write(offset, buf, flags))
    }

    fn flush(&self) -> IoFuture<std::io::Result<()>> {
        self.group.inner.origin.flush()
    }

    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        Box::pin(Arc::clone(&self.group.inner).origin_discard(extent))
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.write(extent.start, zeroes(extent), WriteFlags::default())
    }
}

impl Target for OriginTarget {
    fn kind(&self) -> &'static str {
        "snapshot-origin"
    }

    /// Origin reads and writes never need the data (copy-on-write copies the old chunk
    /// through the copy engine): zero copy wherever the kernel offers it.
    fn zero_copy(&self) -> bool {
        true
    }

    /// Grows the origin, its snapshots keeping their size (see `grow.rs`). Blocks the
    /// calling thread on a ring of its own, as [`Target::command`] does.
    fn resize(&self, to: Option<SectorCount>) -> Result<SectorCount> {
        let inner = Arc::clone(&self.group.inner);
        reactor::try_block_on(async move { inner.grow(to).await })??;
        Ok(self.size())
    }

    fn status(&self) -> serde_json::Value {
        let mut status = self.group.status();
        self.active.annotate(&self.group.inner.store(), &mut status);
        status
    }

    /// The orderly stop (after the snapshot devices stopped): the origin and the COW store
    /// are flushed, both attempted, so that every acknowledged write is durable (a snapshot's
    /// in-place writes sit in the COW's cache until a flush).
    fn shutdown(&self) -> IoFuture<std::io::Result<()>> {
        let inner = Arc::clone(&self.group.inner);
        Box::pin(async move {
            let origin = inner.origin.flush().await;
            let cow = inner.cow.flush().await;
            origin.and(cow)
        })
    }

    /// Runs a command; those that touch devices block the calling thread on a ring of its
    /// own: call this from the control thread, never from a thread serving this group's I/O.
    fn command(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value> {
        let command = SnapshotCommand::parse(name, args)?;
        let inner = Arc::clone(&self.group.inner);
        let active = Arc::clone(&self.active);
        reactor::try_block_on(async move { inner.run_for_origin(&active, command).await })?
    }

    /// The active snapshots but a merging one (whose I/O fails until it is gone), oldest
    /// first.
    fn child_names(&self) -> Vec<String> {
        self.active.served(&self.group.inner.store())
    }

    /// The spec it was built from, with the active snapshots now.
    fn spec(&self, built_from: &TargetSpec) -> TargetSpec {
        match built_from.parse::<OriginSpec>() {
            Ok(spec) => OriginSpec {
                active: Some(self.child_names()),
                ..spec
            }
            .into(),
            Err(_) => built_from.clone(),
        }
    }

    fn open_child(&self, name: &str) -> Result<Arc<dyn Target>> {
        Ok(self.group.snapshot(name)?)
    }

    /// Deactivating, deleting or merging a snapshot ends its device.
    fn command_releases(&self, name: &str, args: &serde_json::Value) -> Vec<String> {
        let Ok(command) = SnapshotCommand::parse(name, args) else {
            return Vec::new();
        };
        match command.releases() {
            Some(snap) if self.group.inner.store().find(snap).is_some() => vec![snap.to_owned()],
            _ => Vec::new(),
        }
    }

    /// The snapshot stays active (and taken, after a create): any later command tries its
    /// device again.
    fn child_not_started(&self, name: &str) -> String {
        format!(
            "snapshot '{name}' is active but its device did not start (`snapshot activate` \
             tries again; `snapshot deactivate` forgets it)"
        )
    }

    /// A merge is refused while the origin's device is open (see
    /// [`SnapshotCommand::needs_closed_origin`]).
    fn command_needs_closed(&self, name: &str, args: &serde_json::Value) -> Option<String> {
        SnapshotCommand::parse(name, args)
            .ok()?
            .needs_closed_origin()
            .map(str::to_owned)
    }
}

/// One snapshot of a group, as a writable block device. Its I/O fails with EIO once it is
/// invalid, merging or deleted.
pub struct SnapshotTarget {
    group: Arc<SnapshotGroup>,
    slot: usize,
    seq: u64,
    name: String,
    info: DeviceInfo,
}

impl SnapshotTarget {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl BlockDevice for SnapshotTarget {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        owned(self.read_buf(offset, IoBuf::Owned(buf)))
    }

    /// Owned memory or a registered buffer (zero copy) alike: see [`Inner::snap_read`].
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        let inner = Arc::clone(&self.group.inner);
        Box::pin(inner.snap_read(self.slot, self.seq, offset, buf))
    }

    /// A write to a snapshot is served in copy mode only: a registered buffer is refused
    /// with `NeedsCopy` before any I/O, and the front end serves that request alone in copy
    /// mode (see the module doc, "Zero copy").
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        match buf {
            IoBuf::Owned(owned) => self.write(offset, owned, flags),
            IoBuf::Registered(_) => Box::pin(std::future::ready(Err(needs_copy()))),
        }
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        let inner = Arc::clone(&self.group.inner);
        Box::pin(inner.snap_write(self.slot, self.seq, offset, buf, flags))
    }

    fn flush(&self) -> IoFuture<std::io::Result<()>> {
        self.group.inner.cow.flush()
    }

    fn discard(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        let inner = Arc::clone(&self.group.inner);
        Box::pin(inner.snap_discard(self.slot, self.seq, extent))
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<std::io::Result<()>> {
        self.write(extent.start, zeroes(extent), WriteFlags::default())
    }
}

impl Target for SnapshotTarget {
    fn kind(&self) -> &'static str {
        "snapshot"
    }

    /// Reads are served in zero copy; a write falls back to copy mode for that request
    /// alone (see the module doc, "Zero copy").
    fn zero_copy(&self) -> bool {
        true
    }

    fn status(&self) -> serde_json::Value {
        let status = self.group.status();
        status["snapshots"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == self.name.as_str()).cloned())
            .unwrap_or_else(|| serde_json::json!({ "name": self.name, "state": "deleted" }))
    }
}

/// Opens the group `spec` describes (creating the store on a blank COW device), with a copy
/// engine and a merge thread of its own.
pub fn open_group(spec: &OriginSpec) -> Result<Arc<SnapshotGroup>> {
    let [origin, cow]: [UringDevice; 2] =
        open_distinct(&[&spec.device, &spec.cow], OpenOptions::default())?
            .try_into()
            .expect("two devices opened");
    let (origin, cow): (DeviceRef, DeviceRef) = (Arc::new(origin), Arc::new(cow));
    let options = GroupOptions {
        chunk_size: (spec.chunk_size_sectors != 0).then_some(SectorCount(spec.chunk_size_sectors)),
        force: spec.force,
        ..GroupOptions::default()
    };
    let engine = CopyEngine::start(CopyConfig::default())?;
    let group =
        reactor::try_block_on(
            async move { SnapshotGroup::open(origin, cow, &options, engine).await },
        )??;
    group.start_merge_thread()?;
    Ok(group)
}

/// Fails when `cow`, which holds no store of ours, holds something else we would overwrite:
/// another program's signature (a file system, a partition table, LUKS, swap, LVM, md: the
/// device layer's libblkid probe knows them) or a ublkdm mirror leg (the format layer knows
/// our magics). A mirror magic in slot B only (slot A rewritten) yields to a foreign
/// signature, which is what was made over the leg.
async fn refuse_foreign_cow(cow: &DeviceRef) -> Result<()> {
    let [a, b] = crate::format::magic::own_superblocks(cow).await?;
    let what = if let Some(owner) = a {
        owner.description().to_owned()
    } else if let Some(signature) = crate::device::probe::foreign_signature(cow).await? {
        signature.description
    } else if let Some(owner) = b {
        owner.description().to_owned()
    } else {
        return Ok(());
    };
    Err(Error::new(
        ErrorKind::Busy,
        format!(
            "the COW device {} holds {what}; --force overwrites it",
            cow.info().name
        ),
    ))
}

#[cfg(test)]
mod grow_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod zero_copy_tests;

#[cfg(test)]
mod cow_probe_tests {
    use super::*;
    use crate::device::MemDevice;

    /// Opens (creating or reopening) a group on `cow` with `options`.
    fn open(cow: &Arc<MemDevice>, options: GroupOptions) -> Result<()> {
        let origin: DeviceRef = MemDevice::new("origin", SectorCount(4096));
        let cow: DeviceRef = cow.clone();
        reactor::run_local(async move {
            let (engine, run) = CopyEngine::new_local(CopyConfig::default()).expect("engine");
            let runner = reactor::spawn(run);
            let opened = SnapshotGroup::open(origin, cow, &options, engine).await;
            let result = opened.map(drop);
            runner.await;
            result
        })
    }

    #[test]
    fn a_cow_device_too_small_for_the_superblocks_is_refused_clearly() {
        let tiny = MemDevice::new("cow", SectorCount(8));
        let err = open(&tiny, GroupOptions::default()).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("too small"), "{err}");
    }

    /// A mirror leg (even one whose superblock is damaged, or left only in slot B) is not
    /// taken for a blank COW device.
    #[test]
    fn a_cow_device_holding_a_mirror_leg_is_refused() {
        let slot = [
            crate::format::magic::MIRROR_SUPERBLOCK.as_slice(),
            &[0xa5; 504],
        ]
        .concat();
        for at in [Sector(0), Sector(8)] {
            let cow = MemDevice::new("cow", SectorCount(4096));
            cow.poke(at, &slot);
            let err = open(&cow, GroupOptions::default()).expect_err("mirror leg refused");
            assert_eq!(err.kind(), ErrorKind::Busy);
            assert!(err.to_string().contains("a ublkdm mirror leg"), "{err}");
        }
    }

    #[test]
    fn a_cow_device_with_a_file_system_is_refused() {
        let cow = MemDevice::new("cow", SectorCount(4096));
        assert!(
            open(&cow, GroupOptions::default()).is_ok(),
            "a blank device is taken"
        );
        assert!(
            open(&cow, GroupOptions::default()).is_ok(),
            "our own store is reopened"
        );
        let (_dir, file) = crate::device::probe::tests::scratch_file(2 << 20);
        if !crate::device::probe::tests::run_tool("mkfs.ext4", &["-q", "-F"], &file, "") {
            return;
        }
        let cow = MemDevice::new("cow", SectorCount(4096));
        cow.poke(Sector(0), &std::fs::read(&file).expect("read image"));
        let err = open(&cow, GroupOptions::default()).expect_err("ext4 refused");
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert!(err.to_string().contains("an ext4 file system"), "{err}");
        let force = GroupOptions {
            force: true,
            ..GroupOptions::default()
        };
        assert!(open(&cow, force).is_ok(), "--force overwrites it");
    }
}
