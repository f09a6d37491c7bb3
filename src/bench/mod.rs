//! `refblk bench`: the same workloads on the same image through three paths — the
//! raw file (io_uring, O_DIRECT: the ceiling), a loop device (direct I/O on and off:
//! today's path) and refblk (a simulated guest's blkfront, the backend grant-copies
//! and does the I/O) — plus the control-plane costs of a VM start (FICLONE snapshot)
//! and stop (commit). See `docs/benchmarks.md`.
//!
//! Every figure is the median of `reps` repetitions with the range shown; paths are
//! interleaved within a repetition (rotated each time) so machine drift hits all.
//! Where fio is installed, each repetition also runs fio with the same profile on the
//! same image, interleaved the same way, which calibrates the `file` path (the
//! ceiling every ratio divides by) against the instrument users know ([`fio`]).

pub mod fio;
pub mod loopdev;
pub mod meta;
pub mod profile;
pub mod refblk;
pub mod report;
pub mod scale;
pub mod stats;
pub mod target;
pub mod workload;

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loopdev::LoopDev;
use profile::{Kind, PathKind, Prep, Profile};
use refblk_sim::scratchfs::{FsKind, ScratchFs};
use target::{fill_pattern, BlockTarget, EngineTarget};
use workload::Stop;

/// Where to run: a fresh scratch file system, or a directory the user names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Fs(FsKind),
    Dir(PathBuf),
}

impl Place {
    pub fn label(&self) -> String {
        match self {
            Place::Fs(k) => k.to_string(),
            Place::Dir(d) => format!("dir:{}", d.display()),
        }
    }
}

/// What the scratch file systems sit on: the "disk" under btrfs, XFS or ext4.
/// Either way each is made with mkfs in a file attached to a loop device
/// (switched to direct I/O), so the file systems and their code paths are
/// the same; only the storage under them differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// A sparse file in `$REFBLK_SCRATCH_DIR` or the temp directory: the
    /// machine's disk (on this VM a virtual disk, with its noise).
    #[default]
    Disk,
    /// A file in [`RAM_DIR`] (tmpfs): memory, no disk, so what remains is each
    /// path's software cost.
    Ram,
}

/// Where `--backing ram` puts the scratch file systems' images.
pub const RAM_DIR: &str = "/dev/shm";

impl Backing {
    pub fn name(self) -> &'static str {
        match self {
            Backing::Disk => "disk",
            Backing::Ram => "ram",
        }
    }

    /// The directory the scratch file systems' images go to.
    pub fn root(self) -> PathBuf {
        match self {
            Backing::Disk => std::env::var_os("REFBLK_SCRATCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            Backing::Ram => PathBuf::from(RAM_DIR),
        }
    }

    /// One line for the reports: the regime and what it means.
    pub fn detail(self) -> String {
        let root = self.root();
        match self {
            Backing::Disk => format!(
                "scratch file systems on a loop device (direct I/O) over a sparse file in {} — the machine's disk",
                root.display()
            ),
            Backing::Ram => format!(
                "scratch file systems on a loop device (direct I/O) over a file in {} (tmpfs) — no disk: what remains is each path's software cost",
                root.display()
            ),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub profiles: Vec<Profile>,
    pub places: Vec<Place>,
    /// What the scratch file systems of [`Place::Fs`] sit on.
    pub backing: Backing,
    pub paths: Vec<PathKind>,
    /// Time per timed run.
    pub runtime: Duration,
    /// Image size (the I/O region) in bytes.
    pub size: u64,
    pub reps: usize,
    /// Image sizes for `snapshot` and `commit`.
    pub snapshot_sizes: Vec<u64>,
    /// Random 4 KiB writes that fragment the image for `snapshot`/`commit`.
    pub frag_writes: u64,
    /// Show a progress line on stderr.
    pub progress: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            profiles: profile::ALL.to_vec(),
            places: vec![Place::Fs(FsKind::Btrfs), Place::Fs(FsKind::Xfs)],
            backing: Backing::Disk,
            paths: PathKind::ALL.to_vec(),
            runtime: Duration::from_secs(1),
            size: 1 << 30,
            reps: 3,
            snapshot_sizes: vec![1 << 30],
            frag_writes: 32768,
            progress: true,
        }
    }
}

