//! `refblk serve` (the daemon) and `refblk ctl` (talk to it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::info;

use super::instance::{dir_lock, instance_lock, lock_path_for, INSTANCE_BUSY};
use super::metrics::MetricsServer;
use super::{socket_of, CliError, CliResult};
use refblk_core::backend::control::{self, Access, ControlServer, Request};
use refblk_core::backend::{Backend, BackendConfig, Kind};
use refblk_core::engine::DirectPolicy;
use refblk_core::limits::LimitsPatch;
use refblk_core::platform::real::RealXen;
use refblk_core::platform::Platform;

/// Default control socket of the daemon on a real dom0.
pub const DEFAULT_CONTROL: &str = "/run/refblk/control.sock";

/// Arguments of `refblk serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Serve on the simulated Xen in DIR (see `refblk sim`) instead of real Xen.
    #[arg(long, value_name = "DIR")]
    pub sim: Option<PathBuf>,
    /// Control socket (hotplug script, `refblk ctl`). Default:
    /// /run/refblk/control.sock, or DIR/refblk.sock with --sim.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Our domain id (0 in dom0; set it in a storage driver domain).
    #[arg(long, default_value_t = 0)]
    pub backend_domid: u16,
    /// Most queues offered to a frontend (multi-queue-max-queues).
    #[arg(long, default_value_t = 4)]
    pub max_queues: u32,
    /// Largest ring-page-order accepted (0..=4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub max_ring_page_order: u32,
    /// feature-max-indirect-segments offered (0 disables INDIRECT).
    #[arg(long, default_value_t = 256)]
    pub max_indirect_segments: u32,
    /// Accept persistent grants from frontends that offer them (map each data
    /// page once, memcpy instead of a grant copy per request).
    #[arg(long)]
    pub persistent_grants: bool,
    /// Never use O_DIRECT on images (use the page cache).
    #[arg(long)]
    pub buffered: bool,
    /// io_uring worker threads serving all devices (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// After a busy pass, a worker polls rings and completions this many
    /// microseconds before sleeping (0: never; costs CPU, saves wake-ups).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u32,
    /// Serve backend/vbd devices even though the kernel's xen-blkback is
    /// loaded (it claims every backend/vbd device too): only if you know the
    /// toolstack gives blkback none of refblk's. Without it, a loaded blkback
    /// makes the daemon serve backend/vbd3 only.
    #[arg(long)]
    pub allow_blkback: bool,
    /// Serve only backend/vbd3 devices (disk lines with
    /// backendtype=tap,script=block-refblk, Xen >= 4.19) and leave every
    /// backend/vbd device to kernel blkback, whether it is loaded yet or not
    /// (udev loads it on the first vbd device).
    #[arg(long, conflicts_with = "allow_blkback")]
    pub only_vbd3: bool,
    /// Keep restart state (per device and per queue journal) in DIR, and on
    /// start take over the devices a previous daemon left Connected (see
    /// docs/restart.md). Default: /run/refblk/state, or DIR/state with --sim.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, leave the connected devices Connected with their
    /// restart state for the next `refblk serve` (an upgrade or
    /// `systemctl restart`) instead of disconnecting them.
    #[arg(long, conflicts_with = "no_state")]
    pub handover_on_exit: bool,
    /// Keep no restart state: a restarted daemon cannot resume live guests.
    #[arg(long, conflicts_with = "state_dir")]
    pub no_state: bool,
    /// Serve Prometheus metrics over HTTP (`GET /metrics`) on a unix socket
    /// (unix:PATH) or a loopback TCP address (127.0.0.1:PORT, [::1]:PORT).
    /// Off by default.
    #[arg(long, value_name = "unix:PATH|127.0.0.1:PORT")]
    pub metrics: Option<super::metrics::MetricsAddr>,
    /// Open a read-only status socket (answers `status` only) that members of
    /// GROUP may use, e.g. a non-root Prometheus exporter; a unix --metrics
    /// socket is shared with GROUP too.
    #[arg(long, value_name = "GROUP")]
    pub status_group: Option<String>,
    /// The read-only status socket. Default: status.sock beside the control
    /// socket. Needs --status-group.
    #[arg(long, value_name = "PATH", requires = "status_group")]
    pub status_socket: Option<PathBuf>,
}

