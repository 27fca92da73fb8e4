//! Real block devices and regular files, `O_DIRECT`, through io_uring.
//!
//! A [`UringDevice`] owns one file descriptor; every request is an SQE on the ring of the
//! thread that awaits it (see [`super::reactor`]), so one device can serve many threads.
//! Geometry and capabilities come from the block ioctls and sysfs for block devices, and from
//! `fstat` for files. Block devices are opened `O_EXCL` and regular files are locked with
//! `flock(LOCK_EX | LOCK_NB)` (unless asked otherwise), so that two users (two ublkdm devices,
//! a mount, dm, md) cannot share one by accident; the claim lasts as long as the device's file
//! descriptor, which every clone of its `Arc` keeps open, and dies with the process. A busy
//! claim is retried for [`CLAIM_RETRY_WINDOW`]: a child process keeps copies of our
//! descriptors from its fork to its exec, so a device we closed a moment ago may still be held.
//! [`open_distinct`] opens the devices of one command and refuses one given twice, by identity
//! (a block device's number, a file's device and inode), so two paths to it are caught too.
//!
//! Mapping of operations: read/write use `IORING_OP_READ`/`WRITE` (FUA as `RWF_DSYNC`, which
//! the block layer turns into a FUA write or a write plus flush), and `READ_FIXED`/
//! `WRITE_FIXED` for a registered buffer (zero copy: only on the ring it is registered on,
//! which is checked before the first SQE); flush is `fdatasync`;
//! write-zeroes is `fallocate(ZERO_RANGE)` (the kernel offloads or writes zero pages);
//! discard is `fallocate(PUNCH_HOLE)` on files and `BLKDISCARD` on block devices, run on
//! smol's blocking pool because it is a synchronous ioctl.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::reactor::{self, cqe_result, submit_owned};
use super::{
    errno, owned_read, AlignedBuf, BlockDevice, DeviceInfo, IoBuf, IoFuture, IoReadDone, ReadDone,
    RegBuf, WriteBuf, WriteFlags,
};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::units::{Extent, Sector, SectorCount};

// Block ioctls (linux/fs.h): _IO(0x12, n) and _IOR(0x12, 114, size_t).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;

/// How to open a device.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Take the device exclusively: a block device with `O_EXCL`, which fails with "busy" if
    /// it is mounted or held by another user such as dm, md or another ublkdm device; a
    /// regular file with `flock(LOCK_EX | LOCK_NB)`, which fails with "busy" while another
    /// ublkdm device holds it.
    pub exclusive: bool,
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            exclusive: true,
            read_only: false,
        }
    }
}

/// A block device or regular file served through io_uring with `O_DIRECT`.
pub struct UringDevice {
    fd: Arc<OwnedFd>,
    path: PathBuf,
    is_block: bool,
    identity: DeviceIdentity,
    /// As opened; its `size` is the size then.
    info: DeviceInfo,
    /// The present size in sectors ([`BlockDevice::size`]): `info.size` until
    /// [`UringDevice::refresh_size`] finds the device grown. It never shrinks.
    size: AtomicU64,
}

/// What makes two opens the same storage, whatever paths named them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceIdentity {
    /// A block device: its device number.
    Block { rdev: u64 },
    /// A regular file: the file system it is on and its inode.
    File { dev: u64, ino: u64 },
}

