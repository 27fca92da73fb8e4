//! The daemon: one process per device, serving it until an orderly stop.
//!
//! A target with children (an origin and its snapshots) is one daemon serving several ublk
//! devices: the primary, whose id names the daemon (its socket, its log), and one device per
//! child, each on a thread of its own. The children's devices store
//! [`TargetSpec::Child`] with the primary's id, so `recover` of the primary finds and takes
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
//! - a panic anywhere is a bug: it is logged and the process aborts, so the device goes
//!   QUIESCED and `recover` can take over, rather than a half-alive daemon holding requests.

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
use crate::target::{Target, TargetSpec};
use crate::targets;
use crate::ublk::{self, DevInfo, Device, DeviceConfig, Hooks, Start};

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
/// up to 64 children, and a tag's io buffer is memory.
const CHILD_MAX_DEPTH: u16 = 64;
/// How long stopping a child device may take before the daemon moves on.
const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed `accept` on the control socket (so an error cannot spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Handshake

/// One line on the handshake pipe.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Added { id: u32 },
    Live { id: u32, path: PathBuf },
    Error { kind: String, chain: Vec<String> },
}

/// Where the daemon reports its progress: the handshake pipe, or (in the foreground) stdout.
struct Reporter {
    /// `None` in the foreground; the pipe is closed once the device is live, so that the
    /// parent's reader sees the end at once (a CLI that starts several daemons, such as
    /// `assemble --scan`, must be down to one thread before each fork).
    pipe: Option<Mutex<Option<File>>>,
    log: Option<LogFile>,
}

impl Reporter {
    fn send(&self, event: &Event) {
        let Some(pipe) = &self.pipe else { return };
        let mut line = serde_json::to_string(event).expect("events serialize");
        line.push('\n');
        let mut pipe = pipe.lock().expect("handshake pipe");
        if let Some(file) = pipe.as_mut() {
            // The parent may be gone (it gave up waiting): nothing to do about that.
            let _ = file.write_all(line.as_bytes());
        }
        if matches!(event, Event::Live { .. }) {
            *pipe = None;
        }
    }

    fn added(&self, id: u32) {
        log::info!("serving ublk device {id}");
        if let Some(log) = &self.log {
            log.name_after(id);
        }
        self.send(&Event::Added { id });
    }

    fn live(&self, id: u32, path: &Path) {
        log::info!("device {id} is LIVE as {}", path.display());
        if self.pipe.is_none() {
            println!("{}", path.display());
        }
        self.send(&Event::Live {
            id,
            path: path.to_owned(),
        });
    }

    fn error(&self, err: &Error) {
        self.send(&Event::Error {
            kind: err.kind().name().to_owned(),
            chain: err.chain(),
        });
    }
}

/// The daemon's log file, named after the device once its id is known.
struct LogFile {
    path: Mutex<PathBuf>,
}

impl LogFile {
    /// Opens the log for `start`: `<id>.log` (appended) when recovering, a per-pid name that
    /// [`LogFile::name_after`] renames for a new device.
    fn open(start: &Start) -> Result<(LogFile, File)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(LOG_DIR)
            .context(|| format!("cannot create {LOG_DIR}"))?;
        let path = match start {
            Start::Recover(id) => log_path(*id),
            Start::Add(_) => {
                Path::new(LOG_DIR).join(format!("starting-{}.log", std::process::id()))
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .context(|| format!("cannot open {}", path.display()))?;
        Ok((
            LogFile {
                path: Mutex::new(path),
            },
            file,
        ))
    }

    /// Removes the log of a daemon that failed before it created a device: the user saw its
    /// error, and nothing else happened worth keeping.
    fn remove_if_unnamed(&self) {
        let path = self.path.lock().expect("log path");
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("starting-"))
        {
            let _ = fs::remove_file(&*path);
        }
    }

