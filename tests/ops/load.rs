//! Shared by the ops tests: a closed-loop load generator for the test
//! frontend that records when each operation finished, and rates over
//! windows of that record.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use refblk::frontend::{Frontend, IoRequest};

/// What a load run did.
pub struct Load {
    pub start: Instant,
    /// Completion time of every operation, in order.
    pub done: Vec<Instant>,
    /// Operations answered with an error status.
    pub errors: usize,
}

impl Load {
    /// Operations per second finished in `[from, to)` seconds after the start.
    pub fn rate(&self, from: f64, to: f64) -> f64 {
        let a = self.start + Duration::from_secs_f64(from);
        let b = self.start + Duration::from_secs_f64(to);
        let n = self.done.iter().filter(|&&t| t >= a && t < b).count();
        n as f64 / (to - from)
    }
}

/// Keep `qd` reads (or writes) of `len` bytes in flight for `dur`, at
/// 4 KiB-aligned places in the first 8 MiB of the disk, then wait for the
/// ones still in flight.
pub fn run_load(fe: &mut Frontend, write: bool, len: usize, qd: usize, dur: Duration) -> Load {
    let data = vec![0x5au8; len];
    let slots = (8 << 20) / len as u64;
    let mut next = 0u64;
    let start = Instant::now();
    let mut load = Load {
        start,
        done: Vec::new(),
        errors: 0,
    };
    let mut inflight = 0usize;
    loop {
        let running = start.elapsed() < dur;
        while running && inflight < qd {
            let sector = (next % slots) * (len as u64 / 512);
            next = next
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                >> 1;
            let req = if write {
                IoRequest::Write {
                    sector,
                    data: &data,
                }
            } else {
                IoRequest::Read { sector, len }
            };
            fe.submit(None, req).expect("submit");
            inflight += 1;
        }
        if !running && inflight == 0 {
            return load;
        }
        for c in fe.wait(Duration::from_secs(20)).expect("responses") {
            inflight -= 1;
            load.done.push(Instant::now());
            if c.into_result().is_err() {
                load.errors += 1;
            }
        }
    }
}

/// Whether `got` is within `tol` (a fraction) of `want`.
pub fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}
