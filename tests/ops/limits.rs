//! Per-VM I/O limits (issue 8): a limit bounds what a guest gets for read
//! IOPS, write IOPS and bytes per second; a live change applies to what comes
//! next and to requests already waiting; 0 means unlimited; an unlimited
//! neighbour is never held back; limited requests are delayed, never failed;
//! bad values get a clear error.
//!
//! No rate is measured (a loaded machine would move it): a token bucket of
//! `cap` operations refilled at `rate` can have admitted at most
//! `cap + rate × t` operations `t` seconds after it was set, so every
//! completion time is checked against that bound (`Load::assert_token_bound`,
//! which a slow machine only satisfies more easily, and which a limiter that
//! lets requests through fails at once). That the limiter holds a request
//! back, and that a live change releases it, is checked with a one-byte-per-
//! second limit whose debt outlasts any test (`hold_back_then_release`).
//! The timing of the limits (within 10 % of the rate, a change in effect
//! within a second) is measured by `refblk bench` and the unit tests of
//! `backend::limits` on injected time.

use std::time::Instant;

use crate::kit::*;
use crate::load::*;
use refblk_core::backend::control::handle_line;
use refblk_core::backend::AttachOptions;
use refblk_core::limits::Limits;
use refblk_sim::frontend::FrontendOptions;

const MIB: u64 = 1 << 20;

#[test]
fn limits_bound_what_is_admitted_and_delay_without_failing() {
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "lim.img", 16 * MIB);
    let guest = rig.guest(5, 16384);
    let opts = AttachOptions {
        limits: Limits::parse_list("read-iops=300,burst=250ms").unwrap(),
        ..AttachOptions::default()
    };
    // The buckets are made (full) when the device is attached: after this.
    let attached = Instant::now();
    let _vbd = rig.attach(5, XVDA, &image, "w", opts);
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    assert_eq!(rig.status(5, XVDA).limits.read_iops, 300);

    // Read IOPS, set at attach time: 75 tokens (250 ms of 300/s), then
    // 300/s. 225 reads take at least 0.5 s.
    let l = run_ops(&mut fe, false, 4096, 8, 225);
    assert_eq!(l.errors, 0, "a limited request failed");
    l.assert_token_bound("read-iops=300", attached, 75.0, 300.0);

    // Write IOPS, set live on the device (DOMID/VDEV): a bucket that was
    // unlimited starts full, 50 tokens.
    let set = Instant::now();
    rig.backend
        .set_limits("5/xvda", patch("write-iops=200"))
        .expect("set write-iops");
    let l = run_ops(&mut fe, true, 4096, 8, 150);
    assert_eq!(l.errors, 0);
    l.assert_token_bound("write-iops=200", set, 50.0, 200.0);

    // Bytes per second: 2 MiB/s of 32 KiB writes is 64 writes/s, and the
    // bucket holds 512 KiB (16 writes).
    let be = rig.status(5, XVDA).backend_path;
    let set = Instant::now();
    rig.backend
        .set_limits(&be, patch("write-iops=0 write-bps=2M"))
        .expect("set write-bps");
    let l = run_ops(&mut fe, true, 32 << 10, 4, 48);
    assert_eq!(l.errors, 0);
    l.assert_token_bound("write-bps=2M", set, 16.0, 64.0);
    assert_eq!(rig.status(5, XVDA).limits.write_bps, 2 * MIB);

    // The limiter says wait, and a waiting request is delayed, not failed.
    hold_back_then_release(&rig, &mut fe, 5, &be, "write-bps");

    let st = rig.status(5, XVDA);
    assert_eq!(st.errors, 0, "{st:?}");
    assert_eq!(st.stats.errors, 0);
    assert!(st.stats.throttled > 0, "the limiter never said wait");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().expect("disconnect");
    rig.shutdown();
}

#[test]
fn a_live_change_reaches_waiting_requests_and_zero_is_unlimited() {
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "live.img", 16 * MIB);
    let guest = rig.guest(7, 16384);
    // 0 at attach time: unlimited.
    let opts = AttachOptions {
        limits: Limits::parse_list("read-iops=0,write-bps=0").unwrap(),
        ..AttachOptions::default()
    };
    let _vbd = rig.attach(7, XVDA, &image, "w", opts);
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    assert!(rig.status(7, XVDA).limits.is_unlimited());
    let throttled = || rig.status(7, XVDA).stats.throttled;

    // Unlimited: not one request waits.
    let l = run_ops(&mut fe, false, 4096, 8, 300);
    assert_eq!(l.errors, 0);
    assert_eq!(throttled(), 0, "an unlimited device held a request back");

    // A live domain limit of 50 reads/s (default burst 100 ms: 5 tokens)
    // holds from the change on: 60 reads take at least 1.1 s.
    let set = Instant::now();
    rig.backend
        .set_limits("7", patch("read-iops=50"))
        .expect("limit");
    let l = run_ops(&mut fe, false, 4096, 8, 60);
    assert_eq!(l.errors, 0);
    l.assert_token_bound("read-iops=50", set, 5.0, 50.0);

    // Back to 0, then a request held back by a limit is released by the
    // next live change.
    rig.backend
        .set_limits("7", patch("read-iops=0"))
        .expect("unlimit");
    hold_back_then_release(&rig, &mut fe, 7, "7", "read-bps");

    // 0 again is unlimited: nothing waits any more.
    let before = throttled();
    let l = run_ops(&mut fe, false, 4096, 8, 300);
    assert_eq!(l.errors, 0);
    assert_eq!(throttled(), before, "after setting 0 requests still wait");
    assert!(rig.status(7, XVDA).domain_limits.is_unlimited());
    fe.disconnect().expect("disconnect");
    rig.shutdown();
}

