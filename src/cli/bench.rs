//! `refblk bench`: compare the raw file, a loop device and refblk on the same image.

use std::path::PathBuf;
use std::time::Duration;

use crate::bench::{self, profile, Backing, BenchConfig, Place};
use refblk_core::util::size::parse_size;
use refblk_sim::scratchfs::FsKind;

use super::{CliError, CliResult};

/// Arguments of `refblk bench`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:\n  \
sudo refblk bench --fs xfs --profiles rnd --paths file,refblk --runtime 2 --reps 5\n  \
sudo refblk bench --backing ram --fs xfs,btrfs --json ram.json   # no disk: each path's software cost\n  \
refblk bench --dir /var/tmp --paths file,refblk                  # no root: an existing directory\n\n\
--backing ram puts each scratch file system's image in /dev/shm (tmpfs): it may grow to \
4 x --size + 2 x the largest --snapshot-sizes (when snapshot or commit run) + 1 GiB, \
7 GiB with the defaults. A run that may not fit in /dev/shm's free space or the machine's \
available memory is refused before anything is made, the message naming both; lower --size \
or --snapshot-sizes, or use --backing disk.\n\n\
The report (Markdown) goes to stdout, naming its regime (backing, file system, cache regime); \
progress and logs go to stderr. SIGINT or SIGTERM stops the run at its next step and removes \
its scratch file systems (a second one quits at once).\n\n\
Exit codes: 0 ok, 1 failed or refused (the message says why), 2 bad usage, 130 stopped by a signal.")]
pub struct BenchArgs {
    /// Profiles (comma-separated): all, io, seq, rnd, discard, or names such as
    /// seq1m_q8t1_read, rnd4k_q1t1_write, alloc, overwrite, discard_64k, snapshot, commit.
    #[arg(long, default_value = "all")]
    pub profiles: String,
    /// File systems to make and benchmark on (btrfs, xfs, ext4; needs root).
    #[arg(long, default_value = "btrfs,xfs", conflicts_with = "dir")]
    pub fs: String,
    /// Benchmark in this existing directory instead of scratch file systems.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// What the scratch file systems sit on: disk (a sparse file in the temp
    /// directory: the machine's disk) or ram (a file in /dev/shm: no disk, each
    /// path's software cost). A loop device and the same mkfs either way.
    #[arg(long, value_enum, default_value_t = BackingArg::Disk, conflicts_with = "dir")]
    pub backing: BackingArg,
    /// Paths: file, loop (= loop-dio,loop-buf), loop-dio, loop-buf, refblk, all.
    #[arg(long, default_value = "all")]
    pub paths: String,
    /// Seconds per timed run.
    #[arg(long, default_value = "1")]
    pub runtime: f64,
    /// Image size (the region the I/O profiles cover).
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Image sizes for snapshot/commit (comma-separated).
    #[arg(long, default_value = "1G")]
    pub snapshot_sizes: String,
    /// Random 4 KiB writes that fragment the snapshot/commit image.
    #[arg(long, default_value_t = 32768)]
    pub frag_writes: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw a bar chart (SVG) to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Run nothing: draw the SVG (--svg) of an earlier run's --json FILE.
    #[arg(long, value_name = "FILE", requires = "svg", conflicts_with = "json")]
    pub replot: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `--backing`: what the scratch file systems sit on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingArg {
    /// A sparse file in $REFBLK_SCRATCH_DIR or the temp directory (the disk).
    Disk,
    /// A file in /dev/shm (tmpfs): memory, no disk.
    Ram,
}

impl From<BackingArg> for Backing {
    fn from(b: BackingArg) -> Backing {
        match b {
            BackingArg::Disk => Backing::Disk,
            BackingArg::Ram => Backing::Ram,
        }
    }
}

impl BenchArgs {
    /// The benchmark configuration these arguments ask for.
    pub fn config(&self) -> Result<BenchConfig, CliError> {
        let profiles = profile::parse_profiles(&self.profiles).map_err(CliError::usage)?;
        let paths = profile::PathKind::parse_list(&self.paths).map_err(CliError::usage)?;
        let places = match &self.dir {
            Some(d) => vec![Place::Dir(d.clone())],
            None => {
                let mut v = Vec::new();
                for w in self.fs.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    let k = match w {
                        "btrfs" => FsKind::Btrfs,
                        "xfs" => FsKind::Xfs,
                        "ext4" => FsKind::Ext4,
                        _ => {
                            return Err(CliError::usage(format!(
                                "unknown file system {w:?}; use btrfs, xfs or ext4"
                            )))
                        }
                    };
                    v.push(Place::Fs(k));
                }
                v
            }
        };
        if places.is_empty() {
            return Err(CliError::usage("--fs names no file system"));
        }
        if !(self.runtime > 0.0 && self.runtime <= 3600.0) {
            return Err(CliError::usage(
                "--runtime must be between 0 and 3600 seconds",
            ));
        }
        if self.reps == 0 {
            return Err(CliError::usage("--reps must be at least 1"));
        }
        let size = parse_size(&self.size)
            .map_err(|e| CliError::usage(format!("--size {}: {e}", self.size)))?;
        if size < (8 << 20) {
            return Err(CliError::usage("--size must be at least 8M"));
        }
        let mut snapshot_sizes = Vec::new();
        for w in self
            .snapshot_sizes
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            snapshot_sizes.push(
                parse_size(w).map_err(|e| CliError::usage(format!("--snapshot-sizes {w}: {e}")))?,
            );
        }
        Ok(BenchConfig {
            profiles,
            places,
            backing: self.backing.into(),
            paths,
            runtime: Duration::from_secs_f64(self.runtime),
            size,
            reps: self.reps,
            snapshot_sizes,
            frag_writes: self.frag_writes,
            progress: !self.quiet,
        })
    }
}