impl DeviceIdentity {
    /// The identity of what `meta` (from `stat`, following links) describes.
    fn of(meta: &std::fs::Metadata) -> DeviceIdentity {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if meta.file_type().is_block_device() {
            DeviceIdentity::Block { rdev: meta.rdev() }
        } else {
            DeviceIdentity::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

impl UringDevice {
    /// Opens `path` and reads its geometry. Errors name the path and the reason.
    pub fn open(path: &Path, options: OpenOptions) -> Result<UringDevice> {
        let meta = std::fs::metadata(path).context(|| format!("cannot open {}", path.display()))?;
        let is_block = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        if !is_block && !meta.is_file() {
            return Err(Error::invalid(format!(
                "{} is neither a block device nor a regular file",
                path.display()
            )));
        }
        let fd = claim(path, options, is_block)?;
        // The identity of what was opened (the path may have been replaced since the stat).
        let opened = std::fs::File::from(
            fd.try_clone()
                .context(|| format!("cannot duplicate the descriptor of {}", path.display()))?,
        );
        let meta = opened
            .metadata()
            .context(|| format!("cannot stat {}", path.display()))?;
        let identity = DeviceIdentity::of(&meta);
        let info = if is_block {
            block_info(&fd, path)?
        } else {
            file_info(&meta, path)
        };
        if info.size.is_zero() {
            return Err(Error::invalid(format!("{} is empty", path.display())));
        }
        Ok(UringDevice {
            fd: Arc::new(fd),
            path: path.to_owned(),
            is_block,
            identity,
            size: AtomicU64::new(info.size.0),
            info,
        })
    }

    /// Re-reads the device's size (a block device extended under us, a file made longer) and
    /// returns it; [`BlockDevice::size`] follows from then on. A device found smaller than its
    /// present size is an error (`EINVAL`) and the size stays: a device never shrinks while it
    /// is open, since data was promised up to its size.
    pub fn refresh_size(&self) -> io::Result<SectorCount> {
        let now = if self.is_block {
            let bytes = ioctl_u64(&self.fd, BLKGETSIZE64)?;
            let block = u64::from(self.info.logical_block_bytes);
            SectorCount::from_bytes_floor(bytes / block * block)
        } else {
            // SAFETY: fstat writes into a zeroed, live stat buffer; the descriptor is open.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let bytes = u64::try_from(st.st_size).map_err(|_| errno(libc::EINVAL))?;
            SectorCount::from_bytes_floor(bytes / FILE_BLOCK_BYTES * FILE_BLOCK_BYTES)
        };
        let before = self.size();
        if now < before {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} shrank from {} to {} sectors while in use",
                    self.path.display(),
                    before.0,
                    now.0
                ),
            ));
        }
        self.size.fetch_max(now.0, Ordering::SeqCst);
        Ok(self.size())
    }

    /// Fails with `EINVAL` unless `extent` lies within the present size, on block boundaries.
    fn check(&self, extent: Extent) -> io::Result<()> {
        self.info.check_extent_in(extent, self.size())
    }

    /// What this device is, whatever path named it (see [`same_device`]).
    pub fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn fallocate(&self, extent: Extent, mode: i32) -> IoFuture<io::Result<()>> {
        let fd = Arc::clone(&self.fd);
        let checked = self.check(extent);
        Box::pin(async move {
            checked?;
            let sqe = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), extent.len.to_bytes())
                .offset(extent.start.to_bytes())
                .mode(mode)
                .build();
            // SAFETY: fallocate points at no memory; `fd` is kept open by `keep`.
            let (res, _fd) = unsafe { submit_owned(sqe, fd) }.await;
            cqe_result(res).map(|_| ())
        })
    }
}

/// Whether two opened devices are the same storage (two paths to one block device, a file
/// and a link to it).
pub fn same_device(a: &UringDevice, b: &UringDevice) -> bool {
    a.identity() == b.identity()
}

/// Opens `paths` for one command (the legs of a mirror, an origin and its COW device), refusing
/// a device given twice, under any path. A second exclusive open of one device would fail as
/// "in use" (by the first), so the paths are compared before opening, and the opened devices
/// again after (non-exclusive opens, a path replaced in between).
pub fn open_distinct<P: AsRef<Path>>(
    paths: &[P],
    options: OpenOptions,
) -> Result<Vec<UringDevice>> {
    check_distinct(paths)?;
    let mut opened: Vec<UringDevice> = Vec::with_capacity(paths.len());
    for path in paths.iter().map(AsRef::as_ref) {
        let dev = UringDevice::open(path, options)?;
        if let Some(first) = opened.iter().find(|d| same_device(d, &dev)) {
            return Err(same_device_twice(first.path(), path));
        }
        opened.push(dev);
    }
    Ok(opened)
}

fn same_device_twice(a: &Path, b: &Path) -> Error {
    Error::invalid(format!(
        "{} and {} are the same device; give each device once",
        a.display(),
        b.display()
    ))
}

