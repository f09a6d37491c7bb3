//! A hostile guest: every validation rule of the backend broken by a request
//! written byte by byte into the ring, bogus producer indices, revoked and
//! foreign grants, hostile xenstore values, and a second guest that must not
//! notice any of it.

use std::path::Path;
use std::time::Duration;

use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::wire::{self, Abi, Seg};
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Protocol, RawResponse, VbdSpec};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;
const SECTORS: u64 = DISK / 512;

struct Raw<'a> {
    fe: &'a mut Frontend,
    next_id: u64,
}

impl Raw<'_> {
    fn abi(&self) -> Abi {
        self.fe.info().unwrap().abi
    }

    /// Push one slot built by `build` (on a slot full of junk), wait for its
    /// response and check the echoed id.
    fn send(&mut self, what: &str, build: impl FnOnce(Abi, &mut [u8], u64)) -> RawResponse {
        let id = self.next_id;
        self.next_id += 1;
        let abi = self.abi();
        let mut slot = vec![0xeeu8; abi.slot_size()];
        build(abi, &mut slot, id);
        self.fe.raw_push(0, id, &slot).unwrap();
        self.fe.raw_publish(0).unwrap();
        let r = self
            .fe
            .wait_raw_responses(1, LONG)
            .unwrap_or_else(|e| panic!("{what}: no response: {e}"));
        assert_eq!(r.len(), 1, "{what}");
        assert_eq!(r[0].id, id, "{what}: id not echoed");
        r[0]
    }

    fn expect(&mut self, what: &str, status: i16, op: u8, build: impl FnOnce(Abi, &mut [u8], u64)) {
        let r = self.send(what, build);
        assert_eq!(r.status, status, "{what}: status");
        assert_eq!(r.operation, op, "{what}: echoed operation");
    }
}

fn rw(abi: Abi, slot: &mut [u8], op: u8, id: u64, sector: u64, segs: &[Seg]) {
    wire::encode_rw(abi, slot, op, segs.len() as u8, 0, id, sector, segs);
}

fn seg(gref: u32, first: u8, last: u8) -> Seg {
    Seg {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

/// An indirect page listing `segs`.
fn indirect_page(segs: &[Seg]) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, s) in segs.iter().enumerate() {
        wire::encode_segment(&mut p[i * 8..i * 8 + 8], *s);
    }
    p
}

