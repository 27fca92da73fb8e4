//! A model NBD server for tests: an in-memory export on a Unix socket, speaking the same
//! subset as the client (fixed newstyle, `NBD_OPT_GO`, simple replies), with faults a test
//! sets while it runs.
//!
//! Faults: drop the connection after N more requests (before or after applying the last one),
//! delay every reply, fail a byte range with `EIO`, refuse connections (accept and close),
//! kill the connections now, stop listening altogether (a dead server) and listen again on the
//! same path; the advertised flags, size and block sizes, and malformed handshakes
//! ([`HandshakeFault`]) come from the [`ModelConfig`], which a test may change between
//! connections.
//!
//! Blocking threads (one accepting, one per connection) and `std` sockets: simple, and
//! independent of the client's machinery. Requests on one connection are served in order,
//! one at a time. Trim zeroes its range (a choice of this model; the protocol lets a trimmed
//! range read as anything). The socket lives in the system's temporary directory under a name
//! unique to the process and server; it is removed when the server drops.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::*;
use super::NbdAddress;

/// A malformed handshake to send instead of a good one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HandshakeFault {
    #[default]
    None,
    /// The greeting's first magic is wrong.
    BadMagic,
    /// The greeting lacks `NBD_FLAG_FIXED_NEWSTYLE`.
    NotFixedNewstyle,
    /// The greeting stops half way, then the connection closes.
    TruncatedGreeting,
    /// An option reply claims a payload far beyond any limit.
    OversizedReply,
    /// The export info stops half way, then the connection closes.
    TruncatedInfo,
    /// The ACK comes without an export info.
    NoExportInfo,
    /// Infos without end, never an ACK.
    EndlessInfos,
    /// `NBD_OPT_GO` fails with this reply type (an `NBD_REP_ERR_*`) and a message.
    Refuse(u32),
}

/// A broken reply header to send in place of a good one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The reply's magic is wrong.
    BadMagic,
    /// The reply names a cookie the client never sent.
    UnknownCookie,
    /// A structured reply's magic (never negotiated).
    Structured,
}

/// What the server advertises.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The export's size in bytes; the data keeps its first size (a smaller size only changes
    /// what is advertised, for tests of a shrunk export).
    pub size: u64,
    pub export: String,
    /// Transmission flags (`FLAG_HAS_FLAGS` is added).
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, sent as `NBD_INFO_BLOCK_SIZE` if set.
    pub block: Option<(u32, u32, u32)>,
    /// Offer `NBD_FLAG_NO_ZEROES`.
    pub no_zeroes: bool,
    pub handshake: HandshakeFault,
}

impl ModelConfig {
    /// An export of `size` bytes named `export` with every feature advertised.
    pub fn new(size: u64, export: &str) -> ModelConfig {
        ModelConfig {
            size,
            export: export.to_owned(),
            flags: FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES,
            block: Some((512, 4096, 1 << 20)),
            no_zeroes: true,
            handshake: HandshakeFault::None,
        }
    }
}

/// Faults set while the server runs.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Requests still served before the connection drops (on the next one).
    pub drop_after: Option<u64>,
    /// Whether the request that triggers a drop is applied before the drop.
    pub apply_then_drop: bool,
    /// Every reply waits this long.
    pub reply_delay: Duration,
    /// Requests touching these bytes fail with `EIO`.
    pub fail_range: Option<Range<u64>>,
    /// Connections are accepted and closed at once.
    pub refuse: bool,
    /// The next reply's header is broken this way (then the fault clears).
    pub corrupt_reply: Option<Corruption>,
}

/// What the server saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub connections: u64,
    pub reads: u64,
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub discs: u64,
}

