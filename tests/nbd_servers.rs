//! The NBD client against real servers: nbdkit, qemu-nbd and nbd-server.
//!
//! For each server: a short verify workload through `NbdDevice` (patterned writes with and
//! without FUA, flush, read back, trim and write-zeroes where offered), and a server killed
//! (SIGKILL) under the device and restarted on the same address: requests in flight fail with
//! an errno, the link goes down, comes back with epoch 2, and the data flushed before the kill
//! is there. nbdkit and qemu-nbd listen on a Unix socket, nbd-server on 127.0.0.1 (a free
//! port), so both transports are covered.
//!
//! A missing server binary prints `SKIP: <why>` and the test returns (scripts/deps installs
//! them). Every server started here is killed when its guard drops, even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublkdm::device::reactor::block_on;
use ublkdm::device::{
    AlignedBuf, BlockDevice, LinkState, NbdAddress, NbdDevice, NbdOptions, WriteFlags,
};
use ublkdm::units::{Extent, Sector, SectorCount};

const SIZE: u64 = 64 << 20;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nbdkit,
    QemuNbd,
    NbdServer,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Nbdkit => "nbdkit",
            Kind::QemuNbd => "qemu-nbd",
            Kind::NbdServer => "nbd-server",
        }
    }
}

/// A running server process, killed on drop.
struct Server {
    child: Option<Child>,
    kind: Kind,
    dir: PathBuf,
    file: PathBuf,
    addr: NbdAddress,
    /// nbd-server's TCP port, kept across restarts.
    port: u16,
    /// nbdkit serves memory instead of the file.
    memory: bool,
    /// nbd-server's daemon (it forks away from `child`, and forks again per client).
    daemon: Option<i32>,
}

impl Server {
    /// Starts `kind` over a new 64 MiB file in `dir`; `None` (after printing SKIP) when the
    /// binary is missing.
    fn start(kind: Kind, dir: &Path, memory: bool) -> Option<Server> {
        if !installed(kind.binary()) {
            eprintln!(
                "SKIP: {} is not installed (scripts/deps installs it)",
                kind.binary()
            );
            return None;
        }
        let file = dir.join("disk.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(SIZE))
            .expect("create the export's file");
        let port = free_port();
        let addr = match kind {
            Kind::NbdServer => NbdAddress::tcp("127.0.0.1", port, "export"),
            _ => NbdAddress::unix(dir.join("nbd.sock"), ""),
        };
        let mut server = Server {
            child: None,
            kind,
            dir: dir.to_owned(),
            file,
            addr,
            port,
            memory,
            daemon: None,
        };
        server.spawn();
        Some(server)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// Starts the process and waits until it accepts connections.
    fn spawn(&mut self) {
        assert!(self.child.is_none());
        // A killed server leaves its socket behind, which would stop the next one binding.
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = match self.kind {
            Kind::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args(["-f", "--exit-with-parent", "-U"])
                    .arg(self.socket());
                if self.memory {
                    c.args(["memory", &SIZE.to_string()]);
                } else {
                    c.arg("file").arg(&self.file);
                }
                c
            }
            Kind::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.args(["-t", "-f", "raw", "--discard=unmap", "-k"])
                    .arg(self.socket())
                    .arg(&self.file);
                c
            }
            Kind::NbdServer => {
                let conf = self.dir.join("nbd-server.conf");
                std::fs::write(&conf, nbd_server_config(&self.file, self.port))
                    .expect("write nbd-server's config");
                // Not -d: that serves one client and exits. The daemon's pid comes from -p.
                let _ = std::fs::remove_file(self.pid_file());
                let mut c = Command::new("nbd-server");
                c.arg("-C").arg(&conf).arg("-p").arg(self.pid_file());
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.kind.binary()));
        self.child = Some(child);
        self.wait_listening();
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("nbd-server.pid")
    }

