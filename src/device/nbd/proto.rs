//! The NBD wire format, as far as this client speaks it: pure encode and decode functions.
//!
//! The subset: the fixed-newstyle handshake with `NBD_OPT_GO` (and `NBD_OPT_ABORT`), the
//! `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` replies, requests, and simple replies. No
//! structured replies, no TLS. Both directions are here (the model server in `model.rs`
//! speaks the server's side) so that every message can be tested as a round trip.
//!
//! Every number on the wire is big-endian. Every decoder takes a byte slice that may be short
//! or hostile: a short slice is [`ProtoError::Truncated`], a wrong magic is
//! [`ProtoError::BadMagic`], and a length is checked against a named limit before anything
//! is allocated for it. Nothing here panics on input.

use std::fmt;

// Magics.
/// "NBDMAGIC": the first eight bytes from a server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle greeting's second magic, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk's magic: never valid here, since we never negotiate them.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

// Information types (NBD_OPT_GO's requests and NBD_REP_INFO's payloads).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;

// Error values of simple replies (the protocol's, which are Linux's numbers).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// Message sizes.
/// NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
/// IHAVEOPT, option, length.
pub const OPT_HEADER_LEN: usize = 16;
/// Magic, option, reply type, length.
pub const OPT_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
/// `NBD_INFO_EXPORT`: type, size, transmission flags.
pub const INFO_EXPORT_LEN: usize = 12;
/// `NBD_INFO_BLOCK_SIZE`: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_LEN: usize = 14;

// Limits on what a peer may send.
/// The longest export name (the spec's limit on any string).
pub const MAX_EXPORT_NAME: usize = 4096;
/// The longest option reply payload we read: an info or an error message is a string of at
/// most 4096 bytes plus a few fields; anything longer is hostile.
pub const MAX_OPT_REPLY_LEN: u32 = 4096 + 64;
/// The longest option payload the model server reads (a GO: name, count, a few infos).
pub const MAX_OPT_LEN: u32 = 4 + MAX_EXPORT_NAME as u32 + 2 + 2 * 16;
/// The most payload one request carries when the server gives no maximum block size (the
/// spec's advice to clients).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// A message that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer bytes than the message needs.
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    BadMagic {
        what: &'static str,
        got: u64,
    },
    /// A length field beyond its limit.
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// Anything else that breaks the protocol, described.
    Invalid(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Truncated { what, need, got } => {
                write!(f, "truncated {what}: {got} of {need} bytes")
            }
            ProtoError::BadMagic { what, got } => write!(f, "bad {what} magic {got:#x}"),
            ProtoError::TooLong { what, len, max } => {
                write!(f, "{what} of {len} bytes (at most {max})")
            }
            ProtoError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProtoError {}

type Result<T> = std::result::Result<T, ProtoError>;

/// `buf`, if it holds at least `need` bytes.
fn need<'a>(buf: &'a [u8], need: usize, what: &'static str) -> Result<&'a [u8]> {
    buf.get(..need).ok_or(ProtoError::Truncated {
        what,
        need,
        got: buf.len(),
    })
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// A server's first message: its handshake flags after the two magics.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The handshake flags of a newstyle greeting. An oldstyle server (its second magic is not
/// IHAVEOPT) is a bad magic.
pub fn decode_greeting(buf: &[u8]) -> Result<u16> {
    let buf = need(buf, GREETING_LEN, "greeting")?;
    if be64(buf, 0) != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            got: be64(buf, 0),
        });
    }
    if be64(buf, 8) != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle greeting (an oldstyle server?)",
            got: be64(buf, 8),
        });
    }
    Ok(be16(buf, 16))
}

pub fn encode_client_flags(flags: u32) -> [u8; CLIENT_FLAGS_LEN] {
    flags.to_be_bytes()
}

pub fn decode_client_flags(buf: &[u8]) -> Result<u32> {
    Ok(be32(need(buf, CLIENT_FLAGS_LEN, "client flags")?, 0))
}

/// An option's header: which option and how many bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn encode_option_header(h: OptionHeader) -> [u8; OPT_HEADER_LEN] {
    let mut out = [0; OPT_HEADER_LEN];
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..16].copy_from_slice(&h.len.to_be_bytes());
    out
}

pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader> {
    let buf = need(buf, OPT_HEADER_LEN, "option header")?;
    if be64(buf, 0) != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            got: be64(buf, 0),
        });
    }
    Ok(OptionHeader {
        option: be32(buf, 8),
        len: be32(buf, 12),
    })
}

/// `NBD_OPT_GO`'s data: the export name and the information requested.
pub fn encode_go(export: &str, infos: &[u16]) -> Vec<u8> {
    assert!(
        export.len() <= MAX_EXPORT_NAME,
        "export name checked by the caller"
    );
    let mut out = Vec::with_capacity(4 + export.len() + 2 + 2 * infos.len());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

/// A whole option message: header and data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("option data fits u32");
    let mut out = encode_option_header(OptionHeader { option, len }).to_vec();
    out.extend_from_slice(data);
    out
}

/// The export name and information requests of `NBD_OPT_GO` data (exactly `data`).
pub fn decode_go(data: &[u8]) -> Result<(String, Vec<u16>)> {
    let name_len = be32(need(data, 4, "NBD_OPT_GO")?, 0) as usize;
    if name_len > MAX_EXPORT_NAME {
        return Err(ProtoError::TooLong {
            what: "export name",
            len: name_len as u64,
            max: MAX_EXPORT_NAME as u64,
        });
    }
    let rest = &data[4..];
    let name = need(rest, name_len, "NBD_OPT_GO export name")?;
    let name = std::str::from_utf8(name)
        .map_err(|_| ProtoError::Invalid("an export name that is not UTF-8".into()))?;
    let rest = &rest[name_len..];
    let count = usize::from(be16(need(rest, 2, "NBD_OPT_GO info count")?, 0));
    let list = need(&rest[2..], 2 * count, "NBD_OPT_GO info list")?;
    if rest.len() != 2 + 2 * count {
        return Err(ProtoError::Invalid("NBD_OPT_GO with trailing bytes".into()));
    }
    let infos = (0..count).map(|i| be16(list, 2 * i)).collect();
    Ok((name.to_owned(), infos))
}

/// An option reply's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

pub fn encode_opt_reply(r: OptReply) -> [u8; OPT_REPLY_HEADER_LEN] {
    let mut out = [0; OPT_REPLY_HEADER_LEN];
    out[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&r.option.to_be_bytes());
    out[12..16].copy_from_slice(&r.reply.to_be_bytes());
    out[16..20].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// An option reply's header, its length bounded by [`MAX_OPT_REPLY_LEN`].
pub fn decode_opt_reply(buf: &[u8]) -> Result<OptReply> {
    let buf = need(buf, OPT_REPLY_HEADER_LEN, "option reply")?;
    if be64(buf, 0) != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: be64(buf, 0),
        });
    }
    let reply = OptReply {
        option: be32(buf, 8),
        reply: be32(buf, 12),
        len: be32(buf, 16),
    };
    if reply.len > MAX_OPT_REPLY_LEN {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: u64::from(reply.len),
            max: u64::from(MAX_OPT_REPLY_LEN),
        });
    }
    Ok(reply)
}

/// An `NBD_REP_INFO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// The export's size in bytes and its transmission flags.
    Export { size: u64, flags: u16 },
    /// Block size constraints, in bytes.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// Another information type, kept whole (its payload after the type).
    Other { kind: u16, data: Vec<u8> },
}

pub fn encode_info(info: &Info) -> Vec<u8> {
    let mut out = Vec::new();
    match info {
        Info::Export { size, flags } => {
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            for v in [min, preferred, max] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Other { kind, data } => {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(data);
        }
    }
    out
}

/// An `NBD_REP_INFO` payload (exactly `data`). The export and block-size infos must have
/// their exact lengths; other types are kept as they come.
pub fn decode_info(data: &[u8]) -> Result<Info> {
    let kind = be16(need(data, 2, "info")?, 0);
    let exact = |len: usize, what: &'static str| -> Result<()> {
        need(data, len, what)?;
        if data.len() == len {
            Ok(())
        } else {
            Err(ProtoError::Invalid(format!(
                "{what} of {} bytes, not {len}",
                data.len()
            )))
        }
    };
    match kind {
        INFO_EXPORT => {
            exact(INFO_EXPORT_LEN, "NBD_INFO_EXPORT")?;
            Ok(Info::Export {
                size: be64(data, 2),
                flags: be16(data, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            exact(INFO_BLOCK_SIZE_LEN, "NBD_INFO_BLOCK_SIZE")?;
            Ok(Info::BlockSize {
                min: be32(data, 2),
                preferred: be32(data, 6),
                max: be32(data, 10),
            })
        }
        kind => Ok(Info::Other {
            kind,
            data: data[2..].to_vec(),
        }),
    }
}

/// A transmission request's header (a write's payload follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.len.to_be_bytes());
    out
}

pub fn decode_request(buf: &[u8]) -> Result<Request> {
    let buf = need(buf, REQUEST_LEN, "request")?;
    if be32(buf, 0) != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            got: u64::from(be32(buf, 0)),
        });
    }
    Ok(Request {
        flags: be16(buf, 4),
        cmd: be16(buf, 6),
        cookie: be64(buf, 8),
        offset: be64(buf, 16),
        len: be32(buf, 24),
    })
}

