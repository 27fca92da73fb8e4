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