/// The gid of a group name or number.
fn lookup_group(g: &str) -> Result<nix::unistd::Gid, CliError> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid),
        Ok(None) => Err(CliError::usage(format!(
            "--status-group {g}: no such group"
        ))),
        Err(e) => Err(CliError::failed(format!("--status-group {g}: {e}"))),
    }
}

/// Run `refblk serve`.
pub fn run(a: ServeArgs) -> CliResult {
    super::signals::block_terminate()
        .map_err(|e| CliError::failed(format!("blocking signals: {e}")))?;
    raise_fd_limit();
    let group = a.status_group.as_deref().map(lookup_group).transpose()?;
    let blkback = a.sim.is_none() && Path::new("/sys/module/xen_blkback").exists();
    let (kinds, why) = kinds_to_serve(blkback, a.allow_blkback, a.only_vbd3);
    if let Some(why) = why {
        info!("{why}");
    }
    let platform: Arc<dyn Platform> = match &a.sim {
        Some(dir) => super::sim::backend_platform(dir)?,
        None => Arc::new(RealXen::open().map_err(|e| CliError::failed(format!("real Xen: {e}")))?),
    };
    let control = a.control.clone().unwrap_or_else(|| match &a.sim {
        Some(dir) => dir.join("refblk.sock"),
        None => PathBuf::from(DEFAULT_CONTROL),
    });
    let state_dir = if a.no_state {
        None
    } else {
        Some(a.state_dir.clone().unwrap_or_else(|| match &a.sim {
            Some(dir) => dir.join("state"),
            None => PathBuf::from(refblk_core::backend::restart::DEFAULT_STATE_DIR),
        }))
    };
    // Before anything is taken over or replaced: is another daemon using the
    // control socket or the state directory? (Held until we exit.)
    let mut _instance = vec![instance_lock(
        &lock_path_for(&control),
        "refblk serve",
        &control,
    )?];
    if let Some(sd) = &state_dir {
        _instance.push(dir_lock(sd)?);
    }
    if control.exists() && std::os::unix::net::UnixStream::connect(&control).is_ok() {
        return Err(CliError {
            code: INSTANCE_BUSY,
            msg: format!(
                "{}: another refblk serve answers on this control socket; stop it first \
                 (nothing was changed)",
                control.display()
            ),
        });
    }
    let mut cfg = BackendConfig {
        state_dir,
        kinds,
        backend_domid: a.backend_domid,
        max_queues: a.max_queues.max(1),
        max_ring_page_order: a.max_ring_page_order,
        max_indirect_segments: a.max_indirect_segments,
        persistent_grants: a.persistent_grants,
        workers: a.workers,
        poll_us: a.poll_us,
        ..BackendConfig::default()
    };
    if a.buffered {
        cfg.engine.direct = DirectPolicy::Never;
    }
    let workers = if a.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.workers
    };
    control::set_daemon_info(workers);
    let backend = Backend::new(platform, cfg).map_err(|e| CliError::failed(e.to_string()))?;
    let handle = backend.handle();
    let _ctl = ControlServer::spawn(&control, handle.clone())
        .map_err(|e| CliError::failed(format!("control socket: {e}")))?;
    let _status = match &group {
        Some(g) => {
            let path = a
                .status_socket
                .clone()
                .unwrap_or_else(|| control.with_file_name("status.sock"));
            Some(
                ControlServer::spawn_shared(&path, handle.clone(), Access::StatusOnly, Some(*g))
                    .map_err(|e| CliError::failed(format!("status socket: {e}")))?,
            )
        }
        None => None,
    };
    let _metrics = match &a.metrics {
        Some(addr) => Some(
            MetricsServer::spawn(addr, handle.clone(), group)
                .map_err(|e| CliError::failed(format!("--metrics: {e}")))?,
        ),
        None => None,
    };
    let h2 = handle.clone();
    let handover = a.handover_on_exit;
    super::signals::on_terminate(move || {
        let _ = super::notify::notify("STOPPING=1");
        if handover {
            h2.handover()
        } else {
            h2.stop()
        }
    })
    .map_err(|e| CliError::failed(format!("signal handler: {e}")))?;
    // Ready once the control socket answers a request (the backend's loop
    // runs in this thread, so ask from another): then tell systemd.
    let ctl2 = control.clone();
    let _ = std::thread::Builder::new()
        .name("refblk-ready".into())
        .spawn(move || match control::request(&ctl2, "status") {
            Ok(_) => {
                info!("refblk serve: ready");
                if let Err(e) = super::notify::notify("READY=1") {
                    log::warn!("sd_notify READY=1: {e}");
                }
            }
            Err(e) => log::error!("control socket does not answer: {e}"),
        });
    backend.run().map_err(|e| CliError::failed(e.to_string()))?;
    info!("refblk serve: stopped");
    Ok(())
}

