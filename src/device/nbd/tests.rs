//! Tests of the NBD client against the model server (`model.rs`): geometry, every command
//! with and without the export's support, errors, malformed handshakes, timeouts,
//! disconnects and reconnects, and properties over random operation sequences checked against
//! a `Vec<u8>` reference. Requests run on the crate's own executor
//! (`device::reactor::block_on`), as on a ublk queue thread.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::conn::{read_go_replies, Export, Geometry, LinkError, DISC_GRACE};
use super::model::{Corruption, HandshakeFault, ModelConfig, ModelServer};
use super::proto::*;
use super::*;
use crate::device::reactor::block_on;
use crate::device::{BlockDevice, IoFuture, LinkState};
use crate::units::{Extent, Sector, SectorCount};

const KIB: u64 = 1024;

fn fast() -> NbdOptions {
    NbdOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_in_flight: 8,
        reconnect_backoff_min: Duration::from_millis(10),
        reconnect_backoff_max: Duration::from_millis(100),
    }
}

fn connect(server: &ModelServer) -> NbdDevice {
    NbdDevice::connect(server.address(), fast()).expect("connect to the model")
}

fn read(dev: &NbdDevice, sector: u64, sectors: u64) -> io::Result<Vec<u8>> {
    let buf = AlignedBuf::for_sectors(SectorCount(sectors));
    let (res, buf) = block_on(dev.read(Sector(sector), buf));
    res.map(|()| buf.as_slice().to_vec())
}

fn write(dev: &NbdDevice, sector: u64, data: &[u8], fua: bool) -> io::Result<()> {
    let flags = WriteFlags { fua };
    block_on(dev.write(
        Sector(sector),
        Arc::new(AlignedBuf::from_slice(data)),
        flags,
    ))
}

