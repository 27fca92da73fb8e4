//! The daemon: one process per device, serving it until an orderly stop.
//!
//! A target with children (an origin and its snapshots) is one daemon serving several ublk
//! devices: the primary, whose id names the daemon (its socket, its log), and one device per
//! child, each on a thread of its own. The children's devices store
//! [`ChildSpec`] with the primary's id, so `recover` of the primary finds and takes
//! over the QUIESCED children too. The set of child devices follows the target's
//! [`Target::child_names`] after every command.
//!
//! `ublkdm add` and `ublkdm recover` fork a daemon ([`launch`]) and wait, bounded, for its
//! handshake: one JSON line per event on a pipe (`added`, then `live` with the block device
//! path, or `error` with the error's kind and chain). The parent prints the path and exits 0,
//! or prints the daemon's error and exits with its code. `--foreground` runs the same daemon
//! in the CLI process, logging to stderr ([`run_foreground`]).
//!
//! Invariants and why:
//! - the daemon lives in its own mount namespace with `/` private (ublk pitfall: a daemon that
//!   shares a namespace with a mount of its own device can deadlock on exit);
//! - its stdin/stdout/stderr are detached (`$(ublkdm add ...)` must return), stdout and stderr
//!   going to `/var/log/ublkdm/<id>.log`;
//! - device creation is bounded by a watchdog ([`START_TIMEOUT`]): a stuck kernel command ends
//!   the daemon with an error instead of hanging `add`;
//! - SIGTERM/SIGINT, and the control socket's `stop`, trigger one orderly stop: the target's
//!   `shutdown()` (bounded), then STOP_DEV; the queues drain and the device is deleted;
//! - online resize (`resize`, and any command after which the target is bigger) asks the
//!   driver for `UPDATE_SIZE` before anything changes, grows the target, then tells the kernel;
//!   the kernel's size only ever follows a growth of the target, also after `recover` (a
//!   resize the crash interrupted completes once the device is live);
//! - a panic anywhere is a bug: it is logged and the process aborts, so the device goes
//!   QUIESCED and `recover` can take over, rather than a half-alive daemon holding requests.
//!
//! Files: `launch.rs` (fork, log file, handshake), this file (the daemon proper: namespace,
//! signals, watchdog, commands and the orderly stop), `children.rs` (child devices),
//! `server.rs` (control socket and signal thread), `process.rs` (process helpers the CLI uses).

mod children;
mod launch;
mod process;
mod server;

pub use children::child_devices;
pub use launch::{init_logging, launch, log_path, run_foreground};
pub use process::{is_ublkdm, process_alive, signal};

use children::{claim_closed, ensure_unused, stop_child, ChildDevice};
use launch::Reporter;
use server::{start_control_socket, start_signal_thread};

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::control::{self, Command, Reply, Request, PROTOCOL_VERSION};
use crate::device::reactor;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::registry::Registry;
use crate::target::{ChildSpec, Target, TargetSpec};
use crate::ublk::{self, BufferPool, DevInfo, Device, DeviceConfig, Hooks, Start};
use crate::units::SectorCount;

