//! Runtime commands (`fail-leg`, `remove-leg`, `add-leg`, `replace-leg`, `scrub`, `status`)
//! and the status report.
//!
//! Arguments are JSON objects: `{"slot": 1}`, `{"device": "/dev/sdb", "force": false}`,
//! `{"slot": 1, "device": "/dev/sdc"}`, `{"repair": true}`. Every error is an
//! [`crate::error::Error`] with a one-line message; a command either takes effect or fails
//! without changing anything (except `replace-leg`, which leaves the slot empty if the new
//! device cannot be added).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::state::State;
use super::superblock::LegState;
use super::{open_leg, AddLegOptions, Inner, MAX_LEGS};
use crate::error::{Error, Result};

fn slot_arg(args: &Value) -> Result<usize> {
    args.get("slot")
        .and_then(Value::as_u64)
        .map(|s| s as usize)
        .filter(|&s| s < MAX_LEGS)
        .ok_or_else(|| Error::invalid(format!("give a slot from 0 to {}", MAX_LEGS - 1)))
}

fn device_arg(args: &Value) -> Result<&Path> {
    args.get("device")
        .and_then(Value::as_str)
        .map(Path::new)
        .ok_or_else(|| Error::invalid("give the device path as \"device\""))
}

fn force_arg(args: &Value) -> bool {
    args.get("force").and_then(Value::as_bool).unwrap_or(false)
}

impl Inner {
    /// Runs one command (the names are those of the module doc).
    pub(crate) async fn command(self: Arc<Self>, name: &str, args: &Value) -> Result<Value> {
        match name {
            "status" => Ok(self.status()),
            "fail-leg" => {
                let slot = slot_arg(args)?;
                self.fail_leg_command(slot).await?;
                Ok(json!({ "failed": slot }))
            }
            "remove-leg" => {
                let slot = slot_arg(args)?;
                self.remove_leg(slot).await?;
                Ok(json!({ "removed": slot }))
            }
            "add-leg" => {
                let dev = open_leg(device_arg(args)?)?;
                let options = AddLegOptions {
                    force: force_arg(args),
                    slot: None,
                };
                let slot = self.add_leg(dev, options).await?;
                Ok(json!({ "added": slot }))
            }
            "replace-leg" => {
                let slot = slot_arg(args)?;
                let dev = open_leg(device_arg(args)?)?;
                let slot = self.replace_leg(slot, dev, force_arg(args)).await?;
                Ok(json!({ "replaced": slot }))
            }
            "scrub" => {
                let repair = args.get("repair").and_then(Value::as_bool).unwrap_or(false);
                self.start_scrub(repair)?;
                Ok(json!({ "scrub": if repair { "repair" } else { "check" } }))
            }
            other => Err(Error::invalid(format!(
                "the mirror target has no command '{other}' (fail-leg, remove-leg, add-leg, \
                 replace-leg, scrub, status)"
            ))),
        }
    }

    /// Why the leg in `slot` is missing (stale or failed), if it is: the assembly's reason
    /// while the slot holds what the assembly put there, else its state.
    fn missing_reason(&self, st: &State, slot: usize) -> Option<String> {
        let leg = &st.legs[slot];
        if !leg.state.is_missing() {
            return None;
        }
        let at_assembly = self
            .report
            .absent
            .iter()
            .find(|(s, generation, _, _)| *s == slot && *generation == leg.generation);
        Some(match (at_assembly, leg.state) {
            (Some((_, _, why, _)), _) => why.clone(),
            (None, LegState::Failed) => "failed: an I/O error or fail-leg while running".into(),
            (None, _) => "stale".into(),
        })
    }

    /// "slot 1 (/dev/vdb): missing: cannot open: No such device" for every missing leg, and
    /// the notes on given legs that are not members (until they become legs).
    fn missing_lines(&self, st: &State) -> (Vec<String>, Vec<String>) {
        let missing = (0..MAX_LEGS)
            .filter_map(|slot| {
                let why = self.missing_reason(st, slot)?;
                let at_assembly = self.report.absent.iter().find(|(s, generation, _, _)| {
                    *s == slot && *generation == st.legs[slot].generation
                });
                Some(match at_assembly {
                    Some((_, _, _, line)) => line.clone(),
                    None => format!("slot {slot} ({}): {why}", st.legs[slot].name),
                })
            })
            .collect();
        let notes = self
            .report
            .not_members
            .iter()
            .filter(|(name, _)| !st.legs.iter().any(|l| l.dev.is_some() && l.name == *name))
            .map(|(_, note)| note.clone())
            .collect();
        (missing, notes)
    }

    /// The status report: legs (and why any is missing), regions, resync and scrub
    /// progress, mismatches.
    pub(crate) fn status(&self) -> Value {
        let stats = self.engine.stats();
        let st = self.lock();
        let legs: Vec<Value> = st
            .legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.state != LegState::Empty)
            .map(|(slot, l)| {
                let mut leg = json!({
                    "slot": slot,
                    "device": l.name,
                    "state": l.state,
                    "read_errors": l.stats.read_errors.load(Ordering::Relaxed),
                    "write_errors": l.stats.write_errors.load(Ordering::Relaxed),
                    "reads": l.stats.reads.load(Ordering::Relaxed),
                    "in_flight": l.stats.in_flight.load(Ordering::Relaxed),
                });
                if let Some(why) = self.missing_reason(&st, slot) {
                    leg["reason"] = why.into();
                }
                leg
            })
            .collect();
        let (missing, not_members) = self.missing_lines(&st);
        let total = self.geometry.count().0;
        let in_sync = st.map.sync_count().0;
        let counts = st.map.counts();
        let p = &st.progress;
        let region_bytes = self.layout.region_size.to_bytes();
        let elapsed = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let copied = stats.bytes_done.saturating_sub(p.bytes_at_start);
        let rate = if p.active && elapsed > 0.0 {
            copied as f64 / elapsed
        } else {
            0.0
        };
        let remaining = (total - in_sync) * region_bytes;
        let eta = (rate > 0.0).then(|| remaining as f64 / rate);
        let scrub = st.scrub.as_ref().map(|s| {
            json!({
                "mode": if s.repair { "repair" } else { "check" },
                "regions_checked": s.checked,
                "regions_skipped": s.skipped,
                "next_region": s.next.0,
                "total": total,
                "mismatches": s.mismatches,
            })
        });
        json!({
            "target": "mirror",
            "uuid": self.uuid.to_string(),
            "size_sectors": self.layout.data_size.0,
            "region_size_sectors": self.layout.region_size.0,
            "data_offset_sectors": self.layout.data_offset.0,
            "events": st.events,
            "events_cleared": st.events_cleared,
            "degraded": st.missing_legs(),
            "missing_legs": missing,
            "not_members": not_members,
            "metadata_slots": self.meta.member_slots(),
            "legs": legs,
            "regions": {
                "in_sync": in_sync,
                "total": total,
                "clean": counts.clean.0,
                "dirty": counts.dirty.0,
                "recovering": counts.recovering.0,
                "out_of_sync": counts.out_of_sync.0,
                "stuck": st.stuck.len(),
            },
            "resync": {
                "active": p.active,
                "regions_done": p.done,
                "regions_total": p.total,
                "rate_bytes_per_sec": rate.round() as u64,
                "eta_seconds": eta.map(|e| e.round() as u64),
            },
            "scrub": scrub,
            "last_scrub": st.last_scrub,
            "mismatch_count": st.mismatch_count,
            "copy": stats,
        })
    }
}