/// One repetition of one (file system, profile, path).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub iops: f64,
    pub mbps: f64,
    pub lat_mean_us: f64,
    /// Median latency (half the operations took less).
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    /// Serving-side CPU per operation (see [`BlockTarget::serving_threads`]).
    pub cpu_us_per_io: f64,
    /// Busy CPU of the whole machine per operation (includes kernel workers such as
    /// the loop device's, and other processes: context only).
    pub host_cpu_us_per_io: f64,
    /// CPU of the kernel's worker threads per operation (loop devices' I/O,
    /// deferred completions; machine-wide, so other tenants' too: context).
    pub kworker_us_per_io: f64,
    /// Bytes of the image in dom0's page cache after the run.
    pub cache_bytes: u64,
    pub ops: u64,
    pub secs: f64,
}

/// All repetitions of one (file system, profile, path).
#[derive(Debug, Clone)]
pub struct IoResult {
    pub place: String,
    pub profile: &'static str,
    pub path: PathKind,
    /// How the path reached the disk, and the cache regime at the start of a run.
    pub io_mode: String,
    pub cache_regime: &'static str,
    pub samples: Vec<Sample>,
    /// Why this path produced no (or not all) samples.
    pub error: Option<String>,
}

/// Timings of one control-plane operation (milliseconds per repetition).
#[derive(Debug, Clone)]
pub struct MetaResult {
    pub place: String,
    pub profile: &'static str,
    /// e.g. "ficlone dense", "ficlone fragmented", "pool start", "pool commit".
    pub what: String,
    pub image_bytes: u64,
    pub extents: u64,
    pub ms: Vec<f64>,
    pub note: Option<String>,
}

/// fio beside our `file` path for one (file system, profile): the calibration of
/// the ceiling every ratio divides by.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub place: String,
    pub profile: &'static str,
    /// The fio command line of the last run (the image is the one that run used).
    pub command: String,
    /// fio's runs, one per repetition (CPU and page-cache figures not measured).
    pub samples: Vec<Sample>,
    /// Why fio did not run (or stopped); the `file` path's samples stand.
    pub error: Option<String>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub started_utc: String,
    pub host: String,
    /// The storage regime: `disk` or `ram` ([`Backing`]), or `dir` (an
    /// existing directory, `--dir`); empty when not recorded (a JSON file of
    /// an older version).
    pub backing: String,
    /// What that regime is, in a line.
    pub backing_detail: String,
    pub runtime_s: f64,
    pub size: u64,
    pub reps: usize,
    pub io: Vec<IoResult>,
    pub meta: Vec<MetaResult>,
    /// fio's version when it calibrated the `file` path, None when it was missing.
    pub fio: Option<String>,
    pub calibration: Vec<Calibration>,
    /// Things the reader should know (paths skipped and why, ...).
    pub notes: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// What a run stopped by [`request_stop`] returns as its error.
pub const INTERRUPTED: &str = "interrupted";

/// Ask a running bench to stop: the timed run in progress ends early, and the
/// next step returns the error [`INTERRUPTED`], so the run unwinds as on any
/// error and its scratch file systems, loop devices and images are removed
/// (`refblk bench` calls this on SIGINT and SIGTERM).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn check_stop() -> Result<(), String> {
    if stop_requested() {
        Err(INTERRUPTED.into())
    } else {
        Ok(())
    }
}

/// The progress line on stderr: elapsed time, the step (a timed run, a fio
/// run, a snapshot or commit measurement) out of how many, and an estimate of
/// the time left (the mean time of the steps done so far times the steps
/// left).
pub struct Progress {
    on: bool,
    tty: bool,
    t0: Instant,
    total: Cell<u64>,
    started: Cell<u64>,
}

fn fmt_mmss(secs: u64) -> String {
    format!("{}:{:02}", secs / 60, secs % 60)
}

