//! One blkif ring (queue): its request path. Queues run on the io_uring workers
//! ([`super::worker`]): a worker owns one engine and serves many queues with it.
//!
//! The request path, per batch:
//! 1. **parse**: [`BackRing::next_request`] copies each new slot out of the shared
//!    page once; [`parse_request`] validates the copy. Rejections are answered at
//!    once.
//! 2. **start** (FIFO): a read/write gets a registered-buffer region; for a write
//!    the guest's pages are grant-copied into it; then the op is queued on the
//!    engine. FLUSH drains (waits for every earlier I/O) and then queues an
//!    fdatasync; WRITE_BARRIER drains, writes, then fdatasyncs; DISCARD becomes a
//!    punch hole (or zero-range when secure).
//! 3. **submit**: the worker submits once for all its queues and sleeps in
//!    `io_uring_enter`; every queue's event channel is a one-shot poll on the
//!    worker's ring, so the worker sleeps in exactly one place.
//! 4. **complete**: reads are grant-copied out to the guest's pages; every
//!    request gets exactly one response.
//! 5. **respond**: responses are published together and the frontend is notified
//!    only if it asked (`rsp_event`); before sleeping, the ring.h final check.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::limiter::{LimiterChain, MAX_WAIT};
use super::pgrants::PersistentGrants;
use super::state::{Journal, Replay};
use crate::blkif::{
    parse_request, BackRing, DiskInfo, IndirectRequest, Piece, RawRequest, Request, RwOp, RwRequest,
};
use crate::engine::{BufRegion, Completion, Engine, ImageFile, ImageId, Op};
use crate::platform::{CopySeg, DomId, EventChannel, GrantStatus, Platform, PAGE_SIZE};
use xen_sys::blkif::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};

/// Tag (low 32 bits of user_data) of the event channel poll.
const TAG_EVTCHN: u32 = u32::MAX;
/// Tag of the queue's timer (a delayed start).
const TAG_TIMER: u32 = u32::MAX - 1;
/// Tag of the cancellations issued when the queue stops.
const TAG_CANCEL: u32 = u32::MAX - 2;
/// Engine op slots kept free (the engine is shared by the worker's queues) for
/// poll re-arms, timers, cancellations and a barrier's flush.
const ENGINE_RESERVE: usize = 8;
/// At most this many failed-I/O warnings per queue per second; the rest are
/// counted and summarised (a failing disk must not flood the log).
const WARN_BURST: u32 = 5;
/// At most this many parsed requests wait for buffers before we stop consuming.
const MAX_PENDING: usize = 64;
/// Journal entry of a request on a queue without a journal.
const NO_ENTRY: u32 = u32::MAX;

// stats: the counters moved to stats.rs (re-exported here).
pub use super::stats::QueueStats;

/// What a queue did, in the order it did it (see [`IoObserver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEvent {
    /// A request was taken off the ring (or out of the journal after a
    /// restart), in ring order.
    Consumed { id: u64, op: u8 },
    /// The file write of a WRITE (or of a barrier's data) completed.
    WriteDone { id: u64 },
    /// The fdatasync of a FLUSH or WRITE_BARRIER was handed to the kernel.
    FsyncIssued { id: u64 },
    /// That fdatasync completed successfully.
    FsyncDone { id: u64 },
    /// A response was pushed (published with the next batch).
    Responded { id: u64, op: u8, status: i16 },
}

/// Watches what every queue does, for tests that check ordering rules (a
/// flush is answered only after the writes it covers are durable). Called on
/// the queue thread; keep it cheap.
pub trait IoObserver: Send + Sync {
    fn event(&self, queue: &str, ev: IoEvent);
}

/// An optional observer in [`super::BackendConfig`].
#[derive(Clone)]
pub struct Observer(pub Arc<dyn IoObserver>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// Everything a queue needs; moved to its worker.
pub(crate) struct QueueCtx {
    pub name: String,
    /// The image path (for error messages).
    pub image: std::path::PathBuf,
    /// The open image, attached to the worker's engine while the queue runs.
    pub file: Arc<ImageFile>,
    pub platform: Arc<dyn Platform>,
    pub domid: DomId,
    pub ring: BackRing,
    pub evtchn: Box<dyn EventChannel>,
    pub disk: DiskInfo,
    /// The device size in sectors, updated on resize.
    pub sectors: Arc<AtomicU64>,
    pub stats: Arc<QueueStats>,
    /// Set when the queue has finished (for whatever reason) and let go of its
    /// ring, event channel and image.
    pub finished: Arc<AtomicBool>,
    /// Persistent grants negotiated: data pages are mapped once and copied with
    /// memcpy instead of a grant copy per request.
    pub persistent: Option<PersistentGrants>,
    /// The restart journal (`--state-dir`): consumed requests are recorded
    /// until their response is published.
    pub journal: Option<Journal>,
    /// Requests a previous daemon consumed and did not answer (a restart):
    /// executed first, in their original order.
    pub replay: Vec<Replay>,
    /// Test hook: told about every step (None in production).
    pub observer: Option<Observer>,
    /// limits: the device's and the domain's limiters (reads and writes only).
    pub limiter: LimiterChain,
}

/// What a started request is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Read,
    Write,
    /// WRITE_BARRIER: the write is in flight; a flush follows.
    BarrierWrite,
    /// FLUSH or the flush of a barrier.
    Flush,
    Discard,
}

