//! The on-disk format of the COW store: layout, superblock slots, log blocks and records (see
//! the module doc of [`super`] for the whole picture; its field offsets are checked against
//! the header structs here at compile time).
//!
//! Invariants: every value read from disk is untrusted and checked before use, with checked
//! arithmetic, against the others and against what a store this build creates can hold:
//! - a superblock slot is blank (no magic), torn (its checksum fails: the other slot serves)
//!   or sealed; a sealed slot whose fields are impossible (a chunk size `Layout::plan` would
//!   refuse, log areas or data past the COW size, no data chunk, a sequence with no
//!   successor) is a `Corrupt` error naming the field, never skipped for the other slot;
//! - a log block that is not a whole block of this log, epoch and index ends the log (a torn,
//!   stale or never-written block); a sealed block of this log whose `used` length or
//!   records are impossible (an unknown type, state or reason, a slot out of range, a name
//!   `snapshot create` would refuse) is a `Corrupt` error, since a checksum that holds means
//!   a writer put it there whole;
//! - what records mean together (slots, chunks, the origin) is checked by the replay
//!   (`Store::check_replay`).
//!
//! Nothing here panics on disk content.

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, crc, magic, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
use crate::format::{U32, U64};
use crate::units::{Sector, SectorCount, BLOCK_BYTES};

use super::exceptions::MAX_ORIGIN_CHUNKS;

pub const SB_MAGIC: magic::Magic = magic::SNAPSHOT_SUPERBLOCK;
pub const LOG_MAGIC: magic::Magic = magic::SNAPSHOT_LOG;
/// The store format this build writes: 2 (snapshots by 16-bit slots, origin copies shared by
/// creation-number ranges). It also reads format 1 (64 slots, sharers by mask): such a store
/// is rewritten in format 2 by the first compaction after it is opened, before any record of
/// format 2 is appended.
pub const VERSION: u32 = 2;
/// The oldest store format this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes of a superblock slot and of a log block.
pub const BLOCK: usize = BLOCK_BYTES as usize;
pub const BLOCK_SECTORS: SectorCount = crate::units::BLOCK_SECTORS;
/// Where the log area starts: after the two superblock slots.
pub const META_START: Sector = Sector(2 * BLOCK_SECTORS.0);
/// Bytes of a log block's header.
pub const LOG_HEADER: usize = std::mem::size_of::<RawLogHeader>();
/// The most snapshots one store holds. A store's log areas are planned for as many (a store
/// of format 1 was planned for [`FORMAT1_SNAPSHOTS`]; its limit is what its areas hold,
/// [`Layout::snapshot_capacity`]).
pub const MAX_SNAPSHOTS: usize = 1024;
/// The snapshots of a format 1 store: its `Map` records name sharers by a 64-bit mask.
pub const FORMAT1_SNAPSHOTS: usize = 64;
/// A `Private` record's COW chunk that says the snapshot's chunk was merged into the origin.
pub const MERGED_CHUNK: u64 = u64::MAX;
/// The longest snapshot name, in bytes.
pub const MAX_NAME: usize = 64;
/// The smallest chunk a store has: 4 KiB, the COW store's block.
pub const MIN_CHUNK: SectorCount = SectorCount(8);
/// The largest chunk a store has: 1 GiB.
pub const MAX_CHUNK: SectorCount = SectorCount(1 << 21);

/// Slot `slot` as records carry it (slots are below [`MAX_SNAPSHOTS`], so they fit).
pub fn slot_number(slot: usize) -> u16 {
    assert!(slot < MAX_SNAPSHOTS, "slot {slot}");
    u16::try_from(slot).expect("a slot number fits its record")
}

/// Whether `name` may name a snapshot: 1 to [`MAX_NAME`] bytes without control characters
/// (the rule of `snapshot create`, checked again on every name read from disk: a name ends
/// up in thread and device names, where a NUL is fatal).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control)
}
/// Bytes of the biggest record (a `Create` with the longest name).
const MAX_RECORD: usize = 1 + 2 + 8 + 1 + 1 + 8 + 1 + MAX_NAME;
/// Bytes of the biggest record a COW chunk has in a checkpoint (a `Copy` or a `Map`; a
/// `Private` is smaller): a checkpoint holds one per used chunk.
const MAP_RECORD: usize = 1 + 8 + 8 + 8;

/// How many snapshots a new store on a COW device of `cow_size` plans room for in its log
/// areas: [`MAX_SNAPSHOTS`], unless their records (4 copies: a checkpoint and room to append,
/// in each of two areas) would take more than 1/64 of the device; then as many as that
/// allows, but at least [`FORMAT1_SNAPSHOTS`]. (A few MiB of COW store need not give up
/// space for a thousand snapshots.)
fn planned_snapshots(cow_size: SectorCount) -> u64 {
    let budget = cow_size.to_bytes() / 64;
    let fit = budget / (4 * MAX_RECORD as u64);
    fit.clamp(FORMAT1_SNAPSHOTS as u64, MAX_SNAPSHOTS as u64)
}

/// Record type codes. Format 1 codes (slots of one byte) are read, never written.
mod code {
    pub const CREATE_1: u8 = 1;
    pub const DELETE_1: u8 = 2;
    pub const INVALIDATE_1: u8 = 3;
    pub const MERGE_START_1: u8 = 4;
    pub const MAP: u8 = 5;
    pub const UNMAP_1: u8 = 6;
    pub const CREATE: u8 = 7;
    pub const DELETE: u8 = 8;
    pub const INVALIDATE: u8 = 9;
    pub const MERGE_START: u8 = 10;
    pub const UNMAP: u8 = 11;
    pub const COPY: u8 = 12;
    pub const PRIVATE: u8 = 13;
    pub const COPY_MERGING: u8 = 14;
    pub const GROW: u8 = 15;
}

