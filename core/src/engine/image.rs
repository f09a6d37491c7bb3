//! Opening the image file: O_DIRECT with a buffered fallback, direct-I/O alignment, and
//! safe probes for the fallocate modes the backend maps discard requests onto.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// How the image's primary file descriptor does I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Opened with O_DIRECT. Requests whose file offset and length are multiples of
    /// `offset_align` and whose buffer address is a multiple of `mem_align` go to the
    /// O_DIRECT fd; anything else is routed to a second, buffered fd on the same file.
    Direct { offset_align: u32, mem_align: u32 },
    /// Page-cache I/O only; `reason` says why O_DIRECT is not used.
    Buffered { reason: String },
}

/// Whether to try O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectPolicy {
    /// Try O_DIRECT and fall back to buffered I/O if the file system refuses it.
    #[default]
    Auto,
    /// Always use buffered I/O.
    Never,
}

pub(crate) struct OpenedImage {
    pub primary: File,
    /// Present only in direct mode: the fd used for requests not aligned for O_DIRECT.
    pub buffered: Option<File>,
    pub mode: IoMode,
}

/// An image opened for I/O: its file descriptors and what was found out about it.
/// One `ImageFile` can be attached to several engines at once (a multi-queue device
/// whose queues run on different workers share it through an `Arc`).
#[derive(Debug)]
pub struct ImageFile {
    pub(crate) primary: File,
    /// Present only in direct mode: the fd for requests not aligned for O_DIRECT.
    pub(crate) buffered: Option<File>,
    pub path: std::path::PathBuf,
    /// Size in bytes when opened (see [`ImageFile::size_now`]).
    pub size: u64,
    pub read_only: bool,
    pub io_mode: IoMode,
    pub fs: FsCaps,
}

impl ImageFile {
    /// Open `path` (O_DIRECT per `direct`, with the buffered fallback) and probe its
    /// size and discard support. Errors name the file and the step.
    pub fn open(path: &Path, read_only: bool, direct: DirectPolicy) -> io::Result<ImageFile> {
        // A page-aligned page inside an ordinary allocation, for the O_DIRECT probe.
        let mut scratch = vec![0u8; 2 * 4096];
        let skip = scratch.as_ptr().align_offset(4096);
        let probe = &mut scratch[skip..skip + 4096];
        let opened = open_image(path, read_only, direct, probe)?;
        let size = image_size(path, &opened.primary)?;
        let mut fs = probe_fs_caps(path, &opened.primary, read_only)?;
        if !super::kernel_has_fallocate() {
            // Discard ops would fail with -EINVAL: do not let the backend advertise them.
            log::info!("io_uring lacks IORING_OP_FALLOCATE; reporting no discard support");
            fs.punch_hole = false;
            fs.zero_range = false;
        }
        Ok(ImageFile {
            primary: opened.primary,
            buffered: opened.buffered,
            path: path.to_path_buf(),
            size,
            read_only,
            io_mode: opened.mode,
            fs,
        })
    }

    /// The file's size now, in bytes.
    pub fn size_now(&self) -> io::Result<u64> {
        image_size(&self.path, &self.primary)
    }
}

