//! Shared by the ops tests: a closed-loop load of a fixed number of
//! operations for the test frontend that records when each finished, the
//! bound a token bucket puts on those times, and a request held back by a
//! limit for longer than any machine is slow.
//!
//! Nothing here measures a rate: a loaded machine makes every operation
//! later, which a bound on how early they may finish never minds.
#![allow(dead_code)]

use std::time::Instant;

use refblk_core::limits::LimitsPatch;
use refblk_sim::frontend::{Frontend, IoRequest};

use crate::kit::leak::settle;
use crate::kit::{Rig, Rng, LONG, XVDA};

/// What a load run did.
pub struct Load {
    pub start: Instant,
    /// Completion time of every operation, in order.
    pub done: Vec<Instant>,
    /// Operations answered with an error status.
    pub errors: usize,
}

impl Load {
    /// The promise of a token bucket of `cap` operations refilled at `rate`
    /// per second from `since` on (when it was set, or full): by any time `t`
    /// it has admitted at most `cap + rate × (t − since)` operations. An
    /// operation finishes after it was admitted, so the k-th completion, at
    /// `t_k`, must have `k <= cap + rate × (t_k − since)`. Panics with the
    /// first completion that came too early.
    pub fn assert_token_bound(&self, what: &str, since: Instant, cap: f64, rate: f64) {
        assert!(
            since <= self.start,
            "{what}: the load started before the limit"
        );
        for (i, t) in self.done.iter().enumerate() {
            let k = (i + 1) as f64;
            let dt = t.saturating_duration_since(since).as_secs_f64();
            let allowed = cap + rate * dt;
            assert!(
                k <= allowed + 1e-6,
                "{what}: {k} operations done {dt:.3} s after the limit was set, \
                 the bucket ({cap} + {rate}/s) admits at most {allowed:.1}"
            );
        }
    }
}

/// Run `n` reads (or writes) of `len` bytes, up to `qd` in flight, at
/// 4 KiB-aligned places in the first 8 MiB of the disk.
pub fn run_ops(fe: &mut Frontend, write: bool, len: usize, qd: usize, n: usize) -> Load {
    let data = vec![0x5au8; len];
    let slots = (8 << 20) / len as u64;
    let mut rng = Rng::new(n as u64);
    let mut load = Load {
        start: Instant::now(),
        done: Vec::with_capacity(n),
        errors: 0,
    };
    let (mut issued, mut inflight) = (0usize, 0usize);
    while load.done.len() < n {
        while issued < n && inflight < qd {
            let sector = rng.below(slots) * (len as u64 / 512);
            let req = if write {
                IoRequest::Write {
                    sector,
                    data: &data,
                }
            } else {
                IoRequest::Read { sector, len }
            };
            fe.submit(None, req).expect("submit");
            issued += 1;
            inflight += 1;
        }
        for c in fe.wait(LONG).expect("responses") {
            inflight -= 1;
            load.done.push(Instant::now());
            if c.into_result().is_err() {
                load.errors += 1;
            }
        }
    }
    load
}

pub fn patch(s: &str) -> LimitsPatch {
    LimitsPatch::parse_pairs(s.split_whitespace()).expect("valid limits")
}

/// A request the limiter holds back, and a live change that releases it,
/// without depending on any timing: `key` (read-bps or write-bps) is set to
/// 1 byte/s on `target`; of two 4 KiB requests submitted together, the first
/// takes the one-byte bucket 4095 bytes into debt, so the second may start
/// only 4095 s later (the bucket starts full: set through 0). It must wait (the device counts a throttle, the request
/// stays unanswered), then `key=0` must release it: answered, and OK.
pub fn hold_back_then_release(rig: &Rig, fe: &mut Frontend, domid: u16, target: &str, key: &str) {
    let write = key.starts_with("write");
    let throttled = || rig.status(domid, XVDA).stats.throttled;
    // Through 0 (unlimited), so that the bucket starts full, not in debt.
    for v in [0, 1] {
        rig.backend
            .set_limits(target, patch(&format!("{key}={v}")))
            .expect("set the limit");
    }
    let before = throttled();
    let data = vec![0xa5u8; 4096];
    let req = |sector| {
        if write {
            IoRequest::Write {
                sector,
                data: &data,
            }
        } else {
            IoRequest::Read { sector, len: 4096 }
        }
    };
    let first = fe.submit(None, req(0)).expect("submit");
    let second = fe.submit(None, req(8)).expect("submit");
    let c = fe
        .wait_for(first, LONG)
        .expect("the first request, on a full bucket");
    assert!(c.into_result().is_ok());
    assert!(
        settle(LONG, || throttled() > before),
        "{key}=1: the limiter never held the second request back"
    );
    let early: Vec<_> = fe.poll().into_iter().map(|c| c.tag).collect();
    assert!(
        !early.contains(&second),
        "{key}=1: the second request ran although the bucket is 4095 bytes in debt"
    );
    rig.backend
        .set_limits(target, patch(&format!("{key}=0")))
        .expect("lift the limit");
    let c = fe
        .wait_for(second, LONG)
        .expect("lifting the limit releases the waiting request");
    assert!(c.into_result().is_ok(), "a delayed request failed");
}
