//! xenstore wire protocol, as in Xen's `xen/io/xs_wire.h`.
//!
//! Every message in either direction is a 16-byte [`xsd_sockmsg`] header (native
//! endian) followed by `len` bytes of payload, `len <= XENSTORE_PAYLOAD_MAX`.
//! Errors travel as the *name* of an errno (`"ENOENT"`), listed in [`XSD_ERRORS`].

#![allow(non_camel_case_types)]

/// `enum xsd_sockmsg_type` values (the `type` field of the header).
pub type xsd_sockmsg_type = u32;

pub const XS_CONTROL: xsd_sockmsg_type = 0;
/// Deprecated name of [`XS_CONTROL`].
pub const XS_DEBUG: xsd_sockmsg_type = XS_CONTROL;
pub const XS_DIRECTORY: xsd_sockmsg_type = 1;
pub const XS_READ: xsd_sockmsg_type = 2;
pub const XS_GET_PERMS: xsd_sockmsg_type = 3;
pub const XS_WATCH: xsd_sockmsg_type = 4;
pub const XS_UNWATCH: xsd_sockmsg_type = 5;
pub const XS_TRANSACTION_START: xsd_sockmsg_type = 6;
pub const XS_TRANSACTION_END: xsd_sockmsg_type = 7;
pub const XS_INTRODUCE: xsd_sockmsg_type = 8;
pub const XS_RELEASE: xsd_sockmsg_type = 9;
pub const XS_GET_DOMAIN_PATH: xsd_sockmsg_type = 10;
pub const XS_WRITE: xsd_sockmsg_type = 11;
pub const XS_MKDIR: xsd_sockmsg_type = 12;
pub const XS_RM: xsd_sockmsg_type = 13;
pub const XS_SET_PERMS: xsd_sockmsg_type = 14;
pub const XS_WATCH_EVENT: xsd_sockmsg_type = 15;
pub const XS_ERROR: xsd_sockmsg_type = 16;
pub const XS_IS_DOMAIN_INTRODUCED: xsd_sockmsg_type = 17;
pub const XS_RESUME: xsd_sockmsg_type = 18;
pub const XS_SET_TARGET: xsd_sockmsg_type = 19;
// 20 was XS_RESTRICT, removed from Xen.
pub const XS_RESET_WATCHES: xsd_sockmsg_type = XS_SET_TARGET + 2;
pub const XS_DIRECTORY_PART: xsd_sockmsg_type = 22;
/// Number of valid types.
pub const XS_TYPE_COUNT: xsd_sockmsg_type = 23;
/// Guaranteed to remain an invalid type.
pub const XS_INVALID: xsd_sockmsg_type = 0xffff;

/// `XS_WRITE_*` flags strings (historic; not used by current daemons).
pub const XS_WRITE_NONE: &str = "NONE";
pub const XS_WRITE_CREATE: &str = "CREATE";
pub const XS_WRITE_CREATE_EXCL: &str = "CREATE|EXCL";

/// `struct xsd_errors`: an errno and its name as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct xsd_errors {
    pub errnum: i32,
    pub errstring: &'static str,
}

/// The `xsd_errors[]` table, in the header's order (new errors are appended in
/// Xen, so the order is part of the ABI for anyone indexing it).
pub const XSD_ERRORS: [xsd_errors; 16] = [
    xsd_errors {
        errnum: libc::EINVAL,
        errstring: "EINVAL",
    },
    xsd_errors {
        errnum: libc::EACCES,
        errstring: "EACCES",
    },
    xsd_errors {
        errnum: libc::EEXIST,
        errstring: "EEXIST",
    },
    xsd_errors {
        errnum: libc::EISDIR,
        errstring: "EISDIR",
    },
    xsd_errors {
        errnum: libc::ENOENT,
        errstring: "ENOENT",
    },
    xsd_errors {
        errnum: libc::ENOMEM,
        errstring: "ENOMEM",
    },
    xsd_errors {
        errnum: libc::ENOSPC,
        errstring: "ENOSPC",
    },
    xsd_errors {
        errnum: libc::EIO,
        errstring: "EIO",
    },
    xsd_errors {
        errnum: libc::ENOTEMPTY,
        errstring: "ENOTEMPTY",
    },
    xsd_errors {
        errnum: libc::ENOSYS,
        errstring: "ENOSYS",
    },
    xsd_errors {
        errnum: libc::EROFS,
        errstring: "EROFS",
    },
    xsd_errors {
        errnum: libc::EBUSY,
        errstring: "EBUSY",
    },
    xsd_errors {
        errnum: libc::EAGAIN,
        errstring: "EAGAIN",
    },
    xsd_errors {
        errnum: libc::EISCONN,
        errstring: "EISCONN",
    },
    xsd_errors {
        errnum: libc::E2BIG,
        errstring: "E2BIG",
    },
    xsd_errors {
        errnum: libc::EPERM,
        errstring: "EPERM",
    },
];