/// Refuses a device named twice among `paths`, under any path (a link, another node of one
/// block device), before anything is opened. A path that cannot be stat'ed is left for its
/// open to fail, with its reason.
pub fn check_distinct<P: AsRef<Path>>(paths: &[P]) -> Result<()> {
    let mut seen: Vec<(&Path, DeviceIdentity)> = Vec::with_capacity(paths.len());
    for path in paths.iter().map(AsRef::as_ref) {
        // A path that cannot be stat'ed fails in open, with its reason.
        if let Ok(meta) = std::fs::metadata(path) {
            let identity = DeviceIdentity::of(&meta);
            if let Some((first, _)) = seen.iter().find(|(_, id)| *id == identity) {
                return Err(same_device_twice(first, path));
            }
            seen.push((path, identity));
        }
    }
    Ok(())
}

/// Locks the file open on `fd` for this open alone: a regular file has no `O_EXCL`, so without
/// it two ublkdm devices could serve one file leg. The lock belongs to the open file
/// description: it is released when the last descriptor on it closes, or the process dies.
fn lock_file(fd: &OwnedFd, path: &Path) -> Result<()> {
    loop {
        // SAFETY: flock takes a descriptor, open for the duration of the call, and flags.
        let rc = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{} is in use by another ublkdm device (locked)",
                        path.display()
                    ),
                ))
            }
            _ => return Err(Error::io(format!("cannot lock {}", path.display()), err)),
        }
    }
}

/// How long an exclusive open that finds its device taken keeps trying before it fails busy.
/// A descriptor of ours lives on in a child process from its fork to its exec (any thread of
/// this process that runs a program, `losetup` in a test, a helper in the daemon), so a device
/// released a moment ago can still be held there, by us. A real other user is still refused,
/// this much later.
pub const CLAIM_RETRY_WINDOW: Duration = Duration::from_secs(1);
/// The pause between two tries within [`CLAIM_RETRY_WINDOW`].
const CLAIM_RETRY_STEP: Duration = Duration::from_millis(10);

/// Opens `path` for direct I/O and, if asked, claims it exclusively (`O_EXCL` for a block
/// device, a file lock for a file), retrying a busy claim for [`CLAIM_RETRY_WINDOW`].
fn claim(path: &Path, options: OpenOptions, is_block: bool) -> Result<OwnedFd> {
    let deadline = Instant::now() + CLAIM_RETRY_WINDOW;
    loop {
        let claimed = open_direct(path, options, is_block).and_then(|fd| {
            if !is_block && options.exclusive {
                lock_file(&fd, path)?;
            }
            Ok(fd)
        });
        match claimed {
            Err(e) if e.kind() == ErrorKind::Busy && Instant::now() < deadline => {
                std::thread::sleep(CLAIM_RETRY_STEP);
            }
            other => return other,
        }
    }
}

fn open_direct(path: &Path, options: OpenOptions, is_block: bool) -> Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("path contains a NUL byte"))?;
    let access = if options.read_only {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    let excl = if is_block && options.exclusive {
        libc::O_EXCL
    } else {
        0
    };
    let flags = access | excl | libc::O_DIRECT | libc::O_CLOEXEC;
    // SAFETY: `cpath` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(cpath.as_ptr(), flags) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        let why = match err.raw_os_error() {
            Some(libc::EBUSY) => format!(
                "{} is in use (mounted, or held by another device)",
                path.display()
            ),
            Some(libc::EINVAL) => format!("{} does not support O_DIRECT", path.display()),
            _ => format!("cannot open {}", path.display()),
        };
        return Err(Error::io(why, err));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl_u64(fd: &OwnedFd, request: libc::c_ulong) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: the request writes one u64 (BLKGETSIZE64) into `value`, which is live.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut value as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_int(fd: &OwnedFd, request: libc::c_ulong) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int (BLKSSZGET/BLKPBSZGET) into `value`, which is live.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value as u32)
}

