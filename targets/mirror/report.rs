//! What a person reads about a mirror: the one line each `ublkdm mirror CMD` prints, and the
//! mirror's part of `ublkdm status` (a compact report: the legs as a table, then regions,
//! resync and scrub one line each, then what is missing).
//!
//! Every function here is pure: JSON in (a command's reply, the target status that
//! `Inner::status` in `commands.rs` builds), text out. The JSON is the daemon's answer, so
//! nothing here trusts it to be complete: a missing field reads as zero or `?`, never a
//! panic. `--json` and `status --json` print the JSON itself and never come here.

use serde_json::Value;

use super::commands::MirrorCommand;
use crate::cli::pow2_size_text;
use crate::units::SECTOR_BYTES;

/// The line `ublkdm mirror CMD` prints for `command`, from the daemon's `reply` and the
/// mirror's target status `before` and `after` it (`Null` when not asked for, or when the
/// daemon did not answer).
pub fn command_line(
    command: &MirrorCommand,
    reply: &Value,
    before: &Value,
    after: &Value,
) -> String {
    let id = command.device_id();
    match command {
        MirrorCommand::FailLeg { .. } => {
            let slot = reply["failed"].as_u64().unwrap_or(0);
            let leg = leg_name(slot, &[after, before], None);
            format!("{leg} marked failed; {}", legs_summary(id, after))
        }
        MirrorCommand::RemoveLeg { .. } => {
            let slot = reply["removed"].as_u64().unwrap_or(0);
            let leg = leg_name(slot, &[before], None);
            format!(
                "{leg} removed from mirror {id}; {}",
                legs_summary(id, after)
            )
        }
        MirrorCommand::AddLeg { device, .. } => {
            let slot = reply["added"].as_u64().unwrap_or(0);
            let leg = leg_name(slot, &[after], Some(&device.display().to_string()));
            format!("{leg} added to mirror {id}; {}", resync_started(after))
        }
        MirrorCommand::ReplaceLeg { device, .. } => {
            let slot = reply["replaced"].as_u64().unwrap_or(0);
            let old = leg_name(slot, &[before], None);
            let new = device_at(after, slot).unwrap_or_else(|| device.display().to_string());
            format!(
                "{old} replaced by {new} in mirror {id}; {}",
                resync_started(after)
            )
        }
        MirrorCommand::Scrub { .. } => {
            let mode = reply["scrub"].as_str().unwrap_or("check");
            let regions = count(&after["regions"]["total"]);
            format!(
                "scrub of mirror {id} started ({mode}, {regions} regions); \
                 follow with 'ublkdm status {id} --watch'"
            )
        }
        MirrorCommand::Grow { .. } => {
            let mib = |v: &Value| {
                v.as_u64().map_or_else(
                    || "?".to_owned(),
                    |s| (s.saturating_mul(SECTOR_BYTES) >> 20).to_string(),
                )
            };
            format!(
                "mirror {id} grown from {} MiB to {} MiB; resyncing the new area ({} regions); \
                 follow with 'ublkdm status {id} --watch'",
                mib(&reply["old_size_sectors"]),
                mib(&reply["size_sectors"]),
                count(&reply["resync_regions"])
            )
        }
        MirrorCommand::Resolve { .. } => {
            let slot = reply["resolved"].as_u64().unwrap_or(0);
            let device = plain(&reply["device"]);
            let discarded = if reply["kept"] == "remote" {
                "this side's writes since the split are discarded, every other leg resyncs from it"
            } else {
                "its writes since the split are discarded, it resyncs in full"
            };
            format!(
                "split brain of mirror {id} resolved: {device} is slot {slot} again; {discarded}; {}",
                resync_started(after)
            )
        }
        MirrorCommand::Status {} => unreachable!("not a CLI command"),
    }
}

/// The mirror's part of `ublkdm status` (see the module doc).
pub fn status_lines(status: &Value) -> Vec<String> {
    let legs = status["legs"].as_array().map_or(&[][..], Vec::as_slice);
    let mut lines = vec![format!("state:   {}", health(status, legs))];
    lines.extend(leg_table(legs));
    lines.extend(legs.iter().filter_map(leg_note));
    lines.push(format!("regions: {}", regions_line(status)));
    lines.push(format!("resync:  {}", resync_line(&status["resync"])));
    lines.push(format!("scrub:   {}", scrub_line(status)));
    let list = |key: &str| status[key].as_array().cloned().unwrap_or_default();
    for line in list("missing_legs") {
        lines.push(format!("missing: {}", plain(&line)));
    }
    for line in list("not_members") {
        lines.push(format!("note:    {}", plain(&line)));
    }
    for held in list("split_brain") {
        lines.push(format!(
            "held:    slot {}: {}",
            count(&held["slot"]),
            plain(&held["reason"])
        ));
    }
    for leg in list("connecting") {
        lines.push(format!(
            "connecting: {} ({} attempts; {})",
            plain(&leg["device"]),
            count(&leg["attempts"]),
            plain(&leg["last_error"])
        ));
    }
    lines
}

