//! The host-side VM test runner (`tests/vm/run-all`), driven with a fake `scripts/vm/run`
//! that plays a given sequence of boot outcomes. No VM boots here: these tests check how
//! run-all counts phases, retries boots that never came up, reports failures and picks the
//! tests of each kernel.
//!
//! Invariant checked: a boot that dies before its guest comes up (qemu's exit 125 with no
//! "guest up" line) is retried, in any phase; a guest that came up and then died is a failure,
//! never retried.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fake runner: boot number N (counted in `$FAKE_STATE/boots`) plays the Nth word of
/// `$FAKE_PLAN`: `ok` (guest up, one PASS line, exit 0), `flake` (qemu dies at boot: exit 125,
/// no guest output) or `crash` (guest up, then no exit status: exit 125).
const FAKE_RUNNER: &str = r#"#!/usr/bin/env bash
set -u
phase=1
for arg in "$@"; do
	case $arg in PHASE=*) phase=${arg#PHASE=} ;; esac
done
n=$(($(cat "$FAKE_STATE/boots" 2>/dev/null || echo 0) + 1))
echo "$n" >"$FAKE_STATE/boots"
read -r -a plan <<<"$FAKE_PLAN"
case ${plan[n - 1]:-missing} in
ok) echo "vm: guest up after 1.0 s"; echo "PASS: phase-$phase"; exit 0 ;;
flake) echo "vm: error: the guest wrote no exit status (qemu exit 1)"; exit 125 ;;
crash) echo "vm: guest up after 1.0 s"; echo "vm: error: the guest wrote no exit status"; exit 125 ;;
*) echo "fake runner: no plan for boot $n"; exit 99 ;;
esac
"#;

/// What one run-all invocation printed, its exit status and how many boots it made.
struct Outcome {
    success: bool,
    stdout: String,
    boots: u32,
}

/// Runs run-all (no build) over one fake test file of `phases` phases, with boot outcomes
/// `plan` (space-separated words of [`FAKE_RUNNER`]).
fn run_all(name: &str, phases: u32, plan: &str) -> Outcome {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempdir(name);
    let runner = dir.join("fake-run");
    fs::write(&runner, FAKE_RUNNER).unwrap();
    chmod_x(&runner);
    let test = dir.join(format!("{name}.sh"));
    fs::write(&test, format!("# vm: --disks 1x1M --phases {phases}\n")).unwrap();
    let state = dir.join("state");
    fs::create_dir(&state).unwrap();
    let out = Command::new(repo.join("tests/vm/run-all"))
        .arg("--no-build")
        .arg(&test)
        .env("UBLKDM_VM_RUNNER", &runner)
        .env("FAKE_STATE", &state)
        .env("FAKE_PLAN", plan)
        .output()
        .expect("run tests/vm/run-all");
    let boots = fs::read_to_string(state.join("boots")).unwrap_or_default();
    let outcome = Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        boots: boots.trim().parse().unwrap_or(0),
    };
    fs::remove_dir_all(&dir).unwrap();
    outcome
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ublkdm-vm-runner-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn chmod_x(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

// The CI failure of session 6: phase 2 of mirror_cuts died at boot and was not retried,
// because phase 1's "guest up" line was already in the shared log.
#[test]
fn a_boot_flake_in_a_later_phase_is_retried() {
    let run = run_all("later-phase-flake", 2, "ok flake ok");
    assert!(run.success, "{}", run.stdout);
    assert_eq!(run.boots, 3);
    assert!(
        run.stdout.contains("the VM failed to boot (attempt 1)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("2 passed, 0 failed"), "{}", run.stdout);
}

#[test]
fn two_boot_flakes_in_a_row_are_retried() {
    let run = run_all("two-flakes", 1, "flake flake ok");
    assert!(run.success, "{}", run.stdout);
    assert_eq!(run.boots, 3);
    assert!(run.stdout.contains("1 passed, 0 failed"), "{}", run.stdout);
}

#[test]
fn a_vm_that_never_boots_fails_after_three_attempts() {
    let run = run_all("never-boots", 1, "flake flake flake ok");
    assert!(!run.success, "{}", run.stdout);
    assert_eq!(run.boots, 3);
    assert!(
        run.stdout.contains("exited 125 without a FAIL line"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("0 passed, 1 failed"), "{}", run.stdout);
}

#[test]
fn a_guest_that_came_up_and_died_is_a_failure_not_retried() {
    let run = run_all("crash", 2, "ok crash ok");
    assert!(!run.success, "{}", run.stdout);
    assert_eq!(
        run.boots, 2,
        "a crash after the guest came up must not be retried"
    );
    assert!(run.stdout.contains("1 passed, 1 failed"), "{}", run.stdout);
}

/// With no test named, run-all on kernel K boots exactly the test files whose header's
/// `--kernels` names K, and files that name none on lts only.
#[test]
fn with_no_test_named_each_kernel_runs_the_tests_written_for_it() {
    for (kernel, want) in [
        ("lts", vec!["both", "plain"]),
        ("newest", vec!["both", "only-newest"]),
    ] {
        let ran = run_default_list(kernel);
        assert_eq!(ran, want, "kernel {kernel}");
    }
}

/// The tests run-all boots, by name, when it is given none on `kernel`, over a test folder
/// of three files (`plain`: no `--kernels`; `only-newest`; `both`).
fn run_default_list(kernel: &str) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempdir(&format!("kernels-{kernel}"));
    let runner = dir.join("fake-run");
    fs::write(&runner, FAKE_RUNNER).unwrap();
    chmod_x(&runner);
    let tests = dir.join("tests");
    fs::create_dir(&tests).unwrap();
    for (name, header) in [
        ("plain", "# vm: --disks 1x1M\n"),
        ("only-newest", "# vm: --disks 1x1M --kernels newest\n"),
        ("both", "# vm: --kernels lts,newest --disks 1x1M\n"),
        ("common_lib", "# vm: --kernels lts,newest\n"),
    ] {
        fs::write(tests.join(format!("{name}.sh")), header).unwrap();
    }
    let state = dir.join("state");
    fs::create_dir(&state).unwrap();
    let out = Command::new(repo.join("tests/vm/run-all"))
        .args(["--no-build", "--kernel", kernel])
        .env("UBLKDM_VM_RUNNER", &runner)
        .env("UBLKDM_VM_TEST_DIR", &tests)
        .env("FAKE_STATE", &state)
        .env("FAKE_PLAN", "ok ok ok ok")
        .output()
        .expect("run tests/vm/run-all");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    fs::remove_dir_all(&dir).unwrap();
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("== ")?.split(':').next())
        .map(str::to_owned)
        .collect()
}
