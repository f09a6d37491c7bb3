//! The registered-buffer slab: one page-aligned anonymous mapping, registered with the
//! ring as fixed buffer 0, carved into disjoint page-granular regions.
//!
//! This file is the engine's single place with `unsafe` for buffer memory (mmap/munmap
//! and turning the mapping into byte slices). The soundness argument:
//!
//! * A [`BufRegion`] is created only by [`Slab::alloc`], is neither `Clone` nor `Copy`,
//!   and names a page range no other live region overlaps (the bitmap guarantees it).
//! * While an operation using a region is in flight, the engine holds the region (it is
//!   moved into the `Op`), so the caller cannot form a slice over memory the kernel is
//!   writing. The engine hands the region back with the completion.
//! * `buf`/`buf_mut` borrow the slab (`&self`/`&mut self`), so slices cannot outlive the
//!   mapping and at most one mutable slice exists at a time.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Page size used for region granularity and alignment (x86_64 base pages).
pub const PAGE_SIZE: usize = 4096;

/// Largest slab we register: the kernel caps one registered buffer at 1 GiB.
pub const MAX_SLAB_BYTES: usize = 1 << 30;

static NEXT_SLAB_ID: AtomicU32 = AtomicU32::new(1);

/// A page-aligned region of an engine's registered-buffer slab, owned by the caller
/// between [`crate::engine::Engine::alloc`] and [`crate::engine::Engine::free`], and by
/// the engine while an operation on it is in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct BufRegion {
    slab_id: u32,
    index: u16,
    offset: usize,
    len: usize,
}

impl BufRegion {
    /// Index of the registered buffer this region lives in (the slab is buffer 0).
    pub fn index(&self) -> u16 {
        self.index
    }
    /// Byte offset of the region inside the registered buffer (a multiple of the page size).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes the caller asked for (the allocation is rounded up to whole pages).
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a zero-length region (never handed out by `alloc`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn pages(&self) -> usize {
        self.len.div_ceil(PAGE_SIZE)
    }
}

/// The mapping plus a page bitmap (bit set = page free).
pub(crate) struct Slab {
    id: u32,
    ptr: NonNull<u8>,
    bytes: usize,
    pages: usize,
    free_bits: Vec<u64>,
    free_pages: usize,
    /// Regions freed so far (callers waiting for space watch it change).
    frees: u64,
}

// SAFETY: the slab is plain anonymous memory owned by this struct; moving it to another
// thread moves that ownership. Access goes through &self/&mut self borrows.
unsafe impl Send for Slab {}

impl Slab {
    /// Map `bytes` (rounded up to whole pages, at least one page) of anonymous memory.
    pub(crate) fn new(bytes: usize) -> io::Result<Slab> {
        let bytes = bytes.max(PAGE_SIZE).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        if bytes > MAX_SLAB_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer slab of {bytes} bytes exceeds the 1 GiB registered-buffer limit"),
            ));
        }
        let len = NonZeroUsize::new(bytes).expect("bytes >= PAGE_SIZE");
        // SAFETY: a fresh private anonymous mapping aliases nothing; we own it until Drop.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_POPULATE,
            )
        }
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mmap of a {bytes}-byte I/O buffer slab: {e}"),
            )
        })?;
        let pages = bytes / PAGE_SIZE;
        let mut free_bits = vec![0u64; pages.div_ceil(64)];
        for p in 0..pages {
            free_bits[p / 64] |= 1 << (p % 64);
        }
        Ok(Slab {
            id: NEXT_SLAB_ID.fetch_add(1, Ordering::Relaxed),
            ptr: ptr.cast(),
            bytes,
            pages,
            free_bits,
            free_pages: pages,
            frees: 0,
        })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.bytes,
        }
    }

    /// Register the whole slab as fixed buffer 0 of `ring` (IORING_REGISTER_BUFFERS).
    pub(crate) fn register(&self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        let iov = [self.iovec()];
        // SAFETY: the iovec covers exactly our live mapping. The engine drops the ring
        // (ending the registration) before the slab, so the kernel never holds a
        // registration for unmapped memory.
        unsafe { submitter.register_buffers(&iov) }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn free_bytes(&self) -> usize {
        self.free_pages * PAGE_SIZE
    }

    fn is_free(&self, p: usize) -> bool {
        self.free_bits[p / 64] & (1 << (p % 64)) != 0
    }

    fn set_range(&mut self, first: usize, n: usize, free: bool) {
        for p in first..first + n {
            if free {
                self.free_bits[p / 64] |= 1 << (p % 64);
            } else {
                self.free_bits[p / 64] &= !(1 << (p % 64));
            }
        }
    }

    /// First-fit allocation of `ceil(len / PAGE_SIZE)` contiguous pages. `None` when
    /// `len` is 0 or no free run is long enough (the caller applies backpressure).
    pub(crate) fn alloc(&mut self, len: usize) -> Option<BufRegion> {
        if len == 0 {
            return None;
        }
        let need = len.div_ceil(PAGE_SIZE);
        if need > self.free_pages {
            return None;
        }
        let mut p = 0;
        while p + need <= self.pages {
            // Skip fully used words quickly.
            if p % 64 == 0 && self.free_bits[p / 64] == 0 {
                p += 64;
                continue;
            }
            if !self.is_free(p) {
                p += 1;
                continue;
            }
            let mut run = 1;
            while run < need && self.is_free(p + run) {
                run += 1;
            }
            if run == need {
                self.set_range(p, need, false);
                self.free_pages -= need;
                return Some(BufRegion {
                    slab_id: self.id,
                    index: 0,
                    offset: p * PAGE_SIZE,
                    len,
                });
            }
            p += run + 1;
        }
        None
    }

    fn check(&self, r: &BufRegion) {
        assert!(
            r.slab_id == self.id && r.offset + r.pages() * PAGE_SIZE <= self.bytes,
            "BufRegion {r:?} does not belong to this engine's slab"
        );
    }

    /// Return a region's pages to the free pool.
    pub(crate) fn free(&mut self, r: BufRegion) {
        self.check(&r);
        let first = r.offset / PAGE_SIZE;
        let n = r.pages();
        debug_assert!((first..first + n).all(|p| !self.is_free(p)));
        self.set_range(first, n, true);
        self.free_pages += n;
        self.frees += 1;
    }

    pub(crate) fn frees(&self) -> u64 {
        self.frees
    }

    /// Raw pointer to byte `at` of region `r`, for building SQEs. `at <= r.len()`.
    pub(crate) fn ptr_at(&self, r: &BufRegion, at: usize) -> *mut u8 {
        self.check(r);
        assert!(at <= r.len);
        self.ptr.as_ptr().wrapping_add(r.offset + at)
    }

    /// The region's bytes.
    pub(crate) fn buf(&self, r: &BufRegion) -> &[u8] {
        self.check(r);
        // SAFETY: `check` proved the range lies inside our live mapping; regions are
        // disjoint and the caller holds `r`, so no in-flight kernel I/O targets it (the
        // engine owns regions of in-flight ops). The borrow of `self` keeps the mapping alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(r.offset), r.len) }
    }

    /// The region's bytes, mutably.
    pub(crate) fn buf_mut(&mut self, r: &BufRegion) -> &mut [u8] {
        self.check(r);
        // SAFETY: as in `buf`; `&mut self` ensures no other slice of the slab is live.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(r.offset), r.len) }
    }
}

