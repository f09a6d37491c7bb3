//! Counting this process's descriptors and threads, for the leak checks.
//!
//! The counts are process-wide: another test running in the same process
//! would move them. The leak checks therefore live in a binary of their own
//! (`tests/leaks/`) and each takes [`exclusive`] first, so that they run one
//! at a time. The harness still starts the thread of the next test while one
//! runs; [`threads`] leaves out the threads blocked in [`exclusive`], and a
//! thread the harness has only just started (not yet waiting there) can only
//! raise a baseline, never make a count exceed it once it waits.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static EXCLUSIVE: Mutex<()> = Mutex::new(());
/// Thread ids blocked in [`exclusive`].
static WAITING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run alone among the tests that take this: hold the guard for the whole test.
pub fn exclusive() -> MutexGuard<'static, ()> {
    let tid = nix::unistd::gettid().as_raw();
    lock(&WAITING).push(tid);
    let guard = lock(&EXCLUSIVE);
    lock(&WAITING).retain(|&t| t != tid);
    guard
}

/// This process's open file descriptors.
pub fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Our threads: not the kernel's io-wq workers (`iou-wrk-*`: the io_uring
/// workers' rings live as long as the backend, and the kernel keeps the last
/// io-wq thread of a ring alive even when idle), not the harness's threads of
/// tests waiting in [`exclusive`].
pub fn threads() -> usize {
    let waiting = lock(&WAITING).clone();
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            let tid = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok());
            !tid.is_some_and(|tid| waiting.contains(&tid))
        })
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| !c.starts_with("iou-wrk"))
        })
        .count()
}

/// Wait until `ok` holds (threads and descriptors of closed connections go
/// away asynchronously), at most `bound`; whether it held.
pub fn settle(bound: Duration, ok: impl FnMut() -> bool) -> bool {
    super::wait::wait_until(bound, ok)
}

/// Mappings in /proc/self/maps whose line contains `what` (a path, or
/// `io_uring`).
pub fn mappings(what: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}
