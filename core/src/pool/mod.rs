//! The reflink pool: Qubes' `file-reflink` layout, served by refblk.
//!
//! A pool is a directory on a reflink-capable file system (btrfs, XFS with
//! `reflink=1`); a volume is identified by a path-like id (`appvms/work/private`) and
//! consists of the files described in [`layout`]. On start a volume's clean image is
//! reflinked to `-dirty.img` (which the backend serves); on stop the dirty image is
//! committed (the old clean image archived as a revision) or discarded.
//!
//! Entry points for the daemon / hotplug path:
//! - [`Pool::open`] then [`Pool::volume`];
//! - [`Volume::start`] on attach (returns the path to serve);
//! - [`Volume::stop`] on detach — commits origins, discards snapshot and volatile
//!   volumes; [`Volume::discard`] throws an origin's changes away;
//! - [`Volume::resize`] calls the pool's [`ResizeNotifier`] when the volume is running,
//!   so the daemon can announce the new size to the guest.
//!
//! Every operation takes an `flock` on the volume (`.refblk/volumes/<vid>.lock`), so
//! concurrent refblk processes serialize. Every disk-changing step is announced to a
//! [`Faults`] counter for crash-safety tests. See docs/pool.md for the state machine and
//! the crash-safety argument.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

pub mod config;
pub mod error;
pub mod faults;
pub mod fsops;
pub mod layout;
pub mod limits;
pub mod owner;
pub mod qubes;
pub mod users;
mod volume;

pub use config::{ConfigError, PoolConfig, VolumeConfig, VolumeKind};
pub use error::{ErrorKind, PoolError, Result};
#[cfg(feature = "test-hooks")]
pub use faults::{hold_next_commit, CommitHold};
pub use faults::{FaultMode, Faults};
pub use layout::Revision;
pub use owner::{Liveness, Owner};
pub use qubes::{QubesView, QubesXmlSetting};
pub use users::XenstoreSetting;
pub use volume::{
    check_size, CheckItem, ImportSource, Overrides, StopOutcome, Volume, VolumeInfo, VolumeState,
    MAX_VOLUME_SIZE,
};

use error::IoContext;
use fsops::Ops;

/// Told when a running volume's size changes, so the serving backend can announce the
/// new size to the guest (the daemon implements this; the default only logs).
pub trait ResizeNotifier: Send + Sync {
    /// `vid`'s image being served at `path` now has `new_size` bytes.
    fn volume_resized(&self, vid: &str, path: &Path, new_size: u64) -> io::Result<()>;
}

/// The default [`ResizeNotifier`]: logs that nobody was told.
#[derive(Debug, Default)]
pub struct LogNotifier;

impl ResizeNotifier for LogNotifier {
    fn volume_resized(&self, vid: &str, path: &Path, new_size: u64) -> io::Result<()> {
        log::info!(
            "volume {vid} ({}) resized to {new_size} bytes while running; no backend registered to announce it",
            path.display()
        );
        Ok(())
    }
}

/// Options of [`Pool::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Refuse a file system without FICLONE (Qubes' `setup_check`).
    pub setup_check: bool,
    /// Default revisions_to_keep of the pool's volumes.
    pub revisions_to_keep: i64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            setup_check: true,
            revisions_to_keep: 1,
        }
    }
}

/// Pool-level facts for `pool info`.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    /// The directory.
    pub dir: PathBuf,
    /// File system type name.
    pub fs_type: String,
    /// Whether FICLONE works here.
    pub reflink: bool,
    /// File system size in bytes.
    pub size: u64,
    /// Bytes in use on the file system.
    pub usage: u64,
    /// Pool settings.
    pub config: PoolConfig,
    /// Whether `.refblk/pool.json` exists.
    pub initialized: bool,
    /// Number of volumes found.
    pub volumes: usize,
}

/// How [`Pool::open_with`] finds the programs and settings around the pool.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Qubes' qubes.xml (volume settings of a pool Qubes manages).
    pub qubes_xml: QubesXmlSetting,
    /// The xenstore whose backends may name a volume's images.
    pub xenstore: XenstoreSetting,
}

impl OpenOptions {
    /// From the environment: `$REFBLK_QUBES_XML`, the default xenstore.
    pub fn from_env() -> OpenOptions {
        OpenOptions {
            qubes_xml: QubesXmlSetting::from_env(),
            xenstore: XenstoreSetting::Auto,
        }
    }
}

