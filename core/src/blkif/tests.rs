//! Unit tests of ring handling, parsing and validation. The "frontend" here
//! writes slots at the offsets of the `xen-sys` structs into an anonymous
//! buffer standing in for the granted ring pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use core::mem::offset_of;
use xen_sys::blkif::{
    self as b, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
    BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};

use super::*;
use crate::platform::ForeignMapping;

// ---------------------------------------------------------------- fake ring

/// Guest memory: 8-aligned words with interior mutability, shared between the
/// fake mapping (backend side) and the test (frontend side).
#[derive(Clone)]
struct Mem(Arc<Vec<AtomicU64>>);

impl Mem {
    fn new(pages: usize) -> Mem {
        Mem(Arc::new(
            (0..pages * 512).map(|_| AtomicU64::new(0)).collect(),
        ))
    }
    fn len(&self) -> usize {
        self.0.len() * 8
    }
    fn get(&self, off: usize) -> u8 {
        self.0[off / 8].load(Ordering::SeqCst).to_le_bytes()[off % 8]
    }
    fn set(&self, off: usize, v: u8) {
        let w = &self.0[off / 8];
        let mut bytes = w.load(Ordering::SeqCst).to_le_bytes();
        bytes[off % 8] = v;
        w.store(u64::from_le_bytes(bytes), Ordering::SeqCst);
    }
    fn write(&self, off: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            self.set(off + i, *v);
        }
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        (off..off + len).map(|o| self.get(o)).collect()
    }
    fn set_u32(&self, off: usize, v: u32) {
        self.write(off, &v.to_le_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.read(off, 4).try_into().unwrap())
    }
}

struct FakeMapping {
    mem: Mem,
    len: usize,
}

// SAFETY: the words live as long as the mapping (an Arc); the test's own
// side reads and writes them only as atomics, never through references to
// bytes.
unsafe impl ForeignMapping for FakeMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.mem.0.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
}

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// A frontend following ring.h (FRONT_RING_INIT / RING_PUSH_REQUESTS).
struct Front {
    mem: Mem,
    abi: Abi,
    size: u32,
    req_prod_pvt: u32,
}

impl Front {
    fn slot_off(&self, idx: u32) -> usize {
        64 + (idx & (self.size - 1)) as usize * self.abi.slot_size()
    }
    /// Put a request in the next slot (not yet published).
    fn queue(&mut self, slot: &Slot) {
        assert_eq!(slot.abi, self.abi);
        self.mem
            .write(self.slot_off(self.req_prod_pvt), &slot.bytes);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }
    /// Publish; returns whether the backend asked to be notified.
    fn push(&mut self) -> bool {
        let old = self.mem.get_u32(REQ_PROD);
        let new = self.req_prod_pvt;
        self.mem.set_u32(REQ_PROD, new);
        let ev = self.mem.get_u32(REQ_EVENT);
        new.wrapping_sub(ev) < new.wrapping_sub(old)
    }
    fn response(&self, idx: u32) -> (u64, u8, i16) {
        let o = self.slot_off(idx);
        let r = self.mem.read(o, 12);
        (
            u64::from_le_bytes(r[0..8].try_into().unwrap()),
            r[8],
            i16::from_le_bytes([r[10], r[11]]),
        )
    }
}

fn ring_at(abi: Abi, pages: usize, start: u32) -> (BackRing, Front) {
    let mem = Mem::new(pages);
    // SHARED_RING_INIT + FRONT_RING_INIT: indices at `start`, rsp_event = start+1.
    mem.set_u32(REQ_PROD, start);
    mem.set_u32(RSP_PROD, start);
    mem.set_u32(REQ_EVENT, start.wrapping_add(1));
    mem.set_u32(RSP_EVENT, start.wrapping_add(1));
    let map = FakeMapping {
        mem: mem.clone(),
        len: mem.len(),
    };
    let ring = BackRing::new_at(Box::new(map), abi, start).unwrap();
    let front = Front {
        mem,
        abi,
        size: ring.size(),
        req_prod_pvt: start,
    };
    (ring, front)
}

fn ring(abi: Abi, pages: usize) -> (BackRing, Front) {
    ring_at(abi, pages, 0)
}

// ------------------------------------------------------------ slot builder

/// Builds one request slot at the offsets of the xen-sys structs.
struct Slot {
    abi: Abi,
    bytes: Vec<u8>,
}

macro_rules! off {
    ($abi:expr, $ty:ident, $f:ident) => {
        match $abi {
            Abi::X86_64 => offset_of!(b::x86_64::$ty, $f),
            Abi::X86_32 => offset_of!(b::x86_32::$ty, $f),
        }
    };
}

