//! The Xen platform a backend runs on.
//!
//! A dom0 block backend needs exactly four things from Xen, and this trait is that
//! list: a xenstore connection, mapping a foreign domain's granted pages (the shared
//! ring), copying between granted guest pages and local buffers (grant copy), and
//! interdomain event channels. Two implementations exist:
//!
//! - [`real::RealXen`]: `/dev/xen/gntdev`, `/dev/xen/evtchn`, xenstore over the
//!   xenstored socket or `/dev/xen/xenbus`.
//! - `refblk_sim::SimPlatform` (in the `refblk-sim` crate, which this library
//!   does not link): the simulated Xen used by tests and benchmarks (guest
//!   memory and grant tables in shared memory files, event channels as eventfds
//!   brokered by the simulator, a xenstored speaking the real wire protocol).
//!
//! Both must behave the same call for call, including failures: a bad grant
//! reference, a page not granted to us, a read-only grant used for writing or the
//! wrong domain give an error (per segment for grant copy), never a crash.

use std::io;
use std::os::fd::RawFd;

use crate::xenstore::XsClient;

pub mod real;

/// Most grant refs per map call, on the real and the simulated Xen alike.
pub const MAX_MAP_REFS: usize = 1024;

/// File name of the simulated xenstored's socket in a `refblk sim --dir DIR`
/// directory: the pool asks a simulated Xen for users of a volume through it
/// (`pool::users`) without linking the simulator.
pub const SIM_XENSTORED_SOCK: &str = "xenstored.sock";

/// A Xen domain id.
pub type DomId = u16;
/// A grant reference in a domain's grant table.
pub type GrantRef = u32;
/// An event channel port number.
pub type Port = u32;

/// Size of a Xen page; grants are per page.
pub const PAGE_SIZE: usize = 4096;

/// Per-segment result of a grant copy, mirroring Xen's `GNTST_*` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    /// GNTST_okay
    Okay,
    /// GNTST_general_error: anything else went wrong.
    GeneralError,
    /// GNTST_bad_domain: the domain does not exist.
    BadDomain,
    /// GNTST_bad_gntref: reference out of range or not in use.
    BadGntref,
    /// GNTST_permission_denied: not granted to us, or read-only for a write.
    PermissionDenied,
    /// GNTST_bad_copy_arg: offset/length outside the page.
    BadCopyArg,
}

impl GrantStatus {
    /// The Xen `GNTST_*` value.
    pub fn code(self) -> i16 {
        match self {
            GrantStatus::Okay => 0,
            GrantStatus::GeneralError => -1,
            GrantStatus::BadDomain => -2,
            GrantStatus::BadGntref => -3,
            GrantStatus::PermissionDenied => -8,
            GrantStatus::BadCopyArg => -10,
        }
    }

    /// From a Xen `GNTST_*` value (unknown codes map to `GeneralError`).
    pub fn from_code(code: i16) -> Self {
        match code {
            0 => GrantStatus::Okay,
            -2 => GrantStatus::BadDomain,
            -3 => GrantStatus::BadGntref,
            -8 => GrantStatus::PermissionDenied,
            -10 => GrantStatus::BadCopyArg,
            _ => GrantStatus::GeneralError,
        }
    }
}

/// One segment of a batched grant copy. The length is the local slice's length;
/// `offset + len` must stay within the guest page (else `BadCopyArg`).
#[derive(Debug)]
pub enum CopySeg<'a> {
    /// Copy from the guest's granted page into `dst` (a guest WRITE request).
    FromGuest {
        gref: GrantRef,
        offset: u16,
        dst: &'a mut [u8],
    },
    /// Copy `src` into the guest's granted page (answering a guest READ request);
    /// needs a writable grant.
    ToGuest {
        gref: GrantRef,
        offset: u16,
        src: &'a [u8],
    },
}

