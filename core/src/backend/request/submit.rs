//! Phase 3, submit: a request admitted to a slot starts (as its operation
//! says, [`ops`](super::ops)). An indirect request first fetches its segment
//! list from the guest's indirect pages (and waits again as a plain read or
//! write); a write's data is copied in from the guest (one grant copy for
//! every write of the pass); then the file op is queued on the worker's
//! engine. A refused submission is answered, never
//! retried forever.

use log::debug;

use super::data::{grant_copy_all, grant_copy_batch, split_mut, Data};
use super::{Io, Queue, Req, Shared, Stage, Tag};
use crate::blkif::{IndirectRequest, RwRequest};
use crate::engine::{BufRegion, Op};
use crate::platform::{CopySeg, GrantStatus, PAGE_SIZE};
use xen_sys::blkif::BLKIF_RSP_ERROR;

impl Queue {
    /// Start `req` in ring slot `slot` (taken from `free_slots`), with its
    /// buffer if it moves data: what it starts as is its operation's
    /// ([`ops`](super::ops)).
    pub(super) fn start(&mut self, sh: &mut Shared, slot: usize, mut req: Req, data: Option<Data>) {
        match std::mem::replace(&mut req.stage, Stage::Running(Io::Flush)) {
            Stage::Waiting(r) => self.start_op(sh, slot, req, r, data),
            Stage::Running(io) => {
                // Only waiting requests are in the line: a bug, answered.
                log::error!("{}: request {} started twice", self.ctx.name, req.id);
                req.stage = Stage::Running(io);
                self.free_slots.push(slot);
                if let Some(Data::Buf(r)) = data {
                    sh.engine.free(r);
                }
                self.answer(req, BLKIF_RSP_ERROR, false);
            }
        }
    }

    /// A started write's data comes from the guest: copied now from
    /// persistently mapped pages and submitted, or left for the pass's one
    /// grant copy ([`copy_in_writes`](Self::copy_in_writes)).
    pub(super) fn write_from_guest(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        region: BufRegion,
        offset: u64,
    ) {
        if self.ctx.persistent.is_none() {
            self.writes_to_copy.push((slot, region, offset));
            return;
        }
        if let Err(st) = self.copy_from_guest(sh, slot, &region) {
            debug!("{}: grant copy from guest failed: {st:?}", self.ctx.name);
            sh.engine.free(region);
            self.finish(slot, BLKIF_RSP_ERROR);
            return;
        }
        self.submit_or_fail(sh, slot, Op::Write { offset, region });
    }

    /// Queue `op` for `slot`; if the engine refuses it, answer the request.
    pub(super) fn submit_or_fail(&mut self, sh: &mut Shared, slot: usize, op: Op) {
        if matches!(op, Op::Fdatasync) {
            self.observe_slot(slot, |id| super::IoEvent::FsyncIssued { id });
        }
        match sh
            .engine
            .push_to(self.img, self.ud(Tag::Slot(slot as u32)), op)
        {
            Ok(()) => self.ops += 1,
            Err(rej) => {
                if let Some(r) = rej.op.into_region() {
                    sh.engine.free(r);
                }
                self.warn_io(format_args!("cannot queue I/O: {:?}", rej.reason));
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }

    /// Read an indirect request's segment pages from the guest and parse
    /// them into a plain read or write.
    pub(super) fn fetch_indirect(
        &mut self,
        sh: &mut Shared,
        ind: &IndirectRequest,
    ) -> Result<RwRequest, (i16, String)> {
        let grefs = ind.page_grefs();
        let n = grefs.len();
        let buf = &mut sh.indirect[..n * PAGE_SIZE];
        if let Some(pg) = self.ctx.persistent.as_mut() {
            for (dst, &gref) in buf.chunks_mut(PAGE_SIZE).zip(grefs) {
                pg.copy_from(gref, 0, dst)
                    .map_err(|st| (BLKIF_RSP_ERROR, format!("indirect page: {st:?}")))?;
            }
        } else {
            let mut segs: Vec<CopySeg<'_>> = buf
                .chunks_mut(PAGE_SIZE)
                .zip(grefs)
                .map(|(dst, &gref)| CopySeg::FromGuest {
                    gref,
                    offset: 0,
                    dst,
                })
                .collect();
            let res = grant_copy_all(
                &*self.ctx.platform,
                self.ctx.domid,
                &mut segs,
                &mut sh.copy_status,
            );
            drop(segs);
            if let Err(st) = res {
                return Err((BLKIF_RSP_ERROR, format!("indirect page: {st:?}")));
            }
        }
        ind.complete(&sh.indirect[..n * PAGE_SIZE], &self.ctx.disk)
            .map_err(|rej| (rej.status, rej.to_string()))
    }

    /// Grant-copy the data of every write started in this pass from the guest's
    /// pages, with one grant copy, and queue the writes whose copy succeeded.
    pub(super) fn copy_in_writes(&mut self, sh: &mut Shared) {
        if self.writes_to_copy.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.writes_to_copy);
        let regions: Vec<&BufRegion> = batch.iter().map(|(_, r, _)| r).collect();
        let bufs = sh.engine.bufs_mut(&regions);
        let mut segs = Vec::new();
        for ((slot, _, _), buf) in batch.iter().zip(bufs) {
            let pieces = super::data::pieces_of(&self.slots, *slot);
            segs.extend(split_mut(pieces, buf).map(|(p, dst)| CopySeg::FromGuest {
                gref: p.gref(),
                offset: p.offset(),
                dst,
            }));
        }
        let ok = grant_copy_batch(
            &*self.ctx.platform,
            self.ctx.domid,
            &mut segs,
            &mut sh.copy_status,
        );
        drop(segs);
        let mut at = 0;
        for (slot, region, offset) in batch {
            let n = super::data::pieces_of(&self.slots, slot).len();
            let good = ok
                && sh.copy_status[at..at + n]
                    .iter()
                    .all(|s| *s == GrantStatus::Okay);
            at += n;
            if good {
                self.submit_or_fail(sh, slot, Op::Write { offset, region });
            } else {
                debug!("{}: grant copy from guest failed", self.ctx.name);
                sh.engine.free(region);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }
}