/// Break every rule once on `fe` (which must stay usable afterwards).
fn barrage(fe: &mut Frontend, image: &Path) {
    let (_, data_ref) = fe.raw_grant_page(&[0x11; 4096], false).unwrap();
    let (_, ro_ref) = fe.raw_grant_page(&[0x22; 4096], true).unwrap();
    let (foreign_page, _) = fe.raw_grant_page(&[0; 4096], false).unwrap();
    let foreign_ref = fe.guest().grant(foreign_page, 77, false).unwrap();
    let (_, ended_ref) = fe.raw_grant_page(&[0; 4096], false).unwrap();
    assert!(fe.guest().end_access(ended_ref).unwrap());
    let max_ind = fe.info().unwrap().backend_max_indirect_segments as u16;
    let mut r = Raw {
        fe,
        next_id: 1 << 60,
    };
    use wire::*;
    // Unknown operations: EOPNOTSUPP, echoing the op.
    r.expect(
        "reserved op 4",
        RSP_EOPNOTSUPP,
        OP_RESERVED_1,
        |a, s, id| rw(a, s, OP_RESERVED_1, id, 0, &[seg(data_ref, 0, 7)]),
    );
    r.expect("op 0xff", RSP_EOPNOTSUPP, 0xff, |a, s, id| {
        rw(a, s, 0xff, id, 0, &[seg(data_ref, 0, 7)])
    });
    // nr_segments out of range.
    r.expect("read with 0 segments", RSP_ERROR, OP_READ, |a, s, id| {
        rw(a, s, OP_READ, id, 0, &[])
    });
    r.expect("write with 12 segments", RSP_ERROR, OP_WRITE, |a, s, id| {
        rw(a, s, OP_WRITE, id, 0, &[seg(data_ref, 0, 7); 11]);
        s[1] = 12;
    });
    r.expect(
        "write with 255 segments",
        RSP_ERROR,
        OP_WRITE,
        |a, s, id| {
            rw(a, s, OP_WRITE, id, 0, &[seg(data_ref, 0, 7); 11]);
            s[1] = 255;
        },
    );
    // first_sect <= last_sect <= 7.
    r.expect("first_sect > last_sect", RSP_ERROR, OP_READ, |a, s, id| {
        rw(a, s, OP_READ, id, 0, &[seg(data_ref, 3, 2)])
    });
    r.expect("last_sect 8", RSP_ERROR, OP_WRITE, |a, s, id| {
        rw(a, s, OP_WRITE, id, 0, &[seg(data_ref, 0, 8)])
    });
    r.expect("first_sect 200", RSP_ERROR, OP_READ, |a, s, id| {
        rw(a, s, OP_READ, id, 0, &[seg(data_ref, 200, 255)])
    });
    // Range and overflow.
    r.expect("read past the end", RSP_ERROR, OP_READ, |a, s, id| {
        rw(a, s, OP_READ, id, SECTORS - 4, &[seg(data_ref, 0, 7)])
    });
    r.expect("write past the end", RSP_ERROR, OP_WRITE, |a, s, id| {
        rw(a, s, OP_WRITE, id, SECTORS, &[seg(data_ref, 0, 0)])
    });
    r.expect("sector overflow", RSP_ERROR, OP_WRITE, |a, s, id| {
        rw(a, s, OP_WRITE, id, u64::MAX - 2, &[seg(data_ref, 0, 7)])
    });
    r.expect("sector u64::MAX", RSP_ERROR, OP_READ, |a, s, id| {
        rw(a, s, OP_READ, id, u64::MAX, &[seg(data_ref, 0, 0)])
    });
    r.expect(
        "barrier past the end",
        RSP_ERROR,
        OP_WRITE_BARRIER,
        |a, s, id| rw(a, s, OP_WRITE_BARRIER, id, SECTORS, &[seg(data_ref, 0, 7)]),
    );
    r.expect("discard past the end", RSP_ERROR, OP_DISCARD, |a, s, id| {
        encode_discard(a, s, 0, 0, id, SECTORS - 1, 8)
    });
    r.expect("discard overflow", RSP_ERROR, OP_DISCARD, |a, s, id| {
        encode_discard(a, s, 0, 0, id, 8, u64::MAX)
    });
    r.expect("discard huge sector", RSP_ERROR, OP_DISCARD, |a, s, id| {
        encode_discard(a, s, DISCARD_SECURE, 0, id, u64::MAX, 1)
    });
    // Bad grants: never granted, reserved, ended, granted to someone else,
    // read-only for a read the backend must write.
    for (what, gref) in [
        ("never granted ref", 12345u32),
        ("reserved ref 0", 0),
        ("reserved ref 7", 7),
        ("ref past the table", u32::MAX),
        ("ended ref", ended_ref),
        ("ref granted to dom77", foreign_ref),
    ] {
        r.expect(
            &format!("read into {what}"),
            RSP_ERROR,
            OP_READ,
            |a, s, id| rw(a, s, OP_READ, id, 0, &[seg(gref, 0, 7)]),
        );
        r.expect(
            &format!("write from {what}"),
            RSP_ERROR,
            OP_WRITE,
            |a, s, id| {
                rw(
                    a,
                    s,
                    OP_WRITE,
                    id,
                    16,
                    &[seg(data_ref, 0, 7), seg(gref, 0, 7)],
                )
            },
        );
    }
    r.expect(
        "read into a read-only grant",
        RSP_ERROR,
        OP_READ,
        |a, s, id| rw(a, s, OP_READ, id, 0, &[seg(ro_ref, 0, 7)]),
    );
    // A read-only grant is fine as the source of a write.
    r.expect(
        "write from a read-only grant",
        RSP_OKAY,
        OP_WRITE,
        |a, s, id| rw(a, s, OP_WRITE, id, 64, &[seg(ro_ref, 0, 7)]),
    );
    // INDIRECT: nr_segments 0 and over the advertised maximum, a bad inner
    // op, a bad indirect page, a bad segment inside, out of range; and a
    // valid one, which must echo the inner op.
    let ok_segs: Vec<Seg> = (0..20).map(|_| seg(data_ref, 0, 7)).collect();
    let (_, ind_ok) = r.fe.raw_grant_page(&indirect_page(&ok_segs), true).unwrap();
    let mut bad_segs = ok_segs.clone();
    bad_segs[13] = seg(data_ref, 5, 4);
    let (_, ind_bad) =
        r.fe.raw_grant_page(&indirect_page(&bad_segs), true)
            .unwrap();
    let mut bad_ref_segs = ok_segs.clone();
    bad_ref_segs[19] = seg(12345, 0, 7);
    let (_, ind_bad_ref) =
        r.fe.raw_grant_page(&indirect_page(&bad_ref_segs), true)
            .unwrap();
    r.expect(
        "indirect read of 20 segments",
        RSP_OKAY,
        OP_READ,
        |a, s, id| encode_indirect(a, s, OP_READ, 20, 0, id, 0, &[ind_ok]),
    );
    r.expect(
        "indirect write of 20 segments",
        RSP_OKAY,
        OP_WRITE,
        |a, s, id| encode_indirect(a, s, OP_WRITE, 20, 0, id, 128, &[ind_ok]),
    );
    r.expect(
        "indirect with 0 segments",
        RSP_ERROR,
        OP_READ,
        |a, s, id| encode_indirect(a, s, OP_READ, 0, 0, id, 0, &[ind_ok]),
    );
    r.expect(
        "indirect over the maximum",
        RSP_ERROR,
        OP_WRITE,
        |a, s, id| encode_indirect(a, s, OP_WRITE, max_ind + 1, 0, id, 0, &[ind_ok; 8]),
    );
    r.expect(
        "indirect with 65535 segments",
        RSP_ERROR,
        OP_READ,
        |a, s, id| encode_indirect(a, s, OP_READ, u16::MAX, 0, id, 0, &[ind_ok; 8]),
    );
    r.expect(
        "indirect flush",
        RSP_ERROR,
        OP_FLUSH_DISKCACHE,
        |a, s, id| encode_indirect(a, s, OP_FLUSH_DISKCACHE, 20, 0, id, 0, &[ind_ok]),
    );
    r.expect(
        "indirect inner indirect",
        RSP_ERROR,
        OP_INDIRECT,
        |a, s, id| encode_indirect(a, s, OP_INDIRECT, 20, 0, id, 0, &[ind_ok]),
    );
    r.expect(
        "indirect page not granted",
        RSP_ERROR,
        OP_READ,
        |a, s, id| encode_indirect(a, s, OP_READ, 20, 0, id, 0, &[12345]),
    );
    r.expect("indirect bad segment", RSP_ERROR, OP_WRITE, |a, s, id| {
        encode_indirect(a, s, OP_WRITE, 20, 0, id, 0, &[ind_bad])
    });
    r.expect("indirect bad data ref", RSP_ERROR, OP_READ, |a, s, id| {
        encode_indirect(a, s, OP_READ, 20, 0, id, 0, &[ind_bad_ref])
    });
    r.expect("indirect past the end", RSP_ERROR, OP_WRITE, |a, s, id| {
        encode_indirect(a, s, OP_WRITE, 20, 0, id, SECTORS - 8, &[ind_ok])
    });
    r.expect(
        "indirect sector overflow",
        RSP_ERROR,
        OP_READ,
        |a, s, id| encode_indirect(a, s, OP_READ, 20, 0, id, u64::MAX - 8, &[ind_ok]),
    );
    // FLUSH_DISKCACHE carrying a data segment (Linux blkfront's FUA write when
    // no barrier is offered; Linux blkback writes it after a preflush): written
    // and flushed, never OKAY without the data on the disk.
    let (_, flush_data) = r.fe.raw_grant_page(&[0x3c; 4096], true).unwrap();
    let fr = r.send("flush with data", |a, s, id| {
        rw(a, s, OP_FLUSH_DISKCACHE, id, 2048, &[seg(flush_data, 0, 7)])
    });
    assert_eq!(fr.operation, OP_FLUSH_DISKCACHE);
    let on_disk = r.fe.read(2048, 4096).unwrap();
    assert!(
        fr.status == RSP_OKAY && on_disk == vec![0x3c; 4096],
        "FLUSH_DISKCACHE with a data segment answered {} but the data is not on the disk",
        fr.status
    );
    // Flush and discard that are fine, in the junk-filled slots.
    r.expect("flush", RSP_OKAY, OP_FLUSH_DISKCACHE, |a, s, id| {
        rw(a, s, OP_FLUSH_DISKCACHE, id, 0, &[])
    });
    r.expect("discard", RSP_OKAY, OP_DISCARD, |a, s, id| {
        encode_discard(a, s, 0, 0, id, 256, 8)
    });
    // Many bad requests at once, answered in one batch.
    let abi = r.abi();
    for i in 0..20u64 {
        let mut slot = vec![0xabu8; abi.slot_size()];
        rw(
            abi,
            &mut slot,
            OP_READ,
            (2 << 60) + i,
            u64::MAX - i,
            &[seg(data_ref, 0, 7)],
        );
        r.fe.raw_push(0, (2 << 60) + i, &slot).unwrap();
    }
    r.fe.raw_publish(0).unwrap();
    let rs = r.fe.wait_raw_responses(20, LONG).unwrap();
    assert_eq!(rs.len(), 20);
    assert!(rs
        .iter()
        .all(|x| x.status == RSP_ERROR && x.operation == OP_READ));

    // Grants revoked while requests are in flight: every request is answered
    // (OKAY if the backend copied first, ERROR otherwise) and the device works.
    crate::kit::hostile::revoke_mid_request(r.fe, 1024);

    // Nothing went past the end of the disk, and the disk still works.
    assert_eq!(std::fs::metadata(image).unwrap().len(), DISK);
    let fe = r.fe;
    let d: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    fe.write(8, &d).expect("the device still works");
    assert!(fe.read(8, 8192).unwrap() == d);
    let a = fe.anomalies();
    assert!(a.is_clean(), "backend responses broke the protocol: {a:?}");
}

