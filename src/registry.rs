//! The registry of target kinds: how the core (CLI and daemon) reaches a target without naming
//! one.
//!
//! A [`TargetKind`] is everything the core needs to know about a kind of target: its name in
//! a [`TargetSpec`], how to open it, its `ublkdm add NAME` arguments, its `ublkdm NAME CMD`
//! command tree, how to describe its spec in a line, and optionally what it finds on the
//! machine for `assemble --scan`, and how to show its status to a person (`status_lines`, and
//! the background work `status --watch` follows). `main` builds the [`Registry`] from the targets and hands it
//! to the CLI, which hands it to the daemon. Invariant: kind names and command-tree names are
//! unique in a registry (asserted when registering).

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::text;
use crate::error::{Error, ErrorKind, Result};
use crate::target::{Target, TargetSpec};

/// One kind of target.
pub trait TargetKind: Send + Sync {
    /// The kind's name: the spec's `"target"` and `ublkdm add NAME`.
    fn name(&self) -> &'static str;

    /// The `ublkdm add NAME` subcommand: the kind's own arguments (the CLI adds the options
    /// every `add` has).
    fn add_command(&self) -> clap::Command;

    /// The spec `ublkdm add NAME` asked for, from the arguments of [`TargetKind::add_command`].
    fn add_spec(&self, args: &clap::ArgMatches) -> Result<TargetSpec>;

    /// Builds the target `spec` (of this kind) describes, opening its devices.
    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>>;

    /// `spec` in a line for `list` and `status`, e.g. `linear /dev/vdb`.
    fn describe(&self, spec: &TargetSpec) -> String;

    /// What `spec` serves, when it has an identity (a mirror's UUID): the same identity
    /// served twice would be one device behind two daemons.
    fn identity(&self, _spec: &TargetSpec) -> Option<String> {
        None
    }

    /// The `ublkdm NAME CMD ...` command tree of a kind with runtime commands (named as the
    /// user types it, e.g. `snapshot` for the `origin` kind).
    fn commands(&self) -> Option<clap::Command> {
        None
    }

    /// Runs a command of [`TargetKind::commands`] from its parsed arguments.
    fn run_command(&self, _registry: &Registry, _args: &clap::ArgMatches) -> Result<()> {
        Err(Error::invalid(format!(
            "the {} target has no commands",
            self.name()
        )))
    }

    /// After a daemon started device `id` of this kind: warn the user of what it found (a
    /// mirror running degraded). Never fails the start.
    fn after_start(&self, _id: u32) {}

    /// A child's share of its parent daemon's target status (`group`), shaped as the child's
    /// own target status.
    fn child_status(&self, _group: &serde_json::Value, name: &str) -> serde_json::Value {
        serde_json::json!({ "name": name, "state": "unknown" })
    }

    /// The target's part of `ublkdm status`, in lines a person scans at a glance (the caller
    /// indents them). `status` is the target status the daemon answered with (the same JSON
    /// `status --json` shows under `daemon_status.target.status`).
    fn status_lines(&self, status: &serde_json::Value) -> Vec<String> {
        generic_status_lines(status)
    }

    /// The background work `status` shows running (a resync, a merge), for `status --watch`.
    fn progress(&self, _status: &serde_json::Value) -> Vec<Progress> {
        Vec::new()
    }

    /// Probes the machine's block devices for targets of this kind (`assemble --scan`);
    /// `None` for a kind that records nothing on its devices to be found by.
    fn scan(&self) -> Option<Result<ScanReport>> {
        None
    }
}

/// One piece of background work, as a target reads it from its status.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// What runs, e.g. `resync`; unique in one status.
    pub label: &'static str,
    /// What `done` and `total` count: regions, or chunks.
    pub unit: &'static str,
    pub done: u64,
    pub total: u64,
    /// A short note after the counts, e.g. `2.0 MB/s, eta 7s`; may be empty.
    pub detail: String,
}

/// A target status as `key: value` lines, a list as its length and then one line per element:
/// for a target kind without a report of its own.
pub fn generic_status_lines(status: &serde_json::Value) -> Vec<String> {
    let Some(fields) = status.as_object() else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for (key, value) in fields {
        match value {
            serde_json::Value::Array(items) => {
                lines.push(format!("{key}: {}", items.len()));
                lines.extend(items.iter().map(|item| format!("  {}", list_item(item))));
            }
            _ => lines.push(format!("{key}: {}", text(value))),
        }
    }
    lines
}

/// One element of a status list: `name: key value, ...` for a named object.
pub fn list_item(item: &serde_json::Value) -> String {
    let Some(fields) = item.as_object() else {
        return text(item);
    };
    let rest: Vec<_> = fields
        .iter()
        .filter(|(key, _)| *key != "name")
        .map(|(key, value)| format!("{key} {}", text(value)))
        .collect();
    match fields.get("name") {
        Some(name) => format!("{}: {}", text(name), rest.join(", ")),
        None => rest.join(", "),
    }
}

