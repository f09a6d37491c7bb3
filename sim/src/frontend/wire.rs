//! The blkif wire format as the frontend writes it, from `xen/io/blkif.h` and
//! `xen/io/ring.h` (see `/usr/include/xen/io/` on a Xen build machine).
//!
//! Deliberately written from the header text with its own byte offsets, and
//! not from `refblk_core::blkif` or `xen_sys::blkif`: the backend parses with those,
//! so a layout mistake cannot hide in both sides at once. Everything is
//! little-endian (x86).
//!
//! Layouts (byte offsets):
//!
//! | field                     | x86_64 | x86_32 |
//! |---------------------------|--------|--------|
//! | `operation`               | 0      | 0      |
//! | `nr_segments` / `flag` / `indirect_op` | 1 | 1 |
//! | `handle` (rw, discard)    | 2      | 2      |
//! | `nr_segments` (indirect, u16) | 2  | 2      |
//! | `id` (u64)                | 8      | 4      |
//! | `sector_number` (u64)     | 16     | 12     |
//! | `seg[11]` (8 bytes each)  | 24     | 20     |
//! | discard `nr_sectors`      | 24     | 20     |
//! | indirect `handle`         | 24     | 20     |
//! | indirect `indirect_grefs[8]` | 28  | 24     |
//! | slot size                 | 112    | 108    |
//! | response: `id`, `operation`, `status` | 0, 8, 10 | 0, 8, 10 |
//! | response size             | 16     | 12     |
//!
//! In x86_64 the u64 fields are 8-aligned, so 4 bytes of padding follow the
//! `handle` (or indirect `nr_segments`); in the i386 ABI u64s are 4-aligned.

/// `BLKIF_OP_READ`
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1` (never valid from a frontend)
pub const OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_DISCARD_SECURE` in the discard request's `flag`.
pub const DISCARD_SECURE: u8 = 1;
/// `VDISK_READONLY` in the backend's `info` key.
pub const VDISK_READONLY: u32 = 0x4;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Bytes of one `struct blkif_request_segment` (gref u32, first u8, last u8, 2 pad).
pub const SEGMENT_BYTES: usize = 8;
/// Segment descriptors in one indirect page (4096 / 8).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = 4096 / SEGMENT_BYTES;
/// Wire sector: `first_sect`, `last_sect`, `sector_number`, `nr_sectors` unit.
pub const SECTOR: usize = 512;
/// Sectors in one page.
pub const SECTORS_PER_PAGE: u8 = 8;

/// Bytes of the shared ring header: req_prod, req_event, rsp_prod, rsp_event
/// (u32 each), then 48 bytes of private/padding space.
pub const RING_HEADER: usize = 64;
/// Offset of `req_prod` in the ring header.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = 12;

/// The ring ABI (the `protocol` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// `x86_64-abi`
    X86_64,
    /// `x86_32-abi` (also what a backend assumes without a `protocol` key)
    X86_32,
}

impl Abi {
    /// The `protocol` string.
    pub fn protocol(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64-abi",
            Abi::X86_32 => "x86_32-abi",
        }
    }

    /// Bytes of one ring slot (the union of request and response).
    pub fn slot_size(self) -> usize {
        match self {
            Abi::X86_64 => 112,
            Abi::X86_32 => 108,
        }
    }

    /// Bytes of a response.
    pub fn response_size(self) -> usize {
        match self {
            Abi::X86_64 => 16,
            Abi::X86_32 => 12,
        }
    }

    /// Offset of `id` in every request kind.
    pub fn id_offset(self) -> usize {
        match self {
            Abi::X86_64 => 8,
            Abi::X86_32 => 4,
        }
    }

    /// Offset of `sector_number` in every request kind.
    pub fn sector_offset(self) -> usize {
        self.id_offset() + 8
    }

    /// Offset of `seg[0]` in a read/write request.
    pub fn seg_offset(self) -> usize {
        self.sector_offset() + 8
    }

    /// Offset of `nr_sectors` in a discard request.
    pub fn discard_nr_sectors_offset(self) -> usize {
        self.sector_offset() + 8
    }

    /// Offset of `handle` in an indirect request.
    pub fn indirect_handle_offset(self) -> usize {
        self.sector_offset() + 8
    }

    /// Offset of `indirect_grefs[0]` (handle u16 then 2 bytes to align the u32s).
    pub fn indirect_grefs_offset(self) -> usize {
        self.indirect_handle_offset() + 4
    }

    /// Slots in a ring of `nr_pages` pages: `(bytes - header) / slot`, rounded
    /// down to a power of two (ring.h `__RD32`).
    pub fn ring_size(self, nr_pages: usize) -> u32 {
        let n = (nr_pages * 4096 - RING_HEADER) / self.slot_size();
        let n = n as u32;
        if n == 0 {
            0
        } else {
            1 << (31 - n.leading_zeros())
        }
    }
}

