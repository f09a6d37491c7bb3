//! Memory outside the slab that a read goes straight into ([`Op::ReadInto`]):
//! a list of (address, length) pieces and what keeps them mapped until the
//! read's completion is reaped. The backend uses it for zero-copy reads into
//! a guest's persistently mapped pages (`backend::request::data`).
//!
//! [`Op::ReadInto`]: super::Op::ReadInto

use std::any::Any;

/// Most pieces one read may have (the kernel's `UIO_MAXIOV`).
pub const MAX_PIECES: usize = 1024;

/// The pieces of memory a [`super::Op::ReadInto`] fills, in file order, and
/// the owner that keeps them valid. The engine keeps it in the op's slot until
/// the completion is reaped and hands it back in the
/// [`Completion`](super::Completion); if the engine is dropped while the read
/// may still run, it is leaked rather than released.
pub struct ForeignBufs {
    /// The pieces not filled yet: a short read advances them in place (the
    /// kernel is given `iov[at..]`).
    iov: Vec<libc::iovec>,
    at: usize,
    len: usize,
    keep: Option<Box<dyn Any + Send>>,
}

// SAFETY: the iovecs are addresses handed to the kernel and written only by
// the engine's EOF zero-fill, on the thread that owns the engine; the memory
// they name is kept valid by `keep`, which is Send. Moving the value between
// threads moves nothing the pointers depend on.
unsafe impl Send for ForeignBufs {}

impl ForeignBufs {
    /// Pieces `(address, length)` to read into, in order, kept valid by `keep`.
    /// None if there are none, more than [`MAX_PIECES`], or a length is 0.
    ///
    /// # Safety
    ///
    /// Every piece must be valid for writes of its length for as long as
    /// `keep` lives, and must not be memory Rust code of this process holds a
    /// reference to (the kernel and the zero-fill write it while the read
    /// runs; only volatile accesses may race with them, as they do for a
    /// foreign domain's pages).
    pub unsafe fn new(
        pieces: impl IntoIterator<Item = (*mut u8, usize)>,
        keep: Box<dyn Any + Send>,
    ) -> Option<ForeignBufs> {
        let iov: Vec<libc::iovec> = pieces
            .into_iter()
            .map(|(p, n)| libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            })
            .collect();
        if iov.is_empty() || iov.len() > MAX_PIECES || iov.iter().any(|v| v.iov_len == 0) {
            return None;
        }
        let len = iov.iter().map(|v| v.iov_len).sum();
        Some(ForeignBufs {
            iov,
            at: 0,
            len,
            keep: Some(keep),
        })
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true for a value [`new`](Self::new) made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The owner that keeps the memory valid (drop it to release the pieces).
    pub fn into_keep(mut self) -> Box<dyn Any + Send> {
        self.keep.take().expect("kept until consumed")
    }

    /// The pieces not filled yet.
    pub(super) fn remaining(&self) -> &[libc::iovec] {
        &self.iov[self.at..]
    }

    /// Does every remaining piece start at a multiple of `mem` and have a
    /// length that is a multiple of `len_align` (what O_DIRECT needs)?
    pub(super) fn aligned(&self, mem: usize, len_align: usize) -> bool {
        self.remaining().iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(mem.max(1))
                && v.iov_len.is_multiple_of(len_align.max(1))
        })
    }

    /// `n` more bytes were filled: skip them.
    pub(super) fn advance(&mut self, mut n: usize) {
        while n > 0 && self.at < self.iov.len() {
            let v = &mut self.iov[self.at];
            let k = n.min(v.iov_len);
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(k).cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len == 0 {
                self.at += 1;
            }
        }
    }

    /// Zero every piece not filled yet (end of file: the rest reads as zeros).
    pub(super) fn zero_rest(&mut self) {
        static ZEROS: [u8; 4096] = [0; 4096];
        for v in &self.iov[self.at..] {
            let mut p = v.iov_base.cast::<u8>();
            let mut left = v.iov_len;
            while left > 0 {
                let k = left.min(ZEROS.len());
                // SAFETY: `new`'s contract makes the piece valid for writes
                // while `keep` lives (it lives in self); volatile stores, as
                // for any page another domain may touch concurrently.
                unsafe {
                    crate::platform::volatile_write(&ZEROS[..k], p);
                    p = p.add(k);
                }
                left -= k;
            }
        }
        self.at = self.iov.len();
    }

    /// Forget the owner without dropping it: the memory stays valid forever
    /// (the engine is going away while the kernel may still write it).
    pub(super) fn leak(mut self) {
        if let Some(k) = self.keep.take() {
            std::mem::forget(k);
        }
    }
}

impl std::fmt::Debug for ForeignBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignBufs")
            .field("pieces", &self.iov.len())
            .field("len", &self.len)
            .field("filled_pieces", &self.at)
            .finish_non_exhaustive()
    }
}
