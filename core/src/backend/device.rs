//! One device's resources (a vbd or a vbd3, [`super::Kind`]): its image, and its connection (the guest's
//! rings mapped, event channels bound, the queues on the io workers, the
//! restart state). When to build or tear them down, and every `state` write,
//! is [`super::xenbus`]'s.
//!
//! A connection is built one way, whether negotiated now or taken over from
//! a previous daemon: a [`Plan`] (rings, channels, protocol, the disk as
//! advertised) is prepared — rings mapped, journals created or recovered,
//! channels bound — into a [`Pending`] connection, which [`Device::start`]
//! hands to the io workers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::info;

use super::limiter::{Limiter, LimiterChain};
use super::request::{QueueCtx, QueueStats};
use super::restart::{DeviceState, Journal, QueueState, Replay, StateDir, VolumeRef};
use super::stats::StatsSnapshot;
use super::worker::{Runtime, Ticket, Workers};
use super::xenbus::{self, read_opt, Bus};
use super::{state_dir_of, BackendConfig, DevKey, Event, Kind};
use crate::blkif::frontend_keys::{parse_frontend_keys, Advertised, FrontendKeys};
use crate::blkif::{Abi, BackRing, DiskInfo, Features};
use crate::engine::ImageFile;
use crate::limits::Limits;
use crate::platform::{DomId, EventChannel, Platform};
use crate::xenstore::XsClient;
use xen_sys::xenbus::XenbusState;

/// Per-attach settings from the hotplug path.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Serve read-only even if the toolstack's `mode` says `w`.
    pub read_only: bool,
    /// Logical sector size advertised (512 or 4096).
    pub sector_size: u32,
    /// The device's I/O limits (from the disk line or the pool volume).
    pub limits: Limits,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            read_only: false,
            sector_size: 512,
            limits: Limits::UNLIMITED,
        }
    }
}

/// The image a device serves.
pub(crate) struct Image {
    pub path: PathBuf,
    pub file: File,
    pub read_only: bool,
    pub sector_size: u32,
}

struct QueueHandle {
    ticket: Ticket,
    stats: Arc<QueueStats>,
    finished: Arc<AtomicBool>,
}

struct Connection {
    queues: Vec<QueueHandle>,
    workers: Arc<Workers>,
    sectors: Arc<AtomicU64>,
    abi: Abi,
    /// Where this connection's restart state lives (removed on disconnect).
    state_dir: Option<StateDir>,
}

impl Connection {
    fn stop_queues(&self) {
        stop_queues(&self.workers, &self.queues);
    }
}

/// Ask every queue to stop (each answers what it consumed), then wait until
/// all have let go of their rings and the image.
fn stop_queues(workers: &Workers, queues: &[QueueHandle]) {
    for q in queues {
        workers.stop(&q.ticket);
    }
    for q in queues {
        workers.wait(&q.ticket);
    }
}

/// One queue ready to run: mapped ring, bound channel, journal and the
/// requests to re-execute.
struct Prepared {
    ring: BackRing,
    evtchn: Box<dyn EventChannel>,
    journal: Option<Journal>,
    replay: Vec<Replay>,
}

/// A snapshot of a device for `status`.
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    /// `vbd` or `vbd3`.
    pub kind: Kind,
    pub domid: DomId,
    pub devid: u32,
    pub backend_path: String,
    pub image: Option<PathBuf>,
    pub state: XenbusState,
    pub queues: usize,
    pub protocol: Option<&'static str>,
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub errors: u64,
    pub fdatasyncs: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests re-executed after daemon restarts.
    pub replayed: u64,
    /// Every counter, per-op statistics and histograms (all queues, and the
    /// connections before this one).
    pub stats: StatsSnapshot,
    /// The device's limits.
    pub limits: Limits,
    /// Its domain's limits (shared by the domain's devices).
    pub domain_limits: Limits,
    /// The domain's name (`/local/domain/<id>/name`), if xenstore has it.
    pub domain_name: Option<String>,
    /// The guest's name for the disk (`dev` in the backend, e.g. xvda).
    pub vdev: Option<String>,
    /// The pool volume whose commit this device's attach waits for (the
    /// volume's previous device was released and is still committing it).
    pub waiting_for_commit: Option<String>,
}

