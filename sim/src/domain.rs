//! One simulated domain's shared files: `DIR/dom/<domid>/mem` (guest memory,
//! `nr_pages` pages) and `DIR/dom/<domid>/gnttab` (a 4096-byte header, then one
//! 8-byte `grant_entry_v1` per grant reference). Used by the guest (which creates
//! and writes them) and the backend (which reads the grant table and copies or
//! maps guest memory).
//!
//! Each grant entry is read and written as ONE atomic `u64`
//! (`flags | domid << 16 | frame << 32`, the little-endian `grant_entry_v1`
//! layout), so the backend always sees a consistent entry. Whether the backend
//! has an entry mapped is tracked with Linux open-file-description (OFD) read
//! locks on the entry's 8 bytes of the `gnttab` file: the kernel drops them when
//! the backend unmaps, closes the file or dies, like Xen drops a dead domain's
//! maps. The guest ends access only if it can take a write lock on the entry.
//!
//! Those locks cost two `fcntl` calls per `end_access`, on every grant of every
//! request, although only rings and persistent grants are ever mapped. A third
//! file, `DIR/dom/<domid>/mapstate` (one atomic `u32` per entry), lets the guest
//! skip them for entries no backend ever tried to map: the backend sets
//! [`MAP_HINT`] (sticky) before its first lock attempt on an entry; the guest sets
//! [`MAP_CLOSING`] for the duration of an `end_access`. Both are read-modify-writes
//! of the same word, so one of them comes first: if the guest's did, it saw no
//! hint and ends the grant without locks while the backend waits for `MAP_CLOSING`
//! to clear (then sees the entry ended, as if it had waited for the write lock);
//! if the backend's did, the guest takes the OFD write lock as before. The hint is
//! only ever set, so a backend that dies leaves the guest on the locked (exact)
//! path for that entry; a guest that leaves `MAP_CLOSING` set gets maps of that
//! entry refused after the same ~50 ms as a guest that keeps the write lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use xen_sys::gntdev::{GTF_permit_access, GTF_readonly, GTF_type_mask};

use super::shm::Shm;
use refblk_core::platform::{DomId, GrantRef, GrantStatus, PAGE_SIZE};

/// `"RBSIMGT1"`: identifies a simulator grant table file.
pub const GNTTAB_MAGIC: u64 = u64::from_le_bytes(*b"RBSIMGT1");
/// Size of the grant table header; entries start here.
pub const GNTTAB_HEADER: usize = 4096;
/// Header: magic (u64).
pub const HDR_MAGIC: usize = 0;
/// Header: domid (u32).
pub const HDR_DOMID: usize = 8;
/// Header: number of guest memory pages (u32).
pub const HDR_NR_PAGES: usize = 12;
/// Header: number of grant entries (u32).
pub const HDR_NR_ENTRIES: usize = 16;
/// Header: 1 while the domain lives, 0 once it is destroyed (u32).
pub const HDR_ALIVE: usize = 20;
/// Size of one grant entry.
pub const ENTRY_SIZE: usize = 8;
/// Size of one `mapstate` word.
pub const MAPSTATE_SIZE: usize = 4;
/// `mapstate` bit: a backend has tried to map this entry at least once (set by the
/// backend before its first lock attempt, never cleared).
pub const MAP_HINT: u32 = 1;
/// `mapstate` bit: the guest is ending access to this entry right now.
pub const MAP_CLOSING: u32 = 2;

/// `DIR/dom/<domid>`.
pub fn domain_dir(dir: &Path, domid: DomId) -> PathBuf {
    dir.join("dom").join(domid.to_string())
}

/// Pack a `grant_entry_v1` into the atomic word.
pub fn pack_entry(flags: u16, domid: DomId, frame: u32) -> u64 {
    u64::from(flags) | u64::from(domid) << 16 | u64::from(frame) << 32
}

/// Unpack the atomic word into (flags, domid, frame).
pub fn unpack_entry(v: u64) -> (u16, DomId, u32) {
    (v as u16, (v >> 16) as u16, (v >> 32) as u32)
}

