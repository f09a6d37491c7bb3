//! The scale harness of issue #8: one `refblk serve` process serving many
//! simulated guests at once, measured from the outside.
//!
//! The simulated Xen (`refblk sim`) and the daemon (`refblk serve --sim`) run
//! as two child processes, so `/proc/<daemon>/…` shows the daemon's memory,
//! descriptors and CPU time alone. The guests (one [`Frontend`] each, driven
//! by one thread per guest) and the toolstack run in the calling process.
//!
//! Steps ([`run`]):
//! 1. start the simulator and the daemon; **baseline** sample of the daemon;
//! 2. **attach** the guests one after the other: the toolstack creates the
//!    vbd, the hotplug step goes through the control socket (`attach`, as the
//!    `block-refblk` script does), the guest's blkfront connects; each
//!    attach is timed from the vbd's creation to both ends Connected;
//! 3. **idle** sample with every device connected and no I/O;
//! 4. **load**: every guest runs the same mixed random read/write load
//!    (4 KiB, `queue_depth` in flight, `read_pct` % reads) for the measured
//!    window; every read is checked against what the guest wrote there;
//! 5. **idle after** sample (once the load stopped);
//! 6. **detach** every device as a VM shutdown does (the guest closes its
//!    disk, the domain dies, the toolstack removes the vbd, the hotplug
//!    `remove` sends `detach` through the control socket) and sample again:
//!    descriptors and memory must be back at the baseline;
//! 7. **more rounds** (`extra_rounds`, 2 by default): attach and detach
//!    every device again without load; descriptors must stay at the
//!    baseline and RSS flat from round 2 on (a leak grows every round,
//!    glibc's caches of freed memory do not; round 2 may still grow the
//!    heap, as freed memory is reused in another order).
//!
//! Used by `bench/scale.rs` (`cargo run --release --example scale`, the
//! issue's figures and targets) and `tests/ops/scale_guests.rs` (a reduced run
//! asserting progress, data and leaks only). See `docs/benchmarks.md`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use refblk_core::backend::control;
use refblk_core::platform::DomId;
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Toolstack, Vbd, VbdSpec};
use refblk_sim::SimGuest;
use xen_sys::xenbus::XenbusState;

/// xvda.
const DEVID: u32 = 51712;
/// Block size of the load.
const BLOCK: usize = 4096;
/// The targets.
pub const TARGET_IDLE_KIB_PER_DEVICE: f64 = 2048.0;
pub const TARGET_LAST_ATTACH_MS: f64 = 50.0;
pub const TARGET_FAIRNESS: f64 = 0.8;

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    /// The `refblk` binary (runs `refblk sim` and `refblk serve`).
    pub refblk: PathBuf,
    /// Guests (one vbd each).
    pub guests: usize,
    /// Measured load window.
    pub load: Duration,
    /// Load before the window starts (not counted).
    pub warmup: Duration,
    /// Where the machine directory and images go (a fresh subdirectory is
    /// made and removed).
    pub dir: PathBuf,
    /// Size of each guest's image (sparse).
    pub image_size: u64,
    /// Operations in flight per guest.
    pub queue_depth: usize,
    /// Percentage of reads in the load.
    pub read_pct: u32,
    /// Queues per device the frontend asks for.
    pub queues: u32,
    /// Ring page order the frontend asks for.
    pub ring_page_order: u32,
    /// Pages of memory per guest.
    pub guest_pages: u32,
    /// Extra arguments to `refblk serve`.
    pub serve_args: Vec<String>,
    /// After the load, every guest reads back every block it wrote.
    pub final_verify: bool,
    /// How long to let the daemon settle before an idle sample.
    pub settle: Duration,
    /// Print each step to stderr.
    pub progress: bool,
    /// After the detach, attach and detach every device this many more
    /// times (no load) and compare with the first detach: a leak grows with
    /// every round, allocator caches do not.
    pub extra_rounds: usize,
}

impl ScaleConfig {
    /// The bench: 128 guests, 10 s of 4 KiB QD4 70/30 load on
    /// 64 MiB images in /dev/shm.
    pub fn new(refblk: impl Into<PathBuf>) -> ScaleConfig {
        ScaleConfig {
            refblk: refblk.into(),
            guests: 128,
            load: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            dir: default_dir(),
            image_size: 64 << 20,
            queue_depth: 4,
            read_pct: 70,
            queues: 1,
            ring_page_order: 0,
            guest_pages: 512,
            serve_args: Vec::new(),
            final_verify: false,
            settle: Duration::from_secs(1),
            progress: true,
            extra_rounds: 2,
        }
    }
}

/// /dev/shm when it is there, else the temp dir.
pub fn default_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// How far above its baseline the daemon's RSS may stay once every device
/// is detached, KiB. What stays is glibc's, not refblk's: each thread that
/// allocated got a malloc arena (at most 8 per CPU), and an arena keeps some
/// freed memory instead of returning it (measured: about 130-300 KiB each,
/// plus about 1 MiB of main heap; see `anon_after_detach` in the report). So
/// the allowance is 2 MiB + 384 KiB per possible arena, independent of the
/// number of devices: 8 MiB on 2 CPUs, while a leaked 4 MiB buffer slab per
/// device would be 128 MiB at 32 guests and even 64 KiB per device at 128
/// guests would show.
pub fn rss_tolerance_kib(cpus: usize) -> u64 {
    2048 + 8 * cpus as u64 * 384
}

/// How much the daemon's RSS may grow over the leak check's attach/detach
/// rounds (from the end of round 2 to the end of the last round; see
/// [`ScaleReport::second_round_rss_kib`]): 1 MiB of heap noise. Measured at 32
/// devices: +12 to +28 KiB per round after round 2; a leak of 8 KiB per
/// attach shows at 128 devices in one round.
pub const SECOND_ROUND_TOLERANCE_KIB: u64 = 1024;

/// One look at a process through /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// VmRSS.
    pub rss_kib: u64,
    /// RssAnon (heap, stacks, anonymous mappings such as buffer slabs).
    pub rss_anon_kib: u64,
    /// RssFile.
    pub rss_file_kib: u64,
    /// RssShmem (in the simulation: guest memory and grant tables the
    /// backend mapped, shared with the guest processes).
    pub rss_shmem_kib: u64,
    /// Pss from smaps_rollup.
    pub pss_kib: u64,
    /// Private_Clean + Private_Dirty from smaps_rollup: memory only this
    /// process has.
    pub private_kib: u64,
    /// Entries of /proc/PID/fd.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// utime + stime of the whole process (all threads, living and dead), ns.
    pub cpu_ns: u64,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

/// utime + stime of process `pid` (`"self"` for this one), in ns.
pub fn process_cpu_ns(pid: &str) -> io::Result<u64> {
    let p = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&p)?;
    let bad = || io::Error::other(format!("{p}: unexpected format"));
    let rest = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    Ok((utime + stime) * (1_000_000_000 / clock_ticks()))
}