/// `degraded: 1 of 2 legs in sync`, `recovering: ...` or `healthy: ...`.
fn health(status: &Value, legs: &[Value]) -> String {
    let in_sync = legs.iter().filter(|l| l["state"] == "in-sync").count();
    let word = if status["degraded"].as_bool() == Some(true) {
        "degraded"
    } else if in_sync < legs.len() {
        "recovering"
    } else {
        "healthy"
    };
    format!("{word}, {in_sync} of {} legs in sync", legs.len())
}

/// The legs as an aligned table with a header row.
fn leg_table(legs: &[Value]) -> Vec<String> {
    let header = [
        "slot",
        "device",
        "state",
        "reads",
        "read-err",
        "write-err",
        "in-flight",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for leg in legs {
        rows.push(vec![
            count(&leg["slot"]),
            plain(&leg["device"]),
            plain(&leg["state"]),
            count(&leg["reads"]),
            count(&leg["read_errors"]),
            count(&leg["write_errors"]),
            count(&leg["in_flight"]),
        ]);
    }
    align(&rows)
}

/// A leg's options, what it owes and its link, if it has any: `leg 1:   write-behind=256,
/// lag 3 writes (12288 bytes), link connected (epoch 1, 0 reconnects)`.
fn leg_note(leg: &Value) -> Option<String> {
    let mut words = Vec::new();
    if let Some(options) = leg["options"].as_str() {
        words.push(options.to_string());
    }
    if leg["lag"].is_object() {
        words.push(format!(
            "lag {} writes ({} bytes)",
            count(&leg["lag"]["writes"]),
            count(&leg["lag"]["bytes"])
        ));
    }
    if let Some(link) = leg["link"].as_object() {
        let state = link
            .get("state")
            .map_or_else(String::new, plain)
            .to_lowercase();
        let mut said = format!(
            "link {state} (epoch {}, {} reconnects",
            link.get("epoch").map_or_else(String::new, count),
            link.get("reconnects").map_or_else(String::new, count)
        );
        if let Some(why) = link.get("last_error").filter(|e| !e.is_null()) {
            said.push_str(&format!("; last error: {}", plain(why)));
        }
        said.push(')');
        words.push(said);
    }
    if let Some(why) = leg["readd_refused"].as_str() {
        words.push(format!("not added back: {why}"));
    }
    if words.is_empty() {
        return None;
    }
    Some(format!(
        "leg {}:   {}",
        count(&leg["slot"]),
        words.join(", ")
    ))
}

/// `rows` as lines, each column as wide as its widest cell (the last one unpadded).
fn align(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// `256 x 4 MiB, 256 in sync, 0 dirty`, then the counts that are not zero among out of
/// sync, recovering and stuck.
fn regions_line(status: &Value) -> String {
    let r = &status["regions"];
    let size = status["region_size_sectors"].as_u64().map_or_else(
        || "?".to_owned(),
        |s| pow2_size_text(s.saturating_mul(SECTOR_BYTES)),
    );
    let mut line = format!(
        "{} x {size}, {} in sync, {} dirty",
        count(&r["total"]),
        count(&r["in_sync"]),
        count(&r["dirty"])
    );
    for (key, what) in [
        ("out_of_sync", "out of sync"),
        ("recovering", "recovering"),
        ("stuck", "stuck"),
    ] {
        if r[key].as_u64().is_some_and(|n| n > 0) {
            line.push_str(&format!(", {} {what}", count(&r[key])));
        }
    }
    line
}

/// `idle`, or `120/256 regions (46%), 12.3 MB/s, eta 11s`.
fn resync_line(resync: &Value) -> String {
    if resync["active"].as_bool() != Some(true) {
        return "idle".to_owned();
    }
    let done = resync["regions_done"].as_u64().unwrap_or(0);
    let total = resync["regions_total"].as_u64().unwrap_or(0);
    let rate = resync["rate_bytes_per_sec"].as_u64().unwrap_or(0);
    let eta = resync["eta_seconds"]
        .as_u64()
        .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
    format!(
        "{done}/{total} regions{}, {:.1} MB/s, eta {eta}",
        percent(done, total),
        rate as f64 / 1e6
    )
}

/// The scrub running (`check, 100/256 regions, 0 mismatches`), or `idle` with the outcome
/// of the last pass.
fn scrub_line(status: &Value) -> String {
    let scrub = &status["scrub"];
    if scrub.is_object() {
        let done = scrub["next_region"].as_u64().unwrap_or(0);
        let total = scrub["total"].as_u64().unwrap_or(0);
        return format!(
            "{}, {done}/{total} regions{}, {} mismatches",
            plain(&scrub["mode"]),
            percent(done, total),
            count(&scrub["mismatches"])
        );
    }
    let last = &status["last_scrub"];
    if !last.is_object() {
        return "idle, never run".to_owned();
    }
    let mode = if last["repair"].as_bool() == Some(true) {
        "repair"
    } else {
        "check"
    };
    format!(
        "idle; last {mode}: {} regions checked, {} skipped, {} mismatches",
        count(&last["checked"]),
        count(&last["skipped"]),
        count(&last["mismatches"])
    )
}

/// `leg 1 (/dev/vdc)`: the device from the first status that has the slot, else `fallback`.
fn leg_name(slot: u64, statuses: &[&Value], fallback: Option<&str>) -> String {
    let device = statuses
        .iter()
        .find_map(|s| device_at(s, slot))
        .or_else(|| fallback.map(str::to_owned));
    match device {
        Some(device) => format!("leg {slot} ({device})"),
        None => format!("leg {slot}"),
    }
}

/// The device of the leg in `slot`, if the status lists it.
fn device_at(status: &Value, slot: u64) -> Option<String> {
    status["legs"]
        .as_array()?
        .iter()
        .find(|l| l["slot"].as_u64() == Some(slot))
        .and_then(|l| l["device"].as_str())
        .map(str::to_owned)
}

/// `mirror 0 is degraded (1 of 2 legs in sync)` or `mirror 0 has 2 of 2 legs in sync`.
fn legs_summary(id: u32, status: &Value) -> String {
    let Some(legs) = status["legs"].as_array() else {
        return format!("see 'ublkdm status {id}'");
    };
    let in_sync = legs.iter().filter(|l| l["state"] == "in-sync").count();
    if status["degraded"].as_bool() == Some(true) {
        format!(
            "mirror {id} is degraded ({in_sync} of {} legs in sync)",
            legs.len()
        )
    } else {
        format!("mirror {id} has {in_sync} of {} legs in sync", legs.len())
    }
}

/// `resync of 16 of 256 regions started`: the regions out of sync now, or, once the resync
/// has started counting, the regions of its pass (some may already be copied by the time the
/// status is read).
fn resync_started(status: &Value) -> String {
    let regions = &status["regions"];
    let (Some(total), Some(in_sync)) = (regions["total"].as_u64(), regions["in_sync"].as_u64())
    else {
        return "resync started".to_owned();
    };
    let resync = &status["resync"];
    let pass = match resync["active"].as_bool() {
        Some(true) => resync["regions_total"].as_u64().unwrap_or(0),
        _ => 0,
    };
    match total.saturating_sub(in_sync).max(pass) {
        0 => "nothing left to resync".to_owned(),
        n => format!("resync of {n} of {total} regions started"),
    }
}

/// ` (46%)`, or nothing when there is no total.
fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        return String::new();
    }
    format!(" ({}%)", done.saturating_mul(100) / total)
}

