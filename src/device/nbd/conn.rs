//! One NBD connection's life: connect and handshake, the transmission session, and the
//! worker thread that reconnects when the link drops.
//!
//! **One thread per device.** The worker runs `smol::block_on` over non-blocking sockets
//! (`smol::Async`). Callers, on any thread, hand it [`Job`]s through a bounded channel and
//! await a one-shot reply; cross-thread wakers are safe on every executor we run on. In a
//! session three loops share the socket: the writer takes jobs (at most `max_in_flight` in
//! flight, held by semaphore permits) and sends those queued together in one vectored write,
//! the reader matches replies to cookies (through a buffer, so a burst of replies is one
//! read) and reads a large read's payload straight into the caller's buffer, the deadline
//! watcher ends the session when a request outlives its deadline.
//!
//! **Invariants.**
//! - Every [`Job`] completes exactly once, with its buffer: [`Job::complete`] or, if a job is
//!   dropped anywhere without completing (a torn-down session, a closed channel), its `Drop`
//!   completes it with `ENOTCONN`. So no caller waits forever and no read buffer is lost.
//! - A session ends on the first I/O error, protocol error (bad magic, unknown cookie,
//!   structured reply) or missed deadline; its jobs in flight then fail at once (`ETIMEDOUT`
//!   for those past their deadline, `EIO` for the rest) and the link is down. While down,
//!   jobs that reach the worker fail with `ENOTCONN` at once.
//! - Nothing read from the socket is trusted: every length is bounded before use (see
//!   `proto`), and no input panics.
//! - A reconnect that finds the export shrunk, newly read-only, or with a bigger minimum block
//!   is refused: the link stays down with the reason in `last_error`, and tries again later.
//! - Dropping the device closes the stop channel; every wait of the worker races it, so the
//!   thread ends promptly (after at most [`DISC_GRACE`] for replies still in flight).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};
use smol::future::{self, FutureExt as _};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use smol::lock::{Semaphore, SemaphoreGuardArc};
use smol::{Async, Timer};

use super::proto::{self, *};
use super::{NbdAddress, NbdEndpoint, NbdOptions};
use crate::device::{errno, AlignedBuf, BUF_ALIGN};
use crate::device::{LinkState, LinkStatus};
use crate::units::SECTOR_BYTES;

/// The most option replies one `NBD_OPT_GO` may draw (infos before the ACK): a server that
/// sends more is hostile.
pub const MAX_GO_REPLIES: usize = 32;
/// How long a dropped device waits for replies still in flight before it disconnects.
pub const DISC_GRACE: Duration = Duration::from_secs(1);
/// The largest minimum block size we accept: our buffers are aligned to [`BUF_ALIGN`].
pub const MAX_LOGICAL_BLOCK: u32 = BUF_ALIGN as u32;
/// The largest physical block we report.
pub const MAX_PHYSICAL_BLOCK: u32 = 64 << 10;
/// The deadline watcher looks at least this often (a job may enter with a deadline earlier
/// than the one it sleeps to).
const DEADLINE_TICK_MAX: Duration = Duration::from_millis(250);
/// The most requests one vectored write sends.
pub const SEND_BATCH_JOBS_MAX: usize = 64;
/// The most write payload one vectored write sends (more waits for the next one).
pub const SEND_BATCH_BYTES_MAX: usize = 1 << 20;
/// The buffer replies are read through.
pub const RECV_BUFFER_BYTES: usize = 64 << 10;

