//! The simulator's one small unsafe place for memory: mapping the shared files
//! that hold guest memory and grant tables, atomics inside them, copies in and
//! out, and contiguous mappings of scattered guest frames (what gntdev does for
//! the real backend).
//!
//! The memory behind these mappings is shared with another process (the guest or
//! the backend) that may write it at any time, exactly like granted pages under
//! real Xen. We therefore never create Rust references to it: only raw-pointer
//! copies and atomics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use refblk_core::platform::PAGE_SIZE;

/// A whole file mapped `MAP_SHARED`.
pub(crate) struct Shm {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: Shm only hands out raw pointers, atomics and copies; the mapping stays
// valid until drop, whichever thread drops it.
unsafe impl Send for Shm {}
// SAFETY: all accesses through &Shm are atomics or raw copies (see module docs).
unsafe impl Sync for Shm {}

impl Shm {
    /// Map `len` bytes of `file` (which must be at least that long).
    pub(crate) fn map(file: &File, len: usize, writable: bool) -> io::Result<Shm> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file we hold
        // open; it aliases nothing in our address space.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Shm { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The atomic `u64` at byte offset `off` (8-aligned, in range).
    pub(crate) fn atomic_u64(&self, off: usize) -> Option<&AtomicU64> {
        if !off.is_multiple_of(8) || off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in range and aligned (the mapping is page aligned); the memory is
        // only ever accessed atomically at this offset by every party, and lives as
        // long as &self.
        Some(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    /// The atomic `u32` at byte offset `off` (4-aligned, in range).
    pub(crate) fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: as for atomic_u64.
        Some(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) })
    }

    /// Raw pointer to `len` bytes at `off`, if in range.
    pub(crate) fn ptr_at(&self, off: usize, len: usize) -> Option<*mut u8> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in range of the mapping.
        Some(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// Copy out of the mapping. False if out of range.
    pub(crate) fn copy_out(&self, off: usize, dst: &mut [u8]) -> bool {
        let Some(src) = self.ptr_at(off, dst.len()) else {
            return false;
        };
        // SAFETY: src is in range; dst is a distinct local buffer (it cannot point
        // into this mapping through a &mut since we never hand out references).
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copy into the mapping (must be writable). False if out of range.
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) -> bool {
        let Some(dst) = self.ptr_at(off, src.len()) else {
            return false;
        };
        // SAFETY: dst is in range of a writable mapping; src is a local buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// Fill bytes of the mapping (must be writable). False if out of range.
    pub(crate) fn fill(&self, off: usize, len: usize, byte: u8) -> bool {
        let Some(dst) = self.ptr_at(off, len) else {
            return false;
        };
        // SAFETY: dst is in range of a writable mapping.
        unsafe { std::ptr::write_bytes(dst, byte, len) };
        true
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped; no references into it exist.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Scattered pages of a file mapped contiguously, in the given order.
pub(crate) struct FrameMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: as for Shm, only raw pointers are handed out.
unsafe impl Send for FrameMap {}

impl FrameMap {
    /// Reserve `frames.len()` pages, then map page `frames[i]` of `file` at slot `i`.
    pub(crate) fn map_frames(file: &File, frames: &[u32], writable: bool) -> io::Result<FrameMap> {
        let len = frames
            .len()
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad frame count"))?;
        // SAFETY: a fresh inaccessible reservation chosen by the kernel.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        // From here on, Drop unmaps the whole reservation whatever happens.
        let map = FrameMap { ptr, len };
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        for (i, &frame) in frames.iter().enumerate() {
            let off = libc::off_t::try_from(frame as usize * PAGE_SIZE)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame out of range"))?;
            // SAFETY: the target range lies inside our own reservation (i < count),
            // which nothing else uses; MAP_FIXED replaces just that page.
            let p = unsafe {
                libc::mmap(
                    ptr.as_ptr().add(i * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(map)
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for FrameMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly our reservation (and the pages mapped into it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
