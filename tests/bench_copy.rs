//! The copy engine's side of `scripts/bench-copy` (a benchmark, not a test: ignored unless
//! the script runs it). Copies `BENCH_BYTES` from `BENCH_SRC` to `BENCH_DST` with the default
//! engine configuration and prints `engine_mbps=<MB/s>` for the script to compare with fio
//! and dd measured in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ublkdm::copy::{CopyConfig, CopyEngine, CopyJob, Location};
use ublkdm::device::reactor::block_on;
use ublkdm::device::{DeviceRef, OpenOptions, UringDevice};
use ublkdm::units::{Extent, Sector, SectorCount};

#[test]
#[ignore = "a benchmark: run by scripts/bench-copy"]
fn bench_copy() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let bytes: u64 = var("BENCH_BYTES").parse().expect("BENCH_BYTES");
    let open = |p: String| -> DeviceRef {
        Arc::new(UringDevice::open(Path::new(&p), OpenOptions::default()).expect("open"))
    };
    let (src, dst) = (open(var("BENCH_SRC")), open(var("BENCH_DST")));
    let extent = Extent::new(
        Sector(0),
        SectorCount::from_bytes_exact(bytes).expect("whole sectors"),
    );
    let job = CopyJob::copy(
        Location::new(&src, extent),
        vec![Location::new(&dst, extent)],
    )
    .flushing();
    let engine = CopyEngine::start(CopyConfig::default()).expect("engine");
    let e = engine.clone();
    let start = Instant::now();
    let done = block_on(async move { e.copy(job).await.expect("submit") });
    let secs = start.elapsed().as_secs_f64();
    assert!(done.is_ok(), "{done:?}");
    let stats = engine.stats();
    engine.shutdown();
    println!("engine_mbps={:.1}", bytes as f64 / secs / 1e6);
    println!(
        "engine_memory_peak_bytes={} budget={}",
        stats.memory_peak, stats.memory_budget
    );
}
