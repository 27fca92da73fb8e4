//! Units of storage, as types.
//!
//! Everything that addresses a device speaks in 512-byte sectors (`Sector` for a position,
//! `SectorCount` for a length), whatever the device's logical block size. Bytes appear only at
//! the edges (buffers, syscalls), and every conversion is an explicit, checked call.

use std::fmt;
use std::ops::{Add, Sub};

/// Bytes in one sector: the unit of every offset and length in the core.
pub const SECTOR_BYTES: u64 = 512;
/// log2 of [`SECTOR_BYTES`].
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes in one metadata block: every on-disk structure (superblock slot, log image, log
/// block) is a whole number of these, so its I/O is aligned for any logical block size served.
pub const BLOCK_BYTES: u64 = 4096;
/// [`BLOCK_BYTES`] in sectors.
pub const BLOCK_SECTORS: SectorCount = SectorCount(BLOCK_BYTES / SECTOR_BYTES);

/// A position on a device, in 512-byte sectors from its start.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Sector(pub u64);

/// A length, in 512-byte sectors.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct SectorCount(pub u64);

impl Sector {
    /// The byte offset of this sector.
    pub fn to_bytes(self) -> u64 {
        self.0
            .checked_shl(SECTOR_SHIFT)
            .filter(|b| b >> SECTOR_SHIFT == self.0)
            .expect("sector overflows bytes")
    }

    /// The sector at `bytes`, or `None` when `bytes` is not sector aligned.
    pub fn from_bytes_exact(bytes: u64) -> Option<Sector> {
        (bytes % SECTOR_BYTES == 0).then_some(Sector(bytes >> SECTOR_SHIFT))
    }
}

impl SectorCount {
    pub const ZERO: SectorCount = SectorCount(0);

    /// The length in bytes.
    pub fn to_bytes(self) -> u64 {
        Sector(self.0).to_bytes()
    }

    /// The length of `bytes`, or `None` when `bytes` is not a whole number of sectors.
    pub fn from_bytes_exact(bytes: u64) -> Option<SectorCount> {
        Sector::from_bytes_exact(bytes).map(|s| SectorCount(s.0))
    }

    /// The whole sectors in `bytes`, rounding down (a device's usable length).
    pub fn from_bytes_floor(bytes: u64) -> SectorCount {
        SectorCount(bytes >> SECTOR_SHIFT)
    }

    /// The length in bytes as a `usize`, for buffers. Panics if it does not fit: buffers are
    /// bounded far below that by construction.
    pub fn to_usize_bytes(self) -> usize {
        usize::try_from(self.to_bytes()).expect("length fits in memory")
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl Add<SectorCount> for Sector {
    type Output = Sector;
    fn add(self, rhs: SectorCount) -> Sector {
        Sector(self.0.checked_add(rhs.0).expect("sector overflow"))
    }
}

impl Sub<Sector> for Sector {
    type Output = SectorCount;
    fn sub(self, rhs: Sector) -> SectorCount {
        SectorCount(self.0.checked_sub(rhs.0).expect("sector underflow"))
    }
}

impl Add for SectorCount {
    type Output = SectorCount;
    fn add(self, rhs: SectorCount) -> SectorCount {
        SectorCount(self.0.checked_add(rhs.0).expect("sector count overflow"))
    }
}

impl Sub for SectorCount {
    type Output = SectorCount;
    fn sub(self, rhs: SectorCount) -> SectorCount {
        SectorCount(self.0.checked_sub(rhs.0).expect("sector count underflow"))
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sector {}", self.0)
    }
}

impl fmt::Display for SectorCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sectors", self.0)
    }
}

/// A contiguous range of sectors on one device: `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub start: Sector,
    pub len: SectorCount,
}

impl Extent {
    pub fn new(start: Sector, len: SectorCount) -> Extent {
        let extent = Extent { start, len };
        // Computing the end asserts that it does not overflow.
        let _ = extent.end();
        extent
    }

    /// The first sector after the extent.
    pub fn end(&self) -> Sector {
        self.start + self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len.is_zero()
    }

    /// Whether the extent lies wholly inside a device of `size` sectors.
    pub fn fits_in(&self, size: SectorCount) -> bool {
        self.end().0 <= size.0
    }

    /// The part of this extent that starts `skip` sectors in and is at most `len` long.
    pub fn sub_extent(&self, skip: SectorCount, len: SectorCount) -> Extent {
        assert!(skip.0 <= self.len.0, "sub-extent starts past the end");
        let len = SectorCount(len.0.min(self.len.0 - skip.0));
        Extent::new(self.start + skip, len)
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sectors {}..{}", self.start.0, self.end().0)
    }
}

/// Parses a size such as `512`, `16K`, `512KiB`, `4M`, `1G` into bytes.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{text}' has an unknown unit (use K, M, G or T)")),
    };
    value
        .checked_shl(shift)
        .filter(|v| v >> shift == value)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size_bytes("512"), Ok(512));
        assert_eq!(parse_size_bytes("16K"), Ok(16 << 10));
        assert_eq!(parse_size_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size_bytes("1G"), Ok(1 << 30));
        assert!(parse_size_bytes("1Q").is_err());
        assert!(parse_size_bytes("K").is_err());
    }

    #[test]
    fn sector_byte_conversions_are_exact() {
        assert_eq!(Sector::from_bytes_exact(1024), Some(Sector(2)));
        assert_eq!(Sector::from_bytes_exact(1000), None);
        assert_eq!(SectorCount(8).to_bytes(), 4096);
        assert_eq!(SectorCount::from_bytes_floor(1000), SectorCount(1));
    }

    #[test]
    fn sub_extent_clips_at_the_end() {
        let e = Extent::new(Sector(10), SectorCount(100));
        assert_eq!(
            e.sub_extent(SectorCount(90), SectorCount(64)),
            Extent::new(Sector(100), SectorCount(10))
        );
    }
}
