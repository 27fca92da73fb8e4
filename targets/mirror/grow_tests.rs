//! Tests of `mirror grow` (`grow.rs`) over in-memory legs on the deterministic executor:
//! growing under concurrent writes (seeded), the dirty bits carried over, the refusals and
//! their error kinds, and a power cut at every metadata write of a grow followed by an
//! assembly (the old layout or the new one, never a mix, every write intact).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use serde_json::json;

use super::tests::{data_of, devs, mem, options, pattern, read, settle, with_mirror, write, LEG};
use super::*;
use crate::device::reactor::spawn;
use crate::device::{Forward, Forwarding, MemDevice};
use crate::error::ErrorKind;
use crate::region::RegionIndex;

const REGION: u64 = 64;
/// The legs after the "bigger disks" were put in: three times the size.
const BIG: SectorCount = SectorCount(3 * LEG.0);

/// Creates a synced 2-leg mirror on `LEG`-sized legs holding `pattern(seed, ..)` in its first
/// 64 sectors; returns the legs and the layout.
fn small_mirror(seed: u8) -> (Vec<Arc<MemDevice>>, Layout) {
    let legs = vec![mem("a"), mem("b")];
    let layout = with_mirror(devs(&legs), options(REGION), move |t| async move {
        settle(&t).await;
        write(&t, 0, &pattern(seed, 64)).await;
        t.flush().await.expect("flush");
        t.layout()
    })
    .expect("create");
    (legs, layout)
}

/// Copies of `legs` on devices of `size` sectors (the data moved to bigger disks).
fn copied(legs: &[Arc<MemDevice>], size: SectorCount, names: &[&str]) -> Vec<Arc<MemDevice>> {
    legs.iter()
        .zip(names)
        .map(|(leg, name)| {
            let big = MemDevice::new(name, size);
            big.poke(Sector(0), &leg.contents());
            big
        })
        .collect()
}

async fn grow(t: &MirrorTarget) -> crate::error::Result<serde_json::Value> {
    t.command_async("grow", &json!({})).await
}

/// Grown under concurrent writes (seeded): the grow waits for the writes in flight and holds
/// new ones back; afterwards the device is bigger, every write reads back, the new area is
/// written and read, and the legs' data areas are equal once the resync has run.
#[test]
fn grow_under_concurrent_writes_keeps_every_write_and_resyncs_the_new_area() {
    let mut overlapped = 0;
    for seed in 0..4u64 {
        let (small, old) = small_mirror(seed as u8);
        let big = copied(&small, BIG, &["a2", "b2"]);
        let legs = big.clone();
        let during = with_mirror(devs(&big), options(REGION), move |t| async move {
            assert_eq!(t.size(), old.data_size);
            let size = old.data_size.0 as usize;
            let model = Rc::new(RefCell::new(vec![0u8; size * 512]));
            model.borrow_mut()[..64 * 512].copy_from_slice(&pattern(seed as u8, 64));
            let done = Rc::new(std::cell::Cell::new(0u32));
            // Writers own disjoint 8-sector blocks (block % 3 == writer), so the model is exact.
            let writers: Vec<_> = (0..3u64)
                .map(|w| {
                    let (t, model, done) = (Arc::clone(&t), Rc::clone(&model), Rc::clone(&done));
                    spawn(async move {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed * 10 + w);
                        for _ in 0..12 {
                            let block = rng.gen_range(0..size as u64 / 8 / 3) * 3 + w;
                            let data = pattern(rng.gen(), 8);
                            write(&t, block * 8, &data).await;
                            let at = block as usize * 8 * 512;
                            model.borrow_mut()[at..at + data.len()].copy_from_slice(&data);
                            done.set(done.get() + 1);
                        }
                    })
                })
                .collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..rng.gen_range(0..20) {
                smol::future::yield_now().await;
            }
            let reply = grow(&t).await.expect("grow");
            // Writes were in flight on both sides of the grow (for most seeds).
            let at_grow = done.get();
            for w in writers {
                w.await;
            }
            let grown = t.layout();
            assert_eq!(reply["old_size_sectors"], old.data_size.0);
            assert_eq!(reply["size_sectors"], grown.data_size.0);
            assert_eq!(t.size(), grown.data_size);
            assert_eq!(grown.data_size.0, BIG.0 - old.data_offset.0);
            // The new area: written, and read back, during and after its resync.
            let tail = grown.data_size.0 - 16;
            write(&t, tail, &pattern(77, 16)).await;
            assert_eq!(read(&t, tail, 16).await, pattern(77, 16));
            settle(&t).await;
            let all = read(&t, 0, old.data_size.0).await;
            assert!(all == *model.borrow(), "seed {seed}: a write was lost");
            assert_eq!(read(&t, tail, 16).await, pattern(77, 16));
            t.flush().await.expect("flush");
            assert!(
                data_of(&legs[0], grown) == data_of(&legs[1], grown),
                "seed {seed}: the legs differ after the resync"
            );
            assert_eq!(t.status()["size_sectors"], grown.data_size.0);
            0 < at_grow && at_grow < 36
        })
        .expect("grown mirror");
        overlapped += u32::from(during);
        // The grown mirror assembles again, grown.
        let size = with_mirror(devs(&big), options(REGION), |t| async move {
            assert_eq!(read(&t, BIG.0 - 2048 - 16 - 16, 16).await.len(), 16 * 512);
            t.size()
        })
        .expect("assemble");
        assert_eq!(size.0, BIG.0 - old.data_offset.0);
    }
    assert!(overlapped > 0, "no grow ran while writes were in flight");
}

