//! The on-disk format of the COW store: layout, superblock slots, log blocks and records (see
//! the module doc of [`super`] for the whole picture).

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::units::{Sector, SectorCount};

pub const SB_MAGIC: [u8; 8] = *b"UBDMSNAP";
pub const LOG_MAGIC: [u8; 8] = *b"UBDMSLOG";
pub const VERSION: u32 = 1;
/// Bytes of a superblock slot and of a log block.
pub const BLOCK: usize = 4096;
pub const BLOCK_SECTORS: SectorCount = SectorCount(8);
/// Where the log area starts: after the two superblock slots.
pub const META_START: Sector = Sector(16);
/// Bytes of a log block's header.
pub const LOG_HEADER: usize = 48;
/// The most snapshots one store holds (a COW chunk's sharers are a 64-bit mask).
pub const MAX_SNAPSHOTS: usize = 64;
/// The longest snapshot name, in bytes.
pub const MAX_NAME: usize = 64;
/// Bytes of the biggest record (a `Create` with the longest name).
const MAX_RECORD: usize = 1 + 1 + 8 + 1 + 1 + 8 + 1 + MAX_NAME;
/// Bytes of a `Map` record, the one a store holds most of.
const MAP_RECORD: usize = 1 + 8 + 8 + 8;

const CRC_AT: std::ops::Range<usize> = 12..16;
const LOG_CRC_AT: std::ops::Range<usize> = 8..12;

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
    pub fn from_code(code: u8) -> Reason {
        match code {
            1 => Reason::Overflow,
            2 => Reason::CopyError,
            _ => Reason::MetadataError,
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

    fn from_code(state: u8, reason: u8) -> Result<SnapState> {
        match state {
            0 => Ok(SnapState::Valid),
            1 => Ok(SnapState::Invalid(Reason::from_code(reason))),
            2 => Ok(SnapState::Merging),
            _ => Err(corrupt("a snapshot record has an unknown state")),
        }
    }
}

/// One metadata record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Snapshot `slot` exists (replacing whatever the slot held), with an empty map.
    Create {
        slot: u8,
        seq: u64,
        state: SnapState,
        merge_total: u64,
        name: String,
    },
    /// Snapshot `slot` is gone; its chunks are released.
    Delete { slot: u8 },
    /// Snapshot `slot` is invalid; its chunks are released.
    Invalidate { slot: u8, reason: Reason },
    /// Snapshot `slot` is being merged; it had `total` exceptions then.
    MergeStart { slot: u8, total: u64 },
    /// COW chunk `cow` holds origin chunk `origin` for every valid snapshot in `mask`: each
    /// one's mapping of `origin` now points there (releasing its previous chunk).
    Map { cow: u64, origin: u64, mask: u64 },
    /// Snapshot `slot`'s chunk `origin` was merged into the origin: its mapping is dropped.
    Unmap { slot: u8, origin: u64 },
}

impl Record {
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
                out.push(1);
                out.push(*slot);
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(s);
                out.push(r);
                out.extend_from_slice(&merge_total.to_le_bytes());
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Record::Delete { slot } => out.extend_from_slice(&[2, *slot]),
            Record::Invalidate { slot, reason } => {
                out.extend_from_slice(&[3, *slot, *reason as u8])
            }
            Record::MergeStart { slot, total } => {
                out.extend_from_slice(&[4, *slot]);
                out.extend_from_slice(&total.to_le_bytes());
            }
            Record::Map { cow, origin, mask } => {
                out.push(5);
                out.extend_from_slice(&cow.to_le_bytes());
                out.extend_from_slice(&origin.to_le_bytes());
                out.extend_from_slice(&mask.to_le_bytes());
            }
            Record::Unmap { slot, origin } => {
                out.extend_from_slice(&[6, *slot]);
                out.extend_from_slice(&origin.to_le_bytes());
            }
        }
    }

    /// Decodes every record of a block's payload.
    pub fn decode_all(mut data: &[u8]) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        while !data.is_empty() {
            let mut r = Reader { data: &mut data };
            let record = match r.u8()? {
                1 => {
                    let slot = r.slot()?;
                    let seq = r.u64()?;
                    let (s, reason) = (r.u8()?, r.u8()?);
                    let merge_total = r.u64()?;
                    let len = r.u8()? as usize;
                    let name = String::from_utf8(r.take(len)?.to_vec())
                        .map_err(|_| corrupt("a snapshot name is not UTF-8"))?;
                    Record::Create {
                        slot,
                        seq,
                        state: SnapState::from_code(s, reason)?,
                        merge_total,
                        name,
                    }
                }
                2 => Record::Delete { slot: r.slot()? },
                3 => Record::Invalidate {
                    slot: r.slot()?,
                    reason: Reason::from_code(r.u8()?),
                },
                4 => Record::MergeStart {
                    slot: r.slot()?,
                    total: r.u64()?,
                },
                5 => Record::Map {
                    cow: r.u64()?,
                    origin: r.u64()?,
                    mask: r.u64()?,
                },
                6 => Record::Unmap {
                    slot: r.slot()?,
                    origin: r.u64()?,
                },
                _ => return Err(corrupt("a log record has an unknown type")),
            };
            records.push(record);
        }
        Ok(records)
    }
}