    /// Renames the log to `<id>.log`, keeping a previous device's log as `<id>.log.old`.
    fn name_after(&self, id: u32) {
        let mut path = self.path.lock().expect("log path");
        let target = log_path(id);
        if *path == target {
            return;
        }
        let _ = fs::rename(&target, target.with_extension("log.old"));
        match fs::rename(&*path, &target) {
            Ok(()) => *path = target,
            Err(err) => log::warn!(
                "cannot rename {} to {}: {err}",
                path.display(),
                target.display()
            ),
        }
    }
}

/// The log of device `id`'s daemon.
pub fn log_path(id: u32) -> PathBuf {
    Path::new(LOG_DIR).join(format!("{id}.log"))
}

// ---------------------------------------------------------------------------------------------
// Launching

/// Forks a daemon for `start` and waits for its device to be LIVE: returns the block device.
pub fn launch(start: Start, spec: TargetSpec) -> Result<PathBuf> {
    let (read_end, write_end) = pipe()?;
    // Helper threads of earlier queries may still be exiting: give them a moment.
    let deadline = Instant::now() + FORK_SETTLE_TIMEOUT;
    while thread_count() > 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(thread_count(), 1, "fork from a multi-threaded process");
    // SAFETY: the process is single-threaded (asserted above), so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io(
            "cannot fork the daemon",
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(read_end);
            let code = daemon_child(start, spec, write_end);
            std::process::exit(code)
        }
        pid => {
            drop(write_end);
            wait_for_handshake(pid, read_end, start)
        }
    }
}

/// Runs the daemon in this process (`--foreground`): logs to stderr, prints the block device
/// once LIVE, returns when the device has been stopped and deleted.
pub fn run_foreground(start: Start, spec: TargetSpec) -> Result<()> {
    install_panic_hook();
    run(
        start,
        spec,
        Arc::new(Reporter {
            pipe: None,
            log: None,
        }),
    )
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the live array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "cannot create a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    Ok((read, write))
}

/// User threads of this process (forking is only safe with one). io_uring's kernel workers
/// (`iou-wrk-*`, `iou-sqp-*`) are listed as threads too but are not copied by fork and hold no
/// user locks, so they do not count.
fn thread_count() -> usize {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 1;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            fs::read_to_string(t.path().join("comm")).map_or(true, |comm| !comm.starts_with("iou-"))
        })
        .count()
}

/// The parent's side of the handshake, bounded by [`HANDSHAKE_TIMEOUT`].
fn wait_for_handshake(pid: libc::pid_t, pipe: File, start: Start) -> Result<PathBuf> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut id = match start {
        Start::Recover(id) => Some(id),
        Start::Add(_) => None,
    };
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| {
                Error::new(
                    ErrorKind::Daemon,
                    format!(
                        "the daemon (pid {pid}) did not report within {}s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                )
            })?;
        let Some(line) = line else {
            return Err(daemon_vanished(pid, id));
        };
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Added { id: added }) => id = Some(added),
            Ok(Event::Live { path, .. }) => return Ok(path),
            Ok(Event::Error { kind, chain }) => {
                return Err(Error::from_remote(ErrorKind::from_name(&kind), &chain))
            }
            Err(err) => log::warn!("unexpected line from the daemon: {line:?} ({err})"),
        }
    }
}

/// The error for a daemon that closed the handshake without a verdict (it crashed).
fn daemon_vanished(pid: libc::pid_t, id: Option<u32>) -> Error {
    let log = id.map_or_else(
        || Path::new(LOG_DIR).join(format!("starting-{pid}.log")),
        log_path,
    );
    Error::new(
        ErrorKind::Daemon,
        format!(
            "the daemon (pid {pid}) exited before the device was live; see {}",
            log.display()
        ),
    )
}

