//! Fault injection for crash-safety tests.
//!
//! Every syscall-level step of a pool operation that changes the disk (create, write,
//! truncate, fsync, rename, link, unlink, mkdir, FICLONE, utimens) first calls
//! [`Faults::check`]. A test arms the counter so that step N:
//! - [`FaultMode::Fail`]: fails once with the given errno (e.g. ENOSPC); later steps,
//!   including the operation's own cleanup, run normally;
//! - [`FaultMode::Crash`]: fails, and so does every later step — nothing touches the
//!   disk any more, which is what the disk sees when the process is killed at step N;
//! - [`FaultMode::Abort`]: calls `std::process::abort()` (a real kill, for tests
//!   that run the `refblk` binary).
//!
//! The CLI arms it from the environment variable `REFBLK_FAULT` (`fail:N[:ERRNO]`,
//! `crash:N`, `abort:N`); this is a testing hook and documented as such.
//!
//! `hold_next_commit` (with the `test-hooks` feature, test builds only) makes a commit as slow as a test needs: the next stop of a
//! volume that commits waits, holding the volume's lock, until the test lets it go
//! (the daemon's commits run off its control thread; docs/datapath.md).

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
#[cfg(feature = "test-hooks")]
use std::sync::{atomic::AtomicBool, mpsc};

/// What happens at the armed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Step N fails with this errno, once.
    Fail(i32),
    /// Step N and all later steps fail with EIO (simulated kill).
    Crash,
    /// Step N aborts the process.
    Abort,
}

/// A step counter with an optional armed fault. Cheap when disarmed.
#[derive(Debug, Default)]
pub struct Faults {
    count: AtomicU64,
    at: AtomicU64,
    mode: AtomicU8,
    errno: AtomicI32,
    trace: Mutex<Vec<String>>,
}

const MODE_OFF: u8 = 0;
const MODE_FAIL: u8 = 1;
const MODE_CRASH: u8 = 2;
const MODE_ABORT: u8 = 3;

impl Faults {
    /// A disarmed counter.
    pub fn new() -> Faults {
        Faults::default()
    }

    /// Arm: step `n` (1-based, counted from now) gets `mode`. Resets the count.
    pub fn arm(&self, n: u64, mode: FaultMode) {
        self.reset();
        let (m, e) = match mode {
            FaultMode::Fail(e) => (MODE_FAIL, e),
            FaultMode::Crash => (MODE_CRASH, libc::EIO),
            FaultMode::Abort => (MODE_ABORT, 0),
        };
        self.errno.store(e, Ordering::SeqCst);
        self.at.store(n, Ordering::SeqCst);
        self.mode.store(m, Ordering::SeqCst);
    }

    /// Disarm and reset the count (counting continues).
    pub fn disarm(&self) {
        self.mode.store(MODE_OFF, Ordering::SeqCst);
        self.reset();
    }

    /// Reset the step count and the trace.
    pub fn reset(&self) {
        self.count.store(0, Ordering::SeqCst);
        if let Ok(mut t) = self.trace.lock() {
            t.clear();
        }
    }

