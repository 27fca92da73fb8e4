//! NBD addresses: the URLs a user writes for a remote export, parsed and printed back.
//!
//! Two forms, a subset of the NBD URI convention (libnbd, qemu):
//! - `nbd://HOST[:PORT]/EXPORT`: TCP; the port is 10809 unless given; an IPv6 literal goes in
//!   brackets (`nbd://[::1]:10810/disk`); the export may be empty (`nbd://host` or
//!   `nbd://host/`, the server's default export).
//! - `nbd+unix:///EXPORT?socket=PATH`: a Unix socket; the authority must be empty.
//!
//! The export name and the socket path are percent-decoded; [`NbdAddress`]'s `Display`
//! percent-encodes them again, so `parse(addr.to_string()) == addr` for every address (a
//! property tested below). TLS (`nbds://`) and other transports are refused with a clear
//! message: [`is_nbd_url`] says "this is meant as an NBD URL" for any `nbd*://` scheme, so a
//! caller reports the parse error instead of treating the text as a file path.
//!
//! Pure: no I/O, no name resolution (that happens at connect time).

use std::fmt;
use std::path::PathBuf;

use super::proto::MAX_EXPORT_NAME;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NbdEndpoint {
    /// A host name or an IP literal (without brackets) and a port.
    Tcp { host: String, port: u16 },
    /// A Unix socket's path.
    Unix { path: PathBuf },
}

/// An export on a server: what [`super::NbdDevice::connect`] connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NbdAddress {
    pub endpoint: NbdEndpoint,
    /// The export's name; empty for the server's default export.
    pub export: String,
}

/// Whether `text` is meant as an NBD URL (any `nbd…://` scheme), so that the caller parses it
/// with [`NbdAddress::parse`] (and reports its error) rather than taking it for a path.
pub fn is_nbd_url(text: &str) -> bool {
    match text.split_once("://") {
        Some((scheme, _)) => {
            scheme.starts_with("nbd")
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+')
        }
        None => false,
    }
}

impl NbdAddress {
    /// A TCP address.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdAddress {
        NbdAddress {
            endpoint: NbdEndpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    /// A Unix-socket address.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> NbdAddress {
        NbdAddress {
            endpoint: NbdEndpoint::Unix { path: path.into() },
            export: export.into(),
        }
    }

    /// Parses an `nbd://` or `nbd+unix://` URL (see the module doc).
    pub fn parse(url: &str) -> Result<NbdAddress, String> {
        let fail = |why: &str| Err(format!("bad NBD URL '{url}': {why}"));
        let Some((scheme, rest)) = url.split_once("://") else {
            return fail("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH");
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, export) = match rest.split_once('/') {
            Some((authority, export)) => (authority, export),
            None => (rest, ""),
        };
        let export = match percent_decode(export) {
            Ok(export) => export,
            Err(why) => return fail(&why),
        };
        if export.len() > MAX_EXPORT_NAME {
            return fail(&format!("export name longer than {MAX_EXPORT_NAME} bytes"));
        }
        let parsed = match scheme {
            "nbd" | "nbd+tcp" => parse_tcp(authority, query, export),
            "nbd+unix" => parse_unix(authority, query, export),
            "nbds" | "nbds+tcp" | "nbds+unix" => Err("TLS (nbds) is not supported".to_owned()),
            _ => Err(format!("unsupported scheme '{scheme}' (nbd or nbd+unix)")),
        };
        parsed.or_else(|why| fail(&why))
    }

    /// The address without the export, for messages about the server itself.
    pub fn server(&self) -> String {
        match &self.endpoint {
            NbdEndpoint::Tcp { host, port } => format!("{}:{port}", bracket(host)),
            NbdEndpoint::Unix { path } => path.display().to_string(),
        }
    }
}