#[test]
fn an_unlimited_neighbour_is_never_held_back() {
    let Some(rig) = Rig::new() else { return };
    let xs = rig.ts.xs();
    let img_a = make_image(rig.dir.path(), "a.img", 16 * MIB);
    let img_b = make_image(rig.dir.path(), "b.img", 16 * MIB);
    let ga = rig.guest(11, 16384);
    let gb = rig.guest(12, 16384);
    xs.write(0, "/local/domain/11/name", b"limited").unwrap();
    xs.write(0, "/local/domain/12/name", b"free").unwrap();
    let _va = rig.attach(11, XVDA, &img_a, "w", AttachOptions::default());
    let _vb = rig.attach(12, XVDA, &img_b, "w", AttachOptions::default());
    let mut fa = rig.connect(&ga, XVDA, FrontendOptions::default());
    let mut fb = rig.connect(&gb, XVDA, FrontendOptions::default());

    // A domain limit, by name, on the other guest; both run at once.
    let set = Instant::now();
    let lim = rig
        .backend
        .set_limits("limited", patch("iops=100 burst=250ms"))
        .expect("limit by domain name");
    assert!(lim.describe.contains("limited"), "{lim:?}");
    let ta = std::thread::spawn(move || {
        let l = run_ops(&mut fa, false, 4096, 8, 75);
        assert!(fa.anomalies().is_clean(), "{:?}", fa.anomalies());
        (l, fa)
    });
    let lb = run_ops(&mut fb, false, 4096, 8, 600);
    let (la, mut fa) = ta.join().unwrap();
    assert_eq!((la.errors, lb.errors), (0, 0));
    // 25 tokens, then 100/s: 75 reads take at least 0.5 s.
    la.assert_token_bound("domain iops=100", set, 25.0, 100.0);
    // The neighbour shares no bucket with it: not one of its requests waited
    // (a shared limiter would hold it back like the limited guest).
    let st = rig.status(12, XVDA);
    assert!(st.limits.is_unlimited() && st.domain_limits.is_unlimited());
    assert_eq!(
        st.stats.throttled, 0,
        "the unlimited neighbour was held back"
    );
    assert_eq!(rig.status(11, XVDA).domain_limits.read_iops, 100);
    fa.disconnect().unwrap();
    fb.disconnect().unwrap();
    rig.shutdown();
}

#[test]
fn bad_values_and_targets_get_a_clear_error() {
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "bad.img", 4 * MIB);
    let guest = rig.guest(5, 4096);
    let _vbd = rig.attach(5, XVDA, &image, "w", AttachOptions::default());
    let _fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let be = rig.status(5, XVDA).backend_path;
    let err = |line: &str| {
        let v = handle_line(line, &rig.backend);
        assert_eq!(v["ok"], false, "{line}: {v}");
        v["error"].as_str().unwrap().to_string()
    };
    for (line, want) in [
        (
            "limit 5 read-iops=abc",
            "read-iops: \"abc\" is not a whole number",
        ),
        ("limit 5 read-iops=-5", "read-iops"),
        ("limit 5 write-bps=10Q", "write-bps"),
        ("limit 5 burst=0", "out of range"),
        ("limit 5 speed=3", "unknown limit"),
        ("limit 5 iops", "key=value"),
        ("limit 99 iops=5", "domain 99 does not exist"),
        ("limit nosuchvm iops=5", "no domain of that name"),
        ("limit 5/xvdz iops=5", "serves no device"),
        ("limit 5/sda iops=5", "not a device id or xvd name"),
        ("limit", "usage: limit"),
    ] {
        let e = err(line);
        assert!(e.contains(want), "{line}: {e}");
    }
    let e = err(&format!("attach {be} {} read-iops=lots", image.display()));
    assert!(e.contains("read-iops"), "{e}");
    // Nothing changed on the way.
    assert!(rig.status(5, XVDA).limits.is_unlimited());
    // A good one, and a query without pairs.
    let v = handle_line("limit 5/51712 iops=7 burst=2s", &rig.backend);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["summary"], "read-iops=7 write-iops=7 burst=2000ms");
    let v = handle_line(&format!("limit {be}"), &rig.backend);
    assert_eq!(v["limits"]["read_iops"], 7, "{v}");
    rig.shutdown();
}