impl Slot {
    fn new(abi: Abi, op: u8, id: u64, sector: u64) -> Slot {
        let mut s = Slot {
            abi,
            bytes: vec![0; abi.slot_size()],
        };
        s.bytes[off!(abi, blkif_request, operation)] = op;
        s.put(off!(abi, blkif_request, id), &id.to_le_bytes());
        s.put(
            off!(abi, blkif_request, sector_number),
            &sector.to_le_bytes(),
        );
        s
    }
    fn put(&mut self, off: usize, v: &[u8]) {
        self.bytes[off..off + v.len()].copy_from_slice(v);
    }
    /// READ/WRITE/BARRIER with the given segments.
    fn rw(abi: Abi, op: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) -> Slot {
        let mut s = Slot::new(abi, op, id, sector);
        s.bytes[off!(abi, blkif_request, nr_segments)] = segs.len() as u8;
        let base = off!(abi, blkif_request, seg);
        for (i, &(gref, f, l)) in segs.iter().enumerate() {
            let o = base + i * 8;
            s.put(
                o + offset_of!(b::blkif_request_segment, gref),
                &gref.to_le_bytes(),
            );
            s.bytes[o + offset_of!(b::blkif_request_segment, first_sect)] = f;
            s.bytes[o + offset_of!(b::blkif_request_segment, last_sect)] = l;
        }
        s
    }
    fn nr_segments(mut self, n: u8) -> Slot {
        self.bytes[off!(self.abi, blkif_request, nr_segments)] = n;
        self
    }
    fn discard(abi: Abi, id: u64, sector: u64, nr_sectors: u64, flag: u8) -> Slot {
        let mut s = Slot::new(abi, BLKIF_OP_DISCARD, id, sector);
        s.bytes[off!(abi, blkif_request_discard, flag)] = flag;
        s.put(
            off!(abi, blkif_request_discard, nr_sectors),
            &nr_sectors.to_le_bytes(),
        );
        s
    }
    fn indirect(abi: Abi, inner: u8, id: u64, sector: u64, nseg: u16, grefs: &[u32]) -> Slot {
        let mut s = Slot::new(abi, BLKIF_OP_INDIRECT, id, sector);
        s.bytes[off!(abi, blkif_request_indirect, indirect_op)] = inner;
        s.put(
            off!(abi, blkif_request_indirect, nr_segments),
            &nseg.to_le_bytes(),
        );
        let base = off!(abi, blkif_request_indirect, indirect_grefs);
        for (i, g) in grefs.iter().enumerate() {
            s.put(base + 4 * i, &g.to_le_bytes());
        }
        s
    }
    fn raw(&self) -> RawRequest {
        RawRequest::from_bytes(self.abi, &self.bytes).unwrap()
    }
}

const ABIS: [Abi; 2] = [Abi::X86_64, Abi::X86_32];

fn disk() -> DiskInfo {
    DiskInfo {
        sectors: 1 << 20,
        logical_sector_size: 512,
        read_only: false,
        max_indirect_segments: 256,
        features: Features {
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
        },
    }
}

fn rejected(abi: Abi, slot: &Slot, d: &DiskInfo) -> Rejection {
    let raw = slot.raw();
    assert_eq!(raw.abi(), abi);
    parse_request(&raw, d).expect_err("request should be rejected")
}

// ------------------------------------------------------------------- Abi

#[test]
fn abi_from_protocol() {
    assert_eq!(Abi::from_protocol(Some("x86_64-abi")), Ok(Abi::X86_64));
    assert_eq!(Abi::from_protocol(Some("x86_32-abi")), Ok(Abi::X86_32));
    assert_eq!(Abi::from_protocol(None), Ok(Abi::X86_32));
    let e = Abi::from_protocol(Some("arm-abi")).unwrap_err();
    assert!(e.to_string().contains("arm-abi"));
    assert!(Abi::from_protocol(Some("")).is_err());
    assert!(Abi::from_protocol(Some("x86_64-abi\0")).is_err());
    assert_eq!(Abi::X86_64.protocol_name(), "x86_64-abi");
}

#[test]
fn abi_sizes_and_ring_sizes() {
    assert_eq!(Abi::X86_64.slot_size(), 112);
    assert_eq!(Abi::X86_32.slot_size(), 108);
    assert_eq!(Abi::X86_64.response_size(), 16);
    assert_eq!(Abi::X86_32.response_size(), 12);
    for abi in ABIS {
        for order in 0..=4 {
            assert_eq!(abi.ring_size(1 << order), 32 << order);
        }
    }
}

// ------------------------------------------------------------------ ring

#[test]
fn ring_rejects_bad_mappings() {
    for pages in [0usize, 3, 5, 32] {
        let mem = Mem::new(pages.max(1));
        let map = FakeMapping {
            mem,
            len: pages * 4096,
        };
        assert_eq!(
            BackRing::new(Box::new(map), Abi::X86_64).unwrap_err(),
            RingError::BadMapping { len: pages * 4096 }
        );
    }
    let mem = Mem::new(1);
    let map = FakeMapping { mem, len: 4000 };
    assert!(BackRing::new(Box::new(map), Abi::X86_64).is_err());
}

#[test]
fn ring_sizes_follow_pages() {
    for abi in ABIS {
        for order in 0..=4 {
            let (r, _) = ring(abi, 1 << order);
            assert_eq!(r.size(), 32 << order);
            assert_eq!(r.nr_pages(), 1 << order);
            assert_eq!(r.abi(), abi);
        }
    }
}

