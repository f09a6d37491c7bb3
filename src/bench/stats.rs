//! Measurement helpers: CPU clocks of threads, latency summaries, medians.

use std::fs;
use std::time::Duration;

/// CPU time (user + system) of the calling thread, in nanoseconds (0 if unknown).
pub fn thread_cpu_ns() -> u64 {
    task_cpu_ns(nix::unistd::gettid().as_raw() as u32).unwrap_or(0)
}

/// CPU time of one thread of this process, in nanoseconds, from
/// `/proc/self/task/<tid>/schedstat` (first field: time spent on the CPU). Falls back
/// to utime+stime of `/proc/self/task/<tid>/stat` (clock ticks) when schedstat is
/// missing. `None` if the thread is gone.
pub fn task_cpu_ns(tid: u32) -> Option<u64> {
    let base = format!("/proc/self/task/{tid}");
    if let Ok(s) = fs::read_to_string(format!("{base}/schedstat")) {
        if let Some(v) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(v);
        }
    }
    let stat = fs::read_to_string(format!("{base}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * (1_000_000_000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

/// Threads of this process whose name starts with `prefix`: (tid, name).
pub fn threads_named(prefix: &str) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc/self/task") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(name) = fs::read_to_string(e.path().join("comm")) {
            let name = name.trim_end().to_string();
            if name.starts_with(prefix) {
                v.push((tid, name));
            }
        }
    }
    v.sort();
    v
}

/// The calling thread's id (for [`cpu_snapshot`]).
pub fn own_tid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// This process's io_uring worker threads (`iou-wrk-<tid>`), see [`iowq_cpu_ns`].
pub fn iowq_tids() -> Vec<u32> {
    threads_named("iou-wrk-")
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// The CPU time of each of `tids` now, `(tid, ns)`; threads already gone are
/// left out.
pub fn cpu_snapshot(tids: &[u32]) -> Vec<(u32, u64)> {
    tids.iter()
        .filter_map(|&t| task_cpu_ns(t).map(|ns| (t, ns)))
        .collect()
}

/// The CPU the threads of `after` used since `before`, thread by thread: what
/// each used since its time in `before`, all of its time for a thread born
/// since (an io_uring worker started during the run). A thread that exited in
/// between (io-wq workers exit after a few idle seconds) is missed, and is
/// never counted against the others: a difference of sums would lose the
/// exited thread's whole lifetime and could reach 0 for a run that did work.
pub fn cpu_since(before: &[(u32, u64)], after: &[(u32, u64)]) -> u64 {
    after
        .iter()
        .map(|&(t, ns)| {
            let was = before
                .iter()
                .find(|(b, _)| *b == t)
                .map_or(0, |&(_, ns)| ns);
            // A smaller value: the tid was reused by a new thread.
            if ns >= was {
                ns - was
            } else {
                ns
            }
        })
        .sum()
}

/// CPU time of this process's io_uring worker threads (`iou-wrk-<tid>`: the
/// kernel's io-wq, which runs operations that cannot be issued without blocking,
/// e.g. buffered writes on btrfs, O_DIRECT on tmpfs). They work for the ring's
/// owner, so they belong to the serving side. Workers that exited during a run
/// are missed (they live while busy and exit after seconds of idleness).
pub fn iowq_cpu_ns() -> u64 {
    cpu_snapshot(&iowq_tids()).iter().map(|(_, ns)| ns).sum()
}

/// The kernel's worker threads (`kworker/*`) and their CPU time, `(pid, ns)`,
/// from `/proc/<pid>/schedstat` (a kernel thread is a process of one
/// thread). Loop devices do their I/O in them (the `loopN` workqueues), and so
/// do deferred direct-I/O completions (`dio/loopN`): the part of the `loop-*`
/// paths' serving cost, and of the scratch file system's loop device under
/// every path, that no thread of this process shows. Other tenants'
/// kernel work is in them too.
pub fn kworker_snapshot() -> Vec<(u32, u64)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let is_kworker = fs::read_to_string(p.join("comm")).is_ok_and(|c| c.starts_with("kworker"));
        if !is_kworker {
            continue;
        }
        if let Some(ns) = fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            v.push((pid, ns));
        }
    }
    v
}

