//! The real Xen platform: `/dev/xen/gntdev` for grant maps and grant copy,
//! `/dev/xen/evtchn` (one open file per bound channel) for event channels, and
//! xenstore through [`XsClient`]. It mirrors [`super::sim::SimPlatform`] call for
//! call; it cannot be exercised on machines without Xen.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use xen_sys::evtchn as ev;
use xen_sys::gntdev as gd;

use super::{
    CopySeg, DomId, EventChannel, ForeignMapping, GrantMapError, GrantRef, GrantStatus, Platform,
    Port, PAGE_SIZE,
};
use crate::xenstore::XsClient;

/// Default device paths.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";
/// The xenstored unix socket (falls back to `/dev/xen/xenbus` in the client).
pub const XENSTORED_SOCKET: &str = "/var/run/xenstored/socket";

/// Attempts at a grant map whose mmap was interrupted (EINTR). Seen once in
/// the lab (Linux 6.12 dom0, Xen 4.20): the ring map of a connecting disk
/// failed with "gntdev mmap: Interrupted system call" and the guest never got
/// its disk. EINTR means "try again"; each attempt undoes the last one first.
const MAP_INTERRUPTED_TRIES: u32 = 8;

/// Run `f` until it returns anything but an interrupted error (EINTR), at most
/// `tries` times; the last interrupted error is returned as it is.
fn retry_interrupted<T>(tries: u32, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut left = tries.max(1);
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && left > 1 => {
                left -= 1;
                log::info!("grant map interrupted ({e}); trying again");
            }
            r => return r,
        }
    }
}

/// The real Xen, as dom0 (or a driver domain) sees it.
pub struct RealXen {
    gntdev: Arc<File>,
    evtchn_path: PathBuf,
    xenstore_path: PathBuf,
    /// A connection kept for `domain_exists`, opened on first use.
    xs_cached: std::sync::Mutex<Option<XsClient>>,
}

fn open_dev(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (is this a Xen dom0 with xen-gntdev/xen-evtchn loaded?)",
                    path.display()
                ),
            )
        })
}

/// Connect to xenstored: `$XENSTORED_PATH`, the standard socket, then
/// `/dev/xen/xenbus` (see [`XsClient::open_default`]).
fn open_xenstore(path: &Path) -> io::Result<XsClient> {
    XsClient::open_default().map_err(|e| {
        io::Error::other(format!(
            "xenstore ({} or /dev/xen/xenbus): {e}",
            path.display()
        ))
    })
}

/// A domain exists while the toolstack keeps `/local/domain/<domid>`.
fn xs_domain_exists(xs: &XsClient, domid: DomId) -> io::Result<bool> {
    xs.exists(0, &format!("/local/domain/{domid}"))
        .map_err(|e| io::Error::other(format!("xenstore: domain {domid}: {e}")))
}

/// The gntdev and evtchn ioctls, typed: each takes a pointer to its own
/// argument struct (xen-sys), so a request number cannot meet the wrong
/// argument. Calling one is `unsafe`: the pointer must be live and point at
/// what the request reads and writes.
mod ioctls {
    use xen_sys::evtchn as ev;
    use xen_sys::gntdev as gd;