/// Why a connection failed or ended.
#[derive(Debug)]
pub enum LinkError {
    Io(io::Error),
    Proto(ProtoError),
    /// The server answered `NBD_OPT_GO` with an error.
    Refused {
        export: String,
        code: u32,
        message: String,
    },
    /// A connect or a request outlived its time.
    Timeout(String),
    /// The export is not one we can serve, or not the one we had.
    Unsuitable(String),
    /// The server replied `ESHUTDOWN`.
    ServerShutdown,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the server closed the connection")
            }
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Proto(e) => write!(f, "protocol error: {e}"),
            LinkError::Refused {
                export,
                code,
                message,
            } => {
                write!(
                    f,
                    "the server refused export '{export}': {}",
                    rep_error_name(*code)
                )?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            LinkError::Timeout(what) => f.write_str(what),
            LinkError::Unsuitable(why) => f.write_str(why),
            LinkError::ServerShutdown => f.write_str("the server is shutting down (ESHUTDOWN)"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> LinkError {
        LinkError::Io(e)
    }
}

impl From<ProtoError> for LinkError {
    fn from(e: ProtoError) -> LinkError {
        LinkError::Proto(e)
    }
}

impl LinkError {
    /// The class of a failed first connection, for the user's exit code.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            LinkError::Io(e) => crate::error::kind_of_io(e),
            LinkError::Refused { code, .. } => match *code {
                REP_ERR_UNKNOWN => ErrorKind::NotFound,
                REP_ERR_POLICY => ErrorKind::InvalidArgument,
                REP_ERR_TLS_REQD | REP_ERR_UNSUP | REP_ERR_PLATFORM => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
            LinkError::Unsuitable(_) => ErrorKind::Unsupported,
            LinkError::Proto(_) => ErrorKind::Daemon,
            LinkError::Timeout(_) | LinkError::ServerShutdown => ErrorKind::Io,
        }
    }
}

/// What the handshake learnt of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, if the server gave them.
    pub block: Option<(u32, u32, u32)>,
}

/// How we use an export: checked sizes and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub flags: u16,
    pub logical: u32,
    pub physical: u32,
    /// The most bytes one read or write request carries (a multiple of `logical`).
    pub max_payload: u32,
}

impl Geometry {
    /// Checks `export` against what we can serve: a non-empty size of whole logical blocks;
    /// a minimum block (our logical block, at least 512) that is a power of two up to
    /// [`MAX_LOGICAL_BLOCK`]; a maximum block of at least one logical block (payloads are
    /// capped at [`DEFAULT_MAX_PAYLOAD`] either way).
    pub fn of(export: &Export) -> Result<Geometry, String> {
        let (min, preferred, max) = export.block.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
        if !min.is_power_of_two() || min > MAX_LOGICAL_BLOCK {
            return Err(format!(
                "the export's minimum block size of {min} bytes is not supported (a power of two up to {MAX_LOGICAL_BLOCK})"
            ));
        }
        let logical = min.max(SECTOR_BYTES as u32);
        let physical = if preferred.is_power_of_two() {
            preferred.clamp(logical, MAX_PHYSICAL_BLOCK.max(logical))
        } else {
            logical.max(4096)
        };
        let max_payload = max.min(DEFAULT_MAX_PAYLOAD) / logical * logical;
        if max_payload == 0 {
            return Err(format!(
                "the export's maximum block size of {max} bytes is below its logical block of {logical}"
            ));
        }
        if export.size == 0 {
            return Err("the export is empty (0 bytes)".into());
        }
        if export.size % u64::from(logical) != 0 {
            return Err(format!(
                "the export's size of {} bytes is not a whole number of {logical}-byte blocks",
                export.size
            ));
        }
        Ok(Geometry {
            size: export.size,
            flags: export.flags,
            logical,
            physical,
            max_payload,
        })
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Whether a reconnect may go on with `now` in place of `self` (the first connection's).
    pub fn check_reconnect(&self, now: &Geometry) -> Result<(), String> {
        if now.size < self.size {
            return Err(format!(
                "the export shrank from {} to {} bytes; refusing it",
                self.size, now.size
            ));
        }
        if now.has(FLAG_READ_ONLY) && !self.has(FLAG_READ_ONLY) {
            return Err("the export became read-only; refusing it".into());
        }
        if now.logical > self.logical {
            return Err(format!(
                "the export's minimum block grew from {} to {} bytes; refusing it",
                self.logical, now.logical
            ));
        }
        Ok(())
    }
}

/// What the device and its worker share.
pub struct Shared {
    pub status: Mutex<LinkStatus>,
    /// The transmission flags of the live connection (the device picks commands by them).
    pub flags: AtomicU16,
    /// The live connection's maximum payload.
    pub max_payload: AtomicU32,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            status: Mutex::new(LinkStatus {
                state: LinkState::Connecting,
                epoch: 0,
                reconnects: 0,
                last_error: None,
                in_flight: 0,
            }),
            flags: AtomicU16::new(0),
            max_payload: AtomicU32::new(0),
        }
    }

