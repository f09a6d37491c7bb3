//! The backend daemon: watches `backend/vbd` and `backend/vbd3` in xenstore
//! ([`Kind`]), claims the devices whose hotplug script is refblk's, runs each
//! device's xenbus state machine ([`xenbus`]: every transition and every
//! `state` write) and serves its rings ([`device`]: image, rings, queues; see
//! [`request`] for the request path).
//!
//! Threading: one control thread (this module's [`Backend::run`]) owns the
//! xenstore connection and every [`device::Device`]; each connected queue has
//! one thread with its own io_uring, which sleeps in `io_uring_enter` and never
//! touches xenstore. Queue threads report their exit over a channel; the control
//! thread stops them through an eventfd and joins them. A released device's pool
//! volume is committed on a thread of its own ([`commit`]), never on the control
//! thread.

mod commit;
pub mod control;
pub mod device;
pub mod limiter;
pub mod pgrants;
pub mod request;
pub mod restart;
pub mod stats;
#[doc(hidden)]
pub mod testing;
pub(crate) mod worker;
pub(crate) mod xenbus;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use log::{debug, info, warn};

pub use device::{AttachOptions, DeviceStatus};

use crate::engine::EngineConfig;
use crate::limits::{Limits, LimitsPatch};
use crate::platform::{DomId, Platform};
use crate::xenstore::XsClient;
use device::Device;
use limiter::Limiter;

/// How long a restarted daemon goes on trying to take over the devices whose
/// takeover failed for a reason that may pass (`device::resume_failure_is_final`:
/// say, an event channel its killed predecessor still holds), all such
/// devices together, before it gives up on them and closes them under their
/// guests.
pub const RESUME_WAIT: Duration = Duration::from_secs(30);

/// Which try at taking a device over this is (see [`Backend::resume_devices`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Try {
    First,
    Again,
    /// After [`RESUME_WAIT`]: a failure is final whatever it is.
    Last,
}

/// Which backend directory a device is in: the kind libxl gives it.
///
/// - `vbd`: `backend/vbd/<domid>/<devid>`, libxl's `phy` backend (every
///   version). Kernel xen-blkback probes every device of this kind, so refblk
///   serves it only where blkback is not loaded (or in a driver domain).
/// - `vbd3`: `backend/vbd3/<domid>/<devid>`, libxl >= 4.19's
///   `backendtype=tap` (a userspace backend; blkback never looks at it), with
///   `params` = `<format>:<target>`.
///
/// The frontend is `device/vbd/<devid>` for both, and libxl numbers both from
/// one device-id space per guest; refblk still keys every device by kind too,
/// so that two directories of different kinds are never confused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Vbd,
    Vbd3,
}

impl Kind {
    /// Every kind refblk can serve.
    pub const ALL: [Kind; 2] = [Kind::Vbd, Kind::Vbd3];

    /// The directory name under `backend/` (and the name in logs and status).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vbd => "vbd",
            Kind::Vbd3 => "vbd3",
        }
    }

    /// `vbd` or `vbd3`.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A device: its kind, frontend domain and device id. Shown as
/// `vbd 5/51712` or `vbd3 5/51712`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevKey {
    pub kind: Kind,
    pub domid: DomId,
    pub devid: u32,
}

impl DevKey {
    pub fn new(kind: Kind, domid: DomId, devid: u32) -> DevKey {
        DevKey { kind, domid, devid }
    }

    /// The device's backend directory in backend domain `backend_domid`.
    pub fn backend_path(&self, backend_domid: DomId) -> String {
        format!(
            "{}/{}/{}",
            kind_dir(backend_domid, self.kind),
            self.domid,
            self.devid
        )
    }

    /// The device whose backend directory (or a node in it) is `path`, if
    /// it is one in backend domain `backend_domid`:
    /// `/local/domain/<be>/backend/<kind>/<domid>/<devid>[/...]`.
    pub fn of_backend_path(backend_domid: DomId, path: &str) -> Option<DevKey> {
        Kind::ALL.into_iter().find_map(|kind| {
            let rest = path
                .strip_prefix(&kind_dir(backend_domid, kind))?
                .strip_prefix('/')?;
            let mut it = rest.split('/');
            let domid = strict_number(it.next()?)?;
            let devid = strict_number(it.next()?)?;
            Some(DevKey::new(kind, domid, devid))
        })
    }
}

impl std::fmt::Display for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.domid, self.devid)
    }
}

/// `/local/domain/<backend_domid>/backend/<kind>`: where the toolstack puts
/// the devices of `kind`.
pub fn kind_dir(backend_domid: DomId, kind: Kind) -> String {
    format!("/local/domain/{backend_domid}/backend/{kind}")
}

/// A decimal number as xenstore directory names carry them (digits only:
/// `parse` alone would take `+5`).
fn strict_number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Where the restart state of devices of `kind` lives: the state directory
/// itself for `vbd` (as before vbd3 existed), its `vbd3/` subdirectory for
/// `vbd3`, so that a vbd and a vbd3 device of the same domain and device id
/// never share a state file or a journal.
pub(crate) fn state_dir_of(cfg: &BackendConfig, kind: Kind) -> Option<PathBuf> {
    let dir = cfg.state_dir.as_ref()?;
    Some(match kind {
        Kind::Vbd => dir.clone(),
        Kind::Vbd3 => dir.join(Kind::Vbd3.name()),
    })
}

