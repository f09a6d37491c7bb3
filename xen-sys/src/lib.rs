//! Raw Xen ABI used by refblk. `#[repr(C)]` types and constants only, no logic.
//!
//! Everything here mirrors a public Xen header (`xen/io/blkif.h`, `xen/io/ring.h`,
//! `xen/io/xs_wire.h`, `xen/io/xenbus.h`, Linux `include/uapi/xen/gntdev.h` and
//! `include/uapi/xen/evtchn.h`); layouts are checked by compile-time asserts and by
//! a test against Debian's `libxen-dev` headers.

pub mod blkif;
pub mod evtchn;
pub mod gntdev;
pub mod ring;
pub mod xenbus;
pub mod xs_wire;