fn wait_disconnected(fe: &Frontend) -> XenbusState {
    fe.wait_backend_state(
        |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
        LONG,
    )
    .expect("backend disconnects the device")
}

#[test]
fn every_validation_rule_both_abis() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    for (domid, protocol) in [(20u16, Protocol::X86_64), (21, Protocol::X86_32)] {
        let image = make_image(d.path(), &format!("h{domid}.img"), DISK);
        let guest = rig.guest(domid, 4096);
        rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
        let mut fe = rig.connect(
            &guest,
            XVDA,
            FrontendOptions {
                protocol,
                ..Default::default()
            },
        );
        barrage(&mut fe, &image);
        let st = rig.status(domid, XVDA);
        assert!(st.errors > 0, "{st:?}");
        assert_eq!(fe.backend_state().unwrap(), XenbusState::Connected);
        // A producer index more than a ring ahead: the device is disconnected.
        let (pvt, size) = fe.raw_ring_state(0).unwrap();
        fe.raw_set_req_prod(0, pvt.wrapping_add(size + 5)).unwrap();
        wait_disconnected(&fe);
        drop(fe);
    }
    rig.shutdown();
}

#[test]
fn producer_index_moved_backwards_disconnects() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "back.img", DISK);
    let guest = rig.guest(22, 2048);
    rig.attach(22, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    // Move the ring forward so there is something behind us.
    for i in 0..40u64 {
        fe.write(8 * i, &[1u8; 4096]).unwrap();
    }
    fe.raw_set_req_prod(0, 3).unwrap();
    wait_disconnected(&fe);
    // Nothing of the daemon died: a new device on it works.
    let image2 = make_image(d.path(), "back2.img", DISK);
    let guest2 = rig.guest(23, 2048);
    rig.attach(23, XVDA, &image2, "w", AttachOptions::default());
    let mut fe2 = rig.connect(&guest2, XVDA, FrontendOptions::default());
    fe2.write(0, &[3u8; 4096]).unwrap();
    assert!(fe2.read(0, 4096).unwrap() == vec![3u8; 4096]);
    fe2.disconnect().unwrap();
    drop((fe, fe2));
    rig.shutdown();
}