#[test]
fn request_round_trip_both_abis() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        assert_eq!(r.next_request().unwrap().map(|_| ()), None);
        let slot = Slot::rw(
            abi,
            BLKIF_OP_WRITE,
            0xdead_beef_0102_0304,
            24,
            &[(7, 0, 7), (9, 0, 3)],
        );
        f.queue(&slot);
        f.push();
        let raw = r.next_request().unwrap().expect("a request");
        assert_eq!(raw.bytes(), &slot.bytes[..]);
        assert_eq!(raw.id(), 0xdead_beef_0102_0304);
        assert_eq!(raw.operation(), BLKIF_OP_WRITE);
        assert_eq!(r.outstanding(), 1);
        assert!(r.next_request().unwrap().is_none());
        // The copy is ours: the guest rewriting the slot changes nothing.
        f.mem.write(f.slot_off(0), &vec![0xff; abi.slot_size()]);
        let req = parse_request(&raw, &disk()).unwrap();
        let Request::Rw(rw) = req else {
            panic!("not rw")
        };
        assert_eq!(rw.op(), RwOp::Write);
        assert_eq!(rw.sector(), 24);
        assert_eq!(rw.offset(), 24 * 512);
        assert_eq!(rw.len(), 12 * 512);
        assert_eq!(
            rw.pieces(),
            vec![Piece::new(7, 0, 4096), Piece::new(9, 0, 2048)]
        );
        r.push_response(rw.id(), rw.response_op(), BLKIF_RSP_OKAY)
            .unwrap();
        assert!(r.push_responses_and_check_notify());
        assert_eq!(f.mem.get_u32(RSP_PROD), 1);
        assert_eq!(f.response(0), (0xdead_beef_0102_0304, BLKIF_OP_WRITE, 0));
    }
}

/// Run `n` requests through the ring one batch at a time, checking ids.
fn pump(r: &mut BackRing, f: &mut Front, n: u32, batch: u32) {
    let mut next_id = 0u64;
    let mut done = 0u32;
    while done < n {
        let k = batch.min(n - done);
        for _ in 0..k {
            let s = Slot::rw(f.abi, BLKIF_OP_READ, next_id, u64::from(done), &[(1, 0, 0)]);
            f.queue(&s);
            next_id += 1;
        }
        f.push();
        for i in 0..k {
            let raw = r.next_request().unwrap().expect("request");
            assert_eq!(raw.id(), u64::from(done + i));
            r.push_response(raw.id(), raw.operation(), BLKIF_RSP_OKAY)
                .unwrap();
        }
        assert!(r.next_request().unwrap().is_none());
        r.push_responses_and_check_notify();
        for i in 0..k {
            let idx = r.rsp_prod_pvt().wrapping_sub(k - i);
            assert_eq!(f.response(idx).0, u64::from(done + i));
        }
        done += k;
    }
}

#[test]
fn ring_wraps_slots_and_u32_indices() {
    for abi in ABIS {
        // Slot index wraps many times.
        let (mut r, mut f) = ring(abi, 1);
        pump(&mut r, &mut f, 200, 7);
        assert_eq!(r.req_cons(), 200);
        // The free-running u32 indices wrap through 0.
        let start = u32::MAX - 40;
        let (mut r, mut f) = ring_at(abi, 2, start);
        pump(&mut r, &mut f, 300, 64);
        assert_eq!(r.req_cons(), start.wrapping_add(300));
        assert_eq!(f.mem.get_u32(RSP_PROD), start.wrapping_add(300));
    }
}

#[test]
fn full_ring_is_fine_one_more_is_overflow() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        for i in 0..32 {
            f.queue(&Slot::rw(abi, BLKIF_OP_READ, i, 0, &[(1, 0, 0)]));
        }
        f.push();
        for _ in 0..32 {
            assert!(r.next_request().unwrap().is_some());
        }
        assert_eq!(r.outstanding(), 32);
        assert!(r.next_request().unwrap().is_none());
        // A 33rd request before any response: more than a ring ahead.
        f.queue(&Slot::rw(abi, BLKIF_OP_READ, 99, 0, &[(1, 0, 0)]));
        f.push();
        assert_eq!(
            r.next_request().unwrap_err(),
            RingError::Overflow {
                req_prod: 33,
                rsp_prod_pvt: 0,
                size: 32
            }
        );
        // One response frees one slot: the same index is now legitimate
        // (an honest frontend writes slot 0 only after reading its response).
        r.push_response(0, BLKIF_OP_READ, BLKIF_RSP_OKAY).unwrap();
        r.push_responses_and_check_notify();
        assert_eq!(f.response(0).0, 0);
        let off = f.slot_off(32);
        f.mem.write(
            off,
            &Slot::rw(abi, BLKIF_OP_READ, 99, 0, &[(1, 0, 0)]).bytes,
        );
        assert_eq!(r.next_request().unwrap().unwrap().id(), 99);
    }
}

#[test]
fn bogus_producer_index_is_overflow() {
    for abi in ABIS {
        for bogus in [33u32, 1000, u32::MAX, 0x8000_0000] {
            let (mut r, f) = ring(abi, 1);
            f.mem.set_u32(REQ_PROD, bogus);
            let e = r.next_request().unwrap_err();
            assert!(matches!(e, RingError::Overflow { req_prod, .. } if req_prod == bogus));
            assert!(e.to_string().contains("bogus"));
            // final check reports work so that the caller sees the error.
            assert!(r.final_check_for_requests());
            assert!(r.unconsumed().is_err());
        }
    }
}

