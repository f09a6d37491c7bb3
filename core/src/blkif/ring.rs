//! The backend half of one blkif shared ring (ring.h `BACK_RING`).
//!
//! All access to the guest-shared pages goes through [`Shm`], the only place in
//! this module with `unsafe`: index words are read and written as `AtomicU32`,
//! slots are copied out with volatile 32-bit reads, and responses are written
//! field by field with volatile writes.

use std::fmt;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use xen_sys::ring::{RING_HEADER_SIZE, RING_IDX};

use super::request::{Abi, RawRequest, MAX_SLOT_SIZE};
use crate::platform::{ForeignMapping, PAGE_SIZE};

const REQ_PROD: usize = core::mem::offset_of!(xen_sys::ring::sring_header, req_prod);
const REQ_EVENT: usize = core::mem::offset_of!(xen_sys::ring::sring_header, req_event);
const RSP_PROD: usize = core::mem::offset_of!(xen_sys::ring::sring_header, rsp_prod);
const RSP_EVENT: usize = core::mem::offset_of!(xen_sys::ring::sring_header, rsp_event);

/// Response field offsets, identical in both ABIs (checked below).
const RSP_ID: usize = core::mem::offset_of!(xen_sys::blkif::x86_64::blkif_response, id);
const RSP_OP: usize = core::mem::offset_of!(xen_sys::blkif::x86_64::blkif_response, operation);
const RSP_STATUS: usize = core::mem::offset_of!(xen_sys::blkif::x86_64::blkif_response, status);
const _: () = {
    use core::mem::offset_of;
    use xen_sys::blkif::x86_32::blkif_response as R32;
    assert!(offset_of!(R32, id) == RSP_ID && RSP_ID == 0);
    assert!(offset_of!(R32, operation) == RSP_OP && RSP_OP == 8);
    assert!(offset_of!(R32, status) == RSP_STATUS && RSP_STATUS == 10);
};

/// Errors of a ring. `Overflow` and `ProducerBehindConsumer` mean the frontend
/// is broken or hostile: stop using this ring and disconnect the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The mapping is not 1, 2, 4, 8 or 16 whole pages, or not 8-byte aligned.
    BadMapping { len: usize },
    /// The frontend's `req_prod` is more than a ring's worth ahead of the
    /// responses we produced (ring.h `RING_REQUEST_PROD_OVERFLOW`).
    Overflow {
        req_prod: RING_IDX,
        rsp_prod_pvt: RING_IDX,
        size: u32,
    },
    /// The frontend moved `req_prod` back behind requests we already consumed.
    ProducerBehindConsumer {
        req_prod: RING_IDX,
        req_cons: RING_IDX,
    },
    /// `push_response` with no consumed request left to answer (a backend bug).
    NoOutstandingRequest,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadMapping { len } => write!(
                f,
                "ring mapping of {len} bytes is not 1, 2, 4, 8 or 16 aligned pages"
            ),
            RingError::Overflow {
                req_prod,
                rsp_prod_pvt,
                size,
            } => write!(
                f,
                "frontend provided bogus ring requests: req_prod {req_prod} is {} past rsp_prod {rsp_prod_pvt}, ring size {size}",
                req_prod.wrapping_sub(*rsp_prod_pvt)
            ),
            RingError::ProducerBehindConsumer { req_prod, req_cons } => write!(
                f,
                "frontend moved req_prod back to {req_prod}, behind our req_cons {req_cons}"
            ),
            RingError::NoOutstandingRequest => write!(f, "response pushed with no outstanding request"),
        }
    }
}

impl std::error::Error for RingError {}

/// Raw access to the shared pages. Every offset passed in is computed by
/// `BackRing` from masked indices and checked against `len` here.
struct Shm {
    map: Box<dyn ForeignMapping>,
}

impl Shm {
    fn len(&self) -> usize {
        self.map.len()
    }

    /// One of the four header index words.
    fn index(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= RING_HEADER_SIZE);
        // SAFETY: the mapping is at least one page, 8-byte aligned (checked in
        // `BackRing::new`), and lives as long as `self`; `off` is a 4-aligned
        // header offset. The guest writes these words concurrently, which is
        // exactly what atomics are for; AtomicU32 has the layout of u32.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    /// Copy `out.len()` bytes (a multiple of 4) from 4-aligned `off`.
    fn read_words(&self, off: usize, out: &mut [u8]) {
        assert!(
            off.is_multiple_of(4) && out.len().is_multiple_of(4) && off + out.len() <= self.len()
        );
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            // SAFETY: in bounds and 4-aligned (asserted above; the base is
            // 8-aligned). Volatile: the guest may change the bytes at any time;
            // we read each word once and work only on our copy.
            let w = unsafe { (self.map.as_ptr().add(off + 4 * i) as *const u32).read_volatile() };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
    }

