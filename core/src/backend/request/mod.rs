//! The request path of one blkif ring (a queue), one file per phase. Queues
//! run on the io_uring workers ([`super::worker`]): a worker owns one engine
//! and serves many queues with it, and calls [`Queue::pump`] and
//! [`Queue::on_completion`]; everything else here follows from those two.
//!
//! A request is one [`Req`] from the moment it is consumed to its answer: it
//! waits in the queue's `pending` line ([`Stage::Waiting`]), runs in a slot
//! (the other stages), and is answered from there. The phases, in order:
//!
//! | phase | file | what |
//! |---|---|---|
//! | parse | [`parse`] | copy each new slot out of the shared ring once ([`BackRing::next_request`]), validate it ([`parse_request`]) into a `Req`, or answer the rejection at once |
//! | admit | [`admit`] | in ring order, start a waiting request when the ordering rules (a FLUSH or barrier waits for every earlier request), a ring slot, engine room, a buffer from the worker's slab (first come first served; a zero-copy read needs none, [`data`]) and the limits allow; otherwise it waits — never failed for the backend's own reasons |
//! | submit | [`submit`] | fetch an indirect request's segment list; grant-copy a write's data in (one grant copy per pass); queue the file op on the engine |
//! | complete | [`complete`] | an engine completion moves the request on: a read's data is copied out to the guest (a zero-copy read's is there already), a barrier's write is followed by its fdatasync, everything else is done |
//! | respond | [`respond`] | exactly one response per request; responses are published together and the frontend is notified only if it asked (`rsp_event`); before sleeping, the ring.h final check |
//!
//! What each operation does at start and at completion is in [`ops`], so
//! that an operation is defined in one place of the backend.
//!
//! What is not the request path plugs in at named points ([`hooks`]): the
//! statistics and the restart journal at consume, start, answer and publish;
//! the limits in [`admit`]; persistent grants in [`data`], where data moves
//! between the guest's pages and the worker's buffers.
//!
//! [`BackRing::next_request`]: crate::blkif::BackRing::next_request
//! [`parse_request`]: crate::blkif::parse_request

mod admit;
mod complete;
mod data;
mod hooks;
mod lifecycle;
pub(crate) mod ops;
mod parse;
mod respond;
mod submit;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use super::limiter::LimiterChain;
use super::pgrants::PersistentGrants;
use super::restart::{Journal, Replay};
use crate::blkif::{BackRing, DiskInfo, Piece, Request};
use crate::engine::{BufRegion, Completion, Engine, ImageFile, ImageId};
use crate::platform::{DomId, EventChannel, GrantStatus, Platform, PAGE_SIZE};

pub use super::stats::QueueStats;
pub(crate) use admit::BufferLine;
use ops::Io;

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
    /// memcpy instead of a grant copy per request ([`data`]).
    pub persistent: Option<PersistentGrants>,
    /// With persistent grants, reads whose segments are all mapped and aligned
    /// go straight into the guest's pages ([`data`]). Off for an image whose
    /// file has data checksums (btrfs without NOCOW), decided when the device
    /// starts.
    pub zero_copy_reads: bool,
    /// The restart journal (`--state-dir`): consumed requests are recorded
    /// until their response is published ([`hooks`]).
    pub journal: Option<Journal>,
    /// Requests a previous daemon consumed and did not answer (a restart):
    /// executed first, in their original order.
    pub replay: Vec<Replay>,
    /// Test hook: told about every step (None in production).
    pub observer: Option<Observer>,
    /// The device's and the domain's limiters (reads and writes only; [`admit`]).
    pub limiter: LimiterChain,
}