fn extent(sector: u64, sectors: u64) -> Extent {
    Extent::new(Sector(sector), SectorCount(sectors))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn errno_of(res: io::Result<impl std::fmt::Debug>) -> i32 {
    res.expect_err("expected an error")
        .raw_os_error()
        .expect("an errno")
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn link(dev: &NbdDevice) -> LinkStatus {
    dev.link().expect("an NBD device has a link")
}

/// Waits until the link is up again with an epoch above `epoch`.
fn wait_reconnected(dev: &NbdDevice, epoch: u64) {
    wait_until("a reconnect", Duration::from_secs(10), || {
        let l = link(dev);
        l.state == LinkState::Connected && l.epoch > epoch
    });
}

#[test]
fn geometry_comes_from_the_export() {
    let mut config = ModelConfig::new(1 << 20, "disk");
    config.flags |= FLAG_ROTATIONAL;
    config.block = Some((4096, 65536, 1 << 20));
    let server = ModelServer::start(config);
    let dev = connect(&server);
    let info = dev.info();
    assert_eq!(info.name, server.address().to_string());
    assert_eq!(info.size, SectorCount(2048));
    assert_eq!(info.logical_block_bytes, 4096);
    assert_eq!(info.physical_block_bytes, 65536);
    assert!(info.discard && info.write_zeroes && info.volatile_cache && info.fua);
    assert!(info.rotational);
    let l = link(&dev);
    assert_eq!(
        (l.state, l.epoch, l.reconnects, l.in_flight),
        (LinkState::Connected, 1, 0, 0)
    );
    // Requests off the 4 KiB grid are refused before they are sent.
    assert_eq!(errno_of(read(&dev, 1, 8)), libc::EINVAL);
    assert_eq!(errno_of(read(&dev, 2048, 8)), libc::EINVAL);
}

#[test]
fn geometry_rules() {
    let export = |size, block| Export {
        size,
        flags: FLAG_HAS_FLAGS,
        block,
    };
    let g = Geometry::of(&export(1 << 20, None)).unwrap();
    assert_eq!(
        (g.logical, g.physical, g.max_payload),
        (512, 4096, DEFAULT_MAX_PAYLOAD)
    );
    let g = Geometry::of(&export(1 << 20, Some((1, 512, 100_000)))).unwrap();
    assert_eq!((g.logical, g.max_payload), (512, 99_840));
    for (size, block, why) in [
        (0, None, "empty"),
        (1000, None, "whole number"),
        (1 << 20, Some((3, 4096, 1 << 20)), "minimum block"),
        (1 << 20, Some((8192, 8192, 1 << 20)), "minimum block"),
        (1 << 20, Some((512, 4096, 100)), "maximum block"),
        (4096 + 512, Some((4096, 4096, 1 << 20)), "whole number"),
    ] {
        let err = Geometry::of(&export(size, block)).unwrap_err();
        assert!(err.contains(why), "{size} {block:?}: {err}");
    }
    let first = Geometry::of(&export(1 << 20, None)).unwrap();
    let bigger = Geometry::of(&export(2 << 20, None)).unwrap();
    assert!(first.check_reconnect(&bigger).is_ok());
    assert!(bigger
        .check_reconnect(&first)
        .unwrap_err()
        .contains("shrank"));
    let mut ro = first;
    ro.flags |= FLAG_READ_ONLY;
    assert!(first
        .check_reconnect(&ro)
        .unwrap_err()
        .contains("read-only"));
}

#[test]
fn every_command_round_trips() {
    let server = ModelServer::start(ModelConfig::new(256 * KIB, ""));
    let dev = connect(&server);
    let data = pattern(7, 64 * KIB as usize);
    write(&dev, 8, &data, false).unwrap();
    assert_eq!(read(&dev, 8, 128).unwrap(), data);
    write(&dev, 200, &data[..4096], true).unwrap();
    block_on(dev.flush()).unwrap();
    block_on(dev.discard(extent(8, 8))).unwrap();
    block_on(dev.write_zeroes(extent(16, 8))).unwrap();
    let back = read(&dev, 8, 128).unwrap();
    assert!(back[..8192].iter().all(|&b| b == 0));
    assert_eq!(back[8192..], data[8192..]);
    let stats = server.stats();
    assert_eq!(
        (
            stats.fua_writes,
            stats.flushes,
            stats.trims,
            stats.write_zeroes
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(server.contents()[100 * 1024..104 * 1024], data[..4096]);
}

#[test]
fn missing_features_are_emulated_or_refused() {
    let mut config = ModelConfig::new(256 * KIB, "plain");
    config.flags = FLAG_SEND_FLUSH;
    let server = ModelServer::start(config);
    let dev = connect(&server);
    let info = dev.info();
    assert!(!info.fua && !info.discard && !info.write_zeroes && info.volatile_cache);
    // FUA without SEND_FUA: a write, then a flush.
    write(&dev, 0, &pattern(1, 4096), true).unwrap();
    assert_eq!((server.stats().fua_writes, server.stats().flushes), (0, 1));
    assert_eq!(
        errno_of(block_on(dev.discard(extent(0, 8)))),
        libc::EOPNOTSUPP
    );
    // Write-zeroes without SEND_WRITE_ZEROES: zero writes, in bounded pieces.
    write(&dev, 0, &pattern(2, 256 * KIB as usize), false).unwrap();
    let writes = server.stats().writes;
    block_on(dev.write_zeroes(extent(0, 512))).unwrap();
    assert!(server.contents().iter().all(|&b| b == 0));
    assert_eq!(server.stats().write_zeroes, 0);
    assert!(server.stats().writes > writes);

    // No cache at all: flush is a no-op and FUA needs nothing more.
    let mut config = ModelConfig::new(64 * KIB, "nocache");
    config.flags = 0;
    let server = ModelServer::start(config);
    let dev = connect(&server);
    block_on(dev.flush()).unwrap();
    write(&dev, 0, &pattern(3, 512), true).unwrap();
    assert_eq!((server.stats().flushes, server.stats().fua_writes), (0, 0));
}

#[test]
fn read_only_exports_refuse_writes() {
    let mut config = ModelConfig::new(64 * KIB, "ro");
    config.flags |= FLAG_READ_ONLY;
    let server = ModelServer::start(config);
    let dev = connect(&server);
    assert!(dev.read_only());
    assert_eq!(errno_of(write(&dev, 0, &[1; 512], false)), libc::EROFS);
    assert_eq!(errno_of(block_on(dev.discard(extent(0, 1)))), libc::EROFS);
    assert_eq!(
        errno_of(block_on(dev.write_zeroes(extent(0, 1)))),
        libc::EROFS
    );
    assert_eq!(read(&dev, 0, 1).unwrap(), vec![0; 512]);
    assert_eq!(server.stats().writes, 0);
}

#[test]
fn server_errors_are_errnos_and_keep_the_link() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "e"));
    let dev = connect(&server);
    server.faults().fail_range = Some(4096..8192);
    assert_eq!(errno_of(read(&dev, 8, 1)), libc::EIO);
    assert_eq!(errno_of(write(&dev, 0, &[1; 8192], false)), libc::EIO);
    assert_eq!(read(&dev, 0, 8).unwrap(), vec![0; 4096]);
    assert_eq!(link(&dev).state, LinkState::Connected);
    assert_eq!(link(&dev).epoch, 1);
}

#[test]
fn broken_replies_drop_the_connection() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "b"));
    let dev = connect(&server);
    write(&dev, 0, &pattern(4, 4096), true).unwrap();
    for (n, (how, why)) in [
        (Corruption::BadMagic, "bad reply magic"),
        (Corruption::UnknownCookie, "not in flight"),
        (Corruption::Structured, "structured reply"),
    ]
    .into_iter()
    .enumerate()
    {
        server.faults().corrupt_reply = Some(how);
        assert_eq!(errno_of(read(&dev, 0, 8)), libc::EIO, "{how:?}");
        let l = link(&dev);
        assert!(
            l.last_error.as_ref().unwrap().contains(why),
            "{how:?}: {l:?}"
        );
        wait_reconnected(&dev, n as u64 + 1);
        assert_eq!(read(&dev, 0, 8).unwrap(), pattern(4, 4096));
    }
}