impl ProcSample {
    /// Sample process `pid`.
    pub fn read(pid: u32) -> io::Result<ProcSample> {
        let base = format!("/proc/{pid}");
        let ctx =
            |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{base}/{what}: {e}"));
        let status = fs::read_to_string(format!("{base}/status")).map_err(|e| ctx("status", e))?;
        let rollup = fs::read_to_string(format!("{base}/smaps_rollup"))
            .map_err(|e| ctx("smaps_rollup", e))?;
        let fds = fs::read_dir(format!("{base}/fd"))
            .map_err(|e| ctx("fd", e))?
            .count();
        Ok(ProcSample {
            rss_kib: status_kib(&status, "VmRSS:"),
            rss_anon_kib: status_kib(&status, "RssAnon:"),
            rss_file_kib: status_kib(&status, "RssFile:"),
            rss_shmem_kib: status_kib(&status, "RssShmem:"),
            pss_kib: status_kib(&rollup, "Pss:"),
            private_kib: status_kib(&rollup, "Private_Clean:")
                + status_kib(&rollup, "Private_Dirty:"),
            fds,
            threads: status_kib(&status, "Threads:") as usize,
            cpu_ns: process_cpu_ns(&pid.to_string())?,
        })
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "rss_kib": self.rss_kib,
            "rss_anon_kib": self.rss_anon_kib,
            "rss_file_kib": self.rss_file_kib,
            "rss_shmem_kib": self.rss_shmem_kib,
            "pss_kib": self.pss_kib,
            "private_kib": self.private_kib,
            "fds": self.fds,
            "threads": self.threads,
            "cpu_ns": self.cpu_ns,
        })
    }

    fn line(&self) -> String {
        format!(
            "RSS {} (anon {}, file {}, shmem {}), Pss {}, private {}; {} fds, {} threads",
            kib(self.rss_kib as f64),
            kib(self.rss_anon_kib as f64),
            kib(self.rss_file_kib as f64),
            kib(self.rss_shmem_kib as f64),
            kib(self.pss_kib as f64),
            kib(self.private_kib as f64),
            self.fds,
            self.threads
        )
    }
}

/// What each descriptor of process `pid` points to (`readlink` of
/// /proc/PID/fd/N, with anonymous inode numbers kept), sorted.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The daemon's largest anonymous mappings by resident size:
/// (address range, size KiB, Rss KiB, what it probably is — a guess from the
/// size: a Rust thread stack is a 2 MiB mapping, a glibc malloc arena's heap
/// is part of a 64 MiB reservation, `[heap]` is the main arena; io_uring
/// buffer slabs are anonymous mappings too).
pub fn anon_mappings(pid: u32, top: usize) -> Vec<(String, u64, u64, String)> {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur: Option<(String, u64, String)> = None;
    for l in s.lines() {
        let mut it = l.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let rest: Vec<&str> = it.collect();
            let name = rest.get(4).copied().unwrap_or("").to_string();
            let size = first
                .split_once('-')
                .and_then(|(a, b)| {
                    Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                })
                .unwrap_or(0)
                / 1024;
            cur = Some((first.to_string(), size, name));
        } else if first == "Anonymous:" {
            let kb: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some((range, size, name)) = cur.take() {
                if kb > 0 {
                    let what = if !name.is_empty() {
                        name
                    } else if size == 2048 {
                        "thread stack?".to_string()
                    } else if (128..=65536).contains(&size) {
                        "malloc arena, buffer slab or large block".to_string()
                    } else {
                        "anonymous".to_string()
                    };
                    out.push((range, size, kb, what));
                }
            }
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.2));
    out.truncate(top);
    out
}

/// Descriptors grouped by what they point to, digits folded to `N`
/// (`anon_inode:[io_uring]`, `socket:[N]`, `/…/dom/N/mem`), most first.
fn fd_kinds(fds: &[String]) -> Vec<(String, usize)> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for f in fds {
        let mut k = String::new();
        let mut in_digits = false;
        for c in f.chars() {
            if c.is_ascii_digit() {
                if !in_digits {
                    k.push('N');
                }
                in_digits = true;
            } else {
                k.push(c);
                in_digits = false;
            }
        }
        *m.entry(k).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// What `after` has that `before` has not (multiset difference).
fn extra(before: &[String], after: &[String]) -> Vec<String> {
    let mut b: Vec<&String> = before.iter().collect();
    let mut out = Vec::new();
    for a in after {
        match b.iter().position(|x| *x == a) {
            Some(i) => {
                b.swap_remove(i);
            }
            None => out.push(a.clone()),
        }
    }
    out
}

/// A KiB amount for people.
fn kib(v: f64) -> String {
    if v.abs() >= 10.0 * 1024.0 {
        format!("{:.1} MiB", v / 1024.0)
    } else {
        format!("{v:.0} KiB")
    }
}

/// One attach, from the vbd's creation to both ends Connected.
#[derive(Debug, Clone, Copy)]
pub struct AttachTiming {
    pub domid: DomId,
    /// Whole attach.
    pub total_ms: f64,
    /// Creating the vbd until the backend is in InitWait.
    pub initwait_ms: f64,
    /// The hotplug step: control socket `attach`, `hotplug-status`.
    pub hotplug_ms: f64,
    /// The frontend's handshake until Connected.
    pub connect_ms: f64,
    /// The daemon right after this attach.
    pub daemon: ProcSample,
}

/// What one guest did.
#[derive(Debug, Clone, Default)]
pub struct GuestResult {
    pub domid: DomId,
    /// Operations completed in the measured window.
    pub window_ios: u64,
    /// Reads and writes completed in the whole run (warm-up and drain included).
    pub reads: u64,
    pub writes: u64,
    /// Reads that were checked against data this guest wrote (the others read
    /// blocks never written, checked to be zeros).
    pub reads_of_written: u64,
    /// Blocks read back and checked after the load (`final_verify`).
    pub final_verified: u64,
    /// The first failure (an error status, a timeout, a mismatch), if any.
    pub error: Option<String>,
    /// Response anomalies the frontend saw (`Debug` of `Anomalies`), if any.
    pub anomalies: Option<String>,
}

/// The load step.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Measured window.
    pub window_s: f64,
    pub guests: Vec<GuestResult>,
    /// Per guest, in the window.
    pub iops: Vec<f64>,
    pub min_iops: f64,
    pub mean_iops: f64,
    pub max_iops: f64,
    pub aggregate_iops: f64,
    /// min / mean.
    pub fairness: f64,
    /// Daemon CPU time in the window.
    pub daemon_cpu_ns: u64,
    /// This process (the guests and the toolstack) in the window.
    pub guest_cpu_ns: u64,
    /// The simulator process (xenstored, event channel broker) in the window.
    pub sim_cpu_ns: u64,
    /// The whole machine's busy time in the window (other processes too).
    pub machine_busy_ns: u64,
    /// Daemon sample with the largest RSS seen during the window.
    pub daemon_peak: ProcSample,
    /// Requests the daemon counted (reads + writes of all devices, from its
    /// `status`) over the whole run, and what the guests counted.
    pub daemon_requests: u64,
    pub guest_requests: u64,
}

/// Everything a run found. Steps that did not run are `None`; `error` says
/// where it stopped.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    pub config: ScaleConfig,
    /// When it started (UTC, RFC 3339) and /proc/loadavg then and at the end.
    pub started: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub cpus: usize,
    pub daemon_pid: Option<u32>,
    pub baseline: Option<ProcSample>,
    pub attaches: Vec<AttachTiming>,
    pub idle: Option<ProcSample>,
    pub load: Option<LoadResult>,
    pub idle_after: Option<ProcSample>,
    pub detach_s: Option<f64>,
    /// Devices the daemon still listed after the detach.
    pub devices_left: Option<usize>,
    /// Descriptors of the daemon after the detach that were not there at
    /// the baseline (what they point to), and the other way round.
    pub fds_gained: Vec<String>,
    pub fds_lost: Vec<String>,
    /// The daemon's largest anonymous mappings after the detach (see
    /// [`anon_mappings`]): where memory above the baseline stays.
    pub anon_after_detach: Vec<(String, u64, u64, String)>,
    pub detached: Option<ProcSample>,
    /// The daemon's descriptors with every device connected and idle that
    /// were not there at the baseline, by kind (see [`fd_kinds`]).
    pub idle_fd_kinds: Vec<(String, usize)>,
    /// The attaches of the first extra round, and the daemon after each
    /// extra round's detach (`extra_rounds`).
    pub second_attaches: Vec<AttachTiming>,
    pub rounds_after: Vec<ProcSample>,
    /// The daemon's exit after SIGTERM.
    pub daemon_exit: Option<String>,
    pub error: Option<String>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One of the targets and whether the run met it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    pub value: String,
    pub goal: String,
    pub met: bool,
}

