//! What each blkif operation does on the request path. The phases are the
//! same for every operation; this file is where operations differ: what
//! orders a request after the earlier ones, what buffer it needs, which
//! engine op starts it, and what each successful completion means. (What
//! an operation *is* — its ABI, its validation and the features that allow
//! it — is `blkif`'s; adding an operation touches `xen-sys`'s ABI, the
//! parser in `blkif/request.rs`, and this file.)
//!
//! | request | starts as | then | answered |
//! |---|---|---|---|
//! | READ | file read into a buffer | data copied out to the guest | OKAY once copied |
//! | READ, zero-copy (see [`data`](super::data)) | file read straight into the guest's persistently mapped pages | | OKAY once read |
//! | WRITE | data copied in from the guest, file write | | OKAY once written |
//! | WRITE_BARRIER | (after every earlier request) data copied in, file write | fdatasync | OKAY once durable |
//! | FLUSH_DISKCACHE | (after every earlier request) fdatasync | | OKAY once durable |
//! | DISCARD | punch hole (zero range when secure) | | OKAY; EOPNOTSUPP if the file system cannot |
//! | INDIRECT | segment pages fetched from the guest, then as READ/WRITE | | |

use log::debug;

use super::data::Data;
use super::{Queue, Req, Shared, Stage};
use crate::blkif::{Features, Request, RwOp, RwRequest};
use crate::engine::{BufRegion, FsCaps, Op};
use xen_sys::blkif::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};

/// What a started request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Io {
    /// A read, whose data then goes out to the guest.
    Read,
    /// A read straight into the guest's persistently mapped pages.
    ReadZeroCopy,
    Write,
    /// A WRITE_BARRIER's write; its fdatasync follows.
    BarrierWrite,
    /// The fdatasync of a FLUSH or of a barrier.
    Flush,
    Discard,
}

impl Io {
    /// The status to answer when its file op failed with `-errno`.
    pub(super) fn error_status(self, errno: i32) -> i16 {
        if self == Io::Discard && errno == libc::EOPNOTSUPP {
            BLKIF_RSP_EOPNOTSUPP
        } else {
            BLKIF_RSP_ERROR
        }
    }
}

/// The operations a device advertises for an image: FLUSH and WRITE_BARRIER
/// always (fdatasync), DISCARD where the file system punches holes and the
/// device is writable, secure DISCARD where it also zeroes ranges.
pub(crate) fn features(fs: &FsCaps, read_only: bool) -> Features {
    let discard = fs.punch_hole && !read_only;
    Features {
        flush: true,
        barrier: true,
        discard,
        discard_secure: discard && fs.zero_range,
    }
}

/// Must every earlier request be finished before this one starts?
pub(super) fn needs_drain(r: &Request) -> bool {
    match r {
        Request::Rw(r) => r.barrier(),
        Request::Flush { .. } => true,
        Request::Indirect(_) | Request::Discard { .. } => false,
    }
}

/// A read or write that needs a buffer of its length and passes the
/// limits: (is it a write, its bytes). None for everything else.
pub(super) fn data_transfer(r: &Request) -> Option<(bool, u64)> {
    match r {
        Request::Rw(r) => Some((r.op() == RwOp::Write, r.len())),
        _ => None,
    }
}

impl Queue {
    /// Start `req` (whose waiting request is `r`) in ring slot `slot`, with
    /// what its data moves through if it moves data.
    pub(super) fn start_op(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        mut req: Req,
        r: Request,
        data: Option<Data>,
    ) {
        match r {
            Request::Indirect(ind) => {
                // Fetch the segment list, then wait again as a plain read/write.
                self.free_slots.push(slot);
                match self.fetch_indirect(sh, &ind) {
                    Ok(rw) => {
                        req.len = rw.len();
                        req.stage = Stage::Waiting(Request::Rw(rw));
                        self.pending.push_front(req);
                    }
                    Err((status, why)) => {
                        debug!("{}: indirect request refused: {why}", self.ctx.name);
                        self.reject(req.jent, req.t0, req.id, req.op, status);
                    }
                }
            }
            Request::Rw(rw) => self.start_rw(sh, slot, req, rw, data),
            Request::Flush { .. } => {
                self.run(slot, req, Io::Flush);
                self.submit_or_fail(sh, slot, Op::Fdatasync);
            }
            Request::Discard { sector, secure, .. } => {
                let (offset, len) = (sector * 512, req.len);
                if len == 0 {
                    // Nothing to discard: done (Linux blkback answers OKAY too;
                    // fallocate would refuse a zero length).
                    req.stage = Stage::Running(Io::Discard);
                    self.on_started(&req);
                    self.free_slots.push(slot);
                    self.answer(req, BLKIF_RSP_OKAY, true);
                    return;
                }
                self.run(slot, req, Io::Discard);
                let op = if secure {
                    Op::ZeroRange { offset, len }
                } else {
                    Op::Discard { offset, len }
                };
                self.submit_or_fail(sh, slot, op);
            }
        }
    }