/// The kinds of device to serve, and why some are left out (for the log).
///
/// Kernel xen-blkback probes every `backend/vbd` device of its domain, and two
/// backends on one device would fight over its `state` node; it never looks
/// at `backend/vbd3`. So with blkback loaded (`blkback_loaded`) the daemon
/// serves vbd3 only, unless told that blkback gets none of refblk's vbd
/// devices (`--allow-blkback`); `--only-vbd3` asks for vbd3 only in any case.
pub fn kinds_to_serve(
    blkback_loaded: bool,
    allow_blkback: bool,
    only_vbd3: bool,
) -> (Vec<Kind>, Option<String>) {
    if only_vbd3 {
        return (
            vec![Kind::Vbd3],
            Some(
                "serving backend/vbd3 devices only (--only-vbd3); backend/vbd is left to \
                 kernel blkback"
                    .into(),
            ),
        );
    }
    if blkback_loaded && !allow_blkback {
        return (
            vec![Kind::Vbd3],
            Some(
                "the kernel's xen-blkback module is loaded and claims every backend/vbd \
                 device: serving backend/vbd3 devices only (disk lines with \
                 backendtype=tap,script=block-refblk, Xen >= 4.19) and leaving backend/vbd \
                 to blkback. To serve vbd disk lines (script=block-refblk without \
                 backendtype) as well, unload and blacklist xen-blkback (docs/xen.md), \
                 or pass --allow-blkback if the toolstack gives blkback none of refblk's \
                 devices"
                    .into(),
            ),
        );
    }
    if blkback_loaded {
        return (
            Kind::ALL.to_vec(),
            Some(
                "the kernel's xen-blkback module is loaded; serving backend/vbd anyway \
                 (--allow-blkback)"
                    .into(),
            ),
        );
    }
    (Kind::ALL.to_vec(), None)
}

/// Arguments of `refblk ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "REFBLK_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Talk to the daemon of the simulated Xen in DIR (its DIR/refblk.sock;
    /// overrides --control).
    #[arg(long, value_name = "DIR")]
    pub sim: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// What to ask the daemon.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Give a claimed device its image (the hotplug script's `add`).
    Attach {
        /// xenstore backend path, e.g. /local/domain/0/backend/vbd/5/51712
        /// or /local/domain/0/backend/vbd3/5/51728.
        backend_path: String,
        /// The image file to serve.
        image: PathBuf,
        /// Serve read-only.
        #[arg(long)]
        ro: bool,
        /// Logical sector size (512 or 4096).
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// An I/O limit of the device, KEY=VALUE (read-iops, write-iops,
        /// read-bps, write-bps, iops, bps, burst); repeat for more.
        #[arg(long = "limit", value_name = "KEY=VALUE")]
        limits: Vec<String>,
    },
    /// Start a pool volume (FICLONE clean → dirty) and serve it on a claimed
    /// device; it is committed or discarded (by its kind) on `detach`.
    AttachVolume {
        /// xenstore backend path.
        backend_path: String,
        /// The pool directory.
        pool: PathBuf,
        /// The volume id, e.g. appvms/work/private.
        vid: String,
        /// Serve read-only.
        #[arg(long)]
        ro: bool,
        /// Logical sector size (512 or 4096).
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// An I/O limit of the device, KEY=VALUE (read-iops, write-iops,
        /// read-bps, write-bps, iops, bps, burst); repeat for more.
        #[arg(long = "limit", value_name = "KEY=VALUE")]
        limits: Vec<String>,
    },
    /// Release a device (the hotplug script's `remove`): close its image and
    /// commit/discard its pool volume.
    Detach {
        /// xenstore backend path.
        backend_path: String,
    },
    /// Re-read image sizes and announce grown disks to the guests.
    Resize,
    /// Show every device the daemon serves.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The `--limit` flags as a patch, checked here so that a bad value is a
/// usage error naming the key.
fn limit_patch(limits: &[String]) -> Result<LimitsPatch, CliError> {
    LimitsPatch::parse_pairs(limits.iter().map(String::as_str))
        .map_err(|e| CliError::usage(format!("--limit {e}")))
}

