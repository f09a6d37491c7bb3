//! The frontend half of one shared ring (ring.h `FRONT_RING`), on the guest's
//! own pages. The backend reads and writes these pages concurrently.

use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::wire::{self, Abi};
use crate::GuestPages;
use refblk_core::platform::ForeignMapping;

/// One ring: `SHARED_RING_INIT` + `FRONT_RING_INIT` state.
pub(crate) struct FrontRing {
    pages: GuestPages,
    abi: Abi,
    size: u32,
    /// Requests written but maybe not yet published.
    pub req_prod_pvt: u32,
    /// Next response to consume.
    pub rsp_cons: u32,
}

impl FrontRing {
    /// Initialise the shared ring in `pages` (zeroed guest pages):
    /// req_prod = rsp_prod = 0, req_event = rsp_event = 1.
    pub fn new(pages: GuestPages, abi: Abi) -> FrontRing {
        let size = abi.ring_size(pages.len() / 4096);
        let r = FrontRing {
            pages,
            abi,
            size,
            req_prod_pvt: 0,
            rsp_cons: 0,
        };
        let zero = [0u8; wire::RING_HEADER];
        r.pages.copy_in(0, &zero).expect("ring header in range");
        r.index(wire::REQ_PROD).store(0, Ordering::Relaxed);
        r.index(wire::RSP_PROD).store(0, Ordering::Relaxed);
        r.index(wire::REQ_EVENT).store(1, Ordering::Relaxed);
        r.index(wire::RSP_EVENT).store(1, Ordering::Release);
        r
    }

    fn index(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= wire::RING_HEADER);
        // SAFETY: the guest pages are mapped for as long as `self.pages` lives,
        // page aligned, and `off` is a 4-aligned offset inside the ring header.
        // The backend accesses these words concurrently from another thread or
        // process; AtomicU32 has the layout of u32 and is the right type for it.
        unsafe { &*(self.pages.as_ptr().add(off) as *const AtomicU32) }
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Slots free for new requests (`RING_FULL` when 0).
    pub fn free_slots(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    fn slot_offset(&self, idx: u32) -> usize {
        wire::RING_HEADER + (idx & (self.size - 1)) as usize * self.abi.slot_size()
    }

    /// Write `bytes` (at most one slot) into the slot of ring index `idx`.
    pub fn write_slot(&self, idx: u32, bytes: &[u8]) {
        let n = bytes.len().min(self.abi.slot_size());
        self.pages
            .copy_in(self.slot_offset(idx), &bytes[..n])
            .expect("slot in range");
    }

    /// Copy the slot of ring index `idx` out.
    pub fn read_slot(&self, idx: u32, out: &mut [u8]) {
        let n = out.len().min(self.abi.slot_size());
        self.pages
            .copy_out(self.slot_offset(idx), &mut out[..n])
            .expect("slot in range");
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publish `req_prod_pvt`, then
    /// whether the backend asked to be notified (its `req_event` lies in the
    /// newly published range).
    pub fn push_requests_and_check_notify(&self) -> bool {
        let old = self.index(wire::REQ_PROD).load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        // Release: slots before the index (ring.h wmb).
        self.index(wire::REQ_PROD).store(new, Ordering::Release);
        // The backend sees req_prod before we read req_event (ring.h mb).
        fence(Ordering::SeqCst);
        let req_event = self.index(wire::REQ_EVENT).load(Ordering::Acquire);
        new.wrapping_sub(req_event) < new.wrapping_sub(old)
    }

    /// The backend's `rsp_prod` (acquire: response slots are read after it).
    pub fn rsp_prod(&self) -> u32 {
        self.index(wire::RSP_PROD).load(Ordering::Acquire)
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: with nothing left to consume, ask for
    /// an event at the next response (`rsp_event = rsp_cons + 1`) and look
    /// again. `true` means there are responses to consume.
    pub fn final_check_for_responses(&self) -> bool {
        if self.rsp_prod() != self.rsp_cons {
            return true;
        }
        self.index(wire::RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        self.rsp_prod() != self.rsp_cons
    }

    /// Hostile: store any value in the shared `req_prod`.
    pub fn set_shared_req_prod(&self, v: u32) {
        self.index(wire::REQ_PROD).store(v, Ordering::Release);
        fence(Ordering::SeqCst);
    }
}
