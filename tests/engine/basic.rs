//! Engine tests on temp files of the root file system (ext4 here) and on tmpfs.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use refblk_core::engine::*;

fn image(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("refblk-engine")
        .tempdir_in("/var/tmp")
        .unwrap()
}

#[test]
fn open_reports_size_mode_caps_and_flags() {
    let d = tmpdir();
    let p = image(d.path(), "a.img", 3 << 20);
    let e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let i = e.info();
    println!("{i:?}");
    assert_eq!(i.size, 3 << 20);
    assert!(!i.read_only);
    assert_eq!(i.path, p);
    assert_eq!(i.slab_bytes, 4 << 20);
    assert!(i.max_in_flight >= i.sq_entries as usize);
    // This kernel (6.18) accepts all flags; the default is SINGLE_ISSUER|DEFER_TASKRUN.
    assert!(i.setup.single_issuer && i.setup.defer_taskrun && !i.setup.sqpoll);
    if i.fs.fs_name == "ext4" || i.fs.fs_name == "xfs" || i.fs.fs_name == "btrfs" {
        assert!(i.fs.punch_hole && i.fs.zero_range, "{:?}", i.fs);
        assert!(
            matches!(i.io_mode, IoMode::Direct { .. }),
            "{:?}",
            i.io_mode
        );
    }
    assert_eq!(e.in_flight(), 0);
    assert_eq!(e.stats(), EngineStats::default());
}

#[test]
fn open_error_names_file_and_step() {
    let d = tmpdir();
    let p = d.path().join("missing.img");
    let err = Engine::open(&p, &EngineConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("missing.img") && msg.contains("open"), "{msg}");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn random_read_write_matches_model_direct() {
    let d = tmpdir();
    let size = 8 << 20;
    let p = image(d.path(), "rw.img", size);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    random_rw_model(&mut e, &mut model, 3000, 32, 4096, 16, 7);
    let s = e.stats();
    assert_eq!(s.submitted.read + s.submitted.write, s.completed.total());
    assert!(s.bytes_read > 0 && s.bytes_written > 0);
    assert_eq!(s.errors, 0);
    // Batching: far fewer io_uring_enter calls than ops.
    assert!(
        s.enter_calls < s.completed.total(),
        "enter calls {} for {} ops",
        s.enter_calls,
        s.completed.total()
    );
    drop(e);
    assert!(
        std::fs::read(&p).unwrap() == model,
        "file differs from model"
    );
}

#[test]
fn random_read_write_with_sector_sized_and_unaligned_requests() {
    // 512-byte units, so some requests are not aligned for O_DIRECT (if the file
    // system wants 4096) and all are routed correctly; then byte-granular requests,
    // which always take the buffered fd in direct mode.
    let d = tmpdir();
    let size = 2 << 20;
    let p = image(d.path(), "rw512.img", size);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    random_rw_model(&mut e, &mut model, 1500, 16, 512, 24, 11);
    random_rw_model(&mut e, &mut model, 500, 16, 1, 9000, 12);
    if matches!(e.info().io_mode, IoMode::Direct { .. }) {
        assert!(e.stats().buffered_routed > 0);
    }
    drop(e);
    assert!(std::fs::read(&p).unwrap() == model);
}

#[test]
fn buffered_policy_works_and_reports_reason() {
    let d = tmpdir();
    let size = 1 << 20;
    let p = image(d.path(), "buf.img", size);
    let cfg = EngineConfig {
        direct: DirectPolicy::Never,
        ..Default::default()
    };
    let mut e = Engine::open(&p, &cfg).unwrap();
    match &e.info().io_mode {
        IoMode::Buffered { reason } => assert!(reason.contains("configuration"), "{reason}"),
        m => panic!("expected buffered, got {m:?}"),
    }
    let mut model = vec![0u8; size as usize];
    random_rw_model(&mut e, &mut model, 500, 8, 512, 8, 3);
    assert_eq!(e.stats().buffered_routed, 0);
}

#[test]
fn read_across_eof_zero_fills_the_rest() {
    let d = tmpdir();
    let p = d.path().join("short.img");
    let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&p, &data).unwrap();
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    assert_eq!(e.info().size, 10000);
    let r = e.alloc(8192).unwrap();
    e.buf_mut(&r).fill(0xee);
    let c = run_one(
        &mut e,
        5,
        Op::Read {
            offset: 4096,
            region: r,
        },
    );
    assert_eq!(c.result, 8192);
    let r = c.region.unwrap();
    let b = e.buf(&r);
    assert_eq!(&b[..10000 - 4096], &data[4096..]);
    assert!(b[10000 - 4096..].iter().all(|&x| x == 0), "not zero-filled");
    e.free(r);
    let s = e.stats();
    assert_eq!(s.eof_zero_fills, 1);
    assert!(s.short_resubmits >= 1, "{s:?}");
    assert_eq!(s.bytes_read, 10000 - 4096);

    // Entirely past EOF: all zeros.
    let r = e.alloc(4096).unwrap();
    e.buf_mut(&r).fill(0xee);
    let c = run_one(
        &mut e,
        6,
        Op::Read {
            offset: 1 << 20,
            region: r,
        },
    );
    assert_eq!(c.result, 4096);
    let r = c.region.unwrap();
    assert!(e.buf(&r).iter().all(|&x| x == 0));
    e.free(r);
}