#[test]
fn hostile_xenstore_values_are_refused() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "xs.img", DISK);
    type Overrides<'a> = Vec<(&'a str, Option<&'a str>)>;
    let cases: Vec<(&str, u32, u32, Overrides)> = vec![
        (
            "ring-ref not a number",
            0,
            1,
            vec![("ring-ref", Some("banana"))],
        ),
        (
            "ring-ref not granted",
            0,
            1,
            vec![("ring-ref", Some("12345"))],
        ),
        ("ring-ref negative", 0, 1, vec![("ring-ref", Some("-1"))]),
        ("ring-ref missing", 0, 1, vec![("ring-ref", None)]),
        (
            "event channel not ours",
            0,
            1,
            vec![("event-channel", Some("4000"))],
        ),
        (
            "event channel huge",
            0,
            1,
            vec![("event-channel", Some("99999999999999999999"))],
        ),
        (
            "unknown protocol",
            0,
            1,
            vec![("protocol", Some("ppc64-abi"))],
        ),
        ("ring order 9", 1, 1, vec![("ring-page-order", Some("9"))]),
        (
            "ring order without refs",
            0,
            1,
            vec![("ring-page-order", Some("2"))],
        ),
        (
            "1000 queues",
            0,
            1,
            vec![("multi-queue-num-queues", Some("1000"))],
        ),
        (
            "0 queues",
            0,
            1,
            vec![("multi-queue-num-queues", Some("0"))],
        ),
        (
            "2 queues, keys of 1",
            0,
            1,
            vec![("multi-queue-num-queues", Some("2"))],
        ),
        (
            "second queue's ring not granted",
            0,
            2,
            vec![("queue-1/ring-ref", Some("12345"))],
        ),
        (
            "second queue's event channel bogus",
            1,
            2,
            vec![("queue-1/event-channel", Some("77777"))],
        ),
    ];
    for (i, (what, order, queues, overrides)) in cases.into_iter().enumerate() {
        let domid = 30 + i as u16;
        let guest = rig.guest(domid, 256);
        let vbd = rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
        let opts = FrontendOptions {
            ring_page_order: order,
            queues,
            timeout: Duration::from_secs(10),
            xenstore_overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
            ..Default::default()
        };
        let r = Frontend::connect(&rig.sim.xenstored_path(), guest.clone(), XVDA, opts);
        assert!(r.is_err(), "{what}: the backend connected");
        assert!(
            matches!(
                rig.ts.backend_state(&vbd).unwrap(),
                XenbusState::Closing | XenbusState::Closed
            ),
            "{what}: backend not closing"
        );
        assert!(
            rig.ts.remove_vbd(&vbd).unwrap(),
            "{what}: backend did not close"
        );
        rig.ts.destroy_domain(domid).unwrap();
    }
    // The daemon still serves.
    let guest = rig.guest(60, 512);
    rig.attach(60, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    fe.write(0, &[9u8; 4096]).unwrap();
    assert!(fe.read(0, 4096).unwrap() == vec![9u8; 4096]);
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn a_hostile_guest_does_not_disturb_another() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let good_img = make_image(d.path(), "good.img", 8 * MIB);
    let bad_img = make_image(d.path(), "bad.img", DISK);
    let good_guest = rig.guest(70, 8192);
    let bad_guest = rig.guest(71, 4096);
    rig.attach(70, XVDA, &good_img, "w", AttachOptions::default());
    let mut spec = VbdSpec::new(71, XVDA, &bad_img);
    spec.vdev = "xvda".into();
    rig.ts.add_vbd(&spec).unwrap();
    let mut good = rig.connect(
        &good_guest,
        XVDA,
        FrontendOptions {
            ring_page_order: 1,
            queues: 2,
            ..Default::default()
        },
    );
    let mut bad = rig.connect(&bad_guest, XVDA, FrontendOptions::default());
    let worker = std::thread::spawn(move || {
        let (_, model) = random_rw(&mut good, 99, 300, 16, 256, 8 * MIB);
        (good, model)
    });
    barrage(&mut bad, &bad_img);
    let (pvt, size) = bad.raw_ring_state(0).unwrap();
    bad.raw_set_req_prod(0, pvt.wrapping_add(2 * size)).unwrap();
    wait_disconnected(&bad);
    let (mut good, model) = worker.join().expect("the good guest's I/O");
    assert_eq!(good.backend_state().unwrap(), XenbusState::Connected);
    assert!(good.anomalies().is_clean(), "{:?}", good.anomalies());
    assert_eq!(rig.status(70, XVDA).errors, 0);
    good.disconnect().unwrap();
    assert!(
        std::fs::read(&good_img).unwrap() == model,
        "the good guest's image is wrong"
    );
    drop((good, bad));
    rig.shutdown();
}

