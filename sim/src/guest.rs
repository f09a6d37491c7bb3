//! The guest side of the simulated Xen: a domain's memory, its grant table and
//! its event channels. Used by test frontends and benchmarks. It does not touch
//! xenstore (the frontend does that itself).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use xen_sys::gntdev::{GTF_permit_access, GTF_readonly, GNTTAB_NR_RESERVED_ENTRIES};

use super::domain::{domain_dir, DomainShm};
use super::evtchn::{self, SimEventChannel};
use refblk_core::platform::{DomId, EventChannel, ForeignMapping, GrantRef, PAGE_SIZE};

/// Default number of grant entries of a new domain (Linux guests default to
/// 32 grant frames = 16384 v1 entries).
pub const DEFAULT_GRANT_ENTRIES: u32 = 16384;

struct Alloc {
    used_pages: Vec<bool>,
    free_refs: Vec<GrantRef>,
    used_refs: Vec<bool>,
}

/// A simulated guest domain (see the module docs). Destroyed when dropped.
pub struct SimGuest {
    dir: PathBuf,
    domid: DomId,
    shm: Arc<DomainShm>,
    alloc: Mutex<Alloc>,
    destroyed: bool,
}

fn inval(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl SimGuest {
    /// Create domain `domid` with `nr_pages` pages of memory in the simulated
    /// machine `dir` (files under `dir/dom/<domid>/`).
    pub fn create(dir: &Path, domid: DomId, nr_pages: u32) -> io::Result<SimGuest> {
        Self::create_with_grants(dir, domid, nr_pages, DEFAULT_GRANT_ENTRIES)
    }

    /// Like [`SimGuest::create`] with a chosen grant table size.
    pub fn create_with_grants(
        dir: &Path,
        domid: DomId,
        nr_pages: u32,
        nr_grants: u32,
    ) -> io::Result<SimGuest> {
        if nr_pages == 0 || nr_pages > (1 << 22) {
            return Err(inval(format!("domain {domid}: bad page count {nr_pages}")));
        }
        if nr_grants <= GNTTAB_NR_RESERVED_ENTRIES || nr_grants > (1 << 20) {
            return Err(inval(format!(
                "domain {domid}: bad grant table size {nr_grants}"
            )));
        }
        let doms = dir.join("dom");
        fs::create_dir_all(&doms)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", doms.display())))?;
        let final_dir = domain_dir(dir, domid);
        if final_dir.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: domain {domid} already exists", final_dir.display()),
            ));
        }
        // Build in a private directory and rename into place, so the backend never
        // sees a half-made domain.
        let tmp = doms.join(format!(".new-{domid}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
        let shm = match DomainShm::create(&tmp, domid, nr_pages, nr_grants) {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &final_dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{}: domain {domid} could not be created: {e}",
                    final_dir.display()
                ),
            ));
        }
        log::debug!(
            "sim: created domain {domid} ({nr_pages} pages) in {}",
            final_dir.display()
        );
        Ok(SimGuest {
            dir: dir.to_path_buf(),
            domid,
            alloc: Mutex::new(Alloc {
                used_pages: vec![false; nr_pages as usize],
                free_refs: (GNTTAB_NR_RESERVED_ENTRIES..nr_grants).rev().collect(),
                used_refs: vec![false; nr_grants as usize],
            }),
            shm: Arc::new(shm),
            destroyed: false,
        })
    }

    /// Our domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Number of memory pages.
    pub fn nr_pages(&self) -> u32 {
        self.shm.nr_pages
    }

    /// Number of grant table entries.
    pub fn nr_grants(&self) -> u32 {
        self.shm.nr_entries
    }

    /// The simulated machine's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn alloc(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocate one zeroed page; returns its frame number.
    pub fn alloc_page(&self) -> io::Result<u32> {
        self.alloc_pages(1)
    }

    /// Allocate `n` contiguous zeroed pages (e.g. a multi-page ring); returns the
    /// first frame number.
    pub fn alloc_pages(&self, n: u32) -> io::Result<u32> {
        let mut a = self.alloc();
        let n = n as usize;
        if n == 0 {
            return Err(inval("alloc_pages(0)".into()));
        }
        let mut run = 0;
        for i in 0..a.used_pages.len() {
            run = if a.used_pages[i] { 0 } else { run + 1 };
            if run == n {
                let first = i + 1 - n;
                a.used_pages[first..=i].iter_mut().for_each(|u| *u = true);
                self.shm.mem.fill(first * PAGE_SIZE, n * PAGE_SIZE, 0);
                return Ok(first as u32);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("domain {}: no {n} free contiguous pages", self.domid),
        ))
    }

    /// Free one page.
    pub fn free_page(&self, page: u32) -> io::Result<()> {
        self.free_pages(page, 1)
    }

    /// Free `n` pages starting at `first`.
    pub fn free_pages(&self, first: u32, n: u32) -> io::Result<()> {
        let mut a = self.alloc();
        let (f, n) = (first as usize, n as usize);
        let range = a
            .used_pages
            .get_mut(f..f.saturating_add(n))
            .filter(|r| r.iter().all(|u| *u))
            .ok_or_else(|| {
                inval(format!(
                    "domain {}: pages {first}+{n} are not allocated",
                    self.domid
                ))
            })?;
        range.iter_mut().for_each(|u| *u = false);
        Ok(())
    }

    fn page_off(&self, page: u32, offset: usize, len: usize) -> io::Result<usize> {
        let off = (page as usize)
            .checked_mul(PAGE_SIZE)
            .and_then(|p| p.checked_add(offset));
        match off {
            Some(o)
                if o.checked_add(len)
                    .is_some_and(|end| end <= self.shm.mem.len()) =>
            {
                Ok(o)
            }
            _ => Err(inval(format!(
                "domain {}: page {page} offset {offset} len {len} outside memory",
                self.domid
            ))),
        }
    }

    /// Raw pointer to `n` contiguous pages starting at `first` (for shared ring
    /// access by a frontend, which must use atomics/volatile copies: the backend
    /// may write these pages at any time).
    pub fn pages_ptr(&self, first: u32, n: u32) -> io::Result<*mut u8> {
        let off = self.page_off(first, 0, n as usize * PAGE_SIZE)?;
        self.shm
            .mem
            .ptr_at(off, n as usize * PAGE_SIZE)
            .ok_or_else(|| inval("out of range".into()))
    }

    /// `n` contiguous pages starting at `first` as a [`ForeignMapping`] (the
    /// guest's own view, always writable): safe `copy_in`/`copy_out` for a
    /// frontend's shared ring. Stays valid after the domain is destroyed.
    pub fn pages(&self, first: u32, n: u32) -> io::Result<GuestPages> {
        let len = n as usize * PAGE_SIZE;
        let off = self.page_off(first, 0, len)?;
        if n == 0 {
            return Err(inval("pages(_, 0)".into()));
        }
        Ok(GuestPages {
            shm: self.shm.clone(),
            off,
            len,
        })
    }

    /// Copy bytes into a page (may continue into the following pages).
    pub fn write_page(&self, page: u32, offset: usize, data: &[u8]) -> io::Result<()> {
        let off = self.page_off(page, offset, data.len())?;
        self.shm.mem.copy_in(off, data);
        Ok(())
    }

    /// Copy bytes out of a page (may continue into the following pages).
    pub fn read_page(&self, page: u32, offset: usize, out: &mut [u8]) -> io::Result<()> {
        let off = self.page_off(page, offset, out.len())?;
        self.shm.mem.copy_out(off, out);
        Ok(())
    }

    /// Grant `to` access to `page` (read-only if `readonly`).
    pub fn grant(&self, page: u32, to: DomId, readonly: bool) -> io::Result<GrantRef> {
        if page >= self.shm.nr_pages {
            return Err(inval(format!(
                "domain {}: grant of page {page} outside memory",
                self.domid
            )));
        }
        let mut a = self.alloc();
        let gref = a.free_refs.pop().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("domain {}: grant table full", self.domid),
            )
        })?;
        a.used_refs[gref as usize] = true;
        let flags = GTF_permit_access | if readonly { GTF_readonly } else { 0 };
        self.shm.set_entry(gref, flags, to, page);
        Ok(gref)
    }

    /// End access to a grant (`gnttab_end_foreign_access_ref`). Returns
    /// `Ok(false)` and leaves the grant in place if the backend still maps it;
    /// `Ok(true)` when revoked (the ref is free for reuse).
    pub fn end_access(&self, gref: GrantRef) -> io::Result<bool> {
        let mut a = self.alloc();
        if !a.used_refs.get(gref as usize).copied().unwrap_or(false) {
            return Err(inval(format!(
                "domain {}: grant ref {gref} is not in use",
                self.domid
            )));
        }
        let ended = self
            .shm
            .with_unmapped(gref, || self.shm.set_entry(gref, 0, 0, 0))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("domain {}: end access of ref {gref}: {e}", self.domid),
                )
            })?
            .is_some();
        if ended {
            a.used_refs[gref as usize] = false;
            a.free_refs.push(gref);
        }
        Ok(ended)
    }

    /// Hostile-guest helper: write any value into a grant entry (the ref is not
    /// allocated or freed by this).
    pub fn set_grant_entry_raw(
        &self,
        gref: GrantRef,
        flags: u16,
        domid: DomId,
        frame: u32,
    ) -> io::Result<()> {
        if self.shm.set_entry(gref, flags, domid, frame) {
            Ok(())
        } else {
            Err(inval(format!(
                "domain {}: grant ref {gref} out of range",
                self.domid
            )))
        }
    }

    /// Allocate an unbound event channel port that `remote` may bind to. The
    /// returned channel's `local_port()` is what the frontend publishes.
    pub fn alloc_unbound(&self, remote: DomId) -> io::Result<Box<dyn EventChannel>> {
        Ok(Box::new(SimEventChannel::alloc_unbound(
            &self.dir, self.domid, remote,
        )?))
    }

    fn do_destroy(&mut self) -> io::Result<()> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        self.shm.kill();
        let ddir = domain_dir(&self.dir, self.domid);
        let grave =
            self.dir
                .join("dom")
                .join(format!(".dead-{}-{}", self.domid, std::process::id()));
        let _ = fs::remove_dir_all(&grave);
        let res = fs::rename(&ddir, &grave)
            .and_then(|()| fs::remove_dir_all(&grave))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: destroy domain {}: {e}", ddir.display(), self.domid),
                )
            });
        if let Err(e) = evtchn::destroy_domain(&self.dir, self.domid) {
            log::debug!("sim: domain {}: closing event channels: {e}", self.domid);
        }
        log::debug!("sim: destroyed domain {}", self.domid);
        res
    }

    /// The domain disappears: its files are removed, its event channels closed;
    /// the backend then sees `BadDomain` on copies and `domain_exists` false.
    pub fn destroy(mut self) -> io::Result<()> {
        self.do_destroy()
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        if let Err(e) = self.do_destroy() {
            log::warn!("{e}");
        }
    }
}

/// A guest's view of some of its own pages (see [`SimGuest::pages`]).
pub struct GuestPages {
    shm: Arc<DomainShm>,
    off: usize,
    len: usize,
}

// SAFETY: the range was checked against the domain's shared memory at
// creation, and that memory stays mapped while the Arc<DomainShm> lives.
unsafe impl ForeignMapping for GuestPages {
    fn as_ptr(&self) -> *mut u8 {
        self.shm
            .mem
            .ptr_at(self.off, self.len)
            .expect("range checked at creation")
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        true
    }
}
