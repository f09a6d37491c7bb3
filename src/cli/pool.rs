//! `refblk pool ...` and `refblk volume ...`: the reflink pool from the command line,
//! in the spirit of Qubes' `qvm-pool` / `qvm-volume`.
//!
//! Exit codes (stable, for scripts): 0 success; 1 I/O failure; 2 bad input or usage;
//! 3 not found (volume, image, revision, pool); 4 volume already exists; 5 busy (the
//! volume is running, served by a daemon, or used by another program); 6 wrong volume kind or state for the operation; 7 file system
//! full; 8 file system cannot reflink (`pool init` without `--no-setup-check`);
//! 9 `pool check` found problems it did not repair.

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::limit::LimitArgs;
use super::{CliError, CliResult};
use refblk_core::pool::{
    ImportSource, InitOptions, OpenOptions, Overrides, Pool, PoolError, QubesXmlSetting,
    StopOutcome, Volume, VolumeConfig, VolumeInfo, VolumeKind, XenstoreSetting,
};
use refblk_core::util::size::{format_size, parse_size};

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 I/O failure, 2 bad input/usage, 3 not found, \
4 already exists, 5 busy (volume running, served by refblk serve, or used by another \
program: the message names it), 6 wrong kind/state, 7 file system full, \
8 no reflink support, 9 check found unrepaired problems.";

impl From<PoolError> for CliError {
    fn from(e: PoolError) -> Self {
        CliError {
            code: e.kind.exit_code(),
            msg: e.msg,
        }
    }
}

/// A volume size: positive whole 512-byte sectors, at most the largest file size.
fn volume_size_arg(s: &str) -> Result<u64, String> {
    let n = parse_size(s).map_err(|e| e.to_string())?;
    refblk_core::pool::check_size("", n).map_err(|e| {
        e.msg.strip_prefix("volume : ").unwrap_or(&e.msg).replacen(
            &format!("invalid size {n}"),
            &format!("invalid size {s:?} ({n} bytes)"),
            1,
        )
    })?;
    Ok(n)
}

fn kind_arg(s: &str) -> Result<VolumeKind, refblk_core::pool::ConfigError> {
    s.parse()
}

/// `refblk pool ...`
#[derive(Subcommand, Debug)]
#[command(after_help = EXIT_CODES)]
pub enum PoolCommand {
    /// Create (or adopt) a pool directory: check reflink support, make appvms/,
    /// vm-templates/ and .refblk/pool.json.
    #[command(after_help = EXIT_CODES)]
    Init {
        /// The pool directory (created if missing).
        dir: PathBuf,
        /// Accept a file system without reflinks (every start/commit copies the image).
        #[arg(long)]
        no_setup_check: bool,
        /// Default number of revisions kept per volume.
        #[arg(long, default_value_t = 1)]
        revisions_to_keep: i64,
    },
    /// Show the pool's file system, space and settings.
    #[command(after_help = EXIT_CODES)]
    Info {
        /// The pool directory.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        around: AroundArgs,
    },
    /// Look for leftovers of interrupted operations (temporary files, interrupted
    /// imports, stale precaches and start records); --repair removes them.
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The pool directory.
        dir: PathBuf,
        /// Fix what can be fixed without touching committed data.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        around: AroundArgs,
    },
}

/// What is around a pool: Qubes' settings, a xenstore.
#[derive(Args, Debug, Clone, Default)]
pub struct AroundArgs {
    /// Qubes' qubes.xml: when it names a file-reflink pool in this directory,
    /// volume settings are read from it (read-only) and win over refblk's;
    /// 'none': no Qubes [default: /var/lib/qubes/qubes.xml when it exists].
    #[arg(long, value_name = "PATH", env = "REFBLK_QUBES_XML")]
    pub qubes_xml: Option<String>,
    /// Look for xenstore backends naming a volume's images in the simulated Xen
    /// in DIR [default: the real xenstore, when there is one].
    #[arg(long, value_name = "DIR")]
    pub sim: Option<PathBuf>,
}

