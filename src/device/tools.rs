//! Running the real tools (mkfs, cryptsetup, sfdisk...) that make foreign data for tests: the
//! probe's own tests and the loop-device tests share this one helper. Compiled with the `sim`
//! feature only, never into the release binary.
//!
//! Invariant: as root (CI) a missing tool fails the test, since `scripts/deps` installs them
//! all; only an unprivileged run may skip, and it says so with a `SKIP:` line.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `tool args.. FILE`, feeding it `input` on stdin, and panics if it fails. `false`
/// (after printing SKIP) when the tool is missing and we are not root.
pub fn run_tool(tool: &str, args: &[&str], file: &Path, input: &str) -> bool {
    let child = Command::new(tool)
        .args(args)
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        // SAFETY: geteuid has no preconditions.
        Err(e) if unsafe { libc::geteuid() } != 0 => {
            eprintln!("SKIP: {tool} cannot run ({e}); scripts/deps installs it");
            return false;
        }
        Err(e) => panic!("{tool} cannot run ({e}); run scripts/deps"),
    };
    // Dropped at the end of the statement: the tool sees the end of its input.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("feed the tool");
    let out = child.wait_with_output().expect("wait for the tool");
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
