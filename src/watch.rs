//! `ublkdm status ID --watch`: live progress of a target's background work.
//!
//! Targets report background work in their status under well-known keys, each an object with
//! the work's progress: `resync` (`active`, `regions_done`, `regions_total`,
//! `rate_bytes_per_sec`, `eta_seconds`), `scrub` (present while one runs: `mode`,
//! `next_region`, `total`, `mismatches`) and `merge` (`active`, `done`, `total`). This polls
//! the daemon and draws one progress bar per piece of work (plain lines when stderr is not a
//! terminal) until none is active. Every wait is bounded by the control socket's timeouts.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::control::{self, Command};
use crate::error::Result;

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(500);
/// How often a plain (non-terminal) progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// One piece of background work, as read from a status.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub label: &'static str,
    /// What `done` and `total` count: regions, or chunks.
    pub unit: &'static str,
    pub done: u64,
    pub total: u64,
    pub detail: String,
}

/// The background work that `target_status` shows as running.
pub fn active_work(target_status: &Value) -> Vec<Progress> {
    let mut work = Vec::new();
    let resync = &target_status["resync"];
    if resync["active"].as_bool() == Some(true) {
        let rate = resync["rate_bytes_per_sec"].as_u64().unwrap_or(0);
        let eta = resync["eta_seconds"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        work.push(Progress {
            label: "resync",
            unit: "regions",
            done: resync["regions_done"].as_u64().unwrap_or(0),
            total: resync["regions_total"].as_u64().unwrap_or(0),
            detail: format!("{:.1} MB/s, eta {eta}", rate as f64 / 1e6),
        });
    }
    let scrub = &target_status["scrub"];
    if scrub.is_object() {
        work.push(Progress {
            label: "scrub",
            unit: "regions",
            done: scrub["next_region"].as_u64().unwrap_or(0),
            total: scrub["total"].as_u64().unwrap_or(0),
            detail: format!(
                "{}, {} mismatches",
                scrub["mode"].as_str().unwrap_or("check"),
                scrub["mismatches"].as_u64().unwrap_or(0)
            ),
        });
    }
    let merge = &target_status["merge"];
    if merge["active"].as_bool() == Some(true) {
        work.push(Progress {
            label: "merge",
            unit: "chunks",
            done: merge["done"].as_u64().unwrap_or(0),
            total: merge["total"].as_u64().unwrap_or(0),
            detail: String::new(),
        });
    }
    work
}

/// Follows device `id`'s background work until none runs.
pub fn watch(id: u32) -> Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let mut shown: BTreeMap<&'static str, ProgressBar> = BTreeMap::new();
    let mut last_plain = Instant::now() - PLAIN_EVERY;
    loop {
        let status = control::request(id, Command::Status)?;
        let work = active_work(&status["target"]["status"]);
        if work.is_empty() {
            for bar in shown.values() {
                bar.finish();
            }
            println!("device {id}: no resync, scrub or merge running");
            return Ok(());
        }
        if terminal {
            draw(&bars, &mut shown, &work);
        } else if last_plain.elapsed() >= PLAIN_EVERY {
            for p in &work {
                let detail = if p.detail.is_empty() {
                    String::new()
                } else {
                    format!(", {}", p.detail)
                };
                println!("{}: {}/{} {}{detail}", p.label, p.done, p.total, p.unit);
            }
            last_plain = Instant::now();
        }
        std::thread::sleep(POLL);
    }
}

fn draw(bars: &MultiProgress, shown: &mut BTreeMap<&'static str, ProgressBar>, work: &[Progress]) {
    for p in work {
        let bar = shown.entry(p.label).or_insert_with(|| {
            let template = format!(
                "{{prefix:>7}} [{{bar:40}}] {{pos}}/{{len}} {} {{msg}}",
                p.unit
            );
            let style = ProgressStyle::with_template(&template)
                .expect("progress template")
                .progress_chars("=> ");
            let bar = bars.add(ProgressBar::new(p.total));
            bar.set_style(style);
            bar.set_prefix(p.label);
            bar
        });
        bar.set_length(p.total);
        bar.set_position(p.done.min(p.total));
        bar.set_message(p.detail.clone());
    }
    for (label, bar) in shown.iter() {
        if !work.iter().any(|p| p.label == *label) && !bar.is_finished() {
            bar.finish_with_message("done");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_resync_and_scrub_progress() {
        let status = json!({
            "resync": { "active": true, "regions_done": 3, "regions_total": 10,
                        "rate_bytes_per_sec": 2_000_000, "eta_seconds": 7 },
            "scrub": { "mode": "repair", "next_region": 5, "total": 10, "mismatches": 1 },
        });
        let work = active_work(&status);
        assert_eq!(work.len(), 2);
        assert_eq!(
            (work[0].label, work[0].done, work[0].total),
            ("resync", 3, 10)
        );
        assert_eq!(work[0].detail, "2.0 MB/s, eta 7s");
        assert_eq!(work[1].detail, "repair, 1 mismatches");
    }

    #[test]
    fn idle_status_has_no_work() {
        let status = json!({ "resync": { "active": false }, "scrub": null });
        assert!(active_work(&status).is_empty());
    }
}
