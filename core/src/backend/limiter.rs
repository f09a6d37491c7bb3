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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::limits::Limits;

/// A delayed queue looks at its limiter again at least this often (so a
/// raised limit takes effect quickly).
pub const MAX_WAIT: Duration = Duration::from_millis(100);

const NANOS: i128 = 1_000_000_000;

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
}
