//! Per-queue counters and latency histograms, and the snapshots `status`
//! reports.
//!
//! A queue thread owns one [`QueueStats`] (shared through an `Arc` with the
//! device, which reads it for `status`): plain relaxed atomics, so the queue
//! never waits for a reader. Per operation class (read, write, flush, discard)
//! it counts finished requests, sectors, errors and keeps a latency histogram
//! with log2 buckets of microseconds: bucket 0 holds latencies below 1 µs,
//! bucket `i` (1 ≤ i < 31) holds `[2^(i-1), 2^i)` µs, the last bucket
//! everything from `2^30` µs (about 18 minutes) up. A request's latency runs
//! from the batch in which the queue took it off the ring to the batch of
//! completions that finished it (the clock is read once per batch —
//! [`crate::backend::queue`]'s `Shared::now` — not twice per request), so it
//! includes the time a limit delayed it.
//!
//! A device's queues are summed with [`StatsSnapshot::merge`]; two snapshots of
//! the same device give rates with [`StatsSnapshot::delta`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Latency histogram buckets (log2 of microseconds).
pub const HIST_BUCKETS: usize = 32;

/// The operation classes counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read = 0,
    /// WRITE and WRITE_BARRIER.
    Write = 1,
    Flush = 2,
    /// DISCARD (secure or not).
    Discard = 3,
}

impl OpClass {
    pub const ALL: [OpClass; 4] = [
        OpClass::Read,
        OpClass::Write,
        OpClass::Flush,
        OpClass::Discard,
    ];

    /// The name used in JSON and tables.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
        }
    }

    /// The class of a blkif response operation (the inner operation of an
    /// INDIRECT request); `None` for anything else.
    pub fn of_blkif(op: u8) -> Option<OpClass> {
        use xen_sys::blkif::*;
        match op {
            BLKIF_OP_READ => Some(OpClass::Read),
            BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER => Some(OpClass::Write),
            BLKIF_OP_FLUSH_DISKCACHE => Some(OpClass::Flush),
            BLKIF_OP_DISCARD => Some(OpClass::Discard),
            _ => None,
        }
    }
}

/// Add `v` to a counter that only one thread writes (the queue's worker):
/// a plain load and store, no locked read-modify-write. Readers may see a
/// value a moment old, never a torn one.
#[inline]
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// Subtract `v` from a single-writer gauge (see [`bump`]).
#[inline]
fn drop_by(a: &AtomicU64, v: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_sub(v), Ordering::Relaxed);
}

/// The bucket of a latency of `us` microseconds.
pub fn bucket_of(us: u64) -> usize {
    let b = (u64::BITS - us.leading_zeros()) as usize;
    b.min(HIST_BUCKETS - 1)
}

/// The latency range `[lo, hi)` in microseconds of bucket `b` (the last
/// bucket's `hi` is `u64::MAX`).
pub fn bucket_range(b: usize) -> (u64, u64) {
    match b {
        0 => (0, 1),
        b if b >= HIST_BUCKETS - 1 => (1 << (HIST_BUCKETS - 2), u64::MAX),
        b => (1 << (b - 1), 1 << b),
    }
}

/// Counters of one operation class of one queue.
#[derive(Debug, Default)]
pub struct OpCounters {
    /// Requests answered (OKAY or not).
    pub requests: AtomicU64,
    /// 512-byte sectors of the answered requests.
    pub sectors: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Sum of latencies, microseconds.
    pub latency_us: AtomicU64,
    pub hist: [AtomicU64; HIST_BUCKETS],
}

