//! A guest that unmaps its ring while connected (issue 7).
//!
//! On Xen a guest cannot take back a page the backend has mapped:
//! `gnttab_end_foreign_access_ref` fails while the grant is in use and Linux
//! then leaks the page until the backend lets go; the backend's mapping stays
//! valid whatever the guest does next. What a hostile guest *can* do is
//! ignore that: clear the grant entry anyway, and free the page for other
//! use (zeroed by its allocator, or filled with other data while the backend
//! still reads it as a ring), or balloon it out (it never sees the page
//! again). The simulated Xen models exactly this: `end_access` of a mapped
//! grant is refused, the backend's mapping of the guest page survives a
//! cleared entry, and the guest can write the page at any time.
//!
//! Each test: the hostile guest's own device gets errors or is
//! disconnected, the daemon lives on, the backend releases the ring mapping
//! when the device closes (the guest gets its pages back), and a second
//! guest's verified workload running meanwhile is unaffected.
//! The last test does it across a `kill -9` and restart of `refblk serve`.
//! (Data pages revoked mid-request: `datapath_hostile::every_validation_rule_both_abis`.)

use std::time::{Duration, Instant};

use crate::kit::hostile::{abandon_ring, scribble, wait_disconnected, RingReuse};
use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;

/// A hostile guest `domid` with a connected device (`order`: ring page order).
fn hostile(rig: &Rig, dir: &std::path::Path, domid: u16, order: u32) -> Frontend {
    let img = make_image(dir, &format!("bad{domid}.img"), DISK);
    let guest = rig.guest(domid, 4096);
    rig.attach(domid, XVDA, &img, "w", AttachOptions::default());
    rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            ring_page_order: order,
            ..Default::default()
        },
    )
}

/// Some writes in flight (not waited for), so that the backend is busy with
/// the ring when it goes away.
fn writes_in_flight(fe: &mut Frontend, n: u64) {
    let data = vec![0x6bu8; 32 * 1024];
    for i in 0..n {
        fe.submit(
            None,
            IoRequest::Write {
                sector: 64 * i,
                data: &data,
            },
        )
        .unwrap();
    }
}

/// After the backend threw the device out: the guest closes; the backend
/// must have unmapped the ring (its `end_access` now succeeds: the
/// frontend's teardown counts a refusal as `grants_left_mapped`), and it can
/// connect again and do verified I/O.
fn close_reconnect_and_check(rig: &Rig, fe: &mut Frontend, domid: u16) {
    fe.disconnect().expect("close after the backend gave up");
    assert_eq!(
        fe.anomalies().grants_left_mapped,
        0,
        "the backend still maps the hostile guest's ring after closing the device"
    );
    assert_eq!(rig.status(domid, XVDA).state, XenbusState::Closed);
    fe.reconnect()
        .expect("reconnect after the ring was abandoned");
    let d: Vec<u8> = (0..16384u32)
        .map(|i| (i * 11 + domid as u32) as u8)
        .collect();
    fe.write(256, &d).unwrap();
    assert!(fe.read(256, d.len()).unwrap() == d);
    fe.disconnect().unwrap();
    assert_eq!(fe.anomalies().grants_left_mapped, 0);
}

#[test]
fn ring_freed_and_reused_while_connected() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let (good_img, worker) = good_guest(&rig, d.path(), 41, 5, 600);
    // Zeroed by the guest's allocator, and reused for random data; 1- and
    // 4-page rings.
    let cases = [
        (42u16, 0u32, RingReuse::Zeroed),
        (43, 2, RingReuse::Zeroed),
        (44, 0, RingReuse::Garbage(1)),
        (45, 2, RingReuse::Garbage(2)),
    ];
    for (domid, order, reuse) in cases {
        let mut fe = hostile(&rig, d.path(), domid, order);
        fe.write(0, &[domid as u8; 4096]).unwrap();
        writes_in_flight(&mut fe, 24);
        let a = abandon_ring(&fe, 0, reuse);
        assert_eq!(
            a.end_access_refused, a.of,
            "dom{domid}: the guest took back a ring page the backend maps"
        );
        // Keep scribbling (a page reused for data changes all the time)
        // until the backend gives up on the ring.
        let deadline = Instant::now() + LONG;
        let mut seed = 100;
        let state = loop {
            if let RingReuse::Garbage(_) = reuse {
                seed += 1;
                scribble(fe.guest(), a.pages.0, a.pages.1, seed);
                fe.notify(0).unwrap();
            }
            match wait_disconnected(&fe, Duration::from_millis(20)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("dom{domid} {reuse:?}: the backend kept the ring: {e}")
                }
                Err(_) => {}
            }
        };
        eprintln!("dom{domid} {reuse:?} order {order}: backend {state:?}");
        close_reconnect_and_check(&rig, &mut fe, domid);
    }
    check_good_guest(&rig, 41, &good_img, worker);
    // The daemon is fine: a new guest connects and works.
    let mut fe = hostile(&rig, d.path(), 46, 1);
    fe.write(8, &[1u8; 8192]).unwrap();
    assert!(fe.read(8, 8192).unwrap() == vec![1u8; 8192]);
    fe.disconnect().unwrap();
    rig.shutdown();
}