/// A region dirty before the grow stays dirty in the grown log, the new area is dirty and
/// out of sync, a clean region stays clean.
#[test]
fn grow_carries_the_dirty_bits_over_and_marks_the_new_area() {
    let (small, old) = small_mirror(3);
    let big = copied(&small, BIG, &["a2", "b2"]);
    with_mirror(devs(&big), options(REGION), move |t| async move {
        settle(&t).await;
        // Let the cleaner clear every bit, then dirty region 3 alone.
        for _ in 0..3 {
            t.tick();
            for _ in 0..200 {
                smol::future::yield_now().await;
            }
        }
        assert!(t.inner.log().dirty_regions().is_empty(), "bits cleared");
        write(&t, 3 * REGION, &pattern(1, 8)).await;
        grow(&t).await.expect("grow");
        let log = t.inner.log();
        let old_count = old.geometry().count().0;
        let count = t.inner.geometry().count().0;
        assert!(count > old_count);
        assert!(
            log.is_durable(RegionIndex(3)),
            "the dirty region is carried over"
        );
        assert!(!log.is_dirty(RegionIndex(10)), "a clean region stays clean");
        for region in old_count..count {
            assert!(log.is_durable(RegionIndex(region)), "new {region} is dirty");
        }
        let status = t.status();
        assert_eq!(status["regions"]["total"], count);
        assert!(status["regions"]["in_sync"].as_u64().unwrap() <= old_count);
        settle(&t).await;
    })
    .expect("mirror");
}

/// Refused, changing nothing: a leg not bigger (invalid argument, naming its slot and
/// device), a failed leg, a recovering leg, a running scrub (busy), a size other than what the
/// legs allow (invalid argument).
#[test]
fn grow_is_refused_naming_why() {
    let (small, old) = small_mirror(4);
    let mut legs = copied(&small[..1], BIG, &["a2"]);
    legs.extend(copied(&small[1..], LEG, &["b-same"]));
    with_mirror(devs(&legs), options(REGION), move |t| async move {
        let err = grow(&t).await.expect_err("leg 1 is not bigger");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("slot 1 (b-same"), "{err}");
        assert_eq!(t.size(), old.data_size);
        // A third leg, recovering while its resync runs.
        let extra: DeviceRef = MemDevice::new("c", BIG);
        t.add_leg(extra, AddLegOptions::default())
            .await
            .expect("add");
        let err = grow(&t).await.expect_err("a leg recovers");
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert!(err.to_string().contains("recovering"), "{err}");
        settle(&t).await;
        t.start_scrub(false).expect("scrub");
        let err = grow(&t).await.expect_err("a scrub runs");
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert!(err.to_string().contains("scrub"), "{err}");
        t.fail_leg(1).await.expect("fail");
        let err = grow(&t).await.expect_err("a leg failed");
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert!(err.to_string().contains("slot 1"), "{err}");
        assert_eq!(t.size(), old.data_size);
    })
    .expect("mirror");
    let big = copied(&small, BIG, &["a3", "b3"]);
    with_mirror(devs(&big), options(REGION), move |t| async move {
        let wrong = SectorCount(old.data_size.0 + 8);
        let err = t
            .inner
            .grow(Some(wrong))
            .await
            .expect_err("not what the legs allow");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(t.size(), old.data_size);
        // Still usable, and grows when asked for what the legs allow.
        let allowed = SectorCount(BIG.0 - old.data_offset.0);
        t.inner
            .grow(Some(allowed))
            .await
            .expect("grow to what the legs allow");
        assert_eq!(t.size(), allowed);
    })
    .expect("mirror");
}

