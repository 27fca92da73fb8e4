//! The foreign-signature probe: what another program left on a device (a file system, a
//! partition table, LUKS, swap, LVM, md...), so that no target overwrites it without `force`.
//!
//! Recognition is libblkid's, the library `blkid`, `wipefs` and `mkfs` use, through the
//! `libblkid-rs` crate: it knows every format those tools know, which no hand-written list of
//! magic numbers keeps up with. libblkid reads from a file descriptor, and this layer is the
//! only route to storage (and must serve every [`BlockDevice`], the in-memory test devices
//! too), so the probe does not let libblkid open the device: it copies the device's head
//! ([`PROBE_HEAD_BYTES`]) and tail ([`PROBE_TAIL_BYTES`]) through the [`DeviceRef`] into a
//! sparse memory file (`memfd`) of the device's size, and runs libblkid's low-level probe on
//! that. Everything else reads as zeroes.
//!
//! Why those areas: libblkid's probers look at fixed offsets near the start (most within the
//! first 64 KiB; btrfs at 64 KiB; LUKS2's secondary header at up to 4 MiB) and near the end
//! (md 0.90 and 1.0, the GPT backup header, ZFS labels, hardware RAID metadata: all within
//! the last 1 MiB). A prober that reads further (a FAT root directory for its label) sees
//! zeroes and still finds the signature itself, which is all we ask.
//!
//! Invariants: at most `PROBE_HEAD_BYTES + PROBE_TAIL_BYTES` are read from the device, in
//! chunks of [`PROBE_CHUNK_BYTES`]; at most [`MAX_SIGNATURES`] signatures are reported; the
//! memory file holds only the non-zero chunks read and is closed when the probe returns.
//!
//! Known limit: the memory file is not a block device, so libblkid takes 512-byte sectors, as
//! `blkid` does on an image file. A GPT written with 4 KiB sectors (a 4Kn disk) is then not
//! found, though its protective MBR is there; the crate offers no way to set the sector size.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use libblkid_rs::{BlkidProbe, BlkidProbeRet, BlkidSublks, BlkidSublksFlags};

use super::{AlignedBuf, DeviceRef};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::units::{Sector, SectorCount};

/// How much of a device's start is read: LUKS2 keeps a secondary header as far as 4 MiB in.
pub const PROBE_HEAD_BYTES: u64 = 8 << 20;
/// How much of a device's end is read: md 0.90/1.0, the GPT backup, ZFS's end labels.
pub const PROBE_TAIL_BYTES: u64 = 1 << 20;
/// The size of one read (a multiple of every logical block size).
pub const PROBE_CHUNK_BYTES: u64 = 1 << 20;
/// The most signatures one probe reports (libblkid's loop is bounded by its probers anyway).
pub const MAX_SIGNATURES: usize = 16;

/// A signature libblkid found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// libblkid's name for it: a superblock's `TYPE` (`ext4`, `vfat`, `crypto_LUKS`, `swap`,
    /// `LVM2_member`, `linux_raid_member`...) or a partition table's `PTTYPE` (`gpt`, `dos`).
    pub name: String,
    /// What it is, for messages: "a vfat file system", "a GPT partition table".
    pub description: String,
    /// The byte offset of its magic, when libblkid reports one (superblocks do; partition
    /// tables do not, and always live in the first sectors and the last).
    pub offset: Option<u64>,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// Every foreign signature on `dev`, in libblkid's order (superblocks, then partition tables).
/// A blank device gives none.
pub async fn signatures(dev: &DeviceRef) -> Result<Vec<Signature>> {
    let image = image_of(dev).await?;
    probe_image(&image).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("libblkid cannot probe {}: {e}", dev.info().name),
        )
    })
}

/// The first foreign signature on `dev`, if any (see [`signatures`]).
pub async fn foreign_signature(dev: &DeviceRef) -> Result<Option<Signature>> {
    Ok(signatures(dev).await?.into_iter().next())
}

/// The byte ranges of a device of `size` bytes that the probe reads: the head, and the tail
/// where it does not overlap the head. Both are multiples of `block` (as `size` is).
fn probe_ranges(size: u64, block: u64) -> Vec<std::ops::Range<u64>> {
    assert!(block > 0 && size % block == 0 && PROBE_CHUNK_BYTES % block == 0);
    let head_end = size.min(PROBE_HEAD_BYTES);
    let tail_start = (size.saturating_sub(PROBE_TAIL_BYTES) / block * block).max(head_end);
    let mut ranges = Vec::with_capacity(2);
    ranges.push(0..head_end);
    if tail_start < size {
        ranges.push(tail_start..size);
    }
    ranges
}