fn parse_tcp(authority: &str, query: Option<&str>, export: String) -> Result<NbdAddress, String> {
    if query.is_some() {
        return Err("nbd:// takes no query parameters".to_owned());
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (host, tail) = after
            .split_once(']')
            .ok_or("an IPv6 literal without its closing ']'")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{host}' is not an IPv6 address"));
        }
        let port = match tail {
            "" => None,
            _ => Some(tail.strip_prefix(':').ok_or("junk after ']'")?),
        };
        (host, port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.contains(['@', '[', ']', ':', '%']) {
            return Err(format!("'{host}' is not a host name"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("no host".to_owned());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(format!("'{text}' is not a port")),
        },
    };
    Ok(NbdAddress::tcp(host, port, export))
}

fn parse_unix(authority: &str, query: Option<&str>, export: String) -> Result<NbdAddress, String> {
    if !authority.is_empty() {
        return Err("nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)".to_owned());
    }
    let mut socket = None;
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match param.split_once('=') {
            Some(("socket", value)) if socket.is_none() => socket = Some(percent_decode(value)?),
            Some(("socket", _)) => return Err("socket= given twice".to_owned()),
            _ => return Err(format!("unknown query parameter '{param}'")),
        }
    }
    match socket {
        Some(path) if !path.is_empty() => Ok(NbdAddress::unix(path, export)),
        _ => Err("nbd+unix:// needs ?socket=PATH".to_owned()),
    }
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad escape in '{text}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{text}' does not decode to UTF-8"))
}

/// Escapes every byte but the unreserved ones and `/` (a path separator in sockets and a
/// common character in export names).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.endpoint {
            NbdEndpoint::Tcp { host, port } if *port == DEFAULT_PORT => {
                write!(f, "nbd://{}/{export}", bracket(host))
            }
            NbdEndpoint::Tcp { host, port } => write!(f, "nbd://{}:{port}/{export}", bracket(host)),
            NbdEndpoint::Unix { path } => {
                let path = percent_encode(&path.to_string_lossy());
                write!(f, "nbd+unix:///{export}?socket={path}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tcp_urls() {
        let a = NbdAddress::parse("nbd://example.com/disk0").unwrap();
        assert_eq!(a, NbdAddress::tcp("example.com", DEFAULT_PORT, "disk0"));
        assert_eq!(a.to_string(), "nbd://example.com/disk0");
        let a = NbdAddress::parse("nbd://10.0.0.1:10900/a/b").unwrap();
        assert_eq!(a, NbdAddress::tcp("10.0.0.1", 10900, "a/b"));
        assert_eq!(a.to_string(), "nbd://10.0.0.1:10900/a/b");
        let a = NbdAddress::parse("nbd://[::1]:10810/x").unwrap();
        assert_eq!(a, NbdAddress::tcp("::1", 10810, "x"));
        assert_eq!(a.to_string(), "nbd://[::1]:10810/x");
        assert_eq!(a.server(), "[::1]:10810");
        let a = NbdAddress::parse("nbd://[fe80::1]").unwrap();
        assert_eq!(a, NbdAddress::tcp("fe80::1", DEFAULT_PORT, ""));
    }

    #[test]
    fn empty_exports() {
        for url in ["nbd://h", "nbd://h/", "nbd://h:10809/"] {
            assert_eq!(
                NbdAddress::parse(url).unwrap(),
                NbdAddress::tcp("h", DEFAULT_PORT, "")
            );
        }
        assert_eq!(
            NbdAddress::parse("nbd+unix://?socket=/s").unwrap(),
            NbdAddress::unix("/s", "")
        );
    }

    #[test]
    fn unix_urls() {
        let a = NbdAddress::parse("nbd+unix:///vol?socket=/run/nbd.sock").unwrap();
        assert_eq!(a, NbdAddress::unix("/run/nbd.sock", "vol"));
        assert_eq!(a.to_string(), "nbd+unix:///vol?socket=/run/nbd.sock");
        let a = NbdAddress::parse("nbd+unix:///a%20b?socket=/tmp/x%20y").unwrap();
        assert_eq!(a, NbdAddress::unix("/tmp/x y", "a b"));
        assert_eq!(a.to_string(), "nbd+unix:///a%20b?socket=/tmp/x%20y");
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for (url, why) in [
            ("nbd://", "no host"),
            ("nbd://:10809/x", "no host"),
            ("nbd://h:0/x", "not a port"),
            ("nbd://h:70000/x", "not a port"),
            ("nbd://h:+1/x", "not a port"),
            ("nbd://[::1/x", "closing"),
            ("nbd://[nothost]/x", "not an IPv6"),
            ("nbd://h/x?tls=on", "no query"),
            ("nbd://h/%zz", "bad escape"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?socket=", "socket=PATH"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbd+unix:///x?socket=/s&socket=/t", "twice"),
            ("nbd+unix:///x?socket=/s&tls=1", "unknown query"),
            ("nbds://h/x", "TLS"),
            ("nbd+vsock:///x", "unsupported scheme"),
            ("/dev/sda", "expected nbd://"),
        ] {
            let err = NbdAddress::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(err.contains(url), "{url}: {err}");
        }
        let long = format!("nbd://h/{}", "x".repeat(MAX_EXPORT_NAME + 1));
        assert!(NbdAddress::parse(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn what_counts_as_an_nbd_url() {
        for url in [
            "nbd://h/x",
            "nbd+unix:///x?socket=/s",
            "nbds://h",
            "nbd+vsock://1",
        ] {
            assert!(is_nbd_url(url), "{url}");
        }
        for path in ["/dev/sda", "nbd0", "./nbd://x", "NBD://h", "http://h", ""] {
            assert!(!is_nbd_url(path), "{path}");
        }
    }

    fn address() -> impl Strategy<Value = NbdAddress> {
        let export = "[ -~]{0,20}|\\PC{0,8}";
        let tcp = (
            prop_oneof![
                "[a-z][a-z0-9.-]{0,15}",
                Just("::1".to_owned()),
                Just("2001:db8::7".to_owned())
            ],
            1u16..,
            export,
        )
            .prop_map(|(h, p, e)| NbdAddress::tcp(h, p, e));
        let unix = ("/[ -~]{1,30}", export).prop_map(|(p, e)| NbdAddress::unix(p, e));
        prop_oneof![tcp, unix]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn display_parses_back(addr in address()) {
            let url = addr.to_string();
            prop_assert!(is_nbd_url(&url));
            prop_assert_eq!(NbdAddress::parse(&url), Ok(addr));
        }

        #[test]
        fn parse_never_panics(text in "(nbd|nbd\\+unix|nbds)://[ -~]{0,40}") {
            let _ = NbdAddress::parse(&text);
        }
    }
}
