//! The persistent dirty log: a write-intent bitmap, one bit per region (1 = dirty), kept in a
//! metadata area of a block device and committed atomically.
//!
//! # On-disk layout
//!
//! The area (4 KiB aligned) holds two slots, A at its start and B at `start + half`, where
//! `half` is half the area rounded down to 4 KiB. Each slot holds one whole *image*
//! ([`image_sectors`] long: a 512-byte header, the bitmap, zero padding to 4 KiB). All integers
//! are little-endian:
//!
//! | offset | size | field                                                              |
//! |--------|------|--------------------------------------------------------------------|
//! | 0      | 8    | magic `UBDMDLOG`                                                   |
//! | 8      | 4    | version, 1                                                         |
//! | 12     | 4    | crc32c of the whole image, computed with this field zero           |
//! | 16     | 16   | UUID of the log (names the mirror it belongs to)                   |
//! | 32     | 8    | sequence number: one more than any image written before            |
//! | 40     | 8    | event counter (see [`DirtyLog::bump_event`])                       |
//! | 48     | 8    | device size, sectors                                               |
//! | 56     | 8    | region size, sectors                                               |
//! | 64     | 8    | region count                                                       |
//! | 72     | 8    | area length, sectors (the area this log was created in)            |
//! | 80     | 432  | zero                                                               |
//! | 512    | n    | bitmap, `n = ceil(count / 8)`: region `i` is bit `i % 8` of byte `i / 8` |
//! |        |      | (least significant bit first); bits past the count are zero        |
//!
//! # Atomic commits
//!
//! A commit writes the whole new image, with the next sequence number, into the slot that
//! does *not* hold the newest image known to be durable, then flushes. Whatever part of that
//! write lands before a crash, torn at any sector, the other slot still holds a complete
//! image, and the crc rejects the torn one; [`DirtyLog::open`] takes the valid slot with the
//! highest sequence. After a failed commit the next one goes to the same slot again, since
//! the untouched slot is still the only one known good.
//!
//! # Reading untrusted images
//!
//! An image read from disk is untrusted (a crc guards against accidents only). A slot is
//! valid when its header bounds every count and size before anything is sized from it (the
//! region count at most `MAX_REGION_COUNT`, its image within half the area, the counters at
//! most 2^62), its crc matches, it was written for this area's length, its geometry is one
//! `RegionGeometry::new` accepts and has its region count, and no bit past the count is set.
//! The newest valid image is opened only when its counters are at most 2^61, so that every
//! image the log writes afterwards is valid again. Anything else is a one-line `Corrupt`
//! error naming the field; no read leaves the area.
//!
//! # Concurrency and the marking rule
//!
//! The log is shared (`Arc<DirtyLog>`, `&self` methods) by threads that each run their own
//! executor. Its bits live under a `std::sync::Mutex` that is never held across an await;
//! commits are serialised by an async mutex (the writer), which doubles as the group-commit
//! queue: a mark whose bits are not yet durable waits for the writer, and then either finds
//! that a commit carrying its bits has finished (it rode along) or runs the next commit
//! itself, carrying every bit marked so far. Marks of bits already durable cost nothing.
//!
//! Invariants, kept by [`LogState`]:
//! - `durable` holds only bits set in the newest image known durable *and* in any image
//!   being written, so a mark never skips I/O for a bit that an in-flight commit may clear;
//! - a clear reaches an image only after the caller's data flush has completed, and a mark of
//!   a region cancels a clear of it that has not reached an image yet.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use smol::lock::Mutex as AsyncMutex;
use uuid::Uuid;

use super::bitmap::RegionBitmap;
use super::geometry::{RegionCount, RegionGeometry, RegionIndex, RegionRange, MAX_REGION_COUNT};
use crate::device::{AlignedBuf, DeviceRef, WriteFlags};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{self, crc, magic, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
use crate::format::{U32, U64};
use crate::units::{Extent, Sector, SectorCount, BLOCK_SECTORS, SECTOR_BYTES};

const MAGIC: magic::Magic = magic::DIRTY_LOG;
const VERSION: u32 = 1;
const HEADER_BYTES: usize = SECTOR_BYTES as usize;
/// Images, slots and the area are multiples of 4 KiB, so that every log I/O is aligned for
/// any logical block size we serve.
const ALIGN: SectorCount = BLOCK_SECTORS;

/// An image's header as it lies on disk (the table in this file's doc).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    crc: U32,
    uuid: [u8; 16],
    sequence: U64,
    events: U64,
    device_size: U64,
    region_size: U64,
    region_count: U64,
    area_len: U64,
    zero: [u8; 432],
}

// The offsets of the table in this file's doc.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(RawHeader, version) == 8);
    assert!(offset_of!(RawHeader, crc) == 12);
    assert!(offset_of!(RawHeader, uuid) == 16);
    assert!(offset_of!(RawHeader, sequence) == 32);
    assert!(offset_of!(RawHeader, events) == 40);
    assert!(offset_of!(RawHeader, device_size) == 48);
    assert!(offset_of!(RawHeader, region_size) == 56);
    assert!(offset_of!(RawHeader, region_count) == 64);
    assert!(offset_of!(RawHeader, area_len) == 72);
    assert!(offset_of!(RawHeader, zero) == 80);
    assert!(size_of::<RawHeader>() == HEADER_BYTES);
};

const CRC_AT: usize = std::mem::offset_of!(RawHeader, crc);
/// The most sectors one read of the log takes: an image of a log of `MAX_REGION_COUNT`
/// regions (a slot's first block is read before its header is trusted).
fn max_image() -> SectorCount {
    image_sectors(MAX_REGION_COUNT)
}

/// The sectors of one image of a log of `count` regions: header and bitmap, rounded up to
/// 4 KiB.
pub fn image_sectors(count: RegionCount) -> SectorCount {
    let bytes = (HEADER_BYTES + RegionBitmap::byte_len(count)) as u64;
    SectorCount(bytes.div_ceil(SECTOR_BYTES).next_multiple_of(ALIGN.0))
}

/// One of the two image slots of the area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    A,
    B,
}

impl Slot {
    fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// The header fields of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    uuid: Uuid,
    sequence: u64,
    events: u64,
    device_size: SectorCount,
    region_size: SectorCount,
    region_count: RegionCount,
    area_len: SectorCount,
}

/// Where a log lives and what shape it has: fixed for the log's lifetime.
#[derive(Clone, Debug)]
struct Layout {
    area: Extent,
    /// The distance from slot A to slot B.
    half: SectorCount,
    image: SectorCount,
    geometry: RegionGeometry,
    uuid: Uuid,
}

impl Layout {
    fn slot_start(&self, slot: Slot) -> Sector {
        match slot {
            Slot::A => self.area.start,
            Slot::B => self.area.start + self.half,
        }
    }

    fn header(&self, sequence: u64, events: u64) -> Header {
        Header {
            uuid: self.uuid,
            sequence,
            events,
            device_size: self.geometry.device_size(),
            region_size: self.geometry.region_size(),
            region_count: self.geometry.count(),
            area_len: self.area.len,
        }
    }
}