pub(crate) struct Device {
    pub key: DevKey,
    pub be: String,
    /// The xenbus side: the backend's state, the frontend watched.
    pub bus: Bus,
    pub image: Option<Image>,
    conn: Option<Connection>,
    /// Counters of queues of earlier connections, so status survives reconnects.
    retired: Vec<Arc<QueueStats>>,
    /// The pool volume whose dirty image is served, if the disk line named one:
    /// committed (or discarded, by its kind) when the device is released.
    pub volume: Option<crate::pool::Volume>,
    /// The hotplug `remove` ran: the device stays quiet until its backend
    /// directory disappears.
    pub detached: bool,
    /// limits: this device's limiter (set at attach, changed live).
    pub limiter: Arc<Limiter>,
    /// limits: its domain's limiter (the Backend's, shared by the domain's devices).
    pub dom_limiter: Arc<Limiter>,
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn write(xs: &XsClient, tx: u32, path: &str, v: &str) -> io::Result<()> {
    xs.write(tx, path, v.as_bytes())
        .map_err(|e| io::Error::other(format!("xenstore write {path}: {e}")))
}

/// What a connection is made of, whether negotiated with the frontend now or
/// recorded by a previous daemon.
struct Plan {
    frontend: String,
    abi: Abi,
    persistent: bool,
    queues: Vec<QueueState>,
    disk: DiskInfo,
}

/// How a connection's queues start.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A new handshake: fresh rings; journals (and the restart state) are
    /// created if the daemon keeps restart state.
    Handshake,
    /// Taking over a previous daemon's rings: each queue's journal says where
    /// the ring stands and which requests to execute again.
    Restart(&'a StateDir),
}

/// A connection prepared (rings mapped, channels bound, restart state saved)
/// but not started: [`Device::start`] or [`Device::abandon`].
pub(crate) struct Pending {
    plan: Plan,
    prepared: Vec<Prepared>,
    file: Arc<ImageFile>,
    state_dir: Option<StateDir>,
    /// Requests the journals hold for re-execution.
    replayed: usize,
}

impl Pending {
    /// The disk as the frontend is told.
    pub fn disk(&self) -> &DiskInfo {
        &self.plan.disk
    }

    /// Whether the queues use persistent grants.
    pub fn persistent(&self) -> bool {
        self.plan.persistent
    }

    /// For the log: queues, protocol, size, features.
    pub fn summary(&self) -> String {
        let d = &self.plan.disk;
        format!(
            "{} queue(s), {}, {} sectors of {} bytes{}{}{}",
            self.plan.queues.len(),
            self.plan.abi.protocol_name(),
            d.sectors,
            d.logical_sector_size,
            if d.read_only { ", read-only" } else { "" },
            if d.features.discard { ", discard" } else { "" },
            if self.plan.persistent {
                ", persistent grants"
            } else {
                ""
            },
        )
    }
}

/// The disk a connection serves, as advertised.
fn disk_info(
    sectors: u64,
    sector_size: u32,
    read_only: bool,
    max_indirect_segments: u32,
    features: Features,
) -> DiskInfo {
    DiskInfo {
        sectors,
        logical_sector_size: sector_size,
        read_only,
        max_indirect_segments,
        features,
    }
}

/// The frontend's rings and channels, validated, within what was advertised.
fn frontend_keys(xs: &XsClient, fe: &str, adv: Advertised) -> io::Result<FrontendKeys> {
    Ok(parse_frontend_keys(fe, &adv, |k| read_opt(xs, k))?)
}

fn queue_states(keys: &FrontendKeys) -> Vec<QueueState> {
    keys.queues
        .iter()
        .map(|q| QueueState {
            ring_refs: q.ring_refs.clone(),
            port: q.event_channel,
        })
        .collect()
}

impl Device {
    pub fn new(key: DevKey, be: String) -> Device {
        Device {
            key,
            be,
            bus: Bus::new(),
            image: None,
            conn: None,
            retired: Vec::new(),
            volume: None,
            detached: false,
            limiter: Arc::new(Limiter::default()),
            dom_limiter: Arc::new(Limiter::default()),
        }
    }

    pub fn name(&self) -> String {
        self.key.to_string()
    }