#[test]
fn ring_ballooned_out_while_connected() {
    // The guest gives its ring pages away with requests in flight and never
    // looks at them again: the backend answers into a page nobody reads
    // (the device stays Connected: nothing the guest wrote is wrong) until
    // the guest closes; then it must let the pages go.
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let (good_img, worker) = good_guest(&rig, d.path(), 51, 6, 600);
    let mut fe = hostile(&rig, d.path(), 52, 1);
    fe.write(0, &[7u8; 4096]).unwrap();
    let before = rig.status(52, XVDA).requests;
    writes_in_flight(&mut fe, 16);
    let a = abandon_ring(&fe, 0, RingReuse::Frozen);
    assert_eq!(
        a.end_access_refused, a.of,
        "ring page taken back while mapped"
    );
    // The backend answers what was published, into the abandoned page.
    let t = std::time::Instant::now();
    while rig.status(52, XVDA).requests < before + 16 && t.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = rig.status(52, XVDA);
    assert!(st.requests >= before + 16, "{st:?}");
    assert_eq!(st.state, XenbusState::Connected);
    // The guest never consumes; it closes. The backend closes the device
    // and unmaps the ring: the guest's end_access then succeeds.
    fe.disconnect().expect("close with an abandoned ring");
    assert_eq!(
        fe.anomalies().grants_left_mapped,
        0,
        "the backend still maps the ballooned-out ring after the device closed"
    );
    assert_eq!(rig.status(52, XVDA).state, XenbusState::Closed);
    check_good_guest(&rig, 51, &good_img, worker);
    rig.shutdown();
}

#[test]
fn ring_grants_cleared_behind_the_backends_back() {
    // The guest clears its ring grant entries while the backend maps them.
    // As on Xen, an established mapping does not depend on the entry: the
    // device keeps working; when it closes, the backend lets the pages go.
    // (A connection naming a ref that is not granted is refused:
    // `datapath_hostile::hostile_xenstore_values_are_refused`.)
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let (good_img, worker) = good_guest(&rig, d.path(), 61, 8, 600);
    let mut fe = hostile(&rig, d.path(), 62, 2);
    let (_, _, grefs) = fe.raw_ring_pages(0).unwrap();
    assert_eq!(grefs.len(), 4);
    for g in &grefs {
        assert!(
            !fe.guest().end_access(*g).unwrap(),
            "ring grant ended while mapped"
        );
        fe.guest().set_grant_entry_raw(*g, 0, 0, 0).unwrap();
    }
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 3) as u8).collect();
    fe.write(16, &data)
        .expect("I/O on a ring whose grants were cleared");
    assert!(fe.read(16, data.len()).unwrap() == data);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    close_reconnect_and_check(&rig, &mut fe, 62);
    check_good_guest(&rig, 61, &good_img, worker);
    rig.shutdown();
}