/// A commit prepared under the state lock, to be written without it.
struct Commit {
    number: u64,
    slot: Slot,
    at: Sector,
    image: Arc<AlignedBuf>,
}

/// What the mutex guards: the bits and the commit bookkeeping.
struct LogState {
    /// The bits the next image will carry.
    bits: RegionBitmap,
    /// Bits known durable and not being cleared by an in-flight commit (module doc).
    durable: RegionBitmap,
    /// The bits of the image being written; meaningful while `committing`.
    inflight: RegionBitmap,
    committing: bool,
    /// Clears asked for and not yet taken by a `commit_clears`.
    to_clear: RegionBitmap,
    /// Clears taken by the running `commit_clears`, waiting for its data flush.
    clearing: RegionBitmap,
    events: u64,
    /// The highest sequence number written or read so far.
    sequence: u64,
    /// The slot holding the newest image known durable; commits go to the other one.
    good_slot: Slot,
    /// Commits are numbered from 1; `started` and `finished` count them.
    started: u64,
    finished: u64,
    last_success: u64,
    last_error: Option<(io::ErrorKind, Option<i32>)>,
}

impl LogState {
    fn new(bits: RegionBitmap, events: u64, sequence: u64, good_slot: Slot) -> LogState {
        let empty = RegionBitmap::new(bits.len());
        LogState {
            durable: bits.clone(),
            bits,
            inflight: empty.clone(),
            committing: false,
            to_clear: empty.clone(),
            clearing: empty,
            events,
            sequence,
            good_slot,
            started: 0,
            finished: 0,
            last_success: 0,
            last_error: None,
        }
    }

    /// Sets `regions`' bits and cancels their pending clears. Returns the number of the
    /// commit that makes them durable, or `None` when they already are.
    fn request_marks(&mut self, regions: impl Iterator<Item = RegionIndex> + Clone) -> Option<u64> {
        for region in regions.clone() {
            self.bits.set(region, true);
            self.to_clear.set(region, false);
            self.clearing.set(region, false);
        }
        let mut missing = regions
            .filter(|&region| !self.durable.get(region))
            .peekable();
        missing.peek()?;
        let carried = self.committing && missing.all(|region| self.inflight.get(region));
        Some(if carried {
            self.started
        } else {
            self.started + 1
        })
    }

    /// Moves the requested clears to `clearing`; false when there are none. Clears left in
    /// `clearing` by a cancelled `commit_clears` are dropped: their bits just stay set.
    fn take_clears(&mut self) -> bool {
        self.clearing.copy_from(&self.to_clear);
        self.to_clear.fill(false);
        !self.clearing.none()
    }

    /// Applies the taken clears (those not cancelled by a mark since) to the next image.
    /// Returns the number of the commit that carries them, or `None` if nothing changed.
    fn apply_clears(&mut self) -> Option<u64> {
        let regions: Vec<RegionIndex> = self.clearing.iter_ones().collect();
        self.clearing.fill(false);
        let changed = regions
            .into_iter()
            .filter(|&region| self.bits.set(region, false))
            .count();
        (changed > 0).then_some(self.started + 1)
    }

    /// Snapshots the next image and starts commit number `started + 1`.
    fn begin_commit(&mut self, layout: &Layout) -> Commit {
        assert!(!self.committing, "two commits at once");
        self.started += 1;
        self.sequence += 1;
        self.committing = true;
        self.inflight.copy_from(&self.bits);
        // Bits this image clears may be clear on disk once the write starts landing.
        self.durable.and_assign(&self.bits);
        let slot = self.good_slot.other();
        let header = layout.header(self.sequence, self.events);
        let image = Arc::new(encode_image(&header, &self.bits, layout.image));
        Commit {
            number: self.started,
            slot,
            at: layout.slot_start(slot),
            image,
        }
    }

    fn finish_commit(&mut self, commit: &Commit, result: &io::Result<()>) {
        assert!(
            self.committing && commit.number == self.started,
            "commit out of order"
        );
        self.committing = false;
        self.finished = commit.number;
        match result {
            Ok(()) => {
                self.durable.copy_from(&self.inflight);
                self.good_slot = commit.slot;
                self.last_success = commit.number;
            }
            Err(err) => self.last_error = Some((err.kind(), err.raw_os_error())),
        }
    }

    /// The outcome for a caller that needs commit `need`, once it (or a later one) finished.
    fn outcome(&self, need: u64) -> Option<io::Result<()>> {
        if self.finished < need {
            return None;
        }
        if self.last_success >= need {
            return Some(Ok(()));
        }
        let (kind, errno) = self.last_error.expect("a commit failed without an error");
        Some(Err(match errno {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(kind, "dirty log commit failed"),
        }))
    }
}

/// A persistent write-intent bitmap (see the module doc).
pub struct DirtyLog {
    dev: DeviceRef,
    layout: Layout,
    state: Mutex<LogState>,
    /// Serialises commits; waiting for it is waiting for the group commit.
    writer: AsyncMutex<()>,
    /// Serialises `commit_clears`, so that one data flush covers exactly the clears it took.
    clearer: AsyncMutex<()>,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("device", &self.dev.info().name)
            .field("area", &self.layout.area)
            .field("uuid", &self.layout.uuid)
            .field("regions", &self.layout.geometry.count())
            .finish_non_exhaustive()
    }
}

impl DirtyLog {
    /// The least area a log of `count` regions needs: two images.
    pub fn area_sectors(count: RegionCount) -> SectorCount {
        let image = image_sectors(count);
        image + image
    }

    /// Writes a new log, every bit clear, over `area` of `dev` (both slots, so that no older
    /// log there can be mistaken for a newer image).
    pub async fn create(
        dev: DeviceRef,
        area: Extent,
        geometry: RegionGeometry,
        uuid: Uuid,
    ) -> Result<DirtyLog> {
        let half = check_area(&dev, area)?;
        let image = image_sectors(geometry.count());
        if half < image {
            return Err(Error::invalid(format!(
                "dirty log area {area} on {} is too small for {}: it needs {} sectors",
                dev.info().name,
                geometry.count(),
                DirtyLog::area_sectors(geometry.count()).0
            )));
        }
        let layout = Layout {
            area,
            half,
            image,
            geometry,
            uuid,
        };
        let bits = RegionBitmap::new(geometry.count());
        for (slot, sequence) in [(Slot::A, 1), (Slot::B, 2)] {
            let buf = encode_image(&layout.header(sequence, 0), &bits, image);
            let write = dev.write(
                layout.slot_start(slot),
                Arc::new(buf),
                WriteFlags::default(),
            );
            write
                .await
                .context(|| format!("write the new dirty log on {}", dev.info().name))?;
        }
        let flush = dev.flush();
        flush
            .await
            .context(|| format!("flush the new dirty log on {}", dev.info().name))?;
        Ok(DirtyLog::assemble(
            dev,
            layout,
            LogState::new(bits, 0, 2, Slot::B),
        ))
    }

