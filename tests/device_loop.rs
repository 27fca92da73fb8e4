//! `UringDevice` on real loop devices and files (root only for loop devices; prints `SKIP:`).
//!
//! Geometry comes from the block ioctls, exclusive opens refuse a second user (`O_EXCL` for
//! block devices, `flock` for files, seen by other processes too, and retried past a child
//! that holds our descriptor between its fork and its exec), data round trips with and
//! without FUA, discard and write-zeroes zero what they cover, and requests off the device
//! fail with EINVAL without touching it. A device given twice to one command is refused under
//! any path. A mirror is not created over a leg holding a signature that real tools made
//! (libblkid's probe, `device::probe`) without `force`, and is with it. One file given as a
//! snapshot origin and its COW store is refused.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ublkdm::copy::ThrottleConfig;
use ublkdm::device::reactor::block_on;
use ublkdm::device::tools::run_tool;
use ublkdm::device::{
    open_distinct, same_device, AlignedBuf, BlockDevice, OpenOptions, UringDevice, WriteFlags,
};
use ublkdm::error::ErrorKind;
use ublkdm::targets::mirror::{open_mirror_with, MirrorSpec, Tuning};
use ublkdm::targets::snapshot::{open_group, OriginSpec};
use ublkdm::units::{Extent, Sector, SectorCount};

use common::{scratch_dir, LoopDev};

const MIB: u64 = 1 << 20;

fn blockdev(arg: &str, dev: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg(arg)
        .arg(dev)
        .output()
        .expect("blockdev");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .parse()
        .expect("number")
}

/// Writes a pattern at `sector`, reads it back, then zeroes it with `zero` and checks.
fn round_trip_and_zero(dev: UringDevice, sector: u64, use_discard: bool) {
    block_on(async move {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let buf = Arc::new(AlignedBuf::from_slice(&data));
        dev.write(Sector(sector), Arc::clone(&buf), WriteFlags::FUA)
            .await
            .expect("write");
        let (res, back) = dev.read(Sector(sector), AlignedBuf::new(data.len())).await;
        res.expect("read");
        assert_eq!(back.as_slice(), &data[..]);
        let extent = Extent::new(Sector(sector), SectorCount(128));
        let zeroed = if use_discard {
            dev.discard(extent).await
        } else {
            dev.write_zeroes(extent).await
        };
        zeroed.expect("zeroing");
        dev.flush().await.expect("flush");
        let (res, back) = dev.read(Sector(sector), back).await;
        res.expect("read");
        assert!(
            back.as_slice().iter().all(|&b| b == 0),
            "zeroed range reads zero"
        );
        // Off the end: EINVAL, nothing written.
        let past = Sector(dev.info().size.0 - 8);
        let err = dev
            .write(past, buf, WriteFlags::default())
            .await
            .expect_err("past the end");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    });
}

#[test]
fn loop_device_geometry_io_and_exclusivity() {
    require_loop_devices!();
    let dir = scratch_dir();
    let lo = LoopDev::new(dir.path(), "disk", 64 * MIB);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).expect("open");
    let info = dev.info().clone();
    assert_eq!(info.size.to_bytes(), blockdev("--getsize64", &lo.path));
    assert_eq!(
        u64::from(info.logical_block_bytes),
        blockdev("--getss", &lo.path)
    );
    assert_eq!(
        u64::from(info.physical_block_bytes),
        blockdev("--getpbsz", &lo.path)
    );
    assert!(
        info.write_zeroes,
        "loop devices offload write-zeroes: {info:?}"
    );

    let second =
        UringDevice::open(&lo.path, OpenOptions::default()).expect_err("second exclusive open");
    assert_eq!(second.kind(), ErrorKind::Busy, "{second}");
    assert!(second.to_string().contains("in use"), "{second}");

    round_trip_and_zero(dev, 2048, false);
}