struct Inner {
    dir: PathBuf,
    config: PoolConfig,
    initialized: bool,
    faults: Arc<Faults>,
    notifier: Arc<dyn ResizeNotifier>,
    qubes: Option<QubesView>,
    xenstore: XenstoreSetting,
    /// Volumes whose differing sidecar was already warned about.
    warned: std::sync::Mutex<BTreeSet<String>>,
}

/// An open pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// The name of a file system type (from statfs), for messages.
pub fn fs_type_name(dir: &Path) -> String {
    match nix::sys::statfs::statfs(dir) {
        Ok(s) => {
            let t = s.filesystem_type();
            if t == nix::sys::statfs::BTRFS_SUPER_MAGIC {
                "btrfs".into()
            } else if t == nix::sys::statfs::XFS_SUPER_MAGIC {
                "xfs".into()
            } else if t == nix::sys::statfs::EXT4_SUPER_MAGIC {
                "ext4".into()
            } else if t == nix::sys::statfs::TMPFS_MAGIC {
                "tmpfs".into()
            } else if t == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC {
                "overlayfs".into()
            } else {
                format!("file system type {:#x}", t.0)
            }
        }
        Err(e) => format!("unknown file system ({e})"),
    }
}

/// Whether files in `dir` can be reflinked (FICLONE of a small temporary file).
pub fn reflink_supported(dir: &Path) -> io::Result<bool> {
    let mk = |tag: &str| -> io::Result<(fs::File, PathBuf)> {
        let p = dir.join(format!(".refblk-probe-{tag}~{}", fsops::random_suffix()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)?;
        Ok((f, p))
    };
    let (src, sp) = mk("src")?;
    let r = (|| {
        let (dst, dp) = mk("dst")?;
        let r = (|| {
            use std::io::Write;
            (&src).write_all(b"refblk")?; // not empty: some fs shortcut empty files
            fsops::try_reflink(&src, &dst)
        })();
        let _ = fs::remove_file(&dp);
        r
    })();
    let _ = fs::remove_file(&sp);
    r
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            PoolError::new(
                ErrorKind::Io,
                format!("cannot parse {}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PoolError::io(format!("read {}", path.display()), e)),
    }
}

impl Pool {
    /// Create (or adopt) a pool directory: check reflink support (unless
    /// `setup_check` is off), make `appvms/`, `vm-templates/` and `.refblk/pool.json`.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Pool> {
        if opts.revisions_to_keep < 0 {
            return Err(PoolError::new(
                ErrorKind::InvalidInput,
                format!(
                    "pool revisions_to_keep {} must be 0 or more",
                    opts.revisions_to_keep
                ),
            ));
        }
        let faults = Arc::new(Faults::new());
        let ops = Ops::new(&faults);
        // The directories this init creates (dir and missing parents, deepest
        // first), removed again if it refuses.
        let made: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        ops.create_dir_all(dir)
            .doing(|| format!("create pool directory {}", dir.display()))?;
        if opts.setup_check {
            let ok = reflink_supported(dir)
                .doing(|| format!("test reflink support in {}", dir.display()))?;
            if !ok {
                let fs_name = fs_type_name(dir);
                for d in &made {
                    let _ = ops.remove_empty_dir(d);
                }
                return Err(PoolError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "the file system of {} ({}) cannot reflink (FICLONE); every start and commit would copy whole images. \
                         Use btrfs or XFS (mkfs.xfs -m reflink=1), or pass --no-setup-check to accept the slow copy fallback",
                        dir.display(),
                        fs_name
                    ),
                ));
            }
        }
        for sub in ["appvms", "vm-templates", ".refblk", ".refblk/volumes"] {
            let p = dir.join(sub);
            ops.create_dir_all(&p)
                .doing(|| format!("create directory {}", p.display()))?;
        }
        let cfg = PoolConfig {
            revisions_to_keep: opts.revisions_to_keep,
            setup_check: opts.setup_check,
        };
        let pj = dir.join(".refblk/pool.json");
        write_json(&ops, &pj, &cfg.to_json())?;
        log::info!("initialized pool {}", dir.display());
        Pool::open(dir)
    }

    /// Open an existing pool directory (with or without `.refblk/`), with the
    /// options from the environment ([`OpenOptions::from_env`]). The environment
    /// variable `REFBLK_FAULT` arms fault injection (a test hook; see [`faults`]).
    pub fn open(dir: &Path) -> Result<Pool> {
        Pool::open_with(dir, &OpenOptions::from_env())
    }

    /// [`Pool::open`] with explicit options.
    pub fn open_with(dir: &Path, opts: &OpenOptions) -> Result<Pool> {
        let md = fs::metadata(dir).doing(|| format!("open pool directory {}", dir.display()))?;
        if !md.is_dir() {
            return Err(PoolError::new(
                ErrorKind::InvalidInput,
                format!("pool {} is not a directory", dir.display()),
            ));
        }
        let dir = fs::canonicalize(dir).doing(|| format!("resolve {}", dir.display()))?;
        let pj = dir.join(".refblk/pool.json");
        let (config, initialized) = match read_json(&pj)? {
            Some(v) => (
                PoolConfig::from_json(&v)
                    .map_err(|e| PoolError::new(ErrorKind::Io, format!("{}: {e}", pj.display())))?,
                true,
            ),
            None => (PoolConfig::default(), false),
        };
        let qubes = qubes::load(&opts.qubes_xml, &dir)?;
        if let Some(q) = &qubes {
            log::debug!(
                "pool {}: volume settings from Qubes' {}",
                dir.display(),
                q.describe()
            );
        }
        let faults = Arc::new(Faults::new());
        if let Ok(spec) = std::env::var("REFBLK_FAULT") {
            match Faults::parse(&spec) {
                Some((n, mode)) => {
                    log::warn!("fault injection armed: {spec}");
                    faults.arm(n, mode);
                }
                None => {
                    return Err(PoolError::new(
                        ErrorKind::InvalidInput,
                        format!("REFBLK_FAULT={spec:?} is not fail:N[:ERRNO], crash:N or abort:N"),
                    ))
                }
            }
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                dir,
                config,
                initialized,
                faults,
                notifier: Arc::new(LogNotifier),
                qubes,
                xenstore: opts.xenstore.clone(),
                warned: Default::default(),
            }),
        })
    }

    fn rebuild(&self, faults: Arc<Faults>, notifier: Arc<dyn ResizeNotifier>) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                dir: self.inner.dir.clone(),
                config: self.inner.config.clone(),
                initialized: self.inner.initialized,
                faults,
                notifier,
                qubes: self.inner.qubes.clone(),
                xenstore: self.inner.xenstore.clone(),
                warned: Default::default(),
            }),
        }
    }

    /// This pool with a shared fault counter (tests).
    pub fn with_faults(&self, faults: Arc<Faults>) -> Pool {
        self.rebuild(faults, self.inner.notifier.clone())
    }

    /// This pool with a resize notifier (the daemon).
    pub fn with_notifier(&self, notifier: Arc<dyn ResizeNotifier>) -> Pool {
        self.rebuild(self.inner.faults.clone(), notifier)
    }

    /// The pool directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Pool settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// What Qubes' qubes.xml says about this pool, when Qubes manages it.
    pub fn qubes(&self) -> Option<&QubesView> {
        self.inner.qubes.as_ref()
    }

    pub(crate) fn xenstore(&self) -> &XenstoreSetting {
        &self.inner.xenstore
    }

    /// Whether `key` is reported for the first time by this pool handle (for
    /// warnings that every call of a volume's settings would repeat).
    pub(crate) fn first_warning(&self, key: &str) -> bool {
        self.inner
            .warned
            .lock()
            .map(|mut w| w.insert(key.to_string()))
            .unwrap_or(true)
    }

    /// The fault counter.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    pub(crate) fn ops(&self) -> Ops<'_> {
        Ops::new(&self.inner.faults)
    }

    pub(crate) fn notifier(&self) -> &dyn ResizeNotifier {
        &*self.inner.notifier
    }

    /// `.refblk/volumes/<vid>` + `ext`.
    pub(crate) fn meta_path(&self, vid: &str, ext: &str) -> PathBuf {
        let mut o = self
            .inner
            .dir
            .join(".refblk/volumes")
            .join(vid)
            .into_os_string();
        o.push(ext);
        PathBuf::from(o)
    }

    /// A volume: its sidecar settings, or defaults (origin, pool revisions_to_keep).
    pub fn volume(&self, vid: &str) -> Result<Volume> {
        Volume::open(self, vid, Overrides::default())
    }

    /// A volume with command-line overrides of its settings.
    pub fn volume_with(&self, vid: &str, ov: Overrides) -> Result<Volume> {
        Volume::open(self, vid, ov)
    }

    /// Create a volume: write its sidecar, and for origins an empty sparse clean image
    /// of `size` bytes. Refuses if any file of the volume exists.
    pub fn create_volume(&self, vid: &str, cfg: VolumeConfig, size: u64) -> Result<Volume> {
        Volume::create(self, vid, cfg, size)
    }

    /// The volume ids present in the pool (from image files and sidecars), sorted.
    /// In a pool Qubes manages: the volumes qubes.xml names, image files only
    /// under `appvms/` and `vm-templates/` (not `vm-kernels/`, another pool), and
    /// sidecars only of volumes refblk created there.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut all = self.list_all()?;
        all.retain(|vid| {
            self.volume(vid)
                .map(|v| !v.stale_sidecar_only())
                .unwrap_or(true)
        });
        Ok(all)
    }

    /// [`Pool::list`] including volumes that are only a stale sidecar.
    fn list_all(&self) -> Result<Vec<String>> {
        let mut out = BTreeSet::new();
        let qubes = self.qubes();
        walk(&self.inner.dir, "", 0, &mut |rel, name, is_dir| {
            if !is_dir {
                if let Some((vid, _)) = layout::classify(rel, name) {
                    let top = vid.split('/').next().unwrap_or("");
                    if qubes.is_none() || qubes::VOLUME_DIRS.contains(&top) {
                        out.insert(vid);
                    }
                }
            }
        })
        .doing(|| format!("list pool {}", self.inner.dir.display()))?;
        let meta = self.inner.dir.join(".refblk/volumes");
        if meta.is_dir() {
            walk(&meta, "", 0, &mut |rel, name, is_dir| {
                if is_dir {
                    return;
                }
                if let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                    let vid = if rel.is_empty() {
                        stem.to_string()
                    } else {
                        format!("{rel}/{stem}")
                    };
                    if layout::validate_vid(&vid).is_ok() {
                        out.insert(vid);
                    }
                }
            })
            .doing(|| format!("list {}", meta.display()))?;
        }
        if let Some(q) = qubes {
            out.extend(
                q.vids()
                    .filter(|v| layout::validate_vid(v).is_ok())
                    .cloned(),
            );
        }
        Ok(out.into_iter().collect())
    }

    /// Pool-level facts.
    pub fn info(&self) -> Result<PoolInfo> {
        let dir = &self.inner.dir;
        let st = nix::sys::statvfs::statvfs(dir.as_path())
            .map_err(|e| PoolError::io(format!("statvfs {}", dir.display()), e.into()))?;
        let frsize = st.fragment_size();
        let reflink = reflink_supported(dir).unwrap_or(false);
        Ok(PoolInfo {
            dir: dir.clone(),
            fs_type: fs_type_name(dir),
            reflink,
            size: frsize * st.blocks(),
            usage: frsize * (st.blocks() - st.blocks_free()),
            config: self.inner.config.clone(),
            initialized: self.inner.initialized,
            volumes: self.list()?.len(),
        })
    }

    /// Check every volume for leftovers of interrupted operations; with `repair`, fix
    /// what can be fixed without touching committed data.
    pub fn check(&self, repair: bool) -> Result<Vec<CheckItem>> {
        let mut items = Vec::new();
        for vid in self.list_all()? {
            match self.volume(&vid) {
                Ok(v) => items.extend(v.check(repair)?),
                Err(e) => items.push(CheckItem {
                    vid: vid.clone(),
                    problem: e.to_string(),
                    repaired: false,
                    fatal: true,
                }),
            }
        }
        Ok(items)
    }
}

