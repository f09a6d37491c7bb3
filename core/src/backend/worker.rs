//! The io_uring workers: a few threads (one per CPU by default), each with one
//! engine — one io_uring and one registered buffer slab — serving the queues of
//! many devices.
//!
//! Why not a thread per queue: 128 guests with a thread, a ring and a slab each
//! pin 4 MiB per queue and context-switch once per request round trip; a worker
//! takes the requests of every ready queue in one pass and submits them with one
//! `io_uring_enter`. A queue's cost on a worker is its ring mapping, its event
//! channel, a slot table and its image's two fds.
//!
//! A queue is added with [`Workers::add`] (to the worker with the fewest
//! queues) and stays on that worker until it finishes. Its engine ops carry
//! `(table index << 32) | tag` as user_data; the worker routes completions by
//! the high half. The worker sleeps in exactly one place, `io_uring_enter`:
//! each queue's event channel is a one-shot poll on the worker's ring, and so is
//! the worker's own wake-up eventfd (written after a message is sent).
//!
//! A bug is contained in its queue: a panic while a queue pumps, completes or
//! is checked for stalls takes that queue (and so its device, which the
//! control thread then closes) off the worker; the worker's other queues go on.
//! The panicked queue's table index is never used again, since completions of
//! its ops may still come: they free their buffers, and its image is detached
//! from the engine once the last of its I/O is back.
//!
//! Fairness: each pass serves the queues that have work, starting one place
//! further every pass; a queue that cannot start a request for lack of buffers
//! or engine slots is served again on the next pass, after completions freed
//! some.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use log::{debug, error, info, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::request::{Pump, Queue, QueueCtx, QueueError, Shared};
use crate::engine::{Completion, Engine, EngineConfig, ImageId, Op};

/// How a finished queue is reported (called on the worker thread).
pub(crate) type ExitFn = Box<dyn FnOnce(Result<(), QueueError>) + Send>;

/// user_data of the worker's wake-up poll.
const WAKE: u64 = u64::MAX;

enum Msg {
    Add {
        id: u64,
        ctx: Box<QueueCtx>,
        exit: ExitFn,
    },
    Stop(u64),
}

struct WorkerHandle {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
    /// Queues on this worker.
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// A queue running on a worker: how to stop it and to wait for it.
pub(crate) struct Ticket {
    id: u64,
    worker: usize,
    done: Receiver<()>,
}

/// The worker pool.
pub(crate) struct Workers {
    workers: Vec<WorkerHandle>,
    next_id: AtomicU64,
}

impl Workers {
    /// Start `n` workers (0: one per CPU), each building its engine with `cfg`.
    /// `poll` > 0: after a busy pass a worker polls its queues' rings and its
    /// completion queue for up to that long before it sleeps.
    pub fn start(n: usize, cfg: &EngineConfig, poll: Duration) -> io::Result<Workers> {
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = unbounded();
            let wake = Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(io::Error::from)?,
            );
            let load = Arc::new(AtomicUsize::new(0));
            let (ready_tx, ready_rx) = bounded(1);
            let (w2, l2, cfg2) = (wake.clone(), load.clone(), cfg.clone());
            let thread = std::thread::Builder::new()
                .name(format!("refblk-io{i}"))
                .spawn(move || {
                    // Built here so SINGLE_ISSUER binds the ring to this thread.
                    let engine = match Engine::new(&cfg2) {
                        Ok(e) => {
                            let _ = ready_tx.send(Ok(()));
                            e
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    Worker::new(i, engine, rx, w2, l2, poll).run();
                })?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = thread.join();
                    return Err(io::Error::new(e.kind(), format!("io worker {i}: {e}")));
                }
                Err(_) => {
                    let _ = thread.join();
                    return Err(io::Error::other(format!("io worker {i} died at start")));
                }
            }
            workers.push(WorkerHandle {
                tx,
                wake,
                load,
                thread: Some(thread),
            });
        }
        info!("{n} io_uring worker(s)");
        Ok(Workers {
            workers,
            next_id: AtomicU64::new(1),
        })
    }

    /// Run a queue on the least loaded worker. `exit` is called on the worker
    /// when the queue has finished and let go of its ring and image.
    pub fn add(&self, ctx: QueueCtx, exit: ExitFn) -> io::Result<Ticket> {
        let (worker, h) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, h)| h.load.load(Ordering::Relaxed))
            .ok_or_else(|| io::Error::other("no io workers"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done) = bounded(1);
        let exit: ExitFn = Box::new(move |r| {
            exit(r);
            let _ = done_tx.send(());
        });
        h.load.fetch_add(1, Ordering::Relaxed);
        h.tx.send(Msg::Add {
            id,
            ctx: Box::new(ctx),
            exit,
        })
        .map_err(|_| io::Error::other(format!("io worker {worker} is gone")))?;
        wake(&h.wake);
        Ok(Ticket { id, worker, done })
    }

    /// Ask a queue to stop: it answers what it consumed and takes nothing new.
    pub fn stop(&self, t: &Ticket) {
        let h = &self.workers[t.worker];
        if h.tx.send(Msg::Stop(t.id)).is_ok() {
            wake(&h.wake);
        }
    }

    /// Wait until a queue has finished (returns at once if its worker died).
    pub fn wait(&self, t: &Ticket) {
        let _ = t.done.recv();
    }
}

