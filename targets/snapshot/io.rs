//! I/O paths: origin and snapshot reads and writes, copy-on-write, merge steps, and the
//! per-chunk locks that order them (see the module doc of [`super`]). Reads and origin
//! writes take owned memory or a registered buffer alike (zero copy, see "Zero copy" there);
//! copies always go through the copy engine in memory of its own.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use smol::lock::{RwLock, RwLockReadGuardArc, RwLockWriteGuardArc};

use crate::task::join_all;

use super::format::{slot_number, Reason, Record};
use super::Inner;
use crate::copy::{CopyJob, Location, Priority};
use crate::device::{
    errno, AlignedBuf, DeviceRef, IoBuf, IoReadDone, ReadDone, RegBuf, WriteBuf, WriteFlags,
};
use crate::units::{Extent, Sector, SectorCount};

/// Reader/writer locks per chunk, created on demand and dropped when unused.
#[derive(Default)]
pub struct ChunkLocks {
    map: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

enum Held {
    Shared(#[allow(dead_code)] RwLockReadGuardArc<()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuardArc<()>),
}

/// A held chunk lock.
pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunk: u64,
    lock: Arc<RwLock<()>>,
    held: Option<Held>,
}

impl ChunkLocks {
    /// Whether `chunk` is locked exclusively now, or a writer waits for it: for assertions
    /// that the caller holds it exclusively (then this is always true).
    fn is_exclusive(&self, chunk: u64) -> bool {
        let map = self.map.lock().expect("chunk locks");
        map.get(&chunk)
            .is_some_and(|lock| lock.try_read().is_none())
    }

    fn get(&self, chunk: u64) -> Arc<RwLock<()>> {
        let mut map = self.map.lock().expect("chunk locks");
        Arc::clone(map.entry(chunk).or_default())
    }

    pub async fn shared(&self, chunk: u64) -> ChunkGuard<'_> {
        let lock = self.get(chunk);
        let held = Held::Shared(lock.read_arc().await);
        ChunkGuard {
            locks: self,
            chunk,
            lock,
            held: Some(held),
        }
    }

    pub async fn exclusive(&self, chunk: u64) -> ChunkGuard<'_> {
        let lock = self.get(chunk);
        let held = Held::Exclusive(lock.write_arc().await);
        ChunkGuard {
            locks: self,
            chunk,
            lock,
            held: Some(held),
        }
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut map = self.locks.map.lock().expect("chunk locks");
        // The map's reference and ours: nobody else holds or waits for this lock.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.chunk);
        }
    }
}

/// One chunk's part of a request.
struct Piece {
    chunk: u64,
    /// Offset in the chunk and length.
    offset: SectorCount,
    len: SectorCount,
    /// Offset in the request's buffer, bytes.
    buf_at: usize,
}

/// What a snapshot write to a chunk has to do.
enum WritePlan {
    InPlace(u64),
    /// Take a chunk of its own, copying the image from `source` (origin chunk if `None`).
    Fresh(Option<u64>),
}

fn eio() -> io::Error {
    errno(libc::EIO)
}

/// The most bytes one background merge step takes: its chunks are locked, copied back at
/// once, flushed and committed together.
/// Chunks a discard handles at once (its pieces, locks and records are held for a step):
/// a discard may span a gigabyte.
const DISCARD_STEP_CHUNKS: u64 = 256;

const MERGE_STEP_BYTES: u64 = 4 << 20;
/// And the most chunks (small chunks: one `Unmap` record each, in one commit).
const MERGE_STEP_CHUNKS: u64 = 256;
/// Caps a merge step's chunks below [`MERGE_STEP_CHUNKS`] (a test knob, read once per process:
/// the VM tests slow a merge down to interrupt it).
const MERGE_STEP_ENV: &str = "UBLKDM_MERGE_STEP_CHUNKS";

/// The most chunks one merge step takes: [`MERGE_STEP_CHUNKS`], or less if [`MERGE_STEP_ENV`]
/// says so.
fn merge_step_cap() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var(MERGE_STEP_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(MERGE_STEP_CHUNKS, |n| n.clamp(1, MERGE_STEP_CHUNKS))
    })
}