    /// Reads the log in `area` of `dev`: the newest valid image. Also returns its bits (the
    /// regions that may differ between legs after a crash).
    pub async fn open(dev: DeviceRef, area: Extent) -> Result<(DirtyLog, RegionBitmap)> {
        DirtyLog::open_for(dev, area, None).await
    }

    /// [`DirtyLog::open`], preferring the newest valid image of `geometry` when one is given:
    /// after a power cut in a [`DirtyLog::regrow`] the other slot holds the image of the
    /// geometry its owner did not yet switch to (or already switched from). Without an image
    /// of `geometry` the newest valid image is opened, for the caller to name the mismatch.
    pub async fn open_for(
        dev: DeviceRef,
        area: Extent,
        geometry: Option<&RegionGeometry>,
    ) -> Result<(DirtyLog, RegionBitmap)> {
        let half = check_area(&dev, area)?;
        let mut a = read_slot(&dev, area, half, area.start).await?;
        let mut b = read_slot(&dev, area, half, area.start + half).await?;
        if let Some(geometry) = geometry {
            let fits = |slot: &std::result::Result<(Header, RegionBitmap), String>| {
                slot.as_ref().is_ok_and(|(h, _)| {
                    h.device_size == geometry.device_size()
                        && h.region_size == geometry.region_size()
                })
            };
            // One slot of the wanted geometry: the other is not a candidate.
            match (fits(&a), fits(&b)) {
                (true, false) if b.is_ok() => b = Err("is of another geometry".into()),
                (false, true) if a.is_ok() => a = Err("is of another geometry".into()),
                _ => {}
            }
        }
        let (slot, header, bits) = match (a, b) {
            (Ok((ha, ba)), Ok((hb, _))) if ha.sequence >= hb.sequence => (Slot::A, ha, ba),
            (_, Ok((hb, bb))) => (Slot::B, hb, bb),
            (Ok((ha, ba)), Err(_)) => (Slot::A, ha, ba),
            (Err(why_a), Err(why_b)) => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "no valid dirty log in {area} on {}: slot A {why_a}; slot B {why_b}",
                        dev.info().name
                    ),
                ))
            }
        };
        check_room(&header, area, &dev.info().name)?;
        let geometry = RegionGeometry::new(header.device_size, header.region_size)
            .expect("geometry was checked when the slot was read");
        let layout = Layout {
            area,
            half,
            image: image_sectors(header.region_count),
            geometry,
            uuid: header.uuid,
        };
        let state = LogState::new(bits.clone(), header.events, header.sequence, slot);
        Ok((DirtyLog::assemble(dev, layout, state), bits))
    }

    fn assemble(dev: DeviceRef, layout: Layout, state: LogState) -> DirtyLog {
        DirtyLog {
            dev,
            layout,
            state: Mutex::new(state),
            writer: AsyncMutex::new(()),
            clearer: AsyncMutex::new(()),
        }
    }

    pub fn uuid(&self) -> Uuid {
        self.layout.uuid
    }

    pub fn geometry(&self) -> &RegionGeometry {
        &self.layout.geometry
    }

    pub fn area(&self) -> Extent {
        self.layout.area
    }

    /// The event counter: bumped by the owner on events that matter to a returning leg
    /// (md's bitmap `events`), carried in every image.
    pub fn events(&self) -> u64 {
        self.state().events
    }

    /// Increments the event counter and commits it; returns the new value once durable.
    pub async fn bump_event(&self) -> io::Result<u64> {
        let (events, need) = {
            let mut state = self.state();
            state.events += 1;
            (state.events, state.started + 1)
        };
        self.await_commit(need).await?;
        Ok(events)
    }

    /// Whether `region`'s bit is set in memory (durable or about to be).
    pub fn is_dirty(&self, region: RegionIndex) -> bool {
        self.state().bits.get(region)
    }

    /// Whether `region`'s bit is set in the newest image known durable.
    pub fn is_durable(&self, region: RegionIndex) -> bool {
        self.state().durable.get(region)
    }

    /// The regions whose bits are set in memory, in order.
    pub fn dirty_regions(&self) -> Vec<RegionIndex> {
        self.state().bits.iter_ones().collect()
    }

    /// Sets the bits of `regions`; when this returns `Ok` they are durable. Concurrent marks
    /// share commits; bits already durable cost no I/O. On error the bits stay set in memory
    /// but not durable, so a retry writes them again.
    pub async fn mark(&self, regions: &[RegionIndex]) -> io::Result<()> {
        self.mark_iter(regions.iter().copied()).await
    }

    /// [`DirtyLog::mark`] for a run of regions.
    pub async fn mark_range(&self, range: RegionRange) -> io::Result<()> {
        self.mark_iter(range).await
    }

    async fn mark_iter(
        &self,
        regions: impl Iterator<Item = RegionIndex> + Clone,
    ) -> io::Result<()> {
        let need = self.state().request_marks(regions);
        match need {
            None => Ok(()),
            Some(need) => self.await_commit(need).await,
        }
    }

    /// Asks for the bits of `regions` to be cleared by the next [`DirtyLog::commit_clears`].
    /// Memory only; a later mark of a region cancels its clear.
    pub fn clear(&self, regions: &[RegionIndex]) {
        let mut state = self.state();
        for &region in regions {
            if state.bits.get(region) {
                state.to_clear.set(region, true);
            }
        }
    }

    /// Commits the clears asked for so far: first awaits `flush_data` (the legs' flush: data
    /// must be durable before a bit says clean), then writes the image. If the flush fails the
    /// bits stay set and its error is returned; the caller may ask again later.
    pub async fn commit_clears(
        &self,
        flush_data: impl Future<Output = io::Result<()>>,
    ) -> io::Result<()> {
        let _clearer = self.clearer.lock().await;
        if !self.state().take_clears() {
            return Ok(());
        }
        if let Err(err) = flush_data.await {
            self.state().clearing.fill(false);
            return Err(err);
        }
        let need = self.state().apply_clears();
        match need {
            None => Ok(()),
            Some(need) => self.await_commit(need).await,
        }
    }

    /// Waits until commit `need` (or a later one) has finished, running it if nobody has.
    async fn await_commit(&self, need: u64) -> io::Result<()> {
        let _writer = self.writer.lock().await;
        let commit = {
            let mut state = self.state();
            if let Some(outcome) = state.outcome(need) {
                return outcome;
            }
            // Commits run only under the writer, so none is in flight and ours is next.
            assert_eq!(state.finished + 1, need, "a commit was skipped");
            state.begin_commit(&self.layout)
        };
        let mut guard = CommitGuard {
            log: self,
            commit: Some(commit),
        };
        let commit = guard.commit.as_ref().expect("commit");
        let result = write_image(&self.dev, commit).await;
        let commit = guard.commit.take().expect("commit");
        self.state().finish_commit(&commit, &result);
        result
    }

    fn state(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().expect("dirty log state")
    }

    /// The log of the same area for `geometry` (a device grown in place), carrying `bits`:
    /// its first image, with the next sequence number, goes to the slot that does not hold
    /// the newest durable image of this log, which thus survives a power cut until its owner
    /// has switched to the new geometry (see [`DirtyLog::open_for`]). This log must not be
    /// used afterwards; the caller keeps marks and clears away meanwhile (clears it asked
    /// for and not committed are dropped: their bits stay set in `bits`).
    pub async fn regrow(
        &self,
        geometry: RegionGeometry,
        bits: RegionBitmap,
    ) -> io::Result<DirtyLog> {
        assert_eq!(bits.len(), geometry.count(), "bits of the new geometry");
        let _writer = self.writer.lock().await;
        let layout = Layout {
            image: image_sectors(geometry.count()),
            geometry,
            ..self.layout.clone()
        };
        if layout.image > layout.half {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the dirty log area is too small for {}", geometry.count()),
            ));
        }
        let (sequence, events, slot) = {
            let mut state = self.state();
            assert!(!state.committing, "a commit under the writer");
            // A failed regrow leaves the slot unknown, as a failed commit does: this log's
            // next commit goes there again, with a higher sequence.
            state.sequence += 1;
            (state.sequence, state.events, state.good_slot.other())
        };
        let commit = Commit {
            number: 0,
            slot,
            at: layout.slot_start(slot),
            image: Arc::new(encode_image(
                &layout.header(sequence, events),
                &bits,
                layout.image,
            )),
        };
        write_image(&self.dev, &commit).await?;
        let state = LogState::new(bits, events, sequence, slot);
        Ok(DirtyLog::assemble(Arc::clone(&self.dev), layout, state))
    }

    /// Where the next commit will write: for crash tests.
    #[cfg(test)]
    fn next_slot_extent(&self) -> Extent {
        let slot = self.state().good_slot.other();
        Extent::new(self.layout.slot_start(slot), self.layout.image)
    }
}

