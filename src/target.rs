//! The seam between the ublk front end and the targets.
//!
//! A target is a [`BlockDevice`] (so targets compose, and the front end serves any of them)
//! plus what a device-mapper target adds: a kind, a status, and runtime commands from the
//! control socket. The front end never knows which target it serves; targets never see ublk.
//!
//! [`TargetSpec`] is what `ublkdm add` was asked for. It is stored with the ublk device so
//! that `ublkdm recover` can rebuild the same target after the daemon died.
//!
//! A target may have *children*: further devices its daemon serves beside it, such as the
//! snapshots of an origin. The target says which exist ([`Target::child_names`]) and builds
//! them ([`Target::open_child`]); the daemon serves exactly that set, reconciling it after
//! every command, and stops a child's device before a command that removes it
//! ([`Target::command_releases`]).

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::{BlockDevice, IoFuture};
use crate::error::{Error, ErrorKind, Result};

/// A block device served through ublk, with device-mapper-style control.
pub trait Target: BlockDevice {
    /// The target's kind, e.g. `linear` or `mirror`.
    fn kind(&self) -> &'static str;

    /// The target's state for `ublkdm status`: a JSON object.
    fn status(&self) -> serde_json::Value;

    /// A target command such as `fail-leg` with its arguments; the reply is a JSON value.
    fn command(&self, name: &str, _args: &serde_json::Value) -> Result<serde_json::Value> {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("the {} target has no command '{name}'", self.kind()),
        ))
    }

    /// Called once before the daemon exits in an orderly way: persist what must be persisted.
    fn shutdown(&self) -> IoFuture<std::io::Result<()>> {
        self.flush()
    }

    /// The children to serve beside this target, by name, in a stable order.
    fn child_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Builds the child `name` (one of [`Target::child_names`]).
    fn open_child(&self, name: &str) -> Result<Arc<dyn Target>> {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("the {} target has no child '{name}'", self.kind()),
        ))
    }

    /// The spec that rebuilds this target as it is now, given the one it was built from: a
    /// target whose devices change at run time (a mirror's legs) or that gains an identity
    /// when it is created says so here; the daemon stores the result after every command.
    fn spec(&self, built_from: &TargetSpec) -> TargetSpec {
        built_from.clone()
    }

    /// The children command `name` removes or makes unusable: their devices are stopped (and
    /// must not be in use) before it runs.
    fn command_releases(&self, _name: &str, _args: &serde_json::Value) -> Vec<String> {
        Vec::new()
    }
}

/// What to build: the arguments of `ublkdm add`, persisted for `recover`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "target", rename_all = "lowercase")]
pub enum TargetSpec {
    /// Pass-through onto one backing device.
    Linear { device: PathBuf },
    /// An N-way mirror (`targets/mirror`): created on blank legs, assembled from legs that
    /// already hold it.
    Mirror {
        /// The mirror's identity, once it exists: legs are found by the superblocks that carry
        /// it, wherever their paths now point (`legs` are then only hints). Absent in specs
        /// stored before identities were recorded, and in a new `add mirror`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uuid: Option<uuid::Uuid>,
        /// The legs' paths: what `add` was given, then the legs the mirror has now.
        legs: Vec<PathBuf>,
        /// Region size in sectors; 0 picks the default.
        #[serde(default)]
        region_size_sectors: u64,
        /// Skip the initial copy of a new mirror.
        #[serde(default)]
        nosync: bool,
        /// Overwrite legs that carry other metadata.
        #[serde(default)]
        force: bool,
        /// Resync bandwidth: the floor kept under foreground I/O and the ceiling when idle.
        #[serde(default)]
        resync_throttle: crate::copy::ThrottleConfig,
    },
    /// A snapshot origin with its COW store (`targets/snapshot`): the store is created on a
    /// blank COW device and reassembled from one that holds it.
    Origin {
        device: PathBuf,
        cow: PathBuf,
        /// Chunk size in sectors for a new store; 0 picks the default (16 KiB).
        #[serde(default)]
        chunk_size_sectors: u64,
        /// Create a store on a COW device that carries foreign metadata.
        #[serde(default)]
        force: bool,
    },
    /// A device served by the daemon of another device, `parent` (e.g. a snapshot served with
    /// its origin). Never opened on its own: recovering the parent brings it back.
    Child {
        parent: u32,
        /// The child's target kind, e.g. `snapshot`.
        kind: String,
        name: String,
    },
}

impl TargetSpec {
    /// The identity of what the spec serves, when it has one (a mirror's UUID): the same
    /// identity served twice would be one device behind two daemons.
    pub fn identity(&self) -> Option<String> {
        match self {
            TargetSpec::Mirror { uuid, .. } => uuid.map(|u| u.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(uuid: Option<uuid::Uuid>) -> TargetSpec {
        TargetSpec::Mirror {
            uuid,
            legs: vec!["/dev/vdb".into(), "/dev/vdc".into()],
            region_size_sectors: 1024,
            nosync: false,
            force: false,
            resync_throttle: Default::default(),
        }
    }

    #[test]
    fn a_mirror_spec_round_trips_with_its_uuid() {
        let uuid = uuid::Uuid::from_u128(0x1234_5678);
        let spec = mirror(Some(uuid));
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(json["uuid"], uuid.to_string());
        let back: TargetSpec = serde_json::from_value(json).expect("parse");
        assert_eq!(back, spec);
        assert_eq!(back.identity(), Some(uuid.to_string()));
    }

    #[test]
    fn a_mirror_spec_stored_before_identities_still_parses() {
        let old = serde_json::json!({
            "target": "mirror",
            "legs": ["/dev/vdb", "/dev/vdc"],
            "region_size_sectors": 1024,
            "nosync": false,
            "force": false,
        });
        let spec: TargetSpec = serde_json::from_value(old).expect("an old spec parses");
        assert_eq!(spec, mirror(None));
        assert_eq!(spec.identity(), None);
        let json = serde_json::to_value(&spec).expect("json");
        assert!(
            json.get("uuid").is_none(),
            "no uuid is written as none: {json}"
        );
    }
}