/// The forked child: detach, log to a file, run, report.
fn daemon_child(start: Start, spec: TargetSpec, pipe: File) -> i32 {
    // SAFETY: setsid takes no arguments; it fails only if we already lead a group (harmless).
    unsafe { libc::setsid() };
    let reporter = Reporter {
        pipe: Some(Mutex::new(Some(pipe))),
        log: None,
    };
    let (log, file) = match LogFile::open(&start)
        .and_then(|(log, file)| detach_stdio(&file).map(|()| (log, file)))
    {
        Ok(opened) => opened,
        Err(err) => {
            reporter.error(&err);
            return err.kind().exit_code();
        }
    };
    drop(file);
    init_logging();
    install_panic_hook();
    let reporter = Arc::new(Reporter {
        log: Some(log),
        ..reporter
    });
    log::info!(
        "ublkdm {} daemon, pid {}: {spec:?}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    match run(start, spec, Arc::clone(&reporter)) {
        Ok(()) => 0,
        Err(err) => {
            log::error!("{}", err.chain().join(": "));
            reporter.error(&err);
            if let Some(log) = &reporter.log {
                log.remove_if_unnamed();
            }
            err.kind().exit_code()
        }
    }
}

/// stdin from /dev/null, stdout and stderr to `log`, cwd `/`.
fn detach_stdio(log: &File) -> Result<()> {
    let null = File::open("/dev/null").context(|| "cannot open /dev/null".to_owned())?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (log.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        // SAFETY: dup2 on fds we own onto the standard fds; no memory is involved.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(Error::io(
                "cannot redirect stdio",
                std::io::Error::last_os_error(),
            ));
        }
    }
    std::env::set_current_dir("/").context(|| "cannot chdir to /".to_owned())
}

/// Logging for a daemon: `info` unless `RUST_LOG` says otherwise, to stderr (the log file).
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// A panic in the daemon is a bug: log it and abort, so the device goes QUIESCED (see module doc).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        log::error!("bug: {info}\n{backtrace}");
        eprintln!("bug: {info}; aborting (the device stays QUIESCED for 'ublkdm recover')");
        std::process::abort();
    }));
}

// ---------------------------------------------------------------------------------------------
// The daemon proper