/// Splits a request's pieces, by their sources (a COW chunk, or `None`: the origin), into runs
/// contiguous on one device: one read each.
fn read_groups(sources: &[Option<u64>]) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    for i in 0..sources.len() {
        let joins = i > 0
            && match (sources[i - 1], sources[i]) {
                (None, None) => true,
                (Some(a), Some(b)) => b == a + 1,
                _ => false,
            };
        match groups.last_mut() {
            Some(g) if joins => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    groups
}

/// Splits `pairs` (origin chunk, COW chunk), in order, into runs that are contiguous on both
/// devices: one copy job each.
fn runs(pairs: &[(u64, u64)]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=pairs.len() {
        let (c, k) = pairs[i - 1];
        if i == pairs.len() || pairs[i] != (c + 1, k + 1) {
            out.push(start..i);
            start = i;
        }
    }
    out
}

/// `Invalidate` records for every snapshot of `slots`.
fn invalidations(slots: &BTreeSet<usize>, reason: Reason) -> Vec<Record> {
    slots
        .iter()
        .map(|&slot| Record::Invalidate {
            slot: slot_number(slot),
            reason,
        })
        .collect()
}

impl Inner {
    fn chunk_len(&self, c: u64) -> SectorCount {
        let chunk = self.layout.chunk.0;
        let start = c.checked_mul(chunk).expect("chunk offset overflow");
        let size = self.origin_size();
        assert!(start < size, "chunk {c} past the origin");
        SectorCount(chunk.min(size - start))
    }

    fn origin_chunk(&self, c: u64) -> Extent {
        Extent::new(Sector(c * self.layout.chunk.0), self.chunk_len(c))
    }

    /// The length of origin chunk `c`'s image in the COW store: the chunk's length in whole
    /// blocks of the COW device. Only the last origin chunk can be shorter than a chunk, and
    /// then it can also end inside a COW block (an origin of 512-byte blocks beside a COW store
    /// of 4 KiB ones); the rest of that block is padding, never read as data. A data chunk
    /// (chunk aligned, at least 4 KiB) always has room for it.
    fn cow_len(&self, c: u64) -> SectorCount {
        let block = self.cow.info().logical_block_sectors().0.max(1);
        let len = SectorCount(self.chunk_len(c).0.next_multiple_of(block));
        assert!(
            len <= self.layout.chunk,
            "chunk {c}'s image outgrows a COW chunk"
        );
        len
    }

    fn cow_chunk(&self, k: u64, c: u64) -> Extent {
        assert!(k < self.layout.data_chunks, "COW chunk {k} past the store");
        let start = self.layout.data_start + SectorCount(k * self.layout.chunk.0);
        Extent::new(start, self.cow_len(c))
    }

    /// Reads every piece of a request into its place in `buf`: piece `i` from COW chunk
    /// `sources[i]` when it is mapped there, else from the origin. Neighbours that are
    /// contiguous on one device are read as one, and all reads are in flight at once; a
    /// request that is one such run reads straight into `buf`. Owned memory reads each other
    /// run into a buffer of its own and copies it into place; a registered buffer (zero copy)
    /// has each run read straight into its part of it ([`RegBuf::slice`]).
    async fn read_pieces(
        &self,
        pieces: &[Piece],
        sources: &[Option<u64>],
        buf: IoBuf,
    ) -> IoReadDone {
        assert_eq!(sources.len(), pieces.len(), "a source per piece");
        let groups = read_groups(sources);
        if let [g] = groups.as_slice() {
            let (dev, at, _) = self.read_place(pieces, sources, g);
            return dev.read_buf(at, buf).await;
        }
        match buf {
            IoBuf::Owned(owned) => {
                let (res, owned) = self
                    .read_groups_owned(pieces, sources, &groups, owned)
                    .await;
                (res, IoBuf::Owned(owned))
            }
            IoBuf::Registered(reg) => {
                let res = self
                    .read_groups_registered(pieces, sources, &groups, &reg)
                    .await;
                (res, IoBuf::Registered(reg))
            }
        }
    }

    /// Where the run of pieces `g` is read from: the device, the sector, the length.
    fn read_place(
        &self,
        pieces: &[Piece],
        sources: &[Option<u64>],
        g: &Range<usize>,
    ) -> (&DeviceRef, Sector, SectorCount) {
        let p = &pieces[g.start];
        let len = SectorCount(pieces[g.clone()].iter().map(|p| p.len.0).sum());
        match sources[g.start] {
            Some(k) => (&self.cow, self.cow_chunk(k, p.chunk).start + p.offset, len),
            None => (
                &self.origin,
                self.origin_chunk(p.chunk).start + p.offset,
                len,
            ),
        }
    }

    /// [`Inner::read_pieces`] of several runs into owned memory.
    async fn read_groups_owned(
        &self,
        pieces: &[Piece],
        sources: &[Option<u64>],
        groups: &[Range<usize>],
        mut buf: AlignedBuf,
    ) -> ReadDone {
        let reads = groups
            .iter()
            .map(|g| {
                let (dev, at, len) = self.read_place(pieces, sources, g);
                dev.read(at, AlignedBuf::for_sectors(len))
            })
            .collect();
        let mut result = Ok(());
        for (g, (res, piece)) in groups.iter().zip(join_all(reads).await) {
            if let Err(e) = res {
                result = result.and(Err(e));
                continue;
            }
            let at = pieces[g.start].buf_at;
            assert!(
                at + piece.len() <= buf.len(),
                "a read group outside the request"
            );
            buf.as_mut_slice()[at..at + piece.as_slice().len()].copy_from_slice(piece.as_slice());
        }
        (result, buf)
    }

    /// [`Inner::read_pieces`] of several runs into their parts of one registered buffer.
    async fn read_groups_registered(
        &self,
        pieces: &[Piece],
        sources: &[Option<u64>],
        groups: &[Range<usize>],
        reg: &RegBuf,
    ) -> io::Result<()> {
        let reads = groups
            .iter()
            .map(|g| {
                let (dev, at, len) = self.read_place(pieces, sources, g);
                let from = u32::try_from(pieces[g.start].buf_at).expect("inside a u32 buffer");
                let bytes = u32::try_from(len.to_bytes()).expect("inside a u32 buffer");
                // The pieces tile the request, whose length is the buffer's.
                let part = reg
                    .slice(from, bytes)
                    .expect("a read group inside the request");
                dev.read_buf(at, IoBuf::Registered(part))
            })
            .collect();
        let mut result = Ok(());
        for (res, _) in join_all(reads).await {
            result = result.and(res);
        }
        result
    }

    /// Every piece's chunk locked shared, in ascending order (as every request takes them).
    async fn lock_shared(&self, pieces: &[Piece]) -> Vec<ChunkGuard<'_>> {
        let mut guards = Vec::with_capacity(pieces.len());
        for p in pieces {
            guards.push(self.locks.shared(p.chunk).await);
        }
        guards
    }

    fn pieces(&self, extent: Extent) -> Vec<Piece> {
        let chunk = self.layout.chunk.0;
        let mut out = Vec::new();
        let mut at = extent.start.0;
        while at < extent.end().0 {
            let c = at / chunk;
            let end = ((c + 1) * chunk).min(extent.end().0);
            assert!(end > at, "an empty piece at sector {at}");
            out.push(Piece {
                chunk: c,
                offset: SectorCount(at - c * chunk),
                len: SectorCount(end - at),
                buf_at: ((at - extent.start.0) * 512) as usize,
            });
            at = end;
        }
        out
    }

    async fn copy(&self, from: Location, to: Location, priority: Priority, flush: bool) -> bool {
        let mut job = CopyJob::copy(from, vec![to]).with_priority(priority);
        if flush {
            job = job.flushing();
        }
        matches!(self.engine.copy(job).await, Ok(done) if done.is_ok())
    }

    async fn invalidate(&self, slot: usize, reason: Reason) -> io::Result<()> {
        self.commit(invalidations(&BTreeSet::from([slot]), reason))
            .await
    }

    /// The origin extent and the COW extent of a run of `pairs` (see [`runs`]). They differ in
    /// length only when the run ends with a last chunk that ends inside a COW block.
    fn run_extents(&self, pairs: &[(u64, u64)]) -> (Extent, Extent) {
        assert!(!pairs.is_empty(), "an empty run");
        let (c, k) = pairs[0];
        let len = SectorCount(pairs.iter().map(|&(c, _)| self.chunk_len(c).0).sum());
        let cow_len = SectorCount(pairs.iter().map(|&(c, _)| self.cow_len(c).0).sum());
        (
            Extent::new(self.origin_chunk(c).start, len),
            Extent::new(self.cow_chunk(k, c).start, cow_len),
        )
    }

    /// Copies `origin` to `cow` (`to_cow`) or back, through the copy engine. When `cow` is
    /// longer (it ends with the padded block of a last chunk, see [`Inner::cow_len`]), the
    /// engine copies the whole COW blocks and that last block is copied here: to the COW store
    /// padded with zeroes, back to the origin only the part the origin has.
    async fn copy_extents(
        &self,
        origin: Extent,
        cow: Extent,
        to_cow: bool,
        priority: Priority,
    ) -> bool {
        assert!(
            origin.len <= cow.len,
            "{origin} does not fit its COW image {cow}"
        );
        let block = self.cow.info().logical_block_sectors().0.max(1);
        let whole = SectorCount(origin.len.0 / block * block);
        let tail = origin.len - whole;
        assert_eq!(
            cow.len,
            whole + SectorCount(if tail.is_zero() { 0 } else { block }),
            "a COW image is the origin extent in whole COW blocks"
        );
        let head = async {
            if whole.is_zero() {
                return true;
            }
            let o = Location::new(&self.origin, Extent::new(origin.start, whole));
            let w = Location::new(&self.cow, Extent::new(cow.start, whole));
            let (from, to) = if to_cow { (o, w) } else { (w, o) };
            self.copy(from, to, priority, false).await
        };
        let last = async {
            if tail.is_zero() {
                return true;
            }
            let o = Extent::new(origin.start + whole, tail);
            let w = Extent::new(cow.start + whole, SectorCount(block));
            self.copy_last_block(o, w, to_cow).await.is_ok()
        };
        let (head, last) = smol::future::zip(head, last).await;
        head && last
    }

    /// Copies the short extent `origin` into the COW block `cow` (zero padded) or back.
    async fn copy_last_block(&self, origin: Extent, cow: Extent, to_cow: bool) -> io::Result<()> {
        let bytes = origin.len.to_usize_bytes();
        if to_cow {
            let (res, part) = self
                .origin
                .read(origin.start, AlignedBuf::for_sectors(origin.len))
                .await;
            res?;
            let mut padded = AlignedBuf::for_sectors(cow.len);
            padded.as_mut_slice()[..bytes].copy_from_slice(part.as_slice());
            self.cow
                .write(cow.start, Arc::new(padded), WriteFlags::default())
                .await
        } else {
            let (res, block) = self
                .cow
                .read(cow.start, AlignedBuf::for_sectors(cow.len))
                .await;
            res?;
            let part = AlignedBuf::from_slice(&block.as_slice()[..bytes]);
            self.origin
                .write(origin.start, Arc::new(part), WriteFlags::default())
                .await
        }
    }

    /// Copies origin chunk `c` to COW chunk `k` for every `(c, k)` of `pairs` (`to_cow`), or
    /// back; runs contiguous on both devices go as one job, all jobs at once. Says, per pair,
    /// whether its copy succeeded.
    async fn copy_chunks(
        &self,
        pairs: &[(u64, u64)],
        to_cow: bool,
        priority: Priority,
    ) -> Vec<bool> {
        let runs = runs(pairs);
        let jobs = runs
            .iter()
            .map(|r| {
                let (o, w) = self.run_extents(&pairs[r.clone()]);
                self.copy_extents(o, w, to_cow, priority)
            })
            .collect();
        let mut ok = vec![false; pairs.len()];
        assert_eq!(
            runs.last().map_or(0, |r| r.end),
            pairs.len(),
            "runs cover the pairs"
        );
        for (r, good) in runs.into_iter().zip(join_all(jobs).await) {
            ok[r].fill(good);
        }
        ok
    }

    /// Whether an origin write to chunk `c` must first copy or merge it.
    fn origin_needs_work(&self, c: u64) -> bool {
        self.store().origin_needs_work(c)
    }

    /// Copies each origin chunk of `chunks` for every valid snapshot that still reads it from
    /// the origin (one copy and one record per chunk for all of them, however many: a `Copy`
    /// serves every snapshot up to the newest that needs it): every copy at once, runs of
    /// neighbours as one job, then one commit for all the records. Call with the chunks
    /// locked exclusively. Errors only when the metadata cannot be written.
    async fn preserve(&self, chunks: &[u64], priority: Priority) -> io::Result<()> {
        let (plan, newest, overflow) = self.plan_copies(chunks);
        if plan.is_empty() && overflow.is_empty() {
            return Ok(());
        }
        let ok = self.copy_chunks(&plan, true, priority).await;
        let mut failed = BTreeSet::new();
        let mut copies = Vec::with_capacity(plan.len());
        {
            let mut store = self.store();
            for ((&(c, k), newest), ok) in plan.iter().zip(newest).zip(ok) {
                if ok {
                    copies.push(Record::Copy {
                        cow: k,
                        origin: c,
                        newest,
                        merging: store.merging_excluded(c, newest),
                    });
                } else {
                    store.unreserve(k);
                    failed.extend(store.needing_slots(c));
                }
            }
        }
        // The invalidations first: a copy that then serves no valid snapshot is dropped as it
        // is applied.
        let failed: BTreeSet<usize> = failed.difference(&overflow).copied().collect();
        let mut records = invalidations(&overflow, Reason::Overflow);
        records.extend(invalidations(&failed, Reason::CopyError));
        records.extend(copies);
        self.commit(records).await
    }

    /// The copies an origin write to `chunks` needs: (origin chunk, reserved COW chunk) and
    /// the newest snapshot each serves, and the slots to invalidate for want of room.
    fn plan_copies(&self, chunks: &[u64]) -> (Vec<(u64, u64)>, Vec<u64>, BTreeSet<usize>) {
        let mut plan = Vec::new();
        let mut newest = Vec::new();
        let mut overflow = BTreeSet::new();
        let mut store = self.store();
        for &c in chunks {
            assert!(self.locks.is_exclusive(c), "chunk {c} preserved unlocked");
            let Some(mut last) = store.needs_copy(c) else {
                continue;
            };
            if !overflow.is_empty() {
                // Snapshots about to be invalidated need no copy.
                let slots = store.needing_slots(c);
                let Some(&slot) = slots.iter().rev().find(|&s| !overflow.contains(s)) else {
                    continue;
                };
                last = store.snap(slot).expect("needing").seq;
            }
            match store.alloc() {
                Some(k) => {
                    plan.push((c, k));
                    newest.push(last);
                }
                None => overflow.extend(store.needing_slots(c)),
            }
        }
        (plan, newest, overflow)
    }

    /// Merges `pairs` (origin chunk, the COW chunk merging snapshot `m` holds it in) into the
    /// origin: first the copies the other snapshots need, then every chunk back to the
    /// origin at once, one origin flush and one commit of their `Unmap`s. Call with the
    /// chunks locked exclusively. On a copy error the chunks that did copy are still
    /// recorded, and the merge error is set.
    pub(super) async fn merge_chunks(
        &self,
        pairs: &[(u64, u64)],
        m: usize,
        priority: Priority,
    ) -> io::Result<()> {
        let chunks: Vec<u64> = pairs.iter().map(|&(c, _)| c).collect();
        self.preserve(&chunks, priority).await?;
        self.catch_up().await?;
        let ok = self.copy_chunks(pairs, false, priority).await;
        let mut result = Ok(());
        if let Some(bad) = ok.iter().position(|ok| !ok) {
            *self.merge_error.lock().expect("merge error") = Some(format!(
                "copying chunk {} back to the origin failed",
                pairs[bad].0
            ));
            result = Err(eio());
        }
        let merged: Vec<Record> = pairs
            .iter()
            .zip(ok)
            .filter(|(_, ok)| *ok)
            .map(|(&(c, _), _)| Record::Unmap {
                slot: slot_number(m),
                origin: c,
            })
            .collect();
        if merged.is_empty() {
            return result;
        }
        if let Err(e) = self.origin.flush().await {
            *self.merge_error.lock().expect("merge error") =
                Some("flushing the merged chunks to the origin failed".to_owned());
            return Err(e);
        }
        self.commit(merged).await?;
        result
    }

    /// An origin read into owned memory or a registered buffer (zero copy: the reads go to
    /// the origin, or while merging to the COW store, with parts of the one buffer).
    pub(super) async fn origin_read(self: Arc<Self>, offset: Sector, buf: IoBuf) -> IoReadDone {
        let extent = match buf.sectors() {
            Ok(len) => Extent::new(offset, len),
            Err(e) => return (Err(e), buf),
        };
        if let Err(e) = self.check_within(extent, self.origin_size()) {
            return (Err(e), buf);
        }
        let _gate = self.gate.read().await;
        if self.store().merging().is_none() {
            return self.origin.read_buf(offset, buf).await;
        }
        // Merging: unmerged chunks read from the COW store.
        let pieces = self.pieces(extent);
        let _guards = self.lock_shared(&pieces).await;
        let sources: Vec<_> = {
            let store = self.store();
            pieces.iter().map(|p| store.unmerged(p.chunk)).collect()
        };
        self.read_pieces(&pieces, &sources, buf).await
    }

    /// An origin write: its chunks are prepared ([`Inner::prepare_origin_change`]: the
    /// copies the snapshots need go through the copy engine in memory of its own), then it is
    /// passed on, with owned memory or a registered buffer alike (zero copy: the new data is
    /// never seen).
    pub(super) async fn origin_write(
        self: Arc<Self>,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let extent = Extent::new(offset, buf.sectors()?);
        self.check_within(extent, self.origin_size())?;
        let _gate = self.gate.read().await;
        let _guards = self.prepare_origin_change(extent).await?;
        self.engine.note_foreground_io();
        self.origin.write_buf(offset, buf, flags).await
    }

    /// An origin discard, a step of at most [`DISCARD_STEP_CHUNKS`] chunks at a time: each
    /// step is prepared as a write is, then passed on. An origin device that takes no discard
    /// is left as it is, so nothing needs preparing (the discard promises no content).
    pub(super) async fn origin_discard(self: Arc<Self>, extent: Extent) -> io::Result<()> {
        self.check_within(extent, self.origin_size())?;
        if !self.origin.info().discard {
            return Ok(());
        }
        for step in self.discard_steps(extent) {
            let _gate = self.gate.read().await;
            let _guards = self.prepare_origin_change(step).await?;
            self.origin.discard(step).await?;
        }
        Ok(())
    }

    /// Makes the origin's `extent` ready to change, and returns the chunk locks to hold until
    /// it has. When none of its chunks needs a copy or a merge (no snapshot, or every
    /// snapshot already has its own image of them: a rewrite) that takes no chunk lock: under
    /// the gate (which the caller holds) nothing can make such a chunk need work again (that
    /// takes a snapshot or a merge start), and whatever copied or merged it finished its I/O
    /// before the record that says so. Otherwise it locks its chunks (those to copy or merge
    /// exclusively), and merges and copies them in one batch each.
    async fn prepare_origin_change(&self, extent: Extent) -> io::Result<Vec<ChunkGuard<'_>>> {
        let pieces = self.pieces(extent);
        let busy = {
            let store = self.store();
            pieces.iter().any(|p| store.origin_needs_work(p.chunk))
        };
        let mut guards = Vec::new();
        if busy {
            let mut work = Vec::new();
            for p in &pieces {
                let c = p.chunk;
                let shared = self.locks.shared(c).await;
                if !self.origin_needs_work(c) {
                    guards.push(shared);
                    continue;
                }
                drop(shared);
                guards.push(self.locks.exclusive(c).await);
                work.push(c);
            }
            let unmerged = {
                let store = self.store();
                store.merging().map(|m| {
                    let pairs: Vec<_> = work
                        .iter()
                        .filter_map(|&c| store.unmerged(c).map(|k| (c, k)))
                        .collect();
                    (m, pairs)
                })
            };
            if let Some((m, pairs)) = unmerged.filter(|(_, p)| !p.is_empty()) {
                self.merge_chunks(&pairs, m, Priority::Foreground).await?;
            }
            if let Err(e) = self.preserve(&work, Priority::Foreground).await {
                // The snapshots that needed them are invalid now (`catch_up` records that).
                log::warn!("an origin change goes on without copying its chunks: {e}");
            }
        }
        self.catch_up().await?;
        Ok(guards)
    }

    /// `extent` cut at chunk boundaries into steps of at most [`DISCARD_STEP_CHUNKS`] chunks.
    fn discard_steps(&self, extent: Extent) -> Vec<Extent> {
        let step = SectorCount(self.layout.chunk.0 * DISCARD_STEP_CHUNKS);
        let mut steps = Vec::new();
        let mut at = extent.start;
        while at < extent.end() {
            let boundary = Sector((at.0 / step.0 + 1) * step.0).min(extent.end());
            steps.push(Extent::new(at, SectorCount(boundary.0 - at.0)));
            at = boundary;
        }
        steps
    }

    /// A snapshot read into owned memory or a registered buffer (zero copy: each chunk's
    /// part read from the origin or the COW store straight into its part of the buffer).
    pub(super) async fn snap_read(
        self: Arc<Self>,
        slot: usize,
        seq: u64,
        offset: Sector,
        buf: IoBuf,
    ) -> IoReadDone {
        let extent = match buf.sectors() {
            Ok(len) => Extent::new(offset, len),
            Err(e) => return (Err(e), buf),
        };
        let size = self.store().size_of(seq);
        if let Err(e) = self.check_within(extent, size) {
            return (Err(e), buf);
        }
        let _gate = self.gate.read().await;
        let pieces = self.pieces(extent);
        let _guards = self.lock_shared(&pieces).await;
        let sources: Vec<_> = {
            let store = self.store();
            if !store.is_valid(slot, seq) {
                return (Err(eio()), buf);
            }
            pieces.iter().map(|p| store.image(seq, p.chunk)).collect()
        };
        let (res, buf) = self.read_pieces(&pieces, &sources, buf).await;
        if let Err(e) = res {
            return (Err(e), buf);
        }
        // Invalidated meanwhile: what was read may come from a released chunk.
        if !self.store().is_valid(slot, seq) {
            return (Err(eio()), buf);
        }
        (Ok(()), buf)
    }

    pub(super) async fn snap_write(
        self: Arc<Self>,
        slot: usize,
        seq: u64,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let extent = Extent::new(offset, buf.sectors());
        self.check_within(extent, self.store().size_of(seq))?;
        let _gate = self.gate.read().await;
        for p in self.pieces(extent) {
            let _lock = self.locks.exclusive(p.chunk).await;
            let bytes = p.len.to_usize_bytes();
            let data = Arc::new(AlignedBuf::from_slice(
                &buf.as_slice()[p.buf_at..p.buf_at + bytes],
            ));
            self.snap_write_piece(slot, seq, &p, data, flags).await?;
        }
        if !self.store().is_valid(slot, seq) {
            return Err(eio());
        }
        Ok(())
    }

    /// A snapshot discard, a step of at most [`DISCARD_STEP_CHUNKS`] chunks at a time: the
    /// snapshot's image of each whole chunk of the step is released (an `Unmap`, so it reads
    /// the origin's image again until the origin changes it); parts of chunks are left as they
    /// are, since a discard promises no content.
    pub(super) async fn snap_discard(
        self: Arc<Self>,
        slot: usize,
        seq: u64,
        extent: Extent,
    ) -> io::Result<()> {
        self.check_within(extent, self.store().size_of(seq))?;
        for step in self.discard_steps(extent) {
            let _gate = self.gate.read().await;
            let whole: Vec<u64> = self
                .pieces(step)
                .iter()
                .filter(|p| p.len == self.chunk_len(p.chunk))
                .map(|p| p.chunk)
                .collect();
            let mut guards = Vec::with_capacity(whole.len());
            for &c in &whole {
                guards.push(self.locks.exclusive(c).await);
            }
            let records: Vec<Record> = {
                let store = self.store();
                if !store.is_valid(slot, seq) {
                    return Err(eio());
                }
                whole
                    .iter()
                    .filter(|&&c| store.image(seq, c).is_some())
                    .map(|&origin| Record::Unmap {
                        slot: slot_number(slot),
                        origin,
                    })
                    .collect()
            };
            if !records.is_empty() {
                self.commit(records).await?;
            }
        }
        Ok(())
    }

    async fn snap_write_piece(
        &self,
        slot: usize,
        seq: u64,
        p: &Piece,
        data: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let c = p.chunk;
        let plan = {
            let mut store = self.store();
            if !store.is_valid(slot, seq) {
                return Err(eio());
            }
            match store.exclusive(seq, c) {
                Some(k) => {
                    store.begin_inplace(k);
                    WritePlan::InPlace(k)
                }
                None => WritePlan::Fresh(store.image(seq, c)),
            }
        };
        match plan {
            WritePlan::InPlace(k) => {
                let at = self.cow_chunk(k, c).start + p.offset;
                let res = self.cow.write(at, data, flags).await;
                self.store().end_inplace(k);
                res
            }
            WritePlan::Fresh(source) => {
                let Some(k) = self.store().alloc() else {
                    self.invalidate(slot, Reason::Overflow).await?;
                    return Err(eio());
                };
                if p.len != self.chunk_len(c) {
                    let to = self.cow_chunk(k, c);
                    let copied = match source {
                        Some(old) => {
                            let from = Location::new(&self.cow, self.cow_chunk(old, c));
                            let to = Location::new(&self.cow, to);
                            self.copy(from, to, Priority::Foreground, false).await
                        }
                        None => {
                            let from = self.origin_chunk(c);
                            self.copy_extents(from, to, true, Priority::Foreground)
                                .await
                        }
                    };
                    if !copied {
                        self.store().unreserve(k);
                        self.invalidate(slot, Reason::CopyError).await?;
                        return Err(eio());
                    }
                }
                let at = self.cow_chunk(k, c).start + p.offset;
                if let Err(e) = self.cow.write(at, data, WriteFlags::default()).await {
                    self.store().unreserve(k);
                    return Err(e);
                }
                self.commit(vec![Record::Private {
                    cow: k,
                    origin: c,
                    slot: slot_number(slot),
                }])
                .await
            }
        }
    }

    /// The merge driver (see [`super::SnapshotGroup::merge_task`]).
    pub(super) async fn merge_task(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let seen = self.kick.generation();
            let failed = self.merge_error.lock().expect("merge error").is_some();
            let step = {
                let store = self.store();
                store
                    .merging()
                    .map(|m| (m, store.next_unmerged(1).first().copied()))
            };
            match step {
                Some(_) if failed => self.kick.wait(seen).await,
                None => self.kick.wait(seen).await,
                Some((m, None)) => {
                    let _gate = self.gate.read().await;
                    let still = self.store().merging() == Some(m);
                    if still
                        && self
                            .commit(vec![Record::Delete {
                                slot: slot_number(m),
                            }])
                            .await
                            .is_err()
                    {
                        self.set_merge_error("the merge could not be recorded");
                    }
                }
                Some((m, Some(_))) => {
                    let _gate = self.gate.read().await;
                    // The next chunks, in origin order, up to a step.
                    let step = (MERGE_STEP_BYTES / self.layout.chunk.to_bytes())
                        .clamp(1, merge_step_cap()) as usize;
                    let next: Vec<u64> = {
                        let store = self.store();
                        if store.merging() == Some(m) {
                            store.next_unmerged(step)
                        } else {
                            Vec::new()
                        }
                    };
                    let mut guards = Vec::with_capacity(next.len());
                    for &c in &next {
                        guards.push(self.locks.exclusive(c).await);
                    }
                    // A foreground write may have merged some meanwhile.
                    let pairs: Vec<_> = {
                        let store = self.store();
                        if store.merging() == Some(m) {
                            next.iter()
                                .filter_map(|&c| store.unmerged(c).map(|k| (c, k)))
                                .collect()
                        } else {
                            Vec::new()
                        }
                    };
                    if !pairs.is_empty()
                        && self
                            .merge_chunks(&pairs, m, Priority::Background)
                            .await
                            .is_err()
                    {
                        self.set_merge_error("a merge step failed");
                    }
                }
            }
        }
    }

    fn set_merge_error(&self, text: &str) {
        let mut err = self.merge_error.lock().expect("merge error");
        err.get_or_insert_with(|| text.to_owned());
    }
}
