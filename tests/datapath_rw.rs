//! Random reads and writes through the test frontend and the refblk backend,
//! verified against an in-memory model, over the protocol matrix: both ABIs
//! (and no `protocol` key), ring orders 0..4, one and several queues,
//! indirect requests on and off, many requests in flight. Every response is
//! also checked for bytes the frontend did not write (XSA-216 style leaks),
//! for the echoed operation and for grants left mapped.

mod datapath_support;

use datapath_support::*;
use refblk::backend::AttachOptions;
use refblk::frontend::{FrontendOptions, Protocol};
use refblk::util::scratchfs::{FsKind, ScratchFs};

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
    let (reqs, model) = random_rw(&mut fe, seed, 120, qd, max_sectors, 8 * MIB);
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
    let rig = Rig::new();
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
fn small_random_io_deep_queue() {
    // Many small requests in flight: more than a one-page ring holds.
    let rig = Rig::new();
    let images = machine_dir();
    let opts = FrontendOptions {
        ring_page_order: 0,
        queues: 2,
        ..Default::default()
    };
    run_config(&rig, 30, images.path(), opts, 77, 96, 16);
    rig.shutdown();
}

fn on_fs(kind: FsKind) {
    let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size()) else {
        return;
    };
    let rig = Rig::new();
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
