//! Phase 5, respond: every consumed request gets exactly one response — from
//! its slot when it ran ([`Queue::finish`]), or at once when it was rejected
//! or given up before it started. Responses are pushed as they come and
//! published together at the end of a pump; the frontend is notified only
//! if it asked (`rsp_event`).

use log::warn;

use super::{IoEvent, Queue, Req};

impl Queue {
    /// Answer the request in `slot` and free the slot.
    pub(super) fn finish(&mut self, slot: usize, status: i16) {
        let Some(req) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        // While a barrier is active it is the only request in flight (it started
        // after a drain and blocks everything behind it), so this answer ends it.
        self.barrier_active = false;
        self.answer(req, status, true);
    }

    /// Answer a request that ran (`started`) or was given up before it
    /// started (a failed queue).
    pub(super) fn answer(&mut self, req: Req, status: i16, started: bool) {
        self.on_answered(&req, status, started);
        self.respond(req.jent, req.id, req.op, status);
    }

    /// Answer a request that failed validation (at parse, or when its
    /// indirect segments were fetched): counted as rejected, not as an error.
    pub(super) fn reject(
        &mut self,
        jent: u32,
        t0: Option<std::time::Instant>,
        id: u64,
        op: u8,
        status: i16,
    ) {
        self.on_rejected(t0, op);
        self.respond(jent, id, op, status);
    }

    fn respond(&mut self, jent: u32, id: u64, op: u8, status: i16) {
        self.answered += 1;
        self.journal_answered(jent);
        self.observe(IoEvent::Responded { id, op, status });
        match self.ctx.ring.push_response(id, op, status) {
            Ok(()) => self.responses_pushed = true,
            Err(e) => warn!("{}: cannot answer request {id}: {e}", self.ctx.name),
        }
    }

    /// Publish the responses pushed since the last call, and notify the
    /// frontend if it asked.
    pub(super) fn publish_responses(&mut self) {
        if !self.responses_pushed {
            return;
        }
        self.responses_pushed = false;
        let notify = self.ctx.ring.push_responses_and_check_notify();
        self.journal_published();
        if notify {
            if let Err(e) = self.ctx.evtchn.notify() {
                warn!("{}: notify failed: {e}", self.ctx.name);
            }
        }
    }
}
