//! Linux `/dev/xen/evtchn` ABI (`include/uapi/xen/evtchn.h`).
//!
//! Protocol of the device: each open file holds a set of bound ports. `read()`
//! returns pending ports as native `u32`s (a pending port is masked until
//! unmasked); `write()` of `u32` ports unmasks them. The fd polls readable while a
//! port is pending. `BIND_*` ioctls return the new local port as the ioctl's
//! return value.

#![allow(non_camel_case_types, non_upper_case_globals)]

use core::mem::size_of;

use crate::gntdev::ioc_none;

/// `struct ioctl_evtchn_bind_virq`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_bind_virq {
    pub virq: u32,
}

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_bind_interdomain {
    pub remote_domain: u32,
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_bind_unbound_port {
    pub remote_domain: u32,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_unbind {
    pub port: u32,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_notify {
    pub port: u32,
}

pub const IOCTL_EVTCHN_BIND_VIRQ: u32 = ioc_none(b'E', 0, size_of::<ioctl_evtchn_bind_virq>());
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 =
    ioc_none(b'E', 1, size_of::<ioctl_evtchn_bind_interdomain>());
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 =
    ioc_none(b'E', 2, size_of::<ioctl_evtchn_bind_unbound_port>());
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(b'E', 3, size_of::<ioctl_evtchn_unbind>());
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(b'E', 4, size_of::<ioctl_evtchn_notify>());
/// Clear and reinitialise the event buffer (no argument).
pub const IOCTL_EVTCHN_RESET: u32 = ioc_none(b'E', 5, 0);

/// The unit of `read()`/`write()` on `/dev/xen/evtchn`: one port.
pub type evtchn_port_t = u32;

const _: () = {
    assert!(size_of::<ioctl_evtchn_bind_virq>() == 4);
    assert!(size_of::<ioctl_evtchn_bind_interdomain>() == 8);
    assert!(size_of::<ioctl_evtchn_bind_unbound_port>() == 4);
    assert!(size_of::<ioctl_evtchn_unbind>() == 4);
    assert!(size_of::<ioctl_evtchn_notify>() == 4);
    assert!(IOCTL_EVTCHN_BIND_VIRQ == 0x0004_4500);
    assert!(IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x0008_4501);
    assert!(IOCTL_EVTCHN_BIND_UNBOUND_PORT == 0x0004_4502);
    assert!(IOCTL_EVTCHN_UNBIND == 0x0004_4503);
    assert!(IOCTL_EVTCHN_NOTIFY == 0x0004_4504);
    assert!(IOCTL_EVTCHN_RESET == 0x0000_4505);
};
