//! One vbd device: the xenbus state machine of the backend side, as Linux
//! blkback runs it, driven level-triggered: every watch event re-reads the
//! relevant keys and moves the device one step towards where it should be.

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
use super::{BackendConfig, DevKey, Event};
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
    pub fe: Option<String>,
    pub state: XenbusState,
    pub image: Option<Image>,
    conn: Option<Connection>,
    /// Token of our watch on the frontend's state, if set.
    pub fe_watch: Option<(String, String)>,
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

fn parse_uint(s: &str) -> Option<u64> {
    let s = s.trim_end_matches('\0');
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Read a key; `Ok(None)` if it does not exist.
pub(crate) fn read_opt(xs: &XsClient, path: &str) -> io::Result<Option<String>> {
    xs.try_read_string(0, path)
        .map_err(|e| io::Error::other(format!("xenstore read {path}: {e}")))
}

fn state_of(xs: &XsClient, path: &str) -> io::Result<XenbusState> {
    Ok(read_opt(xs, path)?
        .and_then(|s| parse_uint(&s))
        .and_then(|v| u32::try_from(v).ok())
        .and_then(XenbusState::from_u32)
        .unwrap_or(XenbusState::Unknown))
}

fn write(xs: &XsClient, tx: u32, path: &str, v: &str) -> io::Result<()> {
    xs.write(tx, path, v.as_bytes())
        .map_err(|e| io::Error::other(format!("xenstore write {path}: {e}")))
}

impl Device {
    pub fn new(key: DevKey, be: String) -> Device {
        Device {
            key,
            be,
            fe: None,
            state: XenbusState::Unknown,
            image: None,
            conn: None,
            fe_watch: None,
            retired: Vec::new(),
            volume: None,
            detached: false,
            limiter: Arc::new(Limiter::default()),
            dom_limiter: Arc::new(Limiter::default()),
        }
    }

    fn name(&self) -> String {
        format!("vbd {}/{}", self.key.0, self.key.1)
    }

    pub fn switch_state(&mut self, xs: &XsClient, s: XenbusState) -> io::Result<()> {
        if self.state != s {
            info!("{}: state {:?} -> {:?}", self.name(), self.state, s);
        }
        self.state = s;
        write(
            xs,
            0,
            &format!("{}/state", self.be),
            &(s as u32).to_string(),
        )
    }

    /// Claim the device: publish what we support and move to InitWait.
    pub fn probe(&mut self, xs: &XsClient, cfg: &BackendConfig) -> io::Result<()> {
        let be = &self.be;
        xs.transaction(|tx| {
            let w = |k: &str, v: String| xs.write(tx, &format!("{be}/{k}"), v.as_bytes());
            w(
                "feature-max-indirect-segments",
                cfg.max_indirect_segments.to_string(),
            )?;
            w("multi-queue-max-queues", cfg.max_queues.to_string())?;
            w("max-ring-page-order", cfg.max_ring_page_order.to_string())?;
            w("feature-flush-cache", "1".into())?;
            w("feature-barrier", "1".into())?;
            w("state", (XenbusState::InitWait as u32).to_string())
        })
        .map_err(|e| io::Error::other(format!("{be}: probe: {e}")))?;
        info!("{}: claimed, state InitWait", self.name());
        self.state = XenbusState::InitWait;
        Ok(())
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

    /// Map the rings, bind the channels, advertise the disk, go Connected.
    pub fn connect(
        &mut self,
        xs: &XsClient,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
        rt: &Runtime,
    ) -> io::Result<()> {
        let fe = self
            .fe
            .clone()
            .ok_or_else(|| err("no frontend path".to_string()))?;
        let img = self
            .image
            .as_ref()
            .ok_or_else(|| err("no image attached".to_string()))?;
        let domid = self.key.0;
        let keys = super::fekeys::parse_frontend_keys(
            &fe,
            &super::fekeys::Limits {
                max_ring_page_order: cfg.max_ring_page_order,
                max_queues: cfg.max_queues,
            },
            |k| read_opt(xs, k),
        )?;
        let abi = keys.abi;
        let persistent = cfg.persistent_grants && keys.persistent;
        let sectors = Self::sectors_of(img)?;
        let file = Self::open_for_io(img, cfg)?;

        let nq = keys.queues.len();
        let mut prepared = Vec::new();
        for qk in &keys.queues {
            let (refs, port) = (&qk.ring_refs, qk.event_channel);
            let map = platform.map_grant_refs(domid, refs, true).map_err(|e| {
                io::Error::new(e.kind(), format!("map ring {refs:?} of dom{domid}: {e}"))
            })?;
            let ring = BackRing::new(map, abi).map_err(|e| err(format!("ring: {e:?}")))?;
            let evtchn = platform.bind_interdomain(domid, port).map_err(|e| {
                io::Error::new(e.kind(), format!("bind port {port} of dom{domid}: {e}"))
            })?;
            prepared.push(Prepared {
                ring,
                evtchn,
                journal: None,
                replay: Vec::new(),
            });
        }
        let caps = file.fs.clone();
        let discard = caps.punch_hole && !img.read_only;
        let secure = discard && caps.zero_range;
        let disk = DiskInfo {
            sectors,
            logical_sector_size: img.sector_size,
            read_only: img.read_only,
            max_indirect_segments: cfg.max_indirect_segments,
            features: Features {
                flush: true,
                barrier: true,
                discard,
                discard_secure: secure,
            },
        };
        // The restart state is on disk before the guest can see Connected: a
        // crash in between leaves a state whose backend is not Connected,
        // which the next daemon discards.
        let state_dir = match &cfg.state_dir {
            None => None,
            Some(dir) => {
                let sd = StateDir::open(dir)?;
                for (i, p) in prepared.iter_mut().enumerate() {
                    let jp = sd.journal_path(domid, self.key.1, i);
                    p.journal = Some(Journal::create(&jp, abi, p.ring.size(), 0)?);
                }
                let st = DeviceState {
                    domid,
                    devid: self.key.1,
                    backend: self.be.clone(),
                    frontend: fe.clone(),
                    image: img.path.clone(),
                    read_only: img.read_only,
                    sector_size: img.sector_size,
                    volume: self.volume.as_ref().map(|v| VolumeRef {
                        pool: v.pool().dir().to_path_buf(),
                        vid: v.vid().to_string(),
                    }),
                    abi,
                    persistent,
                    sectors,
                    discard,
                    discard_secure: secure,
                    max_indirect_segments: cfg.max_indirect_segments,
                    limits: Some(self.limiter.limits()).filter(|l| !l.is_unlimited()),
                    queues: keys
                        .queues
                        .iter()
                        .map(|q| QueueState {
                            ring_refs: q.ring_refs.clone(),
                            port: q.event_channel,
                        })
                        .collect(),
                };
                sd.save(&st)?;
                Some(sd)
            }
        };
        let be = self.be.clone();
        let info = if img.read_only {
            xen_sys::blkif::VDISK_READONLY
        } else {
            0
        };
        xs.transaction(|tx| {
            let w = |k: &str, v: String| xs.write(tx, &format!("{be}/{k}"), v.as_bytes());
            w("sectors", sectors.to_string())?;
            w("sector-size", img.sector_size.to_string())?;
            w("physical-sector-size", "4096".into())?;
            w("info", info.to_string())?;
            w("feature-flush-cache", "1".into())?;
            w("feature-barrier", "1".into())?;
            w("feature-discard", u8::from(discard).to_string())?;
            if discard {
                w("discard-granularity", "4096".into())?;
                w("discard-alignment", "0".into())?;
                w("discard-secure", u8::from(secure).to_string())?;
            }
            w("feature-persistent", u8::from(persistent).to_string())?;
            w("state", (XenbusState::Connected as u32).to_string())
        })
        .map_err(|e| {
            if let Some(sd) = &state_dir {
                sd.remove(domid, self.key.1);
            }
            io::Error::other(format!("{be}: connect: {e}"))
        })?;
        let (sector_size, img_ro) = (img.sector_size, img.read_only);
        self.start_queues(
            platform, cfg, rt, &file, prepared, disk, persistent, abi, state_dir,
        )?;
        info!(
            "{}: connected ({} queue(s), {}, {} sectors of {} bytes{}{}{})",
            self.name(),
            nq,
            abi.protocol_name(),
            sectors,
            sector_size,
            if img_ro { ", read-only" } else { "" },
            if discard { ", discard" } else { "" },
            if persistent {
                ", persistent grants"
            } else {
                ""
            },
        );
        Ok(())
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

    /// Hand every prepared queue to the io workers and become Connected.
    #[allow(clippy::too_many_arguments)]
    fn start_queues(
        &mut self,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
        rt: &Runtime,
        file: &Arc<ImageFile>,
        prepared: Vec<Prepared>,
        disk: DiskInfo,
        persistent: bool,
        abi: Abi,
        state_dir: Option<StateDir>,
    ) -> io::Result<()> {
        let domid = self.key.0;
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
                    return Err(e);
                }
            };
            queues.push(QueueHandle {
                ticket,
                stats,
                finished,
            });
        }
        self.state = XenbusState::Connected;
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
                let owner = super::volume_claim(cfg, (st.domid, st.devid), &st.backend);
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
        st: &DeviceState,
        xs: &XsClient,
        cfg: &BackendConfig,
        dom_limiter: Arc<Limiter>,
    ) -> io::Result<Device> {
        let be = format!(
            "/local/domain/{}/backend/vbd/{}/{}",
            cfg.backend_domid, st.domid, st.devid
        );
        if be != st.backend {
            return Err(err(format!("state is for {}, not {be}", st.backend)));
        }
        let mut d = Device::new((st.domid, st.devid), be);
        d.dom_limiter = dom_limiter;
        let path = d.reopen_image(st, cfg)?;
        if let Some(l) = st.limits {
            d.limiter.set(l); // limits: as the device had them when it connected
        }
        // Start the handshake over, as for a new device (InitWait): the old
        // rings are not ours, and xenstore must not keep saying Connected.
        d.probe(xs, cfg)?;
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
    pub fn resume(
        st: &DeviceState,
        sd: &StateDir,
        xs: &XsClient,
        platform: &Arc<dyn Platform>,
        cfg: &BackendConfig,
        rt: &Runtime,
        dom_limiter: Arc<Limiter>,
    ) -> io::Result<Device> {
        let key = (st.domid, st.devid);
        let be = format!(
            "/local/domain/{}/backend/vbd/{}/{}",
            cfg.backend_domid, st.domid, st.devid
        );
        if be != st.backend {
            return Err(err(format!("state is for {}, not {be}", st.backend)));
        }
        let mut d = Device::new(key, be.clone());
        d.dom_limiter = dom_limiter;
        if !platform.domain_exists(st.domid)? {
            return Err(err(format!("domain {} is gone", st.domid)));
        }
        let bstate = state_of(xs, &format!("{be}/state"))?;
        let fe = read_opt(xs, &format!("{be}/frontend"))?;
        if fe.as_deref() != Some(st.frontend.as_str()) {
            return Err(err(format!("{be}/frontend is now {fe:?}")));
        }
        let fstate = frontend_state(xs, &st.frontend)?;
        if bstate != XenbusState::Connected || fstate != XenbusState::Connected {
            return Err(err(format!(
                "backend is {bstate:?}, frontend {fstate:?} (both must still be Connected)"
            )));
        }
        if !online(xs, &be)? {
            return Err(err(format!("{be}/online is 0")));
        }
        // The ring references and the channel must be the ones the frontend
        // still advertises (it did not reconnect behind our back).
        let keys = super::fekeys::parse_frontend_keys(
            &st.frontend,
            &super::fekeys::Limits {
                max_ring_page_order: cfg.max_ring_page_order.max(4),
                max_queues: cfg.max_queues.max(st.queues.len() as u32),
            },
            |k| read_opt(xs, k),
        )?;
        let now: Vec<QueueState> = keys
            .queues
            .iter()
            .map(|q| QueueState {
                ring_refs: q.ring_refs.clone(),
                port: q.event_channel,
            })
            .collect();
        if now != st.queues || keys.abi != st.abi {
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
        let domid = st.domid;
        let mut prepared = Vec::new();
        let mut replayed = 0;
        for (i, q) in st.queues.iter().enumerate() {
            let map = platform
                .map_grant_refs(domid, &q.ring_refs, true)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("map ring {:?} of dom{domid}: {e}", q.ring_refs),
                    )
                })?;
            let mut ring = BackRing::new(map, st.abi).map_err(|e| err(format!("ring: {e:?}")))?;
            let jp = sd.journal_path(domid, st.devid, i);
            let (journal, rec) =
                Journal::recover(&jp, st.abi, ring.size(), ring.shared_rsp_prod())?;
            ring.resume_at(rec.req_cons, rec.rsp_prod)
                .map_err(|e| err(format!("ring: {e}")))?;
            let evtchn = bind_again(platform, domid, q.port)?;
            replayed += rec.replay.len();
            prepared.push(Prepared {
                ring,
                evtchn,
                journal: Some(journal),
                replay: rec.replay,
            });
        }
        let disk = DiskInfo {
            sectors: st.sectors,
            logical_sector_size: st.sector_size,
            read_only: st.read_only,
            max_indirect_segments: st.max_indirect_segments,
            features: Features {
                flush: true,
                barrier: true,
                discard: st.discard,
                discard_secure: st.discard_secure,
            },
        };
        d.start_queues(
            platform,
            cfg,
            rt,
            &file,
            prepared,
            disk,
            st.persistent,
            st.abi,
            Some(sd.clone()),
        )?;
        info!(
            "{}: resumed after a restart ({} queue(s), {}, {replayed} request(s) to re-execute)",
            d.name(),
            st.queues.len(),
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
            sd.remove(self.key.0, self.key.1);
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

    /// Re-read the image size; if it changed, announce it (sectors + state in
    /// one transaction, as blkback does). Returns the new size in sectors.
    pub fn resize(&mut self, xs: &XsClient) -> io::Result<Option<u64>> {
        let (Some(c), Some(img)) = (self.conn.as_ref(), self.image.as_ref()) else {
            return Ok(None);
        };
        let sectors = Self::sectors_of(img)?;
        if sectors == c.sectors.load(Ordering::Acquire) {
            return Ok(None);
        }
        let be = self.be.clone();
        xs.transaction(|tx| {
            xs.write(tx, &format!("{be}/sectors"), sectors.to_string().as_bytes())?;
            xs.write(
                tx,
                &format!("{be}/state"),
                (XenbusState::Connected as u32).to_string().as_bytes(),
            )
        })
        .map_err(|e| io::Error::other(format!("{be}: resize: {e}")))?;
        c.sectors.store(sectors, Ordering::Release);
        info!("{}: resized to {sectors} sectors", self.name());
        Ok(Some(sectors))
    }

    pub fn status(&self) -> DeviceStatus {
        let mut st = DeviceStatus {
            domid: self.key.0,
            devid: self.key.1,
            backend_path: self.be.clone(),
            image: self.image.as_ref().map(|i| i.path.clone()),
            state: self.state,
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

/// Bind a guest's port again. The previous daemon's end is closed when its
/// process dies, but the event channel driver (or the simulator's broker) may
/// notice a moment later: retry for a short while.
fn bind_again(
    platform: &Arc<dyn Platform>,
    domid: DomId,
    port: u32,
) -> io::Result<Box<dyn EventChannel>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match platform.bind_interdomain(domid, port) {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() < deadline => {
                log::debug!("bind port {port} of dom{domid}: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("bind port {port} of dom{domid} again: {e}"),
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

/// The frontend state for a device, `Unknown` if the key or the frontend is gone.
pub(crate) fn frontend_state(xs: &XsClient, fe: &str) -> io::Result<XenbusState> {
    state_of(xs, &format!("{fe}/state"))
}

/// Whether the toolstack wants the device (`online` missing counts as 1).
pub(crate) fn online(xs: &XsClient, be: &str) -> io::Result<bool> {
    Ok(read_opt(xs, &format!("{be}/online"))?
        .map(|s| s.trim_end_matches('\0') != "0")
        .unwrap_or(true))
}

#[cfg(test)]
mod tests {
    use super::parse_uint;

    #[test]
    fn frontend_numbers_are_parsed_strictly() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("4294967295"), Some(u32::MAX as u64));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1e3",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_uint(bad), None, "{bad:?}");
        }
    }
}
