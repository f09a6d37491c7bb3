//! The test frontend's response checks can fail: a hand-played backend that
//! leaks bytes into response padding, echoes the wrong operation or answers
//! an id never sent is caught by `Frontend::anomalies`.

use std::sync::Arc;

use crate::kit::*;
use refblk_core::backend::{Backend, BackendConfig};
use refblk_core::platform::Platform;
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Toolstack, VbdSpec};

fn wait_key(xs: &XsClient, path: &str, want: &str) {
    assert!(
        wait_until(LONG, || xs.try_read_string(0, path).unwrap().as_deref()
            == Some(want)),
        "{path} never became {want}"
    );
}

#[test]
fn a_misbehaving_backend_is_caught() {
    let dir = machine_dir();
    let sim = refblk_sim::SimXen::start(dir.path()).unwrap();
    let platform = Arc::new(sim.platform().unwrap());
    // A refblk backend that claims nothing: the device is played by hand.
    let cfg = BackendConfig {
        script_match: "block-none-such".into(),
        ..Default::default()
    };
    let (handle, join) = Backend::spawn(platform.clone(), cfg).unwrap();
    let xs = XsClient::connect_unix(&sim.xenstored_path()).unwrap();
    let ts = Toolstack::new(
        XsClient::connect_unix(&sim.xenstored_path()).unwrap(),
        handle.clone(),
    );
    ts.create_domain(9).unwrap();
    let guest = Arc::new(sim.create_guest(9, 512).unwrap());
    let mut spec = VbdSpec::new(9, XVDA, "/nonexistent");
    spec.script = "block-fake".into();
    let vbd = ts.create_vbd_nodes(&spec).unwrap();
    let be = vbd.backend_path.clone();
    let fe = vbd.frontend_path.clone();
    xs.write(0, &format!("{be}/state"), b"2").unwrap();
    let sock = sim.xenstored_path();
    let g = guest.clone();
    let t = std::thread::spawn(move || {
        Frontend::connect(
            &sock,
            g,
            XVDA,
            FrontendOptions {
                indirect: false,
                ..Default::default()
            },
        )
    });
    wait_key(&xs, &format!("{fe}/state"), "3");
    let gref: u32 = xs
        .read_string(0, &format!("{fe}/ring-ref"))
        .unwrap()
        .parse()
        .unwrap();
    let port: u32 = xs
        .read_string(0, &format!("{fe}/event-channel"))
        .unwrap()
        .parse()
        .unwrap();
    let ring = platform.map_grant_refs(9, &[gref], true).unwrap();
    let ev = platform.bind_interdomain(9, port).unwrap();
    for (k, v) in [
        ("sectors", "2048"),
        ("sector-size", "512"),
        ("info", "0"),
        ("state", "4"),
    ] {
        xs.write(0, &format!("{be}/{k}"), v.as_bytes()).unwrap();
    }
    let mut front = t
        .join()
        .unwrap()
        .expect("connect to the hand-played backend");

    // Answer request `n` (ring index n) with `id`, `op`, `status`, and
    // `pad` in padding byte 9.
    let respond = |n: u32, id: u64, op: u8, pad: u8| {
        let slot = 64 + 112 * n as usize;
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&id.to_le_bytes());
        r[8] = op;
        r[9] = pad;
        ring.copy_in(slot, &r).unwrap();
        ring.copy_in(8, &(n + 1).to_le_bytes()).unwrap();
        ev.notify().unwrap();
    };
    let request_id = |n: u32| {
        let mut id = [0u8; 8];
        ring.copy_out(64 + 112 * n as usize + 8, &mut id).unwrap();
        u64::from_le_bytes(id)
    };

    // 1. Padding that is neither zero nor ours.
    let t1 = front
        .submit(
            None,
            IoRequest::Read {
                sector: 0,
                len: 4096,
            },
        )
        .unwrap();
    assert!(ev.wait_pending(Some(LONG)).unwrap());
    ev.ack().unwrap();
    let mut slot0 = [0u8; 16];
    ring.copy_out(64, &mut slot0).unwrap();
    let pad = !slot0[9]; // differs from what the frontend wrote
    let pad = if pad == 0 { 1 } else { pad };
    respond(0, request_id(0), 0, pad);
    assert_eq!(front.wait_for(t1, LONG).unwrap().status, 0);
    assert_eq!(front.anomalies().padding_not_ours, 1);

    // 2. The wrong operation echoed.
    let t2 = front.submit(None, IoRequest::Flush).unwrap();
    let id = request_id(1);
    respond(1, id, 1, 0);
    front.wait_for(t2, LONG).unwrap();
    assert_eq!(front.anomalies().wrong_operation, 1);

    // 3. An id never sent (the real request stays unanswered).
    let _t3 = front.submit(None, IoRequest::Flush).unwrap();
    respond(2, 0xdead_beef, 3, 0);
    assert!(
        wait_until(LONG, || {
            front.poll();
            front.anomalies().unknown_id != 0
        }),
        "unknown id not noticed"
    );
    assert!(!front.anomalies().is_clean());
    drop(front);
    drop(ev);
    drop(ring);
    handle.stop();
    join.join().unwrap().unwrap();
}