#[test]
fn large_requests_are_split_at_the_maximum_block() {
    let mut config = ModelConfig::new(2 << 20, "split");
    config.block = Some((512, 4096, 64 * 1024));
    let server = ModelServer::start(config);
    let dev = connect(&server);
    let data = pattern(9, 1 << 20);
    write(&dev, 0, &data, false).unwrap();
    assert_eq!(server.stats().writes, 16);
    assert_eq!(read(&dev, 0, 2048).unwrap(), data);
    assert_eq!(server.stats().reads, 16);
}

#[test]
fn many_concurrent_requests_are_bounded_and_correct() {
    let server = ModelServer::start(ModelConfig::new(1 << 20, "c"));
    let mut opts = fast();
    opts.max_in_flight = 4;
    let dev = Arc::new(NbdDevice::connect(server.address(), opts).unwrap());
    server.faults().reply_delay = Duration::from_millis(1);
    let writes: Vec<_> = (0..64u64)
        .map(|i| {
            let buf = Arc::new(AlignedBuf::from_slice(&pattern(i as u8, 4096)));
            dev.write(Sector(i * 8), buf, WriteFlags::default())
        })
        .collect();
    let watcher = dev.clone();
    let results = block_on(async move {
        let tasks: Vec<_> = writes
            .into_iter()
            .map(crate::device::reactor::spawn)
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await);
            assert!(watcher.link().unwrap().in_flight <= 4);
        }
        out
    });
    assert!(results.iter().all(|r| r.is_ok()));
    let contents = server.contents();
    for i in 0..64usize {
        assert_eq!(
            contents[i * 4096..(i + 1) * 4096],
            pattern(i as u8, 4096)[..]
        );
    }
}

#[test]
fn a_wrong_address_fails_at_once_with_context() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "there"));
    let mut addr = server.address();
    addr.export = "elsewhere".into();
    let err = NbdDevice::connect(addr.clone(), fast()).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot connect to {addr}: ")),
        "{msg}"
    );
    assert!(
        msg.contains("'elsewhere'") && msg.contains("no such export"),
        "{msg}"
    );
    assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);

    let mut long = server.address();
    long.export = "x".repeat(MAX_EXPORT_NAME + 1);
    let msg = NbdDevice::connect(long, fast()).err().unwrap().to_string();
    assert!(msg.contains("an export name of 4097 bytes"), "{msg}");

    let gone = NbdAddress::unix("/nonexistent/nbd.sock", "");
    let msg = NbdDevice::connect(gone, fast()).err().unwrap().to_string();
    assert!(msg.contains("No such file or directory"), "{msg}");
    let refused = NbdAddress::tcp("127.0.0.1", 1, "x");
    let msg = NbdDevice::connect(refused, fast())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("cannot connect to nbd://127.0.0.1:1/x: Connection refused"),
        "{msg}"
    );
}