/// A superblock slot's fields as they lie on disk (the superblock paragraph of [`super`]).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSuperblock {
    magic: [u8; 8],
    version: U32,
    crc: U32,
    uuid: [u8; 16],
    sequence: U64,
    chunk: U64,
    origin_size: U64,
    cow_size: U64,
    area_blocks: U64,
    data_start: U64,
    data_chunks: U64,
    active_area: U64,
    epoch: U64,
}

/// A log block's header as it lies on disk (the log block paragraph of [`super`]).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLogHeader {
    magic: [u8; 8],
    crc: U32,
    used: U32,
    uuid: [u8; 16],
    epoch: U64,
    index: U64,
}

// The offsets the module doc of [`super`] gives.
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(RawSuperblock, version) == 8);
    assert!(offset_of!(RawSuperblock, crc) == 12);
    assert!(offset_of!(RawSuperblock, uuid) == 16);
    assert!(offset_of!(RawSuperblock, sequence) == 32);
    assert!(offset_of!(RawSuperblock, chunk) == 40);
    assert!(offset_of!(RawSuperblock, origin_size) == 48);
    assert!(offset_of!(RawSuperblock, cow_size) == 56);
    assert!(offset_of!(RawSuperblock, area_blocks) == 64);
    assert!(offset_of!(RawSuperblock, data_start) == 72);
    assert!(offset_of!(RawSuperblock, data_chunks) == 80);
    assert!(offset_of!(RawSuperblock, active_area) == 88);
    assert!(offset_of!(RawSuperblock, epoch) == 96);
    assert!(offset_of!(RawLogHeader, crc) == 8);
    assert!(offset_of!(RawLogHeader, used) == 12);
    assert!(offset_of!(RawLogHeader, uuid) == 16);
    assert!(offset_of!(RawLogHeader, epoch) == 32);
    assert!(offset_of!(RawLogHeader, index) == 40);
    assert!(LOG_HEADER == 48);
};

const CRC_AT: usize = std::mem::offset_of!(RawSuperblock, crc);
const LOG_CRC_AT: usize = std::mem::offset_of!(RawLogHeader, crc);

/// Why a snapshot became invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The COW store was full when the snapshot needed a chunk.
    Overflow = 1,
    /// Copying a chunk for it failed.
    CopyError = 2,
    /// The store's metadata could not be written.
    MetadataError = 3,
}

impl Reason {
    fn from_code(code: u8) -> Result<Reason, String> {
        match code {
            1 => Ok(Reason::Overflow),
            2 => Ok(Reason::CopyError),
            3 => Ok(Reason::MetadataError),
            _ => Err(format!("has an unknown invalidation reason {code}")),
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Reason::Overflow => "the COW store overflowed",
            Reason::CopyError => "a copy-on-write copy failed",
            Reason::MetadataError => "the COW store's metadata could not be written",
        }
    }
}

/// A snapshot's persistent state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapState {
    Valid,
    Invalid(Reason),
    /// Being merged into the origin (its I/O fails; it is deleted when the merge ends).
    Merging,
}

impl SnapState {
    fn code(self) -> (u8, u8) {
        match self {
            SnapState::Valid => (0, 0),
            SnapState::Invalid(r) => (1, r as u8),
            SnapState::Merging => (2, 0),
        }
    }

    /// The state of a `Create` record; the reason byte is zero but for an invalid one.
    fn from_code(state: u8, reason: u8) -> Result<SnapState, String> {
        match (state, reason) {
            (0, 0) => Ok(SnapState::Valid),
            (1, _) => Ok(SnapState::Invalid(Reason::from_code(reason)?)),
            (2, 0) => Ok(SnapState::Merging),
            (0 | 2, _) => Err(format!("has state {state} with a reason ({reason})")),
            _ => Err(format!("has an unknown snapshot state {state}")),
        }
    }
}

/// One metadata record of the log. Snapshots are named by slot (below
/// [`MAX_SNAPSHOTS`]); a `Copy` names the newest snapshot it serves by creation number, which
/// may be a snapshot gone since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Snapshot `slot` exists (replacing whatever the slot held), with no images of its own.
    Create {
        slot: u16,
        seq: u64,
        state: SnapState,
        merge_total: u64,
        name: String,
    },
    /// Snapshot `slot` is gone; its chunks are released.
    Delete { slot: u16 },
    /// Snapshot `slot` is invalid; its chunks are released.
    Invalidate { slot: u16, reason: Reason },
    /// Snapshot `slot` is being merged; it had `total` exceptions then.
    MergeStart { slot: u16, total: u64 },
    /// COW chunk `cow` holds origin chunk `origin` as the own image of every valid snapshot
    /// in `mask` (slots below [`FORMAT1_SNAPSHOTS`]): format 1's origin copy, and format 2's
    /// record of one kept from a format 1 store.
    Map { cow: u64, origin: u64, mask: u64 },
    /// Snapshot `slot`'s chunk `origin` was merged into the origin, or discarded.
    Unmap { slot: u16, origin: u64 },
    /// COW chunk `cow` holds origin chunk `origin` as it was before an origin write, for every
    /// snapshot up to creation number `newest` that had no image of it (format 2). Made while
    /// snapshot `merging` (a creation number) merged and read `origin` from the origin, it
    /// does not serve that one: its image of `origin` is in the origin already (its
    /// `Create` may be gone by the time this is logged, when its merge ended meanwhile).
    Copy {
        cow: u64,
        origin: u64,
        newest: u64,
        merging: Option<u64>,
    },
    /// COW chunk `cow` is snapshot `slot`'s own image of origin chunk `origin` (a write
    /// through the snapshot), or [`MERGED_CHUNK`]: a merge put it into the origin (format 2).
    Private { cow: u64, origin: u64, slot: u16 },
    /// The origin grew to `size` sectors (from a whole number of chunks): the snapshots of
    /// creation number `since` on have that size, those before keep theirs (format 2, written
    /// only by a store that grew: an older build refuses it as an unknown type).
    Grow { size: u64, since: u64 },
}

