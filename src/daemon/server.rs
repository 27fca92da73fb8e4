//! The control socket server and the signal thread: how a running daemon is asked to act.

use super::*;

/// Binds `/run/ublkdm/<id>.sock` and serves it on a thread; the path, or `None` if it could
/// not be bound (the device still works; `del` then falls back to signals).
pub(super) fn start_control_socket(daemon: &Arc<Daemon>) -> Option<PathBuf> {
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

pub(super) fn bind_socket(path: &Path) -> Result<UnixListener> {
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
pub(super) fn serve_control(listener: &UnixListener, daemon: &Arc<Daemon>) {
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

pub(super) fn handle_connection(stream: &UnixStream, daemon: &Arc<Daemon>) {
    let timeouts = stream
        .set_read_timeout(Some(control::IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(control::IO_TIMEOUT)));
    if let Err(err) = timeouts {
        log::warn!("control connection: {err}");
        return;
    }
    let reply = match control::read_message::<Request>(stream, control::MAX_REQUEST_BYTES)
        .and_then(|request| daemon.dispatch(request))
    {
        Ok(result) => Reply::success(result),
        Err(err) => Reply::failure(&err),
    };
    let sent = match control::write_message(stream, &reply, control::MAX_REPLY_BYTES) {
        // Too long to send (nothing was): say so, so that the client does not take it for a
        // daemon gone.
        Err(err) if err.kind() == ErrorKind::Daemon => {
            log::error!("{err}");
            let failure = Reply::failure(&err.context("the reply was not sent"));
            control::write_message(stream, &failure, control::MAX_REPLY_BYTES)
        }
        other => other,
    };
    if let Err(err) = sent {
        log::warn!("control reply not sent: {err}");
    }
}

/// Takes SIGTERM/SIGINT (blocked everywhere else) and stops the daemon.
pub(super) fn start_signal_thread(daemon: &Arc<Daemon>) {
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
