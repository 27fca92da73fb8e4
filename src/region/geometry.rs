//! Region arithmetic: how a device is cut into fixed-size regions.
//!
//! A region is the unit of mirror bookkeeping: one dirty-log bit, one resync copy. Regions are
//! `region_size` sectors long (a power of two, at least 4 KiB, at most the device), numbered
//! from 0 at sector 0; the last region is short when the device size is not a multiple of the
//! region size. The number of regions is bounded by [`MAX_REGION_COUNT`] so that every bitmap
//! (in memory and in the dirty log) stays small.
//!
//! Invariants: `count = ceil(device_size / region_size)`, every sector of the device belongs
//! to exactly one region, and every region's extent lies inside the device and is non-empty.
//! Asking about a sector or region outside the device is a bug (an assert): requests are
//! checked against the device size before they get here.

use std::fmt;

use crate::error::{Error, Result};
use crate::units::{Extent, Sector, SectorCount};

/// The smallest region: 4 KiB, so that a region never splits a logical block of any device we
/// serve.
pub const MIN_REGION_SECTORS: SectorCount = SectorCount(8);

/// The most regions a device may have. It bounds every per-region bitmap to 512 KiB, and so
/// the dirty log's image, which is rewritten whole on each commit.
pub const MAX_REGION_COUNT: RegionCount = RegionCount(1 << 22);

/// The number of a region, from 0 at the start of the device.
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
pub struct RegionIndex(pub u64);

/// A number of regions.
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
pub struct RegionCount(pub u64);

impl RegionIndex {
    /// The index as a `usize`, for indexing bitmaps (which are bounded far below `usize`).
    pub fn to_usize(self) -> usize {
        usize::try_from(self.0).expect("region index fits in usize")
    }

    /// The region after this one.
    pub fn next(self) -> RegionIndex {
        RegionIndex(self.0.checked_add(1).expect("region index overflow"))
    }
}

impl RegionCount {
    pub const ZERO: RegionCount = RegionCount(0);

    /// The count as a `usize`, for sizing bitmaps.
    pub fn to_usize(self) -> usize {
        usize::try_from(self.0).expect("region count fits in usize")
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whether `region` is one of the first `self` regions.
    pub fn contains(self, region: RegionIndex) -> bool {
        region.0 < self.0
    }
}

impl fmt::Display for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

impl fmt::Display for RegionCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} regions", self.0)
    }
}

/// A half-open run of regions `[start, end)`; iterating it yields each region in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionRange {
    pub start: RegionIndex,
    pub end: RegionIndex,
}

impl RegionRange {
    pub fn new(start: RegionIndex, end: RegionIndex) -> RegionRange {
        assert!(
            start <= end,
            "region range {}..{} is reversed",
            start.0,
            end.0
        );
        RegionRange { start, end }
    }

    /// The single region `region`.
    pub fn one(region: RegionIndex) -> RegionRange {
        RegionRange::new(region, region.next())
    }

    pub fn len(&self) -> RegionCount {
        RegionCount(self.end.0 - self.start.0)
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn contains(&self, region: RegionIndex) -> bool {
        self.start <= region && region < self.end
    }
}

impl Iterator for RegionRange {
    type Item = RegionIndex;

    fn next(&mut self) -> Option<RegionIndex> {
        if self.start < self.end {
            let region = self.start;
            self.start = region.next();
            Some(region)
        } else {
            None
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = self.len().to_usize();
        (len, Some(len))
    }
}

impl ExactSizeIterator for RegionRange {}

/// How a device of a given size is cut into regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionGeometry {
    device_size: SectorCount,
    region_size: SectorCount,
    /// log2 of `region_size`: region arithmetic is shifts and masks.
    shift: u32,
    count: RegionCount,
}

impl RegionGeometry {
    /// The geometry of `device_size` sectors cut into regions of `region_size` sectors.
    pub fn new(device_size: SectorCount, region_size: SectorCount) -> Result<RegionGeometry> {
        check_region_size(device_size, region_size)?;
        let count = RegionCount(device_size.0.div_ceil(region_size.0));
        if count > MAX_REGION_COUNT {
            let smallest = smallest_region_size(device_size);
            return Err(Error::invalid(format!(
                "a region size of {} sectors cuts {} into {}, more than the limit of {}; \
                 use a region size of at least {} sectors",
                region_size.0, device_size, count, MAX_REGION_COUNT.0, smallest.0
            )));
        }
        let shift = region_size.0.trailing_zeros();
        Ok(RegionGeometry {
            device_size,
            region_size,
            shift,
            count,
        })
    }

