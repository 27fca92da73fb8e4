//! The targets, compiled into the library as modules (see the README's architecture section):
//! each lives in its own folder and owns its spec, its `add` arguments, its commands and its
//! [`TargetKind`](crate::registry::TargetKind), exported as `kind()`.
//!
//! The core never names a target: `main` builds the [`Registry`] here ([`registry`]) and hands
//! it to the CLI and the daemon. Adding a target is a folder, its `pub mod` line and its name
//! in the `targets!` list below. (The modules are declared outside the macro so that `cargo fmt`
//! sees them: rustfmt does not follow modules declared by a macro.)

use crate::registry::Registry;

pub mod linear;
pub mod mirror;
pub mod snapshot;
pub mod zero;

/// Registers the kind of every target module listed, in the order `ublkdm add --help` lists
/// them.
macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        /// Every target kind this binary serves.
        pub fn registry() -> Registry {
            Registry::new()$(.with($name::kind()))*
        }
    };
}

targets!(linear, mirror, snapshot, zero);

/// What the mirror finds on the machine's block devices (`assemble --scan`), for the tests.
pub fn scan() -> crate::error::Result<crate::registry::ScanReport> {
    registry().scan()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::TargetSpec;

    /// Specs exactly as the code before the registry stored them (`#[serde(tag = "target")]`
    /// on one enum of every target): each must still parse, open through its kind's spec
    /// struct and serialise back to the same JSON, so `recover` of an old device works.
    #[test]
    fn specs_stored_by_the_old_code_still_parse() {
        let old = [
            r#"{"target":"linear","device":"/dev/vdb"}"#,
            r#"{"target":"mirror","legs":["/dev/vdb","/dev/vdc"],"region_size_sectors":1024,"nosync":false,"force":false}"#,
            r#"{"target":"mirror","uuid":"00000000-0000-0000-0000-000012345678","legs":["/dev/vdb"],"region_size_sectors":1024,"nosync":false,"force":true,"resync_throttle":{"floor_mbps":10,"ceiling_mbps":null}}"#,
            r#"{"target":"origin","device":"/dev/vdb","cow":"/dev/vdc","chunk_size_sectors":32,"force":false}"#,
            r#"{"target":"child","parent":0,"kind":"snapshot","name":"s1"}"#,
        ];
        let registry = registry();
        for text in old {
            let spec: TargetSpec = serde_json::from_str(text).expect(text);
            let json: serde_json::Value = serde_json::from_str(text).expect("json");
            match spec.kind() {
                "linear" => drop(spec.parse::<linear::LinearSpec>().expect(text)),
                "mirror" => drop(spec.parse::<mirror::MirrorSpec>().expect(text)),
                "origin" => drop(spec.parse::<snapshot::OriginSpec>().expect(text)),
                "child" => drop(spec.as_child().expect(text)),
                other => panic!("unexpected kind {other}"),
            }
            assert!(
                !registry.describe(Some(&spec)).contains("unreadable"),
                "{text}"
            );
            let back = serde_json::to_value(&spec).expect("json");
            // What was written is what is read back, plus the defaults the old code filled.
            for (key, value) in json.as_object().expect("object") {
                assert_eq!(&back[key], value, "{text}: {key}");
            }
        }
        let mirror: mirror::MirrorSpec = serde_json::from_str::<TargetSpec>(old[1])
            .expect("spec")
            .parse()
            .expect("mirror");
        assert_eq!(mirror.uuid, None);
        assert_eq!(registry.identity(&mirror.clone().into()), None);
        let with_uuid: TargetSpec = serde_json::from_str(old[2]).expect("spec");
        assert_eq!(
            registry.identity(&with_uuid).as_deref(),
            Some("00000000-0000-0000-0000-000012345678")
        );
        let back = serde_json::to_value(TargetSpec::from(mirror)).expect("json");
        assert!(back.get("uuid").is_none(), "no uuid is written as none");
    }

    fn parse(args: &[&str]) -> std::result::Result<clap::ArgMatches, clap::Error> {
        crate::cli::command(&registry()).try_get_matches_from(args)
    }

    /// The spec `ublkdm add KIND ...` asks for.
    fn add_spec(args: &[&str]) -> crate::error::Result<TargetSpec> {
        let registry = registry();
        let matches = parse(args).expect("parse");
        let (_, add) = matches.subcommand().expect("add");
        let (name, args) = add.subcommand().expect("kind");
        registry.find(name).expect("kind").add_spec(args)
    }

    #[test]
    fn the_cli_is_well_formed_with_every_target() {
        crate::cli::command(&registry()).debug_assert();
        let matches = parse(&[
            "ublkdm",
            "add",
            "linear",
            "/dev/vda",
            "--queues",
            "4",
            "--foreground",
        ])
        .expect("parse");
        let (_, add) = matches.subcommand().expect("add");
        let (_, args) = add.subcommand().expect("linear");
        let options = <crate::cli::AddOptions as clap::FromArgMatches>::from_arg_matches(args)
            .expect("options");
        assert_eq!(
            (options.queues, options.depth, options.foreground),
            (4, crate::ublk::DEFAULT_DEPTH, true)
        );
        assert_eq!(
            serde_json::to_string(
                &add_spec(&["ublkdm", "add", "linear", "/dev/vda"]).expect("spec")
            )
            .expect("json"),
            r#"{"target":"linear","device":"/dev/vda"}"#
        );
        assert!(parse(&["ublkdm", "add", "linear", "/dev/vda", "--bogus"]).is_err());
        assert!(
            parse(&["ublkdm", "add", "origin", "/dev/vda"]).is_err(),
            "--cow"
        );
        assert!(parse(&["ublkdm", "mirror", "fail-leg", "ublkb1", "2"]).is_ok());
        assert!(
            parse(&["ublkdm", "mirror", "status", "1"]).is_err(),
            "socket only"
        );
        assert!(parse(&["ublkdm", "snapshot", "create", "1", "--name", "a"]).is_ok());
    }

    #[test]
    fn sizes_in_add_are_powers_of_two_of_at_least_4k() {
        let origin = add_spec(&["ublkdm", "add", "origin", "/dev/vda", "--cow", "/dev/vdb"])
            .expect("spec")
            .parse::<snapshot::OriginSpec>()
            .expect("origin");
        assert_eq!(origin.chunk_size_sectors, 0, "the default");
        assert_eq!(snapshot::parse_chunk_size("16K"), Ok(16384));
        let origin = ["ublkdm", "add", "origin", "/dev/a", "--cow", "/dev/b"];
        for bad in ["12K", "2K"] {
            let args = [&origin[..], &["--chunk-size", bad]].concat();
            assert!(parse(&args).is_err(), "--chunk-size {bad}");
        }
        let mirror = [
            "ublkdm", "add", "mirror", "--leg", "/dev/a", "--leg", "/dev/b",
        ];
        let args = [&mirror[..], &["--region-size", "12K"]].concat();
        assert!(parse(&args).is_err(), "--region-size 12K");
    }

    #[test]
    fn commands_keep_their_wire_format() {
        let command = mirror::MirrorCommand::ReplaceLeg {
            id: 3,
            slot: 1,
            device: "/dev/vdc".into(),
            force: false,
            leg_options: None,
            json: true,
        };
        let crate::control::Command::Target { name, args } = command.to_wire() else {
            panic!("a target command")
        };
        assert_eq!(name, "replace-leg");
        assert_eq!(
            args,
            serde_json::json!({ "slot": 1, "device": "/dev/vdc", "force": false })
        );
        let back = mirror::MirrorCommand::parse(&name, &args).expect("parse");
        assert!(matches!(
            back,
            mirror::MirrorCommand::ReplaceLeg { slot: 1, .. }
        ));
        let create = snapshot::SnapshotCommand::parse("snapshot-create", &serde_json::Value::Null)
            .expect("no name");
        assert!(matches!(
            create,
            snapshot::SnapshotCommand::Create { name: None, .. }
        ));
        let err = snapshot::SnapshotCommand::parse("snapshot-delete", &serde_json::json!({}))
            .expect_err("no name");
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
    }
}
