//! The ublk front end: the only user of libublk.
//!
//! It owns the life of a ublk device: creating it (ADD_DEV) or taking a quiesced one over
//! (START/END_USER_RECOVERY), serving a [`Target`] on one thread per queue ([`queue`]), stopping
//! and deleting it; and, for the CLI, reading the state of any device ([`query`], [`device_ids`],
//! [`remove`]). Targets never see ublk; the daemon sees only [`serve`], [`Device`],
//! [`DevInfo`] and the [`BufferPool`] it gives every device it serves.
//!
//! Memory: a device's request data goes through the daemon's one [`BufferPool`], leased per
//! request (`UBLK_F_USER_COPY`, asked for every new device), so the daemon's request buffers
//! are bounded by the pool's limit whatever the number of devices, and an idle device holds
//! none. A kernel without user copy (before 6.5) gives each tag its own mapped buffer instead
//! (resident once used, outside the pool). Threads: each device costs one thread per queue
//! (its ring: about `depth x 4` SQEs) besides the thread that serves it.
//!
//! Queue threads are not pinned. The driver maps each queue to the CPUs that submit to it, and
//! libublk would pin the queue's thread to them; with as many queues as CPUs that is the one
//! CPU the application submits from, so the server could never run beside its client and
//! every request waited for the application to yield its CPU (on a 2-CPU guest, pinned: 4 KiB
//! random requests at depth 32 at 0.55-0.57x and 1 MiB writes at 0.69x of the same device
//! unpinned, one boot, three interleaved rounds). A queue thread keeps the CPUs the daemon was
//! started with (a `taskset` or cgroup still applies) and the scheduler places it, as it
//! places the kernel's own I/O workers for dm and md.
//!
//! Features are detected, never assumed ([`features`]): a new device asks for the flags the
//! driver reported in GET_FEATURES that ublkdm uses (zero copy for a target that never needs
//! the data, `Target::zero_copy`, unless `--copy`), and its data path ([`DataPath`]) is read
//! from the flags the driver granted, also after a recovery (the kernel keeps them).
//!
//! Invariants:
//! - every device is created with `UBLK_F_USER_RECOVERY`, and serving fails if the kernel did
//!   not grant it: a daemon that dies must leave a QUIESCED device that `recover` can take over;
//! - the [`TargetSpec`] is stored in the device's json (`target_data`), the only state besides
//!   the kernel's that survives the daemon; [`Device::update_spec`] replaces it while the
//!   device runs (libublk writes that json only at start), so that `recover` rebuilds the
//!   target as it is now (a mirror's current legs), not as it was added;
//! - a device is deleted only once its queue threads are gone (DEL_DEV waits for the char device
//!   to be released, and would wait forever on our own open queues).

mod features;
mod params;
mod pool;
mod queue;

pub use features::{
    data_path, data_path_text, detect as detect_features, device_flags, kernel_release, DataPath,
    FeatureInfo, FeatureRow, Features, Use, FEATURES, ZERO_COPY_FLAGS,
};
pub use pool::{BufferPool, PoolStats};

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use crate::error::{Error, ErrorKind, Result};
use crate::target::{Target, TargetSpec};
use crate::units::SectorCount;
use queue::{Buffers, QueueShared};

/// Queues of a new device unless asked otherwise.
pub const DEFAULT_QUEUES: u16 = 2;
/// The most queues a device may have (one thread each).
pub const MAX_QUEUES: u16 = 16;
/// Requests in flight per queue unless asked otherwise.
pub const DEFAULT_DEPTH: u16 = 128;
/// The deepest queue we accept: each tag owns an io buffer, so depth bounds memory.
pub const MAX_DEPTH: u16 = 512;
/// The io buffer of each tag, and so the largest request the kernel sends (max_sectors). 1 MiB,
/// as the kernel's own stacked targets pass on from a virtio or NVMe disk: at 512 KiB every
/// 1 MiB request became two, each with its round trip through the daemon and its own I/O on
/// every backing device, which is what bounds large requests in zero copy.
pub const IO_BUF_BYTES: u32 = 1 << 20;
/// A daemon's request-buffer budget: what all its devices' requests in flight may hold at once
/// (64 requests of the largest size; in zero copy requests hold none of it).
pub const BUFFER_BUDGET_BYTES: usize = 64 << 20;
/// The part of the budget kept for reuse when no request needs it.
pub const IDLE_BUFFER_BYTES: usize = 8 << 20;
/// Where the ublk driver says how many devices it allows.
const UBLKS_MAX_PATH: &str = "/sys/module/ublk_drv/parameters/ublks_max";
/// SQEs one tag may have on the queue ring at once (its ublk command plus target I/O); sizes
/// the ring's SQ and CQ so that completions never overflow.
const SQES_PER_TAG: u16 = 4;
/// How long a failed start waits for its queue threads to exit before leaving the device.
const QUEUE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`query`] waits for the driver.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`remove`] waits for STOP_DEV and DEL_DEV.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries of a control ring (one command at a time is in flight).
const CTRL_RING_ENTRIES: u32 = 16;
/// The control device of the ublk driver.
const CONTROL_PATH: &str = "/dev/ublk-control";
/// Where the driver lists its devices (`ublkcN`).
const CHAR_CLASS_DIR: &str = "/sys/class/ublk-char";
/// The key of our data in the device json's `target_data`.
const JSON_KEY: &str = "ublkdm";
/// The version of what we store under [`JSON_KEY`].
const JSON_VERSION: u64 = 1;

