//! Durable file operations, each disk-changing step announced to [`Faults`].
//!
//! Rules (the same as Qubes' file-reflink driver):
//! - a new file is written under a temporary name `<dst>~<random>`, fsynced, and only
//!   then renamed to `<dst>`;
//! - every rename, link, unlink and mkdir is followed by an fsync of the directory (both
//!   directories for a cross-directory rename);
//! - copies are FICLONE reflinks; where the kernel answers EBADF, EINVAL, EOPNOTSUPP or
//!   EXDEV the data is copied sparsely instead (SEEK_DATA/SEEK_HOLE, zero blocks left as
//!   holes, like `cp --sparse=always`), with progress on stderr for large images.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;
use nix::unistd::{lseek, Whence};

use super::faults::{errno_of, Faults};

/// Images at least this large report sparse-copy progress on stderr.
pub const PROGRESS_THRESHOLD: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const BLOCK: usize = 4096;

/// Disk operations bound to a fault counter.
#[derive(Clone, Copy)]
pub struct Ops<'a> {
    faults: &'a Faults,
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Attach the path and the step to an I/O error.
pub fn ctx(e: io::Error, what: &str, path: &Path) -> io::Error {
    let errno = errno_of(&e);
    let kind = e.kind();
    let msg = format!("{what} {}: {e}", path.display());
    match errno {
        Some(n) => io::Error::new(kind, OsErrorWithMsg { errno: n, msg }),
        None => io::Error::new(kind, msg),
    }
}

/// An error message that keeps the errno (so ENOSPC stays recognisable).
#[derive(Debug)]
pub struct OsErrorWithMsg {
    /// The errno.
    pub errno: i32,
    /// The message.
    pub msg: String,
}

impl std::fmt::Display for OsErrorWithMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}
impl std::error::Error for OsErrorWithMsg {}

/// The errno of an error produced by this module (through wrappers).
pub fn errno(e: &io::Error) -> Option<i32> {
    errno_of(e).or_else(|| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<OsErrorWithMsg>())
            .map(|m| m.errno)
    })
}

/// A random 8-character suffix from `[a-z0-9_]`, as Python's tempfile uses.
pub fn random_suffix() -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
    let mut buf = [0u8; 8];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mix = t ^ ((std::process::id() as u128) << 64);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (mix >> (i * 8)) as u8;
        }
    }
    buf.iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

/// Try one FICLONE of all of `src` into `dst`. Ok(true) = reflinked; Ok(false) = the
/// file system (or the pair of files) cannot reflink and a copy is needed.
pub fn try_reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes two open file descriptors (the destination as the ioctl
    // target, the source as the integer argument) and no memory from us; both
    // descriptors are borrowed from live `File`s for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EBADF | libc::EINVAL | libc::EOPNOTSUPP | libc::EXDEV) => Ok(false),
        _ => Err(e),
    }
}

impl<'a> Ops<'a> {
    /// Operations reporting to `faults`.
    pub fn new(faults: &'a Faults) -> Ops<'a> {
        Ops { faults }
    }

    fn step(&self, what: &str, path: &Path) -> io::Result<()> {
        self.faults
            .check(&|| format!("{what} {}", path.display()))
            .map_err(|e| ctx(e, what, path))
    }

    /// fsync a directory (or any path).
    pub fn fsync_path(&self, path: &Path) -> io::Result<()> {
        self.step("fsync", path)?;
        let f = File::open(path).map_err(|e| ctx(e, "open", path))?;
        f.sync_all().map_err(|e| ctx(e, "fsync", path))
    }

    /// mkdir `path` and missing parents; fsync each parent after a mkdir.
    /// Returns whether `path` itself was created.
    pub fn create_dir_all(&self, path: &Path) -> io::Result<bool> {
        if path.is_dir() {
            return Ok(false);
        }
        let p = parent(path);
        if p != path && !p.exists() {
            self.create_dir_all(p)?;
        }
        self.step("mkdir", path)?;
        match fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {
                return Ok(false)
            }
            Err(e) => return Err(ctx(e, "mkdir", path)),
        }
        self.fsync_path(p)?;
        log::debug!("created directory {}", path.display());
        Ok(true)
    }

    /// Remove an empty directory (ignoring "not found" and "not empty").
    pub fn remove_empty_dir(&self, path: &Path) -> io::Result<bool> {
        self.step("rmdir", path)?;
        match fs::remove_dir(path) {
            Ok(()) => {
                self.fsync_path(parent(path))?;
                log::debug!("removed empty directory {}", path.display());
                Ok(true)
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) =>
            {
                Ok(false)
            }
            Err(e) => Err(ctx(e, "rmdir", path)),
        }
    }

