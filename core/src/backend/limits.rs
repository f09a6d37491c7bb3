//! Per-device and per-domain I/O limits: token buckets for read and write
//! IOPS and bytes per second.
//!
//! A [`Limits`] value holds four rates (0 = unlimited) and a burst: each
//! bucket holds at most `rate × burst` tokens (at least one request's worth)
//! and refills continuously at `rate` per second. A read or write may start
//! when every bucket it draws from holds at least its cost (one op; its
//! bytes, or the whole bucket for a request bigger than the bucket); it then
//! takes the cost, which may leave a bytes bucket in debt, so the long-run
//! rate is exactly the limit. A request that may not start yet is delayed
//! (the queue stops starting requests, keeping ring order, and sleeps until
//! the time [`Limiter::admit`] returns), never failed. FLUSH and DISCARD are
//! not limited.
//!
//! A request passes its device's limiter and its domain's limiter
//! ([`LimiterChain`]); tokens are taken from both or from neither.
//! Limits change live with [`Limiter::set`]: a bucket keeps its tokens
//! (clamped to the new capacity), and a queue waiting on an old retry time
//! looks again at most [`MAX_WAIT`] later, so a change takes effect within
//! that time.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A delayed queue looks at its limiter again at least this often (so a
/// raised limit takes effect quickly).
pub const MAX_WAIT: Duration = Duration::from_millis(100);

/// Default burst: 100 ms of the rate (as QEMU's throttling without a max).
pub const DEFAULT_BURST_MS: u64 = 100;

/// Longest burst accepted: one hour.
pub const MAX_BURST_MS: u64 = 3_600_000;

const NANOS: i128 = 1_000_000_000;

/// Rates of one device or domain. Every rate 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub read_iops: u64,
    pub write_iops: u64,
    /// Bytes per second.
    pub read_bps: u64,
    /// Bytes per second.
    pub write_bps: u64,
    /// Bucket size, as milliseconds of the rate.
    pub burst_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UNLIMITED
    }
}

/// The keys of a limit, as written on the control socket, disk lines and
/// pool volume settings.
pub const KEYS: [&str; 7] = [
    "read-iops",
    "write-iops",
    "read-bps",
    "write-bps",
    "iops",
    "bps",
    "burst",
];

/// A bad limit value: which key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError(pub String);

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitError {}

/// A change to some of the keys of a [`Limits`] (the others stay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsPatch {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub burst_ms: Option<u64>,
}