/// The shape of a new device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
    /// Copy mode even where the target and the driver could serve in zero copy (`--copy`).
    pub copy: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
            io_buf_bytes: IO_BUF_BYTES,
            copy: false,
        }
    }
}

impl DeviceConfig {
    /// Refuses queue counts and depths outside the bounds above.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(Error::invalid(format!(
                "--queues must be 1..={MAX_QUEUES}, not {}",
                self.queues
            )));
        }
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return Err(Error::invalid(format!(
                "--depth must be 1..={MAX_DEPTH}, not {}",
                self.depth
            )));
        }
        Ok(())
    }
}

/// How [`serve`] gets its device.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// Create a new device.
    Add(DeviceConfig),
    /// Take over device `id`, QUIESCED after its daemon died.
    Recover(u32),
}

/// A device's state, as the driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DevState {
    Dead,
    Live,
    Quiesced,
    FailIo,
    Unknown,
}

impl DevState {
    fn from_raw(state: u16) -> DevState {
        match u32::from(state) {
            sys::UBLK_S_DEV_DEAD => DevState::Dead,
            sys::UBLK_S_DEV_LIVE => DevState::Live,
            sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
            _ => DevState::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DevState::Dead => "DEAD",
            DevState::Live => "LIVE",
            DevState::Quiesced => "QUIESCED",
            DevState::FailIo => "FAIL_IO",
            DevState::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for DevState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the driver (and the stored json) says about one device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevInfo {
    pub id: u32,
    pub state: DevState,
    /// The pid of the daemon that started (or last recovered) the device.
    pub daemon_pid: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// The `UBLK_F_*` flags the driver granted.
    pub flags: u64,
    /// How request data moves, from the granted flags (`copy` or `zero-copy`).
    #[serde(default)]
    pub data_path: DataPath,
    pub user_recovery: bool,
    /// Size in bytes, when the device has parameters.
    pub size_bytes: Option<u64>,
    pub block_device: PathBuf,
    /// The target, as stored when the device was last started.
    pub spec: Option<TargetSpec>,
}

/// Request counters of a device, shared by its queue threads.
pub struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
    /// Zero-copy requests served in copy mode after all (see `queue::ZeroCopy`).
    zero_copy_fallbacks: AtomicU64,
    io_flusher: Vec<AtomicBool>,
}

impl Stats {
    fn new(queues: u16) -> Stats {
        Stats {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            write_zeroes: AtomicU64::new(0),
            other: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            zero_copy_fallbacks: AtomicU64::new(0),
            io_flusher: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn record(&self, op: u32, res: i32) {
        let counter = match op {
            sys::UBLK_IO_OP_READ => &self.reads,
            sys::UBLK_IO_OP_WRITE => &self.writes,
            sys::UBLK_IO_OP_FLUSH => &self.flushes,
            sys::UBLK_IO_OP_DISCARD => &self.discards,
            sys::UBLK_IO_OP_WRITE_ZEROES => &self.write_zeroes,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if res < 0 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_fallback(&self) {
        self.zero_copy_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Zero-copy requests served in copy mode so far.
    pub fn zero_copy_fallbacks(&self) -> u64 {
        self.zero_copy_fallbacks.load(Ordering::Relaxed)
    }

    fn set_io_flusher(&self, qid: u16, on: bool) {
        if !on {
            log::warn!("queue {qid}: the queue thread is not an IO_FLUSHER");
        }
        if let Some(flag) = self.io_flusher.get(usize::from(qid)) {
            flag.store(on, Ordering::Relaxed);
        }
    }

    /// The counters as JSON, for `status`.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "reads": get(&self.reads),
            "writes": get(&self.writes),
            "flushes": get(&self.flushes),
            "discards": get(&self.discards),
            "write_zeroes": get(&self.write_zeroes),
            "other": get(&self.other),
            "errors": get(&self.errors),
            "zero_copy_fallbacks": get(&self.zero_copy_fallbacks),
            "io_flusher": self.io_flusher.iter().map(|f| f.load(Ordering::Relaxed)).collect::<Vec<_>>(),
        })
    }
}

/// A device being served, as the daemon's other threads see it.
#[derive(Clone)]
pub struct Device {
    ctrl: Arc<UblkCtrl>,
    stats: Arc<Stats>,
}

impl Device {
    pub fn id(&self) -> u32 {
        self.ctrl.dev_info().dev_id
    }

    pub fn block_device(&self) -> PathBuf {
        PathBuf::from(self.ctrl.get_bdev_path())
    }

    /// The driver's current view of the device.
    pub fn info(&self) -> Result<DevInfo> {
        ctrl_ring_for_this_thread()?;
        self.ctrl
            .read_dev_info()
            .map_err(|e| ublk_error(format!("cannot read device {}", self.id()), e))?;
        Ok(dev_info(&self.ctrl, None))
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Replaces the spec stored with the device (what `recover` and `list` read). libublk
    /// exports the device json to a file when the device starts and rereads it whenever a
    /// control is opened; we rewrite that file's `target_data` whole, through a rename, so
    /// a reader sees the old spec or the new one, never a mix.
    pub fn update_spec(&self, spec: &TargetSpec) -> Result<()> {
        rewrite_stored_spec(Path::new(&self.ctrl.run_path()), spec)
    }

    /// Refuses (Unsupported, exit 5) unless the driver can resize a live device
    /// (`UBLK_F_UPDATE_SIZE`): asked of the driver each time, never assumed.
    pub fn require_resize(&self) -> Result<()> {
        ctrl_ring_for_this_thread()?;
        features::require_resize_here()
    }

    /// The size the kernel serves the device at now.
    pub fn size(&self) -> Result<SectorCount> {
        let bytes = self.info()?.size_bytes.ok_or_else(|| {
            Error::new(
                ErrorKind::Daemon,
                format!("device {} has no parameters", self.id()),
            )
        })?;
        Ok(SectorCount::from_bytes_floor(bytes))
    }

    /// UPDATE_SIZE: the kernel serves the device at `size` from now on (the block device's
    /// capacity changes at once, and udev hears of it). Only ever a growth: the caller checks.
    pub fn update_size(&self, size: SectorCount) -> Result<()> {
        ctrl_ring_for_this_thread()?;
        self.ctrl
            .update_size(size.to_bytes())
            .map(drop)
            .map_err(|e| {
                ublk_error(
                    format!(
                        "cannot resize device {} to {} bytes",
                        self.id(),
                        size.to_bytes()
                    ),
                    e,
                )
            })
    }

    /// STOP_DEV: the kernel removes the block device, fails what is queued and aborts the queue
    /// commands, so the queue threads exit and [`serve`] returns (and deletes the device).
    pub fn stop(&self) -> Result<()> {
        ctrl_ring_for_this_thread()?;
        self.ctrl
            .kill_dev()
            .map(drop)
            .map_err(|e| ublk_error(format!("cannot stop device {}", self.id()), e))
    }
}

/// Control commands go through a thread-local ring that libublk creates only on the thread
/// that built the control; any other thread that sends commands needs its own.
fn ctrl_ring_for_this_thread() -> Result<()> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::builder()
                    .build(CTRL_RING_ENTRIES)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| ublk_error("cannot create a control ring".into(), e))
}

/// Called by [`serve`] as the device comes up.
pub struct Hooks {
    /// The device exists and has this id (not yet serving).
    pub added: Box<dyn FnOnce(u32) -> Result<()>>,
    /// The device is LIVE; called on the serving thread, must return promptly.
    pub live: Box<dyn FnOnce(Device) + Send + Sync>,
}

/// Serves `target` as a ublk device until the device is stopped, then deletes it. Its
/// requests lease their buffers from `pool`.
pub fn serve(
    start: Start,
    target: Arc<dyn Target>,
    spec: &TargetSpec,
    hooks: Hooks,
    pool: &Arc<BufferPool>,
) -> Result<()> {
    require_driver()?;
    // The parameters say the target's present size (a target may have grown since it was
    // opened; SET_PARAMS runs only for a new device, a recovered one keeps the kernel's).
    let target_info = crate::device::DeviceInfo {
        size: target.size(),
        ..target.info().clone()
    };
    if let Start::Add(config) = start {
        // Refuse a target the kernel cannot serve before a device exists.
        params::device_params(&target_info, config.io_buf_bytes)?;
        check_pool(pool, config.io_buf_bytes)?;
    }
    let ctrl = Arc::new(match start {
        Start::Add(config) => add_ctrl(config, target.kind(), target.zero_copy())?,
        Start::Recover(id) => recover_ctrl(id, &*target)?,
    });
    let info = ctrl.dev_info();
    check_granted_flags(&ctrl)?;
    check_pool(pool, info.max_io_buf_bytes)?;
    let params = params::device_params(&target_info, info.max_io_buf_bytes)?;
    (hooks.added)(info.dev_id)?;
    let stats = Arc::new(Stats::new(info.nr_hw_queues));
    let shared = Arc::new(QueueShared {
        target: Arc::clone(&target),
        stats: Arc::clone(&stats),
        io_buf_bytes: usize::try_from(info.max_io_buf_bytes).expect("io buffer fits in memory"),
        buffers: buffers_for(&ctrl, pool),
    });
    let threads = Arc::new(ThreadCount::default());
    let json = stored_json(spec);
    let ring_depth = info.queue_depth.saturating_mul(SQES_PER_TAG);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = params.basic.dev_sectors << crate::units::SECTOR_SHIFT;
        dev.tgt.params = params;
        dev.tgt.sq_depth = ring_depth;
        dev.tgt.cq_depth = ring_depth;
        dev.set_target_json(json);
        Ok(())
    };
    let queue_threads = Arc::clone(&threads);
    let queue_fn = move |qid: u16, dev: &UblkDev| {
        let _running = queue_threads.enter();
        queue::serve_queue(qid, dev, &shared);
    };
    let device = Device {
        ctrl: Arc::clone(&ctrl),
        stats,
    };
    let live = hooks.live;
    match run_device(&ctrl, tgt_init, queue_fn, move || live(device)) {
        Ok(()) => delete_stopped(&ctrl),
        Err(err) => Err(abandon_start(&ctrl, &threads, err)),
    }
}

/// libublk's `run_target`, with thread creation that may fail: every queue thread exists
/// before any of them touches the device, so a thread the system refuses is an error (not a
/// panic, which would abort the daemon and every device it serves) and leaves a device that
/// never started. Returns once the device is stopped and its queue threads are gone.
fn run_device<T, Q>(ctrl: &UblkCtrl, tgt_init: T, queue_fn: Q, live: impl FnOnce()) -> Result<()>
where
    T: FnOnce(&mut UblkDev) -> Result<(), UblkError>,
    Q: Fn(u16, &UblkDev) + Send + Sync + 'static,
{
    let id = ctrl.dev_info().dev_id;
    let dev = UblkDev::new(ctrl.get_name(), tgt_init, ctrl)
        .map_err(|e| ublk_error(format!("cannot set up device {id}"), e))?;
    let dev = Arc::new(dev);
    let queue_fn = Arc::new(queue_fn);
    let gate = Arc::new(Gate::default());
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for qid in 0..dev.dev_info.nr_hw_queues {
        let (dev, queue_fn, held) = (Arc::clone(&dev), Arc::clone(&queue_fn), Arc::clone(&gate));
        let tid_tx = tid_tx.clone();
        let spawned = thread::Builder::new()
            .name(format!("ublk{id}q{qid}"))
            .spawn(move || {
                let tid = UblkCtrl::init_queue_thread();
                if held.wait() {
                    let _ = tid_tx.send((qid, tid));
                    queue_fn(qid, &dev);
                }
            });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(err) => {
                gate.open(false);
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(thread_error(
                    format!("cannot start a queue thread of device {id}"),
                    err,
                ));
            }
        }
    }
    gate.open(true);
    for _ in 0..handles.len() {
        let Ok((qid, tid)) = tid_rx.recv() else { break };
        // No ctrl.set_thread_affinity: queue threads are not pinned (module doc).
        if let Err(err) = ctrl.configure_queue(&dev, qid, tid) {
            log::warn!("device {id} queue {qid}: configuring the queue failed: {err}");
        }
    }
    ctrl.start_dev(&dev)
        .map_err(|e| ublk_error(format!("cannot start device {id}"), e))?;
    live();
    for handle in handles {
        if handle.join().is_err() {
            log::error!("device {id}: a queue thread panicked");
        }
    }
    // STOP_DEV, for a device stopped from outside (the driver says ENOENT if it is gone).
    let _ = ctrl.stop_dev();
    Ok(())
}

/// Holds the queue threads of [`run_device`] until all exist: `Some(true)` lets them serve,
/// `Some(false)` sends them away.
#[derive(Default)]
struct Gate {
    open: Mutex<Option<bool>>,
    opened: Condvar,
}

impl Gate {
    fn open(&self, go: bool) {
        *self.open.lock().expect("gate") = Some(go);
        self.opened.notify_all();
    }

