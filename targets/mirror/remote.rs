//! Legs on another host. A leg given as an NBD URL (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`) is an NBD client of the daemon's own
//! (`device::nbd`), anywhere a leg path is accepted; everything else about it is a leg like
//! any other (the superblock, the dirty log's copy, resync, read repair).
//!
//! What a link adds is handled here:
//! - **Loss.** A dead or hung link fails the leg's requests (at once, or at the client's
//!   deadline), so the leg is failed as a local one would be: the mirror runs degraded and
//!   keeps every dirty bit. The device object outlives its socket: it is kept in a *watch*
//!   with the link epoch it had when it joined.
//! - **Return.** On every tick of the resync driver, a watched leg whose link is up at a
//!   newer epoch is added back as `add-leg` would add it: its own slot, an incremental
//!   resync of the regions written meanwhile. If that is refused (split brain: the other
//!   host ran the leg as a mirror of its own and wrote it), the watch keeps the reason, shown
//!   in `status`, and waits for the user (or for the next reconnect).
//! - **Absent at assembly.** A remote leg that cannot be reached when the mirror starts is
//!   retried in the background with back-off ([`RECONNECT_BACKOFF_MIN`] doubling to
//!   [`RECONNECT_BACKOFF_MAX`]) and added once it answers.
//!
//! Invariants: at most one watch per slot and one pending connection per URL; a re-add runs
//! at most once at a time per watch (`adding`); nothing here holds the state lock across
//! an await.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{AddLegOptions, Inner};
use crate::device::nbd::{is_nbd_url, NbdAddress, NbdDevice, NbdOptions};
use crate::device::{reactor, DeviceRef, LinkState};
use crate::error::{Error, Result};

/// The first wait before connecting again to a remote leg that was absent at assembly.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two such attempts.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether a leg path names a remote leg (an NBD URL).
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(is_nbd_url)
}

/// A leg path as the user gave it, ready to store: a URL checked (a one-line error if it
/// is malformed), anything else made absolute (the daemon runs in `/`).
pub fn leg_path(path: PathBuf) -> Result<PathBuf> {
    if !is_remote(&path) {
        return crate::cli::absolute(path);
    }
    let text = path.to_str().expect("a remote path is a URL");
    NbdAddress::parse(text).map_err(|why| Error::invalid(format!("leg {text}: {why}")))?;
    Ok(path)
}

/// Connects to the remote leg `path` (blocking, at most the client's connect timeout).
pub fn open_remote(path: &Path) -> Result<DeviceRef> {
    let text = path.to_str().expect("a remote path is a URL");
    let address =
        NbdAddress::parse(text).map_err(|why| Error::invalid(format!("leg {text}: {why}")))?;
    Ok(Arc::new(NbdDevice::connect(
        address,
        NbdOptions::default(),
    )?))
}

/// A remote leg that failed, kept for its return.
struct Watch {
    slot: usize,
    dev: DeviceRef,
    /// The link epoch the leg last joined with: a newer one is a reconnect.
    epoch: u64,
    adding: bool,
    /// Why the last automatic re-add was refused.
    refused: Option<String>,
}

/// A remote leg that could not be reached at assembly.
struct Pending {
    path: PathBuf,
    attempts: u64,
    wait: Duration,
    next_try: Instant,
    connecting: bool,
    last_error: String,
}

/// The mirror's remote legs away from it (see the module doc).
#[derive(Default)]
pub(crate) struct Remotes {
    watches: Mutex<Vec<Watch>>,
    pending: Mutex<Vec<Pending>>,
}

impl Remotes {
    /// Keeps `dev`, the remote leg of `slot` that just failed, for its return.
    pub(crate) fn watch(&self, slot: usize, dev: DeviceRef, epoch: u64) {
        let mut watches = self.watches.lock().expect("remote watches");
        watches.retain(|w| w.slot != slot);
        watches.push(Watch {
            slot,
            dev,
            epoch,
            adding: false,
            refused: None,
        });
    }

    /// Retries `paths` (remote legs absent at assembly) in the background.
    pub(crate) fn retry(&self, paths: Vec<PathBuf>) {
        let mut pending = self.pending.lock().expect("remote pending");
        for path in paths {
            if pending.iter().any(|p| p.path == path) {
                continue;
            }
            pending.push(Pending {
                path,
                attempts: 0,
                wait: RECONNECT_BACKOFF_MIN,
                next_try: Instant::now(),
                connecting: false,
                last_error: "not reached yet".into(),
            });
        }
    }

    /// The link of the watched leg of `slot`, and why its re-add was refused.
    pub(crate) fn watched(&self, slot: usize) -> Option<Value> {
        let watches = self.watches.lock().expect("remote watches");
        let w = watches.iter().find(|w| w.slot == slot)?;
        Some(json!({ "link": w.dev.link(), "refused": w.refused }))
    }

