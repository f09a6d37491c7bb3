//! One blkif ring (queue) served by one thread with its own io_uring engine.
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
//! 3. **submit** once for the whole batch and sleep in `io_uring_enter`; the event
//!    channel and the stop eventfd are one-shot polls on the same ring, so the
//!    thread sleeps in exactly one place.
//! 4. **complete**: reads are grant-copied out to the guest's pages; every
//!    request gets exactly one response.
//! 5. **respond**: responses are published together and the frontend is notified
//!    only if it asked (`rsp_event`); before sleeping, the ring.h final check.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::limits::{LimiterChain, MAX_WAIT};
use super::pgrants::PersistentGrants;
use super::state::{Journal, Replay};
use crate::blkif::{
    parse_request, BackRing, DiskInfo, IndirectRequest, Piece, RawRequest, Request, RwOp, RwRequest,
};
use crate::engine::{BufRegion, Completion, Engine, Op};
use crate::platform::{CopySeg, DomId, EventChannel, GrantStatus, Platform, PAGE_SIZE};
use xen_sys::blkif::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};

/// user_data of the event channel poll.
const TAG_EVTCHN: u64 = u64::MAX;
/// user_data of the stop eventfd poll.
const TAG_STOP: u64 = u64::MAX - 1;
/// limits: user_data of the one-shot timer armed while a limit delays a request.
const TAG_THROTTLE: u64 = u64::MAX - 2;
/// Engine op slots kept free for poll re-arms, a barrier's flush and the
/// limit timer.
const ENGINE_RESERVE: usize = 4;
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

/// Everything a queue thread needs; moved into the thread.
pub(crate) struct QueueCtx {
    pub name: String,
    /// The image path (for error messages).
    pub image: std::path::PathBuf,
    pub platform: Arc<dyn Platform>,
    pub domid: DomId,
    pub ring: BackRing,
    pub evtchn: Box<dyn EventChannel>,
    pub engine: Engine,
    pub disk: DiskInfo,
    /// The device size in sectors, updated on resize.
    pub sectors: Arc<AtomicU64>,
    pub stop: Arc<EventFd>,
    pub stats: Arc<QueueStats>,
    /// Set when the thread exits (for whatever reason).
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
    /// Must every earlier request be finished before this one starts?
    fn needs_drain(&self) -> bool {
        match self {
            Pending::Rw(r) => r.barrier,
            Pending::Flush { .. } => true,
            _ => false,
        }
    }
}

struct Queue {
    ctx: QueueCtx,
    slots: Vec<Option<Inflight>>,
    free_slots: Vec<usize>,
    /// Parsed requests not started yet, with their journal entries and
    /// (stats) consume times.
    pending: VecDeque<(u32, Pending, Option<Instant>)>,
    /// limits: a TAG_THROTTLE timer is armed (at most one per queue).
    throttle_timer: bool,
    /// A barrier is in progress: nothing else starts until it is answered.
    barrier_active: bool,
    stopping: bool,
    indirect_buf: Vec<u8>,
    completions: Vec<Completion>,
    responses_pushed: bool,
    copy_status: Vec<GrantStatus>,
}

/// Run a queue until stopped or until the frontend breaks the ring protocol.
/// `Err` carries the reason to disconnect the device.
pub(crate) fn run(ctx: QueueCtx) -> Result<(), String> {
    let finished = ctx.finished.clone();
    let name = ctx.name.clone();
    let nslots = ctx.ring.size() as usize;
    let mut q = Queue {
        ctx,
        slots: (0..nslots).map(|_| None).collect(),
        free_slots: (0..nslots).rev().collect(),
        pending: VecDeque::new(),
        throttle_timer: false,
        barrier_active: false,
        stopping: false,
        indirect_buf: vec![0u8; xen_sys::blkif::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * PAGE_SIZE],
        completions: Vec::with_capacity(nslots + 4),
        responses_pushed: false,
        copy_status: Vec::with_capacity(64),
    };
    let r = q.run();
    match &r {
        Ok(()) => info!("{name}: queue stopped"),
        Err(e) => warn!("{name}: queue failed: {e}"),
    }
    finished.store(true, Ordering::Release);
    r
}