/// Why the daemon refused a command (attach, detach, resize, limit); the
/// control socket's `error` is its text.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The device, domain or target is not one the command can apply to.
    #[error("{0}")]
    Refused(String),
    /// The pool refused (opening it, starting or stopping the volume).
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    /// Reading the image or talking to xenstore failed (the error says which).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The daemon is stopping or has stopped.
    #[error("{0}")]
    Stopped(&'static str),
}

impl From<String> for CommandError {
    fn from(why: String) -> CommandError {
        CommandError::Refused(why)
    }
}

/// A refusal, as the command's result.
fn refuse<T>(why: String) -> Result<T, CommandError> {
    Err(CommandError::Refused(why))
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Our own domain (0 in dom0; a storage driver domain otherwise).
    pub backend_domid: DomId,
    /// Claim devices whose `script` node ends with this.
    pub script_match: String,
    /// The kinds of device to serve (watch `backend/<kind>`); both by
    /// default. `refblk serve` leaves out `vbd` where kernel blkback is
    /// loaded (it would claim those devices too).
    pub kinds: Vec<Kind>,
    /// Largest `ring-page-order` we accept (0..=4).
    pub max_ring_page_order: u32,
    /// Most queues a frontend may use.
    pub max_queues: u32,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u32,
    /// Accept `feature-persistent` from frontends that offer it (map data pages
    /// once and memcpy, instead of a grant copy per request).
    pub persistent_grants: bool,
    /// Most persistently mapped pages per queue (grant copies beyond that;
    /// `pgrants`).
    pub max_persistent_grants: usize,
    /// With persistent grants, read straight into the guest's mapped pages
    /// when every segment of a read is mapped and fits the image's direct-I/O
    /// alignment (zero-copy reads, `request::data`); otherwise, and when off,
    /// reads are copied out of the worker's buffer. On by default.
    pub zero_copy_reads: bool,
    /// io_uring workers serving all queues (0: one per CPU).
    pub workers: usize,
    /// After a busy pass, a worker polls its rings and completions for this
    /// many microseconds before it sleeps (0: never). Trades CPU for the
    /// wake-up latency of low-queue-depth round trips.
    pub poll_us: u32,
    /// io_uring engine settings of every worker (one ring and one registered
    /// buffer slab per worker, shared by the queues it serves).
    pub engine: EngineConfig,
    /// Keep restart state here (one file per connected device, one journal
    /// per queue) and take over the devices found in it on start. `None`:
    /// no restart support (a new daemon cannot serve a live guest's rings).
    pub state_dir: Option<PathBuf>,
    /// Test hook: told about every request step of every queue.
    pub observer: Option<request::Observer>,
    /// Collect per-request statistics (per-op counters, latency histograms,
    /// gauges). On by default; `REFBLK_NO_STATS=1` turns it off (to measure
    /// what it costs).
    pub collect_stats: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            backend_domid: 0,
            script_match: "block-refblk".into(),
            kinds: Kind::ALL.to_vec(),
            max_ring_page_order: 4,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent_grants: false,
            max_persistent_grants: pgrants::DEFAULT_MAX_PERSISTENT,
            zero_copy_reads: true,
            workers: 0,
            poll_us: 0,
            engine: EngineConfig {
                // One worker's ring serves many queues: room for their polls and
                // for several deep rings in flight.
                queue_depth: 512,
                slab_bytes: 8 << 20,
                ..EngineConfig::default()
            },
            state_dir: None,
            observer: None,
            collect_stats: stats::collection_enabled_by_env(),
        }
    }
}

/// The largest request's data (bytes) with `max_indirect_segments` offered:
/// every segment a whole page.
pub fn largest_request_bytes(max_indirect_segments: u32) -> usize {
    let segs = (max_indirect_segments.min(crate::blkif::MAX_INDIRECT_SEGMENTS) as usize)
        .max(xen_sys::blkif::BLKIF_MAX_SEGMENTS_PER_REQUEST);
    segs * crate::platform::PAGE_SIZE
}

/// Messages to the control thread.
pub(crate) enum Event {
    QueueExit {
        key: DevKey,
        result: Result<(), request::QueueError>,
    },
    /// A volume's commit (or discard) is done; `result` answers its `detach`.
    Committed {
        key: commit::VolumeKey,
        result: Result<String, CommandError>,
    },
}

enum Command {
    Attach {
        backend_path: String,
        image: PathBuf,
        opts: AttachOptions,
        reply: Sender<Result<(), CommandError>>,
    },
    AttachVolume {
        backend_path: String,
        pool: PathBuf,
        vid: String,
        opts: AttachOptions,
        reply: Sender<Result<PathBuf, CommandError>>,
    },
    Detach {
        backend_path: String,
        reply: Sender<Result<String, CommandError>>,
    },
    Resize {
        reply: Sender<Result<Vec<(String, u64)>, CommandError>>,
    },
    Status {
        reply: Sender<Vec<DeviceStatus>>,
    },
    SetLimits {
        target: String,
        patch: LimitsPatch,
        reply: Sender<Result<LimitsSet, CommandError>>,
    },
    Stop,
    /// Stop for a successor: keep devices Connected and their state.
    Handover,
}

/// A handle to a running backend (cheap to clone, usable from any thread).
#[derive(Clone)]
pub struct BackendHandle {
    tx: Sender<Command>,
}

