//! What a person reads: the origin's part of `ublkdm status` (a compact report, as `lvs`
//! and `/proc/mdstat` give) and the human lines of `ublkdm snapshot deactivate|delete|merge`.
//!
//! Everything here reads the JSON the daemon answered with ([`super::commands`] makes it);
//! it never changes that JSON, so `--json` output stays the daemon's. A field missing from an
//! older daemon's answer shows as `?`, never as a panic.

use serde_json::Value;

use crate::cli::{pow2_size_text, text};

/// The origin's status in lines (the caller indents them): the COW store and its UUID, a flag
/// when its metadata could not be written, the snapshots as a table (invalid ones flagged
/// with their reason) and the merge.
pub fn status_lines(status: &Value) -> Vec<String> {
    if !status.is_object() {
        return crate::registry::generic_status_lines(status);
    }
    let mut lines = vec![
        store_line(status),
        format!("uuid:      {}", status["uuid"].as_str().unwrap_or("?")),
    ];
    if status["metadata_failed"].as_bool() == Some(true) {
        lines.push(
            "metadata:  a log write FAILED: the snapshots are invalid; origin writes first \
             retry the log"
                .to_owned(),
        );
    }
    lines.extend(snapshot_lines(&status["snapshots"]));
    lines.push(merge_line(&status["merge"]));
    lines
}

/// `store:     1452 of 4064 chunks used (36%), 2612 free, chunk 16 KiB`, with `FULL` when no
/// chunk is free (the next copy-on-write invalidates snapshots).
fn store_line(status: &Value) -> String {
    let cow = &status["cow"];
    let (used, total) = (cow["used"].as_u64(), cow["chunks"].as_u64());
    let share = match (used, total) {
        (Some(used), Some(total)) => format!(" ({})", percent(used, total)),
        _ => String::new(),
    };
    let full = if cow["free"].as_u64() == Some(0) {
        " FULL"
    } else {
        ""
    };
    let chunk = status["chunk_sectors"]
        .as_u64()
        .and_then(|s| s.checked_mul(crate::units::SECTOR_BYTES))
        .map_or_else(|| "?".to_owned(), pow2_size_text);
    format!(
        "store:     {} of {} chunks used{share}, {} free{full}, chunk {chunk}",
        number(&cow["used"]),
        number(&cow["chunks"]),
        number(&cow["free"]),
    )
}

/// `snapshots: N`, then a table of them (in creation order, as the daemon lists them), with
/// whether each is active (served as a device).
fn snapshot_lines(snapshots: &Value) -> Vec<String> {
    let snaps = snapshots.as_array().map(Vec::as_slice).unwrap_or_default();
    if snaps.is_empty() {
        return vec!["snapshots: none".to_owned()];
    }
    let invalid = snaps.iter().filter(|s| s["state"] == "invalid").count();
    let mut head = format!("snapshots: {}", snaps.len());
    if invalid > 0 {
        head.push_str(&format!(" ({invalid} INVALID)"));
    }
    let width = snaps
        .iter()
        .map(|s| text(&s["name"]).chars().count())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut lines = vec![
        head,
        format!(
            "  {:<width$}  {:<8}  {:<6}  {:>10}  {:>7}  NOTE",
            "NAME", "STATE", "ACTIVE", "EXCEPTIONS", "CREATED"
        ),
    ];
    for snap in snaps {
        let (state, note) = match snap["state"].as_str() {
            Some("invalid") => ("INVALID", text(&snap["reason"])),
            Some(state) => (state, String::new()),
            None => ("?", String::new()),
        };
        let active = match snap["active"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let row = format!(
            "  {:<width$}  {state:<8}  {active:<6}  {:>10}  {:>7}  {note}",
            text(&snap["name"]),
            number(&snap["exceptions"]),
            number(&snap["created"]),
        );
        lines.push(row.trim_end().to_owned());
    }
    lines
}

/// `merge:     idle`, or `merge:     s1, 300/700 chunks (43%)` with the error that stalls it.
fn merge_line(merge: &Value) -> String {
    if merge["active"].as_bool() != Some(true) {
        return "merge:     idle".to_owned();
    }
    let mut line = format!(
        "merge:     {}, {}/{} chunks",
        text(&merge["snapshot"]),
        number(&merge["done"]),
        number(&merge["total"])
    );
    if let (Some(done), Some(total)) = (merge["done"].as_u64(), merge["total"].as_u64()) {
        line.push_str(&format!(" ({})", percent(done, total)));
    }
    if let Some(error) = merge["error"].as_str() {
        line.push_str(&format!(", STALLED: {error}"));
    }
    line
}

/// A count from the status, `?` when missing.
fn number(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// `part` of `whole` in whole percent, rounded, but never 0% of something nor 100% of less
/// than all.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".to_owned();
    }
    let rounded = (u128::from(part) * 100 + u128::from(whole) / 2) / u128::from(whole);
    let shown = match rounded {
        0 if part > 0 => 1,
        100 if part < whole => 99,
        n => n,
    };
    format!("{shown}%")
}

/// The line `ublkdm snapshot delete` prints: `snapshot s1 (/dev/ublkb3) deleted from
/// origin 0`.
pub fn deleted_line(name: &str, device: Option<&str>, origin: u32) -> String {
    format!("snapshot {name}{} deleted from origin {origin}", on(device))
}

/// The line `ublkdm snapshot deactivate` prints: `snapshot s1 (/dev/ublkb3) deactivated on
/// origin 0; the snapshot is kept`.
pub fn deactivated_line(name: &str, device: Option<&str>, origin: u32) -> String {
    format!(
        "snapshot {name}{} deactivated on origin {origin}; the snapshot is kept",
        on(device)
    )
}