impl AroundArgs {
    fn options(&self) -> OpenOptions {
        OpenOptions {
            qubes_xml: self
                .qubes_xml
                .as_deref()
                .map(QubesXmlSetting::parse)
                .unwrap_or_default(),
            xenstore: match &self.sim {
                Some(d) => XenstoreSetting::Sim(d.clone()),
                None => XenstoreSetting::Auto,
            },
        }
    }
}

/// Which pool (`--pool DIR` or `$REFBLK_POOL`).
#[derive(Args, Debug, Clone)]
pub struct PoolArg {
    /// The pool directory [default: $REFBLK_POOL].
    #[arg(short, long, value_name = "DIR")]
    pub pool: Option<PathBuf>,
    #[command(flatten)]
    pub around: AroundArgs,
}

impl PoolArg {
    pub(crate) fn dir(&self) -> Result<PathBuf, CliError> {
        match &self.pool {
            Some(p) => Ok(p.clone()),
            None => std::env::var_os("REFBLK_POOL")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| {
                    CliError::usage("no pool given: pass --pool DIR or set REFBLK_POOL")
                }),
        }
    }

    pub(crate) fn open(&self) -> Result<Pool, CliError> {
        // A running volume's resize is announced by the daemon serving it.
        let socket = std::env::var_os("REFBLK_CONTROL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(super::serve::DEFAULT_CONTROL));
        Ok(
            Pool::open_with(&self.dir()?, &self.around.options())?.with_notifier(
                std::sync::Arc::new(refblk_core::backend::control::DaemonNotifier::new(socket)),
            ),
        )
    }
}

/// Settings for volumes without a sidecar (e.g. laid out by Qubes), or to override it.
#[derive(Args, Debug, Clone, Default)]
pub struct OverrideArgs {
    /// Volume kind: origin, snapshot, origin+snapshot, volatile.
    #[arg(long, value_parser = kind_arg)]
    pub kind: Option<VolumeKind>,
    /// Source volume of a snapshot kind (same pool).
    #[arg(long, value_name = "VID")]
    pub source: Option<String>,
    /// Revisions kept at commit (-1 on an origin: no snapshots, rename in place).
    #[arg(long, allow_hyphen_values = true)]
    pub revisions_to_keep: Option<i64>,
    /// Size of a volatile volume without a sidecar (e.g. 10G).
    #[arg(long, value_parser = volume_size_arg, value_name = "SIZE")]
    pub volatile_size: Option<u64>,
}

impl OverrideArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            kind: self.kind,
            source: self.source.clone(),
            revisions_to_keep: self.revisions_to_keep,
            size: self.volatile_size,
        }
    }
}

