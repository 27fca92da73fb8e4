//! The mirror's self-describing metadata on every leg: the superblock, the on-disk layout it
//! describes, and the probe that tells our legs from blank and foreign devices (the foreign
//! part is `crate::device::probe`'s).
//!
//! # On-disk layout of a leg
//!
//! | sectors                      | content                                                  |
//! |------------------------------|----------------------------------------------------------|
//! | 0..8                         | superblock slot A (4 KiB)                                |
//! | 8..16                        | superblock slot B (4 KiB)                                |
//! | 16..16 + log length          | this leg's copy of the write-intent bitmap (a `DirtyLog` |
//! |                              | area, see `meta.rs`)                                     |
//! | data offset..+ data size     | the mirrored data; the data offset is a multiple of 1 MiB|
//!
//! # Superblock (little-endian, the first 512 bytes of a 4 KiB slot, the rest zero)
//!
//! | offset | size  | field                                                                |
//! |--------|-------|----------------------------------------------------------------------|
//! | 0      | 8     | magic `UBDMMIRR`                                                     |
//! | 8      | 4     | version, 1                                                           |
//! | 12     | 4     | crc32c of the whole 4 KiB slot, computed with this field zero        |
//! | 16     | 16    | mirror UUID                                                          |
//! | 32     | 4     | this leg's slot (0..8)                                               |
//! | 36     | 4     | zero                                                                 |
//! | 40     | 8     | event counter                                                        |
//! | 48     | 8     | events_cleared: the counter when dirty bits were last allowed to clear|
//! | 56     | 8     | region size, sectors                                                 |
//! | 64     | 8     | data offset, sectors                                                 |
//! | 72     | 8     | data size, sectors (the exposed size)                                |
//! | 80     | 8     | log area start, sectors                                              |
//! | 88     | 8     | log area length, sectors                                             |
//! | 96     | 32    | zero                                                                 |
//! | 128    | 8x48  | slot table: per slot, state (u8: 0 empty, 1 in sync, 2 recovering,   |
//! |        |       | 3 stale, 4 failed), 7 zero bytes, leg UUID (16), leg size (8), zero  |
//!
//! # Invariants
//!
//! - An update with event counter `e` goes to slot `e % 2` (even: A, odd: B) with FUA, so a
//!   torn update leaves the previous one intact in the other slot; the probe takes the valid
//!   slot with the highest counter. Every live leg gets the same table and counter; only the
//!   "this leg's slot" field differs.
//! - A leg whose counter is behind the freshest leg's missed updates (it was failed or away).
//!   md's rule decides how it comes back: if its counter is at least `events_cleared`, no
//!   dirty bit was cleared since it left and the bitmap covers what it missed.
//! - Every field read from disk is untrusted: `Superblock::decode` bounds each length and
//!   counter (`check_layout`: the layout is one `Layout::compute` can make: the log area at
//!   sector 16, a whole number of 4 KiB, long enough for the bitmap of the data's regions and
//!   at most the size of a log of `MAX_REGION_COUNT` regions, about 1 MiB; the data at the
//!   log's end rounded up to 1 MiB, a whole number of 4 KiB, ending below 2^64 bytes; the
//!   region size a power of two from 4 KiB to the data size; the counters below
//!   `MAX_EVENTS`, so that raising them never overflows; a mirror is assembled only from a
//!   counter at most `MAX_OPEN_EVENTS`, so that what it writes later decodes), and an
//!   impossible value is an error
//!   naming the field, never a panic or a huge buffer. The decoded layout is checked against
//!   the device at assembly (a leg smaller than `Layout::leg_sectors` is left out) and
//!   against the other legs (members whose layouts differ are refused, as mdadm refuses
//!   superblocks that do not match).
//! - Only the mirror writes a leg's metadata area (everything before the data offset), and the
//!   encoded superblock fills only the first 512 bytes of its slot: a leg whose slot A is no
//!   longer valid and whose metadata area shows another program's signature (libblkid's
//!   probe, `crate::device::probe`) was reformatted, and is foreign, whatever slot B says.
//!   Foreign signatures are libblkid's to recognise; this file knows only our own magic.

use std::sync::Arc;

use uuid::Uuid;

use crate::device::{self, AlignedBuf, DeviceRef, WriteFlags};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{self, crc, magic, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
use crate::format::{U32, U64};
use crate::region::{DirtyLog, RegionBitmap, RegionGeometry, MAX_REGION_COUNT};
use crate::units::{Extent, Sector, SectorCount, BLOCK_SECTORS, SECTOR_BYTES};

/// The most legs a mirror has (one copy job writes to all but the source: the copy engine's
/// destination limit plus one would allow 9; 8 keeps the slot table a round size).
pub const MAX_LEGS: usize = 8;
/// The fewest legs a mirror is created with.
pub const MIN_LEGS: usize = 2;

const MAGIC: magic::Magic = magic::MIRROR_SUPERBLOCK;
const VERSION: u32 = 1;

/// The superblock as it lies on disk (the table in this file's doc).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSuperblock {
    magic: [u8; 8],
    version: U32,
    crc: U32,
    uuid: [u8; 16],
    slot: U32,
    zero: [u8; 4],
    events: U64,
    events_cleared: U64,
    region_size: U64,
    data_offset: U64,
    data_size: U64,
    log_start: U64,
    log_len: U64,
    zero2: [u8; 32],
    table: [RawEntry; MAX_LEGS],
}