pub(crate) fn ctx_err(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

fn open_with(path: &Path, read_only: bool, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
}

/// Direct-I/O alignment the kernel reports via statx(STATX_DIOALIGN), if it does.
/// `Some((0, 0))` means "this file does not support direct I/O".
fn statx_dioalign(f: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero statx struct is a valid value (plain integers).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, a NUL-terminated empty path with AT_EMPTY_PATH, and a pointer to a
    // statx struct we own for the duration of the call.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align))
}

/// Open the image. `probe_buf` is page-aligned scratch memory of at least 4096 bytes used
/// for the O_DIRECT probe read.
pub(crate) fn open_image(
    path: &Path,
    read_only: bool,
    policy: DirectPolicy,
    probe_buf: &mut [u8],
) -> io::Result<OpenedImage> {
    let open_buffered = || open_with(path, read_only, 0).map_err(|e| ctx_err(path, "open", e));
    if policy == DirectPolicy::Never {
        return Ok(OpenedImage {
            primary: open_buffered()?,
            buffered: None,
            mode: IoMode::Buffered {
                reason: "direct I/O disabled by configuration".into(),
            },
        });
    }
    let direct = match open_with(path, read_only, libc::O_DIRECT) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::info!(
                "{}: file system refuses O_DIRECT at open ({e}); using buffered I/O",
                path.display()
            );
            return Ok(OpenedImage {
                primary: open_buffered()?,
                buffered: None,
                mode: IoMode::Buffered {
                    reason: format!("open with O_DIRECT failed: {e}"),
                },
            });
        }
        Err(e) => return Err(ctx_err(path, "open (O_DIRECT)", e)),
    };
    let (mut offset_align, mut mem_align) = match statx_dioalign(&direct) {
        Some((0, _)) => {
            return Ok(OpenedImage {
                primary: open_buffered()?,
                buffered: None,
                mode: IoMode::Buffered {
                    reason: "statx reports no direct I/O support for this file".into(),
                },
            })
        }
        Some((o, m)) => (o, m.max(1)),
        None => (512, 512),
    };
    // Probe with a real aligned read: some file systems accept O_DIRECT at open and
    // refuse it at I/O time, and without STATX_DIOALIGN 512 may be too small.
    let mut probe_ok = false;
    let mut last_err = None;
    for align in [offset_align, 4096] {
        if align as usize > probe_buf.len() || !align.is_power_of_two() {
            continue;
        }
        match direct.read_at(&mut probe_buf[..align as usize], 0) {
            Ok(_) => {
                offset_align = align;
                mem_align = mem_align.max(1);
                probe_ok = true;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
            Err(e) => return Err(ctx_err(path, "O_DIRECT probe read", e)),
        }
    }
    if !probe_ok {
        let e = last_err.map(|e| e.to_string()).unwrap_or_default();
        log::info!(
            "{}: aligned O_DIRECT probe read failed ({e}); using buffered I/O",
            path.display()
        );
        return Ok(OpenedImage {
            primary: open_buffered()?,
            buffered: None,
            mode: IoMode::Buffered {
                reason: format!("aligned O_DIRECT probe read failed: {e}"),
            },
        });
    }
    // The buffered twin must not read ahead. Readahead caches pages next to
    // the ones asked for, possibly while an O_DIRECT write to them is in
    // flight: the cached page keeps the old data, a later unaligned write
    // modifies that stale page and its writeback puts the old bytes back on
    // disk over the direct write (the kernel logs "Page cache invalidation
    // failure on direct I/O. Possible data corruption due to collision with
    // buffered I/O!"; seen in engine_fs on XFS with 4 KiB sectors). With
    // POSIX_FADV_RANDOM a buffered read caches only the pages it covers, and
    // those overlap any direct I/O on them byte for byte, which requests in
    // flight never do unless the guest sends overlapping I/O to its own disk.
    let buffered = open_buffered()?;
    if let Err(e) = nix::fcntl::posix_fadvise(
        buffered.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    ) {
        log::info!(
            "{}: cannot turn readahead off for unaligned requests ({e}); using buffered I/O",
            path.display()
        );
        return Ok(OpenedImage {
            primary: buffered,
            buffered: None,
            mode: IoMode::Buffered {
                reason: format!("posix_fadvise(RANDOM) for the unaligned-request fd failed: {e}"),
            },
        });
    }
    Ok(OpenedImage {
        primary: direct,
        buffered: Some(buffered),
        mode: IoMode::Direct {
            offset_align,
            mem_align,
        },
    })
}

/// Current size of the image in bytes (works for regular files and block devices).
pub(crate) fn image_size(path: &Path, f: &File) -> io::Result<u64> {
    (&*f)
        .seek(SeekFrom::End(0))
        .map_err(|e| ctx_err(path, "seek to end (size)", e))
}

/// File system facts relevant to discard support and to zero-copy reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsCaps {
    /// statfs f_type magic of the file system holding the image.
    pub fs_magic: u64,
    /// Human name for `fs_magic` ("btrfs", "xfs", "ext4", "tmpfs", ... or "unknown").
    pub fs_name: &'static str,
    /// fallocate(PUNCH_HOLE|KEEP_SIZE) works here.
    pub punch_hole: bool,
    /// fallocate(ZERO_RANGE|KEEP_SIZE) works here.
    pub zero_range: bool,
    /// How the two booleans were found: "tmpfile probe", "file system type", or why
    /// nothing was probed ("read-only image", "not a regular file": both false).
    pub probed_by: &'static str,
    /// The file system checks this file's data against checksums when it reads
    /// it, or may: a file on btrfs without the NOCOW attribute (`chattr +C`)
    /// or whose attributes cannot be read, and a file on any file system other
    /// than ext2/3/4, XFS, tmpfs and ramfs. An O_DIRECT read of such a file
    /// verifies the checksum on the destination memory after the device
    /// filled it, so that memory must not be writable by a guest
    /// (`docs/security.md`, "Zero-copy reads"). Known when the image is
    /// opened: btrfs changes NOCOW only while a file is empty (`chattr +C`
    /// or `-C` on a file with data succeeds and changes nothing).
    pub data_checksums: bool,
}

const EXT4_MAGIC: u64 = 0xEF53;
const XFS_MAGIC: u64 = 0x5846_5342;
const BTRFS_MAGIC: u64 = 0x9123_683E;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;
/// `FS_NOCOW_FL` of linux/fs.h (not in the libc crate): btrfs's NOCOW file,
/// which also has no data checksums.
const FS_NOCOW_FL: libc::c_int = 0x0080_0000;