    fn wait(&self) -> bool {
        let open = self.open.lock().expect("gate");
        let open = self.opened.wait_while(open, |o| o.is_none()).expect("gate");
        open.expect("opened")
    }
}

/// A thread the system would not create: EAGAIN is a full resource (a thread or memory
/// limit), so Busy.
pub fn thread_error(message: String, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::EAGAIN) {
        Error::with_source(ErrorKind::Busy, message, err)
    } else {
        Error::io(message, err)
    }
}

/// Refuses a largest request that `pool` could never lend a buffer for.
fn check_pool(pool: &BufferPool, io_buf_bytes: u32) -> Result<()> {
    let fits = usize::try_from(io_buf_bytes).is_ok_and(|bytes| pool.check_lease(bytes));
    if fits {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "requests of {io_buf_bytes} bytes do not fit the daemon's buffer budget of {} bytes",
            pool.limit()
        )))
    }
}

/// Where the device's request data goes: its own pages when the kernel granted automatic
/// buffer registration (zero copy), else the pool when it granted user copy.
fn buffers_for(ctrl: &UblkCtrl, pool: &Arc<BufferPool>) -> Buffers {
    let info = ctrl.dev_info();
    let user_copy = info.flags & u64::from(sys::UBLK_F_USER_COPY) != 0;
    if info.flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0 {
        return Buffers::Registered {
            fallback: user_copy.then(|| Arc::clone(pool)),
        };
    }
    if user_copy {
        return Buffers::Leased(Arc::clone(pool));
    }
    log::warn!(
        "device {}: the ublk driver has no user copy (Linux 6.5+): each tag keeps a buffer of \
         its own, outside the daemon's buffer budget",
        info.dev_id
    );
    Buffers::PerTag
}

