//! Parsing and validation of blkif requests copied out of the shared ring.
//!
//! Everything here is a pure function of the copied bytes ([`RawRequest`]) and
//! of the disk description ([`DiskInfo`]): a guest cannot change a request
//! after it has been copied, so what is validated is what is executed.

use std::fmt;

use xen_sys::blkif::{
    self as abi, blkif_request_segment, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    BLKIF_SEGMENTS_PER_INDIRECT_PAGE,
};
use xen_sys::ring;

/// Bytes in one wire sector (`first_sect`, `sector_number`, `nr_sectors` unit).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes in one grant page.
const PAGE_BYTES: usize = 4096;
/// Largest slot of any ABI (x86_64 request).
pub const MAX_SLOT_SIZE: usize = core::mem::size_of::<abi::x86_64::blkif_sring_entry>();
/// Most segments an indirect request can describe (8 pages of 512).
pub const MAX_INDIRECT_SEGMENTS: u32 =
    (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGMENTS_PER_INDIRECT_PAGE) as u32;

/// The ring ABI the frontend speaks (its `protocol` xenstore key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// `"x86_64-abi"`: native 64-bit layout.
    X86_64,
    /// `"x86_32-abi"`: i386 layout (4-aligned `u64`s).
    X86_32,
}

/// The `protocol` key named an ABI we do not speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProtocol(pub String);

impl fmt::Display for UnknownProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unsupported blkif protocol {:?} (expected \"x86_64-abi\" or \"x86_32-abi\")",
            self.0
        )
    }
}

impl std::error::Error for UnknownProtocol {}

/// Field offsets of one ABI, taken from the `xen-sys` structs.
struct Layout {
    slot: usize,
    id: usize,
    sector: usize,
    seg: usize,
    discard_nr_sectors: usize,
    ind_nr_segments: usize,
    ind_grefs: usize,
}

const LAYOUT_64: Layout = {
    use core::mem::offset_of;
    use xen_sys::blkif::x86_64 as a;
    Layout {
        slot: core::mem::size_of::<a::blkif_sring_entry>(),
        id: offset_of!(a::blkif_request, id),
        sector: offset_of!(a::blkif_request, sector_number),
        seg: offset_of!(a::blkif_request, seg),
        discard_nr_sectors: offset_of!(a::blkif_request_discard, nr_sectors),
        ind_nr_segments: offset_of!(a::blkif_request_indirect, nr_segments),
        ind_grefs: offset_of!(a::blkif_request_indirect, indirect_grefs),
    }
};

const LAYOUT_32: Layout = {
    use core::mem::offset_of;
    use xen_sys::blkif::x86_32 as a;
    Layout {
        slot: core::mem::size_of::<a::blkif_sring_entry>(),
        id: offset_of!(a::blkif_request, id),
        sector: offset_of!(a::blkif_request, sector_number),
        seg: offset_of!(a::blkif_request, seg),
        discard_nr_sectors: offset_of!(a::blkif_request_discard, nr_sectors),
        ind_nr_segments: offset_of!(a::blkif_request_indirect, nr_segments),
        ind_grefs: offset_of!(a::blkif_request_indirect, indirect_grefs),
    }
};

// Fields shared by every request kind sit at the same place (blkif.h relies on it).
const _: () = {
    use core::mem::offset_of;
    use xen_sys::blkif::{x86_32 as b, x86_64 as a};
    assert!(offset_of!(a::blkif_request_discard, id) == LAYOUT_64.id);
    assert!(offset_of!(a::blkif_request_indirect, id) == LAYOUT_64.id);
    assert!(offset_of!(a::blkif_request_discard, sector_number) == LAYOUT_64.sector);
    assert!(offset_of!(a::blkif_request_indirect, sector_number) == LAYOUT_64.sector);
    assert!(offset_of!(b::blkif_request_discard, id) == LAYOUT_32.id);
    assert!(offset_of!(b::blkif_request_indirect, id) == LAYOUT_32.id);
    assert!(offset_of!(b::blkif_request_discard, sector_number) == LAYOUT_32.sector);
    assert!(offset_of!(b::blkif_request_indirect, sector_number) == LAYOUT_32.sector);
    assert!(offset_of!(a::blkif_request, nr_segments) == 1);
    assert!(offset_of!(a::blkif_request_discard, flag) == 1);
    assert!(offset_of!(a::blkif_request_indirect, indirect_op) == 1);
    assert!(LAYOUT_64.slot <= MAX_SLOT_SIZE && LAYOUT_32.slot <= MAX_SLOT_SIZE);
};