/// A daemon's answer, or its refusal as the command's failure.
fn answer_of<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, CliError> {
    let a: control::Answer<T> = serde_json::from_value(v)
        .map_err(|e| CliError::failed(format!("unreadable answer from the daemon: {e}")))?;
    match (a.ok, a.body) {
        (true, Some(b)) => Ok(b),
        _ => Err(CliError::failed(
            a.error.unwrap_or_else(|| "unknown error".into()),
        )),
    }
}

/// Run `refblk ctl`.
pub fn run_ctl(a: CtlArgs) -> CliResult {
    let attach_line = |ro: bool, sector_size: u32, limits: &[String]| -> Result<_, CliError> {
        Ok(control::AttachLine {
            read_only: ro,
            sector_size: Some(sector_size),
            limits: limit_patch(limits)?,
        })
    };
    let req = match &a.cmd {
        CtlCommand::Attach {
            backend_path,
            image,
            ro,
            sector_size,
            limits,
        } => Request::Attach {
            backend: backend_path.clone(),
            image: image.clone(),
            options: attach_line(*ro, *sector_size, limits)?,
        },
        CtlCommand::AttachVolume {
            backend_path,
            pool,
            vid,
            ro,
            sector_size,
            limits,
        } => Request::AttachVolume {
            backend: backend_path.clone(),
            pool: pool.clone(),
            vid: vid.clone(),
            options: attach_line(*ro, *sector_size, limits)?,
        },
        CtlCommand::Detach { backend_path } => Request::Detach {
            backend: backend_path.clone(),
        },
        CtlCommand::Resize => Request::Resize,
        CtlCommand::Status { .. } => Request::Status,
    };
    // A path or id with white space cannot travel on the line: a usage error.
    let line = req
        .to_line()
        .map_err(|e| CliError::usage(format!("{e} (not supported)")))?;
    let v = control::request(&socket_of(&a.control, a.sim.as_deref()), &line)?;
    match a.cmd {
        CtlCommand::Status { json: true } => {
            answer_of::<control::Status>(v.clone())?;
            println!("{v}");
        }
        CtlCommand::Status { json: false } => {
            let st: control::Status = answer_of(v)?;
            println!(
                "{:>5} {:<4} {:>9} {:<12} {:>9} {:>9} {:>7} {:>7} IMAGE",
                "DOMID", "KIND", "DEVID", "STATE", "READS", "WRITES", "FLUSH", "ERRORS"
            );
            for d in &st.devices {
                println!(
                    "{:>5} {:<4} {:>9} {:<12} {:>9} {:>9} {:>7} {:>7} {}",
                    d.domid,
                    d.kind,
                    d.devid,
                    d.state,
                    d.reads,
                    d.writes,
                    d.flushes,
                    d.errors,
                    d.image.as_deref().unwrap_or("-")
                );
            }
        }
        CtlCommand::Resize => {
            let r: control::Resized = answer_of(v)?;
            for d in r.resized {
                println!("{}: {} sectors", d.backend, d.sectors);
            }
        }
        CtlCommand::Attach { .. } => {
            answer_of::<control::Attached>(v)?;
        }
        CtlCommand::AttachVolume { .. } => {
            println!("{}", answer_of::<control::Attached>(v)?.image);
        }
        CtlCommand::Detach { .. } => {
            println!("{}", answer_of::<control::Detached>(v)?.result);
        }
    }
    Ok(())
}

/// A device holds a few descriptors (image, event channel, journal, grant
/// mappings): raise the soft RLIMIT_NOFILE to the hard limit so hundreds of
/// devices fit (the usual soft limit is 1024).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::debug!("RLIMIT_NOFILE raised from {soft} to {hard}"),
            Err(e) => log::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => log::warn!("getrlimit(RLIMIT_NOFILE): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_blkback_leaves_backend_vbd_to_it() {
        assert_eq!(
            kinds_to_serve(false, false, false),
            (Kind::ALL.to_vec(), None)
        );
        let (k, why) = kinds_to_serve(true, false, false);
        assert_eq!(k, [Kind::Vbd3]);
        assert!(why.unwrap().contains("xen-blkback"));
        let (k, why) = kinds_to_serve(true, true, false);
        assert_eq!(k, Kind::ALL);
        assert!(why.unwrap().contains("--allow-blkback"));
        for blkback in [false, true] {
            assert_eq!(kinds_to_serve(blkback, false, true).0, [Kind::Vbd3]);
        }
    }
}