/// ADD_DEV for a target of `kind`; `zero_copy`: the target never needs the data.
fn add_ctrl(config: DeviceConfig, kind: &str, zero_copy: bool) -> Result<UblkCtrl> {
    config.validate()?;
    let features = features::query_here()?;
    let flags = device_flags(features.as_ref(), zero_copy && !config.copy);
    match features {
        Some(f) => log::info!(
            "ublk driver features {:#x} ({}); asking for {}",
            f.mask(),
            Features::names(f.mask()).join(" "),
            Features::names(flags).join(" ")
        ),
        None => log::info!("the ublk driver has no GET_FEATURES (before Linux 6.5)"),
    }
    UblkCtrlBuilder::default()
        .name(kind)
        .id(-1)
        .nr_queues(config.queues)
        .depth(config.depth)
        .io_buf_bytes(config.io_buf_bytes)
        // Without user copy (not offered) the queues use buffers per tag.
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(add_error)
}

/// ADD_DEV's failure. EACCES from a privileged caller means the driver has as many devices as
/// its `ublks_max` allows: a full resource (Busy), said with the way out.
fn add_error(err: UblkError) -> Error {
    let full =
        matches!(err, UblkError::OtherError(e) | UblkError::UringIOError(e) if e == -libc::EACCES);
    if !full {
        return ublk_error("cannot create a ublk device".into(), err);
    }
    let limit = std::fs::read_to_string(UBLKS_MAX_PATH)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    Error::new(
        ErrorKind::Busy,
        format!(
            "cannot create a ublk device: the ublk driver allows {limit} devices and has them \
             all (raise {UBLKS_MAX_PATH})"
        ),
    )
}

