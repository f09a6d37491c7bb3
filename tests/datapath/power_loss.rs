//! Durability under a power cut, not a process kill. The other crash tests
//! kill the process (or stop its disk operations at step N); the page cache
//! survives that, so data that was written but never synced still reads back
//! and a missing fsync goes unnoticed. Here the file system itself goes down:
//! an XFS scratch file system on a loop device is shut down with
//! `xfs_io -x -c shutdown` *without* `-f`, which throws away its dirty page
//! cache and the part of its journal still in memory, right after the
//! operation under test was acknowledged. Then it is unmounted, the loop
//! device's buffers are dropped and it is mounted again (journal replay),
//! and only then is anything read back.
//!
//! What must survive:
//! - every write a guest had acknowledged before a FLUSH or a WRITE_BARRIER
//!   that was answered OKAY (and the barrier's own data);
//! - every committed volume: after `stop` returned, the clean image holds
//!   what the guest wrote, and a stop cut short at any step leaves either
//!   the old committed image (the dirty image is still there) or the new one
//!   (the dirty image is gone because the commit's rename happened).
//!
//! [`the_power_cut_loses_unsynced_data`] checks the model itself: data that
//! was never synced must be gone after the cut, or the other tests could not
//! catch a missing sync. Nothing cached survives into the read-back: the
//! strict unmount frees the old mount's page cache with its superblock, and
//! `blockdev --flushbufs` drops the loop device's buffers (a system-wide
//! `drop_caches` would add nothing and slow every other process down). The
//! loop device's backing file plays the disk: what XFS had written to the
//! device survives, as it would on a disk without a volatile write cache.
//!
//! Each test here fails on the bug it is named after, re-applied by hand:
//! the flush and barrier tests with the engine's fdatasync made a no-op
//! (every write acknowledged before the OKAY reads back as zeros: the
//! O_DIRECT writes into the sparse image reached the device, but their
//! allocations stayed in the journal's memory); the pool tests with the
//! fsync before the commit's rename removed.
//!
//! Needs root, `mkfs.xfs`, `xfs_io` and `blockdev` (the project's skip rule
//! applies: they fail without them unless `REFBLK_ALLOW_SKIP=1`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::kit::{Rig, Rng, LONG, XVDA};
use refblk_core::backend::AttachOptions;
use refblk_core::pool::{FaultMode, Faults, InitOptions, Pool, StopOutcome, VolumeConfig};
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest};
use refblk_sim::scratchfs::{require_tools_or_skip, FsKind, ScratchFs};

const MIB: u64 = 1 << 20;

/// An XFS scratch file system (unmounted and detached on drop, also when a
/// test fails), or None when skipping.
fn xfs() -> Option<ScratchFs> {
    if !require_tools_or_skip(&["xfs_io", "blockdev"], "a power cut of an XFS file system") {
        return None;
    }
    ScratchFs::new_or_skip(FsKind::Xfs, 300 * MIB)
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
}

/// A sparse image of `size` bytes whose existence and size are durable (its
/// data blocks are holes: writes into it allocate, and the allocation is
/// journaled, so an unsynced write is lost entirely by a power cut).
fn durable_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).expect("create image");
    f.set_len(size).expect("size image");
    f.sync_all().expect("fsync image");
    fsync_dir(dir);
    p
}

/// Take the file system down as a power cut would; panics if it cannot.
fn cut_power(fs: &ScratchFs) {
    fs.shutdown_without_log_flush()
        .unwrap_or_else(|e| panic!("shutting the scratch XFS down: {e}"));
}

/// Mount it again after the cut (every file on it must be closed).
fn power_on(fs: &mut ScratchFs) {
    fs.remount()
        .unwrap_or_else(|e| panic!("remounting the scratch XFS after the cut: {e}"));
}

/// Where two images first differ, for failure messages.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("{} bytes instead of {}", got.len(), want.len());
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => "no difference".into(),
        Some(pos) => {
            let end = (pos + 4096).min(got.len());
            let zeros = got[pos..end].iter().all(|&b| b == 0);
            format!(
                "first difference at byte {pos} (sector {}){}",
                pos / 512,
                if zeros { ", where it reads zeros" } else { "" }
            )
        }
    }
}