impl ScaleReport {
    /// (RSS − baseline) / guests with every device connected and idle, KiB.
    pub fn idle_kib_per_device(&self) -> Option<f64> {
        per_device(self.baseline?, self.idle?, self.attaches.len(), |s| {
            s.rss_kib
        })
    }

    /// The same after the load.
    pub fn idle_after_kib_per_device(&self) -> Option<f64> {
        per_device(self.baseline?, self.idle_after?, self.attaches.len(), |s| {
            s.rss_kib
        })
    }

    /// Least-squares slope of the daemon's RSS over the attaches, KiB per
    /// device (less sensitive to one-off costs than the difference).
    pub fn rss_slope_kib(&self) -> Option<f64> {
        let n = self.attaches.len();
        if n < 2 {
            return None;
        }
        let xs: Vec<f64> = (1..=n).map(|i| i as f64).collect();
        let ys: Vec<f64> = self
            .attaches
            .iter()
            .map(|a| a.daemon.rss_kib as f64)
            .collect();
        let mx = xs.iter().sum::<f64>() / n as f64;
        let my = ys.iter().sum::<f64>() / n as f64;
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        Some(sxy / sxx)
    }

    /// Sorted attach times, ms.
    fn attach_sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.attaches.iter().map(|a| a.total_ms).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The daemon's descriptors after the detach minus the baseline.
    pub fn fd_delta(&self) -> Option<i64> {
        Some(self.detached?.fds as i64 - self.baseline?.fds as i64)
    }

    /// The daemon's RSS after the detach minus the baseline, KiB.
    pub fn rss_delta_kib(&self) -> Option<i64> {
        Some(self.detached?.rss_kib as i64 - self.baseline?.rss_kib as i64)
    }

    /// The daemon after the round the leak check starts from: the first
    /// extra round when there are two or more (the first re-attach may still
    /// grow the heap: freed memory is reused in another order), else the
    /// first detach.
    fn leak_check_from(&self) -> Option<ProcSample> {
        if self.rounds_after.len() >= 2 {
            self.rounds_after.first().copied()
        } else {
            self.detached
        }
    }

    /// RSS after the last extra round minus at the start of the leak check
    /// ([`leak_check_from`](Self::leak_check_from)), KiB.
    pub fn second_round_rss_kib(&self) -> Option<i64> {
        Some(self.rounds_after.last()?.rss_kib as i64 - self.leak_check_from()?.rss_kib as i64)
    }

    /// Descriptors after the last extra round minus after the first detach.
    pub fn second_round_fds(&self) -> Option<i64> {
        Some(self.rounds_after.last()?.fds as i64 - self.detached?.fds as i64)
    }

    /// The targets (the bench's pass/fail list). `rss_tolerance_kib`
    /// is how far above the baseline the RSS may stay after the detach.
    pub fn targets(&self, rss_tolerance_kib: u64) -> Vec<Target> {
        let mut t = Vec::new();
        let na = || "not reached".to_string();
        let every = self.load.as_ref().map(|l| {
            l.guests.len() == self.config.guests
                && l.guests
                    .iter()
                    .all(|g| g.window_ios > 0 && g.error.is_none())
        });
        t.push(Target {
            name: "every guest makes progress, no error",
            value: match &self.load {
                Some(l) => format!(
                    "{} of {} guests progressed, {} failed",
                    l.guests.iter().filter(|g| g.window_ios > 0).count(),
                    self.config.guests,
                    l.guests.iter().filter(|g| g.error.is_some()).count()
                ),
                None => na(),
            },
            goal: "all".into(),
            met: every == Some(true),
        });
        let fair = self.load.as_ref().map(|l| l.fairness);
        t.push(Target {
            name: "fairness (min / mean IOPS)",
            value: fair.map_or_else(na, |f| format!("{f:.3}")),
            goal: format!(">= {TARGET_FAIRNESS}"),
            met: fair.is_some_and(|f| f >= TARGET_FAIRNESS),
        });
        let idle = self.idle_kib_per_device();
        t.push(Target {
            name: "memory per idle connected device",
            value: idle.map_or_else(na, kib),
            goal: format!("< {}", kib(TARGET_IDLE_KIB_PER_DEVICE)),
            met: idle.is_some_and(|v| v < TARGET_IDLE_KIB_PER_DEVICE),
        });
        let last = (self.attaches.len() == self.config.guests)
            .then(|| self.attaches.last().map(|a| a.total_ms))
            .flatten();
        t.push(Target {
            name: "attach of the last device",
            value: last.map_or_else(na, |v| format!("{v:.1} ms")),
            goal: format!("< {TARGET_LAST_ATTACH_MS} ms"),
            met: last.is_some_and(|v| v < TARGET_LAST_ATTACH_MS),
        });
        let fd = self.fd_delta();
        t.push(Target {
            name: "fds after detaching all",
            value: fd.map_or_else(na, |d| format!("{d:+} vs baseline")),
            goal: "+0".into(),
            met: fd == Some(0) && self.devices_left == Some(0),
        });
        let rss = self.rss_delta_kib();
        t.push(Target {
            name: "RSS after detaching all",
            value: rss.map_or_else(na, |d| format!("{d:+} KiB vs baseline")),
            goal: format!("<= +{rss_tolerance_kib} KiB"),
            met: rss.is_some_and(|d| d <= rss_tolerance_kib as i64),
        });
        if self.config.extra_rounds > 0 {
            let (r, f) = (self.second_round_rss_kib(), self.second_round_fds());
            t.push(Target {
                name: "more attach/detach rounds leak nothing",
                value: match (r, f) {
                    (Some(r), Some(f)) => format!(
                        "RSS {r:+} KiB from round {} to round {}, fds {f:+} from round 1",
                        if self.rounds_after.len() >= 2 { 2 } else { 1 },
                        self.rounds_after.len() + 1
                    ),
                    _ => na(),
                },
                goal: format!("RSS <= +{SECOND_ROUND_TOLERANCE_KIB} KiB, fds +0"),
                met: r.is_some_and(|r| r <= SECOND_ROUND_TOLERANCE_KIB as i64) && f == Some(0),
            });
        }
        t
    }

