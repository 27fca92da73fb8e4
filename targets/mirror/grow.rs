//! Growing a running mirror onto bigger legs (`ublkdm mirror grow`, and `ublkdm resize` of a
//! mirror): as `mdadm --grow --size=max`, the data size becomes all that the smallest leg
//! holds after the data offset; the log area and the data offset stay (they are fixed on
//! every leg), the region size doubles only when the bitmap of the new count would not fit
//! the log area ([`Layout::grown`]), and the new area is resynced (as md does without
//! `--assume-clean`): its regions start dirty and out of sync, so reads of them go to the
//! resync source until the resync driver has copied them.
//!
//! # The swap on a live device
//! The geometry-dependent part of the mirror (`Shape`: layout, regions, dirty log) is read by
//! every request and by the resync driver. Each request holds the grow gate (an async
//! `RwLock`) shared for its whole life, and the driver holds it while it works or has copies
//! in flight; a grow raises `growing` (the driver then starts no copy and lets the gate go
//! once its copies ended), then takes the gate exclusively: requests in flight end first and
//! new ones wait. Nothing else is paused, and a request pays one uncontended read lock.
//!
//! # Order on disk, and why a power cut is safe at any point
//! 1. The dirty log of the grown layout (every region dirty before, or merged from a dirty
//!    one, and the whole new area) is written into the log slot that does *not* hold the
//!    newest image of the running log ([`crate::region::DirtyLog::regrow`]), on every live
//!    leg; the old image stays intact in the other slot.
//! 2. The superblocks of every live leg get the grown layout (FUA, their own A/B slots).
//! 3. The in-memory swap (the region map rebuilt from the grown bits; the slot table kept,
//!    with the legs' new sizes). Done under the gate before step 2 is written, which nothing
//!    can observe: no request or copy runs, and the superblocks are written before the gate
//!    is let go.
//! 4. The daemon tells the kernel the new size (`sync_size`, after every command).
//!
//! Assembly opens the log image of the geometry its freshest superblock gives
//! (`DirtyLog::open_for`): a cut before or during step 2 that left every superblock old finds
//! the old layout and the old image (its first commit then overwrites the grown one); a cut
//! after any superblock reached the new layout finds the new layout and the grown image,
//! which every live leg received in step 1. Members whose superblock missed the grow's update
//! (one event behind, the old layout of which the new is a growth) are accepted. Either way
//! no write is lost: none ran during the grow, and every dirty region stays dirty.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::state::State;
use super::superblock::{Layout, LegState};
use super::{Inner, Shape, MAX_LEGS};
use crate::error::{Error, ErrorKind, Result};
use crate::region::{RegionBitmap, RegionMap};
use crate::units::SectorCount;

/// Lowers `growing` when the grow ends, however it ends, and wakes the resync driver.
struct Growing<'a>(&'a Inner);

impl Drop for Growing<'_> {
    fn drop(&mut self) {
        self.0.growing.store(false, Ordering::Release);
        self.0.kick();
    }
}

/// The gate held exclusively, with `growing` raised until it is let go: no request and no
/// resync copy runs meanwhile.
pub(crate) struct Exclusive<'a> {
    _gate: smol::lock::RwLockWriteGuard<'a, ()>,
    _growing: Growing<'a>,
}