    nix::ioctl_readwrite_bad!(
        /// `IOCTL_GNTDEV_MAP_GRANT_REF`: the header followed by `count` refs.
        map_grant_ref,
        gd::IOCTL_GNTDEV_MAP_GRANT_REF,
        gd::ioctl_gntdev_map_grant_ref
    );
    nix::ioctl_readwrite_bad!(
        /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
        unmap_grant_ref,
        gd::IOCTL_GNTDEV_UNMAP_GRANT_REF,
        gd::ioctl_gntdev_unmap_grant_ref
    );
    nix::ioctl_readwrite_bad!(
        /// `IOCTL_GNTDEV_GRANT_COPY`: `count` segments at `segments`.
        grant_copy,
        gd::IOCTL_GNTDEV_GRANT_COPY,
        gd::ioctl_gntdev_grant_copy
    );
    nix::ioctl_readwrite_bad!(
        /// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: returns the local port.
        bind_interdomain,
        ev::IOCTL_EVTCHN_BIND_INTERDOMAIN,
        ev::ioctl_evtchn_bind_interdomain
    );
    nix::ioctl_readwrite_bad!(
        /// `IOCTL_EVTCHN_NOTIFY`.
        notify,
        ev::IOCTL_EVTCHN_NOTIFY,
        ev::ioctl_evtchn_notify
    );
    nix::ioctl_readwrite_bad!(
        /// `IOCTL_EVTCHN_UNBIND`.
        unbind,
        ev::IOCTL_EVTCHN_UNBIND,
        ev::ioctl_evtchn_unbind
    );
}

/// An ioctl's error, naming what was asked.
fn ioctl_error(e: nix::Error, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl RealXen {
    /// Open `/dev/xen/gntdev` (event channel files are opened per bind).
    pub fn open() -> io::Result<RealXen> {
        Ok(RealXen {
            gntdev: Arc::new(open_dev(Path::new(GNTDEV_PATH))?),
            evtchn_path: PathBuf::from(EVTCHN_PATH),
            xenstore_path: PathBuf::from(XENSTORED_SOCKET),
            xs_cached: std::sync::Mutex::new(None),
        })
    }
}

/// A gntdev mapping: mmap of the index MAP_GRANT_REF returned; unmapped (munmap,
/// then UNMAP_GRANT_REF) on drop.
struct RealMapping {
    gntdev: Arc<File>,
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    count: u32,
    writable: bool,
}

// SAFETY: only raw pointers are handed out; the mapping lives until drop.
unsafe impl Send for RealMapping {}

// SAFETY: the gntdev mapping of len bytes at ptr lives until drop, writable
// exactly when mapped with PROT_WRITE (`writable`).
unsafe impl ForeignMapping for RealMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
}

fn unmap_grant_ref(gntdev: &File, index: u64, count: u32) {
    let mut u = gd::ioctl_gntdev_unmap_grant_ref {
        index,
        count,
        pad: 0,
    };
    // SAFETY: UNMAP_GRANT_REF with a pointer to its live argument struct.
    if let Err(e) = unsafe { ioctls::unmap_grant_ref(gntdev.as_raw_fd(), &mut u) } {
        log::warn!("gntdev: UNMAP_GRANT_REF index {index}: {e}");
    }
}

impl Drop for RealMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range we mmapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        unmap_grant_ref(&self.gntdev, self.index, self.count);
    }
}

/// A bound channel: its own `/dev/xen/evtchn` file, so `fd()` polls only this
/// port. Unbound when the file is closed.
struct RealChannel {
    file: File,
    port: Port,
}

impl EventChannel for RealChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> io::Result<()> {
        let mut n = ev::ioctl_evtchn_notify { port: self.port };
        // SAFETY: NOTIFY with a pointer to its live argument.
        unsafe { ioctls::notify(self.file.as_raw_fd(), &mut n) }
            .map_err(|e| ioctl_error(e, &format!("evtchn notify port {}", self.port)))?;
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ack(&self) -> io::Result<bool> {
        use std::io::{Read, Write};
        let mut b = [0u8; 4];
        match (&self.file).read(&mut b) {
            Ok(4) => {
                // Unmask: write the port back.
                (&self.file).write_all(&b).map_err(|e| {
                    io::Error::new(e.kind(), format!("evtchn unmask port {}: {e}", self.port))
                })?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("evtchn read port {}: {e}", self.port),
            )),
        }
    }
}

impl Drop for RealChannel {
    fn drop(&mut self) {
        let mut u = ev::ioctl_evtchn_unbind { port: self.port };
        // SAFETY: UNBIND with a pointer to its live argument (closing would unbind
        // too; this makes it explicit and logs failures).
        if let Err(e) = unsafe { ioctls::unbind(self.file.as_raw_fd(), &mut u) } {
            log::debug!("evtchn unbind port {}: {e}", self.port,);
        }
    }
}

