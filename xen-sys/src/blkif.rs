//! Block interface (`xen/io/blkif.h`): request/response slots of the blkif ring.
//!
//! Two ABIs exist on x86 and a backend must speak the one the frontend names in
//! its `protocol` xenstore key:
//!
//! - [`x86_64`] (`"x86_64-abi"`): natural C alignment, `u64` fields 8-aligned.
//! - [`x86_32`] (`"x86_32-abi"`): the i386 layout, where `u64` fields are only
//!   4-aligned. Linux `xen-blkback` (`drivers/block/xen-blkback/common.h`) and
//!   QEMU (`hw/block/xen_blkif.h`) declare these as packed / `pack(4)` variants;
//!   here they are `#[repr(C, packed(4))]`.
//!
//! The segment descriptor is the same in both ABIs. Layouts are pinned by the
//! compile-time asserts at the end of this file and compared against the C
//! headers (native, and i386 with `-m32` when possible) by `tests/c_layout.rs`.
#![allow(non_camel_case_types)]

/// `blkif_vdev_t`
pub type blkif_vdev_t = u16;
/// `blkif_sector_t`: always in 512-byte units on the wire.
pub type blkif_sector_t = u64;
/// `grant_ref_t`
pub type grant_ref_t = u32;

/// Read from the device into the granted pages.
pub const BLKIF_OP_READ: u8 = 0;
/// Write the granted pages to the device.
pub const BLKIF_OP_WRITE: u8 = 1;
/// Write with barrier semantics (all earlier requests complete and reach stable
/// storage before it; it is stable before later ones start).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// Flush the device's volatile write cache.
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// Reserved (was `BLKIF_OP_RESERVED_1`, used by old Citrix frontends).
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// Discard a sector range (see [`x86_64::blkif_request_discard`]).
pub const BLKIF_OP_DISCARD: u8 = 5;
/// Read/write whose segment list lives in granted indirect pages.
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// Segments in a direct read/write request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages (grant refs) in one indirect request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors per indirect page (`4096 / size_of::<blkif_request_segment>()`).
pub const BLKIF_SEGMENTS_PER_INDIRECT_PAGE: usize =
    4096 / core::mem::size_of::<blkif_request_segment>();
/// Sectors (512 bytes) per 4 KiB page: `first_sect`/`last_sect` range over `0..=7`.
pub const BLKIF_SECTORS_PER_PAGE: u8 = 8;

/// Flag in [`x86_64::blkif_request_discard::flag`]: secure discard (ignored
/// unless the backend advertised `discard-secure`).
pub const BLKIF_DISCARD_SECURE: u8 = 1 << 0;

/// Operation not supported.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
/// Operation failed (-EIO).
pub const BLKIF_RSP_ERROR: i16 = -1;
/// Operation completed successfully.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// `info` bit: the device is a CD-ROM.
pub const VDISK_CDROM: u32 = 0x1;
/// `info` bit: removable media.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `info` bit: read-only device.
pub const VDISK_READONLY: u32 = 0x4;

/// `struct blkif_request_segment` (both ABIs, and the entries of indirect pages).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct blkif_request_segment {
    /// Grant reference of the data page.
    pub gref: grant_ref_t,
    /// First 512-byte sector in the page to transfer (inclusive).
    pub first_sect: u8,
    /// Last 512-byte sector in the page to transfer (inclusive).
    pub last_sect: u8,
}

/// The native 64-bit ABI (`"x86_64-abi"`), identical to the public header
/// compiled for x86_64.
pub mod x86_64 {
    pub use super::blkif_request_segment;
    use super::*;

    /// `struct blkif_request` (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request {
        pub operation: u8,
        pub nr_segments: u8,
        pub handle: blkif_vdev_t,
        /// Echoed in the response. (4 bytes of implicit padding before it.)
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub seg: [blkif_request_segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
    }

    /// `struct blkif_request_discard`
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request_discard {
        pub operation: u8,
        /// `BLKIF_DISCARD_SECURE` or 0.
        pub flag: u8,
        pub handle: blkif_vdev_t,
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub nr_sectors: u64,
    }

    /// `struct blkif_request_indirect`
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request_indirect {
        pub operation: u8,
        /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
        pub indirect_op: u8,
        pub nr_segments: u16,
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub handle: blkif_vdev_t,
        pub indirect_grefs: [grant_ref_t; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
        // 4 bytes of implicit tail padding (size 64).
    }

    /// `struct blkif_response`
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_response {
        pub id: u64,
        pub operation: u8,
        // 1 byte of implicit padding.
        pub status: i16,
        // 4 bytes of implicit tail padding (size 16).
    }

    /// `union blkif_sring_entry`: one ring slot.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub union blkif_sring_entry {
        pub req: blkif_request,
        pub rsp: blkif_response,
    }
}

/// The i386 ABI (`"x86_32-abi"`): `u64` fields 4-aligned.
pub mod x86_32 {
    pub use super::blkif_request_segment;
    use super::*;

    /// `struct blkif_x86_32_request`
    #[repr(C, packed(4))]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request {
        pub operation: u8,
        pub nr_segments: u8,
        pub handle: blkif_vdev_t,
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub seg: [blkif_request_segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
    }