impl Record {
    /// The COW chunk whose data the record makes an image of, if any (not a merged mark).
    pub fn cow_chunk(&self) -> Option<u64> {
        match *self {
            Record::Map { cow, .. } | Record::Copy { cow, .. } => Some(cow),
            Record::Private { cow, .. } if cow != MERGED_CHUNK => Some(cow),
            _ => None,
        }
    }

    /// Appends the record in format 2.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Create {
                slot,
                seq,
                state,
                merge_total,
                name,
            } => {
                let (s, r) = state.code();
                out.push(code::CREATE);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(s);
                out.push(r);
                out.extend_from_slice(&merge_total.to_le_bytes());
                out.push(u8::try_from(name.len()).expect("names are checked short"));
                out.extend_from_slice(name.as_bytes());
            }
            Record::Delete { slot } => {
                out.push(code::DELETE);
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Record::Invalidate { slot, reason } => {
                out.push(code::INVALIDATE);
                out.extend_from_slice(&slot.to_le_bytes());
                out.push(*reason as u8);
            }
            Record::MergeStart { slot, total } => {
                out.push(code::MERGE_START);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&total.to_le_bytes());
            }
            Record::Map { cow, origin, mask } => {
                out.push(code::MAP);
                for v in [cow, origin, mask] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Record::Unmap { slot, origin } => {
                out.push(code::UNMAP);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&origin.to_le_bytes());
            }
            Record::Copy {
                cow,
                origin,
                newest,
                merging,
            } => {
                out.push(match merging {
                    None => code::COPY,
                    Some(_) => code::COPY_MERGING,
                });
                for v in [cow, origin, newest].into_iter().chain(merging) {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Record::Private { cow, origin, slot } => {
                out.push(code::PRIVATE);
                out.extend_from_slice(&cow.to_le_bytes());
                out.extend_from_slice(&origin.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Record::Grow { size, since } => {
                out.push(code::GROW);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&since.to_le_bytes());
            }
        }
    }

    /// Decodes every record of a block's payload; the error says which record is impossible
    /// and why.
    pub fn decode_all(mut data: &[u8]) -> std::result::Result<Vec<Record>, String> {
        let mut records = Vec::new();
        while !data.is_empty() {
            let mut r = Reader { data: &mut data };
            let record = r
                .record()
                .map_err(|what| format!("record {} {what}", records.len()))?;
            records.push(record);
        }
        Ok(records)
    }
}

/// Reads records from a payload; each error completes "record N ...".
struct Reader<'a, 'b> {
    data: &'b mut &'a [u8],
}

type Field<T> = std::result::Result<T, String>;

impl<'a> Reader<'a, '_> {
    fn record(&mut self) -> Field<Record> {
        let code = self.u8()?;
        Ok(match code {
            code::CREATE_1 | code::CREATE => self.create(code == code::CREATE)?,
            code::DELETE_1 | code::DELETE => Record::Delete {
                slot: self.slot(code == code::DELETE)?,
            },
            code::INVALIDATE_1 | code::INVALIDATE => Record::Invalidate {
                slot: self.slot(code == code::INVALIDATE)?,
                reason: Reason::from_code(self.u8()?)?,
            },
            code::MERGE_START_1 | code::MERGE_START => Record::MergeStart {
                slot: self.slot(code == code::MERGE_START)?,
                total: self.u64()?,
            },
            code::MAP => Record::Map {
                cow: self.u64()?,
                origin: self.u64()?,
                mask: self.u64()?,
            },
            code::UNMAP_1 | code::UNMAP => Record::Unmap {
                slot: self.slot(code == code::UNMAP)?,
                origin: self.u64()?,
            },
            code::COPY | code::COPY_MERGING => Record::Copy {
                cow: self.u64()?,
                origin: self.u64()?,
                newest: self.u64()?,
                merging: match code {
                    code::COPY => None,
                    _ => Some(self.u64()?),
                },
            },
            code::PRIVATE => Record::Private {
                cow: self.u64()?,
                origin: self.u64()?,
                slot: self.slot(true)?,
            },
            code::GROW => Record::Grow {
                size: self.u64()?,
                since: self.u64()?,
            },
            other => return Err(format!("has an unknown type {other}")),
        })
    }

    /// A `Create`; `wide`: with a slot of two bytes (format 2).
    fn create(&mut self, wide: bool) -> Field<Record> {
        let slot = self.slot(wide)?;
        let seq = self.u64()?;
        let state = SnapState::from_code(self.u8()?, self.u8()?)?;
        let merge_total = self.u64()?;
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        let name = match std::str::from_utf8(bytes) {
            Ok(name) if valid_name(name) => name.to_owned(),
            Ok(name) => {
                return Err(format!(
                    "names snapshot slot {slot} {name:?}, which is not 1 to {MAX_NAME} bytes \
                     without control characters"
                ))
            }
            Err(_) => {
                let lossy = String::from_utf8_lossy(bytes);
                return Err(format!(
                    "names snapshot slot {slot} {lossy:?}, which is not UTF-8"
                ));
            }
        };
        Ok(Record::Create {
            slot,
            seq,
            state,
            merge_total,
            name,
        })
    }

    fn take(&mut self, n: usize) -> Field<&'a [u8]> {
        if self.data.len() < n {
            return Err("is cut short by the end of the block's records".to_owned());
        }
        let (head, tail) = self.data.split_at(n);
        *self.data = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Field<u8> {
        Ok(self.take(1)?[0])
    }
    /// A slot number: two bytes if `wide` (format 2), else one (format 1, 64 slots).
    fn slot(&mut self, wide: bool) -> Field<u16> {
        let (slot, slots) = if wide {
            let b = self.take(2)?;
            (u16::from_le_bytes([b[0], b[1]]), MAX_SNAPSHOTS)
        } else {
            (u16::from(self.u8()?), FORMAT1_SNAPSHOTS)
        };
        if usize::from(slot) >= slots {
            return Err(format!(
                "names snapshot slot {slot}, beyond the {slots} slots"
            ));
        }
        Ok(slot)
    }
    fn u64(&mut self) -> Field<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