/// A leg that takes a picture of every leg whenever a write to it is issued while armed: the
/// pictures are what a power cut at that moment leaves (the legs' writes are durable at once).
struct Tap {
    inner: DeviceRef,
    legs: Vec<Arc<MemDevice>>,
    armed: Arc<AtomicBool>,
    pictures: Arc<Mutex<Vec<Vec<Vec<u8>>>>>,
}

impl Forward for Tap {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<std::io::Result<()>> {
        if self.armed.load(Ordering::Relaxed) {
            let picture = self.legs.iter().map(|l| l.contents()).collect();
            self.pictures.lock().expect("pictures").push(picture);
        }
        self.inner.write(offset, buf, flags)
    }
}

/// A power cut before each metadata write of a grow (and after the last): every picture
/// assembles, with the old layout and size or the new ones (never refused as a mix of the
/// two), with every acknowledged write intact; a grown one resyncs the new area until the
/// legs are equal. Both outcomes, and a picture with the legs' superblocks at different
/// layouts, are among them.
#[test]
fn a_power_cut_at_any_step_of_a_grow_assembles_old_or_new() {
    let (small, old) = small_mirror(6);
    let big = copied(&small, BIG, &["a2", "b2"]);
    let armed = Arc::new(AtomicBool::new(false));
    let pictures = Arc::new(Mutex::new(Vec::new()));
    let taps: Vec<DeviceRef> = big
        .iter()
        .map(|leg| {
            Arc::new(Forwarding(Tap {
                inner: Arc::clone(leg) as DeviceRef,
                legs: big.clone(),
                armed: Arc::clone(&armed),
                pictures: Arc::clone(&pictures),
            })) as DeviceRef
        })
        .collect();
    let (a, p, legs) = (Arc::clone(&armed), Arc::clone(&pictures), big.clone());
    with_mirror(taps, options(REGION), move |t| async move {
        settle(&t).await;
        write(&t, 512, &pattern(9, 16)).await;
        t.flush().await.expect("flush");
        a.store(true, Ordering::Relaxed);
        grow(&t).await.expect("grow");
        a.store(false, Ordering::Relaxed);
        p.lock()
            .expect("pictures")
            .push(legs.iter().map(|l| l.contents()).collect());
    })
    .expect("grown");
    let pictures = std::mem::take(&mut *pictures.lock().expect("pictures"));
    assert!(pictures.len() >= 5, "log and superblock writes were taken");
    let new_size = SectorCount(BIG.0 - old.data_offset.0);
    let (mut olds, mut news, mut mixed) = (0, 0, 0);
    for (i, picture) in pictures.into_iter().enumerate() {
        let heads: Vec<Vec<u8>> = picture.iter().map(|p| p[..8192].to_vec()).collect();
        let legs: Vec<Arc<MemDevice>> = picture
            .iter()
            .enumerate()
            .map(|(k, image)| {
                let leg = MemDevice::new(&format!("cut{i}-{k}"), BIG);
                leg.poke(Sector(0), image);
                leg
            })
            .collect();
        if sb_layouts_differ(&heads) {
            mixed += 1;
        }
        let l = legs.clone();
        let size = with_mirror(devs(&legs), options(REGION), move |t| async move {
            assert_eq!(read(&t, 0, 64).await, pattern(6, 64), "picture {i}");
            assert_eq!(read(&t, 512, 16).await, pattern(9, 16), "picture {i}");
            settle(&t).await;
            t.flush().await.expect("flush");
            let layout = t.layout();
            assert!(
                data_of(&l[0], layout) == data_of(&l[1], layout),
                "picture {i}: legs differ"
            );
            t.size()
        })
        .unwrap_or_else(|err| panic!("picture {i} does not assemble: {err}"));
        if size == old.data_size {
            olds += 1;
        } else {
            assert_eq!(size, new_size, "picture {i}");
            news += 1;
        }
    }
    assert!(olds > 0 && news > 0, "old {olds}, new {news}");
    assert!(mixed > 0, "no picture had superblocks of both layouts");
}