/// Counters of one queue, shared with the device for status and tests.
///
/// The per-request statistics (`ops`, the gauges) are written by the queue's
/// worker thread only — one writer — and read by anyone.
#[derive(Debug)]
pub struct QueueStats {
    /// Whether the per-request statistics (per-op counters, latency
    /// histograms, gauges) are collected. The plain counters below are
    /// always kept.
    pub enabled: bool,
    pub requests: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub errors: AtomicU64,
    pub rejected: AtomicU64,
    pub fdatasyncs: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests re-executed after a restart.
    pub replayed: AtomicU64,
    /// Per operation class, indexed by `OpClass as usize`.
    pub ops: [OpCounters; 4],
    /// Requests started on the image and not answered yet.
    pub in_flight: AtomicU64,
    /// Requests consumed and not answered yet (waiting to start + in flight).
    pub queue_depth: AtomicU64,
    /// Times a request could not start because a limit said wait.
    pub throttled: AtomicU64,
    /// Times a request had to wait for the worker's buffers (backpressure:
    /// the worker's slab was full, or another queue was first in line).
    pub buffer_waits: AtomicU64,
    /// Liveness violations: times the worker went to sleep while this queue
    /// held consumed requests with nothing that would wake it (no I/O of its
    /// own in flight, no timer, no worker I/O it waits for). Always 0 unless
    /// the backend has a bug; tests and the fuzz target assert it.
    pub stalls: AtomicU64,
    /// Reads io_uring did straight into the guest's persistently mapped pages
    /// (no backend buffer, no copy; `request::data`).
    pub zero_copy_reads: AtomicU64,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats::new(true)
    }
}

impl QueueStats {
    /// Counters with the per-request statistics on or off.
    pub fn new(enabled: bool) -> QueueStats {
        QueueStats {
            enabled,
            requests: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            fdatasyncs: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            ops: Default::default(),
            in_flight: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            buffer_waits: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            zero_copy_reads: AtomicU64::new(0),
        }
    }

    /// A request was taken off the ring at `now`: its start time (None when
    /// collection is off).
    #[inline]
    pub fn consumed(&self, now: Instant) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        bump(&self.queue_depth, 1);
        Some(now)
    }

    /// A consumed request started its file operation.
    #[inline]
    pub fn started(&self) {
        if self.enabled {
            bump(&self.in_flight, 1);
        }
    }

    /// A consumed request was answered at `now`. `started`: it had reached
    /// [`started`](Self::started); `bytes`: its data length (reads, writes,
    /// discards); `t0` what [`consumed`](Self::consumed) returned.
    #[inline]
    pub fn answered(
        &self,
        t0: Option<Instant>,
        now: Instant,
        op: u8,
        started: bool,
        bytes: u64,
        ok: bool,
    ) {
        let Some(t0) = t0 else { return };
        drop_by(&self.queue_depth, 1);
        if started {
            drop_by(&self.in_flight, 1);
        }
        let Some(class) = OpClass::of_blkif(op) else {
            return;
        };
        let us = now.saturating_duration_since(t0).as_micros();
        let us = us.min(u128::from(u64::MAX)) as u64;
        let c = &self.ops[class as usize];
        bump(&c.requests, 1);
        bump(&c.sectors, bytes / 512);
        if !ok {
            bump(&c.errors, 1);
        }
        bump(&c.latency_us, us);
        bump(&c.hist[bucket_of(us)], 1);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = StatsSnapshot {
            collected: self.enabled,
            requests: g(&self.requests),
            errors: g(&self.errors),
            rejected: g(&self.rejected),
            fdatasyncs: g(&self.fdatasyncs),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            replayed: g(&self.replayed),
            in_flight: g(&self.in_flight),
            queue_depth: g(&self.queue_depth),
            throttled: g(&self.throttled),
            buffer_waits: g(&self.buffer_waits),
            stalls: g(&self.stalls),
            zero_copy_reads: g(&self.zero_copy_reads),
            ..StatsSnapshot::default()
        };
        for (o, c) in s.ops.iter_mut().zip(&self.ops) {
            o.requests = g(&c.requests);
            o.sectors = g(&c.sectors);
            o.errors = g(&c.errors);
            o.latency_us = g(&c.latency_us);
            for (h, a) in o.hist.iter_mut().zip(&c.hist) {
                *h = g(a);
            }
        }
        s
    }
}

/// One operation class in a snapshot (JSON schema in docs/operations.md;
/// missing fields read as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpSnapshot {
    pub requests: u64,
    pub sectors: u64,
    pub errors: u64,
    #[serde(rename = "latency_us_sum")]
    pub latency_us: u64,
    /// Written without its trailing empty buckets.
    #[serde(rename = "latency_hist", with = "hist_codec")]
    pub hist: [u64; HIST_BUCKETS],
}