/// Serves `spec` (and its children) until an orderly stop.
fn run(start: Start, spec: TargetSpec, reporter: Arc<Reporter>) -> Result<()> {
    ignore_sigpipe();
    private_mount_namespace()?;
    block_stop_signals()?;
    let target = targets::open_target(&spec)?;
    // What is stored with the device is the target as it is (a new mirror's identity, the
    // legs where they were found), not only as it was asked for.
    let spec = target.spec(&spec);
    log::info!("stored spec: {spec:?}");
    // The children a dead daemon left QUIESCED, to take over along with the primary.
    let (leftovers, config) = match start {
        Start::Recover(id) => (child_devices(id), None),
        Start::Add(config) => (Vec::new(), Some(config)),
    };
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
            let daemon = Arc::new(Daemon::new(device, live_target, live_spec, config));
            *live_serving.lock().expect("daemon") = Some(Arc::clone(&daemon));
            // Children come up off the serving thread; the handshake waits for them.
            thread::spawn(move || {
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
    let served = ublk::serve(start, target, &spec, hooks);
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

/// The devices served as children of device `parent`, as the driver lists them.
pub fn child_devices(parent: u32) -> Vec<DevInfo> {
    ublk::device_ids()
        .into_iter()
        .filter_map(|id| ublk::query(id).ok())
        .filter(
            |info| matches!(&info.spec, Some(TargetSpec::Child { parent: p, .. }) if *p == parent),
        )
        .collect()
}

/// The name of a child device, from its stored spec.
fn child_name(info: &DevInfo) -> Option<&str> {
    match &info.spec {
        Some(TargetSpec::Child { name, .. }) => Some(name),
        _ => None,
    }
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

/// A child's device and the thread serving it.
struct ChildDevice {
    device: Device,
    thread: thread::JoinHandle<()>,
}

/// What the control socket and the signal thread act on.
struct Daemon {
    device: Device,
    target: Arc<dyn Target>,
    /// The spec stored with the device: follows the target after every command.
    spec: Mutex<TargetSpec>,
    /// The shape of child devices: the primary's.
    child_config: DeviceConfig,
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
    ) -> Daemon {
        let primary = config.unwrap_or_else(|| match device.info() {
            Ok(info) => DeviceConfig {
                queues: info.queues,
                depth: info.depth,
                io_buf_bytes: info.max_io_bytes,
            },
            Err(_) => DeviceConfig::default(),
        });
        // Each tag owns an io buffer: children (up to 64 snapshots) get shallower queues.
        let child_config = DeviceConfig {
            depth: primary.depth.min(CHILD_MAX_DEPTH),
            ..primary
        };
        Daemon {
            device,
            target,
            spec: Mutex::new(spec),
            child_config,
            stopping: AtomicBool::new(false),
            children: Mutex::default(),
        }
    }

    fn children(&self) -> MutexGuard<'_, BTreeMap<String, ChildDevice>> {
        self.children.lock().expect("children")
    }

    /// Brings up every child: a leftover QUIESCED device is taken over, the rest are created;
    /// leftovers of children that no longer exist are deleted.
    fn adopt_children(&self, leftovers: Vec<DevInfo>) {
        let mut children = self.children();
        let wanted = self.target.child_names();
        let mut recover = BTreeMap::new();
        for info in leftovers {
            match child_name(&info) {
                Some(name) if wanted.iter().any(|w| w == name) => {
                    recover.insert(name.to_owned(), info.id);
                }
                _ => {
                    log::info!("deleting device {}, a child that no longer exists", info.id);
                    if let Err(err) = ublk::remove(info.id) {
                        log::error!("{}", err.chain().join(": "));
                    }
                }
            }
        }
        for error in self.reconcile(&mut children, &recover) {
            log::error!("{}", error.chain().join(": "));
        }
    }

    /// Makes the served children the target's: stops those it no longer has and starts the
    /// new ones (taking over `recover`'s devices). Returns the errors, per child.
    fn reconcile(
        &self,
        children: &mut BTreeMap<String, ChildDevice>,
        recover: &BTreeMap<String, u32>,
    ) -> Vec<Error> {
        let wanted = self.target.child_names();
        let gone: Vec<String> = children
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            let child = children.remove(&name).expect("listed");
            stop_child(&name, child);
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        for name in wanted {
            if children.contains_key(&name) {
                continue;
            }
            let start = recover
                .get(&name)
                .map_or(Start::Add(self.child_config), |&id| Start::Recover(id));
            match self.start_child(&name, start) {
                Ok(child) => {
                    children.insert(name, child);
                }
                Err(err) => errors.push(err),
            }
        }
        errors
    }

    /// Serves child `name` on a thread of its own; returns once its device is LIVE.
    fn start_child(&self, name: &str, start: Start) -> Result<ChildDevice> {
        let target = self.target.open_child(name)?;
        let spec = TargetSpec::Child {
            parent: self.device.id(),
            kind: target.kind().to_owned(),
            name: name.to_owned(),
        };
        let (tx, rx) = mpsc::channel::<Result<Device>>();
        let failed = tx.clone();
        let thread_name = name.to_owned();
        let thread = thread::Builder::new()
            .name(format!("child {name}"))
            .spawn(move || {
                let hooks = Hooks {
                    added: Box::new(move |id| {
                        log::info!("child '{thread_name}' is ublk device {id}");
                        Ok(())
                    }),
                    live: Box::new(move |device| {
                        let _ = tx.send(Ok(device));
                    }),
                };
                if let Err(err) = ublk::serve(start, target, &spec, hooks) {
                    log::error!("{}", err.chain().join(": "));
                    let _ = failed.send(Err(err));
                }
            })
            .map_err(|e| Error::io("cannot start a thread", e))?;
        let context = |err: Error| err.context(format!("cannot serve '{name}'"));
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(device)) => {
                wait_for_node(&device.block_device());
                log::info!(
                    "child '{name}' is LIVE as {}",
                    device.block_device().display()
                );
                Ok(ChildDevice { device, thread })
            }
            Ok(Err(err)) => Err(context(err)),
            Err(_) => Err(context(Error::new(
                ErrorKind::Daemon,
                format!(
                    "its device was not live within {}s",
                    START_TIMEOUT.as_secs()
                ),
            ))),
        }
    }

    /// Stops every child's device, waiting for them together (bounded).
    fn stop_children(&self) {
        let children = std::mem::take(&mut *self.children());
        for (name, child) in &children {
            request_stop(name, child);
        }
        let deadline = Instant::now() + CHILD_STOP_TIMEOUT;
        for (name, child) in children {
            await_child(&name, child, deadline);
        }
    }

    /// A target command: the children it releases are stopped first (refused if one is in
    /// use), then the command runs, then the children follow the target.
    fn target_command(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value> {
        let mut children = self.children();
        for child in self.target.command_releases(name, args) {
            if let Some(served) = children.get(&child) {
                ensure_unused(&child, &served.device.block_device())?;
                let served = children.remove(&child).expect("present");
                stop_child(&child, served);
            }
        }
        let result = self.target.command(name, args);
        // Even a failed command may have changed the target (a replace-leg that emptied its
        // slot): the stored spec follows what the target is now.
        self.refresh_spec();
        let errors = self.reconcile(&mut children, &BTreeMap::new());
        let mut reply = result?;
        let named = reply
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        if let Some(named) = named {
            if let Some(child) = children.get(&named) {
                reply["id"] = child.device.id().into();
                reply["device"] = child.device.block_device().to_string_lossy().into();
            } else if let Some(err) = errors.into_iter().next() {
                return Err(err);
            }
        }
        Ok(reply)
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

    fn children_json(&self) -> serde_json::Value {
        let children = self.children();
        children
            .iter()
            .map(|(name, child)| {
                serde_json::json!({
                    "name": name,
                    "id": child.device.id(),
                    "device": child.device.block_device(),
                    "io": child.device.stats().to_json(),
                })
            })
            .collect()
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
                let _ = done_tx.send(reactor::block_on(async move { target.shutdown().await }));
            }
        };
        let outcome = match thread::Builder::new()
            .name("shutdown".into())
            .spawn(shutdown)
        {
            Ok(_) => done_rx.recv_timeout(SHUTDOWN_TIMEOUT).ok(),
            Err(err) => Some(Err(err)),
        };
        match outcome {
            Some(Ok(())) => log::info!("target shut down"),
            Some(Err(err)) => log::error!("target shutdown failed: {err}"),
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
            Command::Target { name, args } => self.target_command(&name, &args),
        }
    }
}

