//! What collecting the per-request statistics costs, measured directly: the
//! three hooks the request path calls per request (`consumed`, `started`,
//! `answered`), and one clock read (taken once per batch of requests, not
//! per request), compared with the backend's CPU time per I/O that
//! `refblk bench` reports (about 3 µs per 4 KiB request at queue depth 32 on
//! tmpfs). A direct measurement because a 2 % difference in throughput is
//! below what `refblk bench` resolves on a shared machine (docs/operations.md).
//!
//! `cargo run --release --example stats_cost`

use std::hint::black_box;
use std::time::Instant;

use refblk_core::backend::limiter::{Limiter, LimiterChain};
use refblk_core::backend::stats::QueueStats;
use refblk_core::limits::Limits;

fn main() {
    let n = 10_000_000u64;
    for round in 1..=3 {
        let s = QueueStats::new(true);
        let now = Instant::now();
        let t = Instant::now();
        for i in 0..n {
            let t0 = s.consumed(now);
            s.started();
            s.answered(t0, now, (i & 1) as u8, true, 4096, true);
        }
        let hooks = t.elapsed().as_nanos() as f64 / n as f64;
        black_box(s.snapshot());
        let t = Instant::now();
        for _ in 0..n {
            black_box(Instant::now());
        }
        let clock = t.elapsed().as_nanos() as f64 / n as f64;
        let chain = LimiterChain::default();
        let t = Instant::now();
        for _ in 0..n {
            black_box(chain.is_active());
        }
        let unlimited = t.elapsed().as_nanos() as f64 / n as f64;
        let limited = LimiterChain {
            device: std::sync::Arc::new(Limiter::new(
                Limits::parse_list("read-iops=1000000000").expect("limits"),
            )),
            domain: Default::default(),
        };
        let t = Instant::now();
        for _ in 0..n {
            let _ = black_box(limited.admit(false, 4096, now));
        }
        let admit = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "round {round}: stats hooks {hooks:.1} ns/request, a clock read {clock:.1} ns \
             (once per batch), limit check unlimited {unlimited:.1} ns, limited admit {admit:.1} ns"
        );
    }
}