    pub fn status(&self) -> std::sync::MutexGuard<'_, LinkStatus> {
        // A poisoned lock means a panic elsewhere, which is a bug: carry on with the data.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.status().state == LinkState::Connected
    }

    fn set_connected(&self, geometry: &Geometry) {
        self.flags.store(geometry.flags, Ordering::Release);
        self.max_payload
            .store(geometry.max_payload, Ordering::Release);
        let mut status = self.status();
        status.state = LinkState::Connected;
        status.epoch += 1;
    }

    fn set_down(&self, why: &LinkError) {
        let mut status = self.status();
        status.state = LinkState::Down;
        status.last_error = Some(why.to_string());
        status.in_flight = 0;
    }

    fn set_connecting(&self) {
        let mut status = self.status();
        status.state = LinkState::Connecting;
        status.reconnects += 1;
    }
}

/// A request's operation and buffer.
pub enum Op {
    /// Read into `buf[at..at + len]`.
    Read {
        buf: AlignedBuf,
        at: usize,
    },
    /// Write `buf[at..at + len]`.
    Write {
        buf: Arc<AlignedBuf>,
        at: usize,
    },
    Flush,
    Trim,
    WriteZeroes,
}

/// A job's outcome, with the read buffer it carried.
pub enum Done {
    Read(io::Result<()>, AlignedBuf),
    Other(io::Result<()>),
}

/// One NBD command on its way to the worker and back (see the module doc's invariants).
pub struct Job {
    op: Option<Op>,
    flags: u16,
    offset: u64,
    len: u32,
    deadline: Instant,
    reply: Option<Sender<Done>>,
}

impl Job {
    /// A job and the receiver of its outcome.
    pub fn new(
        op: Op,
        flags: u16,
        offset: u64,
        len: u32,
        deadline: Instant,
    ) -> (Job, Receiver<Done>) {
        match &op {
            Op::Read { buf, at } => assert!(*at + len as usize <= buf.len(), "read piece"),
            Op::Write { buf, at } => assert!(*at + len as usize <= buf.len(), "write piece"),
            Op::Flush => assert_eq!(len, 0, "a flush has no length"),
            Op::Trim | Op::WriteZeroes => {}
        }
        let (tx, rx) = smol::channel::bounded(1);
        let job = Job {
            op: Some(op),
            flags,
            offset,
            len,
            deadline,
            reply: Some(tx),
        };
        (job, rx)
    }

    fn cmd(&self) -> u16 {
        match self.op {
            Some(Op::Read { .. }) => CMD_READ,
            Some(Op::Write { .. }) => CMD_WRITE,
            Some(Op::Flush) => CMD_FLUSH,
            Some(Op::Trim) => CMD_TRIM,
            Some(Op::WriteZeroes) | None => CMD_WRITE_ZEROES,
        }
    }

    /// The bytes a write sends after its header.
    fn payload(&self) -> Option<(Arc<AlignedBuf>, Range<usize>)> {
        match &self.op {
            Some(Op::Write { buf, at }) => Some((buf.clone(), *at..*at + self.len as usize)),
            _ => None,
        }
    }

    /// Completes the job with `res`, handing its buffer back.
    pub fn complete(mut self, res: io::Result<()>) {
        self.finish(res);
    }

    fn finish(&mut self, res: io::Result<()>) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        let done = match self.op.take() {
            Some(Op::Read { buf, .. }) => Done::Read(res, buf),
            _ => Done::Other(res),
        };
        // A bounded(1) channel that only this send uses: it cannot be full. A caller that
        // gave up (dropped its future) closed it, and then nobody wants the outcome.
        let _ = reply.try_send(done);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.finish(Err(errno(libc::ENOTCONN)));
    }
}

/// Requests on their way into one vectored write: each a header and, for a write, its
/// payload (a range of the caller's buffer, shared, not copied).
///
/// A part lets go of its payload as soon as it is wholly sent: the server may answer it
/// while later parts are still being written, and the caller may then want its buffer back
/// unshared (the copy engine does).
#[derive(Default)]
struct SendBatch {
    parts: Vec<SendPart>,
    payload_bytes: usize,
}

