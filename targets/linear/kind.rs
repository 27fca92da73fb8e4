//! The linear kind: its spec (persisted for `recover`), its `add linear` arguments and its
//! line in `ublkdm status`.

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
    /// The size served, in sectors, when `resize ID SIZE` asked for one; absent: all of the
    /// backing device (every spec stored before online resize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_sectors: Option<u64>,
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
            size_sectors: None,
        };
        Ok(TargetSpec::new(NAME, &spec))
    }

    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        let spec: LinearSpec = spec.parse()?;
        let size = spec.size_sectors.map(crate::units::SectorCount);
        Ok(Arc::new(Linear::open_sized(&spec.device, size)?))
    }

    fn describe(&self, spec: &TargetSpec) -> String {
        match spec.parse::<LinearSpec>() {
            Ok(spec) => format!("{NAME} {}", spec.device.display()),
            Err(_) => format!("{NAME} (unreadable spec)"),
        }
    }

    fn status_lines(&self, status: &serde_json::Value) -> Vec<String> {
        vec![backing_line(status)]
    }
}

/// The backing device and what it offers, in one line: `backing: /dev/vda, 512 B logical /
/// 4096 B physical blocks; volatile cache, discard, write-zeroes`. A field the status lacks
/// reads as `?` (the JSON is the daemon's answer, not trusted to be complete).
fn backing_line(status: &serde_json::Value) -> String {
    let number = |key: &str| {
        status[key]
            .as_u64()
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    let features: Vec<&str> = [
        ("volatile_cache", "volatile cache"),
        ("fua", "FUA"),
        ("discard", "discard"),
        ("write_zeroes", "write-zeroes"),
    ]
    .into_iter()
    .filter(|(key, _)| status[*key].as_bool() == Some(true))
    .map(|(_, shown)| shown)
    .collect();
    format!(
        "backing: {}, {} B logical / {} B physical blocks; {}",
        status["device"].as_str().unwrap_or("?"),
        number("logical_block_bytes"),
        number("physical_block_bytes"),
        if features.is_empty() {
            "no cache, FUA, discard or write-zeroes".to_owned()
        } else {
            features.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_backing_device_reads_in_one_line() {
        let status = json!({
            "device": "/dev/vda", "size_sectors": 524288, "logical_block_bytes": 512,
            "physical_block_bytes": 4096, "discard": true, "write_zeroes": true,
            "volatile_cache": true, "fua": false,
        });
        assert_eq!(
            LinearKind.status_lines(&status),
            [
                "backing: /dev/vda, 512 B logical / 4096 B physical blocks; volatile cache, \
              discard, write-zeroes"
            ]
        );
        assert_eq!(
            backing_line(&json!({})),
            "backing: ?, ? B logical / ? B physical blocks; no cache, FUA, discard or \
             write-zeroes"
        );
    }
}
