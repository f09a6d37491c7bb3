//! A queue's life on its worker: set up, served, stopped or failed, taken
//! off (or abandoned after a panic), and the small services the phases share
//! (engine ops of its own, the timer, rate-limited warnings).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::{Queue, QueueCtx, QueueError, Shared, Tag};
use crate::engine::{ImageId, Op};
use xen_sys::blkif::BLKIF_RSP_ERROR;

/// At most this many failed-I/O warnings per queue per second; the rest are
/// counted and summarised (a failing disk must not flood the log).
const WARN_BURST: u32 = 5;

impl Queue {
    /// Set the queue up on a worker: attach its image to the worker's engine,
    /// arm the event channel poll, queue what a previous daemon left unanswered.
    /// On failure the context comes back (to be dropped on the worker, after
    /// its `finished` flag is set) with the reason.
    pub fn new(
        ctx: Box<QueueCtx>,
        index: u32,
        sh: &mut Shared,
    ) -> Result<Queue, (Box<QueueCtx>, QueueError)> {
        let img = match sh.engine.attach(ctx.file.clone()) {
            Ok(i) => i,
            Err(source) => {
                let image = ctx.image.clone();
                return Err((ctx, QueueError::Attach { image, source }));
            }
        };
        let ctx = *ctx;
        let nslots = ctx.ring.size() as usize;
        let mut q = Queue {
            ctx,
            index,
            img,
            ops: 0,
            evtchn_armed: false,
            timer_at: None,
            slots: (0..nslots).map(|_| None).collect(),
            free_slots: (0..nslots).rev().collect(),
            pending: VecDeque::new(),
            now: Instant::now(),
            barrier_active: false,
            waits_for_worker: false,
            answered: 0,
            front_waited: false,
            stall_reported: None,
            stopping: false,
            failed: None,
            dirty: true,
            responses_pushed: false,
            writes_to_copy: Vec::new(),
            reads_to_copy: Vec::new(),
            warn_window: Instant::now(),
            warned: 0,
            suppressed: 0,
        };
        if let Err(e) = q.arm_evtchn(sh) {
            q.fail(sh, e);
        }
        q.enqueue_replays();
        Ok(q)
    }

    pub(super) fn arm_evtchn(&mut self, sh: &mut Shared) -> Result<(), QueueError> {
        let fd = self.ctx.evtchn.fd();
        self.push_op(sh, Tag::Evtchn, Op::PollAdd { fd })?;
        self.evtchn_armed = true;
        Ok(())
    }