/// `refblk volume ...`
#[derive(Subcommand, Debug)]
#[command(after_help = EXIT_CODES)]
pub enum VolumeCommand {
    /// Create a volume (origin: an empty sparse image of --size).
    #[command(after_help = EXIT_CODES)]
    Create {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id, e.g. appvms/work/private.
        vid: String,
        /// Size, e.g. 10G, 512M, 4096 (whole 512-byte sectors).
        #[arg(long, value_parser = volume_size_arg)]
        size: u64,
        /// Volume kind: origin, snapshot, origin+snapshot, volatile.
        #[arg(long, value_parser = kind_arg, default_value = "origin")]
        kind: VolumeKind,
        /// Source volume for snapshot kinds.
        #[arg(long, value_name = "VID")]
        source: Option<String>,
        /// Revisions kept (default: the pool's; -1 on an origin: no snapshots).
        #[arg(long, allow_hyphen_values = true)]
        revisions_to_keep: Option<i64>,
        /// Refuse resizing.
        #[arg(long)]
        read_only: bool,
    },
    /// Replace a volume's data with FILE (or stdin for '-'); the old data becomes a
    /// revision. A failed import leaves the old data.
    #[command(after_help = EXIT_CODES)]
    Import {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Image file, or '-' for stdin.
        file: PathBuf,
        /// New volume size (default: the volume's current size; the data may be
        /// shorter, never longer).
        #[arg(long, value_parser = volume_size_arg)]
        size: Option<u64>,
        /// Allow --size below the current size (data beyond it is lost).
        #[arg(long)]
        allow_shrink: bool,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Print the clean image's path, or copy it (reflink when possible) to DEST, or
    /// to stdout for '-'.
    #[command(after_help = EXIT_CODES)]
    Export {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Destination file, or '-' for stdout.
        dest: Option<PathBuf>,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Copy SRC's committed data into DST (a new origin volume, or an existing one
    /// whose old data becomes a revision); --src-pool clones across pools.
    #[command(after_help = EXIT_CODES)]
    Clone {
        #[command(flatten)]
        pool: PoolArg,
        /// Source volume id.
        src: String,
        /// Destination volume id.
        dst: String,
        /// Pool of the source (default: the same pool).
        #[arg(long, value_name = "DIR")]
        src_pool: Option<PathBuf>,
        /// Revisions kept by a new destination volume.
        #[arg(long, allow_hyphen_values = true)]
        revisions_to_keep: Option<i64>,
    },
    /// Resize a volume (grow only unless --allow-shrink); a running volume's backend is
    /// told the new size. A volume `refblk serve` serves is refused: detach it first.
    #[command(after_help = EXIT_CODES)]
    Resize {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// New size, e.g. 20G.
        #[arg(value_parser = volume_size_arg)]
        size: u64,
        /// Allow shrinking (data beyond the new end is lost).
        #[arg(long)]
        allow_shrink: bool,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Start: snapshot the volume to its -dirty.img and print that path.
    #[command(after_help = EXIT_CODES)]
    Start {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Serve a volume recorded as running again instead of refusing (after the
        /// serving daemon died while the guest kept running).
        #[arg(long)]
        takeover: bool,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Stop: commit an origin's changes (or --discard them); snapshot and volatile
    /// volumes are thrown away.
    #[command(after_help = EXIT_CODES)]
    Stop {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Throw the changes away instead of committing.
        #[arg(long)]
        discard: bool,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Revert a stopped volume to REVISION (N or N@TIMESTAMPZ; default the newest);
    /// the current data becomes a revision.
    #[command(after_help = EXIT_CODES)]
    Revert {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Revision (see `volume revisions`).
        revision: Option<String>,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// List a volume's revisions, oldest first.
    #[command(after_help = EXIT_CODES)]
    Revisions {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's settings, state, size and revisions.
    #[command(after_help = EXIT_CODES)]
    Info {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// List the volumes of a pool.
    #[command(after_help = EXIT_CODES)]
    List {
        #[command(flatten)]
        pool: PoolArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume: all images, revisions and settings.
    #[command(after_help = EXIT_CODES)]
    Remove {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        /// Remove even if it is running.
        #[arg(long)]
        force: bool,
    },
    /// Store settings for an existing volume (e.g. one laid out by hand) in its
    /// sidecar .refblk/volumes/VID.json, without touching images. Refused for a
    /// volume qubes.xml names: its settings are read from there.
    #[command(after_help = EXIT_CODES)]
    Config {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        #[command(flatten)]
        ov: OverrideArgs,
    },
    /// Set (or show) the I/O limits the daemon applies when it serves the
    /// volume (attach-volume); stored in .refblk/volumes/VID.limits. For a
    /// running guest, also use `refblk limit`.
    #[command(after_help = EXIT_CODES)]
    Limit {
        #[command(flatten)]
        pool: PoolArg,
        /// Volume id.
        vid: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

fn print_json(v: &serde_json::Value) -> CliResult {
    let mut out = io::stdout().lock();
    writeln!(out, "{v:#}")?;
    Ok(())
}

/// The result of a pool/volume command goes to stdout once: the library's
/// info-level log of the same event (on stderr) is kept quiet unless RUST_LOG
/// asks for it.
fn quiet_log() {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Run a pool command.
pub fn run_pool(c: PoolCommand) -> CliResult {
    quiet_log();
    match c {
        PoolCommand::Init {
            dir,
            no_setup_check,
            revisions_to_keep,
        } => {
            let p = Pool::init(
                &dir,
                &InitOptions {
                    setup_check: !no_setup_check,
                    revisions_to_keep,
                },
            )?;
            println!("initialized pool {}", p.dir().display());
            Ok(())
        }
        PoolCommand::Info { dir, json, around } => {
            let p = Pool::open_with(&dir, &around.options())?;
            let i = p.info()?;
            if json {
                return print_json(&json!({
                    "dir": i.dir,
                    "driver": "file-reflink",
                    "fs_type": i.fs_type,
                    "reflink": i.reflink,
                    "size": i.size,
                    "usage": i.usage,
                    "revisions_to_keep": i.config.revisions_to_keep,
                    "setup_check": i.config.setup_check,
                    "initialized": i.initialized,
                    "volumes": i.volumes,
                    "qubes": p.qubes().map(|q| json!({
                        "xml": q.xml,
                        "pool": q.pool_name,
                        "revisions_to_keep": q.revisions_to_keep,
                    })),
                }));
            }
            println!("dir               {}", i.dir.display());
            println!("driver            file-reflink");
            println!("file system       {}", i.fs_type);
            println!(
                "reflink           {}",
                if i.reflink {
                    "yes"
                } else {
                    "no (copy fallback)"
                }
            );
            println!("size              {}", format_size(i.size));
            println!("usage             {}", format_size(i.usage));
            println!("revisions_to_keep {}", i.config.revisions_to_keep);
            println!(
                "initialized       {}",
                if i.initialized {
                    "yes"
                } else {
                    "no (.refblk/pool.json missing; defaults used)"
                }
            );
            if let Some(q) = p.qubes() {
                println!(
                    "managed by Qubes  {} (volume settings read from it)",
                    q.describe()
                );
            }
            println!("volumes           {}", i.volumes);
            Ok(())
        }
        PoolCommand::Check {
            dir,
            repair,
            json,
            around,
        } => {
            let p = Pool::open_with(&dir, &around.options())?;
            let items = p.check(repair)?;
            let open: Vec<_> = items.iter().filter(|i| !i.repaired).collect();
            if json {
                print_json(&json!({
                    "ok": open.is_empty(),
                    "items": items.iter().map(|i| json!({
                        "vid": i.vid,
                        "problem": i.problem,
                        "repaired": i.repaired,
                        "needs_admin": i.fatal,
                    })).collect::<Vec<_>>(),
                }))?;
            } else {
                for i in &items {
                    let tag = if i.repaired {
                        "repaired"
                    } else if i.fatal {
                        "ATTENTION"
                    } else {
                        "found"
                    };
                    println!("{tag}: {}: {}", i.vid, i.problem);
                }
                if items.is_empty() {
                    println!("pool {} is clean", p.dir().display());
                }
            }
            if open.is_empty() {
                Ok(())
            } else {
                Err(CliError {
                    code: 9,
                    msg: format!(
                        "{} problem(s) in pool {} not repaired{}",
                        open.len(),
                        p.dir().display(),
                        if repair { "" } else { " (run with --repair)" }
                    ),
                })
            }
        }
    }
}

/// Refuse (exit 3, before any lock file is made) a verb on a volume that has no
/// file at all, unless --kind says it is one that needs none while stopped
/// (snapshot, volatile).
fn require_exists(v: &Volume, pool: &PoolArg, ov: &OverrideArgs) -> CliResult {
    let fileless_kind = ov
        .kind
        .is_some_and(|k| !k.save_on_stop() || k.snap_on_start());
    if fileless_kind || v.exists()? {
        return Ok(());
    }
    Err(CliError {
        code: 3,
        msg: format!(
            "volume {} does not exist in {} (see `refblk volume list`)",
            v.vid(),
            pool.dir()?.display()
        ),
    })
}

fn open_volume(pool: &PoolArg, vid: &str, ov: &OverrideArgs) -> Result<Volume, CliError> {
    let p = pool.open()?;
    Ok(p.volume_with(vid, ov.overrides())?)
}

fn info_line(i: &VolumeInfo) -> String {
    format!(
        "{:<40} {:<16} {:<11} {:>8} {:>9}{}",
        i.vid,
        i.config.kind.as_str(),
        i.state.as_str(),
        i.size.map(format_size).unwrap_or_else(|| "-".into()),
        i.revisions.len(),
        if i.outdated { "  outdated" } else { "" }
    ) + &i
        .owner
        .as_ref()
        .map(|(o, l)| {
            format!(
                "  served: {}{}",
                o.short(),
                if *l == refblk_core::pool::Liveness::Live {
                    ""
                } else {
                    " (daemon died; restart it)"
                }
            )
        })
        .unwrap_or_default()
        + &if i.users.is_empty() {
            String::new()
        } else {
            format!(
                "  used by: {}",
                i.users
                    .iter()
                    .map(|u| u.who.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
}

/// `volume list`'s volumes that could not be shown: the first error's exit
/// code, every message.
fn list_failures(bad: Vec<PoolError>) -> CliResult {
    let Some(code) = bad.first().map(|e| e.kind.exit_code()) else {
        return Ok(());
    };
    Err(CliError {
        code,
        msg: bad
            .into_iter()
            .map(|e| e.msg)
            .collect::<Vec<_>>()
            .join("\nrefblk: "),
    })
}

/// Run a volume command.
pub fn run_volume(c: VolumeCommand) -> CliResult {
    quiet_log();
    match c {
        VolumeCommand::Create {
            pool,
            vid,
            size,
            kind,
            source,
            revisions_to_keep,
            read_only,
        } => {
            let p = pool.open()?;
            let cfg = VolumeConfig {
                kind,
                source,
                revisions_to_keep: revisions_to_keep.unwrap_or(if kind.save_on_stop() {
                    p.config().revisions_to_keep
                } else {
                    0
                }),
                size: Some(size),
                rw: !read_only,
            };
            let v = p.create_volume(&vid, cfg, size)?;
            println!("created {} ({} {})", v.vid(), kind, format_size(size));
            Ok(())
        }
        VolumeCommand::Import {
            pool,
            vid,
            file,
            size,
            allow_shrink,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            if !v.exists()? {
                return Err(CliError {
                    code: 3,
                    msg: format!(
                        "volume {vid} does not exist in {}; create it first",
                        pool.dir()?.display()
                    ),
                });
            }
            // The size changes only when asked: default = the current size.
            let cur = v.size()?;
            let size = match (size, cur) {
                (Some(s), Some(c)) if s < c && !allow_shrink => {
                    return Err(CliError::usage(format!(
                        "refusing to shrink volume {vid} from {c} to {s} bytes by import; \
                         pass --allow-shrink if you mean it"
                    )))
                }
                (Some(s), _) => Some(s),
                (None, c) => c,
            };
            if let (Some(s), false) = (size, file.as_os_str() == "-") {
                let len = std::fs::metadata(&file)
                    .map_err(|e| CliError {
                        code: if e.kind() == io::ErrorKind::NotFound {
                            3
                        } else {
                            1
                        },
                        msg: format!("import into {vid}: {}: {e}", file.display()),
                    })?
                    .len();
                if len > s {
                    return Err(CliError::usage(format!(
                        "{} holds {len} bytes, more than volume {vid}'s {s} bytes; \
                         pass --size {} to grow the volume",
                        file.display(),
                        len.div_ceil(512) * 512
                    )));
                }
            }
            if file.as_os_str() == "-" {
                let stdin = io::stdin();
                let mut lock = stdin.lock();
                v.import(ImportSource::Reader(&mut lock, "stdin"), size)?;
            } else {
                v.import(ImportSource::File(&file), size)?;
            }
            println!("imported {} into {}", file.display(), v.vid());
            Ok(())
        }
        VolumeCommand::Export {
            pool,
            vid,
            dest,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            match dest {
                None => println!("{}", v.export(None)?.display()),
                Some(d) if d.as_os_str() == "-" => {
                    let path = v.export(None)?;
                    let mut f = std::fs::File::open(&path)
                        .map_err(|e| CliError::failed(format!("open {}: {e}", path.display())))?;
                    let mut out = io::stdout().lock();
                    match io::copy(&mut f, &mut out).and_then(|_| out.flush()) {
                        Ok(()) => {}
                        // the reader went away (e.g. `| head`): not our failure
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                        Err(e) => {
                            return Err(CliError::failed(format!(
                                "export {} to stdout: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                Some(d) => {
                    v.export(Some(&d))?;
                    println!("exported {} to {}", v.vid(), d.display());
                }
            }
            Ok(())
        }
        VolumeCommand::Clone {
            pool,
            src,
            dst,
            src_pool,
            revisions_to_keep,
        } => {
            let p = pool.open()?;
            let sp = match &src_pool {
                Some(d) => Pool::open_with(d, &pool.around.options())?,
                None => p.clone(),
            };
            let s = sp.volume(&src)?;
            let d = p.volume(&dst)?;
            let cfg = revisions_to_keep.map(VolumeConfig::origin);
            d.clone_from(&s, cfg)?;
            println!("cloned {} to {}", s.vid(), d.vid());
            Ok(())
        }
        VolumeCommand::Resize {
            pool,
            vid,
            size,
            allow_shrink,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            require_exists(&v, &pool, &ov)?;
            v.resize(size, allow_shrink)?;
            println!("resized {} to {}", v.vid(), format_size(size));
            Ok(())
        }
        VolumeCommand::Start {
            pool,
            vid,
            takeover,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            require_exists(&v, &pool, &ov)?;
            let path = if takeover { v.resume()? } else { v.start()? };
            println!("{}", path.display());
            Ok(())
        }
        VolumeCommand::Stop {
            pool,
            vid,
            discard,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            require_exists(&v, &pool, &ov)?;
            let o = if discard { v.discard()? } else { v.stop()? };
            println!(
                "{}: {}",
                v.vid(),
                match o {
                    StopOutcome::Committed => "committed",
                    StopOutcome::Discarded => "discarded",
                    StopOutcome::NotRunning => "was not running",
                }
            );
            Ok(())
        }
        VolumeCommand::Revert {
            pool,
            vid,
            revision,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            require_exists(&v, &pool, &ov)?;
            let r = v.revert(revision.as_deref())?;
            println!("reverted {} to revision {}@{}Z", v.vid(), r.n, r.timestamp);
            Ok(())
        }
        VolumeCommand::Revisions { pool, vid, json } => {
            let v = open_volume(&pool, &vid, &OverrideArgs::default())?;
            if !v.exists()? {
                return Err(CliError {
                    code: 3,
                    msg: format!("volume {vid} does not exist in {}", pool.dir()?.display()),
                });
            }
            let revs = v.revisions()?;
            if json {
                return print_json(&json!(revs
                    .iter()
                    .map(|r| json!({
                        "revision": r.n.to_string(),
                        "timestamp": format!("{}Z", r.timestamp),
                        "path": r.path,
                    }))
                    .collect::<Vec<_>>()));
            }
            for r in revs {
                println!("{:<6} {}Z", r.n, r.timestamp);
            }
            Ok(())
        }
        VolumeCommand::Info {
            pool,
            vid,
            json,
            ov,
        } => {
            let v = open_volume(&pool, &vid, &ov)?;
            let i = v.info()?;
            if !i.clean_exists && !v.exists()? && i.config.kind.save_on_stop() {
                return Err(CliError {
                    code: 3,
                    msg: format!("volume {vid} does not exist in {}", pool.dir()?.display()),
                });
            }
            if json {
                return print_json(&i.to_json());
            }
            println!("vid               {}", i.vid);
            println!("kind              {}", i.config.kind);
            if let Some(s) = &i.config.source {
                println!("source            {s}");
            }
            println!("revisions_to_keep {}", i.config.revisions_to_keep);
            println!("rw                {}", i.config.rw);
            println!(
                "settings          {}",
                match (i.settings, &i.qubes) {
                    ("qubes.xml", Some((d, n))) => format!("qubes.xml (qube {d}, volume {n})"),
                    ("sidecar", _) => "sidecar".to_string(),
                    _ => "defaults (no sidecar)".to_string(),
                }
            );
            println!("state             {}", i.state.as_str());
            for u in &i.users {
                println!("used by           {u}");
            }
            if let Some((o, l)) = &i.owner {
                println!(
                    "served by         {}{}",
                    o.short(),
                    if *l == refblk_core::pool::Liveness::Live {
                        ""
                    } else {
                        " (daemon died; its restart state remains)"
                    }
                );
            }
            println!(
                "size              {}",
                i.size.map(format_size).unwrap_or_else(|| "-".into())
            );
            println!("usage             {}", format_size(i.usage));
            println!("path              {}", i.dirty.display());
            println!(
                "clean             {}{}",
                i.clean.display(),
                if i.clean_exists { "" } else { " (missing)" }
            );
            if i.config.kind.snap_on_start() {
                println!("outdated          {}", i.outdated);
            }
            for r in &i.revisions {
                println!("revision          {}@{}Z", r.n, r.timestamp);
            }
            Ok(())
        }
        VolumeCommand::List { pool, json } => {
            let p = pool.open()?;
            let mut infos = Vec::new();
            // One volume with unusable settings (e.g. a bad value in qubes.xml)
            // does not hide the others; the command fails after the listing.
            let mut bad = Vec::new();
            for vid in p.list()? {
                match p.volume(&vid).and_then(|v| v.info()) {
                    Ok(i) => infos.push(i),
                    Err(e) => bad.push(e),
                }
            }
            if json {
                print_json(&json!(infos
                    .iter()
                    .map(VolumeInfo::to_json)
                    .collect::<Vec<_>>()))?;
                return list_failures(bad);
            }
            println!(
                "{:<40} {:<16} {:<11} {:>8} {:>9}",
                "VID", "KIND", "STATE", "SIZE", "REVISIONS"
            );
            for i in &infos {
                println!("{}", info_line(i));
            }
            list_failures(bad)
        }
        VolumeCommand::Remove { pool, vid, force } => {
            let v = open_volume(&pool, &vid, &OverrideArgs::default())?;
            if !v.exists()? && !v.precache_path().exists() {
                require_exists(&v, &pool, &OverrideArgs::default())?;
            }
            v.remove(force)?;
            println!("removed {}", v.vid());
            Ok(())
        }
        VolumeCommand::Config { pool, vid, ov } => {
            let v = open_volume(&pool, &vid, &ov)?;
            let cfg = v.save_settings()?;
            println!(
                "{}: {} revisions_to_keep={}{}",
                v.vid(),
                cfg.kind,
                cfg.revisions_to_keep,
                cfg.source
                    .map(|s| format!(" source={s}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        VolumeCommand::Limit { pool, vid, limits } => run_volume_limit(&pool, &vid, &limits),
    }
}

/// Run `refblk volume limit`: store (or show) a pool volume's limits.
fn run_volume_limit(pool: &PoolArg, vid: &str, a: &LimitArgs) -> CliResult {
    let patch = a.patch()?;
    let p = pool.open()?;
    // The volume must exist (a typo must not store limits nobody reads).
    let v = p.volume(vid)?;
    if !v.exists()? {
        return Err(CliError {
            code: 3,
            msg: format!("volume {vid} does not exist in {}", p.dir().display()),
        });
    }
    let dir = p.dir().to_path_buf();
    let cur = refblk_core::pool::limits::load(&dir, v.vid())?;
    let new = cur.patched(&patch);
    if !patch.is_empty() {
        refblk_core::pool::limits::save(&dir, v.vid(), &new)?;
    }
    println!("{}: {new}", v.vid());
    Ok(())
}
