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

use std::sync::Arc;

use crate::device::{BlockDevice, IoFuture};
use crate::error::{Error, ErrorKind, Result};
use crate::units::SectorCount;

/// A block device served through ublk, with device-mapper-style control.
pub trait Target: BlockDevice {
    /// The target's kind, e.g. `linear` or `mirror`.
    fn kind(&self) -> &'static str;

    /// The target's state for `ublkdm status`: a JSON object.
    fn status(&self) -> serde_json::Value;

    /// Whether the target never needs a request's data in memory of ours: it passes
    /// registered buffers on ([`BlockDevice::read_buf`] / `write_buf`), so its device is
    /// created in zero copy where the kernel offers it (a request it cannot serve so falls
    /// back to copy mode alone). Copy mode by default.
    fn zero_copy(&self) -> bool {
        false
    }

    /// Grows the target to `to`, or, given `None`, to all that its devices now hold (a backing
    /// device that was extended, mirror legs that were all replaced by bigger ones), and
    /// returns the new size ([`BlockDevice::size`] from then on). Shrinking is refused
    /// (InvalidArgument), and so is growing a target that cannot grow (the default). The
    /// daemon calls it only when the kernel can resize a live device (`UBLK_F_UPDATE_SIZE`),
    /// then tells the kernel the new size. What it changes on disk is persisted before it
    /// returns.
    fn resize(&self, _to: Option<SectorCount>) -> Result<SectorCount> {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("a {} device cannot be resized", self.kind()),
        ))
    }

    /// Whether command `name` may grow the target (a mirror's `grow`): the daemon refuses it,
    /// before it runs, on a kernel that cannot resize a live device, as it does `resize`.
    fn command_grows(&self, _name: &str, _args: &serde_json::Value) -> bool {
        false
    }

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

    /// Whether command `name` must not run while this target's own device is open anywhere
    /// (mounted, or open in a process): `Some(how to proceed)` when so. The daemon refuses it
    /// then (Busy), and holds the device exclusively while it runs.
    fn command_needs_closed(&self, _name: &str, _args: &serde_json::Value) -> Option<String> {
        None
    }

    /// The children command `name` removes or makes unusable: their devices are stopped (and
    /// must not be in use) before it runs.
    fn command_releases(&self, _name: &str, _args: &serde_json::Value) -> Vec<String> {
        Vec::new()
    }

    /// What a command that named child `name` (made it, or asked for its device) says when
    /// the child's device did not start: what took effect and how to go on.
    fn child_not_started(&self, name: &str) -> String {
        format!("'{name}' was made but its device did not start (the next command tries again)")
    }
}

/// What to build: the arguments of `ublkdm add`, persisted for `recover`.
///
/// An opaque envelope: the target's kind and the target's own spec (a JSON object that only
/// the target reads, through [`TargetSpec::parse`]). It serialises as the target's object with
/// the kind under `"target"`, e.g. `{"target":"linear","device":"/dev/vdb"}`: the format every
/// stored spec has had. The kind `child` belongs to the core ([`ChildSpec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    kind: String,
    body: serde_json::Map<String, serde_json::Value>,
}

/// The key that names the kind in a serialised spec.
const KIND_KEY: &str = "target";

impl TargetSpec {
    /// The spec of a target of `kind` from the target's own spec struct.
    pub fn new<S: serde::Serialize>(kind: &str, spec: &S) -> TargetSpec {
        let body = match serde_json::to_value(spec).expect("a spec serialises") {
            serde_json::Value::Object(body) => body,
            other => panic!("a {kind} spec must serialise to an object, not {other}"),
        };
        assert!(
            !body.contains_key(KIND_KEY),
            "'{KIND_KEY}' is the envelope's key"
        );
        TargetSpec {
            kind: kind.to_owned(),
            body,
        }
    }

    /// The kind, e.g. `linear`, `mirror`, `origin` or `child`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The target's own spec: an error (Corrupt) when the stored object does not parse.
    pub fn parse<S: serde::de::DeserializeOwned>(&self) -> Result<S> {
        serde_json::from_value(serde_json::Value::Object(self.body.clone())).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("the {} spec does not parse", self.kind),
                e,
            )
        })
    }

    /// The spec of a device served by the daemon of device `parent`.
    pub fn child(child: &ChildSpec) -> TargetSpec {
        TargetSpec::new(ChildSpec::KIND, child)
    }

    /// The child this spec describes, if it is one.
    pub fn as_child(&self) -> Option<ChildSpec> {
        (self.kind == ChildSpec::KIND)
            .then(|| self.parse().ok())
            .flatten()
    }
}

impl serde::Serialize for TargetSpec {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.body.len() + 1))?;
        map.serialize_entry(KIND_KEY, &self.kind)?;
        for (key, value) in &self.body {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for TargetSpec {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut body = serde_json::Map::deserialize(deserializer)?;
        let kind = match body.remove(KIND_KEY) {
            Some(serde_json::Value::String(kind)) => kind,
            _ => return Err(D::Error::missing_field(KIND_KEY)),
        };
        Ok(TargetSpec { kind, body })
    }
}

/// A device served by the daemon of another device, `parent` (e.g. a snapshot served with its
/// origin). Never opened on its own: recovering the parent brings it back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildSpec {
    pub parent: u32,
    /// The child's target kind, e.g. `snapshot`.
    pub kind: String,
    pub name: String,
}

impl ChildSpec {
    /// Its kind in a [`TargetSpec`].
    pub const KIND: &'static str = "child";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_keeps_its_kind_and_body() {
        let json = serde_json::json!({"target": "linear", "device": "/dev/vdb"});
        let spec: TargetSpec = serde_json::from_value(json.clone()).expect("parse");
        assert_eq!(spec.kind(), "linear");
        assert_eq!(serde_json::to_value(&spec).expect("json"), json);
        assert_eq!(
            serde_json::to_string(&spec).expect("json"),
            r#"{"target":"linear","device":"/dev/vdb"}"#
        );
        assert!(serde_json::from_value::<TargetSpec>(serde_json::json!({"device": 1})).is_err());
    }

    #[test]
    fn a_child_spec_stored_by_the_old_code_still_parses() {
        let old =
            serde_json::json!({"target": "child", "parent": 0, "kind": "snapshot", "name": "s1"});
        let spec: TargetSpec = serde_json::from_value(old.clone()).expect("parse");
        let child = spec.as_child().expect("a child");
        assert_eq!(
            child,
            ChildSpec {
                parent: 0,
                kind: "snapshot".into(),
                name: "s1".into()
            }
        );
        assert_eq!(
            serde_json::to_value(TargetSpec::child(&child)).expect("json"),
            old
        );
    }
}
