//! The named points where what is not the request path plugs into it: the
//! statistics ([`QueueStats`](super::QueueStats)), the restart journal
//! ([`Journal`](super::super::restart::Journal)), the test observer
//! ([`IoObserver`](super::IoObserver)) and the panic-injection test hook. The
//! phases call these and nothing else of them:
//!
//! | point | called by | statistics | journal |
//! |---|---|---|---|
//! | [`Queue::journal_consumed`] | parse, per slot taken off the ring | | record a copy of the request |
//! | [`Queue::on_consumed`] | parse, per request (also replayed ones) | requests, queue depth | |
//! | [`Queue::on_started`] | submit, when a request starts on the image | reads/writes/flushes/discards, in flight | |
//! | [`Queue::on_answered`] / [`Queue::on_rejected`] | respond | latency, sectors, errors, bytes, fdatasyncs | |
//! | [`Queue::journal_answered`] | respond, per response | | where its response goes |
//! | [`Queue::journal_published`] | respond, per publication | | forget what was published |

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Io, IoEvent, Queue, QueueError, Req, NO_ENTRY};
use crate::blkif::RawRequest;
use xen_sys::blkif::{BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_OKAY};

impl Queue {
    /// A slot was taken off the ring: record it in the journal until its
    /// response is published. Its journal entry, or NO_ENTRY without one.
    pub(super) fn journal_consumed(&mut self, raw: &RawRequest) -> Result<u32, QueueError> {
        let idx = self.ctx.ring.req_cons().wrapping_sub(1);
        match self.ctx.journal.as_mut() {
            None => Ok(NO_ENTRY),
            Some(j) => j
                .consumed(idx, raw.bytes())
                .ok_or_else(|| QueueError::JournalFull(j.path().to_path_buf())),
        }
    }

    /// A request was consumed (from the ring or the journal): its consume
    /// time for the latency statistics (None when they are off).
    pub(super) fn on_consumed(&mut self, raw: &RawRequest) -> Option<Instant> {
        super::super::testing::maybe_panic(&self.ctx.name);
        self.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let t0 = self.ctx.stats.consumed(self.now); // queue depth + 1
        self.observe(IoEvent::Consumed {
            id: raw.id(),
            op: raw.operation(),
        });
        t0
    }

    /// A request started on the image (its stage is set).
    pub(super) fn on_started(&mut self, req: &Req) {
        let s = &self.ctx.stats;
        s.started(); // in flight + 1
        let counter = match req.io() {
            Some(Io::Read | Io::ReadZeroCopy) => Some(&s.reads),
            Some(Io::Write | Io::BarrierWrite) => Some(&s.writes),
            Some(Io::Flush) if req.op == BLKIF_OP_FLUSH_DISKCACHE => Some(&s.flushes),
            Some(Io::Discard) => Some(&s.discards),
            _ => None, // a barrier without data: only its flush
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request is answered with `status`; `started`: it had reached
    /// [`on_started`](Self::on_started). Data bytes count when the answer
    /// is OKAY: a read's once its data reached the guest, a write's (also a
    /// barrier's) once it is on the image (and, for a barrier, durable).
    pub(super) fn on_answered(&mut self, req: &Req, status: i16, started: bool) {
        let s = &self.ctx.stats;
        let ok = status == BLKIF_RSP_OKAY;
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        if ok {
            match req.io() {
                Some(Io::Read) => {
                    s.bytes_read.fetch_add(req.len, Ordering::Relaxed);
                }
                Some(Io::ReadZeroCopy) => {
                    s.bytes_read.fetch_add(req.len, Ordering::Relaxed);
                    s.zero_copy_reads.fetch_add(1, Ordering::Relaxed);
                }
                Some(Io::Write) => {
                    s.bytes_written.fetch_add(req.len, Ordering::Relaxed);
                }
                Some(Io::Flush) => {
                    s.fdatasyncs.fetch_add(1, Ordering::Relaxed);
                    if req.op == BLKIF_OP_WRITE_BARRIER {
                        s.bytes_written.fetch_add(req.len, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        let len = if started { req.len } else { 0 };
        s.answered(req.t0, self.now, req.op, started, len, ok);
    }

    /// A request failed validation.
    pub(super) fn on_rejected(&mut self, t0: Option<Instant>, op: u8) {
        let s = &self.ctx.stats;
        s.rejected.fetch_add(1, Ordering::Relaxed);
        s.answered(t0, self.now, op, false, 0, false);
    }

    /// A response is about to be pushed for journal entry `jent`.
    pub(super) fn journal_answered(&mut self, jent: u32) {
        if let Some(j) = self.ctx.journal.as_mut() {
            if jent != NO_ENTRY && self.ctx.ring.outstanding() > 0 {
                j.answered(jent, self.ctx.ring.rsp_prod_pvt());
            }
        }
    }

    /// Responses were published.
    pub(super) fn journal_published(&mut self) {
        if let Some(j) = self.ctx.journal.as_mut() {
            j.published(self.ctx.ring.rsp_prod_published());
        }
    }

    /// Tell the test observer, if any.
    pub(super) fn observe(&self, ev: IoEvent) {
        if let Some(o) = &self.ctx.observer {
            o.0.event(&self.ctx.name, ev);
        }
    }

    /// Tell the test observer about the request in `slot`.
    pub(super) fn observe_slot(&self, slot: usize, ev: impl FnOnce(u64) -> IoEvent) {
        if self.ctx.observer.is_some() {
            let id = self
                .slots
                .get(slot)
                .and_then(|s| s.as_ref())
                .map_or(u64::MAX, |r| r.id);
            self.observe(ev(id));
        }
    }
}