/// One entry of the slot table, as it lies on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawEntry {
    state: u8,
    zero: [u8; 7],
    leg_uuid: [u8; 16],
    leg_size: U64,
    zero2: [u8; 16],
}

// The offsets of the table in this file's doc.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(RawSuperblock, version) == 8);
    assert!(offset_of!(RawSuperblock, crc) == 12);
    assert!(offset_of!(RawSuperblock, uuid) == 16);
    assert!(offset_of!(RawSuperblock, slot) == 32);
    assert!(offset_of!(RawSuperblock, events) == 40);
    assert!(offset_of!(RawSuperblock, events_cleared) == 48);
    assert!(offset_of!(RawSuperblock, region_size) == 56);
    assert!(offset_of!(RawSuperblock, data_offset) == 64);
    assert!(offset_of!(RawSuperblock, data_size) == 72);
    assert!(offset_of!(RawSuperblock, log_start) == 80);
    assert!(offset_of!(RawSuperblock, log_len) == 88);
    assert!(offset_of!(RawSuperblock, table) == 128);
    assert!(size_of::<RawEntry>() == 48);
    assert!(offset_of!(RawEntry, leg_uuid) == 8 && offset_of!(RawEntry, leg_size) == 24);
    assert!(size_of::<RawSuperblock>() == SECTOR_BYTES as usize);
};

const CRC_AT: usize = std::mem::offset_of!(RawSuperblock, crc);

/// One superblock slot: 4 KiB.
pub const SB_SECTORS: SectorCount = BLOCK_SECTORS;
/// Where the dirty log's area starts on every leg.
pub const LOG_START: Sector = Sector(16);
/// The data offset is a multiple of this (1 MiB).
pub const DATA_ALIGN: SectorCount = SectorCount(2048);
/// The largest leg, in sectors: a device whose size in bytes fits in a `u64`. Bounds every
/// size and offset a superblock gives.
pub const MAX_LEG_SECTORS: SectorCount = SectorCount(u64::MAX / SECTOR_BYTES);
/// The highest event counter a superblock may carry: far beyond any mirror's life (one
/// update a nanosecond for a century is below 2^62), and low enough that raising it never
/// overflows.
pub const MAX_EVENTS: u64 = 1 << 62;
/// The highest event counter a mirror is assembled with. Below [`MAX_EVENTS`] by 2^61, so
/// that the superblocks a running mirror writes (each update one more) stay valid for 2^61
/// updates, beyond any mirror's life: a leg crafted at the limit would otherwise assemble,
/// and then write superblocks its next assembly refuses.
pub const MAX_OPEN_EVENTS: u64 = 1 << 61;
/// The region size used when none is given: 512 KiB, dm-mirror's default, doubled while
/// the device would have too many regions.
pub const DEFAULT_REGION: SectorCount = SectorCount(1024);

/// What a leg is to the mirror, as recorded in the slot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LegState {
    /// No leg in this slot.
    Empty,
    /// A complete copy: written, read, and a resync source.
    InSync,
    /// Written, and read where its region is in sync; the resync copies it what it lacks.
    Recovering,
    /// Missed writes while away; not written or read until it comes back.
    Stale,
    /// Failed an I/O; not written or read until it is added back.
    Failed,
}

impl LegState {
    fn code(self) -> u8 {
        match self {
            LegState::Empty => 0,
            LegState::InSync => 1,
            LegState::Recovering => 2,
            LegState::Stale => 3,
            LegState::Failed => 4,
        }
    }

    fn from_code(code: u8) -> Option<LegState> {
        Some(match code {
            0 => LegState::Empty,
            1 => LegState::InSync,
            2 => LegState::Recovering,
            3 => LegState::Stale,
            4 => LegState::Failed,
            _ => return None,
        })
    }

    /// Whether the leg receives writes.
    pub fn is_active(self) -> bool {
        matches!(self, LegState::InSync | LegState::Recovering)
    }

    /// Whether a leg in this state is missing from the set (degraded mode).
    pub fn is_missing(self) -> bool {
        matches!(self, LegState::Stale | LegState::Failed)
    }
}

/// One entry of the slot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub state: LegState,
    /// Names the leg that holds the slot, so a replaced leg is not taken for its successor.
    pub leg_uuid: Uuid,
    pub leg_size: SectorCount,
}

impl SlotEntry {
    pub const EMPTY: SlotEntry = SlotEntry {
        state: LegState::Empty,
        leg_uuid: Uuid::nil(),
        leg_size: SectorCount(0),
    };
}

/// Where things are on every leg: fixed when the mirror is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub region_size: SectorCount,
    pub data_offset: Sector,
    pub data_size: SectorCount,
    pub log_area: Extent,
}