    fn write_u32(&self, off: usize, v: u32) {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len());
        // SAFETY: in bounds and aligned (asserted); volatile write to shared memory.
        unsafe { (self.map.as_ptr().add(off) as *mut u32).write_volatile(v) }
    }

    fn write_u16(&self, off: usize, v: u16) {
        assert!(off.is_multiple_of(2) && off + 2 <= self.len());
        // SAFETY: in bounds and aligned (asserted); volatile write to shared memory.
        unsafe { (self.map.as_ptr().add(off) as *mut u16).write_volatile(v) }
    }

    fn write_u8(&self, off: usize, v: u8) {
        assert!(off < self.len());
        // SAFETY: in bounds (asserted); volatile write to shared memory.
        unsafe { self.map.as_ptr().add(off).write_volatile(v) }
    }
}

/// The backend's view of one blkif ring: consumes requests, produces responses.
///
/// Invariant kept for the caller: `rsp_prod_pvt <= req_cons` (wrapping), so the
/// backend can never produce more responses than it consumed requests
/// ([`BackRing::outstanding`]).
pub struct BackRing {
    shm: Shm,
    abi: Abi,
    nr_pages: usize,
    size: u32,
    req_cons: RING_IDX,
    rsp_prod_pvt: RING_IDX,
    /// The `rsp_prod` value we last published (not re-read from the guest).
    rsp_prod_published: RING_IDX,
}

impl fmt::Debug for BackRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackRing")
            .field("abi", &self.abi)
            .field("nr_pages", &self.nr_pages)
            .field("size", &self.size)
            .field("req_cons", &self.req_cons)
            .field("rsp_prod_pvt", &self.rsp_prod_pvt)
            .finish()
    }
}

impl BackRing {
    /// Take over a mapped ring (`BACK_RING_INIT`). The mapping must be 1, 2,
    /// 4, 8 or 16 pages, 8-byte aligned (page aligned in practice).
    pub fn new(map: Box<dyn ForeignMapping>, abi: Abi) -> Result<BackRing, RingError> {
        let len = map.len();
        let nr_pages = len / PAGE_SIZE;
        if !len.is_multiple_of(PAGE_SIZE)
            || !matches!(nr_pages, 1 | 2 | 4 | 8 | 16)
            || !(map.as_ptr() as usize).is_multiple_of(8)
        {
            return Err(RingError::BadMapping { len });
        }
        let size = abi.ring_size(nr_pages);
        // A fresh ring has all indices at 0 (the frontend's SHARED_RING_INIT);
        // BACK_RING_INIT starts req_cons and rsp_prod_pvt at 0 as well.
        Ok(BackRing {
            shm: Shm { map },
            abi,
            nr_pages,
            size,
            req_cons: 0,
            rsp_prod_pvt: 0,
            rsp_prod_published: 0,
        })
    }

    /// Take over a ring another backend process served (a restart): consume
    /// from `req_cons` on and produce responses from `rsp_prod` on. The
    /// caller got both from its journal and the ring's published `rsp_prod`
    /// ([`shared_rsp_prod`](Self::shared_rsp_prod)); `req_cons - rsp_prod`
    /// requests are outstanding and must each be answered once.
    pub fn resume_at(&mut self, req_cons: RING_IDX, rsp_prod: RING_IDX) -> Result<(), RingError> {
        if req_cons.wrapping_sub(rsp_prod) > self.size {
            return Err(RingError::Overflow {
                req_prod: req_cons,
                rsp_prod_pvt: rsp_prod,
                size: self.size,
            });
        }
        self.req_cons = req_cons;
        self.rsp_prod_pvt = rsp_prod;
        self.rsp_prod_published = rsp_prod;
        Ok(())
    }

    /// The `rsp_prod` in the shared page (what the guest sees as published;
    /// the guest can write it too, so only a hint to be checked).
    pub fn shared_rsp_prod(&self) -> RING_IDX {
        self.shm.index(RSP_PROD).load(Ordering::Acquire)
    }

    /// The `rsp_prod` we last published.
    pub fn rsp_prod_published(&self) -> RING_IDX {
        self.rsp_prod_published
    }

    /// Tests: start with every index at `start` (to exercise u32 wrap-around).
    #[cfg(test)]
    pub(crate) fn new_at(
        map: Box<dyn ForeignMapping>,
        abi: Abi,
        start: RING_IDX,
    ) -> Result<BackRing, RingError> {
        let mut r = BackRing::new(map, abi)?;
        r.req_cons = start;
        r.rsp_prod_pvt = start;
        r.rsp_prod_published = start;
        Ok(r)
    }

    /// The ring's ABI.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Pages in the ring.
    pub fn nr_pages(&self) -> usize {
        self.nr_pages
    }

    /// Slots in the ring (32 × pages).
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Requests consumed but not yet answered with `push_response`.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Our consumer index (for logs and tests).
    pub fn req_cons(&self) -> RING_IDX {
        self.req_cons
    }