fn block_info(fd: &OwnedFd, path: &Path) -> Result<DeviceInfo> {
    let bytes =
        ioctl_u64(fd, BLKGETSIZE64).context(|| format!("cannot size {}", path.display()))?;
    let logical = ioctl_int(fd, BLKSSZGET)
        .context(|| format!("cannot read block size of {}", path.display()))?;
    let physical = ioctl_int(fd, BLKPBSZGET).unwrap_or(logical).max(logical);
    let queue = sysfs_queue(fd);
    let read = |name: &str| {
        queue
            .as_ref()
            .and_then(|q| std::fs::read_to_string(q.join(name)).ok())
    };
    let nonzero = |name: &str| {
        read(name)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|v| v > 0)
    };
    let block_sectors = u64::from(logical) / 512;
    Ok(DeviceInfo {
        name: path.display().to_string(),
        size: SectorCount::from_bytes_floor(bytes / u64::from(logical) * u64::from(logical)),
        logical_block_bytes: logical,
        physical_block_bytes: physical,
        discard: nonzero("discard_max_bytes"),
        write_zeroes: nonzero("write_zeroes_max_bytes"),
        volatile_cache: read("write_cache").is_none_or(|s| s.trim() == "write back"),
        fua: read("fua").is_some_and(|s| s.trim() == "1"),
        rotational: read("rotational").is_some_and(|s| s.trim() == "1"),
    })
    .inspect(|info: &DeviceInfo| debug_assert_eq!(info.size.0 % block_sectors.max(1), 0))
}

/// The sysfs `queue` folder of a block device (a partition's is its disk's).
fn sysfs_queue(fd: &OwnedFd) -> Option<PathBuf> {
    // SAFETY: fstat writes into a zeroed, live stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return None;
    }
    let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    [dev.join("queue"), dev.join("../queue")]
        .into_iter()
        .find(|q| q.is_dir())
}

/// The block of a regular file: 4 KiB, which O_DIRECT accepts on every local filesystem.
const FILE_BLOCK_BYTES: u64 = 4096;

fn file_info(meta: &std::fs::Metadata, path: &Path) -> DeviceInfo {
    let size = meta.len() / FILE_BLOCK_BYTES * FILE_BLOCK_BYTES;
    DeviceInfo {
        name: path.display().to_string(),
        size: SectorCount::from_bytes_floor(size),
        logical_block_bytes: 4096,
        physical_block_bytes: 4096,
        discard: true,
        write_zeroes: true,
        volatile_cache: true,
        fua: false,
        rotational: false,
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn size(&self) -> SectorCount {
        SectorCount(self.size.load(Ordering::SeqCst))
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        let fd = Arc::clone(&self.fd);
        let checked = self.check(Extent::new(offset, buf.sectors()));
        Box::pin(async move {
            if let Err(err) = checked {
                return (Err(err), buf);
            }
            rw_loop(fd, offset, RwBuf::Read(buf), WriteFlags::default())
                .await
                .into_read()
        })
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        let fd = Arc::clone(&self.fd);
        let checked = self.check(Extent::new(offset, buf.sectors()));
        Box::pin(async move {
            checked?;
            rw_loop(fd, offset, RwBuf::Write(buf), flags).await.0
        })
    }

    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        let reg = match buf {
            IoBuf::Owned(owned) => return owned_read(self.read(offset, owned)),
            IoBuf::Registered(reg) => reg,
        };
        let fd = Arc::clone(&self.fd);
        let checked = self.check_registered(offset, &reg);
        Box::pin(async move {
            if let Err(err) = checked.and_then(|()| reg.check_usable(reactor::current_ring_id())) {
                return (Err(err), IoBuf::Registered(reg));
            }
            let done = rw_loop(
                fd,
                offset,
                RwBuf::Fixed(reg.clone(), false),
                WriteFlags::default(),
            );
            (done.await.0, IoBuf::Registered(reg))
        })
    }

    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        let reg = match buf {
            IoBuf::Owned(owned) => return self.write(offset, owned, flags),
            IoBuf::Registered(reg) => reg,
        };
        let fd = Arc::clone(&self.fd);
        let checked = self.check_registered(offset, &reg);
        Box::pin(async move {
            checked?;
            reg.check_usable(reactor::current_ring_id())?;
            rw_loop(fd, offset, RwBuf::Fixed(reg, true), flags).await.0
        })
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        let fd = Arc::clone(&self.fd);
        Box::pin(async move {
            let sqe = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: fsync points at no memory; `fd` is kept open by `keep`.
            let (res, _fd) = unsafe { submit_owned(sqe, fd) }.await;
            cqe_result(res).map(|_| ())
        })
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if !self.info.discard {
            return Box::pin(std::future::ready(Err(errno(libc::EOPNOTSUPP))));
        }
        if !self.is_block {
            return self.fallocate(
                extent,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            );
        }
        let fd = Arc::clone(&self.fd);
        let checked = self.check(extent);
        Box::pin(async move {
            checked?;
            let range = [extent.start.to_bytes(), extent.len.to_bytes()];
            smol::unblock(move || {
                // SAFETY: BLKDISCARD reads two u64s from `range`, which is live.
                let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            })
            .await
        })
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.fallocate(
            extent,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }
}

