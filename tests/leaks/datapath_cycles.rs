//! 200 attach/detach cycles against one backend: guest-initiated closes,
//! toolstack-initiated detaches of a connected device, reconnects. The
//! process's file descriptors, threads and resident memory must stay flat.
//! Its own test binary (one test), because it counts process-wide resources.

use std::time::{Duration, Instant};

use crate::kit::*;
use refblk::backend::AttachOptions;
use refblk::frontend::{FrontendOptions, Protocol};
use xen_sys::xenbus::XenbusState;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Connection threads (xenstored, broker) end asynchronously: give them time.
fn settle(fd_base: usize, thread_base: usize) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (f, t) = (fds(), threads());
        if (f <= fd_base && t <= thread_base) || Instant::now() > deadline {
            return (f, t);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "cycles.img", 1 << 20);
    for i in 0..10 {
        cycle(&rig, &image, i);
    }
    let (fd_base, thread_base) = settle(0, 0);
    let rss_base = rss_kib();
    for i in 10..200 {
        cycle(&rig, &image, i);
    }
    // A leak per cycle shows as 190 or more; a few descriptors of connections
    // the simulator is still closing on a loaded machine do not.
    const SLACK: usize = 4;
    let (f, t) = settle(fd_base + SLACK, thread_base + SLACK);
    let rss = rss_kib();
    assert!(
        f <= fd_base + SLACK,
        "fds grew from {fd_base} to {f} over 190 cycles"
    );
    assert!(
        t <= thread_base + SLACK,
        "threads grew from {thread_base} to {t} over 190 cycles"
    );
    assert!(
        rss < rss_base + 16 * 1024,
        "RSS grew from {rss_base} KiB to {rss} KiB over 190 cycles"
    );
    assert!(
        rig.backend.status().is_empty(),
        "the backend still knows removed devices"
    );
    rig.shutdown();
}
