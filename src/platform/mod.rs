//! The Xen platform a backend runs on.
//!
//! A dom0 block backend needs exactly four things from Xen, and this trait is that
//! list: a xenstore connection, mapping a foreign domain's granted pages (the shared
//! ring), copying between granted guest pages and local buffers (grant copy), and
//! interdomain event channels. Two implementations exist:
//!
//! - [`real::RealXen`]: `/dev/xen/gntdev`, `/dev/xen/evtchn`, xenstore over the
//!   xenstored socket or `/dev/xen/xenbus`.
//! - [`sim::SimPlatform`]: the simulated Xen used by tests and benchmarks (guest
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
pub mod sim;

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
pub trait ForeignMapping: Send {
    /// Start of the mapping.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes (`PAGE_SIZE * number of refs`).
    fn len(&self) -> usize;
    /// Whether the mapping is empty (never, for a successful map).
    fn is_empty(&self) -> bool {
        self.len() == 0
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