pub fn corrupt(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, message)
}

/// Where everything lives on the COW device; fixed when the store is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub uuid: Uuid,
    pub chunk: SectorCount,
    pub origin_size: SectorCount,
    pub cow_size: SectorCount,
    /// Blocks in each of the two log areas.
    pub area_blocks: u64,
    pub data_start: Sector,
    pub data_chunks: u64,
}

impl Layout {
    /// The layout of a new store on a COW device of `cow_size` sectors.
    pub fn plan(
        uuid: Uuid,
        chunk: SectorCount,
        origin_size: SectorCount,
        cow_size: SectorCount,
    ) -> Result<Layout> {
        if !chunk_size_ok(chunk) {
            return Err(Error::invalid(format!(
                "the chunk size must be a power of two from 4 KiB to 1 GiB, not {} bytes",
                chunk.to_bytes()
            )));
        }
        if origin_size.is_zero() {
            return Err(Error::invalid("the origin is empty"));
        }
        if origin_size.0.div_ceil(chunk.0) > MAX_ORIGIN_CHUNKS {
            return Err(Error::invalid(format!(
                "the origin ({} sectors) has more than {MAX_ORIGIN_CHUNKS} chunks of {} bytes, \
                 the most a store can name: choose larger chunks",
                origin_size.0,
                chunk.to_bytes()
            )));
        }
        // A checkpoint holds a map record per used chunk plus every snapshot's record; each
        // area holds twice that, so appends have room between compactions.
        let chunks_max = cow_size.0 / chunk.0;
        let per_block = (BLOCK - LOG_HEADER) as u64;
        let snapshots = planned_snapshots(cow_size);
        let ckpt_bytes = chunks_max * MAP_RECORD as u64 + snapshots * MAX_RECORD as u64;
        let area_blocks = 2 * ckpt_bytes.div_ceil(per_block) + 8;
        let meta_end = META_START.0 + 2 * area_blocks * BLOCK_SECTORS.0;
        let data_start = meta_end.next_multiple_of(chunk.0);
        let data_chunks = cow_size.0.saturating_sub(data_start) / chunk.0;
        if data_chunks == 0 {
            return Err(Error::invalid(format!(
                "the COW device ({} sectors) is too small: it needs {} sectors for the header and \
                 metadata plus at least one chunk of {} sectors",
                cow_size.0, data_start, chunk.0
            )));
        }
        Ok(Layout {
            uuid,
            chunk,
            origin_size,
            cow_size,
            area_blocks,
            data_start: Sector(data_start),
            data_chunks,
        })
    }

    /// How many snapshots a checkpoint of this store has room for: each area holds a
    /// checkpoint of every data chunk's record and the snapshots' records in its first half
    /// (the rest is room for appends), at most [`MAX_SNAPSHOTS`]. A new store holds that many;
    /// one of format 1 at least [`FORMAT1_SNAPSHOTS`].
    pub fn snapshot_capacity(&self) -> usize {
        let per_block = (BLOCK - LOG_HEADER) as u64;
        let half = self.area_blocks.saturating_mul(per_block) / 2;
        let room = half.saturating_sub(self.data_chunks.saturating_mul(MAP_RECORD as u64));
        let fits = usize::try_from(room / MAX_RECORD as u64).unwrap_or(usize::MAX);
        fits.clamp(FORMAT1_SNAPSHOTS, MAX_SNAPSHOTS)
    }

    /// Origin chunks (the last may be short).
    pub fn origin_chunks(&self) -> u64 {
        self.origin_size.0.div_ceil(self.chunk.0)
    }

    /// The first sector of log area `area`.
    pub fn area_start(&self, area: u8) -> Sector {
        META_START + SectorCount(u64::from(area) * self.area_blocks * BLOCK_SECTORS.0)
    }
}