struct State {
    config: Mutex<ModelConfig>,
    faults: Mutex<Faults>,
    stats: Mutex<ModelStats>,
    data: Mutex<Vec<u8>>,
    /// Clones of the open connections (by a serial number), for killing them.
    conns: Mutex<Vec<(u64, UnixStream)>>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running model server (see the module doc).
pub struct ModelServer {
    path: PathBuf,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl ModelServer {
    /// Starts a server with `config`, zeroed data.
    pub fn start(config: ModelConfig) -> ModelServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ublkdm-nbd-model-{}-{n}.sock", std::process::id()));
        let state = Arc::new(State {
            data: Mutex::new(vec![0; config.size as usize]),
            config: Mutex::new(config),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(ModelStats::default()),
            conns: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let mut server = ModelServer {
            path,
            state,
            acceptor: None,
        };
        server.listen();
        server
    }

    /// Listens again after [`ModelServer::stop_listening`] (a restarted server).
    pub fn listen(&mut self) {
        assert!(self.acceptor.is_none(), "already listening");
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind the model server's socket");
        self.state.stopping.store(false, Ordering::SeqCst);
        let state = self.state.clone();
        self.acceptor = Some(std::thread::spawn(move || accept_loop(listener, state)));
    }

    /// Stops listening and drops every connection: a dead server (connections are refused).
    pub fn stop_listening(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            self.state.stopping.store(true, Ordering::SeqCst);
            // Wake the blocking accept; it sees `stopping` and returns.
            let _ = UnixStream::connect(&self.path);
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.path);
        self.kill_connections();
    }

    pub fn address(&self) -> NbdAddress {
        NbdAddress::unix(&self.path, lock(&self.state.config).export.clone())
    }

    /// The faults in force; change them through the guard.
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.state.faults)
    }