/// Where daemons write their logs, one file per device.
pub const LOG_DIR: &str = "/var/log/ublkdm";
/// How long a daemon may take from start to a LIVE device before it gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `add`/`recover` wait for the daemon's handshake (the watchdog's bound, plus
/// margin for the daemon to report and clean up).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an orderly stop waits for the target's `shutdown()`.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon waits for its block device node to appear once the device is LIVE.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `launch` waits for the CLI's helper threads to be gone before it forks.
const FORK_SETTLE_TIMEOUT: Duration = Duration::from_secs(1);
/// The deepest queue of a child device (the primary's depth when smaller): a group may have
/// up to 64 children, and each tag costs the kernel a request and the queue ring 4 SQEs (and,
/// on a kernel without user copy, a buffer of its own).
const CHILD_MAX_DEPTH: u16 = 64;
/// The most queues of a child device (the primary's count when smaller): each queue is a
/// thread and a ring, and the children of a group share its one COW store.
const CHILD_MAX_QUEUES: u16 = 1;
/// How long stopping a child device may take before the daemon moves on.
const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed `accept` on the control socket (so an error cannot spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The daemon proper

/// Serves `spec` (and its children) until an orderly stop.
fn run(registry: &Registry, start: Start, spec: TargetSpec, reporter: Arc<Reporter>) -> Result<()> {
    ignore_sigpipe();
    private_mount_namespace()?;
    block_stop_signals()?;
    let target = registry.open(&spec)?;
    // What is stored with the device is the target as it is (a new mirror's identity, the
    // legs where they were found), not only as it was asked for.
    let spec = target.spec(&spec);
    log::info!("stored spec: {spec:?}");
    // The children a dead daemon left QUIESCED, to take over along with the primary.
    let (leftovers, config) = match start {
        Start::Recover(id) => (child_devices(id), None),
        Start::Add(config) => (Vec::new(), Some(config)),
    };
    // One budget for the request buffers of every device this daemon serves.
    let pool = BufferPool::new(ublk::BUFFER_BUDGET_BYTES, ublk::IDLE_BUFFER_BYTES);
    let live_pool = Arc::clone(&pool);
    let watchdog = Watchdog::start(Arc::clone(&reporter));
    let socket: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    let serving: Arc<Mutex<Option<Arc<Daemon>>>> = Arc::default();
    let live_socket = Arc::clone(&socket);
    let live_serving = Arc::clone(&serving);
    let live_target = Arc::clone(&target);
    let live_spec = spec.clone();
    let added_reporter = Arc::clone(&reporter);
    let hooks = Hooks {
        added: Box::new(move |id| {
            added_reporter.added(id);
            Ok(())
        }),
        live: Box::new(move |device| {
            let daemon = Arc::new(Daemon::new(
                device,
                live_target,
                live_spec,
                config,
                live_pool,
            ));
            *live_serving.lock().expect("daemon") = Some(Arc::clone(&daemon));
            // Children come up off the serving thread; the handshake waits for them.
            thread::spawn(move || {
                // A recovered target may hold more than the kernel serves (a resize the
                // crash interrupted), or have grown to the kernel's size at recovery.
                let _ = daemon.sync_size();
                daemon.refresh_spec();
                daemon.adopt_children(leftovers);
                *live_socket.lock().expect("socket path") = start_control_socket(&daemon);
                start_signal_thread(&daemon);
                watchdog.disarm();
                let path = daemon.device.block_device();
                wait_for_node(&path);
                reporter.live(daemon.device.id(), &path);
            });
        }),
    };
    let served = ublk::serve(start, target, &spec, hooks, &pool);
    if let Some(daemon) = serving.lock().expect("daemon").take() {
        // Stopped already in an orderly stop; this covers a primary stopped from outside.
        daemon.stop_children();
    }
    if let Some(path) = socket.lock().expect("socket path").take() {
        let _ = fs::remove_file(path);
    }
    served?;
    log::info!("stopped");
    Ok(())
}

/// A new mount namespace whose mounts do not propagate from the host's (see module doc).
fn private_mount_namespace() -> Result<()> {
    // SAFETY: unshare takes no pointers; the process is still single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(Error::io(
            "cannot create a private mount namespace",
            std::io::Error::last_os_error(),
        ));
    }
    let flags = libc::MS_REC | libc::MS_PRIVATE;
    // SAFETY: the strings are NUL-terminated literals; mount(2) allows null fstype and data
    // for a propagation change.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "cannot make / private in the daemon's namespace",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A control client that hangs up early must cost an EPIPE, not the daemon (the CLI restores