impl Layout {
    /// The layout for legs of at least `smallest` sectors. `region_size` `None` picks the
    /// default, doubled until the region count fits.
    pub fn compute(smallest: SectorCount, region_size: Option<SectorCount>) -> Result<Layout> {
        let room = smallest.0.saturating_sub(DATA_ALIGN.0) / 8 * 8;
        let region_size = match region_size {
            Some(size) => size,
            None => {
                let mut size = DEFAULT_REGION;
                while room.div_ceil(size.0) > MAX_REGION_COUNT.0 {
                    size = SectorCount(size.0 * 2);
                }
                SectorCount(size.0.min(room.max(8).next_power_of_two() / 2).max(8))
            }
        };
        // The log's size depends on the region count, which depends on the data size, which
        // depends on the log's size: size the log for the larger guess, then fit the data.
        let guess = RegionGeometry::new(SectorCount(room.max(region_size.0)), region_size)?;
        let log_len = DirtyLog::area_sectors(guess.count());
        let log_area = Extent::new(LOG_START, log_len);
        let data_offset = Sector(log_area.end().0.next_multiple_of(DATA_ALIGN.0));
        let data_size = SectorCount(smallest.0.saturating_sub(data_offset.0) / 8 * 8);
        if data_size < region_size || data_size.is_zero() {
            return Err(Error::invalid(format!(
                "the smallest leg ({smallest}) leaves no room for data after {} sectors of \
                 metadata and one region of {} sectors",
                data_offset.0, region_size.0
            )));
        }
        RegionGeometry::new(data_size, region_size)?;
        Ok(Layout {
            region_size,
            data_offset,
            data_size,
            log_area,
        })
    }

    /// The region geometry of the data area.
    pub fn geometry(&self) -> RegionGeometry {
        RegionGeometry::new(self.data_size, self.region_size).expect("checked layout")
    }

    /// The sectors a leg needs.
    pub fn leg_sectors(&self) -> SectorCount {
        self.data_offset + self.data_size - Sector(0)
    }

    /// The layout of this mirror grown onto legs of at least `smallest` sectors (`mdadm
    /// --grow --size=max`, see `grow.rs`): the log area
    /// and the data offset stay, since they are fixed on every leg; the data size becomes all
    /// that the smallest leg holds after the data offset (whole 4 KiB); the region size is
    /// kept if the bitmap of the new region count fits the log area, else doubled until it
    /// does (as md resizes its bitmap). The result passes the checks of
    /// `Superblock::decode`. Refused (InvalidArgument) when the legs hold no more data.
    pub fn grown(&self, smallest: SectorCount) -> Result<Layout> {
        let data_size = SectorCount(
            smallest.0.saturating_sub(self.data_offset.0) / BLOCK_SECTORS.0 * BLOCK_SECTORS.0,
        );
        if data_size <= self.data_size {
            return Err(Error::invalid(format!(
                "the smallest leg ({smallest}) holds {} sectors of data, no more than the {} \
                 the mirror has",
                data_size.0, self.data_size.0
            )));
        }
        let mut region_size = self.region_size;
        loop {
            let fits = RegionGeometry::new(data_size, region_size).is_ok_and(|geometry| {
                DirtyLog::area_sectors(geometry.count()) <= self.log_area.len
            });
            if fits {
                break;
            }
            region_size = SectorCount(region_size.0.checked_mul(2).ok_or_else(|| {
                Error::invalid(format!("no region size fits {data_size} in the log area"))
            })?);
            if region_size > data_size {
                return Err(Error::invalid(format!(
                    "no region size fits {data_size} in the log area of {} sectors",
                    self.log_area.len.0
                )));
            }
        }
        let grown = Layout {
            region_size,
            data_size,
            ..*self
        };
        check_layout(&grown).map_err(|why| Error::invalid(format!("the grown layout {why}")))?;
        Ok(grown)
    }

    /// The write-intent bits of this layout carried over to `grown` (from
    /// [`Layout::grown`]): a region of the grown layout is dirty when any region of this one
    /// it covers was (a doubled region merges two), and so is every region that reaches past
    /// this layout's data (the new area, resynced as md does without `--assume-clean`).
    pub fn grown_bits(&self, bits: &RegionBitmap, grown: &Layout) -> RegionBitmap {
        let (old, new) = (self.geometry(), grown.geometry());
        assert_eq!(bits.len(), old.count(), "bits of this layout");
        assert!(
            new.device_size() >= old.device_size() && new.region_size() >= old.region_size(),
            "a grown layout"
        );
        let mut out = RegionBitmap::new(new.count());
        for region in bits.iter_ones() {
            out.set_range(new.regions_touching(old.extent_of(region)), true);
        }
        let added = old.device_size().0;
        let fresh = Extent::new(Sector(added), SectorCount(new.device_size().0 - added));
        if !fresh.len.is_zero() {
            out.set_range(new.regions_touching(fresh), true);
        }
        out
    }