impl Slab {
    /// Several regions' bytes, mutably, at once (to fill them with one grant copy).
    /// Panics if a region is foreign or named twice (a caller bug).
    pub(crate) fn bufs_mut(&mut self, rs: &[&BufRegion]) -> Vec<&mut [u8]> {
        let mut spans: Vec<(usize, usize)> = rs
            .iter()
            .map(|r| {
                self.check(r);
                (r.offset, r.pages() * PAGE_SIZE)
            })
            .collect();
        spans.sort_unstable();
        assert!(
            spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "overlapping buffer regions"
        );
        rs.iter()
            // SAFETY: as in `buf_mut`, and the ranges were just shown to be pairwise
            // disjoint, so the returned slices never alias; `&mut self` keeps every
            // other slice of the slab dead while they live.
            .map(|r| unsafe {
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(r.offset), r.len)
            })
            .collect()
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly the mapping made in `new`; no slices outlive `self`.
        // The engine drops its ring (which releases the kernel's registration and pins)
        // before the slab.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.bytes) } {
            log::warn!("munmap of the I/O buffer slab failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_disjoint_page_granular_and_exhausts() {
        let mut s = Slab::new(16 * PAGE_SIZE).unwrap();
        let a = s.alloc(1).unwrap();
        let b = s.alloc(PAGE_SIZE + 1).unwrap();
        assert_eq!(a.offset() % PAGE_SIZE, 0);
        assert_eq!(b.offset(), PAGE_SIZE);
        assert_eq!(b.len(), PAGE_SIZE + 1);
        s.buf_mut(&a).fill(0xaa);
        s.buf_mut(&b).fill(0xbb);
        assert!(s.buf(&a).iter().all(|&x| x == 0xaa));
        assert!(s.buf(&b).iter().all(|&x| x == 0xbb));
        assert_eq!(s.free_bytes(), 13 * PAGE_SIZE);
        let c = s.alloc(13 * PAGE_SIZE).unwrap();
        assert!(s.alloc(1).is_none());
        s.free(b);
        // A 3-page request does not fit the 2-page hole; a 2-page one does.
        assert!(s.alloc(3 * PAGE_SIZE).is_none());
        let d = s.alloc(2 * PAGE_SIZE).unwrap();
        assert_eq!(d.offset(), PAGE_SIZE);
        s.free(a);
        s.free(c);
        s.free(d);
        assert_eq!(s.free_bytes(), 16 * PAGE_SIZE);
        assert!(s.alloc(0).is_none());
        assert_eq!(s.alloc(16 * PAGE_SIZE).unwrap().offset(), 0);
    }

    #[test]
    fn fragmented_run_search_spans_words() {
        let mut s = Slab::new(200 * PAGE_SIZE).unwrap();
        let regions: Vec<_> = (0..200).map(|_| s.alloc(PAGE_SIZE).unwrap()).collect();
        // Free every page from 60..140 except 100: longest run is 40 pages.
        // Regions not freed here stay allocated (dropping a BufRegion does not free it).
        for r in regions {
            let p = r.offset() / PAGE_SIZE;
            if (60..140).contains(&p) && p != 100 {
                s.free(r);
            }
        }
        assert!(s.alloc(41 * PAGE_SIZE).is_none());
        let r = s.alloc(40 * PAGE_SIZE).unwrap();
        assert_eq!(r.offset(), 60 * PAGE_SIZE);
        let r2 = s.alloc(39 * PAGE_SIZE).unwrap();
        assert_eq!(r2.offset(), 101 * PAGE_SIZE);
    }

    #[test]
    #[should_panic(expected = "does not belong")]
    fn foreign_region_is_refused() {
        let mut s1 = Slab::new(PAGE_SIZE).unwrap();
        let s2 = Slab::new(PAGE_SIZE).unwrap();
        let r = s1.alloc(10).unwrap();
        let _ = s2.buf(&r);
    }
}
