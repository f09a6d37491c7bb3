//! Shared I/O ring (`xen/io/ring.h`).
//!
//! A shared ring is `nr_pages` contiguous granted pages: a 64-byte header
//! ([`sring_header`]) followed by `nr_ents` slots, each a union of one request
//! and one response. `nr_ents` is the number of slots that fit, rounded down to
//! a power of two (ring.h's `__RING_SIZE`), so indices are free-running `u32`s
//! masked with `nr_ents - 1`.
#![allow(non_camel_case_types)]

use core::mem::{offset_of, size_of};

/// `RING_IDX`: free-running, wraps at 2^32.
pub type RING_IDX = u32;

/// Page size rings are made of.
pub const XEN_PAGE_SIZE: usize = 4096;

/// Largest `ring-page-order` a blkif backend may advertise (16 pages; Linux
/// blkback's `XENBUS_MAX_RING_GRANT_ORDER`).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// The header at the start of every shared ring (`struct <name>_sring` up to
/// `ring[]`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sring_header {
    /// Written by the frontend: requests produced.
    pub req_prod: RING_IDX,
    /// Written by the backend: notify me when `req_prod` passes this.
    pub req_event: RING_IDX,
    /// Written by the backend: responses produced.
    pub rsp_prod: RING_IDX,
    /// Written by the frontend: notify me when `rsp_prod` passes this.
    pub rsp_event: RING_IDX,
    /// `pvt` union (netif smartpoll / tapif), unused by blkif.
    pub pvt: [u8; 4],
    /// `__pad[44]`
    pub pad: [u8; 44],
}

/// Offset of the first slot (`offsetof(struct <name>_sring, ring)`).
pub const RING_HEADER_SIZE: usize = size_of::<sring_header>();

const _: () = {
    assert!(RING_HEADER_SIZE == 64);
    assert!(offset_of!(sring_header, req_prod) == 0);
    assert!(offset_of!(sring_header, req_event) == 4);
    assert!(offset_of!(sring_header, rsp_prod) == 8);
    assert!(offset_of!(sring_header, rsp_event) == 12);
    assert!(offset_of!(sring_header, pvt) == 16);
    assert!(offset_of!(sring_header, pad) == 20);
};

/// Round a 32-bit value down to a power of two (`__RD32`); 0 stays 0.
pub const fn round_down_pow2(x: u32) -> u32 {
    if x == 0 {
        0
    } else {
        1 << (31 - x.leading_zeros())
    }
}

/// `__RING_SIZE`: number of slots of `slot_size` bytes in a ring of
/// `ring_bytes` bytes (header included).
pub const fn ring_size(ring_bytes: usize, slot_size: usize) -> u32 {
    if ring_bytes <= RING_HEADER_SIZE || slot_size == 0 {
        return 0;
    }
    let n = (ring_bytes - RING_HEADER_SIZE) / slot_size;
    let n = if n > u32::MAX as usize {
        u32::MAX
    } else {
        n as u32
    };
    round_down_pow2(n)
}

/// Slots of a blkif ring of `1 << order` pages in the native x86_64 ABI.
pub const fn blkif_ring_size_x86_64(order: u32) -> u32 {
    ring_size(
        XEN_PAGE_SIZE << order,
        size_of::<crate::blkif::x86_64::blkif_sring_entry>(),
    )
}

/// Slots of a blkif ring of `1 << order` pages in the x86_32 ABI.
pub const fn blkif_ring_size_x86_32(order: u32) -> u32 {
    ring_size(
        XEN_PAGE_SIZE << order,
        size_of::<crate::blkif::x86_32::blkif_sring_entry>(),
    )
}

// 32 << order slots for every order a blkif ring may have, in both ABIs.
const _: () = {
    let mut order = 0;
    while order <= MAX_RING_PAGE_ORDER {
        assert!(blkif_ring_size_x86_64(order) == 32 << order);
        assert!(blkif_ring_size_x86_32(order) == 32 << order);
        order += 1;
    }
};