    fn start_rw(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        mut req: Req,
        r: RwRequest,
        data: Option<Data>,
    ) {
        let (op, offset, barrier) = (r.op(), r.offset(), r.barrier());
        if barrier {
            self.barrier_active = true;
        }
        req.pieces = r.into_pieces();
        let io = match (op, barrier, &data) {
            // A barrier without data: just the flush.
            (_, _, None) => Io::Flush,
            (RwOp::Read, _, Some(Data::Guest(_))) => Io::ReadZeroCopy,
            (RwOp::Read, _, _) => Io::Read,
            (RwOp::Write, false, _) => Io::Write,
            (RwOp::Write, true, _) => Io::BarrierWrite,
        };
        self.run(slot, req, io);
        match (op, data) {
            (_, None) => self.submit_or_fail(sh, slot, Op::Fdatasync),
            (RwOp::Read, Some(Data::Buf(region))) => {
                self.submit_or_fail(sh, slot, Op::Read { offset, region })
            }
            (RwOp::Read, Some(Data::Guest(bufs))) => {
                self.submit_or_fail(sh, slot, Op::ReadInto { offset, bufs })
            }
            (RwOp::Write, Some(Data::Buf(region))) => {
                self.write_from_guest(sh, slot, region, offset)
            }
            (RwOp::Write, Some(Data::Guest(_))) => {
                // Writes always copy (docs/security.md); `zero_copy_read` never
                // gives a write the guest's pages.
                log::error!("{}: a write without a buffer of its own", self.ctx.name);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }

    /// `req` runs in `slot`, waiting for `io`.
    fn run(&mut self, slot: usize, mut req: Req, io: Io) {
        req.stage = Stage::Running(io);
        self.on_started(&req);
        self.slots[slot] = Some(req);
    }

    /// The file op of the request in `slot`, waiting for `io`, succeeded;
    /// `region` is its buffer, if any.
    pub(super) fn op_done(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        io: Io,
        region: Option<BufRegion>,
    ) {
        match (io, region) {
            (Io::Read, Some(region)) => self.read_to_guest(sh, slot, region),
            // The data is in the guest's pages already (zero-filled past EOF
            // by the engine); the pins drop with the completion.
            (Io::ReadZeroCopy, region) => {
                self.free_region(sh, region);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            (Io::Write, region) => {
                self.observe_slot(slot, |id| super::IoEvent::WriteDone { id });
                self.free_region(sh, region);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            (Io::BarrierWrite, region) => {
                self.observe_slot(slot, |id| super::IoEvent::WriteDone { id });
                self.free_region(sh, region);
                if let Some(r) = self.slots[slot].as_mut() {
                    r.stage = Stage::Running(Io::Flush);
                }
                self.submit_or_fail(sh, slot, Op::Fdatasync);
            }
            (Io::Flush, region) => {
                self.observe_slot(slot, |id| super::IoEvent::FsyncDone { id });
                self.free_region(sh, region);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            (Io::Discard, region) => {
                self.free_region(sh, region);
                self.finish(slot, BLKIF_RSP_OKAY);
            }
            (Io::Read, None) => {
                log::error!("{}: a read completed without its buffer", self.ctx.name);
                self.finish(slot, BLKIF_RSP_ERROR);
            }
        }
    }

    fn free_region(&mut self, sh: &mut Shared, region: Option<BufRegion>) {
        if let Some(r) = region {
            sh.engine.free(r);
        }
    }
}