    /// Our private response producer index (for logs and tests).
    pub fn rsp_prod_pvt(&self) -> RING_IDX {
        self.rsp_prod_pvt
    }

    fn slot_offset(&self, idx: RING_IDX) -> usize {
        RING_HEADER_SIZE + (idx & (self.size - 1)) as usize * self.abi.slot_size()
    }

    /// Read `req_prod` (acquire) and check it against a ring's worth.
    fn req_prod(&self) -> Result<RING_IDX, RingError> {
        let req_prod = self.shm.index(REQ_PROD).load(Ordering::Acquire);
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.size {
            return Err(RingError::Overflow {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.size,
            });
        }
        // Both in the frame of rsp_prod_pvt: req_cons is at most a ring ahead.
        if req_prod.wrapping_sub(self.rsp_prod_pvt) < self.outstanding() {
            return Err(RingError::ProducerBehindConsumer {
                req_prod,
                req_cons: self.req_cons,
            });
        }
        Ok(req_prod)
    }

    /// Requests the frontend produced that we have not consumed
    /// (`RING_HAS_UNCONSUMED_REQUESTS`, bounded by free response slots).
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let req_prod = self.req_prod()?;
        let reqs = req_prod.wrapping_sub(self.req_cons);
        let room = self.size - self.outstanding();
        Ok(reqs.min(room))
    }

    /// Copy the next request out of the ring, once. `Ok(None)` when the ring is
    /// empty (or every slot awaits its response). `Err(Overflow)` or
    /// `Err(ProducerBehindConsumer)` when the frontend's index is bogus: stop
    /// using the ring and disconnect.
    pub fn next_request(&mut self) -> Result<Option<RawRequest>, RingError> {
        let req_prod = self.req_prod()?;
        if req_prod == self.req_cons || self.outstanding() >= self.size {
            return Ok(None);
        }
        let slot = self.abi.slot_size();
        let mut bytes = [0u8; MAX_SLOT_SIZE];
        // The acquire load of req_prod orders these reads after it (ring.h rmb).
        self.shm
            .read_words(self.slot_offset(self.req_cons), &mut bytes[..slot]);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(RawRequest::from_bytes(self.abi, &bytes[..slot]))
    }

    /// Write the response for one consumed request into the next response slot,
    /// field by field: `id`, `operation`, `status`; the padding inside the
    /// response (byte 9, and bytes 12..16 in the x86_64 ABI) is zeroed so no
    /// stale byte of ours or the guest's request appears there. Bytes of the
    /// slot after the response are not touched. Not visible to the guest
    /// until [`push_responses_and_check_notify`](Self::push_responses_and_check_notify).
    pub fn push_response(&mut self, id: u64, op: u8, status: i16) -> Result<(), RingError> {
        if self.outstanding() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        let base = self.slot_offset(self.rsp_prod_pvt);
        let id = id.to_le_bytes();
        self.shm.write_u32(
            base + RSP_ID,
            u32::from_ne_bytes([id[0], id[1], id[2], id[3]]),
        );
        self.shm.write_u32(
            base + RSP_ID + 4,
            u32::from_ne_bytes([id[4], id[5], id[6], id[7]]),
        );
        self.shm.write_u8(base + RSP_OP, op);
        self.shm.write_u8(base + RSP_OP + 1, 0);
        self.shm
            .write_u16(base + RSP_STATUS, u16::from_ne_bytes(status.to_le_bytes()));
        if self.abi.response_size() > RSP_STATUS + 2 {
            self.shm.write_u32(base + RSP_STATUS + 2, 0);
        }
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish the pushed responses (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`):
    /// release-store `rsp_prod`, full barrier, then whether the frontend asked
    /// to be notified (its `rsp_event` lies in the newly published range).
    pub fn push_responses_and_check_notify(&mut self) -> bool {
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        // Release: the response slots are visible before the index (ring.h wmb).
        self.shm.index(RSP_PROD).store(new, Ordering::Release);
        self.rsp_prod_published = new;
        // The frontend sees the new rsp_prod before we read rsp_event (ring.h mb).
        fence(Ordering::SeqCst);
        let rsp_event = self.shm.index(RSP_EVENT).load(Ordering::Acquire);
        new.wrapping_sub(rsp_event) < new.wrapping_sub(old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask the frontend to
    /// notify us on the next request (`req_event = req_cons + 1`), full
    /// barrier, and re-check. `true` means there is work (call
    /// [`next_request`](Self::next_request); a bogus index shows up there as
    /// `Overflow`), `false` means sleep until the event channel fires.
    pub fn final_check_for_requests(&mut self) -> bool {
        match self.unconsumed() {
            Ok(0) => {}
            Ok(_) | Err(_) => return true,
        }
        self.shm
            .index(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        !matches!(self.unconsumed(), Ok(0))
    }
}