#[test]
fn malformed_handshakes_are_errors() {
    let cases = [
        (HandshakeFault::BadMagic, "bad greeting magic"),
        (HandshakeFault::NotFixedNewstyle, "fixed newstyle"),
        (HandshakeFault::TruncatedGreeting, "closed the connection"),
        (
            HandshakeFault::OversizedReply,
            "option reply of 4294967295 bytes",
        ),
        (HandshakeFault::TruncatedInfo, "closed the connection"),
        (HandshakeFault::NoExportInfo, "without NBD_INFO_EXPORT"),
        (HandshakeFault::EndlessInfos, "more than 32 replies"),
        (HandshakeFault::Refuse(REP_ERR_TLS_REQD), "requires TLS"),
        (HandshakeFault::Refuse(REP_ERR_POLICY), "the model says no"),
    ];
    for (fault, why) in cases {
        let mut config = ModelConfig::new(64 * KIB, "m");
        config.handshake = fault;
        let server = ModelServer::start(config);
        let err = NbdDevice::connect(server.address(), fast()).err();
        let msg = err.expect("a malformed server is an error").to_string();
        assert!(msg.contains(why), "{fault:?}: {msg}");
        assert!(
            msg.contains("'m'") || !msg.contains("refused export"),
            "{msg}"
        );
    }
}

#[test]
fn exports_we_cannot_serve_are_errors() {
    for (size, block, why) in [
        (0, None, "empty"),
        (1000, None, "whole number of 512-byte"),
        (
            64 * KIB,
            Some((8192, 8192, 1 << 20)),
            "minimum block size of 8192",
        ),
    ] {
        let mut config = ModelConfig::new(size, "small");
        config.block = block;
        let server = ModelServer::start(config);
        let msg = NbdDevice::connect(server.address(), fast())
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains(why), "{msg}");
    }
}

#[test]
fn a_refused_connection_is_an_error() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "r"));
    server.faults().refuse = true;
    let msg = NbdDevice::connect(server.address(), fast())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("closed the connection"), "{msg}");
}

#[test]
fn a_silent_server_times_out_the_connect() {
    // A listener that never speaks: the handshake waits for a greeting that never comes.
    let dir = std::env::temp_dir().join(format!("ublkdm-nbd-silent-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    let mut opts = fast();
    opts.connect_timeout = Duration::from_millis(200);
    let start = Instant::now();
    let msg = NbdDevice::connect(NbdAddress::unix(&dir, ""), opts)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("timed out"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(listener);
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn a_late_reply_times_out_and_the_link_recovers() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "slow"));
    let mut opts = fast();
    opts.request_timeout = Duration::from_millis(200);
    // Long enough that the link is still down when the test looks.
    opts.reconnect_backoff_min = Duration::from_millis(300);
    opts.reconnect_backoff_max = Duration::from_millis(300);
    let dev = NbdDevice::connect(server.address(), opts).unwrap();
    write(&dev, 0, &pattern(5, 4096), true).unwrap();
    server.faults().reply_delay = Duration::from_secs(1);
    let start = Instant::now();
    assert_eq!(errno_of(read(&dev, 0, 8)), libc::ETIMEDOUT);
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let l = link(&dev);
    assert_ne!(l.state, LinkState::Connected);
    assert!(l.last_error.unwrap().contains("no reply within"));
    server.faults().reply_delay = Duration::ZERO;
    wait_reconnected(&dev, 1);
    assert_eq!(read(&dev, 0, 8).unwrap(), pattern(5, 4096));
}

/// A write gives its buffer back unshared once it completes, however soon its reply comes:
/// the caller (a ublk queue's buffer pool, the copy engine) takes it back with
/// `Arc::try_unwrap`, so a reference the sending side keeps past the reply aborts the
/// daemon. A client whose sender ran on a thread of its own once did so, in an experiment.
#[test]
fn a_completed_write_holds_no_reference_to_its_buffer() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "unshared"));
    let dev = connect(&server);
    for i in 0..2000u64 {
        let buf = Arc::new(AlignedBuf::from_slice(&pattern(i as u8, 4096)));
        let res = block_on(dev.write(Sector(i % 64), Arc::clone(&buf), WriteFlags { fua: false }));
        res.expect("a write");
        assert_eq!(
            Arc::strong_count(&buf),
            1,
            "write {i} left its buffer shared"
        );
    }
}

