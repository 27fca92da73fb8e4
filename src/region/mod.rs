//! Region bookkeeping for mirrors: how a device is cut into regions ([`RegionGeometry`]), the
//! in-memory state of each region ([`RegionMap`]), and the persistent write-intent bitmap
//! that survives crashes ([`DirtyLog`]).
//!
//! The pieces are independent and the mirror composes them; the rules that tie them:
//! - a region's dirty-log bit is durable before any leg write to it is issued
//!   ([`WriteAdmission::Proceed`] says when a mark is needed);
//! - a bit is cleared only after every leg's data is durable, lazily, and never while the set
//!   is degraded (see the clearing protocol in `map.rs`);
//! - after a crash, every region whose bit is set is out of sync and is resynced
//!   ([`RegionMap::load_dirty_log`]).
//!
//! Sizes are bounded: at most [`MAX_REGION_COUNT`] regions, so every bitmap is at most 512 KiB.

mod bitmap;
mod geometry;
mod log;
mod map;

pub use bitmap::RegionBitmap;
pub use geometry::{
    RegionCount, RegionGeometry, RegionIndex, RegionRange, SplitAtRegions, MAX_REGION_COUNT,
    MIN_REGION_SECTORS,
};
pub use log::{image_sectors, DirtyLog};
pub use map::{RegionMap, RegionState, StateCounts, WriteAdmission};

use crate::copy::CopyDone;

/// Records the completion of a resync copy of `region` in `map`: the region is in sync only
/// if the copy read its source and wrote every destination. Returns whether it is now.
/// Resync submits one job per region with the region's index as its token, so the caller
/// drains completions and calls this with `RegionIndex(done.token)`.
pub fn record_recovery(map: &mut RegionMap, region: RegionIndex, done: &CopyDone) -> bool {
    assert_eq!(
        done.token, region.0,
        "completion token names another region"
    );
    map.recovery_done(region, done.is_ok());
    done.is_ok()
}
