//! Testing only: make a queue panic, to check that a bug in one queue stays in
//! that queue (see `Worker::poison` in `worker.rs`). Only with the
//! `test-hooks` feature (test builds); without it the hook is an empty
//! function. Nothing in the daemon arms it; a disarmed hook costs one relaxed
//! atomic load per consumed request.

#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "test-hooks")]
use std::sync::Mutex;

#[cfg(feature = "test-hooks")]
static ARMED: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "test-hooks")]
static PREFIXES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The next request consumed by a queue whose name starts with `prefix`
/// (queue names are `vbd DOMID/DEVID/qN`) makes that queue panic. One-shot:
/// the prefix is disarmed by the panic it causes.
#[cfg(feature = "test-hooks")]
pub fn panic_on_next_request(prefix: &str) {
    PREFIXES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(prefix.to_string());
    ARMED.store(true, Ordering::Release);
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn maybe_panic(_queue: &str) {}

/// Panic if a test armed the hook for `queue`.
#[cfg(feature = "test-hooks")]
pub(crate) fn maybe_panic(queue: &str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let hit = {
        let mut p = PREFIXES.lock().unwrap_or_else(|p| p.into_inner());
        let at = p.iter().position(|x| queue.starts_with(x.as_str()));
        if let Some(at) = at {
            p.remove(at);
        }
        if p.is_empty() {
            ARMED.store(false, Ordering::Release);
        }
        at.is_some()
    };
    if hit {
        panic!("{queue}: panic injected by backend::testing");
    }
}
