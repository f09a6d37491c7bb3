//! Connecting and dropping clients many times leaks no file descriptors or
//! threads, on the client side or in the simulated xenstored (both live in
//! this process; in the leaks binary, alone (`leak::exclusive`), so that
//! nothing else runs alongside and disturbs the counts).

use std::time::Duration;

use crate::kit::leak::{exclusive, fds, settle, threads};
use refblk_core::xenstore::XBT_NULL;
use refblk_sim::xenstored::Xenstored;

/// Connections close and their threads exit asynchronously; a leak never
/// settles.
const SETTLE: Duration = Duration::from_secs(30);

#[test]
fn connect_drop_cycles_leak_nothing() {
    let _alone = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let xs = Xenstored::spawn(&dir.path().join("xs.sock")).unwrap();
    let warm = xs.client().unwrap();
    warm.write(XBT_NULL, "/k", b"v").unwrap();
    assert!(settle(SETTLE, || xs.connection_count() == 1));
    let (fd_base, thread_base) = (fds(), threads());
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
    assert!(settle(SETTLE, || xs.connection_count() == 1));
    // Connection threads exit right after they unregister.
    assert!(
        settle(SETTLE, || fds() <= fd_base),
        "file descriptors leaked: {fd_base} before, {} after",
        fds()
    );
    assert!(
        settle(SETTLE, || threads() <= thread_base),
        "threads leaked: {thread_base} before, {} after",
        threads()
    );
    assert_eq!(warm.read_string(XBT_NULL, "/k").unwrap(), "199");
}