impl BackendHandle {
    /// Give the device at `backend_path` its image (the hotplug `add` step).
    pub fn attach(
        &self,
        backend_path: &str,
        image: impl Into<PathBuf>,
        opts: AttachOptions,
    ) -> Result<(), CommandError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Command::Attach {
                backend_path: backend_path.to_string(),
                image: image.into(),
                opts,
                reply,
            })
            .map_err(|_| CommandError::Stopped("backend is not running"))?;
        rx.recv()
            .map_err(|_| CommandError::Stopped("backend stopped"))
            .and_then(|r| r)
    }

    /// Start the pool volume `vid` of the pool in `pool` (FICLONE clean → dirty)
    /// and serve its dirty image on the device; the volume is committed (or
    /// discarded, by its kind) when the device is detached or removed. Returns
    /// the path served.
    pub fn attach_volume(
        &self,
        backend_path: &str,
        pool: impl Into<PathBuf>,
        vid: &str,
        opts: AttachOptions,
    ) -> Result<PathBuf, CommandError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Command::AttachVolume {
                backend_path: backend_path.to_string(),
                pool: pool.into(),
                vid: vid.to_string(),
                opts,
                reply,
            })
            .map_err(|_| CommandError::Stopped("backend is not running"))?;
        rx.recv()
            .map_err(|_| CommandError::Stopped("backend stopped"))
            .and_then(|r| r)
    }

    /// The hotplug `remove` step: disconnect the device, close its image and
    /// stop its pool volume if it has one. Says what happened.
    pub fn detach(&self, backend_path: &str) -> Result<String, CommandError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Command::Detach {
                backend_path: backend_path.to_string(),
                reply,
            })
            .map_err(|_| CommandError::Stopped("backend is not running"))?;
        rx.recv()
            .map_err(|_| CommandError::Stopped("backend stopped"))
            .and_then(|r| r)
    }

    /// Re-read every connected image's size and announce changes.
    pub fn resize(&self) -> Result<Vec<(String, u64)>, CommandError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Command::Resize { reply })
            .map_err(|_| CommandError::Stopped("backend is not running"))?;
        rx.recv()
            .map_err(|_| CommandError::Stopped("backend stopped"))
            .and_then(|r| r)
    }

    /// Status of every claimed device.
    pub fn status(&self) -> Vec<DeviceStatus> {
        let (reply, rx) = bounded(1);
        if self.tx.send(Command::Status { reply }).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Change the I/O limits of `target` (see [`LimitTarget`] for the
    /// syntax): the keys `patch` sets change, the others stay. Takes effect
    /// on the device's running queues within [`limiter::MAX_WAIT`].
    pub fn set_limits(&self, target: &str, patch: LimitsPatch) -> Result<LimitsSet, CommandError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Command::SetLimits {
                target: target.to_string(),
                patch,
                reply,
            })
            .map_err(|_| CommandError::Stopped("backend is not running"))?;
        rx.recv()
            .map_err(|_| CommandError::Stopped("backend stopped"))
            .and_then(|r| r)
    }

    /// Ask the backend to disconnect everything and return from `run`.
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }

    /// Ask the backend to return from `run` leaving its devices Connected for
    /// a successor (an upgrade): every queue answers what it consumed and
    /// stops; xenstore is not touched; the restart state stays (without a
    /// `state_dir` this is the same as [`stop`](Self::stop)).
    pub fn handover(&self) {
        let _ = self.tx.send(Command::Handover);
    }
}

/// What `limit` resolved its target to and the limits now in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsSet {
    pub target: LimitTarget,
    /// e.g. `domain 5 (work)`, `vbd 5/51712` or `vbd3 5/51728`.
    pub describe: String,
    pub limits: Limits,
}

/// What a limit applies to.
///
/// Syntax of a target: a domain is its id (`5`) or its name (`work`, from
/// `/local/domain/<id>/name`); a device is a backend path
/// (`/local/domain/0/backend/vbd/5/51712`, `/local/domain/0/backend/vbd3/5/51728`)
/// or `DOMAIN/VDEV` where DOMAIN is an id or a name and VDEV the device id
/// (`51712`) or its Linux name (`xvda`); `DOMAIN/VDEV` is refused when the
/// domain has devices of both kinds with that id (name the backend path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitTarget {
    Domain(DomId),
    Device(DevKey),
}

/// A Linux vdev name (`xvda`, `xvdab`) → blkif device id, as libxl numbers them.
pub fn vdev_to_devid(v: &str) -> Option<u32> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse().ok();
    }
    let letters = v.strip_prefix("xvd")?;
    if letters.is_empty() || letters.len() > 3 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    // a..z = 0..25, aa = 26, ... (bijective base 26).
    let mut idx: u32 = 0;
    for b in letters.bytes() {
        idx = idx * 26 + u32::from(b - b'a') + 1;
    }
    let idx = idx - 1;
    if idx < 16 {
        Some((202 << 8) | (idx << 4))
    } else if idx < (1 << 20) {
        Some((1 << 28) | (idx << 8))
    } else {
        None
    }
}