/// Something a target found on the machine's block devices, for `assemble --scan`.
#[derive(Debug)]
pub struct Discovered {
    /// The target kind, e.g. `mirror`.
    pub kind: &'static str,
    /// What identifies it (a mirror's UUID): compared with [`Registry::identity`] of the
    /// devices already served, so that nothing is served twice.
    pub identity: String,
    /// The devices found, each with what it is (e.g. `slot 0`).
    pub found: Vec<(PathBuf, String)>,
    /// What is missing (e.g. a slot with no device found), one line each.
    pub missing: Vec<String>,
    /// Devices that carry the identity but are not used, and why, one line each.
    pub left_out: Vec<String>,
    /// The spec to serve it with, or why it must not be served.
    pub spec: Result<TargetSpec>,
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Devices probed.
    pub probed: usize,
    pub found: Vec<Discovered>,
}

/// The target kinds this binary serves.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn TargetKind>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a kind; its names must be new.
    pub fn with(mut self, kind: Box<dyn TargetKind>) -> Registry {
        assert!(
            self.find(kind.name()).is_none(),
            "target kind '{}' registered twice",
            kind.name()
        );
        if let Some(tree) = kind.commands() {
            assert!(
                self.find_commands(tree.get_name()).is_none(),
                "command tree '{}' registered twice",
                tree.get_name()
            );
        }
        self.kinds.push(kind);
        self
    }

    /// Every kind, in registration order.
    pub fn kinds(&self) -> impl Iterator<Item = &dyn TargetKind> {
        self.kinds.iter().map(|k| k.as_ref())
    }

    /// The kind named `name`.
    pub fn find(&self, name: &str) -> Option<&dyn TargetKind> {
        self.kinds().find(|k| k.name() == name)
    }

    /// The kind whose command tree is `ublkdm NAME ...`.
    pub fn find_commands(&self, name: &str) -> Option<&dyn TargetKind> {
        self.kinds()
            .find(|k| k.commands().is_some_and(|c| c.get_name() == name))
    }

    /// The kind of `spec`: an error for a kind this binary does not know.
    pub fn kind_of(&self, spec: &TargetSpec) -> Result<&dyn TargetKind> {
        self.find(spec.kind()).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("this ublkdm has no '{}' target", spec.kind()),
            )
        })
    }

    /// Builds the target `spec` describes: the one route from a spec to a target, so that
    /// `add` and `recover` build exactly the same target.
    pub fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        if let Some(child) = spec.as_child() {
            return Err(Error::invalid(format!(
                "{} '{}' is served by the daemon of device {}, not on its own",
                child.kind, child.name, child.parent
            )));
        }
        self.kind_of(spec)?.open(spec)
    }

    /// `spec` in a line; `-` for none.
    pub fn describe(&self, spec: Option<&TargetSpec>) -> String {
        let Some(spec) = spec else {
            return "-".to_owned();
        };
        if let Some(child) = spec.as_child() {
            return format!("{} '{}' of device {}", child.kind, child.name, child.parent);
        }
        match self.find(spec.kind()) {
            Some(kind) => kind.describe(spec),
            None => spec.kind().to_owned(),
        }
    }

    /// What `spec` serves, when it has an identity.
    pub fn identity(&self, spec: &TargetSpec) -> Option<String> {
        self.find(spec.kind())?.identity(spec)
    }

    /// The kind that answered a daemon status, if this binary has it: the kind its spec names
    /// (`spec.target`, e.g. `origin`), else the target's own name (`target.kind`, which may
    /// differ from its kind's: the origin calls itself `snapshot-origin`).
    pub fn kind_of_status(&self, status: &serde_json::Value) -> Option<&dyn TargetKind> {
        let named = |name: &serde_json::Value| name.as_str().and_then(|n| self.find(n));
        named(&status["spec"]["target"]).or_else(|| named(&status["target"]["kind"]))
    }

    /// The target part of a daemon status, in lines a person scans.
    pub fn status_lines(&self, status: &serde_json::Value) -> Vec<String> {
        let target = &status["target"]["status"];
        match self.kind_of_status(status) {
            Some(kind) => kind.status_lines(target),
            None => generic_status_lines(target),
        }
    }

    /// The background work a daemon status shows running.
    pub fn progress(&self, status: &serde_json::Value) -> Vec<Progress> {
        let target = &status["target"]["status"];
        self.kind_of_status(status)
            .map(|kind| kind.progress(target))
            .unwrap_or_default()
    }

    /// Every kind's scan, in one report.
    pub fn scan(&self) -> Result<ScanReport> {
        let mut report = ScanReport::default();
        for found in self.kinds().filter_map(|k| k.scan()) {
            let found = found?;
            report.probed += found.probed;
            report.found.extend(found.found);
        }
        Ok(report)
    }
}