struct SendPart {
    header: [u8; REQUEST_LEN],
    payload: Option<(Arc<AlignedBuf>, Range<usize>)>,
}

impl SendPart {
    fn payload_len(&self) -> usize {
        self.payload.as_ref().map_or(0, |(_, r)| r.len())
    }

    fn len(&self) -> usize {
        REQUEST_LEN + self.payload_len()
    }
}

impl SendBatch {
    fn has_room(&self) -> bool {
        self.parts.len() < SEND_BATCH_JOBS_MAX && self.payload_bytes < SEND_BATCH_BYTES_MAX
    }

    fn push(
        &mut self,
        header: [u8; REQUEST_LEN],
        payload: Option<(Arc<AlignedBuf>, Range<usize>)>,
    ) {
        let part = SendPart { header, payload };
        self.payload_bytes += part.payload_len();
        self.parts.push(part);
    }

    /// The unsent bytes: the parts from `first` on, less `skip` bytes of the first.
    fn unsent(&self, first: usize, skip: usize) -> Vec<io::IoSlice<'_>> {
        let mut slices = Vec::with_capacity((self.parts.len() - first) * 2);
        let mut skip = skip;
        for part in &self.parts[first..] {
            let payload = part.payload.as_ref().map(|(b, r)| &b.as_slice()[r.clone()]);
            for bytes in std::iter::once(&part.header[..]).chain(payload) {
                let from = skip.min(bytes.len());
                skip -= from;
                if from < bytes.len() {
                    slices.push(io::IoSlice::new(&bytes[from..]));
                }
            }
        }
        slices
    }

    /// Writes every part, in order, and empties the batch.
    async fn send(&mut self, io: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        let (mut first, mut skip) = (0, 0);
        while first < self.parts.len() {
            let n = io.write_vectored(&self.unsent(first, skip)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            skip += n;
            while first < self.parts.len() && skip >= self.parts[first].len() {
                skip -= self.parts[first].len();
                self.parts[first].payload = None;
                first += 1;
            }
        }
        assert_eq!(skip, 0, "sent more than the batch held");
        self.parts.clear();
        self.payload_bytes = 0;
        Ok(())
    }
}

/// Waits until `stop` is closed (the device was dropped).
async fn stopped(stop: &Receiver<()>) {
    while stop.recv().await.is_ok() {}
}

/// `fut`, or a timeout error after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    fut.or(async {
        Timer::after(limit).await;
        Err(LinkError::Timeout(format!(
            "{what} timed out after {:.1}s",
            limit.as_secs_f64()
        )))
    })
    .await
}

/// The handshake on any byte stream: greeting, client flags, `NBD_OPT_GO`, its replies.
pub async fn handshake<S>(io: &mut S, export: &str) -> Result<Export, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if export.len() > MAX_EXPORT_NAME {
        return Err(LinkError::Unsuitable(format!(
            "an export name of {} bytes (at most {MAX_EXPORT_NAME})",
            export.len()
        )));
    }
    let mut greeting = [0; GREETING_LEN];
    io.read_exact(&mut greeting).await?;
    let flags = decode_greeting(&greeting)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(LinkError::Unsuitable(
            "the server does not speak fixed newstyle NBD".into(),
        ));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    let mut msg = encode_client_flags(client).to_vec();
    let go = encode_go(export, &[INFO_EXPORT, INFO_BLOCK_SIZE]);
    msg.extend_from_slice(&encode_option(OPT_GO, &go));
    io.write_all(&msg).await?;
    io.flush().await?;
    read_go_replies(io, export).await
}