    /// `struct blkif_x86_32_request_discard`
    #[repr(C, packed(4))]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request_discard {
        pub operation: u8,
        pub flag: u8,
        pub handle: blkif_vdev_t,
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub nr_sectors: u64,
    }

    /// `struct blkif_x86_32_request_indirect`
    #[repr(C, packed(4))]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_request_indirect {
        pub operation: u8,
        pub indirect_op: u8,
        pub nr_segments: u16,
        pub id: u64,
        pub sector_number: blkif_sector_t,
        pub handle: blkif_vdev_t,
        pub indirect_grefs: [grant_ref_t; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
        /// "Make it 64 byte aligned on i386" (public header).
        pub pad: u64,
    }

    /// `struct blkif_x86_32_response`
    #[repr(C, packed(4))]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct blkif_response {
        pub id: u64,
        pub operation: u8,
        // 1 byte of implicit padding.
        pub status: i16,
    }

    /// One ring slot of an x86_32 ring.
    #[repr(C, packed(4))]
    #[derive(Clone, Copy)]
    pub union blkif_sring_entry {
        pub req: blkif_request,
        pub rsp: blkif_response,
    }
}

// ---- Compile-time layout checks (the facts in docs/protocol.md) ----
use core::mem::{offset_of, size_of};

const _: () = {
    assert!(size_of::<blkif_request_segment>() == 8);
    assert!(offset_of!(blkif_request_segment, gref) == 0);
    assert!(offset_of!(blkif_request_segment, first_sect) == 4);
    assert!(offset_of!(blkif_request_segment, last_sect) == 5);
    assert!(BLKIF_SEGMENTS_PER_INDIRECT_PAGE == 512);
};

const _: () = {
    use x86_64::*;
    assert!(size_of::<blkif_request>() == 112);
    assert!(offset_of!(blkif_request, operation) == 0);
    assert!(offset_of!(blkif_request, nr_segments) == 1);
    assert!(offset_of!(blkif_request, handle) == 2);
    assert!(offset_of!(blkif_request, id) == 8);
    assert!(offset_of!(blkif_request, sector_number) == 16);
    assert!(offset_of!(blkif_request, seg) == 24);

    assert!(size_of::<blkif_request_discard>() == 32);
    assert!(offset_of!(blkif_request_discard, flag) == 1);
    assert!(offset_of!(blkif_request_discard, handle) == 2);
    assert!(offset_of!(blkif_request_discard, id) == 8);
    assert!(offset_of!(blkif_request_discard, sector_number) == 16);
    assert!(offset_of!(blkif_request_discard, nr_sectors) == 24);

    assert!(size_of::<blkif_request_indirect>() == 64);
    assert!(offset_of!(blkif_request_indirect, indirect_op) == 1);
    assert!(offset_of!(blkif_request_indirect, nr_segments) == 2);
    assert!(offset_of!(blkif_request_indirect, id) == 8);
    assert!(offset_of!(blkif_request_indirect, sector_number) == 16);
    assert!(offset_of!(blkif_request_indirect, handle) == 24);
    assert!(offset_of!(blkif_request_indirect, indirect_grefs) == 28);

    assert!(size_of::<blkif_response>() == 16);
    assert!(offset_of!(blkif_response, id) == 0);
    assert!(offset_of!(blkif_response, operation) == 8);
    assert!(offset_of!(blkif_response, status) == 10);

    assert!(size_of::<blkif_sring_entry>() == 112);
};

const _: () = {
    use x86_32::*;
    assert!(size_of::<blkif_request>() == 108);
    assert!(offset_of!(blkif_request, operation) == 0);
    assert!(offset_of!(blkif_request, nr_segments) == 1);
    assert!(offset_of!(blkif_request, handle) == 2);
    assert!(offset_of!(blkif_request, id) == 4);
    assert!(offset_of!(blkif_request, sector_number) == 12);
    assert!(offset_of!(blkif_request, seg) == 20);

    assert!(size_of::<blkif_request_discard>() == 28);
    assert!(offset_of!(blkif_request_discard, flag) == 1);
    assert!(offset_of!(blkif_request_discard, handle) == 2);
    assert!(offset_of!(blkif_request_discard, id) == 4);
    assert!(offset_of!(blkif_request_discard, sector_number) == 12);
    assert!(offset_of!(blkif_request_discard, nr_sectors) == 20);

    assert!(size_of::<blkif_request_indirect>() == 64);
    assert!(offset_of!(blkif_request_indirect, indirect_op) == 1);
    assert!(offset_of!(blkif_request_indirect, nr_segments) == 2);
    assert!(offset_of!(blkif_request_indirect, id) == 4);
    assert!(offset_of!(blkif_request_indirect, sector_number) == 12);
    assert!(offset_of!(blkif_request_indirect, handle) == 20);
    assert!(offset_of!(blkif_request_indirect, indirect_grefs) == 24);
    assert!(offset_of!(blkif_request_indirect, pad) == 56);

    assert!(size_of::<blkif_response>() == 12);
    assert!(offset_of!(blkif_response, id) == 0);
    assert!(offset_of!(blkif_response, operation) == 8);
    assert!(offset_of!(blkif_response, status) == 10);

    assert!(size_of::<blkif_sring_entry>() == 108);
};