impl UringDevice {
    /// A registered buffer's request: whole sectors on the device. (Whether the buffer is
    /// usable is checked when the I/O is submitted, on the ring it is submitted to.)
    fn check_registered(&self, offset: Sector, reg: &RegBuf) -> io::Result<()> {
        let sectors = crate::units::SectorCount::from_bytes_exact(reg.len() as u64)
            .ok_or_else(|| errno(libc::EINVAL))?;
        self.check(Extent::new(offset, sectors))
    }
}

/// The buffer of a read or a write in flight.
enum RwBuf {
    Read(AlignedBuf),
    Write(Arc<AlignedBuf>),
    /// A registered buffer (zero copy); `true` for a write.
    Fixed(RegBuf, bool),
}

impl RwBuf {
    fn len(&self) -> usize {
        match self {
            RwBuf::Read(b) => b.len(),
            RwBuf::Write(b) => b.len(),
            RwBuf::Fixed(reg, _) => reg.len(),
        }
    }
}

struct RwDone(io::Result<()>, RwBuf);

impl RwDone {
    fn into_read(self) -> ReadDone {
        match self.1 {
            RwBuf::Read(buf) => (self.0, buf),
            _ => unreachable!("a read completes with its read buffer"),
        }
    }
}

/// Issues a read or write, resubmitting the rest after a short transfer. A transfer of zero
/// bytes is an error (`EIO`): the extent was checked to lie on the device.
async fn rw_loop(
    mut fd: Arc<OwnedFd>,
    offset: Sector,
    mut buf: RwBuf,
    flags: WriteFlags,
) -> RwDone {
    let total = buf.len();
    let mut done = 0usize;
    while done < total {
        let sqe = rw_sqe(&fd, offset.to_bytes() + done as u64, &mut buf, done, flags);
        // SAFETY: the SQE points into `buf`'s heap allocation, which moves into `keep` with the
        // fd and stays put until the CQE; or, for a fixed buffer, at a registration that its
        // lease (in `keep`) holds until the CQE (checked usable before the first SQE).
        let (res, back) = unsafe { submit_owned(sqe, (buf, fd)) }.await;
        (buf, fd) = back;
        match cqe_result(res) {
            Ok(0) => return RwDone(Err(errno(libc::EIO)), buf),
            Ok(n) => done += n as usize,
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(err) => return RwDone(Err(err), buf),
        }
    }
    RwDone(Ok(()), buf)
}

/// The SQE that transfers `buf[done..]` at byte `pos`.
fn rw_sqe(
    fd: &OwnedFd,
    pos: u64,
    buf: &mut RwBuf,
    done: usize,
    flags: WriteFlags,
) -> io_uring::squeue::Entry {
    let len = u32::try_from(buf.len() - done).expect("request fits in u32");
    let fd = types::Fd(fd.as_raw_fd());
    match buf {
        RwBuf::Read(b) => {
            assert!(done < b.len());
            // SAFETY: `done < len <= capacity`, so the pointer stays inside the allocation.
            let ptr = unsafe { b.as_mut_ptr().add(done) };
            opcode::Read::new(fd, ptr, len).offset(pos).build()
        }
        RwBuf::Write(b) => {
            assert!(done < b.len());
            // SAFETY: as above.
            let ptr = unsafe { b.as_ptr().add(done) };
            opcode::Write::new(fd, ptr, len)
                .offset(pos)
                .rw_flags(write_flags(flags))
                .build()
        }
        // The address is the byte's place in the registration (0-based for a ublk request's
        // pages), which the kernel checks against the registered length.
        RwBuf::Fixed(reg, false) => {
            let addr = reg.sqe_addr(done) as *mut u8;
            opcode::ReadFixed::new(fd, addr, len, reg.index())
                .offset(pos)
                .build()
        }
        RwBuf::Fixed(reg, true) => {
            let addr = reg.sqe_addr(done) as *const u8;
            opcode::WriteFixed::new(fd, addr, len, reg.index())
                .offset(pos)
                .rw_flags(write_flags(flags))
                .build()
        }
    }
}