/// A superblock slot: the layout plus the log's current area and epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub layout: Layout,
    pub sequence: u64,
    pub active_area: u8,
    pub epoch: u64,
    /// The store format (written as [`VERSION`]; read from [`OLDEST_VERSION`] on).
    pub version: u32,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let raw = RawSuperblock {
            magic: SB_MAGIC,
            version: U32::new(self.version),
            crc: U32::ZERO,
            uuid: *l.uuid.as_bytes(),
            sequence: U64::new(self.sequence),
            chunk: U64::new(l.chunk.0),
            origin_size: U64::new(l.origin_size.0),
            cow_size: U64::new(l.cow_size.0),
            area_blocks: U64::new(l.area_blocks),
            data_start: U64::new(l.data_start.0),
            data_chunks: U64::new(l.data_chunks),
            active_area: U64::new(u64::from(self.active_area)),
            epoch: U64::new(self.epoch),
        };
        let mut b = vec![0u8; BLOCK];
        format::write_header(&mut b, &raw);
        crc::seal(&mut b, CRC_AT);
        b
    }

    /// What a slot holds: nothing, a torn write, or a superblock. Fails when a sealed slot
    /// (its checksum holds) is impossible (`Corrupt`, naming the field) or of another version.
    pub fn read_slot(b: &[u8]) -> Result<Slot> {
        let b = &b[..BLOCK];
        let raw: &RawSuperblock = format::header(b).expect("a block holds a superblock");
        if raw.magic != SB_MAGIC {
            return Ok(Slot::Blank);
        }
        if !crc::verify(b, CRC_AT) {
            return Ok(Slot::Torn);
        }
        let version = raw.version.get();
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the COW store has version {version}; this build reads versions \
                     {OLDEST_VERSION} to {VERSION}"
                ),
            ));
        }
        let layout = Layout {
            uuid: Uuid::from_bytes(raw.uuid),
            chunk: SectorCount(raw.chunk.get()),
            origin_size: SectorCount(raw.origin_size.get()),
            cow_size: SectorCount(raw.cow_size.get()),
            area_blocks: raw.area_blocks.get(),
            data_start: Sector(raw.data_start.get()),
            data_chunks: raw.data_chunks.get(),
        };
        layout.check().map_err(corrupt)?;
        let active_area = raw.active_area.get();
        if active_area >= 2 {
            return Err(corrupt(format!(
                "active_area is {active_area}, not log area 0 or 1"
            )));
        }
        let sequence = raw.sequence.get();
        if sequence == u64::MAX {
            return Err(corrupt(format!(
                "sequence is {sequence}, which leaves no successor for the next compaction"
            )));
        }
        Ok(Slot::Sealed(Superblock {
            layout,
            sequence,
            active_area: active_area as u8,
            epoch: raw.epoch.get(),
            version,
        }))
    }

    /// `Ok(None)` when the slot holds no superblock at all (no magic); a torn slot is an error
    /// (for tests).
    #[cfg(test)]
    pub fn decode(b: &[u8]) -> Result<Option<Superblock>> {
        match Superblock::read_slot(b)? {
            Slot::Blank => Ok(None),
            Slot::Torn => Err(corrupt("a COW superblock slot fails its checksum")),
            Slot::Sealed(sb) => Ok(Some(sb)),
        }
    }
}

/// What a superblock slot holds (see [`Superblock::read_slot`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// No superblock magic.
    Blank,
    /// The magic, but the checksum fails: a write torn by a power cut.
    Torn,
    Sealed(Superblock),
}

/// Whether a store may have chunks of `chunk`: a power of two from [`MIN_CHUNK`] to
/// [`MAX_CHUNK`] (what `Layout::plan` creates, and what a superblock may say).
fn chunk_size_ok(chunk: SectorCount) -> bool {
    chunk.0.is_power_of_two() && (MIN_CHUNK.0..=MAX_CHUNK.0).contains(&chunk.0)
}

impl Layout {
    /// Whether a layout read from disk is one `Layout::plan` could have made: a chunk size it
    /// allows, a non-empty origin, both log areas before the data, the data chunk aligned, at
    /// least one data chunk, all of it within the COW size (checked against the device by
    /// the caller). Checked arithmetic: the values are untrusted. The error names the field.
    fn check(&self) -> std::result::Result<(), String> {
        let chunk = self.chunk.0;
        if !chunk_size_ok(self.chunk) {
            return Err(format!(
                "the chunk size of {chunk} sectors is not a power of two from {} to {} sectors",
                MIN_CHUNK.0, MAX_CHUNK.0
            ));
        }
        if self.origin_size.is_zero() {
            return Err("the origin size is 0 sectors".to_owned());
        }
        if self.origin_chunks() > MAX_ORIGIN_CHUNKS {
            return Err(format!(
                "the origin size of {} sectors is more than {MAX_ORIGIN_CHUNKS} chunks",
                self.origin_size.0
            ));
        }
        let meta_end = self
            .area_blocks
            .checked_mul(2 * BLOCK_SECTORS.0)
            .and_then(|n| n.checked_add(META_START.0));
        let meta_end = match meta_end {
            Some(end) if self.area_blocks > 0 => end,
            _ => return Err(format!("area_blocks is {}", self.area_blocks)),
        };
        let start = self.data_start.0;
        if start < meta_end || start % chunk != 0 {
            return Err(format!(
                "data_start is sector {start}, not a multiple of the chunk size ({chunk}) at or \
                 after the end of the log areas ({meta_end})"
            ));
        }
        let data_end = self
            .data_chunks
            .checked_mul(chunk)
            .and_then(|n| n.checked_add(start));
        match data_end {
            Some(end) if self.data_chunks > 0 && end <= self.cow_size.0 => Ok(()),
            _ => Err(format!(
                "data_chunks is {}: not 1 or more chunks of {chunk} sectors from sector {start} \
                 within the COW size ({} sectors)",
                self.data_chunks, self.cow_size.0
            )),
        }
    }
}

/// Packs `records` into log blocks of `epoch` numbered from `first` (at least one block, which
/// may hold no records).
pub fn encode_blocks(uuid: Uuid, epoch: u64, first: u64, records: &[Record]) -> Vec<u8> {
    let mut packer = LogPacker::new(uuid, epoch, first);
    records.iter().for_each(|r| packer.push(r));
    packer.finish()
}