impl Queue {
    fn run(&mut self) -> Result<(), String> {
        let evfd = self.ctx.evtchn.fd();
        let stopfd = self.ctx.stop.as_fd().as_raw_fd();
        self.push_op(TAG_EVTCHN, Op::PollAdd { fd: evfd })?;
        self.push_op(TAG_STOP, Op::PollAdd { fd: stopfd })?;
        self.enqueue_replays();
        loop {
            self.refresh_disk();
            if !self.stopping {
                self.consume()?;
            }
            self.start_pending();
            self.publish_responses();
            if self.stopping && self.in_flight_requests() == 0 && self.pending.is_empty() {
                return Ok(());
            }
            // The ring.h final check: re-arm req_event and look again before sleeping.
            if !self.stopping && self.can_consume() && self.ctx.ring.final_check_for_requests() {
                continue;
            }
            self.ctx
                .engine
                .submit_and_wait(1)
                .map_err(|e| format!("io_uring wait: {e}"))?;
            let mut comps = std::mem::take(&mut self.completions);
            self.ctx.engine.reap(&mut comps);
            for c in comps.drain(..) {
                self.complete(c)?;
            }
            self.completions = comps;
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

    fn push_op(&mut self, tag: u64, op: Op) -> Result<(), String> {
        self.ctx
            .engine
            .push(tag, op)
            .map_err(|r| format!("io_uring push: {}", r.into_io_error()))
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
        self.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let t0 = self.ctx.stats.consumed(); // stats: consume time, queue depth + 1
        self.observe(IoEvent::Consumed {
            id: raw.id(),
            op: raw.operation(),
        });
        match parse_request(raw, &self.ctx.disk) {
            Ok(req) => self.enqueue(jent, req, t0),
            Err(rej) => {
                debug!("{}: rejected request: {rej}", self.ctx.name);
                self.ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
                self.ctx.stats.answered(t0, rej.operation, false, 0, false); // stats
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

    /// Start pending requests in order until one cannot start yet.
    fn start_pending(&mut self) {
        while let Some((_, p, _)) = self.pending.front() {
            if self.barrier_active {
                return;
            }
            // Keep room in the engine for the two polls to be re-armed and a
            // barrier's flush: a deep ring (16 pages = 512 slots) can have more
            // requests than the engine takes ops; the rest wait here.
            if self.ctx.engine.free_slots() <= ENGINE_RESERVE {
                return;
            }
            if p.needs_drain() && self.in_flight_requests() > 0 {
                return;
            }
            let Some(slot) = self.free_slots.last().copied() else {
                return;
            };
            let need = match p {
                Pending::Rw(r) => r.len as usize,
                _ => 0,
            };
            let region = if need > 0 {
                match self.ctx.engine.alloc(need) {
                    Some(r) => Some(r),
                    None if self.in_flight_requests() > 0 => return, // wait for buffers
                    None => {
                        // Nothing in flight and still no room: the slab is smaller
                        // than one request. Refuse it rather than stall the ring.
                        let (jent, p, t0) = self.pending.pop_front().expect("front exists");
                        if let Pending::Rw(r) = p {
                            warn!(
                                "{}: request of {} bytes exceeds the buffer slab",
                                self.ctx.name, r.len
                            );
                            let st = &self.ctx.stats;
                            st.answered(t0, r.response_op, false, r.len, false); // stats
                            self.respond(jent, r.id, r.response_op, BLKIF_RSP_ERROR);
                        }
                        continue;
                    }
                }
            } else {
                None
            };
            // limits: a read or write starts only when the device's and the
            // domain's limiters admit it; else it waits (ring order kept) and a
            // timer wakes the queue. Not while stopping: a stop must not wait.
            let cost = rw_cost(p).filter(|_| region.is_some() && !self.stopping);
            if let Some((write, bytes)) = cost {
                if let Err(at) = self.ctx.limiter.admit(write, bytes, Instant::now()) {
                    if let Some(r) = region {
                        self.ctx.engine.free(r);
                    }
                    self.ctx.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    self.arm_throttle_timer(at);
                    return;
                }
            }
            let (jent, p, t0) = self.pending.pop_front().expect("front exists");
            self.free_slots.pop();
            self.start(slot, jent, p, region, t0);
        }
    }

    /// limits: wake up at `at` (at most MAX_WAIT from now) to try again; one
    /// timer per queue.
    fn arm_throttle_timer(&mut self, at: Instant) {
        if self.throttle_timer {
            return;
        }
        let after = at.saturating_duration_since(Instant::now()).min(MAX_WAIT);
        match self.push_op(TAG_THROTTLE, Op::Timeout { after }) {
            Ok(()) => self.throttle_timer = true,
            Err(e) => warn!("{}: cannot arm the limit timer: {e}", self.ctx.name),
        }
    }

    fn start(
        &mut self,
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
                match self.fetch_indirect(&ind) {
                    Ok(rw) => self.pending.push_front((jent, Pending::Rw(rw), t0)),
                    Err((status, why)) => {
                        debug!("{}: indirect request refused: {why}", self.ctx.name);
                        self.ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        let op = ind.response_op();
                        self.ctx.stats.answered(t0, op, false, 0, false); // stats
                        self.respond(jent, ind.id, ind.response_op(), status);
                    }
                }
            }
            Pending::Rw(r) => self.start_rw(slot, jent, r, region, t0),
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
                self.submit_or_fail(slot, Op::Fdatasync);
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
                    self.ctx.stats.answered(t0, op, true, 0, true); // stats
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
                self.submit_or_fail(slot, op);
            }
        }
    }

    fn start_rw(
        &mut self,
        slot: usize,
        jent: u32,
        r: RwRequest,
        region: Option<BufRegion>,
        t0: Option<Instant>,
    ) {
        if r.barrier {
            self.barrier_active = true;
        }
        let stage = match (r.op, r.barrier) {
            (RwOp::Read, _) => Stage::Read,
            (RwOp::Write, false) => Stage::Write,
            (RwOp::Write, true) => Stage::BarrierWrite,
        };
        self.slots[slot] = Some(Inflight {
            jent,
            id: r.id,
            op: r.response_op,
            stage,
            pieces: r.pieces,
            len: r.len,
            t0,
        });
        let Some(region) = region else {
            // A barrier without data: just the flush.
            self.set_stage(slot, Stage::Flush);
            self.submit_or_fail(slot, Op::Fdatasync);
            return;
        };
        match r.op {
            RwOp::Read => {
                self.ctx.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.submit_or_fail(
                    slot,
                    Op::Read {
                        offset: r.offset,
                        region,
                    },
                );
            }
            RwOp::Write => {
                self.ctx.stats.writes.fetch_add(1, Ordering::Relaxed);
                if let Err(st) = self.copy_from_guest(slot, &region) {
                    debug!("{}: grant copy from guest failed: {st:?}", self.ctx.name);
                    self.ctx.engine.free(region);
                    self.finish(slot, BLKIF_RSP_ERROR);
                    return;
                }
                self.submit_or_fail(
                    slot,
                    Op::Write {
                        offset: r.offset,
                        region,
                    },
                );
            }
        }
    }

    fn set_stage(&mut self, slot: usize, stage: Stage) {
        if let Some(i) = self.slots[slot].as_mut() {
            i.stage = stage;
        }
    }

    /// Queue `op` for `slot`; if the engine refuses it, answer the request.
    fn submit_or_fail(&mut self, slot: usize, op: Op) {
        if matches!(op, Op::Fdatasync) {
            self.observe(IoEvent::FsyncIssued {
                id: self.slot_id(slot),
            });
        }
        if let Err(rej) = self.ctx.engine.push(slot as u64, op) {
            let e = rej.into_io_error();
            warn!("{}: cannot queue I/O: {e}", self.ctx.name);
            self.finish(slot, BLKIF_RSP_ERROR);
        }
    }

    fn fetch_indirect(&mut self, ind: &IndirectRequest) -> Result<RwRequest, (i16, String)> {
        let grefs = ind.page_grefs();
        let n = grefs.len();
        let buf = &mut self.indirect_buf[..n * PAGE_SIZE];
        if let Some(pg) = self.ctx.persistent.as_mut() {
            for (dst, &gref) in buf.chunks_mut(PAGE_SIZE).zip(grefs) {
                pg.copy_from(gref, 0, dst)
                    .map_err(|st| (BLKIF_RSP_ERROR, format!("indirect page: {st:?}")))?;
            }
            return ind
                .complete(&self.indirect_buf[..n * PAGE_SIZE], &self.ctx.disk)
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
        self.copy_status.clear();
        self.copy_status.resize(n, GrantStatus::GeneralError);
        let res = self
            .ctx
            .platform
            .grant_copy(self.ctx.domid, &mut segs, &mut self.copy_status);
        drop(segs);
        if let Err(e) = res {
            return Err((BLKIF_RSP_ERROR, format!("grant copy: {e}")));
        }
        if let Some(bad) = self.copy_status.iter().find(|s| **s != GrantStatus::Okay) {
            return Err((BLKIF_RSP_ERROR, format!("indirect page: {bad:?}")));
        }
        ind.complete(&self.indirect_buf[..n * PAGE_SIZE], &self.ctx.disk)
            .map_err(|rej| (rej.status, rej.to_string()))
    }

    /// Copy a write's data from the guest's pages into `region`.
    fn copy_from_guest(&mut self, slot: usize, region: &BufRegion) -> Result<(), GrantStatus> {
        let pieces = &self.slots[slot].as_ref().expect("slot in use").pieces;
        let mut rest: &mut [u8] = self.ctx.engine.buf_mut(region);
        if let Some(pg) = self.ctx.persistent.as_mut() {
            for p in pieces {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(usize::from(p.len));
                rest = tail;
                pg.copy_from(p.gref, p.offset, dst)?;
            }
            return Ok(());
        }
        let mut segs = Vec::with_capacity(pieces.len());
        for p in pieces {
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(usize::from(p.len));
            rest = tail;
            segs.push(CopySeg::FromGuest {
                gref: p.gref,
                offset: p.offset,
                dst,
            });
        }
        grant_copy_all(
            &*self.ctx.platform,
            self.ctx.domid,
            &mut segs,
            &mut self.copy_status,
        )
    }

    /// Copy a read's data from `region` out to the guest's pages.
    fn copy_to_guest(&mut self, slot: usize, region: &BufRegion) -> Result<(), GrantStatus> {
        let pieces = &self.slots[slot].as_ref().expect("slot in use").pieces;
        let mut rest: &[u8] = self.ctx.engine.buf(region);
        if let Some(pg) = self.ctx.persistent.as_mut() {
            for p in pieces {
                let (src, tail) = rest.split_at(usize::from(p.len));
                rest = tail;
                pg.copy_to(p.gref, p.offset, src)?;
            }
            return Ok(());
        }
        let mut segs = Vec::with_capacity(pieces.len());
        for p in pieces {
            let (src, tail) = rest.split_at(usize::from(p.len));
            rest = tail;
            segs.push(CopySeg::ToGuest {
                gref: p.gref,
                offset: p.offset,
                src,
            });
        }
        grant_copy_all(
            &*self.ctx.platform,
            self.ctx.domid,
            &mut segs,
            &mut self.copy_status,
        )
    }

    fn complete(&mut self, c: Completion) -> Result<(), String> {
        match c.user_data {
            TAG_EVTCHN => {
                if let Err(e) = self.ctx.evtchn.ack() {
                    return Err(format!("event channel: {e}"));
                }
                if c.result < 0 {
                    return Err(format!(
                        "event channel poll failed: {}",
                        io::Error::from_raw_os_error(-c.result)
                    ));
                }
                if !self.stopping {
                    let fd = self.ctx.evtchn.fd();
                    self.push_op(TAG_EVTCHN, Op::PollAdd { fd })?;
                }
                return Ok(());
            }
            TAG_STOP => {
                self.stopping = true;
                return Ok(());
            }
            TAG_THROTTLE => {
                // limits: the loop calls start_pending again.
                self.throttle_timer = false;
                return Ok(());
            }
            _ => {}
        }
        let slot = c.user_data as usize;
        let Some(stage) = self
            .slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .map(|i| i.stage)
        else {
            warn!("{}: completion for unknown slot {slot}", self.ctx.name);
            if let Some(r) = c.region {
                self.ctx.engine.free(r);
            }
            return Ok(());
        };
        if c.result < 0 {
            let e = io::Error::from_raw_os_error(-c.result);
            warn!(
                "{}: {stage:?} on {} failed: {e}; answering BLKIF_RSP_ERROR",
                self.ctx.name,
                self.ctx.image.display()
            );
            if let Some(r) = c.region {
                self.ctx.engine.free(r);
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
            Stage::Read => {
                let region = c.region.expect("read has a region");
                let len = self.slots[slot].as_ref().map_or(0, |i| i.len);
                let ok = self.copy_to_guest(slot, &region);
                self.ctx.engine.free(region);
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
                    self.ctx.engine.free(r);
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
                    self.ctx.engine.free(r);
                }
                let len = self.slots[slot].as_ref().map_or(0, |i| i.len);
                self.ctx
                    .stats
                    .bytes_written
                    .fetch_add(len, Ordering::Relaxed);
                self.set_stage(slot, Stage::Flush);
                self.submit_or_fail(slot, Op::Fdatasync);
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
        self.ctx.stats.answered(i.t0, i.op, true, i.len, ok);
        self.respond(i.jent, i.id, i.op, status);
    }

    fn respond(&mut self, jent: u32, id: u64, op: u8, status: i16) {
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
/// that are not limited (flush, discard, barrier without data, indirect not
/// fetched yet).
fn rw_cost(p: &Pending) -> Option<(bool, u64)> {
    match p {
        Pending::Rw(r) => Some((r.op == RwOp::Write, r.len)),
        _ => None,
    }
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

/// A stop signal for a queue thread.
pub(crate) fn stop_fd() -> io::Result<EventFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(io::Error::from)
}
