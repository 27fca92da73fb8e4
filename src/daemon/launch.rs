//! Launching a daemon: fork, detach, log file and the handshake with the CLI that waits.

use super::*;

// ---------------------------------------------------------------------------------------------
// Handshake

/// One line on the handshake pipe.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(super) enum Event {
    Added { id: u32 },
    Live { id: u32, path: PathBuf },
    Error { kind: String, chain: Vec<String> },
}

/// Where the daemon reports its progress: the handshake pipe, or (in the foreground) stdout.
pub(super) struct Reporter {
    /// `None` in the foreground; the pipe is closed once the device is live, so that the
    /// parent's reader sees the end at once (a CLI that starts several daemons, such as
    /// `assemble --scan`, must be down to one thread before each fork).
    pipe: Option<Mutex<Option<File>>>,
    log: Option<LogFile>,
}

impl Reporter {
    pub(super) fn send(&self, event: &Event) {
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

    pub(super) fn added(&self, id: u32) {
        log::info!("serving ublk device {id}");
        if let Some(log) = &self.log {
            log.name_after(id);
        }
        self.send(&Event::Added { id });
    }

    pub(super) fn live(&self, id: u32, path: &Path) {
        log::info!("device {id} is LIVE as {}", path.display());
        if self.pipe.is_none() {
            println!("{}", path.display());
        }
        self.send(&Event::Live {
            id,
            path: path.to_owned(),
        });
    }

    pub(super) fn error(&self, err: &Error) {
        self.send(&Event::Error {
            kind: err.kind().name().to_owned(),
            chain: err.chain(),
        });
    }
}

/// The daemon's log file, named after the device once its id is known.
pub(super) struct LogFile {
    path: Mutex<PathBuf>,
}

impl LogFile {
    /// Opens the log for `start`: `<id>.log` (appended) when recovering, a per-pid name that
    /// [`LogFile::name_after`] renames for a new device.
    pub(super) fn open(start: &Start) -> Result<(LogFile, File)> {
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
    pub(super) fn remove_if_unnamed(&self) {
        let path = self.path.lock().expect("log path");
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("starting-"))
        {
            let _ = fs::remove_file(&*path);
        }
    }

    /// Renames the log to `<id>.log`, keeping a previous device's log as `<id>.log.old`.
    pub(super) fn name_after(&self, id: u32) {
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
pub fn launch(registry: &Registry, start: Start, spec: TargetSpec) -> Result<PathBuf> {
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
            let code = daemon_child(registry, start, spec, write_end);
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
pub fn run_foreground(registry: &Registry, start: Start, spec: TargetSpec) -> Result<()> {
    install_panic_hook();
    run(
        registry,
        start,
        spec,
        Arc::new(Reporter {
            pipe: None,
            log: None,
        }),
    )
}

pub(super) fn pipe() -> Result<(File, File)> {
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
pub(super) fn thread_count() -> usize {
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
pub(super) fn wait_for_handshake(pid: libc::pid_t, pipe: File, start: Start) -> Result<PathBuf> {
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
pub(super) fn daemon_vanished(pid: libc::pid_t, id: Option<u32>) -> Error {
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
pub(super) fn daemon_child(registry: &Registry, start: Start, spec: TargetSpec, pipe: File) -> i32 {
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
    match run(registry, start, spec, Arc::clone(&reporter)) {
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
pub(super) fn detach_stdio(log: &File) -> Result<()> {
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
pub(super) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        log::error!("bug: {info}\n{backtrace}");
        eprintln!("bug: {info}; aborting (the device stays QUIESCED for 'ublkdm recover')");
        std::process::abort();
    }));
}
