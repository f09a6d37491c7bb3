//! Moving data between the guest's pages and the worker's buffers: one grant
//! copy for many requests' segments, or — where persistent grants were
//! negotiated — a copy to or from the guest's pages mapped once
//! ([`PersistentGrants`](super::super::pgrants::PersistentGrants)), or, for a
//! read, no copy at all (zero-copy reads, below). The guest's pages are
//! guest-writable memory: the platform copies them with volatile accesses.
//!
//! ## Zero-copy reads
//!
//! A READ (or an INDIRECT read) goes straight into the guest's pages —
//! io_uring `READV` with one iovec per segment pointing into the
//! persistently mapped page, no slab buffer, no memcpy — when all of these
//! hold ([`zero_copy_read`]):
//!
//! 1. persistent grants were negotiated for the device (`serve
//!    --persistent-grants` and the frontend's `feature-persistent`), zero-copy
//!    reads are on (`BackendConfig::zero_copy_reads`, the default) and the
//!    image's file has no data checksums (`FsCaps::data_checksums`: on ext4,
//!    XFS, tmpfs or ramfs, or NOCOW on btrfs; any other file system counts as
//!    checksummed) — decided once per device when it starts, in
//!    `QueueCtx::zero_copy_reads`. btrfs verifies an O_DIRECT read's checksum
//!    on the destination pages after the device filled them: in the guest's
//!    pages, the guest could change them in between and make dom0's file
//!    system report corruption (EIO, "csum failed", `corruption_errs`);
//! 2. every segment's page is mapped: already cached, or mapped now into a
//!    cache that has room (`pgrants`: a full cache makes room only by
//!    dropping stale pages in a purge pass); otherwise the copy path;
//! 3. with an O_DIRECT image, the request fits its direct-I/O alignment
//!    (`IoMode::Direct`: the file offset and every segment's length are
//!    multiples of `offset_align`, every segment's address of `mem_align`) — a
//!    partial segment on a file system with 4 KiB direct-I/O alignment (btrfs)
//!    takes the copy path; a buffered image has no alignment rule;
//! 4. at most [`MAX_PIECES`] segments (always, for what we advertise).
//!
//! Anything else takes the copy path, which stays the default. The pages'
//! [`Pin`]s travel with the engine op and drop with its completion, so a page
//! is never unmapped (a purge pass, disconnect, a stopped or panicked queue,
//! a restart handover) while the kernel may write into it; if the engine goes
//! away first they are leaked. End of file is zero-filled by the engine into
//! the guest's pages (volatile stores). Writes always copy: a guest that
//! changes a page while the file system writes it from there could make a
//! data checksum (btrfs) disagree with the data (`docs/security.md`).
//! Answered zero-copy reads are counted in `zero_copy_reads`.

use super::super::pgrants::{PersistentGrants, Pin};
use super::{Queue, Req, Shared};
use crate::blkif::{Piece, Request, RwOp};
use crate::engine::{BufRegion, ForeignBufs, IoMode, MAX_PIECES};
use crate::platform::{CopySeg, DomId, GrantStatus, Platform};

/// What a started read or write moves its data through.
#[derive(Debug)]
pub(super) enum Data {
    /// A buffer of the worker's slab (the copy path).
    Buf(BufRegion),
    /// The guest's own persistently mapped pages (a zero-copy read).
    Guest(ForeignBufs),
}

/// The guest's pages for reading `r` straight into them, pinned, or None if
/// it takes the copy path (the rules are in the module doc).
pub(super) fn zero_copy_read(
    pg: &mut PersistentGrants,
    mode: &IoMode,
    r: &Request,
) -> Option<ForeignBufs> {
    let Request::Rw(rw) = r else { return None };
    if rw.op() != RwOp::Read || rw.barrier() || rw.is_empty() {
        return None;
    }
    let pieces = rw.pieces();
    if pieces.is_empty() || pieces.len() > MAX_PIECES {
        return None;
    }
    let (oa, ma) = match mode {
        IoMode::Direct {
            offset_align,
            mem_align,
        } => (*offset_align as usize, *mem_align as usize),
        IoMode::Buffered { .. } => (1, 1),
    };
    // Checked on the offsets first (pages are page-aligned), so that a
    // request that cannot fit maps nothing.
    let fits =
        |addr: usize, len: usize| addr.is_multiple_of(ma.max(1)) && len.is_multiple_of(oa.max(1));
    if !(rw.offset() as usize).is_multiple_of(oa.max(1))
        || !pieces
            .iter()
            .all(|p| fits(usize::from(p.offset()), usize::from(p.len())))
    {
        return None;
    }
    let mut pins: Vec<Pin> = Vec::with_capacity(pieces.len());
    let mut iov = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (page, pin) = pg.pin(p.gref())?;
        // Inside the page: parse_request keeps offset + len <= PAGE_SIZE (R3),
        // and `pin` only gives mappings of at least a page.
        let addr = page.wrapping_add(usize::from(p.offset()));
        if !fits(addr as usize, usize::from(p.len())) {
            return None;
        }
        iov.push((addr, usize::from(p.len())));
        pins.push(pin);
    }
    // SAFETY: each piece lies inside a page mapping (above) that `pins` keeps
    // mapped and writable while the ForeignBufs lives; the pages are guest
    // memory that this process only ever touches with volatile copies
    // (`ForeignMapping`), never through references.
    unsafe { ForeignBufs::new(iov, Box::new(pins)) }
}

