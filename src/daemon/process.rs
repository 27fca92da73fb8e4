//! Daemon processes as the CLI sees them: alive, ours, signalled.

use super::*;

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
