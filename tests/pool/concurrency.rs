//! Two refblk users of one volume serialize on its flock; concurrent starts: exactly
//! one wins, the others get a clear "already running" error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use crate::common::*;
use refblk_core::pool::{ErrorKind, Pool, StopOutcome, VolumeConfig};
use refblk_sim::scratchfs::FsKind;

#[test]
fn concurrent_starts_and_stops() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let p = pool(fs.path(), "pool", FsKind::Btrfs);
    p.create_volume("appvms/w/private", VolumeConfig::origin(1), MIB)
        .unwrap();
    let dir = p.dir().to_path_buf();
    for round in 0..5 {
        let n = 6;
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let (b, dir) = (barrier.clone(), dir.clone());
                thread::spawn(move || {
                    // each thread opens the pool itself: separate lock file handles,
                    // as separate processes would have
                    let v = Pool::open(&dir)
                        .unwrap()
                        .volume("appvms/w/private")
                        .unwrap();
                    b.wait();
                    v.start()
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ok} starts succeeded");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.kind, ErrorKind::Busy, "{r}");
            assert!(r.msg.contains("already running"), "{r}");
        }
        let v = p.volume("appvms/w/private").unwrap();
        write_at(v.dirty_path(), 0, &[round + 1; 4096]);
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let (b, dir) = (barrier.clone(), dir.clone());
                thread::spawn(move || {
                    let v = Pool::open(&dir)
                        .unwrap()
                        .volume("appvms/w/private")
                        .unwrap();
                    b.wait();
                    v.stop().unwrap()
                })
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            outs.iter()
                .filter(|o| **o == StopOutcome::Committed)
                .count(),
            1,
            "{outs:?}"
        );
        assert_eq!(read(v.clean_path())[0], round + 1);
        let revs = v.revisions().unwrap();
        assert_eq!(revs.len(), 1);
        assert!(temps(&dir).is_empty());
    }
}

#[test]
fn lock_serializes_operations() {
    let Some(fs) = scratch(FsKind::Xfs) else {
        return;
    };
    let p = pool(fs.path(), "pool", FsKind::Xfs);
    let v = p
        .create_volume("appvms/w/private", VolumeConfig::origin(1), MIB)
        .unwrap();
    let held = v.lock().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (d2, dir) = (done.clone(), p.dir().to_path_buf());
    let h = thread::spawn(move || {
        let v = Pool::open(&dir)
            .unwrap()
            .volume("appvms/w/private")
            .unwrap();
        v.start().unwrap();
        d2.store(true, Ordering::SeqCst);
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "start ran while another holder had the lock"
    );
    drop(held);
    h.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert!(v.is_running());
    v.stop().unwrap();
}