/// START_USER_RECOVERY on QUIESCED device `id`, then a control for it with the same geometry.
fn recover_ctrl(id: u32, target: &dyn Target) -> Result<UblkCtrl> {
    let old = open_ctrl(id)?;
    let info = dev_info(&old, None);
    if info.state != DevState::Quiesced {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "device {id} is {}, not QUIESCED: only a device whose daemon died can be recovered",
                info.state
            ),
        ));
    }
    if !info.user_recovery {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("device {id} was created without user recovery"),
        ));
    }
    check_recovered_size(id, info.size_bytes, target)?;
    // libublk retries EBUSY (the old daemon not fully gone) for a bounded time.
    old.start_user_recover()
        .map_err(|e| ublk_error(format!("cannot start recovery of device {id}"), e))?;
    let raw = old.dev_info();
    UblkCtrlBuilder::default()
        .name(target.kind())
        .id(i32::try_from(id)
            .map_err(|_| Error::invalid(format!("device id {id} is out of range")))?)
        .nr_queues(raw.nr_hw_queues)
        .depth(raw.queue_depth)
        .io_buf_bytes(raw.max_io_buf_bytes)
        .ctrl_flags(u64::from(sys::UBLK_F_USER_RECOVERY))
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| ublk_error(format!("cannot reopen device {id} for recovery"), e))
}

/// A recovered target must hold at least what the kernel serves. One that holds more grew by
/// design (a resize the daemon had not yet told the kernel of, a backing device extended):
/// it is served, and the daemon tells the kernel once live. One that holds less is first asked
/// to grow to the kernel's size (its growth was told to the kernel but not yet stored in its
/// spec); if it cannot, its backing store shrank: refused (Corrupt).
fn check_recovered_size(id: u32, kernel: Option<u64>, target: &dyn Target) -> Result<()> {
    let kernel = kernel.ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!("device {id} has no size (no parameters)"),
        )
    })?;
    let has = target.size().to_bytes();
    if has >= kernel {
        return Ok(());
    }
    let grown = SectorCount::from_bytes_exact(kernel)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("device {id}'s size is not whole sectors"),
            )
        })
        .and_then(|size| target.resize(Some(size)));
    match grown {
        Ok(size) if size.to_bytes() == kernel => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "the backing store of device {id} shrank: the device serves {kernel} bytes, \
                 its target holds {has}"
            ),
        )),
    }
}

/// The kernel silently drops flags it does not know; user recovery is not optional here.
fn check_granted_flags(ctrl: &UblkCtrl) -> Result<()> {
    let flags = ctrl.dev_info().flags;
    if flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("the ublk driver refused user recovery (granted flags {flags:#x}); Linux 6.1 or later is needed"),
        ));
    }
    log::info!(
        "device {}: granted flags {flags:#x} ({}); data path {}",
        ctrl.dev_info().dev_id,
        Features::names(flags).join(" "),
        data_path(flags)
    );
    Ok(())
}

/// After the queues stopped: DEL_DEV, which is safe now that nothing of ours holds the device.
fn delete_stopped(ctrl: &UblkCtrl) -> Result<()> {
    let id = ctrl.dev_info().dev_id;
    ctrl.del_dev()
        .map(drop)
        .map_err(|e| ublk_error(format!("cannot delete device {id}"), e))?;
    log::info!("device {id} deleted");
    Ok(())
}