/// The inode flags of `f` (`FS_IOC_GETFLAGS`, as `lsattr` reads them).
fn inode_flags(f: &File) -> io::Result<libc::c_int> {
    // The kernel reads and writes an int for FS_IOC_GETFLAGS, whatever the
    // size its request number encodes (linux/fs.h's `long` is historical).
    nix::ioctl_read_bad!(fs_ioc_getflags, libc::FS_IOC_GETFLAGS, libc::c_int);
    let mut flags: libc::c_int = 0;
    // SAFETY: a valid open fd, and a pointer to an int we own for the call,
    // which is all FS_IOC_GETFLAGS writes.
    unsafe { fs_ioc_getflags(f.as_raw_fd(), &mut flags) }.map_err(io::Error::from)?;
    Ok(flags)
}

/// Whether the file system verifies `f`'s data against checksums on reads
/// ([`FsCaps::data_checksums`]), or may: only the file systems known to have
/// no data checksums say no (ext2/3/4 and XFS checksum metadata only; tmpfs
/// and ramfs, where a block device node also lives, have none), and btrfs
/// for a NOCOW file. Any other (ZFS, bcachefs, a network file system, ...)
/// counts as checksummed, and so does a btrfs file whose flags cannot be read.
fn has_data_checksums(path: &Path, f: &File, magic: u64) -> bool {
    match magic {
        EXT4_MAGIC | XFS_MAGIC | TMPFS_MAGIC | RAMFS_MAGIC => return false,
        BTRFS_MAGIC => {}
        _ => return true,
    }
    match inode_flags(f) {
        Ok(flags) => flags & FS_NOCOW_FL == 0,
        Err(e) => {
            log::info!(
                "{}: cannot read the file's attributes on btrfs ({e}); assuming data checksums",
                path.display()
            );
            true
        }
    }
}

fn fs_name(magic: u64) -> &'static str {
    match magic {
        EXT4_MAGIC => "ext4",
        XFS_MAGIC => "xfs",
        BTRFS_MAGIC => "btrfs",
        TMPFS_MAGIC => "tmpfs",
        RAMFS_MAGIC => "ramfs",
        _ => "unknown",
    }
}

fn caps_by_type(magic: u64) -> (bool, bool) {
    match magic {
        EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC => (true, true),
        TMPFS_MAGIC => (true, false),
        _ => (false, false),
    }
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> io::Result<()> {
    nix::fcntl::fallocate(
        f,
        nix::fcntl::FallocateFlags::from_bits_retain(mode),
        off,
        len,
    )
    .map_err(io::Error::from)
}

/// Probe on an anonymous O_TMPFILE in the image's directory, so the image itself is never
/// touched: write two blocks, punch one, zero-range the other. Returns None if the probe
/// could not be run (read-only directory, no O_TMPFILE, ...).
fn tmpfile_probe(dir: &Path) -> Option<(bool, bool)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
        .ok()?;
    f.write_all_at(&[0x5a; 8192], 0).ok()?;
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let judge = |r: io::Result<()>| -> Option<bool> {
        match r {
            Ok(()) => Some(true),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Some(false),
            Err(_) => None,
        }
    };
    let punch = judge(fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | keep, 0, 4096))?;
    let zero = judge(fallocate(&f, libc::FALLOC_FL_ZERO_RANGE | keep, 4096, 4096))?;
    Some((punch, zero))
}

pub(crate) fn probe_fs_caps(path: &Path, f: &File, read_only: bool) -> io::Result<FsCaps> {
    let st = nix::sys::statfs::fstatfs(f).map_err(|e| ctx_err(path, "fstatfs", e.into()))?;
    let magic = st.filesystem_type().0 as u64;
    let data_checksums = has_data_checksums(path, f, magic);
    let is_file = f
        .metadata()
        .map_err(|e| ctx_err(path, "fstat", e))?
        .file_type()
        .is_file();
    let skip = if !is_file {
        Some("not a regular file")
    } else if read_only {
        Some("read-only image")
    } else {
        None
    };
    if let Some(why) = skip {
        return Ok(FsCaps {
            fs_magic: magic,
            fs_name: fs_name(magic),
            punch_hole: false,
            zero_range: false,
            probed_by: why,
            data_checksums,
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (punch_hole, zero_range, probed_by) = match tmpfile_probe(dir) {
        Some((p, z)) => (p, z, "tmpfile probe"),
        None => {
            let (p, z) = caps_by_type(magic);
            (p, z, "file system type")
        }
    };
    Ok(FsCaps {
        fs_magic: magic,
        fs_name: fs_name(magic),
        punch_hole,
        zero_range,
        probed_by,
        data_checksums,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only file systems known to have no data checksums let a read go
    /// straight into a guest's page: an unknown one (ZFS's magic here, or
    /// bcachefs's) takes the copy path, whatever the file.
    #[test]
    fn only_known_file_systems_count_as_without_data_checksums() {
        let f = tempfile::tempfile().unwrap();
        let p = Path::new("/some/image");
        for m in [EXT4_MAGIC, XFS_MAGIC, TMPFS_MAGIC, RAMFS_MAGIC] {
            assert!(!has_data_checksums(p, &f, m), "{}", fs_name(m));
        }
        for m in [0x2fc1_2fc1_u64, 0xca45_1a4e, 0x6969, 0] {
            assert!(has_data_checksums(p, &f, m), "magic {m:#x}");
        }
    }
}
