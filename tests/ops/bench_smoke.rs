//! A small version of `refblk bench` in the test suite: seconds, on a scratch XFS.
//! It asserts only that every path produced sane numbers and that data written
//! through each path reads back identically (through the same path and through the
//! plain image file). Speed targets live in the benchmark, not here.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use refblk::bench::profile::{parse_profiles, PathKind};
use refblk::bench::target::{fill_pattern, BlockTarget, EngineTarget};
use refblk::bench::{self, loopdev::LoopDev, refblk as refblk_path, BenchConfig, Place};
use refblk_sim::scratchfs::{require_root_or_skip, require_tools_or_skip, FsKind, ScratchFs};

fn needs() -> bool {
    require_root_or_skip("scratch XFS and loop devices for the bench smoke test")
        && require_tools_or_skip(
            &[
                "mkfs.xfs", "losetup", "mount", "umount", "fincore", "filefrag",
            ],
            "the bench smoke test",
        )
}

#[test]
fn every_path_produces_sane_numbers() {
    if !needs() {
        return;
    }
    let cfg = BenchConfig {
        profiles: parse_profiles(
            "seq1m_q8t1_read,rnd4k_q32t1_write,rnd4k_q1t1_read,alloc,discard_64k,snapshot,commit",
        )
        .unwrap(),
        places: vec![Place::Fs(FsKind::Xfs)],
        backing: bench::Backing::Disk,
        paths: PathKind::ALL.to_vec(),
        runtime: Duration::from_millis(150),
        size: 64 << 20,
        reps: 2,
        snapshot_sizes: vec![32 << 20],
        frag_writes: 512,
        progress: false,
    };
    let rep = bench::run(&cfg).expect("bench run");
    // fio calibrates the file path on every profile it can run (not discard), one
    // run per repetition; without fio the report says so and the run goes on.
    if rep.fio.is_some() {
        let profiles: Vec<&str> = rep.calibration.iter().map(|c| c.profile).collect();
        assert_eq!(
            profiles,
            [
                "seq1m_q8t1_read",
                "rnd4k_q32t1_write",
                "rnd4k_q1t1_read",
                "alloc",
                "discard_64k"
            ],
            "calibrated profiles"
        );
        for c in &rep.calibration {
            if c.profile == "discard_64k" {
                assert!(c.samples.is_empty(), "fio cannot trim a file: {c:?}");
                assert!(c.error.as_deref().unwrap_or("").contains("not calibrated"));
                continue;
            }
            assert!(c.error.is_none(), "{} fio: {:?}", c.profile, c.error);
            assert_eq!(c.samples.len(), cfg.reps, "{} fio samples", c.profile);
            assert!(c.samples.iter().all(|s| s.ops > 0 && s.iops > 0.0), "{c:?}");
            assert!(c
                .command
                .contains("--ioengine=io_uring --fixedbufs --registerfiles"));
            assert!(c.command.contains("--direct=1"), "{}", c.command);
        }
    } else {
        assert!(
            rep.notes
                .iter()
                .any(|n| n.contains("not calibrated against fio")),
            "{:?}",
            rep.notes
        );
    }
    let mut paths_seen = Vec::new();
    for r in &rep.io {
        let what = format!("{} {} {}", r.place, r.profile, r.path);
        assert!(r.error.is_none(), "{what}: {:?}", r.error);
        assert_eq!(r.samples.len(), cfg.reps, "{what}: samples");
        for s in &r.samples {
            assert!(s.ops > 0 && s.secs > 0.0, "{what}: no I/O done: {s:?}");
            assert!(s.iops.is_finite() && s.iops > 0.0, "{what}: {s:?}");
            let bs = if r.profile.starts_with("seq1m") {
                1e6 * 1.048576
            } else if r.profile == "discard_64k" {
                65536.0
            } else {
                4096.0
            };
            assert!(
                ((s.mbps * 1e6) / (s.iops * bs) - 1.0).abs() < 1e-6,
                "{what}: MB/s and IOPS disagree: {s:?}"
            );
            // (p99 may be far below the mean: one op stalled for 50 ms in a
            // thousand, on a loaded machine, lifts the mean alone.)
            assert!(
                s.lat_mean_us > 0.0 && s.lat_p99_us > 0.0,
                "{what}: latency {s:?}"
            );
            assert!(
                s.lat_mean_us * 1e-6 <= s.secs,
                "{what}: mean latency longer than the run"
            );
            // Not > 0: the serving CPU includes the io_uring workers (io-wq)
            // alive when it is sampled; one that exits during a short run
            // takes its time with it, and the difference saturates at 0 (seen
            // on a loaded machine: 11 operations, cpu_us_per_io 0).
            assert!(
                s.cpu_us_per_io >= 0.0 && s.cpu_us_per_io < 100_000.0,
                "{what}: CPU {s:?}"
            );
        }
        if r.path == PathKind::LoopDio {
            assert!(
                r.io_mode.contains("dio=1"),
                "{what}: loop device not in direct I/O: {}",
                r.io_mode
            );
        }
        if !paths_seen.contains(&r.path) {
            paths_seen.push(r.path);
        }
    }
    let mut expect = vec![PathKind::File, PathKind::LoopDio, PathKind::LoopBuf];
    if refblk_path::available().is_ok() {
        expect.push(PathKind::Refblk);
    }
    paths_seen.sort();
    assert_eq!(paths_seen, expect, "paths measured");
    // The buffered loop device reads through dom0's page cache; the others bypass it.
    let cached = |p: PathKind| {
        rep.io
            .iter()
            .filter(|r| r.path == p && r.profile == "seq1m_q8t1_read")
            .flat_map(|r| r.samples.iter().map(|s| s.cache_bytes))
            .max()
            .unwrap()
    };
    assert!(
        cached(PathKind::LoopBuf) > 0,
        "loop-buf left nothing in the page cache"
    );
    assert_eq!(
        cached(PathKind::File),
        0,
        "O_DIRECT file path used the page cache"
    );
    // snapshot and commit at one size: dense + fragmented FICLONE, start, commit.
    assert_eq!(rep.meta.len(), 4, "{:?}", rep.meta);
    for m in &rep.meta {
        assert_eq!(m.ms.len(), cfg.reps, "{m:?}");
        assert!(m.ms.iter().all(|&x| x > 0.0 && x < 60_000.0), "{m:?}");
    }
    let frag = rep
        .meta
        .iter()
        .find(|m| m.what.contains("fragmented"))
        .unwrap();
    assert!(
        frag.extents > 16,
        "fragmenting made only {} extents",
        frag.extents
    );
    let md = bench::report::markdown(&rep);
    assert!(md.contains("| rnd4k_q1t1_read | loop-dio |"), "{md}");
    let j = bench::report::to_json(&rep);
    assert_eq!(j["io"].as_array().unwrap().len(), rep.io.len());
    assert!(bench::report::svg(&rep).contains("</svg>"));
}

