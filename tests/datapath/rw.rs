//! Random reads and writes through the test frontend and the refblk backend,
//! verified against an in-memory model, over the protocol matrix: both ABIs
//! (and no `protocol` key), ring orders 0..4, one and several queues,
//! indirect requests on and off, many requests in flight. Every response is
//! also checked for bytes the frontend did not write (XSA-216 style leaks),
//! for the echoed operation and for grants left mapped.

use crate::kit::*;
use refblk_core::backend::{AttachOptions, BackendConfig};
use refblk_sim::frontend::{FrontendOptions, Protocol};
use refblk_sim::scratchfs::{FsKind, ScratchFs};

const MIB: u64 = 1 << 20;

fn run_config(
    rig: &Rig,
    domid: u16,
    image_dir: &std::path::Path,
    opts: FrontendOptions,
    seed: u64,
    qd: usize,
    max_sectors: u64,
) {
    let name = format!("d{domid}.img");
    let image = make_image(image_dir, &name, 8 * MIB);
    let guest = rig.guest(domid, 16384);
    let vbd = rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, opts.clone());
    let info = fe.info().expect("connected").clone();
    assert_eq!(info.sectors, 8 * MIB / 512);
    assert_eq!(info.abi, opts.protocol.abi());
    assert_eq!(info.ring_pages, 1 << opts.ring_page_order);
    assert_eq!(info.queues, opts.queues as usize);
    if opts.indirect {
        assert!(
            info.segments_per_request > 11,
            "indirect not negotiated: {info:?}"
        );
    } else {
        assert_eq!(info.segments_per_request, 11);
    }
    let mixed = seed % 2 == 1;
    let (reqs, model) = random_io(&mut fe, seed, 120, qd, max_sectors, 8 * MIB, mixed);
    assert!(reqs >= 120);
    // The image file itself holds what the guest wrote.
    let on_disk = std::fs::read(&image).expect("read image");
    assert!(on_disk == model, "image file differs from the model");
    let st = rig.status(domid, XVDA);
    assert!(
        st.writes > 0 && st.reads > 0 && st.bytes_written > 0,
        "{st:?}"
    );
    assert_eq!(st.queues, opts.queues as usize);
    assert_eq!(st.protocol, Some(opts.protocol.abi().protocol()));
    assert_eq!(st.errors, 0, "backend counted errors: {st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().expect("disconnect");
    assert!(rig.ts.remove_vbd(&vbd).expect("remove vbd"));
    drop(fe);
    rig.ts.destroy_domain(domid).unwrap();
}

#[test]
fn protocol_matrix_on_tmpfs() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let images = machine_dir();
    let mut domid = 10;
    for protocol in [Protocol::X86_64, Protocol::X86_32, Protocol::Absent] {
        for order in 0..=4u32 {
            let queues = if order % 2 == 0 { 1 } else { 3 };
            let indirect = order != 2;
            let opts = FrontendOptions {
                protocol,
                ring_page_order: order,
                queues,
                indirect,
                // Linux's default cap: big requests become several INDIRECT ones.
                max_indirect_segments: if order == 3 { 32 } else { 256 },
                ..Default::default()
            };
            let qd = if order == 0 { 1 } else { 8 << order.min(3) };
            run_config(&rig, domid, images.path(), opts, domid as u64, qd, 1024);
            domid += 1;
        }
    }
    rig.shutdown();
}

#[test]
fn persistent_grants_offered_to_a_backend_without_them() {
    // feature-persistent=1 from us, 0 from refblk: plain grants, still correct.
    let Some(rig) = Rig::new() else {
        return;
    };
    let images = machine_dir();
    let opts = FrontendOptions {
        persistent: true,
        ring_page_order: 1,
        ..Default::default()
    };
    run_config(&rig, 31, images.path(), opts, 31, 16, 512);
    rig.shutdown();
}

