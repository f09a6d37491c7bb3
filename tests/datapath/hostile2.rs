//! More hostile guests (issue 7): one that floods its ring and never consumes
//! responses, one that reconnects in a tight loop, one that switches
//! `protocol` between connects. A second, well-behaved guest runs a verified
//! workload meanwhile and must not notice.

use std::collections::HashSet;
use std::time::Duration;

use crate::kit::hostile::{back_to_initialising, flood_ring};
use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::wire::{self, Abi};
use refblk_sim::frontend::{FrontendOptions, Protocol};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;

#[test]
fn flooding_guest_that_never_consumes_responses() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let bad_img = make_image(d.path(), "flood.img", DISK);
    // Known content, so the flood's reads can be checked.
    let pattern: Vec<u8> = (0..DISK).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    std::fs::write(&bad_img, &pattern).unwrap();
    let bad_guest = rig.guest(90, 4096);
    rig.attach(90, XVDA, &bad_img, "w", AttachOptions::default());
    let mut bad = rig.connect(&bad_guest, XVDA, FrontendOptions::default());
    let mut good = None;

    let (_, size) = bad.raw_ring_state(0).unwrap();
    let mut grefs = Vec::new();
    let mut want_ids: HashSet<u64> = HashSet::new();
    for round in 0..3u64 {
        // Fill the whole ring with valid one-page reads; never look at the
        // responses while the flood goes on.
        let flood = flood_ring(&mut bad, round);
        grefs.extend(&flood.grefs);
        want_ids.extend(&flood.ids);
        let pushed = flood.reads;
        // The ring is full: the frontend cannot push more until it consumes.
        assert!(bad.raw_push(0, 1 << 62, &bad.raw_slot()).is_err());
        let pvt = flood.req_prod;
        if round == 0 {
            // The good guest runs its whole workload while this ring is
            // full of unconsumed responses.
            good = Some(good_guest(&rig, d.path(), 91, 7, 400));
        }
        // Keep re-setting the producer index and kicking, without consuming,
        // until the good guest is done (at least 200 times).
        let mut kicks = 0;
        while kicks < 200 || good.as_ref().is_some_and(|(_, w)| !w.is_finished()) {
            bad.raw_set_req_prod(0, pvt).unwrap();
            bad.notify(0).unwrap();
            kicks += 1;
            if kicks > 200 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some((img, worker)) = good.take() {
            check_good_guest(&rig, 91, &img, worker);
        }
        std::thread::sleep(Duration::from_millis(50));
        // Now consume: exactly one response per request, no overwrite of
        // unconsumed responses (the frontend counts rsp_prod running more
        // than a ring ahead of rsp_cons as bogus_rsp_prod).
        let r = bad.wait_raw_responses(size as usize, LONG).unwrap();
        assert_eq!(r.len(), size as usize, "round {round}: responses");
        for x in &r {
            assert!(
                want_ids.remove(&x.id),
                "round {round}: unexpected id {:#x}",
                x.id
            );
            assert_eq!(x.status, wire::RSP_OKAY, "round {round}: id {:#x}", x.id);
            assert_eq!(x.operation, wire::OP_READ);
        }
        assert!(want_ids.is_empty(), "unanswered: {want_ids:?}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            bad.take_raw_responses().is_empty(),
            "round {round}: more responses than requests"
        );
        assert!(bad.anomalies().is_clean(), "{:?}", bad.anomalies());
        for (frame, sector) in pushed {
            let mut got = vec![0u8; 4096];
            bad.guest().read_page(frame, 0, &mut got).unwrap();
            let off = (sector * 512) as usize;
            assert!(
                got == pattern[off..off + 4096],
                "round {round}: read at sector {sector} returned wrong data"
            );
        }
    }
    // The flooding guest's device still serves normal I/O.
    assert_eq!(bad.backend_state().unwrap(), XenbusState::Connected);
    bad.write(0, &[0xab; 4096]).unwrap();
    assert!(bad.read(0, 4096).unwrap() == vec![0xab; 4096]);
    for g in grefs {
        assert!(bad.guest().end_access(g).unwrap(), "grant still mapped");
    }
    bad.disconnect().unwrap();
    drop(bad);
    rig.shutdown();
}

