//! The NBD client's side of `scripts/bench-nbd` (a benchmark, not a test: ignored unless the
//! script runs it). Writes or reads 4 KiB blocks at random places of the export at
//! `BENCH_NBD` (a URL), `BENCH_DEPTH` requests in flight, for `BENCH_SECS` seconds, and
//! prints `iops=<n>` for the script to compare with fio's libnbd engine on the same server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublkdm::device::reactor::{block_on, spawn};
use ublkdm::device::{AlignedBuf, BlockDevice, NbdAddress, NbdDevice, NbdOptions, WriteFlags};
use ublkdm::units::Sector;

/// A 4 KiB block is 8 sectors.
const BLOCK_SECTORS: u64 = 8;

fn var<T: std::str::FromStr>(name: &str) -> T {
    let text = std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    text.parse()
        .unwrap_or_else(|_| panic!("{name}={text}: not a valid value"))
}

/// One of `depth` workers: blocks at places drawn by a xorshift seeded with `seed`.
async fn worker(dev: Arc<NbdDevice>, seed: u64, write: bool, end: Instant, done: Arc<AtomicU64>) {
    let blocks = dev.size().0 / BLOCK_SECTORS;
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ seed;
    let data = Arc::new(AlignedBuf::from_slice(&[seed as u8; 4096]));
    let mut read_buf = AlignedBuf::new(4096);
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = Sector(x % blocks * BLOCK_SECTORS);
        if write {
            let res = dev
                .write(at, Arc::clone(&data), WriteFlags::default())
                .await;
            res.expect("a write to the export");
        } else {
            let (res, buf) = dev.read(at, read_buf).await;
            res.expect("a read of the export");
            read_buf = buf;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
#[ignore = "a benchmark: run by scripts/bench-nbd"]
fn bench_nbd() {
    let url: String = var("BENCH_NBD");
    let depth: u64 = var("BENCH_DEPTH");
    let secs: u64 = var("BENCH_SECS");
    let write = var::<String>("BENCH_RW") == "write";
    let addr = NbdAddress::parse(&url).expect("a valid URL");
    let dev = Arc::new(NbdDevice::connect(addr, NbdOptions::default()).expect("connect"));
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::clone(&done);
    block_on(async move {
        let tasks: Vec<_> = (0..depth)
            .map(|seed| {
                spawn(worker(
                    Arc::clone(&dev),
                    seed,
                    write,
                    end,
                    Arc::clone(&counter),
                ))
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
    println!("iops={}", done.load(Ordering::Relaxed) / secs);
}