#[test]
fn two_disks_of_one_guest() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let a = make_image(d.path(), "a.img", 4 * MIB);
    let b = make_image(d.path(), "b.img", 4 * MIB);
    let guest = rig.guest(32, 8192);
    rig.attach(32, XVDA, &a, "w", AttachOptions::default());
    let mut spec = refblk_sim::frontend::VbdSpec::new(32, XVDA + 16, &b);
    spec.vdev = "xvdb".into();
    rig.ts.add_vbd(&spec).unwrap();
    let mut fa = rig.connect(&guest, XVDA, FrontendOptions::default());
    let mut fb = rig.connect(&guest, XVDA + 16, FrontendOptions::default());
    let t = std::thread::spawn(move || {
        let (_, m) = random_rw(&mut fb, 2, 100, 8, 128, 4 * MIB);
        (fb, m)
    });
    let (_, ma) = random_rw(&mut fa, 1, 100, 8, 128, 4 * MIB);
    let (mut fb, mb) = t.join().unwrap();
    fa.disconnect().unwrap();
    fb.disconnect().unwrap();
    assert!(std::fs::read(&a).unwrap() == ma, "xvda image differs");
    assert!(std::fs::read(&b).unwrap() == mb, "xvdb image differs");
    drop((fa, fb));
    rig.shutdown();
}

#[test]
fn online_resize_is_announced() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "grow.img", 2 * MIB);
    let guest = rig.guest(33, 1024);
    rig.attach(33, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let end = 2 * MIB / 512;
    let t = fe
        .submit(
            None,
            refblk_sim::frontend::IoRequest::Write {
                sector: end,
                data: &[1u8; 4096],
            },
        )
        .unwrap();
    assert_eq!(
        fe.wait_for(t, LONG).unwrap().status,
        refblk_sim::frontend::wire::RSP_ERROR
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let changed = rig.backend.resize().unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].1, 4 * MIB / 512);
    assert_eq!(fe.refresh_size().unwrap(), Some(4 * MIB / 512));
    // The new space is usable at once.
    fe.write(end, &[2u8; 4096]).unwrap();
    assert!(fe.read(end, 4096).unwrap() == vec![2u8; 4096]);
    assert_eq!(
        fe.backend_state().unwrap(),
        xen_sys::xenbus::XenbusState::Connected
    );
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn small_random_io_deep_queue() {
    // Many small requests in flight: more than a one-page ring holds.
    let Some(rig) = Rig::new() else {
        return;
    };
    let images = machine_dir();
    let opts = FrontendOptions {
        ring_page_order: 0,
        queues: 2,
        ..Default::default()
    };
    run_config(&rig, 30, images.path(), opts, 77, 96, 16);
    rig.shutdown();
}

#[test]
fn one_polling_worker_serves_several_queues() {
    // All queues on one worker that busy-polls before sleeping: verified I/O
    // through the polling path, and queues sharing one engine and slab.
    let Some(rig) = Rig::with_config(BackendConfig {
        workers: 1,
        poll_us: 200,
        ..BackendConfig::default()
    }) else {
        return;
    };
    let images = machine_dir();
    for (domid, qd) in [(31, 1), (32, 16)] {
        let opts = FrontendOptions {
            queues: 2,
            ..Default::default()
        };
        run_config(
            &rig,
            domid,
            images.path(),
            opts,
            90 + u64::from(domid),
            qd,
            64,
        );
    }
    rig.shutdown();
}

fn on_fs(kind: FsKind) {
    let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size()) else {
        return;
    };
    let Some(rig) = Rig::new() else {
        return;
    };
    let opts = FrontendOptions {
        ring_page_order: 2,
        queues: 2,
        ..Default::default()
    };
    run_config(&rig, 40, fs.path(), opts, 5, 32, 2048);
    let opts = FrontendOptions {
        protocol: Protocol::X86_32,
        indirect: false,
        ..Default::default()
    };
    run_config(&rig, 41, fs.path(), opts, 6, 16, 64);
    rig.shutdown();
}

#[test]
fn random_io_on_btrfs() {
    on_fs(FsKind::Btrfs);
}

#[test]
fn random_io_on_xfs() {
    on_fs(FsKind::Xfs);
}

