//! Split brain on a leg's return, and its resolution by the user.
//!
//! A former leg that comes back (its link returns, `add-leg`, or an assembly that could only
//! run one side) after it was written as a complete copy while every leg this mirror runs
//! from was away holds writes this mirror lacks, as this mirror holds writes it lacks (the
//! rule of `survey.rs`, applied to the returning leg against the running legs' superblocks
//! as they are now). An incremental resync would copy only this side's dirty regions over
//! it and leave the two histories mixed; a full one would silently throw its writes away.
//! So the leg is refused (one line, exit 7), held here with the reason (`status` shows it),
//! and nothing moves until the user picks a side:
//! - `ublkdm mirror resolve ID --keep-local`: the held leg joins with a full resync from this
//!   mirror; its own writes since the split are discarded.
//! - `ublkdm mirror resolve ID --keep-remote`: the held leg becomes the only in-sync leg and
//!   every other leg is resynced from it in full; this mirror's writes since the split are
//!   discarded, and the device shows the other side's data at once (unmount it first, as
//!   DRBD's `discard-my-data` asks).
//!
//! Invariant: a held leg is never read or written by this mirror until a resolution takes it;
//! at most one leg is held per slot.

use std::sync::Arc;

use serde_json::{json, Value};

use super::assemble::present_leg;
use super::state::State;
use super::superblock::{LegState, Probe, Superblock};
use super::survey::holds_writes_the_sources_lack;
use super::{AddLegOptions, Inner};
use crate::device::DeviceRef;
use crate::error::{Error, ErrorKind, Result};

/// A leg refused for split brain, waiting for the user.
pub(crate) struct HeldLeg {
    pub slot: usize,
    pub dev: DeviceRef,
    pub why: String,
}

impl Inner {
    /// Refuses (and holds) `dev`, a former leg whose superblock `sb` says it was written
    /// while every leg this mirror runs from was away (see the module doc).
    pub(crate) fn check_no_split_brain(&self, dev: &DeviceRef, sb: &Superblock) -> Result<()> {
        let split = {
            let st = self.lock();
            let sources: Vec<Superblock> = st
                .in_sync_slots()
                .into_iter()
                .map(|slot| st.superblock(self.uuid, self.layout(), slot))
                .collect();
            let refs: Vec<&Superblock> = sources.iter().collect();
            holds_writes_the_sources_lack(sb, &refs).then(|| describe(&st))
        };
        let Some(running) = split else {
            return Ok(());
        };
        let name = dev.info().name.clone();
        let why = format!(
            "split brain in mirror {}: {name} (event {}) was written as a complete copy while \
             {running} was away, and this mirror was written meanwhile; resolve with \
             'ublkdm mirror resolve ID --keep-local' (discard its writes) or '--keep-remote' \
             (discard this side's)",
            self.uuid, sb.events
        );
        let mut held = self.held.lock().expect("held legs");
        held.retain(|h| h.slot != sb.slot);
        held.push(HeldLeg {
            slot: sb.slot,
            dev: Arc::clone(dev),
            why: why.clone(),
        });
        Err(Error::new(ErrorKind::Corrupt, why))
    }

    /// The held legs, for `status`.
    pub(crate) fn held_status(&self) -> Vec<Value> {
        let held = self.held.lock().expect("held legs");
        held.iter()
            .map(|h| json!({ "slot": h.slot, "device": h.dev.info().name, "reason": h.why }))
            .collect()
    }

    /// `mirror resolve`: takes the one held leg and joins it on the side the user chose.
    pub(crate) async fn resolve(self: Arc<Self>, keep_remote: bool) -> Result<Value> {
        let HeldLeg { slot, dev, .. } = self.take_held()?;
        let name = dev.info().name.clone();
        let outcome = if keep_remote {
            self.adopt(slot, Arc::clone(&dev)).await
        } else {
            let options = AddLegOptions {
                discard_theirs: true,
                ..AddLegOptions::default()
            };
            let _gate = self.gate.read().await;
            Arc::clone(&self).add_leg(Arc::clone(&dev), options).await
        };
        match outcome {
            Ok(slot) => Ok(json!({
                "resolved": slot,
                "device": name,
                "kept": if keep_remote { "remote" } else { "local" },
            })),
            Err(err) => {
                // Held again: nothing was decided.
                let why = err.to_string();
                self.held
                    .lock()
                    .expect("held legs")
                    .push(HeldLeg { slot, dev, why });
                Err(err)
            }
        }
    }

    fn take_held(&self) -> Result<HeldLeg> {
        let mut held = self.held.lock().expect("held legs");
        match held.len() {
            0 => Err(Error::invalid(format!(
                "mirror {} has no leg held for split brain",
                self.uuid
            ))),
            1 => Ok(held.remove(0)),
            n => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "mirror {} holds {n} legs for split brain; resolve needs one",
                    self.uuid
                ),
            )),
        }
    }

    /// `--keep-remote`: `dev` (the held leg of `slot`) becomes the only in-sync leg; every
    /// other present leg recovers from it in full. Runs with the gate held exclusively, so no
    /// request sees the legs change under it.
    async fn adopt(self: &Arc<Self>, slot: usize, dev: DeviceRef) -> Result<usize> {
        let _quiet = self.exclusive().await?;
        let Probe::Ours(sb) = super::probe(&dev).await? else {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} no longer carries this mirror's superblock",
                    dev.info().name
                ),
            ));
        };
        let generation = {
            let mut st = self.lock();
            let leg = &st.legs[slot];
            if leg.uuid != sb.own().leg_uuid || !leg.state.is_missing() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {slot} no longer waits for {}", dev.info().name),
                ));
            }
            st.new_generation()
        };
        self.meta
            .add_member(slot, generation, Arc::clone(&dev))
            .await
            .map_err(|e| {
                Error::io(
                    format!("cannot copy the dirty log to {}", dev.info().name),
                    e,
                )
            })?;
        self.swap_sides(slot, generation, &dev, sb.own().leg_uuid);
        self.log()
            .mark_range(self.geometry().all())
            .await
            .map_err(|e| Error::io("cannot mark every region for the resync", e))?;
        self.kick();
        self.persist()
            .await
            .map_err(|e| Error::io("cannot update the superblocks", e))?;
        log::warn!(
            "mirror {}: split brain resolved for {}: this side's writes since the split are \
             discarded, every leg resyncs from it",
            self.uuid,
            dev.info().name
        );
        Ok(slot)
    }

    /// Under one lock: the adopted leg in sync in `slot`, every other present leg recovering,
    /// every region out of sync (read from the adopted leg until copied).
    fn swap_sides(&self, slot: usize, generation: u64, dev: &DeviceRef, uuid: uuid::Uuid) {
        let mut st = self.lock();
        for (s, leg) in st.legs.iter_mut().enumerate() {
            if s != slot && leg.is_active() {
                leg.state = LegState::Recovering;
            }
        }
        st.legs[slot] = present_leg(dev, LegState::InSync, uuid, generation);
        st.repair_source.clear();
        st.stuck.clear();
        st.map.mark_out_of_sync(self.geometry().all());
        assert_eq!(
            st.in_sync_slots(),
            vec![slot],
            "the adopted leg is the one source"
        );
        st.update_degraded();
        st.state_gen += 1;
    }
}

/// The running in-sync legs, for the message: "slot 0 (/dev/vda)".
fn describe(st: &State) -> String {
    let names: Vec<String> = st
        .in_sync_slots()
        .into_iter()
        .map(|s| format!("slot {s} ({})", st.legs[s].name))
        .collect();
    names.join(", ")
}
