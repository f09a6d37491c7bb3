//! Phase 4, complete: an engine completion moves its request on (what a
//! success means is its operation's, [`ops`](super::ops)). A read's data goes out to the guest (one grant copy for every read done since the
//! last pump, or straight into persistently mapped pages); a barrier's write
//! is followed by its fdatasync; everything else is answered. A failed file
//! op is answered `BLKIF_RSP_ERROR` (`EOPNOTSUPP` for a discard the file
//! system cannot do), never retried and never a reason to drop the ring.

use std::io;

use log::{debug, warn};

use super::data::{grant_copy_batch, pieces_of, split};
use super::{Queue, QueueError, Shared, Tag};
use crate::engine::{BufRegion, Completion};
use crate::platform::{CopySeg, GrantStatus};
use xen_sys::blkif::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};

impl Queue {
    pub(super) fn complete(
        &mut self,
        sh: &mut Shared,
        tag: Tag,
        c: Completion,
    ) -> Result<(), QueueError> {
        let slot = match tag {
            Tag::Evtchn => return self.on_kick(sh, &c),
            Tag::Timer => {
                self.timer_at = None;
                return Ok(());
            }
            Tag::Cancel => return Ok(()),
            Tag::Slot(s) => s as usize,
        };
        let Some(io) = self
            .slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .and_then(|r| r.io())
        else {
            warn!("{}: completion for unknown slot {slot}", self.ctx.name);
            if let Some(r) = c.region {
                sh.engine.free(r);
            }
            return Ok(());
        };
        if c.result < 0 {
            let e = io::Error::from_raw_os_error(-c.result);
            let image = self.ctx.image.clone();
            self.warn_io(format_args!(
                "{io:?} on {} failed: {e}; answering BLKIF_RSP_ERROR",
                image.display()
            ));
            if let Some(r) = c.region {
                sh.engine.free(r);
            }
            self.finish(slot, io.error_status(-c.result));
            return Ok(());
        }
        self.op_done(sh, slot, io, c.region);
        Ok(())
    }

    /// A read's data is in `region`: out to the guest now through its
    /// persistently mapped pages, or with the next pump's one grant copy
    /// ([`copy_out_reads`](Self::copy_out_reads)).
    pub(super) fn read_to_guest(&mut self, sh: &mut Shared, slot: usize, region: BufRegion) {
        if self.ctx.persistent.is_none() {
            self.reads_to_copy.push((slot, region));
            return;
        }
        let ok = self.copy_to_guest(sh, slot, &region);
        sh.engine.free(region);
        match ok {
            Ok(()) => self.finish(slot, BLKIF_RSP_OKAY),
            Err(st) => {
                debug!("{}: grant copy to guest failed: {st:?}", self.ctx.name);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }

    /// The event channel fired (the frontend kicked us): acknowledge it and
    /// poll for the next one; the pump that follows consumes the requests.
    fn on_kick(&mut self, sh: &mut Shared, c: &Completion) -> Result<(), QueueError> {
        self.evtchn_armed = false;
        if self.stopping {
            return Ok(());
        }
        if let Err(e) = self.ctx.evtchn.ack() {
            return Err(QueueError::EventChannel(e));
        }
        if c.result < 0 {
            return Err(QueueError::EventChannelPoll(io::Error::from_raw_os_error(
                -c.result,
            )));
        }
        self.arm_evtchn(sh)
    }

    /// Grant-copy the data of every read done since the last pump out to the
    /// guest's pages, with one grant copy, and answer them.
    pub(super) fn copy_out_reads(&mut self, sh: &mut Shared) {
        if self.reads_to_copy.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.reads_to_copy);
        let mut segs = Vec::new();
        for (slot, region) in &batch {
            let pieces = pieces_of(&self.slots, *slot);
            segs.extend(
                split(pieces, sh.engine.buf(region)).map(|(p, src)| CopySeg::ToGuest {
                    gref: p.gref(),
                    offset: p.offset(),
                    src,
                }),
            );
        }
        let ok = grant_copy_batch(
            &*self.ctx.platform,
            self.ctx.domid,
            &mut segs,
            &mut sh.copy_status,
        );
        drop(segs);
        let mut at = 0;
        for (slot, region) in batch {
            let n = pieces_of(&self.slots, slot).len();
            let good = ok
                && sh.copy_status[at..at + n]
                    .iter()
                    .all(|s| *s == GrantStatus::Okay);
            at += n;
            sh.engine.free(region);
            if good {
                self.finish(slot, BLKIF_RSP_OKAY);
            } else {
                debug!("{}: grant copy to guest failed", self.ctx.name);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }
}