#[test]
fn loop_device_discard() {
    require_loop_devices!();
    let dir = scratch_dir();
    let lo = LoopDev::new(dir.path(), "disk", 16 * MIB);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).expect("open");
    assert!(
        dev.info().discard,
        "loop over a file supports discard: {:?}",
        dev.info()
    );
    round_trip_and_zero(dev, 4096, true);
}

#[test]
fn regular_file_backs_a_device() {
    let dir = scratch_dir();
    let file = dir.path().join("file");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(8 * MIB + 1000))
        .expect("file");
    let dev = UringDevice::open(&file, OpenOptions::default()).expect("open file");
    assert_eq!(
        dev.info().size.to_bytes(),
        8 * MIB,
        "size rounds down to whole 4 KiB blocks"
    );
    round_trip_and_zero(dev, 8, true);
}

#[test]
fn bad_paths_are_clear_errors() {
    let dir = scratch_dir();
    let missing =
        UringDevice::open(&dir.path().join("nope"), OpenOptions::default()).expect_err("missing");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let empty = dir.path().join("empty");
    std::fs::File::create(&empty).expect("file");
    let err = UringDevice::open(&empty, OpenOptions::default()).expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("empty"), "{err}");
    let err = UringDevice::open(dir.path(), OpenOptions::default()).expect_err("a folder");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

/// A new sparse file of `bytes` at `path`.
fn sparse_file(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("create a file");
}

/// Whether another process can take `file`'s flock right now (util-linux `flock -n`).
fn other_process_can_lock(file: &Path) -> bool {
    let status = Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "99"])
        .arg(file)
        .arg("true")
        .status()
        .expect("run flock");
    assert!(matches!(status.code(), Some(0 | 99)), "flock: {status}");
    status.code() == Some(0)
}

#[test]
fn a_locked_file_is_busy_for_every_other_open_until_closed() {
    let dir = scratch_dir();
    let file = dir.path().join("leg");
    sparse_file(&file, 8 * MIB);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    assert!(other_process_can_lock(&file), "nobody holds it yet");

    let first = UringDevice::open(&file, OpenOptions::default()).expect("open");
    for path in [&file, &link] {
        let err = UringDevice::open(path, OpenOptions::default()).expect_err("second open");
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert_eq!(err.kind().exit_code(), 4);
        assert_eq!(
            err.to_string(),
            format!(
                "{} is in use by another ublkdm device (locked)",
                path.display()
            )
        );
    }
    assert!(
        !other_process_can_lock(&file),
        "another process (another daemon) sees the lock"
    );
    // A non-exclusive open (a read-only look) takes no lock and is not refused.
    let look = OpenOptions {
        exclusive: false,
        read_only: true,
    };
    let peek = UringDevice::open(&file, look).expect("non-exclusive open");
    assert!(same_device(&first, &peek), "one file, two opens");
    drop(peek);
    assert!(
        !other_process_can_lock(&file),
        "still held by the first open"
    );

    drop(first);
    assert!(other_process_can_lock(&file), "closing releases the lock");
    let again = UringDevice::open(&link, OpenOptions::default()).expect("open after close");
    drop(again);
}

/// Runs `true` from another thread in a child that, between its fork and its exec, tells us
/// it exists and then sleeps `hold_ms`: meanwhile it holds a copy of every descriptor of ours,
/// as any child does for a moment. Returns once the child has been forked.
fn fork_a_slow_child(hold_ms: u64) -> std::thread::JoinHandle<()> {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which is live.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned these two descriptors, owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let child_fd = write_end.as_raw_fd();
    let spawner = std::thread::spawn(move || {
        let mut command = Command::new("true");
        // SAFETY: the hook calls only write and nanosleep, both async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                libc::write(child_fd, b"x".as_ptr().cast(), 1);
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: (hold_ms * 1_000_000) as libc::c_long,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
                Ok(())
            });
        }
        let status = command.status().expect("run true");
        assert!(status.success());
        drop(write_end);
    });
    let mut byte = [0u8; 1];
    std::fs::File::from(read_end)
        .read_exact(&mut byte)
        .expect("the child was forked");
    spawner
}