#[test]
fn producer_index_moving_backwards_is_an_error() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        for i in 0..10 {
            f.queue(&Slot::rw(abi, BLKIF_OP_READ, i, 0, &[(1, 0, 0)]));
        }
        f.push();
        for _ in 0..10 {
            r.next_request().unwrap().unwrap();
        }
        for i in 0..4 {
            r.push_response(i, BLKIF_OP_READ, BLKIF_RSP_OKAY).unwrap();
        }
        // rsp_prod_pvt 4, req_cons 10: req_prod 7 is within a ring of the
        // responses but behind what we consumed.
        f.mem.set_u32(REQ_PROD, 7);
        let e = r.next_request().unwrap_err();
        assert_eq!(
            e,
            RingError::ProducerBehindConsumer {
                req_prod: 7,
                req_cons: 10
            }
        );
        assert!(r.final_check_for_requests());
        // Back at 10 the ring is simply empty.
        f.mem.set_u32(REQ_PROD, 10);
        assert!(r.next_request().unwrap().is_none());
        assert!(!r.final_check_for_requests());
    }
}

#[test]
fn no_response_without_a_request() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        assert_eq!(
            r.push_response(1, 0, 0),
            Err(RingError::NoOutstandingRequest)
        );
        f.queue(&Slot::rw(abi, BLKIF_OP_READ, 5, 0, &[(1, 0, 0)]));
        f.push();
        r.next_request().unwrap().unwrap();
        r.push_response(5, 0, 0).unwrap();
        assert_eq!(
            r.push_response(5, 0, 0),
            Err(RingError::NoOutstandingRequest)
        );
        assert_eq!(r.outstanding(), 0);
        assert_eq!(f.mem.get_u32(RSP_PROD), 0, "not published before push");
    }
}

#[test]
fn response_written_field_by_field_without_foreign_bytes() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        for i in 0..3 {
            f.queue(&Slot::rw(abi, BLKIF_OP_READ, i, 0, &[(1, 0, 0)]));
        }
        f.push();
        for _ in 0..3 {
            r.next_request().unwrap().unwrap();
        }
        // The guest's bytes (and whatever the request left) as a pattern.
        for i in 0..3 {
            f.mem.write(f.slot_off(i), &vec![0xa5; abi.slot_size()]);
        }
        let ids = [0x1122_3344_5566_7788u64, 0, u64::MAX];
        let st = [BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP];
        for i in 0..3 {
            r.push_response(ids[i], 0x40 + i as u8, st[i]).unwrap();
        }
        for i in 0..3u32 {
            let o = f.slot_off(i);
            let bytes = f.mem.read(o, abi.slot_size());
            let n = abi.response_size();
            let mut want = ids[i as usize].to_le_bytes().to_vec();
            want.push(0x40 + i as u8);
            want.push(0); // padding before status: zeroed
            want.extend_from_slice(&st[i as usize].to_le_bytes());
            want.resize(n, 0); // x86_64 tail padding: zeroed
            assert_eq!(&bytes[..n], &want[..], "{abi:?} slot {i}");
            assert!(
                bytes[n..].iter().all(|&x| x == 0xa5),
                "{abi:?} slot {i}: bytes after the response were touched"
            );
        }
    }
}

#[test]
fn notify_only_when_frontend_asked() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        for i in 0..4 {
            f.queue(&Slot::rw(abi, BLKIF_OP_READ, i, 0, &[(1, 0, 0)]));
        }
        f.push();
        for _ in 0..4 {
            r.next_request().unwrap().unwrap();
        }
        assert!(!r.push_responses_and_check_notify(), "nothing to publish");
        // rsp_event = 1 (FRONT_RING_INIT): the first response needs a kick.
        r.push_response(0, 0, 0).unwrap();
        assert!(r.push_responses_and_check_notify());
        // The frontend did not move rsp_event: no kick for the second.
        r.push_response(1, 0, 0).unwrap();
        assert!(!r.push_responses_and_check_notify());
        assert_eq!(f.mem.get_u32(RSP_PROD), 2);
        // The frontend asks for a kick at response 4.
        f.mem.set_u32(RSP_EVENT, 4);
        r.push_response(2, 0, 0).unwrap();
        assert!(!r.push_responses_and_check_notify());
        r.push_response(3, 0, 0).unwrap();
        assert!(r.push_responses_and_check_notify());
        assert_eq!(f.mem.get_u32(RSP_PROD), 4);
    }
}

#[test]
fn final_check_protocol() {
    for abi in ABIS {
        let (mut r, mut f) = ring(abi, 1);
        // Empty: sleep, with req_event = req_cons + 1.
        assert!(!r.final_check_for_requests());
        assert_eq!(f.mem.get_u32(REQ_EVENT), 1);
        // A request published after that must be announced by the frontend.
        f.queue(&Slot::rw(abi, BLKIF_OP_READ, 1, 0, &[(1, 0, 0)]));
        assert!(f.push(), "frontend must kick after our final check");
        assert!(r.final_check_for_requests());
        r.next_request().unwrap().unwrap();
        assert!(!r.final_check_for_requests());
        assert_eq!(f.mem.get_u32(REQ_EVENT), 2);
        // A request that arrives between our last look and the final check
        // is seen by the re-check (the frontend already published it).
        f.queue(&Slot::rw(abi, BLKIF_OP_READ, 2, 0, &[(1, 0, 0)]));
        f.mem.set_u32(REQ_PROD, f.req_prod_pvt);
        assert!(r.final_check_for_requests());
        assert_eq!(r.unconsumed().unwrap(), 1);
    }
}

