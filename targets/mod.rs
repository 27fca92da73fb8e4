//! The targets, compiled into the core library as modules (see the README's architecture
//! section): each builds a [`crate::target::Target`] from a [`crate::target::TargetSpec`].
//!
//! [`open_target`] is the one place that maps a spec to its implementation, so the daemon (for
//! `add`) and recovery (for `recover`, from the spec stored with the device) build exactly the
//! same target. [`scan`] is the targets' side of `ublkdm assemble --scan`: what each target
//! finds on the machine's block devices, with the spec to serve it.

pub mod linear;
pub mod mirror;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::target::{Target, TargetSpec};

/// Builds the target `spec` describes, opening its devices.
pub fn open_target(spec: &TargetSpec) -> Result<Arc<dyn Target>> {
    match spec {
        TargetSpec::Linear { device } => Ok(Arc::new(linear::Linear::open(device)?)),
        TargetSpec::Mirror { .. } => mirror::open_mirror(spec),
        TargetSpec::Origin { .. } => Ok(snapshot::open_group(spec)?.origin()),
        TargetSpec::Child { parent, kind, name } => Err(Error::invalid(format!(
            "{kind} '{name}' is served by the daemon of device {parent}, not on its own"
        ))),
    }
}

/// Something a target found on the machine's block devices, for `assemble --scan`.
#[derive(Debug)]
pub struct Discovered {
    /// The target kind, e.g. `mirror`.
    pub kind: &'static str,
    /// What identifies it (a mirror's UUID): compared with [`TargetSpec::identity`] of the
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
#[derive(Debug)]
pub struct ScanReport {
    /// Devices probed.
    pub probed: usize,
    pub found: Vec<Discovered>,
}

/// Probes the machine's block devices for every target that records an identity on its
/// devices. Only mirrors do: a snapshot origin's device carries nothing of ours, and its COW
/// store does not record which device is its origin, so origins are not found by a scan.
pub fn scan() -> ScanReport {
    mirror::discover::scan()
}