#[test]
fn a_file_released_while_a_child_still_holds_our_descriptor_opens_again() {
    // A flock belongs to the open file description, which a child keeps from fork to exec:
    // an exclusive open right after a close (fail-leg then replace-leg, a mirror stopped and
    // assembled again) found it busy while another thread ran a program (CI: mirror_files).
    let dir = scratch_dir();
    let file = dir.path().join("leg");
    sparse_file(&file, 8 * MIB);
    let first = UringDevice::open(&file, OpenOptions::default()).expect("open");
    let child = fork_a_slow_child(300);
    drop(first);
    let again = UringDevice::open(&file, OpenOptions::default())
        .expect("the claim is retried until the child has exec'd");
    child.join().expect("spawner thread");
    drop(again);
}

#[test]
fn a_device_given_twice_is_refused_under_any_path() {
    let dir = scratch_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    sparse_file(&a, 8 * MIB);
    sparse_file(&b, 8 * MIB);
    let link = dir.path().join("link-to-a");
    std::os::unix::fs::symlink(&a, &link).expect("symlink");
    let hard = dir.path().join("hard-link-to-a");
    std::fs::hard_link(&a, &hard).expect("hard link");

    let opened = open_distinct(&[&a, &b], OpenOptions::default()).expect("distinct files");
    assert!(!same_device(&opened[0], &opened[1]));
    drop(opened);
    for twice in [[&a, &a], [&a, &link], [&hard, &a]] {
        let err = open_distinct(&[twice[0], &b, twice[1]], OpenOptions::default())
            .expect_err("the same file twice");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("are the same device"), "{err}");
    }
    // Nothing stayed open (or locked) after the refusal.
    let all = open_distinct(&[&a, &b], OpenOptions::default()).expect("free again");
    drop(all);
}

#[test]
fn a_loop_device_given_twice_is_refused() {
    require_loop_devices!();
    let dir = scratch_dir();
    let lo = LoopDev::new(dir.path(), "disk", 16 * MIB);
    let other = LoopDev::new(dir.path(), "other", 16 * MIB);
    let err = open_distinct(&[&lo.path, &other.path, &lo.path], OpenOptions::default())
        .expect_err("the same block device twice");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("are the same device"), "{err}");
    let both = open_distinct(&[&lo.path, &other.path], OpenOptions::default()).expect("distinct");
    assert!(!same_device(&both[0], &both[1]));
}

fn mirror_spec(legs: &[PathBuf], force: bool) -> MirrorSpec {
    MirrorSpec {
        uuid: None,
        legs: legs.to_vec(),
        region_size_sectors: 0,
        nosync: true,
        force,
        resync_throttle: Default::default(),
        leg_options: Default::default(),
    }
}

fn open_mirror(legs: &[PathBuf], force: bool) -> ublkdm::error::Result<()> {
    let target = open_mirror_with(
        &mirror_spec(legs, force),
        ThrottleConfig::UNLIMITED,
        Tuning::default(),
    )?;
    block_on(async move { target.shutdown().await }).expect("shut the mirror down");
    Ok(())
}

#[test]
fn a_mirror_over_one_file_given_twice_is_refused() {
    let dir = scratch_dir();
    let leg = dir.path().join("leg");
    sparse_file(&leg, 16 * MIB);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&leg, &link).expect("symlink");
    for legs in [[&leg, &leg], [&leg, &link]] {
        let legs: Vec<PathBuf> = legs.iter().map(|p| p.to_path_buf()).collect();
        let err = open_mirror(&legs, true).expect_err("one file twice");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("are the same device"), "{err}");
    }
}