/// the default action so that `ublkdm list | head` behaves).
fn ignore_sigpipe() {
    // SAFETY: installs the SIG_IGN disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// The signals that stop the daemon.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write into the zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks the stop signals in this thread, and so in every thread spawned from now on; the
/// signal thread takes them with `sigwait`.
fn block_stop_signals() -> Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is a valid signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::io(
            "cannot block signals",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// Ends the daemon if the device is not LIVE within [`START_TIMEOUT`].
struct Watchdog {
    live: mpsc::Sender<()>,
}

impl Watchdog {
    fn start(reporter: Arc<Reporter>) -> Watchdog {
        let (live, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(START_TIMEOUT) {
                let err = Error::new(
                    ErrorKind::Daemon,
                    format!(
                        "the device was not live within {}s (is the ublk driver stuck?)",
                        START_TIMEOUT.as_secs()
                    ),
                );
                log::error!("{err}");
                reporter.error(&err);
                // SAFETY: _exit ends the process at once; a stuck kernel command leaves no
                // orderly way out.
                unsafe { libc::_exit(err.kind().exit_code()) };
            }
        });
        Watchdog { live }
    }

    fn disarm(&self) {
        let _ = self.live.send(());
    }
}

/// Waits (bounded) for devtmpfs to show the block device node.
fn wait_for_node(path: &Path) {
    let deadline = Instant::now() + NODE_TIMEOUT;
    while !path.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if !path.exists() {
        log::warn!(
            "{} did not appear within {}s",
            path.display(),
            NODE_TIMEOUT.as_secs()
        );
    }
}

/// What the control socket and the signal thread act on.
struct Daemon {
    device: Device,
    target: Arc<dyn Target>,
    /// The spec stored with the device: follows the target after every command.
    spec: Mutex<TargetSpec>,
    /// The shape of child devices: the primary's, at most [`CHILD_MAX_QUEUES`] x
    /// [`CHILD_MAX_DEPTH`].
    child_config: DeviceConfig,
    /// The request buffers of every device served (see [`ublk::BufferPool`]).
    pool: Arc<BufferPool>,
    stopping: AtomicBool,
    /// Served children by name; its lock also serialises commands, so that a command and the
    /// reconciliation after it are one step.
    children: Mutex<BTreeMap<String, ChildDevice>>,
}

impl Daemon {
    fn new(
        device: Device,
        target: Arc<dyn Target>,
        spec: TargetSpec,
        config: Option<DeviceConfig>,
        pool: Arc<BufferPool>,
    ) -> Daemon {
        let primary = config.unwrap_or_else(|| match device.info() {
            Ok(info) => DeviceConfig {
                queues: info.queues,
                depth: info.depth,
                io_buf_bytes: info.max_io_bytes,
                copy: !matches!(info.data_path, ublk::DataPath::ZeroCopy),
            },
            Err(_) => DeviceConfig::default(),
        });
        // Children (up to 64 snapshots) get fewer, shallower queues.
        let child_config = DeviceConfig {
            queues: primary.queues.min(CHILD_MAX_QUEUES),
            depth: primary.depth.min(CHILD_MAX_DEPTH),
            ..primary
        };
        Daemon {
            device,
            target,
            spec: Mutex::new(spec),
            child_config,
            pool,
            stopping: AtomicBool::new(false),
            children: Mutex::default(),
        }
    }
}

impl Daemon {
    /// A target command: refused if it needs the primary closed and it is open (which is then
    /// held exclusively until the command returns); the children it releases are stopped
    /// first (refused if one is in use), then the command runs, then the children follow the
    /// target.
    fn target_command(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value> {
        let mut children = self.children();
        if self.target.command_grows(name, args) {
            self.device.require_resize()?;
        }
        let _claimed = match self.target.command_needs_closed(name, args) {
            Some(advice) => Some(claim_closed(&self.device.block_device(), &advice)?),
            None => None,
        };
        for child in self.target.command_releases(name, args) {
            if let Some(served) = children.get(&child) {
                ensure_unused(&child, &served.device.block_device())?;
                let served = children.remove(&child).expect("present");
                stop_child(&child, served);
            }
        }
        let result = self.target.command(name, args);
        // Even a failed command may have changed the target (a replace-leg that emptied its
        // slot): the stored spec follows what the target is now, and so does the kernel's size.
        let told = self.sync_size();
        self.refresh_spec();
        let errors = self.reconcile(&mut children, &BTreeMap::new());
        let mut reply = result?;
        told.map_err(|e| {
            e.context(format!(
                "'{name}' grew the target, but the device did not follow"
            ))
        })?;
        let named = reply
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        if let Some(named) = named {
            if let Some(child) = children.get(&named) {
                reply["id"] = child.device.id().into();
                reply["device"] = child.device.block_device().to_string_lossy().into();
            } else if let Some((_, err)) = errors.into_iter().find(|(name, _)| *name == named) {
                // The command took effect (a snapshot was taken); only its device is missing.
                return Err(err.context(self.target.child_not_started(&named)));
            }
        }
        Ok(reply)
    }

    /// `ublkdm resize`: refused on a kernel that cannot resize a live device (nothing
    /// changed), then the target grows (to `to`, or to all that its devices hold), then the
    /// kernel is told and the spec stored. Serialised with the target's commands.
    fn resize(&self, to: Option<SectorCount>) -> Result<serde_json::Value> {
        let _serial = self.children();
        self.device.require_resize()?;
        let old = self.target.size();
        if let Some(to) = to {
            let block = self.target.info().logical_block_sectors().0.max(1);
            if to.0 % block != 0 || to.is_zero() {
                return Err(Error::invalid(format!(
                    "{} sectors is not a whole number of the device's {}-byte blocks",
                    to.0,
                    self.target.info().logical_block_bytes
                )));
            }
            if to < old {
                return Err(Error::invalid(format!(
                    "shrinking is refused: device {} serves {} bytes, {} asked",
                    self.device.id(),
                    old.to_bytes(),
                    to.to_bytes()
                )));
            }
        }
        let grown = self.target.resize(to);
        let told = self.sync_size();
        self.refresh_spec();
        let new = grown?;
        told?;
        Ok(serde_json::json!({
            "old_size_sectors": old.0,
            "size_sectors": new.0,
            "device": self.device.block_device(),
        }))
    }

    /// Tells the kernel the target's size when it grew (by `resize`, by a command such as a
    /// mirror's `grow`, or before a crash the kernel did not hear of). The kernel's size only
    /// ever follows a growth; a failure is logged and returned (the target has grown, the
    /// device still serves the old size: a later command or `resize` tries again).
    fn sync_size(&self) -> Result<()> {
        let target = self.target.size();
        let kernel = self.device.size()?;
        if target <= kernel {
            return Ok(());
        }
        let told = self
            .device
            .require_resize()
            .and_then(|()| self.device.update_size(target));
        match &told {
            Ok(()) => log::info!("device resized from {} to {} sectors", kernel.0, target.0),
            Err(err) => log::error!(
                "the target holds {} sectors, the device serves {}: {}",
                target.0,
                kernel.0,
                err.chain().join(": ")
            ),
        }
        told
    }

    /// Stores the target's current spec with the device when it changed, so that `recover`
    /// rebuilds the target as it is now. A failure is logged: the command itself took effect.
    fn refresh_spec(&self) {
        let mut spec = self.spec.lock().expect("spec");
        let now = self.target.spec(&spec);
        if now == *spec {
            return;
        }
        match self.device.update_spec(&now) {
            Ok(()) => log::info!("stored spec: {now:?}"),
            Err(err) => log::error!(
                "the stored spec still says {spec:?}: {}",
                err.chain().join(": ")
            ),
        }
        *spec = now;
    }

    /// The orderly stop, once: the children's devices, the target's shutdown (bounded), then
    /// STOP_DEV.
    fn stop(&self, why: &str) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop_children();
        log::info!("stopping ({why}): shutting the target down");
        // On a thread of its own (with its own ring), so that a shutdown that never finishes
        // only costs that thread.
        let (done_tx, done_rx) = mpsc::channel();
        let shutdown = {
            let target = Arc::clone(&self.target);
            move || {
                let done = reactor::try_block_on(async move { target.shutdown().await })
                    .and_then(|res| res.map_err(|e| Error::io("the target's shutdown failed", e)));
                let _ = done_tx.send(done);
            }
        };
        let outcome = match thread::Builder::new()
            .name("shutdown".into())
            .spawn(shutdown)
        {
            Ok(_) => done_rx.recv_timeout(SHUTDOWN_TIMEOUT).ok(),
            Err(err) => Some(Err(Error::io("cannot start the shutdown thread", err))),
        };
        match outcome {
            Some(Ok(())) => log::info!("target shut down"),
            Some(Err(err)) => log::error!("{}", err.chain().join(": ")),
            None => log::error!(
                "target shutdown did not finish within {}s",
                SHUTDOWN_TIMEOUT.as_secs()
            ),
        }
        if let Err(err) = self.device.stop() {
            log::error!("{}", err.chain().join(": "));
        }
    }

    fn status(&self) -> Result<serde_json::Value> {
        let info = self.device.info()?;
        Ok(serde_json::json!({
            "device": info,
            "daemon": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "log": log_path(self.device.id()),
                "stopping": self.stopping.load(Ordering::SeqCst),
                "request_buffers": self.pool.stats(),
            },
            "spec": self.spec.lock().expect("spec").clone(),
            "target": { "kind": self.target.kind(), "status": self.target.status() },
            "io": self.device.stats().to_json(),
            "children": self.children_json(),
        }))
    }

    fn dispatch(self: &Arc<Self>, request: Request) -> Result<serde_json::Value> {
        if request.version != PROTOCOL_VERSION {
            return Err(Error::invalid(format!(
                "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                request.version
            )));
        }
        match request.command {
            Command::Status => self.status(),
            Command::Stop => {
                let daemon = Arc::clone(self);
                thread::spawn(move || daemon.stop("stop requested on the control socket"));
                Ok(serde_json::json!({ "stopping": true }))
            }
            Command::Resize { size_sectors } => self.resize(size_sectors.map(SectorCount)),
            Command::Target { name, args } => self.target_command(&name, &args),
        }
    }
}
