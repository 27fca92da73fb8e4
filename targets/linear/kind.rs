//! The linear kind: its spec (persisted for `recover`) and its `add linear` arguments.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, FromArgMatches};

use super::Linear;
use crate::error::Result;
use crate::registry::TargetKind;
use crate::target::{Target, TargetSpec};

/// The kind's name.
pub const NAME: &str = "linear";

/// What a linear device is built from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinearSpec {
    /// The backing device (or file), absolute.
    pub device: PathBuf,
}

/// `ublkdm add linear DEV`.
#[derive(Debug, Args)]
pub struct AddLinear {
    /// The backing block device (or regular file).
    pub device: PathBuf,
}

/// The linear target's [`TargetKind`].
pub struct LinearKind;

impl TargetKind for LinearKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn add_command(&self) -> clap::Command {
        AddLinear::augment_args(
            clap::Command::new(NAME).about("Pass-through onto one block device or file."),
        )
    }

    fn add_spec(&self, args: &clap::ArgMatches) -> Result<TargetSpec> {
        let args = AddLinear::from_arg_matches(args).map_err(crate::cli::clap_error)?;
        let spec = LinearSpec {
            device: crate::cli::absolute(args.device)?,
        };
        Ok(TargetSpec::new(NAME, &spec))
    }

    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        let spec: LinearSpec = spec.parse()?;
        Ok(Arc::new(Linear::open(&spec.device)?))
    }

    fn describe(&self, spec: &TargetSpec) -> String {
        match spec.parse::<LinearSpec>() {
            Ok(spec) => format!("{NAME} {}", spec.device.display()),
            Err(_) => format!("{NAME} (unreadable spec)"),
        }
    }
}