    /// The first field in which `other` differs from this layout, as "the region size (64
    /// vs 128 sectors)", or `None` when they are the same: for messages about two legs'
    /// superblocks that disagree.
    pub fn difference(&self, other: &Layout) -> Option<String> {
        let fields = [
            ("region size", self.region_size.0, other.region_size.0),
            ("data offset", self.data_offset.0, other.data_offset.0),
            ("data size", self.data_size.0, other.data_size.0),
            (
                "log area start",
                self.log_area.start.0,
                other.log_area.start.0,
            ),
            ("log area length", self.log_area.len.0, other.log_area.len.0),
        ];
        fields
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(field, a, b)| format!("the {field} ({a} vs {b} sectors)"))
    }
}

/// A decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: Uuid,
    pub slot: usize,
    pub events: u64,
    pub events_cleared: u64,
    pub layout: Layout,
    pub table: [SlotEntry; MAX_LEGS],
}

impl Superblock {
    /// This leg's own entry.
    pub fn own(&self) -> &SlotEntry {
        &self.table[self.slot]
    }

    /// The 4 KiB slot image of this superblock.
    pub fn encode(&self) -> AlignedBuf {
        let l = &self.layout;
        let raw = RawSuperblock {
            magic: MAGIC,
            version: U32::new(VERSION),
            crc: U32::ZERO,
            uuid: *self.uuid.as_bytes(),
            slot: U32::new(u32::try_from(self.slot).expect("slot below MAX_LEGS")),
            zero: [0; 4],
            events: U64::new(self.events),
            events_cleared: U64::new(self.events_cleared),
            region_size: U64::new(l.region_size.0),
            data_offset: U64::new(l.data_offset.0),
            data_size: U64::new(l.data_size.0),
            log_start: U64::new(l.log_area.start.0),
            log_len: U64::new(l.log_area.len.0),
            zero2: [0; 32],
            table: self.table.map(|entry| RawEntry {
                state: entry.state.code(),
                zero: [0; 7],
                leg_uuid: *entry.leg_uuid.as_bytes(),
                leg_size: U64::new(entry.leg_size.0),
                zero2: [0; 16],
            }),
        };
        let mut buf = AlignedBuf::for_sectors(SB_SECTORS);
        format::write_header(buf.as_mut_slice(), &raw);
        crc::seal(buf.as_mut_slice(), CRC_AT);
        buf
    }

    /// Decodes and checks one 4 KiB slot; the error says why it is not a valid superblock.
    pub fn decode(b: &[u8]) -> std::result::Result<Superblock, String> {
        assert_eq!(b.len(), SB_SECTORS.to_usize_bytes(), "a superblock slot");
        let raw: &RawSuperblock = format::header(b).expect("a slot holds a superblock");
        if raw.magic != MAGIC {
            return Err("has no mirror magic".into());
        }
        let version = raw.version.get();
        if version != VERSION {
            return Err(format!("has version {version}, not {VERSION}"));
        }
        if !crc::verify(b, CRC_AT) {
            return Err("fails its checksum (torn or damaged)".into());
        }
        let slot = raw.slot.get();
        let slot = match usize::try_from(slot) {
            Ok(slot) if slot < MAX_LEGS => slot,
            _ => return Err(format!("claims slot {slot}, not one of 0..{MAX_LEGS}")),
        };
        let layout = Layout {
            region_size: SectorCount(raw.region_size.get()),
            data_offset: Sector(raw.data_offset.get()),
            data_size: SectorCount(raw.data_size.get()),
            log_area: Extent {
                start: Sector(raw.log_start.get()),
                len: SectorCount(raw.log_len.get()),
            },
        };
        check_layout(&layout)?;
        let mut table = [SlotEntry::EMPTY; MAX_LEGS];
        for (i, (entry, raw)) in table.iter_mut().zip(&raw.table).enumerate() {
            let state = LegState::from_code(raw.state)
                .ok_or_else(|| format!("has leg state {} in slot {i}", raw.state))?;
            *entry = SlotEntry {
                state,
                leg_uuid: Uuid::from_bytes(raw.leg_uuid),
                leg_size: SectorCount(raw.leg_size.get()),
            };
        }
        if table[slot].state == LegState::Empty {
            return Err(format!("names slot {slot}, which its table says is empty"));
        }
        let (events, events_cleared) = (raw.events.get(), raw.events_cleared.get());
        check_counters_and_table(events, events_cleared, &layout, &table)?;
        Ok(Superblock {
            uuid: Uuid::from_bytes(raw.uuid),
            slot,
            events,
            events_cleared,
            layout,
            table,
        })
    }

    /// Where an update with this superblock's counter goes.
    pub fn sector(&self) -> Sector {
        slot_sector(self.events)
    }
}

/// The slot an update with event counter `events` is written to.
fn slot_sector(events: u64) -> Sector {
    if events % 2 == 0 {
        Sector(0)
    } else {
        Sector(SB_SECTORS.0)
    }
}