/// Busy CPU time of the whole machine (all CPUs, everything but idle and iowait), in
/// nanoseconds, from `/proc/stat`. Includes other processes: use only as context.
pub fn machine_busy_ns() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, x)| *x)
        .sum();
    busy * (1_000_000_000 / clock_ticks())
}

/// Per-operation latencies of one run (nanoseconds), summarized on demand.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    ns: Vec<u64>,
}

impl Latencies {
    /// Room for `n` samples without reallocating during the run.
    pub fn with_capacity(n: usize) -> Latencies {
        Latencies {
            ns: Vec::with_capacity(n),
        }
    }

    /// Record one operation's latency.
    pub fn push(&mut self, d: Duration) {
        self.ns.push(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.ns.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }

    /// Mean in microseconds (0 without samples).
    pub fn mean_us(&self) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        self.ns.iter().map(|&x| x as f64).sum::<f64>() / self.ns.len() as f64 / 1000.0
    }

    /// The median in microseconds (0 without samples).
    pub fn p50_us(&mut self) -> f64 {
        self.quantile_us(0.5)
    }

    /// The `q` quantile (0..=1) in microseconds, nearest rank (0 without samples).
    pub fn quantile_us(&mut self, q: f64) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        self.ns.sort_unstable();
        let rank = ((q * self.ns.len() as f64).ceil() as usize).clamp(1, self.ns.len());
        self.ns[rank - 1] as f64 / 1000.0
    }
}

/// Median, minimum and maximum of a set of repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Summarize `v` (NaNs ignored). All zero for an empty set.
    pub fn of(v: &[f64]) -> Spread {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
        if s.is_empty() {
            return Spread::default();
        }
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Spread {
            median,
            min: s[0],
            max: s[n - 1],
        }
    }

    /// Half the range relative to the median, in percent (0 when the median is 0).
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median * 100.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sets_and_spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert!((s.spread_pct() - 50.0).abs() < 1e-9);
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut l = Latencies::with_capacity(100);
        for i in 1..=100u64 {
            l.push(Duration::from_micros(i));
        }
        assert_eq!(l.quantile_us(0.99), 99.0);
        assert_eq!(l.quantile_us(0.5), 50.0);
        assert!((l.mean_us() - 50.5).abs() < 1e-9);
    }

    #[test]
    fn serving_cpu_stays_above_zero_when_an_io_worker_exits() {
        // The generator's thread (1) used 50 µs; an io-wq worker (2) that had
        // used 1 ms exited during the run; another (3) was born and used 7 µs.
        let before = [(1, 100_000), (2, 1_000_000)];
        let after = [(1, 150_000), (3, 7_000)];
        assert_eq!(cpu_since(&before, &after), 57_000);
        // A tid reused by a new thread counts that thread's time only.
        assert_eq!(cpu_since(&[(4, 900)], &[(4, 30)]), 30);
    }

    #[test]
    fn the_kernel_workers_loop_devices_use_are_found_with_their_cpu() {
        // Every Linux runs kworker threads, and the ones that have run show
        // CPU time; a thread of this process is none of them.
        let k = kworker_snapshot();
        assert!(!k.is_empty(), "no kworker found in /proc");
        for (pid, _) in &k {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            assert!(
                comm.is_empty() || comm.starts_with("kworker"),
                "{pid}: {comm}"
            );
        }
        assert!(k.iter().any(|(_, ns)| *ns > 0), "{k:?}");
        assert!(!k.iter().any(|(pid, _)| *pid == std::process::id()));
    }

    #[test]
    fn own_thread_cpu_is_visible_both_ways() {
        let t0 = thread_cpu_ns();
        // Burn CPU (not sleep) until the counter moves, for at most 5 s of it.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu_ns() == t0 && start.elapsed() < Duration::from_secs(5) {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(
            thread_cpu_ns() > t0,
            "5 s of spinning did not show as CPU time"
        );
        let tid = nix::unistd::gettid().as_raw() as u32;
        assert!(task_cpu_ns(tid).unwrap() > 0);
    }
}