/// Finishes a commit as failed if its future is dropped mid-write: the slot it was writing is
/// then in an unknown state, exactly as after a write error.
struct CommitGuard<'a> {
    log: &'a DirtyLog,
    commit: Option<Commit>,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if let Some(commit) = self.commit.take() {
            let cancelled = Err(io::Error::from_raw_os_error(libc::ECANCELED));
            self.log.state().finish_commit(&commit, &cancelled);
        }
    }
}

/// Writes a commit's image and makes it durable.
async fn write_image(dev: &DeviceRef, commit: &Commit) -> io::Result<()> {
    dev.write(commit.at, Arc::clone(&commit.image), WriteFlags::default())
        .await?;
    dev.flush().await
}

/// Refuses to open a log whose newest image's counters leave no room to count on (see
/// [`MAX_OPEN_COUNTER`]); the error names the field.
fn check_room(header: &Header, area: Extent, name: &str) -> Result<()> {
    let counters = [
        ("sequence number", header.sequence),
        ("event counter", header.events),
    ];
    for (field, value) in counters {
        if value > MAX_OPEN_COUNTER {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "the dirty log in {area} on {name} has a {field} of {value}, more than \
                     the {MAX_OPEN_COUNTER} any log reaches"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks that `area` suits a log on `dev` and returns the distance between its slots.
fn check_area(dev: &DeviceRef, area: Extent) -> Result<SectorCount> {
    let info = dev.info();
    if !area.fits_in(info.size) {
        return Err(Error::invalid(format!(
            "dirty log area {area} is past the end of {} ({})",
            info.name, info.size
        )));
    }
    if area.start.0 % ALIGN.0 != 0 {
        return Err(Error::invalid(format!(
            "dirty log area {area} on {} does not start on a 4 KiB boundary",
            info.name
        )));
    }
    let half = SectorCount(area.len.0 / 2 / ALIGN.0 * ALIGN.0);
    if half < image_sectors(RegionCount(1)) {
        return Err(Error::invalid(format!(
            "dirty log area {area} on {} is too small: it needs at least {} sectors",
            info.name,
            DirtyLog::area_sectors(RegionCount(1)).0
        )));
    }
    Ok(half)
}

/// Reads and checks one slot. An I/O error is the outer error; a slot that does not hold a
/// valid image is the inner one, a reason for the message.
async fn read_slot(
    dev: &DeviceRef,
    area: Extent,
    half: SectorCount,
    at: Sector,
) -> Result<std::result::Result<(Header, RegionBitmap), String>> {
    let first = read_sectors(dev, at, ALIGN).await?;
    let header = match decode_header(&first.as_slice()[..HEADER_BYTES]) {
        Ok(header) => header,
        Err(why) => return Ok(Err(why)),
    };
    if header.region_count > MAX_REGION_COUNT || image_sectors(header.region_count) > half {
        return Ok(Err(format!(
            "claims {}, too many for the area",
            header.region_count
        )));
    }
    let image = read_sectors(dev, at, image_sectors(header.region_count)).await?;
    Ok(decode_image(image.as_slice(), area.len))
}

async fn read_sectors(dev: &DeviceRef, at: Sector, len: SectorCount) -> Result<AlignedBuf> {
    format::read::read_at(dev, at, len, max_image(), || {
        format!("read the dirty log at {at} on {}", dev.info().name)
    })
    .await
}

/// The image of `header` and `bits`, `image` sectors long, with its crc filled in.
fn encode_image(header: &Header, bits: &RegionBitmap, image: SectorCount) -> AlignedBuf {
    assert_eq!(
        bits.len(),
        header.region_count,
        "bitmap of another geometry"
    );
    let raw = RawHeader {
        magic: MAGIC,
        version: U32::new(VERSION),
        crc: U32::ZERO,
        uuid: *header.uuid.as_bytes(),
        sequence: U64::new(header.sequence),
        events: U64::new(header.events),
        device_size: U64::new(header.device_size.0),
        region_size: U64::new(header.region_size.0),
        region_count: U64::new(header.region_count.0),
        area_len: U64::new(header.area_len.0),
        zero: [0; 432],
    };
    let mut buf = AlignedBuf::for_sectors(image);
    let bytes = buf.as_mut_slice();
    format::write_header(bytes, &raw);
    let bitmap_len = RegionBitmap::byte_len(bits.len());
    bits.write_le_bytes(&mut bytes[HEADER_BYTES..HEADER_BYTES + bitmap_len]);
    crc::seal(bytes, CRC_AT);
    buf
}

/// The highest sequence number or event counter a valid image may carry: far beyond any
/// log's life, and low enough that an increment never overflows.
const MAX_COUNTER: u64 = 1 << 62;
/// The highest sequence number or event counter a log is opened with. Below [`MAX_COUNTER`]
/// by 2^61, so that the images an opened log writes (each one more) stay valid for 2^61
/// commits, beyond any log's life: a log crafted at the limit would otherwise open, and then
/// write images its next open refuses.
const MAX_OPEN_COUNTER: u64 = 1 << 61;
/// The largest device a log may describe, in sectors: its size in bytes fits in a `u64`.
const MAX_DEVICE_SECTORS: u64 = u64::MAX / SECTOR_BYTES;

/// Parses a header sector without checking the crc (which needs the whole image). Every
/// count and size is bounded here, before anything is sized from it; the error names the
/// field.
fn decode_header(sector: &[u8]) -> std::result::Result<Header, String> {
    let Some(raw) = format::header::<RawHeader>(sector) else {
        return Err(format!("is {} bytes, shorter than a header", sector.len()));
    };
    if raw.magic != MAGIC {
        return Err("has no dirty log magic".to_owned());
    }
    let version = raw.version.get();
    if version != VERSION {
        return Err(format!("has version {version}, not {VERSION}"));
    }
    let header = Header {
        uuid: Uuid::from_bytes(raw.uuid),
        sequence: raw.sequence.get(),
        events: raw.events.get(),
        device_size: SectorCount(raw.device_size.get()),
        region_size: SectorCount(raw.region_size.get()),
        region_count: RegionCount(raw.region_count.get()),
        area_len: SectorCount(raw.area_len.get()),
    };
    let bounds = [
        ("sequence number", header.sequence, MAX_COUNTER),
        ("event counter", header.events, MAX_COUNTER),
        ("device size", header.device_size.0, MAX_DEVICE_SECTORS),
        ("region count", header.region_count.0, MAX_REGION_COUNT.0),
        ("area length", header.area_len.0, MAX_DEVICE_SECTORS),
    ];
    for (field, value, limit) in bounds {
        if value > limit {
            return Err(format!(
                "has a {field} of {value}, more than the limit of {limit}"
            ));
        }
    }
    Ok(header)
}

/// Checks a whole image (crc, geometry, area) and returns its header and bits.
fn decode_image(
    image: &[u8],
    area_len: SectorCount,
) -> std::result::Result<(Header, RegionBitmap), String> {
    let header = decode_header(&image[..HEADER_BYTES])?;
    if !crc::verify(image, CRC_AT) {
        return Err(format!("(sequence {}) fails its checksum", header.sequence));
    }
    if header.area_len != area_len {
        return Err(format!(
            "was written for an area of {}, not {}",
            header.area_len, area_len
        ));
    }
    let geometry = RegionGeometry::new(header.device_size, header.region_size)
        .map_err(|err| format!("has a bad geometry: {err}"))?;
    if geometry.count() != header.region_count {
        return Err(format!(
            "claims {} but its geometry has {}",
            header.region_count,
            geometry.count()
        ));
    }
    let bitmap_len = RegionBitmap::byte_len(header.region_count);
    let Some(bitmap) = image.get(HEADER_BYTES..HEADER_BYTES + bitmap_len) else {
        return Err(format!(
            "claims {}, more than its {} bytes hold",
            header.region_count,
            image.len()
        ));
    };
    let bits = RegionBitmap::from_le_bytes(header.region_count, bitmap)
        .ok_or_else(|| "has bits set past its last region".to_owned())?;
    Ok((header, bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::{block_on, run_local, sleep, spawn};
    use crate::device::{
        errno, FaultConfig, FaultyDevice, Forward, Forwarding, IoFuture, MemDevice, OpKind,
    };
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    const REGIONS: u64 = 1000;
    const SECTOR: usize = SECTOR_BYTES as usize;

    fn geometry(regions: u64) -> RegionGeometry {
        RegionGeometry::new(SectorCount(regions * 8), SectorCount(8)).expect("geometry")
    }

    fn area(regions: u64) -> Extent {
        Extent::new(Sector(8), DirtyLog::area_sectors(RegionCount(regions)))
    }

    fn mem(regions: u64) -> Arc<MemDevice> {
        MemDevice::new("log", area(regions).end() - Sector(0))
    }

    fn create(dev: DeviceRef, regions: u64) -> DirtyLog {
        let uuid = Uuid::from_u128(0x5eed);
        run_local(
            async move { DirtyLog::create(dev, area(regions), geometry(regions), uuid).await },
        )
        .expect("create")
    }

    fn reopen(dev: DeviceRef, regions: u64) -> Result<(DirtyLog, RegionBitmap)> {
        run_local(DirtyLog::open(dev, area(regions)))
    }

    fn bits_of(regions: u64, set: &[u64]) -> RegionBitmap {
        let mut bits = RegionBitmap::new(RegionCount(regions));
        set.iter().for_each(|&r| _ = bits.set(RegionIndex(r), true));
        bits
    }

    fn indices(set: &[u64]) -> Vec<RegionIndex> {
        set.iter().map(|&r| RegionIndex(r)).collect()
    }

    /// How a [`Counting`] device delays writes, so that commits overlap.
    #[derive(Clone, Copy)]
    enum Delay {
        None,
        /// Executor turns (deterministic, for `run_local`).
        Turns(u32),
        /// Wall time on the thread's ring (for threads under `block_on`).
        Sleep(Duration),
    }

    /// Counts writes and flushes, and optionally delays writes.
    struct Counting {
        inner: DeviceRef,
        writes: AtomicU64,
        flushes: AtomicU64,
        delay: Delay,
    }

    impl Counting {
        fn new(inner: DeviceRef, delay: Delay) -> Arc<Forwarding<Counting>> {
            let (writes, flushes) = (AtomicU64::new(0), AtomicU64::new(0));
            Arc::new(Forwarding(Counting {
                inner,
                writes,
                flushes,
                delay,
            }))
        }

        fn writes(&self) -> u64 {
            self.writes.load(Ordering::SeqCst)
        }
    }

    impl Forward for Counting {
        fn inner(&self) -> &DeviceRef {
            &self.inner
        }
        fn write(
            &self,
            at: Sector,
            buf: Arc<AlignedBuf>,
            f: WriteFlags,
        ) -> IoFuture<io::Result<()>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let (inner, delay) = (Arc::clone(&self.inner), self.delay);
            Box::pin(async move {
                match delay {
                    Delay::None => {}
                    Delay::Turns(n) => {
                        for _ in 0..n {
                            smol::future::yield_now().await;
                        }
                    }
                    Delay::Sleep(d) => sleep(d).await,
                }
                inner.write(at, buf, f).await
            })
        }
        fn flush(&self) -> IoFuture<io::Result<()>> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.inner.flush()
        }
    }

    /// A volatile memory device that loses or tears the unflushed writes at the next flush
    /// once armed: a power cut between a commit's write and its flush. With `fail_next`, the
    /// next flush fails and leaves the unflushed writes at risk.
    struct CrashAtFlush {
        mem: Arc<MemDevice>,
        /// `mem`, as the device below.
        inner: DeviceRef,
        armed: Mutex<Option<ChaCha8Rng>>,
        fail_next: std::sync::atomic::AtomicBool,
    }

    impl CrashAtFlush {
        fn new(mem: Arc<MemDevice>) -> Arc<Forwarding<CrashAtFlush>> {
            let fail_next = std::sync::atomic::AtomicBool::new(false);
            Arc::new(Forwarding(CrashAtFlush {
                inner: Arc::clone(&mem) as DeviceRef,
                mem,
                armed: Mutex::new(None),
                fail_next,
            }))
        }

        fn arm(&self, seed: u64) {
            *self.armed.lock().expect("armed") = Some(ChaCha8Rng::seed_from_u64(seed));
        }
    }

    impl Forward for CrashAtFlush {
        fn inner(&self) -> &DeviceRef {
            &self.inner
        }
        fn flush(&self) -> IoFuture<io::Result<()>> {
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(errno(libc::EIO))));
            }
            match self.armed.lock().expect("armed").take() {
                Some(mut rng) => {
                    self.mem.crash(&mut rng);
                    Box::pin(std::future::ready(Err(errno(libc::EIO))))
                }
                None => self.inner.flush(),
            }
        }
    }

    #[test]
    fn create_mark_reopen_round_trips() {
        let dev = mem(REGIONS);
        let log = create(dev.clone(), REGIONS);
        assert_eq!(
            reopen(dev.clone(), REGIONS).expect("open").1,
            RegionBitmap::new(RegionCount(REGIONS))
        );
        run_local(async move {
            log.mark(&indices(&[0, 7, 999])).await.expect("mark");
            assert_eq!(log.bump_event().await.expect("event"), 1);
            assert!(log.is_durable(RegionIndex(7)));
        });
        let (log, bits) = reopen(dev, REGIONS).expect("open");
        assert_eq!(bits, bits_of(REGIONS, &[0, 7, 999]));
        assert_eq!(log.uuid(), Uuid::from_u128(0x5eed));
        assert_eq!(log.events(), 1);
        assert_eq!(log.geometry(), &geometry(REGIONS));
        assert_eq!(log.dirty_regions(), indices(&[0, 7, 999]));
    }

    #[test]
    fn marking_durable_bits_costs_no_io() {
        let dev = Counting::new(mem(REGIONS), Delay::None);
        let log = create(dev.clone(), REGIONS);
        let before = dev.writes();
        let counted = dev.clone();
        run_local(async move {
            log.mark(&indices(&[5])).await.expect("mark");
            assert_eq!(counted.writes(), before + 1);
            log.mark(&indices(&[5])).await.expect("mark again");
            log.mark_range(RegionRange::one(RegionIndex(5)))
                .await
                .expect("mark range");
            assert_eq!(counted.writes(), before + 1);
        });
    }

    #[test]
    fn clears_wait_for_the_data_flush_and_marks_cancel_them() {
        let dev = Counting::new(mem(REGIONS), Delay::None);
        let log = Arc::new(create(dev.clone(), REGIONS));
        let (l, d) = (Arc::clone(&log), dev.clone());
        run_local(async move {
            l.mark(&indices(&[1, 2, 3])).await.expect("mark");
            l.clear(&indices(&[1, 2]));
            l.mark(&indices(&[2]))
                .await
                .expect("re-mark cancels the clear of 2");
            let writes = d.writes();
            let flush = async move {
                // The image with cleared bits is written only after the data flush.
                assert_eq!(d.writes(), writes);
                Ok(())
            };
            l.commit_clears(flush).await.expect("commit clears");
        });
        assert_eq!(
            reopen(dev, REGIONS).expect("open").1,
            bits_of(REGIONS, &[2, 3])
        );
    }

    #[test]
    fn failed_data_flush_keeps_the_bits() {
        let dev = mem(REGIONS);
        let log = create(dev.clone(), REGIONS);
        run_local(async move {
            log.mark(&indices(&[4])).await.expect("mark");
            log.clear(&indices(&[4]));
            let err = log.commit_clears(async { Err(errno(libc::EIO)) }).await;
            assert_eq!(
                err.expect_err("flush failed").raw_os_error(),
                Some(libc::EIO)
            );
            log.commit_clears(async { Ok(()) })
                .await
                .expect("nothing left to clear");
            assert!(log.is_dirty(RegionIndex(4)));
        });
        assert_eq!(
            reopen(dev, REGIONS).expect("open").1,
            bits_of(REGIONS, &[4])
        );
    }

    #[test]
    fn failed_log_write_leaves_bits_not_durable_and_a_retry_writes_them() {
        let faulty = FaultyDevice::new(mem(REGIONS), FaultConfig::default());
        let log = create(faulty.clone(), REGIONS);
        faulty.fail_extent(OpKind::Write, area(REGIONS));
        let f = Arc::clone(&faulty);
        run_local(async move {
            let err = log.mark(&indices(&[9])).await.expect_err("log write fails");
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
            assert!(log.is_dirty(RegionIndex(9)) && !log.is_durable(RegionIndex(9)));
            let err = log.mark(&indices(&[9])).await.expect_err("still failing");
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
            f.heal();
            log.mark(&indices(&[9])).await.expect("retry");
            assert!(log.is_durable(RegionIndex(9)));
        });
        assert_eq!(
            reopen(faulty, REGIONS).expect("open").1,
            bits_of(REGIONS, &[9])
        );
    }

    #[test]
    fn one_corrupt_slot_is_survived_and_two_are_an_error() {
        let dev = mem(REGIONS);
        let log = create(dev.clone(), REGIONS);
        run_local(async move { log.mark(&indices(&[3])).await.expect("mark") });
        // The mark went to slot A (create left slot B newest); corrupt it: B, older, remains.
        dev.poke(Sector(8 + 1), &[0xff; SECTOR]);
        let (_, bits) = reopen(dev.clone(), REGIONS).expect("slot B is valid");
        assert!(bits.none());
        let half = image_sectors(RegionCount(REGIONS));
        dev.poke(Sector(8) + half, &[0xff; SECTOR]);
        let err = reopen(dev, REGIONS).expect_err("both slots are bad");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(
            err.to_string()
                .contains("slot A (sequence 3) fails its checksum"),
            "{err}"
        );
        assert!(
            err.to_string().contains("slot B has no dirty log magic"),
            "{err}"
        );
    }

    /// After a failed commit its slot is in an unknown state, so the retry must go to the
    /// same slot: a crash tearing that retry then still leaves the other slot intact.
    #[test]
    fn a_failed_commit_is_retried_in_the_same_slot() {
        for seed in 0..16 {
            let inner = MemDevice::new_volatile("log", area(BIG).end() - Sector(0));
            let dev = CrashAtFlush::new(inner.clone());
            let log = create(dev.clone(), BIG);
            let d = Arc::clone(&dev);
            run_local(async move {
                log.mark(&indices(&[1])).await.expect("mark");
                d.fail_next.store(true, Ordering::SeqCst);
                log.mark(&indices(&[2])).await.expect_err("flush fails");
                d.arm(seed);
                log.mark(&indices(&[2])).await.expect_err("power cut");
            });
            let (_, bits) = reopen(dev, BIG).expect("the first mark's slot is intact");
            assert!(bits == bits_of(BIG, &[1]) || bits == bits_of(BIG, &[1, 2]));
        }
    }

    #[test]
    fn bad_areas_are_invalid_arguments() {
        let dev: DeviceRef = mem(REGIONS);
        let size = dev.info().size;
        let cases = [
            (REGIONS, Extent::new(Sector(4), SectorCount(16))),
            (REGIONS, Extent::new(Sector(8), SectorCount(15))),
            (REGIONS, Extent::new(Sector(8), size)),
            // Big enough for one region's image, too small for 40000 regions' (16 sectors).
            (40_000, Extent::new(Sector(8), SectorCount(16))),
        ];
        for (regions, area) in cases {
            let (d, g) = (Arc::clone(&dev), geometry(regions));
            let err = run_local(DirtyLog::create(d, area, g, Uuid::nil())).expect_err("bad area");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        }
    }

    #[test]
    fn concurrent_marks_share_commits() {
        let dev = Counting::new(mem(REGIONS), Delay::Turns(4));
        let log = Arc::new(create(dev.clone(), REGIONS));
        let before = dev.writes();
        let l = Arc::clone(&log);
        run_local(async move {
            let tasks: Vec<_> = (0..16u64)
                .map(|r| {
                    let log = Arc::clone(&l);
                    spawn(async move { log.mark(&[RegionIndex(r)]).await })
                })
                .collect();
            for task in tasks {
                task.await.expect("mark");
            }
        });
        // The first mark commits alone; the other fifteen queue behind it and share one.
        assert_eq!(dev.writes() - before, 2);
        let expect: Vec<u64> = (0..16).collect();
        assert_eq!(
            reopen(dev, REGIONS).expect("open").1,
            bits_of(REGIONS, &expect)
        );
    }

    #[test]
    fn marks_from_two_threads_group_commit() {
        const PER_THREAD: u64 = 32;
        let dev = Counting::new(mem(REGIONS), Delay::Sleep(Duration::from_millis(2)));
        let (d, g, uuid) = (dev.clone(), geometry(REGIONS), Uuid::new_v4());
        // The delay sleeps on the thread's ring, so even creation needs one.
        let log = block_on(async move { DirtyLog::create(d, area(REGIONS), g, uuid).await });
        let log = Arc::new(log.expect("create"));
        let before = dev.writes();
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || block_on(mark_many(log, t * PER_THREAD, PER_THREAD)))
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        let writes = dev.writes() - before;
        assert!(
            writes < 2 * PER_THREAD,
            "{writes} log writes for {} marks",
            2 * PER_THREAD
        );
        let expect: Vec<u64> = (0..2 * PER_THREAD).collect();
        assert_eq!(
            reopen(dev, REGIONS).expect("open").1,
            bits_of(REGIONS, &expect)
        );
    }

    /// Marks `count` regions from `first` on, each from its own task, all at once.
    async fn mark_many(log: Arc<DirtyLog>, first: u64, count: u64) {
        let tasks: Vec<_> = (first..first + count)
            .map(|r| {
                let log = Arc::clone(&log);
                spawn(async move { log.mark(&[RegionIndex(r)]).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("mark");
        }
        for r in first..first + count {
            assert!(log.is_durable(RegionIndex(r)));
        }
    }

    /// One step of a random history: mark some regions, or clear some and commit.
    #[derive(Clone, Debug)]
    enum Step {
        Mark(Vec<u64>),
        Clear(Vec<u64>),
    }

    fn step(regions: u64) -> impl Strategy<Value = Step> {
        let set = proptest::collection::vec(0..regions, 0..20);
        prop_oneof![set.clone().prop_map(Step::Mark), set.prop_map(Step::Clear)]
    }

    /// Applies `step` to `log` and to the model of its durable bits.
    async fn apply(log: &DirtyLog, step: &Step, model: &mut RegionBitmap) -> io::Result<()> {
        match step {
            Step::Mark(set) => {
                log.mark(&indices(set)).await?;
                set.iter()
                    .for_each(|&r| _ = model.set(RegionIndex(r), true));
            }
            Step::Clear(set) => {
                log.clear(&indices(set));
                log.commit_clears(async { Ok(()) }).await?;
                set.iter()
                    .for_each(|&r| _ = model.set(RegionIndex(r), false));
            }
        }
        Ok(())
    }

    /// The bits `step` would leave, from `model`.
    fn after(step: &Step, model: &RegionBitmap) -> RegionBitmap {
        let mut next = model.clone();
        let (set, value) = match step {
            Step::Mark(set) => (set, true),
            Step::Clear(set) => (set, false),
        };
        set.iter()
            .for_each(|&r| _ = next.set(RegionIndex(r), value));
        next
    }

    /// Overwrites the u64 header field at `at` of the image in slot B (the newest after
    /// `create`) with `value`, keeping its crc valid: a crafted log.
    fn craft_slot_b(dev: &MemDevice, regions: u64, fields: &[(usize, u64)]) {
        let image = image_sectors(RegionCount(regions));
        let at = area(regions).start + image;
        let mut bytes = dev.snapshot(Extent::new(at, image));
        for &(field, value) in fields {
            bytes[field..field + 8].copy_from_slice(&value.to_le_bytes());
        }
        crc::seal(&mut bytes, CRC_AT);
        dev.poke(at, &bytes);
    }

    /// An image with fixed fields and bits, byte for byte, as the format was first written:
    /// any change to the on-disk format fails here.
    #[test]
    fn image_encoding_is_unchanged() {
        let header = Header {
            uuid: Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            sequence: 0x1122_3344,
            events: 9,
            device_size: SectorCount(100_000),
            region_size: SectorCount(128),
            region_count: RegionCount(782),
            area_len: SectorCount(64),
        };
        let bits = bits_of(782, &[0, 1, 7, 8, 300, 781]);
        let image = encode_image(&header, &bits, image_sectors(RegionCount(782)));
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d444c4f47010000007e4630400123456789abcdef0011223344556677",
            ),
            (32, "44332211000000000900000000000000a08601000000000080"),
            (64, "0e0300000000000040"),
            (512, "8301"),
            (549, "10"),
            (609, "20"),
        ];
        crate::format::golden::assert_image(image.as_slice(), ALIGN.to_usize_bytes(), GOLDEN);
        let image = crate::format::golden::image(ALIGN.to_usize_bytes(), GOLDEN);
        assert_eq!(decode_header(&image[..HEADER_BYTES]), Ok(header.clone()));
        let (back, back_bits) = decode_image(&image, SectorCount(64)).expect("golden image");
        assert_eq!((back, back_bits), (header, bits));
    }

    /// Counters near their limit would overflow at the next commit: a crafted log is corrupt
    /// (the older slot is used), never a panic.
    #[test]
    fn hostile_counters_are_refused() {
        for field in [32, 40] {
            let dev = mem(REGIONS);
            create(dev.clone(), REGIONS);
            craft_slot_b(&dev, REGIONS, &[(field, u64::MAX)]);
            let (log, _) = reopen(dev.clone(), REGIONS).expect("slot A is valid");
            run_local(async move {
                log.mark(&indices(&[1])).await.expect("mark");
                log.bump_event().await.expect("event");
            });
            craft_slot_b(&dev, REGIONS, &[(field, u64::MAX)]);
            let a = area(REGIONS).start;
            dev.poke(a, &[0xff; SECTOR]);
            let err = reopen(dev, REGIONS).expect_err("no valid slot");
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            let name = if field == 32 {
                "sequence"
            } else {
                "event counter"
            };
            assert!(err.to_string().contains(name), "{err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    /// A log whose newest image carried a counter at the limit a valid image may carry
    /// opened, and its next commit wrote an image (one more) that its reader refuses: the
    /// reopen silently took the older slot and lost the mark (or the event). A log is opened
    /// only with room to count on now; what it writes then is valid, so a reopen sees the
    /// newest image: its bits, or a one-line Corrupt error naming the counter.
    #[test]
    fn counters_without_room_are_refused_at_open() {
        for (field, name) in [(32, "sequence number"), (40, "event counter")] {
            for value in [MAX_OPEN_COUNTER - 1, MAX_OPEN_COUNTER, MAX_COUNTER] {
                let dev = mem(REGIONS);
                create(dev.clone(), REGIONS);
                craft_slot_b(&dev, REGIONS, &[(field, value)]);
                let corrupt = |err: Error| {
                    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
                    assert!(err.to_string().contains(name), "{err}");
                    assert!(!err.to_string().contains('\n'), "{err}");
                };
                let log = match reopen(dev.clone(), REGIONS) {
                    Ok((log, _)) => log,
                    Err(err) => {
                        assert!(value > MAX_OPEN_COUNTER, "{value}: {err}");
                        corrupt(err);
                        continue;
                    }
                };
                let events = log.events();
                run_local(async move {
                    log.mark(&indices(&[1])).await.expect("mark");
                    log.bump_event().await.expect("event");
                });
                match reopen(dev, REGIONS) {
                    Ok((log, bits)) => {
                        assert!(bits.get(RegionIndex(1)), "{name} {value}: the mark is lost");
                        assert_eq!(log.events(), events + 1, "{name} {value}: the event");
                    }
                    Err(err) => corrupt(err),
                }
            }
        }
    }

    /// Interesting values for a header field read from disk.
    fn hostile_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(u64::MAX),
            (0u32..64).prop_map(|s| 1u64 << s),
            (0u32..64).prop_map(|s| (1u64 << s).wrapping_sub(1)),
            0u64..1 << 20,
        ]
    }

    /// Regions enough for a bitmap of several sectors, so that commits can tear inside it.
    const BIG: u64 = 20_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Header fields set to hostile values (with a valid crc) open as a log within
        /// bounds that works, or as a one-line Corrupt error; never a panic.
        #[test]
        fn hostile_headers_open_within_bounds(
            fields in proptest::collection::vec((0usize..6, hostile_u64()), 1..4),
            second in any::<bool>(),
        ) {
            let dev = mem(REGIONS);
            create(dev.clone(), REGIONS);
            let fields: Vec<(usize, u64)> =
                fields.into_iter().map(|(i, v)| (32 + 8 * i, v)).collect();
            craft_slot_b(&dev, REGIONS, &fields);
            if second {
                dev.poke(area(REGIONS).start, &[0; SECTOR]);
            }
            match reopen(dev, REGIONS) {
                Ok((log, bits)) => {
                    prop_assert!(log.geometry().count() <= MAX_REGION_COUNT);
                    prop_assert_eq!(bits.len(), log.geometry().count());
                    run_local(async move {
                        log.mark(&[RegionIndex(0)]).await.expect("mark");
                        log.bump_event().await.expect("event");
                    });
                }
                Err(err) => {
                    prop_assert_eq!(err.kind(), ErrorKind::Corrupt);
                    prop_assert!(!err.to_string().contains('\n'));
                }
            }
        }

        #[test]
        fn random_histories_round_trip(steps in proptest::collection::vec(step(BIG), 1..12)) {
            let dev = mem(BIG);
            let log = create(dev.clone(), BIG);
            let model = run_local(async move {
                let mut model = RegionBitmap::new(RegionCount(BIG));
                for step in &steps {
                    apply(&log, step, &mut model).await.expect("step");
                }
                model
            });
            prop_assert_eq!(reopen(dev, BIG).expect("open").1, model);
        }

        /// A commit that lands as any prefix of its sectors leaves the old or the new image.
        #[test]
        fn a_commit_cut_at_any_sector_leaves_old_or_new(
            history in proptest::collection::vec(step(BIG), 0..4),
            last in step(BIG),
        ) {
            let dev = mem(BIG);
            let log = create(dev.clone(), BIG);
            let (log, old) = run_local(async move {
                let mut model = RegionBitmap::new(RegionCount(BIG));
                for step in &history {
                    apply(&log, step, &mut model).await.expect("step");
                }
                (log, model)
            });
            let new = after(&last, &old);
            let target = log.next_slot_extent();
            let before = dev.snapshot(target);
            let mut model = old.clone();
            run_local(async move {
                apply(&log, &last, &mut model).await.expect("last step");
            });
            let written = dev.snapshot(target);
            for cut in 0..=target.len.0 as usize {
                let mut image = written[..cut * SECTOR].to_vec();
                image.extend_from_slice(&before[cut * SECTOR..]);
                dev.poke(target.start, &image);
                let (_, bits) = reopen(dev.clone(), BIG).expect("a valid slot remains");
                prop_assert!(bits == old || bits == new, "cut at sector {}", cut);
                if cut == 0 || cut == target.len.0 as usize {
                    prop_assert_eq!(&bits, if cut == 0 { &old } else { &new });
                }
            }
        }

        /// A power cut between a commit's write and its flush tears the unflushed sectors at
        /// random; the log then opens as the old or the new image, and every bit made
        /// durable by a completed mark (and not cleared since) is set.
        #[test]
        fn a_torn_commit_leaves_old_or_new(
            steps in proptest::collection::vec(step(BIG), 1..8),
            crash_at in 0usize..8,
            seed in any::<u64>(),
        ) {
            let crash_at = crash_at % steps.len();
            let inner = MemDevice::new_volatile("log", area(BIG).end() - Sector(0));
            let dev = CrashAtFlush::new(inner.clone());
            let log = create(dev.clone(), BIG);
            let d = Arc::clone(&dev);
            let (old, new) = run_local(async move {
                let mut model = RegionBitmap::new(RegionCount(BIG));
                for step in &steps[..crash_at] {
                    apply(&log, step, &mut model).await.expect("step");
                }
                let new = after(&steps[crash_at], &model);
                d.arm(seed);
                let old = model.clone();
                let _ = apply(&log, &steps[crash_at], &mut model).await;
                (old, new)
            });
            inner.crash(&mut ChaCha8Rng::seed_from_u64(seed));
            let (_, bits) = reopen(dev, BIG).expect("a valid slot remains");
            prop_assert!(bits == old || bits == new);
        }
    }
}