#[derive(Debug)]
struct Inflight {
    /// Journal entry (NO_ENTRY without a journal).
    jent: u32,
    id: u64,
    op: u8,
    stage: Stage,
    pieces: Vec<Piece>,
    len: u64,
    /// stats: when it was consumed (None: collection off).
    t0: Option<Instant>,
}

/// A parsed request that has not been started yet.
#[derive(Debug)]
enum Pending {
    Rw(RwRequest),
    Indirect(IndirectRequest),
    Flush {
        id: u64,
        op: u8,
    },
    Discard {
        id: u64,
        op: u8,
        offset: u64,
        len: u64,
        secure: bool,
    },
}

impl Pending {
    /// The request's id and response operation (to answer it unstarted).
    fn id_op(&self) -> (u64, u8) {
        match self {
            Pending::Rw(r) => (r.id(), r.response_op()),
            Pending::Indirect(r) => (r.id(), r.response_op()),
            Pending::Flush { id, op } | Pending::Discard { id, op, .. } => (*id, *op),
        }
    }

    /// Must every earlier request be finished before this one starts?
    fn needs_drain(&self) -> bool {
        match self {
            Pending::Rw(r) => r.barrier(),
            Pending::Flush { .. } => true,
            _ => false,
        }
    }
}

/// What a worker shares among the queues it serves.
pub(crate) struct Shared {
    pub engine: Engine,
    /// Scratch for an indirect request's segment pages (filled and parsed at once).
    pub indirect: Vec<u8>,
    /// Grant-copy results.
    pub copy_status: Vec<GrantStatus>,
    /// stats: the time of the current batch (completions reaped, or a queue's
    /// pump), so that the statistics read the clock once per batch rather
    /// than twice per request.
    pub now: Instant,
    /// Queues (by table index) waiting for buffer space, first come first
    /// served: while one waits, only the first may allocate, so a large
    /// request is never starved by a stream of small ones from other queues.
    /// Every buffer is released by an I/O in flight or by the next pump of
    /// its queue, so the first in line always gets its turn.
    buf_waiters: VecDeque<u32>,
    /// Bumped when the first in line got its buffer or left the line (the
    /// next one may try now).
    buf_turns: u64,
}

impl Shared {
    pub fn new(engine: Engine) -> Shared {
        Shared {
            engine,
            indirect: vec![0u8; xen_sys::blkif::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * PAGE_SIZE],
            copy_status: Vec::with_capacity(64),
            now: Instant::now(),
            buf_waiters: VecDeque::new(),
            buf_turns: 0,
        }
    }

    /// A buffer of `len` bytes for queue `q`, or None: `q` waits in line (see
    /// `buf_waiters`) and is served again after buffers were freed.
    fn alloc_for(&mut self, q: u32, len: usize) -> Option<BufRegion> {
        let first = self.buf_waiters.front().copied();
        let r = match first {
            Some(f) if f != q => None,
            _ => self.engine.alloc(len),
        };
        match (&r, first) {
            (Some(_), Some(f)) if f == q => {
                self.buf_waiters.pop_front();
                self.buf_turns += 1;
            }
            (None, _) if !self.buf_waiters.contains(&q) => self.buf_waiters.push_back(q),
            _ => {}
        }
        r
    }

    /// Queue `q` no longer waits for a buffer.
    fn leave_buffer_line(&mut self, q: u32) {
        if let Some(at) = self.buf_waiters.iter().position(|&w| w == q) {
            self.buf_waiters.remove(at);
            if at == 0 {
                self.buf_turns += 1;
            }
        }
    }

    /// Something a waiting queue needs may have changed since `mark`
    /// ([`progress_mark`](Self::progress_mark)): buffers were freed or the
    /// line moved. The worker then serves its queues again before sleeping.
    pub fn waiters_may_proceed(&self, mark: (u64, u64)) -> bool {
        !self.buf_waiters.is_empty() && mark != self.progress_mark()
    }

    pub fn progress_mark(&self) -> (u64, u64) {
        (self.engine.buffer_frees(), self.buf_turns)
    }

    /// Does any I/O of this worker run that will free buffers or engine
    /// slots when it completes?
    fn io_in_flight(&self) -> bool {
        self.engine.in_flight_io() > 0
    }
}