/// A number from the status, `?` when absent.
fn count(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// A string from the status without its quotes (anything else as JSON, `?` when absent).
fn plain(value: &Value) -> String {
    match value {
        Value::Null => "?".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn leg(slot: u64, device: &str, state: &str, write_errors: u64) -> Value {
        json!({ "slot": slot, "device": device, "state": state, "read_errors": 0,
                "write_errors": write_errors, "reads": 1200 + slot, "in_flight": 0 })
    }

    /// A status as `Inner::status` builds it: two legs, 256 regions of 4 MiB.
    fn status(legs: Vec<Value>, degraded: bool, in_sync: u64) -> Value {
        json!({
            "target": "mirror", "uuid": "6f1c0c9e-3c55-4d8e-9d1e-6b1f3b0c2a11",
            "size_sectors": 2_097_152, "region_size_sectors": 8192, "data_offset_sectors": 2048,
            "events": 12, "events_cleared": 10, "degraded": degraded,
            "missing_legs": [], "not_members": [], "metadata_slots": [0, 1], "legs": legs,
            "regions": { "in_sync": in_sync, "total": 256, "clean": 254, "dirty": 2,
                         "recovering": 0, "out_of_sync": 256 - in_sync, "stuck": 0 },
            "resync": { "active": false, "regions_done": 0, "regions_total": 0,
                        "rate_bytes_per_sec": 0, "eta_seconds": null },
            "scrub": null, "last_scrub": null, "mismatch_count": 0,
            "copy": { "bytes_done": 0, "jobs_queued": 0, "jobs_in_flight": 0, "jobs_done": 0,
                      "memory_in_use": 0, "memory_peak": 0, "memory_budget": 67_108_864 },
        })
    }

    fn healthy() -> Value {
        status(
            vec![
                leg(0, "/dev/vdb", "in-sync", 0),
                leg(1, "/dev/vdc", "in-sync", 0),
            ],
            false,
            256,
        )
    }

    fn degraded() -> Value {
        let mut s = status(
            vec![
                leg(0, "/dev/vdb", "in-sync", 0),
                leg(1, "/dev/vdc", "failed", 3),
            ],
            true,
            256,
        );
        s["legs"][1]["reason"] = "failed: an I/O error or fail-leg while running".into();
        s["missing_legs"] =
            json!(["slot 1 (/dev/vdc): failed: an I/O error or fail-leg while running"]);
        s["not_members"] = json!(["/dev/vdd is not a member of this mirror"]);
        s
    }

    #[test]
    fn healthy_status_is_a_table_and_one_line_each() {
        let mut s = healthy();
        s["last_scrub"] = json!({ "repair": false, "checked": 256, "skipped": 0, "mismatches": 0 });
        assert_eq!(
            status_lines(&s),
            [
                "state:   healthy, 2 of 2 legs in sync",
                "slot  device    state    reads  read-err  write-err  in-flight",
                "0     /dev/vdb  in-sync  1200   0         0          0",
                "1     /dev/vdc  in-sync  1201   0         0          0",
                "regions: 256 x 4 MiB, 256 in sync, 2 dirty",
                "resync:  idle",
                "scrub:   idle; last check: 256 regions checked, 0 skipped, 0 mismatches",
            ]
        );
    }

    #[test]
    fn degraded_status_names_the_failed_leg_and_why() {
        assert_eq!(
            status_lines(&degraded()),
            [
                "state:   degraded, 1 of 2 legs in sync",
                "slot  device    state    reads  read-err  write-err  in-flight",
                "0     /dev/vdb  in-sync  1200   0         0          0",
                "1     /dev/vdc  failed   1201   0         3          0",
                "regions: 256 x 4 MiB, 256 in sync, 2 dirty",
                "resync:  idle",
                "scrub:   idle, never run",
                "missing: slot 1 (/dev/vdc): failed: an I/O error or fail-leg while running",
                "note:    /dev/vdd is not a member of this mirror",
            ]
        );
    }

    #[test]
    fn running_resync_and_scrub_show_progress() {
        let mut s = status(
            vec![
                leg(0, "/dev/vdb", "in-sync", 0),
                leg(1, "/dev/vdc", "recovering", 0),
            ],
            false,
            120,
        );
        s["regions"]["recovering"] = 4.into();
        s["resync"] = json!({ "active": true, "regions_done": 120, "regions_total": 256,
                              "rate_bytes_per_sec": 12_345_678, "eta_seconds": 11 });
        s["scrub"] = json!({ "mode": "repair", "regions_checked": 10, "regions_skipped": 0,
                             "next_region": 10, "total": 256, "mismatches": 1 });
        let lines = status_lines(&s);
        assert_eq!(lines[0], "state:   recovering, 1 of 2 legs in sync");
        assert_eq!(
            lines[4],
            "regions: 256 x 4 MiB, 120 in sync, 2 dirty, 136 out of sync, 4 recovering"
        );
        assert_eq!(
            lines[5],
            "resync:  120/256 regions (46%), 12.3 MB/s, eta 11s"
        );
        assert_eq!(
            lines[6],
            "scrub:   repair, 10/256 regions (3%), 1 mismatches"
        );
        assert_eq!(lines.len(), 7);
    }

    #[test]
    fn a_partial_status_reads_as_unknown_not_a_panic() {
        let lines = status_lines(&json!({ "legs": [{ "slot": 0 }] }));
        assert_eq!(lines[0], "state:   recovering, 0 of 1 legs in sync");
        assert_eq!(
            lines[2],
            "0     ?       ?      ?      ?         ?          ?"
        );
        assert_eq!(lines[3], "regions: ? x ?, ? in sync, ? dirty");
        assert!(status_lines(&Value::Null).len() >= 5);
    }

    #[test]
    fn region_sizes_read_in_binary_units() {
        assert_eq!(pow2_size_text(512 * 1024), "512 KiB");
        assert_eq!(pow2_size_text(4 << 20), "4 MiB");
        assert_eq!(pow2_size_text(1 << 30), "1 GiB");
        assert_eq!(pow2_size_text(1536), "1536 B");
    }

    #[test]
    fn fail_and_remove_name_the_leg_and_the_mirror_left() {
        let fail = MirrorCommand::FailLeg {
            id: 0,
            slot: 1,
            json: false,
        };
        assert_eq!(
            command_line(&fail, &json!({ "failed": 1 }), &Value::Null, &degraded()),
            "leg 1 (/dev/vdc) marked failed; mirror 0 is degraded (1 of 2 legs in sync)"
        );
        let remove = MirrorCommand::RemoveLeg {
            id: 0,
            slot: 1,
            json: false,
        };
        let mut after = healthy();
        after["legs"].as_array_mut().unwrap().pop();
        assert_eq!(
            command_line(&remove, &json!({ "removed": 1 }), &degraded(), &after),
            "leg 1 (/dev/vdc) removed from mirror 0; mirror 0 has 1 of 1 legs in sync"
        );
        assert_eq!(
            command_line(
                &remove,
                &json!({ "removed": 1 }),
                &Value::Null,
                &Value::Null
            ),
            "leg 1 removed from mirror 0; see 'ublkdm status 0'"
        );
    }

    #[test]
    fn add_and_replace_say_how_much_resyncs() {
        let add = MirrorCommand::AddLeg {
            id: 0,
            device: PathBuf::from("/dev/vdd"),
            force: false,
            leg_options: None,
            json: false,
        };
        let mut after = status(
            vec![
                leg(0, "/dev/vdb", "in-sync", 0),
                leg(1, "/dev/vdc", "in-sync", 0),
                leg(2, "/dev/vdd", "recovering", 0),
            ],
            false,
            1,
        );
        assert_eq!(
            command_line(&add, &json!({ "added": 2 }), &Value::Null, &after),
            "leg 2 (/dev/vdd) added to mirror 0; resync of 255 of 256 regions started"
        );
        after["regions"]["in_sync"] = 250.into();
        after["resync"] = json!({ "active": true, "regions_done": 4, "regions_total": 10,
                                  "rate_bytes_per_sec": 0, "eta_seconds": null });
        assert_eq!(
            command_line(&add, &json!({ "added": 2 }), &Value::Null, &after),
            "leg 2 (/dev/vdd) added to mirror 0; resync of 10 of 256 regions started"
        );
        after["regions"]["in_sync"] = 256.into();
        after["resync"]["active"] = false.into();
        assert_eq!(
            command_line(&add, &json!({ "added": 2 }), &Value::Null, &after),
            "leg 2 (/dev/vdd) added to mirror 0; nothing left to resync"
        );
        let replace = MirrorCommand::ReplaceLeg {
            id: 3,
            slot: 1,
            device: PathBuf::from("/dev/vdd"),
            force: false,
            leg_options: None,
            json: false,
        };
        let mut after = healthy();
        after["legs"][1] = leg(1, "/dev/vdd", "recovering", 0);
        after["regions"]["in_sync"] = 0.into();
        assert_eq!(
            command_line(&replace, &json!({ "replaced": 1 }), &degraded(), &after),
            "leg 1 (/dev/vdc) replaced by /dev/vdd in mirror 3; \
             resync of 256 of 256 regions started"
        );
    }

    #[test]
    fn scrub_says_what_runs_and_how_to_follow_it() {
        let scrub = MirrorCommand::Scrub {
            id: 0,
            repair: false,
            json: false,
        };
        assert_eq!(
            command_line(
                &scrub,
                &json!({ "scrub": "check" }),
                &Value::Null,
                &healthy()
            ),
            "scrub of mirror 0 started (check, 256 regions); \
             follow with 'ublkdm status 0 --watch'"
        );
    }

    #[test]
    fn grow_says_from_what_size_to_what_and_that_the_new_area_resyncs() {
        let grow = MirrorCommand::Grow { id: 2, json: false };
        let reply = json!({
            "old_size_sectors": 31 * 2048,
            "size_sectors": 63 * 2048,
            "region_size_sectors": 1024,
            "resync_regions": 64,
        });
        assert_eq!(
            command_line(&grow, &reply, &Value::Null, &healthy()),
            "mirror 2 grown from 31 MiB to 63 MiB; resyncing the new area (64 regions); \
             follow with 'ublkdm status 2 --watch'"
        );
        // A partial reply reads as unknown, never a panic.
        assert!(command_line(&grow, &json!({}), &Value::Null, &Value::Null).contains("from ? MiB"));
    }
}