/// Packs records into sealed log blocks of one epoch, numbered on from a first index, a
/// block at a time: a long run of records (a checkpoint) is then written in bounded pieces,
/// never built whole in memory.
///
/// Invariant: the bytes taken out are whole sealed blocks, in index order, with no gap; a
/// record never spans two blocks.
pub struct LogPacker {
    uuid: Uuid,
    epoch: u64,
    /// Index of the block being filled.
    index: u64,
    /// Blocks sealed so far (over the packer's life, taken out or not).
    sealed: u64,
    /// Records of the block being filled.
    payload: Vec<u8>,
    /// Sealed blocks not taken out yet.
    out: Vec<u8>,
}

impl LogPacker {
    pub fn new(uuid: Uuid, epoch: u64, first: u64) -> LogPacker {
        LogPacker {
            uuid,
            epoch,
            index: first,
            sealed: 0,
            payload: Vec::with_capacity(BLOCK - LOG_HEADER),
            out: Vec::new(),
        }
    }

    /// Adds `record`, sealing the block being filled first when it would not fit.
    pub fn push(&mut self, record: &Record) {
        let at = self.payload.len();
        record.encode(&mut self.payload);
        if LOG_HEADER + self.payload.len() > BLOCK {
            let one = self.payload.split_off(at);
            self.seal();
            self.payload = one;
        }
        assert!(
            LOG_HEADER + self.payload.len() <= BLOCK,
            "a record fits a block"
        );
    }

    /// Sealed blocks waiting to be taken.
    pub fn ready_blocks(&self) -> usize {
        self.out.len() / BLOCK
    }

