//! The control socket protocol, and its client.
//!
//! Each daemon listens on `/run/ublkdm/<id>.sock` (a root-only directory, the socket mode
//! 0600). One connection carries one exchange: the client writes a request as one line of
//! JSON, the daemon answers with one line of JSON and closes. Messages are versioned
//! ([`PROTOCOL_VERSION`]); a daemon refuses a version it does not speak.
//!
//! Requests: `{"version":1,"cmd":"status"}`, `{"version":1,"cmd":"stop"}`,
//! `{"version":1,"cmd":"resize","size_sectors":N}` (no `size_sectors`: all the target holds),
//! and target commands
//! `{"version":1,"cmd":"target","name":"fail-leg","args":{...}}`, which the daemon hands to
//! [`crate::target::Target::command`]. Replies: `{"version":1,"ok":true,"result":...}` or
//! `{"version":1,"ok":false,"error":{"kind":"busy","message":"..."}}`, `kind` being an
//! [`ErrorKind::name`].
//!
//! Every exchange is bounded: a request is at most [`MAX_REQUEST_BYTES`] and a reply at most
//! [`MAX_REPLY_BYTES`] (a daemon whose reply would be larger answers with an error instead),
//! and reads and writes time out after [`IO_TIMEOUT`], on both sides, but for the client's
//! wait for a reply ([`REPLY_TIMEOUT`]). A connection closed before a whole line came is told
//! apart from an oversized one: the first means the peer is gone (a daemon that died).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, ErrorKind, IoContext, Result};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The directory of the sockets (and nothing else of other users): root only.
pub const SOCKET_DIR: &str = "/run/ublkdm";
/// The largest request, newline included.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;
/// The largest reply, newline included: a group's status grows with its snapshots (each a
/// device with its counters, about 400 bytes).
pub const MAX_REPLY_BYTES: u64 = 4 << 20;
/// How long either side waits for the other to send or take a message.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the reply: a command may start or stop devices (a snapshot's),
/// each bounded by the daemon's own limits, well inside this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(90);

/// The socket of device `id`'s daemon.
pub fn socket_path(id: u32) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{id}.sock"))
}

/// A command to a daemon.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// The device, its daemon and its target.
    Status,
    /// An orderly stop: flush the target, stop and delete the device, exit.
    Stop,
    /// Online resize: `Target::resize(size_sectors)`, then the kernel is told.
    Resize {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size_sectors: Option<u64>,
    },
    /// A target command, routed to `Target::command(name, args)`.
    Target {
        name: String,
        #[serde(default)]
        args: serde_json::Value,
    },
}

impl Command {
    /// A target's command on the wire: `command` is the target's serde-tagged command enum
    /// (`#[serde(tag = "name", content = "args")]`), whose tag and content become the name and
    /// the arguments.
    pub fn target<C: serde::Serialize>(command: &C) -> Command {
        let wire = serde_json::to_value(command).expect("commands serialize");
        let name = wire["name"].as_str().expect("a tagged command");
        Command::Target {
            name: name.to_owned(),
            args: wire["args"].clone(),
        }
    }

    /// The reverse of [`Command::target`], in the daemon: the command `name` with its
    /// arguments `args`, parsed once into the target's command enum `C`. `kind` and `names`
    /// (the commands `C` has) word the error for any other name.
    pub fn parse_target<C: serde::de::DeserializeOwned>(
        kind: &str,
        names: &[&str],
        name: &str,
        args: &serde_json::Value,
    ) -> Result<C> {
        if !names.contains(&name) {
            return Err(Error::invalid(format!(
                "the {kind} target has no command '{name}' (try {})",
                names.join(", ")
            )));
        }
        let args = if args.is_null() {
            serde_json::json!({})
        } else {
            args.clone()
        };
        serde_json::from_value(serde_json::json!({ "name": name, "args": args }))
            .map_err(|e| Error::invalid(format!("{name}: {e}")))
    }
}

/// A request on the wire.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

/// An error on the wire.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyError {
    pub kind: String,
    pub message: String,
}

/// A reply on the wire.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
}

impl Reply {
    pub fn success(result: serde_json::Value) -> Reply {
        Reply {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn failure(err: &Error) -> Reply {
        let error = ReplyError {
            kind: err.kind().name().to_owned(),
            message: err.chain().join(": "),
        };
        Reply {
            version: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(error),
        }
    }

    /// The result, or the daemon's error as an [`Error`] of the same kind.
    pub fn into_result(self) -> Result<serde_json::Value> {
        if self.version != PROTOCOL_VERSION {
            return Err(Error::new(
                ErrorKind::Daemon,
                format!("the daemon speaks protocol version {}", self.version),
            ));
        }
        match (self.ok, self.error) {
            (true, _) => Ok(self.result.unwrap_or(serde_json::Value::Null)),
            (false, Some(e)) => Err(Error::new(ErrorKind::from_name(&e.kind), e.message)),
            (false, None) => Err(Error::new(
                ErrorKind::Daemon,
                "the daemon failed without saying why",
            )),
        }
    }
}

/// Reads one line of at most `limit` bytes and parses it as `T`.
pub fn read_message<T: serde::de::DeserializeOwned>(stream: &UnixStream, limit: u64) -> Result<T> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(limit));
    let read = reader
        .read_line(&mut line)
        .context(|| "cannot read from the control socket".to_owned())?;
    if !line.ends_with('\n') {
        let why = if u64::try_from(read).is_ok_and(|n| n >= limit) {
            format!("a control message longer than {limit} bytes")
        } else if read == 0 {
            "the connection was closed without a message (did the peer exit?)".to_owned()
        } else {
            format!("the connection was closed after {read} bytes of a message")
        };
        return Err(Error::new(ErrorKind::Daemon, why));
    }
    serde_json::from_str(&line)
        .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "malformed control message", e))
}