/// FUA as `RWF_DSYNC` (see module doc).
fn write_flags(flags: WriteFlags) -> i32 {
    if flags.fua {
        libc::RWF_DSYNC
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::{block_on_registered, RingId};
    use crate::device::RegLease;

    fn temp_device(bytes: u64) -> (tempfile::NamedTempFile, Arc<UringDevice>) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(bytes).expect("size");
        let dev = UringDevice::open(file.path(), OpenOptions::default()).expect("open");
        (file, Arc::new(dev))
    }

    /// Fixed-buffer writes and reads move the registered memory, parts of it included, and
    /// owned buffers still work through the same entry points.
    #[test]
    fn registered_buffers_are_read_and_written_with_fixed_buffer_io() {
        let (_file, dev) = temp_device(1 << 20);
        let mut src = AlignedBuf::new(64 << 10);
        for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let expected = src.as_slice().to_vec();
        let bufs = vec![src, AlignedBuf::new(64 << 10)];
        let d = Arc::clone(&dev);
        let (results, bufs) = block_on_registered(bufs, move |regs| async move {
            let [src, dst] = [regs[0].clone(), regs[1].clone()];
            let w = d
                .write_buf(Sector(64), IoBuf::Registered(src), WriteFlags::FUA)
                .await;
            let (r, back) = d.read_buf(Sector(64), IoBuf::Registered(dst.clone())).await;
            assert!(back.is_registered());
            // The second 4 KiB of the area, read into the middle of the destination.
            let part = dst.slice(16 << 10, 4096).expect("inside");
            let (p, _) = d.read_buf(Sector(72), IoBuf::Registered(part)).await;
            let (o, owned) = d
                .read_buf(Sector(64), IoBuf::Owned(AlignedBuf::new(4096)))
                .await;
            (w, r, p, o, owned)
        });
        let (w, r, p, o, owned) = results;
        assert!(
            w.is_ok() && r.is_ok() && p.is_ok() && o.is_ok(),
            "{w:?} {r:?} {p:?} {o:?}"
        );
        assert_eq!(bufs[1].as_slice()[..16 << 10], expected[..16 << 10]);
        assert_eq!(bufs[1].as_slice()[16 << 10..20 << 10], expected[4096..8192]);
        assert_eq!(bufs[1].as_slice()[20 << 10..], expected[20 << 10..]);
        let IoBuf::Owned(owned) = owned else {
            panic!("an owned read hands back its buffer")
        };
        assert_eq!(owned.as_slice(), &expected[..4096]);
    }

    /// A registered buffer is refused (EINVAL, nothing done) on another ring, after its lease,
    /// past the device or in part sectors.
    #[test]
    fn misused_registered_buffers_fail_with_einval() {
        let (_file, dev) = temp_device(64 << 10);
        let d = Arc::clone(&dev);
        let (errnos, _) =
            block_on_registered(vec![AlignedBuf::new(8192)], move |regs| async move {
                let reg = regs[0].clone();
                let foreign = RegBuf::new(RingId::fresh(), 0, 0, 4096, &RegLease::new());
                let ended = RegLease::new();
                let stale = RegBuf::new(
                    crate::device::reactor::current_ring_id().unwrap(),
                    0,
                    0,
                    4096,
                    &ended,
                );
                ended.end();
                let mut errnos = Vec::new();
                for (offset, buf) in [
                    (Sector(0), foreign),
                    (Sector(0), stale),
                    (Sector(120), reg.clone()),
                    (Sector(0), reg.slice(0, 1000).unwrap()),
                ] {
                    let (res, _) = d.read_buf(offset, IoBuf::Registered(buf.clone())).await;
                    let w = d
                        .write_buf(offset, IoBuf::Registered(buf), WriteFlags::default())
                        .await;
                    errnos.push((
                        res.unwrap_err().raw_os_error(),
                        w.unwrap_err().raw_os_error(),
                    ));
                }
                errnos
            });
        let einval = Some(libc::EINVAL);
        assert_eq!(errnos, vec![(einval, einval); 4]);
    }
}