/// After a failed start: stop the device so that the queue threads exit, then delete it if
/// they did (DEL_DEV would hang while they hold the char device).
fn abandon_start(ctrl: &UblkCtrl, threads: &ThreadCount, error: Error) -> Error {
    let id = ctrl.dev_info().dev_id;
    log::error!("{}; stopping the device", error.chain().join(": "));
    if let Err(e) = ctrl.kill_dev() {
        log::warn!("stop of device {id} failed: {e}");
    }
    if threads.wait_idle(QUEUE_EXIT_TIMEOUT) {
        if let Err(e) = ctrl.del_dev() {
            log::warn!("delete of device {id} failed: {e}");
        }
    } else {
        log::error!(
            "queue threads of device {id} did not exit; leaving the device for `ublkdm del {id}`"
        );
        ctrl.disown();
    }
    error
}

/// Counts running queue threads so that a failed start can wait for them.
#[derive(Default)]
struct ThreadCount {
    running: Mutex<usize>,
    idle: Condvar,
}

struct ThreadGuard<'a>(&'a ThreadCount);

impl ThreadCount {
    fn enter(&self) -> ThreadGuard<'_> {
        *self.running.lock().expect("thread count") += 1;
        ThreadGuard(self)
    }

    /// Waits up to `timeout` for every thread to leave; true if they did.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let running = self.running.lock().expect("thread count");
        let (running, _) = self
            .idle
            .wait_timeout_while(running, timeout, |n| *n > 0)
            .expect("thread count");
        *running == 0
    }
}

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        *self.0.running.lock().expect("thread count") -= 1;
        self.0.idle.notify_all();
    }
}

/// What we store in the device json so that `recover` can rebuild the target.
fn stored_json(spec: &TargetSpec) -> serde_json::Value {
    serde_json::json!({ JSON_KEY: { "version": JSON_VERSION, "spec": spec } })
}

/// Replaces the `target_data` of the device json file at `path` with [`stored_json`] of
/// `spec`, keeping the rest (queues, flags) as libublk wrote it.
fn rewrite_stored_spec(path: &Path, spec: &TargetSpec) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let what = || format!("cannot update the stored spec in {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(what(), e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::with_source(ErrorKind::Corrupt, format!("{}: not json", what()), e))?;
    let Some(object) = json.as_object_mut() else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{}: not a json object", what()),
        ));
    };
    object.insert("target_data".into(), stored_json(spec));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        use std::io::Write;
        // libublk keeps the file to the device's owner; so do we.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&tmp)?;
        file.write_all(json.to_string().as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(what(), e)
    })
}

/// The spec stored by [`stored_json`], if the json holds one we understand.
fn spec_from_json(json: Option<serde_json::Value>) -> Option<TargetSpec> {
    let ours = json?.get(JSON_KEY)?.clone();
    if ours.get("version")?.as_u64()? != JSON_VERSION {
        return None;
    }
    serde_json::from_value(ours.get("spec")?.clone()).ok()
}

// ---------------------------------------------------------------------------------------------
// Queries for the CLI

/// Fails clearly when the ublk driver is not loaded.
pub fn require_driver() -> Result<()> {
    if Path::new(CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("the ublk driver is not loaded ({CONTROL_PATH} is missing; try 'modprobe ublk_drv')"),
        ))
    }
}

/// Whether the ublk driver is loaded.
pub fn driver_loaded() -> bool {
    require_driver().is_ok()
}

/// The ids of every ublk device on the host (ours or not), ascending.
pub fn device_ids() -> Vec<u32> {
    let ids = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&ids);
    UblkCtrl::for_each_dev_id(move |id| sink.borrow_mut().push(id));
    let mut ids = ids.take();
    ids.sort_unstable();
    ids
}

/// Whether device `id` exists (its char device is registered).
pub fn device_exists(id: u32) -> bool {
    Path::new(CHAR_CLASS_DIR)
        .join(format!("ublkc{id}"))
        .exists()
}

/// The state of device `id`. Bounded by [`QUERY_TIMEOUT`].
pub fn query(id: u32) -> Result<DevInfo> {
    require_driver()?;
    on_scratch_thread(QUERY_TIMEOUT, format!("reading device {id}"), move || {
        open_ctrl(id).map(|ctrl| dev_info(&ctrl, None))
    })
}

/// Runs `f` on a short-lived thread and waits up to `timeout` for it. libublk keeps a control
/// ring per thread for the thread's life; the CLI's main thread must not own one, because
/// `add`/`recover` fork the daemon from it and the child would inherit (and share with the
/// parent) that ring. The bound keeps a stuck driver from hanging the CLI.
fn on_scratch_thread<T: Send + 'static>(
    timeout: Duration,
    what: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let helper = thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let _ = done_tx.send(f());
        })
        .map_err(|e| Error::io("cannot start a thread", e))?;
    match done_rx.recv_timeout(timeout) {
        Ok(result) => {
            // It ends right after sending: join it, so that it and its ring are gone before
            // the caller may fork.
            let _ = helper.join();
            result
        }
        Err(_) => Err(Error::new(
            ErrorKind::Daemon,
            format!(
                "{what}: the ublk driver did not answer within {}s",
                timeout.as_secs()
            ),
        )),
    }
}