/// Why a queue stopped serving its ring (its device is then closed). A
/// broken frontend is `Ring`; the others are the backend's own failures.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The frontend broke the ring protocol (a bogus producer index).
    #[error("ring protocol violation: {0}")]
    Ring(#[from] crate::blkif::RingError),
    /// The restart journal had no free entry (a backend bug: it has one per
    /// ring slot).
    #[error("journal {} full", .0.display())]
    JournalFull(std::path::PathBuf),
    /// Acknowledging the event channel failed.
    #[error("event channel: {0}")]
    EventChannel(#[source] std::io::Error),
    /// The event channel's poll on the engine failed.
    #[error("event channel poll failed: {0}")]
    EventChannelPoll(#[source] std::io::Error),
    /// The engine refused one of the queue's own ops (a poll).
    #[error("io_uring push: {0}")]
    Engine(#[source] std::io::Error),
    /// The image could not be attached to the worker's engine.
    #[error("{}: {source}", image.display())]
    Attach {
        image: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The queue's code panicked (a bug in refblk); only its device is closed.
    #[error("the queue panicked (a bug in refblk): {0}")]
    Panicked(String),
}

/// Journal entry of a request on a queue without a journal.
const NO_ENTRY: u32 = u32::MAX;

/// One consumed request, from the ring to its answer.
#[derive(Debug)]
struct Req {
    /// Its restart-journal entry (NO_ENTRY without a journal).
    jent: u32,
    id: u64,
    /// The operation its response names.
    op: u8,
    /// When it was consumed (None: statistics off).
    t0: Option<Instant>,
    /// Data bytes: a read's or write's length, a discard's extent; 0 for a
    /// flush and for an indirect request whose segments are not fetched yet.
    len: u64,
    /// The guest's pages of a started read or write, back to back in its
    /// buffer (empty before the start and for other requests).
    pieces: Vec<Piece>,
    stage: Stage,
}

/// Where a request is.
#[derive(Debug)]
enum Stage {
    /// Validated, waiting in line to start.
    Waiting(Request),
    /// Started: its file op (or its data's copy) is under way.
    Running(Io),
}

impl Req {
    /// What a started request waits for (None while it waits to start).
    fn io(&self) -> Option<Io> {
        match self.stage {
            Stage::Running(io) => Some(io),
            Stage::Waiting(_) => None,
        }
    }
}

/// What an engine op of a queue is for: the low half of its user_data (the
/// high half is the queue's index in its worker's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// The file op of the request in this ring slot.
    Slot(u32),
    /// The event channel poll.
    Evtchn,
    /// The queue's timer (a delayed start).
    Timer,
    /// The cancellations issued when the queue stops.
    Cancel,
}

impl Tag {
    fn to_u32(self) -> u32 {
        match self {
            Tag::Slot(s) => s,
            Tag::Evtchn => u32::MAX,
            Tag::Timer => u32::MAX - 1,
            Tag::Cancel => u32::MAX - 2,
        }
    }

    fn from_u32(t: u32) -> Tag {
        match t {
            u32::MAX => Tag::Evtchn,
            t if t == u32::MAX - 1 => Tag::Timer,
            t if t == u32::MAX - 2 => Tag::Cancel,
            s => Tag::Slot(s),
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
    /// The time of the current batch (completions reaped, or a queue's pump),
    /// so that the statistics read the clock once per batch rather than twice
    /// per request.
    pub now: Instant,
    /// Queues waiting for buffer space, first come first served ([`admit`]).
    pub buffers: BufferLine,
}

impl Shared {
    pub fn new(engine: Engine) -> Shared {
        Shared {
            engine,
            indirect: vec![0u8; xen_sys::blkif::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * PAGE_SIZE],
            copy_status: Vec::with_capacity(64),
            now: Instant::now(),
            buffers: BufferLine::default(),
        }
    }

    /// Something a waiting queue needs may have changed since `mark`
    /// ([`progress_mark`](Self::progress_mark)): buffers were freed or the
    /// line moved. The worker then serves its queues again before sleeping.
    pub fn waiters_may_proceed(&self, mark: (u64, u64)) -> bool {
        !self.buffers.is_empty() && mark != self.progress_mark()
    }

    pub fn progress_mark(&self) -> (u64, u64) {
        (self.engine.buffer_frees(), self.buffers.turns())
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
    /// Started requests by ring slot.
    slots: Vec<Option<Req>>,
    free_slots: Vec<usize>,
    /// Parsed requests not started yet, in ring order.
    pending: VecDeque<Req>,
    /// The batch time (see [`Shared::now`]).
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
    failed: Option<QueueError>,
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
    /// Do all the work possible without waiting.
    pub fn pump(&mut self, sh: &mut Shared) -> Pump {
        self.dirty = false;
        if self.ctx.stats.enabled {
            sh.now = Instant::now(); // the time of this batch
        }
        self.now = sh.now;
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

    /// A completion of one of this queue's ops (`tag` = low half of user_data).
    pub fn on_completion(&mut self, sh: &mut Shared, tag: u32, c: Completion) {
        self.ops -= 1;
        self.now = sh.now; // when the worker reaped this batch
        self.dirty = true;
        if let Err(e) = self.complete(sh, Tag::from_u32(tag), c) {
            self.fail(sh, e);
        }
    }

    fn ud(&self, tag: Tag) -> u64 {
        (u64::from(self.index) << 32) | u64::from(tag.to_u32())
    }

    fn in_flight_requests(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Tag;

    #[test]
    fn tags_round_trip() {
        for t in [
            Tag::Slot(0),
            Tag::Slot(511),
            Tag::Evtchn,
            Tag::Timer,
            Tag::Cancel,
        ] {
            assert_eq!(Tag::from_u32(t.to_u32()), t);
        }
    }
}
