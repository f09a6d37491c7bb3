//! Throw-away file systems for tests and benchmarks.
//!
//! [`ScratchFs::new`] makes an image file of the requested size, formats it as btrfs,
//! XFS (`mkfs.xfs -m reflink=1`) or ext4, attaches it to a free loop device
//! (`losetup --find --show`, retried because several test processes race for
//! `/dev/loop*`), and mounts it on a fresh directory. Dropping the value unmounts
//! (retrying, lazily as a last resort), detaches the loop device and removes the image
//! and the directory. Mounts leaked by a killed test process are found by their
//! directory name (`refblk-scratch.<pid>.<n>`) and cleaned up by the next
//! [`ScratchFs::new`] once that pid is gone.
//!
//! For power-failure tests, [`ScratchFs::shutdown_without_log_flush`] takes the
//! file system down as a power cut would (dirty page cache and in-memory journal
//! lost) and [`ScratchFs::remount`] mounts it again from what reached the device.
//!
//! The project rule for tests that need root or a tool: FAIL with a message saying
//! what is missing, unless `REFBLK_ALLOW_SKIP=1`, in which case print `SKIP: reason`
//! and return. [`require_root_or_skip`] and [`ScratchFs::new_or_skip`] implement it.
//!
//! ```no_run
//! use refblk::util::scratchfs::{FsKind, ScratchFs};
//! let Some(fs) = ScratchFs::new_or_skip(FsKind::Xfs, 300 << 20) else { return };
//! std::fs::write(fs.path().join("hello"), b"hi").unwrap();
//! // unmounted and detached when `fs` is dropped
//! ```

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::Duration;

/// A file system type [`ScratchFs`] can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsKind {
    /// btrfs (reflinks; needs at least ~114 MiB).
    Btrfs,
    /// XFS with `-m reflink=1` (reflinks; needs at least ~300 MiB with current xfsprogs).
    Xfs,
    /// ext4 (no reflinks: exercises copy fallbacks).
    Ext4,
}

impl FsKind {
    /// All kinds, for tests that loop over file systems.
    pub const ALL: [FsKind; 3] = [FsKind::Btrfs, FsKind::Xfs, FsKind::Ext4];

    /// The `mkfs` program for this kind.
    pub fn mkfs_program(self) -> &'static str {
        match self {
            FsKind::Btrfs => "mkfs.btrfs",
            FsKind::Xfs => "mkfs.xfs",
            FsKind::Ext4 => "mkfs.ext4",
        }
    }

    /// Whether FICLONE works on this file system.
    pub fn supports_reflink(self) -> bool {
        !matches!(self, FsKind::Ext4)
    }

    /// Smallest size (bytes) that mkfs accepts reliably.
    pub fn min_size(self) -> u64 {
        match self {
            FsKind::Btrfs => 114 << 20,
            FsKind::Xfs => 300 << 20,
            FsKind::Ext4 => 8 << 20,
        }
    }

    fn mkfs_args(self) -> &'static [&'static str] {
        match self {
            FsKind::Btrfs => &["-q", "-f"],
            FsKind::Xfs => &["-q", "-f", "-m", "reflink=1"],
            FsKind::Ext4 => &["-q", "-F", "-E", "nodiscard"],
        }
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Btrfs => "btrfs",
            FsKind::Xfs => "xfs",
            FsKind::Ext4 => "ext4",
        })
    }
}

/// A mounted scratch file system; unmounted, detached and deleted on drop.
#[derive(Debug)]
pub struct ScratchFs {
    kind: FsKind,
    base: PathBuf,
    image: PathBuf,
    mountpoint: PathBuf,
    loopdev: Option<String>,
    mounted: bool,
}

const PREFIX: &str = "refblk-scratch.";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True if `REFBLK_ALLOW_SKIP=1`.
pub fn skip_allowed() -> bool {
    std::env::var("REFBLK_ALLOW_SKIP").as_deref() == Ok("1")
}

/// Apply the skip rule for an unmet requirement: panic with `reason` unless
/// `REFBLK_ALLOW_SKIP=1`, else print `SKIP: reason` and return false.
pub fn skip_or_fail(reason: &str) -> bool {
    if skip_allowed() {
        println!("SKIP: {reason}");
        eprintln!("SKIP: {reason}");
        false
    } else {
        panic!("{reason} (set REFBLK_ALLOW_SKIP=1 to skip instead of failing)");
    }
}

