//! Shared helpers for integration tests: real loop devices over sparse files, tagged sectors,
//! the simulations' oracle ([`oracle`]), reads and writes of a target ([`target_io`]).
//!
//! Loop devices need root and `losetup`; a test that cannot have them prints `SKIP:` with
//! the reason and returns. Every device and file made here is removed on drop, even when the
//! test fails.
#![allow(dead_code)]

pub mod oracle;
pub mod target_io;

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why loop devices cannot be used here, if they cannot.
pub fn loop_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loop-device tests need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("this kernel has no loop driver (/dev/loop-control is missing)".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup is not installed (apt-get install util-linux)".into());
    }
    None
}

/// Returns early from a test, printing `SKIP:` and why, when loop devices are unavailable.
#[macro_export]
macro_rules! require_loop_devices {
    () => {
        if let Some(why) = common::loop_unavailable() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// A loop device over a sparse file, with direct I/O on, removed on drop.
pub struct LoopDev {
    pub path: PathBuf,
    pub file: PathBuf,
}

impl LoopDev {
    /// A loop device over a new sparse file of `bytes` in `dir`.
    pub fn new(dir: &Path, name: &str, bytes: u64) -> LoopDev {
        let file = dir.join(name);
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(bytes))
            .expect("create backing file");
        LoopDev::over(&file)
    }

    /// A loop device over an existing file, with direct I/O.
    pub fn over(file: &Path) -> LoopDev {
        LoopDev::attach(file, true)
    }

    /// A loop device over an existing file, buffered (tmpfs files refuse direct I/O).
    pub fn over_buffered(file: &Path) -> LoopDev {
        LoopDev::attach(file, false)
    }

    fn attach(file: &Path, direct: bool) -> LoopDev {
        let direct = if direct {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let out = Command::new("losetup")
            .args(["--find", "--show", direct])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).expect("utf8").trim());
        LoopDev {
            path,
            file: file.to_owned(),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A scratch folder on a disk-backed filesystem (not tmpfs, which refuses O_DIRECT).
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ublkdm-test-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

/// Fills `file` with `bytes` of pseudo-random data from `seed`, 1 MiB at a time.
pub fn fill_random(file: &Path, bytes: u64, seed: u64) {
    use std::io::Write;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .expect("open"),
    );
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        out.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    out.flush().expect("flush");
    out.get_ref().sync_all().expect("sync");
}

/// A tmpfs of `bytes` mounted on a new folder, unmounted on drop: files on it run out of
/// space, which makes a loop device over them fail writes.
pub struct SmallTmpfs {
    pub dir: tempfile::TempDir,
}

impl SmallTmpfs {
    pub fn new(bytes: u64) -> SmallTmpfs {
        let dir = tempfile::Builder::new()
            .prefix("ublkdm-full-")
            .tempdir()
            .expect("dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs failed");
        SmallTmpfs { dir }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Tagged sectors, for the simulations' oracles: a sector written with tag `t` at sector `at`
// holds `t` and `at` in its first 16 bytes and a fill derived from `t`, so a read can name
// which write it returns, and a sector no write produced is caught as garbage. Tag 0 is zeroes.

/// The sector indexes of `extent`.
pub fn sectors(extent: ublkdm::units::Extent) -> std::ops::Range<usize> {
    extent.start.0 as usize..extent.end().0 as usize
}

/// Fills the 512-byte `buf` as sector `at` written with `tag`.
pub fn stamp(buf: &mut [u8], at: u64, tag: u64) {
    if tag == 0 {
        buf.fill(0);
        return;
    }
    buf.fill((tag as u8) ^ 0x5a);
    buf[0..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..16].copy_from_slice(&at.to_le_bytes());
}

/// The tag sector `at` holds; panics on a sector that no write produced.
pub fn tag_of(buf: &[u8], at: u64, what: &str) -> u64 {
    if buf.iter().all(|&b| b == 0) {
        return 0;
    }
    let tag = u64::from_le_bytes(buf[0..8].try_into().expect("8"));
    let mut expect = vec![0u8; 512];
    stamp(&mut expect, at, tag);
    assert!(buf == &expect[..], "{what}: sector {at} holds garbage");
    tag
}
