//! The mirror's in-memory state under one mutex: the region map, the slot table (which leg
//! is where and in what state), the event counters, and the bookkeeping of resync, repair and
//! scrub.
//!
//! Keeping the legs and the map under the same lock is what makes leg changes safe: a write
//! picks its legs in the same critical section as its `begin_write`, so a leg that joins
//! either is among the write's targets or finds the write pending (and so resyncs its
//! region). The lock is a `std::sync::Mutex`, never held across an await.
//!
//! Invariants:
//! - `state_gen > persisted_gen` exactly when the slot table changed since the last
//!   superblock update that reached every live leg; writes are acknowledged only once it
//!   has (a leg failure must be durable before any write that skipped the leg is acked).
//! - the map is degraded exactly when some slot holds a stale or failed leg (a leg is
//!   missing); no dirty bit is cleared then.
//! - a leg's `generation` is unique over the mirror's life: errors from an I/O issued to an
//!   earlier incarnation of a slot never fail the current one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use super::behind::LegOptions;
use super::superblock::{Layout, LegState, SlotEntry, Superblock, MAX_LEGS};
use crate::device::DeviceRef;
use crate::region::{RegionIndex, RegionMap};
use crate::units::SectorCount;

/// Slots of the per-region write counters that scrub uses to detect racing writes.
pub const WRITE_EPOCHS: usize = 1024;

/// Counters of one leg, updated without the state lock.
#[derive(Debug, Default)]
pub struct LegStats {
    pub in_flight: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub reads: AtomicU64,
}

impl LegStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One slot of the table.
#[derive(Clone)]
pub struct Leg {
    pub state: LegState,
    /// `None` when the leg is not present (stale after an assembly without it, failed, or
    /// empty).
    pub dev: Option<DeviceRef>,
    pub uuid: Uuid,
    pub generation: u64,
    pub size: SectorCount,
    pub name: String,
    pub stats: Arc<LegStats>,
    /// The link epoch of a remote leg when it joined (0 for a local one): a later epoch
    /// is a reconnect (see `remote.rs`).
    pub link_epoch: u64,
}

impl Leg {
    pub fn empty() -> Leg {
        Leg {
            state: LegState::Empty,
            dev: None,
            uuid: Uuid::nil(),
            generation: 0,
            size: SectorCount(0),
            name: String::new(),
            stats: Arc::new(LegStats::default()),
            link_epoch: 0,
        }
    }

    pub fn is_active(&self) -> bool {
        self.state.is_active() && self.dev.is_some()
    }
}

/// A leg picked for one I/O: enough to issue it and to blame the right incarnation.
#[derive(Clone)]
pub struct LegRef {
    pub slot: usize,
    pub generation: u64,
    pub state: LegState,
    pub dev: DeviceRef,
    pub stats: Arc<LegStats>,
    pub options: LegOptions,
}

/// Resync progress of the current pass (a pass ends when every region is in sync).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub active: bool,
    pub started: Option<Instant>,
    pub bytes_at_start: u64,
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// Takes in the current number of out-of-sync regions.
    pub fn observe(&mut self, out_of_sync: u64, bytes_done: u64) {
        if out_of_sync == 0 {
            self.active = false;
            return;
        }
        if !self.active {
            *self = Progress {
                active: true,
                started: Some(Instant::now()),
                bytes_at_start: bytes_done,
                done: 0,
                total: 0,
            };
        }
        self.total = self.total.max(self.done + out_of_sync);
    }
}

/// A scrub pass in progress.
#[derive(Clone, Debug)]
pub struct Scrub {
    pub repair: bool,
    pub next: RegionIndex,
    pub checked: u64,
    pub skipped: u64,
    pub mismatches: u64,
    pub retries: u32,
}

/// The outcome of the last finished scrub pass.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScrubReport {
    pub repair: bool,
    pub checked: u64,
    pub skipped: u64,
    pub mismatches: u64,
}

/// Everything behind the mirror's state lock (see the module doc).
pub struct State {
    pub map: RegionMap,
    pub legs: Vec<Leg>,
    pub events: u64,
    pub events_cleared: u64,
    pub state_gen: u64,
    pub persisted_gen: u64,
    pub next_generation: u64,
    /// Regions to copy from a given leg rather than the primary (read-error repair).
    pub repair_source: HashMap<RegionIndex, usize>,
    /// Failed resync reads per region since the last tick.
    pub read_attempts: HashMap<RegionIndex, u32>,
    /// Regions no source could be read for; skipped until the next tick.
    pub stuck: HashSet<RegionIndex>,
    pub write_epochs: Vec<u64>,
    pub writes_started: u64,
    pub progress: Progress,
    pub scrub: Option<Scrub>,
    pub last_scrub: Option<ScrubReport>,
    /// Mismatches found by the last scrub pass (md's `mismatch_cnt`).
    pub mismatch_count: u64,
    /// Read balancing tie-breaker.
    pub rotor: usize,
    /// Each slot's write-mostly and write-behind options (kept while the slot is empty or
    /// its leg away, so a returning leg gets them back).
    pub options: [LegOptions; MAX_LEGS],
}