#[test]
fn the_power_cut_loses_unsynced_data() {
    let Some(mut fs) = xfs() else { return };
    // A page-cache write is lost by the cut in practice; it is written back
    // only if the kernel's flusher and a journal commit both happen inside
    // the few milliseconds before the cut (another process's sync(2)), so
    // allow three tries.
    let data = vec![0xa5u8; 256 << 10];
    let mut kept = 0;
    for attempt in 0..3 {
        let img = durable_image(fs.path(), &format!("unsynced{attempt}.img"), 4 * MIB);
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&data, MIB).unwrap();
        drop(f);
        cut_power(&fs);
        power_on(&mut fs);
        let back = fs::read(&img).expect("read back");
        assert_eq!(back.len() as u64, 4 * MIB, "the durable size was lost");
        if back[MIB as usize..MIB as usize + data.len()] == data[..] {
            kept += 1;
            continue;
        }
        eprintln!("power_loss: unsynced data lost by the cut (attempt {attempt})");
        return;
    }
    panic!(
        "data that was never synced survived all {kept} power cuts: this model cannot \
         tell a missing fsync from a present one"
    );
}

/// Tears the device and the backend down after the cut, so that the file
/// system can be unmounted (the backend holds the image open).
fn close_all(mut fe: Frontend, rig: Rig) {
    // The file system is down: the frontend's goodbye may get I/O errors.
    let _ = fe.disconnect();
    drop(fe);
    rig.shutdown();
}

/// Acknowledged random writes of the guest: `rounds` batches of up to 16
/// writes in flight over both queues, each 1 to 128 sectors at any sector
/// (not only whole pages), each batch waited for. Applied to `model` in the
/// order answered. (The loop device has 512-byte sectors, so all of them go
/// to the engine's O_DIRECT file.)
fn acknowledged_writes(fe: &mut Frontend, rng: &mut Rng, model: &mut [u8], rounds: usize) {
    // One write per 128-sector slot in a batch: no two in flight overlap.
    let slots = model.len() as u64 / 512 / 128;
    let nq = fe.num_queues();
    for _ in 0..rounds {
        let mut used = Vec::new();
        let mut batch = Vec::new();
        for k in 0..16 {
            let slot = rng.below(slots);
            if used.contains(&slot) {
                continue;
            }
            used.push(slot);
            let n = 1 + rng.below(128);
            let sector = slot * 128 + rng.below(128 - n + 1);
            let mut data = vec![0u8; n as usize * 512];
            rng.fill(&mut data);
            let t = fe
                .submit(
                    Some(k % nq),
                    IoRequest::Write {
                        sector,
                        data: &data,
                    },
                )
                .expect("submit write");
            batch.push((t, sector, data));
        }
        for (t, sector, data) in batch {
            let c = fe.wait_for(t, LONG).expect("write answered");
            assert_eq!(c.status, 0, "write at sector {sector} failed");
            let off = sector as usize * 512;
            model[off..off + data.len()].copy_from_slice(&data);
        }
    }
}

/// The guest's disk on the scratch XFS, with a backend serving it.
fn guest_on_xfs(fs: &ScratchFs, disk: u64) -> Option<(Rig, Frontend, PathBuf)> {
    let rig = Rig::new()?;
    let g = rig.guest(3, 8192);
    let img = durable_image(fs.path(), "disk.img", disk);
    rig.attach(3, XVDA, &img, "w", AttachOptions::default());
    let fe = rig.connect(
        &g,
        XVDA,
        FrontendOptions {
            queues: 2,
            ring_page_order: 1,
            ..FrontendOptions::default()
        },
    );
    Some((rig, fe, img))
}