    /// Wake this queue at `at` (a delayed start). One timer at a time: an
    /// earlier one already armed covers it.
    pub fn arm_timer(&mut self, sh: &mut Shared, at: Instant) {
        if self.timer_at.is_some_and(|t| t <= at) || self.stopping {
            return;
        }
        let after = at.saturating_duration_since(Instant::now());
        match self.push_op(sh, Tag::Timer, Op::Timeout { after }) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => warn!("{}: cannot arm timer: {e}", self.ctx.name),
        }
    }

    /// The device is going away: answer what was consumed, take nothing new.
    pub fn request_stop(&mut self, sh: &mut Shared) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.dirty = true;
        self.cancel_waits(sh);
    }

    /// Give up on the ring (the frontend broke the protocol): finish what is in
    /// flight, answer what waits with an error, start nothing more.
    pub(super) fn fail(&mut self, sh: &mut Shared, why: QueueError) {
        warn!("{}: queue failed: {why}", self.ctx.name);
        if self.failed.is_none() {
            self.failed = Some(why);
        }
        for req in std::mem::take(&mut self.pending) {
            self.answer(req, BLKIF_RSP_ERROR, false);
        }
        self.request_stop(sh);
    }

    fn cancel_waits(&mut self, sh: &mut Shared) {
        for tag in [Tag::Evtchn, Tag::Timer] {
            match sh.engine.cancel(self.ud(tag), self.ud(Tag::Cancel)) {
                Ok(true) => self.ops += 1,
                Ok(false) => {}
                Err(e) => warn!("{}: cancel: {e}", self.ctx.name),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    /// Has the frontend produced requests we have not consumed? (For a worker
    /// polling before it sleeps; a broken index counts as work, so the pump
    /// finds and reports it.)
    pub fn has_new_requests(&self) -> bool {
        !self.stopping && self.ctx.ring.unconsumed().map_or(true, |n| n > 0)
    }

    /// Have the next pass pump this queue.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Does the worker need to call [`pump`](Self::pump)?
    pub fn wants_pump(&self) -> bool {
        self.dirty || !self.pending.is_empty()
    }

    /// Take the queue off the worker: detach its image from the engine and
    /// report how it ended. Only after [`super::Pump::Finished`].
    pub fn finish_off(self, sh: &mut Shared) -> Result<(), QueueError> {
        sh.buffers.leave(self.index);
        if let Err(e) = sh.engine.detach(self.img) {
            warn!("{}: {e}", self.ctx.name);
        }
        if self.suppressed > 0 {
            warn!(
                "{}: {} more failed-I/O warning(s) suppressed",
                self.ctx.name, self.suppressed
            );
        }
        let r = match self.failed {
            None => {
                info!("{}: queue stopped", self.ctx.name);
                Ok(())
            }
            Some(e) => Err(e),
        };
        let finished = self.ctx.finished.clone();
        drop(self.ctx); // unmaps the ring, unbinds the event channel
        finished.store(true, Ordering::Release);
        r
    }

    /// The flag the device reads to learn that this queue has finished.
    pub fn finished_flag(&self) -> Arc<AtomicBool> {
        self.ctx.finished.clone()
    }

    /// The queue panicked (a bug in refblk): let go of what can be let go of
    /// without trusting its request state — its place in the buffer line, its
    /// event channel poll and timer, the buffers it holds between two stages,
    /// its ring and event channel — and mark it finished. What is in flight
    /// stays with the engine: those completions come back to the worker, which
    /// frees their buffers. Returns the image to detach from the engine once
    /// they have.
    pub fn abandon(self, sh: &mut Shared) -> ImageId {
        sh.buffers.leave(self.index);
        for tag in [Tag::Evtchn, Tag::Timer] {
            let _ = sh.engine.cancel(self.ud(tag), self.ud(Tag::Cancel));
        }
        for (_, r, _) in self.writes_to_copy {
            sh.engine.free(r);
        }
        for (_, r) in self.reads_to_copy {
            sh.engine.free(r);
        }
        let finished = self.ctx.finished.clone();
        drop(self.ctx); // unmaps the ring, unbinds the event channel
        finished.store(true, Ordering::Release);
        self.img
    }

    /// Warn about a failed I/O, at most [`WARN_BURST`] times a second.
    pub(super) fn warn_io(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if now.duration_since(self.warn_window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    "{}: {} failed-I/O warning(s) suppressed in the last second",
                    self.ctx.name, self.suppressed
                );
            }
            self.warn_window = now;
            self.warned = 0;
            self.suppressed = 0;
        }
        if self.warned < WARN_BURST {
            self.warned += 1;
            warn!("{}: {msg}", self.ctx.name);
        } else {
            self.suppressed += 1;
        }
    }

    /// Take a resize into account (the device's size is read once per pump).
    pub(super) fn refresh_disk(&mut self) {
        let s = self.ctx.sectors.load(Ordering::Acquire);
        if s != self.ctx.disk.sectors {
            info!("{}: disk is now {} sectors", self.ctx.name, s);
            self.ctx.disk.sectors = s;
        }
    }

    /// Queue an engine op of the queue's own (a poll, the timer).
    fn push_op(&mut self, sh: &mut Shared, tag: Tag, op: Op) -> Result<(), QueueError> {
        match sh.engine.push_to(self.img, self.ud(tag), op) {
            Ok(()) => {
                self.ops += 1;
                Ok(())
            }
            Err(r) => Err(QueueError::Engine(r.into_io_error())),
        }
    }
}