/// The line `ublkdm snapshot merge` prints, from the daemon's reply.
pub fn merging_line(reply: &Value, device: Option<&str>, origin: u32) -> String {
    format!(
        "snapshot {}{} is merging into origin {origin}: {} chunks to copy back; the origin \
         reads as the snapshot now; follow with 'ublkdm status {origin} --watch'",
        text(&reply["merging"]),
        on(device),
        number(&reply["total"]),
    )
}

/// ` (/dev/ublkb3)` for a snapshot served by a device, nothing otherwise.
fn on(device: Option<&str>) -> String {
    device.map_or_else(String::new, |d| format!(" ({d})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An origin status as the daemon builds it (`Inner::status`).
    fn status(snapshots: Value, merge: Value, used: u64, metadata_failed: bool) -> Value {
        json!({
            "target": "snapshot-origin",
            "uuid": "6f1c2a9e-0b7d-4e8a-9c11-2d3f4a5b6c7d",
            "chunk_sectors": 32,
            "origin_sectors": 524288,
            "cow": {
                "chunks": 4064,
                "used": used,
                "free": 4064 - used,
                "used_bytes": used * 16384,
                "free_bytes": (4064 - used) * 16384,
            },
            "exceptions": 0,
            "metadata_failed": metadata_failed,
            "snapshots": snapshots,
            "merge": merge,
        })
    }

    fn idle() -> Value {
        json!({ "active": false, "done": 0, "total": 0 })
    }

    #[test]
    fn an_origin_without_snapshots() {
        let lines = status_lines(&status(json!([]), idle(), 0, false));
        assert_eq!(
            lines,
            [
                "store:     0 of 4064 chunks used (0%), 4064 free, chunk 16 KiB",
                "uuid:      6f1c2a9e-0b7d-4e8a-9c11-2d3f4a5b6c7d",
                "snapshots: none",
                "merge:     idle",
            ]
        );
    }

    #[test]
    fn two_snapshots_one_merging() {
        let snapshots = json!([
            { "name": "nightly", "state": "merging", "exceptions": 400, "created": 1,
              "active": false },
            { "name": "s2", "state": "valid", "exceptions": 1052, "created": 2, "active": true },
        ]);
        let merge = json!({
            "active": true, "snapshot": "nightly", "done": 300, "total": 700, "error": null,
        });
        let lines = status_lines(&status(snapshots, merge, 1452, false));
        assert_eq!(
            lines,
            [
                "store:     1452 of 4064 chunks used (36%), 2612 free, chunk 16 KiB",
                "uuid:      6f1c2a9e-0b7d-4e8a-9c11-2d3f4a5b6c7d",
                "snapshots: 2",
                "  NAME     STATE     ACTIVE  EXCEPTIONS  CREATED  NOTE",
                "  nightly  merging   no             400        1",
                "  s2       valid     yes           1052        2",
                "merge:     nightly, 300/700 chunks (43%)",
            ]
        );
    }

    #[test]
    fn an_overflowed_store_flags_its_snapshots() {
        let snapshots = json!([
            { "name": "s1", "state": "invalid", "exceptions": 0, "created": 1,
              "reason": "the COW store overflowed" },
            { "name": "s2", "state": "valid", "exceptions": 4064, "created": 2 },
        ]);
        let lines = status_lines(&status(snapshots, idle(), 4064, true));
        assert_eq!(
            lines,
            [
                "store:     4064 of 4064 chunks used (100%), 0 free FULL, chunk 16 KiB",
                "uuid:      6f1c2a9e-0b7d-4e8a-9c11-2d3f4a5b6c7d",
                "metadata:  a log write FAILED: the snapshots are invalid; origin writes first \
                 retry the log",
                "snapshots: 2 (1 INVALID)",
                "  NAME  STATE     ACTIVE  EXCEPTIONS  CREATED  NOTE",
                "  s1    INVALID   ?                0        1  the COW store overflowed",
                "  s2    valid     ?             4064        2",
                "merge:     idle",
            ]
        );
    }

    #[test]
    fn a_stalled_merge_says_why() {
        let merge = json!({
            "active": true, "snapshot": "s1", "done": 0, "total": 9, "error": "cannot read",
        });
        assert_eq!(
            merge_line(&merge),
            "merge:     s1, 0/9 chunks (0%), STALLED: cannot read"
        );
    }

    #[test]
    fn a_status_with_missing_fields_still_reads() {
        let lines = status_lines(&json!({}));
        assert_eq!(
            lines,
            [
                "store:     ? of ? chunks used, ? free, chunk ?",
                "uuid:      ?",
                "snapshots: none",
                "merge:     idle",
            ]
        );
    }

    #[test]
    fn percentages_and_sizes_read_well() {
        assert_eq!(percent(1, 4064), "1%");
        assert_eq!(percent(4063, 4064), "99%");
        assert_eq!(percent(4064, 4064), "100%");
        assert_eq!(percent(0, 0), "0%");
        assert_eq!(pow2_size_text(16384), "16 KiB");
        assert_eq!(pow2_size_text(1 << 20), "1 MiB");
    }

    #[test]
    fn command_lines_read_well() {
        assert_eq!(
            deleted_line("s1", Some("/dev/ublkb3"), 0),
            "snapshot s1 (/dev/ublkb3) deleted from origin 0"
        );
        assert_eq!(
            deleted_line("s1", None, 2),
            "snapshot s1 deleted from origin 2"
        );
        assert_eq!(
            merging_line(
                &json!({ "merging": "s1", "total": 700 }),
                Some("/dev/ublkb3"),
                0
            ),
            "snapshot s1 (/dev/ublkb3) is merging into origin 0: 700 chunks to copy back; the \
             origin reads as the snapshot now; follow with 'ublkdm status 0 --watch'"
        );
    }
}