#[test]
fn write_past_eof_extends_and_size_refreshes() {
    let d = tmpdir();
    let p = image(d.path(), "grow.img", 4096);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let r = e.alloc(4096).unwrap();
    e.buf_mut(&r).fill(9);
    let c = run_one(
        &mut e,
        1,
        Op::Write {
            offset: 8192,
            region: r,
        },
    );
    assert_eq!(c.result, 4096);
    e.free(c.region.unwrap());
    assert_eq!(e.info().size, 4096);
    assert_eq!(e.refresh_size().unwrap(), 12288);
    assert_eq!(e.info().size, 12288);
}

#[test]
fn fdatasync_is_counted() {
    let d = tmpdir();
    let p = image(d.path(), "sync.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let r = e.alloc(4096).unwrap();
    e.buf_mut(&r).fill(1);
    e.push(
        1,
        Op::Write {
            offset: 0,
            region: r,
        },
    )
    .unwrap();
    let mut done = Vec::new();
    let c = wait_one(&mut e, &mut done);
    e.free(c.region.unwrap());
    assert_eq!(e.stats().fdatasyncs, 0);
    let c = run_one(&mut e, 2, Op::Fdatasync);
    assert_eq!(c.result, 0);
    assert!(c.region.is_none());
    let s = e.stats();
    assert_eq!(s.fdatasyncs, 1);
    assert_eq!(s.submitted.fdatasync, 1);
    assert_eq!(s.completed.fdatasync, 1);
}

#[test]
fn discard_frees_blocks_and_zero_range_zeroes_on_ext4_root() {
    let d = tmpdir();
    let size = 4u64 << 20;
    let p = d.path().join("disc.img");
    std::fs::write(&p, vec![0xabu8; size as usize]).unwrap();
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    if !e.info().fs.punch_hole {
        skip_or_fail(&format!("{:?} lacks punch hole", e.info().fs));
        return;
    }
    assert_eq!(run_one(&mut e, 1, Op::Fdatasync).result, 0);
    let before = allocated_bytes(&p);
    assert!(before >= size, "file not dense: {before}");
    let c = run_one(
        &mut e,
        2,
        Op::Discard {
            offset: 1 << 20,
            len: 1 << 20,
        },
    );
    assert_eq!(c.result, 0);
    let after = allocated_bytes(&p);
    assert!(
        after + (1 << 20) <= before,
        "st_blocks did not shrink by 1 MiB: {before} -> {after}"
    );
    let c = run_one(
        &mut e,
        3,
        Op::ZeroRange {
            offset: 3 << 20,
            len: 8192,
        },
    );
    assert_eq!(c.result, 0);
    let mut model = vec![0xabu8; size as usize];
    model[1 << 20..2 << 20].fill(0);
    model[3 << 20..(3 << 20) + 8192].fill(0);
    verify_through_engine(&mut e, &model);
    assert_eq!(
        e.refresh_size().unwrap(),
        size,
        "KEEP_SIZE changed the size"
    );
    let s = e.stats();
    assert_eq!((s.completed.discard, s.completed.zero_range), (1, 1));
}

#[test]
fn tmpfs_has_punch_hole_but_no_zero_range() {
    let shm = Path::new("/dev/shm");
    let is_tmpfs = nix::sys::statfs::statfs(shm)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    if !is_tmpfs {
        skip_or_fail("/dev/shm is not a tmpfs");
        return;
    }
    let d = tempfile::tempdir_in(shm).unwrap();
    let p = d.path().join("t.img");
    std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let fs = e.info().fs.clone();
    assert_eq!(fs.fs_name, "tmpfs");
    assert!(fs.punch_hole && !fs.zero_range, "{fs:?}");
    assert!(!fs.data_checksums, "{fs:?}");
    let c = run_one(
        &mut e,
        1,
        Op::ZeroRange {
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(c.result, -libc::EOPNOTSUPP);
    let c = run_one(
        &mut e,
        2,
        Op::Discard {
            offset: 0,
            len: 8192,
        },
    );
    assert_eq!(c.result, 0);
    let mut model = vec![7u8; 1 << 20];
    model[..8192].fill(0);
    verify_through_engine(&mut e, &model);
    assert_eq!(e.stats().errors, 1);
}

#[test]
fn slab_exhaustion_returns_none_and_recovers() {
    let d = tmpdir();
    let p = image(d.path(), "slab.img", 1 << 20);
    let cfg = EngineConfig {
        slab_bytes: 64 * 1024,
        ..Default::default()
    };
    let mut e = Engine::open(&p, &cfg).unwrap();
    assert_eq!(e.info().slab_bytes, 64 * 1024);
    let a = e.alloc(32 * 1024).unwrap();
    let b = e.alloc(30 * 1024).unwrap(); // rounds up to 8 pages
    assert_eq!(e.free_buffer_bytes(), 0);
    assert!(e.alloc(1).is_none());
    // In-flight regions stay allocated until their completion hands them back.
    e.push(
        1,
        Op::Write {
            offset: 0,
            region: a,
        },
    )
    .unwrap();
    assert!(e.alloc(4096).is_none());
    let mut done = Vec::new();
    let c = wait_one(&mut e, &mut done);
    assert_eq!(c.result, 32 * 1024);
    assert!(e.alloc(4096).is_none());
    e.free(c.region.unwrap());
    let c = e.alloc(32 * 1024).unwrap();
    assert!(e.alloc(1).is_none());
    e.free(b);
    e.free(c);
    assert!(e.alloc(64 * 1024).is_some());
}

#[test]
fn poll_add_wakes_on_eventfd_write() {
    let d = tmpdir();
    let p = image(d.path(), "poll.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let efd = std::sync::Arc::new(
        nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .unwrap(),
    );
    e.push(
        42,
        Op::PollAdd {
            fd: efd.as_raw_fd(),
        },
    )
    .unwrap();
    e.submit().unwrap();
    assert_eq!(e.in_flight(), 1);
    assert_eq!(e.in_flight_io(), 0, "polls do not count as I/O");
    let mut done = Vec::new();
    assert_eq!(e.reap(&mut done), 0, "poll fired without an event");
    // The event comes 100 ms later (a window for a poll that fires without
    // it); the flag says whether it had come when the poll completed.
    let written = Arc::new(AtomicBool::new(false));
    let writer = {
        let efd = efd.clone();
        let written = written.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            written.store(true, Ordering::SeqCst);
            efd.write(1).unwrap();
        })
    };
    let c = wait_one(&mut e, &mut done);
    assert!(written.load(Ordering::SeqCst), "woke before the event");
    writer.join().unwrap();
    assert_eq!(c.user_data, 42);
    assert!(
        c.result > 0 && c.result & libc::POLLIN as i32 != 0,
        "{}",
        c.result
    );
    assert_eq!(e.in_flight(), 0);
    assert_eq!(e.stats().completed.poll, 1);
}

#[test]
fn read_only_write_completes_with_ebadf() {
    let d = tmpdir();
    let p = image(d.path(), "ro.img", 1 << 20);
    let cfg = EngineConfig {
        read_only: true,
        ..Default::default()
    };
    let mut e = Engine::open(&p, &cfg).unwrap();
    assert!(e.info().read_only);
    let fs = &e.info().fs;
    assert!(!fs.punch_hole && !fs.zero_range && fs.probed_by == "read-only image");
    let r = e.alloc(4096).unwrap();
    let c = run_one(
        &mut e,
        9,
        Op::Write {
            offset: 0,
            region: r,
        },
    );
    assert_eq!(c.result, -libc::EBADF);
    e.free(c.region.expect("region comes back on error too"));
    let c = run_one(
        &mut e,
        10,
        Op::Discard {
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(c.result, -libc::EBADF);
    // Reads still work.
    let r = e.alloc(4096).unwrap();
    let c = run_one(
        &mut e,
        11,
        Op::Read {
            offset: 0,
            region: r,
        },
    );
    assert_eq!(c.result, 4096);
    e.free(c.region.unwrap());
    assert_eq!(e.stats().errors, 2);
}

#[test]
fn bad_poll_fd_and_bad_offsets_are_completions_not_panics() {
    let d = tmpdir();
    let p = image(d.path(), "err.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let c = run_one(&mut e, 1, Op::PollAdd { fd: 1_000_000 });
    assert_eq!(c.result, -libc::EBADF);
    let r = e.alloc(4096).unwrap();
    let c = run_one(
        &mut e,
        2,
        Op::Read {
            offset: u64::MAX - 100,
            region: r,
        },
    );
    assert!(c.result < 0, "{}", c.result);
    e.free(c.region.unwrap());
    let c = run_one(&mut e, 3, Op::Discard { offset: 0, len: 0 });
    assert_eq!(c.result, -libc::EINVAL);
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn queue_full_is_rejected_with_the_op_returned() {
    let d = tmpdir();
    let p = image(d.path(), "qf.img", 1 << 20);
    let cfg = EngineConfig {
        queue_depth: 2,
        ..Default::default()
    };
    let mut e = Engine::open(&p, &cfg).unwrap();
    let max = e.info().max_in_flight;
    assert!(max >= 2);
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    // More ops than SQ entries: push submits internally to make room.
    for i in 0..max {
        e.push(
            i as u64,
            Op::PollAdd {
                fd: efd.as_raw_fd(),
            },
        )
        .unwrap();
    }
    assert_eq!(e.free_slots(), 0);
    let r = e.alloc(4096).unwrap();
    let rej = e
        .push(
            99,
            Op::Read {
                offset: 0,
                region: r,
            },
        )
        .unwrap_err();
    assert!(matches!(rej.reason, RejectReason::QueueFull));
    let r = rej.op.into_region().expect("region handed back");
    e.free(r);
    efd.write(1).unwrap();
    let mut done = Vec::new();
    while done.len() < max {
        e.submit_and_wait(max).unwrap();
        e.reap(&mut done);
    }
    assert_eq!(done.len(), max);
    assert_eq!(e.free_slots(), max);
}

#[test]
fn engine_built_on_one_thread_runs_on_another() {
    // SINGLE_ISSUER binds the ring to the thread that enables it (first submit), so
    // the backend may build engines on its control thread and hand them to workers.
    let d = tmpdir();
    let p = image(d.path(), "mv.img", 1 << 20);
    let e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let mut e = std::thread::spawn(move || {
        let mut e = e;
        let mut model = vec![0u8; 1 << 20];
        random_rw_model(&mut e, &mut model, 200, 8, 4096, 4, 5);
        e
    })
    .join()
    .unwrap();
    // Back on the first thread: the ring belongs to the worker now; this must be an
    // error, not a panic or a hang.
    let r = e.alloc(4096).unwrap();
    e.push(
        1,
        Op::Read {
            offset: 0,
            region: r,
        },
    )
    .unwrap();
    if e.info().setup.single_issuer {
        let err = e.submit().unwrap_err();
        assert!(err.to_string().contains("io_uring_enter"), "{err}");
    }
}

#[test]
fn reap_does_not_grow_the_completion_vec_in_steady_state() {
    let d = tmpdir();
    let p = image(d.path(), "cap.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let mut done = Vec::with_capacity(64);
    let cap = done.capacity();
    let mut regions: Vec<BufRegion> = (0..32).map(|_| e.alloc(4096).unwrap()).collect();
    for round in 0..50u64 {
        for (i, r) in regions.drain(..).enumerate() {
            e.push(
                round * 100 + i as u64,
                Op::Read {
                    offset: i as u64 * 4096,
                    region: r,
                },
            )
            .unwrap();
        }
        let enters = e.stats().enter_calls;
        e.submit().unwrap();
        assert_eq!(e.stats().enter_calls, enters + 1, "one enter per batch");
        while e.in_flight() > 0 {
            e.submit_and_wait(e.in_flight()).unwrap();
            e.reap(&mut done);
        }
        assert_eq!(done.len(), 32);
        regions.extend(done.drain(..).map(|c| {
            assert_eq!(c.result, 4096);
            c.region.unwrap()
        }));
    }
    assert_eq!(done.capacity(), cap);
}

#[test]
fn sqpoll_and_coop_taskrun_options_work() {
    let d = tmpdir();
    let p = image(d.path(), "opt.img", 1 << 20);
    for cfg in [
        EngineConfig {
            task_run: TaskRun::Coop,
            ..Default::default()
        },
        EngineConfig {
            sqpoll_idle_ms: Some(10),
            ..Default::default()
        },
    ] {
        let mut e = Engine::open(&p, &cfg).unwrap();
        let s = e.info().setup;
        assert!(!s.defer_taskrun);
        assert_eq!(s.sqpoll, cfg.sqpoll_idle_ms.is_some(), "{s:?}");
        let mut model = vec![0u8; 1 << 20];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut model, 0)
            .unwrap();
        random_rw_model(&mut e, &mut model, 300, 8, 4096, 4, 9);
    }
}

#[test]
fn reap_after_plain_submit_sees_completions_in_every_taskrun_mode() {
    // With DEFER_TASKRUN the kernel posts CQEs only when the owner enters with
    // GETEVENTS; reap() must notice the TASKRUN flag and do that itself.
    let d = tmpdir();
    let p = image(d.path(), "tr.img", 1 << 20);
    for task_run in [TaskRun::Defer, TaskRun::Coop] {
        let cfg = EngineConfig {
            task_run,
            ..Default::default()
        };
        let mut e = Engine::open(&p, &cfg).unwrap();
        for i in 0..8u64 {
            let r = e.alloc(4096).unwrap();
            e.push(
                i,
                Op::Read {
                    offset: i * 4096,
                    region: r,
                },
            )
            .unwrap();
        }
        e.submit().unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.len() < 8 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            e.reap(&mut done);
        }
        assert_eq!(
            done.len(),
            8,
            "{task_run:?}: reap without waiting missed completions"
        );
    }
}

#[test]
fn timeout_op_and_timed_wait() {
    let d = tmpdir();
    let p = image(d.path(), "to.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    // Nothing in flight: a timed wait returns promptly with nothing.
    let mut done = Vec::new();
    assert_eq!(
        e.submit_and_wait_timeout(1, Duration::from_millis(50))
            .unwrap(),
        0
    );
    assert_eq!(e.reap(&mut done), 0);
    // A poll that never fires plus a 100 ms timer: the timed wait gives up after 20 ms,
    // the plain wait wakes on the timer.
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    e.push(
        1,
        Op::PollAdd {
            fd: efd.as_raw_fd(),
        },
    )
    .unwrap();
    e.push(
        2,
        Op::Timeout {
            after: Duration::from_millis(100),
        },
    )
    .unwrap();
    assert_eq!(e.in_flight_io(), 0);
    let t = Instant::now();
    e.submit_and_wait_timeout(1, Duration::from_millis(20))
        .unwrap();
    assert_eq!(e.reap(&mut done), 0);
    assert!(t.elapsed() >= Duration::from_millis(15));
    let c = wait_one(&mut e, &mut done);
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((c.user_data, c.result), (2, -libc::ETIME));
    assert_eq!(e.stats().errors, 0, "a fired timer is not an error");
    assert_eq!(e.stats().completed.timeout, 1);
    assert_eq!(e.in_flight(), 1);
}

#[test]
fn drop_cancels_pending_waits_promptly() {
    let d = tmpdir();
    let p = image(d.path(), "drop.img", 1 << 20);
    let mut e = Engine::open(&p, &EngineConfig::default()).unwrap();
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    e.push(
        1,
        Op::PollAdd {
            fd: efd.as_raw_fd(),
        },
    )
    .unwrap();
    e.push(
        2,
        Op::Timeout {
            after: Duration::from_secs(3600),
        },
    )
    .unwrap();
    let r = e.alloc(65536).unwrap();
    e.push(
        3,
        Op::Write {
            offset: 0,
            region: r,
        },
    )
    .unwrap();
    e.submit().unwrap();
    let t = Instant::now();
    drop(e);
    // Not a speed target: waiting for the hour-long timer or the poll would
    // never end; a loaded machine stays far below this bound.
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn one_thread_sleeps_on_two_engines_via_poll_on_the_ring_fd() {
    // The polled engine must use COOP_TASKRUN: with DEFER_TASKRUN its completions are
    // only posted when its own thread enters the kernel, so its fd never polls ready.
    let d = tmpdir();
    let pa = image(d.path(), "a.img", 1 << 20);
    let pb = image(d.path(), "b.img", 1 << 20);
    let mut a = Engine::open(&pa, &EngineConfig::default()).unwrap();
    let coop = EngineConfig {
        task_run: TaskRun::Coop,
        ..Default::default()
    };
    let mut b = Engine::open(&pb, &coop).unwrap();
    a.push(7, Op::PollAdd { fd: b.as_raw_fd() }).unwrap();
    a.submit().unwrap();
    let mut done = Vec::new();
    assert_eq!(a.reap(&mut done), 0);
    let r = b.alloc(4096).unwrap();
    b.push(
        1,
        Op::Write {
            offset: 0,
            region: r,
        },
    )
    .unwrap();
    b.submit().unwrap();
    // Sleep on engine a only; b's completion must wake it (bounded, so a regression
    // fails instead of hanging).
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.is_empty() && Instant::now() < deadline {
        a.submit_and_wait_timeout(1, Duration::from_millis(500))
            .unwrap();
        a.reap(&mut done);
    }
    let c = done
        .pop()
        .expect("engine a was not woken by engine b's completion");
    assert_eq!(c.user_data, 7);
    assert!(c.result & libc::POLLIN as i32 != 0, "{}", c.result);
    let mut bdone = Vec::new();
    let c = wait_one(&mut b, &mut bdone);
    assert_eq!((c.user_data, c.result), (1, 4096));
    b.free(c.region.unwrap());
}