impl Abi {
    /// The ABI named by the frontend's `protocol` key. A missing key means
    /// x86_32, as Linux blkback on x86 (`BLKIF_PROTOCOL_DEFAULT`): frontends
    /// that predate the key were 32-bit.
    pub fn from_protocol(protocol: Option<&str>) -> Result<Abi, UnknownProtocol> {
        match protocol {
            None => Ok(Abi::X86_32),
            Some("x86_64-abi") => Ok(Abi::X86_64),
            Some("x86_32-abi") => Ok(Abi::X86_32),
            Some(other) => Err(UnknownProtocol(other.to_string())),
        }
    }

    /// The `protocol` string of this ABI.
    pub fn protocol_name(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64-abi",
            Abi::X86_32 => "x86_32-abi",
        }
    }

    fn layout(self) -> &'static Layout {
        match self {
            Abi::X86_64 => &LAYOUT_64,
            Abi::X86_32 => &LAYOUT_32,
        }
    }

    /// Bytes of one ring slot (112 or 108).
    pub fn slot_size(self) -> usize {
        self.layout().slot
    }

    /// Bytes of one response (16 or 12).
    pub fn response_size(self) -> usize {
        match self {
            Abi::X86_64 => core::mem::size_of::<abi::x86_64::blkif_response>(),
            Abi::X86_32 => core::mem::size_of::<abi::x86_32::blkif_response>(),
        }
    }

    /// Slots in a ring of `nr_pages` pages (ring.h `__RING_SIZE`).
    pub fn ring_size(self, nr_pages: usize) -> u32 {
        ring::ring_size(nr_pages * PAGE_BYTES, self.slot_size())
    }
}

/// One request slot, copied out of the shared ring exactly once.
#[derive(Clone, Copy)]
pub struct RawRequest {
    abi: Abi,
    bytes: [u8; MAX_SLOT_SIZE],
}

impl fmt::Debug for RawRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawRequest")
            .field("abi", &self.abi)
            .field("operation", &self.operation())
            .field("id", &self.id())
            .finish()
    }
}

impl RawRequest {
    /// A request from the bytes of one slot (`bytes.len()` must be the ABI's
    /// slot size). Used by the ring and by tests that build slots by hand.
    pub fn from_bytes(abi: Abi, bytes: &[u8]) -> Option<RawRequest> {
        if bytes.len() != abi.slot_size() {
            return None;
        }
        let mut b = [0u8; MAX_SLOT_SIZE];
        b[..bytes.len()].copy_from_slice(bytes);
        Some(RawRequest { abi, bytes: b })
    }

    /// The ABI this slot was read with.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The slot's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.abi.slot_size()]
    }

    fn u8_at(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_le_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[off..off + 8]);
        u64::from_le_bytes(b)
    }

    /// `operation` (byte 0 in every request kind).
    pub fn operation(&self) -> u8 {
        self.u8_at(0)
    }

    /// The guest's `id`, echoed in the response (same place in every kind).
    pub fn id(&self) -> u64 {
        self.u64_at(self.abi.layout().id)
    }

    /// The operation to echo in the response: the inner op for INDIRECT
    /// (whatever byte the guest put there), else `operation`.
    pub fn response_operation(&self) -> u8 {
        if self.operation() == BLKIF_OP_INDIRECT {
            self.u8_at(1)
        } else {
            self.operation()
        }
    }

    fn segment(&self, i: usize) -> Segment {
        let off = self.abi.layout().seg + i * core::mem::size_of::<blkif_request_segment>();
        Segment {
            gref: self.u32_at(off),
            first_sect: self.u8_at(off + 4),
            last_sect: self.u8_at(off + 5),
        }
    }
}

/// One segment descriptor: sectors `first_sect..=last_sect` of the granted page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

/// A piece of a validated read/write: `len` bytes at `offset` in granted page
/// `gref`. Pieces follow each other on disk in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    gref: u32,
    offset: u16,
    len: u16,
}