/// A sparse memory file of `dev`'s size holding its head and tail.
async fn image_of(dev: &DeviceRef) -> Result<File> {
    let name = dev.info().name.clone();
    let size = dev.info().size.to_bytes();
    let block = u64::from(dev.info().logical_block_bytes).max(512);
    let image = memfd(size).context(|| format!("cannot make a memory image of {name}"))?;
    for range in probe_ranges(size, block) {
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(PROBE_CHUNK_BYTES);
            let buf = AlignedBuf::for_sectors(SectorCount::from_bytes_exact(len).expect("blocks"));
            let start = Sector::from_bytes_exact(at).expect("block-aligned");
            let (res, buf) = dev.read(start, buf).await;
            res.context(|| format!("cannot read {name} to look for signatures"))?;
            let bytes = buf.as_slice();
            // Zero chunks stay holes: the image costs memory only for what the device holds.
            if bytes.iter().any(|&b| b != 0) {
                image
                    .write_all_at(bytes, at)
                    .context(|| format!("cannot fill the memory image of {name}"))?;
            }
            at += len;
        }
    }
    Ok(image)
}

/// An empty memory file of `size` bytes, all hole.
fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"ublkdm-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

/// Runs libblkid's low-level probe (superblocks with type, usage and magic; partition
/// tables) over `image`, like `wipefs` does: each step reports one signature.
fn probe_image(image: &File) -> libblkid_rs::Result<Vec<Signature>> {
    let mut probe = BlkidProbe::new()?;
    // Offset 0 and size 0: the whole file. libblkid does not own or close the fd, which
    // `image` keeps open for as long as `probe` lives.
    probe.set_device(image.as_raw_fd(), 0, 0)?;
    probe.enable_superblocks(true)?;
    probe.set_superblock_flags(BlkidSublksFlags::new(vec![
        BlkidSublks::Type,
        BlkidSublks::Usage,
        BlkidSublks::Magic,
    ]))?;
    probe.enable_partitions(true)?;
    let mut found = Vec::new();
    while found.len() < MAX_SIGNATURES {
        if let BlkidProbeRet::Done = probe.do_probe()? {
            break;
        }
        let value = |key: &str| probe.lookup_value(key).ok();
        let signature = if let Some(name) = value("TYPE") {
            let usage = value("USAGE").unwrap_or_default();
            Signature {
                description: describe(&name, &usage),
                offset: value("SBMAGIC_OFFSET").and_then(|o| o.parse().ok()),
                name,
            }
        } else if let Some(name) = value("PTTYPE") {
            Signature {
                description: describe(&name, "partition table"),
                offset: None,
                name,
            }
        } else {
            continue;
        };
        found.push(signature);
    }
    Ok(found)
}