/// A domain's mapped files.
pub(crate) struct DomainShm {
    pub domid: DomId,
    pub nr_pages: u32,
    pub nr_entries: u32,
    pub mem_file: File,
    pub gnttab_file: File,
    pub mem: Shm,
    pub gnttab: Shm,
    /// `mapstate`: one atomic u32 per entry (see the module docs), read-write for both.
    pub mapstate: Shm,
}

fn ctx(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

impl DomainShm {
    /// Create the files of a new domain in `ddir` (a fresh directory).
    pub fn create(
        ddir: &Path,
        domid: DomId,
        nr_pages: u32,
        nr_entries: u32,
    ) -> io::Result<DomainShm> {
        let mem_path = ddir.join("mem");
        let gt_path = ddir.join("gnttab");
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| ctx(p, "create", e))
        };
        let mem_file = open(&mem_path)?;
        mem_file
            .set_len(nr_pages as u64 * PAGE_SIZE as u64)
            .map_err(|e| ctx(&mem_path, "set size", e))?;
        let gnttab_file = open(&gt_path)?;
        let gt_len = GNTTAB_HEADER + nr_entries as usize * ENTRY_SIZE;
        gnttab_file
            .set_len(gt_len as u64)
            .map_err(|e| ctx(&gt_path, "set size", e))?;
        let mem = Shm::map(&mem_file, nr_pages as usize * PAGE_SIZE, true)
            .map_err(|e| ctx(&mem_path, "mmap", e))?;
        let gnttab = Shm::map(&gnttab_file, gt_len, true).map_err(|e| ctx(&gt_path, "mmap", e))?;
        let ms_path = ddir.join("mapstate");
        let ms_file = open(&ms_path)?;
        let ms_len = nr_entries as usize * MAPSTATE_SIZE;
        ms_file
            .set_len(ms_len as u64)
            .map_err(|e| ctx(&ms_path, "set size", e))?;
        let mapstate = Shm::map(&ms_file, ms_len, true).map_err(|e| ctx(&ms_path, "mmap", e))?;
        let d = DomainShm {
            domid,
            nr_pages,
            nr_entries,
            mem_file,
            gnttab_file,
            mem,
            gnttab,
            mapstate,
        };
        d.hdr32(HDR_DOMID)
            .store(u32::from(domid), Ordering::Relaxed);
        d.hdr32(HDR_NR_PAGES).store(nr_pages, Ordering::Relaxed);
        d.hdr32(HDR_NR_ENTRIES).store(nr_entries, Ordering::Relaxed);
        d.hdr32(HDR_ALIVE).store(1, Ordering::Relaxed);
        d.gnttab
            .atomic_u64(HDR_MAGIC)
            .expect("header in range")
            .store(GNTTAB_MAGIC, Ordering::Release);
        Ok(d)
    }

    /// Open an existing domain's files (backend side: memory read-write, grant
    /// table read-only). `Ok(None)` if the domain does not exist.
    pub fn open(dir: &Path, domid: DomId) -> io::Result<Option<DomainShm>> {
        let ddir = domain_dir(dir, domid);
        let gt_path = ddir.join("gnttab");
        let mem_path = ddir.join("mem");
        let ms_path = ddir.join("mapstate");
        let gnttab_file = match File::open(&gt_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ctx(&gt_path, "open", e)),
        };
        let mem_file = match OpenOptions::new().read(true).write(true).open(&mem_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ctx(&mem_path, "open", e)),
        };
        let ms_file = match OpenOptions::new().read(true).write(true).open(&ms_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ctx(&ms_path, "open", e)),
        };
        let gt_len = gnttab_file
            .metadata()
            .map_err(|e| ctx(&gt_path, "stat", e))?
            .len();
        let mem_len = mem_file
            .metadata()
            .map_err(|e| ctx(&mem_path, "stat", e))?
            .len();
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", gt_path.display()),
            )
        };
        if gt_len < GNTTAB_HEADER as u64 {
            return Err(bad(format!("too short ({gt_len} bytes)")));
        }
        let gnttab =
            Shm::map(&gnttab_file, GNTTAB_HEADER, false).map_err(|e| ctx(&gt_path, "mmap", e))?;
        let rd = |off| {
            gnttab
                .atomic_u32(off)
                .expect("header in range")
                .load(Ordering::Acquire)
        };
        let magic = gnttab
            .atomic_u64(HDR_MAGIC)
            .expect("header in range")
            .load(Ordering::Acquire);
        if magic != GNTTAB_MAGIC {
            return Err(bad("not a simulator grant table (bad magic)".into()));
        }
        let (hdr_dom, nr_pages, nr_entries) = (rd(HDR_DOMID), rd(HDR_NR_PAGES), rd(HDR_NR_ENTRIES));
        if hdr_dom != u32::from(domid) {
            return Err(bad(format!("header says domain {hdr_dom}")));
        }
        let want_gt = GNTTAB_HEADER as u64 + u64::from(nr_entries) * ENTRY_SIZE as u64;
        let want_mem = u64::from(nr_pages) * PAGE_SIZE as u64;
        if gt_len != want_gt || mem_len != want_mem || nr_pages == 0 {
            return Err(bad(format!(
                "sizes disagree with header: gnttab {gt_len} (want {want_gt}), mem {mem_len} (want {want_mem})"
            )));
        }
        drop(gnttab);
        let gnttab = Shm::map(&gnttab_file, want_gt as usize, false)
            .map_err(|e| ctx(&gt_path, "mmap", e))?;
        let mem =
            Shm::map(&mem_file, want_mem as usize, true).map_err(|e| ctx(&mem_path, "mmap", e))?;
        let want_ms = u64::from(nr_entries) * MAPSTATE_SIZE as u64;
        let ms_len = ms_file
            .metadata()
            .map_err(|e| ctx(&ms_path, "stat", e))?
            .len();
        if ms_len != want_ms {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: size {ms_len} disagrees with the grant table ({want_ms})",
                    ms_path.display()
                ),
            ));
        }
        let mapstate =
            Shm::map(&ms_file, want_ms as usize, true).map_err(|e| ctx(&ms_path, "mmap", e))?;
        Ok(Some(DomainShm {
            domid,
            nr_pages,
            nr_entries,
            mem_file,
            gnttab_file,
            mem,
            gnttab,
            mapstate,
        }))
    }

    fn hdr32(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        self.gnttab.atomic_u32(off).expect("header in range")
    }

    /// Whether the domain still lives.
    pub fn alive(&self) -> bool {
        self.hdr32(HDR_ALIVE).load(Ordering::Acquire) == 1
    }

    /// Mark the domain dead (guest side, before removing the files).
    pub fn kill(&self) {
        self.hdr32(HDR_ALIVE).store(0, Ordering::Release);
    }

    fn entry_word(&self, gref: GrantRef) -> Option<&std::sync::atomic::AtomicU64> {
        if gref >= self.nr_entries {
            return None;
        }
        self.gnttab
            .atomic_u64(GNTTAB_HEADER + gref as usize * ENTRY_SIZE)
    }

    fn state_word(&self, gref: GrantRef) -> Option<&std::sync::atomic::AtomicU32> {
        if gref >= self.nr_entries {
            return None;
        }
        self.mapstate.atomic_u32(gref as usize * MAPSTATE_SIZE)
    }

    /// Read an entry: (flags, domid, frame), or None if out of range.
    pub fn entry(&self, gref: GrantRef) -> Option<(u16, DomId, u32)> {
        self.entry_word(gref)
            .map(|w| unpack_entry(w.load(Ordering::Acquire)))
    }

    /// Write an entry (guest side). False if out of range.
    pub fn set_entry(&self, gref: GrantRef, flags: u16, domid: DomId, frame: u32) -> bool {
        match self.entry_word(gref) {
            Some(w) => {
                w.store(pack_entry(flags, domid, frame), Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// The checks Xen does when `me` uses `gref` (for writing if `write`).
    /// Returns the guest frame on success.
    pub fn check_grant(&self, me: DomId, gref: GrantRef, write: bool) -> Result<u32, GrantStatus> {
        let (flags, domid, frame) = self.entry(gref).ok_or(GrantStatus::BadGntref)?;
        if flags & GTF_type_mask != GTF_permit_access {
            return Err(GrantStatus::BadGntref);
        }
        if domid != me {
            return Err(GrantStatus::PermissionDenied);
        }
        if write && flags & GTF_readonly != 0 {
            return Err(GrantStatus::PermissionDenied);
        }
        if frame >= self.nr_pages {
            return Err(GrantStatus::GeneralError);
        }
        Ok(frame)
    }

    /// Try to set (or release) an OFD lock on `gref`'s entry without waiting.
    /// Ok(false) if another open file holds a conflicting lock.
    fn entry_lock(&self, gref: GrantRef, ty: libc::c_short) -> io::Result<bool> {
        let fl = libc::flock {
            l_type: ty,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: (GNTTAB_HEADER + gref as usize * ENTRY_SIZE) as libc::off_t,
            l_len: ENTRY_SIZE as libc::off_t,
            l_pid: 0,
        };
        loop {
            match fcntl(self.gnttab_file.as_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) | Err(Errno::EACCES) => return Ok(false),
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }

    /// Backend: mark `gref` mapped (shared lock; waits out a concurrent end_access).
    ///
    /// Never waits long: a guest holds the write lock only for the instant of an
    /// end_access, and a hostile guest process that holds it forever must not
    /// hang the backend (Xen never lets a guest block a map), so after ~50 ms the
    /// map fails with `WouldBlock`.
    pub fn lock_mapped(&self, gref: GrantRef) -> io::Result<()> {
        // Announce the map before looking at the guest's closing bit (module docs).
        let state = self.state_word(gref);
        let mut closing =
            state.is_some_and(|w| w.fetch_or(MAP_HINT, Ordering::SeqCst) & MAP_CLOSING != 0);
        for attempt in 0..1000u32 {
            if closing {
                closing = state.is_some_and(|w| w.load(Ordering::Acquire) & MAP_CLOSING != 0);
            }
            if !closing && self.entry_lock(gref, libc::F_RDLCK as libc::c_short)? {
                return Ok(());
            }
            if attempt < 10 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "grant ref {gref} of domain {} is locked by the guest",
                self.domid
            ),
        ))
    }

    /// Backend: mark `gref` no longer mapped by this process.
    pub fn unlock_mapped(&self, gref: GrantRef) -> io::Result<()> {
        self.entry_lock(gref, libc::F_UNLCK as libc::c_short)
            .map(|_| ())
    }

    /// Guest: run `f` while no backend maps `gref`. Returns None if it is mapped.
    /// Takes the entry's write lock only if a backend ever tried to map it.
    pub fn with_unmapped<T>(&self, gref: GrantRef, f: impl FnOnce() -> T) -> io::Result<Option<T>> {
        let Some(state) = self.state_word(gref) else {
            return self.with_write_lock(gref, f);
        };
        // Callers serialize end_access per domain, so nobody else sets CLOSING here.
        let r = if state.fetch_or(MAP_CLOSING, Ordering::SeqCst) & MAP_HINT == 0 {
            // No backend has announced a map: any that does from now on waits for
            // CLOSING to clear and then sees what `f` did.
            Ok(Some(f()))
        } else {
            self.with_write_lock(gref, f)
        };
        state.fetch_and(!MAP_CLOSING, Ordering::SeqCst);
        r
    }

    fn with_write_lock<T>(&self, gref: GrantRef, f: impl FnOnce() -> T) -> io::Result<Option<T>> {
        if !self.entry_lock(gref, libc::F_WRLCK as libc::c_short)? {
            return Ok(None);
        }
        let r = f();
        self.entry_lock(gref, libc::F_UNLCK as libc::c_short)?;
        Ok(Some(r))
    }
}