    /// Steps seen since the last arm/disarm/reset.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Names of the steps seen since the last reset (for test diagnostics).
    pub fn trace(&self) -> Vec<String> {
        self.trace.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Parse `fail:N[:ERRNO]`, `crash:N`, `abort:N` (the `REFBLK_FAULT` syntax).
    pub fn parse(spec: &str) -> Option<(u64, FaultMode)> {
        let mut it = spec.split(':');
        let kind = it.next()?;
        let n: u64 = it.next()?.parse().ok()?;
        let mode = match kind {
            "fail" => FaultMode::Fail(match it.next() {
                Some(e) => e.parse().ok()?,
                None => libc::EIO,
            }),
            "crash" => FaultMode::Crash,
            "abort" => FaultMode::Abort,
            _ => return None,
        };
        Some((n, mode))
    }

    /// Called before each disk-changing step; `what` describes it.
    pub fn check(&self, what: &dyn Fn() -> String) -> io::Result<()> {
        let c = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mode = self.mode.load(Ordering::SeqCst);
        if mode != MODE_OFF || cfg!(debug_assertions) {
            if let Ok(mut t) = self.trace.lock() {
                if t.len() < 10_000 {
                    t.push(what());
                }
            }
        }
        if mode == MODE_OFF {
            return Ok(());
        }
        let at = self.at.load(Ordering::SeqCst);
        let hit = match mode {
            MODE_CRASH => c >= at,
            _ => c == at,
        };
        if !hit {
            return Ok(());
        }
        if mode == MODE_ABORT {
            eprintln!("refblk: injected abort at step {c}: {}", what());
            std::process::abort();
        }
        let errno = self.errno.load(Ordering::SeqCst);
        Err(io::Error::new(
            io::Error::from_raw_os_error(errno).kind(),
            InjectedFault { step: c, errno },
        ))
    }
}

#[cfg(feature = "test-hooks")]
static HOLD_ARMED: AtomicBool = AtomicBool::new(false);
/// Armed holds: the vid, where to say "held", what to wait on.
#[cfg(feature = "test-hooks")]
type Armed = (String, mpsc::Sender<()>, mpsc::Receiver<()>);
#[cfg(feature = "test-hooks")]
static HOLDS: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

/// Testing only: a commit held at its start (see [`hold_next_commit`]). Dropping it
/// (or [`release`](Self::release)) lets the commit go on, so a failing test never
/// leaves a commit hanging.
#[cfg(feature = "test-hooks")]
pub struct CommitHold {
    vid: String,
    held: mpsc::Receiver<()>,
    _release: mpsc::Sender<()>,
}

/// Testing only (nothing in refblk arms it): the next [`stop`](super::Volume::stop)
/// of volume `vid` in this process that commits waits, with the volume's lock held and
/// its start record removed, just before the commit's first step, until the returned
/// hold is released or dropped. One-shot. Stands in for a commit that takes seconds
/// (a fragmented image's FICLONE) without depending on speed.
#[cfg(feature = "test-hooks")]
pub fn hold_next_commit(vid: &str) -> CommitHold {
    let (held_tx, held) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    HOLDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((vid.to_string(), held_tx, release_rx));
    HOLD_ARMED.store(true, Ordering::Release);
    CommitHold {
        vid: vid.to_string(),
        held,
        _release: release,
    }
}

#[cfg(feature = "test-hooks")]
impl CommitHold {
    /// Wait up to `bound` until the commit has reached the hold; whether it did.
    pub fn wait_held(&self, bound: std::time::Duration) -> bool {
        self.held.recv_timeout(bound).is_ok()
    }

    /// Let the commit go on.
    pub fn release(self) {
        log::debug!("volume {}: held commit released", self.vid);
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn maybe_hold_commit(_vid: &str) {}

/// Called by a commit before its first step: wait if a test holds it.
#[cfg(feature = "test-hooks")]
pub(crate) fn maybe_hold_commit(vid: &str) {
    if !HOLD_ARMED.load(Ordering::Acquire) {
        return;
    }
    let armed = {
        let mut h = HOLDS.lock().unwrap_or_else(|p| p.into_inner());
        let at = h.iter().position(|(v, _, _)| v == vid);
        let armed = at.map(|i| h.remove(i));
        if h.is_empty() {
            HOLD_ARMED.store(false, Ordering::Release);
        }
        armed
    };
    if let Some((_, held, release)) = armed {
        log::info!("volume {vid}: commit held by a test");
        let _ = held.send(());
        // Returns when the hold is released (its sender dropped).
        let _ = release.recv();
    }
}

/// The error payload of an injected fault (so the raw errno is recoverable).
#[derive(Debug)]
pub struct InjectedFault {
    /// The step number.
    pub step: u64,
    /// The injected errno.
    pub errno: i32,
}

impl std::fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "injected fault at step {}: {}",
            self.step,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for InjectedFault {}

/// The errno of an error, looking through injected faults.
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<InjectedFault>())
            .map(|f| f.errno)
    })
}