impl Piece {
    /// The granted page.
    pub fn gref(&self) -> u32 {
        self.gref
    }
    /// Byte offset in the page.
    pub fn offset(&self) -> u16 {
        self.offset
    }
    /// Bytes.
    pub fn len(&self) -> u16 {
        self.len
    }
    /// Never: the parser makes no empty piece.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A piece as the parser would make it, for the unit tests' expectations.
    #[cfg(test)]
    pub(crate) fn new(gref: u32, offset: u16, len: u16) -> Piece {
        Piece { gref, offset, len }
    }
}

/// What the features the backend advertised allow. Kept in a device's
/// restart state (flush and barrier read as on when a state file lacks them:
/// refblk has always advertised both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Features {
    /// `feature-flush-cache`: FLUSH_DISKCACHE accepted.
    #[serde(default = "on")]
    pub flush: bool,
    /// `feature-barrier`: WRITE_BARRIER accepted.
    #[serde(default = "on")]
    pub barrier: bool,
    /// `feature-discard`: DISCARD accepted.
    pub discard: bool,
    /// `discard-secure`: the secure flag is honoured (else ignored, as blkif.h says).
    pub discard_secure: bool,
}

fn on() -> bool {
    true
}

impl Features {
    /// The backend's xenstore nodes that advertise these features to the
    /// frontend (written when the device connects), beside the parser that
    /// enforces them.
    pub fn xenstore_nodes(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("feature-flush-cache", u8::from(self.flush).to_string()),
            ("feature-barrier", u8::from(self.barrier).to_string()),
            ("feature-discard", u8::from(self.discard).to_string()),
        ];
        if self.discard {
            // Punching holes works in file-system blocks: say so, so that
            // the guest sends discards worth doing.
            v.push(("discard-granularity", "4096".into()));
            v.push(("discard-alignment", "0".into()));
            v.push(("discard-secure", u8::from(self.discard_secure).to_string()));
        }
        v
    }
}

/// The disk a ring serves, as advertised to the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors (the `sectors` key).
    pub sectors: u64,
    /// Logical sector size in bytes (`sector-size`): a power of two from 512
    /// to 4096 (512 and 4096 in practice). Requests are still in 512-byte
    /// units but must be aligned to this.
    pub logical_sector_size: u32,
    /// Opened read-only (`mode` = `r`).
    pub read_only: bool,
    /// `feature-max-indirect-segments` we advertised (0 = no INDIRECT).
    /// Values above 4096 (8 pages × 512) are treated as 4096.
    pub max_indirect_segments: u32,
    pub features: Features,
}

impl DiskInfo {
    fn sector_mask(&self) -> u64 {
        (u64::from(self.logical_sector_size.max(512)) / SECTOR_SIZE).max(1) - 1
    }
    fn max_indirect(&self) -> u32 {
        self.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS)
    }
}

/// Direction of a read/write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwOp {
    Read,
    Write,
}

/// A validated data transfer: `len` bytes at byte `offset` of the disk,
/// scattered over `pieces` (in disk order, lengths summing to `len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RwRequest {
    id: u64,
    op: RwOp,
    /// WRITE_BARRIER: drain earlier requests, write, then flush. May have no
    /// pieces (a pure barrier).
    barrier: bool,
    /// Operation to echo in the response (READ, WRITE, WRITE_BARRIER, or the
    /// inner op of an INDIRECT request).
    response_op: u8,
    /// Start in 512-byte sectors.
    sector: u64,
    /// Start in bytes (`sector * 512`).
    offset: u64,
    /// Total bytes.
    len: u64,
    pieces: Vec<Piece>,
}

impl RwRequest {
    /// The guest's id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Read or write.
    pub fn op(&self) -> RwOp {
        self.op
    }
    /// WRITE_BARRIER: drain earlier requests, write, then flush.
    pub fn barrier(&self) -> bool {
        self.barrier
    }
    /// The operation to echo in the response.
    pub fn response_op(&self) -> u8 {
        self.response_op
    }
    /// Start in 512-byte sectors.
    pub fn sector(&self) -> u64 {
        self.sector
    }
    /// Start in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// No data (a pure barrier).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The pieces, in disk order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }
    /// The pieces, taken out (the request is started).
    pub fn into_pieces(self) -> Vec<Piece> {
        self.pieces
    }
}