/// A mapping of one or more foreign granted pages, contiguous in our address
/// space. Unmapped when dropped.
///
/// # Safety
///
/// The copies below (and the ring's index accesses) dereference [`as_ptr`]
/// on the strength of this promise, so an implementor must keep it:
/// `as_ptr()` is valid for reads of `len()` bytes — and for writes too if
/// `is_writable()` — for as long as the value lives, the same pointer and
/// length every time; and no Rust reference to that memory exists (another
/// domain may write it at any time, so it is only ever accessed through raw
/// pointers, with volatile accesses).
///
/// [`as_ptr`]: ForeignMapping::as_ptr
pub unsafe trait ForeignMapping: Send {
    /// Start of the mapping.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes (`PAGE_SIZE * number of refs`).
    fn len(&self) -> usize;
    /// Whether the mapping is empty (never, for a successful map).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the pages were mapped writable (`copy_in` refuses otherwise).
    fn is_writable(&self) -> bool {
        false
    }
    /// Copy `buf.len()` bytes at `offset` out of the mapping (e.g. a request
    /// copied out of a shared ring once). The other domain may write these pages
    /// concurrently: the copy reads them with volatile loads ([`volatile_read`])
    /// and the caller validates what it got, never the pages themselves.
    fn copy_out(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        // SAFETY: the trait's contract makes as_ptr() valid for reads of len()
        // bytes while `self` lives; the range was checked; `buf` is our own
        // memory, which the foreign mapping cannot overlap.
        unsafe { volatile_read(self.as_ptr().add(offset), buf) };
        Ok(())
    }
    /// Copy `data` into the mapping at `offset` (needs a writable mapping).
    fn copy_in(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        if !self.is_writable() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "copy into a read-only grant mapping",
            ));
        }
        check_range(offset, data.len(), self.len())?;
        // SAFETY: as in copy_out, and the mapping is writable (checked above;
        // the contract makes as_ptr() valid for writes then).
        unsafe { volatile_write(data, self.as_ptr().add(offset)) };
        Ok(())
    }
}

/// Copy `dst.len()` bytes from `src`, memory another domain may write while we
/// read it: volatile loads, so the compiler never reads a byte twice or
/// assumes it stable, 8 bytes at a time once `src` is aligned.
///
/// # Safety
///
/// `src` must be valid for reads of `dst.len()` bytes and must not overlap
/// `dst`.
pub(crate) unsafe fn volatile_read(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let head = src.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n, inside the range the caller vouched for.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: src + i is 8-aligned (after `head`) and i + 8 <= n.
        let w = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copy `src` to `dst`, memory another domain may read or write meanwhile:
/// volatile stores, 8 bytes at a time once `dst` is aligned.
///
/// # Safety
///
/// `dst` must be valid for writes of `src.len()` bytes and must not overlap
/// `src`.
pub(crate) unsafe fn volatile_write(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let head = dst.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n, inside the range the caller vouched for.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let w = u64::from_ne_bytes(src[i..i + 8].try_into().expect("8 bytes"));
        // SAFETY: dst + i is 8-aligned (after `head`) and i + 8 <= n.
        unsafe { dst.add(i).cast::<u64>().write_volatile(w) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}

/// The argument check every [`Platform::map_grant_refs`] starts with: 1 to
/// [`MAX_MAP_REFS`] refs.
pub fn check_map_refs(domid: DomId, refs: &[GrantRef]) -> io::Result<()> {
    if refs.is_empty() || refs.len() > MAX_MAP_REFS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "map of {} grant refs of domain {domid}: need 1..={MAX_MAP_REFS}",
                refs.len()
            ),
        ));
    }
    Ok(())
}

/// The argument check every [`Platform::grant_copy`] starts with.
pub fn check_copy_args(segs: &[CopySeg<'_>], status: &[GrantStatus]) -> io::Result<()> {
    if segs.len() != status.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "grant copy: {} segments but {} status slots",
                segs.len(),
                status.len()
            ),
        ));
    }
    Ok(())
}

fn check_range(offset: usize, len: usize, size: usize) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} outside a {size}-byte grant mapping"),
        )),
    }
}

/// A bound interdomain event channel. Unbound when dropped.
pub trait EventChannel: Send {
    /// Our local port.
    fn local_port(&self) -> Port;
    /// Kick the remote end.
    fn notify(&self) -> io::Result<()>;
    /// A file descriptor that polls readable while an event is pending.
    fn fd(&self) -> RawFd;
    /// Consume a pending event and unmask the port. Returns whether one was
    /// pending. Never blocks.
    fn ack(&self) -> io::Result<bool>;
    /// Wait until an event is pending or `timeout` passes (None: forever).
    /// Returns whether one is pending; does not consume it (see `ack`).
    fn wait_pending(&self, timeout: Option<std::time::Duration>) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        // SAFETY: fd() is an open descriptor owned by `self`, which outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd()) };
        loop {
            let left = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let ms = d
                        .saturating_duration_since(std::time::Instant::now())
                        .as_millis();
                    PollTimeout::try_from(ms.min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, left) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(fds[0].any().unwrap_or(false)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("poll event channel: {e}"),
                    ))
                }
            }
        }
    }
}