// ------------------------------------------------------- parse + validate

#[test]
fn valid_requests_both_abis() {
    let d = disk();
    for abi in ABIS {
        let s = Slot::rw(abi, BLKIF_OP_READ, 1, 8, &[(3, 2, 5)]);
        let Request::Rw(rw) = parse_request(&s.raw(), &d).unwrap() else {
            panic!()
        };
        assert_eq!(
            (rw.op(), rw.barrier(), rw.len()),
            (RwOp::Read, false, 4 * 512)
        );
        assert_eq!(rw.pieces(), vec![Piece::new(3, 1024, 2048)]);
        assert_eq!(rw.response_op(), BLKIF_OP_READ);

        let segs: Vec<_> = (0..11).map(|i| (i, 0, 7)).collect();
        let s = Slot::rw(abi, BLKIF_OP_WRITE, 2, d.sectors - 88, &segs);
        let Request::Rw(rw) = parse_request(&s.raw(), &d).unwrap() else {
            panic!()
        };
        assert_eq!(rw.len(), 88 * 512);
        assert_eq!(
            rw.offset() + rw.len(),
            d.sectors * 512,
            "ends exactly at the disk end"
        );

        let s = Slot::rw(abi, BLKIF_OP_WRITE_BARRIER, 3, 0, &[]);
        let Request::Rw(rw) = parse_request(&s.raw(), &d).unwrap() else {
            panic!()
        };
        assert!(rw.barrier() && rw.pieces().is_empty());
        assert_eq!(
            (rw.op(), rw.response_op()),
            (RwOp::Write, BLKIF_OP_WRITE_BARRIER)
        );

        let s = Slot::new(abi, BLKIF_OP_FLUSH_DISKCACHE, 4, 0);
        let req = parse_request(&s.raw(), &d).unwrap();
        assert_eq!(req, Request::Flush { id: 4 });
        assert_eq!(req.response_op(), BLKIF_OP_FLUSH_DISKCACHE);
        // A flush with data segments is a write run as a barrier (Linux
        // blkfront's FUA/PREFLUSH write when no barrier is offered).
        let s = Slot::rw(abi, BLKIF_OP_FLUSH_DISKCACHE, 6, 8, &[(1, 0, 7)]);
        let Request::Rw(rw) = parse_request(&s.raw(), &d).unwrap() else {
            panic!("flush with data is not a write");
        };
        assert!(rw.barrier() && rw.op() == RwOp::Write && rw.len() == 4096 && rw.offset() == 4096);
        assert_eq!((rw.id(), rw.response_op()), (6, BLKIF_OP_FLUSH_DISKCACHE));
        let s = Slot::rw(abi, BLKIF_OP_FLUSH_DISKCACHE, 7, 0, &[(1, 3, 2)]);
        let r = rejected(abi, &s, &d);
        assert_eq!(
            (r.id, r.operation, r.status),
            (7, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_ERROR)
        );

        let s = Slot::discard(abi, 5, 100, 50, 0);
        let req = parse_request(&s.raw(), &d).unwrap();
        assert_eq!(
            req,
            Request::Discard {
                id: 5,
                sector: 100,
                nr_sectors: 50,
                secure: false
            }
        );
        assert_eq!((req.id(), req.response_op()), (5, BLKIF_OP_DISCARD));
    }
}

#[test]
fn nr_segments_range_per_op() {
    let d = disk();
    for abi in ABIS {
        for op in [BLKIF_OP_READ, BLKIF_OP_WRITE] {
            let r = rejected(abi, &Slot::rw(abi, op, 9, 0, &[]), &d);
            assert_eq!((r.id, r.operation, r.status), (9, op, BLKIF_RSP_ERROR));
            assert!(matches!(
                r.reason,
                RejectReason::BadSegmentCount { nr_segments: 0, .. }
            ));
        }
        for op in [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER] {
            let segs: Vec<_> = (0..11).map(|i| (i, 0, 7)).collect();
            for n in [12u8, 200, 255] {
                let r = rejected(abi, &Slot::rw(abi, op, 1, 0, &segs).nr_segments(n), &d);
                assert_eq!(r.status, BLKIF_RSP_ERROR);
                assert!(matches!(r.reason, RejectReason::BadSegmentCount { .. }));
            }
        }
    }
}

#[test]
fn segment_sector_bounds() {
    let d = disk();
    for abi in ABIS {
        for (f, l) in [(1, 0), (7, 6), (0, 8), (8, 8), (0, 255)] {
            let s = Slot::rw(abi, BLKIF_OP_READ, 1, 0, &[(1, 0, 7), (2, f, l)]);
            let r = rejected(abi, &s, &d);
            assert_eq!(r.status, BLKIF_RSP_ERROR);
            assert_eq!(
                r.reason,
                RejectReason::BadSegment {
                    index: 1,
                    first_sect: f,
                    last_sect: l
                }
            );
        }
    }
}