/// Two 1 MiB writes to a server that reads the first and then sleeps before its reply
/// (`reply_delay`): the second's send stalls on a full socket.
fn stalled_sends(dev: &NbdDevice, server: &ModelServer) -> [IoFuture<io::Result<()>>; 2] {
    server.faults().reply_delay = Duration::from_secs(3);
    [(0, 1), (4096, 2)].map(|(sector, seed)| {
        let data = Arc::new(AlignedBuf::from_slice(&pattern(seed, 1 << 20)));
        dev.write(Sector(sector), data, WriteFlags { fua: false })
    })
}

#[test]
fn a_send_the_server_does_not_read_times_out() {
    let server = ModelServer::start(ModelConfig::new(4 << 20, "stall"));
    let mut opts = fast();
    opts.request_timeout = Duration::from_millis(300);
    opts.reconnect_backoff_min = Duration::from_secs(5);
    opts.reconnect_backoff_max = Duration::from_secs(5);
    let dev = NbdDevice::connect(server.address(), opts).unwrap();
    let start = Instant::now();
    let [a, b] = stalled_sends(&dev, &server);
    let (a, b) = block_on(smol::future::zip(a, b));
    let took = start.elapsed();
    assert!(a.is_err() && b.is_err(), "writes past their deadline fail");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    let l = link(&dev);
    assert_ne!(l.state, LinkState::Connected);
    assert!(l.last_error.unwrap().contains("no reply within"));
}