impl Progress {
    pub fn new(on: bool) -> Progress {
        Progress {
            on,
            tty: io::stderr().is_terminal(),
            t0: Instant::now(),
            total: Cell::new(0),
            started: Cell::new(0),
        }
    }
    /// Expect `n` more steps.
    pub fn plan(&self, n: u64) {
        self.total.set(self.total.get() + n);
    }
    /// `n` planned steps will not run (a path that cannot run here).
    pub fn forget(&self, n: u64) {
        self.total
            .set(self.total.get().saturating_sub(n).max(self.started.get()));
    }
    /// A step starts: show it with the step count and the time left; or,
    /// when the run was asked to stop ([`request_stop`]), [`INTERRUPTED`].
    pub fn step(&self, msg: &str) -> Result<(), String> {
        check_stop()?;
        self.started.set(self.started.get() + 1);
        self.show(msg);
        Ok(())
    }
    pub fn show(&self, msg: &str) {
        if !self.on {
            return;
        }
        let el = self.t0.elapsed();
        let (started, total) = (self.started.get(), self.total.get().max(self.started.get()));
        let count = if started > 0 {
            // Done: the steps before the one running now.
            let done = started.saturating_sub(1);
            let eta = if done > 0 {
                let left = (total - done) as f64 * el.as_secs_f64() / done as f64;
                format!(", about {} left", fmt_mmss(left.round() as u64))
            } else {
                String::new()
            };
            format!(" step {started}/{total}{eta}")
        } else {
            String::new()
        };
        let line = format!("[{:>3}]{count}: {msg}", fmt_mmss(el.as_secs()));
        let mut e = io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    }
    pub fn done(&self) {
        if self.on && self.tty {
            let _ = write!(io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// The steps a run of `cfg` takes (a path that turns out not to run is
/// taken off with [`Progress::forget`]).
fn planned_steps(cfg: &BenchConfig, calibrate: bool) -> u64 {
    let io = cfg
        .profiles
        .iter()
        .filter(|p| matches!(p.kind, Kind::Io(..)))
        .count() as u64;
    let slots = cfg.paths.len() as u64 + u64::from(calibrate);
    let snap = cfg.profiles.iter().any(|q| q.kind == Kind::Snapshot);
    let commit = cfg.profiles.iter().any(|q| q.kind == Kind::Commit);
    let meta = if snap || commit {
        meta_steps(cfg, snap, commit) * cfg.snapshot_sizes.len() as u64
    } else {
        0
    };
    cfg.places.len() as u64 * (io * cfg.reps as u64 * slots + meta)
}

/// The steps of one image size's snapshot/commit measurement.
fn meta_steps(cfg: &BenchConfig, snap: bool, commit: bool) -> u64 {
    1 + if snap { 2 } else { 0 } + if commit { cfg.reps as u64 } else { 0 }
}

/// Run the benchmark. Errors that make a whole place unusable (no root for a
/// scratch file system, mkfs failing) are returned; a path that cannot run is
/// recorded in the report and the others go on.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, String> {
    let (backing, backing_detail) = regime(cfg);
    if cfg.backing == Backing::Ram && backing == Backing::Ram.name() {
        ram_check(cfg)?;
    }
    let mut rep = BenchReport {
        started_utc: utc_now(),
        host: host_description(),
        backing,
        backing_detail,
        runtime_s: cfg.runtime.as_secs_f64(),
        size: cfg.size,
        reps: cfg.reps,
        ..Default::default()
    };
    let calibrate = cfg.paths.contains(&PathKind::File)
        && cfg.profiles.iter().any(|p| matches!(p.kind, Kind::Io(..)));
    if calibrate {
        match fio::available() {
            Ok(v) => rep.fio = Some(v),
            Err(why) => rep.notes.push(format!(
                "{why}: the file path is not calibrated against fio"
            )),
        }
    }
    if cfg.profiles.iter().any(|p| matches!(p.kind, Kind::Io(..)))
        && stats::kworker_snapshot().is_empty()
    {
        // In a PID namespace (a container) the kernel's threads are not in
        // /proc: a 0 in the column would read as "no kernel work".
        rep.notes.push(
            "kworker µs/IO: no kernel worker thread is visible in /proc (a PID namespace?): \
             the column shows 0, not measured"
                .into(),
        );
    }
    let progress = Progress::new(cfg.progress);
    progress.plan(planned_steps(cfg, rep.fio.is_some()));
    for place in &cfg.places {
        check_stop()?;
        run_place(cfg, place, &mut rep, &progress)?;
    }
    progress.done();
    Ok(rep)
}

/// The report's regime: (`disk` | `ram` | `dir`, what it is).
fn regime(cfg: &BenchConfig) -> (String, String) {
    let dirs: Vec<&PathBuf> = cfg
        .places
        .iter()
        .filter_map(|p| match p {
            Place::Dir(d) => Some(d),
            Place::Fs(_) => None,
        })
        .collect();
    if !dirs.is_empty() && dirs.len() == cfg.places.len() {
        let what: Vec<String> = dirs
            .iter()
            .map(|d| format!("{} ({})", d.display(), refblk_core::pool::fs_type_name(d)))
            .collect();
        return (
            "dir".into(),
            format!(
                "an existing directory, no scratch file system: {}",
                what.join(", ")
            ),
        );
    }
    (cfg.backing.name().into(), cfg.backing.detail())
}

/// The size of the scratch file system of `kind` for `cfg`: four images (the
/// dense one, a run's clone or sparse file, room to spare), twice the
/// largest snapshot/commit image when those run, and 1 GiB for the file
/// system itself. The same in both regimes, so the file systems are the same.
pub fn scratch_size(cfg: &BenchConfig, kind: FsKind) -> u64 {
    let has_meta = cfg
        .profiles
        .iter()
        .any(|p| matches!(p.kind, Kind::Snapshot | Kind::Commit));
    let meta: u64 = if has_meta {
        cfg.snapshot_sizes
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            .saturating_mul(2)
    } else {
        0
    };
    cfg.size
        .saturating_mul(4)
        .saturating_add(meta)
        .saturating_add(1 << 30)
        .max(kind.min_size())
}

/// Bytes of memory the machine can still give (`MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `--backing ram`: refuse, before anything is made, when the scratch file
/// systems may not fit in memory. The image file in /dev/shm is sparse, but
/// the file systems write new blocks as they go (btrfs never overwrites in
/// place, freed blocks are not given back to tmpfs), so one may grow to its
/// full size; they run one after the other, so the largest is what is needed.
/// It must fit in /dev/shm's free space and in the memory the machine has
/// available (tmpfs pages are memory; without swap they cannot go out).
pub fn ram_check(cfg: &BenchConfig) -> Result<(), String> {
    let Some((kind, needed)) = cfg
        .places
        .iter()
        .filter_map(|p| match p {
            Place::Fs(k) => Some((*k, scratch_size(cfg, *k))),
            Place::Dir(_) => None,
        })
        .max_by_key(|(_, n)| *n)
    else {
        return Ok(());
    };
    let dir = Path::new(RAM_DIR);
    let st = nix::sys::statfs::statfs(dir).map_err(|e| format!("--backing ram: {RAM_DIR}: {e}"))?;
    if st.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(format!(
            "--backing ram: {RAM_DIR} is not a tmpfs ({}); use --backing disk",
            refblk_core::pool::fs_type_name(dir)
        ));
    }
    let vfs =
        nix::sys::statvfs::statvfs(dir).map_err(|e| format!("--backing ram: {RAM_DIR}: {e}"))?;
    let shm_free = (vfs.blocks_available() as u64).saturating_mul(vfs.fragment_size() as u64);
    let mem = mem_available().unwrap_or(u64::MAX);
    if needed > shm_free.min(mem) {
        let gib = |n: u64| format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64);
        let mem = if mem == u64::MAX {
            "unknown".to_string()
        } else {
            gib(mem)
        };
        return Err(format!(
            "--backing ram: the scratch {kind} file system needs up to {} of memory \
             (4 × the {} image, twice the largest snapshot/commit image when those run, \
             1 GiB for the file system), but {RAM_DIR} has {} free and the machine {mem} \
             available; lower --size or --snapshot-sizes, or use --backing disk",
            gib(needed),
            fmt_bytes(cfg.size),
            gib(shm_free),
        ));
    }
    Ok(())
}

/// A directory to work in, with the scratch file system that holds it (if any).
struct Workspace {
    dir: PathBuf,
    _fs: Option<ScratchFs>,
    reflink: bool,
    /// What the report should say about this workspace.
    notes: Vec<String>,
}

fn workspace(cfg: &BenchConfig, place: &Place) -> Result<Workspace, String> {
    match place {
        Place::Fs(kind) => {
            if !nix::unistd::geteuid().is_root() {
                return Err(format!(
                    "making a scratch {kind} file system needs root (mkfs, losetup, mount); \
                     run as root or pass --dir DIR to benchmark in an existing directory"
                ));
            }
            let fs = ScratchFs::new_in(*kind, scratch_size(cfg, *kind), &cfg.backing.root())
                .map_err(|e| {
                    format!(
                        "cannot make a scratch {kind} file system ({} backing): {e}",
                        cfg.backing.name()
                    )
                })?;
            // The scratch file system sits on a loop device over a file on the root
            // file system (disk) or in /dev/shm (ram). Switch that loop device to
            // direct I/O so the root's page cache does not serve our "cold" reads
            // (storage-measurements.md does the same), and so both regimes take
            // the same path; a failure is reported, not fatal.
            let dev = fs.loop_device().unwrap_or("no loop device").to_string();
            let under = fs.image().parent().unwrap_or(Path::new("/"));
            let mut notes = vec![format!(
                "{kind}: scratch file system on {dev} over {} ({}, {} backing)",
                fs.image().display(),
                refblk_core::pool::fs_type_name(under),
                cfg.backing.name()
            )];
            if let Some(dev) = fs.loop_device() {
                if let Err(e) = loopdev::set_direct_io(dev) {
                    log::warn!("{dev} (scratch {kind}): cannot switch to direct I/O: {e}");
                    notes.push(format!(
                        "{kind}: the scratch file system's loop device {dev} runs buffered (direct I/O refused: {e})"
                    ));
                }
            }
            let dir = fs.path().join("refblk-bench");
            fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(Workspace {
                dir,
                reflink: kind.supports_reflink(),
                _fs: Some(fs),
                notes,
            })
        }
        Place::Dir(d) => {
            // --dir names an existing directory: a typo must not create one.
            if !d.is_dir() {
                return Err(format!("--dir {}: no such directory", d.display()));
            }
            let dir = d.join(format!("refblk-bench.{}", std::process::id()));
            fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let reflink = refblk_core::pool::reflink_supported(&dir).unwrap_or(false);
            Ok(Workspace {
                dir,
                _fs: None,
                reflink,
                notes: Vec::new(),
            })
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self._fs.is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn run_place(
    cfg: &BenchConfig,
    place: &Place,
    rep: &mut BenchReport,
    progress: &Progress,
) -> Result<(), String> {
    let label = place.label();
    progress.show(&format!("{label}: setting up"));
    let ws = workspace(cfg, place)?;
    rep.notes.extend(ws.notes.iter().cloned());
    let io_profiles: Vec<&Profile> = cfg
        .profiles
        .iter()
        .filter(|p| matches!(p.kind, Kind::Io(..)))
        .collect();
    if !io_profiles.is_empty() {
        let dense = ws.dir.join("dense.img");
        progress.show(&format!(
            "{label}: writing the {} image",
            fmt_bytes(cfg.size)
        ));
        write_dense(&dense, cfg.size).map_err(|e| format!("{}: {e}", dense.display()))?;
        let mut paths = cfg.paths.clone();
        if paths.contains(&PathKind::Refblk) {
            if let Err(why) = refblk::available() {
                rep.notes
                    .push(format!("{label}: refblk path not measured: {why}"));
                paths.retain(|p| *p != PathKind::Refblk);
                progress.forget((io_profiles.len() * cfg.reps) as u64);
            }
        }
        let needs_loop = paths
            .iter()
            .any(|p| matches!(p, PathKind::LoopDio | PathKind::LoopBuf));
        if needs_loop && !nix::unistd::geteuid().is_root() {
            rep.notes.push(format!(
                "{label}: loop paths need root (losetup); not measured"
            ));
            let before = paths.len();
            paths.retain(|p| !matches!(p, PathKind::LoopDio | PathKind::LoopBuf));
            progress.forget(((before - paths.len()) * io_profiles.len() * cfg.reps) as u64);
        }
        for p in io_profiles {
            let Kind::Io(spec, prep) = p.kind else {
                continue;
            };
            let mut results: Vec<IoResult> = paths
                .iter()
                .map(|&path| IoResult {
                    place: label.clone(),
                    profile: p.name,
                    path,
                    io_mode: String::new(),
                    cache_regime: cache_regime(path),
                    samples: Vec::new(),
                    error: None,
                })
                .collect();
            // fio with the same profile on the same image, one run per repetition
            // in the rotation with the paths (the last slot of the first one, so
            // the file path has shown whether it gets O_DIRECT).
            let calibrate = rep.fio.is_some() && paths.contains(&PathKind::File);
            let mut cal = Calibration {
                place: label.clone(),
                profile: p.name,
                command: String::new(),
                samples: Vec::new(),
                error: fio::args(&dense, &spec, cfg.size, Stop::After(cfg.runtime), true)
                    .err()
                    .map(|why| format!("not calibrated: {why}")),
            };
            let slots = paths.len() + usize::from(calibrate);
            if prep == Prep::Clone && !ws.reflink {
                rep.notes.push(format!(
                    "{label}: {} starts from a full copy (no FICLONE on this file system)",
                    p.name
                ));
            }
            for r in 0..cfg.reps {
                for i in 0..slots {
                    let k = (i + r) % slots;
                    if k == paths.len() {
                        if cal.error.is_some() {
                            progress.forget(1);
                            continue;
                        }
                        let file = results.iter().find(|x| x.path == PathKind::File);
                        let direct = match file {
                            Some(f) if f.error.is_none() && !f.io_mode.is_empty() => {
                                f.io_mode == "O_DIRECT"
                            }
                            _ => {
                                cal.error =
                                    Some("not calibrated: the file path did not run".into());
                                progress.forget(1);
                                continue;
                            }
                        };
                        progress.step(&format!(
                            "{label}: {} rep {}/{} fio",
                            p.name,
                            r + 1,
                            cfg.reps
                        ))?;
                        match fio_run(cfg, &ws, &dense, &spec, prep, direct) {
                            Ok((s, command)) => {
                                cal.samples.push(s);
                                cal.command = command;
                            }
                            Err(e) => {
                                log::warn!("{label} {} fio: {e}", p.name);
                                cal.error = Some(e);
                            }
                        }
                        continue;
                    }
                    let res = &mut results[k];
                    if res.error.is_some() {
                        progress.forget(1);
                        continue;
                    }
                    progress.step(&format!(
                        "{label}: {} rep {}/{} {}",
                        p.name,
                        r + 1,
                        cfg.reps,
                        res.path
                    ))?;
                    match one_run(cfg, &ws, &dense, res.path, &spec, prep, r as u64) {
                        Ok((s, mode)) => {
                            res.samples.push(s);
                            res.io_mode = mode;
                        }
                        Err(e) => {
                            log::warn!("{label} {} {}: {e}", p.name, res.path);
                            res.error = Some(e);
                        }
                    }
                }
            }
            rep.io.extend(results);
            if calibrate {
                rep.calibration.push(cal);
            }
        }
        let _ = fs::remove_file(&dense);
    }
    for p in cfg
        .profiles
        .iter()
        .filter(|p| matches!(p.kind, Kind::Snapshot | Kind::Commit))
    {
        // Both are measured in one pass over the images; run it once.
        if rep
            .meta
            .iter()
            .any(|m| m.place == label && (m.profile == "snapshot" || m.profile == "commit"))
        {
            break;
        }
        let want_snap = cfg.profiles.iter().any(|q| q.kind == Kind::Snapshot);
        let want_commit = cfg.profiles.iter().any(|q| q.kind == Kind::Commit);
        let sizes: Vec<u64> = if ws.reflink {
            cfg.snapshot_sizes.clone()
        } else {
            rep.notes.push(format!(
                "{label}: no FICLONE here, snapshot/commit copy whole images; measured at the smallest size only"
            ));
            let n = cfg.snapshot_sizes.len().saturating_sub(1) as u64;
            progress.forget(n * meta_steps(cfg, want_snap, want_commit));
            cfg.snapshot_sizes
                .iter()
                .min()
                .copied()
                .into_iter()
                .collect()
        };
        let _ = p;
        let mut m = meta::MetaBench {
            dir: &ws.dir,
            label: &label,
            reps: cfg.reps,
            frag_writes: cfg.frag_writes,
            progress,
        };
        for size in sizes {
            let out = m
                .run(size, want_snap, want_commit)
                .map_err(|e| format!("{label}: snapshot/commit of {}: {e}", fmt_bytes(size)))?;
            rep.meta.extend(out);
        }
    }
    Ok(())
}

fn cache_regime(path: PathKind) -> &'static str {
    match path {
        PathKind::File | PathKind::LoopDio | PathKind::Refblk => "cold: O_DIRECT",
        PathKind::LoopBuf => "cold start: image dropped from the page cache, then buffered",
    }
}

/// An open target and what must outlive it. Fields drop in order: target first.
struct Opened {
    target: Box<dyn BlockTarget>,
    _loop: Option<LoopDev>,
}

fn open_path(
    ws: &Workspace,
    path: PathKind,
    image: &Path,
    spec: &workload::IoSpec,
) -> Result<(Opened, String), String> {
    let depth = spec.qd as usize;
    let max_len = spec.bs as usize;
    let e = |what: &str, err: io::Error| format!("{what} {}: {err}", image.display());
    match path {
        PathKind::File => {
            let t = EngineTarget::open(image, depth, max_len).map_err(|x| e("open", x))?;
            let mode = t.io_mode();
            Ok((
                Opened {
                    target: Box::new(t),
                    _loop: None,
                },
                mode,
            ))
        }
        PathKind::LoopDio | PathKind::LoopBuf => {
            let want = path == PathKind::LoopDio;
            let dev = LoopDev::attach(image, want).map_err(|x| e("attach a loop device to", x))?;
            let t = EngineTarget::open(dev.path(), depth, max_len)
                .map_err(|x| e(&format!("open {} over", dev.path().display()), x))?;
            let mode = format!(
                "{} on a loop device, loop dio={}",
                t.io_mode(),
                u8::from(dev.dio)
            );
            Ok((
                Opened {
                    target: Box::new(t),
                    _loop: Some(dev),
                },
                mode,
            ))
        }
        PathKind::Refblk => {
            let t = refblk::connect_with(image, &ws.dir, depth, max_len)
                .map(|t| Box::new(t) as Box<dyn BlockTarget>)
                .map_err(|x| e("serve", x))?;
            let mode = t.io_mode();
            Ok((
                Opened {
                    target: t,
                    _loop: None,
                },
                mode,
            ))
        }
    }
}

fn one_run(
    cfg: &BenchConfig,
    ws: &Workspace,
    dense: &Path,
    path: PathKind,
    spec: &workload::IoSpec,
    prep: Prep,
    rep: u64,
) -> Result<(Sample, String), String> {
    let image = prepare(cfg, ws, dense, prep)?;
    let image = image.as_path();
    let (mut opened, mode) = open_path(ws, path, image, spec)?;
    let h0 = stats::machine_busy_ns();
    let k0 = stats::kworker_snapshot();
    let r = workload::run(
        opened.target.as_mut(),
        spec,
        cfg.size,
        cfg.runtime,
        0x1234_5678 + rep,
    )
    .map_err(|e| format!("{path} on {}: {e}", image.display()))?;
    let h1 = stats::machine_busy_ns();
    let kworker_ns = stats::cpu_since(&k0, &stats::kworker_snapshot());
    drop(opened);
    let cache_bytes = fincore(image).unwrap_or(0);
    if image != dense {
        let _ = fs::remove_file(image);
    }
    let host = if r.ops > 0 {
        h1.saturating_sub(h0) as f64 / 1000.0 / r.ops as f64
    } else {
        0.0
    };
    Ok((
        Sample {
            iops: r.iops(),
            mbps: r.mbps(),
            lat_mean_us: r.lat_mean_us,
            lat_p50_us: r.lat_p50_us,
            lat_p99_us: r.lat_p99_us,
            cpu_us_per_io: r.cpu_us_per_io(),
            host_cpu_us_per_io: host,
            kworker_us_per_io: if r.ops > 0 {
                kworker_ns as f64 / 1000.0 / r.ops as f64
            } else {
                0.0
            },
            cache_bytes,
            ops: r.ops,
            secs: r.secs,
        },
        mode,
    ))
}

/// The image a run of a `prep` profile starts from (the dense image itself, or a
/// new sparse file or clone of it, which the caller removes), out of the page cache.
fn prepare(cfg: &BenchConfig, ws: &Workspace, dense: &Path, prep: Prep) -> Result<PathBuf, String> {
    let tmp = ws.dir.join("run.img");
    let image = match prep {
        Prep::Dense => dense.to_path_buf(),
        Prep::Sparse => {
            let _ = fs::remove_file(&tmp);
            let f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            f.set_len(cfg.size)
                .map_err(|e| format!("{}: truncate: {e}", tmp.display()))?;
            tmp
        }
        Prep::Clone => {
            clone_or_copy(dense, &tmp).map_err(|e| format!("clone {}: {e}", dense.display()))?;
            tmp
        }
    };
    drop_cache(&image).map_err(|e| format!("{}: dropping the page cache: {e}", image.display()))?;
    Ok(image)
}

/// One timed fio run of `spec` on the image `prep` makes: its sample and command line.
fn fio_run(
    cfg: &BenchConfig,
    ws: &Workspace,
    dense: &Path,
    spec: &workload::IoSpec,
    prep: Prep,
    direct: bool,
) -> Result<(Sample, String), String> {
    let image = prepare(cfg, ws, dense, prep)?;
    let res = fio::args(&image, spec, cfg.size, Stop::After(cfg.runtime), direct).and_then(|a| {
        let s = fio::run_timed(&a, &image, spec.op).map_err(|e| e.to_string())?;
        Ok((s, fio::command_line(&a)))
    });
    let res = res.map(|(mut s, c)| {
        s.cache_bytes = fincore(&image).unwrap_or(0);
        (s, c)
    });
    if image != dense {
        let _ = fs::remove_file(&image);
    }
    res
}

/// Write `size` bytes of the pattern to a new file at `path` (buffered, large
/// writes), make it durable and drop it from the page cache.
pub fn write_dense(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = 8 << 20;
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        fill_pattern(&mut buf[..n], off / chunk as u64 + 1);
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    drop(f);
    drop_cache(path)
}

/// FICLONE `src` to a new `dst`; a plain copy where the file system cannot.
pub fn clone_or_copy(src: &Path, dst: &Path) -> io::Result<bool> {
    let _ = fs::remove_file(dst);
    let s = File::open(src)?;
    let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
    if refblk_core::pool::fsops::try_reflink(&s, &d)? {
        return Ok(true);
    }
    drop(d);
    fs::copy(src, dst)?;
    File::open(dst)?.sync_all()?;
    Ok(false)
}

/// Make the file's dirty data durable and drop it from the page cache, so the next
/// run starts cold without touching other processes' caches.
pub fn drop_cache(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    f.sync_all()?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// Bytes of `path` resident in the page cache (util-linux `fincore`).
pub fn fincore(path: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Number of extents of a file (`filefrag`), 0 if unknown.
pub fn extents(path: &Path) -> u64 {
    let Ok(out) = Command::new("filefrag").arg(path).output() else {
        return 0;
    };
    // "<path>: N extents found" / "1 extent found"
    let s = String::from_utf8_lossy(&out.stdout);
    s.rsplit(':')
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// "1 GiB", "512 MiB", ...
pub fn fmt_bytes(n: u64) -> String {
    refblk_core::util::size::format_size(n)
}

fn utc_now() -> String {
    refblk_core::util::time::isodate(refblk_core::util::time::now_secs())
}

fn host_description() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("Linux {kernel}, {cpus} CPUs, {} RAM", fmt_bytes(mem * 1024))
}