/// A simple reply: an error value (0: success) for the request with this cookie. A
/// successful read's data follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn encode_simple_reply(r: &SimpleReply) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&r.error.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out
}

/// A simple reply; a structured reply (never negotiated) is a protocol error of its own.
pub fn decode_simple_reply(buf: &[u8]) -> Result<SimpleReply> {
    let buf = need(buf, SIMPLE_REPLY_LEN, "reply")?;
    match be32(buf, 0) {
        SIMPLE_REPLY_MAGIC => Ok(SimpleReply {
            error: be32(buf, 4),
            cookie: be64(buf, 8),
        }),
        STRUCTURED_REPLY_MAGIC => Err(ProtoError::Invalid(
            "a structured reply, which was not negotiated".into(),
        )),
        got => Err(ProtoError::BadMagic {
            what: "reply",
            got: u64::from(got),
        }),
    }
}

/// The errno for a reply's error value: the protocol's values are Linux's; any other is EIO.
pub fn errno_of_nbd(error: u32) -> i32 {
    match error {
        NBD_EPERM => libc::EPERM,
        NBD_EIO => libc::EIO,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_EINVAL => libc::EINVAL,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::EOPNOTSUPP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// The error value a server sends for `errno` (the model server's side of
/// [`errno_of_nbd`]): values outside the protocol's set go out as EINVAL, as the spec says.
pub fn nbd_of_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::ENOSPC => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EINVAL,
    }
}

