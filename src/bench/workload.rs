//! The workload generator: keeps `qd` operations of `bs` bytes in flight on a
//! [`BlockTarget`] for a fixed time (or a fixed number of operations), sequentially,
//! at random, or at random offsets that are each used once (first writes, CoW
//! breaks, discards), and measures throughput, latency and the serving side's CPU
//! time. It also counts what it issued ([`IoCounts`]), which `tests/ops/bench_fio.rs`
//! compares with what fio issues for the same profile.

use std::io;
use std::time::{Duration, Instant};

use super::stats::{cpu_since, cpu_snapshot, Latencies};
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

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Issue for this long (the benchmark's timed runs; fio `time_based`, `runtime=`).
    After(Duration),
    /// Issue exactly this many operations, fewer if a unique pattern runs out of
    /// blocks first (fio `io_size=` of that many blocks).
    Ops(u64),
}

/// What a run issued, counted at submission, in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounts {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub bytes: u64,
    /// Smallest and largest operation, bytes (0 when none was issued).
    pub min_len: u32,
    pub max_len: u32,
    /// Lowest offset and highest end (offset + length) of any operation (0 when none).
    pub min_offset: u64,
    pub max_end: u64,
    /// Operations whose offset is not a multiple of their length.
    pub misaligned: u64,
    /// Operations that start where the one issued just before them ended.
    pub sequential: u64,
    /// Most operations in flight at once, counted right after a submission.
    pub max_depth: u32,
    /// Where the last operation ended.
    last_end: u64,
}

impl IoCounts {
    /// Operations issued.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.discards
    }

    /// Count one operation; `depth` is the number in flight including it.
    pub fn issue(&mut self, op: IoOp, offset: u64, len: u32, depth: u32) {
        let end = offset + u64::from(len);
        if self.ops() == 0 {
            self.min_len = len;
            self.min_offset = offset;
        } else if offset == self.last_end {
            self.sequential += 1;
        }
        match op {
            IoOp::Read => self.reads += 1,
            IoOp::Write => self.writes += 1,
            IoOp::Discard => self.discards += 1,
        }
        self.bytes += u64::from(len);
        self.min_len = self.min_len.min(len);
        self.max_len = self.max_len.max(len);
        self.min_offset = self.min_offset.min(offset);
        self.max_end = self.max_end.max(end);
        if len == 0 || !offset.is_multiple_of(u64::from(len)) {
            self.misaligned += 1;
        }
        self.max_depth = self.max_depth.max(depth);
        self.last_end = end;
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub ops: u64,
    pub bytes: u64,
    /// What was issued (see [`IoCounts`]).
    pub issued: IoCounts,
    /// From the first submission to the last completion.
    pub secs: f64,
    pub lat_mean_us: f64,
    pub lat_p50_us: f64,
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
    run_until(target, spec, region, Stop::After(runtime), seed)
}

/// Run `spec` on the first `region` bytes of `target` until `stop`.
pub fn run_until(
    target: &mut dyn BlockTarget,
    spec: &IoSpec,
    region: u64,
    stop: Stop,
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

    let cpu0 = cpu_snapshot(&target.serving_threads());
    let t0 = Instant::now();
    let (deadline, max_ops) = match stop {
        Stop::After(runtime) => (Some(t0 + runtime), u64::MAX),
        Stop::Ops(n) => (None, n),
    };
    let mut now = t0;
    loop {
        // Refill the queue.
        if deadline.is_none_or(|d| now < d) && !exhausted && !super::stop_requested() {
            while let Some(&tag) = free.last() {
                if result.issued.ops() >= max_ops {
                    exhausted = true;
                    break;
                }
                let Some(b) = offs.next() else {
                    exhausted = true;
                    break;
                };
                free.pop();
                started[tag as usize] = now;
                let (offset, len) = (b * bs, spec.bs);
                target.submit(tag, spec.op, offset, len)?;
                in_flight += 1;
                result.issued.issue(spec.op, offset, len, in_flight as u32);
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
    result.serving_cpu_ns = cpu_since(&cpu0, &cpu_snapshot(&target.serving_threads()));
    result.lat_mean_us = lat.mean_us();
    result.lat_p50_us = lat.p50_us();
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

    /// Completes every operation at once, in submission order.
    struct Instant0 {
        queued: Vec<u64>,
    }

    impl BlockTarget for Instant0 {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn max_depth(&self) -> usize {
            64
        }
        fn submit(&mut self, tag: u64, _: IoOp, _: u64, _: u32) -> io::Result<()> {
            self.queued.push(tag);
            Ok(())
        }
        fn kick(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn wait(&mut self, _: usize, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
            out.extend(self.queued.drain(..).map(|t| (t, 0)));
            Ok(())
        }
        fn serving_threads(&self) -> Vec<u32> {
            Vec::new()
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn read_at(&mut self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn io_mode(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn a_fixed_count_run_issues_that_many_and_counts_them() {
        let spec = IoSpec {
            op: IoOp::Write,
            bs: 4096,
            qd: 8,
            pattern: Pattern::Seq,
        };
        let mut t = Instant0 { queued: Vec::new() };
        let r = run_until(&mut t, &spec, 10 * 4096, Stop::Ops(25), 1).unwrap();
        let c = r.issued;
        assert_eq!((r.ops, c.ops(), c.writes, c.reads), (25, 25, 25, 0));
        assert_eq!((c.bytes, c.min_len, c.max_len), (25 * 4096, 4096, 4096));
        assert_eq!((c.min_offset, c.max_end, c.misaligned), (0, 10 * 4096, 0));
        // 25 blocks over a region of 10: two wraps break the sequence.
        assert_eq!((c.sequential, c.max_depth), (22, 8));
        let mut t = Instant0 { queued: Vec::new() };
        let u = IoSpec {
            pattern: Pattern::RandUnique,
            ..spec
        };
        let r = run_until(&mut t, &u, 10 * 4096, Stop::Ops(1000), 1).unwrap();
        assert_eq!(
            r.issued.ops(),
            10,
            "a unique pattern ends when its blocks do"
        );
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