/// A phrase for a signature libblkid calls `name`, whose `USAGE` is `usage`.
fn describe(name: &str, usage: &str) -> String {
    let known = match name {
        "gpt" => Some("a GPT partition table"),
        "dos" => Some("an MBR (DOS) partition table"),
        "crypto_LUKS" => Some("a LUKS encrypted volume"),
        "swap" => Some("a swap area"),
        "LVM2_member" => Some("an LVM physical volume"),
        "linux_raid_member" => Some("an md RAID member"),
        _ => None,
    };
    if let Some(text) = known {
        return text.to_owned();
    }
    let what = match usage {
        "filesystem" => "file system",
        "raid" => "RAID member",
        "crypto" => "encrypted volume",
        "partition table" => "partition table",
        _ => "signature",
    };
    let article = match name.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'x') => "an",
        _ => "a",
    };
    format!("{article} {name} {what}")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use std::sync::Arc;

    use super::*;
    use crate::device::reactor::{block_on, run_local};
    use crate::device::{MemDevice, OpenOptions, UringDevice};

    /// A new sparse file of `bytes` in a scratch folder on a disk (O_DIRECT works there).
    pub(crate) fn scratch_file(bytes: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("ublkdm-probe-")
            .tempdir_in("/var/tmp")
            .expect("scratch dir");
        let file = dir.path().join("image");
        File::create(&file)
            .and_then(|f| f.set_len(bytes))
            .expect("create image");
        (dir, file)
    }

    pub(crate) use crate::device::tools::run_tool;

    /// A new file of `bytes` formatted by `tool args..`, or `None` when the tool is missing
    /// (see [`run_tool`]).
    pub(crate) fn image_made_by(
        tool: &str,
        args: &[&str],
        bytes: u64,
    ) -> Option<(tempfile::TempDir, PathBuf)> {
        let (dir, file) = scratch_file(bytes);
        run_tool(tool, args, &file, "").then_some((dir, file))
    }

    /// The signatures of the file at `path`, read through a [`UringDevice`].
    fn probe_file(path: &Path) -> Vec<Signature> {
        let options = OpenOptions {
            exclusive: false,
            read_only: true,
        };
        let dev: DeviceRef = Arc::new(UringDevice::open(path, options).expect("open image"));
        block_on(async move { signatures(&dev).await }).expect("probe")
    }

    /// Makes an image with `tool` and checks the probe names it `name`, described with `words`.
    fn check(tool: &str, args: &[&str], name: &str, words: &str) {
        let Some((_dir, file)) = image_made_by(tool, args, 320 << 20) else {
            return;
        };
        let found = probe_file(&file);
        let first = found
            .first()
            .unwrap_or_else(|| panic!("{tool}: nothing found"));
        assert_eq!(first.name, name, "{tool}: {found:?}");
        assert!(first.description.contains(words), "{tool}: {first}");
    }

    #[test]
    fn ext4_is_found() {
        check("mkfs.ext4", &["-q", "-F"], "ext4", "an ext4 file system");
    }

    #[test]
    fn xfs_is_found() {
        check("mkfs.xfs", &["-q", "-f"], "xfs", "an xfs file system");
    }

    #[test]
    fn btrfs_is_found() {
        check("mkfs.btrfs", &["-q", "-f"], "btrfs", "a btrfs file system");
    }

    #[test]
    fn vfat_is_found() {
        check("mkfs.vfat", &[], "vfat", "a vfat file system");
    }

    #[test]
    fn swap_is_found() {
        check("mkswap", &[], "swap", "a swap area");
    }

    #[test]
    fn luks_is_found() {
        let (dir, file) = scratch_file(320 << 20);
        let key = dir.path().join("key");
        std::fs::write(&key, b"not a secret").expect("key file");
        let key = key.display().to_string();
        let args = [
            "luksFormat",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            &key,
        ];
        if !run_tool("cryptsetup", &args, &file, "") {
            return;
        }
        let found = probe_file(&file);
        assert_eq!(found[0].name, "crypto_LUKS", "{found:?}");
        assert!(found[0].description.contains("LUKS"), "{}", found[0]);
    }

    /// Runs sfdisk on a file and checks the table it wrote is found, and nothing else.
    fn check_partition_table(label: &str, name: &str, words: &str) {
        let (_dir, file) = scratch_file(64 << 20);
        let script = format!("label: {label}\n,32M\n,\n");
        let args = ["--quiet", "--no-reread", "--no-tell-kernel"];
        if !run_tool("sfdisk", &args, &file, &script) {
            return;
        }
        let found = probe_file(&file);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, name);
        assert!(found[0].description.contains(words), "{}", found[0]);
    }

    #[test]
    fn gpt_is_found() {
        check_partition_table("gpt", "gpt", "a GPT partition table");
    }

    #[test]
    fn mbr_is_found() {
        check_partition_table("dos", "dos", "an MBR (DOS) partition table");
    }

    /// md 0.90 keeps its superblock in the last 64 KiB-aligned 64 KiB of the device; md
    /// cannot be created on a file, so the superblock's identifying fields are planted.
    #[test]
    fn md_superblock_at_the_end_is_found() {
        let size = SectorCount(8192);
        let mem = MemDevice::new("md", size);
        let bytes = size.to_bytes();
        let at = (bytes & !0xffff) - 0x10000;
        let mut sb = vec![0u8; 4096];
        let words: [u32; 4] = [0xa92b_4efc, 0, 90, 0]; // magic, major, minor, patch
        for (i, w) in words.iter().enumerate() {
            sb[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        mem.poke(Sector(at / 512), &sb);
        let dev: DeviceRef = mem;
        let found = run_local(async move { signatures(&dev).await }).expect("probe");
        assert_eq!(
            found.first().map(|s| s.name.as_str()),
            Some("linux_raid_member")
        );
    }

    #[test]
    fn a_blank_device_has_no_signature() {
        let dev: DeviceRef = MemDevice::new("blank", SectorCount(1 << 15));
        let found = run_local(async move { foreign_signature(&dev).await }).expect("probe");
        assert_eq!(found, None);
    }

    /// A signature copied into a memory device is found through it, and where it is.
    #[test]
    fn a_memory_device_is_probed_like_a_file() {
        let Some((_dir, file)) = image_made_by("mkswap", &[], 4 << 20) else {
            return;
        };
        let mem = MemDevice::new("swap", SectorCount(8192));
        mem.poke(Sector(0), &std::fs::read(&file).expect("read image"));
        let dev: DeviceRef = mem;
        let found = run_local(async move { foreign_signature(&dev).await }).expect("probe");
        let found = found.expect("swap found");
        assert_eq!(found.name, "swap");
        assert_eq!(
            found.offset,
            Some(4096 - 10),
            "swap's magic ends its first page"
        );
    }

    #[test]
    fn only_the_head_and_the_tail_are_read() {
        let block = 4096;
        let small = probe_ranges(8192, block);
        assert_eq!(
            (small.len(), &small[0]),
            (1, &(0..8192)),
            "a small device is read whole"
        );
        let big = 100 << 20;
        assert_eq!(
            probe_ranges(big, block),
            vec![0..PROBE_HEAD_BYTES, big - PROBE_TAIL_BYTES..big]
        );
        // Overlapping head and tail: the tail starts where the head ends.
        let mid = PROBE_HEAD_BYTES + 4096;
        assert_eq!(
            probe_ranges(mid, block),
            vec![0..PROBE_HEAD_BYTES, PROBE_HEAD_BYTES..mid]
        );
        let total: u64 = probe_ranges(u64::MAX / 2 / block * block, block)
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert_eq!(total, PROBE_HEAD_BYTES + PROBE_TAIL_BYTES);
    }
}