/// What [`Queue::pump`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pump {
    /// Waiting for completions or an event.
    Idle,
    /// The final check found new requests: pump again before sleeping.
    Again,
    /// Stopped and drained, nothing of it in flight: remove it.
    Finished,
}

/// One queue on a worker. Its engine ops carry `(index << 32) | tag` as
/// user_data, where `index` is the queue's place in the worker's table.
pub(crate) struct Queue {
    ctx: QueueCtx,
    /// The worker's table index (the high half of every user_data).
    index: u32,
    /// The image's id on the worker's engine.
    img: ImageId,
    /// Engine ops in flight for this queue (I/O, polls, timer, cancels).
    ops: usize,
    evtchn_armed: bool,
    /// When the armed timer fires, if one is armed.
    timer_at: Option<Instant>,
    slots: Vec<Option<Inflight>>,
    free_slots: Vec<usize>,
    /// Parsed requests not started yet, with their journal entries and
    /// (stats) consume times.
    pending: VecDeque<(u32, Pending, Option<Instant>)>,
    /// stats: the batch time (see [`Shared::now`]).
    now: Instant,
    /// A barrier is in progress: nothing else starts until it is answered.
    barrier_active: bool,
    /// The first pending request waits for the worker's buffers or engine
    /// slots (not for anything of this queue's own).
    waits_for_worker: bool,
    /// Requests answered so far (a pump repeats its start pass while answers
    /// unblock requests behind them).
    answered: u64,
    /// The first pending request has been counted in `buffer_waits`.
    front_waited: bool,
    /// A stall was reported when `answered` had this value.
    stall_reported: Option<u64>,
    stopping: bool,
    /// Why the queue gave up (the device is disconnected).
    failed: Option<String>,
    /// Completions or events arrived since the last pump.
    dirty: bool,
    responses_pushed: bool,
    /// Writes whose data is still to be grant-copied in, with their file
    /// offsets: one grant copy for all of them at the end of a start pass.
    writes_to_copy: Vec<(usize, BufRegion, u64)>,
    /// Reads done whose data is still to be grant-copied out: one grant copy
    /// for all of them at the next pump.
    reads_to_copy: Vec<(usize, BufRegion)>,
    /// Failed-I/O warnings: the current one-second window and its count.
    warn_window: Instant,
    warned: u32,
    suppressed: u64,
}