    /// Open the image the hotplug script resolved.
    pub fn attach(&mut self, xs: &XsClient, path: PathBuf, opts: &AttachOptions) -> io::Result<()> {
        if self.conn.is_some() {
            return Err(io::Error::other(format!(
                "{}: already connected to {}",
                self.name(),
                self.image
                    .as_ref()
                    .map_or("?".into(), |i| i.path.display().to_string())
            )));
        }
        if opts.sector_size != 512 && opts.sector_size != 4096 {
            return Err(err(format!(
                "sector size {} not supported (512 or 4096)",
                opts.sector_size
            )));
        }
        let mode = read_opt(xs, &format!("{}/mode", self.be))?;
        let read_only = opts.read_only || mode.as_deref().is_some_and(|m| !m.contains('w'));
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let md = file.metadata()?;
        if !md.is_file() {
            return Err(err(format!("{}: not a regular file", path.display())));
        }
        if md.len() < u64::from(opts.sector_size) {
            return Err(err(format!(
                "{}: image is smaller than one sector",
                path.display()
            )));
        }
        info!(
            "{}: image {} ({} bytes, {})",
            self.name(),
            path.display(),
            md.len(),
            if read_only { "read-only" } else { "read-write" }
        );
        write(
            xs,
            0,
            &format!("{}/refblk-image", self.be),
            &path.to_string_lossy(),
        )?;
        self.image = Some(Image {
            path,
            file,
            read_only,
            sector_size: opts.sector_size,
        });
        self.limiter.set(opts.limits); // limits: the attach-time device limits
        if !opts.limits.is_unlimited() {
            info!("{}: limits {}", self.name(), opts.limits);
        }
        Ok(())
    }

    fn sectors_of(img: &Image) -> io::Result<u64> {
        let len = img.file.metadata()?.len();
        let per = u64::from(img.sector_size / 512);
        Ok(len / 512 / per * per)
    }

    /// Whether any queue thread has exited (ring violation, I/O failure).
    pub fn queue_failed(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.queues.iter().any(|q| q.finished.load(Ordering::Acquire)))
    }

    /// Build a connection from the frontend's keys (rings mapped, channels
    /// bound, restart state saved before the guest can see Connected), not
    /// started yet.
    pub fn negotiate(
        &mut self,
        xs: &XsClient,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
    ) -> io::Result<Pending> {
        let fe = self
            .bus
            .frontend()
            .ok_or_else(|| err("no frontend path".to_string()))?
            .to_string();
        let img = self
            .image
            .as_ref()
            .ok_or_else(|| err("no image attached".to_string()))?;
        let keys = frontend_keys(
            xs,
            &fe,
            Advertised {
                max_ring_page_order: cfg.max_ring_page_order,
                max_queues: cfg.max_queues,
            },
        )?;
        let sectors = Self::sectors_of(img)?;
        let file = Self::open_for_io(img, cfg)?;
        let plan = Plan {
            frontend: fe,
            abi: keys.abi,
            persistent: cfg.persistent_grants && keys.persistent,
            queues: queue_states(&keys),
            disk: disk_info(
                sectors,
                img.sector_size,
                img.read_only,
                cfg.max_indirect_segments,
                super::request::ops::features(&file.fs, img.read_only),
            ),
        };
        self.prepare(plan, file, Origin::Handshake, platform, cfg)
    }