impl Platform for RealXen {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn xenstore(&self) -> io::Result<XsClient> {
        open_xenstore(&self.xenstore_path)
    }

    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<Box<dyn ForeignMapping>> {
        super::check_map_refs(domid, refs)?;
        retry_interrupted(MAP_INTERRUPTED_TRIES, || {
            self.map_grant_refs_once(domid, refs, writable)
        })
        .map_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                return e;
            }
            GrantMapError {
                domid,
                gref: refs[0],
                status: GrantStatus::GeneralError,
                detail: format!("gntdev mmap: {e} ({MAP_INTERRUPTED_TRIES} times)"),
            }
            .into_io()
        })
    }
    fn grant_copy(
        &self,
        domid: DomId,
        segs: &mut [CopySeg<'_>],
        status: &mut [GrantStatus],
    ) -> io::Result<()> {
        super::check_copy_args(segs, status)?;
        // gntdev fails the whole ioctl for a segment crossing the guest page, so
        // answer those here per segment (BadCopyArg, as the simulation does) and
        // send only the others.
        let mut ops = Vec::with_capacity(segs.len());
        let mut which = Vec::with_capacity(segs.len());
        for (i, seg) in segs.iter_mut().enumerate() {
            let (gref, offset, len, ptr, to_guest) = match seg {
                CopySeg::FromGuest { gref, offset, dst } => {
                    (*gref, *offset, dst.len(), dst.as_mut_ptr(), false)
                }
                CopySeg::ToGuest { gref, offset, src } => {
                    (*gref, *offset, src.len(), src.as_ptr().cast_mut(), true)
                }
            };
            if offset as usize + len > PAGE_SIZE {
                status[i] = GrantStatus::BadCopyArg;
                continue;
            }
            let foreign = gd::gntdev_grant_copy_ptr {
                foreign: gd::gntdev_grant_copy_foreign {
                    ref_: gref,
                    offset,
                    domid,
                },
            };
            let local = gd::gntdev_grant_copy_ptr { virt: ptr.cast() };
            let (source, dest, flags) = if to_guest {
                (local, foreign, gd::GNTCOPY_dest_gref)
            } else {
                (foreign, local, gd::GNTCOPY_source_gref)
            };
            ops.push(gd::ioctl_gntdev_grant_copy_segment {
                source,
                dest,
                len: len as u16,
                flags,
                status: 0,
            });
            which.push(i);
        }
        if ops.is_empty() {
            return Ok(());
        }
        let mut arg = gd::ioctl_gntdev_grant_copy {
            count: ops.len() as u32,
            segments: ops.as_mut_ptr(),
        };
        // SAFETY: arg names ops.len() live segments in `ops`, whose local
        // buffers stay borrowed (through `segs`) for the whole call; the kernel
        // writes only each segment's status, ToGuest's guest page and
        // FromGuest's `dst`.
        unsafe { ioctls::grant_copy(self.gntdev.as_raw_fd(), &mut arg) }.map_err(|e| {
            ioctl_error(
                e,
                &format!(
                    "gntdev: GRANT_COPY of {} segments with domain {domid}",
                    ops.len()
                ),
            )
        })?;
        for (op, &i) in ops.iter().zip(which.iter()) {
            status[i] = GrantStatus::from_code(op.status);
        }
        Ok(())
    }

    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Box<dyn EventChannel>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.evtchn_path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", self.evtchn_path.display()))
            })?;
        let mut b = ev::ioctl_evtchn_bind_interdomain {
            remote_domain: u32::from(domid),
            remote_port,
        };
        // SAFETY: BIND_INTERDOMAIN with a pointer to its live argument.
        let port = unsafe { ioctls::bind_interdomain(file.as_raw_fd(), &mut b) }.map_err(|e| {
            ioctl_error(
                e,
                &format!("evtchn: bind to port {remote_port} of domain {domid}"),
            )
        })?;
        Ok(Box::new(RealChannel {
            file,
            port: port as Port,
        }))
    }

    fn domain_exists(&self, domid: DomId) -> io::Result<bool> {
        let mut cached = self.xs_cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.is_none() {
            *cached = Some(self.xenstore()?);
        }
        let xs = cached.as_ref().expect("set above");
        let r = xs_domain_exists(xs, domid);
        if r.is_err() {
            *cached = None; // reconnect next time
        }
        r
    }
}