/// A latency histogram as a JSON array without trailing zeros.
mod hist_codec {
    use super::HIST_BUCKETS;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u64; HIST_BUCKETS], s: S) -> Result<S::Ok, S::Error> {
        let n = h.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
        s.collect_seq(&h[..n])
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u64; HIST_BUCKETS], D::Error> {
        let v = Vec::<u64>::deserialize(d)?;
        let mut h = [0; HIST_BUCKETS];
        for (a, b) in h.iter_mut().zip(v) {
            *a = b;
        }
        Ok(h)
    }
}

/// The per-class snapshots as a JSON object keyed by class name.
mod ops_codec {
    use super::{OpClass, OpSnapshot};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::HashMap;

    pub fn serialize<S: Serializer>(ops: &[OpSnapshot; 4], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(OpClass::ALL.len()))?;
        for c in OpClass::ALL {
            m.serialize_entry(c.name(), &ops[c as usize])?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[OpSnapshot; 4], D::Error> {
        let mut m = HashMap::<String, OpSnapshot>::deserialize(d)?;
        let mut ops = [OpSnapshot::default(); 4];
        for c in OpClass::ALL {
            if let Some(o) = m.remove(c.name()) {
                ops[c as usize] = o;
            }
        }
        Ok(ops)
    }
}

/// The unit of the histograms, named in every snapshot's JSON for readers.
const HIST_UNIT: &str = "log2 microseconds: bucket 0 < 1 us, bucket i in [2^(i-1), 2^i) us";

/// A snapshot's JSON: the snapshot and the histograms' unit.
#[derive(Serialize)]
struct WithUnit<'a> {
    #[serde(flatten)]
    stats: &'a StatsSnapshot,
    latency_hist_unit: &'static str,
}

impl Default for OpSnapshot {
    fn default() -> Self {
        OpSnapshot {
            requests: 0,
            sectors: 0,
            errors: 0,
            latency_us: 0,
            hist: [0; HIST_BUCKETS],
        }
    }
}

impl OpSnapshot {
    fn merge(&mut self, o: &OpSnapshot) {
        self.requests += o.requests;
        self.sectors += o.sectors;
        self.errors += o.errors;
        self.latency_us += o.latency_us;
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            *a += b;
        }
    }

    fn delta(&self, earlier: &OpSnapshot) -> OpSnapshot {
        let mut d = OpSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            sectors: self.sectors.saturating_sub(earlier.sectors),
            errors: self.errors.saturating_sub(earlier.errors),
            latency_us: self.latency_us.saturating_sub(earlier.latency_us),
            hist: [0; HIST_BUCKETS],
        };
        for (i, h) in d.hist.iter_mut().enumerate() {
            *h = self.hist[i].saturating_sub(earlier.hist[i]);
        }
        d
    }

    /// The latency (µs) below which a fraction `p` (0..=1) of the requests
    /// fell, interpolated linearly inside its log2 bucket; None without
    /// requests.
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (p.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (b, &c) in self.hist.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let (lo, hi) = bucket_range(b);
                let hi = if hi == u64::MAX { lo * 2 } else { hi };
                let frac = (rank - seen as f64) / c as f64;
                return Some(lo as f64 + frac * (hi - lo) as f64);
            }
            seen += c;
        }
        None
    }
}

/// The counters of a device (or one queue) at one moment. Its JSON is what
/// `status` reports (schema in docs/operations.md); missing fields read as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Per-request statistics were collected (else `ops`, the gauges and the
    /// histograms stay 0).
    pub collected: bool,
    /// Requests taken off the ring (including rejected ones).
    pub requests: u64,
    /// Requests answered with an error status (not counting rejections).
    pub errors: u64,
    /// Requests refused by validation.
    pub rejected: u64,
    pub fdatasyncs: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub replayed: u64,
    pub in_flight: u64,
    pub queue_depth: u64,
    pub throttled: u64,
    /// Requests that waited for the worker's buffers (see [`QueueStats`]).
    pub buffer_waits: u64,
    /// Liveness violations (see [`QueueStats`]); 0 unless there is a bug.
    pub stalls: u64,
    /// Reads done straight into the guest's persistently mapped pages (see
    /// [`QueueStats`]).
    pub zero_copy_reads: u64,
    /// Indexed by `OpClass as usize`.
    #[serde(with = "ops_codec")]
    pub ops: [OpSnapshot; 4],
}