/// What a backend needs from Xen. See the module docs.
pub trait Platform: Send + Sync {
    /// A short name for logs ("xen", "sim").
    fn name(&self) -> &'static str;
    /// Open a new xenstore connection (privileged, as dom0).
    fn xenstore(&self) -> io::Result<XsClient>;
    /// Map `refs` (1, 2, 4, 8 or 16 of them for rings) granted by `domid`,
    /// contiguously and in order.
    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<Box<dyn ForeignMapping>>;
    /// Copy a batch of segments between `domid`'s granted pages and local memory.
    /// `status[i]` receives the result of `segs[i]`. An `Err` means the whole call
    /// failed (e.g. the device is gone); per-segment failures are in `status`.
    fn grant_copy(
        &self,
        domid: DomId,
        segs: &mut [CopySeg<'_>],
        status: &mut [GrantStatus],
    ) -> io::Result<()>;
    /// Bind to `remote_port` of `domid`.
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Box<dyn EventChannel>>;
    /// Whether `domid` still exists (used to notice dead guests).
    fn domain_exists(&self, domid: DomId) -> io::Result<bool>;
}

/// Why mapping a grant failed, carried inside the `io::Error` returned by
/// [`Platform::map_grant_refs`] (`io::Error::get_ref` + `downcast_ref`), so callers
/// and tests can tell a bad ref from a permission problem. The real platform only
/// learns an errno from the kernel and reports [`GrantStatus::GeneralError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantMapError {
    /// The granting domain.
    pub domid: DomId,
    /// The first reference that failed.
    pub gref: GrantRef,
    /// What Xen (or the simulation) said.
    pub status: GrantStatus,
    /// Details for the log.
    pub detail: String,
}

impl GrantMapError {
    /// The status inside `e`, if `e` came from a failed grant map.
    pub fn status_of(e: &io::Error) -> Option<GrantStatus> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<GrantMapError>())
            .map(|g| g.status)
    }

    /// Wrap into an `io::Error` with a matching kind.
    pub fn into_io(self) -> io::Error {
        let kind = match self.status {
            GrantStatus::BadDomain => io::ErrorKind::NotFound,
            GrantStatus::PermissionDenied => io::ErrorKind::PermissionDenied,
            GrantStatus::BadGntref | GrantStatus::BadCopyArg => io::ErrorKind::InvalidInput,
            GrantStatus::Okay | GrantStatus::GeneralError => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

impl std::fmt::Display for GrantMapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mapping grant ref {} of domain {} failed: {:?} ({})",
            self.gref, self.domid, self.status, self.detail
        )
    }
}

impl std::error::Error for GrantMapError {}

#[cfg(test)]
mod tests {
    use super::{volatile_read, volatile_write};

    /// Every start alignment and length around the 8-byte steps copies
    /// exactly the bytes asked for and touches nothing beside them.
    #[test]
    fn volatile_copies_are_exact_at_every_alignment() {
        let src: Vec<u8> = (0..64u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(1))
            .collect();
        for off in 0..9 {
            for len in 0..40 {
                let mut dst = vec![0xeeu8; len];
                // SAFETY: off + len <= 48 < src.len(); dst is separate memory.
                unsafe { volatile_read(src.as_ptr().add(off), &mut dst) };
                assert_eq!(dst, src[off..off + len], "read off {off} len {len}");

                let mut page = vec![0xeeu8; 64];
                // SAFETY: off + len <= 48 < page.len(); src is separate memory.
                unsafe { volatile_write(&src[..len], page.as_mut_ptr().add(off)) };
                assert_eq!(
                    page[off..off + len],
                    src[..len],
                    "write off {off} len {len}"
                );
                assert!(
                    page[..off].iter().all(|&b| b == 0xee),
                    "before: off {off} len {len}"
                );
                assert!(
                    page[off + len..].iter().all(|&b| b == 0xee),
                    "after: off {off} len {len}"
                );
            }
        }
    }
}