fn check_disk(img: &Path, model: &[u8], what: &str) {
    let back = fs::read(img).expect("read the image back");
    if back != model {
        let lost = back
            .chunks(512)
            .zip(model.chunks(512))
            .filter(|(a, b)| a != b)
            .count();
        let written = model
            .chunks(512)
            .filter(|s| s.iter().any(|&b| b != 0))
            .count();
        panic!(
            "after a power cut, the image does not hold the writes acknowledged before {what}: \
             {lost} of the {written} written sectors differ, {}",
            first_difference(&back, model)
        );
    }
}

/// Writes and discards acknowledged, then a FLUSH answered OKAY: all of them
/// survive the power cut (discarded ranges read zeros). The last batch of
/// writes is submitted together with the flush on the same queue (the flush
/// covers the writes before it in the ring).
#[test]
fn writes_before_an_acknowledged_flush_survive_a_power_cut() {
    const DISK: u64 = 16 * MIB;
    let Some(mut fs) = xfs() else { return };
    let Some((rig, mut fe, img)) = guest_on_xfs(&fs, DISK) else {
        return;
    };
    assert!(
        fe.info().is_some_and(|i| i.discard),
        "the backend does not offer feature-discard on XFS"
    );
    let mut model = vec![0u8; DISK as usize];
    let mut rng = Rng::new(41);
    acknowledged_writes(&mut fe, &mut rng, &mut model, 12);
    // Discards of 1 to 256 sectors anywhere (partial file system blocks
    // too, which the file system zeroes through its page cache); one of
    // them secure (zeroed rather than punched).
    for k in 0..8 {
        let n = 1 + rng.below(256);
        let sector = rng.below(DISK / 512 - n);
        fe.discard(sector, n, k == 0)
            .unwrap_or_else(|e| panic!("discard of {n} sectors at {sector}: {e}"));
        let off = sector as usize * 512;
        model[off..off + n as usize * 512].fill(0);
    }
    let mut tags = Vec::new();
    for k in 0..24u64 {
        let mut d = vec![0u8; 4096 * (1 + k as usize % 4)];
        rng.fill(&mut d);
        let sector = 16 * 1024 + k * 64;
        let t = fe
            .submit(Some(0), IoRequest::Write { sector, data: &d })
            .expect("submit write");
        tags.push((t, sector, d));
    }
    let flush = fe.submit(Some(0), IoRequest::Flush).expect("submit flush");
    let ack = fe.wait_for(flush, LONG).expect("flush answered");
    assert_eq!(ack.status, 0, "flush failed");
    // The cut comes right after the flush's OKAY, before anything else runs.
    cut_power(&fs);
    for (t, sector, d) in tags {
        let c = fe.wait_for(t, LONG).expect("write answered");
        assert_eq!(
            c.status, 0,
            "write at sector {sector} (before the flush) failed"
        );
        let off = sector as usize * 512;
        model[off..off + d.len()].copy_from_slice(&d);
    }
    close_all(fe, rig);
    power_on(&mut fs);
    check_disk(&img, &model, "an OKAY FLUSH (and the discards before it)");
}

/// Writes acknowledged, then a WRITE_BARRIER with data answered OKAY: the
/// writes and the barrier's own data survive the power cut.
#[test]
fn writes_and_an_acknowledged_barrier_survive_a_power_cut() {
    const DISK: u64 = 16 * MIB;
    let Some(mut fs) = xfs() else { return };
    let Some((rig, mut fe, img)) = guest_on_xfs(&fs, DISK) else {
        return;
    };
    assert!(
        fe.info().is_some_and(|i| i.barrier),
        "the backend does not offer feature-barrier"
    );
    let mut model = vec![0u8; DISK as usize];
    let mut rng = Rng::new(43);
    acknowledged_writes(&mut fe, &mut rng, &mut model, 12);
    let mut d = vec![0u8; 8 * 4096];
    rng.fill(&mut d);
    let sector = 20 * 1024;
    fe.barrier(sector, &d).expect("barrier answered OKAY");
    cut_power(&fs);
    let off = sector as usize * 512;
    model[off..off + d.len()].copy_from_slice(&d);
    close_all(fe, rig);
    power_on(&mut fs);
    check_disk(&img, &model, "an OKAY WRITE_BARRIER and the barrier's data");
}