/// A validated INDIRECT header. The backend grant-copies the first
/// [`IndirectRequest::nr_pages`] of `indirect_grefs` into a buffer and calls
/// [`IndirectRequest::complete`] to get the validated [`RwRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndirectRequest {
    id: u64,
    op: RwOp,
    sector: u64,
    nr_segments: u16,
    /// Only the first `nr_pages()` entries are meaningful.
    indirect_grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

impl IndirectRequest {
    /// The guest's id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Read or write.
    pub fn op(&self) -> RwOp {
        self.op
    }
    /// Start in 512-byte sectors.
    pub fn sector(&self) -> u64 {
        self.sector
    }
    /// Segments in the indirect pages.
    pub fn nr_segments(&self) -> u16 {
        self.nr_segments
    }
    /// Every indirect gref of the slot as copied; only the first
    /// [`nr_pages`](Self::nr_pages) are used ([`page_grefs`](Self::page_grefs)).
    pub fn indirect_grefs(&self) -> &[u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST] {
        &self.indirect_grefs
    }

    /// A header as the parser would make it, unchecked, for the unit tests
    /// of [`complete`](Self::complete)'s own bound.
    #[cfg(test)]
    pub(crate) fn unchecked(
        id: u64,
        op: RwOp,
        sector: u64,
        nr_segments: u16,
        indirect_grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    ) -> IndirectRequest {
        IndirectRequest {
            id,
            op,
            sector,
            nr_segments,
            indirect_grefs,
        }
    }

    /// Indirect pages holding the segment list: ceil(nr_segments / 512).
    pub fn nr_pages(&self) -> usize {
        usize::from(self.nr_segments)
            .div_ceil(BLKIF_SEGMENTS_PER_INDIRECT_PAGE)
            .min(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
    }

    /// The grant refs of the indirect pages to copy.
    pub fn page_grefs(&self) -> &[u32] {
        &self.indirect_grefs[..self.nr_pages()]
    }

    /// The operation to echo: the inner op.
    pub fn response_op(&self) -> u8 {
        match self.op {
            RwOp::Read => BLKIF_OP_READ,
            RwOp::Write => BLKIF_OP_WRITE,
        }
    }

    /// Validate the segment list copied from the indirect pages (`pages` = the
    /// pages back to back, at least `nr_pages() * 4096` bytes) and produce the
    /// data transfer, or a rejection to answer.
    pub fn complete(&self, pages: &[u8], disk: &DiskInfo) -> Result<RwRequest, Rejection> {
        let reject = |reason| Rejection::new(self.id, self.response_op(), reason);
        // `parse_request` checked this against what we advertised; keep the
        // 8-page bound here too (defence in depth: this indexes the pages).
        if u32::from(self.nr_segments) > MAX_INDIRECT_SEGMENTS || self.nr_segments == 0 {
            return Err(reject(RejectReason::BadSegmentCount {
                nr_segments: u32::from(self.nr_segments),
                max: MAX_INDIRECT_SEGMENTS,
            }));
        }
        let segs = parse_indirect_segments(pages, self.nr_segments).map_err(reject)?;
        build_rw(
            self.id,
            self.op,
            false,
            self.response_op(),
            self.sector,
            &segs,
            disk,
        )
    }
}

/// A parsed and validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// READ, WRITE, WRITE_BARRIER.
    Rw(RwRequest),
    /// INDIRECT: the segment list must be fetched first.
    Indirect(IndirectRequest),
    /// FLUSH_DISKCACHE.
    Flush { id: u64 },
    /// DISCARD of `nr_sectors` 512-byte sectors at `sector`; `secure` only
    /// when the backend advertised `discard-secure`.
    Discard {
        id: u64,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
}

impl Request {
    /// The guest's id.
    pub fn id(&self) -> u64 {
        match self {
            Request::Rw(r) => r.id,
            Request::Indirect(r) => r.id,
            Request::Flush { id } | Request::Discard { id, .. } => *id,
        }
    }