#[test]
fn range_checks() {
    let d = disk();
    for abi in ABIS {
        // One sector past the end.
        let s = Slot::rw(abi, BLKIF_OP_READ, 1, d.sectors - 7, &[(1, 0, 7)]);
        assert!(matches!(
            rejected(abi, &s, &d).reason,
            RejectReason::OutOfRange { .. }
        ));
        // Starting past the end.
        let s = Slot::rw(abi, BLKIF_OP_WRITE, 1, d.sectors, &[(1, 0, 0)]);
        assert!(matches!(
            rejected(abi, &s, &d).reason,
            RejectReason::OutOfRange { .. }
        ));
        // sector + length overflows u64.
        let s = Slot::rw(abi, BLKIF_OP_READ, 1, u64::MAX - 3, &[(1, 0, 7)]);
        let r = rejected(abi, &s, &d);
        assert_eq!(r.status, BLKIF_RSP_ERROR);
        assert!(matches!(r.reason, RejectReason::OutOfRange { .. }));
        // Discard: past the end, overflowing.
        let s = Slot::discard(abi, 1, d.sectors - 10, 11, 0);
        assert!(matches!(
            rejected(abi, &s, &d).reason,
            RejectReason::OutOfRange { .. }
        ));
        let s = Slot::discard(abi, 1, 8, u64::MAX, 0);
        assert!(matches!(
            rejected(abi, &s, &d).reason,
            RejectReason::OutOfRange { .. }
        ));
        // Exactly to the end is fine.
        let s = Slot::discard(abi, 1, d.sectors - 10, 10, 0);
        assert!(parse_request(&s.raw(), &d).is_ok());
        // A disk description larger than a u64 of bytes: the byte offset
        // must not wrap (sector 2^55 * 512 = 2^64 would become offset 0).
        let huge = DiskInfo {
            sectors: u64::MAX,
            ..d
        };
        let s = Slot::rw(abi, BLKIF_OP_WRITE, 1, 1 << 55, &[(1, 0, 7)]);
        assert!(matches!(
            rejected(abi, &s, &huge).reason,
            RejectReason::OutOfRange { .. }
        ));
        let s = Slot::discard(abi, 1, 1 << 55, 8, 0);
        assert!(matches!(
            rejected(abi, &s, &huge).reason,
            RejectReason::OutOfRange { .. }
        ));
        let s = Slot::rw(abi, BLKIF_OP_READ, 1, u64::MAX / 512 - 8, &[(1, 0, 7)]);
        match parse_request(&s.raw(), &huge) {
            Ok(Request::Rw(r)) => assert_eq!(r.offset(), (u64::MAX / 512 - 8) * 512),
            other => panic!("last representable sectors refused: {other:?}"),
        }
    }
}

#[test]
fn alignment_on_4096_byte_sectors() {
    let d = DiskInfo {
        logical_sector_size: 4096,
        ..disk()
    };
    for abi in ABIS {
        let ok = Slot::rw(abi, BLKIF_OP_WRITE, 1, 16, &[(1, 0, 7), (2, 0, 7)]);
        let Request::Rw(rw) = parse_request(&ok.raw(), &d).unwrap() else {
            panic!()
        };
        assert_eq!(rw.len(), 8192);
        let bad = [
            Slot::rw(abi, BLKIF_OP_WRITE, 1, 4, &[(1, 0, 7)]), // start
            Slot::rw(abi, BLKIF_OP_READ, 1, 8, &[(1, 1, 7)]),  // first_sect
            Slot::rw(abi, BLKIF_OP_READ, 1, 8, &[(1, 0, 6)]),  // last_sect
            Slot::rw(abi, BLKIF_OP_READ, 1, 8, &[(1, 0, 7), (2, 0, 3)]),
            Slot::discard(abi, 1, 3, 8, 0),
            Slot::discard(abi, 1, 8, 9, 0),
            Slot::indirect(abi, BLKIF_OP_READ, 1, 9, 1, &[1]),
        ];
        for s in &bad {
            let r = rejected(abi, s, &d);
            assert_eq!(r.status, BLKIF_RSP_ERROR);
            assert_eq!(
                r.reason,
                RejectReason::Misaligned {
                    logical_sector_size: 4096
                }
            );
        }
        // The same requests are fine on a 512-byte disk.
        for s in &bad[..6] {
            assert!(parse_request(&s.raw(), &disk()).is_ok());
        }
    }
}

#[test]
fn read_only_device() {
    let d = DiskInfo {
        read_only: true,
        ..disk()
    };
    for abi in ABIS {
        let writes = [
            Slot::rw(abi, BLKIF_OP_WRITE, 11, 0, &[(1, 0, 7)]),
            Slot::rw(abi, BLKIF_OP_WRITE_BARRIER, 12, 0, &[]),
            Slot::discard(abi, 13, 0, 8, 0),
            Slot::indirect(abi, BLKIF_OP_WRITE, 14, 0, 1, &[1]),
        ];
        for s in &writes {
            let r = rejected(abi, s, &d);
            assert_eq!(r.status, BLKIF_RSP_ERROR);
            assert_eq!(r.reason, RejectReason::ReadOnly);
            assert_eq!(r.id, s.raw().id());
        }
        assert!(parse_request(&Slot::rw(abi, BLKIF_OP_READ, 1, 0, &[(1, 0, 7)]).raw(), &d).is_ok());
        assert!(parse_request(&Slot::new(abi, BLKIF_OP_FLUSH_DISKCACHE, 1, 0).raw(), &d).is_ok());
        assert!(
            parse_request(&Slot::indirect(abi, BLKIF_OP_READ, 1, 0, 1, &[1]).raw(), &d).is_ok()
        );
    }
}