    /// The URLs of the remote legs still being reached.
    pub(crate) fn pending_paths(&self) -> Vec<PathBuf> {
        let pending = self.pending.lock().expect("remote pending");
        pending.iter().map(|p| p.path.clone()).collect()
    }

    /// The remote legs still being reached, with their attempts and last error.
    pub(crate) fn pending_status(&self) -> Vec<Value> {
        let pending = self.pending.lock().expect("remote pending");
        pending
            .iter()
            .map(|p| {
                json!({
                    "device": p.path.display().to_string(),
                    "attempts": p.attempts,
                    "last_error": p.last_error,
                })
            })
            .collect()
    }
}

/// The epoch of `dev`'s link, for a remote leg (0 for a local one).
pub(crate) fn link_epoch(dev: &DeviceRef) -> u64 {
    dev.link().map_or(0, |link| link.epoch)
}

impl Inner {
    /// One tick's look at the remote legs away: re-adds those whose link came back, and
    /// tries again to reach those absent since assembly.
    pub(crate) fn watch_remotes(self: &Arc<Self>) {
        for (slot, dev) in self.returned() {
            let inner = Arc::clone(self);
            reactor::spawn(async move { inner.readd(slot, dev).await }).detach();
        }
        for path in self.due() {
            let inner = Arc::clone(self);
            reactor::spawn(async move { inner.reach(path).await }).detach();
        }
    }

    /// The watched legs whose link is up at a newer epoch (each marked as being added).
    fn returned(&self) -> Vec<(usize, DeviceRef)> {
        let mut watches = self.remotes.watches.lock().expect("remote watches");
        let mut back = Vec::new();
        for w in watches.iter_mut().filter(|w| !w.adding) {
            let Some(link) = w.dev.link() else { continue };
            if link.state == LinkState::Connected && link.epoch > w.epoch {
                w.adding = true;
                w.epoch = link.epoch;
                back.push((w.slot, Arc::clone(&w.dev)));
            }
        }
        back
    }

    /// Adds the returned leg of `slot` back; on refusal the watch keeps the reason.
    async fn readd(self: Arc<Self>, slot: usize, dev: DeviceRef) {
        let name = dev.info().name.clone();
        let added = {
            let _gate = self.gate.read().await;
            Arc::clone(&self)
                .add_leg(Arc::clone(&dev), AddLegOptions::default())
                .await
        };
        let mut watches = self.remotes.watches.lock().expect("remote watches");
        match added {
            Ok(now) => {
                log::info!(
                    "mirror {}: remote leg {name} is back (slot {now}); resyncing what it missed",
                    self.uuid
                );
                watches.retain(|w| w.slot != slot);
            }
            Err(err) => {
                let why = err.chain().join(": ");
                log::error!(
                    "mirror {}: remote leg {name} is back but not added: {why}",
                    self.uuid
                );
                if let Some(w) = watches.iter_mut().find(|w| w.slot == slot) {
                    w.adding = false;
                    w.refused = Some(why);
                }
            }
        }
    }

    /// The absent remote legs due for another attempt (each marked as connecting).
    fn due(&self) -> Vec<PathBuf> {
        let now = Instant::now();
        let mut pending = self.remotes.pending.lock().expect("remote pending");
        pending
            .iter_mut()
            .filter(|p| !p.connecting && p.next_try <= now)
            .map(|p| {
                p.connecting = true;
                p.attempts += 1;
                p.path.clone()
            })
            .collect()
    }

    /// Tries to reach the absent remote leg `path` (on a blocking thread: a connect may take
    /// the client's whole timeout) and adds it when it answers.
    async fn reach(self: Arc<Self>, path: PathBuf) {
        let target = path.clone();
        let opened = smol::unblock(move || open_remote(&target)).await;
        let added = match opened {
            Ok(dev) => {
                let _gate = self.gate.read().await;
                Arc::clone(&self)
                    .add_leg(dev, AddLegOptions::default())
                    .await
            }
            Err(err) => Err(err),
        };
        let mut pending = self.remotes.pending.lock().expect("remote pending");
        let Some(at) = pending.iter().position(|p| p.path == path) else {
            return;
        };
        match added {
            Ok(slot) => {
                log::info!(
                    "mirror {}: remote leg {} reached, added in slot {slot}",
                    self.uuid,
                    path.display()
                );
                pending.remove(at);
            }
            Err(err) => {
                let p = &mut pending[at];
                p.last_error = err.chain().join(": ");
                p.connecting = false;
                p.next_try = Instant::now() + p.wait;
                p.wait = (p.wait * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }
}