    /// Bytes the request reads, writes or discards (0 for a flush, and for
    /// an indirect request until its segments are fetched).
    pub fn data_len(&self) -> u64 {
        match self {
            Request::Rw(r) => r.len(),
            Request::Discard { nr_sectors, .. } => nr_sectors * SECTOR_SIZE,
            Request::Indirect(_) | Request::Flush { .. } => 0,
        }
    }

    /// The operation to echo in the response.
    pub fn response_op(&self) -> u8 {
        match self {
            Request::Rw(r) => r.response_op,
            Request::Indirect(r) => r.response_op(),
            Request::Flush { .. } => BLKIF_OP_FLUSH_DISKCACHE,
            Request::Discard { .. } => BLKIF_OP_DISCARD,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// Operation code we do not know (EOPNOTSUPP).
    UnknownOperation(u8),
    /// A feature we did not advertise (EOPNOTSUPP).
    FeatureDisabled(&'static str),
    /// Write, barrier or discard on a read-only device.
    ReadOnly,
    /// `nr_segments` out of range for the operation.
    BadSegmentCount { nr_segments: u32, max: u32 },
    /// INDIRECT with an inner op other than READ/WRITE.
    BadIndirectOperation(u8),
    /// Segment `index` has `first_sect > last_sect` or `last_sect > 7`.
    BadSegment {
        index: usize,
        first_sect: u8,
        last_sect: u8,
    },
    /// Start or a segment boundary not aligned to the logical sector size.
    Misaligned { logical_sector_size: u32 },
    /// `sector + nr_sectors` overflows or passes the end of the disk.
    OutOfRange {
        sector: u64,
        nr_sectors: u64,
        disk_sectors: u64,
    },
    /// The indirect page buffer is shorter than the segment list.
    IndirectPagesTooShort { needed: usize, got: usize },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::UnknownOperation(op) => write!(f, "unknown operation {op}"),
            RejectReason::FeatureDisabled(feat) => write!(f, "feature {feat} not advertised"),
            RejectReason::ReadOnly => write!(f, "write to a read-only device"),
            RejectReason::BadSegmentCount { nr_segments, max } => {
                write!(f, "nr_segments {nr_segments} out of range (max {max})")
            }
            RejectReason::BadIndirectOperation(op) => {
                write!(f, "indirect request with inner operation {op}")
            }
            RejectReason::BadSegment {
                index,
                first_sect,
                last_sect,
            } => write!(
                f,
                "segment {index}: first_sect {first_sect} last_sect {last_sect} (need first <= last <= 7)"
            ),
            RejectReason::Misaligned {
                logical_sector_size,
            } => write!(f, "not aligned to the {logical_sector_size}-byte sector size"),
            RejectReason::OutOfRange {
                sector,
                nr_sectors,
                disk_sectors,
            } => write!(
                f,
                "sectors {sector}+{nr_sectors} outside the disk ({disk_sectors} sectors)"
            ),
            RejectReason::IndirectPagesTooShort { needed, got } => {
                write!(f, "indirect segment list needs {needed} bytes, got {got}")
            }
        }
    }
}

/// A refused request: answer `status` for `id` with `operation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: u64,
    /// Operation to echo (the inner op for INDIRECT).
    pub operation: u8,
    /// `BLKIF_RSP_EOPNOTSUPP` or `BLKIF_RSP_ERROR`.
    pub status: i16,
    pub reason: RejectReason,
}

impl Rejection {
    fn new(id: u64, operation: u8, reason: RejectReason) -> Rejection {
        let status = match reason {
            RejectReason::UnknownOperation(_) | RejectReason::FeatureDisabled(_) => {
                BLKIF_RSP_EOPNOTSUPP
            }
            _ => BLKIF_RSP_ERROR,
        };
        Rejection {
            id,
            operation,
            status,
            reason,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request id {:#x} op {}: {} (status {})",
            self.id, self.operation, self.reason, self.status
        )
    }
}

/// A request with up to 11 direct segments (at least `min_segments`).
fn direct_rw(
    raw: &RawRequest,
    disk: &DiskInfo,
    rw: RwOp,
    barrier: bool,
    response_op: u8,
    min_segments: u8,
) -> Result<Request, Rejection> {
    let id = raw.id();
    let nr = raw.u8_at(1);
    if nr < min_segments || usize::from(nr) > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        return Err(Rejection::new(
            id,
            response_op,
            RejectReason::BadSegmentCount {
                nr_segments: u32::from(nr),
                max: BLKIF_MAX_SEGMENTS_PER_REQUEST as u32,
            },
        ));
    }
    let mut segs = [Segment {
        gref: 0,
        first_sect: 0,
        last_sect: 0,
    }; BLKIF_MAX_SEGMENTS_PER_REQUEST];
    let segs = &mut segs[..usize::from(nr)];
    for (i, s) in segs.iter_mut().enumerate() {
        *s = raw.segment(i);
    }
    let sector = raw.u64_at(raw.abi.layout().sector);
    build_rw(id, rw, barrier, response_op, sector, segs, disk).map(Request::Rw)
}

/// Parse and validate one request against `disk`.
pub fn parse_request(raw: &RawRequest, disk: &DiskInfo) -> Result<Request, Rejection> {
    let l = raw.abi.layout();
    let id = raw.id();
    let op = raw.operation();
    let reject = |reason| Rejection::new(id, raw.response_operation(), reason);
    match op {
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER => {
            let barrier = op == BLKIF_OP_WRITE_BARRIER;
            if barrier && !disk.features.barrier {
                return Err(reject(RejectReason::FeatureDisabled("feature-barrier")));
            }
            let rw = if op == BLKIF_OP_READ {
                RwOp::Read
            } else {
                RwOp::Write
            };
            direct_rw(raw, disk, rw, barrier, op, if barrier { 0 } else { 1 })
        }
        BLKIF_OP_FLUSH_DISKCACHE => {
            if !disk.features.flush {
                return Err(reject(RejectReason::FeatureDisabled("feature-flush-cache")));
            }
            if raw.u8_at(1) == 0 {
                return Ok(Request::Flush { id });
            }
            // A flush carrying data: Linux blkfront sends FUA/PREFLUSH writes this
            // way when the backend offers no barrier, and Linux blkback writes the
            // data after a preflush. We run it as a barrier (drain, write,
            // fdatasync), which covers both the preflush and the FUA meaning.
            direct_rw(raw, disk, RwOp::Write, true, BLKIF_OP_FLUSH_DISKCACHE, 1)
        }
        BLKIF_OP_DISCARD => {
            if !disk.features.discard {
                return Err(reject(RejectReason::FeatureDisabled("feature-discard")));
            }
            if disk.read_only {
                return Err(reject(RejectReason::ReadOnly));
            }
            let sector = raw.u64_at(l.sector);
            let nr_sectors = raw.u64_at(l.discard_nr_sectors);
            check_range(sector, nr_sectors, disk).map_err(reject)?;
            let mask = disk.sector_mask();
            if (sector | nr_sectors) & mask != 0 {
                return Err(reject(RejectReason::Misaligned {
                    logical_sector_size: disk.logical_sector_size,
                }));
            }
            let secure = disk.features.discard_secure && raw.u8_at(1) & BLKIF_DISCARD_SECURE != 0;
            Ok(Request::Discard {
                id,
                sector,
                nr_sectors,
                secure,
            })
        }
        BLKIF_OP_INDIRECT => {
            let max = disk.max_indirect();
            if max == 0 {
                return Err(reject(RejectReason::FeatureDisabled(
                    "feature-max-indirect-segments",
                )));
            }
            let rw = match raw.u8_at(1) {
                BLKIF_OP_READ => RwOp::Read,
                BLKIF_OP_WRITE => RwOp::Write,
                other => return Err(reject(RejectReason::BadIndirectOperation(other))),
            };
            if rw == RwOp::Write && disk.read_only {
                return Err(reject(RejectReason::ReadOnly));
            }
            let nr = raw.u16_at(l.ind_nr_segments);
            if nr == 0 || u32::from(nr) > max {
                return Err(reject(RejectReason::BadSegmentCount {
                    nr_segments: u32::from(nr),
                    max,
                }));
            }
            let sector = raw.u64_at(l.sector);
            // The length is known only with the segments; check the start now
            // so that a hopeless request costs no grant copy.
            if sector & disk.sector_mask() != 0 {
                return Err(reject(RejectReason::Misaligned {
                    logical_sector_size: disk.logical_sector_size,
                }));
            }
            check_range(sector, 1, disk).map_err(reject)?;
            let mut indirect_grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
            for (i, g) in indirect_grefs.iter_mut().enumerate() {
                *g = raw.u32_at(l.ind_grefs + 4 * i);
            }
            Ok(Request::Indirect(IndirectRequest {
                id,
                op: rw,
                sector,
                nr_segments: nr,
                indirect_grefs,
            }))
        }
        other => Err(reject(RejectReason::UnknownOperation(other))),
    }
}

/// Decode `nr_segments` segment descriptors from indirect pages laid back to
/// back in `pages` (512 descriptors of 8 bytes per 4 KiB page). Only the
/// descriptors are decoded here; [`IndirectRequest::complete`] validates them.
pub fn parse_indirect_segments(
    pages: &[u8],
    nr_segments: u16,
) -> Result<Vec<Segment>, RejectReason> {
    let desc = core::mem::size_of::<blkif_request_segment>();
    let needed = usize::from(nr_segments) * desc;
    if pages.len() < needed {
        return Err(RejectReason::IndirectPagesTooShort {
            needed,
            got: pages.len(),
        });
    }
    Ok(pages[..needed]
        .chunks_exact(desc)
        .map(|d| Segment {
            gref: u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
            first_sect: d[4],
            last_sect: d[5],
        })
        .collect())
}

/// The range must end inside the disk, and its end in bytes must fit a `u64`:
/// `DiskInfo` is a plain struct, and a `sectors` above `u64::MAX / 512` would
/// otherwise let `sector * 512` wrap to a byte offset near 0 (found by the
/// `blkif_request` fuzz target; real images are far smaller).
fn check_range(sector: u64, nr_sectors: u64, disk: &DiskInfo) -> Result<(), RejectReason> {
    match sector.checked_add(nr_sectors) {
        Some(end) if end <= disk.sectors && end <= u64::MAX / SECTOR_SIZE => Ok(()),
        _ => Err(RejectReason::OutOfRange {
            sector,
            nr_sectors,
            disk_sectors: disk.sectors,
        }),
    }
}

/// Validate segments of a READ/WRITE/WRITE_BARRIER (direct or indirect) and
/// build the transfer (Linux blkback: `dispatch_rw_block_io` + `vbd_translate`).
fn build_rw(
    id: u64,
    op: RwOp,
    barrier: bool,
    response_op: u8,
    sector: u64,
    segs: &[Segment],
    disk: &DiskInfo,
) -> Result<RwRequest, Rejection> {
    let reject = |reason| Rejection::new(id, response_op, reason);
    if op == RwOp::Write && disk.read_only {
        return Err(reject(RejectReason::ReadOnly));
    }
    let mask = disk.sector_mask();
    let misaligned = RejectReason::Misaligned {
        logical_sector_size: disk.logical_sector_size,
    };
    if sector & mask != 0 {
        return Err(reject(misaligned));
    }
    let mut pieces = Vec::with_capacity(segs.len());
    let mut nr_sectors: u64 = 0;
    for (index, s) in segs.iter().enumerate() {
        if s.first_sect > s.last_sect || s.last_sect >= abi::BLKIF_SECTORS_PER_PAGE {
            return Err(reject(RejectReason::BadSegment {
                index,
                first_sect: s.first_sect,
                last_sect: s.last_sect,
            }));
        }
        if (u64::from(s.first_sect) | (u64::from(s.last_sect) + 1)) & mask != 0 {
            return Err(reject(misaligned));
        }
        let n = u64::from(s.last_sect - s.first_sect) + 1;
        nr_sectors += n;
        pieces.push(Piece {
            gref: s.gref,
            offset: u16::from(s.first_sect) * SECTOR_SIZE as u16,
            len: (n * SECTOR_SIZE) as u16,
        });
    }
    if nr_sectors > 0 {
        check_range(sector, nr_sectors, disk).map_err(reject)?;
    }
    Ok(RwRequest {
        id,
        op,
        barrier,
        response_op,
        sector,
        // Cannot overflow: sector + nr_sectors <= u64::MAX / 512 was checked
        // (check_range), or there are no pieces, in which case offset is only
        // informative.
        offset: sector.wrapping_mul(SECTOR_SIZE),
        len: nr_sectors * SECTOR_SIZE,
        pieces,
    })
}