    /// Durably remove a file if it exists; returns whether it existed.
    pub fn remove_file(&self, path: &Path) -> io::Result<bool> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(false);
        }
        self.step("unlink", path)?;
        match fs::remove_file(path) {
            Ok(()) => {
                self.fsync_path(parent(path))?;
                log::debug!("removed {}", path.display());
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ctx(e, "unlink", path)),
        }
    }

    /// Durably rename `src` to `dst` (replacing `dst`).
    pub fn rename(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.step("rename", src)?;
        fs::rename(src, dst)
            .map_err(|e| ctx(e, &format!("rename to {}: rename", dst.display()), src))?;
        self.fsync_path(parent(dst))?;
        if parent(src) != parent(dst) {
            self.fsync_path(parent(src))?;
        }
        log::debug!("renamed {} -> {}", src.display(), dst.display());
        Ok(())
    }

    /// Durably hardlink `src` as `dst` (creating `dst`'s directory if needed).
    pub fn hardlink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.create_dir_all(parent(dst))?;
        self.step("link", dst)?;
        fs::hard_link(src, dst)
            .map_err(|e| ctx(e, &format!("hardlink from {}: link", src.display()), dst))?;
        self.fsync_path(parent(dst))?;
        log::debug!("hardlinked {} -> {}", src.display(), dst.display());
        Ok(())
    }

    /// Truncate an existing file to `size` and fsync it.
    pub fn resize_file(&self, path: &Path, size: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| ctx(e, "open", path))?;
        self.step("truncate", path)?;
        f.set_len(size).map_err(|e| ctx(e, "truncate", path))?;
        self.step("fsync", path)?;
        f.sync_all().map_err(|e| ctx(e, "fsync", path))
    }

    /// fsync an existing file.
    pub fn fsync_file(&self, path: &Path) -> io::Result<()> {
        self.fsync_path(path)
    }

    /// Write a new file at `dst` through a temporary `<dst>~<random>`: `fill` writes
    /// the content; the temp file is then chmod 0600, fsynced and renamed to `dst`.
    /// On error the temp file is removed (best effort) and the error returned.
    pub fn replace_file<T>(
        &self,
        dst: &Path,
        fill: impl FnOnce(&File, &Path) -> io::Result<T>,
    ) -> io::Result<T> {
        self.create_dir_all(parent(dst))?;
        let (tmp_path, file) = loop {
            let mut name = dst.as_os_str().to_owned();
            name.push("~");
            name.push(random_suffix());
            let tmp = PathBuf::from(name);
            self.step("create", &tmp)?;
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ctx(e, "create", &tmp)),
            }
        };
        let result = (|| {
            let v = fill(&file, &tmp_path)?;
            self.step("chmod", &tmp_path)?;
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(|e| ctx(e, "chmod", &tmp_path))?;
            self.step("fsync", &tmp_path)?;
            file.sync_all().map_err(|e| ctx(e, "fsync", &tmp_path))?;
            Ok(v)
        })();
        drop(file);
        let result = result.and_then(|v| self.rename(&tmp_path, dst).map(|()| v));
        if result.is_err() {
            if let Err(e) = self.remove_file(&tmp_path) {
                log::warn!("cannot remove temporary file {}: {e}", tmp_path.display());
            }
        }
        result
    }

    /// Create (or replace) `dst` as an empty sparse file of `size` bytes.
    pub fn create_sparse(&self, dst: &Path, size: u64) -> io::Result<()> {
        self.replace_file(dst, |f, tmp| {
            self.step("truncate", tmp)?;
            f.set_len(size).map_err(|e| ctx(e, "truncate", tmp))
        })?;
        log::debug!("created sparse file {} ({size} bytes)", dst.display());
        Ok(())
    }

    /// Copy `src` to a new inode at `dst` (via a temp file): reflink if possible, else a
    /// sparse copy. With `dst_size`, the copy is then truncated to that size; with
    /// `copy_mtime`, it gets `src`'s mtime (nanoseconds). Returns whether it reflinked.
    pub fn copy_file(
        &self,
        src: &Path,
        dst: &Path,
        dst_size: Option<u64>,
        copy_mtime: bool,
    ) -> io::Result<bool> {
        let s = File::open(src).map_err(|e| ctx(e, "open", src))?;
        let reflinked = self.replace_file(dst, |t, tmp| {
            let mut reflinked = false;
            if dst_size != Some(0) {
                self.step("ficlone", tmp)?;
                reflinked = try_reflink(&s, t).map_err(|e| {
                    ctx(e, &format!("reflink from {}: FICLONE", src.display()), tmp)
                })?;
                if !reflinked {
                    log::debug!(
                        "copying {} -> {} (no reflink)",
                        src.display(),
                        tmp.display()
                    );
                    self.sparse_copy(&s, src, t, tmp)?;
                }
            }
            if let Some(n) = dst_size {
                self.step("truncate", tmp)?;
                t.set_len(n).map_err(|e| ctx(e, "truncate", tmp))?;
            }
            if copy_mtime {
                let md = s.metadata().map_err(|e| ctx(e, "stat", src))?;
                let ts = TimeSpec::new(md.mtime(), md.mtime_nsec());
                self.step("utimens", tmp)?;
                futimens(t, &ts, &ts).map_err(|e| ctx(e.into(), "utimens", tmp))?;
            }
            Ok(reflinked)
        })?;
        if reflinked {
            log::debug!("reflinked {} -> {}", src.display(), dst.display());
        }
        Ok(reflinked)
    }

    /// Copy the data of `s` into the empty file `t` leaving holes for holes and for
    /// all-zero blocks, and set `t`'s length to `s`'s.
    pub fn sparse_copy(&self, s: &File, sp: &Path, t: &File, tp: &Path) -> io::Result<()> {
        let len = s.metadata().map_err(|e| ctx(e, "stat", sp))?.len();
        let progress = len >= PROGRESS_THRESHOLD;
        let started = Instant::now();
        let mut last_report = 0u64;
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        while pos < len {
            let data = match lseek(s, pos as i64, Whence::SeekData) {
                Ok(o) => o as u64,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(nix::errno::Errno::EINVAL) => pos, // no SEEK_DATA support: dense
                Err(e) => return Err(ctx(e.into(), "seek data in", sp)),
            };
            let hole = match lseek(s, data as i64, Whence::SeekHole) {
                Ok(o) => (o as u64).min(len),
                Err(_) => len,
            };
            let mut off = data;
            while off < hole {
                let want = ((hole - off) as usize).min(CHUNK);
                let got = s
                    .read_at(&mut buf[..want], off)
                    .map_err(|e| ctx(e, "read", sp))?;
                if got == 0 {
                    break;
                }
                self.step("write", tp)?;
                write_nonzero(t, &buf[..got], off).map_err(|e| ctx(e, "write", tp))?;
                off += got as u64;
                if progress && off - last_report >= len / 20 {
                    last_report = off;
                    eprintln!(
                        "refblk: copying {}: {}% ({} MiB of {} MiB, {:.0}s)",
                        sp.display(),
                        off * 100 / len,
                        off >> 20,
                        len >> 20,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            pos = hole.max(off);
        }
        self.step("truncate", tp)?;
        t.set_len(len).map_err(|e| ctx(e, "truncate", tp))?;
        if progress {
            eprintln!("refblk: copied {} ({} MiB)", sp.display(), len >> 20);
        }
        Ok(())
    }

    /// Write a stream into the empty file `t` (sparse: zero blocks are skipped), at most
    /// `limit` bytes; returns the number of bytes read. Errors if more than `limit`.
    pub fn stream_into(
        &self,
        r: &mut dyn Read,
        what: &str,
        t: &File,
        tp: &Path,
        limit: Option<u64>,
    ) -> io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = match r.read(&mut buf[filled..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io::Error::new(e.kind(), format!("read {what}: {e}"))),
                };
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            if let Some(l) = limit {
                if off + filled as u64 > l {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{what} holds more than the volume size of {l} bytes"),
                    ));
                }
            }
            self.step("write", tp)?;
            write_nonzero(t, &buf[..filled], off).map_err(|e| ctx(e, "write", tp))?;
            off += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(off)
    }
}

/// pwrite the non-zero 4 KiB blocks of `buf` at `off`, coalescing runs.
fn write_nonzero(t: &File, buf: &[u8], off: u64) -> io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let end = (i + BLOCK).min(buf.len());
        if buf[i..end].iter().all(|b| *b == 0) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < buf.len() {
            let e = (j + BLOCK).min(buf.len());
            if buf[j..e].iter().all(|b| *b == 0) {
                break;
            }
            j = e;
        }
        t.write_all_at(&buf[i..j], off + i as u64)?;
        i = j;
    }
    Ok(())
}

use std::os::unix::fs::MetadataExt;
