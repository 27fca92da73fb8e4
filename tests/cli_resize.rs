//! `ublkdm resize` and `ublkdm mirror grow` as a user runs them: its usage errors (exit 2, one line), and on a host
//! without the ublk driver (this project's build machines) one line and exit 5. What it does
//! to a live device is tested in the VM (tests/vm/resize.sh), on both kernels.

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
fn bad_sizes_and_ids_are_usage_errors() {
    for (args, words) in [
        (&["resize"][..], "ID"),
        (&["resize", "/dev/vda"][..], "not a device id"),
        (&["resize", "0", "1000"][..], "512-byte sectors"),
        (&["resize", "0", "0"][..], "512-byte sectors"),
        (&["resize", "0", "2X"][..], "unknown unit"),
        (&["resize", "0", "1G", "2G"][..], "unexpected argument"),
        (&["mirror", "grow"][..], "ID"),
        (&["mirror", "grow", "/dev/vda"][..], "not a device id"),
        (&["mirror", "grow", "0", "1G"][..], "unexpected argument"),
        (
            &["mirror", "grow", "0", "--size", "1G"][..],
            "unexpected argument",
        ),
    ] {
        let (code, stdout, stderr) = ublkdm(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
}

#[test]
fn resize_without_a_driver_is_one_line_and_exit_5() {
    if Path::new("/dev/ublk-control").exists() {
        println!("SKIP: this host has the ublk driver; tests/vm/resize.sh covers it");
        return;
    }
    let (code, stdout, stderr) = ublkdm(&["resize", "0", "1G"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: the ublk driver is not loaded"),
        "{stderr}"
    );
}