    /// Map every queue's ring and bind its channel (and, by `origin`, create
    /// or recover its journal); for a handshake, save the restart state.
    fn prepare(
        &self,
        plan: Plan,
        file: Arc<ImageFile>,
        origin: Origin<'_>,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
    ) -> io::Result<Pending> {
        let (domid, devid) = (self.key.domid, self.key.devid);
        let mut prepared = Vec::new();
        let mut replayed = 0;
        for (i, q) in plan.queues.iter().enumerate() {
            let refs = &q.ring_refs;
            let map = platform.map_grant_refs(domid, refs, true).map_err(|e| {
                // Xen refusing the guest's grants (a bad reference, one not
                // granted to us, no such domain) is the guest's state:
                // InvalidData, final for a takeover
                // (`resume_failure_is_final`). Any other failure (an
                // interrupted map) may pass.
                let kind = match e.kind() {
                    io::ErrorKind::InvalidInput
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::NotFound => io::ErrorKind::InvalidData,
                    k => k,
                };
                io::Error::new(kind, format!("map ring {refs:?} of dom{domid}: {e}"))
            })?;
            let mut ring = BackRing::new(map, plan.abi).map_err(|e| err(format!("ring: {e:?}")))?;
            let p = match origin {
                Origin::Handshake => Prepared {
                    evtchn: platform.bind_interdomain(domid, q.port).map_err(|e| {
                        io::Error::new(e.kind(), format!("bind port {} of dom{domid}: {e}", q.port))
                    })?,
                    ring,
                    journal: None,
                    replay: Vec::new(),
                },
                Origin::Restart(sd) => {
                    let jp = sd.journal_path(domid, devid, i);
                    let (journal, rec) =
                        Journal::recover(&jp, plan.abi, ring.size(), ring.shared_rsp_prod())?;
                    ring.resume_at(rec.req_cons, rec.rsp_prod)
                        .map_err(|e| err(format!("ring: {e}")))?;
                    replayed += rec.replay.len();
                    Prepared {
                        evtchn: bind_again(platform, domid, q.port)?,
                        ring,
                        journal: Some(journal),
                        replay: rec.replay,
                    }
                }
            };
            prepared.push(p);
        }
        let state_dir = match (origin, state_dir_of(cfg, self.key.kind)) {
            (Origin::Restart(sd), _) => Some(sd.clone()),
            (Origin::Handshake, None) => None,
            (Origin::Handshake, Some(dir)) => {
                // On disk before the guest can see Connected: a crash in
                // between leaves a state whose backend is not Connected,
                // which the next daemon discards.
                let sd = StateDir::open(&dir)?;
                for (i, p) in prepared.iter_mut().enumerate() {
                    let jp = sd.journal_path(domid, devid, i);
                    p.journal = Some(Journal::create(&jp, plan.abi, p.ring.size(), 0)?);
                }
                sd.save(&self.restart_state(&plan)?)?;
                Some(sd)
            }
        };
        Ok(Pending {
            plan,
            prepared,
            file,
            state_dir,
            replayed,
        })
    }

    /// What a successor needs to take the connection `plan` over.
    fn restart_state(&self, plan: &Plan) -> io::Result<DeviceState> {
        let img = self
            .image
            .as_ref()
            .ok_or_else(|| err("no image attached".to_string()))?;
        let d = &plan.disk;
        Ok(DeviceState {
            domid: self.key.domid,
            devid: self.key.devid,
            backend: self.be.clone(),
            frontend: plan.frontend.clone(),
            image: img.path.clone(),
            read_only: d.read_only,
            sector_size: d.logical_sector_size,
            volume: self.volume.as_ref().map(|v| VolumeRef {
                pool: v.pool().dir().to_path_buf(),
                vid: v.vid().to_string(),
            }),
            abi: plan.abi,
            persistent: plan.persistent,
            sectors: d.sectors,
            features: d.features,
            max_indirect_segments: d.max_indirect_segments,
            limits: Some(self.limiter.limits()).filter(|l| !l.is_unlimited()),
            queues: plan.queues.clone(),
        })
    }

    /// Give up a prepared connection (the guest was not told about it): its
    /// rings and channels are released, its restart state removed.
    pub fn abandon(&self, p: Pending) {
        if let Some(sd) = &p.state_dir {
            sd.remove(self.key.domid, self.key.devid);
        }
        drop(p);
    }

    /// Open the image for the engines: O_DIRECT (per the configuration) through
    /// the device's own descriptor, so a path renamed meanwhile cannot matter.
    fn open_for_io(img: &Image, cfg: &BackendConfig) -> io::Result<Arc<ImageFile>> {
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", img.file.as_raw_fd()));
        let mut f = ImageFile::open(&fd_path, img.read_only, cfg.engine.direct)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", img.path.display())))?;
        f.path = img.path.clone();
        Ok(Arc::new(f))
    }

