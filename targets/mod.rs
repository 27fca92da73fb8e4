//! The targets, compiled into the core library as modules (see the README's architecture
//! section): each builds a [`crate::target::Target`] from a [`crate::target::TargetSpec`].
//!
//! [`open_target`] is the one place that maps a spec to its implementation, so the daemon (for
//! `add`) and recovery (for `recover`, from the spec stored with the device) build exactly the
//! same target.

pub mod linear;
pub mod mirror;
pub mod snapshot;

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