/// Write distinct data at scattered offsets through `t`, read it back through `t`.
fn write_and_verify(t: &mut dyn BlockTarget, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut written = Vec::new();
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (1 << 20, 65536),
        (5 << 20, 4096),
        ((16 << 20) - 8192, 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let mut data = vec![0u8; len];
        fill_pattern(&mut data, seed + i as u64);
        t.write_at(off, &data).unwrap();
        written.push((off, data));
    }
    for (off, data) in &written {
        let mut back = vec![0u8; data.len()];
        t.read_at(*off, &mut back).unwrap();
        assert!(
            back == *data,
            "read back through the same path differs at {off}"
        );
    }
    written
}

#[test]
fn data_written_through_each_path_reads_back_identically() {
    if !needs() {
        return;
    }
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Xfs, 400 << 20) else {
        return;
    };
    let image = fs.path().join("image");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let check_file = |written: &[(u64, Vec<u8>)], what: &str| {
        let f = File::open(&image).unwrap();
        for (off, data) in written {
            let mut back = vec![0u8; data.len()];
            f.read_exact_at(&mut back, *off).unwrap();
            assert!(back == *data, "{what}: the image file differs at {off}");
        }
    };
    let mut t = EngineTarget::open(&image, 4, 65536).unwrap();
    let w = write_and_verify(&mut t, 1);
    drop(t);
    check_file(&w, "file");
    for dio in [true, false] {
        let dev = LoopDev::attach(&image, dio).unwrap();
        let mut t = EngineTarget::open(dev.path(), 4, 65536).unwrap();
        let w = write_and_verify(&mut t, if dio { 10 } else { 20 });
        drop(t);
        drop(dev); // detaching flushes the loop device
        bench::drop_cache(&image).unwrap();
        check_file(&w, if dio { "loop-dio" } else { "loop-buf" });
    }
    if refblk_path::available().is_ok() {
        let work = fs.path().join("sim");
        std::fs::create_dir_all(&work).unwrap();
        let mut t = refblk_path::connect(&image, &work, 8).unwrap();
        let w = write_and_verify(t.as_mut(), 30);
        drop(t);
        check_file(&w, "refblk");
    }
}