impl Inner {
    /// Waits for every request and resync copy to end and holds new ones back (as a grow
    /// does); busy while a grow or another such change runs.
    pub(crate) async fn exclusive(&self) -> Result<Exclusive<'_>> {
        if self.growing.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::Busy,
                "a grow or a split-brain resolution is already running",
            ));
        }
        let growing = Growing(self);
        self.kick();
        let gate = self.gate.write().await;
        self.behind.settled().await;
        Ok(Exclusive {
            _gate: gate,
            _growing: growing,
        })
    }

    /// Grows the mirror onto its legs' present sizes (see the module doc). `expect`: the
    /// data size the caller asks for, refused unless it is what the legs allow. Returns the
    /// reply: the old and new sizes and the regions to resync.
    pub(crate) async fn grow(&self, expect: Option<SectorCount>) -> Result<Value> {
        self.check_growable(&self.lock())?;
        if self.growing.swap(true, Ordering::AcqRel) {
            return Err(Error::new(ErrorKind::Busy, "a grow is already running"));
        }
        let _growing = Growing(self);
        self.kick();
        let _exclusive = self.gate.write().await;
        // Writes behind outlive their requests: their regions must end in this map.
        self.behind.settled().await;
        // The legs may have changed while the gate drained.
        self.check_growable(&self.lock())?;
        let old = self.layout();
        let (grown, sizes) = self.grown_layout(old)?;
        if expect.is_some_and(|size| size != grown.data_size) {
            return Err(Error::invalid(format!(
                "the legs allow a size of {} sectors, not {}: give no size to grow to it",
                grown.data_size.0,
                expect.map_or(0, |s| s.0)
            )));
        }
        let bits = old.grown_bits(&self.dirty_bits(&self.lock()), &grown);
        let resync = bits.count_ones().0;
        // Step 1: the grown log, into the slot the running log's newest image is not in.
        let log = self
            .log()
            .regrow(grown.geometry(), bits.clone())
            .await
            .map_err(|e| Error::io("cannot write the grown dirty log", e))?;
        // Step 3 before step 2: nothing runs to see it (module doc).
        {
            let mut st = self.lock();
            swap_map(&mut st, &grown, &bits, &sizes);
            *self.shape.write().expect("mirror shape") = Shape::new(grown, log);
            st.state_gen += 1;
        }
        // Step 2: the superblocks with the grown layout, on every live leg.
        self.persist().await.map_err(|e| {
            Error::io(
                format!("cannot write the grown superblocks of mirror {}", self.uuid),
                e,
            )
        })?;
        log::info!(
            "mirror {}: grown from {} to {} sectors (regions of {} sectors); resyncing {resync} \
             regions",
            self.uuid,
            old.data_size.0,
            grown.data_size.0,
            grown.region_size.0
        );
        Ok(json!({
            "old_size_sectors": old.data_size.0,
            "size_sectors": grown.data_size.0,
            "region_size_sectors": grown.region_size.0,
            "resync_regions": resync,
        }))
    }

    /// Refuses a grow while a leg is failed, missing or recovering, or a scrub runs (busy):
    /// a grow needs every leg's new size and a complete copy on each to resync from.
    fn check_growable(&self, st: &State) -> Result<()> {
        for (slot, leg) in st.legs.iter().enumerate() {
            let why = match leg.state {
                LegState::Empty | LegState::InSync if leg.dev.is_some() => continue,
                LegState::Empty => continue,
                LegState::Recovering => "is recovering: wait for its resync to end",
                LegState::Stale | LegState::InSync => "is missing: add it back or remove it",
                LegState::Failed => "has failed: replace or remove it",
            };
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "cannot grow mirror {}: the leg in slot {slot} ({}) {why}",
                    self.uuid, leg.name
                ),
            ));
        }
        if st.scrub.is_some() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "cannot grow mirror {}: a scrub is running; wait for it to end",
                    self.uuid
                ),
            ));
        }
        Ok(())
    }

    /// The layout grown onto the legs' present sizes (read again from the devices), and those
    /// sizes by slot. Refused (invalid argument) naming the leg that holds no more data.
    fn grown_layout(&self, old: Layout) -> Result<(Layout, Vec<(usize, SectorCount)>)> {
        let legs: Vec<(usize, String, crate::device::DeviceRef)> = {
            let st = self.lock();
            (0..MAX_LEGS)
                .filter_map(|s| {
                    let leg = &st.legs[s];
                    Some((s, leg.name.clone(), leg.dev.clone()?))
                })
                .collect()
        };
        let mut sizes = Vec::new();
        for (slot, name, dev) in &legs {
            let size = dev.refresh_size().map_err(|e| {
                Error::io(format!("cannot read the size of slot {slot} ({name})"), e)
            })?;
            sizes.push((*slot, size));
        }
        let &(slot, smallest) = sizes
            .iter()
            .min_by_key(|(_, size)| *size)
            .expect("a growable mirror has legs");
        let grown = old.grown(smallest).map_err(|err| {
            let name = &legs.iter().find(|(s, _, _)| *s == slot).expect("a leg").1;
            if smallest > old.leg_sectors() {
                return Error::invalid(format!("cannot grow mirror {}: {err}", self.uuid));
            }
            Error::invalid(format!(
                "cannot grow mirror {}: the leg in slot {slot} ({name}, {} MiB) holds no more \
                 than the mirror's {} MiB of data: replace it with a bigger device first",
                self.uuid,
                smallest.to_bytes() >> 20,
                old.data_size.to_bytes() >> 20,
            ))
        })?;
        Ok((grown, sizes))
    }

    /// The regions that must stay dirty across the grow: the log's bits (durable or being
    /// marked; clears not committed are kept) and every region out of sync.
    fn dirty_bits(&self, st: &State) -> RegionBitmap {
        let count = st.map.geometry().count();
        let mut bits = RegionBitmap::new(count);
        for region in self.log().dirty_regions() {
            bits.set(region, true);
        }
        for region in (0..count.0).map(crate::region::RegionIndex) {
            if !st.map.in_sync(region) {
                bits.set(region, true);
            }
        }
        bits
    }
}

/// Rebuilds the state for the grown layout: the map from the grown bits (all durable in the
/// grown log), the legs' new sizes; the bookkeeping kept by region index is dropped (the
/// indices change when regions merge).
fn swap_map(st: &mut State, grown: &Layout, bits: &RegionBitmap, sizes: &[(usize, SectorCount)]) {
    assert!(
        st.map.counts().recovering.0 == 0,
        "a grow with a resync copy in flight"
    );
    let mut map = RegionMap::new(grown.geometry());
    map.load_dirty_log(bits);
    st.map = map;
    st.update_degraded();
    for &(slot, size) in sizes {
        st.legs[slot].size = size;
    }
    st.repair_source.clear();
    st.read_attempts.clear();
    st.stuck.clear();
}

/// Whether a member's superblock `old` that missed the last update may be one a grow to
/// `new` left behind: the same log area and data offset, a smaller data size, regions no
/// larger (assembly accepts it; its data is current, as nothing was written during the grow).
pub(crate) fn grown_from(new: &Layout, old: &Layout) -> bool {
    new.log_area == old.log_area
        && new.data_offset == old.data_offset
        && new.data_size > old.data_size
        && new.region_size >= old.region_size
}