impl State {
    pub fn new(map: RegionMap, legs: Vec<Leg>, events: u64, events_cleared: u64) -> State {
        assert_eq!(legs.len(), MAX_LEGS);
        let next_generation = legs.iter().map(|l| l.generation).max().unwrap_or(0) + 1;
        let mut state = State {
            map,
            legs,
            events,
            events_cleared,
            state_gen: 1,
            persisted_gen: 0,
            next_generation,
            repair_source: HashMap::new(),
            read_attempts: HashMap::new(),
            stuck: HashSet::new(),
            write_epochs: vec![0; WRITE_EPOCHS],
            writes_started: 0,
            progress: Progress::default(),
            scrub: None,
            last_scrub: None,
            mismatch_count: 0,
            rotor: 0,
            options: [LegOptions::default(); MAX_LEGS],
        };
        state.update_degraded();
        state
    }

    pub fn new_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// Whether some slot holds a missing (stale or failed) leg.
    pub fn missing_legs(&self) -> bool {
        self.legs.iter().any(|l| l.state.is_missing())
    }

    pub fn update_degraded(&mut self) {
        let degraded = self.missing_legs();
        self.map.set_degraded(degraded);
    }

    pub fn leg_ref(&self, slot: usize) -> Option<LegRef> {
        let leg = &self.legs[slot];
        Some(LegRef {
            slot,
            generation: leg.generation,
            state: leg.state,
            dev: leg.dev.clone()?,
            stats: Arc::clone(&leg.stats),
            options: self.options[slot],
        })
    }

    /// The legs that receive writes.
    pub fn active(&self) -> Vec<LegRef> {
        (0..MAX_LEGS)
            .filter(|&s| self.legs[s].is_active())
            .filter_map(|s| self.leg_ref(s))
            .collect()
    }

    pub fn in_sync_slots(&self) -> Vec<usize> {
        (0..MAX_LEGS)
            .filter(|&s| self.legs[s].state == LegState::InSync && self.legs[s].dev.is_some())
            .collect()
    }

    /// The default source: the first in-sync leg that is not write-mostly, else the first
    /// in-sync leg (a write-behind leg may lag: it is the source only when no other is).
    pub fn primary(&self) -> Option<usize> {
        let in_sync = self.in_sync_slots();
        in_sync
            .iter()
            .copied()
            .find(|&s| !self.options[s].write_mostly)
            .or_else(|| in_sync.first().copied())
    }

    /// The leg to read an out-of-sync region from, and to copy it from.
    pub fn source_for(&self, region: RegionIndex) -> Option<usize> {
        let hinted = self
            .repair_source
            .get(&region)
            .copied()
            .filter(|&s| self.legs[s].state == LegState::InSync && self.legs[s].dev.is_some());
        hinted.or_else(|| self.primary())
    }

    /// Whether `(slot, generation)` names the current, active incarnation of a leg.
    pub fn is_current(&self, slot: usize, generation: u64) -> bool {
        self.legs[slot].generation == generation && self.legs[slot].is_active()
    }

    /// Marks a leg failed; false if it already was, or `generation` is an older incarnation.
    pub fn fail(&mut self, slot: usize, generation: u64) -> bool {
        if !self.is_current(slot, generation) {
            return false;
        }
        self.legs[slot].state = LegState::Failed;
        // Close it (once I/O in flight lets go), so the same device can be opened again to
        // add it back (block devices are opened exclusively).
        self.legs[slot].dev = None;
        self.update_degraded();
        self.state_gen += 1;
        true
    }

    /// The superblock this state gives the leg in `slot`.
    pub fn superblock(&self, uuid: Uuid, layout: Layout, slot: usize) -> Superblock {
        let mut table = [SlotEntry::EMPTY; MAX_LEGS];
        for (entry, leg) in table.iter_mut().zip(&self.legs) {
            if leg.state != LegState::Empty {
                *entry = SlotEntry {
                    state: leg.state,
                    leg_uuid: leg.uuid,
                    leg_size: leg.size,
                };
            }
        }
        Superblock {
            uuid,
            slot,
            events: self.events,
            events_cleared: self.events_cleared,
            layout,
            table,
        }
    }

    /// Bumps the write counter of `region`'s epoch slot (scrub's race detector).
    pub fn note_write(&mut self, region: RegionIndex) {
        let slot = (region.0 % WRITE_EPOCHS as u64) as usize;
        self.write_epochs[slot] = self.write_epochs[slot].wrapping_add(1);
    }

    pub fn write_epoch(&self, region: RegionIndex) -> u64 {
        self.write_epochs[(region.0 % WRITE_EPOCHS as u64) as usize]
    }
}