    pub fn device_size(&self) -> SectorCount {
        self.device_size
    }

    pub fn region_size(&self) -> SectorCount {
        self.region_size
    }

    /// The number of regions, counting a short last one.
    pub fn count(&self) -> RegionCount {
        self.count
    }

    /// Every region of the device.
    pub fn all(&self) -> RegionRange {
        RegionRange::new(RegionIndex(0), RegionIndex(self.count.0))
    }

    /// The region holding `sector`.
    pub fn region_of(&self, sector: Sector) -> RegionIndex {
        assert!(
            sector.0 < self.device_size.0,
            "{sector} is past the end of the device"
        );
        RegionIndex(sector.0 >> self.shift)
    }

    /// The sectors of `region`; the last region may be shorter than the region size.
    pub fn extent_of(&self, region: RegionIndex) -> Extent {
        assert!(
            self.count.contains(region),
            "{region} is past the last region"
        );
        let start = Sector(region.0 << self.shift);
        let len = self.region_size.0.min(self.device_size.0 - start.0);
        Extent::new(start, SectorCount(len))
    }

    /// The regions that `extent` touches, in order; empty for an empty extent.
    pub fn regions_touching(&self, extent: Extent) -> RegionRange {
        assert!(
            extent.fits_in(self.device_size),
            "{extent} is past the end of the device"
        );
        let first = RegionIndex(extent.start.0 >> self.shift);
        if extent.is_empty() {
            return RegionRange::new(first, first);
        }
        let last = RegionIndex((extent.end().0 - 1) >> self.shift);
        RegionRange::new(first, last.next())
    }

    /// Cuts `extent` at region boundaries: the pieces cover it exactly once, in order, and
    /// each lies within one region.
    pub fn split_at_regions(&self, extent: Extent) -> SplitAtRegions {
        assert!(
            extent.fits_in(self.device_size),
            "{extent} is past the end of the device"
        );
        SplitAtRegions {
            geometry: *self,
            rest: extent,
        }
    }
}

/// The iterator of [`RegionGeometry::split_at_regions`].
#[derive(Clone, Debug)]
pub struct SplitAtRegions {
    geometry: RegionGeometry,
    rest: Extent,
}

impl Iterator for SplitAtRegions {
    type Item = (RegionIndex, Extent);

    fn next(&mut self) -> Option<(RegionIndex, Extent)> {
        if self.rest.is_empty() {
            return None;
        }
        let region = self.geometry.region_of(self.rest.start);
        let region_end = self.geometry.extent_of(region).end();
        let piece = self
            .rest
            .sub_extent(SectorCount::ZERO, region_end - self.rest.start);
        self.rest = self.rest.sub_extent(piece.len, self.rest.len);
        Some((region, piece))
    }
}

/// Checks the region size rules, with a message that says which one failed.
fn check_region_size(device_size: SectorCount, region_size: SectorCount) -> Result<()> {
    if !region_size.0.is_power_of_two() {
        return Err(Error::invalid(format!(
            "region size {} sectors is not a power of two",
            region_size.0
        )));
    }
    if region_size < MIN_REGION_SECTORS {
        return Err(Error::invalid(format!(
            "region size {} sectors is below the minimum of {} sectors (4 KiB)",
            region_size.0, MIN_REGION_SECTORS.0
        )));
    }
    if region_size > device_size {
        return Err(Error::invalid(format!(
            "region size {} sectors is larger than the device ({})",
            region_size.0, device_size
        )));
    }
    Ok(())
}

/// The smallest allowed region size that keeps `device_size` within [`MAX_REGION_COUNT`].
fn smallest_region_size(device_size: SectorCount) -> SectorCount {
    let needed = device_size
        .0
        .div_ceil(MAX_REGION_COUNT.0)
        .max(MIN_REGION_SECTORS.0);
    SectorCount(needed.next_power_of_two())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    fn geometry(device: u64, region: u64) -> RegionGeometry {
        RegionGeometry::new(SectorCount(device), SectorCount(region)).expect("geometry")
    }

    #[test]
    fn bad_region_sizes_are_invalid_arguments() {
        for (device, region) in [(1024, 24), (1024, 4), (1024, 0), (64, 128)] {
            let err = RegionGeometry::new(SectorCount(device), SectorCount(region))
                .expect_err("bad region size");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        }
    }

    #[test]
    fn too_many_regions_suggest_a_size() {
        let device = SectorCount(MAX_REGION_COUNT.0 * 8 + 1);
        let err = RegionGeometry::new(device, SectorCount(8)).expect_err("too many regions");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("at least 16 sectors"), "{err}");
        assert!(RegionGeometry::new(device, SectorCount(16)).is_ok());
    }