/// Whether the freshest superblocks of the legs (`heads`: their first 8 KiB) give different
/// data sizes.
fn sb_layouts_differ(heads: &[Vec<u8>]) -> bool {
    let sizes: Vec<u64> = heads
        .iter()
        .map(|h| {
            let half = SB_SECTORS_BYTES;
            [&h[..half], &h[half..]]
                .iter()
                .filter_map(|slot| Superblock::decode(slot).ok())
                .max_by_key(|sb| sb.events)
                .map_or(0, |sb| sb.layout.data_size.0)
        })
        .collect();
    sizes.windows(2).any(|w| w[0] != w[1])
}

const SB_SECTORS_BYTES: usize = 4096;

/// A leg grown in place (a dm table reloaded bigger): opened at `info.size`, it serves all of
/// its inner device once [`BlockDevice::refresh_size`] read the new size.
struct GrownInPlace {
    inner: DeviceRef,
    info: DeviceInfo,
    size: std::sync::atomic::AtomicU64,
}

impl GrownInPlace {
    fn new(inner: DeviceRef, opened: SectorCount) -> Arc<Forwarding<GrownInPlace>> {
        let info = DeviceInfo {
            size: opened,
            ..inner.info().clone()
        };
        Arc::new(Forwarding(GrownInPlace {
            inner,
            info,
            size: opened.0.into(),
        }))
    }
}

impl Forward for GrownInPlace {
    fn inner(&self) -> &DeviceRef {
        &self.inner
    }
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn size(&self) -> SectorCount {
        SectorCount(self.size.load(Ordering::Relaxed))
    }
    fn refresh_size(&self) -> std::io::Result<SectorCount> {
        self.size.store(self.inner.info().size.0, Ordering::Relaxed);
        Ok(Forward::size(self))
    }
}

/// Legs grown in place (their devices were opened at the old size; the grow reads their new
/// size): the resync of the new area copies past the size the legs were opened with, and
/// completes (the copy engine once checked copies against the opened size, and the resync of
/// the new area never ran).
#[test]
fn legs_grown_in_place_resync_the_new_area() {
    let (small, old) = small_mirror(8);
    let big = copied(&small, BIG, &["a2", "b2"]);
    // What the bigger disks held before: different on each, so the resync must copy.
    big[1].poke(Sector(LEG.0), &pattern(99, (BIG.0 - LEG.0) as usize));
    let legs: Vec<DeviceRef> = big
        .iter()
        .map(|leg| GrownInPlace::new(Arc::clone(leg) as DeviceRef, LEG) as DeviceRef)
        .collect();
    let mems = big.clone();
    with_mirror(legs, options(REGION), move |t| async move {
        assert_eq!(t.size(), old.data_size);
        grow(&t).await.expect("grow");
        let grown = t.layout();
        assert_eq!(grown.data_size.0, BIG.0 - old.data_offset.0);
        settle(&t).await;
        t.flush().await.expect("flush");
        assert!(data_of(&mems[0], grown) == data_of(&mems[1], grown));
        assert_eq!(read(&t, 0, 64).await, pattern(8, 64));
    })
    .expect("mirror");
}