impl LimitsPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == LimitsPatch::default()
    }

    /// Every key set: the limits become exactly `l`.
    pub fn all(l: Limits) -> LimitsPatch {
        LimitsPatch {
            read_iops: Some(l.read_iops),
            write_iops: Some(l.write_iops),
            read_bps: Some(l.read_bps),
            write_bps: Some(l.write_bps),
            burst_ms: Some(l.burst_ms),
        }
    }

    /// Set one `key` (see [`KEYS`]; `iops` and `bps` set read and write)
    /// from its text value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), LimitError> {
        match key {
            "read-iops" => self.read_iops = Some(parse_count(key, value)?),
            "write-iops" => self.write_iops = Some(parse_count(key, value)?),
            "iops" => {
                let n = parse_count(key, value)?;
                self.read_iops = Some(n);
                self.write_iops = Some(n);
            }
            "read-bps" => self.read_bps = Some(parse_size(key, value)?),
            "write-bps" => self.write_bps = Some(parse_size(key, value)?),
            "bps" => {
                let n = parse_size(key, value)?;
                self.read_bps = Some(n);
                self.write_bps = Some(n);
            }
            "burst" => self.burst_ms = Some(parse_burst(value)?),
            _ => {
                return Err(LimitError(format!(
                    "unknown limit {key:?} (known: {})",
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Parse `key=value` words (all of them must be limit keys).
    pub fn parse_pairs<'a>(
        words: impl IntoIterator<Item = &'a str>,
    ) -> Result<LimitsPatch, LimitError> {
        let mut p = LimitsPatch::default();
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(LimitError(format!(
                    "{w:?}: want key=value with key one of {}",
                    KEYS.join(", ")
                )));
            };
            p.set(k, v)?;
        }
        Ok(p)
    }

    /// The `key=value` words of the keys set.
    pub fn to_pairs(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |k: &str, x: Option<u64>| {
            if let Some(x) = x {
                v.push(format!("{k}={x}"));
            }
        };
        add("read-iops", self.read_iops);
        add("write-iops", self.write_iops);
        add("read-bps", self.read_bps);
        add("write-bps", self.write_bps);
        if let Some(b) = self.burst_ms {
            v.push(format!("burst={b}ms"));
        }
        v
    }
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        read_iops: 0,
        write_iops: 0,
        read_bps: 0,
        write_bps: 0,
        burst_ms: DEFAULT_BURST_MS,
    };

    /// Whether no rate is set.
    pub fn is_unlimited(&self) -> bool {
        self.read_iops == 0 && self.write_iops == 0 && self.read_bps == 0 && self.write_bps == 0
    }

    /// These limits with `p` applied.
    pub fn patched(&self, p: &LimitsPatch) -> Limits {
        Limits {
            read_iops: p.read_iops.unwrap_or(self.read_iops),
            write_iops: p.write_iops.unwrap_or(self.write_iops),
            read_bps: p.read_bps.unwrap_or(self.read_bps),
            write_bps: p.write_bps.unwrap_or(self.write_bps),
            burst_ms: p.burst_ms.unwrap_or(self.burst_ms),
        }
    }

    /// The JSON `status` reports.
    pub fn to_json(&self) -> Value {
        json!({
            "read_iops": self.read_iops,
            "write_iops": self.write_iops,
            "read_bps": self.read_bps,
            "write_bps": self.write_bps,
            "burst_ms": self.burst_ms,
        })
    }

    /// Parse a whole `key=value,key=value` list (commas or white space
    /// between pairs), starting from unlimited.
    pub fn parse_list(s: &str) -> Result<Limits, LimitError> {
        let p = LimitsPatch::parse_pairs(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty()),
        )?;
        Ok(Limits::UNLIMITED.patched(&p))
    }
}

impl fmt::Display for Limits {
    /// `read-iops=500 write-bps=10M burst=100ms`, or `unlimited`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        let mut parts = Vec::new();
        if self.read_iops > 0 {
            parts.push(format!("read-iops={}", self.read_iops));
        }
        if self.write_iops > 0 {
            parts.push(format!("write-iops={}", self.write_iops));
        }
        if self.read_bps > 0 {
            parts.push(format!("read-bps={}", fmt_size(self.read_bps)));
        }
        if self.write_bps > 0 {
            parts.push(format!("write-bps={}", fmt_size(self.write_bps)));
        }
        parts.push(format!("burst={}ms", self.burst_ms));
        f.write_str(&parts.join(" "))
    }
}

fn fmt_size(n: u64) -> String {
    for (s, m) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n.is_multiple_of(m) {
            return format!("{}{s}", n / m);
        }
    }
    n.to_string()
}

/// A whole number of operations per second.
fn parse_count(key: &str, v: &str) -> Result<u64, LimitError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LimitError(format!(
            "{key}: {v:?} is not a whole number of operations per second (0 = unlimited)"
        )));
    }
    v.parse::<u64>()
        .ok()
        .filter(|&n| n <= 1 << 40)
        .ok_or_else(|| LimitError(format!("{key}: {v} is too large")))
}

/// Bytes per second: a whole number with an optional binary suffix
/// K, M, G, T (also KiB, MiB, ...; case-insensitive), an optional `/s`.
fn parse_size(key: &str, v: &str) -> Result<u64, LimitError> {
    let bad = || {
        LimitError(format!(
            "{key}: {v:?} is not a rate in bytes per second (a whole number with an optional \
             K, M, G or T suffix, e.g. 20M; 0 = unlimited)"
        ))
    };
    let s = v.strip_suffix("/s").unwrap_or(v);
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let (num, suffix) = s.split_at(digits);
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(bad()),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n <= 1 << 50)
        .ok_or_else(|| LimitError(format!("{key}: {v} is too large")))
}