    /// Hand every queue of a prepared connection to the io workers.
    pub fn start(
        &mut self,
        p: Pending,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
        rt: &Runtime,
    ) -> io::Result<()> {
        let domid = self.key.domid;
        let Pending {
            plan,
            prepared,
            file,
            state_dir,
            replayed: _,
        } = p;
        let (disk, persistent, abi) = (plan.disk, plan.persistent, plan.abi);
        // Zero-copy reads, decided once for the opened image: never from a
        // file whose data the file system checksums (btrfs without NOCOW). Its
        // O_DIRECT read verifies the checksum on the destination pages after
        // the device filled them; in the guest's own pages the guest could
        // change them in between and make dom0's file system report
        // corruption that is not there (docs/security.md, "Zero-copy reads").
        let zero_copy_reads = cfg.zero_copy_reads && !file.fs.data_checksums;
        if persistent && cfg.zero_copy_reads && !zero_copy_reads {
            log::info!(
                "{}: reads take the copy path: {} checksums the image's data (a NOCOW file, chattr +C, has none)",
                self.name(),
                file.fs.fs_name
            );
        }
        let sectors_shared = Arc::new(AtomicU64::new(disk.sectors));
        let mut queues: Vec<QueueHandle> = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            let Prepared {
                ring,
                evtchn,
                journal,
                replay,
            } = p;
            let stats = Arc::new(QueueStats::new(cfg.collect_stats)); // stats: on/off
            let finished = Arc::new(AtomicBool::new(false));
            let ctx = QueueCtx {
                name: format!("{}/q{i}", self.name()),
                image: self
                    .image
                    .as_ref()
                    .map(|i| i.path.clone())
                    .unwrap_or_default(),
                file: file.clone(),
                platform: platform.clone(),
                domid,
                ring,
                evtchn,
                disk,
                sectors: sectors_shared.clone(),
                stats: stats.clone(),
                finished: finished.clone(),
                persistent: persistent.then(|| {
                    super::pgrants::PersistentGrants::new(
                        platform.clone(),
                        domid,
                        cfg.max_persistent_grants,
                    )
                }),
                zero_copy_reads,
                journal,
                replay,
                observer: cfg.observer.clone(),
                // limits: every queue of the device shares the two limiters.
                limiter: LimiterChain {
                    device: self.limiter.clone(),
                    domain: self.dom_limiter.clone(),
                },
            };
            let tx = rt.events.clone();
            let key = self.key;
            let ticket = match rt.workers.add(
                ctx,
                Box::new(move |result| {
                    let _ = tx.send(Event::QueueExit { key, result });
                }),
            ) {
                Ok(t) => t,
                Err(e) => {
                    stop_queues(&rt.workers, &queues);
                    if let Some(sd) = &state_dir {
                        sd.remove(domid, self.key.devid);
                    }
                    return Err(e);
                }
            };
            queues.push(QueueHandle {
                ticket,
                stats,
                finished,
            });
        }
        self.conn = Some(Connection {
            queues,
            workers: rt.workers.clone(),
            sectors: sectors_shared,
            abi,
            state_dir,
        });
        Ok(())
    }

    /// Open the image (taking a pool volume over with `Volume::resume`) that a
    /// previous daemon served, as its state file records it.
    fn reopen_image(&mut self, st: &DeviceState, cfg: &BackendConfig) -> io::Result<PathBuf> {
        let d = self;
        let path = match &st.volume {
            None => st.image.clone(),
            Some(v) => {
                let pool = crate::pool::Pool::open(&v.pool)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let vol = pool
                    .volume(&v.vid)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let owner = super::volume_claim(cfg, d.key, &st.backend);
                let p = vol
                    .resume_owned(&owner)
                    .map_err(|e| io::Error::other(format!("volume {}: resume: {e}", v.vid)))?;
                d.volume = Some(vol);
                // limits: the volume's stored limits (a disk line's are not kept
                // across a restart).
                match crate::pool::limits::load(&v.pool, &v.vid) {
                    Ok(l) => d.limiter.set(l),
                    Err(e) => log::warn!("volume {}: {e}; serving it unlimited", v.vid),
                }
                p
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!st.read_only)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        d.image = Some(Image {
            path: path.clone(),
            file,
            read_only: st.read_only,
            sector_size: st.sector_size,
        });
        Ok(path)
    }

    /// A device whose takeover was refused (the guest was closing or
    /// reconnecting while no daemon ran): keep what it served — the image,
    /// and above all a pool volume, which the device's release must still
    /// commit — without the old rings. The device then goes through the
    /// xenbus handshake (InitWait) like a new one that already has its image:
    /// a frontend that closes is followed to Closed, one still Connected on
    /// rings we cannot map is closed.
    pub fn adopt(
        key: DevKey,
        st: &DeviceState,
        xs: &XsClient,
        cfg: &BackendConfig,
        dom_limiter: Arc<Limiter>,
    ) -> io::Result<Device> {
        let be = key.backend_path(cfg.backend_domid);
        if be != st.backend {
            return Err(err(format!("state is for {}, not {be}", st.backend)));
        }
        let mut d = Device::new(key, be);
        d.dom_limiter = dom_limiter;
        let path = d.reopen_image(st, cfg)?;
        if let Some(l) = st.limits {
            d.limiter.set(l); // limits: as the device had them when it connected
        }
        // Start the handshake over, as for a new device (InitWait): the old
        // rings are not ours, and xenstore must not keep saying Connected.
        xenbus::probe(&mut d, xs, cfg)?;
        info!(
            "{}: kept {}{} from the previous daemon",
            d.name(),
            path.display(),
            if d.volume.is_some() {
                " (pool volume, committed when the device is released)"
            } else {
                ""
            }
        );
        Ok(d)
    }

    /// Rebuild a device a previous daemon left Connected (a restart): no
    /// handshake, the guest never sees a state change. The rings are mapped
    /// again, the event channels re-bound, the image re-opened by path (a
    /// pool volume is taken over with `Volume::resume`), and each queue
    /// starts by re-executing what its journal holds. `Err` means the state
    /// is stale or unusable: the caller removes it and handles the device as
    /// any other.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        key: DevKey,
        st: &DeviceState,
        sd: &StateDir,
        xs: &XsClient,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
        rt: &Runtime,
        dom_limiter: Arc<Limiter>,
    ) -> io::Result<Device> {
        let be = key.backend_path(cfg.backend_domid);
        if be != st.backend {
            return Err(err(format!("state is for {}, not {be}", st.backend)));
        }
        let mut d = Device::new(key, be.clone());
        d.dom_limiter = dom_limiter;
        xenbus::check_resumable(xs, platform, key, &be, &st.frontend)?;
        // The ring references and the channel must be the ones the frontend
        // still advertises (it did not reconnect behind our back).
        let keys = frontend_keys(
            xs,
            &st.frontend,
            Advertised {
                max_ring_page_order: cfg.max_ring_page_order.max(4),
                max_queues: cfg.max_queues.max(st.queues.len() as u32),
            },
        )?;
        if queue_states(&keys) != st.queues || keys.abi != st.abi {
            return Err(err(
                "the frontend's ring references, channels or protocol changed".to_string(),
            ));
        }
        let path = d.reopen_image(st, cfg)?;
        if let Some(l) = st.limits {
            d.limiter.set(l); // limits: as the device had them when it connected
        }
        let img = d.image.as_ref().expect("set above");
        let file = Self::open_for_io(img, cfg)?;
        let plan = Plan {
            frontend: st.frontend.clone(),
            abi: st.abi,
            persistent: st.persistent,
            queues: st.queues.clone(),
            disk: disk_info(
                st.sectors,
                st.sector_size,
                st.read_only,
                st.max_indirect_segments,
                st.features,
            ),
        };
        let pending = d.prepare(plan, file, Origin::Restart(sd), platform, cfg)?;
        let (nq, replayed) = (st.queues.len(), pending.replayed);
        d.start(pending, platform, cfg, rt)?;
        d.bus = Bus::resumed();
        info!(
            "{}: resumed after a restart ({nq} queue(s), {}, {replayed} request(s) to re-execute)",
            d.name(),
            path.display()
        );
        Ok(d)
    }

    /// Stop the queues (in-flight I/O is finished and answered), unmap, unbind.
    pub fn disconnect(&mut self) {
        let Some(c) = self.conn.take() else {
            return;
        };
        c.stop_queues();
        self.retired
            .extend(c.queues.iter().map(|q| q.stats.clone()));
        if let Some(sd) = &c.state_dir {
            sd.remove(self.key.domid, self.key.devid);
        }
        info!("{}: disconnected", self.name());
    }

    /// Stop the queues (each answers and publishes what it consumed) but
    /// leave the device Connected in xenstore and keep its restart state, so
    /// that a successor daemon takes it over (an upgrade).
    pub fn suspend(&mut self) {
        let Some(c) = self.conn.take() else {
            return;
        };
        c.stop_queues();
        info!("{}: suspended for a successor", self.name());
    }

    /// Let go of the image: disconnect and close the file. Returns the pool
    /// volume it served, if any, which the caller must stop (commit or
    /// discard, by its kind: `commit::Commits::start`, off the control thread).
    pub fn release(&mut self) -> Option<crate::pool::Volume> {
        self.disconnect();
        let img = self.image.take();
        drop(img);
        self.volume.take()
    }

    /// The image's size in sectors if it differs from what the connection
    /// serves (`None` without a connection).
    pub fn size_changed(&self) -> io::Result<Option<u64>> {
        let (Some(c), Some(img)) = (self.conn.as_ref(), self.image.as_ref()) else {
            return Ok(None);
        };
        let sectors = Self::sectors_of(img)?;
        Ok((sectors != c.sectors.load(Ordering::Acquire)).then_some(sectors))
    }

    /// Serve `sectors` from now on (after the frontend was told).
    pub fn set_sectors(&self, sectors: u64) {
        if let Some(c) = &self.conn {
            c.sectors.store(sectors, Ordering::Release);
        }
    }

    pub fn status(&self) -> DeviceStatus {
        let mut st = DeviceStatus {
            kind: self.key.kind,
            domid: self.key.domid,
            devid: self.key.devid,
            backend_path: self.be.clone(),
            image: self.image.as_ref().map(|i| i.path.clone()),
            state: self.bus.state(),
            queues: self.conn.as_ref().map_or(0, |c| c.queues.len()),
            protocol: self.conn.as_ref().map(|c| c.abi.protocol_name()),
            requests: 0,
            reads: 0,
            writes: 0,
            flushes: 0,
            discards: 0,
            errors: 0,
            fdatasyncs: 0,
            bytes_read: 0,
            bytes_written: 0,
            replayed: 0,
            stats: StatsSnapshot::default(),
            limits: self.limiter.limits(),
            domain_limits: self.dom_limiter.limits(),
            domain_name: None,
            vdev: None,
            waiting_for_commit: None,
        };
        let live = self
            .conn
            .iter()
            .flat_map(|c| c.queues.iter().map(|q| &q.stats));
        for s in live.chain(self.retired.iter()) {
            st.stats.merge(&s.snapshot());
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            st.requests += g(&s.requests);
            st.reads += g(&s.reads);
            st.writes += g(&s.writes);
            st.flushes += g(&s.flushes);
            st.discards += g(&s.discards);
            st.errors += g(&s.errors);
            st.fdatasyncs += g(&s.fdatasyncs);
            st.bytes_read += g(&s.bytes_read);
            st.bytes_written += g(&s.bytes_written);
            st.replayed += g(&s.replayed);
        }
        st
    }
}