/// Checks every length of a layout read from disk against what `Layout::compute` makes, so
/// that nothing sized from it (the log area, read whole when a leg joins; the bitmaps; I/O
/// offsets) can be huge, overflow, or point past a device. Each error names its field.
fn check_layout(l: &Layout) -> std::result::Result<(), String> {
    if l.log_area.start != LOG_START {
        return Err(format!(
            "has a log area start of sector {}, not {}",
            l.log_area.start.0, LOG_START.0
        ));
    }
    let max_log = DirtyLog::area_sectors(MAX_REGION_COUNT);
    if l.log_area.len.0 % BLOCK_SECTORS.0 != 0 {
        return Err(format!(
            "has a log area length of {} sectors, not a multiple of {} (4 KiB)",
            l.log_area.len.0, BLOCK_SECTORS.0
        ));
    }
    if l.log_area.len > max_log {
        return Err(format!(
            "has a log area length of {} sectors, more than the limit of {}",
            l.log_area.len.0, max_log.0
        ));
    }
    if l.data_size.is_zero() || l.data_size > MAX_LEG_SECTORS {
        return Err(format!(
            "has a data size of {} sectors, not within 1..={}",
            l.data_size.0, MAX_LEG_SECTORS.0
        ));
    }
    if l.data_size.0 % BLOCK_SECTORS.0 != 0 {
        return Err(format!(
            "has a data size of {} sectors, not a multiple of {} (4 KiB)",
            l.data_size.0, BLOCK_SECTORS.0
        ));
    }
    let geometry = RegionGeometry::new(l.data_size, l.region_size).map_err(|e| {
        format!(
            "has a region size of {} sectors that does not suit its data size: {e}",
            l.region_size.0
        )
    })?;
    let needed = DirtyLog::area_sectors(geometry.count());
    if l.log_area.len < needed {
        return Err(format!(
            "has a log area length of {} sectors, too short for the bitmap of its {} regions \
             ({} needed)",
            l.log_area.len.0,
            geometry.count().0,
            needed.0
        ));
    }
    // Bounded above, so no overflow: the data starts at the log's end rounded up to 1 MiB.
    let data_offset = Sector((l.log_area.end().0).next_multiple_of(DATA_ALIGN.0));
    if l.data_offset != data_offset {
        return Err(format!(
            "has a data offset of sector {}, not {} (its log area's end rounded up to 1 MiB)",
            l.data_offset.0, data_offset.0
        ));
    }
    let end = l.data_offset.0.checked_add(l.data_size.0);
    if end.is_none_or(|end| end > MAX_LEG_SECTORS.0) {
        return Err(format!(
            "has a data size of {} sectors, which ends past the largest device ({} sectors)",
            l.data_size.0, MAX_LEG_SECTORS.0
        ));
    }
    Ok(())
}

/// Checks the counters and the slot table of a superblock read from disk.
fn check_counters_and_table(
    events: u64,
    events_cleared: u64,
    layout: &Layout,
    table: &[SlotEntry; MAX_LEGS],
) -> std::result::Result<(), String> {
    if events > MAX_EVENTS {
        return Err(format!(
            "has an event counter of {events}, more than the limit of {MAX_EVENTS}"
        ));
    }
    if events_cleared > events {
        return Err(format!(
            "has an events_cleared of {events_cleared}, above its event counter {events}"
        ));
    }
    for (i, entry) in table.iter().enumerate() {
        let size = entry.leg_size;
        let small = entry.state != LegState::Empty && size < layout.leg_sectors();
        if size > MAX_LEG_SECTORS || small {
            return Err(format!(
                "has a leg size of {} sectors in slot {i}, not within {}..={}",
                size.0,
                layout.leg_sectors().0,
                MAX_LEG_SECTORS.0
            ));
        }
    }
    Ok(())
}

/// Writes `sb` to its slot on `dev`, durably (FUA).
pub async fn write_superblock(dev: &DeviceRef, sb: &Superblock) -> std::io::Result<()> {
    dev.write(sb.sector(), Arc::new(sb.encode()), WriteFlags::FUA)
        .await
}

/// Zeroes both superblock slots of `dev` (and with them any signature in its first 8 KiB).
pub async fn wipe_superblocks(dev: &DeviceRef) -> Result<()> {
    let zero = Arc::new(AlignedBuf::for_sectors(SB_SECTORS + SB_SECTORS));
    dev.write(Sector(0), zero, WriteFlags::FUA)
        .await
        .context(|| format!("cannot wipe the superblocks of {}", dev.info().name))
}

/// What a device holds, as far as the mirror cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A leg of one of our mirrors (the freshest valid slot).
    Ours(Box<Superblock>),
    /// Our magic, but no valid slot: a damaged leg.
    Damaged(String),
    /// Another program's metadata (see [`crate::device::probe`]): what it is, for messages.
    Foreign(String),
    /// Nothing we or libblkid recognise.
    Blank,
}

/// Reads `dev`'s superblock slots and says what it is; a device without our metadata is
/// probed for foreign signatures (see [`crate::device::probe`]).
pub async fn probe(dev: &DeviceRef) -> Result<Probe> {
    match own_metadata(dev).await? {
        Some(found) => Ok(found),
        None => Ok(match device::probe::foreign_signature(dev).await? {
            Some(signature) => Probe::Foreign(signature.description),
            None => Probe::Blank,
        }),
    }
}