/// A name for an option reply error, for messages.
pub fn rep_error_name(reply: u32) -> String {
    match reply {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option unknown to the server)".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (refused by the server's policy)".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS)".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)".into(),
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        other => format!("option reply error {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trip_and_rejections() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&g), Ok(3));
        let mut old = g;
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(
            decode_greeting(&old),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_data_layout() {
        let data = encode_go("ab", &[INFO_EXPORT, INFO_BLOCK_SIZE]);
        assert_eq!(data, [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 0, 0, 3]);
        assert_eq!(
            decode_go(&data),
            Ok(("ab".into(), vec![INFO_EXPORT, INFO_BLOCK_SIZE]))
        );
        let mut long = data.clone();
        long.push(0);
        assert!(decode_go(&long).is_err());
        let huge = (MAX_EXPORT_NAME as u32 + 1).to_be_bytes();
        assert!(matches!(decode_go(&huge), Err(ProtoError::TooLong { .. })));
    }

    #[test]
    fn opt_reply_lengths_are_bounded() {
        let r = OptReply {
            option: OPT_GO,
            reply: REP_INFO,
            len: MAX_OPT_REPLY_LEN + 1,
        };
        assert!(matches!(
            decode_opt_reply(&encode_opt_reply(r)),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn info_lengths_are_exact() {
        let mut e = encode_info(&Info::Export {
            size: 1 << 20,
            flags: 1,
        });
        assert_eq!(e.len(), INFO_EXPORT_LEN);
        e.push(0);
        assert!(matches!(decode_info(&e), Err(ProtoError::Invalid(_))));
        let b = encode_info(&Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25,
        });
        assert_eq!(b.len(), INFO_BLOCK_SIZE_LEN);
        assert!(matches!(
            decode_info(&b[..13]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn structured_replies_are_refused() {
        let mut r = encode_simple_reply(&SimpleReply {
            error: 0,
            cookie: 9,
        });
        r[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(matches!(
            decode_simple_reply(&r),
            Err(ProtoError::Invalid(_))
        ));
    }

    #[test]
    fn errnos_map_both_ways() {
        for e in [
            libc::EPERM,
            libc::EIO,
            libc::ENOMEM,
            libc::EINVAL,
            libc::ENOSPC,
            libc::EOVERFLOW,
            libc::EOPNOTSUPP,
            libc::ESHUTDOWN,
        ] {
            assert_eq!(errno_of_nbd(nbd_of_errno(e)), e);
        }
        assert_eq!(errno_of_nbd(12345), libc::EIO);
        assert_eq!(nbd_of_errno(libc::EROFS), NBD_EPERM);
    }

    fn info() -> impl Strategy<Value = Info> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(kind, data)| Info::Other { kind, data }),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(flags, cmd, cookie, offset, len)| Request {
                flags,
                cmd,
                cookie,
                offset,
                len,
            })
    }

    /// Every strict prefix of a fixed-size message is `Truncated`.
    fn all_prefixes_truncated<T: fmt::Debug>(
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<T>,
    ) -> std::result::Result<(), TestCaseError> {
        for cut in 0..bytes.len() {
            let got = decode(&bytes[..cut]);
            prop_assert!(
                matches!(got, Err(ProtoError::Truncated { .. })),
                "{cut}: {got:?}"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn requests_round_trip(r in request()) {
            let bytes = encode_request(&r);
            prop_assert_eq!(decode_request(&bytes), Ok(r));
            all_prefixes_truncated(&bytes, decode_request)?;
        }

        #[test]
        fn replies_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
            let r = SimpleReply { error, cookie };
            let bytes = encode_simple_reply(&r);
            prop_assert_eq!(decode_simple_reply(&bytes), Ok(r));
            all_prefixes_truncated(&bytes, decode_simple_reply)?;
        }

        #[test]
        fn option_messages_round_trip(option in any::<u32>(), reply in any::<u32>(),
                                      len in 0..=MAX_OPT_REPLY_LEN, flags in any::<u32>()) {
            let h = OptionHeader { option, len };
            let bytes = encode_option_header(h);
            prop_assert_eq!(decode_option_header(&bytes), Ok(h));
            all_prefixes_truncated(&bytes, decode_option_header)?;
            let r = OptReply { option, reply, len };
            let bytes = encode_opt_reply(r);
            prop_assert_eq!(decode_opt_reply(&bytes), Ok(r));
            all_prefixes_truncated(&bytes, decode_opt_reply)?;
            prop_assert_eq!(decode_client_flags(&encode_client_flags(flags)), Ok(flags));
            let g = encode_greeting(flags as u16);
            prop_assert_eq!(decode_greeting(&g), Ok(flags as u16));
            all_prefixes_truncated(&g, decode_greeting)?;
        }

        #[test]
        fn infos_round_trip(i in info()) {
            let bytes = encode_info(&i);
            prop_assert_eq!(decode_info(&bytes), Ok(i));
        }

        #[test]
        fn go_round_trips(name in "\\PC{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let data = encode_go(&name, &infos);
            prop_assert_eq!(decode_go(&data), Ok((name, infos)));
            for cut in 0..data.len() {
                prop_assert!(decode_go(&data[..cut]).is_err());
            }
        }

        #[test]
        fn a_wrong_magic_is_refused(r in request(), byte in 0usize..8, bit in 0u8..8) {
            let mut req = encode_request(&r);
            req[byte % 4] ^= 1 << bit;
            let bad = matches!(decode_request(&req), Err(ProtoError::BadMagic { .. }));
            prop_assert!(bad);
            let mut rep = encode_simple_reply(&SimpleReply { error: 0, cookie: r.cookie });
            rep[byte % 4] ^= 1 << bit;
            prop_assert!(decode_simple_reply(&rep).is_err());
            let mut opt = encode_opt_reply(OptReply { option: 7, reply: 1, len: 0 });
            opt[byte] ^= 1 << bit;
            let bad = matches!(decode_opt_reply(&opt), Err(ProtoError::BadMagic { .. }));
            prop_assert!(bad);
            let mut g = encode_greeting(1);
            g[byte] ^= 1 << bit;
            let bad = matches!(decode_greeting(&g), Err(ProtoError::BadMagic { .. }));
            prop_assert!(bad);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_option_header(&bytes);
            let _ = decode_opt_reply(&bytes);
            let _ = decode_info(&bytes);
            let _ = decode_go(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_simple_reply(&bytes);
        }
    }
}