#[test]
fn dropping_the_device_during_a_stalled_send_stops_promptly() {
    let server = ModelServer::start(ModelConfig::new(4 << 20, "stall"));
    let dev = connect(&server);
    let [mut a, mut b] = stalled_sends(&dev, &server);
    // One poll each hands both jobs to the client; then the second's send stalls.
    let (a, b) = block_on(async move {
        assert!(smol::future::poll_once(&mut a).await.is_none());
        assert!(smol::future::poll_once(&mut b).await.is_none());
        (a, b)
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    drop(dev);
    let took = start.elapsed();
    // The replies in flight get their grace, and sending NBD_CMD_DISC no more on top.
    assert!(took < DISC_GRACE + Duration::from_millis(400), "{took:?}");
    let (a, b) = block_on(smol::future::zip(a, b));
    assert!(a.is_err() && b.is_err(), "the link was dropped under them");
}

#[test]
fn a_dead_server_fails_requests_fast_until_it_returns() {
    let mut server = ModelServer::start(ModelConfig::new(64 * KIB, "d"));
    let dev = Arc::new(connect(&server));
    write(&dev, 0, &pattern(6, 8192), false).unwrap();
    block_on(dev.flush()).unwrap();
    // A request in flight when the server dies fails with an errno, not a hang.
    server.faults().reply_delay = Duration::from_millis(300);
    let in_flight = std::thread::spawn({
        let dev = dev.clone();
        move || read(&dev, 0, 8)
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(link(&dev).in_flight, 1);
    server.stop_listening();
    server.faults().reply_delay = Duration::ZERO;
    let code = errno_of(in_flight.join().unwrap());
    assert_eq!(code, libc::EIO);
    wait_until("the link to go down", Duration::from_secs(2), || {
        link(&dev).state != LinkState::Connected
    });
    let start = Instant::now();
    assert_eq!(errno_of(read(&dev, 0, 1)), libc::ENOTCONN);
    assert!(start.elapsed() < Duration::from_millis(100));
    wait_until("reconnect attempts", Duration::from_secs(2), || {
        link(&dev).reconnects >= 2
    });
    assert!(link(&dev).last_error.is_some());
    server.listen();
    wait_reconnected(&dev, 1);
    assert_eq!(link(&dev).epoch, 2);
    assert_eq!(read(&dev, 0, 16).unwrap(), pattern(6, 8192));
}

#[test]
fn a_reconnect_refuses_a_shrunk_or_read_only_export() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "s"));
    let dev = connect(&server);
    for (change, why) in [
        (
            Box::new(|c: &mut ModelConfig| c.size = 32 * KIB) as Box<dyn Fn(&mut ModelConfig)>,
            "shrank",
        ),
        (
            Box::new(|c: &mut ModelConfig| c.flags |= FLAG_READ_ONLY),
            "read-only",
        ),
    ] {
        let epoch = link(&dev).epoch;
        let good = server.config().clone();
        change(&mut server.config());
        server.kill_connections();
        wait_until("a refused reconnect", Duration::from_secs(5), || {
            let l = link(&dev);
            l.state != LinkState::Connected && l.last_error.is_some_and(|e| e.contains(why))
        });
        assert_eq!(errno_of(read(&dev, 0, 1)), libc::ENOTCONN);
        *server.config() = good;
        wait_reconnected(&dev, epoch);
    }
}

#[test]
fn dropping_the_device_stops_promptly() {
    let server = ModelServer::start(ModelConfig::new(64 * KIB, "x"));
    let dev = connect(&server);
    let start = Instant::now();
    drop(dev);
    assert!(start.elapsed() < Duration::from_millis(500));
    wait_until("the disconnect", Duration::from_secs(2), || {
        server.stats().discs == 1
    });

    // Also while the link is down and the worker is backing off.
    let mut server = ModelServer::start(ModelConfig::new(64 * KIB, "y"));
    let mut opts = fast();
    opts.reconnect_backoff_min = Duration::from_secs(10);
    opts.reconnect_backoff_max = Duration::from_secs(10);
    let dev = NbdDevice::connect(server.address(), opts).unwrap();
    server.stop_listening();
    wait_until("the link to go down", Duration::from_secs(2), || {
        link(&dev).state != LinkState::Connected
    });
    let start = Instant::now();
    drop(dev);
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn go_replies_from_hostile_bytes_are_errors() {
    // A valid reply sequence, then every truncation of it.
    let mut good = Vec::new();
    let info = encode_info(&Info::Export {
        size: 1 << 20,
        flags: 1,
    });
    good.extend_from_slice(&encode_opt_reply(OptReply {
        option: OPT_GO,
        reply: REP_INFO,
        len: info.len() as u32,
    }));
    good.extend_from_slice(&info);
    good.extend_from_slice(&encode_opt_reply(OptReply {
        option: OPT_GO,
        reply: REP_ACK,
        len: 0,
    }));
    let parse = |bytes: Vec<u8>| -> Result<Export, LinkError> {
        block_on(async move { read_go_replies(&mut bytes.as_slice(), "e").await })
    };
    assert_eq!(parse(good.clone()).unwrap().size, 1 << 20);
    for cut in 0..good.len() {
        assert!(parse(good[..cut].to_vec()).is_err(), "{cut}");
    }
    // A reply to another option.
    let mut other = good.clone();
    other[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
    assert!(parse(other).unwrap_err().to_string().contains("option 2"));
}

/// An operation of the properties below, on a 64 KiB device (128 sectors).
#[derive(Clone, Debug)]
enum TestOp {
    Read(u64, u64),
    Write(u64, u64, bool, u8),
    Flush,
    Trim(u64, u64),
    Zero(u64, u64),
}

const SECTORS: u64 = 128;

fn test_op() -> impl Strategy<Value = TestOp> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(40)));
    prop_oneof![
        3 => range.clone().prop_map(|(s, n)| TestOp::Read(s, n)),
        4 => (range.clone(), any::<bool>(), any::<u8>())
            .prop_map(|((s, n), fua, seed)| TestOp::Write(s, n, fua, seed)),
        1 => Just(TestOp::Flush),
        1 => range.clone().prop_map(|(s, n)| TestOp::Trim(s, n)),
        1 => range.prop_map(|(s, n)| TestOp::Zero(s, n)),
    ]
}

/// The reference: bytes, and whether each sector's content is known (an operation that
/// failed may or may not have changed its sectors).
struct Reference {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Reference {
    fn set(&mut self, s: u64, bytes: &[u8]) {
        let at = (s * 512) as usize;
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
        for k in &mut self.known[s as usize..s as usize + bytes.len() / 512] {
            *k = true;
        }
    }

    fn forget(&mut self, s: u64, n: u64) {
        for k in &mut self.known[s as usize..(s + n) as usize] {
            *k = false;
        }
    }