/// STOP_DEV and DEL_DEV on device `id`, from outside its daemon: only for a device whose
/// daemon is gone (with a live daemon, DEL_DEV could wait for it forever). Bounded.
pub fn remove(id: u32) -> Result<()> {
    require_driver()?;
    on_scratch_thread(REMOVE_TIMEOUT, format!("deleting device {id}"), move || {
        let ctrl = open_ctrl(id)?;
        // STOP may fail on a device that never started; DEL decides.
        let _ = ctrl.kill_dev();
        ctrl.del_dev()
            .map(drop)
            .map_err(|e| ublk_error(format!("cannot delete device {id}"), e))
    })
}

fn open_ctrl(id: u32) -> Result<UblkCtrl> {
    let raw_id =
        i32::try_from(id).map_err(|_| Error::invalid(format!("device id {id} is out of range")))?;
    if !device_exists(id) {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("there is no ublk device {id}"),
        ));
    }
    UblkCtrl::new_simple(raw_id).map_err(|e| ublk_error(format!("cannot open ublk device {id}"), e))
}

/// The [`DevInfo`] of `ctrl`'s last read device info; `spec` overrides the stored one.
fn dev_info(ctrl: &UblkCtrl, spec: Option<TargetSpec>) -> DevInfo {
    let raw = ctrl.dev_info();
    let mut params = sys::ublk_params::default();
    let size_bytes = ctrl
        .get_params(&mut params)
        .ok()
        .filter(|_| params.types & sys::UBLK_PARAM_TYPE_BASIC != 0)
        .map(|_| params.basic.dev_sectors << crate::units::SECTOR_SHIFT);
    DevInfo {
        id: raw.dev_id,
        state: DevState::from_raw(raw.state),
        daemon_pid: raw.ublksrv_pid,
        queues: raw.nr_hw_queues,
        depth: raw.queue_depth,
        max_io_bytes: raw.max_io_buf_bytes,
        flags: raw.flags,
        data_path: data_path(raw.flags),
        user_recovery: raw.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0,
        size_bytes,
        block_device: PathBuf::from(ctrl.get_bdev_path()),
        spec: spec.or_else(|| spec_from_json(ctrl.get_target_data_from_json())),
    }
}