#[test]
fn unknown_ops_and_disabled_features_are_eopnotsupp() {
    for abi in ABIS {
        for op in [4u8, 7, 8, 0x80, 255] {
            let r = rejected(abi, &Slot::new(abi, op, 0x77, 0), &disk());
            assert_eq!(
                (r.id, r.operation, r.status),
                (0x77, op, BLKIF_RSP_EOPNOTSUPP)
            );
            assert_eq!(r.reason, RejectReason::UnknownOperation(op));
        }
        let none = DiskInfo {
            max_indirect_segments: 0,
            features: Features::default(),
            ..disk()
        };
        let cases = [
            (
                Slot::new(abi, BLKIF_OP_FLUSH_DISKCACHE, 1, 0),
                "feature-flush-cache",
            ),
            (
                Slot::rw(abi, BLKIF_OP_WRITE_BARRIER, 1, 0, &[(1, 0, 7)]),
                "feature-barrier",
            ),
            (Slot::discard(abi, 1, 0, 8, 0), "feature-discard"),
            (
                Slot::indirect(abi, BLKIF_OP_READ, 1, 0, 1, &[1]),
                "feature-max-indirect-segments",
            ),
        ];
        for (s, feat) in &cases {
            let r = rejected(abi, s, &none);
            assert_eq!(r.status, BLKIF_RSP_EOPNOTSUPP);
            assert_eq!(r.reason, RejectReason::FeatureDisabled(feat));
            // Enabled, the same request passes.
            assert!(parse_request(&s.raw(), &disk()).is_ok(), "{feat}");
        }
    }
}

#[test]
fn discard_secure_flag_only_when_advertised() {
    for abi in ABIS {
        let s = Slot::discard(abi, 1, 0, 8, b::BLKIF_DISCARD_SECURE);
        let plain = parse_request(&s.raw(), &disk()).unwrap();
        assert!(matches!(plain, Request::Discard { secure: false, .. }));
        let mut d = disk();
        d.features.discard_secure = true;
        let sec = parse_request(&s.raw(), &d).unwrap();
        assert!(matches!(sec, Request::Discard { secure: true, .. }));
        let s = Slot::discard(abi, 1, 0, 8, 0);
        assert!(matches!(
            parse_request(&s.raw(), &d).unwrap(),
            Request::Discard { secure: false, .. }
        ));
    }
}

/// Indirect pages holding `segs`.
fn indirect_pages(segs: &[(u32, u8, u8)]) -> Vec<u8> {
    let mut pages = vec![0u8; segs.len().div_ceil(512) * 4096];
    for (i, &(g, f, l)) in segs.iter().enumerate() {
        pages[i * 8..i * 8 + 4].copy_from_slice(&g.to_le_bytes());
        pages[i * 8 + 4] = f;
        pages[i * 8 + 5] = l;
    }
    pages
}

#[test]
fn indirect_requests() {
    let d = disk();
    for abi in ABIS {
        let segs: Vec<_> = (0..256u32).map(|i| (1000 + i, 0, 7)).collect();
        let grefs = [500, 501, 502, 503, 504, 505, 506, 507];
        let s = Slot::indirect(abi, BLKIF_OP_WRITE, 0x55, 64, 256, &grefs);
        let Request::Indirect(ind) = parse_request(&s.raw(), &d).unwrap() else {
            panic!()
        };
        assert_eq!(
            (ind.id(), ind.op(), ind.sector(), ind.nr_segments()),
            (0x55, RwOp::Write, 64, 256)
        );
        assert_eq!(ind.page_grefs(), &[500]);
        assert_eq!(ind.response_op(), BLKIF_OP_WRITE, "inner op echoed");
        let rw = ind.complete(&indirect_pages(&segs), &d).unwrap();
        assert_eq!(
            (rw.id(), rw.response_op(), rw.barrier()),
            (0x55, BLKIF_OP_WRITE, false)
        );
        assert_eq!(rw.len(), 256 * 4096);
        assert_eq!(rw.pieces().len(), 256);
        assert_eq!(rw.pieces()[255], Piece::new(1255, 0, 4096));

        // More segments than one page: two pages.
        let d2 = DiskInfo {
            max_indirect_segments: 4096,
            ..d
        };
        let segs: Vec<_> = (0..600u32).map(|i| (i, 0, 0)).collect();
        let s = Slot::indirect(abi, BLKIF_OP_READ, 1, 0, 600, &grefs);
        let Request::Indirect(ind) = parse_request(&s.raw(), &d2).unwrap() else {
            panic!()
        };
        assert_eq!(ind.page_grefs(), &[500, 501]);
        let rw = ind.complete(&indirect_pages(&segs), &d2).unwrap();
        assert_eq!((rw.op(), rw.len()), (RwOp::Read, 600 * 512));

        // Bad inner op: error, inner op echoed.
        for inner in [
            BLKIF_OP_WRITE_BARRIER,
            BLKIF_OP_INDIRECT,
            BLKIF_OP_DISCARD,
            99,
        ] {
            let r = rejected(abi, &Slot::indirect(abi, inner, 2, 0, 1, &grefs), &d);
            assert_eq!((r.id, r.operation, r.status), (2, inner, BLKIF_RSP_ERROR));
            assert_eq!(r.reason, RejectReason::BadIndirectOperation(inner));
        }
        // nr_segments 0 or beyond what we advertised.
        for n in [0u16, 257, 4097, u16::MAX] {
            let r = rejected(
                abi,
                &Slot::indirect(abi, BLKIF_OP_READ, 3, 0, n, &grefs),
                &d,
            );
            assert_eq!((r.operation, r.status), (BLKIF_OP_READ, BLKIF_RSP_ERROR));
            assert!(matches!(
                r.reason,
                RejectReason::BadSegmentCount { max: 256, .. }
            ));
        }
        // Start past the end of the disk costs no grant copy.
        let s = Slot::indirect(abi, BLKIF_OP_READ, 3, d.sectors, 1, &grefs);
        assert!(matches!(
            rejected(abi, &s, &d).reason,
            RejectReason::OutOfRange { .. }
        ));
    }
}