    fn check(&self, s: u64, got: &[u8]) -> Result<(), TestCaseError> {
        for (i, chunk) in got.chunks(512).enumerate() {
            let sector = s as usize + i;
            if self.known[sector] {
                let at = sector * 512;
                prop_assert_eq!(chunk, &self.data[at..at + 512], "sector {}", sector);
            }
        }
        Ok(())
    }
}

/// Runs `op`; `Ok(Err(errno))` when the device failed it.
fn run_op(
    dev: &NbdDevice,
    op: &TestOp,
    r: &mut Reference,
    trim: bool,
) -> Result<Result<(), i32>, TestCaseError> {
    let res = match *op {
        TestOp::Read(s, n) => match read(dev, s, n) {
            Ok(got) => {
                r.check(s, &got)?;
                Ok(())
            }
            Err(e) => Err(e),
        },
        TestOp::Write(s, n, fua, seed) => {
            let data = pattern(seed, (n * 512) as usize);
            let res = write(dev, s, &data, fua);
            if res.is_ok() {
                r.set(s, &data);
            } else {
                r.forget(s, n);
            }
            res
        }
        TestOp::Flush => block_on(dev.flush()),
        TestOp::Trim(s, n) => {
            let res = block_on(dev.discard(extent(s, n)));
            match &res {
                Ok(()) => r.set(s, &vec![0; (n * 512) as usize]),
                Err(e) if !trim && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Ok(Ok(()));
                }
                Err(_) => r.forget(s, n),
            }
            res
        }
        TestOp::Zero(s, n) => {
            let res = block_on(dev.write_zeroes(extent(s, n)));
            match &res {
                Ok(()) => r.set(s, &vec![0; (n * 512) as usize]),
                Err(_) => r.forget(s, n),
            }
            res
        }
    };
    Ok(res.map_err(|e| e.raw_os_error().unwrap_or(-1)))
}

/// Arms the next planned connection drop, if any.
fn arm(server: &ModelServer, drops: &mut impl Iterator<Item = (u64, bool)>) {
    if let Some((after, apply)) = drops.next() {
        let mut f = server.faults();
        f.drop_after = Some(after);
        f.apply_then_drop = apply;
    }
}

fn model_with(flags: u16, max_block: u32) -> ModelServer {
    let mut config = ModelConfig::new(SECTORS * 512, "prop");
    config.flags = flags;
    config.block = Some((512, 4096, max_block));
    ModelServer::start(config)
}

fn flag_set() -> impl Strategy<Value = u16> {
    (0u16..16).prop_map(|bits| {
        [
            FLAG_SEND_FLUSH,
            FLAG_SEND_FUA,
            FLAG_SEND_TRIM,
            FLAG_SEND_WRITE_ZEROES,
        ]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .fold(0, |acc, (_, f)| acc | f)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn operations_agree_with_a_reference(
        flags in flag_set(),
        max_block in prop_oneof![Just(4096u32), Just(1 << 20)],
        ops in proptest::collection::vec(test_op(), 1..30),
    ) {
        let server = model_with(flags, max_block);
        let dev = connect(&server);
        let mut r = Reference { data: vec![0; (SECTORS * 512) as usize], known: vec![true; SECTORS as usize] };
        for op in &ops {
            let res = run_op(&dev, op, &mut r, flags & FLAG_SEND_TRIM != 0)?;
            prop_assert_eq!(res, Ok(()), "{:?}", op);
        }
        prop_assert_eq!(server.contents(), r.data);
        prop_assert_eq!(link(&dev).epoch, 1);
    }

    #[test]
    fn disconnects_fail_cleanly_and_reconnect(
        flags in flag_set(),
        drops in proptest::collection::vec((0u64..6, any::<bool>()), 1..4),
        ops in proptest::collection::vec(test_op(), 5..30),
    ) {
        let server = model_with(flags, 4096);
        let dev = connect(&server);
        let trim = flags & FLAG_SEND_TRIM != 0;
        let mut r = Reference { data: vec![0; (SECTORS * 512) as usize], known: vec![true; SECTORS as usize] };
        let mut drops = drops.into_iter();
        arm(&server, &mut drops);
        for op in &ops {
            let epoch = link(&dev).epoch;
            let started = Instant::now();
            let res = run_op(&dev, op, &mut r, trim)?;
            prop_assert!(started.elapsed() < Duration::from_secs(3), "{:?} hung", op);
            if let Err(code) = res {
                prop_assert!([libc::EIO, libc::ENOTCONN].contains(&code), "{:?}: errno {}", op, code);
                wait_reconnected(&dev, epoch);
                arm(&server, &mut drops);
            }
        }
        server.faults().drop_after = None;
        block_on(dev.flush()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let contents = server.contents();
        r.check(0, &contents)?;
        let whole = read(&dev, 0, SECTORS).map_err(|e| TestCaseError::fail(e.to_string()))?;
        r.check(0, &whole)?;
        prop_assert_eq!(link(&dev).epoch, server.stats().connections);
    }
}