/// A burst: `250ms`, `2s`, or a plain number of seconds (`0.5`, `2`).
fn parse_burst(v: &str) -> Result<u64, LimitError> {
    let bad = |why: &str| {
        LimitError(format!(
            "burst: {v:?} {why} (a duration such as 100ms, 2s or 0.5; between 1ms and 1h)"
        ))
    };
    let ms = if let Some(n) = v.strip_suffix("ms") {
        n.parse::<u64>().map_err(|_| bad("is not a duration"))?
    } else {
        let n = v.strip_suffix('s').unwrap_or(v);
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(bad("is not a duration"));
        }
        let secs: f64 = n.parse().map_err(|_| bad("is not a duration"))?;
        if !secs.is_finite() || secs > (MAX_BURST_MS / 1000) as f64 {
            return Err(bad("is out of range"));
        }
        (secs * 1000.0).round() as u64
    };
    if ms == 0 || ms > MAX_BURST_MS {
        return Err(bad("is out of range"));
    }
    Ok(ms)
}

/// One token bucket. Tokens are kept in units of 1e-9 of a token, so that
/// refilling `rate` tokens per second is `rate` units per nanosecond.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// Current tokens × 1e9 (negative: debt).
    level: i128,
    /// When `level` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, burst_ms: u64, now: Instant) -> Bucket {
        let mut b = Bucket {
            rate,
            level: 0,
            at: now,
        };
        b.level = b.capacity(burst_ms);
        b
    }

    /// Bucket size × 1e9: `rate × burst`, at least one token.
    fn capacity(&self, burst_ms: u64) -> i128 {
        let c = i128::from(self.rate) * i128::from(burst_ms) * 1_000_000;
        c.max(NANOS)
    }

    fn refill(&mut self, burst_ms: u64, now: Instant) {
        if now > self.at {
            let dt = now.duration_since(self.at).as_nanos() as i128;
            self.level = (self.level + dt * i128::from(self.rate)).min(self.capacity(burst_ms));
            self.at = now;
        }
    }

    /// `Ok(())` if a request costing `cost` tokens may take them now, else
    /// the time it may.
    fn check(&self, cost: u64, burst_ms: u64, now: Instant) -> Result<(), Instant> {
        if self.rate == 0 {
            return Ok(());
        }
        // A request bigger than the bucket needs a full bucket.
        let need = (i128::from(cost) * NANOS).min(self.capacity(burst_ms));
        if self.level >= need {
            return Ok(());
        }
        let ns = (need - self.level + i128::from(self.rate) - 1) / i128::from(self.rate);
        Err(now + Duration::from_nanos(ns.clamp(1, u64::MAX as i128) as u64))
    }

    fn take(&mut self, cost: u64) {
        if self.rate != 0 {
            self.level -= i128::from(cost) * NANOS;
        }
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    /// read ops, write ops, read bytes, write bytes.
    buckets: [Bucket; 4],
}

impl State {
    fn new(l: Limits, now: Instant) -> State {
        State {
            limits: l,
            buckets: [
                Bucket::new(l.read_iops, l.burst_ms, now),
                Bucket::new(l.write_iops, l.burst_ms, now),
                Bucket::new(l.read_bps, l.burst_ms, now),
                Bucket::new(l.write_bps, l.burst_ms, now),
            ],
        }
    }

    /// The two buckets a request draws from and its costs.
    fn idx(write: bool) -> (usize, usize) {
        if write {
            (1, 3)
        } else {
            (0, 2)
        }
    }

