//! Persistent grants: negotiated only when both ends want them; data served
//! through persistently mapped pages is the same as through grant copy.

mod datapath_support;

use datapath_support::*;
use refblk::backend::{AttachOptions, BackendConfig};
use refblk::frontend::{FrontendOptions, Protocol};

const MIB: u64 = 1 << 20;

fn session(rig: &Rig, domid: u16, frontend_offers: bool, expect: bool, protocol: Protocol) {
    let image = make_image(rig.dir.path(), &format!("p{domid}.img"), 8 * MIB);
    let guest = rig.guest(domid, 16384);
    let vbd = rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
    let opts = FrontendOptions {
        persistent: frontend_offers,
        protocol,
        ring_page_order: 1,
        ..FrontendOptions::default()
    };
    let mut fe = rig.connect(&guest, XVDA, opts);
    let info = fe.info().expect("connected").clone();
    assert_eq!(info.persistent, expect, "{info:?}");
    let (reqs, model) = random_rw(&mut fe, 7 + u64::from(domid), 200, 16, 64, 8 * MIB);
    assert!(reqs >= 200);
    assert!(
        std::fs::read(&image).unwrap() == model,
        "image differs from the model"
    );
    let st = rig.status(domid, XVDA);
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.ts.destroy_domain(domid).unwrap();
}

#[test]
fn persistent_grants_when_both_ends_want_them() {
    let Some(rig) = Rig::with_config(BackendConfig {
        persistent_grants: true,
        // Fewer than one batch of requests uses, so the LRU evicts and maps again.
        max_persistent_grants: 8,
        ..BackendConfig::default()
    }) else {
        return;
    };
    session(&rig, 11, true, true, Protocol::X86_64);
    session(&rig, 12, true, true, Protocol::X86_32);
    session(&rig, 13, false, false, Protocol::X86_64);
    rig.shutdown();
}

#[test]
fn no_persistent_grants_unless_the_backend_allows_them() {
    let Some(rig) = Rig::new() else {
        return;
    };
    session(&rig, 14, true, false, Protocol::X86_64);
    rig.shutdown();
}