/// `struct xsd_sockmsg`: the header of every xenstore message.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct xsd_sockmsg {
    /// `XS_*` message type.
    pub type_: u32,
    /// Request identifier, echoed in the daemon's response.
    pub req_id: u32,
    /// Transaction id (0 if not related to a transaction).
    pub tx_id: u32,
    /// Length of the payload following this header.
    pub len: u32,
}

/// `enum xs_watch_type`: index of the path and token strings in a watch event.
pub const XS_WATCH_PATH: u32 = 0;
pub const XS_WATCH_TOKEN: u32 = 1;

/// Size of each of the two rings in the shared `xenstore_domain_interface` page.
pub const XENSTORE_RING_SIZE: usize = 1024;
pub type XENSTORE_RING_IDX = u32;

/// `struct xenstore_domain_interface`: the shared page a guest talks through.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct xenstore_domain_interface {
    /// Requests to the xenstore daemon.
    pub req: [u8; XENSTORE_RING_SIZE],
    /// Replies and async watch events.
    pub rsp: [u8; XENSTORE_RING_SIZE],
    pub req_cons: XENSTORE_RING_IDX,
    pub req_prod: XENSTORE_RING_IDX,
    pub rsp_cons: XENSTORE_RING_IDX,
    pub rsp_prod: XENSTORE_RING_IDX,
    /// Bitmap of features supported by the server.
    pub server_features: u32,
    pub connection: u32,
    pub error: u32,
}

/// Maximum payload length in either direction ("violating this is very bad").
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Maximum length of an absolute path.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// Maximum length of a path relative to the domain's home.
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

pub const XENSTORE_SERVER_FEATURE_RECONNECTION: u32 = 1;
pub const XENSTORE_SERVER_FEATURE_ERROR: u32 = 2;
pub const XENSTORE_CONNECTED: u32 = 0;
pub const XENSTORE_RECONNECT: u32 = 1;
pub const XENSTORE_ERROR_NONE: u32 = 0;
pub const XENSTORE_ERROR_COMM: u32 = 1;
pub const XENSTORE_ERROR_RINGIDX: u32 = 2;
pub const XENSTORE_ERROR_PROTO: u32 = 3;

// Layout checks (the C comparison lives in the refblk test `xenstore_abi`).
const _: () = {
    assert!(core::mem::size_of::<xsd_sockmsg>() == 16);
    assert!(core::mem::align_of::<xsd_sockmsg>() == 4);
    assert!(core::mem::offset_of!(xsd_sockmsg, type_) == 0);
    assert!(core::mem::offset_of!(xsd_sockmsg, req_id) == 4);
    assert!(core::mem::offset_of!(xsd_sockmsg, tx_id) == 8);
    assert!(core::mem::offset_of!(xsd_sockmsg, len) == 12);
    assert!(core::mem::size_of::<xenstore_domain_interface>() == 2076);
    assert!(core::mem::offset_of!(xenstore_domain_interface, rsp) == 1024);
    assert!(core::mem::offset_of!(xenstore_domain_interface, req_cons) == 2048);
    assert!(core::mem::offset_of!(xenstore_domain_interface, rsp_prod) == 2060);
    assert!(core::mem::offset_of!(xenstore_domain_interface, error) == 2072);
    assert!(XS_RESET_WATCHES == 21);
    assert!(XS_TYPE_COUNT == XS_DIRECTORY_PART + 1);
};
