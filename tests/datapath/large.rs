//! Large requests at depth (issue 15): a well-behaved guest never gets an
//! error because the backend's buffers are momentarily full. The worker's
//! buffer slab is shared by every queue and device it serves; a request that
//! does not fit now waits for buffers to be freed (backpressure) instead of
//! being answered BLKIF_RSP_ERROR.

use crate::kit::*;
use refblk_core::backend::{AttachOptions, BackendConfig};
use refblk_core::engine::EngineConfig;
use refblk_sim::frontend::{FrontendOptions, IoRequest};

/// 256 indirect segments of whole pages: the largest request (1 MiB).
const MIB: usize = 1 << 20;

fn two_queue_opts() -> FrontendOptions {
    FrontendOptions {
        queues: 2,
        // 128 slots per ring: depth 64 per queue fits with room to spare.
        ring_page_order: 2,
        max_indirect_segments: 256,
        ..FrontendOptions::default()
    }
}

/// One worker (a 1-vCPU dom0) whose slab holds exactly one largest request.
/// Two 1 MiB writes on the two queues of one device, published together:
/// the second finds the slab full while its own queue has nothing in flight.
/// Before the fix it was answered ERROR ("exceeds the buffer slab").
#[test]
fn a_request_that_does_not_fit_now_waits_for_buffers() {
    let Some(rig) = Rig::with_config(BackendConfig {
        workers: 1,
        max_queues: 2,
        engine: EngineConfig {
            queue_depth: 512,
            slab_bytes: MIB,
            ..EngineConfig::default()
        },
        ..BackendConfig::default()
    }) else {
        return;
    };
    let image = make_image(rig.dir.path(), "large.img", 16 << 20);
    let guest = rig.guest(31, 8192);
    let vbd = rig.attach(31, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, two_queue_opts());
    let info = fe.info().unwrap().clone();
    assert_eq!(info.queues, 2, "{info:?}");
    assert_eq!(info.segments_per_request, 256, "{info:?}");

    let mut rng = Rng::new(15);
    let mut datas = Vec::new();
    for _ in 0..4 {
        let mut d = vec![0u8; MIB];
        rng.fill(&mut d);
        datas.push(d);
    }
    fe.plug();
    let mut tags = Vec::new();
    for (k, d) in datas.iter().enumerate() {
        let sector = (k * MIB / 512) as u64;
        let t = fe
            .submit(Some(k % 2), IoRequest::Write { sector, data: d })
            .expect("submit");
        tags.push(t);
    }
    fe.unplug().expect("unplug");
    for t in tags {
        let c = fe.wait_for(t, LONG).expect("completion");
        assert_eq!(c.status, 0, "a 1 MiB write was failed: {c:?}");
        assert_eq!(c.ring_requests, 1, "one ring request per MiB");
    }
    for (k, d) in datas.iter().enumerate() {
        let back = fe.read((k * MIB / 512) as u64, MIB).expect("read back");
        assert!(&back == d, "MiB {k} reads back different data");
    }
    let st = rig.status(31, XVDA);
    assert_eq!(st.errors, 0, "{st:?}");
    assert_eq!(st.stats.stalls, 0, "{st:?}");
    // The four were consumed in one batch and the slab holds one: three
    // waited for buffers.
    assert!(st.stats.buffer_waits >= 1, "{:?}", st.stats);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.shutdown();
}

/// The workload on the simulated Xen: three guests at once on one
/// worker (its default 8 MiB slab), each with two queues, 256 indirect
/// segments, random reads and writes of 512 bytes to 1 MiB at depth 64 per
/// queue, every read checked against a model. Zero error responses and no
/// liveness violation.
#[test]
fn mixed_sizes_up_to_1mib_at_depth_64_on_two_queues_of_three_guests() {
    let Some(rig) = Rig::with_config(BackendConfig {
        workers: 1,
        max_queues: 2,
        ..BackendConfig::default()
    }) else {
        return;
    };
    const GUESTS: u16 = 3;
    const DISK: u64 = 64 << 20;
    let mut fes = Vec::new();
    let mut vbds = Vec::new();
    for g in 0..GUESTS {
        let domid = 40 + g;
        let image = make_image(rig.dir.path(), &format!("g{g}.img"), DISK);
        let guest = rig.guest(domid, 65536);
        vbds.push(rig.attach(domid, XVDA, &image, "w", AttachOptions::default()));
        let fe = rig.connect(&guest, XVDA, two_queue_opts());
        assert_eq!(fe.info().unwrap().queues, 2);
        fes.push((domid, image, fe));
    }
    std::thread::scope(|s| {
        for (domid, image, fe) in fes.iter_mut() {
            let (domid, image) = (*domid, image.clone());
            s.spawn(move || {
                // 128 in flight over two queues: depth 64 on each; 1..=2048
                // sectors per request.
                let (_, model) = random_rw(fe, u64::from(domid), 300, 128, 2048, DISK);
                assert!(std::fs::read(&image).unwrap() == model, "dom{domid}: image");
            });
        }
    });
    let mut waits = 0;
    for (domid, _, fe) in &fes {
        let st = rig.status(*domid, XVDA);
        assert_eq!(st.errors, 0, "dom{domid}: {st:?}");
        assert_eq!(st.stats.stalls, 0, "dom{domid}: {st:?}");
        assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
        waits += st.stats.buffer_waits;
    }
    eprintln!("requests that waited for buffers: {waits}");
    for ((_, _, mut fe), vbd) in fes.into_iter().zip(vbds) {
        fe.disconnect().unwrap();
        assert!(rig.ts.remove_vbd(&vbd).unwrap());
    }
    rig.shutdown();
}
