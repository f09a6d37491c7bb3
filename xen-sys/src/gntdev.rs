//! Linux `/dev/xen/gntdev` ABI (`include/uapi/xen/gntdev.h`) and the grant-table
//! flags it relies on (`xen/include/public/grant_table.h`).
//!
//! All ioctls are `_IOC(_IOC_NONE, 'G', nr, sizeof(struct ...))`; the numbers are
//! computed with [`ioc_none`] from the struct sizes asserted below.

#![allow(non_camel_case_types, non_upper_case_globals)]

use core::mem::{offset_of, size_of};

/// `_IOC(_IOC_NONE, ty, nr, size)` on Linux (x86, arm, riscv: dir bits 30..31 = 0,
/// size bits 16..29, type bits 8..15, nr bits 0..7).
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `struct ioctl_gntdev_grant_ref`: one grant to map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ioctl_gntdev_grant_ref {
    /// The granting domain.
    pub domid: u32,
    /// The grant reference.
    pub ref_: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with its one-element trailing array. The
/// real call passes `count` refs: callers allocate `size_of::<Self>() + (count - 1)
/// * size_of::<ioctl_gntdev_grant_ref>()` bytes, 8-byte aligned.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_map_grant_ref {
    /// IN: number of refs.
    pub count: u32,
    pub pad: u32,
    /// OUT: the offset to pass to `mmap()`.
    pub index: u64,
    /// IN: `count` refs (variable length).
    pub refs: [ioctl_gntdev_grant_ref; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_grant_ref {
    /// The index returned by MAP_GRANT_REF.
    pub index: u64,
    /// Number of pages.
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_notify {
    /// Offset (as used with `mmap()`) of a byte within the mapped page.
    pub index: u64,
    /// `UNMAP_NOTIFY_*` bits.
    pub action: u32,
    /// Event channel port to notify (with `UNMAP_NOTIFY_SEND_EVENT`).
    pub event_channel_port: u32,
}

/// The `foreign` member of the grant copy source/dest union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gntdev_grant_copy_foreign {
    pub ref_: u32,
    pub offset: u16,
    pub domid: u16,
}

/// The source/dest union of `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union gntdev_grant_copy_ptr {
    /// Local virtual address (when the matching `GNTCOPY_*_gref` flag is clear).
    pub virt: *mut core::ffi::c_void,
    /// A foreign grant (when the flag is set).
    pub foreign: gntdev_grant_copy_foreign,
}

/// `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ioctl_gntdev_grant_copy_segment {
    pub source: gntdev_grant_copy_ptr,
    pub dest: gntdev_grant_copy_ptr,
    pub len: u16,
    /// `GNTCOPY_source_gref` / `GNTCOPY_dest_gref`.
    pub flags: u16,
    /// OUT: `GNTST_*`.
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ioctl_gntdev_grant_copy {
    pub count: u32,
    pub segments: *mut ioctl_gntdev_grant_copy_segment,
}

pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 =
    ioc_none(b'G', 0, size_of::<ioctl_gntdev_map_grant_ref>());
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 =
    ioc_none(b'G', 1, size_of::<ioctl_gntdev_unmap_grant_ref>());
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 =
    ioc_none(b'G', 7, size_of::<ioctl_gntdev_unmap_notify>());
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(b'G', 8, size_of::<ioctl_gntdev_grant_copy>());

/// Clear the byte at `index` when the mapping goes away.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// Send an event on `event_channel_port` when the mapping goes away.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// Grant copy segment flags (`grant_table.h`).
pub const GNTCOPY_source_gref: u16 = 1 << 0;
pub const GNTCOPY_dest_gref: u16 = 1 << 1;

/// Grant entry v1 flags (`grant_table.h`, `grant_entry_v1.flags`).
pub const GTF_invalid: u16 = 0;
pub const GTF_permit_access: u16 = 1;
pub const GTF_accept_transfer: u16 = 2;
pub const GTF_transitive: u16 = 3;
pub const GTF_type_mask: u16 = 3;
pub const GTF_readonly: u16 = 1 << 2;
pub const GTF_reading: u16 = 1 << 3;
pub const GTF_writing: u16 = 1 << 4;

/// `grant_entry_v1_t`: the guest-written grant table entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct grant_entry_v1 {
    pub flags: u16,
    pub domid: u16,
    pub frame: u32,
}

/// Refs 0..8 are reserved for the toolstack (`GNTTAB_NR_RESERVED_ENTRIES`).
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;

const _: () = {
    assert!(size_of::<ioctl_gntdev_grant_ref>() == 8);
    assert!(size_of::<ioctl_gntdev_map_grant_ref>() == 24);
    assert!(offset_of!(ioctl_gntdev_map_grant_ref, index) == 8);
    assert!(offset_of!(ioctl_gntdev_map_grant_ref, refs) == 16);
    assert!(size_of::<ioctl_gntdev_unmap_grant_ref>() == 16);
    assert!(size_of::<ioctl_gntdev_unmap_notify>() == 16);
    assert!(size_of::<gntdev_grant_copy_foreign>() == 8);
    assert!(size_of::<gntdev_grant_copy_ptr>() == 8);
    assert!(size_of::<ioctl_gntdev_grant_copy_segment>() == 24);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, dest) == 8);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, len) == 16);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, flags) == 18);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, status) == 20);
    assert!(size_of::<ioctl_gntdev_grant_copy>() == 16);
    assert!(offset_of!(ioctl_gntdev_grant_copy, segments) == 8);
    assert!(size_of::<grant_entry_v1>() == 8);
    // The numbers as Linux computes them (checked by hand against _IOC).
    assert!(IOCTL_GNTDEV_MAP_GRANT_REF == 0x0018_4700);
    assert!(IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x0010_4701);
    assert!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x0010_4707);
    assert!(IOCTL_GNTDEV_GRANT_COPY == 0x0010_4708);
};