/// Write `v` to `path` durably (temp file, fsync, rename, fsync dir).
pub(crate) fn write_json(ops: &Ops<'_>, path: &Path, v: &Value) -> Result<()> {
    let text = format!("{v:#}\n");
    ops.replace_file(path, |f, tmp| {
        use std::io::Write;
        let mut f = f;
        f.write_all(text.as_bytes())
            .map_err(|e| fsops::ctx(e, "write", tmp))
    })
    .doing(|| format!("write {}", path.display()))
}

pub(crate) fn read_json_file(path: &Path) -> Result<Option<Value>> {
    read_json(path)
}

fn walk(
    dir: &Path,
    rel: &str,
    depth: usize,
    f: &mut dyn FnMut(&str, &std::ffi::OsStr, bool),
) -> io::Result<()> {
    if depth > 16 {
        return Ok(());
    }
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        let name = ent.file_name();
        let Some(s) = name.to_str() else { continue };
        if depth == 0 && s.starts_with('.') {
            continue;
        }
        let ft = ent.file_type()?;
        if ft.is_dir() {
            if s.starts_with('.') {
                continue;
            }
            f(rel, &name, true);
            let sub = if rel.is_empty() {
                s.to_string()
            } else {
                format!("{rel}/{s}")
            };
            walk(&ent.path(), &sub, depth + 1, f)?;
        } else if ft.is_file() {
            f(rel, &name, false);
        }
    }
    Ok(())
}

/// (st_dev, st_ino) of a path, if it exists.
pub(crate) fn dev_ino(p: &Path) -> Option<(u64, u64)> {
    fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}