    /// Takes the sealed blocks packed so far (possibly none).
    pub fn take_blocks(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Seals the block being filled (or one empty block, when nothing was ever sealed) and
    /// returns every block not taken yet.
    pub fn finish(mut self) -> Vec<u8> {
        if !self.payload.is_empty() || self.sealed == 0 {
            self.seal();
        }
        self.out
    }

    fn seal(&mut self) {
        let block = log_block(self.uuid, self.epoch, self.index, &self.payload);
        self.out.extend_from_slice(&block);
        self.payload.clear();
        self.index += 1;
        self.sealed += 1;
    }
}

/// One sealed log block of `epoch` at `index` holding `payload` (at most a block's worth).
pub fn log_block(uuid: Uuid, epoch: u64, index: u64, payload: &[u8]) -> Vec<u8> {
    assert!(
        LOG_HEADER + payload.len() <= BLOCK,
        "a payload fits a block"
    );
    let header = RawLogHeader {
        magic: LOG_MAGIC,
        crc: U32::ZERO,
        used: U32::new(u32::try_from(payload.len()).expect("a payload fits a block")),
        uuid: *uuid.as_bytes(),
        epoch: U64::new(epoch),
        index: U64::new(index),
    };
    let mut b = vec![0u8; BLOCK];
    format::write_header(&mut b, &header);
    b[LOG_HEADER..LOG_HEADER + payload.len()].copy_from_slice(payload);
    crc::seal(&mut b, LOG_CRC_AT);
    b
}

/// The records of a log block if it is a whole block of this log, epoch and index; `None`
/// for anything else (the end of the log: stale, torn, or never written). A block of this
/// log whose length or records are impossible is an error (saying why): its checksum holds,
/// so it is no torn write but a writer's bug or a crafted store, and ending the log there
/// would drop the records after it.
pub fn decode_block(
    b: &[u8],
    uuid: Uuid,
    epoch: u64,
    index: u64,
) -> std::result::Result<Option<Vec<Record>>, String> {
    let b = &b[..BLOCK];
    let header: &RawLogHeader = format::header(b).expect("a block holds a header");
    let ours = header.magic == LOG_MAGIC
        && crc::verify(b, LOG_CRC_AT)
        && header.uuid == *uuid.as_bytes()
        && header.epoch.get() == epoch
        && header.index.get() == index;
    if !ours {
        return Ok(None);
    }
    let used = header.used.get() as usize;
    if used > BLOCK - LOG_HEADER {
        return Err(format!(
            "used is {used} bytes of records, more than the {} a block holds",
            BLOCK - LOG_HEADER
        ));
    }
    Record::decode_all(&b[LOG_HEADER..LOG_HEADER + used]).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::plan(
            Uuid::new_v4(),
            SectorCount(32),
            SectorCount(1000),
            SectorCount(8192),
        )
        .expect("layout")
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            layout: layout(),
            sequence: 7,
            active_area: 1,
            epoch: 3,
            version: VERSION,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).expect("valid"), Some(sb));
        b[100] ^= 1;
        assert!(Superblock::decode(&b).is_err());
        assert_eq!(Superblock::decode(&[0u8; BLOCK]).expect("blank"), None);
    }

    fn fixed_layout() -> Layout {
        Layout::plan(
            Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001),
            SectorCount(32),
            SectorCount(1000),
            SectorCount(8192),
        )
        .expect("layout")
    }

    /// The layout the format 1 goldens carry (planned for 64 snapshots).
    fn format1_layout() -> Layout {
        Layout {
            uuid: Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001),
            chunk: SectorCount(32),
            origin_size: SectorCount(1000),
            cow_size: SectorCount(8192),
            area_blocks: 14,
            data_start: Sector(256),
            data_chunks: 248,
        }
    }

    /// A format 1 superblock, byte for byte as that format wrote it, still reads.
    #[test]
    fn format_1_superblocks_still_read() {
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d534e415001000000a87d98a55eed0000000000000000000000000001",
            ),
            (32, "06050403020100002000000000000000e8030000000000000020"),
            (64, "0e000000000000000001000000000000f80000000000000001"),
            (96, "4d"),
        ];
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        let sb = Superblock {
            layout: format1_layout(),
            sequence: 0x0102_0304_0506,
            active_area: 1,
            epoch: 77,
            version: 1,
        };
        assert_eq!(Superblock::decode(&image).expect("golden"), Some(sb));
    }

    /// A superblock with fixed fields, byte for byte, as format 2 writes it: any change to
    /// the on-disk format fails here.
    #[test]
    fn superblock_encoding_is_unchanged() {
        let sb = Superblock {
            layout: fixed_layout(),
            sequence: 0x0102_0304_0506,
            active_area: 1,
            epoch: 77,
            version: VERSION,
        };
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d534e41500200000051f879685eed0000000000000000000000000001",
            ),
            (32, "06050403020100002000000000000000e8030000000000000020"),
            (64, "14000000000000006001000000000000f50000000000000001"),
            (96, "4d"),
        ];
        crate::format::golden::assert_image(&sb.encode(), BLOCK, GOLDEN);
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        assert_eq!(Superblock::decode(&image).expect("golden"), Some(sb));
    }

    /// A log block holding one record of every format 1 type, byte for byte as that format
    /// wrote it, still decodes.
    #[test]
    fn format_1_log_blocks_still_decode() {
        let records = [
            Record::Create {
                slot: 3,
                seq: 9,
                state: SnapState::Invalid(Reason::Overflow),
                merge_total: 5,
                name: "nightly".into(),
            },
            Record::Delete { slot: 1 },
            Record::Invalidate {
                slot: 2,
                reason: Reason::CopyError,
            },
            Record::MergeStart { slot: 3, total: 12 },
            Record::Map {
                cow: 0x0a0b,
                origin: 0x0c0d,
                mask: 1 << 63 | 5,
            },
            Record::Unmap {
                slot: 63,
                origin: 77,
            },
        ];
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d534c4f4739bdd9944e0000005eed0000000000000000000000000001",
            ),
            (
                32,
                "0100ee00000000002a0000000000000001030900000000000000010105",
            ),
            (68, "076e696768746c79020103020204030c00000000000000050b0a"),
            (100, "0d0c0000000000000500000000000080063f4d"),
        ];
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        let back = decode_block(&image, format1_layout().uuid, 0x00ee_0001, 42).expect("valid");
        assert_eq!(back.as_deref(), Some(&records[..]));
    }

    /// A log block holding one record of every format 2 type, byte for byte.
    #[test]
    fn log_block_encoding_is_unchanged() {
        let records = [
            Record::Create {
                slot: 1000,
                seq: 9,
                state: SnapState::Invalid(Reason::Overflow),
                merge_total: 5,
                name: "nightly".into(),
            },
            Record::Delete { slot: 1 },
            Record::Invalidate {
                slot: 2,
                reason: Reason::CopyError,
            },
            Record::MergeStart { slot: 3, total: 12 },
            Record::Map {
                cow: 0x0a0b,
                origin: 0x0c0d,
                mask: 1 << 63 | 5,
            },
            Record::Unmap {
                slot: 1023,
                origin: 77,
            },
            Record::Copy {
                cow: 0x0102,
                origin: 0x0304,
                newest: 0x0506,
                merging: None,
            },
            Record::Copy {
                cow: 0x11,
                origin: 0x12,
                newest: 0x13,
                merging: Some(0x14),
            },
            Record::Private {
                cow: MERGED_CHUNK,
                origin: 0x0708,
                slot: 0x0209,
            },
        ];
        let bytes = encode_blocks(fixed_layout().uuid, 0x00ee_0001, 42, &records);
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d534c4f47fec139b0a00000005eed0000000000000000000000000001",
            ),
            (
                32,
                "0100ee00000000002a0000000000000007e8030900000000000000010105",
            ),
            (
                69,
                "076e696768746c79080100090200020a03000c00000000000000050b0a",
            ),
            (
                104,
                "0d0c00000000000005000000000000800bff034d000000000000000c0201",
            ),
            (140, "040300000000000006050000000000000e110000000000000012"),
            (
                173,
                "130000000000000014000000000000000dffffffffffffffff0807",
            ),
            (206, "0902"),
        ];
        crate::format::golden::assert_image(&bytes, BLOCK, GOLDEN);
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        let back = decode_block(&image, fixed_layout().uuid, 0x00ee_0001, 42).expect("valid");
        assert_eq!(back.as_deref(), Some(&records[..]));
    }

    /// A slot with a valid crc but hostile sizes (sums and products past u64) is a Corrupt
    /// error, never an overflow panic.
    #[test]
    fn hostile_superblock_sizes_are_corrupt() {
        let sb = Superblock {
            layout: fixed_layout(),
            sequence: 1,
            active_area: 0,
            epoch: 1,
            version: VERSION,
        };
        // area_blocks (64), data_start (72), data_chunks (80).
        for (at, value) in [(64, u64::MAX / 4), (72, u64::MAX - 1), (80, u64::MAX / 8)] {
            let mut b = sb.encode();
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            crc::seal(&mut b, CRC_AT);
            let err = Superblock::decode(&b).expect_err("hostile");
            assert_eq!(err.kind(), ErrorKind::Corrupt, "field at {at}");
        }
    }

    /// The growth record: type 15, the new size and the first creation number it is for.
    #[test]
    fn a_grow_record_round_trips() {
        let grow = Record::Grow {
            size: 0x0102_0304_0506,
            since: 7,
        };
        let mut bytes = Vec::new();
        grow.encode(&mut bytes);
        assert_eq!(bytes.len(), 17);
        assert_eq!(bytes[0], 15);
        assert_eq!(bytes[1..9], 0x0102_0304_0506u64.to_le_bytes());
        assert_eq!(bytes[9..17], 7u64.to_le_bytes());
        assert_eq!(Record::decode_all(&bytes), Ok(vec![grow]));
        assert!(Record::decode_all(&bytes[..16]).is_err(), "cut short");
    }

    #[test]
    fn records_round_trip_across_blocks() {
        let mut records = vec![
            Record::Create {
                slot: 3,
                seq: 9,
                state: SnapState::Invalid(Reason::Overflow),
                merge_total: 0,
                name: "nightly".into(),
            },
            Record::Delete { slot: 1 },
            Record::Invalidate {
                slot: 2,
                reason: Reason::CopyError,
            },
            Record::MergeStart { slot: 3, total: 12 },
            Record::Unmap {
                slot: 3,
                origin: 77,
            },
        ];
        for i in 0..400 {
            records.push(Record::Map {
                cow: i,
                origin: i * 3,
                mask: 1 << (i % 64),
            });
        }
        let uuid = Uuid::new_v4();
        let bytes = encode_blocks(uuid, 5, 10, &records);
        assert!(bytes.len() > BLOCK, "spans blocks");
        let mut back = Vec::new();
        for (i, b) in bytes.chunks(BLOCK).enumerate() {
            let records = decode_block(b, uuid, 5, 10 + i as u64).expect("sane");
            back.extend(records.expect("valid block"));
        }
        assert_eq!(back, records);
        // Another epoch, index or store, or a torn block, ends the log.
        let first = &bytes[..BLOCK];
        assert_eq!(decode_block(first, uuid, 4, 10), Ok(None));
        assert_eq!(decode_block(first, uuid, 5, 11), Ok(None));
        assert_eq!(decode_block(first, Uuid::new_v4(), 5, 10), Ok(None));
        let mut torn = first.to_vec();
        torn[2048..].fill(0);
        assert_eq!(decode_block(&torn, uuid, 5, 10), Ok(None));
    }

    /// Blank, torn and sealed slots are told apart: only a sealed one with an impossible
    /// field is an error.
    #[test]
    fn superblock_slots_are_blank_torn_or_sealed() {
        let sb = Superblock {
            layout: fixed_layout(),
            sequence: 1,
            active_area: 0,
            epoch: 1,
            version: VERSION,
        };
        let good = sb.encode();
        assert_eq!(
            Superblock::read_slot(&good).expect("sealed"),
            Slot::Sealed(sb)
        );
        assert_eq!(
            Superblock::read_slot(&[0; BLOCK]).expect("blank"),
            Slot::Blank
        );
        let mut torn = good.clone();
        torn[2000] ^= 1;
        assert_eq!(Superblock::read_slot(&torn).expect("torn"), Slot::Torn);
        let mut bad = good;
        bad[40..48].copy_from_slice(&(MAX_CHUNK.0 * 2).to_le_bytes());
        crc::seal(&mut bad, CRC_AT);
        let err = Superblock::read_slot(&bad).expect_err("impossible");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("chunk size"), "{err}");
    }

    /// A sealed block of this log with impossible records is an error, not the end of the log.
    #[test]
    fn sealed_blocks_with_impossible_records_are_errors() {
        let uuid = Uuid::new_v4();
        let cases: [(&[u8], &str); 7] = [
            (&[99], "unknown type 99"),
            (&[2, 64], "slot 64"),
            (&[8, 0, 4], "slot 1024"),
            (
                &[
                    13, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
                ],
                "slot 65535",
            ),
            (&[3, 1, 0], "reason 0"),
            (&[5, 1, 2], "cut short"),
            (
                &[
                    1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'a',
                ],
                "state 7",
            ),
        ];
        for (payload, what) in cases {
            let err = decode_block(&log_block(uuid, 1, 0, payload), uuid, 1, 0).expect_err(what);
            assert!(err.starts_with("record 0 ") && err.contains(what), "{err}");
        }
        assert!(valid_name("nightly") && valid_name(&"x".repeat(MAX_NAME)));
        for bad in ["", "a\0b", "tab\there", &"x".repeat(MAX_NAME + 1)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn bad_chunk_sizes_and_small_devices_are_refused() {
        let plan = |chunk, cow| {
            Layout::plan(
                Uuid::nil(),
                SectorCount(chunk),
                SectorCount(100),
                SectorCount(cow),
            )
        };
        for bad in [0, 4, 24, 1 << 22] {
            let err = plan(bad, 1 << 20).expect_err("bad chunk");
            assert!(err.to_string().contains("power of two"), "{err}");
        }
        let err = plan(32, 64).expect_err("too small");
        assert!(err.to_string().contains("too small"), "{err}");
        let ok = plan(32, 1 << 14).expect("fits");
        assert!(ok.data_start.0 % 32 == 0 && ok.data_chunks > 0);
    }

    #[test]
    fn an_origin_of_more_chunks_than_the_index_names_is_refused() {
        let chunk = MIN_CHUNK;
        let plan = |origin| Layout::plan(Uuid::nil(), chunk, origin, SectorCount(1 << 14));
        let most = SectorCount(MAX_ORIGIN_CHUNKS * chunk.0);
        let ok = plan(most).expect("the most chunks");
        assert_eq!(ok.origin_chunks(), MAX_ORIGIN_CHUNKS);
        let err = plan(SectorCount(most.0 + 1)).expect_err("one sector more");
        assert!(err.to_string().contains("larger chunks"), "{err}");
        let read = Layout {
            origin_size: SectorCount(most.0 + 1),
            ..ok
        };
        let err = read.check().expect_err("read from disk");
        assert!(err.contains("origin size"), "{err}");
    }
}