impl StatsSnapshot {
    /// Add another queue's counters (the gauges add up too).
    pub fn merge(&mut self, o: &StatsSnapshot) {
        self.collected |= o.collected;
        self.requests += o.requests;
        self.errors += o.errors;
        self.rejected += o.rejected;
        self.fdatasyncs += o.fdatasyncs;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.replayed += o.replayed;
        self.in_flight += o.in_flight;
        self.queue_depth += o.queue_depth;
        self.throttled += o.throttled;
        self.buffer_waits += o.buffer_waits;
        self.stalls += o.stalls;
        self.zero_copy_reads += o.zero_copy_reads;
        for (a, b) in self.ops.iter_mut().zip(&o.ops) {
            a.merge(b);
        }
    }

    /// What happened between `earlier` and `self` (counters subtracted, the
    /// gauges of `self` kept).
    pub fn delta(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let mut ops = [OpSnapshot::default(); 4];
        for (i, o) in ops.iter_mut().enumerate() {
            *o = self.ops[i].delta(&earlier.ops[i]);
        }
        StatsSnapshot {
            collected: self.collected,
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            rejected: self.rejected.saturating_sub(earlier.rejected),
            fdatasyncs: self.fdatasyncs.saturating_sub(earlier.fdatasyncs),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
            replayed: self.replayed.saturating_sub(earlier.replayed),
            in_flight: self.in_flight,
            queue_depth: self.queue_depth,
            throttled: self.throttled.saturating_sub(earlier.throttled),
            buffer_waits: self.buffer_waits.saturating_sub(earlier.buffer_waits),
            stalls: self.stalls.saturating_sub(earlier.stalls),
            zero_copy_reads: self.zero_copy_reads.saturating_sub(earlier.zero_copy_reads),
            ops,
        }
    }

    pub fn op(&self, c: OpClass) -> &OpSnapshot {
        &self.ops[c as usize]
    }

    /// All operation classes merged (for overall percentiles).
    pub fn all_ops(&self) -> OpSnapshot {
        let mut a = OpSnapshot::default();
        for o in &self.ops {
            a.merge(o);
        }
        a
    }

    /// The JSON object `status` reports (schema in docs/operations.md).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(WithUnit {
            stats: self,
            latency_hist_unit: HIST_UNIT,
        })
        .expect("statistics are plain numbers")
    }

    /// Read back what [`to_json`](Self::to_json) wrote (missing fields are 0;
    /// anything unreadable reads as all 0).
    pub fn from_json(v: &Value) -> StatsSnapshot {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }
}