#[test]
fn reconnect_in_a_tight_loop() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let img = make_image(d.path(), "loop.img", DISK);
    let guest = rig.guest(92, 4096);
    rig.attach(92, XVDA, &img, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let (good_img, worker) = good_guest(&rig, d.path(), 93, 11, 400);
    fe.write(8, &[0x77; 4096]).unwrap();
    // At least 30 cycles, and as many as it takes to cover the good guest's
    // whole workload.
    let mut cycles = 0u64;
    for i in 0..=255u8 {
        if i >= 30 && worker.is_finished() {
            break;
        }
        cycles += 1;
        fe.disconnect()
            .unwrap_or_else(|e| panic!("disconnect {i}: {e}"));
        fe.reconnect()
            .unwrap_or_else(|e| panic!("reconnect {i}: {e}"));
        assert_eq!(fe.backend_state().unwrap(), XenbusState::Connected);
        // Some cycles do I/O, some not.
        if i % 3 == 0 {
            fe.write(16 + 8 * i as u64, &[i; 4096]).unwrap();
        }
    }
    assert!(
        worker.is_finished(),
        "the good guest outlasted {cycles} reconnects"
    );
    check_good_guest(&rig, 93, &good_img, worker);
    // The looping guest works afterwards and kept everything it wrote.
    assert!(fe.read(8, 4096).unwrap() == vec![0x77; 4096]);
    for i in (0..cycles as u8).filter(|i| i % 3 == 0) {
        assert!(
            fe.read(16 + 8 * i as u64, 4096).unwrap() == vec![i; 4096],
            "write of cycle {i} lost"
        );
    }
    fe.write(1000, &[0x31; 8192]).unwrap();
    assert!(fe.read(1000, 8192).unwrap() == vec![0x31; 8192]);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn protocol_switch_between_connects() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let img = make_image(d.path(), "abi.img", DISK);
    let guest = rig.guest(94, 4096);
    rig.attach(94, XVDA, &img, "w", AttachOptions::default());
    let opts = |protocol| FrontendOptions {
        protocol,
        ..Default::default()
    };
    let a: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 3) as u8).collect();
    let b: Vec<u8> = (0..16384u32).map(|i| (i * 13 + 1) as u8).collect();

    let mut fe = rig.connect(&guest, XVDA, opts(Protocol::X86_64));
    assert_eq!(fe.info().unwrap().abi, Abi::X86_64);
    fe.write(100, &a).unwrap();
    fe.disconnect().unwrap();
    back_to_initialising(&fe);
    drop(fe);

    let mut fe = rig.connect(&guest, XVDA, opts(Protocol::X86_32));
    assert_eq!(fe.info().unwrap().abi, Abi::X86_32);
    assert!(
        fe.read(100, a.len()).unwrap() == a,
        "data written under x86_64-abi reads back wrong under x86_32-abi"
    );
    fe.write(4000, &b).unwrap();
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    back_to_initialising(&fe);
    drop(fe);

    // And back.
    let mut fe = rig.connect(&guest, XVDA, opts(Protocol::X86_64));
    assert!(fe.read(100, a.len()).unwrap() == a);
    assert!(
        fe.read(4000, b.len()).unwrap() == b,
        "data written under x86_32-abi reads back wrong under x86_64-abi"
    );
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    let disk = std::fs::read(&img).unwrap();
    assert!(disk[100 * 512..100 * 512 + a.len()] == a[..]);
    assert!(disk[4000 * 512..4000 * 512 + b.len()] == b[..]);
    rig.shutdown();
}