fn wake(fd: &EventFd) {
    if let Err(e) = fd.write(1) {
        warn!("waking an io worker: {e}");
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for h in &mut self.workers {
            // Closing the channel tells the worker to finish its queues and exit.
            let (dead, _) = unbounded();
            drop(std::mem::replace(&mut h.tx, dead));
            wake(&h.wake);
        }
        for h in &mut self.workers {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct Entry {
    q: Queue,
    id: u64,
    exit: ExitFn,
}

struct Worker {
    idx: usize,
    sh: Shared,
    queues: Vec<Option<Entry>>,
    rx: Receiver<Msg>,
    wake: Arc<EventFd>,
    load: Arc<AtomicUsize>,
    comps: Vec<Completion>,
    /// Where the next pass starts.
    rr: usize,
    /// The pool was dropped: finish the queues, then exit.
    closing: bool,
    /// Busy-poll budget before sleeping (0: never poll).
    poll: Duration,
    /// The last pass or its completions did work (polling is worth it).
    busy: bool,
    /// Table indices of queues that panicked (never reused), with the image
    /// still attached to the engine while I/O of theirs is in flight.
    poisoned: HashMap<u32, Option<ImageId>>,
}

impl Worker {
    fn new(
        idx: usize,
        engine: Engine,
        rx: Receiver<Msg>,
        wake: Arc<EventFd>,
        load: Arc<AtomicUsize>,
        poll: Duration,
    ) -> Worker {
        Worker {
            idx,
            sh: Shared::new(engine),
            queues: Vec::new(),
            rx,
            wake,
            load,
            comps: Vec::with_capacity(256),
            rr: 0,
            closing: false,
            poll,
            busy: false,
            poisoned: HashMap::new(),
        }
    }

    fn arm_wake(&mut self) {
        let fd = self.wake.as_fd().as_raw_fd();
        if let Err(r) = self.sh.engine.push(WAKE, Op::PollAdd { fd }) {
            // Without the poll the worker still runs its queues, but messages
            // wait for the next completion; say so.
            warn!(
                "io worker {}: cannot arm its wake-up poll: {}",
                self.idx,
                r.into_io_error()
            );
        }
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            self.on_messages();
            let mark = self.sh.progress_mark();
            let mut again = self.pass();
            if self.closing && self.queues.iter().all(Option::is_none) {
                debug!("io worker {}: exiting", self.idx);
                return;
            }
            // Buffers freed (or the line moved) during the pass, after a queue
            // waiting for them was served: serve it again now, since no
            // completion may come to wake it.
            again |= self.sh.waiters_may_proceed(mark);
            if !again {
                again = self.poll_for_work() || self.stalled_queues();
            }
            let r = if again {
                self.sh.engine.submit()
            } else {
                self.sh.engine.submit_and_wait(1)
            };
            if let Err(e) = r {
                // The ring itself failed: nothing on this worker can make progress.
                warn!("io worker {}: {e}", self.idx);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let mut comps = std::mem::take(&mut self.comps);
            self.sh.engine.reap(&mut comps);
            if !comps.is_empty() {
                self.sh.now = std::time::Instant::now(); // stats: one clock read per batch
            }
            for c in comps.drain(..) {
                self.route(c);
            }
            self.comps = comps;
        }
    }

    /// Before sleeping after a busy pass: submit, then watch the queues' rings
    /// and the completion queue for up to `poll`. True if work showed up (the
    /// caller then does not sleep). Saves the wake-ups of a request round trip
    /// at low queue depth, at the price of CPU time; off by default.
    fn poll_for_work(&mut self) -> bool {
        if self.poll.is_zero() || !std::mem::take(&mut self.busy) || self.closing {
            return false;
        }
        if let Err(e) = self.sh.engine.submit() {
            warn!("io worker {}: {e}", self.idx);
            return false;
        }
        let deadline = Instant::now() + self.poll;
        loop {
            if self.sh.engine.peek_completions() {
                return true;
            }
            for e in self.queues.iter_mut().flatten() {
                if e.q.has_new_requests() {
                    e.q.mark_dirty();
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Before sleeping: does a queue hold requests that nothing will wake
    /// (see [`Queue::stalled`])? Then it is served once more.
    fn stalled_queues(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.queues.len() {
            let Some(e) = self.queues[i].as_mut() else {
                continue;
            };
            match catch_unwind(AssertUnwindSafe(|| e.q.stalled(&self.sh))) {
                Ok(stalled) => any |= stalled,
                Err(p) => self.poison(i, p),
            }
        }
        any
    }

    /// Serve every queue that has work, from a rotating start. True if some
    /// queue found new requests in its final check (pass again before sleeping).
    fn pass(&mut self) -> bool {
        let n = self.queues.len();
        let mut again = false;
        for k in 0..n {
            let i = (self.rr + k) % n;
            let Some(e) = self.queues[i].as_mut() else {
                continue;
            };
            if !e.q.wants_pump() {
                continue;
            }
            self.busy = true;
            match catch_unwind(AssertUnwindSafe(|| e.q.pump(&mut self.sh))) {
                Ok(Pump::Idle) => {}
                Ok(Pump::Again) => again = true,
                Ok(Pump::Finished) => self.remove(i),
                Err(p) => self.poison(i, p),
            }
        }
        self.rr = self.rr.wrapping_add(1);
        while matches!(self.queues.last(), Some(None))
            && !self.poisoned.contains_key(&(self.queues.len() as u32 - 1))
        {
            self.queues.pop();
        }
        again
    }

    fn remove(&mut self, i: usize) {
        let Some(e) = self.queues[i].take() else {
            return;
        };
        let r = e.q.finish_off(&mut self.sh);
        self.load.fetch_sub(1, Ordering::Relaxed);
        (e.exit)(r);
    }

    /// Queue `i` panicked: take it off the worker (see the module doc) and
    /// report it, so that its device is closed; nothing else on this worker
    /// is touched.
    fn poison(&mut self, i: usize, payload: Box<dyn Any + Send>) {
        let Some(e) = self.queues[i].take() else {
            return;
        };
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        let name = e.q.name().to_string();
        error!(
            "{name}: a bug in refblk: this queue panicked ({what}); its device is closed, \
             the other queues of io worker {} go on",
            self.idx
        );
        let finished = e.q.finished_flag();
        let sh = &mut self.sh;
        let img = catch_unwind(AssertUnwindSafe(|| e.q.abandon(sh))).ok();
        finished.store(true, Ordering::Release);
        self.poisoned.insert(i as u32, img);
        self.release_poisoned_image(i as u32);
        self.load.fetch_sub(1, Ordering::Relaxed);
        (e.exit)(Err(QueueError::Panicked(what)));
    }

    /// Detach a panicked queue's image from the engine once none of its I/O
    /// is in flight any more.
    fn release_poisoned_image(&mut self, i: u32) {
        if let Some(slot) = self.poisoned.get_mut(&i) {
            if let Some(img) = *slot {
                if self.sh.engine.detach(img).is_ok() {
                    *slot = None;
                }
            }
        }
    }

    fn route(&mut self, c: Completion) {
        if c.user_data == WAKE {
            let _ = self.wake.read();
            if !self.closing {
                self.arm_wake();
            }
            return;
        }
        let (i, tag) = ((c.user_data >> 32) as usize, c.user_data as u32);
        match self.queues.get_mut(i).and_then(Option::as_mut) {
            Some(e) => {
                let sh = &mut self.sh;
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| e.q.on_completion(sh, tag, c))) {
                    self.poison(i, p);
                }
            }
            None if self.poisoned.contains_key(&(i as u32)) => {
                if let Some(r) = c.region {
                    self.sh.engine.free(r);
                }
                self.release_poisoned_image(i as u32);
            }
            None => {
                warn!(
                    "io worker {}: completion for no queue (user_data {:#x})",
                    self.idx, c.user_data
                );
                if let Some(r) = c.region {
                    self.sh.engine.free(r);
                }
            }
        }
    }

    fn on_messages(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Add { id, ctx, exit }) => self.add(id, ctx, exit),
                Ok(Msg::Stop(id)) => {
                    for e in self.queues.iter_mut().flatten() {
                        if e.id == id {
                            e.q.request_stop(&mut self.sh);
                        }
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    if !self.closing {
                        self.closing = true;
                        let _ = self.sh.engine.cancel(WAKE, WAKE);
                        for e in self.queues.iter_mut().flatten() {
                            e.q.request_stop(&mut self.sh);
                        }
                    }
                    return;
                }
            }
        }
    }

    fn add(&mut self, id: u64, ctx: Box<QueueCtx>, exit: ExitFn) {
        let poisoned = &self.poisoned;
        let free =
            |(i, q): &(usize, &Option<Entry>)| q.is_none() && !poisoned.contains_key(&(*i as u32));
        let i = match self.queues.iter().enumerate().find(free).map(|(i, _)| i) {
            Some(i) => i,
            None => {
                self.queues.push(None);
                self.queues.len() - 1
            }
        };
        match Queue::new(ctx, i as u32, &mut self.sh) {
            Ok(q) => {
                debug!("io worker {}: serving {} as #{i}", self.idx, q.name());
                self.queues[i] = Some(Entry { q, id, exit });
            }
            Err((ctx, e)) => {
                self.load.fetch_sub(1, Ordering::Relaxed);
                ctx.finished.store(true, Ordering::Release);
                drop(ctx);
                exit(Err(e));
            }
        }
    }
}

/// What the control thread hands to devices starting queues.
pub(crate) struct Runtime {
    pub events: Sender<super::Event>,
    pub workers: Arc<Workers>,
}
