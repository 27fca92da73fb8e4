//! Runtime commands (`fail-leg`, `remove-leg`, `add-leg`, `replace-leg`, `scrub`, `grow`,
//! `status`)
//! and the status report.
//!
//! [`MirrorCommand`] is the one schema of every command: clap parses it from `ublkdm mirror
//! CMD`, serde carries it on the control socket as `{"name": "fail-leg", "args": {"slot": 1}}`
//! (the format the socket has always had), and the daemon parses it once. Every error is an
//! [`crate::error::Error`] with a one-line message; a command either takes effect or fails
//! without changing anything (except `replace-leg`, which leaves the slot empty if the new
//! device cannot be added).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::state::{Scrub, State};
use super::superblock::LegState;
use super::{open_leg, AddLegOptions, Inner, LegOptions, MAX_LEGS};
use crate::cli::parse_id;
use crate::control::Command;
use crate::error::{Error, Result};

/// The mirror's runtime commands: one schema for `ublkdm mirror CMD` (clap), the control
/// socket (`{"name": "fail-leg", "args": {"slot": 1}}`) and the daemon, which parses it once
/// ([`MirrorCommand::parse`]). `id` is the device the CLI sends it to; it is not sent.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", content = "args", rename_all = "kebab-case")]
pub enum MirrorCommand {
    /// Mark a leg failed: it is no longer read or written (its dirty regions are kept).
    FailLeg {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        slot: u32,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Remove a leg from the mirror (it must not be the last in-sync leg).
    RemoveLeg {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        slot: u32,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Add a leg: a returning leg resyncs what changed, a new one everything.
    AddLeg {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        device: PathBuf,
        /// Use a device that carries foreign metadata.
        #[arg(long)]
        #[serde(default)]
        force: bool,
        /// The slot's options: write-mostly, write-behind=N (see `add mirror --leg-options`).
        #[arg(long = "leg-options", value_name = "OPTIONS", value_parser = LegOptions::parse)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leg_options: Option<LegOptions>,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Replace the leg in SLOT with DEVICE (fully resynced).
    ReplaceLeg {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        slot: u32,
        device: PathBuf,
        /// Use a device that carries foreign metadata.
        #[arg(long)]
        #[serde(default)]
        force: bool,
        /// The slot's options: write-mostly, write-behind=N (see `add mirror --leg-options`).
        #[arg(long = "leg-options", value_name = "OPTIONS", value_parser = LegOptions::parse)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leg_options: Option<LegOptions>,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Compare the legs region by region and count mismatches (in the background).
    Scrub {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        /// Rewrite mismatched regions from an in-sync leg.
        #[arg(long)]
        #[serde(default)]
        repair: bool,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Grow the mirror to all its legs hold, once every leg is bigger (after replace-leg
    /// with bigger devices); the new area is resynced.
    Grow {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Resolve a split brain: the leg held for it joins, and one side's writes since the
    /// split are discarded (see the README before you pick).
    Resolve {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        /// Keep this mirror's data: the held leg is resynced from it in full.
        #[arg(
            long,
            required_unless_present = "keep_remote",
            conflicts_with = "keep_remote"
        )]
        #[serde(default)]
        keep_local: bool,
        /// Keep the held leg's data: every other leg is resynced from it in full, and the
        /// device shows its data at once (unmount first).
        #[arg(long)]
        #[serde(default)]
        keep_remote: bool,
        /// Print the daemon's reply as JSON instead of a line.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// The status report (on the control socket only; `ublkdm status` shows it).
    #[command(skip)]
    Status {},
}

impl MirrorCommand {
    /// The commands' names on the control socket.
    pub const NAMES: [&'static str; 8] = [
        "fail-leg",
        "remove-leg",
        "add-leg",
        "replace-leg",
        "scrub",
        "grow",
        "resolve",
        "status",
    ];

    /// The command `name` with its JSON arguments, as the control socket carries it.
    pub fn parse(name: &str, args: &Value) -> Result<MirrorCommand> {
        Command::parse_target("mirror", &Self::NAMES, name, args)
    }

    /// What the CLI sends to the daemon.
    pub fn to_wire(&self) -> Command {
        Command::target(self)
    }

    /// Whether the user asked for the reply as JSON (`--json`) rather than a line.
    pub fn wants_json(&self) -> bool {
        match self {
            MirrorCommand::FailLeg { json, .. }
            | MirrorCommand::RemoveLeg { json, .. }
            | MirrorCommand::AddLeg { json, .. }
            | MirrorCommand::ReplaceLeg { json, .. }
            | MirrorCommand::Scrub { json, .. }
            | MirrorCommand::Grow { json, .. }
            | MirrorCommand::Resolve { json, .. } => *json,
            MirrorCommand::Status {} => true,
        }
    }

    /// Whether the line needs the status from before the command: the leg it names is gone
    /// from the status after it.
    pub fn needs_status_before(&self) -> bool {
        matches!(
            self,
            MirrorCommand::RemoveLeg { .. } | MirrorCommand::ReplaceLeg { .. }
        )
    }

    /// The device the CLI sends it to.
    pub fn device_id(&self) -> u32 {
        match self {
            MirrorCommand::FailLeg { id, .. }
            | MirrorCommand::RemoveLeg { id, .. }
            | MirrorCommand::AddLeg { id, .. }
            | MirrorCommand::ReplaceLeg { id, .. }
            | MirrorCommand::Scrub { id, .. }
            | MirrorCommand::Grow { id, .. }
            | MirrorCommand::Resolve { id, .. } => *id,
            MirrorCommand::Status {} => unreachable!("not a CLI command"),
        }
    }

    /// Device paths made absolute (the daemon runs in `/`).
    pub fn make_paths_absolute(&mut self) -> Result<()> {
        if let MirrorCommand::AddLeg { device, .. } | MirrorCommand::ReplaceLeg { device, .. } =
            self
        {
            *device = super::leg_path(std::mem::take(device))?;
        }
        Ok(())
    }
}

/// A slot given by the user, checked against the table's size.
fn slot_index(slot: u32) -> Result<usize> {
    usize::try_from(slot)
        .ok()
        .filter(|&s| s < MAX_LEGS)
        .ok_or_else(|| Error::invalid(format!("give a slot from 0 to {}", MAX_LEGS - 1)))
}

impl Inner {
    /// Runs command `name` with its JSON arguments (as the control socket carries them).
    pub(crate) async fn command(self: Arc<Self>, name: &str, args: &Value) -> Result<Value> {
        let command = MirrorCommand::parse(name, args)?;
        self.run(command).await
    }

    /// Runs one parsed command.
    pub(crate) async fn run(self: Arc<Self>, command: MirrorCommand) -> Result<Value> {
        // Leg changes and a grow exclude each other (a grow takes the gate exclusively).
        let holder = Arc::clone(&self);
        let _gate = match command {
            // These take the gate themselves (exclusively, or only for a part).
            MirrorCommand::Grow { .. }
            | MirrorCommand::Resolve { .. }
            | MirrorCommand::Status {} => None,
            _ => Some(holder.gate.read().await),
        };
        match command {
            MirrorCommand::Status {} => Ok(self.status()),
            MirrorCommand::FailLeg { slot, .. } => {
                self.fail_leg_command(slot_index(slot)?).await?;
                Ok(json!({ "failed": slot }))
            }
            MirrorCommand::RemoveLeg { slot, .. } => {
                self.remove_leg(slot_index(slot)?).await?;
                Ok(json!({ "removed": slot }))
            }
            MirrorCommand::AddLeg {
                device,
                force,
                leg_options,
                ..
            } => {
                let dev = open_leg(&device)?;
                let options = AddLegOptions {
                    force,
                    ..AddLegOptions::default()
                };
                let slot = Arc::clone(&self).add_leg(dev, options).await?;
                self.set_leg_options(slot, leg_options);
                Ok(json!({ "added": slot }))
            }
            MirrorCommand::ReplaceLeg {
                slot,
                device,
                force,
                leg_options,
                ..
            } => {
                let slot = slot_index(slot)?;
                let dev = open_leg(&device)?;
                let slot = Arc::clone(&self).replace_leg(slot, dev, force).await?;
                self.set_leg_options(slot, leg_options);
                Ok(json!({ "replaced": slot }))
            }
            MirrorCommand::Scrub { repair, .. } => {
                self.start_scrub(repair)?;
                Ok(json!({ "scrub": if repair { "repair" } else { "check" } }))
            }
            MirrorCommand::Grow { .. } => self.grow(None).await,
            MirrorCommand::Resolve { keep_remote, .. } => self.resolve(keep_remote).await,
        }
    }

    /// Gives the leg in `slot` the options asked for (the slot keeps its own otherwise).
    fn set_leg_options(&self, slot: usize, options: Option<LegOptions>) {
        if let Some(options) = options {
            self.lock().options[slot] = options;
            log::info!("mirror {}: slot {slot} is {}", self.uuid, options.words());
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
        let (missing, not_members) = self.missing_lines(&st);
        let total = self.geometry().count().0;
        json!({
            "target": "mirror",
            "uuid": self.uuid.to_string(),
            "size_sectors": self.layout().data_size.0,
            "region_size_sectors": self.layout().region_size.0,
            "data_offset_sectors": self.layout().data_offset.0,
            "events": st.events,
            "events_cleared": st.events_cleared,
            "degraded": st.missing_legs(),
            "missing_legs": missing,
            "connecting": self.remotes.pending_status(),
            "split_brain": self.held_status(),
            "not_members": not_members,
            "metadata_slots": self.meta.member_slots(),
            "legs": self.legs_status(&st),
            "regions": regions_status(&st, total),
            "resync": self.resync_status(&st, stats.bytes_done),
            "scrub": st.scrub.as_ref().map(|s| scrub_status(s, total)),
            "last_scrub": st.last_scrub,
            "mismatch_count": st.mismatch_count,
            "copy": stats,
        })
    }

    /// Every leg in the table: its device, state and counters, and why it is missing.
    fn legs_status(&self, st: &State) -> Vec<Value> {
        st.legs
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
                if let Some(why) = self.missing_reason(st, slot) {
                    leg["reason"] = why.into();
                }
                let options = st.options[slot];
                if options != LegOptions::default() {
                    leg["options"] = options.words().into();
                }
                if options.write_behind > 0 {
                    leg["lag"] = json!(self.behind.lag(slot));
                }
                if let Some(link) = l.dev.as_ref().and_then(|dev| dev.link()) {
                    leg["link"] = json!(link);
                } else if let Some(watched) = self.remotes.watched(slot) {
                    leg["link"] = watched["link"].clone();
                    if !watched["refused"].is_null() {
                        leg["readd_refused"] = watched["refused"].clone();
                    }
                }
                leg
            })
            .collect()
    }

    /// The resync's progress, rate and estimated time left; `bytes_done` is the copy
    /// engine's running count.
    fn resync_status(&self, st: &State, bytes_done: u64) -> Value {
        let p = &st.progress;
        let elapsed = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let copied = bytes_done.saturating_sub(p.bytes_at_start);
        let rate = if p.active && elapsed > 0.0 {
            copied as f64 / elapsed
        } else {
            0.0
        };
        let remaining = (self.geometry().count().0 - st.map.sync_count().0)
            * self.layout().region_size.to_bytes();
        let eta = (rate > 0.0).then(|| remaining as f64 / rate);
        json!({
            "active": p.active,
            "regions_done": p.done,
            "regions_total": p.total,
            "rate_bytes_per_sec": rate.round() as u64,
            "eta_seconds": eta.map(|e| e.round() as u64),
        })
    }
}

/// The regions by state, of `total`.
fn regions_status(st: &State, total: u64) -> Value {
    let counts = st.map.counts();
    json!({
        "in_sync": st.map.sync_count().0,
        "total": total,
        "clean": counts.clean.0,
        "dirty": counts.dirty.0,
        "recovering": counts.recovering.0,
        "out_of_sync": counts.out_of_sync.0,
        "stuck": st.stuck.len(),
    })
}

/// A running scrub pass over `total` regions.
fn scrub_status(s: &Scrub, total: u64) -> Value {
    json!({
        "mode": if s.repair { "repair" } else { "check" },
        "regions_checked": s.checked,
        "regions_skipped": s.skipped,
        "next_region": s.next.0,
        "total": total,
        "mismatches": s.mismatches,
    })
}