/// On SIGINT or SIGTERM, stop the run at its next step, so that it unwinds
/// and removes its scratch file systems, their loop devices and images (with
/// `--backing ram` the images hold memory until then); a second signal quits
/// at once, leaving them for the next `refblk bench` to clean up (it removes
/// the scratch mounts of processes that are gone). Called before the bench
/// starts a thread: the signals are blocked in every thread and taken here.
fn stop_on_signals() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    super::signals::block_terminate()?;
    std::thread::Builder::new()
        .name("refblk-signals".into())
        .spawn(|| {
            let mut set = SigSet::empty();
            set.add(Signal::SIGINT);
            set.add(Signal::SIGTERM);
            while let Ok(sig) = set.wait() {
                if bench::stop_requested() {
                    eprintln!(
                        "\nrefblk bench: {sig:?} again: quitting now; the next refblk bench removes the scratch file systems left behind"
                    );
                    std::process::exit(130);
                }
                eprintln!(
                    "\nrefblk bench: {sig:?}: stopping after this step and removing the scratch file systems ({sig:?} again to quit at once)"
                );
                bench::request_stop();
            }
        })?;
    Ok(())
}

/// Run `refblk bench`.
pub fn run(args: BenchArgs) -> CliResult {
    if let (Some(from), Some(to)) = (&args.replot, &args.svg) {
        let text = std::fs::read_to_string(from)
            .map_err(|e| CliError::failed(format!("cannot read {}: {e}", from.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            CliError::failed(format!(
                "{}: not JSON: {e} (want the file of refblk bench --json)",
                from.display()
            ))
        })?;
        let rep = bench::report::from_json(&v).map_err(|e| {
            CliError::failed(format!(
                "{}: {e} (want the file of refblk bench --json)",
                from.display()
            ))
        })?;
        std::fs::write(to, bench::report::svg(&rep))
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", to.display())))?;
        return Ok(());
    }
    let cfg = args.config()?;
    stop_on_signals().map_err(|e| CliError::failed(format!("handling signals: {e}")))?;
    let rep = bench::run(&cfg).map_err(|e| {
        if bench::stop_requested() {
            CliError {
                code: 130,
                msg: format!(
                    "{}: stopped by a signal; the scratch file systems, loop devices and images were removed",
                    bench::INTERRUPTED
                ),
            }
        } else {
            CliError::failed(e)
        }
    })?;
    print!("{}", bench::report::markdown(&rep));
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&bench::report::to_json(&rep))
            .map_err(|e| CliError::failed(format!("encoding JSON: {e}")))?;
        std::fs::write(p, text + "\n")
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", p.display())))?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, bench::report::svg(&rep))
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", p.display())))?;
    }
    let failed: Vec<String> = rep
        .io
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} {} {}: {e}", r.place, r.profile, r.path))
        })
        .collect();
    if !failed.is_empty() {
        return Err(CliError::failed(format!(
            "{} run(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        )));
    }
    Ok(())
}