#[test]
fn ring_grants_cleared_then_the_daemon_restarts() {
    // The guest clears its ring grant entries while `refblk serve` maps
    // them; the daemon is then killed (-9) and restarted. The new daemon
    // cannot map that ring again: it must not take the device over (and not
    // crash), while it takes over a second guest's device, whose data and
    // I/O go on.
    use crate::kit::serve::{device_status, Daemon};
    use refblk_core::xenstore::XsClient;
    use refblk_sim::frontend::{Toolstack, VbdSpec};
    use refblk_sim::SimXen;
    use std::sync::Arc;
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let sim = SimXen::start(dir.path()).expect("simulated Xen");
    let sock = dir.path().join("refblk.sock");
    let mut daemon = Daemon::spawn(dir.path(), 0, &[]);
    daemon.wait_control(&sock);
    let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("toolstack xenstore");
    let ts = Toolstack::with_control_socket(xs, &sock);
    let opts = FrontendOptions {
        timeout: Duration::from_secs(60),
        ..FrontendOptions::default()
    };
    let mut fes = Vec::new();
    for domid in [71u16, 72] {
        ts.create_domain(domid).unwrap();
        let guest = Arc::new(sim.create_guest(domid, 4096).unwrap());
        let img = make_image(dir.path(), &format!("d{domid}.img"), DISK);
        let spec = VbdSpec::new(domid, XVDA, &img);
        let vbd = ts.add_vbd(&spec).unwrap();
        let fe =
            Frontend::connect(&sim.xenstored_path(), guest, XVDA, opts.clone()).expect("connect");
        fes.push((fe, img, vbd, spec));
    }
    let (mut good, good_img, _, _) = fes.remove(0);
    let (mut bad, _, bad_vbd, bad_spec) = fes.remove(0);
    let a: Vec<u8> = (0..65536u32).map(|i| (i * 5 + 1) as u8).collect();
    good.write(64, &a).unwrap();
    bad.write(64, &a).unwrap();
    let (_, _, grefs) = bad.raw_ring_pages(0).unwrap();
    for g in &grefs {
        assert!(
            !bad.guest().end_access(*g).unwrap(),
            "ring grant ended while the daemon maps it"
        );
        bad.guest().set_grant_entry_raw(*g, 0, 0, 0).unwrap();
    }
    daemon.kill9();
    let mut daemon = Daemon::spawn(dir.path(), 1, &[]);
    daemon.wait_control(&sock);
    // The good guest's device is taken over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while device_status(&sock, 71, XVDA).is_none_or(|s| s["state"] != "Connected") {
        assert!(
            Instant::now() < deadline,
            "dom71 not taken over; log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(good.read(64, a.len()).unwrap() == a);
    let b: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    good.write(1024, &b).unwrap();
    assert!(good.read(1024, b.len()).unwrap() == b);
    // The daemon takes the two devices over independently: wait (at most
    // 30 s) until it has logged what it did with each, not a fixed time.
    let resumed71 = |l: &str| l.contains("resumed after a restart") && l.contains("vbd 71/");
    let refused72 = |l: &str| l.contains("vbd 72/") && l.contains("cannot take the device over");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = daemon.log_text();
        if (log.lines().any(resumed71) && log.lines().any(refused72)) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(log.lines().any(resumed71), "dom71 not resumed; log:\n{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("resumed after a restart") && l.contains("vbd 72/")),
        "the ring with cleared grants was taken over; log:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("vbd 72/") && l.contains("cannot take the device over")),
        "no reason logged for dom72; log:\n{log}"
    );
    // Its device is no longer Connected: the new daemon handles it as a new
    // device (InitWait) that keeps its image (docs/restart.md); the rings the
    // frontend still advertises cannot be mapped, so it is closed. The guest
    // closes; the toolstack re-runs the hotplug `add` (which replaces the
    // image) and the guest connects again.
    let st = bad.backend_state().unwrap();
    assert_ne!(st, XenbusState::Connected);
    assert_ne!(
        device_status(&sock, 72, XVDA).unwrap()["state"],
        "Connected"
    );
    bad.disconnect().expect("the hostile guest closes");
    ts.hotplug_add(&bad_vbd, &bad_spec)
        .expect("the toolstack attaches the image again");
    bad.reconnect()
        .expect("and connects again, with fresh ring grants");
    bad.write(0, &[9u8; 4096]).unwrap();
    assert!(bad.read(64, a.len()).unwrap() == a, "dom72's earlier data");
    bad.disconnect().unwrap();
    // The daemon is alive and closes cleanly.
    good.disconnect().unwrap();
    assert!(std::fs::read(&good_img).unwrap()[1024 * 512..1024 * 512 + b.len()] == b[..]);
    drop(bad);
    assert!(
        daemon.term(),
        "daemon exit after SIGTERM; log:\n{}",
        daemon.log_text()
    );
}