impl RealXen {
    /// One MAP_GRANT_REF + mmap of 1..=MAX_MAP_REFS refs (checked by the
    /// caller); on failure, nothing stays mapped.
    fn map_grant_refs_once(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<Box<dyn ForeignMapping>> {
        // struct ioctl_gntdev_map_grant_ref with `count` trailing refs, in u64s for
        // alignment: 2 u64 of header, one u64 per ref.
        let mut buf = vec![0u64; 2 + refs.len()];
        let fd = self.gntdev.as_raw_fd();
        {
            let hdr = buf.as_mut_ptr().cast::<gd::ioctl_gntdev_map_grant_ref>();
            // SAFETY: buf is 8-aligned and holds the header plus refs.len() refs
            // (size_of::<ioctl_gntdev_grant_ref>() == 8, asserted in xen-sys).
            unsafe {
                (*hdr).count = refs.len() as u32;
                let first =
                    std::ptr::addr_of_mut!((*hdr).refs).cast::<gd::ioctl_gntdev_grant_ref>();
                for (i, &r) in refs.iter().enumerate() {
                    first.add(i).write(gd::ioctl_gntdev_grant_ref {
                        domid: u32::from(domid),
                        ref_: r,
                    });
                }
            }
        }
        // SAFETY: buf holds the header and refs.len() refs, which is what
        // MAP_GRANT_REF reads (count refs) and writes (the header's index).
        unsafe { ioctls::map_grant_ref(fd, buf.as_mut_ptr().cast()) }.map_err(|e| {
            ioctl_error(
                e,
                &format!(
                    "gntdev: MAP_GRANT_REF of {} refs from domain {domid}",
                    refs.len()
                ),
            )
        })?;
        // SAFETY: reading the OUT field of the header we passed.
        let index = unsafe { (*buf.as_ptr().cast::<gd::ioctl_gntdev_map_grant_ref>()).index };
        let len = refs.len() * PAGE_SIZE;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh kernel-chosen mapping of the gntdev range just set up; the
        // grant hypercall happens here and fails the mmap if Xen refuses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            unmap_grant_ref(&self.gntdev, index, refs.len() as u32);
            if e.kind() == io::ErrorKind::Interrupted {
                return Err(e);
            }
            return Err(GrantMapError {
                domid,
                gref: refs[0],
                status: GrantStatus::GeneralError,
                detail: format!("gntdev mmap: {e}"),
            }
            .into_io());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Box::new(RealMapping {
            gntdev: self.gntdev.clone(),
            ptr,
            len,
            index,
            count: refs.len() as u32,
            writable,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interrupted() -> io::Error {
        io::Error::from_raw_os_error(libc::EINTR)
    }

    /// An interrupted map is tried again, up to the bound; any other error
    /// or a success ends it at once.
    #[test]
    fn an_interrupted_map_is_tried_again_a_bounded_number_of_times() {
        let mut calls = 0;
        let r = retry_interrupted(8, || {
            calls += 1;
            if calls < 3 {
                Err(interrupted())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: io::Result<()> = retry_interrupted(8, || {
            calls += 1;
            Err(interrupted())
        });
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert_eq!(calls, 8, "gave up after {calls} attempts, not 8");
        let mut calls = 0;
        let r: io::Result<()> = retry_interrupted(8, || {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(calls, 1, "retried an error that was not EINTR");
    }
}
