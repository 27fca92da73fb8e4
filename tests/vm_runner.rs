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
/// no guest output) or `crash` (guest up, then no exit status: exit 125). A batch boot
/// (guest script `.../batch` with `SECS:TEST` arguments) frames each test's PASS line as
/// tests/vm/batch does; with `crash` it dies in its second test. Each boot's guest script
/// and arguments are appended to `$FAKE_STATE/boots.log`.
const FAKE_RUNNER: &str = r#"#!/usr/bin/env bash
set -u
phase=1
batch=()
for arg in "$@"; do
	case $arg in
	PHASE=*) phase=${arg#PHASE=} ;;
	[0-9]*:*) batch+=("$(basename "${arg#*:}" .sh)") ;;
	esac
done
n=$(($(cat "$FAKE_STATE/boots" 2>/dev/null || echo 0) + 1))
echo "$n" >"$FAKE_STATE/boots"
echo "${batch[*]:-alone}" >>"$FAKE_STATE/boots.log"
read -r -a plan <<<"$FAKE_PLAN"
step=${plan[n - 1]:-missing}
if ((${#batch[@]})) && [[ $step == ok || $step == crash ]]; then
	echo "vm: guest up after 1.0 s"
	for ((i = 0; i < ${#batch[@]}; i++)); do
		echo "vm-batch: begin ${batch[i]}"
		[[ $step == crash && $i == 1 ]] && { echo "vm: error: the guest wrote no exit status"; exit 125; }
		echo "PASS: ${batch[i]}-case"
		echo "vm-batch: end ${batch[i]} rc=0 secs=1"
	done
	exit 0
fi
case $step in
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
        .env("UBLKDM_VM_LOG_DIR", dir.join("logs"))
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
    let files = [
        ("plain", "# vm: --disks 1x1M\n"),
        ("only-newest", "# vm: --disks 1x1M --kernels newest\n"),
        ("both", "# vm: --kernels lts,newest --disks 1x1M\n"),
        ("common_lib", "# vm: --kernels lts,newest\n"),
    ];
    let run = run_files(&format!("kernels-{kernel}"), kernel, &files, "ok ok ok ok");
    assert!(run.outcome.success, "{}", run.outcome.stdout);
    summaries(&run.outcome.stdout)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// What [`run_files`] saw: run-all's outcome and, boot by boot, the tests each batch boot
/// ran (`alone` for a boot of one test).
struct BatchRun {
    outcome: Outcome,
    boots_log: Vec<String>,
    stderr: String,
}

/// Runs run-all (no build) on `kernel` over a test folder of `files` (name, header), naming no
/// test, with boot outcomes `plan`; `batch` is `UBLKDM_VM_BATCH` (unset: the default).
fn run_files(dir_name: &str, kernel: &str, files: &[(&str, &str)], plan: &str) -> BatchRun {
    run_files_batched(dir_name, kernel, files, plan, None)
}

fn run_files_batched(
    dir_name: &str,
    kernel: &str,
    files: &[(&str, &str)],
    plan: &str,
    batch: Option<&str>,
) -> BatchRun {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempdir(dir_name);
    let runner = dir.join("fake-run");
    fs::write(&runner, FAKE_RUNNER).unwrap();
    chmod_x(&runner);
    let tests = dir.join("tests");
    fs::create_dir(&tests).unwrap();
    for (name, header) in files {
        fs::write(tests.join(format!("{name}.sh")), header).unwrap();
    }
    let state = dir.join("state");
    fs::create_dir(&state).unwrap();
    let mut cmd = Command::new(repo.join("tests/vm/run-all"));
    cmd.args(["--no-build", "--kernel", kernel])
        .env("UBLKDM_VM_RUNNER", &runner)
        .env("UBLKDM_VM_TEST_DIR", &tests)
        .env("UBLKDM_VM_LOG_DIR", dir.join("logs"))
        .env("FAKE_STATE", &state)
        .env("FAKE_PLAN", plan);
    match batch {
        Some(batch) => cmd.env("UBLKDM_VM_BATCH", batch),
        None => cmd.env_remove("UBLKDM_VM_BATCH"),
    };
    let out = cmd.output().expect("run tests/vm/run-all");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let boots = fs::read_to_string(state.join("boots")).unwrap_or_default();
    let boots_log = fs::read_to_string(state.join("boots.log")).unwrap_or_default();
    fs::remove_dir_all(&dir).unwrap();
    BatchRun {
        outcome: Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            boots: boots.trim().parse().unwrap_or(0),
        },
        boots_log: boots_log.lines().map(str::to_owned).collect(),
        stderr,
    }
}

/// The `== NAME:` summary lines of a run, in order.
fn summaries(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("== ")?.split(':').next())
        .collect()
}

/// Single-phase tests that want the same disks share one boot; a test that wants other disks,
/// or has several phases (power cuts), boots alone.
#[test]
fn single_phase_tests_with_the_same_disks_share_one_boot() {
    let run = run_files(
        "batches",
        "lts",
        &[
            ("a", "# vm: --disks 1x1M\n"),
            ("b", "# vm: --disks 2x1M\n"),
            ("c", "# vm: --disks 1x1M --timeout 30\n"),
            ("d", "# vm: --disks 1x1M --phases 2\n"),
        ],
        "ok ok ok ok",
    );
    let out = &run.outcome;
    assert!(out.success, "{}", out.stdout);
    assert_eq!(run.boots_log, ["a c", "alone", "alone", "alone"]);
    assert_eq!(summaries(&out.stdout), ["a", "c", "b", "d"]);
    assert!(out.stdout.contains("5 passed, 0 failed"), "{}", out.stdout);
}

/// A batch whose VM dies in a test fails that test (as a boot of its own would), and boots each
/// test it never began alone: no test goes unrun.
#[test]
fn a_batch_that_dies_fails_that_test_and_boots_the_rest_alone() {
    let files = [
        ("a", "# vm: --disks 1x1M\n"),
        ("b", "# vm: --disks 1x1M\n"),
        ("c", "# vm: --disks 1x1M\n"),
    ];
    let run = run_files("batch-crash", "lts", &files, "crash ok");
    let out = &run.outcome;
    assert!(!out.success, "{}", out.stdout);
    assert_eq!(run.boots_log, ["a b c", "alone"]);
    assert_eq!(summaries(&out.stdout), ["a", "b", "c"]);
    assert!(
        out.stdout
            .contains("FAIL: b: the VM exited 125 without a FAIL line"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("c: not run in its batch; booting it alone"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("2 passed, 1 failed"), "{}", out.stdout);
}

/// `UBLKDM_VM_BATCH` caps a batch: the tests of one disk set go in chunks of that many, and
/// a chunk of one boots alone.
#[test]
fn a_batch_holds_at_most_ublkdm_vm_batch_tests() {
    let files = [
        ("a", "# vm: --disks 1x1M\n"),
        ("b", "# vm: --disks 1x1M\n"),
        ("c", "# vm: --disks 1x1M\n"),
    ];
    let run = run_files_batched("batch-cap", "lts", &files, "ok ok", Some("2"));
    assert!(run.outcome.success, "{}", run.outcome.stdout);
    assert_eq!(run.boots_log, ["a b", "alone"]);
    assert!(run.outcome.stdout.contains("3 passed, 0 failed"));
}

/// A cap that is not a count of tests is a one-line usage error before any boot (it once
/// was a bash arithmetic error, and 0 would have chunked forever but for a guard elsewhere).
#[test]
fn a_bad_ublkdm_vm_batch_is_a_usage_error() {
    let files = [("a", "# vm: --disks 1x1M\n")];
    for bad in ["0", "two", "-1", "08"] {
        let run = run_files_batched("batch-bad", "lts", &files, "ok", Some(bad));
        assert!(!run.outcome.success, "UBLKDM_VM_BATCH={bad:?} was taken");
        assert_eq!(run.outcome.boots, 0, "UBLKDM_VM_BATCH={bad:?} booted");
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(run.stderr.contains("UBLKDM_VM_BATCH"), "{}", run.stderr);
    }
}
