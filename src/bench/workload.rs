//! The workload generator: keeps `qd` operations of `bs` bytes in flight on a
//! [`BlockTarget`] for a fixed time, sequentially, at random, or at random offsets that
//! are each used once (first writes, CoW breaks, discards), and measures throughput,
//! latency and the serving side's CPU time.

use std::io;
use std::time::{Duration, Instant};

use super::stats::Latencies;
use super::target::{BlockTarget, IoOp};

/// Where the offsets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Consecutive blocks, wrapping at the end of the region (fio `rw=read/write`).
    Seq,
    /// Uniformly random blocks (fio `randread/randwrite`, `norandommap`).
    Rand,
    /// A random permutation of the blocks: each block at most once per run (fio
    /// `randwrite` with its random map). The run ends early when all were used.
    RandUnique,
}

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSpec {
    pub op: IoOp,
    /// Block size in bytes.
    pub bs: u32,
    /// Operations in flight.
    pub qd: u32,
    pub pattern: Pattern,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub ops: u64,
    pub bytes: u64,
    /// From the first submission to the last completion.
    pub secs: f64,
    pub lat_mean_us: f64,
    pub lat_p99_us: f64,
    /// CPU time of the serving side during the run, nanoseconds.
    pub serving_cpu_ns: u64,
}

impl RunResult {
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
    /// Megabytes (10^6) per second.
    pub fn mbps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
    /// Serving-side CPU microseconds per operation.
    pub fn cpu_us_per_io(&self) -> f64 {
        if self.ops > 0 {
            self.serving_cpu_ns as f64 / 1000.0 / self.ops as f64
        } else {
            0.0
        }
    }
}

/// Offsets for a run: `blocks` blocks of the region.
struct Offsets {
    pattern: Pattern,
    blocks: u64,
    next: u64,
    rng: u64,
    /// RandUnique: full-period LCG modulo `mask + 1` (a power of two >= blocks).
    mask: u64,
    issued: u64,
}

impl Offsets {
    fn new(pattern: Pattern, blocks: u64, seed: u64) -> Offsets {
        let mask = blocks.max(1).next_power_of_two() - 1;
        let mut o = Offsets {
            pattern,
            blocks,
            next: 0,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            mask,
            issued: 0,
        };
        if pattern == Pattern::RandUnique {
            o.next = o.xorshift() & mask;
        }
        o
    }

    fn xorshift(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The next block index, `None` when a unique pattern is exhausted.
    fn next(&mut self) -> Option<u64> {
        match self.pattern {
            Pattern::Seq => {
                let b = self.next;
                self.next = (self.next + 1) % self.blocks;
                Some(b)
            }
            Pattern::Rand => Some(self.xorshift() % self.blocks),
            Pattern::RandUnique => {
                // x -> 5x + 1 mod 2^k has full period (Hull-Dobell); skip values
                // beyond the region, at most half of them.
                while self.issued <= self.mask {
                    let b = self.next;
                    self.next = (self.next.wrapping_mul(5).wrapping_add(1)) & self.mask;
                    self.issued += 1;
                    if b < self.blocks {
                        return Some(b);
                    }
                }
                None
            }
        }
    }
}

/// Run `spec` on the first `region` bytes of `target` for `runtime`. Any failed
/// operation fails the run (a benchmark of errors is no benchmark).
pub fn run(
    target: &mut dyn BlockTarget,
    spec: &IoSpec,
    region: u64,
    runtime: Duration,
    seed: u64,
) -> io::Result<RunResult> {
    let bs = spec.bs as u64;
    let blocks = region / bs;
    if blocks == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("region of {region} bytes holds no block of {bs} bytes"),
        ));
    }
    let qd = (spec.qd as usize).min(target.max_depth()).max(1);
    let mut offs = Offsets::new(spec.pattern, blocks, seed);
    let mut started = vec![Instant::now(); qd];
    let mut lat = Latencies::with_capacity(1 << 16);
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(qd * 2);
    let mut free: Vec<u64> = (0..qd as u64).rev().collect();
    let mut in_flight = 0usize;
    let mut exhausted = false;
    let mut result = RunResult::default();

    let cpu0 = target.serving_cpu_ns();
    let t0 = Instant::now();
    let deadline = t0 + runtime;
    let mut now = t0;
    loop {
        // Refill the queue.
        if now < deadline && !exhausted {
            while let Some(&tag) = free.last() {
                let Some(b) = offs.next() else {
                    exhausted = true;
                    break;
                };
                free.pop();
                started[tag as usize] = now;
                target.submit(tag, spec.op, b * bs, spec.bs)?;
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }
        done.clear();
        target.wait(1, &mut done)?;
        now = Instant::now();
        for &(tag, res) in &done {
            if res < 0 {
                return Err(io::Error::new(
                    io::Error::from_raw_os_error(-res).kind(),
                    format!(
                        "{:?} of {} bytes failed: {}",
                        spec.op,
                        spec.bs,
                        io::Error::from_raw_os_error(-res)
                    ),
                ));
            }
            let Some(t) = started.get(tag as usize) else {
                return Err(io::Error::other(format!(
                    "completion with unknown tag {tag}"
                )));
            };
            lat.push(now.duration_since(*t));
            result.ops += 1;
            result.bytes += bs;
            free.push(tag);
            in_flight -= 1;
        }
    }
    result.secs = now.duration_since(t0).as_secs_f64();
    result.serving_cpu_ns = target.serving_cpu_ns().saturating_sub(cpu0);
    result.lat_mean_us = lat.mean_us();
    result.lat_p99_us = lat.quantile_us(0.99);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_offsets_cover_every_block_once() {
        for blocks in [1u64, 2, 3, 1000, 1024, 1025] {
            let mut o = Offsets::new(Pattern::RandUnique, blocks, 7);
            let mut seen = vec![false; blocks as usize];
            while let Some(b) = o.next() {
                assert!(!seen[b as usize], "block {b} twice of {blocks}");
                seen[b as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "not all of {blocks} blocks");
        }
    }

    #[test]
    fn sequential_offsets_wrap_and_random_stay_inside() {
        let mut o = Offsets::new(Pattern::Seq, 3, 1);
        let v: Vec<u64> = (0..5).filter_map(|_| o.next()).collect();
        assert_eq!(v, [0, 1, 2, 0, 1]);
        let mut r = Offsets::new(Pattern::Rand, 10, 1);
        assert!((0..1000).all(|_| r.next().unwrap() < 10));
    }
}