/// A blkif device id → its Linux name (`51712` → `xvda`), if it has one.
pub fn devid_to_vdev(id: u32) -> Option<String> {
    let idx = if id >> 8 == 202 && id & 0xf == 0 {
        (id >> 4) & 0xf
    } else if id & (1 << 28) != 0 && id & 0xff == 0 {
        (id & !(1 << 28)) >> 8
    } else {
        return None;
    };
    let mut n = idx + 1;
    let mut s = Vec::new();
    while n > 0 {
        n -= 1;
        s.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    s.reverse();
    Some(format!("xvd{}", String::from_utf8(s).ok()?))
}

/// The backend daemon.
pub struct Backend {
    platform: Arc<dyn Platform>,
    cfg: BackendConfig,
    xs: XsClient,
    devices: BTreeMap<DevKey, Device>,
    /// limits: one limiter per domain, shared by its devices.
    dom_limiters: BTreeMap<DomId, Arc<Limiter>>,
    cmd_tx: Sender<Command>,
    cmd_rx: Receiver<Command>,
    rt: worker::Runtime,
    ev_rx: Receiver<Event>,
    /// Volume commits in flight, each on its own thread.
    commits: commit::Commits,
}

/// Watch tokens: `refblk:be:<kind>` for a kind's backend directory.
const TOKEN_BACKEND: &str = "refblk:be:";
const TOKEN_RELEASE: &str = "refblk:release";

impl Backend {
    /// Connect to xenstore and set the watches.
    pub fn new(platform: Arc<dyn Platform>, mut cfg: BackendConfig) -> io::Result<Backend> {
        // A request waits for buffer space rather than fail, so every worker's
        // slab must hold the largest request a guest may send.
        let largest = largest_request_bytes(cfg.max_indirect_segments);
        if cfg.engine.slab_bytes < largest {
            info!(
                "buffer slab per worker grown from {} KiB to {} KiB: the largest request ({} segments) must fit",
                cfg.engine.slab_bytes >> 10,
                largest >> 10,
                largest / crate::platform::PAGE_SIZE
            );
            cfg.engine.slab_bytes = largest;
        }
        let xs = platform.xenstore()?;
        cfg.kinds.sort();
        cfg.kinds.dedup();
        if cfg.kinds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no kind of device to serve (vbd, vbd3)",
            ));
        }
        for &kind in &cfg.kinds {
            let dir = kind_dir(cfg.backend_domid, kind);
            xs.watch(&dir, &format!("{TOKEN_BACKEND}{kind}"))
                .map_err(|e| io::Error::other(format!("xenstore watch {dir}: {e}")))?;
        }
        xs.watch("@releaseDomain", TOKEN_RELEASE)
            .map_err(|e| io::Error::other(format!("xenstore watch @releaseDomain: {e}")))?;
        let (cmd_tx, cmd_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        let workers = Arc::new(worker::Workers::start(
            cfg.workers,
            &cfg.engine,
            Duration::from_micros(u64::from(cfg.poll_us)),
        )?);
        let dirs: Vec<String> = cfg
            .kinds
            .iter()
            .map(|&k| kind_dir(cfg.backend_domid, k))
            .collect();
        info!("watching {} on {} xen", dirs.join(" and "), platform.name());
        let commits = commit::Commits::new(ev_tx.clone());
        let mut b = Backend {
            platform,
            cfg,
            xs,
            devices: BTreeMap::new(),
            dom_limiters: BTreeMap::new(),
            cmd_tx,
            cmd_rx,
            rt: worker::Runtime {
                events: ev_tx,
                workers,
            },
            ev_rx,
            commits,
        };
        // Before any watch event is handled: a device we take over must not
        // be probed (InitWait) like a new one.
        b.resume_devices()?;
        Ok(b)
    }

    /// Take over the devices a previous daemon left Connected (`state_dir`:
    /// one directory per kind, see [`state_dir_of`]). A device whose takeover
    /// failed for a reason that may pass (see
    /// `device::resume_failure_is_final`) is tried again after the others,
    /// 100 ms later, then twice as long after each try (at most 2 s), until
    /// [`RESUME_WAIT`] has passed since the first try: the devices taken over
    /// meanwhile are already serving.
    fn resume_devices(&mut self) -> io::Result<()> {
        let mut later = Vec::new();
        for kind in Kind::ALL {
            let Some(dir) = state_dir_of(&self.cfg, kind) else {
                break;
            };
            if kind != Kind::Vbd && !dir.exists() {
                continue; // no vbd3 device was ever connected
            }
            if !self.cfg.kinds.contains(&kind) {
                let left = restart::StateDir::open(&dir).map(|sd| sd.list().len());
                if left.is_ok_and(|n| n > 0) {
                    warn!(
                        "{}: restart state of {kind} devices, which this daemon does not serve; \
                         left alone",
                        dir.display()
                    );
                }
                continue;
            }
            let sd = restart::StateDir::open(&dir)?;
            for (path, st) in sd.list() {
                match st {
                    Ok(st) => {
                        if !self.resume_device(kind, &sd, &st, Try::First) {
                            later.push((kind, sd.clone(), st));
                        }
                    }
                    Err(e) => {
                        warn!("{e}: removing the stale state");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let deadline = std::time::Instant::now() + RESUME_WAIT;
        let mut pause = Duration::from_millis(100);
        while !later.is_empty() {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
            let t = if std::time::Instant::now() >= deadline {
                Try::Last
            } else {
                Try::Again
            };
            later.retain(|(kind, sd, st)| !self.resume_device(*kind, sd, st, t));
        }
        Ok(())
    }

    /// Take over one device of a previous daemon, or, if its rings cannot be
    /// taken over, keep its image and volume and start its handshake over.
    /// False when the takeover failed for a reason that may pass and this is
    /// not the last try: try again later.
    fn resume_device(
        &mut self,
        kind: Kind,
        sd: &restart::StateDir,
        st: &restart::DeviceState,
        t: Try,
    ) -> bool {
        let key = DevKey::new(kind, st.domid, st.devid);
        let dl = self.domain_limiter(st.domid);
        let e = match Device::resume(
            key,
            st,
            sd,
            &self.xs,
            &self.platform,
            &self.cfg,
            &self.rt,
            dl,
        ) {
            Ok(d) => {
                self.devices.insert(key, d);
                return true;
            }
            Err(e) => e,
        };
        if t != Try::Last && !device::resume_failure_is_final(&e) {
            if t == Try::First {
                info!(
                    "{key}: cannot take the device over yet ({e}); \
                     trying again after the other devices (for up to {} s)",
                    RESUME_WAIT.as_secs()
                );
            } else {
                debug!("{key}: cannot take the device over yet ({e})");
            }
            return false;
        }
        warn!(
            "{key}: cannot take the device over ({e}); removing its state, \
             handling it as a new device that keeps its image"
        );
        sd.remove(st.domid, st.devid);
        // Keep the image and volume: the hotplug `add` already ran for this
        // device and will not run again, and a volume must still be committed
        // when the device goes.
        let dl = self.domain_limiter(st.domid);
        match Device::adopt(key, st, &self.xs, &self.cfg, dl) {
            Ok(d) => {
                self.devices.insert(key, d);
            }
            Err(e) => warn!("{key}: cannot reopen its image either ({e})"),
        }
        true
    }

    /// A handle for commands (attach, resize, status, stop).
    pub fn handle(&self) -> BackendHandle {
        BackendHandle {
            tx: self.cmd_tx.clone(),
        }
    }

    /// Start a backend on its own thread.
    pub fn spawn(
        platform: Arc<dyn Platform>,
        cfg: BackendConfig,
    ) -> io::Result<(BackendHandle, JoinHandle<io::Result<()>>)> {
        let b = Backend::new(platform, cfg)?;
        let h = b.handle();
        let t = std::thread::Builder::new()
            .name("refblk-control".into())
            .spawn(move || b.run())?;
        Ok((h, t))
    }

    /// Serve until [`BackendHandle::stop`].
    pub fn run(mut self) -> io::Result<()> {
        let events = self.xs.events().clone();
        let mut handover = false;
        let mut lost = None;
        loop {
            select! {
                recv(events) -> ev => match ev {
                    Ok(ev) => self.on_watch(&ev.path, &ev.token),
                    Err(_) => {
                        lost = Some(io::Error::other("xenstore connection lost"));
                        break;
                    }
                },
                recv(self.cmd_rx) -> cmd => {
                    match cmd {
                        Ok(Command::Stop) | Err(_) => break,
                        Ok(Command::Handover) => {
                            handover = self.cfg.state_dir.is_some();
                            break;
                        }
                        Ok(c) => self.on_command(c),
                    }
                }
                recv(self.ev_rx) -> ev => match ev {
                    Ok(Event::QueueExit { key, result }) => {
                        if let Err(e) = result {
                            warn!("{key}: {e}; disconnecting the device");
                        }
                        self.reconcile(key);
                    }
                    Ok(Event::Committed { key, result }) => {
                        // Attaches of the volume waited for this commit.
                        for c in self.commits.finish(&key, result) {
                            self.on_command(c);
                        }
                    }
                    Err(_) => {}
                },
                default(Duration::from_millis(500)) => {
                    // Domains can vanish without @releaseDomain (simulator, lost events).
                    let keys: Vec<DevKey> = self.devices.keys().copied().collect();
                    for k in keys { self.reconcile(k); }
                    self.prune_domain_limiters();
                }
            }
        }
        if handover {
            info!(
                "stopping for a successor: {} device(s) stay connected",
                self.devices.len()
            );
        } else {
            info!("stopping: disconnecting {} device(s)", self.devices.len());
        }
        let keys: Vec<DevKey> = self.devices.keys().copied().collect();
        for k in keys {
            if let Some(mut d) = self.devices.remove(&k) {
                if handover {
                    d.suspend();
                } else {
                    d.disconnect();
                }
                d.bus.unwatch(&self.xs);
            }
        }
        self.wait_for_commits();
        if !handover {
            // Every device let go of its restart state: leave no empty
            // per-kind directory behind either.
            for kind in [Kind::Vbd3] {
                if let Some(dir) = state_dir_of(&self.cfg, kind) {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        lost.map_or(Ok(()), Err)
    }

    /// Before the daemon exits (stop, handover, xenstore lost): wait for the
    /// commits in flight, so that the process never exits in the middle of
    /// one, and answer their `detach`es. Attaches waiting for them are
    /// refused.
    fn wait_for_commits(&mut self) {
        if self.commits.is_empty() {
            return;
        }
        info!(
            "stopping: waiting for {} volume commit(s) in flight",
            self.commits.len()
        );
        while !self.commits.is_empty() {
            match self.ev_rx.recv() {
                Ok(Event::Committed { key, result }) => {
                    for c in self.commits.finish(&key, result) {
                        if let Command::AttachVolume {
                            backend_path,
                            vid,
                            reply,
                            ..
                        } = c
                        {
                            let _ = reply.send(refuse(format!(
                                "{backend_path}: volume {vid} was not attached: refblk serve \
                                 stopped while the volume was being committed (its commit is \
                                 done); attach it again once the daemon runs"
                            )));
                        }
                    }
                }
                Ok(Event::QueueExit { .. }) => {}
                Err(_) => break,
            }
        }
        info!("stopping: every volume commit is done");
    }

    /// The commit that command `c` must wait for: an attach of a volume whose
    /// commit runs (a guest reboot: the toolstack adds the disk again while
    /// the old one's commit runs). It is handled when the commit is done,
    /// without blocking the control thread.
    fn commit_to_wait_for(&self, c: &Command) -> Option<commit::VolumeKey> {
        let Command::AttachVolume {
            backend_path,
            pool,
            vid,
            ..
        } = c
        else {
            return None;
        };
        let key = commit::volume_key(pool, vid);
        if !self.commits.is_running(&key) {
            return None;
        }
        info!("{backend_path}: volume {vid} is being committed; its attach waits for the commit");
        Some(key)
    }

    fn on_command(&mut self, mut c: Command) {
        if let Some(key) = self.commit_to_wait_for(&c) {
            match self.commits.defer(&key, c) {
                None => return,
                Some(back) => c = back,
            }
        }
        match c {
            Command::Attach {
                backend_path,
                image,
                opts,
                reply,
            } => {
                let r = self.attach(&backend_path, image, &opts);
                let _ = reply.send(r);
            }
            Command::AttachVolume {
                backend_path,
                pool,
                vid,
                opts,
                reply,
            } => {
                let r = self.attach_volume(&backend_path, &pool, &vid, &opts);
                let _ = reply.send(r);
            }
            Command::Detach {
                backend_path,
                reply,
            } => {
                let r = match self.key_of(&backend_path) {
                    Err(e) => Err(e),
                    Ok(k) => match self.devices.get_mut(&k) {
                        None => refuse(format!("{backend_path}: no such device")),
                        Some(d) => {
                            match xenbus::removed(d, &self.xs) {
                                None => Ok("released".to_string()),
                                Some(v) => {
                                    // Answered when the commit is done.
                                    self.commits.start(k.to_string(), v, Some(reply));
                                    return;
                                }
                            }
                        }
                    },
                };
                let _ = reply.send(r);
            }
            Command::Resize { reply } => {
                let mut out = Vec::new();
                let mut errs = Vec::new();
                for d in self.devices.values_mut() {
                    match xenbus::resize(d, &self.xs) {
                        Ok(Some(s)) => out.push((d.be.clone(), s)),
                        Ok(None) => {}
                        Err(e) => errs.push(e.to_string()),
                    }
                }
                let _ = reply.send(if errs.is_empty() {
                    Ok(out)
                } else {
                    refuse(errs.join("; "))
                });
            }
            Command::Status { reply } => {
                let mut v: Vec<DeviceStatus> = self.devices.values().map(|d| d.status()).collect();
                for s in &mut v {
                    let name = format!("/local/domain/{}/name", s.domid);
                    s.domain_name = xenbus::read_opt(&self.xs, &name).ok().flatten();
                    let dev = format!("{}/dev", s.backend_path);
                    s.vdev = xenbus::read_opt(&self.xs, &dev)
                        .ok()
                        .flatten()
                        .or_else(|| devid_to_vdev(s.devid));
                    s.waiting_for_commit = self
                        .commits
                        .attach_waiting(&s.backend_path)
                        .map(str::to_string);
                }
                let _ = reply.send(v);
            }
            Command::SetLimits {
                target,
                patch,
                reply,
            } => {
                let _ = reply.send(self.set_limits(&target, &patch));
            }
            Command::Stop | Command::Handover => {}
        }
    }

    /// limits: the limiter of domain `domid` (created unlimited).
    fn domain_limiter(&mut self, domid: DomId) -> Arc<Limiter> {
        self.dom_limiters.entry(domid).or_default().clone()
    }

    /// Forget the limits of domains that are gone and have no device (a new
    /// domain reusing the id starts unlimited).
    fn prune_domain_limiters(&mut self) {
        let gone: Vec<DomId> = self
            .dom_limiters
            .keys()
            .copied()
            .filter(|&d| {
                !self.devices.keys().any(|k| k.domid == d)
                    && !self.platform.domain_exists(d).unwrap_or(true)
            })
            .collect();
        for d in gone {
            debug!("dom{d}: gone, forgetting its limits");
            self.dom_limiters.remove(&d);
        }
    }

    /// A domain name or id → the id.
    fn resolve_domain(&self, s: &str) -> Result<DomId, CommandError> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let d: DomId = s
                .parse()
                .map_err(|_| format!("{s}: not a domain id (0..65535)"))?;
            let known = self.devices.keys().any(|k| k.domid == d)
                || self.platform.domain_exists(d).unwrap_or(false);
            return if known {
                Ok(d)
            } else {
                refuse(format!("domain {d} does not exist"))
            };
        }
        for id in self.xs.directory(0, "/local/domain").unwrap_or_default() {
            let Ok(d) = id.parse::<DomId>() else { continue };
            let name = xenbus::read_opt(&self.xs, &format!("/local/domain/{id}/name"));
            if name.ok().flatten().as_deref() == Some(s) {
                return Ok(d);
            }
        }
        refuse(format!(
            "{s:?}: no domain of that name (no /local/domain/*/name is {s:?})"
        ))
    }

    /// Parse a limit target (syntax in [`LimitTarget`]).
    fn resolve_target(&self, t: &str) -> Result<LimitTarget, CommandError> {
        let bad_dev = |why: CommandError| {
            format!(
                "{t}: {why} (a device is a backend path or DOMAIN/VDEV such as 5/xvda;                  a domain an id or a name)"
            )
        };
        let key = if t.starts_with('/') {
            self.key_of(t).map_err(bad_dev)?
        } else if let Some((dom, vdev)) = t.split_once('/') {
            let d = self.resolve_domain(dom)?;
            let id = vdev_to_devid(vdev).ok_or_else(|| {
                bad_dev(CommandError::Refused(format!(
                    "{vdev:?} is not a device id or xvd name"
                )))
            })?;
            let mut found = self
                .devices
                .keys()
                .filter(|k| k.domid == d && k.devid == id);
            match (found.next(), found.next()) {
                (Some(&k), None) => k,
                (Some(a), Some(b)) => {
                    return refuse(format!(
                        "{t}: domain {d} has a vbd and a vbd3 device {id}; name one by its \
                         backend path ({} or {})",
                        self.devices[a].be, self.devices[b].be
                    ))
                }
                _ => return refuse(format!("{t}: refblk serves no device {d}/{id}")),
            }
        } else {
            return Ok(LimitTarget::Domain(self.resolve_domain(t)?));
        };
        if !self.devices.contains_key(&key) {
            return refuse(format!("{t}: refblk serves no device {key}"));
        }
        Ok(LimitTarget::Device(key))
    }

    fn set_limits(&mut self, target: &str, patch: &LimitsPatch) -> Result<LimitsSet, CommandError> {
        let t = self.resolve_target(target)?;
        let (lim, describe) = match t {
            LimitTarget::Domain(d) => {
                let name = xenbus::read_opt(&self.xs, &format!("/local/domain/{d}/name"))
                    .ok()
                    .flatten();
                let desc = match name {
                    Some(n) => format!("domain {d} ({n})"),
                    None => format!("domain {d}"),
                };
                (self.domain_limiter(d), desc)
            }
            LimitTarget::Device(k) => {
                let d = self.devices.get(&k).expect("resolved above");
                (d.limiter.clone(), k.to_string())
            }
        };
        let limits = lim.limits().patched(patch);
        if !patch.is_empty() {
            lim.set(limits);
            info!("{describe}: limits now {limits}");
        }
        Ok(LimitsSet {
            target: t,
            describe,
            limits,
        })
    }

    /// The device at backend path `be` for a hotplug `add`: claimed now if
    /// the backend has not seen it yet.
    fn device_to_attach(&mut self, be: &str) -> Result<DevKey, CommandError> {
        let key = self.key_of(be)?;
        if !self.devices.contains_key(&key) {
            self.reconcile(key);
        }
        if !self.devices.contains_key(&key) {
            return refuse(format!(
                "{be}: no such device, or its script is not refblk's"
            ));
        }
        Ok(key)
    }

    fn attach(
        &mut self,
        be: &str,
        image: PathBuf,
        opts: &AttachOptions,
    ) -> Result<(), CommandError> {
        let key = self.device_to_attach(be)?;
        let d = self
            .devices
            .get_mut(&key)
            .expect("checked by device_to_attach");
        d.attach(&self.xs, image, opts)?;
        self.reconcile(key);
        Ok(())
    }

    fn attach_volume(
        &mut self,
        be: &str,
        pool: &std::path::Path,
        vid: &str,
        opts: &AttachOptions,
    ) -> Result<PathBuf, CommandError> {
        let key = self.device_to_attach(be)?;
        let d = self
            .devices
            .get_mut(&key)
            .expect("checked by device_to_attach");
        if d.image.is_some() {
            return refuse(format!("{be}: already has an image"));
        }
        let pool = crate::pool::Pool::open(pool)?;
        let vol = pool.volume(vid)?;
        let fresh = vol.state() == crate::pool::VolumeState::Stopped;
        let owner = volume_claim(&self.cfg, key, be);
        let path = vol.start_owned(&owner)?;
        if let Err(e) = d.attach(&self.xs, path.clone(), opts) {
            if fresh {
                // Leave the pool as it was: the new dirty image is an unused clone.
                if let Err(e2) = vol.discard() {
                    warn!("{be}: volume {vid}: undoing the start failed: {e2}");
                }
            } else {
                // A recovered dirty image holds a guest's uncommitted writes: keep it.
                warn!(
                    "{be}: volume {vid} keeps its recovered dirty image; \
                     `refblk volume stop` commits it"
                );
            }
            return Err(e.into());
        }
        d.volume = Some(vol);
        self.reconcile(key);
        Ok(path)
    }

    /// The device served at backend path `path`
    /// (`/local/domain/<be>/backend/<kind>/<domid>/<devid>[/...]`), or why
    /// there is none.
    fn key_of(&self, path: &str) -> Result<DevKey, CommandError> {
        let bd = self.cfg.backend_domid;
        let Some(key) = DevKey::of_backend_path(bd, path) else {
            return refuse(format!(
                "{path}: not a backend path under {}",
                self.cfg
                    .kinds
                    .iter()
                    .map(|&k| kind_dir(bd, k))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        };
        if !self.cfg.kinds.contains(&key.kind) {
            return refuse(format!(
                "{path}: this refblk serve does not serve {} devices (it leaves them to \
                 kernel blkback, which is loaded, or was started with --only-vbd3): give \
                 the disk line backendtype=tap,script=block-refblk for a vbd3 device",
                key.kind
            ));
        }
        Ok(key)
    }

    fn on_watch(&mut self, path: &str, token: &str) {
        debug!("watch {token}: {path}");
        match token {
            t if t.starts_with(TOKEN_BACKEND) => match self.key_of(path) {
                Ok(k) => self.reconcile(k),
                Err(_) => self.scan(),
            },
            TOKEN_RELEASE => {
                let keys: Vec<DevKey> = self.devices.keys().copied().collect();
                for k in keys {
                    self.reconcile(k);
                }
            }
            t => {
                if let Some(k) = xenbus::key_of_token(t) {
                    self.reconcile(k);
                }
            }
        }
    }

    /// Look at every device in the backend directories of the kinds served.
    fn scan(&mut self) {
        let mut keys: Vec<DevKey> = Vec::new();
        for &kind in &self.cfg.kinds {
            let dir = kind_dir(self.cfg.backend_domid, kind);
            for d in self.xs.directory(0, &dir).unwrap_or_default() {
                let Some(domid) = strict_number::<DomId>(&d) else {
                    continue;
                };
                for dev in self
                    .xs
                    .directory(0, &format!("{dir}/{d}"))
                    .unwrap_or_default()
                {
                    if let Some(devid) = strict_number::<u32>(&dev) {
                        keys.push(DevKey::new(kind, domid, devid));
                    }
                }
            }
        }
        keys.extend(self.devices.keys().copied());
        keys.sort();
        keys.dedup();
        for k in keys {
            self.reconcile(k);
        }
    }

    /// Move one device a step towards what xenstore says it should be.
    fn reconcile(&mut self, key: DevKey) {
        if let Err(e) = self.reconcile_inner(key) {
            warn!("{key}: {e}");
            if let Some(d) = self.devices.get_mut(&key) {
                xenbus::failed(d, &self.xs);
            }
        }
    }

    /// Claim a new device of ours, forget one whose directory is gone, and
    /// let [`xenbus::step`] move the others.
    fn reconcile_inner(&mut self, key: DevKey) -> io::Result<()> {
        let be = key.backend_path(self.cfg.backend_domid);
        let xs = &self.xs;
        if !xenbus::backend_present(xs, &be)? {
            if let Some(mut d) = self.devices.remove(&key) {
                info!("{key}: backend removed");
                if d.volume.is_some() {
                    // No hotplug `remove` came (toolstack crash): commit anyway.
                    if let Some(v) = d.release() {
                        self.commits.start(key.to_string(), v, None);
                    }
                }
                d.disconnect();
                d.bus.unwatch(xs);
            }
            return Ok(());
        }
        if !self.devices.contains_key(&key) {
            let script = xenbus::read_opt(xs, &format!("{be}/script"))?.unwrap_or_default();
            if !script.ends_with(&self.cfg.script_match) {
                return Ok(()); // someone else's device
            }
            let mut d = Device::new(key, be.clone());
            xenbus::probe(&mut d, xs, &self.cfg)?;
            // limits: the domain's shared limiter.
            d.dom_limiter = self.dom_limiters.entry(key.domid).or_default().clone();
            self.devices.insert(key, d);
        }
        let d = self.devices.get_mut(&key).expect("inserted above");
        let env = xenbus::Env {
            platform: &self.platform,
            cfg: &self.cfg,
            rt: &self.rt,
        };
        xenbus::step(d, xs, &env)
    }
}

/// The claim this daemon puts on a pool volume it serves on device `key` at
/// backend path `be`: its pid and the device's restart-state file (see
/// `crate::pool::owner`; the file name is `StateDir::state_path`'s).
pub(crate) fn volume_claim(cfg: &BackendConfig, key: DevKey, be: &str) -> crate::pool::Owner {
    let state_file = state_dir_of(cfg, key.kind)
        .map(|d| d.join(format!("vbd-{}-{}.json", key.domid, key.devid)));
    crate::pool::Owner::this_process(u32::from(key.domid), key.devid, be, state_file)
}

#[cfg(test)]
mod tests {
    use super::{devid_to_vdev, vdev_to_devid};

    #[test]
    fn vdev_names_and_device_ids() {
        // As libxl numbers xvd disks (docs/misc/vbd-interface in Xen).
        assert_eq!(vdev_to_devid("xvda"), Some(51712));
        assert_eq!(vdev_to_devid("xvdb"), Some(51728));
        assert_eq!(vdev_to_devid("xvdp"), Some(51952));
        assert_eq!(vdev_to_devid("xvdq"), Some((1 << 28) | (16 << 8)));
        assert_eq!(vdev_to_devid("xvdaa"), Some((1 << 28) | (26 << 8)));
        assert_eq!(vdev_to_devid("51712"), Some(51712));
        for bad in ["", "xvd", "sda", "xvdA", "xvd1", "xvdabcd", "-1"] {
            assert_eq!(vdev_to_devid(bad), None, "{bad}");
        }
        for v in ["xvda", "xvdp", "xvdq", "xvdz", "xvdaa", "xvdzz", "xvdabc"] {
            let id = vdev_to_devid(v).unwrap();
            assert_eq!(devid_to_vdev(id).as_deref(), Some(v), "{v} = {id}");
        }
        assert_eq!(devid_to_vdev(51713), None); // a partition
        assert_eq!(devid_to_vdev(768), None); // hda
    }
}