/// `add origin F --cow F`: one file as origin and COW store, under any path (the file, a
/// symlink to it, a hard link), is refused before anything is written: InvalidArgument (exit
/// 2), one line naming both paths. Two distinct files make a group.
#[test]
fn an_origin_and_its_cow_store_on_one_file_are_refused() {
    let dir = scratch_dir();
    let file = dir.path().join("disk");
    sparse_file(&file, 16 * MIB);
    let link = dir.path().join("link-to-disk");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let hard = dir.path().join("hard-link-to-disk");
    std::fs::hard_link(&file, &hard).expect("hard link");
    for (origin, cow) in [
        (&file, &file),
        (&file, &link),
        (&link, &file),
        (&hard, &file),
    ] {
        let err = open_origin(origin, cow).expect_err("one file as origin and COW");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(err.kind().exit_code(), 2, "{err}");
        let line = err.to_string();
        assert!(line.contains("are the same device"), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
        for path in [origin, cow] {
            assert!(
                line.contains(&*path.to_string_lossy()),
                "{line} names {path:?}"
            );
        }
    }
    let first = std::fs::read(&file).expect("read the file");
    assert!(first.iter().all(|&b| b == 0), "nothing was written");
    let cow = dir.path().join("cow");
    sparse_file(&cow, 16 * MIB);
    match open_origin(&file, &cow) {
        Ok(()) => {}
        // A file system that refuses O_DIRECT (tmpfs) cannot serve files at all.
        Err(err) if err.to_string().contains("Invalid argument") => {
            println!("SKIP: distinct files not opened here: {err}")
        }
        Err(err) => panic!("two distinct files: {err}"),
    }
}

fn open_origin(origin: &Path, cow: &Path) -> ublkdm::error::Result<()> {
    let spec = OriginSpec {
        device: origin.to_path_buf(),
        cow: cow.to_path_buf(),
        chunk_size_sectors: 0,
        force: false,
        active: None,
    };
    let group = open_group(&spec)?;
    group.stop();
    Ok(())
}

/// Each kind of foreign data, made by its real tool: the mirror refuses it without `force`
/// (busy, exit 4, one line naming the leg and the kind) and overwrites it with `force`.
#[test]
fn a_mirror_refuses_legs_holding_foreign_data_without_force() {
    let dir = scratch_dir();
    let key = dir.path().join("luks-key");
    std::fs::write(&key, b"not a secret").expect("key file");
    let key = key.to_str().expect("utf-8").to_owned();
    let luks = [
        "luksFormat",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &key,
    ];
    type Kind<'a> = (&'a str, &'a [&'a str], &'a str, &'a str);
    let kinds: [Kind; 8] = [
        ("mkfs.ext4", &["-q", "-F"], "", "an ext4 file system"),
        ("mkfs.xfs", &["-q", "-f"], "", "an xfs file system"),
        ("mkfs.btrfs", &["-q", "-f"], "", "a btrfs file system"),
        ("mkfs.vfat", &[], "", "a vfat file system"),
        ("mkswap", &[], "", "a swap area"),
        (
            "sfdisk",
            &["--quiet"],
            "label: gpt\n,\n",
            "a GPT partition table",
        ),
        (
            "sfdisk",
            &["--quiet"],
            "label: dos\n,\n",
            "an MBR (DOS) partition table",
        ),
        ("cryptsetup", &luks, "", "a LUKS encrypted volume"),
    ];
    for (i, (tool, args, input, kind)) in kinds.into_iter().enumerate() {
        let legs = [
            dir.path().join(format!("foreign{i}")),
            dir.path().join(format!("blank{i}")),
        ];
        // xfs wants 300 MB at least; sparse files cost nothing.
        sparse_file(&legs[0], 320 * MIB);
        sparse_file(&legs[1], 320 * MIB);
        if !run_tool(tool, args, &legs[0], input) {
            return;
        }
        let err = open_mirror(&legs, false).expect_err(kind);
        assert_eq!(err.kind(), ErrorKind::Busy, "{tool}: {err}");
        assert_eq!(err.kind().exit_code(), 4);
        let message = err.to_string();
        assert!(
            !message.contains('\n') && err.chain().len() == 1,
            "{message}"
        );
        assert!(message.contains(kind), "{tool}: {message}");
        assert!(
            message.contains(&legs[0].display().to_string()),
            "{message}"
        );
        open_mirror(&legs, true).unwrap_or_else(|e| panic!("{tool}: force: {e}"));
    }
}