    /// A readable summary (what the bench prints).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "scale: {} guests, {} s load (+{} s warm-up), 4 KiB random QD{} {}/{} read/write, \
             {} MiB images in {}, {} queue(s) of ring order {} per device",
            c.guests,
            c.load.as_secs_f64(),
            c.warmup.as_secs_f64(),
            c.queue_depth,
            c.read_pct,
            100 - c.read_pct,
            c.image_size >> 20,
            c.dir.display(),
            c.queues,
            c.ring_page_order
        ));
        line(format!(
            "machine: {} CPUs; started {}; load average at start {}, at end {}",
            self.cpus, self.started, self.loadavg_start, self.loadavg_end
        ));
        line(
            "processes: refblk serve (measured) and refblk sim are children; the guests run in \
             this process, one thread per guest"
                .into(),
        );
        if let Some(b) = &self.baseline {
            line(format!("baseline:   {}", b.line()));
        }
        if !self.attaches.is_empty() {
            let v = self.attach_sorted();
            let last = self.attaches.last().expect("not empty");
            let mut iw: Vec<f64> = self.attaches.iter().map(|a| a.initwait_ms).collect();
            let mut hp: Vec<f64> = self.attaches.iter().map(|a| a.hotplug_ms).collect();
            let mut cn: Vec<f64> = self.attaches.iter().map(|a| a.connect_ms).collect();
            iw.sort_by(f64::total_cmp);
            hp.sort_by(f64::total_cmp);
            cn.sort_by(f64::total_cmp);
            line(format!(
                "attach:     {} devices; #{}: {:.1} ms (InitWait {:.1} + hotplug {:.1} + connect \
                 {:.1}); p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (p50s: InitWait {:.1}, hotplug \
                 {:.1}, connect {:.1})",
                self.attaches.len(),
                self.attaches.len(),
                last.total_ms,
                last.initwait_ms,
                last.hotplug_ms,
                last.connect_ms,
                quantile(&v, 0.5),
                quantile(&v, 0.99),
                v.last().copied().unwrap_or(f64::NAN),
                quantile(&iw, 0.5),
                quantile(&hp, 0.5),
                quantile(&cn, 0.5),
            ));
        }
        if let Some(i) = &self.idle {
            line(format!("idle:       {}", i.line()));
            if let (Some(b), Some(pd)) = (&self.baseline, self.idle_kib_per_device()) {
                let n = self.attaches.len().max(1) as f64;
                line(format!(
                    "            per device: RSS {} (slope over the attaches {}), anon {}, \
                     private {}, shmem {}; {:.1} fds, {:.2} threads",
                    kib(pd),
                    self.rss_slope_kib().map_or("-".into(), kib),
                    kib((i.rss_anon_kib as f64 - b.rss_anon_kib as f64) / n),
                    kib((i.private_kib as f64 - b.private_kib as f64) / n),
                    kib((i.rss_shmem_kib as f64 - b.rss_shmem_kib as f64) / n),
                    (i.fds as f64 - b.fds as f64) / n,
                    (i.threads as f64 - b.threads as f64) / n,
                ));
            }
            if !self.idle_fd_kinds.is_empty() {
                let k: Vec<String> = self
                    .idle_fd_kinds
                    .iter()
                    .map(|(k, n)| format!("{n}× {k}"))
                    .collect();
                line(format!("            descriptors gained: {}", k.join(", ")));
            }
        }
        if let Some(l) = &self.load {
            let ios: u64 = l.guests.iter().map(|g| g.window_ios).sum();
            line(format!(
                "load:       {:.0} IOPS aggregate over {:.2} s; per guest min {:.0} / mean {:.0} / \
                 max {:.0} IOPS, fairness min/mean {:.3}; {} of {} guests progressed, {} failed",
                l.aggregate_iops,
                l.window_s,
                l.min_iops,
                l.mean_iops,
                l.max_iops,
                l.fairness,
                l.guests.iter().filter(|g| g.window_ios > 0).count(),
                c.guests,
                l.guests.iter().filter(|g| g.error.is_some()).count(),
            ));
            let per_io = |ns: u64| {
                if ios == 0 {
                    f64::NAN
                } else {
                    ns as f64 / ios as f64 / 1000.0
                }
            };
            let w = l.window_s;
            line(format!(
                "            CPU in the window: daemon {:.2} s ({:.1} µs/IO), guests {:.2} s \
                 ({:.1} µs/IO), simulator {:.2} s; machine busy {:.2} of {:.2} CPU-s",
                l.daemon_cpu_ns as f64 / 1e9,
                per_io(l.daemon_cpu_ns),
                l.guest_cpu_ns as f64 / 1e9,
                per_io(l.guest_cpu_ns),
                l.sim_cpu_ns as f64 / 1e9,
                l.machine_busy_ns as f64 / 1e9,
                w * self.cpus as f64,
            ));
            line(format!("            peak: {}", l.daemon_peak.line()));
            let reads: u64 = l.guests.iter().map(|g| g.reads).sum();
            let rw: u64 = l.guests.iter().map(|g| g.reads_of_written).sum();
            let fv: u64 = l.guests.iter().map(|g| g.final_verified).sum();
            line(format!(
                "            data: {reads} reads verified ({rw} of written data), {} writes; \
                 {fv} blocks read back after the load; daemon counted {} requests, guests {}",
                l.guests.iter().map(|g| g.writes).sum::<u64>(),
                l.daemon_requests,
                l.guest_requests
            ));
            for g in &l.guests {
                if let Some(e) = &g.error {
                    line(format!("            dom{}: {e}", g.domid));
                }
                if let Some(a) = &g.anomalies {
                    line(format!(
                        "            dom{}: response anomalies {a}",
                        g.domid
                    ));
                }
            }
        }
        if let Some(i) = &self.idle_after {
            line(format!("idle after: {}", i.line()));
            if let Some(pd) = self.idle_after_kib_per_device() {
                line(format!("            per device: RSS {}", kib(pd)));
            }
        }
        if let (Some(d), Some(t)) = (&self.detached, self.detach_s) {
            line(format!(
                "detached:   {} in {:.2} s; {} device(s) left",
                d.line(),
                t,
                self.devices_left.unwrap_or(usize::MAX)
            ));
            if let Some(b) = &self.baseline {
                line(format!(
                    "            vs baseline: RSS {:+} KiB (anon {:+}, private {:+}), fds {:+}, \
                     threads {:+}",
                    d.rss_kib as i64 - b.rss_kib as i64,
                    d.rss_anon_kib as i64 - b.rss_anon_kib as i64,
                    d.private_kib as i64 - b.private_kib as i64,
                    d.fds as i64 - b.fds as i64,
                    d.threads as i64 - b.threads as i64,
                ));
            }
            let anon: Vec<String> = self
                .anon_after_detach
                .iter()
                .map(|(_, size, rss, what)| format!("{rss} of {size} KiB ({what})"))
                .collect();
            if !anon.is_empty() {
                line(format!(
                    "            largest anonymous mappings: {}",
                    anon.join(", ")
                ));
            }
            if !self.fds_gained.is_empty() || !self.fds_lost.is_empty() {
                line(format!(
                    "            descriptors gained {:?}, gone {:?}",
                    self.fds_gained, self.fds_lost
                ));
            }
        }
        if let (Some(d2), Some(r), Some(f)) = (
            self.rounds_after.last(),
            self.second_round_rss_kib(),
            self.second_round_fds(),
        ) {
            let mut v: Vec<f64> = self.second_attaches.iter().map(|a| a.total_ms).collect();
            v.sort_by(f64::total_cmp);
            line(format!(
                "rounds:     {} more attach/detach round(s) (round 2: p50 {:.1} ms, max {:.1} ms); \
                 after the last: {}",
                self.rounds_after.len(),
                quantile(&v, 0.5),
                v.last().copied().unwrap_or(f64::NAN),
                d2.line()
            ));
            let each: Vec<String> = self
                .rounds_after
                .iter()
                .map(|x| format!("{}", x.rss_kib))
                .collect();
            line(format!(
                "            leak check: RSS {r:+} KiB (from round {}), fds {f:+}; RSS KiB after each \
                 round's detach: {} {}",
                if self.rounds_after.len() >= 2 { 2 } else { 1 },
                self.detached.map_or(0, |d| d.rss_kib),
                each.join(" ")
            ));
        }
        if let Some(x) = &self.daemon_exit {
            line(format!("daemon:     {x}"));
        }
        if let Some(e) = &self.error {
            line(format!("STOPPED:    {e}"));
        }
        s
    }

    /// Everything as JSON.
    pub fn to_json(&self, rss_tolerance_kib: u64) -> Value {
        let c = &self.config;
        let v = self.attach_sorted();
        let opt = |s: &Option<ProcSample>| s.as_ref().map(ProcSample::to_json);
        json!({
            "config": {
                "guests": c.guests,
                "load_s": c.load.as_secs_f64(),
                "warmup_s": c.warmup.as_secs_f64(),
                "dir": c.dir.display().to_string(),
                "image_bytes": c.image_size,
                "block_bytes": BLOCK,
                "queue_depth": c.queue_depth,
                "read_pct": c.read_pct,
                "queues": c.queues,
                "ring_page_order": c.ring_page_order,
                "serve_args": c.serve_args,
                "final_verify": c.final_verify,
                "guest_threads": "one thread per guest in the bench process",
            },
            "started": self.started,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": self.loadavg_end,
            "cpus": self.cpus,
            "baseline": opt(&self.baseline),
            "attach": {
                "devices": self.attaches.len(),
                "last_ms": self.attaches.last().map(|a| a.total_ms),
                "p50_ms": (!v.is_empty()).then(|| quantile(&v, 0.5)),
                "p99_ms": (!v.is_empty()).then(|| quantile(&v, 0.99)),
                "max_ms": v.last(),
                "each": self.attaches.iter().map(|a| json!({
                    "domid": a.domid,
                    "total_ms": a.total_ms,
                    "initwait_ms": a.initwait_ms,
                    "hotplug_ms": a.hotplug_ms,
                    "connect_ms": a.connect_ms,
                    "daemon_rss_kib": a.daemon.rss_kib,
                    "daemon_fds": a.daemon.fds,
                    "daemon_threads": a.daemon.threads,
                })).collect::<Vec<_>>(),
            },
            "idle": opt(&self.idle),
            "idle_kib_per_device": self.idle_kib_per_device(),
            "idle_fds_gained_by_kind": self.idle_fd_kinds.iter().map(|(k, n)| json!({
                "kind": k, "count": n,
            })).collect::<Vec<_>>(),
            "rss_slope_kib_per_device": self.rss_slope_kib(),
            "load": self.load.as_ref().map(|l| {
                let ios: u64 = l.guests.iter().map(|g| g.window_ios).sum();
                json!({
                    "window_s": l.window_s,
                    "aggregate_iops": l.aggregate_iops,
                    "min_iops": l.min_iops,
                    "mean_iops": l.mean_iops,
                    "max_iops": l.max_iops,
                    "fairness": l.fairness,
                    "window_ios": ios,
                    "daemon_cpu_ns": l.daemon_cpu_ns,
                    "daemon_cpu_ns_per_io": (ios > 0).then(|| l.daemon_cpu_ns as f64 / ios as f64),
                    "guest_cpu_ns": l.guest_cpu_ns,
                    "sim_cpu_ns": l.sim_cpu_ns,
                    "machine_busy_ns": l.machine_busy_ns,
                    "daemon_peak": l.daemon_peak.to_json(),
                    "daemon_requests": l.daemon_requests,
                    "guest_requests": l.guest_requests,
                    "guests": l.guests.iter().zip(&l.iops).map(|(g, i)| json!({
                        "domid": g.domid,
                        "iops": i,
                        "window_ios": g.window_ios,
                        "reads": g.reads,
                        "writes": g.writes,
                        "reads_of_written": g.reads_of_written,
                        "final_verified": g.final_verified,
                        "error": g.error,
                        "anomalies": g.anomalies,
                    })).collect::<Vec<_>>(),
                })
            }),
            "idle_after": opt(&self.idle_after),
            "idle_after_kib_per_device": self.idle_after_kib_per_device(),
            "detach_s": self.detach_s,
            "devices_left": self.devices_left,
            "fds_gained": self.fds_gained,
            "fds_lost": self.fds_lost,
            "anon_after_detach": self.anon_after_detach.iter().map(|(r, size, rss, what)| json!({
                "range": r, "size_kib": size, "anon_kib": rss, "what": what,
            })).collect::<Vec<_>>(),
            "detached": opt(&self.detached),
            "fd_delta": self.fd_delta(),
            "rss_delta_kib": self.rss_delta_kib(),
            "extra_rounds": self.rounds_after.last().map(|d2| json!({
                "round2_attach_ms": self.second_attaches.iter().map(|a| a.total_ms).collect::<Vec<_>>(),
                "detached_each": self.rounds_after.iter().map(ProcSample::to_json).collect::<Vec<_>>(),
                "detached": d2.to_json(),
                "leak_check_rss_kib": self.second_round_rss_kib(),
                "leak_check_fds": self.second_round_fds(),
            })),
            "daemon_exit": self.daemon_exit,
            "error": self.error,
            "targets": self.targets(rss_tolerance_kib).iter().map(|t| json!({
                "name": t.name,
                "value": t.value,
                "goal": t.goal,
                "met": t.met,
            })).collect::<Vec<_>>(),
        })
    }
}