    /// Waits until a client of ours can connect (and disconnect cleanly).
    fn wait_listening(&mut self) {
        let start = Instant::now();
        let mut probe = options();
        probe.connect_timeout = Duration::from_secs(1);
        loop {
            if let Kind::NbdServer = self.kind {
                let pid = std::fs::read_to_string(self.pid_file()).unwrap_or_default();
                self.daemon = self.daemon.or(pid.trim().parse().ok());
            } else if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{} exited at start: {status}", self.kind.binary());
            }
            let daemon_ready = self.daemon.is_some() || !matches!(self.kind, Kind::NbdServer);
            if daemon_ready && NbdDevice::connect(self.addr.clone(), probe.clone()).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} did not start listening",
                self.kind.binary()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.daemon.take() {
            // The daemon leads its own session: its process group holds its per-client
            // children, which must die with it.
            // SAFETY: kill(2) takes plain integers; the pid is the daemon's, which we started.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
            let start = Instant::now();
            // SAFETY: signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nbd_server_config(file: &Path, port: u16) -> String {
    format!(
        "[generic]\n\tlistenaddr = 127.0.0.1\n\tport = {port}\n\
         [export]\n\texportname = {}\n\tflush = true\n\tfua = true\n\ttrim = true\n",
        file.display()
    )
}

fn installed(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port nothing listens on now (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

fn options() -> NbdOptions {
    NbdOptions {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_in_flight: 16,
        reconnect_backoff_min: Duration::from_millis(50),
        reconnect_backoff_max: Duration::from_millis(500),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 / 8).wrapping_mul(0x9e37_79b9) ^ seed.wrapping_mul(131)) as u8)
        .collect()
}

fn read(dev: &NbdDevice, sector: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let (res, buf) = block_on(dev.read(Sector(sector), AlignedBuf::new(len)));
    res.map(|()| buf.as_slice().to_vec())
}

fn write(dev: &NbdDevice, sector: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
    let buf = Arc::new(AlignedBuf::from_slice(data));
    block_on(dev.write(Sector(sector), buf, WriteFlags { fua }))
}

/// Patterned writes (half FUA), a big one, flush, read back; trim and write-zeroes.
fn verify_workload(kind: Kind, dev: &NbdDevice) {
    let info = dev.info().clone();
    assert_eq!(info.size, SectorCount(SIZE / 512), "{kind:?}");
    let mut written = Vec::new();
    for i in 0..32u64 {
        let sector = (i * 4099 * 8) % (SIZE / 512 - 128) / 8 * 8;
        let data = pattern(i, 64 << 10);
        write(dev, sector, &data, i % 2 == 0).unwrap();
        written.push((sector, data));
    }
    let big = pattern(99, 4 << 20);
    write(dev, 40 << 11, &big, false).unwrap();
    block_on(dev.flush()).unwrap();
    for (sector, data) in &written {
        assert_eq!(
            &read(dev, *sector, data.len()).unwrap(),
            data,
            "{kind:?} at {sector}"
        );
    }
    assert_eq!(read(dev, 40 << 11, big.len()).unwrap(), big, "{kind:?} big");
    let zeroed = Extent::new(Sector(40 << 11), SectorCount(2048));
    block_on(dev.write_zeroes(zeroed)).unwrap();
    let back = read(dev, 40 << 11, big.len()).unwrap();
    assert!(back[..1 << 20].iter().all(|&b| b == 0), "{kind:?} zeroes");
    assert_eq!(back[1 << 20..], big[1 << 20..], "{kind:?} after the zeroes");
    let trimmed = Extent::new(Sector(48 << 11), SectorCount(2048));
    match block_on(dev.discard(trimmed)) {
        Ok(()) => assert!(info.discard, "{kind:?}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{kind:?}"),
    }
    let past = read(dev, SIZE / 512, 4096).unwrap_err();
    assert_eq!(past.raw_os_error(), Some(libc::EINVAL));
    let link = dev.link().unwrap();
    assert_eq!(
        (link.state, link.epoch),
        (LinkState::Connected, 1),
        "{kind:?}"
    );
}

fn workload_against(kind: Kind, memory: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = Server::start(kind, dir.path(), memory) else {
        return;
    };
    let dev = NbdDevice::connect(server.addr.clone(), options())
        .unwrap_or_else(|e| panic!("{kind:?}: {}", e.chain().join(": ")));
    eprintln!("{kind:?}: {:?}", dev.info());
    verify_workload(kind, &dev);
}

/// Kills the server under a device busy with reads, restarts it, checks the link and data.
fn kill_and_restart(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = Server::start(kind, dir.path(), false) else {
        return;
    };
    let dev = Arc::new(NbdDevice::connect(server.addr.clone(), options()).unwrap());
    let data = pattern(7, 1 << 20);
    write(&dev, 2048, &data, false).unwrap();
    block_on(dev.flush()).unwrap();

    // Reads in a loop until one fails: that one was in flight (or queued) at the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (dev, stop) = (dev.clone(), stop.clone());
        move || loop {
            if let Err(e) = read(&dev, 0, 256 << 10) {
                return Some(e);
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    server.kill();
    let failed = reader
        .join()
        .unwrap()
        .expect("a read failed when the server died");
    stop.store(true, Ordering::Relaxed);
    let code = failed.raw_os_error();
    assert!(
        matches!(code, Some(libc::EIO) | Some(libc::ENOTCONN)),
        "{kind:?}: {failed}"
    );
    wait_for(kind, "the link to go down", || {
        dev.link().unwrap().state != LinkState::Connected
    });
    let err = read(&dev, 0, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{kind:?}");
    server.spawn();
    wait_for(kind, "the reconnect", || {
        dev.link().unwrap().state == LinkState::Connected
    });
    let link = dev.link().unwrap();
    assert_eq!(link.epoch, 2, "{kind:?}: {link:?}");
    assert!(link.last_error.is_some(), "{kind:?}");
    assert_eq!(read(&dev, 2048, data.len()).unwrap(), data, "{kind:?}");
    write(&dev, 0, &pattern(8, 4096), true).unwrap();
}

fn wait_for(kind: Kind, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{kind:?}: timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nbdkit_memory_verify() {
    workload_against(Kind::Nbdkit, true);
}

#[test]
fn nbdkit_file_kill_and_restart() {
    kill_and_restart(Kind::Nbdkit);
}

#[test]
fn qemu_nbd_verify() {
    workload_against(Kind::QemuNbd, false);
}

#[test]
fn qemu_nbd_kill_and_restart() {
    kill_and_restart(Kind::QemuNbd);
}

#[test]
fn nbd_server_verify() {
    workload_against(Kind::NbdServer, false);
}

#[test]
fn nbd_server_kill_and_restart() {
    kill_and_restart(Kind::NbdServer);
}
