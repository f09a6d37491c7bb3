//! Connecting and dropping clients many times leaks no file descriptors or
//! threads, on the client side or in the simulated xenstored (both live in
//! this process; this file holds a single test so nothing else runs
//! alongside and disturbs the counts).

use std::time::{Duration, Instant};

use refblk::platform::sim::xenstored::Xenstored;
use refblk::xenstore::XBT_NULL;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .count()
}

#[test]
fn connect_drop_cycles_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let xs = Xenstored::spawn(&dir.path().join("xs.sock")).unwrap();
    let warm = xs.client().unwrap();
    warm.write(XBT_NULL, "/k", b"v").unwrap();
    let settle = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while xs.connection_count() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(xs.connection_count(), want);
        // Connection threads exit right after they unregister.
        std::thread::sleep(Duration::from_millis(100));
    };
    settle(1);
    let fds = count("/proc/self/fd");
    let threads = count("/proc/self/task");
    for i in 0..200u32 {
        let c = xs.client().unwrap();
        c.watch("/k", "t").unwrap();
        c.transaction(|tx| c.write(tx, "/k", i.to_string().as_bytes()))
            .unwrap();
        if i.is_multiple_of(2) {
            // Leave a transaction open: the daemon must clean it up too.
            c.transaction_start().unwrap();
        }
        drop(c);
    }
    settle(1);
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    assert_eq!(warm.read_string(XBT_NULL, "/k").unwrap(), "199");
}