#[test]
fn frontend_initialised_before_the_hotplug_step() {
    // The guest may reach Initialised before the hotplug script has given
    // the backend its image; the backend connects once it has both.
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "late.img", 2 * MIB);
    let guest = rig.guest(34, 1024);
    let spec = refblk_sim::frontend::VbdSpec::new(34, XVDA, &image);
    let vbd = rig.ts.create_vbd_nodes(&spec).unwrap();
    let sock = rig.sim.xenstored_path();
    let g = guest.clone();
    let t = std::thread::spawn(move || {
        refblk_sim::frontend::Frontend::connect(&sock, g, XVDA, FrontendOptions::default())
    });
    // Wait until the frontend published its rings and is Initialised.
    let fe_state = format!("{}/state", vbd.frontend_path);
    assert!(
        wait_until(LONG, || rig.ts.xs().read_string(0, &fe_state).unwrap()
            == "3"),
        "frontend never Initialised"
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        rig.ts.backend_state(&vbd).unwrap(),
        xen_sys::xenbus::XenbusState::InitWait
    );
    rig.ts.hotplug_add(&vbd, &spec).unwrap();
    let mut fe = t.join().unwrap().expect("connect after the hotplug step");
    fe.write(0, &[6u8; 4096]).unwrap();
    assert!(fe.read(0, 4096).unwrap() == vec![6u8; 4096]);
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.shutdown();
}

#[test]
fn in_place_requests_move_guest_pages_without_copies() {
    // The bench's load requests: the data stays in guest memory, as an O_DIRECT
    // application's does in a real guest.
    use refblk_sim::frontend::IoRequest;
    use std::time::Duration;
    let Some(rig) = Rig::new() else {
        return;
    };
    let images = machine_dir();
    let image = make_image(images.path(), "inplace.img", 4 * MIB);
    let guest = rig.guest(32, 2048);
    let vbd = rig.attach(32, XVDA, &image, "w", AttachOptions::default());
    // Without indirect requests no descriptor page is recycled as a data page.
    let opts = FrontendOptions {
        indirect: false,
        ..Default::default()
    };
    let mut fe = rig.connect(&guest, XVDA, opts);
    // 16 pages of distinct data at sector 0 (page i is all i + 1).
    let data: Vec<u8> = (0..16u8).flat_map(|i| [i + 1; 4096]).collect();
    fe.write(0, &data).unwrap();
    // Read it in place: it lands in guest pages, and no copy comes back.
    let r = fe
        .submit(
            None,
            IoRequest::ReadInPlace {
                sector: 0,
                len: 64 << 10,
            },
        )
        .unwrap();
    let c = fe.wait_for(r, Duration::from_secs(30)).unwrap();
    assert_eq!(c.status, 0, "{c:?}");
    assert!(c.data.is_empty(), "an in-place read hands back no copy");
    // Write 64 KiB in place at sector 1024: the frontend's recycled data pages
    // go to disk as they are, so every block written is a page the guest held:
    // one of the pages read above, or a page it never used (zeros).
    let w = fe
        .submit(
            None,
            IoRequest::WriteInPlace {
                sector: 1024,
                len: 64 << 10,
            },
        )
        .unwrap();
    let c = fe.wait_for(w, Duration::from_secs(30)).unwrap();
    assert_eq!(c.status, 0, "{c:?}");
    let on_disk = std::fs::read(&image).unwrap();
    let written = &on_disk[512 << 10..(512 << 10) + (64 << 10)];
    let mut from_reads = 0;
    for block in written.chunks(4096) {
        let b = block[0];
        assert!(
            block.iter().all(|&x| x == b) && b <= 16,
            "a block written in place is not a guest page's content"
        );
        from_reads += usize::from(b != 0);
    }
    assert!(
        from_reads > 0,
        "no page of the in-place read was written back"
    );
    assert!(
        on_disk[(576 << 10)..].iter().all(|&b| b == 0),
        "beyond the write"
    );
    let st = rig.status(32, XVDA);
    // 64 KiB is two ring requests without indirect (11 + 5 segments).
    assert_eq!((st.reads, st.bytes_read), (2, 64 << 10), "{st:?}");
    assert_eq!((st.writes, st.bytes_written), (4, 128 << 10), "{st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().expect("disconnect");
    assert!(rig.ts.remove_vbd(&vbd).expect("remove vbd"));
    rig.shutdown();
}