/// Whether a failed [`Device::resume`] is final: the guest's side no longer
/// matches the recorded state (its domain, xenstore states, ring references,
/// channels or protocol changed, Xen refuses its ring grants, or its ring
/// disagrees with the journal), all of which are `InvalidData`. Anything else
/// (a channel the dead daemon still holds, an interrupted map, a volume
/// still busy, a xenstore hiccup) may pass: the caller tries the device
/// again.
pub fn resume_failure_is_final(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

/// Bind a guest's port again. Xen binds a guest's port only once the old
/// binding is closed, and Linux closes the dead daemon's when the last
/// reference to its `/dev/xen/evtchn` file goes. A killed daemon's io_uring
/// holds one (its poll on the channel) until the ring's exit work drops it,
/// after the process is gone; the simulator's broker may also notice a
/// moment later. Retry for a short while; the caller tries again later.
fn bind_again(
    platform: &Arc<dyn Platform>,
    domid: DomId,
    port: u32,
) -> io::Result<Box<dyn EventChannel>> {
    let t0 = std::time::Instant::now();
    let deadline = t0 + std::time::Duration::from_secs(3);
    let mut tries = 0u32;
    loop {
        tries += 1;
        match platform.bind_interdomain(domid, port) {
            Ok(c) => {
                if tries > 1 {
                    log::info!(
                        "bound port {port} of dom{domid} again after {tries} tries, {} ms \
                         (the previous daemon's end was still open)",
                        t0.elapsed().as_millis()
                    );
                }
                return Ok(c);
            }
            Err(e) if std::time::Instant::now() < deadline => {
                log::debug!("bind port {port} of dom{domid}: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "bind port {port} of dom{domid} again: {e} ({tries} tries in {} ms)",
                        t0.elapsed().as_millis()
                    ),
                ))
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.disconnect();
    }
}
