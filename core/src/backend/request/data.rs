//! Moving data between the guest's pages and the worker's buffers: one grant
//! copy for many requests' segments, or — where persistent grants were
//! negotiated — a copy to or from the guest's pages mapped once
//! ([`PersistentGrants`](super::super::pgrants::PersistentGrants)). The
//! guest's pages are guest-writable memory: the platform copies them with
//! volatile accesses.

use super::{Queue, Req, Shared};
use crate::blkif::Piece;
use crate::engine::BufRegion;
use crate::platform::{CopySeg, DomId, GrantStatus, Platform};

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