    /// The configuration for new connections; change it through the guard.
    pub fn config(&self) -> MutexGuard<'_, ModelConfig> {
        lock(&self.state.config)
    }

    pub fn stats(&self) -> ModelStats {
        lock(&self.state.stats).clone()
    }

    /// A copy of the export's data.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.state.data).clone()
    }

    /// Closes every open connection now (the server keeps listening).
    pub fn kill_connections(&self) {
        for (_, conn) in lock(&self.state.conns).drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

fn accept_loop(listener: UnixListener, state: Arc<State>) {
    for conn in listener.incoming() {
        if state.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if lock(&state.faults).refuse {
            continue;
        }
        let serial = {
            let mut stats = lock(&state.stats);
            stats.connections += 1;
            stats.connections
        };
        if let Ok(clone) = conn.try_clone() {
            lock(&state.conns).push((serial, clone));
        }
        let state = state.clone();
        std::thread::spawn(move || {
            // A client that breaks the protocol, or a killed connection, just ends it.
            let _ = serve(&conn, &state);
            // Closes the socket for the client even though a clone of it is kept above.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            lock(&state.conns).retain(|(s, _)| *s != serial);
        });
    }
}

fn serve(mut conn: &UnixStream, state: &State) -> io::Result<()> {
    let config = lock(&state.config).clone();
    if !handshake(&mut conn, &config)? {
        return Ok(());
    }
    loop {
        let mut head = [0; REQUEST_LEN];
        conn.read_exact(&mut head)?;
        let req = decode_request(&head).map_err(invalid)?;
        if req.cmd == CMD_DISC {
            lock(&state.stats).discs += 1;
            return Ok(());
        }
        let mut payload = vec![
            0;
            if req.cmd == CMD_WRITE {
                req.len as usize
            } else {
                0
            }
        ];
        conn.read_exact(&mut payload)?;
        let (drop_now, apply) = take_drop(state);
        let mut reply = Vec::new();
        if !drop_now || apply {
            reply = execute(state, &config, &req, &payload);
        }
        if drop_now {
            return Ok(());
        }
        let (delay, corruption) = {
            let mut faults = lock(&state.faults);
            (faults.reply_delay, faults.corrupt_reply.take())
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if let Some(how) = corruption {
            corrupt(&mut reply, how);
        }
        conn.write_all(&reply)?;
    }
}

fn corrupt(reply: &mut [u8], how: Corruption) {
    match how {
        Corruption::BadMagic => reply[0] ^= 0xff,
        Corruption::UnknownCookie => reply[8] ^= 0x80,
        Corruption::Structured => {
            reply[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes())
        }
    }
}

/// Whether this request drops the connection, and whether it is applied first.
fn take_drop(state: &State) -> (bool, bool) {
    let mut faults = lock(&state.faults);
    match faults.drop_after {
        Some(0) => {
            faults.drop_after = None;
            (true, faults.apply_then_drop)
        }
        Some(n) => {
            faults.drop_after = Some(n - 1);
            (false, false)
        }
        None => (false, false),
    }
}

fn invalid(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Runs one request; returns the reply's bytes.
fn execute(state: &State, config: &ModelConfig, req: &Request, payload: &[u8]) -> Vec<u8> {
    let result = check(state, config, req).and_then(|()| apply(state, req, payload));
    count(state, req);
    let error = match &result {
        Ok(_) => 0,
        Err(code) => nbd_of_errno(*code),
    };
    let mut out = encode_simple_reply(&SimpleReply {
        error,
        cookie: req.cookie,
    })
    .to_vec();
    if let Ok(Some(data)) = result {
        out.extend_from_slice(&data);
    }
    out
}

/// The errno a request fails with before it touches the data, if any.
fn check(state: &State, config: &ModelConfig, req: &Request) -> Result<(), i32> {
    let data_len = lock(&state.data).len() as u64;
    let end = req.offset.checked_add(u64::from(req.len));
    if end.is_none_or(|end| end > data_len.min(config.size)) {
        return Err(libc::EINVAL);
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && config.flags & FLAG_READ_ONLY != 0 {
        return Err(libc::EPERM);
    }
    let allowed = match req.cmd {
        CMD_READ | CMD_WRITE => true,
        CMD_FLUSH => config.flags & FLAG_SEND_FLUSH != 0,
        CMD_TRIM => config.flags & FLAG_SEND_TRIM != 0,
        CMD_WRITE_ZEROES => config.flags & FLAG_SEND_WRITE_ZEROES != 0,
        _ => false,
    };
    let fua_ok = req.flags & CMD_FLAG_FUA == 0 || config.flags & FLAG_SEND_FUA != 0;
    if !allowed || !fua_ok {
        return Err(libc::EINVAL);
    }
    if let Some(bad) = &lock(&state.faults).fail_range {
        let end = req.offset + u64::from(req.len);
        if req.cmd != CMD_FLUSH && req.offset < bad.end && bad.start < end {
            return Err(libc::EIO);
        }
    }
    Ok(())
}

/// Applies a checked request; a read's data is returned.
fn apply(state: &State, req: &Request, payload: &[u8]) -> Result<Option<Vec<u8>>, i32> {
    let mut data = lock(&state.data);
    let range = req.offset as usize..(req.offset + u64::from(req.len)) as usize;
    match req.cmd {
        CMD_READ => return Ok(Some(data[range].to_vec())),
        CMD_WRITE => data[range].copy_from_slice(payload),
        CMD_TRIM | CMD_WRITE_ZEROES => data[range].fill(0),
        _ => {}
    }
    Ok(None)
}

fn count(state: &State, req: &Request) {
    let mut stats = lock(&state.stats);
    match req.cmd {
        CMD_READ => stats.reads += 1,
        CMD_WRITE => {
            stats.writes += 1;
            if req.flags & CMD_FLAG_FUA != 0 {
                stats.fua_writes += 1;
            }
        }
        CMD_FLUSH => stats.flushes += 1,
        CMD_TRIM => stats.trims += 1,
        CMD_WRITE_ZEROES => stats.write_zeroes += 1,
        _ => {}
    }
}

/// The server's side of the handshake; `false` if it ended the connection (a fault, or a
/// client that aborted).
fn handshake(conn: &mut &UnixStream, config: &ModelConfig) -> io::Result<bool> {
    let fault = config.handshake;
    let mut hflags = FLAG_FIXED_NEWSTYLE;
    if config.no_zeroes {
        hflags |= FLAG_NO_ZEROES;
    }
    let mut greeting = encode_greeting(hflags);
    match fault {
        HandshakeFault::BadMagic => greeting[0] ^= 0x20,
        HandshakeFault::NotFixedNewstyle => greeting[17] &= !(FLAG_FIXED_NEWSTYLE as u8),
        HandshakeFault::TruncatedGreeting => {
            conn.write_all(&greeting[..10])?;
            return Ok(false);
        }
        _ => {}
    }
    conn.write_all(&greeting)?;
    let mut cflags = [0; CLIENT_FLAGS_LEN];
    conn.read_exact(&mut cflags)?;
    let cflags = decode_client_flags(&cflags).map_err(invalid)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(false);
    }
    loop {
        let mut head = [0; OPT_HEADER_LEN];
        conn.read_exact(&mut head)?;
        let opt = decode_option_header(&head).map_err(invalid)?;
        if opt.len > MAX_OPT_LEN {
            return Ok(false);
        }
        let mut data = vec![0; opt.len as usize];
        conn.read_exact(&mut data)?;
        match opt.option {
            OPT_GO => return answer_go(conn, config, &data),
            OPT_ABORT => {
                opt_reply(conn, opt.option, REP_ACK, &[])?;
                return Ok(false);
            }
            other => opt_reply(conn, other, REP_ERR_UNSUP, b"not in the model")?,
        }
    }
}

fn opt_reply(conn: &mut &UnixStream, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let len = data.len() as u32;
    let mut out = encode_opt_reply(OptReply { option, reply, len }).to_vec();
    out.extend_from_slice(data);
    conn.write_all(&out)
}

fn answer_go(conn: &mut &UnixStream, config: &ModelConfig, data: &[u8]) -> io::Result<bool> {
    let Ok((name, _infos)) = decode_go(data) else {
        opt_reply(conn, OPT_GO, REP_ERR_INVALID, b"bad NBD_OPT_GO")?;
        return Ok(false);
    };
    if name != config.export {
        opt_reply(conn, OPT_GO, REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(false);
    }
    let export = encode_info(&Info::Export {
        size: config.size,
        flags: config.flags | FLAG_HAS_FLAGS,
    });
    match config.handshake {
        HandshakeFault::Refuse(code) => {
            opt_reply(conn, OPT_GO, code, b"the model says no")?;
            return Ok(false);
        }
        HandshakeFault::OversizedReply => {
            let huge = encode_opt_reply(OptReply {
                option: OPT_GO,
                reply: REP_INFO,
                len: u32::MAX,
            });
            conn.write_all(&huge)?;
            return Ok(false);
        }
        HandshakeFault::TruncatedInfo => {
            let head = encode_opt_reply(OptReply {
                option: OPT_GO,
                reply: REP_INFO,
                len: export.len() as u32,
            });
            conn.write_all(&head)?;
            conn.write_all(&export[..5])?;
            return Ok(false);
        }
        HandshakeFault::EndlessInfos => loop {
            opt_reply(conn, OPT_GO, REP_INFO, &export)?;
        },
        HandshakeFault::NoExportInfo => {}
        _ => opt_reply(conn, OPT_GO, REP_INFO, &export)?,
    }
    if let Some((min, preferred, max)) = config.block {
        let info = encode_info(&Info::BlockSize {
            min,
            preferred,
            max,
        });
        opt_reply(conn, OPT_GO, REP_INFO, &info)?;
    }
    opt_reply(conn, OPT_GO, REP_ACK, &[])?;
    Ok(config.handshake == HandshakeFault::None)
}
