//! `ublkdm features` as a user runs it. On a host without the ublk driver (this project's
//! build machines) it must fail with one line and exit 5 (unsupported), never a panic; on a
//! host with the driver it must list the features the driver reports.

use std::path::Path;
use std::process::Command;

fn ublkdm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ublkdm"))
        .args(args)
        .output()
        .expect("run ublkdm");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn features_without_a_driver_is_one_line_and_exit_5() {
    if Path::new("/dev/ublk-control").exists() {
        // A host with the driver: the command must answer instead.
        let (code, stdout, stderr) = ublkdm(&["features", "--json"]);
        assert_eq!(code, 0, "{stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(json["get_features"], true);
        return;
    }
    for args in [&["features"][..], &["features", "--json"][..]] {
        let (code, stdout, stderr) = ublkdm(args);
        assert_eq!(code, 5, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: the ublk driver is not loaded"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn features_takes_no_other_arguments() {
    let (code, _, stderr) = ublkdm(&["features", "--nosuch"]);
    assert_eq!(code, 2, "{stderr}");
}
