//! The error a user sees, and the exit code it maps to.
//!
//! Operating errors (bad input, a missing device, an I/O failure) are values of [`Error`]:
//! a stable [`ErrorKind`] that decides the exit code and errno, a one-line message with
//! context, and the cause chain. Bugs are panics, never `Error`s.

use std::io;

/// The class of an error: stable, because exit codes and errnos derive from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user asked for something malformed or impossible (exit 2).
    InvalidArgument,
    /// A named device, file or object does not exist (exit 3).
    NotFound,
    /// The resource is in use by someone else (exit 4).
    Busy,
    /// The kernel or device lacks a needed feature (exit 5).
    Unsupported,
    /// A device returned an I/O error (exit 6).
    Io,
    /// On-disk metadata is damaged or foreign (exit 7).
    Corrupt,
    /// A daemon did not answer, or answered nonsense (exit 8).
    Daemon,
}

impl ErrorKind {
    /// The process exit code for this class; documented in the README.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::InvalidArgument => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::Busy => 4,
            ErrorKind::Unsupported => 5,
            ErrorKind::Io => 6,
            ErrorKind::Corrupt => 7,
            ErrorKind::Daemon => 8,
        }
    }

    /// A stable name for the class, used on the wire (control socket, daemon handshake).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Busy => "busy",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "io",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Daemon => "daemon",
        }
    }

    /// The class named `name` (see [`ErrorKind::name`]); unknown names are daemon errors, because
    /// they can only come from a peer that speaks another protocol version.
    pub fn from_name(name: &str) -> ErrorKind {
        const ALL: [ErrorKind; 7] = [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::Busy,
            ErrorKind::Unsupported,
            ErrorKind::Io,
            ErrorKind::Corrupt,
            ErrorKind::Daemon,
        ];
        ALL.into_iter()
            .find(|k| k.name() == name)
            .unwrap_or(ErrorKind::Daemon)
    }

    /// The errno a block request failing with this class completes with.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::NotFound => libc::ENODEV,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Daemon => libc::EIO,
        }
    }
}

/// An operating error: what failed, in one line, and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by `source`, described by `message`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Wraps an `io::Error`, choosing the kind from its errno.
    pub fn io(message: impl Into<String>, source: io::Error) -> Error {
        Error::with_source(kind_of_io(&source), message, source)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// This error as the cause of `message`, keeping its kind.
    pub fn context(self, message: impl Into<String>) -> Error {
        let kind = self.kind;
        Error::with_source(kind, message, self)
    }

    /// The whole cause chain as separate lines, the outermost first.
    pub fn chain(&self) -> Vec<String> {
        let mut lines = vec![self.message.clone()];
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            lines.push(err.to_string());
            cause = err.source();
        }
        lines
    }
}

/// A cause known only as text: the chain of an error that crossed a process boundary (the
/// daemon handshake, the control socket), rebuilt so that it prints like a local one.
#[derive(Debug)]
pub struct RemoteCause {
    message: String,
    source: Option<Box<RemoteCause>>,
}

impl RemoteCause {
    /// The chain `lines` (outermost first) as nested causes; `None` when empty.
    pub fn chain(lines: &[String]) -> Option<RemoteCause> {
        let (first, rest) = lines.split_first()?;
        Some(RemoteCause {
            message: first.clone(),
            source: RemoteCause::chain(rest).map(Box::new),
        })
    }
}

impl std::fmt::Display for RemoteCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// Rebuilds an error sent as `kind` and its chain of lines (see [`Error::chain`]).
    pub fn from_remote(kind: ErrorKind, lines: &[String]) -> Error {
        let message = lines
            .first()
            .cloned()
            .unwrap_or_else(|| "unknown error".to_owned());
        match RemoteCause::chain(lines.get(1..).unwrap_or_default()) {
            Some(cause) => Error::with_source(kind, message, cause),
            None => Error::new(kind, message),
        }
    }
}

/// The error kind that an errno from a syscall belongs to.
pub fn kind_of_io(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => ErrorKind::NotFound,
        Some(libc::EBUSY) => ErrorKind::Busy,
        Some(libc::EINVAL) => ErrorKind::InvalidArgument,
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => ErrorKind::Unsupported,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    }
}

/// Adds context to a fallible `io::Result`.
pub trait IoContext<T> {
    fn context(self, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(message(), e))
    }
}