/// Returns true when running as root; otherwise applies [`skip_or_fail`] with a
/// message built from `reason` (what the test needs root for).
pub fn require_root_or_skip(reason: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip_or_fail(&format!("test needs root: {reason}"))
}

/// Returns true when every program in `tools` is on PATH (or in /sbin, /usr/sbin);
/// otherwise applies [`skip_or_fail`] naming the missing ones.
pub fn require_tools_or_skip(tools: &[&str], reason: &str) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(&format!(
        "missing tool(s) {} needed for {reason} (install btrfs-progs xfsprogs e2fsprogs util-linux)",
        missing.join(", ")
    ))
}

/// Whether `tool` can be found on PATH or in the sbin directories.
pub fn have_tool(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/sbin", "/usr/sbin", "/usr/local/sbin"])
        .any(|d| !d.is_empty() && Path::new(d).join(tool).is_file());
    found
}

pub fn run(cmd: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl ScratchFs {
    /// Make, attach and mount a file system of `kind` in an image of `size` bytes.
    ///
    /// The image lives in `$REFBLK_SCRATCH_DIR` if set, else the system temp dir.
    /// Errors name the failing command and its stderr.
    pub fn new(kind: FsKind, size: u64) -> io::Result<ScratchFs> {
        let root = std::env::var_os("REFBLK_SCRATCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        ScratchFs::new_in(kind, size, &root)
    }

    /// Like [`ScratchFs::new`] with the image in `root` (e.g. `/dev/shm`, for a
    /// file system whose "disk" is memory: `refblk bench --backing ram`). The
    /// image and its directory are named as `new` names them, so a leaked
    /// mount is found and removed the same way.
    pub fn new_in(kind: FsKind, size: u64, root: &Path) -> io::Result<ScratchFs> {
        cleanup_leaked();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = root.join(format!("{PREFIX}{}.{n}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base)?;
        let image = base.join("fs.img");
        let mountpoint = base.join("mnt");
        fs::create_dir(&mountpoint)?;
        let mut me = ScratchFs {
            kind,
            base,
            image,
            mountpoint,
            loopdev: None,
            mounted: false,
        };
        let f = fs::File::create(&me.image)?;
        f.set_len(size.max(kind.min_size()))?;
        drop(f);
        let img = me.image.to_string_lossy().into_owned();
        let mut args: Vec<&str> = kind.mkfs_args().to_vec();
        args.push(&img);
        run(kind.mkfs_program(), &args)?;
        me.loopdev = Some(attach_loop(&img, &[])?);
        let dev = me.loopdev.clone().unwrap_or_default();
        let mnt = me.mountpoint.to_string_lossy().into_owned();
        run("mount", &["-t", &kind.to_string(), &dev, &mnt])?;
        me.mounted = true;
        log::debug!("scratch {kind} on {dev} mounted at {mnt}");
        Ok(me)
    }

    /// Like [`ScratchFs::new`] but applying the skip rule: needs root and the mkfs,
    /// losetup and mount tools; a failure to create the file system also fails the
    /// test (or skips with `REFBLK_ALLOW_SKIP=1`). Returns `None` when skipping.
    pub fn new_or_skip(kind: FsKind, size: u64) -> Option<ScratchFs> {
        let why = format!("a loop-mounted {kind} file system");
        if !require_root_or_skip(&why) {
            return None;
        }
        if !require_tools_or_skip(&[kind.mkfs_program(), "losetup", "mount", "umount"], &why) {
            return None;
        }
        match ScratchFs::new(kind, size) {
            Ok(fs) => Some(fs),
            Err(e) => {
                skip_or_fail(&format!("cannot set up {why}: {e}"));
                None
            }
        }
    }

    /// The mount point: put your files here.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The file system type.
    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// The loop device (`/dev/loopN`) the image is attached to.
    pub fn loop_device(&self) -> Option<&str> {
        self.loopdev.as_deref()
    }

    /// The backing image file (on the host file system).
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Take the file system down at once, the way a power cut would:
    /// `xfs_io -x -c shutdown MNT` *without* `-f`, i.e. `FS_IOC_SHUTDOWN` with
    /// `NOLOGFLUSH`. Dirty pages in the page cache and the part of the journal
    /// still in memory are thrown away; only what the file system had already
    /// written to the loop device stays (the loop device's backing file is the
    /// "disk"). Every later operation on the mount fails with EIO until
    /// [`remount`](Self::remount). XFS and ext4 implement the ioctl; needs
    /// `xfs_io` (xfsprogs) and root.
    pub fn shutdown_without_log_flush(&self) -> io::Result<()> {
        let mnt = self.mountpoint.to_string_lossy().into_owned();
        run("xfs_io", &["-x", "-c", "shutdown", &mnt]).map(|_| ())
    }

    /// Unmount, drop the loop device's buffer cache (`blockdev --flushbufs`) and
    /// mount again: after [`shutdown_without_log_flush`](Self::shutdown_without_log_flush)
    /// the new mount replays the journal from the device, and reads come from
    /// the device, not from the old mount's page cache. The unmount is strict (no
    /// lazy fallback, unlike drop): a lazily detached mount would keep its
    /// superblock, and with it its cached pages, for the next mount of the same
    /// device. So close every file on the file system first; an error says which
    /// step failed and leaves the value droppable (drop cleans up whatever is
    /// still mounted or attached).
    pub fn remount(&mut self) -> io::Result<()> {
        let mnt = self.mountpoint.to_string_lossy().into_owned();
        let dev = self
            .loopdev
            .clone()
            .ok_or_else(|| io::Error::other("scratch file system has no loop device"))?;
        if self.mounted {
            let mut last = None;
            for attempt in 0..5 {
                match run("umount", &[&mnt]) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                sleep(Duration::from_millis(100 * (attempt + 1)));
            }
            if let Some(e) = last {
                return Err(e);
            }
            self.mounted = false;
        }
        run("blockdev", &["--flushbufs", &dev])?;
        run("mount", &["-t", &self.kind.to_string(), &dev, &mnt])?;
        self.mounted = true;
        log::debug!("scratch {} on {dev} remounted at {mnt}", self.kind);
        Ok(())
    }
}

/// `losetup --find --show [OPTIONS] IMG`, retried: concurrent processes can grab the
/// same free device between the kernel's "get free" and "configure" steps.
pub fn attach_loop(img: &str, options: &[&str]) -> io::Result<String> {
    let mut last = None;
    for attempt in 0..20 {
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(options);
        args.push(img);
        match run("losetup", &args) {
            Ok(dev) if dev.starts_with("/dev/") => return Ok(dev),
            Ok(other) => last = Some(io::Error::other(format!("losetup printed {other:?}"))),
            Err(e) => last = Some(e),
        }
        sleep(Duration::from_millis(50 + 50 * attempt));
    }
    Err(last.unwrap_or_else(|| io::Error::other("losetup failed")))
}

fn unmount(mnt: &Path) -> bool {
    let m = mnt.to_string_lossy();
    for attempt in 0..10 {
        if run("umount", &[&m]).is_ok() {
            return true;
        }
        sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    log::warn!("umount {m} keeps failing; detaching lazily");
    run("umount", &["-l", &m]).is_ok()
}

/// `losetup -d DEV`, retried, and wait until the kernel has let go of it.
pub fn detach(dev: &str) {
    for attempt in 0..10 {
        if run("losetup", &["-d", dev]).is_ok() {
            wait_detached(dev);
            return;
        }
        sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    log::warn!("losetup -d {dev} failed; the device stays attached");
}

/// `losetup -d` of a device someone still has open (udev probing it after the
/// umount, say) succeeds but only marks it for detach at the last close; wait,
/// up to 5 s, until the kernel has let go of the backing file.
fn wait_detached(dev: &str) {
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        dev.trim_start_matches("/dev/")
    );
    for _ in 0..100 {
        if !Path::new(&backing).exists() {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    log::warn!("{dev} is still attached 5 s after losetup -d (someone holds it open)");
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted && unmount(&self.mountpoint) {
            self.mounted = false;
        }
        if let Some(dev) = self.loopdev.take() {
            detach(&dev);
        }
        if !self.mounted {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

/// Unmount and detach scratch file systems left behind by processes that no longer
/// exist (a test killed before its Drop ran).
fn cleanup_leaked() {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut it = line.split_whitespace();
        let (Some(dev), Some(mnt)) = (it.next(), it.next()) else {
            continue;
        };
        let mnt = mnt.replace("\\040", " ");
        let Some(pos) = mnt.find(PREFIX) else {
            continue;
        };
        let rest = &mnt[pos + PREFIX.len()..];
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        log::warn!("cleaning up leaked scratch mount {mnt} of dead pid {pid}");
        let mnt_path = PathBuf::from(&mnt);
        if unmount(&mnt_path) {
            if dev.starts_with("/dev/loop") {
                detach(dev);
            }
            if let Some(base) = mnt_path.parent() {
                let _ = fs::remove_dir_all(base);
            }
        }
    }
}
