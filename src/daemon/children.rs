//! The children a daemon serves beside its primary device (an origin's snapshots): each on
//! a thread of its own, reconciled with the target after every command.

use super::*;

/// The devices served as children of device `parent`, as the driver lists them.
pub fn child_devices(parent: u32) -> Vec<DevInfo> {
    ublk::device_ids()
        .into_iter()
        .filter_map(|id| ublk::query(id).ok())
        .filter(|info| child_spec(info).is_some_and(|child| child.parent == parent))
        .collect()
}

/// The name of a child device, from its stored spec.
pub(super) fn child_name(info: &DevInfo) -> Option<String> {
    child_spec(info).map(|child| child.name)
}

/// The child spec stored with a device, if it is a child.
fn child_spec(info: &DevInfo) -> Option<ChildSpec> {
    info.spec.as_ref().and_then(TargetSpec::as_child)
}

/// A child's device and the thread serving it.
pub(super) struct ChildDevice {
    pub(super) device: Device,
    pub(super) thread: thread::JoinHandle<()>,
}

impl Daemon {
    pub(super) fn children(&self) -> MutexGuard<'_, BTreeMap<String, ChildDevice>> {
        self.children.lock().expect("children")
    }

    /// Brings up every child: a leftover QUIESCED device is taken over, the rest are created;
    /// leftovers of children that no longer exist are deleted.
    pub(super) fn adopt_children(&self, leftovers: Vec<DevInfo>) {
        let mut children = self.children();
        let wanted = self.target.child_names();
        let mut recover = BTreeMap::new();
        for info in leftovers {
            match child_name(&info) {
                Some(name) if wanted.contains(&name) => {
                    recover.insert(name, info.id);
                }
                _ => {
                    log::info!("deleting device {}, a child that no longer exists", info.id);
                    if let Err(err) = ublk::remove(info.id) {
                        log::error!("{}", err.chain().join(": "));
                    }
                }
            }
        }
        for (_, error) in self.reconcile(&mut children, &recover) {
            log::error!("{}", error.chain().join(": "));
        }
    }

    /// Makes the served children the target's: stops those it no longer has and starts the
    /// new ones (taking over `recover`'s devices). Returns the errors, per child: a child
    /// whose device could not start stays a child of the target, and is tried again at the
    /// next reconciliation.
    pub(super) fn reconcile(
        &self,
        children: &mut BTreeMap<String, ChildDevice>,
        recover: &BTreeMap<String, u32>,
    ) -> Vec<(String, Error)> {
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
                Err(err) => errors.push((name, err)),
            }
        }
        errors
    }

    /// Serves child `name` on a thread of its own; returns once its device is LIVE.
    pub(super) fn start_child(&self, name: &str, start: Start) -> Result<ChildDevice> {
        let target = self.target.open_child(name)?;
        let spec = TargetSpec::child(&ChildSpec {
            parent: self.device.id(),
            kind: target.kind().to_owned(),
            name: name.to_owned(),
        });
        let pool = Arc::clone(&self.pool);
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
                        if let Err(mpsc::SendError(Ok(device))) = tx.send(Ok(device)) {
                            // `start_child` gave up waiting: nothing serves this child, so its
                            // device must not stay (`serve` deletes it once stopped).
                            log::error!("device {} came up too late; stopping it", device.id());
                            if let Err(err) = device.stop() {
                                log::error!("{}", err.chain().join(": "));
                            }
                        }
                    }),
                };
                if let Err(err) = ublk::serve(start, target, &spec, hooks, &pool) {
                    log::error!("{}", err.chain().join(": "));
                    let _ = failed.send(Err(err));
                }
            })
            .map_err(|e| {
                ublk::thread_error(format!("cannot start a thread to serve '{name}'"), e)
            })?;
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
    pub(super) fn stop_children(&self) {
        let children = std::mem::take(&mut *self.children());
        for (name, child) in &children {
            request_stop(name, child);
        }
        let deadline = Instant::now() + CHILD_STOP_TIMEOUT;
        for (name, child) in children {
            await_child(&name, child, deadline);
        }
    }

    pub(super) fn children_json(&self) -> serde_json::Value {
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
}

/// STOP_DEV on a child's device, then waits (bounded) for its thread to delete it.
pub(super) fn stop_child(name: &str, child: ChildDevice) {
    request_stop(name, &child);
    await_child(name, child, Instant::now() + CHILD_STOP_TIMEOUT);
}

/// STOP_DEV on a child's device; its thread then deletes it.
pub(super) fn request_stop(name: &str, child: &ChildDevice) {
    log::info!("stopping child '{name}' (device {})", child.device.id());
    if let Err(err) = child.device.stop() {
        log::error!("{}", err.chain().join(": "));
    }
}

/// Waits until `deadline` for a stopped child's thread to delete its device and end. (DEL_DEV
/// waits for the last opener of the block device: a process that keeps it open holds it.)
pub(super) fn await_child(name: &str, child: ChildDevice, deadline: Instant) {
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
pub(super) fn ensure_unused(name: &str, path: &Path) -> Result<()> {
    match claim_unused(path)? {
        Ok(_) => Ok(()),
        Err(how) => Err(Error::new(
            ErrorKind::Busy,
            format!("'{name}' ({}) is in use: {how}", path.display()),
        )),
    }
}

/// Fails with Busy, with the target's `advice`, when the daemon's own device `path` is open
/// anywhere (see [`ensure_unused`]); otherwise holds it exclusively until the returned file is
/// dropped, so that no mount can start while the command that needs it closed runs.
pub(super) fn claim_closed(path: &Path, advice: &str) -> Result<File> {
    claim_unused(path)?.map_err(|how| {
        Error::new(
            ErrorKind::Busy,
            format!("{} is in use ({how}): {advice}", path.display()),
        )
    })
}

/// An exclusive open of block device `path` when nothing holds it, else how it is held.
fn claim_unused(path: &Path) -> Result<std::result::Result<File, String>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
            return Ok(Err("mounted or held by another device".to_owned()))
        }
        Err(err) => return Err(Error::io(format!("cannot open {}", path.display()), err)),
    };
    let rdev = fs::metadata(path)
        .context(|| format!("cannot stat {}", path.display()))?
        .rdev();
    Ok(match processes_holding(rdev).first() {
        Some(pid) => Err(format!("open in process {pid}")),
        None => Ok(file),
    })
}

/// The processes with an open file descriptor on block device `rdev` (what `fuser` reads).
pub(super) fn processes_holding(rdev: u64) -> Vec<u32> {
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