/// An [`Error`] for a failed libublk call, classified by its errno where it has one.
fn ublk_error(message: String, err: UblkError) -> Error {
    let errno = match &err {
        UblkError::OtherError(e) | UblkError::UringIOError(e) => Some(e.abs()),
        UblkError::IOError(e) => e.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(e) if e > 0 => Error::io(message, io::Error::from_raw_os_error(e)),
        _ => Error::with_source(ErrorKind::Daemon, message, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_round_trips_through_the_device_json() {
        let spec = TargetSpec::new("linear", &serde_json::json!({ "device": "/dev/vda" }));
        assert_eq!(spec_from_json(Some(stored_json(&spec))), Some(spec));
        assert_eq!(spec_from_json(Some(serde_json::json!({"loop": {}}))), None);
        assert_eq!(spec_from_json(None), None);
    }

    #[test]
    fn the_stored_spec_is_replaced_in_the_device_json_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("0003.json");
        let old = TargetSpec::new("linear", &serde_json::json!({ "device": "/dev/vda" }));
        let file = serde_json::json!({
            "dev_info": { "dev_id": 3 },
            "target_data": stored_json(&old),
            "queues": { "0": { "qid": 0 } },
        });
        std::fs::write(&path, file.to_string()).expect("write");
        let new = TargetSpec::new("linear", &serde_json::json!({ "device": "/dev/vdb" }));
        rewrite_stored_spec(&path, &new).expect("rewrite");
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back["queues"], file["queues"], "the rest is kept");
        assert_eq!(back["dev_info"], file["dev_info"]);
        assert_eq!(spec_from_json(Some(back["target_data"].clone())), Some(new));
        assert!(rewrite_stored_spec(&dir.path().join("missing.json"), &old).is_err());
    }

    /// A target of `size` sectors that can grow to `holds` (what its devices hold).
    struct Growable {
        info: crate::device::DeviceInfo,
        size: AtomicU64,
        holds: u64,
    }

    impl Growable {
        fn new(size: u64, holds: u64) -> Growable {
            Growable {
                info: crate::device::DeviceInfo {
                    name: "growable".into(),
                    size: SectorCount(size),
                    logical_block_bytes: 512,
                    physical_block_bytes: 512,
                    discard: false,
                    write_zeroes: false,
                    volatile_cache: false,
                    fua: false,
                    rotational: false,
                },
                size: AtomicU64::new(size),
                holds,
            }
        }
    }

    impl crate::device::BlockDevice for Growable {
        fn info(&self) -> &crate::device::DeviceInfo {
            &self.info
        }
        fn size(&self) -> SectorCount {
            SectorCount(self.size.load(Ordering::SeqCst))
        }
        fn read(
            &self,
            _: crate::units::Sector,
            buf: crate::device::AlignedBuf,
        ) -> crate::device::IoFuture<crate::device::ReadDone> {
            Box::pin(std::future::ready((
                Err(crate::device::errno(libc::EIO)),
                buf,
            )))
        }
        fn write(
            &self,
            _: crate::units::Sector,
            _: Arc<crate::device::AlignedBuf>,
            _: crate::device::WriteFlags,
        ) -> crate::device::IoFuture<io::Result<()>> {
            Box::pin(std::future::ready(Err(crate::device::errno(libc::EIO))))
        }
        fn flush(&self) -> crate::device::IoFuture<io::Result<()>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn discard(&self, _: crate::units::Extent) -> crate::device::IoFuture<io::Result<()>> {
            Box::pin(std::future::ready(Err(crate::device::errno(libc::EIO))))
        }
        fn write_zeroes(&self, _: crate::units::Extent) -> crate::device::IoFuture<io::Result<()>> {
            Box::pin(std::future::ready(Err(crate::device::errno(libc::EIO))))
        }
    }

    impl Target for Growable {
        fn kind(&self) -> &'static str {
            "growable"
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn resize(&self, to: Option<SectorCount>) -> Result<SectorCount> {
            let to = to.map_or(self.holds, |n| n.0);
            if to > self.holds {
                return Err(Error::invalid("does not fit"));
            }
            self.size.fetch_max(to, Ordering::SeqCst);
            Ok(SectorCount(self.size.load(Ordering::SeqCst)))
        }
    }

    /// Recovery takes a target the size the kernel serves or bigger (it grew by design), grows
    /// one that is smaller when it can (its growth was told to the kernel, not yet stored), and
    /// refuses one whose devices shrank.
    #[test]
    fn a_recovered_target_may_have_grown_but_not_shrunk() {
        let kib = |sectors: u64| sectors * 512;
        assert!(check_recovered_size(1, Some(kib(2048)), &Growable::new(2048, 2048)).is_ok());
        assert!(check_recovered_size(1, Some(kib(2048)), &Growable::new(4096, 4096)).is_ok());
        let behind = Growable::new(2048, 8192);
        assert!(check_recovered_size(1, Some(kib(4096)), &behind).is_ok());
        let size = crate::device::BlockDevice::size(&behind);
        assert_eq!(size, SectorCount(4096), "grown to the kernel's size");
        let shrank = Growable::new(2048, 2048);
        let err = check_recovered_size(1, Some(kib(4096)), &shrank).expect_err("shrank");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("shrank"), "{err}");
        let err = check_recovered_size(1, None, &shrank).expect_err("no parameters");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn configs_are_bounded() {
        assert!(DeviceConfig::default().validate().is_ok());
        assert!(DeviceConfig {
            queues: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(DeviceConfig {
            depth: MAX_DEPTH + 1,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn libublk_errors_keep_their_errno() {
        let err = ublk_error("x".into(), UblkError::OtherError(-libc::EBUSY));
        assert_eq!(err.kind(), ErrorKind::Busy);
        let err = ublk_error("x".into(), UblkError::QueueIsDown);
        assert_eq!(err.kind(), ErrorKind::Daemon);
    }

    #[test]
    fn a_full_resource_at_device_start_is_busy() {
        let eagain = io::Error::from_raw_os_error(libc::EAGAIN);
        assert_eq!(thread_error("t".into(), eagain).kind(), ErrorKind::Busy);
        let other = io::Error::from_raw_os_error(libc::EINVAL);
        assert_eq!(
            thread_error("t".into(), other).kind(),
            ErrorKind::InvalidArgument
        );
        let full = add_error(UblkError::OtherError(-libc::EACCES));
        assert_eq!(full.kind(), ErrorKind::Busy);
        assert!(full.to_string().contains("ublks_max"), "{full}");
        let err = add_error(UblkError::OtherError(-libc::ENOMEM));
        assert_eq!(err.kind(), ErrorKind::Io);
    }

    #[test]
    fn the_gate_lets_every_waiter_through_or_none() {
        for go in [true, false] {
            let gate = Arc::new(Gate::default());
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let gate = Arc::clone(&gate);
                    thread::spawn(move || gate.wait())
                })
                .collect();
            gate.open(go);
            for waiter in waiters {
                assert_eq!(waiter.join().expect("waiter"), go);
            }
        }
    }

    #[test]
    fn the_pool_must_hold_the_largest_request() {
        let pool = BufferPool::new(BUFFER_BUDGET_BYTES, IDLE_BUFFER_BYTES);
        assert!(check_pool(&pool, IO_BUF_BYTES).is_ok());
        let small = BufferPool::new(256 << 10, 0);
        assert_eq!(
            check_pool(&small, IO_BUF_BYTES).map_err(|e| e.kind()),
            Err(ErrorKind::InvalidArgument)
        );
    }
}