struct Reader<'a, 'b> {
    data: &'b mut &'a [u8],
}

impl<'a> Reader<'a, '_> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(corrupt("a log record is cut short"));
        }
        let (head, tail) = self.data.split_at(n);
        *self.data = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn slot(&mut self) -> Result<u8> {
        let slot = self.u8()?;
        if slot as usize >= MAX_SNAPSHOTS {
            return Err(corrupt("a log record names a snapshot slot out of range"));
        }
        Ok(slot)
    }
    fn u64(&mut self) -> Result<u64> {
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
        if !chunk.0.is_power_of_two() || chunk.0 < 8 || chunk.0 > 1 << 21 {
            return Err(Error::invalid(format!(
                "the chunk size must be a power of two from 4 KiB to 1 GiB, not {} bytes",
                chunk.to_bytes()
            )));
        }
        if origin_size.is_zero() {
            return Err(Error::invalid("the origin is empty"));
        }
        // A checkpoint holds a map record per used chunk plus every snapshot's record; each
        // area holds twice that, so appends have room between compactions.
        let chunks_max = cow_size.0 / chunk.0;
        let per_block = (BLOCK - LOG_HEADER) as u64;
        let ckpt_bytes = chunks_max * MAP_RECORD as u64 + (MAX_SNAPSHOTS * MAX_RECORD) as u64;
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
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        let l = &self.layout;
        b[0..8].copy_from_slice(&SB_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(l.uuid.as_bytes());
        let fields = [
            self.sequence,
            l.chunk.0,
            l.origin_size.0,
            l.cow_size.0,
            l.area_blocks,
            l.data_start.0,
            l.data_chunks,
            u64::from(self.active_area),
            self.epoch,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b[CRC_AT].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` when the slot holds no superblock at all (no magic).
    pub fn decode(b: &[u8]) -> Result<Option<Superblock>> {
        if b[0..8] != SB_MAGIC {
            return Ok(None);
        }
        let mut copy = b[..BLOCK].to_vec();
        copy[CRC_AT].fill(0);
        let crc = u32::from_le_bytes(b[CRC_AT].try_into().expect("4"));
        if crc32c::crc32c(&copy) != crc {
            return Err(corrupt("a COW superblock slot fails its checksum"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the COW store has version {version}; this build reads version {VERSION}"),
            ));
        }
        let f = |i: usize| u64::from_le_bytes(b[32 + 8 * i..40 + 8 * i].try_into().expect("8"));
        let layout = Layout {
            uuid: Uuid::from_slice(&b[16..32]).expect("16 bytes"),
            chunk: SectorCount(f(1)),
            origin_size: SectorCount(f(2)),
            cow_size: SectorCount(f(3)),
            area_blocks: f(4),
            data_start: Sector(f(5)),
            data_chunks: f(6),
        };
        let sane = layout.chunk.0.is_power_of_two()
            && layout.area_blocks > 0
            && layout.data_start.0 >= META_START.0 + 2 * layout.area_blocks * BLOCK_SECTORS.0
            && layout.data_start.0 + layout.data_chunks * layout.chunk.0 <= layout.cow_size.0
            && f(7) < 2;
        if !sane {
            return Err(corrupt("the COW superblock describes an impossible layout"));
        }
        Ok(Some(Superblock {
            layout,
            sequence: f(0),
            active_area: f(7) as u8,
            epoch: f(8),
        }))
    }
}

/// Packs `records` into log blocks of `epoch` numbered from `first`.
pub fn encode_blocks(uuid: Uuid, epoch: u64, first: u64, records: &[Record]) -> Vec<u8> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut payload = Vec::new();
    let mut one = Vec::new();
    for record in records {
        one.clear();
        record.encode(&mut one);
        if LOG_HEADER + payload.len() + one.len() > BLOCK {
            blocks.push(std::mem::take(&mut payload));
        }
        payload.extend_from_slice(&one);
    }
    if !payload.is_empty() || blocks.is_empty() {
        blocks.push(payload);
    }
    let mut out = Vec::with_capacity(blocks.len() * BLOCK);
    for (i, payload) in blocks.iter().enumerate() {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(&LOG_MAGIC);
        b[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b[16..32].copy_from_slice(uuid.as_bytes());
        b[32..40].copy_from_slice(&epoch.to_le_bytes());
        b[40..48].copy_from_slice(&(first + i as u64).to_le_bytes());
        b[LOG_HEADER..LOG_HEADER + payload.len()].copy_from_slice(payload);
        let crc = crc32c::crc32c(&b);
        b[LOG_CRC_AT].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// The records of a log block if it is a whole block of this log, epoch and index; `None`
/// for anything else (the end of the log: stale, torn, or never written).
pub fn decode_block(b: &[u8], uuid: Uuid, epoch: u64, index: u64) -> Option<Vec<Record>> {
    if b[0..8] != LOG_MAGIC {
        return None;
    }
    let mut copy = b[..BLOCK].to_vec();
    copy[LOG_CRC_AT].fill(0);
    let crc = u32::from_le_bytes(b[LOG_CRC_AT].try_into().expect("4"));
    let field = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8"));
    let used = u32::from_le_bytes(b[12..16].try_into().expect("4")) as usize;
    let ok = crc32c::crc32c(&copy) == crc
        && b[16..32] == *uuid.as_bytes()
        && field(32..40) == epoch
        && field(40..48) == index
        && LOG_HEADER + used <= BLOCK;
    if !ok {
        return None;
    }
    // A block whose checksum holds but whose records do not parse was written by a buggy
    // build; ending the log there is the safe reading.
    Record::decode_all(&b[LOG_HEADER..LOG_HEADER + used]).ok()
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

    /// A superblock with fixed fields, byte for byte, as the format was first written: any
    /// change to the on-disk format fails here.
    #[test]
    fn superblock_encoding_is_unchanged() {
        let sb = Superblock {
            layout: fixed_layout(),
            sequence: 0x0102_0304_0506,
            active_area: 1,
            epoch: 77,
        };
        const GOLDEN: &[(usize, &str)] = &[
            (
                0,
                "5542444d534e415001000000a87d98a55eed0000000000000000000000000001",
            ),
            (32, "06050403020100002000000000000000e8030000000000000020"),
            (64, "0e000000000000000001000000000000f80000000000000001"),
            (96, "4d"),
        ];
        crate::format::golden::assert_image(&sb.encode(), BLOCK, GOLDEN);
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        assert_eq!(Superblock::decode(&image).expect("golden"), Some(sb));
    }

    /// A log block holding one record of every type, byte for byte, as the format was first
    /// written.
    #[test]
    fn log_block_encoding_is_unchanged() {
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
        let bytes = encode_blocks(fixed_layout().uuid, 0x00ee_0001, 42, &records);
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
        crate::format::golden::assert_image(&bytes, BLOCK, GOLDEN);
        let image = crate::format::golden::image(BLOCK, GOLDEN);
        let back = decode_block(&image, fixed_layout().uuid, 0x00ee_0001, 42);
        assert_eq!(back.as_deref(), Some(&records[..]));
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
            back.extend(decode_block(b, uuid, 5, 10 + i as u64).expect("valid block"));
        }
        assert_eq!(back, records);
        // Another epoch, index or store, or a torn block, ends the log.
        let first = &bytes[..BLOCK];
        assert!(decode_block(first, uuid, 4, 10).is_none());
        assert!(decode_block(first, uuid, 5, 11).is_none());
        assert!(decode_block(first, Uuid::new_v4(), 5, 10).is_none());
        let mut torn = first.to_vec();
        torn[2048..].fill(0);
        assert!(decode_block(&torn, uuid, 5, 10).is_none());
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
}