impl Queue {
    /// Set the queue up on a worker: attach its image to the worker's engine,
    /// arm the event channel poll, queue what a previous daemon left unanswered.
    /// On failure the context comes back (to be dropped on the worker, after
    /// its `finished` flag is set) with the reason.
    pub fn new(
        ctx: Box<QueueCtx>,
        index: u32,
        sh: &mut Shared,
    ) -> Result<Queue, (Box<QueueCtx>, String)> {
        let img = match sh.engine.attach(ctx.file.clone()) {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("{}: {e}", ctx.image.display());
                return Err((ctx, msg));
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

    fn ud(&self, tag: u32) -> u64 {
        (u64::from(self.index) << 32) | u64::from(tag)
    }

    fn arm_evtchn(&mut self, sh: &mut Shared) -> Result<(), String> {
        let fd = self.ctx.evtchn.fd();
        self.push_op(sh, TAG_EVTCHN, Op::PollAdd { fd })?;
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
        match self.push_op(sh, TAG_TIMER, Op::Timeout { after }) {
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
    /// flight, start nothing more.
    fn fail(&mut self, sh: &mut Shared, why: String) {
        warn!("{}: queue failed: {why}", self.ctx.name);
        if self.failed.is_none() {
            self.failed = Some(why);
        }
        for (jent, p, t0) in std::mem::take(&mut self.pending) {
            let (id, op) = p.id_op();
            self.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.ctx.stats.answered(t0, self.now, op, false, 0, false); // stats
            self.respond(jent, id, op, BLKIF_RSP_ERROR);
        }
        self.request_stop(sh);
    }

    fn cancel_waits(&mut self, sh: &mut Shared) {
        for tag in [TAG_EVTCHN, TAG_TIMER] {
            match sh.engine.cancel(self.ud(tag), self.ud(TAG_CANCEL)) {
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

    /// Do all the work possible without waiting.
    pub fn pump(&mut self, sh: &mut Shared) -> Pump {
        self.dirty = false;
        if self.ctx.stats.enabled {
            sh.now = Instant::now(); // stats: the time of this batch
        }
        self.now = sh.now; // stats
        self.copy_out_reads(sh);
        self.refresh_disk();
        // Consume and start until nothing changes: an answer given on the way
        // (a rejected request, a failed grant copy, a refused submission) can
        // unblock the requests behind it (a drain, a barrier, ring space), and
        // no completion would come to wake this queue for them. Each round
        // answers a request; the bound keeps one busy ring from holding the
        // worker (the queue is served again on the next pass).
        for round in 0.. {
            let answered = self.answered;
            if !self.stopping {
                if let Err(e) = self.consume() {
                    self.fail(sh, e);
                }
            }
            self.start_pending(sh);
            if self.answered == answered {
                break;
            }
            if round == self.ctx.ring.size() {
                self.dirty = true;
                break;
            }
        }
        self.publish_responses();
        if self.stopping {
            if self.in_flight_requests() == 0 && self.pending.is_empty() && self.ops == 0 {
                return Pump::Finished;
            }
            return Pump::Idle;
        }
        // The ring.h final check: re-arm req_event and look again before sleeping.
        if self.can_consume() && self.ctx.ring.final_check_for_requests() {
            self.dirty = true;
            return Pump::Again;
        }
        Pump::Idle
    }

    /// Take the queue off the worker: detach its image from the engine and
    /// report how it ended. Only after [`Pump::Finished`].
    pub fn finish_off(self, sh: &mut Shared) -> Result<(), String> {
        sh.leave_buffer_line(self.index);
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
        sh.leave_buffer_line(self.index);
        for tag in [TAG_EVTCHN, TAG_TIMER] {
            let _ = sh.engine.cancel(self.ud(tag), self.ud(TAG_CANCEL));
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

    /// A completion of one of this queue's ops (`tag` = low half of user_data).
    pub fn on_completion(&mut self, sh: &mut Shared, tag: u32, c: Completion) {
        self.ops -= 1;
        self.now = sh.now; // stats: when the worker reaped this batch
        self.dirty = true;
        if let Err(e) = self.complete(sh, tag, c) {
            self.fail(sh, e);
        }
    }

    /// Warn about a failed I/O, at most [`WARN_BURST`] times a second.
    fn warn_io(&mut self, msg: std::fmt::Arguments<'_>) {
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

    fn observe(&self, ev: IoEvent) {
        if let Some(o) = &self.ctx.observer {
            o.0.event(&self.ctx.name, ev);
        }
    }

    fn slot_id(&self, slot: usize) -> u64 {
        self.slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .map_or(u64::MAX, |i| i.id)
    }

    fn refresh_disk(&mut self) {
        let s = self.ctx.sectors.load(Ordering::Acquire);
        if s != self.ctx.disk.sectors {
            info!("{}: disk is now {} sectors", self.ctx.name, s);
            self.ctx.disk.sectors = s;
        }
    }

    fn push_op(&mut self, sh: &mut Shared, tag: u32, op: Op) -> Result<(), String> {
        match sh.engine.push_to(self.img, self.ud(tag), op) {
            Ok(()) => {
                self.ops += 1;
                Ok(())
            }
            Err(r) => Err(format!("io_uring push: {}", r.into_io_error())),
        }
    }

    fn in_flight_requests(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn can_consume(&self) -> bool {
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
    fn enqueue_replays(&mut self) {
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
    fn consume(&mut self) -> Result<(), String> {
        while self.can_consume() {
            let raw = match self.ctx.ring.next_request() {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => return Err(format!("ring protocol violation: {e}")),
            };
            let idx = self.ctx.ring.req_cons().wrapping_sub(1);
            let jent = match self.ctx.journal.as_mut() {
                None => NO_ENTRY,
                Some(j) => j
                    .consumed(idx, raw.bytes())
                    .ok_or_else(|| format!("journal {} full", j.path().display()))?,
            };
            self.accept(jent, &raw);
        }
        Ok(())
    }

    /// Validate one consumed request: queue it, or answer a rejection.
    fn accept(&mut self, jent: u32, raw: &RawRequest) {
        super::testing::maybe_panic(&self.ctx.name);
        self.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let t0 = self.ctx.stats.consumed(self.now); // stats: consume time, queue depth + 1
        self.observe(IoEvent::Consumed {
            id: raw.id(),
            op: raw.operation(),
        });
        match parse_request(raw, &self.ctx.disk) {
            Ok(req) => self.enqueue(jent, req, t0),
            Err(rej) => {
                debug!("{}: rejected request: {rej}", self.ctx.name);
                self.ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
                self.ctx
                    .stats
                    .answered(t0, self.now, rej.operation, false, 0, false); // stats
                self.respond(jent, rej.id, rej.operation, rej.status);
            }
        }
    }

    fn enqueue(&mut self, jent: u32, req: Request, t0: Option<Instant>) {
        let op = req.response_op();
        let p = match req {
            Request::Rw(r) => Pending::Rw(r),
            Request::Indirect(r) => Pending::Indirect(r),
            Request::Flush { id } => Pending::Flush { id, op },
            Request::Discard {
                id,
                sector,
                nr_sectors,
                secure,
            } => Pending::Discard {
                id,
                op,
                offset: sector * 512,
                len: nr_sectors * 512,
                secure,
            },
        };
        self.pending.push_back((jent, p, t0));
    }

    /// Start pending requests in order until one cannot start yet. A request
    /// that cannot start waits — for this queue's own I/O (a drain, a
    /// barrier), a limit's timer, or the worker's buffers and engine slots —
    /// and is never failed for it: that is backpressure, not an error.
    fn start_pending(&mut self, sh: &mut Shared) {
        self.waits_for_worker = false;
        let mut in_buffer_line = false;
        while let Some((_, p, _)) = self.pending.front() {
            if self.barrier_active {
                break;
            }
            // Keep room in the engine for the two polls to be re-armed and a
            // barrier's flush: a deep ring (16 pages = 512 slots) can have more
            // requests than the engine takes ops; the rest wait here.
            // (Writes waiting for their batched grant copy take their slots later.)
            if sh.engine.free_slots() <= ENGINE_RESERVE + self.writes_to_copy.len() {
                self.waits_for_worker = true;
                break;
            }
            if p.needs_drain() && self.in_flight_requests() > 0 {
                break;
            }
            let Some(slot) = self.free_slots.last().copied() else {
                break;
            };
            let need = match p {
                Pending::Rw(r) => r.len() as usize,
                _ => 0,
            };
            // The buffer comes from the worker's slab, shared with its other
            // queues. None: wait in line for it (buffers are freed as I/O
            // completes; the slab holds the largest request a guest may send,
            // see `Backend::new`).
            let region = if need > 0 {
                match sh.alloc_for(self.index, need) {
                    Some(r) => Some(r),
                    None => {
                        if !self.front_waited {
                            self.front_waited = true;
                            self.ctx.stats.buffer_waits.fetch_add(1, Ordering::Relaxed);
                        }
                        self.waits_for_worker = true;
                        in_buffer_line = true;
                        break;
                    }
                }
            } else {
                None
            };
            // limits: a read or write starts only when the device's and the
            // domain's limiters admit it; else it waits (ring order kept) and the
            // queue's timer wakes it. Not while stopping: a stop must not wait.
            let cost = rw_cost(p).filter(|_| region.is_some() && !self.stopping);
            if let Some((write, bytes)) = cost.filter(|_| self.ctx.limiter.is_active()) {
                let now = Instant::now();
                if let Err(at) = self.ctx.limiter.admit(write, bytes, now) {
                    if let Some(r) = region {
                        sh.engine.free(r);
                    }
                    self.ctx.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    // At most MAX_WAIT: a raised limit is seen soon.
                    self.arm_timer(sh, at.min(now + MAX_WAIT));
                    break;
                }
            }
            let (jent, p, t0) = self.pending.pop_front().expect("front exists");
            self.front_waited = false;
            self.free_slots.pop();
            self.start(sh, slot, jent, p, region, t0);
        }
        if !in_buffer_line {
            sh.leave_buffer_line(self.index);
        }
        self.copy_in_writes(sh);
    }

    /// Liveness, checked by the worker before it sleeps: consumed requests
    /// must have something that will wake this queue for them — its own I/O
    /// in flight, its timer, or worker I/O whose completion frees what they
    /// wait for. Otherwise they would wait for the guest's next kick, which
    /// may never come (a guest waiting for its fsync). Never happens unless
    /// the backend has a bug: counted (`stalls`) and logged once per state,
    /// and true is returned so that the worker serves its queues once more
    /// before sleeping.
    pub fn stalled(&mut self, sh: &Shared) -> bool {
        if self.pending.is_empty() || self.in_flight_requests() > 0 || self.timer_at.is_some() {
            return false;
        }
        if self.waits_for_worker && sh.io_in_flight() {
            return false;
        }
        if self.stall_reported == Some(self.answered) {
            return false; // reported already; nothing was answered since
        }
        self.stall_reported = Some(self.answered);
        self.ctx.stats.stalls.fetch_add(1, Ordering::Relaxed);
        log::error!(
            "{}: {} consumed request(s) wait with nothing in flight that would wake them (a backend bug)",
            self.ctx.name,
            self.pending.len()
        );
        self.dirty = true;
        true
    }

    fn start(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        jent: u32,
        p: Pending,
        region: Option<BufRegion>,
        t0: Option<Instant>,
    ) {
        // stats: the request now runs on the image (in-flight gauge + 1); its
        // answer (`finish`) takes it back off.
        if !matches!(p, Pending::Indirect(_)) {
            self.ctx.stats.started();
        }
        match p {
            Pending::Indirect(ind) => {
                // Fetch the segment list, then treat it as a plain read/write.
                self.free_slots.push(slot);
                match self.fetch_indirect(sh, &ind) {
                    Ok(rw) => self.pending.push_front((jent, Pending::Rw(rw), t0)),
                    Err((status, why)) => {
                        debug!("{}: indirect request refused: {why}", self.ctx.name);
                        self.ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        let op = ind.response_op();
                        self.ctx.stats.answered(t0, self.now, op, false, 0, false); // stats
                        self.respond(jent, ind.id(), ind.response_op(), status);
                    }
                }
            }
            Pending::Rw(r) => self.start_rw(sh, slot, jent, r, region, t0),
            Pending::Flush { id, op } => {
                self.ctx.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.slots[slot] = Some(Inflight {
                    jent,
                    id,
                    op,
                    stage: Stage::Flush,
                    pieces: Vec::new(),
                    len: 0,
                    t0,
                });
                self.submit_or_fail(sh, slot, Op::Fdatasync);
            }
            Pending::Discard {
                id,
                op,
                offset,
                len,
                secure,
            } => {
                self.ctx.stats.discards.fetch_add(1, Ordering::Relaxed);
                if len == 0 {
                    // Nothing to discard: done (Linux blkback answers OKAY too;
                    // fallocate would refuse a zero length).
                    self.free_slots.push(slot);
                    self.ctx.stats.answered(t0, self.now, op, true, 0, true); // stats
                    self.respond(jent, id, op, BLKIF_RSP_OKAY);
                    return;
                }
                self.slots[slot] = Some(Inflight {
                    jent,
                    id,
                    op,
                    stage: Stage::Discard,
                    pieces: Vec::new(),
                    len,
                    t0,
                });
                let op = if secure {
                    Op::ZeroRange { offset, len }
                } else {
                    Op::Discard { offset, len }
                };
                self.submit_or_fail(sh, slot, op);
            }
        }
    }

    fn start_rw(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        jent: u32,
        r: RwRequest,
        region: Option<BufRegion>,
        t0: Option<Instant>,
    ) {
        if r.barrier() {
            self.barrier_active = true;
        }
        let (op, offset) = (r.op(), r.offset());
        let stage = match (op, r.barrier()) {
            (RwOp::Read, _) => Stage::Read,
            (RwOp::Write, false) => Stage::Write,
            (RwOp::Write, true) => Stage::BarrierWrite,
        };
        self.slots[slot] = Some(Inflight {
            jent,
            id: r.id(),
            op: r.response_op(),
            stage,
            len: r.len(),
            pieces: r.into_pieces(),
            t0,
        });
        let Some(region) = region else {
            // A barrier without data: just the flush.
            self.set_stage(slot, Stage::Flush);
            self.submit_or_fail(sh, slot, Op::Fdatasync);
            return;
        };
        match op {
            RwOp::Read => {
                self.ctx.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.submit_or_fail(sh, slot, Op::Read { offset, region });
            }
            RwOp::Write if self.ctx.persistent.is_none() => {
                self.ctx.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.writes_to_copy.push((slot, region, offset));
            }
            RwOp::Write => {
                self.ctx.stats.writes.fetch_add(1, Ordering::Relaxed);
                if let Err(st) = self.copy_from_guest(sh, slot, &region) {
                    debug!("{}: grant copy from guest failed: {st:?}", self.ctx.name);
                    sh.engine.free(region);
                    self.finish(slot, BLKIF_RSP_ERROR);
                    return;
                }
                self.submit_or_fail(sh, slot, Op::Write { offset, region });
            }
        }
    }

    fn set_stage(&mut self, slot: usize, stage: Stage) {
        if let Some(i) = self.slots[slot].as_mut() {
            i.stage = stage;
        }
    }

    /// Queue `op` for `slot`; if the engine refuses it, answer the request.
    fn submit_or_fail(&mut self, sh: &mut Shared, slot: usize, op: Op) {
        if matches!(op, Op::Fdatasync) {
            self.observe(IoEvent::FsyncIssued {
                id: self.slot_id(slot),
            });
        }
        match sh.engine.push_to(self.img, self.ud(slot as u32), op) {
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

    fn fetch_indirect(
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
            return ind
                .complete(&sh.indirect[..n * PAGE_SIZE], &self.ctx.disk)
                .map_err(|rej| (rej.status, rej.to_string()));
        }
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
        ind.complete(&sh.indirect[..n * PAGE_SIZE], &self.ctx.disk)
            .map_err(|rej| (rej.status, rej.to_string()))
    }

    /// Copy a write's data from the guest's persistently mapped pages into
    /// `region` (with persistent grants; otherwise see `copy_in_writes`).
    fn copy_from_guest(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        region: &BufRegion,
    ) -> Result<(), GrantStatus> {
        let pieces = &self.slots[slot].as_ref().expect("slot in use").pieces;
        let pg = self
            .ctx
            .persistent
            .as_mut()
            .ok_or(GrantStatus::GeneralError)?;
        for (p, dst) in split_mut(pieces, sh.engine.buf_mut(region)) {
            pg.copy_from(p.gref(), p.offset(), dst)?;
        }
        Ok(())
    }

    /// Copy a read's data from `region` out to the guest's persistently mapped
    /// pages (with persistent grants; otherwise see `copy_out_reads`).
    fn copy_to_guest(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        region: &BufRegion,
    ) -> Result<(), GrantStatus> {
        let pieces = &self.slots[slot].as_ref().expect("slot in use").pieces;
        let pg = self
            .ctx
            .persistent
            .as_mut()
            .ok_or(GrantStatus::GeneralError)?;
        for (p, src) in split(pieces, sh.engine.buf(region)) {
            pg.copy_to(p.gref(), p.offset(), src)?;
        }
        Ok(())
    }

    /// Grant-copy the data of every write started in this pass from the guest's
    /// pages, with one grant copy, and queue the writes whose copy succeeded.
    fn copy_in_writes(&mut self, sh: &mut Shared) {
        if self.writes_to_copy.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.writes_to_copy);
        let regions: Vec<&BufRegion> = batch.iter().map(|(_, r, _)| r).collect();
        let bufs = sh.engine.bufs_mut(&regions);
        let mut segs = Vec::new();
        for ((slot, _, _), buf) in batch.iter().zip(bufs) {
            let pieces = &self.slots[*slot].as_ref().expect("slot in use").pieces;
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
            let n = self.slots[slot].as_ref().map_or(0, |i| i.pieces.len());
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

    /// Grant-copy the data of every read done since the last pump out to the
    /// guest's pages, with one grant copy, and answer them.
    fn copy_out_reads(&mut self, sh: &mut Shared) {
        if self.reads_to_copy.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.reads_to_copy);
        let mut segs = Vec::new();
        for (slot, region) in &batch {
            let pieces = &self.slots[*slot].as_ref().expect("slot in use").pieces;
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
            let (n, len) = self.slots[slot]
                .as_ref()
                .map_or((0, 0), |i| (i.pieces.len(), i.len));
            let good = ok
                && sh.copy_status[at..at + n]
                    .iter()
                    .all(|s| *s == GrantStatus::Okay);
            at += n;
            sh.engine.free(region);
            if good {
                self.ctx.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                self.finish(slot, BLKIF_RSP_OKAY);
            } else {
                debug!("{}: grant copy to guest failed", self.ctx.name);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }

    fn complete(&mut self, sh: &mut Shared, tag: u32, c: Completion) -> Result<(), String> {
        match tag {
            TAG_EVTCHN => {
                self.evtchn_armed = false;
                if self.stopping {
                    return Ok(());
                }
                if let Err(e) = self.ctx.evtchn.ack() {
                    return Err(format!("event channel: {e}"));
                }
                if c.result < 0 {
                    return Err(format!(
                        "event channel poll failed: {}",
                        io::Error::from_raw_os_error(-c.result)
                    ));
                }
                return self.arm_evtchn(sh);
            }
            TAG_TIMER => {
                self.timer_at = None;
                return Ok(());
            }
            TAG_CANCEL => return Ok(()),
            _ => {}
        }
        let slot = tag as usize;
        let Some(stage) = self
            .slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .map(|i| i.stage)
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
                "{stage:?} on {} failed: {e}; answering BLKIF_RSP_ERROR",
                image.display()
            ));
            if let Some(r) = c.region {
                sh.engine.free(r);
            }
            let status = if c.result == -libc::EOPNOTSUPP && stage == Stage::Discard {
                BLKIF_RSP_EOPNOTSUPP
            } else {
                BLKIF_RSP_ERROR
            };
            self.finish(slot, status);
            return Ok(());
        }
        match stage {
            Stage::Read if self.ctx.persistent.is_none() => {
                let region = c.region.expect("read has a region");
                self.reads_to_copy.push((slot, region));
            }
            Stage::Read => {
                let region = c.region.expect("read has a region");
                let len = self.slots[slot].as_ref().map_or(0, |i| i.len);
                let ok = self.copy_to_guest(sh, slot, &region);
                sh.engine.free(region);
                match ok {
                    Ok(()) => {
                        self.ctx.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                        self.finish(slot, BLKIF_RSP_OKAY);
                    }
                    Err(st) => {
                        debug!("{}: grant copy to guest failed: {st:?}", self.ctx.name);
                        self.finish(slot, BLKIF_RSP_ERROR);
                    }
                }
            }
            Stage::Write => {
                self.observe(IoEvent::WriteDone {
                    id: self.slot_id(slot),
                });
                if let Some(r) = c.region {
                    sh.engine.free(r);
                }
                let len = self.slots[slot].as_ref().map_or(0, |i| i.len);
                self.ctx
                    .stats
                    .bytes_written
                    .fetch_add(len, Ordering::Relaxed);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            Stage::BarrierWrite => {
                self.observe(IoEvent::WriteDone {
                    id: self.slot_id(slot),
                });
                if let Some(r) = c.region {
                    sh.engine.free(r);
                }
                let len = self.slots[slot].as_ref().map_or(0, |i| i.len);
                self.ctx
                    .stats
                    .bytes_written
                    .fetch_add(len, Ordering::Relaxed);
                self.set_stage(slot, Stage::Flush);
                self.submit_or_fail(sh, slot, Op::Fdatasync);
            }
            Stage::Flush => {
                self.observe(IoEvent::FsyncDone {
                    id: self.slot_id(slot),
                });
                self.ctx.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            Stage::Discard => self.finish(slot, BLKIF_RSP_OKAY),
        }
        Ok(())
    }

    /// Answer the request in `slot` and free the slot.
    fn finish(&mut self, slot: usize, status: i16) {
        let Some(i) = self.slots[slot].take() else {
            return;
        };
        self.free_slots.push(slot);
        // While a barrier is active it is the only request in flight (it started
        // after a drain and blocks everything behind it), so this answer ends it.
        self.barrier_active = false;
        if status != BLKIF_RSP_OKAY {
            self.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        // stats: latency, sectors and ok/error per op; gauges - 1.
        let ok = status == BLKIF_RSP_OKAY;
        self.ctx
            .stats
            .answered(i.t0, self.now, i.op, true, i.len, ok);
        self.respond(i.jent, i.id, i.op, status);
    }

    fn respond(&mut self, jent: u32, id: u64, op: u8, status: i16) {
        self.answered += 1;
        if let Some(j) = self.ctx.journal.as_mut() {
            if jent != NO_ENTRY && self.ctx.ring.outstanding() > 0 {
                j.answered(jent, self.ctx.ring.rsp_prod_pvt());
            }
        }
        self.observe(IoEvent::Responded { id, op, status });
        match self.ctx.ring.push_response(id, op, status) {
            Ok(()) => self.responses_pushed = true,
            Err(e) => warn!("{}: cannot answer request {id}: {e}", self.ctx.name),
        }
    }

    fn publish_responses(&mut self) {
        if !self.responses_pushed {
            return;
        }
        self.responses_pushed = false;
        let notify = self.ctx.ring.push_responses_and_check_notify();
        if let Some(j) = self.ctx.journal.as_mut() {
            j.published(self.ctx.ring.rsp_prod_published());
        }
        if notify {
            if let Err(e) = self.ctx.evtchn.notify() {
                warn!("{}: notify failed: {e}", self.ctx.name);
            }
        }
    }
}

/// limits: what a pending request costs (write?, bytes); None for requests
/// that are not limited (flush, discard, indirect not fetched yet).
fn rw_cost(p: &Pending) -> Option<(bool, u64)> {
    match p {
        Pending::Rw(r) => Some((r.op() == RwOp::Write, r.len())),
        _ => None,
    }
}

/// A request's pieces with their parts of its buffer (laid out back to back).
fn split<'a>(
    pieces: &'a [Piece],
    mut buf: &'a [u8],
) -> impl Iterator<Item = (&'a Piece, &'a [u8])> {
    pieces.iter().map(move |p| {
        let (part, rest) = buf.split_at(usize::from(p.len()));
        buf = rest;
        (p, part)
    })
}

/// [`split`], mutably.
fn split_mut<'a>(
    pieces: &'a [Piece],
    mut buf: &'a mut [u8],
) -> impl Iterator<Item = (&'a Piece, &'a mut [u8])> {
    pieces.iter().map(move |p| {
        let (part, rest) = std::mem::take(&mut buf).split_at_mut(usize::from(p.len()));
        buf = rest;
        (p, part)
    })
}

/// One grant copy for many requests' segments: false if the call itself
/// failed; otherwise `status` holds each segment's result.
fn grant_copy_batch(
    platform: &dyn Platform,
    domid: DomId,
    segs: &mut [CopySeg<'_>],
    status: &mut Vec<GrantStatus>,
) -> bool {
    status.clear();
    status.resize(segs.len(), GrantStatus::GeneralError);
    platform.grant_copy(domid, segs, status).is_ok()
}

/// One grant-copy batch; the first failed segment's status if any failed.
fn grant_copy_all(
    platform: &dyn Platform,
    domid: DomId,
    segs: &mut [CopySeg<'_>],
    status: &mut Vec<GrantStatus>,
) -> Result<(), GrantStatus> {
    status.clear();
    status.resize(segs.len(), GrantStatus::GeneralError);
    platform
        .grant_copy(domid, segs, status)
        .map_err(|_| GrantStatus::GeneralError)?;
    match status.iter().find(|s| **s != GrantStatus::Okay) {
        Some(bad) => Err(*bad),
        None => Ok(()),
    }
}