#[test]
fn indirect_segment_list_is_validated() {
    let d = disk();
    let s = Slot::indirect(Abi::X86_64, BLKIF_OP_READ, 7, d.sectors - 16, 3, &[1]);
    let Request::Indirect(ind) = parse_request(&s.raw(), &d).unwrap() else {
        panic!()
    };
    // A bad segment in the list.
    let e = ind
        .complete(&indirect_pages(&[(1, 0, 7), (2, 5, 4), (3, 0, 7)]), &d)
        .unwrap_err();
    assert_eq!(
        (e.id, e.operation, e.status),
        (7, BLKIF_OP_READ, BLKIF_RSP_ERROR)
    );
    assert_eq!(
        e.reason,
        RejectReason::BadSegment {
            index: 1,
            first_sect: 5,
            last_sect: 4
        }
    );
    // The total running past the end of the disk.
    let e = ind
        .complete(&indirect_pages(&[(1, 0, 7), (2, 0, 7), (3, 0, 0)]), &d)
        .unwrap_err();
    assert!(matches!(e.reason, RejectReason::OutOfRange { .. }));
    // Not enough bytes for the list.
    let e = ind.complete(&[0u8; 16], &d).unwrap_err();
    assert_eq!(
        e.reason,
        RejectReason::IndirectPagesTooShort {
            needed: 24,
            got: 16
        }
    );
    assert_eq!(
        parse_indirect_segments(&indirect_pages(&[(9, 1, 2)]), 1).unwrap(),
        vec![Segment {
            gref: 9,
            first_sect: 1,
            last_sect: 2
        }]
    );
    // A hand-made header beyond 8 pages is refused, not sliced out of bounds.
    let huge = IndirectRequest::unchecked(
        ind.id(),
        ind.op(),
        ind.sector(),
        u16::MAX,
        *ind.indirect_grefs(),
    );
    assert_eq!(huge.page_grefs().len(), 8);
    let e = huge.complete(&[], &d).unwrap_err();
    assert!(matches!(e.reason, RejectReason::BadSegmentCount { .. }));
    // 4096-byte sectors: partial pages in the list are misaligned.
    let d4 = DiskInfo {
        logical_sector_size: 4096,
        ..d
    };
    let e = ind
        .complete(&indirect_pages(&[(1, 0, 7), (2, 0, 7), (3, 0, 3)]), &d4)
        .unwrap_err();
    assert_eq!(
        e.reason,
        RejectReason::Misaligned {
            logical_sector_size: 4096
        }
    );
}

#[test]
fn arbitrary_slot_bytes_never_panic() {
    // A cheap deterministic fuzz: every slot byte pattern parses to a request
    // or a rejection, and accepted transfers stay inside the disk.
    let d = DiskInfo {
        sectors: 4096,
        ..disk()
    };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for abi in ABIS {
        for _ in 0..20_000 {
            let mut bytes = vec![0u8; abi.slot_size()];
            for byte in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            bytes[0] &= 7; // mostly known ops
            if x & 1 == 0 {
                // small sectors so some requests pass
                let off = off!(abi, blkif_request, sector_number);
                bytes[off + 2..off + 8].fill(0);
            }
            let raw = RawRequest::from_bytes(abi, &bytes).unwrap();
            match parse_request(&raw, &d) {
                Ok(Request::Rw(rw)) => {
                    assert!(rw.pieces().is_empty() || rw.offset() + rw.len() <= d.sectors * 512);
                    assert_eq!(
                        rw.len(),
                        rw.pieces().iter().map(|p| u64::from(p.len())).sum::<u64>()
                    );
                    for p in rw.pieces() {
                        assert!(usize::from(p.offset()) + usize::from(p.len()) <= 4096);
                    }
                }
                Ok(Request::Discard {
                    sector, nr_sectors, ..
                }) => {
                    assert!(sector + nr_sectors <= d.sectors)
                }
                Ok(_) => {}
                Err(r) => assert_eq!(r.id, raw.id()),
            }
        }
    }
}
