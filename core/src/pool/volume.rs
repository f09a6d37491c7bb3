//! One volume and its lifecycle operations.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

use super::config::{VolumeConfig, VolumeKind};
use super::error::{ErrorKind, IoContext, PoolError, Result};
use super::fsops::Ops;
use super::layout::{self, Revision, VolPaths};
use super::owner::{Liveness, Owner};
use super::users::{confirmed_users_of, users_of, xenstore_users, User, SETTLE};
use super::{dev_ino, read_json_file, write_json, Pool};

/// Command-line overrides of a volume's settings (for volumes without a sidecar,
/// e.g. a pool laid out by Qubes, or to change settings for one operation).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Kind.
    pub kind: Option<VolumeKind>,
    /// Source volume (snapshot kinds).
    pub source: Option<String>,
    /// revisions_to_keep.
    pub revisions_to_keep: Option<i64>,
    /// Size (volatile volumes without a sidecar).
    pub size: Option<u64>,
}

/// What [`Volume::stop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The dirty image became the clean image.
    Committed,
    /// The dirty image was thrown away.
    Discarded,
    /// There was no dirty image: nothing to do.
    NotRunning,
}

/// Where [`Volume::import`] reads from.
pub enum ImportSource<'a> {
    /// A file (reflinked when on the same file system, else copied sparsely).
    File(&'a Path),
    /// A stream (e.g. stdin), named for messages.
    Reader(&'a mut dyn Read, &'a str),
}

/// A volume's runtime state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// No dirty image.
    Stopped,
    /// Started in this boot and not stopped.
    Running,
    /// A dirty image without a start record of this boot: an interrupted start or
    /// stop, a crashed host, or a volume Qubes left running. `start` resumes it,
    /// `stop` commits it.
    Interrupted,
}

impl VolumeState {
    /// Name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Stopped => "stopped",
            VolumeState::Running => "running",
            VolumeState::Interrupted => "interrupted",
        }
    }
}

/// Facts about a volume for `volume info` / `list`.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    /// The id.
    pub vid: String,
    /// Settings in effect.
    pub config: VolumeConfig,
    /// Whether a sidecar exists.
    pub has_sidecar: bool,
    /// Runtime state.
    pub state: VolumeState,
    /// Size in bytes (dirty, else clean, else configured).
    pub size: Option<u64>,
    /// Bytes allocated on disk (dirty, else clean).
    pub usage: u64,
    /// The clean image path.
    pub clean: PathBuf,
    /// Whether the clean image exists.
    pub clean_exists: bool,
    /// The dirty (served) image path.
    pub dirty: PathBuf,
    /// Revisions, oldest first.
    pub revisions: Vec<Revision>,
    /// Snapshot volume whose clean is not the source's current clean.
    pub outdated: bool,
    /// The daemon serving it, while its claim holds.
    pub owner: Option<(Owner, Liveness)>,
    /// Other programs using its images (a writer, a loop device, a xenstore
    /// backend).
    pub users: Vec<User>,
    /// Where the settings come from: `qubes.xml`, `sidecar` or `defaults`.
    pub settings: &'static str,
    /// The qube and volume name qubes.xml gives it.
    pub qubes: Option<(String, String)>,
}