#[test]
fn closing_with_io_in_flight_answers_every_consumed_request() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "closing.img", 64 * MIB);
    let guest = rig.guest(80, 16384);
    rig.attach(80, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            ring_page_order: 2,
            ..Default::default()
        },
    );
    fe.write(0, &[1u8; 4096]).unwrap();
    let before = rig.status(80, XVDA).requests;
    let data = vec![0x42u8; 256 * 1024];
    fe.plug();
    for i in 0..96u64 {
        let req = if i % 3 == 0 {
            IoRequest::Read {
                sector: 512 * i,
                len: data.len(),
            }
        } else {
            IoRequest::Write {
                sector: 512 * i,
                data: &data,
            }
        };
        fe.submit(None, req).unwrap();
    }
    // The guest goes Closing as it publishes them, without waiting for
    // them: the backend stops somewhere in the middle.
    let state = format!("{}/state", fe.frontend_path());
    fe.xs().write(0, &state, b"5").unwrap();
    fe.unplug().unwrap();
    wait_disconnected(&fe);
    // The queue answered everything it consumed before it stopped.
    let consumed = rig.status(80, XVDA).requests - before;
    let answered = fe.poll();
    assert_eq!(
        answered.len() as u64,
        consumed,
        "{consumed} requests consumed, {} answered",
        answered.len()
    );
    eprintln!("consumed {consumed} of 96");
    assert!(answered.iter().all(|c| c.status == wire::RSP_OKAY));
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    drop(fe);
    rig.shutdown();
}