/// What our own superblock slots say about `dev`: `Ours` or `Damaged`, or `None` when it
/// holds no mirror metadata. A leg whose slot A is gone while slot B is valid is `Foreign`
/// when another program's signature now sits in the leg's metadata area (a new file system
/// or volume was made on it), since only we write there.
pub async fn own_metadata(dev: &DeviceRef) -> Result<Option<Probe>> {
    let name = dev.info().name.clone();
    if dev.info().size < SB_SECTORS + SB_SECTORS {
        return Err(Error::invalid(format!(
            "{name} is too small to be a mirror leg"
        )));
    }
    let len = SB_SECTORS + SB_SECTORS;
    let head = format::read::read_at(dev, Sector(0), len, len, || {
        format!("cannot read the metadata of {name}")
    })
    .await?;
    let bytes = head.as_slice();
    let half = SB_SECTORS.to_usize_bytes();
    let a = Superblock::decode(&bytes[..half]);
    let b = Superblock::decode(&bytes[half..]);
    let best = match (a, b) {
        (Ok(a), Ok(b)) => Ok(if a.events >= b.events { a } else { b }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => match foreign_in_metadata(dev, &b).await? {
            Some(kind) => return Ok(Some(Probe::Foreign(kind))),
            None => Ok(b),
        },
        (Err(why_a), Err(why_b)) => Err(format!("slot A {why_a}; slot B {why_b}")),
    };
    Ok(match best {
        Ok(sb) => Some(Probe::Ours(Box::new(sb))),
        Err(why) if bytes[..8] == MAGIC || bytes[half..half + 8] == MAGIC => {
            Some(Probe::Damaged(why))
        }
        Err(_) => None,
    })
}

/// A foreign signature in the metadata area (before the data offset) that `sb` describes:
/// the mirror's own data may hold anything, so only signatures there count.
async fn foreign_in_metadata(dev: &DeviceRef, sb: &Superblock) -> Result<Option<String>> {
    let data_offset = sb.layout.data_offset.to_bytes();
    let found = device::probe::signatures(dev).await?;
    Ok(found
        .into_iter()
        .find(|s| s.offset.is_none_or(|at| at < data_offset))
        .map(|s| s.description))
}

/// An error for a device whose metadata we will not overwrite without `force`.
pub fn refuse(dev: &DeviceRef, probe: &Probe) -> Error {
    let name = &dev.info().name;
    match probe {
        Probe::Ours(sb) => Error::new(
            ErrorKind::Busy,
            format!(
                "{name} is slot {} of mirror {}; use force to overwrite it",
                sb.slot, sb.uuid
            ),
        ),
        Probe::Damaged(why) => Error::new(
            ErrorKind::Corrupt,
            format!("{name} has a damaged mirror superblock ({why}); use force to overwrite it"),
        ),
        Probe::Foreign(kind) => Error::new(
            ErrorKind::Busy,
            format!("{name} holds {kind}; use force to overwrite it"),
        ),
        Probe::Blank => Error::invalid(format!("{name} is blank")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use crate::device::MemDevice;

    /// Growing keeps the log area and the data offset, keeps the region size while the new
    /// count fits the log area and doubles it otherwise; the grown layout decodes.
    #[test]
    fn a_grown_layout_keeps_its_log_area_and_doubles_regions_only_when_needed() {
        let old = Layout::compute(SectorCount(8192), Some(SectorCount(8))).expect("layout");
        let room = DirtyLog::area_sectors(old.geometry().count());
        assert!(old.log_area.len >= room);
        // A little bigger: the log area (4 KiB images) still holds the bits.
        let small = old.grown(SectorCount(8192 + 64)).expect("grown");
        assert_eq!(small.region_size, old.region_size);
        assert_eq!(
            (small.log_area, small.data_offset),
            (old.log_area, old.data_offset)
        );
        assert_eq!(small.data_size, SectorCount(old.data_size.0 + 64));
        // Much bigger: more regions than the area holds at 8 sectors, so regions double.
        let big = old.grown(SectorCount(1 << 24)).expect("grown");
        assert!(big.region_size > old.region_size);
        assert!(big.region_size.0.is_power_of_two());
        assert_eq!(
            (big.log_area, big.data_offset),
            (old.log_area, old.data_offset)
        );
        assert!(DirtyLog::area_sectors(big.geometry().count()) <= big.log_area.len);
        let half = RegionGeometry::new(big.data_size, SectorCount(big.region_size.0 / 2));
        assert!(half.is_err() || DirtyLog::area_sectors(half.unwrap().count()) > big.log_area.len);
        let mut sb = sample();
        sb.layout = big;
        // A superblock that claims data beyond a leg it names does not decode.
        let err = Superblock::decode(sb.encode().as_slice()).expect_err("legs too small");
        assert!(err.contains("leg size"), "{err}");
        for entry in sb.table.iter_mut().filter(|e| e.state != LegState::Empty) {
            entry.leg_size = big.leg_sectors();
        }
        assert_eq!(
            Superblock::decode(sb.encode().as_slice())
                .expect("decodes")
                .layout,
            big
        );
        // Not bigger: refused.
        let err = old.grown(old.leg_sectors()).expect_err("same size");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(old.grown(SectorCount(100)).is_err());
    }

    /// Bits carried over to a grown layout: a merged region is dirty if either half was, and
    /// the new area is dirty (resynced).
    #[test]
    fn grown_bits_keep_every_dirty_region_and_mark_the_new_area() {
        let old = Layout::compute(SectorCount(8192), Some(SectorCount(8))).expect("layout");
        let big = old.grown(SectorCount(1 << 24)).expect("grown");
        let (og, ng) = (old.geometry(), big.geometry());
        let mut bits = RegionBitmap::new(og.count());
        for i in [0u64, 3, 17, og.count().0 - 1] {
            bits.set(crate::region::RegionIndex(i), true);
        }
        let grown = old.grown_bits(&bits, &big);
        assert_eq!(grown.len(), ng.count());
        for region in bits.iter_ones() {
            let at = og.extent_of(region).start;
            assert!(
                grown.get(ng.region_of(at)),
                "old dirty region {region:?} kept"
            );
        }
        let first_new = ng.region_of(Sector(og.device_size().0));
        assert!(grown.get(first_new) && grown.get(crate::region::RegionIndex(ng.count().0 - 1)));
        // Exactly those: the new regions holding an old dirty one, and the new area.
        let mut expected: Vec<_> = bits
            .iter_ones()
            .map(|r| ng.region_of(og.extent_of(r).start))
            .collect();
        expected.extend((first_new.0..ng.count().0).map(crate::region::RegionIndex));
        expected.sort();
        expected.dedup();
        assert_eq!(grown.iter_ones().collect::<Vec<_>>(), expected);
        assert!(
            expected.len() < ng.count().to_usize(),
            "some regions stay clean"
        );
    }

    fn sample() -> Superblock {
        let layout = Layout::compute(SectorCount(8192), Some(SectorCount(64))).expect("layout");
        let mut table = [SlotEntry::EMPTY; MAX_LEGS];
        table[0] = SlotEntry {
            state: LegState::InSync,
            leg_uuid: Uuid::from_u128(1),
            leg_size: SectorCount(8192),
        };
        table[3] = SlotEntry {
            state: LegState::Recovering,
            leg_uuid: Uuid::from_u128(2),
            leg_size: SectorCount(9000),
        };
        Superblock {
            uuid: Uuid::from_u128(0xabc),
            slot: 3,
            events: 7,
            events_cleared: 5,
            layout,
            table,
        }
    }

    #[test]
    fn layout_aligns_the_data_and_fits_the_log() {
        let l = Layout::compute(SectorCount(1 << 21), None).expect("layout");
        assert_eq!(l.data_offset.0 % DATA_ALIGN.0, 0);
        assert!(l.log_area.end() <= l.data_offset);
        assert_eq!(l.region_size, DEFAULT_REGION);
        assert!(l.leg_sectors().0 <= 1 << 21);
        let count = l.geometry().count();
        assert!(DirtyLog::area_sectors(count) <= l.log_area.len);
        assert!(Layout::compute(SectorCount(2048), None).is_err(), "no room");
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let buf = sb.encode();
        assert_eq!(Superblock::decode(buf.as_slice()), Ok(sb.clone()));
        assert!(
            buf.as_slice()[SECTOR_BYTES as usize..]
                .iter()
                .all(|&b| b == 0),
            "the encoding fits in one sector"
        );
        let mut bad = buf.as_slice().to_vec();
        bad[200] ^= 1;
        assert!(Superblock::decode(&bad)
            .expect_err("crc")
            .contains("checksum"));
    }

    /// Lengths that `Layout::compute` never makes: a log area or a data size that is not a
    /// whole number of 4 KiB (served on legs of 4 KiB blocks, their last part cannot be read
    /// or written: a log area of 17 sectors failed the copy of the log to a joining leg with
    /// an I/O error). Both decoded before this check.
    #[test]
    fn lengths_that_are_not_whole_blocks_are_refused_naming_the_field() {
        type Craft = fn(&mut Layout);
        let cases: [(&str, Craft); 3] = [
            ("log area length", |l| {
                l.log_area.len = l.log_area.len + SectorCount(1)
            }),
            ("data size", |l| l.data_size = l.data_size - SectorCount(1)),
            ("data size", |l| l.data_size = l.data_size - SectorCount(4)),
        ];
        for (field, craft) in cases {
            let mut sb = sample();
            craft(&mut sb.layout);
            let err = Superblock::decode(sb.encode().as_slice()).expect_err(field);
            assert!(
                err.contains(field) && err.contains("4 KiB"),
                "{field}: {err}"
            );
        }
        let mut sb = sample();
        sb.layout.data_size = sb.layout.data_size - SB_SECTORS;
        assert_eq!(Superblock::decode(sb.encode().as_slice()), Ok(sb));
    }

    #[test]
    fn layout_differences_name_the_field() {
        let a = sample().layout;
        assert_eq!(a.difference(&a), None);
        let mut b = a;
        b.data_size = SectorCount(4096);
        assert_eq!(
            a.difference(&b).as_deref(),
            Some("the data size (6144 vs 4096 sectors)")
        );
    }

    /// The encoding of `sample()`, byte for byte, as the format was first written: any
    /// change to the on-disk format fails here.
    #[test]
    fn superblock_encoding_is_unchanged() {
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d4d4952520100000090a00b9100000000000000000000000000000abc",
            ),
            (32, "03000000000000000700000000000000050000000000000040"),
            (65, "080000000000000018000000000000100000000000000010"),
            (128, "01"),
            (151, "010020"),
            (272, "02"),
            (295, "022823"),
        ];
        let len = SB_SECTORS.to_usize_bytes();
        crate::format::golden::assert_image(sample().encode().as_slice(), len, GOLDEN);
        let image = crate::format::golden::image(len, GOLDEN);
        assert_eq!(Superblock::decode(&image), Ok(sample()));
    }

    #[test]
    fn a_torn_update_falls_back_to_the_other_slot() {
        let dev: DeviceRef = MemDevice::new("leg", SectorCount(8192));
        let mut sb = sample();
        let d = Arc::clone(&dev);
        let first = sb.clone();
        sb.events += 1;
        let second = sb.clone();
        let (f, s) = (first.clone(), second.clone());
        run_local(async move {
            write_superblock(&d, &f).await.expect("write");
            write_superblock(&d, &s).await.expect("write");
        });
        let probed = run_local({
            let d = Arc::clone(&dev);
            async move { probe(&d).await }
        });
        assert_eq!(
            probed.expect("probe"),
            Probe::Ours(Box::new(second.clone()))
        );
        // Tear the newest slot (B, odd counter): its second half never landed.
        let mem = MemDevice::new("torn", SectorCount(8192));
        mem.poke(Sector(0), first.encode().as_slice());
        let mut torn = second.encode().as_slice().to_vec();
        torn[100] ^= 0xff;
        mem.poke(Sector(8), &torn);
        let probed = run_local(async move { probe(&(mem as DeviceRef)).await });
        assert_eq!(probed.expect("probe"), Probe::Ours(Box::new(first)));
    }

    #[test]
    fn both_slots_damaged_is_reported() {
        let mem = MemDevice::new("bad", SectorCount(8192));
        let mut bytes = sample().encode().as_slice().to_vec();
        bytes[300] ^= 1;
        mem.poke(Sector(0), &bytes);
        mem.poke(Sector(8), &bytes);
        let probed = run_local(async move { probe(&(mem as DeviceRef)).await });
        match probed.expect("probe") {
            Probe::Damaged(why) => assert!(why.contains("checksum"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A mkswap image (swap's magic is at the end of its first page), or `None` (SKIP).
    fn swap_image() -> Option<Vec<u8>> {
        let (dir, file) = crate::device::probe::tests::image_made_by("mkswap", &[], 4 << 20)?;
        let image = std::fs::read(&file).expect("read image");
        drop(dir);
        Some(image)
    }

    #[test]
    fn foreign_signatures_are_recognised() {
        let Some(swap) = swap_image() else { return };
        let mem = MemDevice::new("f", SectorCount(8192));
        mem.poke(Sector(0), &swap);
        let probed = run_local(async move { probe(&(mem as DeviceRef)).await });
        assert_eq!(probed.expect("probe"), Probe::Foreign("a swap area".into()));
        let blank = MemDevice::new("b", SectorCount(8192));
        let probed = run_local(async move { probe(&(blank as DeviceRef)).await });
        assert_eq!(probed.expect("probe"), Probe::Blank);
    }

    /// mkswap over a leg rewrites its first page (slot A) and leaves slot B: the leg is
    /// foreign now, not ours.
    #[test]
    fn a_leg_reformatted_over_slot_a_is_foreign() {
        let Some(swap) = swap_image() else { return };
        let mem = MemDevice::new("leg", SectorCount(8192));
        let mut sb = sample();
        mem.poke(Sector(0), sb.encode().as_slice());
        sb.events += 1;
        mem.poke(Sector(8), sb.encode().as_slice());
        mem.poke(Sector(0), &swap[..SB_SECTORS.to_usize_bytes()]);
        let probed = run_local(async move { probe(&(mem as DeviceRef)).await });
        assert_eq!(probed.expect("probe"), Probe::Foreign("a swap area".into()));
    }

    #[test]
    fn md_superblock_at_the_end_is_foreign() {
        let mem = MemDevice::new("md", SectorCount(8192));
        let bytes = 8192 * SECTOR_BYTES;
        let at = ((bytes & !0xffff) - 0x10000) / SECTOR_BYTES;
        let mut sector = vec![0u8; SECTOR_BYTES as usize];
        sector[..4].copy_from_slice(&0xa92b_4efc_u32.to_le_bytes());
        sector[8..12].copy_from_slice(&90u32.to_le_bytes());
        mem.poke(Sector(at), &sector);
        let probed = run_local(async move { probe(&(mem as DeviceRef)).await });
        assert_eq!(
            probed.expect("probe"),
            Probe::Foreign("an md RAID member".into())
        );
    }
}