/// One segment descriptor: sectors `first_sect..=last_sect` of granted page `gref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Encode a segment descriptor into 8 bytes (padding left as it is in `out`).
pub fn encode_segment(out: &mut [u8], s: Seg) {
    put(out, 0, &s.gref.to_le_bytes());
    out[4] = s.first_sect;
    out[5] = s.last_sect;
}

/// Encode a READ / WRITE / WRITE_BARRIER / FLUSH_DISKCACHE request into `slot`
/// (at least `abi.slot_size()` bytes). `nr_segments` is written as given (a
/// hostile frontend may lie); `segs` are written from `seg[0]` on (at most 11).
/// Bytes not covered by a field are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn encode_rw(
    abi: Abi,
    slot: &mut [u8],
    op: u8,
    nr_segments: u8,
    handle: u16,
    id: u64,
    sector: u64,
    segs: &[Seg],
) {
    slot[0] = op;
    slot[1] = nr_segments;
    put(slot, 2, &handle.to_le_bytes());
    put(slot, abi.id_offset(), &id.to_le_bytes());
    put(slot, abi.sector_offset(), &sector.to_le_bytes());
    for (i, s) in segs.iter().take(MAX_SEGMENTS_PER_REQUEST).enumerate() {
        let off = abi.seg_offset() + i * SEGMENT_BYTES;
        encode_segment(&mut slot[off..off + SEGMENT_BYTES], *s);
    }
}

/// Encode a DISCARD request.
pub fn encode_discard(
    abi: Abi,
    slot: &mut [u8],
    flag: u8,
    handle: u16,
    id: u64,
    sector: u64,
    nr_sectors: u64,
) {
    slot[0] = OP_DISCARD;
    slot[1] = flag;
    put(slot, 2, &handle.to_le_bytes());
    put(slot, abi.id_offset(), &id.to_le_bytes());
    put(slot, abi.sector_offset(), &sector.to_le_bytes());
    put(
        slot,
        abi.discard_nr_sectors_offset(),
        &nr_sectors.to_le_bytes(),
    );
}

/// Encode an INDIRECT request; `grefs` (at most 8) are the indirect pages.
#[allow(clippy::too_many_arguments)]
pub fn encode_indirect(
    abi: Abi,
    slot: &mut [u8],
    indirect_op: u8,
    nr_segments: u16,
    handle: u16,
    id: u64,
    sector: u64,
    grefs: &[u32],
) {
    slot[0] = OP_INDIRECT;
    slot[1] = indirect_op;
    put(slot, 2, &nr_segments.to_le_bytes());
    put(slot, abi.id_offset(), &id.to_le_bytes());
    put(slot, abi.sector_offset(), &sector.to_le_bytes());
    put(slot, abi.indirect_handle_offset(), &handle.to_le_bytes());
    for (i, g) in grefs.iter().take(MAX_INDIRECT_PAGES).enumerate() {
        put(slot, abi.indirect_grefs_offset() + 4 * i, &g.to_le_bytes());
    }
}

/// A response as read from a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// Decode the response at the start of `slot`.
pub fn decode_response(slot: &[u8]) -> Response {
    let mut id = [0u8; 8];
    id.copy_from_slice(&slot[0..8]);
    Response {
        id: u64::from_le_bytes(id),
        operation: slot[8],
        status: i16::from_le_bytes([slot[10], slot[11]]),
    }
}

/// Offsets inside a response slot that are padding (not a field) in `abi`:
/// byte 9, and in x86_64 bytes 12..16.
pub fn response_padding(abi: Abi) -> &'static [usize] {
    match abi {
        Abi::X86_64 => &[9, 12, 13, 14, 15],
        Abi::X86_32 => &[9],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_ring_h() {
        // (4096*n - 64) / 112 or / 108, rounded down to a power of two.
        for abi in [Abi::X86_64, Abi::X86_32] {
            assert_eq!(abi.ring_size(1), 32);
            assert_eq!(abi.ring_size(2), 64);
            assert_eq!(abi.ring_size(4), 128);
            assert_eq!(abi.ring_size(8), 256);
            assert_eq!(abi.ring_size(16), 512);
        }
    }

    #[test]
    fn requests_fit_their_slots() {
        for abi in [Abi::X86_64, Abi::X86_32] {
            assert_eq!(abi.seg_offset() + 11 * SEGMENT_BYTES, abi.slot_size());
            assert!(abi.indirect_grefs_offset() + 4 * MAX_INDIRECT_PAGES <= abi.slot_size());
            let mut slot = vec![0xeeu8; abi.slot_size()];
            encode_indirect(abi, &mut slot, OP_WRITE, 300, 7, 0x1122, 99, &[5, 6]);
            assert_eq!(slot[0], OP_INDIRECT);
            assert_eq!(u16::from_le_bytes([slot[2], slot[3]]), 300);
            let g = abi.indirect_grefs_offset();
            assert_eq!(&slot[g..g + 4], &5u32.to_le_bytes());
        }
        // x86_64 indirect: id 8, sector 16, handle 24, grefs 28.
        assert_eq!(Abi::X86_64.indirect_grefs_offset(), 28);
        assert_eq!(Abi::X86_32.indirect_grefs_offset(), 24);
    }
}