/// Binds `/run/ublkdm/<id>.sock` and serves it on a thread; the path, or `None` if it could
/// not be bound (the device still works; `del` then falls back to signals).
fn start_control_socket(daemon: &Arc<Daemon>) -> Option<PathBuf> {
    let path = control::socket_path(daemon.device.id());
    match bind_socket(&path) {
        Ok(listener) => {
            let daemon = Arc::clone(daemon);
            thread::spawn(move || serve_control(&listener, &daemon));
            Some(path)
        }
        Err(err) => {
            log::error!("no control socket: {}", err.chain().join(": "));
            None
        }
    }
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    let dir = Path::new(control::SOCKET_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .context(|| format!("cannot restrict {}", dir.display()))?;
    // A socket left by a daemon that died (the device was then recovered by us).
    let _ = fs::remove_file(path);
    let listener =
        UnixListener::bind(path).context(|| format!("cannot bind {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Serves one connection at a time, each bounded by the protocol's timeouts.
fn serve_control(listener: &UnixListener, daemon: &Arc<Daemon>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => handle_connection(&stream, daemon),
            Err(err) => {
                log::warn!("control socket accept failed: {err}");
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn handle_connection(stream: &UnixStream, daemon: &Arc<Daemon>) {
    let timeouts = stream
        .set_read_timeout(Some(control::IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(control::IO_TIMEOUT)));
    if let Err(err) = timeouts {
        log::warn!("control connection: {err}");
        return;
    }
    let reply = match control::read_message::<Request>(stream)
        .and_then(|request| daemon.dispatch(request))
    {
        Ok(result) => Reply::success(result),
        Err(err) => Reply::failure(&err),
    };
    if let Err(err) = control::write_message(stream, &reply) {
        log::warn!("control reply not sent: {err}");
    }
}

/// Takes SIGTERM/SIGINT (blocked everywhere else) and stops the daemon.
fn start_signal_thread(daemon: &Arc<Daemon>) {
    let daemon = Arc::clone(daemon);
    thread::spawn(move || {
        let set = stop_signals();
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set and `signal` a live out-parameter.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        if rc != 0 {
            log::error!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
            return;
        }
        let name = if signal == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        daemon.stop(name);
    });
}

/// STOP_DEV on a child's device, then waits (bounded) for its thread to delete it.
fn stop_child(name: &str, child: ChildDevice) {
    request_stop(name, &child);
    await_child(name, child, Instant::now() + CHILD_STOP_TIMEOUT);
}

/// STOP_DEV on a child's device; its thread then deletes it.
fn request_stop(name: &str, child: &ChildDevice) {
    log::info!("stopping child '{name}' (device {})", child.device.id());
    if let Err(err) = child.device.stop() {
        log::error!("{}", err.chain().join(": "));
    }
}

/// Waits until `deadline` for a stopped child's thread to delete its device and end. (DEL_DEV
/// waits for the last opener of the block device: a process that keeps it open holds it.)
fn await_child(name: &str, child: ChildDevice, deadline: Instant) {
    while !child.thread.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if child.thread.is_finished() {
        let _ = child.thread.join();
    } else {
        log::error!(
            "child '{name}' (device {}) did not stop within {}s",
            child.device.id(),
            CHILD_STOP_TIMEOUT.as_secs()
        );
    }
}

/// Fails with Busy when `path` is open anywhere: held exclusively (a mount, a stacked device)
/// or open in any process, the way device-mapper refuses to remove a device whose open count
/// is not zero. (Stopping a device that a process holds open would leave its deletion
/// waiting for that process.)
fn ensure_unused(name: &str, path: &Path) -> Result<()> {
    let busy = |how: String| {
        Err(Error::new(
            ErrorKind::Busy,
            format!("'{name}' ({}) is in use: {how}", path.display()),
        ))
    };
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => {}
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
            return busy("mounted or held by another device".to_owned())
        }
        Err(err) => return Err(Error::io(format!("cannot open {}", path.display()), err)),
    }
    let rdev = fs::metadata(path)
        .context(|| format!("cannot stat {}", path.display()))?
        .rdev();
    match processes_holding(rdev).first() {
        Some(pid) => busy(format!("open in process {pid}")),
        None => Ok(()),
    }
}

/// The processes with an open file descriptor on block device `rdev` (what `fuser` reads).
fn processes_holding(rdev: u64) -> Vec<u32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    procs
        .filter_map(|p| p.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(|fd| fd.ok())
                    .filter_map(|fd| fs::metadata(fd.path()).ok())
                    .any(|m| m.file_type().is_block_device() && m.rdev() == rdev)
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Daemon processes, as the CLI sees them

/// Whether `pid` is a running process (a zombie is not).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is a ublkdm process (so that we never signal a stranger after pid reuse).
pub fn is_ublkdm(pid: i32) -> bool {
    pid > 0 && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ublkdm")
}

/// Sends `signal` to `pid`.
pub fn signal(pid: i32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill takes no pointers.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(Error::io(
            format!("cannot signal pid {pid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