    #[test]
    fn last_region_is_short() {
        let g = geometry(100, 32);
        assert_eq!(g.count(), RegionCount(4));
        assert_eq!(
            g.extent_of(RegionIndex(3)),
            Extent::new(Sector(96), SectorCount(4))
        );
        assert_eq!(g.region_of(Sector(99)), RegionIndex(3));
        assert_eq!(g.region_of(Sector(31)), RegionIndex(0));
        assert_eq!(g.region_of(Sector(32)), RegionIndex(1));
    }

    #[test]
    fn touching_and_splitting() {
        let g = geometry(100, 32);
        let e = Extent::new(Sector(30), SectorCount(40));
        assert_eq!(
            g.regions_touching(e),
            RegionRange::new(RegionIndex(0), RegionIndex(3))
        );
        let pieces: Vec<_> = g.split_at_regions(e).collect();
        assert_eq!(
            pieces,
            vec![
                (RegionIndex(0), Extent::new(Sector(30), SectorCount(2))),
                (RegionIndex(1), Extent::new(Sector(32), SectorCount(32))),
                (RegionIndex(2), Extent::new(Sector(64), SectorCount(6))),
            ]
        );
        let empty = Extent::new(Sector(100), SectorCount(0));
        assert!(g.regions_touching(empty).is_empty());
        assert_eq!(g.split_at_regions(empty).count(), 0);
    }

    #[test]
    #[should_panic]
    fn sector_past_the_end_is_a_bug() {
        geometry(100, 32).region_of(Sector(100));
    }

    fn geometry_and_extent() -> impl Strategy<Value = (RegionGeometry, Extent)> {
        (3u32..12, 1u64..5000).prop_flat_map(|(shift, device)| {
            let region = 1u64 << shift;
            let device = device.max(region);
            (0..device).prop_flat_map(move |start| {
                (0..=device - start).prop_map(move |len| {
                    let g = geometry(device, region);
                    (g, Extent::new(Sector(start), SectorCount(len)))
                })
            })
        })
    }

    proptest! {
        #[test]
        fn regions_tile_the_device(shift in 3u32..12, device in 1u64..100_000) {
            let region = 1u64 << shift;
            prop_assume!(device >= region);
            let g = geometry(device, region);
            let mut next = Sector(0);
            for r in g.all() {
                let e = g.extent_of(r);
                prop_assert_eq!(e.start, next);
                prop_assert!(!e.is_empty() && e.len.0 <= region);
                prop_assert_eq!(g.region_of(e.start), r);
                prop_assert_eq!(g.region_of(Sector(e.end().0 - 1)), r);
                next = e.end();
            }
            prop_assert_eq!(next.0, device);
        }

        #[test]
        fn split_covers_the_extent_once_in_order((g, extent) in geometry_and_extent()) {
            let mut next = extent.start;
            let mut regions = Vec::new();
            for (region, piece) in g.split_at_regions(extent) {
                prop_assert_eq!(piece.start, next);
                prop_assert!(!piece.is_empty());
                let home = g.extent_of(region);
                prop_assert!(home.start <= piece.start && piece.end() <= home.end());
                regions.push(region);
                next = piece.end();
            }
            prop_assert_eq!(next, extent.end());
            let touching: Vec<_> = g.regions_touching(extent).collect();
            prop_assert_eq!(regions, touching);
        }
    }
}