    fn check(&mut self, write: bool, bytes: u64, now: Instant) -> Result<(), Instant> {
        let burst = self.limits.burst_ms;
        let (o, b) = Self::idx(write);
        self.buckets[o].refill(burst, now);
        self.buckets[b].refill(burst, now);
        let r1 = self.buckets[o].check(1, burst, now);
        let r2 = self.buckets[b].check(bytes, burst, now);
        match (r1, r2) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Ok(())) | (Ok(()), Err(a)) => Err(a),
            (Err(a), Err(b)) => Err(a.max(b)),
        }
    }

    fn take(&mut self, write: bool, bytes: u64) {
        let (o, b) = Self::idx(write);
        self.buckets[o].take(1);
        self.buckets[b].take(bytes);
    }
}

/// The live limits of one device or one domain (shared by its queues; set
/// from the control thread).
#[derive(Debug)]
pub struct Limiter {
    /// Fast path: no rate set, nothing to lock.
    active: AtomicBool,
    state: Mutex<State>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(Limits::UNLIMITED)
    }
}

impl Limiter {
    pub fn new(l: Limits) -> Limiter {
        Limiter::new_at(l, Instant::now())
    }

    /// A limiter whose buckets start full at `now`.
    pub fn new_at(l: Limits, now: Instant) -> Limiter {
        Limiter {
            active: AtomicBool::new(!l.is_unlimited()),
            state: Mutex::new(State::new(l, now)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limits.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Change the limits now.
    pub fn set(&self, l: Limits) {
        self.set_at(l, Instant::now())
    }

    /// Change the limits at `now`: a bucket keeps its tokens (or debt),
    /// clamped to its new size; a bucket that was unlimited starts full.
    pub fn set_at(&self, l: Limits, now: Instant) {
        let mut st = self.lock();
        let old = st.limits;
        for b in st.buckets.iter_mut() {
            b.refill(old.burst_ms, now);
        }
        let rates = [l.read_iops, l.write_iops, l.read_bps, l.write_bps];
        for (b, &r) in st.buckets.iter_mut().zip(&rates) {
            if b.rate == 0 {
                *b = Bucket::new(r, l.burst_ms, now);
            } else {
                b.rate = r;
                b.level = b.level.min(b.capacity(l.burst_ms));
            }
        }
        st.limits = l;
        self.active.store(!l.is_unlimited(), Ordering::Release);
    }

    /// May a read (`write` false) or write of `bytes` start at `now`? `Ok`:
    /// its tokens were taken, go. `Err(t)`: do not start it; ask again at `t`.
    pub fn admit(&self, write: bool, bytes: u64, now: Instant) -> Result<(), Instant> {
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.lock();
        st.check(write, bytes, now)?;
        st.take(write, bytes);
        Ok(())
    }
}

/// The limiters a request must pass: its device's, then its domain's.
#[derive(Debug, Clone, Default)]
pub struct LimiterChain {
    pub device: Arc<Limiter>,
    pub domain: Arc<Limiter>,
}

impl LimiterChain {
    /// Whether either limiter has a rate set (else `admit` always says go;
    /// callers may skip reading the clock).
    #[inline]
    pub fn is_active(&self) -> bool {
        self.device.active.load(Ordering::Relaxed) || self.domain.active.load(Ordering::Relaxed)
    }

    /// Like [`Limiter::admit`] for both: tokens are taken from both or, if
    /// either refuses, from neither (the later retry time is returned).
    /// Locks are taken device first, domain second, always.
    pub fn admit(&self, write: bool, bytes: u64, now: Instant) -> Result<(), Instant> {
        let dev_on = self.device.active.load(Ordering::Acquire);
        let dom_on = self.domain.active.load(Ordering::Acquire);
        match (dev_on, dom_on) {
            (false, false) => Ok(()),
            (true, false) => self.device.admit(write, bytes, now),
            (false, true) => self.domain.admit(write, bytes, now),
            (true, true) => {
                let mut a = self.device.lock();
                let mut b = self.domain.lock();
                match (a.check(write, bytes, now), b.check(write, bytes, now)) {
                    (Ok(()), Ok(())) => {
                        a.take(write, bytes);
                        b.take(write, bytes);
                        Ok(())
                    }
                    (Err(t), Ok(())) | (Ok(()), Err(t)) => Err(t),
                    (Err(t1), Err(t2)) => Err(t1.max(t2)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Most admission attempts [`run`] makes: far more than any limit in these
    /// tests allows (the largest expects about 5050 admissions and as many
    /// refusals), so reaching it means the limiter stopped limiting.
    const MAX_ATTEMPTS: u64 = 1_000_000;

    /// Admit as many requests as the limiter allows over `secs` seconds with
    /// an injected clock that jumps to each retry time; returns the count.
    /// The clock only moves on a refusal, so a limiter that never refuses
    /// (say, a request drawing from the wrong, unlimited bucket) would keep
    /// this loop at one instant forever: after [`MAX_ATTEMPTS`] it fails
    /// instead.
    fn run(l: &Limiter, write: bool, bytes: u64, t0: Instant, secs: u64) -> u64 {
        let end = t0 + Duration::from_secs(secs);
        let mut now = t0;
        let mut n = 0;
        let mut attempts = 0u64;
        while now < end {
            attempts += 1;
            assert!(
                attempts <= MAX_ATTEMPTS,
                "the limiter admitted {n} {} requests of {bytes} bytes and the simulated clock \
                 got only {:?} into the {secs} s run: it does not limit these requests",
                if write { "write" } else { "read" },
                now - t0
            );
            match l.admit(write, bytes, now) {
                Ok(()) => n += 1,
                Err(t) => {
                    assert!(t > now, "retry time must be in the future");
                    now = t;
                }
            }
        }
        n
    }

    #[test]
    fn iops_limit_gives_rate_plus_burst() {
        let t0 = Instant::now();
        let l = Limiter::new_at(
            Limits {
                read_iops: 500,
                burst_ms: 100,
                ..Limits::UNLIMITED
            },
            t0,
        );
        // 10 s at 500/s plus the 50-token burst at the start.
        let n = run(&l, false, 4096, t0, 10);
        assert!((5049..=5051).contains(&n), "{n}");
        // Writes are not limited by a read limit.
        assert!(l.admit(true, 4096, t0 + ms(10_000)).is_ok());
    }

    #[test]
    fn bytes_limit_with_requests_bigger_than_the_bucket() {
        let t0 = Instant::now();
        // 1 MiB/s, burst 100 ms = 104857 bytes; 256 KiB requests exceed it.
        let l = Limiter::new_at(
            Limits {
                write_bps: 1 << 20,
                burst_ms: 100,
                ..Limits::UNLIMITED
            },
            t0,
        );
        let n = run(&l, true, 256 << 10, t0, 20);
        // 20 MiB in 20 s = 80 requests (debt is paid back, so no more).
        assert!((79..=81).contains(&n), "{n}");
    }

    #[test]
    fn refusal_says_when_and_takes_nothing() {
        let t0 = Instant::now();
        let l = Limiter::new_at(
            Limits {
                write_iops: 10,
                burst_ms: 100,
                ..Limits::UNLIMITED
            },
            t0,
        );
        assert!(l.admit(true, 512, t0).is_ok());
        let t = l.admit(true, 512, t0).unwrap_err();
        assert_eq!(t, t0 + ms(100));
        // Asking again before t changes nothing.
        assert_eq!(l.admit(true, 512, t0 + ms(50)).unwrap_err(), t0 + ms(100));
        assert!(l.admit(true, 512, t0 + ms(100)).is_ok());
    }

    #[test]
    fn zero_is_unlimited_and_live_changes_apply() {
        let t0 = Instant::now();
        let l = Limiter::new_at(Limits::UNLIMITED, t0);
        for _ in 0..100_000 {
            assert!(l.admit(false, 1 << 20, t0).is_ok());
        }
        l.set_at(
            Limits {
                read_iops: 100,
                ..Limits::UNLIMITED
            },
            t0,
        );
        let n = run(&l, false, 4096, t0, 1);
        assert!((109..=111).contains(&n), "{n}");
        // Lower it: the bucket is clamped, the new rate applies at once.
        let t1 = t0 + Duration::from_secs(1);
        l.set_at(
            Limits {
                read_iops: 20,
                ..Limits::UNLIMITED
            },
            t1,
        );
        let n = run(&l, false, 4096, t1, 5);
        assert!((100..=103).contains(&n), "{n}");
        // Back to 0: unlimited again.
        l.set_at(Limits::UNLIMITED, t1 + ms(5000));
        assert!(l.limits().is_unlimited());
        for _ in 0..1000 {
            assert!(l.admit(false, 4096, t1 + ms(5000)).is_ok());
        }
    }

    #[test]
    fn chain_takes_from_both_or_neither() {
        let t0 = Instant::now();
        let dev = Arc::new(Limiter::new_at(
            Limits {
                read_iops: 10,
                burst_ms: 1000,
                ..Limits::UNLIMITED
            },
            t0,
        ));
        let dom = Arc::new(Limiter::new_at(
            Limits {
                read_iops: 5,
                burst_ms: 1000,
                ..Limits::UNLIMITED
            },
            t0,
        ));
        let c = LimiterChain {
            device: dev.clone(),
            domain: dom.clone(),
        };
        for _ in 0..5 {
            assert!(c.admit(false, 512, t0).is_ok());
        }
        // The domain is empty: refused, and the device keeps its 5 tokens.
        assert_eq!(c.admit(false, 512, t0).unwrap_err(), t0 + ms(200));
        for _ in 0..5 {
            assert!(dev.admit(false, 512, t0).is_ok());
        }
        assert!(dev.admit(false, 512, t0).is_err());
        // Both empty: the later time wins.
        assert_eq!(c.admit(false, 512, t0).unwrap_err(), t0 + ms(200));
        // Another device of the same domain shares the domain bucket.
        let other = LimiterChain {
            device: Arc::new(Limiter::default()),
            domain: dom,
        };
        assert!(other.admit(false, 512, t0).is_err());
        assert!(other.admit(false, 512, t0 + ms(200)).is_ok());
    }

    #[test]
    fn parsing_gives_clear_errors() {
        let l = Limits::parse_list("read-iops=500,write-bps=20M burst=2s").unwrap();
        assert_eq!(l.read_iops, 500);
        assert_eq!(l.write_bps, 20 << 20);
        assert_eq!(l.burst_ms, 2000);
        assert_eq!(l.to_string(), "read-iops=500 write-bps=20M burst=2000ms");
        let l = Limits::parse_list("iops=7 bps=1KiB/s burst=0.25").unwrap();
        assert_eq!((l.read_iops, l.write_iops), (7, 7));
        assert_eq!((l.read_bps, l.write_bps), (1024, 1024));
        assert_eq!(l.burst_ms, 250);
        assert!(Limits::parse_list("read-iops=0").unwrap().is_unlimited());
        for (bad, word) in [
            ("read-iops=-1", "read-iops"),
            ("read-iops=abc", "whole number"),
            ("write-bps=12Q", "write-bps"),
            ("write-bps=", "write-bps"),
            ("burst=0", "out of range"),
            ("burst=2h", "burst"),
            ("burst=99999", "out of range"),
            ("reads=5", "unknown limit"),
            ("read-iops", "key=value"),
            ("read-iops=99999999999999999999", "too large"),
        ] {
            let e = Limits::parse_list(bad).unwrap_err().to_string();
            assert!(e.contains(word), "{bad}: {e}");
        }
        let p = LimitsPatch::parse_pairs(["write-iops=3"]).unwrap();
        let l = Limits::parse_list("read-iops=5").unwrap().patched(&p);
        assert_eq!((l.read_iops, l.write_iops), (5, 3));
        assert_eq!(
            LimitsPatch::parse_pairs(p.to_pairs().iter().map(String::as_str)).unwrap(),
            p
        );
    }
}
