//! Phase 2, admit: start waiting requests in ring order until one cannot
//! start yet. A request that cannot start waits — for this queue's own I/O
//! (a FLUSH or barrier waits for every earlier request; nothing starts while
//! a barrier runs), for a ring slot, for room in the worker's engine, for a
//! buffer from the worker's slab, or for its limits — and is never failed
//! for it: that is backpressure, not an error. The limits plug in here
//! ([`Queue::admit_limits`]).
//!
//! Liveness: before its worker sleeps, a queue with waiting requests must
//! have something that will wake it ([`Queue::stalled`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::super::limiter::MAX_WAIT;
use super::data::{self, Data};
use super::{ops, Queue, Shared, Stage};
use crate::engine::BufRegion;

/// Engine op slots kept free (the engine is shared by the worker's queues) for
/// poll re-arms, timers, cancellations and a barrier's flush.
const ENGINE_RESERVE: usize = 8;

/// The worker's queues waiting for buffer space (by table index), first come
/// first served: while one waits, only the first may allocate, so a large
/// request is never starved by a stream of small ones from other queues.
/// Every buffer is released by an I/O in flight or by the next pump of its
/// queue, so the first in line always gets its turn.
#[derive(Debug, Default)]
pub(crate) struct BufferLine {
    waiters: VecDeque<u32>,
    /// Bumped when the first in line got its buffer or left the line (the
    /// next one may try now).
    turns: u64,
}

impl BufferLine {
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn turns(&self) -> u64 {
        self.turns
    }

    /// Queue `q` no longer waits for a buffer.
    pub fn leave(&mut self, q: u32) {
        if let Some(at) = self.waiters.iter().position(|&w| w == q) {
            self.waiters.remove(at);
            if at == 0 {
                self.turns += 1;
            }
        }
    }
}

impl Shared {
    /// A buffer of `len` bytes for queue `q`, or None: `q` waits in line (see
    /// [`BufferLine`]) and is served again after buffers were freed.
    fn alloc_for(&mut self, q: u32, len: usize) -> Option<BufRegion> {
        let line = &mut self.buffers;
        let first = line.waiters.front().copied();
        let r = match first {
            Some(f) if f != q => None,
            _ => self.engine.alloc(len),
        };
        match (&r, first) {
            (Some(_), Some(f)) if f == q => {
                line.waiters.pop_front();
                line.turns += 1;
            }
            (None, _) if !line.waiters.contains(&q) => line.waiters.push_back(q),
            _ => {}
        }
        r
    }
}

impl Queue {
    /// Start waiting requests in order until one cannot start yet.
    pub(super) fn start_pending(&mut self, sh: &mut Shared) {
        self.waits_for_worker = false;
        let mut in_buffer_line = false;
        while let Some(req) = self.pending.front() {
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
            let Stage::Waiting(r) = &req.stage else {
                break; // only waiting requests are in the line
            };
            if ops::needs_drain(r) && self.in_flight_requests() > 0 {
                break;
            }
            let Some(slot) = self.free_slots.last().copied() else {
                break;
            };
            let rw = ops::data_transfer(r);
            // A read whose pages are all persistently mapped (and fit the
            // image's direct-I/O alignment) needs no buffer: it goes straight
            // into the guest's pages ([`data`](super::data)).
            let zero_copy = match rw {
                Some((false, len)) if len > 0 && self.ctx.zero_copy_reads => self
                    .ctx
                    .persistent
                    .as_mut()
                    .and_then(|pg| data::zero_copy_read(pg, &self.ctx.file.io_mode, r)),
                _ => None,
            };
            // Otherwise the buffer comes from the worker's slab, shared with
            // its other queues. None: wait in line for it (buffers are freed as
            // I/O completes; the slab holds the largest request a guest may
            // send, see `Backend::new`).
            let data = match (zero_copy, rw) {
                (Some(bufs), _) => Some(Data::Guest(bufs)),
                (None, Some((_, len))) if len > 0 => match sh.alloc_for(self.index, len as usize) {
                    Some(r) => Some(Data::Buf(r)),
                    None => {
                        if !self.front_waited {
                            self.front_waited = true;
                            self.ctx.stats.buffer_waits.fetch_add(1, Ordering::Relaxed);
                        }
                        self.waits_for_worker = true;
                        in_buffer_line = true;
                        break;
                    }
                },
                _ => None,
            };
            if let Some((write, bytes)) = rw.filter(|_| data.is_some()) {
                if let Err(at) = self.admit_limits(write, bytes) {
                    // (A zero-copy read's pins drop here.)
                    if let Some(Data::Buf(r)) = data {
                        sh.engine.free(r);
                    }
                    self.arm_timer(sh, at);
                    break;
                }
            }
            let req = self.pending.pop_front().expect("front exists");
            self.front_waited = false;
            self.free_slots.pop();
            self.start(sh, slot, req, data);
        }
        if !in_buffer_line {
            sh.buffers.leave(self.index);
        }
        self.copy_in_writes(sh);
    }

    /// The limits' say on a read or write of `bytes`: Ok to start now, or
    /// when to look again (at most [`MAX_WAIT`] away, so that a raised limit
    /// is seen soon). Not while stopping: a stop must not wait.
    fn admit_limits(&mut self, write: bool, bytes: u64) -> Result<(), Instant> {
        if self.stopping || !self.ctx.limiter.is_active() {
            return Ok(());
        }
        let now = Instant::now();
        self.ctx.limiter.admit(write, bytes, now).map_err(|at| {
            self.ctx.stats.throttled.fetch_add(1, Ordering::Relaxed);
            at.min(now + MAX_WAIT)
        })
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
}