fn per_device(
    base: ProcSample,
    now: ProcSample,
    n: usize,
    f: impl Fn(&ProcSample) -> u64,
) -> Option<f64> {
    (n > 0).then(|| (f(&now) as f64 - f(&base) as f64) / n as f64)
}

// ------------------------------------------------------------------ processes

/// A child process killed (SIGKILL) and reaped when dropped.
struct ChildProc {
    child: Option<Child>,
    name: &'static str,
    log: PathBuf,
}

impl ChildProc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<ChildProc, String> {
        let f = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| format!("starting {name} ({cmd:?}): {e}"))?;
        Ok(ChildProc {
            child: Some(child),
            name,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails (with the end of the log) if the process exited.
    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "{} exited ({st}); end of its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                ));
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after that).
    fn terminate(&mut self, timeout: Duration) -> String {
        let Some(mut c) = self.child.take() else {
            return "not running".into();
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return format!("{} stopped on SIGTERM: {st}", self.name),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return format!(
                        "{} ignored SIGTERM for {timeout:?}: killed; end of its log:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_utc() -> String {
    let now = refblk_core::util::time::now_secs();
    format!("{}Z", refblk_core::util::time::isodate(now))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

// ---------------------------------------------------------------------- guests

/// Per-guest state of the load: the version of each block (0 = never
/// written), which blocks have an operation in flight, counters.
struct GuestLoad {
    domid: DomId,
    versions: Vec<u32>,
    busy: Vec<bool>,
    rng: u64,
    result: GuestResult,
}

/// The content of `block` of guest `domid` after its `version`-th write
/// (version 0: never written, zeros).
fn fill_block(buf: &mut [u8], domid: DomId, block: usize, version: u32) {
    if version == 0 {
        buf.fill(0);
        return;
    }
    let mut x = (u64::from(domid) << 48) ^ ((block as u64) << 20) ^ u64::from(version);
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

impl GuestLoad {
    fn new(domid: DomId, blocks: usize) -> GuestLoad {
        GuestLoad {
            domid,
            versions: vec![0; blocks],
            busy: vec![false; blocks],
            rng: (u64::from(domid) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            result: GuestResult {
                domid,
                ..GuestResult::default()
            },
        }
    }

    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Check a completed read of `block` (expected version `v`).
    fn check(&mut self, block: usize, v: u32, data: &[u8], buf: &mut [u8]) -> Result<(), String> {
        fill_block(buf, self.domid, block, v);
        if data != buf {
            let pos = data.iter().zip(buf.iter()).position(|(a, b)| a != b);
            return Err(format!(
                "read of block {block} (written {v} time(s)) differs from what was written \
                 (first difference at byte {pos:?}, length {} of {})",
                data.len(),
                buf.len()
            ));
        }
        Ok(())
    }

    /// The load: keep `qd` random 4 KiB reads/writes in flight until `stop`;
    /// count completions in `done`.
    fn run(
        &mut self,
        fe: &mut Frontend,
        qd: usize,
        read_pct: u32,
        done: &AtomicU64,
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let blocks = self.versions.len();
        let mut buf = vec![0u8; BLOCK];
        // tag -> (block, version expected (read) or being written (write), is_read)
        let mut inflight: HashMap<u64, (usize, u32, bool)> = HashMap::new();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            if stopping && inflight.is_empty() {
                return Ok(());
            }
            while !stopping && inflight.len() < qd {
                let mut b = (self.next_rand() % blocks as u64) as usize;
                while self.busy[b] {
                    b = (b + 1) % blocks;
                }
                let read = self.next_rand() % 100 < u64::from(read_pct);
                let sector = (b * BLOCK / 512) as u64;
                let (tag, v) = if read {
                    let t = fe
                        .submit(None, IoRequest::Read { sector, len: BLOCK })
                        .map_err(|e| format!("submit read: {e}"))?;
                    (t, self.versions[b])
                } else {
                    let v = self.versions[b] + 1;
                    fill_block(&mut buf, self.domid, b, v);
                    let t = fe
                        .submit(None, IoRequest::Write { sector, data: &buf })
                        .map_err(|e| format!("submit write: {e}"))?;
                    (t, v)
                };
                self.busy[b] = true;
                inflight.insert(tag.0, (b, v, read));
            }
            let cs = fe
                .wait(Duration::from_secs(30))
                .map_err(|e| format!("waiting for completions: {e}"))?;
            for c in cs {
                let (b, v, read) = inflight
                    .remove(&c.tag.0)
                    .ok_or_else(|| format!("completion of an unknown tag {:?}", c.tag))?;
                self.busy[b] = false;
                if c.status != 0 {
                    return Err(format!(
                        "{} of block {b} answered status {}",
                        if read { "read" } else { "write" },
                        c.status
                    ));
                }
                if read {
                    self.check(b, v, &c.data, &mut buf)?;
                    self.result.reads += 1;
                    if v > 0 {
                        self.result.reads_of_written += 1;
                    }
                } else {
                    self.versions[b] = v;
                    self.result.writes += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Read back every block written, `qd` at a time.
    fn verify_all(&mut self, fe: &mut Frontend, qd: usize) -> Result<(), String> {
        let mut buf = vec![0u8; BLOCK];
        let written: Vec<usize> = (0..self.versions.len())
            .filter(|&b| self.versions[b] > 0)
            .collect();
        for chunk in written.chunks(qd.max(1)) {
            let mut tags = Vec::new();
            for &b in chunk {
                let sector = (b * BLOCK / 512) as u64;
                let t = fe
                    .submit(None, IoRequest::Read { sector, len: BLOCK })
                    .map_err(|e| format!("submit read: {e}"))?;
                tags.push((t, b));
            }
            for (t, b) in tags {
                let c = fe
                    .wait_for(t, Duration::from_secs(30))
                    .map_err(|e| format!("final read of block {b}: {e}"))?;
                if c.status != 0 {
                    return Err(format!(
                        "final read of block {b} answered status {}",
                        c.status
                    ));
                }
                let v = self.versions[b];
                self.check(b, v, &c.data, &mut buf)
                    .map_err(|e| format!("after the load: {e}"))?;
                self.result.final_verified += 1;
            }
        }
        Ok(())
    }
}

/// A connected guest.
struct Guest {
    domid: DomId,
    vbd: Vbd,
    fe: Frontend,
    guest: Arc<SimGuest>,
}

// ------------------------------------------------------------------------ run

/// The rig of one run: processes, toolstack, guests. Stops everything when
/// dropped.
struct Rig {
    work: PathBuf,
    machine: PathBuf,
    sock: PathBuf,
    sim: ChildProc,
    daemon: ChildProc,
    ts: Option<Toolstack>,
    guests: Vec<Guest>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Guests first (their frontends hold connections to the simulator),
        // then the daemon, then the simulator, then the files.
        self.guests.clear();
        self.ts = None;
        self.daemon.terminate(Duration::from_secs(10));
        self.sim.terminate(Duration::from_secs(10));
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn say(cfg: &ScaleConfig, msg: &str) {
    if cfg.progress {
        eprintln!("scale: {msg}");
    }
}

/// Run the harness. Never panics on a failing backend: whatever step fails
/// ends the run with `error` set and the steps before it filled in.
pub fn run(cfg: &ScaleConfig) -> ScaleReport {
    let mut rep = ScaleReport {
        config: cfg.clone(),
        started: now_utc(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        daemon_pid: None,
        baseline: None,
        attaches: Vec::new(),
        idle: None,
        load: None,
        idle_after: None,
        detach_s: None,
        devices_left: None,
        fds_gained: Vec::new(),
        fds_lost: Vec::new(),
        anon_after_detach: Vec::new(),
        detached: None,
        idle_fd_kinds: Vec::new(),
        second_attaches: Vec::new(),
        rounds_after: Vec::new(),
        daemon_exit: None,
        error: None,
    };
    if let Err(e) = run_steps(cfg, &mut rep) {
        say(cfg, &format!("stopped: {e}"));
        rep.error = Some(e);
    }
    rep.loadavg_end = loadavg();
    rep
}

fn start_rig(cfg: &ScaleConfig) -> Result<Rig, String> {
    if !cfg.refblk.is_file() {
        return Err(format!(
            "{}: no refblk binary there (build it with `cargo build --release`)",
            cfg.refblk.display()
        ));
    }
    fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let work = tempfile_dir(&cfg.dir)?;
    let machine = work.join("machine");
    let mut sim_cmd = Command::new(&cfg.refblk);
    sim_cmd.arg("sim").arg("--dir").arg(&machine);
    let sim = match ChildProc::spawn("refblk sim", sim_cmd, work.join("sim.log")) {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    // A placeholder daemon until the simulator is up (Rig's Drop needs one).
    let mut rig = Rig {
        sock: machine.join("refblk.sock"),
        machine: machine.clone(),
        work: work.clone(),
        sim,
        daemon: ChildProc {
            child: None,
            name: "refblk serve",
            log: work.join("serve.log"),
        },
        ts: None,
        guests: Vec::new(),
    };
    let (xs_sock, ev_sock) = (machine.join("xenstored.sock"), machine.join("evtchn.sock"));
    let mut alive = Ok(());
    wait_until("refblk sim sockets", Duration::from_secs(20), || {
        alive = rig.sim.check_alive();
        alive.is_err() || (xs_sock.exists() && ev_sock.exists())
    })?;
    alive?;
    let mut serve = Command::new(&cfg.refblk);
    serve.arg("serve").arg("--sim").arg(&machine);
    serve.args(&cfg.serve_args);
    if std::env::var_os("RUST_LOG").is_none() {
        serve.env("RUST_LOG", "info");
    }
    rig.daemon = ChildProc::spawn("refblk serve", serve, work.join("serve.log"))?;
    let sock = rig.sock.clone();
    let mut alive = Ok(());
    wait_until(
        "refblk serve control socket",
        Duration::from_secs(30),
        || {
            alive = rig.daemon.check_alive();
            alive.is_err() || control::request(&sock, "status").is_ok()
        },
    )?;
    alive?;
    let xs = XsClient::connect_unix(&xs_sock)
        .map_err(|e| format!("toolstack xenstore {}: {e}", xs_sock.display()))?;
    rig.ts = Some(Toolstack::with_control_socket(xs, &rig.sock));
    Ok(rig)
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, String> {
    for i in 0..100u32 {
        let p = parent.join(format!("refblk-scale.{}.{i}", std::process::id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Err(format!("{}: no free work directory name", parent.display()))
}

fn daemon_sample(rig: &mut Rig) -> Result<ProcSample, String> {
    rig.daemon.check_alive()?;
    ProcSample::read(rig.daemon.pid()).map_err(|e| format!("sampling the daemon: {e}"))
}

fn daemon_devices(rig: &Rig) -> Result<Vec<Value>, String> {
    let v = control::request(&rig.sock, "status").map_err(|e| format!("status: {e}"))?;
    Ok(v["devices"].as_array().cloned().unwrap_or_default())
}

/// Settle: let connection threads and lazily freed memory go away.
fn settle(cfg: &ScaleConfig) {
    std::thread::sleep(cfg.settle);
}

fn run_steps(cfg: &ScaleConfig, rep: &mut ScaleReport) -> Result<(), String> {
    if cfg.guests == 0 || cfg.guests > 4000 {
        return Err(format!("{} guests: choose 1..=4000", cfg.guests));
    }
    let blocks = (cfg.image_size / BLOCK as u64) as usize;
    if blocks < 2 * cfg.queue_depth.max(1) {
        return Err(format!(
            "images of {} bytes are too small for QD{}",
            cfg.image_size, cfg.queue_depth
        ));
    }
    let mut rig = start_rig(cfg)?;
    rep.daemon_pid = Some(rig.daemon.pid());
    let images = rig.work.join("images");
    fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
    settle(cfg);
    let base = daemon_sample(&mut rig)?;
    say(cfg, &format!("baseline: {}", base.line()));
    rep.baseline = Some(base);
    let base_fds = fd_targets(rig.daemon.pid());

    // ---- attach
    rep.attaches = attach_all(cfg, &mut rig, &images, "attached")?;

    // ---- idle
    settle(cfg);
    let idle = daemon_sample(&mut rig)?;
    say(cfg, &format!("idle: {}", idle.line()));
    rep.idle = Some(idle);
    rep.idle_fd_kinds = fd_kinds(&extra(&base_fds, &fd_targets(rig.daemon.pid())));
    let before: u64 = request_total(&daemon_devices(&rig)?);

    // ---- load
    let stop = Arc::new(AtomicBool::new(false));
    // Every guest starts when `go` is set (after all threads exist).
    let go = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> = (0..cfg.guests)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    type Joined = (Guest, GuestResult);
    let mut threads: Vec<JoinHandle<Joined>> = Vec::new();
    for (g, ctr) in std::mem::take(&mut rig.guests).into_iter().zip(&counters) {
        let (stop_t, go_t, ctr) = (stop.clone(), go.clone(), ctr.clone());
        let (qd, read_pct, verify) = (cfg.queue_depth, cfg.read_pct, cfg.final_verify);
        let spawned = std::thread::Builder::new()
            .name(format!("guest{}", g.domid))
            .spawn(move || {
                let mut g = g;
                let mut load = GuestLoad::new(g.domid, blocks);
                while !go_t.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut r = load.run(&mut g.fe, qd, read_pct, &ctr, &stop_t);
                if r.is_ok() && verify {
                    r = load.verify_all(&mut g.fe, qd);
                }
                load.result.error = r.err();
                let an = g.fe.anomalies();
                if !an.is_clean() {
                    load.result.anomalies = Some(format!("{an:?}"));
                }
                (g, load.result)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Let the ones started go and stop at once, then give up.
                stop.store(true, Ordering::Release);
                go.store(true, Ordering::Release);
                return Err(format!("starting guest thread: {e}"));
            }
        }
    }
    say(
        cfg,
        &format!(
            "load: {} guest threads, {:.1} s warm-up then {:.1} s measured",
            cfg.guests,
            cfg.warmup.as_secs_f64(),
            cfg.load.as_secs_f64()
        ),
    );
    go.store(true, Ordering::Release);
    std::thread::sleep(cfg.warmup);
    let snap = |c: &[Arc<AtomicU64>]| -> Vec<u64> {
        c.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    };
    let cpu = |rig: &Rig| {
        (
            process_cpu_ns(&rig.daemon.pid().to_string()).unwrap_or(0),
            process_cpu_ns("self").unwrap_or(0),
            process_cpu_ns(&rig.sim.pid().to_string()).unwrap_or(0),
            super::stats::machine_busy_ns(),
        )
    };
    let c0 = cpu(&rig);
    let t0 = Instant::now();
    let s0 = snap(&counters);
    let mut peak = daemon_sample(&mut rig).unwrap_or_default();
    let end = t0 + cfg.load;
    let mut sampling = Ok(());
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250).min(end - Instant::now().min(end)));
        match daemon_sample(&mut rig) {
            Ok(s) if s.rss_kib > peak.rss_kib => peak = s,
            Ok(_) => {}
            Err(e) => {
                sampling = Err(e);
                break;
            }
        }
    }
    let s1 = snap(&counters);
    let t1 = Instant::now();
    let c1 = cpu(&rig);
    stop.store(true, Ordering::Release);
    let mut results = Vec::new();
    for t in threads {
        match t.join() {
            Ok((g, r)) => {
                rig.guests.push(g);
                results.push(r);
            }
            Err(_) => return Err("a guest thread panicked".into()),
        }
    }
    sampling?;
    let window = (t1 - t0).as_secs_f64();
    for (r, (a, b)) in results.iter_mut().zip(s0.iter().zip(&s1)) {
        r.window_ios = b - a;
    }
    let iops: Vec<f64> = results
        .iter()
        .map(|r| r.window_ios as f64 / window)
        .collect();
    let mean = iops.iter().sum::<f64>() / iops.len() as f64;
    let min = iops.iter().copied().fold(f64::INFINITY, f64::min);
    let max = iops.iter().copied().fold(0.0, f64::max);
    let after: u64 = request_total(&daemon_devices(&rig)?);
    let load = LoadResult {
        window_s: window,
        iops,
        min_iops: min,
        mean_iops: mean,
        max_iops: max,
        aggregate_iops: mean * results.len() as f64,
        fairness: if mean > 0.0 { min / mean } else { 0.0 },
        daemon_cpu_ns: c1.0.saturating_sub(c0.0),
        guest_cpu_ns: c1.1.saturating_sub(c0.1),
        sim_cpu_ns: c1.2.saturating_sub(c0.2),
        machine_busy_ns: c1.3.saturating_sub(c0.3),
        daemon_peak: peak,
        daemon_requests: after.saturating_sub(before),
        guest_requests: results
            .iter()
            .map(|r| r.reads + r.writes + r.final_verified)
            .sum(),
        guests: results,
    };
    say(
        cfg,
        &format!(
            "load: {:.0} IOPS aggregate, per guest min {:.0} mean {:.0} max {:.0} (fairness {:.3})",
            load.aggregate_iops, load.min_iops, load.mean_iops, load.max_iops, load.fairness
        ),
    );
    rep.load = Some(load);

    // ---- idle after
    settle(cfg);
    let ia = daemon_sample(&mut rig)?;
    say(cfg, &format!("idle after the load: {}", ia.line()));
    rep.idle_after = Some(ia);

    // ---- detach
    let t0 = Instant::now();
    detach_all(&mut rig)?;
    rep.detach_s = Some(t0.elapsed().as_secs_f64());
    // Descriptors of closing connections go away asynchronously: wait for
    // the baseline (or 10 s), then let memory settle.
    let want = base.fds;
    let mut left = Vec::new();
    let _ = wait_until("daemon fds back", Duration::from_secs(10), || {
        left = daemon_devices(&rig).unwrap_or_default();
        ProcSample::read(rig.daemon.pid()).is_ok_and(|s| s.fds <= want) && left.is_empty()
    });
    rep.devices_left = Some(left.len());
    settle(cfg);
    let d = daemon_sample(&mut rig)?;
    let now_fds = fd_targets(rig.daemon.pid());
    rep.fds_gained = extra(&base_fds, &now_fds);
    rep.fds_lost = extra(&now_fds, &base_fds);
    rep.anon_after_detach = anon_mappings(rig.daemon.pid(), 12);
    say(cfg, &format!("detached: {}", d.line()));
    rep.detached = Some(d);

    // ---- a second round without load: what the first one left behind
    // must be reused, not grown (a leak grows every round; allocator caches
    // do not).
    for round in 0..cfg.extra_rounds {
        let a = attach_all(
            cfg,
            &mut rig,
            &images,
            &format!("round {}: attached", round + 2),
        )?;
        if round == 0 {
            rep.second_attaches = a;
        }
        detach_all(&mut rig)?;
        let _ = wait_until("daemon fds back", Duration::from_secs(10), || {
            ProcSample::read(rig.daemon.pid()).is_ok_and(|s| s.fds <= want)
        });
        settle(cfg);
        let d2 = daemon_sample(&mut rig)?;
        say(
            cfg,
            &format!("round {}: detached: {}", round + 2, d2.line()),
        );
        rep.rounds_after.push(d2);
    }
    rep.daemon_exit = Some(rig.daemon.terminate(Duration::from_secs(30)));
    Ok(())
}

/// Attach `cfg.guests` devices one after the other (domids 1..), each timed
/// from the vbd's creation to both ends Connected; the guests go to
/// `rig.guests`.
fn attach_all(
    cfg: &ScaleConfig,
    rig: &mut Rig,
    images: &Path,
    what: &str,
) -> Result<Vec<AttachTiming>, String> {
    let mut out = Vec::new();
    let xs_sock = rig.machine.join("xenstored.sock");
    let fopts = FrontendOptions {
        queues: cfg.queues,
        ring_page_order: cfg.ring_page_order,
        timeout: Duration::from_secs(30),
        ..FrontendOptions::default()
    };
    for i in 0..cfg.guests {
        let domid = (i + 1) as DomId;
        let image = images.join(format!("dom{domid}.img"));
        if !image.exists() {
            let f = fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
            f.set_len(cfg.image_size)
                .map_err(|e| format!("{}: {e}", image.display()))?;
        }
        let ts = rig.ts.as_ref().expect("toolstack");
        ts.create_domain(domid)
            .map_err(|e| format!("dom{domid}: {e}"))?;
        let guest = Arc::new(
            SimGuest::create(&rig.machine, domid, cfg.guest_pages)
                .map_err(|e| format!("dom{domid}: {e}"))?,
        );
        // libxl's device_disk_add, step by step (Toolstack::add_vbd polls
        // every 5 ms; 1 ms here so the InitWait time is not rounded up).
        let spec = VbdSpec::new(domid, DEVID, &image);
        let fail = |what: &str, e: &dyn std::fmt::Display, rig: &Rig| {
            format!(
                "attach #{} (dom{domid}): {what}: {e}; end of the daemon log:\n{}",
                i + 1,
                rig.daemon.log_tail()
            )
        };
        let t0 = Instant::now();
        let vbd = ts
            .create_vbd_nodes(&spec)
            .map_err(|e| fail("create vbd", &e, rig))?;
        let deadline = t0 + Duration::from_secs(30);
        loop {
            match ts.backend_state(&vbd) {
                Ok(XenbusState::InitWait) => break,
                Ok(s) if Instant::now() > deadline => {
                    return Err(fail(
                        "backend InitWait",
                        &format!("state {s:?} after 30 s"),
                        rig,
                    ))
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(fail("backend state", &e, rig)),
            }
        }
        let ti = Instant::now();
        ts.hotplug_add(&vbd, &spec)
            .map_err(|e| fail("hotplug add", &e, rig))?;
        let t1 = Instant::now();
        let fe = Frontend::connect(&xs_sock, guest.clone(), DEVID, fopts.clone())
            .map_err(|e| fail("frontend connect", &e, rig))?;
        let t2 = Instant::now();
        let daemon = daemon_sample(rig)?;
        rig.guests.push(Guest {
            domid,
            vbd,
            fe,
            guest,
        });
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        out.push(AttachTiming {
            domid,
            total_ms: ms(t2 - t0),
            initwait_ms: ms(ti - t0),
            hotplug_ms: ms(t1 - ti),
            connect_ms: ms(t2 - t1),
            daemon,
        });
        if cfg.progress && ((i + 1) % 16 == 0 || i + 1 == cfg.guests) {
            say(
                cfg,
                &format!(
                    "{what} {} of {} (last {:.1} ms), daemon {}",
                    i + 1,
                    cfg.guests,
                    ms(t2 - t0),
                    daemon.line()
                ),
            );
        }
    }
    Ok(out)
}

/// Detach every device of `rig.guests`.
fn detach_all(rig: &mut Rig) -> Result<(), String> {
    let ts = rig.ts.as_ref().expect("toolstack");
    // A VM shutdown as libxl sees it: the guest closes its disk, the domain
    // dies, then the toolstack removes the vbd (online=0, wait for Closed,
    // remove the directories) and runs the hotplug script's `remove` (the
    // control socket `detach`; the daemon may have forgotten the device when
    // its directory went away, which the script accepts too).
    for mut g in std::mem::take(&mut rig.guests) {
        g.fe.disconnect()
            .map_err(|e| format!("dom{}: guest close: {e}", g.domid))?;
        drop(g.fe);
        match Arc::try_unwrap(g.guest) {
            Ok(sg) => sg
                .destroy()
                .map_err(|e| format!("dom{}: destroy: {e}", g.domid))?,
            Err(_) => return Err(format!("dom{}: guest still referenced", g.domid)),
        }
        let closed = ts
            .remove_vbd(&g.vbd)
            .map_err(|e| format!("dom{}: remove vbd: {e}", g.domid))?;
        if !closed {
            return Err(format!(
                "dom{}: the backend did not reach Closed on removal",
                g.domid
            ));
        }
        let v = control::request(&rig.sock, &format!("detach {}", g.vbd.backend_path))
            .map_err(|e| format!("dom{}: detach: {e}", g.domid))?;
        if v["ok"] != Value::Bool(true) {
            let err = v["error"].as_str().unwrap_or("");
            if !err.contains("no such device") {
                return Err(format!("dom{}: detach: {err}", g.domid));
            }
        }
        ts.destroy_domain(g.domid)
            .map_err(|e| format!("dom{}: {e}", g.domid))?;
    }
    Ok(())
}

fn request_total(devs: &[Value]) -> u64 {
    devs.iter()
        .map(|d| d["reads"].as_u64().unwrap_or(0) + d["writes"].as_u64().unwrap_or(0))
        .sum()
}