/// `NBD_OPT_GO`'s replies up to its ACK or error.
pub async fn read_go_replies<S>(io: &mut S, export: &str) -> Result<Export, LinkError>
where
    S: AsyncRead + Unpin,
{
    let mut size_flags = None;
    let mut block = None;
    for _ in 0..MAX_GO_REPLIES {
        let mut head = [0; OPT_REPLY_HEADER_LEN];
        io.read_exact(&mut head).await?;
        let reply = decode_opt_reply(&head)?;
        // Bounded by decode_opt_reply (MAX_OPT_REPLY_LEN).
        let mut data = vec![0; reply.len as usize];
        io.read_exact(&mut data).await?;
        if reply.option != OPT_GO {
            return Err(ProtoError::Invalid(format!(
                "a reply to option {} while waiting for NBD_OPT_GO's",
                reply.option
            ))
            .into());
        }
        match reply.reply {
            REP_INFO => match decode_info(&data)? {
                Info::Export { size, flags } => size_flags = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => block = Some((min, preferred, max)),
                Info::Other { .. } => {}
            },
            REP_ACK => {
                let (size, flags) = size_flags.ok_or_else(|| {
                    ProtoError::Invalid("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
                })?;
                return Ok(Export { size, flags, block });
            }
            code if code & REP_ERR_BIT != 0 => {
                return Err(LinkError::Refused {
                    export: export.to_owned(),
                    code,
                    message: printable(&data),
                })
            }
            other => {
                return Err(ProtoError::Invalid(format!(
                    "option reply type {other:#x} to NBD_OPT_GO"
                ))
                .into())
            }
        }
    }
    Err(ProtoError::Invalid(format!("more than {MAX_GO_REPLIES} replies to NBD_OPT_GO")).into())
}

/// A server's message, made safe to print on one line.
fn printable(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// A connected socket.
pub enum Conn {
    Tcp(Async<TcpStream>),
    Unix(Async<UnixStream>),
}

async fn open(addr: &NbdAddress) -> Result<Conn, LinkError> {
    match &addr.endpoint {
        NbdEndpoint::Unix { path } => Ok(Conn::Unix(Async::<UnixStream>::connect(path).await?)),
        NbdEndpoint::Tcp { host, port } => {
            let target = (host.clone(), *port);
            let addrs: Vec<_> =
                smol::unblock(move || target.to_socket_addrs().map(|a| a.collect())).await?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for sa in addrs {
                match Async::<TcpStream>::connect(sa).await {
                    Ok(sock) => {
                        // Requests are small and latency-bound: no Nagle delay.
                        sock.get_ref().set_nodelay(true)?;
                        return Ok(Conn::Tcp(sock));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last.into())
        }
    }
}

/// Connects and shakes hands within the connect timeout; the export's geometry is checked.
pub async fn connect(addr: &NbdAddress, opts: &NbdOptions) -> Result<(Conn, Geometry), LinkError> {
    within(opts.connect_timeout, "connecting", async {
        let conn = open(addr).await?;
        let export = match &conn {
            Conn::Tcp(s) => handshake(&mut &*s, &addr.export).await?,
            Conn::Unix(s) => handshake(&mut &*s, &addr.export).await?,
        };
        let geometry = Geometry::of(&export).map_err(LinkError::Unsuitable)?;
        Ok((conn, geometry))
    })
    .await
}

/// How a session ended.
enum SessionEnd {
    /// The device was dropped.
    Stopped,
    Failed(LinkError),
}

/// The worker: owns the link for one device.
pub struct Worker {
    pub addr: NbdAddress,
    pub opts: NbdOptions,
    pub shared: Arc<Shared>,
    pub jobs: Receiver<Job>,
    pub stop: Receiver<()>,
}

/// What [`Worker::run`] reports once the first connection is made or has failed.
pub type Ready = std::sync::mpsc::SyncSender<Result<Geometry, LinkError>>;

impl Worker {
    /// The thread's body: the first connection (reported on `ready`), then sessions and
    /// reconnects until the device is dropped.
    pub async fn run(self, ready: Ready) {
        let first = connect(&self.addr, &self.opts).or(async {
            stopped(&self.stop).await;
            Err(LinkError::Unsuitable("the device was dropped".into()))
        });
        let (conn, original) = match first.await {
            Ok(ok) => ok,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        self.shared.set_connected(&original);
        if ready.send(Ok(original)).is_err() {
            return;
        }
        let mut conn = Some(conn);
        let mut backoff = self.opts.reconnect_backoff_min;
        loop {
            if let Some(live) = conn.take() {
                // A failed session marked the link down before failing its jobs.
                if let SessionEnd::Stopped = self.session(live).await {
                    return;
                }
                backoff = self.opts.reconnect_backoff_min;
            }
            if self.wait_down(backoff).await.is_none() {
                return;
            }
            self.shared.set_connecting();
            match self.reconnect(&original).await {
                None => return,
                Some(Ok(live)) => conn = Some(live),
                Some(Err(e)) => {
                    self.shared.set_down(&e);
                    backoff = (backoff * 2).min(self.opts.reconnect_backoff_max);
                }
            }
        }
    }

    /// One reconnect attempt; `None` if the device was dropped meanwhile.
    async fn reconnect(&self, original: &Geometry) -> Option<Result<Conn, LinkError>> {
        let attempt = async {
            let res = connect(&self.addr, &self.opts)
                .await
                .and_then(|(conn, now)| {
                    original
                        .check_reconnect(&now)
                        .map_err(LinkError::Unsuitable)?;
                    Ok((conn, now))
                });
            Some(res)
        };
        let res = attempt
            .or(async {
                stopped(&self.stop).await;
                None
            })
            .or(self.reject_jobs())
            .await?;
        Some(res.map(|(conn, now)| {
            self.shared.set_connected(&now);
            conn
        }))
    }

    /// Waits `backoff` while failing jobs with `ENOTCONN`; `None` if the device was dropped.
    async fn wait_down(&self, backoff: Duration) -> Option<()> {
        async {
            Timer::after(backoff).await;
            Some(())
        }
        .or(async {
            stopped(&self.stop).await;
            None
        })
        .or(self.reject_jobs())
        .await
    }

    /// Fails every job that arrives with `ENOTCONN`; never returns.
    async fn reject_jobs<T>(&self) -> T {
        loop {
            match self.jobs.recv().await {
                Ok(job) => job.complete(Err(errno(libc::ENOTCONN))),
                Err(_) => future::pending::<()>().await,
            }
        }
    }

    async fn session(&self, conn: Conn) -> SessionEnd {
        match &conn {
            Conn::Tcp(s) => Session::new(s, self).run().await,
            Conn::Unix(s) => Session::new(s, self).run().await,
        }
    }
}

/// One connection's transmission phase.
struct Session<'a, T> {
    sock: &'a Async<T>,
    worker: &'a Worker,
    in_flight: RefCell<HashMap<u64, (Job, SemaphoreGuardArc)>>,
    next_cookie: Cell<u64>,
    slots: Arc<Semaphore>,
}

impl<'a, T> Session<'a, T>
where
    for<'b> &'b T: Read + Write,
{
    fn new(sock: &'a Async<T>, worker: &'a Worker) -> Self {
        Session {
            sock,
            worker,
            in_flight: RefCell::new(HashMap::new()),
            next_cookie: Cell::new(1),
            slots: Arc::new(Semaphore::new(worker.opts.max_in_flight)),
        }
    }

    async fn run(self) -> SessionEnd {
        // The reply buffer outlives the read loop: replies it holds when the device is
        // dropped are still drained by `disconnect`.
        let mut replies = BufReader::with_capacity(RECV_BUFFER_BYTES, self.sock);
        let failed = async { SessionEnd::Failed(self.read_loop(&mut replies).await) }
            .or(async {
                match self.write_loop().await {
                    Ok(()) => SessionEnd::Stopped,
                    Err(e) => SessionEnd::Failed(e),
                }
            })
            .or(async { SessionEnd::Failed(self.watch_deadlines().await) })
            .or(async {
                stopped(&self.worker.stop).await;
                SessionEnd::Stopped
            })
            .await;
        match failed {
            SessionEnd::Stopped => {
                self.disconnect(&mut replies).await;
                SessionEnd::Stopped
            }
            SessionEnd::Failed(e) => {
                // Down first: a caller that sees its request fail finds the link down.
                self.worker.shared.set_down(&e);
                if matches!(e, LinkError::ServerShutdown) {
                    self.send_disc(DISC_GRACE).await;
                }
                self.fail_in_flight();
                SessionEnd::Failed(e)
            }
        }
    }

    fn set_in_flight(&self, n: usize) {
        self.worker.shared.status().in_flight = n as u64;
    }

    /// Takes jobs and sends them; `Ok` when the device closed the channel. Jobs already
    /// queued when one is taken go out with it in one vectored write (at most
    /// [`SEND_BATCH_JOBS_MAX`] jobs, [`SEND_BATCH_BYTES_MAX`] bytes of payload): under load a
    /// burst of requests costs one system call, not two per request.
    async fn write_loop(&self) -> Result<(), LinkError> {
        let mut io = self.sock;
        let mut batch = SendBatch::default();
        loop {
            let permit = self.slots.acquire_arc().await;
            let Ok(job) = self.worker.jobs.recv().await else {
                return Ok(());
            };
            self.stage(job, permit, &mut batch);
            while batch.has_room() {
                let Some(permit) = self.slots.try_acquire_arc() else {
                    break;
                };
                let Ok(job) = self.worker.jobs.try_recv() else {
                    break;
                };
                self.stage(job, permit, &mut batch);
            }
            self.set_in_flight(self.in_flight.borrow().len());
            batch.send(&mut io).await?;
        }
    }

    /// Gives `job` a cookie, enters it in flight and adds its bytes to `batch`; a job that
    /// waited its whole time in the queue fails instead (the server is too slow for it).
    fn stage(&self, job: Job, permit: SemaphoreGuardArc, batch: &mut SendBatch) {
        if job.deadline <= Instant::now() {
            job.complete(Err(errno(libc::ETIMEDOUT)));
            return;
        }
        let cookie = self.next_cookie.get();
        self.next_cookie.set(cookie.wrapping_add(1));
        batch.push(
            encode_request(&Request {
                flags: job.flags,
                cmd: job.cmd(),
                cookie,
                offset: job.offset,
                len: job.len,
            }),
            job.payload(),
        );
        self.in_flight.borrow_mut().insert(cookie, (job, permit));
    }

    /// Reads replies until something breaks; returns why. Replies are read through a buffer,
    /// so a burst of them costs one system call; a read's payload larger than the buffer goes
    /// straight into the caller's buffer.
    async fn read_loop(&self, replies: &mut (impl AsyncRead + Unpin)) -> LinkError {
        loop {
            if let Err(e) = self.read_one(replies).await {
                return e;
            }
        }
    }

    async fn read_one(&self, io: &mut (impl AsyncRead + Unpin)) -> Result<(), LinkError> {
        let mut head = [0; SIMPLE_REPLY_LEN];
        io.read_exact(&mut head).await?;
        let reply = decode_simple_reply(&head)?;
        let taken = self.in_flight.borrow_mut().remove(&reply.cookie);
        let Some((mut job, _permit)) = taken else {
            return Err(ProtoError::Invalid(format!(
                "a reply to cookie {}, which is not in flight",
                reply.cookie
            ))
            .into());
        };
        self.set_in_flight(self.in_flight.borrow().len());
        if reply.error != 0 {
            job.complete(Err(errno(errno_of_nbd(reply.error))));
            if reply.error == proto::NBD_ESHUTDOWN {
                return Err(LinkError::ServerShutdown);
            }
            return Ok(());
        }
        let len = job.len as usize;
        if let Some(Op::Read { buf, at }) = job.op.as_mut() {
            let range = *at..*at + len;
            if let Err(e) = io.read_exact(&mut buf.as_mut_slice()[range]).await {
                job.complete(Err(errno(libc::EIO)));
                return Err(e.into());
            }
        }
        job.complete(Ok(()));
        Ok(())
    }

    /// Ends the session when a job in flight passes its deadline.
    async fn watch_deadlines(&self) -> LinkError {
        let tick = (self.worker.opts.request_timeout / 4).min(DEADLINE_TICK_MAX);
        loop {
            let now = Instant::now();
            let earliest = self
                .in_flight
                .borrow()
                .values()
                .map(|(j, _)| j.deadline)
                .min();
            let wake = earliest.map_or(now + tick, |d| d.min(now + tick));
            Timer::at(wake).await;
            let now = Instant::now();
            let late = self
                .in_flight
                .borrow()
                .values()
                .filter(|(j, _)| j.deadline <= now)
                .count();
            if late > 0 {
                return LinkError::Timeout(format!(
                    "{late} request(s) got no reply within {:.1}s",
                    self.worker.opts.request_timeout.as_secs_f64()
                ));
            }
        }
    }

    /// Fails every job in flight: `ETIMEDOUT` past its deadline, `EIO` otherwise.
    fn fail_in_flight(&self) {
        let now = Instant::now();
        let jobs: Vec<_> = self.in_flight.borrow_mut().drain().collect();
        for (_, (job, _permit)) in jobs {
            let code = if job.deadline <= now {
                libc::ETIMEDOUT
            } else {
                libc::EIO
            };
            job.complete(Err(errno(code)));
        }
        self.set_in_flight(0);
    }

    /// The device is gone: let replies in flight arrive, then `NBD_CMD_DISC`, all within
    /// [`DISC_GRACE`] (a server that stopped reading must not hold the drop up twice).
    async fn disconnect(&self, replies: &mut (impl AsyncRead + Unpin)) {
        let deadline = Instant::now() + DISC_GRACE;
        let drained = async {
            while !self.in_flight.borrow().is_empty() {
                if self.read_one(replies).await.is_err() {
                    return;
                }
            }
        };
        drained
            .or(async {
                Timer::at(deadline).await;
            })
            .await;
        self.send_disc(deadline.saturating_duration_since(Instant::now()))
            .await;
        // Jobs still in flight complete with ENOTCONN as they drop with the session.
    }

    /// Sends `NBD_CMD_DISC`, giving up after `limit` (a write that can go at once still
    /// goes with no time left).
    async fn send_disc(&self, limit: Duration) {
        let mut io = self.sock;
        let disc = encode_request(&Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: self.next_cookie.get(),
            offset: 0,
            len: 0,
        });
        // Best effort: the socket may be dead already, and we close it either way.
        let _ = within(limit, "NBD_CMD_DISC", async {
            io.write_all(&disc).await?;
            Ok(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;

    use super::*;

    /// A socket that takes at most `chunk` bytes per write, and at each write checks that
    /// every part wholly sent by the earlier ones has let go of its payload.
    struct Trickle {
        chunk: usize,
        got: Vec<u8>,
        payloads: Vec<(usize, Arc<AlignedBuf>)>,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let me = self.get_mut();
            // The parts wholly sent by the writes before this one.
            for (end, payload) in &me.payloads {
                if *end <= me.got.len() {
                    assert_eq!(
                        Arc::strong_count(payload),
                        1,
                        "a part sent keeps its payload"
                    );
                }
            }
            let n = buf.len().min(me.chunk);
            me.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A batch sends its headers and payloads in order, whole, however the socket cuts
        /// the writes, and lets go of each payload once it is sent.
        #[test]
        fn a_batch_is_sent_whole_and_lets_go_as_it_goes(
            lens in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..9], 1..12),
            chunk in 1usize..6000,
        ) {
            let mut batch = SendBatch::default();
            let mut want = Vec::new();
            let mut sock = Trickle { chunk, got: Vec::new(), payloads: Vec::new() };
            for (i, &sectors) in lens.iter().enumerate() {
                let header = [i as u8; REQUEST_LEN];
                want.extend_from_slice(&header);
                // A payload is a part of its buffer (one sector in), as a piece of a write is.
                let payload = (sectors > 0).then(|| {
                    let bytes = sectors * 512;
                    let buf = Arc::new(AlignedBuf::from_slice(&vec![i as u8 ^ 0x5a; bytes + 512]));
                    want.extend_from_slice(&buf.as_slice()[512..]);
                    sock.payloads.push((want.len(), Arc::clone(&buf)));
                    (buf, 512..bytes + 512)
                });
                batch.push(header, payload);
            }
            smol::block_on(batch.send(&mut sock)).expect("send");
            prop_assert_eq!(&sock.got, &want);
            prop_assert!(batch.parts.is_empty());
            prop_assert!(sock.payloads.iter().all(|(_, b)| Arc::strong_count(b) == 1));
        }
    }
}
