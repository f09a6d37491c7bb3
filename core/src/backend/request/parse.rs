//! Phase 1, parse: take each new request off the ring (its slot copied out
//! of the shared page once), validate the copy into a [`Req`] that waits to
//! start, or answer the rejection at once. After a restart, the requests a
//! previous daemon consumed and did not answer come first, from the journal.

use std::sync::atomic::Ordering;

use log::{debug, info, warn};

use super::{Queue, QueueError, Req, Stage};
use crate::blkif::{parse_request, RawRequest, Request};

/// At most this many parsed requests wait to start before we stop consuming.
const MAX_PENDING: usize = 64;

impl Queue {
    /// May another request be taken off the ring?
    pub(super) fn can_consume(&self) -> bool {
        // Every consumed request holds a ring slot until answered (outstanding()).
        let ring = &self.ctx.ring;
        // With a journal, also until its answer is published: the journal has
        // one entry per slot. A frontend cannot produce past the responses it
        // saw published, so this never stalls an honest one.
        let unpublished = ring.req_cons().wrapping_sub(ring.rsp_prod_published());
        ring.outstanding() < ring.size()
            && self.pending.len() < MAX_PENDING
            && (self.ctx.journal.is_none() || unpublished < ring.size())
    }

    /// Queue the requests a previous daemon left unanswered, in their order.
    pub(super) fn enqueue_replays(&mut self) {
        let replay = std::mem::take(&mut self.ctx.replay);
        if replay.is_empty() {
            return;
        }
        info!(
            "{}: re-executing {} request(s) consumed before the restart",
            self.ctx.name,
            replay.len()
        );
        let abi = self.ctx.ring.abi();
        for r in replay {
            self.ctx.stats.replayed.fetch_add(1, Ordering::Relaxed);
            match RawRequest::from_bytes(abi, &r.bytes) {
                Some(raw) => self.accept(r.entry, &raw),
                None => warn!("{}: journal entry {} unreadable", self.ctx.name, r.entry),
            }
        }
    }

    /// Take every available request off the ring.
    pub(super) fn consume(&mut self) -> Result<(), QueueError> {
        while self.can_consume() {
            let raw = match self.ctx.ring.next_request() {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => return Err(QueueError::Ring(e)),
            };
            let jent = self.journal_consumed(&raw)?;
            self.accept(jent, &raw);
        }
        Ok(())
    }

    /// Validate one consumed request: queue it, or answer a rejection.
    fn accept(&mut self, jent: u32, raw: &RawRequest) {
        let t0 = self.on_consumed(raw);
        match parse_request(raw, &self.ctx.disk) {
            Ok(req) => self.pending.push_back(waiting(jent, t0, req)),
            Err(rej) => {
                debug!("{}: rejected request: {rej}", self.ctx.name);
                self.reject(jent, t0, rej.id, rej.operation, rej.status);
            }
        }
    }
}

/// A validated request, waiting to start.
fn waiting(jent: u32, t0: Option<std::time::Instant>, req: Request) -> Req {
    Req {
        jent,
        id: req.id(),
        op: req.response_op(),
        t0,
        len: req.data_len(),
        pieces: Vec::new(),
        stage: Stage::Waiting(req),
    }
}