/// Writes `message` as one line of JSON, refused (before anything is sent) if longer than
/// `limit` bytes.
pub fn write_message<T: serde::Serialize>(
    mut stream: &UnixStream,
    message: &T,
    limit: u64,
) -> Result<()> {
    let mut line = serde_json::to_string(message).expect("control messages serialize");
    line.push('\n');
    if u64::try_from(line.len()).map_or(true, |n| n > limit) {
        return Err(Error::new(
            ErrorKind::Daemon,
            format!(
                "a control message of {} bytes is longer than the {limit} allowed",
                line.len()
            ),
        ));
    }
    stream
        .write_all(line.as_bytes())
        .context(|| "cannot write to the control socket".to_owned())
}

/// Sends `command` to device `id`'s daemon and returns its result. A missing or refusing
/// socket is a `Daemon` error: the daemon is gone.
pub fn request(id: u32, command: Command) -> Result<serde_json::Value> {
    let path = socket_path(id);
    let stream = UnixStream::connect(&path).map_err(|e| {
        Error::with_source(
            ErrorKind::Daemon,
            format!("no daemon answers for device {id} ({})", path.display()),
            e,
        )
    })?;
    let timeouts = stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    timeouts.context(|| "cannot set socket timeouts".to_owned())?;
    write_message(
        &stream,
        &Request {
            version: PROTOCOL_VERSION,
            command,
        },
        MAX_REQUEST_BYTES,
    )?;
    let reply: Reply = read_message(&stream, MAX_REPLY_BYTES).map_err(|e| {
        Error::with_source(
            ErrorKind::Daemon,
            format!("the daemon of device {id} did not answer"),
            e,
        )
    })?;
    reply.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let status = serde_json::to_value(Request {
            version: 1,
            command: Command::Status,
        })
        .expect("json");
        assert_eq!(status, serde_json::json!({"version": 1, "cmd": "status"}));
        let parsed: Request = serde_json::from_str(
            r#"{"version":1,"cmd":"target","name":"fail-leg","args":{"leg":1}}"#,
        )
        .expect("parse");
        assert_eq!(
            parsed.command,
            Command::Target {
                name: "fail-leg".into(),
                args: serde_json::json!({"leg": 1})
            }
        );
        let no_args: Request =
            serde_json::from_str(r#"{"version":1,"cmd":"target","name":"x"}"#).expect("parse");
        assert_eq!(
            no_args.command,
            Command::Target {
                name: "x".into(),
                args: serde_json::Value::Null
            }
        );
    }

    #[test]
    fn replies_carry_errors_with_their_kind() {
        let reply = Reply::failure(&Error::new(ErrorKind::Busy, "leg 1 is already failed"));
        let wire = serde_json::to_string(&reply).expect("json");
        let back: Reply = serde_json::from_str(&wire).expect("parse");
        let err = back.into_result().expect_err("failure");
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert_eq!(
            Reply::success(serde_json::json!(3))
                .into_result()
                .expect("ok"),
            serde_json::json!(3)
        );
    }

    #[test]
    fn messages_round_trip_over_a_socket() {
        let (a, b) = UnixStream::pair().expect("pair");
        write_message(
            &a,
            &Request {
                version: 1,
                command: Command::Stop,
            },
            MAX_REQUEST_BYTES,
        )
        .expect("write");
        let got: Request = read_message(&b, MAX_REQUEST_BYTES).expect("read");
        assert_eq!(got.command, Command::Stop);
    }

    #[test]
    fn a_closed_connection_is_told_from_an_oversized_message() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        let err = read_message::<Reply>(&b, 64).expect_err("closed");
        assert!(
            err.to_string().contains("closed without a message"),
            "{err}"
        );

        let (mut a, b) = UnixStream::pair().expect("pair");
        a.write_all(&[b'x'; 100]).expect("write");
        drop(a);
        let err = read_message::<Reply>(&b, 64).expect_err("oversized");
        assert!(err.to_string().contains("longer than 64 bytes"), "{err}");

        let (mut a, b) = UnixStream::pair().expect("pair");
        a.write_all(b"{\"version\"").expect("write");
        drop(a);
        let err = read_message::<Reply>(&b, 64).expect_err("cut");
        assert!(err.to_string().contains("after 10 bytes"), "{err}");

        let (a, _b) = UnixStream::pair().expect("pair");
        let big = Reply::success(serde_json::json!("y".repeat(100)));
        let err = write_message(&a, &big, 64).expect_err("too long to send");
        assert_eq!(err.kind(), ErrorKind::Daemon);
    }
}
