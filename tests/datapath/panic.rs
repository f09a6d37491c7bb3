//! A bug stays in its queue (issue 17, item 5): a panic while one queue is
//! served closes that queue's device and nothing else. The other devices on
//! the same io worker keep being served, and devices attached afterwards are
//! served too. The panic is injected with `backend::testing` (armed only by
//! tests).

use crate::kit::hostile::wait_disconnected;
use crate::kit::*;
use refblk_core::backend::{testing, AttachOptions, BackendConfig};
use refblk_sim::frontend::{FrontendOptions, IoRequest};
use xen_sys::xenbus::XenbusState;

const DISK: u64 = 16 << 20;

#[test]
fn a_panic_in_one_queue_closes_its_device_only() {
    // One worker: every queue below shares the thread that panics.
    let Some(rig) = Rig::with_config(BackendConfig {
        workers: 1,
        ..BackendConfig::default()
    }) else {
        return;
    };
    let (victim, neighbour, later) = (60u16, 61u16, 62u16);
    let mut fes = Vec::new();
    for domid in [victim, neighbour] {
        let image = make_image(rig.dir.path(), &format!("d{domid}.img"), DISK);
        let guest = rig.guest(domid, 8192);
        rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
        fes.push(rig.connect(&guest, XVDA, FrontendOptions::default()));
    }
    let mut nb = fes.pop().unwrap();
    let mut vi = fes.pop().unwrap();
    // Both are served before.
    random_rw(&mut vi, 1, 50, 8, 64, DISK);
    random_rw(&mut nb, 2, 50, 8, 64, DISK);

    std::thread::scope(|s| {
        // The neighbour works all the while.
        let worker = s.spawn(|| random_rw(&mut nb, 3, 3000, 16, 64, DISK));
        assert!(
            wait_until(HANG, || rig.status(neighbour, XVDA).requests > 200),
            "the neighbour's I/O did not start"
        );
        testing::panic_on_next_request(&format!("vbd {victim}/"));
        let data = vec![0x5a_u8; 4096];
        let _unanswered = vi
            .submit(
                None,
                IoRequest::Write {
                    sector: 8,
                    data: &data,
                },
            )
            .expect("submit");
        let st = wait_disconnected(&vi, HANG).expect("the panicked queue's device is closed");
        assert!(
            matches!(st, XenbusState::Closing | XenbusState::Closed),
            "{st:?}"
        );
        worker.join().expect("the neighbour's workload");
    });
    // The neighbour goes on after the panic, with no error.
    random_rw(&mut nb, 4, 300, 16, 64, DISK);
    let st = rig.status(neighbour, XVDA);
    assert_eq!(st.state, XenbusState::Connected, "{st:?}");
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(nb.anomalies().is_clean(), "{:?}", nb.anomalies());
    assert_ne!(rig.status(victim, XVDA).state, XenbusState::Connected);

    // The worker still takes new queues: a device attached after the panic
    // is served, with verified data.
    let image = make_image(rig.dir.path(), "later.img", DISK);
    let guest = rig.guest(later, 8192);
    rig.attach(later, XVDA, &image, "w", AttachOptions::default());
    let mut la = rig.connect(&guest, XVDA, FrontendOptions::default());
    let (_, model) = random_rw(&mut la, 5, 300, 16, 64, DISK);
    assert!(std::fs::read(&image).unwrap() == model, "later: image");
    assert_eq!(rig.status(later, XVDA).errors, 0);
    drop((vi, nb, la));
    rig.shutdown();
}