/// Turn collection off for new queues: `REFBLK_NO_STATS=1` in the daemon's
/// environment (used to measure what collection costs).
pub fn collection_enabled_by_env() -> bool {
    static OFF: AtomicBool = AtomicBool::new(false);
    static READ: std::sync::Once = std::sync::Once::new();
    READ.call_once(|| {
        OFF.store(
            std::env::var_os("REFBLK_NO_STATS").is_some_and(|v| v != "0" && !v.is_empty()),
            Ordering::Relaxed,
        )
    });
    !OFF.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4), 3);
        assert_eq!(bucket_of(1023), 10);
        assert_eq!(bucket_of(1024), 11);
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
        for us in [0u64, 1, 5, 100, 4096, 1 << 29] {
            let (lo, hi) = bucket_range(bucket_of(us));
            assert!(lo <= us && us < hi, "{us} not in [{lo},{hi})");
        }
    }

    #[test]
    fn percentiles_interpolate_inside_a_bucket() {
        let mut o = OpSnapshot::default();
        // 100 requests in [64, 128) us.
        o.hist[bucket_of(100)] = 100;
        let p50 = o.percentile_us(0.5).unwrap();
        assert!((p50 - 96.0).abs() < 1e-9, "{p50}");
        // One slow request in [8192,16384) moves p99 only if more than 1 %.
        o.hist[bucket_of(10_000)] = 1;
        assert!(o.percentile_us(0.99).unwrap() < 128.0);
        o.hist[bucket_of(10_000)] = 5;
        assert!(o.percentile_us(0.99).unwrap() >= 8192.0);
        assert_eq!(OpSnapshot::default().percentile_us(0.5), None);
    }

    #[test]
    fn answered_counts_per_op_and_gauges_return_to_zero() {
        let s = QueueStats::new(true);
        let now = Instant::now();
        let t = s.consumed(now);
        s.started();
        assert_eq!(s.snapshot().in_flight, 1);
        assert_eq!(s.snapshot().queue_depth, 1);
        let later = now + std::time::Duration::from_micros(100);
        s.answered(t, later, xen_sys::blkif::BLKIF_OP_WRITE, true, 8192, true);
        let t = s.consumed(now);
        s.answered(t, now, xen_sys::blkif::BLKIF_OP_READ, false, 4096, false);
        let snap = s.snapshot();
        assert_eq!((snap.in_flight, snap.queue_depth), (0, 0));
        assert_eq!(snap.op(OpClass::Write).requests, 1);
        assert_eq!(snap.op(OpClass::Write).sectors, 16);
        assert_eq!(snap.op(OpClass::Read).errors, 1);
        assert_eq!(snap.op(OpClass::Read).hist.iter().sum::<u64>(), 1);
        assert_eq!(snap.op(OpClass::Write).hist[bucket_of(100)], 1);
        assert_eq!(snap.op(OpClass::Write).latency_us, 100);
        let off = QueueStats::new(false);
        let t = off.consumed(now);
        off.answered(t, now, xen_sys::blkif::BLKIF_OP_READ, false, 4096, true);
        assert_eq!(off.snapshot().op(OpClass::Read).requests, 0);
    }

    #[test]
    fn merge_delta_and_json_round_trip() {
        let mut a = StatsSnapshot {
            collected: true,
            requests: 10,
            in_flight: 2,
            ..Default::default()
        };
        a.ops[0].requests = 7;
        a.ops[0].sectors = 56;
        a.ops[0].hist[5] = 7;
        let mut b = a.clone();
        b.ops[1].requests = 3;
        b.ops[1].hist[31] = 3;
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.requests, 20);
        assert_eq!(m.in_flight, 4);
        assert_eq!(m.op(OpClass::Read).hist[5], 14);
        assert_eq!(m.op(OpClass::Write).requests, 3);
        let d = m.delta(&a);
        assert_eq!(d.requests, 10);
        assert_eq!(d.op(OpClass::Read).requests, 7);
        assert_eq!(StatsSnapshot::from_json(&m.to_json()), m);
    }

    /// The JSON `status` prints kept its shape when the hand-written codec
    /// was replaced by serde's (docs/operations.md documents it).
    #[test]
    fn snapshot_json_shape_is_unchanged() {
        let mut s = StatsSnapshot {
            collected: true,
            requests: 9,
            bytes_read: 4096,
            ..StatsSnapshot::default()
        };
        s.ops[OpClass::Read as usize].requests = 2;
        s.ops[OpClass::Read as usize].latency_us = 30;
        s.ops[OpClass::Read as usize].hist[4] = 2;
        let v = s.to_json();
        assert_eq!(v["requests"], 9);
        assert_eq!(v["bytes_read"], 4096);
        assert_eq!(v["stalls"], 0);
        assert!(v["latency_hist_unit"].as_str().unwrap().starts_with("log2"));
        assert_eq!(v["ops"]["read"]["latency_us_sum"], 30);
        assert_eq!(
            v["ops"]["read"]["latency_hist"],
            serde_json::json!([0, 0, 0, 0, 2])
        );
        assert_eq!(v["ops"]["discard"]["latency_hist"], serde_json::json!([]));
        // An older or partial snapshot reads with zeros for what it lacks.
        let old = serde_json::json!({"requests": 3, "ops": {"write": {"requests": 1}}});
        let r = StatsSnapshot::from_json(&old);
        assert_eq!((r.requests, r.errors), (3, 0));
        assert_eq!(r.op(OpClass::Write).requests, 1);
    }
}
