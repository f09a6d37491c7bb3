//! 200 attach/detach cycles against one backend: guest-initiated closes,
//! toolstack-initiated detaches of a connected device, reconnects. The
//! process's file descriptors, threads and memory mappings (of guest memory,
//! grant tables, io_uring rings) must come back to what they were. Counts
//! process-wide resources: in the leaks binary, alone (`leak::exclusive`).

use std::time::Duration;

use crate::kit::leak::{exclusive, mappings, settle};
use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{FrontendOptions, Protocol};
use xen_sys::xenbus::XenbusState;

/// Connection threads (xenstored, broker) end asynchronously: a leak per
/// cycle never settles, a closing connection does.
const SETTLE: Duration = Duration::from_secs(30);

fn cycle(rig: &Rig, image: &std::path::Path, i: u32) {
    let domid = 100 + (i % 7) as u16;
    let guest = rig.guest(domid, 256);
    let vbd = rig.attach(domid, XVDA, image, "w", AttachOptions::default());
    let opts = FrontendOptions {
        protocol: if i.is_multiple_of(2) {
            Protocol::X86_64
        } else {
            Protocol::X86_32
        },
        ring_page_order: i % 3,
        queues: 1 + i % 2,
        ..Default::default()
    };
    let mut fe = rig.connect(&guest, XVDA, opts);
    let data = vec![(i % 251) as u8; 8192];
    fe.write(8 * u64::from(i % 64), &data).unwrap();
    assert!(fe.read(8 * u64::from(i % 64), 8192).unwrap() == data);
    if i % 5 == 1 {
        // The guest closes and comes back (blkfront resume).
        fe.disconnect().unwrap();
        fe.reconnect().unwrap();
        assert!(fe.read(8 * u64::from(i % 64), 8192).unwrap() == data);
    }
    if i % 4 == 3 {
        // The toolstack detaches a connected device: the frontend follows
        // the backend's Closing, as blkfront does.
        let t = std::thread::spawn(move || {
            fe.wait_backend_state(|s| s != XenbusState::Connected, LONG)
                .unwrap();
            fe.disconnect().unwrap();
            fe
        });
        assert!(
            rig.ts.remove_vbd(&vbd).unwrap(),
            "cycle {i}: backend did not close"
        );
        drop(t.join().unwrap());
    } else {
        fe.disconnect().unwrap();
        assert_eq!(fe.backend_state().unwrap(), XenbusState::Closed);
        assert!(
            rig.ts.remove_vbd(&vbd).unwrap(),
            "cycle {i}: backend did not close"
        );
        drop(fe);
    }
    drop(guest);
    rig.ts.destroy_domain(domid).unwrap();
}

#[test]
fn attach_detach_200_cycles_stay_flat() {
    let _alone = exclusive();
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "cycles.img", 1 << 20);
    for i in 0..10 {
        cycle(&rig, &image, i);
    }
    // The baseline, once the backend has let go of the warm-up devices (a
    // connection still closing can only raise it).
    assert!(settle(SETTLE, || rig.backend.status().is_empty()));
    let machine = rig.dir.path().to_string_lossy().into_owned();
    let maps = || mappings(&machine) + mappings("io_uring");
    let (fd_base, thread_base, map_base) = (fds(), threads(), maps());
    for i in 10..200 {
        cycle(&rig, &image, i);
    }
    // A leak per cycle shows as 190 or more and never settles.
    assert!(
        settle(SETTLE, || fds() <= fd_base),
        "fds grew from {fd_base} to {} over 190 cycles",
        fds()
    );
    assert!(
        settle(SETTLE, || threads() <= thread_base),
        "threads grew from {thread_base} to {} over 190 cycles",
        threads()
    );
    assert!(
        settle(SETTLE, || maps() <= map_base),
        "mappings of guest memory, grant tables or rings grew from {map_base} to {} over 190 cycles",
        maps()
    );
    assert!(
        rig.backend.status().is_empty(),
        "the backend still knows removed devices"
    );
    rig.shutdown();
}
