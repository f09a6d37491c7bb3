//! Simulated event channels across processes: the guest (or a second backend)
//! is a separate process; wake-ups must cross, nothing must wake without a
//! notify, ack must clear, and closing or crashing either side must leave the
//! other working.

use std::time::Duration;

use crate::support::{machine_dir, Peer};
use refblk_core::platform::{EventChannel, Platform};
use refblk_sim::{EvtchnBroker, SimGuest, SimPlatform};

const ENTRY: &str = "evtchn::peer_process_entry";
const DOM: u16 = 6;
/// A bound on a hang, not a speed target.
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(100);

/// Entry point of the peer process (see `sim_support`). Run by the harness
/// without the peer environment it has nothing to do.
#[test]
fn peer_process_entry() {
    crate::support::peer_main();
}

fn setup() -> (tempfile::TempDir, EvtchnBroker, Peer, SimPlatform) {
    let dir = machine_dir();
    let broker = EvtchnBroker::spawn(dir.path()).expect("broker");
    let mut g = Peer::spawn(dir.path(), ENTRY);
    g.cmd(&format!("create {DOM} 4"));
    let p = SimPlatform::new(dir.path()).expect("platform");
    (dir, broker, g, p)
}

#[test]
fn wakeups_cross_processes_both_ways() {
    let (_dir, _broker, mut g, p) = setup();
    let port = g.num("evtchn 0");
    let ch = p.bind_interdomain(DOM, port).expect("bind");
    assert!(ch.local_port() > 0);

    // No wake-up without a notify.
    assert!(!ch.wait_pending(Some(SHORT)).unwrap());
    assert!(!ch.ack().unwrap());
    assert_eq!(g.cmd(&format!("wait {port} 100")), "timeout");

    for round in 0..3 {
        // guest -> backend
        g.cmd(&format!("notify {port}"));
        assert!(
            ch.wait_pending(Some(LONG)).unwrap(),
            "round {round}: backend woken"
        );
        assert!(ch.ack().unwrap());
        assert!(!ch.ack().unwrap(), "ack cleared the event");
        assert!(!ch.wait_pending(Some(Duration::ZERO)).unwrap());
        // backend -> guest
        ch.notify().unwrap();
        assert_eq!(
            g.cmd(&format!("wait {port} 10000")),
            "woke",
            "round {round}: guest woken"
        );
        assert_eq!(g.cmd(&format!("ack {port}")), "true");
        assert_eq!(g.cmd(&format!("ack {port}")), "false");
        assert_eq!(g.cmd(&format!("wait {port} 50")), "timeout");
    }
    // Several notifies before an ack are one pending event.
    for _ in 0..5 {
        g.cmd(&format!("notify {port}"));
    }
    assert!(ch.wait_pending(Some(LONG)).unwrap());
    assert!(ch.ack().unwrap());
    assert!(!ch.ack().unwrap());
    // A wait blocked in another thread is woken by the peer's notify.
    let waiter = std::thread::spawn(move || {
        let r = ch.wait_pending(Some(LONG));
        (r.map_err(|e| e.to_string()), ch)
    });
    std::thread::sleep(SHORT);
    g.cmd(&format!("notify {port}"));
    let (r, ch) = waiter.join().unwrap();
    assert_eq!(r, Ok(true));
    assert!(ch.ack().unwrap());
}

#[test]
fn bad_binds_are_errors() {
    let (dir, _broker, mut g, p) = setup();
    let for_us = g.num("evtchn 0");
    let for_other = g.num("evtchn 9");
    assert!(p.bind_interdomain(DOM, 4000).is_err(), "unallocated port");
    assert!(p.bind_interdomain(DOM, 0).is_err(), "port 0");
    assert!(p.bind_interdomain(DOM, u32::MAX).is_err(), "huge port");
    let e = p
        .bind_interdomain(DOM, for_other)
        .err()
        .expect("reserved for domain 9");
    assert!(e.to_string().contains("domain 9"), "{e}");
    assert!(
        p.bind_interdomain(DOM + 1, for_us).is_err(),
        "wrong domain (does not exist)"
    );
    let ch = p.bind_interdomain(DOM, for_us).expect("bind");
    assert!(p.bind_interdomain(DOM, for_us).is_err(), "already bound");
    // A port made by binding is not bindable.
    assert!(p.bind_interdomain(0, ch.local_port()).is_err());
    drop(ch);
    // No broker: a clear error.
    let empty = machine_dir();
    std::fs::create_dir_all(empty.path().join("dom")).unwrap();
    let p2 = SimPlatform::new(empty.path()).unwrap();
    let e = p2.bind_interdomain(DOM, for_us).err().expect("no broker");
    assert!(e.to_string().contains("evtchn.sock"), "{e}");
    drop(dir);
}