// ------------------------------------------------------------------ pool

const VOL: u64 = 4 * MIB;

/// The regions a session writes: a few, of odd sizes, at a seed-dependent
/// place, with seed-dependent data.
fn session_writes(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..4)
        .map(|k| {
            let len = 4096 * (1 + rng.below(40)) as usize + 512 * rng.below(8) as usize;
            let off = k * MIB + 512 * rng.below(512);
            let mut d = vec![0u8; len];
            rng.fill(&mut d);
            (off, d)
        })
        .collect()
}

/// Write a session's regions into a running volume's image through the page
/// cache and close it without syncing: a guest that never flushed, served
/// buffered. Making it durable is the commit's job. Returns the image's
/// expected content.
fn write_session(dirty: &Path, seed: u64, mut base: Vec<u8>) -> Vec<u8> {
    let f = OpenOptions::new()
        .write(true)
        .open(dirty)
        .unwrap_or_else(|e| panic!("open {}: {e}", dirty.display()));
    for (off, d) in session_writes(seed) {
        f.write_all_at(&d, off).expect("write into the dirty image");
        base[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    base
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// One volume of the test: its expected old and new committed content.
struct Case {
    vid: String,
    old: Vec<u8>,
    new: Vec<u8>,
    /// `None`: the stop was acknowledged; `Some(step)`: cut short there.
    cut_at: Option<String>,
}

/// Create `vid`, commit one session (`old`), start it again.
fn prepared(pool: &Pool, vid: &str, rtk: i64, seed: u64) -> Vec<u8> {
    let v = pool
        .create_volume(vid, VolumeConfig::origin(rtk), VOL)
        .unwrap_or_else(|e| panic!("create {vid}: {e}"));
    let d = v.start().unwrap();
    let old = write_session(&d, seed, vec![0u8; VOL as usize]);
    assert!(matches!(v.stop().unwrap(), StopOutcome::Committed));
    v.start().unwrap();
    old
}

/// Stops of origin volumes keeping `rtk` revisions, each cut short by a
/// simulated kill at one of its steps (every step once, a volume each) and
/// two acknowledged, then the power cut. After it: an acknowledged stop's
/// clean image holds the new data; an interrupted one whose dirty image is
/// gone (the commit's rename happened) too; one whose dirty image is still
/// there keeps the old clean image (for rtk -1 the running image is the
/// only one, served in place: nothing to check).
///
/// With revisions kept, a completed stop ends by reflinking the new clean
/// image into the precache, and FICLONE writes the source's dirty pages back
/// first: an acknowledged stop would keep its data even without the commit's
/// fsync. The stops killed between the rename and that reflink are the ones
/// that tell (with the fsync removed they fail: the clean name points at an
/// inode whose data never reached the disk).
fn commits_survive_a_power_cut(rtk: i64) {
    let Some(mut fs) = xfs() else { return };
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = fs.path().join("pool");
    let pool = Pool::init(
        &dir,
        &InitOptions {
            setup_check: true,
            ..InitOptions::default()
        },
    )
    .expect("pool init");
    let mut cases = Vec::new();
    // Count the steps of a stop (this volume's commit is acknowledged too).
    let faults = Arc::new(Faults::new());
    let counted = pool.with_faults(faults.clone());
    let vid = "appvms/count/private".to_string();
    let old = prepared(&counted, &vid, rtk, 1);
    let v = counted.volume(&vid).unwrap();
    let new = write_session(v.dirty_path(), 2, old.clone());
    faults.reset();
    assert!(matches!(v.stop().unwrap(), StopOutcome::Committed));
    let steps = faults.count();
    let trace = faults.trace();
    assert!(steps >= 3, "a stop of {steps} steps? {trace:?}");
    cases.push(Case {
        vid,
        old,
        new,
        cut_at: None,
    });
    // A volume per step, prepared first so that the cut stops come together.
    let mut prepared_vols = Vec::new();
    for n in 1..=steps {
        let faults = Arc::new(Faults::new());
        let p = pool.with_faults(faults.clone());
        let vid = format!("appvms/n{n}/private");
        let old = prepared(&p, &vid, rtk, 10 + n);
        prepared_vols.push((n, p, faults, vid, old));
    }
    for (n, p, faults, vid, old) in prepared_vols {
        let v = p.volume(&vid).unwrap();
        let new = write_session(v.dirty_path(), 100 + n, old.clone());
        faults.arm(n, FaultMode::Crash);
        // The step as the counted stop did it, on this volume's files.
        let step = trace
            .get(n as usize - 1)
            .map(|t| t.replace("appvms/count", &format!("appvms/n{n}")))
            .unwrap_or_default();
        assert!(
            v.stop().is_err(),
            "stop of {vid} with a kill at step {n} ({step}) succeeded"
        );
        cases.push(Case {
            vid,
            old,
            new,
            cut_at: Some(format!("step {n}/{steps} ({step})")),
        });
    }
    // The last one: written, stopped, acknowledged, and at once the cut.
    let vid = "appvms/last/private".to_string();
    let old = prepared(&pool, &vid, rtk, 3);
    let v = pool.volume(&vid).unwrap();
    let new = write_session(v.dirty_path(), 4, old.clone());
    assert!(matches!(v.stop().unwrap(), StopOutcome::Committed));
    cut_power(&fs);
    cases.push(Case {
        vid,
        old,
        new,
        cut_at: None,
    });
    drop(v);
    drop(counted);
    drop(pool);
    power_on(&mut fs);

    let pool = Pool::open(&dir).expect("open the pool after the power cut");
    let mut failed = Vec::new();
    for c in &cases {
        let label = match &c.cut_at {
            None => format!("{} (stop acknowledged)", c.vid),
            Some(s) => format!("{} (stop killed at {s})", c.vid),
        };
        if let Err(e) = check_volume(&pool, c, rtk) {
            failed.push(format!("{label}: {e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "origin volumes keeping {rtk} revisions, after a power cut: {} of {} stops lost data:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    eprintln!(
        "power_loss: rtk {rtk}: {} stops ({steps} steps each) checked after the cut",
        cases.len()
    );
}

/// The rule of [`commits_survive_a_power_cut`] for one volume.
fn check_volume(pool: &Pool, c: &Case, rtk: i64) -> Result<(), String> {
    let v = pool.volume(&c.vid).map_err(|e| e.to_string())?;
    let clean = v.clean_path();
    let dirty_left = exists(v.dirty_path());
    if c.cut_at.is_none() && dirty_left {
        return Err("the dirty image is back".into());
    }
    if !dirty_left {
        let got = fs::read(clean).map_err(|e| format!("clean image: {e}"))?;
        if got != c.new {
            return Err(format!(
                "the commit's rename survived, but the clean image does not hold the \
                 committed data: {}{}",
                first_difference(&got, &c.new),
                if got == c.old {
                    " (it holds the previous commit: the session's writes never reached the disk)"
                } else {
                    ""
                }
            ));
        }
        if rtk > 0 {
            let revs = v.revisions().map_err(|e| e.to_string())?;
            let last = revs.last().ok_or("no revision")?;
            if fs::read(&last.path).map_err(|e| e.to_string())? != c.old {
                return Err("the newest revision is not the previous commit".into());
            }
        }
    } else if rtk >= 0 {
        let got = fs::read(clean).map_err(|e| format!("clean image: {e}"))?;
        if got != c.old {
            return Err(format!(
                "the stop did not get to its rename, but the clean image is not the previous \
                 commit: {}",
                first_difference(&got, &c.old)
            ));
        }
    }
    Ok(())
}

#[test]
fn committed_volumes_survive_a_power_cut() {
    commits_survive_a_power_cut(2);
}

#[test]
fn committed_volumes_without_revisions_survive_a_power_cut() {
    commits_survive_a_power_cut(-1);
}