impl VolumeInfo {
    /// JSON for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "vid": self.vid,
            "kind": self.config.kind.as_str(),
            "source": self.config.source,
            "revisions_to_keep": self.config.revisions_to_keep,
            "rw": self.config.rw,
            "sidecar": self.has_sidecar,
            "settings": self.settings,
            "qube": self.qubes.as_ref().map(|(d, n)| json!({"name": d, "volume": n})),
            "state": self.state.as_str(),
            "size": self.size,
            "usage": self.usage,
            "clean": self.clean,
            "clean_exists": self.clean_exists,
            "path": self.dirty,
            "outdated": self.outdated,
            "users": self.users.iter().map(|u| json!({
                "pid": u.pid,
                "who": u.who,
                "image": u.image,
            })).collect::<Vec<_>>(),
            "owner": self.owner.as_ref().map(|(o, l)| {
                let mut v = o.to_json();
                v["daemon_alive"] = json!(*l == Liveness::Live);
                v
            }),
            "revisions": self.revisions.iter().map(|r| json!({
                "revision": r.n.to_string(),
                "timestamp": format!("{}Z", r.timestamp),
                "path": r.path,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One finding of `pool check`.
#[derive(Debug, Clone)]
pub struct CheckItem {
    /// The volume.
    pub vid: String,
    /// What is wrong (and what was or would be done).
    pub problem: String,
    /// Whether it was repaired.
    pub repaired: bool,
    /// Whether it needs an administrator (cannot be repaired automatically).
    pub fatal: bool,
}

/// A volume of a pool. Settings are re-read under the volume lock by each operation.
#[derive(Debug, Clone)]
pub struct Volume {
    pool: Pool,
    vid: String,
    paths: VolPaths,
    ov: Overrides,
}

/// The held per-volume flock; released on drop.
pub struct VolumeLock {
    _lock: Flock<File>,
}

/// Largest volume size: the largest file size Linux allows (`i64::MAX`), rounded
/// down to whole 512-byte sectors.
pub const MAX_VOLUME_SIZE: u64 = (i64::MAX as u64) & !511;

/// A volume size must be positive, whole 512-byte sectors (the block device's
/// unit: a guest sees `size / 512` sectors) and at most [`MAX_VOLUME_SIZE`].
pub fn check_size(vid: &str, size: u64) -> Result<()> {
    let why = if size == 0 {
        "a volume cannot be empty".to_string()
    } else if !size.is_multiple_of(512) {
        let (down, up) = (size / 512 * 512, (size / 512 + 1) * 512);
        format!(
            "not a whole number of 512-byte sectors (a guest would see {down} bytes); use {}",
            if down == 0 {
                up.to_string()
            } else {
                format!("{down} or {up}")
            }
        )
    } else if size > MAX_VOLUME_SIZE {
        format!("more than the largest file size Linux allows ({MAX_VOLUME_SIZE} bytes)")
    } else {
        return Ok(());
    };
    Err(PoolError::new(
        ErrorKind::InvalidInput,
        format!("volume {vid}: invalid size {size}: {why}"),
    ))
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Volume {
    pub(crate) fn open(pool: &Pool, vid: &str, ov: Overrides) -> Result<Volume> {
        layout::validate_vid(vid).map_err(|m| PoolError::new(ErrorKind::InvalidInput, m))?;
        if let Some(s) = &ov.source {
            layout::validate_vid(s)
                .map_err(|m| PoolError::new(ErrorKind::InvalidInput, format!("source: {m}")))?;
        }
        let v = Volume {
            pool: pool.clone(),
            vid: vid.to_string(),
            paths: VolPaths::new(pool.dir(), vid),
            ov,
        };
        v.config()?; // validate settings now
        Ok(v)
    }

    /// The volume id.
    pub fn vid(&self) -> &str {
        &self.vid
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The clean image `<vid>.img`.
    pub fn clean_path(&self) -> &Path {
        &self.paths.clean
    }

    /// The dirty image `<vid>-dirty.img` (what a running volume serves).
    pub fn dirty_path(&self) -> &Path {
        &self.paths.dirty
    }

    /// The precache image `<vid>-precache.img`.
    pub fn precache_path(&self) -> &Path {
        &self.paths.precache
    }

    /// The import image `<vid>-import.img`.
    pub fn import_path(&self) -> &Path {
        &self.paths.import
    }

    fn sidecar_path(&self) -> PathBuf {
        self.pool.meta_path(&self.vid, ".json")
    }

    fn marker_path(&self) -> PathBuf {
        self.pool.meta_path(&self.vid, ".running")
    }

    fn ops(&self) -> Ops<'_> {
        self.pool.ops()
    }

    /// Whether a sidecar config exists.
    pub fn has_sidecar(&self) -> bool {
        self.sidecar_path().is_file()
    }

    /// The volume as qubes.xml names it, in a pool Qubes manages.
    fn qubes_volume(&self) -> Option<&super::qubes::QubesVolume> {
        self.pool.qubes()?.volume(&self.vid)
    }

    /// Whether Qubes' qubes.xml names this volume (its settings come from there).
    pub fn managed_by_qubes(&self) -> bool {
        self.qubes_volume().is_some()
    }

    /// The settings qubes.xml gives; a warning for each that the sidecar
    /// contradicts; a refusal for each command-line override that does.
    fn qubes_config(&self, q: &super::qubes::QubesVolume) -> Result<VolumeConfig> {
        let view = self.pool.qubes().map(|v| v.describe()).unwrap_or_default();
        let c = q.config.clone().map_err(|m| {
            PoolError::new(
                ErrorKind::InvalidInput,
                format!("volume {}: unusable settings in {m}", self.vid),
            )
        })?;
        let fields = |x: &VolumeConfig| {
            [
                ("kind", x.kind.as_str().to_string()),
                ("source", x.source.clone().unwrap_or_else(|| "none".into())),
                ("revisions_to_keep", x.revisions_to_keep.to_string()),
                ("rw", x.rw.to_string()),
            ]
        };
        let sp = self.sidecar_path();
        if let Ok(Some(v)) = read_json_file(&sp) {
            if let Ok(side) = VolumeConfig::from_json(&v) {
                let mut diffs: Vec<String> = fields(&c)
                    .into_iter()
                    .zip(fields(&side))
                    .filter(|(a, b)| a.1 != b.1)
                    .map(|(a, b)| format!("{} {} (refblk's sidecar: {})", a.0, a.1, b.1))
                    .collect();
                if !c.kind.save_on_stop() && c.size.is_some() && side.size != c.size {
                    diffs.push(format!(
                        "size {} (refblk's sidecar: {})",
                        c.size.unwrap_or(0),
                        side.size.map_or("none".into(), |s| s.to_string())
                    ));
                }
                if !diffs.is_empty() && self.pool.first_warning(&self.vid) {
                    log::warn!(
                        "volume {}: Qubes' settings win over refblk's sidecar {}: qubes.xml {view} says {}; \
                         `refblk pool check --repair` removes the sidecar",
                        self.vid,
                        sp.display(),
                        diffs.join(", ")
                    );
                }
            }
        }
        let o = &self.ov;
        let clash = [
            o.kind
                .filter(|k| *k != c.kind)
                .map(|k| format!("--kind {k} (qubes.xml: {})", c.kind)),
            o.source
                .as_ref()
                .filter(|s| c.source.as_ref() != Some(*s))
                .map(|s| {
                    format!(
                        "--source {s} (qubes.xml: {})",
                        c.source.as_deref().unwrap_or("none")
                    )
                }),
            o.revisions_to_keep
                .filter(|r| *r != c.revisions_to_keep)
                .map(|r| {
                    format!(
                        "--revisions-to-keep {r} (qubes.xml: {})",
                        c.revisions_to_keep
                    )
                }),
            o.size
                .filter(|s| c.kind == VolumeKind::Volatile && Some(*s) != c.size)
                .map(|s| {
                    format!(
                        "--volatile-size {s} (qubes.xml: {})",
                        c.size.map_or("none".into(), |s| s.to_string())
                    )
                }),
        ];
        let clash: Vec<String> = clash.into_iter().flatten().collect();
        if !clash.is_empty() {
            return Err(PoolError::new(
                ErrorKind::InvalidInput,
                format!(
                    "volume {} is managed by Qubes ({view}, qube {}, volume {}): {} contradict(s) its settings there; drop the flag, or change the setting with qvm-volume config / qvm-prefs",
                    self.vid,
                    q.domain,
                    q.name,
                    clash.join(", ")
                ),
            ));
        }
        Ok(c)
    }

    /// In a pool Qubes manages: a sidecar that is all there is of a volume
    /// qubes.xml does not name and refblk did not create (its `"created"` is not
    /// true) — the settings of a volume Qubes has removed since.
    pub(crate) fn stale_sidecar_only(&self) -> bool {
        let p = &self.paths;
        self.pool.qubes().is_some()
            && !self.managed_by_qubes()
            && self.has_sidecar()
            && !exists(&p.clean)
            && !exists(&p.dirty)
            && !exists(&p.precache)
            && self.revisions().map(|r| r.is_empty()).unwrap_or(false)
            && !read_json_file(&self.sidecar_path())
                .ok()
                .flatten()
                .is_some_and(|v| v.get("created") == Some(&serde_json::Value::Bool(true)))
    }

    /// Whether refblk keeps this volume's settings in its sidecar: there is one,
    /// and qubes.xml does not name the volume.
    fn sidecar_in_use(&self) -> bool {
        !self.managed_by_qubes() && self.has_sidecar() && !self.stale_sidecar_only()
    }

    /// Refuse `what` on a volume qubes.xml names (its existence and settings are
    /// Qubes' to change).
    fn refuse_qubes(&self, what: &str, how: &str) -> Result<()> {
        match self.qubes_volume() {
            Some(q) => Err(PoolError::new(
                ErrorKind::WrongKind,
                format!(
                    "cannot {what} volume {}: Qubes manages it ({}, qube {}, volume {}); {how}",
                    self.vid,
                    self.pool.qubes().map(|v| v.describe()).unwrap_or_default(),
                    q.domain,
                    q.name
                ),
            )),
            None => Ok(()),
        }
    }

    /// The settings in effect: qubes.xml's in a pool Qubes manages, else the
    /// sidecar (or defaults), with overrides applied.
    pub fn config(&self) -> Result<VolumeConfig> {
        if let Some(q) = self.qubes_volume() {
            return self.qubes_config(q);
        }
        let sp = self.sidecar_path();
        let default_rtk = match self.pool.qubes() {
            Some(q) => q.revisions_to_keep.max(0),
            None => self.pool.config().revisions_to_keep,
        };
        let side = if self.stale_sidecar_only() {
            None
        } else {
            read_json_file(&sp)?
        };
        let mut c = match side {
            Some(v) => VolumeConfig::from_json(&v)
                .map_err(|e| PoolError::new(ErrorKind::Io, format!("{}: {e}", sp.display())))?,
            None => VolumeConfig::origin(default_rtk),
        };
        if let Some(k) = self.ov.kind {
            c.kind = k;
            if !k.snap_on_start() {
                c.source = None;
            }
        }
        if let Some(s) = &self.ov.source {
            c.source = Some(s.clone());
        }
        if let Some(r) = self.ov.revisions_to_keep {
            c.revisions_to_keep = r;
        }
        if let Some(s) = self.ov.size {
            c.size = Some(s);
        }
        c.validate().map_err(|m| {
            PoolError::new(ErrorKind::InvalidInput, format!("volume {}: {m}", self.vid))
        })?;
        Ok(c)
    }

    /// Take the volume's exclusive flock (blocking until other refblk processes
    /// working on this volume are done).
    pub fn lock(&self) -> Result<VolumeLock> {
        let lp = self.pool.meta_path(&self.vid, ".lock");
        if let Some(d) = lp.parent() {
            fs::create_dir_all(d).doing(|| format!("create lock directory {}", d.display()))?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lp)
            .doing(|| format!("open lock file {}", lp.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| PoolError::io(format!("flock {}", lp.display()), e.into()))?;
        Ok(VolumeLock { _lock: lock })
    }

    /// The volume's flock if its lock file exists (never creates it).
    fn lock_existing(&self) -> Result<Option<VolumeLock>> {
        let lp = self.pool.meta_path(&self.vid, ".lock");
        let f = match OpenOptions::new().read(true).open(&lp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(PoolError::io(format!("open lock file {}", lp.display()), e)),
        };
        let lock = Flock::lock(f, FlockArg::LockShared)
            .map_err(|(_, e)| PoolError::io(format!("flock {}", lp.display()), e.into()))?;
        Ok(Some(VolumeLock { _lock: lock }))
    }

    fn source_volume(&self, cfg: &VolumeConfig) -> Result<VolPaths> {
        let s = cfg.source.as_deref().ok_or_else(|| {
            PoolError::new(
                ErrorKind::InvalidInput,
                format!(
                    "volume {} is a {} volume without a source",
                    self.vid, cfg.kind
                ),
            )
        })?;
        layout::validate_vid(s).map_err(|m| PoolError::new(ErrorKind::InvalidInput, m))?;
        Ok(VolPaths::new(self.pool.dir(), s))
    }

    fn marker_this_boot(&self) -> bool {
        match read_json_file(&self.marker_path()) {
            Ok(Some(v)) => v.get("boot_id").and_then(|b| b.as_str()) == Some(&boot_id()),
            _ => false,
        }
    }

    /// The daemon that serves this volume, while its claim holds (see
    /// [`super::owner`]): from the start record of this boot.
    pub fn claim(&self) -> Option<(Owner, Liveness)> {
        if !exists(&self.paths.dirty) {
            return None;
        }
        let m = read_json_file(&self.marker_path()).ok().flatten()?;
        if m.get("boot_id").and_then(|b| b.as_str()) != Some(&boot_id()) {
            return None;
        }
        let o = Owner::from_json(m.get("owner")?)?;
        match o.liveness() {
            Liveness::Stale => None,
            l => Some((o, l)),
        }
    }

    /// Refuse `what` while a daemon other than this process serves the volume.
    fn refuse_owned(&self, what: &str) -> Result<()> {
        match self.claim() {
            Some((o, l)) if !o.is_this_process() => Err(PoolError::new(
                ErrorKind::Busy,
                format!("cannot {what} volume {}: {}", self.vid, o.explain(l)),
            )),
            _ => Ok(()),
        }
    }

    /// Programs other than refblk (and other than the daemon holding the claim)
    /// that write one of the volume's images or back a loop device with it
    /// (see [`super::users`]).
    pub fn foreign_users(&self) -> Vec<User> {
        self.foreign_users_confirmed(false)
    }

    /// [`foreign_users`](Self::foreign_users); with `confirm`, a process counts
    /// only if it still holds the image [`SETTLE`] later (a refusal must not
    /// rest on a command caught between fork and exec; a listing need not
    /// wait for that).
    fn foreign_users_confirmed(&self, confirm: bool) -> Vec<User> {
        let mut exclude = Vec::new();
        let claim = self.claim();
        if let Some((o, Liveness::Live)) = &claim {
            exclude.push(o.pid);
        }
        let images = [self.paths.dirty.as_path(), self.paths.clean.as_path()];
        let mut u = if confirm {
            confirmed_users_of(&images, &exclude, || std::thread::sleep(SETTLE))
        } else {
            users_of(&images, &exclude)
        };
        let backends: Vec<&str> = claim.iter().map(|(o, _)| o.backend.as_str()).collect();
        u.extend(xenstore_users(&images, &backends, self.pool.xenstore()));
        u
    }

    /// Refuse `what` while another program uses the volume's images.
    fn refuse_foreign(&self, what: &str) -> Result<()> {
        let u = self.foreign_users_confirmed(true);
        if u.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = u.iter().map(User::to_string).collect();
        Err(PoolError::new(
            ErrorKind::Busy,
            format!(
                "cannot {what} volume {}: it is running, used by another program: {}. \
                 Stop that program first (shut the VM down, `losetup -d` the loop device)",
                self.vid,
                list.join("; ")
            ),
        ))
    }

    /// Runtime state.
    pub fn state(&self) -> VolumeState {
        if !exists(&self.paths.dirty) {
            VolumeState::Stopped
        } else if self.marker_this_boot() {
            VolumeState::Running
        } else {
            VolumeState::Interrupted
        }
    }

    /// Whether the volume is running (started in this boot, not stopped).
    pub fn is_running(&self) -> bool {
        self.state() == VolumeState::Running
    }

    /// Qubes' `is_dirty`: a save_on_stop volume with a dirty image.
    pub fn is_dirty(&self) -> Result<bool> {
        Ok(self.config()?.kind.save_on_stop() && exists(&self.paths.dirty))
    }

    /// A snapshot volume whose hardlinked clean image is no longer the source's
    /// current clean image (inode/device differ). False when either is missing.
    pub fn is_outdated(&self) -> Result<bool> {
        let cfg = self.config()?;
        if !cfg.kind.snap_on_start() {
            return Ok(false);
        }
        let src = self.source_volume(&cfg)?;
        Ok(match (dev_ino(&src.clean), dev_ino(&self.paths.clean)) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        })
    }

    /// The revisions, oldest first.
    pub fn revisions(&self) -> Result<Vec<Revision>> {
        layout::list_revisions(&self.paths).doing(|| {
            format!(
                "list revisions of {} in {}",
                self.vid,
                self.paths.dir.display()
            )
        })
    }

    /// Current size: dirty, else clean, else configured.
    pub fn size(&self) -> Result<Option<u64>> {
        for p in [&self.paths.dirty, &self.paths.clean] {
            if let Ok(m) = fs::metadata(p) {
                return Ok(Some(m.len()));
            }
        }
        Ok(self.config()?.size)
    }

    /// Facts for output.
    pub fn info(&self) -> Result<VolumeInfo> {
        let config = self.config()?;
        let usage = [&self.paths.dirty, &self.paths.clean]
            .iter()
            .find_map(|p| fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let users = if exists(&self.paths.dirty) {
            self.foreign_users()
        } else {
            Vec::new()
        };
        let state = match self.state() {
            // run by another program: not an interrupted run of ours
            VolumeState::Interrupted if !users.is_empty() => VolumeState::Running,
            s => s,
        };
        Ok(VolumeInfo {
            vid: self.vid.clone(),
            has_sidecar: self.has_sidecar(),
            state,
            size: self.size()?,
            usage,
            clean: self.paths.clean.clone(),
            clean_exists: exists(&self.paths.clean),
            dirty: self.paths.dirty.clone(),
            revisions: self.revisions()?,
            outdated: self.is_outdated().unwrap_or(false),
            owner: self.claim(),
            users,
            settings: if self.managed_by_qubes() {
                "qubes.xml"
            } else if self.sidecar_in_use() {
                "sidecar"
            } else {
                "defaults"
            },
            qubes: self
                .qubes_volume()
                .map(|q| (q.domain.clone(), q.name.clone())),
            config,
        })
    }

    fn io<T>(&self, r: io::Result<T>, doing: &str) -> Result<T> {
        r.doing(|| format!("volume {}: {doing}", self.vid))
    }

    fn not_found_image(&self, p: &Path) -> PoolError {
        let hint = if self.interrupted_create().unwrap_or(false) {
            " (its create was interrupted: run `refblk volume create` again, or `refblk pool check --repair`)"
        } else {
            ""
        };
        PoolError::new(
            ErrorKind::NotFound,
            format!(
                "volume {}: missing image file {}{hint}",
                self.vid,
                p.display()
            ),
        )
    }

    /// Temporary files of our sidecar/start record (`.refblk/volumes/<vid>.json~*`).
    fn meta_temps(&self) -> Vec<PathBuf> {
        let sp = self.sidecar_path();
        let Some(dir) = sp.parent() else {
            return Vec::new();
        };
        let n = &self.paths.name;
        let (a, b) = (format!("{n}.json~"), format!("{n}.running~"));
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|f| f.starts_with(&a) || f.starts_with(&b))
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Remove temporary files and an interrupted import.
    fn remove_incomplete(&self) -> Result<()> {
        let ops = self.ops();
        for t in self.meta_temps() {
            self.io(ops.remove_file(&t), "remove temporary file")?;
        }
        if let Ok(rd) = fs::read_dir(&self.paths.dir) {
            let mut temps: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| self.paths.is_temp(n))
                })
                .map(|e| e.path())
                .collect();
            temps.sort();
            for t in temps {
                self.io(ops.remove_file(&t), "remove temporary file")?;
            }
        }
        self.io(
            ops.remove_file(&self.paths.import),
            "remove interrupted import",
        )?;
        Ok(())
    }

    /// Remove the precache unless it has the clean image's size and mtime_ns.
    fn remove_stale_precache(&self) -> Result<()> {
        let Ok(pc) = fs::metadata(&self.paths.precache) else {
            return Ok(());
        };
        let fresh = fs::metadata(&self.paths.clean).is_ok_and(|c| {
            c.len() == pc.len() && c.mtime() == pc.mtime() && c.mtime_nsec() == pc.mtime_nsec()
        });
        if !fresh {
            log::warn!("removing stale {}", self.paths.precache.display());
            self.io(
                self.ops().remove_file(&self.paths.precache),
                "remove stale precache",
            )?;
        }
        Ok(())
    }

    /// Remove the precache, run `f` (which replaces the clean image), then make a new
    /// precache (a reflink of clean with the same mtime).
    fn update_precache(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let ops = self.ops();
        self.io(ops.remove_file(&self.paths.precache), "remove precache")?;
        f()?;
        self.io(
            ops.copy_file(&self.paths.clean, &self.paths.precache, None, true)
                .map(|_| ()),
            "create precache",
        )
    }

    /// Archive the clean image as revision max+1, timestamped with its mtime: a hard
    /// link to the clean image's inode, not a copy. Every caller then replaces the
    /// clean *name* by a rename (commit, revert), which leaves the old inode to the
    /// revision alone; nothing ever writes into a clean image in place, so the
    /// revision never changes. (Qubes copies with FICLONE, which on a fragmented
    /// image costs seconds; a link is one metadata update.) Where the file system
    /// refuses hard links, the image is copied as before.
    fn add_revision(&self, cfg: &VolumeConfig) -> Result<()> {
        if cfg.revisions_to_keep <= 0 {
            return Ok(());
        }
        let Ok(md) = fs::metadata(&self.paths.clean) else {
            return Ok(());
        };
        let ts = layout::isodate(md.mtime());
        let next = self.revisions()?.last().map_or(1, |r| r.n + 1);
        let dst = self.paths.revision(next, &ts);
        let ops = self.ops();
        match ops.hardlink(&self.paths.clean, &dst) {
            Err(e)
                if matches!(
                    super::fsops::errno(&e),
                    Some(libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP | libc::EXDEV)
                ) && !exists(&dst) =>
            {
                log::info!(
                    "volume {}: {e}; copying the image into the revision instead",
                    self.vid
                );
                self.io(
                    ops.copy_file(&self.paths.clean, &dst, None, false)
                        .map(|_| ()),
                    "archive revision",
                )
            }
            r => self.io(r, "archive revision"),
        }
    }

    /// Remove revisions that are another name of the clean image's inode. Only an
    /// operation killed between archiving (the link) and replacing clean (the
    /// rename) leaves one, and it holds exactly the clean image's data, so nothing
    /// is lost; left in place, anything that then wrote the clean image's inode
    /// (a `-1` start serves it in place; Qubes grows a stopped clean image in place)
    /// would change the revision too. Run before every operation that archives or
    /// serves clean.
    fn unshare_clean(&self) -> Result<()> {
        let Ok(c) = fs::metadata(&self.paths.clean) else {
            return Ok(());
        };
        if c.nlink() < 2 {
            return Ok(());
        }
        for r in self.revisions()? {
            if fs::metadata(&r.path).is_ok_and(|m| m.dev() == c.dev() && m.ino() == c.ino()) {
                log::warn!(
                    "volume {}: removing {}: a second name of the clean image left by an interrupted commit or revert",
                    self.vid,
                    r.path.display()
                );
                self.io(self.ops().remove_file(&r.path), "remove duplicate revision")?;
            }
        }
        Ok(())
    }

    /// Remove the oldest revisions so that at most `keep` remain.
    fn prune_revisions(&self, keep: usize) -> Result<()> {
        let revs = self.revisions()?;
        let n = revs.len().saturating_sub(keep);
        for r in &revs[..n] {
            self.io(self.ops().remove_file(&r.path), "prune revision")?;
        }
        Ok(())
    }

    /// Make `from` (a fsynced-to-be image) the new clean image.
    fn commit(&self, from: &Path, cfg: &VolumeConfig) -> Result<()> {
        let ops = self.ops();
        if cfg.revisions_to_keep == -1 {
            self.io(ops.remove_file(&self.paths.precache), "remove precache")?;
            self.io(ops.fsync_file(from), "fsync image")?;
            return self.io(ops.rename(from, &self.paths.clean), "commit");
        }
        self.unshare_clean()?;
        self.add_revision(cfg)?;
        self.prune_revisions(cfg.revisions_to_keep.max(0) as usize)?;
        self.io(ops.fsync_file(from), "fsync image")?;
        if cfg.kind.snap_on_start() {
            // origin+snapshot starts from the source, never from a precache
            self.io(ops.remove_file(&self.paths.precache), "remove precache")?;
            return self.io(ops.rename(from, &self.paths.clean), "commit");
        }
        self.update_precache(|| self.io(ops.rename(from, &self.paths.clean), "commit"))
    }

    /// Write the settings in effect (sidecar or defaults, with this handle's
    /// overrides) to the volume's sidecar, under the lock. Returns them.
    pub fn save_settings(&self) -> Result<VolumeConfig> {
        // Checked before the lock too, so that a refusal leaves no lock file.
        self.refuse_qubes(
            "store settings for",
            "its settings are read from qubes.xml (change them with qvm-volume config / qvm-prefs)",
        )?;
        self.check_settable()?;
        let _l = self.lock()?;
        self.refuse_owned("change the settings of")?;
        self.check_settable()?;
        let mut c = self.config()?;
        if c.size.is_none() {
            c.size = self.size()?;
        }
        self.save_config(&c)?;
        Ok(c)
    }

    fn check_settable(&self) -> Result<()> {
        // A volume without files is one only when its settings say so: a
        // stopped snapshot of an existing source, or a volatile volume with a
        // size (Qubes keeps no files for either while stopped). Anything else
        // would be a phantom volume (e.g. a typo).
        let cfg = self.config()?;
        let fileless = (cfg.kind.snap_on_start()
            && !cfg.kind.save_on_stop()
            && self.source_volume(&cfg).is_ok_and(|s| exists(&s.clean)))
            || (cfg.kind == VolumeKind::Volatile && self.ov.size.is_some());
        if !self.exists()? && !fileless {
            return Err(PoolError::new(
                ErrorKind::NotFound,
                format!(
                    "volume {} does not exist in {}; use `volume create` (a snapshot volume needs --kind snapshot --source VID of an existing volume, a volatile one --kind volatile --volatile-size SIZE)",
                    self.vid,
                    self.pool.dir().display()
                ),
            ));
        }
        Ok(())
    }

    /// Write the sidecar, keeping its `"created"` mark.
    fn save_config(&self, cfg: &VolumeConfig) -> Result<()> {
        let created = read_json_file(&self.sidecar_path())
            .ok()
            .flatten()
            .and_then(|v| v.get("created").and_then(|c| c.as_bool()))
            .unwrap_or(false);
        self.write_config(cfg, created)
    }

    /// Write the sidecar of a volume refblk creates (`"created": true`: in a pool
    /// Qubes manages, its settings are refblk's to keep).
    fn save_config_created(&self, cfg: &VolumeConfig) -> Result<()> {
        self.write_config(cfg, true)
    }

    fn write_config(&self, cfg: &VolumeConfig, created: bool) -> Result<()> {
        let mut j = cfg.to_json();
        if created {
            j["created"] = json!(true);
        }
        write_json(&self.ops(), &self.sidecar_path(), &j)
    }

    /// Whether the volume exists: qubes.xml names it, or any file of it exists
    /// (images, revisions, a sidecar that is not stale).
    pub fn exists(&self) -> Result<bool> {
        Ok(self.managed_by_qubes()
            || exists(&self.paths.clean)
            || exists(&self.paths.dirty)
            || (self.has_sidecar() && !self.stale_sidecar_only())
            || !self.revisions()?.is_empty())
    }

    /// An origin with settings but no image, revision or precache: a create that
    /// was interrupted before its image appeared.
    fn interrupted_create(&self) -> Result<bool> {
        let p = &self.paths;
        let Ok(cfg) = self.config() else {
            return Ok(false);
        };
        Ok(cfg.kind.save_on_stop()
            && !cfg.kind.snap_on_start()
            && self.sidecar_in_use()
            && !exists(&p.clean)
            && !exists(&p.dirty)
            && !exists(&p.precache)
            && self.revisions()?.is_empty())
    }

    fn refuse_running(&self, what: &str) -> Result<()> {
        if exists(&self.paths.dirty) {
            let st = self.state();
            return Err(PoolError::new(
                ErrorKind::Busy,
                format!(
                    "cannot {what} volume {}: it is {} ({} exists); stop it first",
                    self.vid,
                    st.as_str(),
                    self.paths.dirty.display()
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn create(pool: &Pool, vid: &str, cfg: VolumeConfig, size: u64) -> Result<Volume> {
        cfg.validate()
            .map_err(|m| PoolError::new(ErrorKind::InvalidInput, format!("volume {vid}: {m}")))?;
        let v = Volume::open(pool, vid, Overrides::default())?;
        if let Some(q) = v.qubes_volume() {
            return Err(PoolError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "volume {vid} already exists: Qubes manages it ({}, qube {}, volume {}); Qubes creates its files",
                    pool.qubes().map(|v| v.describe()).unwrap_or_default(),
                    q.domain,
                    q.name
                ),
            ));
        }
        let _l = v.lock()?;
        if v.interrupted_create()? {
            log::warn!("volume {vid}: redoing an interrupted create");
        } else if v.exists()? {
            return Err(PoolError::new(
                ErrorKind::AlreadyExists,
                format!("volume {vid} already exists in {}", pool.dir().display()),
            ));
        }
        if cfg.kind.snap_on_start() {
            let src = v.source_volume(&cfg)?;
            if !exists(&src.clean) {
                return Err(PoolError::new(
                    ErrorKind::NotFound,
                    format!(
                        "source volume {} of {vid} has no clean image {}",
                        cfg.source.as_deref().unwrap_or(""),
                        src.clean.display()
                    ),
                ));
            }
        }
        check_size(vid, size)?;
        let mut c = cfg.clone();
        c.size = Some(size);
        v.save_config_created(&c)?;
        if cfg.kind.save_on_stop() && !cfg.kind.snap_on_start() {
            let ops = v.ops();
            let r =
                v.update_precache(|| v.io(ops.create_sparse(&v.paths.clean, size), "create image"));
            if let Err(e) = r {
                // A refused create leaves no volume behind (a *killed* one leaves
                // the sidecar: an interrupted create, see `pool check`).
                for p in [&v.paths.clean, &v.paths.precache, &v.sidecar_path()] {
                    if let Err(e2) = ops.remove_file(p) {
                        log::warn!("volume {vid}: cannot undo the create: {e2}");
                    }
                }
                if let Err(e2) = ops.remove_empty_dir(&v.paths.dir) {
                    log::warn!("volume {vid}: cannot undo the create: {e2}");
                }
                return Err(e);
            }
        }
        log::info!("created {} volume {vid} ({size} bytes)", cfg.kind);
        Ok(v)
    }

    /// Start: make the dirty image the backend will serve and return its path.
    /// Refused if the volume is already running; a dirty image left by a crash is
    /// reused.
    pub fn start(&self) -> Result<PathBuf> {
        self.start_inner(false, None)
    }

    /// [`Volume::start`] for a daemon that serves the volume: the start record
    /// names `owner`, and every refblk process refuses to change the volume while
    /// that claim holds (see [`super::owner`]).
    pub fn start_owned(&self, owner: &Owner) -> Result<PathBuf> {
        self.start_inner(false, Some(owner))
    }

    /// [`Volume::resume`] for a daemon taking a device over from its dead
    /// predecessor: the claim passes to `owner`. Refused while another live daemon
    /// holds it.
    pub fn resume_owned(&self, owner: &Owner) -> Result<PathBuf> {
        self.start_inner(true, Some(owner))
    }

    /// Like [`Volume::start`], but a volume recorded as running in this boot is taken
    /// over instead of refused: its dirty image is served again as it is. For a daemon
    /// that restarts after a crash while its guests kept running (`start --takeover`).
    pub fn resume(&self) -> Result<PathBuf> {
        self.start_inner(true, None)
    }

    fn start_inner(&self, takeover: bool, owner: Option<&Owner>) -> Result<PathBuf> {
        let _l = self.lock()?;
        if let Some((o, l)) = self.claim() {
            let handed_over = takeover && owner.is_some() && l == Liveness::Orphaned;
            if !handed_over && !o.is_this_process() {
                return Err(PoolError::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot start volume {}: it is running; {}",
                        self.vid,
                        o.explain(l)
                    ),
                ));
            }
        }
        self.refuse_foreign("start")?;
        let cfg = self.config()?;
        let p = &self.paths;
        let ops = self.ops();
        if self.state() == VolumeState::Running && takeover {
            log::warn!(
                "volume {}: taking over the running {}",
                self.vid,
                p.dirty.display()
            );
        } else if self.state() == VolumeState::Running {
            let m = read_json_file(&self.marker_path()).ok().flatten();
            let who = m
                .map(|m| format!(" by pid {} at {}", m["pid"], m["started"]))
                .unwrap_or_default();
            return Err(PoolError::new(
                ErrorKind::Busy,
                format!(
                    "volume {} is already running (started{who}; serving {}); stop it first",
                    self.vid,
                    p.dirty.display()
                ),
            ));
        }
        self.remove_incomplete()?;
        if takeover && exists(&p.dirty) {
            // served as it is, whatever the kind
        } else if cfg.kind.save_on_stop() && exists(&p.dirty) {
            log::warn!(
                "volume {}: reusing {} left by an interrupted run",
                self.vid,
                p.dirty.display()
            );
        } else if cfg.kind.snap_on_start() {
            let src = self.source_volume(&cfg)?;
            if !exists(&src.clean) {
                return Err(self.not_found_image(&src.clean));
            }
            self.io(ops.remove_file(&p.clean), "remove old snapshot")?;
            self.io(ops.hardlink(&src.clean, &p.clean), "hardlink source image")?;
            self.io(
                ops.copy_file(&p.clean, &p.dirty, None, false),
                "snapshot image",
            )?;
        } else if cfg.kind.save_on_stop() {
            if !exists(&p.clean) {
                return Err(self.not_found_image(&p.clean));
            }
            if cfg.revisions_to_keep == -1 {
                // The image is served in place: no revision may share its inode.
                self.unshare_clean()?;
                self.io(ops.remove_file(&p.precache), "remove precache")?;
                self.io(ops.rename(&p.clean, &p.dirty), "start in place")?;
            } else {
                self.remove_stale_precache()?;
                if exists(&p.precache) {
                    self.io(ops.rename(&p.precache, &p.dirty), "start from precache")?;
                } else {
                    self.io(
                        ops.copy_file(&p.clean, &p.dirty, None, false),
                        "snapshot image",
                    )?;
                }
            }
        } else {
            let size = cfg.size.ok_or_else(|| {
                PoolError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "volatile volume {} has no size; create it with --size or pass --size",
                        self.vid
                    ),
                )
            })?;
            self.io(ops.create_sparse(&p.dirty, size), "create volatile image")?;
        }
        let mut marker = json!({
            "boot_id": boot_id(),
            "pid": std::process::id(),
            "started": crate::util::time::now_secs(),
        });
        if let Some(o) = owner {
            marker["owner"] = o.to_json();
        }
        write_json(&ops, &self.marker_path(), &marker)?;
        log::info!("started volume {} -> {}", self.vid, p.dirty.display());
        Ok(p.dirty.clone())
    }

    /// Stop: commit an origin's dirty image (archive + prune revisions, precache), or
    /// throw away a snapshot/volatile volume's images. Also what to call when the
    /// guest crashed.
    pub fn stop(&self) -> Result<StopOutcome> {
        self.stop_inner(false)
    }

    /// Stop and throw the changes away (`stop --discard`).
    pub fn discard(&self) -> Result<StopOutcome> {
        self.stop_inner(true)
    }

    fn stop_inner(&self, discard: bool) -> Result<StopOutcome> {
        let _l = self.lock()?;
        self.refuse_owned(if discard { "discard" } else { "stop" })?;
        self.refuse_foreign(if discard { "discard" } else { "stop" })?;
        let cfg = self.config()?;
        let p = &self.paths;
        let ops = self.ops();
        let dirty = exists(&p.dirty);
        if discard && dirty && cfg.kind.save_on_stop() && cfg.revisions_to_keep == -1 {
            return Err(PoolError::new(
                ErrorKind::WrongKind,
                format!(
                    "cannot discard volume {}: with revisions_to_keep -1 the running image {} is the only copy of its data",
                    self.vid,
                    p.dirty.display()
                ),
            ));
        }
        // The start record goes first: if we die below, the dirty image without a
        // record is "interrupted" and the next start or stop resumes.
        self.io(ops.remove_file(&self.marker_path()), "remove start record")?;
        if !dirty {
            if !cfg.kind.save_on_stop() && cfg.kind.snap_on_start() {
                self.io(ops.remove_file(&p.clean), "remove snapshot")?;
            }
            return Ok(StopOutcome::NotRunning);
        }
        if cfg.kind.save_on_stop() && !discard {
            super::faults::maybe_hold_commit(&self.vid);
            self.commit(&p.dirty, &cfg)?;
            log::info!("committed volume {}", self.vid);
            return Ok(StopOutcome::Committed);
        }
        if cfg.kind == VolumeKind::Volatile && self.sidecar_in_use() {
            if let Ok(m) = fs::metadata(&p.dirty) {
                if cfg.size != Some(m.len()) {
                    let mut c = cfg.clone();
                    c.size = Some(m.len());
                    self.save_config(&c)?;
                }
            }
        }
        self.io(ops.remove_file(&p.dirty), "discard image")?;
        if cfg.kind.save_on_stop() {
            self.unshare_clean()?;
        }
        if cfg.kind.snap_on_start() && !cfg.kind.save_on_stop() {
            self.io(ops.remove_file(&p.clean), "remove snapshot")?;
        }
        log::info!("discarded volume {}", self.vid);
        Ok(StopOutcome::Discarded)
    }

    /// Find a revision by `N`, `N@TIMESTAMP` or `N@TIMESTAMPZ`.
    pub fn find_revision(&self, spec: &str) -> Result<Revision> {
        let revs = self.revisions()?;
        let (n, ts) = match spec.split_once('@') {
            Some((n, ts)) => (n, Some(ts.trim_end_matches('Z'))),
            None => (spec, None),
        };
        let n: u64 = n.parse().map_err(|_| {
            PoolError::new(
                ErrorKind::InvalidInput,
                format!("invalid revision {spec:?}: expected a number N or N@YYYY-MM-DDTHH:MM:SSZ"),
            )
        })?;
        revs.iter()
            .find(|r| r.n == n && ts.is_none_or(|t| t == r.timestamp))
            .cloned()
            .ok_or_else(|| {
                let have: Vec<String> = revs
                    .iter()
                    .map(|r| format!("{}@{}Z", r.n, r.timestamp))
                    .collect();
                PoolError::new(
                    ErrorKind::NotFound,
                    format!(
                        "volume {} has no revision {spec:?} (available: {})",
                        self.vid,
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.join(", ")
                        }
                    ),
                )
            })
    }

    /// Revert to a revision (default: the newest). Refused while running. The current
    /// clean image is archived as a new revision first.
    pub fn revert(&self, revision: Option<&str>) -> Result<Revision> {
        let _l = self.lock()?;
        let cfg = self.config()?;
        if !cfg.kind.save_on_stop() {
            return Err(PoolError::new(
                ErrorKind::WrongKind,
                format!(
                    "cannot revert {} volume {}: it keeps no revisions",
                    cfg.kind, self.vid
                ),
            ));
        }
        self.refuse_owned("revert")?;
        self.refuse_foreign("revert")?;
        self.refuse_running("revert")?;
        self.unshare_clean()?;
        let rev = match revision {
            Some(s) => self.find_revision(s)?,
            None => self.revisions()?.pop().ok_or_else(|| {
                PoolError::new(
                    ErrorKind::NotFound,
                    format!("volume {} has no revisions to revert to", self.vid),
                )
            })?,
        };
        self.add_revision(&cfg)?;
        let ops = self.ops();
        self.update_precache(|| self.io(ops.rename(&rev.path, &self.paths.clean), "revert"))?;
        log::info!("reverted volume {} to revision {}", self.vid, rev.n);
        Ok(rev)
    }

    /// Resize to `size` bytes (grow only unless `allow_shrink`). A running volume's
    /// dirty image is truncated and the pool's [`super::ResizeNotifier`] told; a
    /// stopped origin's clean image is replaced by a resized reflink.
    pub fn resize(&self, size: u64, allow_shrink: bool) -> Result<()> {
        // Before the lock: a refusal writes nothing, not even a lock file.
        let cfg = self.config()?;
        if self.managed_by_qubes() && (!cfg.kind.save_on_stop() || cfg.kind.snap_on_start()) {
            // its size lives in qubes.xml, which refblk never writes
            self.refuse_qubes(
                "resize",
                "Qubes keeps its size in qubes.xml: use `qvm-volume resize`",
            )?;
        }
        let _l = self.lock()?;
        self.refuse_owned("resize")?;
        self.refuse_foreign("resize")?;
        check_size(&self.vid, size)?;
        let cfg = self.config()?;
        let p = &self.paths;
        if !cfg.rw {
            return Err(PoolError::new(
                ErrorKind::WrongKind,
                format!("cannot resize volume {}: it is read-only", self.vid),
            ));
        }
        let cur = self.size()?;
        if let Some(cur) = cur {
            if size < cur && !allow_shrink {
                return Err(PoolError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "refusing to shrink volume {} from {cur} to {size} bytes (data beyond the new end would be lost); pass --allow-shrink if you mean it",
                        self.vid
                    ),
                ));
            }
        }
        let ops = self.ops();
        if exists(&p.dirty) {
            self.io(ops.resize_file(&p.dirty, size), "resize running image")?;
            self.pool
                .notifier()
                .volume_resized(&self.vid, &p.dirty, size)
                .doing(|| format!("volume {}: announce new size", self.vid))?;
        } else if cfg.kind.save_on_stop() && !cfg.kind.snap_on_start() {
            if !exists(&p.clean) {
                return Err(self.not_found_image(&p.clean));
            }
            self.update_precache(|| {
                self.io(
                    ops.copy_file(&p.clean, &p.clean, Some(size), false),
                    "resize image",
                )
                .map(|_| ())
            })?;
        }
        if self.sidecar_in_use() {
            let mut c = self.config()?;
            c.size = Some(size);
            self.save_config(&c)?;
        }
        log::info!("resized volume {} to {size} bytes", self.vid);
        Ok(())
    }

    /// Replace the volume's data with `src` through `-import.img` and a commit (the old
    /// data is archived as a revision). A failed import leaves the old data.
    /// `size`: the new volume size (default: the source's length).
    pub fn import(&self, src: ImportSource<'_>, size: Option<u64>) -> Result<()> {
        let _l = self.lock()?;
        if !self.exists()? {
            return Err(PoolError::new(
                ErrorKind::NotFound,
                format!(
                    "volume {} does not exist in {}; create it first",
                    self.vid,
                    self.pool.dir().display()
                ),
            ));
        }
        self.import_locked(src, size)
    }

    fn import_locked(&self, src: ImportSource<'_>, size: Option<u64>) -> Result<()> {
        if let Some(s) = size {
            check_size(&self.vid, s)?;
        }
        let cfg = self.config()?;
        if !cfg.kind.save_on_stop() {
            return Err(PoolError::new(
                ErrorKind::WrongKind,
                format!(
                    "cannot import into {} volume {}: it is not saved",
                    cfg.kind, self.vid
                ),
            ));
        }
        self.refuse_owned("import into")?;
        self.refuse_foreign("import into")?;
        self.refuse_running("import into")?;
        let p = &self.paths;
        let ops = self.ops();
        self.remove_incomplete()?;
        let r = match src {
            ImportSource::File(path) => {
                let len = fs::metadata(path)
                    .doing(|| format!("import into {}: stat {}", self.vid, path.display()))?
                    .len();
                if let Some(s) = size {
                    if len > s {
                        return Err(PoolError::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "{} holds {len} bytes, more than the requested size of {s} bytes",
                                path.display()
                            ),
                        ));
                    }
                }
                ops.copy_file(path, &p.import, size, false).map(|_| ())
            }
            ImportSource::Reader(r, name) => ops.replace_file(&p.import, |f, tmp| {
                let n = ops.stream_into(r, name, f, tmp, size)?;
                f.set_len(size.unwrap_or(n))
                    .map_err(|e| super::fsops::ctx(e, "truncate", tmp))
            }),
        };
        self.io(r, "write import image")?;
        if let Err(e) = self.commit(&p.import, &cfg) {
            if let Err(e2) = ops.remove_file(&p.import) {
                log::warn!("cannot remove {}: {e2}", p.import.display());
            }
            return Err(e);
        }
        if self.sidecar_in_use() {
            let mut c = self.config()?;
            c.size = fs::metadata(&p.clean).ok().map(|m| m.len());
            self.save_config(&c)?;
        }
        log::info!("imported data into volume {}", self.vid);
        Ok(())
    }

    /// Export: the clean image's path (read it; it is replaced, never changed in
    /// place), or with `dst` a reflink/sparse copy written to `dst` durably.
    pub fn export(&self, dst: Option<&Path>) -> Result<PathBuf> {
        let cfg = self.config()?;
        if !cfg.kind.save_on_stop() {
            return Err(PoolError::new(
                ErrorKind::WrongKind,
                format!(
                    "cannot export {} volume {}: it has no saved data",
                    cfg.kind, self.vid
                ),
            ));
        }
        if !exists(&self.paths.clean) {
            return Err(self.not_found_image(&self.paths.clean));
        }
        match dst {
            None => Ok(self.paths.clean.clone()),
            Some(d) => {
                let parent = match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if !parent.is_dir() {
                    return Err(PoolError::new(
                        ErrorKind::NotFound,
                        format!(
                            "export volume {} to {}: directory {} does not exist",
                            self.vid,
                            d.display(),
                            parent.display()
                        ),
                    ));
                }
                self.ops()
                    .copy_file(&self.paths.clean, d, None, false)
                    .doing(|| format!("export volume {} to {}", self.vid, d.display()))?;
                Ok(d.to_path_buf())
            }
        }
    }

    /// Copy `src`'s committed data into this volume: into an existing volume as an
    /// import (old data archived), or as a new origin volume (settings from `cfg` or
    /// the pool defaults). Works across pools (sparse copy when reflink is impossible).
    pub fn clone_from(&self, src: &Volume, cfg: Option<VolumeConfig>) -> Result<()> {
        if src.pool.dir() == self.pool.dir() && src.vid == self.vid {
            return Err(PoolError::new(
                ErrorKind::InvalidInput,
                format!(
                    "cannot clone volume {} onto itself; give another destination",
                    self.vid
                ),
            ));
        }
        let src_clean = src.export(None)?;
        let _l = self.lock()?;
        if !self.exists()? {
            let mut c =
                cfg.unwrap_or_else(|| VolumeConfig::origin(self.pool.config().revisions_to_keep));
            c.validate().map_err(|m| {
                PoolError::new(ErrorKind::InvalidInput, format!("volume {}: {m}", self.vid))
            })?;
            if !c.kind.save_on_stop() || c.kind.snap_on_start() {
                return Err(PoolError::new(
                    ErrorKind::WrongKind,
                    format!("a clone must be an origin volume, not {}", c.kind),
                ));
            }
            c.size = fs::metadata(&src_clean).ok().map(|m| m.len());
            self.save_config_created(&c)?;
        }
        self.import_locked(ImportSource::File(&src_clean), None)
    }

    /// Remove all files of the volume (revisions oldest first, images, sidecar) and
    /// its directory if empty. Refused while running unless `force`.
    pub fn remove(&self, force: bool) -> Result<()> {
        // Before the lock: a refusal writes nothing, not even a lock file.
        self.refuse_qubes(
            "remove",
            "remove the qube with qvm-remove, or its volume with Qubes' tools",
        )?;
        let _l = self.lock()?;
        if !self.exists()? && !exists(&self.paths.precache) {
            return Err(PoolError::new(
                ErrorKind::NotFound,
                format!(
                    "volume {} does not exist in {}",
                    self.vid,
                    self.pool.dir().display()
                ),
            ));
        }
        self.refuse_owned("remove")?;
        self.refuse_foreign("remove")?;
        if !force && self.state() == VolumeState::Running {
            self.refuse_running("remove")?;
        }
        let ops = self.ops();
        let p = &self.paths;
        self.remove_incomplete()?;
        self.prune_revisions(0)?;
        for f in [&p.clean, &p.precache, &p.dirty] {
            self.io(ops.remove_file(f), "remove image")?;
        }
        self.io(ops.remove_file(&self.marker_path()), "remove start record")?;
        self.io(ops.remove_file(&self.sidecar_path()), "remove settings")?;
        self.io(ops.remove_empty_dir(&p.dir), "remove directory")?;
        log::info!("removed volume {}", self.vid);
        Ok(())
    }

    /// Find (and with `repair` fix) leftovers of interrupted operations.
    pub fn check(&self, repair: bool) -> Result<Vec<CheckItem>> {
        // Report-only writes nothing, not even a lock file: it takes the lock only
        // if the lock file is there already (readers only see complete files).
        let _l = if repair {
            Some(self.lock()?)
        } else {
            self.lock_existing()?
        };
        // A volume a daemon serves is only reported, never repaired.
        let owned = self.claim().filter(|(o, _)| !o.is_this_process());
        // A volume another program runs is neither "interrupted" nor repaired.
        let users = if exists(&self.paths.dirty) && owned.is_none() {
            self.foreign_users()
        } else {
            Vec::new()
        };
        let repair = repair && owned.is_none() && users.is_empty();
        let mut out = Vec::new();
        let ops = self.ops();
        let p = &self.paths;
        let mut item = |problem: String, fixable: bool, fix: &mut dyn FnMut() -> Result<()>| {
            let repaired = if repair && fixable {
                fix()?;
                true
            } else {
                false
            };
            let problem = match &owned {
                Some((o, _)) => format!("{problem} [not repaired: served to {}]", o.short()),
                None => problem,
            };
            out.push(CheckItem {
                vid: self.vid.clone(),
                problem,
                repaired,
                fatal: !fixable,
            });
            Ok::<(), PoolError>(())
        };
        let cfg = match self.config() {
            Ok(c) => c,
            Err(e) => {
                item(format!("unusable settings: {e}"), false, &mut || Ok(()))?;
                return Ok(out);
            }
        };
        let sc = self.sidecar_path();
        if self.stale_sidecar_only() {
            item(
                format!(
                    "settings {} of a volume that no longer exists: qubes.xml does not name it and it has no image (remove them)",
                    sc.display()
                ),
                true,
                &mut || self.io(ops.remove_file(&sc).map(|_| ()), "remove settings"),
            )?;
            return Ok(out);
        }
        if self.managed_by_qubes() && self.has_sidecar() {
            item(
                format!(
                    "settings {} are not used: Qubes' qubes.xml names this volume and its settings win (remove them)",
                    sc.display()
                ),
                true,
                &mut || self.io(ops.remove_file(&sc).map(|_| ()), "remove settings"),
            )?;
        }
        if let Ok(rd) = fs::read_dir(&p.dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name();
                if name.to_str().is_some_and(|n| p.is_temp(n)) {
                    let path = e.path();
                    item(
                        format!("leftover temporary file {} (remove it)", path.display()),
                        true,
                        &mut || self.io(ops.remove_file(&path).map(|_| ()), "remove temp"),
                    )?;
                }
            }
        }
        for path in self.meta_temps() {
            item(
                format!("leftover temporary file {} (remove it)", path.display()),
                true,
                &mut || self.io(ops.remove_file(&path).map(|_| ()), "remove temp"),
            )?;
        }
        if exists(&p.import) {
            item(
                format!(
                    "interrupted import {} (remove it; the old data stays)",
                    p.import.display()
                ),
                true,
                &mut || self.io(ops.remove_file(&p.import).map(|_| ()), "remove import"),
            )?;
        }
        if let Ok(pc) = fs::metadata(&p.precache) {
            let fresh = fs::metadata(&p.clean).is_ok_and(|c| {
                c.len() == pc.len() && c.mtime() == pc.mtime() && c.mtime_nsec() == pc.mtime_nsec()
            });
            if !fresh {
                item(
                    format!("stale precache {} (remove it)", p.precache.display()),
                    true,
                    &mut || self.io(ops.remove_file(&p.precache).map(|_| ()), "remove precache"),
                )?;
            }
        }
        let marker = self.marker_path();
        let dirty = exists(&p.dirty);
        if exists(&marker) && (!dirty || !self.marker_this_boot()) && users.is_empty() {
            item(
                format!("stale start record {} (remove it)", marker.display()),
                true,
                &mut || self.io(ops.remove_file(&marker).map(|_| ()), "remove start record"),
            )?;
        }
        let running = dirty && (self.marker_this_boot() || !users.is_empty());
        if dirty && !running {
            if cfg.kind.save_on_stop() {
                item(
                    format!(
                        "{} exists but the volume is not running (interrupted start/stop or crash): `volume start` resumes it, `volume stop` commits it, `volume stop --discard` drops it",
                        p.dirty.display()
                    ),
                    false,
                    &mut || Ok(()),
                )?;
            } else {
                item(
                    format!(
                        "leftover {} of a stopped {} volume (remove it)",
                        p.dirty.display(),
                        cfg.kind
                    ),
                    true,
                    &mut || self.io(ops.remove_file(&p.dirty).map(|_| ()), "remove dirty"),
                )?;
            }
        }
        if !running && cfg.kind == VolumeKind::Snapshot && exists(&p.clean) {
            item(
                format!(
                    "leftover snapshot {} of a stopped snapshot volume (remove it)",
                    p.clean.display()
                ),
                true,
                &mut || self.io(ops.remove_file(&p.clean).map(|_| ()), "remove snapshot"),
            )?;
        }
        let origin = cfg.kind.save_on_stop() && !cfg.kind.snap_on_start();
        if self.interrupted_create()? {
            let sc = self.sidecar_path();
            item(
                format!(
                    "interrupted create: settings {} without any image (remove them; create the volume again)",
                    sc.display()
                ),
                true,
                &mut || self.io(ops.remove_file(&sc).map(|_| ()), "remove settings"),
            )?;
        } else if origin && !exists(&p.clean) && !dirty {
            item(
                format!(
                    "missing image file {} (restore it, or revert to a revision)",
                    p.clean.display()
                ),
                false,
                &mut || Ok(()),
            )?;
        }
        if cfg.kind.snap_on_start() {
            if let Ok(src) = self.source_volume(&cfg) {
                if !exists(&src.clean) {
                    item(
                        format!("source image {} is missing", src.clean.display()),
                        false,
                        &mut || Ok(()),
                    )?;
                }
            }
        }
        Ok(out)
    }
}