#[test]
fn closing_either_side_leaves_the_other_working() {
    let (_dir, _broker, mut g, p) = setup();
    // Guest closes: backend notify/ack keep working (events are dropped).
    let port = g.num("evtchn 0");
    let ch = p.bind_interdomain(DOM, port).expect("bind");
    g.cmd(&format!("close {port}"));
    ch.notify().unwrap();
    assert!(!ch.ack().unwrap());
    assert!(
        p.bind_interdomain(DOM, port).is_err(),
        "closed port is gone"
    );
    drop(ch);

    // Backend closes: the guest's port is unbound again and can be re-bound (a
    // restarted backend); events sent meanwhile are dropped.
    let port = g.num("evtchn 0");
    let ch = p.bind_interdomain(DOM, port).expect("bind");
    drop(ch);
    g.cmd(&format!("notify {port}"));
    let ch = rebind(&p, port);
    assert!(
        !ch.wait_pending(Some(SHORT)).unwrap(),
        "no stale event after rebind"
    );
    g.cmd(&format!("notify {port}"));
    assert!(ch.wait_pending(Some(LONG)).unwrap());
    assert!(ch.ack().unwrap());
    ch.notify().unwrap();
    assert_eq!(g.cmd(&format!("wait {port} 10000")), "woke");

    // Guest domain destroyed: our channel still works locally; new binds fail.
    g.cmd("destroy");
    ch.notify().unwrap();
    assert!(!ch.ack().unwrap());
    assert!(p.bind_interdomain(DOM, port).is_err(), "domain gone");
}

/// The broker closes a port when its connection closes; retry until it has,
/// since the close is processed by the broker's thread (at most 30 s: a
/// bound on a hang, not a speed target).
fn rebind(p: &SimPlatform, port: u32) -> Box<dyn EventChannel> {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match p.bind_interdomain(DOM, port) {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("rebind failed: {last:?}");
}

#[test]
fn crashed_backend_process_frees_the_port_for_a_restart() {
    // This process is the guest; the peer is a backend that binds and is killed.
    let dir = machine_dir();
    let _broker = EvtchnBroker::spawn(dir.path()).expect("broker");
    let guest = SimGuest::create(dir.path(), DOM, 4).expect("guest");
    let ch = guest.alloc_unbound(0).expect("alloc");
    let port = ch.local_port();
    let mut b = Peer::spawn(dir.path(), ENTRY);
    let bport = b.num(&format!("bbind {DOM} {port}"));
    ch.notify().unwrap();
    assert_eq!(b.cmd(&format!("bwait {bport} 10000")), "woke");
    b.cmd(&format!("bnotify {bport}"));
    assert!(ch.wait_pending(Some(LONG)).unwrap());
    assert!(ch.ack().unwrap());
    b.kill();
    // Notifying a dead peer is harmless.
    ch.notify().unwrap();
    // A restarted backend binds the same guest port.
    let p = SimPlatform::new(dir.path()).unwrap();
    let again = rebind(&p, port);
    again.notify().unwrap();
    assert!(ch.wait_pending(Some(LONG)).unwrap());
    assert!(ch.ack().unwrap());
}

#[test]
fn second_broker_on_the_same_dir_is_refused_and_stop_cleans_up() {
    let dir = machine_dir();
    let broker = EvtchnBroker::spawn(dir.path()).expect("broker");
    assert!(EvtchnBroker::spawn(dir.path()).is_err(), "socket in use");
    let guest = SimGuest::create(dir.path(), DOM, 4).expect("guest");
    let ch = guest.alloc_unbound(0).expect("alloc");
    let p = SimPlatform::new(dir.path()).unwrap();
    let bch = p.bind_interdomain(DOM, ch.local_port()).unwrap();
    drop(broker);
    assert!(!dir.path().join("evtchn.sock").exists(), "socket removed");
    // Channels keep working between the parties after the broker is gone.
    ch.notify().unwrap();
    assert!(bch.wait_pending(Some(LONG)).unwrap());
    // A new broker can start on the same directory.
    let _b2 = EvtchnBroker::spawn(dir.path()).expect("restart");
    assert!(guest.alloc_unbound(0).is_ok());
}
