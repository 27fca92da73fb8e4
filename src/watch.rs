//! `ublkdm status ID --watch`: live progress of a target's background work.
//!
//! The device's target kind reads its background work from its own status
//! ([`TargetKind::progress`](crate::registry::TargetKind::progress)): this names no status
//! key. It polls the daemon and draws one progress bar per piece of work (plain lines when
//! stderr is not a terminal) until none is active. Every wait is bounded by the control
//! socket's timeouts.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::control::{self, Command};
use crate::error::Result;
use crate::registry::{Progress, Registry};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(500);
/// How often a plain (non-terminal) progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Follows device `id`'s background work until none runs.
pub fn watch(registry: &Registry, id: u32) -> Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let mut shown: BTreeMap<&'static str, ProgressBar> = BTreeMap::new();
    let mut last_plain = Instant::now() - PLAIN_EVERY;
    loop {
        let status = control::request(id, Command::Status)?;
        let work = registry.progress(&status);
        if work.is_empty() {
            for bar in shown.values() {
                bar.finish();
            }
            println!("device {id}: no background work running");
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