impl Queue {
    /// Copy a write's data from the guest's persistently mapped pages into
    /// `region` (with persistent grants; otherwise the batched grant copy of
    /// [`copy_in_writes`](Queue::copy_in_writes)).
    pub(super) fn copy_from_guest(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        region: &BufRegion,
    ) -> Result<(), GrantStatus> {
        let pieces = pieces_of(&self.slots, slot);
        let pg = self
            .ctx
            .persistent
            .as_mut()
            .ok_or(GrantStatus::GeneralError)?;
        for (p, dst) in split_mut(pieces, sh.engine.buf_mut(region)) {
            pg.copy_from(p.gref(), p.offset(), dst)?;
        }
        Ok(())
    }

    /// Copy a read's data from `region` out to the guest's persistently mapped
    /// pages (with persistent grants; otherwise the batched grant copy of
    /// [`copy_out_reads`](Queue::copy_out_reads)).
    pub(super) fn copy_to_guest(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        region: &BufRegion,
    ) -> Result<(), GrantStatus> {
        let pieces = pieces_of(&self.slots, slot);
        let pg = self
            .ctx
            .persistent
            .as_mut()
            .ok_or(GrantStatus::GeneralError)?;
        for (p, src) in split(pieces, sh.engine.buf(region)) {
            pg.copy_to(p.gref(), p.offset(), src)?;
        }
        Ok(())
    }
}

/// The guest pages of the request in `slot` (none for an empty slot).
pub(super) fn pieces_of(slots: &[Option<Req>], slot: usize) -> &[Piece] {
    slots
        .get(slot)
        .and_then(|s| s.as_ref())
        .map_or(&[], |r| r.pieces.as_slice())
}

/// A request's pieces with their parts of its buffer (laid out back to back).
pub(super) fn split<'a>(
    pieces: &'a [Piece],
    mut buf: &'a [u8],
) -> impl Iterator<Item = (&'a Piece, &'a [u8])> {
    pieces.iter().map(move |p| {
        let (part, rest) = buf.split_at(usize::from(p.len()));
        buf = rest;
        (p, part)
    })
}

/// [`split`], mutably.
pub(super) fn split_mut<'a>(
    pieces: &'a [Piece],
    mut buf: &'a mut [u8],
) -> impl Iterator<Item = (&'a Piece, &'a mut [u8])> {
    pieces.iter().map(move |p| {
        let (part, rest) = std::mem::take(&mut buf).split_at_mut(usize::from(p.len()));
        buf = rest;
        (p, part)
    })
}

/// One grant copy for many requests' segments: false if the call itself
/// failed; otherwise `status` holds each segment's result.
pub(super) fn grant_copy_batch(
    platform: &dyn Platform,
    domid: DomId,
    segs: &mut [CopySeg<'_>],
    status: &mut Vec<GrantStatus>,
) -> bool {
    status.clear();
    status.resize(segs.len(), GrantStatus::GeneralError);
    platform.grant_copy(domid, segs, status).is_ok()
}

/// One grant-copy batch; the first failed segment's status if any failed.
pub(super) fn grant_copy_all(
    platform: &dyn Platform,
    domid: DomId,
    segs: &mut [CopySeg<'_>],
    status: &mut Vec<GrantStatus>,
) -> Result<(), GrantStatus> {
    if !grant_copy_batch(platform, domid, segs, status) {
        return Err(GrantStatus::GeneralError);
    }
    match status.iter().find(|s| **s != GrantStatus::Okay) {
        Some(bad) => Err(*bad),
        None => Ok(()),
    }
}
