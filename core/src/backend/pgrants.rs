//! Persistent grants (`feature-persistent`): when both ends agree, the frontend
//! keeps reusing a pool of granted pages and the backend maps each of them once
//! and keeps the mapping, so a request costs a memcpy instead of a grant-copy
//! hypercall — or, for a read, nothing: io_uring reads straight into the
//! mapped pages (zero-copy reads, `request::data`).
//!
//! **The bound.** At most `max` pages are mapped (Linux blkback's
//! `max_persistent_grants`, 1056, by default). A page met when the cache is
//! full is not mapped: it costs one grant copy, as without persistent grants,
//! and a read into it takes the copy path. Room is made only by dropping
//! *stale* pages — not used since the previous purge pass — in a pass that
//! runs at most once per [`PURGE_EVERY`] × `max` page uses. So a guest whose
//! pages in flight outnumber the cache (8 requests of 256 pages are 2048)
//! keeps a stable half of them mapped and copies the rest, instead of
//! evicting and remapping a page on nearly every use, which is what a
//! least-recently-used cache does with a cyclic pool larger than itself
//! (measured on tmpfs: 433–460 IOPS at 1 MiB QD8, against 3727–3761 now and
//! 4089 with grant copies only; docs/benchmarks.md, "Persistent grants
//! beyond the cache"); and when a guest moves on to other pages, the old
//! ones go within two passes. Beyond the first `max`, there is at most one
//! map per [`PURGE_EVERY`] page uses, whatever the guest does.
//!
//! **Pins.** A page a zero-copy read is filling is *pinned* ([`PersistentGrants::pin`]):
//! the read's engine op holds a [`Pin`] (a reference to the mapping) until its
//! completion is reaped. Purge passes skip pinned pages, and dropping the cache
//! (disconnect, a queue that stops or panics, a restart handover) only drops
//! the cache's reference: a mapping is unmapped when its last holder lets go,
//! so never while the kernel may still write into it. When the cache has no
//! room, [`pin`](PersistentGrants::pin) refuses (the read takes the copy
//! path) and a copy to or from a page that is not cached is one grant copy,
//! so a full cache never fails a request and never exceeds its bound.
//!
//! Mappings are always writable, as in Linux blkback: the same persistent page
//! carries write data one time and read data the next.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::platform::{CopySeg, DomId, ForeignMapping, GrantRef, GrantStatus, Platform, PAGE_SIZE};

/// Default bound, as Linux blkback's `max_persistent_grants`.
pub const DEFAULT_MAX_PERSISTENT: usize = 1056;

/// A purge pass is due once the cache has been used this many times its
/// size since the last one (and only when a page finds it full): the pass is
/// O(size), so it costs at most 1/4 of a lookup per use, and a page used at
/// least once every 4 × size uses is never dropped.
pub const PURGE_EVERY: u64 = 4;

/// One mapped guest page, shared by the cache and the reads that pin it.
struct Mapped(Box<dyn ForeignMapping>);

// SAFETY: Sync is needed only so that an `Arc<Mapped>` is Send (a queue, its
// cache and its engine ops move to their worker thread together). A `Mapped`
// is never used from two threads at once: the cache and every engine op
// holding a pin of it belong to one queue on one worker thread; the engine
// never calls the mapping's methods (it only keeps the pin until the
// completion), and the methods themselves are volatile copies through a
// pointer to memory another domain writes concurrently anyway.
unsafe impl Sync for Mapped {}

/// A page kept mapped while a read into it is in flight: the mapping is not
/// unmapped before every pin of it (and the cache) let go. Hand a request's
/// pins to its engine op; they drop with its completion.
pub struct Pin(#[allow(dead_code)] Arc<Mapped>);

/// A bounded cache of persistently mapped guest pages of one queue.
pub struct PersistentGrants {
    platform: Arc<dyn Platform>,
    domid: DomId,
    max: usize,
    /// Page uses so far; each cached page carries the clock of its last use.
    clock: u64,
    maps: HashMap<GrantRef, (Arc<Mapped>, u64)>,
    /// The clock at the last purge pass.
    last_purge: u64,
    /// Maps made and dropped, for stats and tests.
    pub mapped: u64,
    pub evicted: u64,
    /// Copies done with a grant copy because the cache had no room.
    pub grant_copies: u64,
}

impl PersistentGrants {
    /// An empty cache of at most `max` pages.
    pub fn new(platform: Arc<dyn Platform>, domid: DomId, max: usize) -> PersistentGrants {
        PersistentGrants {
            platform,
            domid,
            max: max.max(1),
            clock: 0,
            maps: HashMap::new(),
            last_purge: 0,
            mapped: 0,
            evicted: 0,
            grant_copies: 0,
        }
    }

    /// Pages mapped right now.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Cached pages pinned by reads in flight right now.
    pub fn pinned(&self) -> usize {
        self.maps.values().filter(|(m, _)| is_pinned(m)).count()
    }

    fn map(&mut self, gref: GrantRef) -> Result<Arc<Mapped>, GrantStatus> {
        let m = self
            .platform
            .map_grant_refs(self.domid, &[gref], true)
            .map_err(|e| {
                crate::platform::GrantMapError::status_of(&e).unwrap_or(GrantStatus::GeneralError)
            })?;
        self.mapped += 1;
        Ok(Arc::new(Mapped(m)))
    }

    /// The cached mapping of `gref`, mapped and cached now if there is room;
    /// None (nothing mapped) when the cache is full.
    fn cached(&mut self, gref: GrantRef) -> Result<Option<Arc<Mapped>>, GrantStatus> {
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.maps.get_mut(&gref) {
            e.1 = now;
            return Ok(Some(e.0.clone()));
        }
        if self.maps.len() >= self.max {
            if now - self.last_purge >= PURGE_EVERY * self.max as u64 {
                self.purge();
            }
            if self.maps.len() >= self.max {
                return Ok(None);
            }
        }
        let m = self.map(gref)?;
        self.maps.insert(gref, (m.clone(), now));
        Ok(Some(m))
    }

    /// Drop every page not used since the previous pass and not pinned.
    fn purge(&mut self) {
        let since = self.last_purge;
        let before = self.maps.len();
        self.maps
            .retain(|_, (m, used)| *used > since || is_pinned(m));
        self.evicted += (before - self.maps.len()) as u64;
        self.last_purge = self.clock;
    }

    /// One grant copy (for a page that cannot be cached now).
    fn grant_copy(&mut self, mut seg: CopySeg<'_>) -> Result<(), GrantStatus> {
        self.grant_copies += 1;
        let mut status = [GrantStatus::GeneralError];
        self.platform
            .grant_copy(self.domid, std::slice::from_mut(&mut seg), &mut status)
            .map_err(|_| GrantStatus::GeneralError)?;
        match status[0] {
            GrantStatus::Okay => Ok(()),
            bad => Err(bad),
        }
    }

    /// Pin the writable mapping of `gref` (mapping and caching it if need be)
    /// for a read straight into it: its address and the pin that keeps it
    /// mapped. None if it cannot be mapped or the cache has no room: the read
    /// then takes the copy path.
    pub fn pin(&mut self, gref: GrantRef) -> Option<(*mut u8, Pin)> {
        let m = self.cached(gref).ok()??;
        if !m.0.is_writable() || m.0.len() < PAGE_SIZE {
            return None;
        }
        Some((m.0.as_ptr(), Pin(m)))
    }

    /// Copy `dst.len()` bytes at `offset` of the guest page `gref` into `dst`.
    pub fn copy_from(
        &mut self,
        gref: GrantRef,
        offset: u16,
        dst: &mut [u8],
    ) -> Result<(), GrantStatus> {
        check(offset, dst.len())?;
        match self.cached(gref)? {
            Some(m) => {
                m.0.copy_out(usize::from(offset), dst)
                    .map_err(|_| GrantStatus::BadCopyArg)
            }
            None => self.grant_copy(CopySeg::FromGuest { gref, offset, dst }),
        }
    }

    /// Copy `src` into the guest page `gref` at `offset`.
    pub fn copy_to(&mut self, gref: GrantRef, offset: u16, src: &[u8]) -> Result<(), GrantStatus> {
        check(offset, src.len())?;
        match self.cached(gref)? {
            Some(m) => {
                m.0.copy_in(usize::from(offset), src)
                    .map_err(|_| GrantStatus::PermissionDenied)
            }
            None => self.grant_copy(CopySeg::ToGuest { gref, offset, src }),
        }
    }

    /// Drop every mapping (disconnect). Pinned pages stay mapped until their
    /// reads complete.
    pub fn clear(&mut self) -> io::Result<()> {
        self.maps.clear();
        Ok(())
    }
}

/// Does a read in flight hold this mapping (besides the cache)?
fn is_pinned(m: &Arc<Mapped>) -> bool {
    Arc::strong_count(m) > 1
}

fn check(offset: u16, len: usize) -> Result<(), GrantStatus> {
    if usize::from(offset) + len > PAGE_SIZE {
        Err(GrantStatus::BadCopyArg)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{CopySeg, EventChannel, Port};
    use crate::xenstore::XsClient;
    use std::cell::UnsafeCell;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// Write a page's own number at `at` and read it back: true if it came
    /// back (through a map or a grant copy, whichever the cache chose).
    fn round_trip(pg: &mut PersistentGrants, gref: GrantRef, at: u16) -> bool {
        let mut buf = [0u8; 4];
        pg.copy_to(gref, at, &gref.to_le_bytes()).unwrap();
        pg.copy_from(gref, at, &mut buf).unwrap();
        buf == gref.to_le_bytes()
    }

    /// A platform that models the guest's memory (a page per grant ref, read
    /// and written by maps and grant copies alike) and records, as the
    /// hypervisor would, which grant refs are mapped right now.
    #[derive(Default)]
    struct Counting {
        guest: Mutex<HashMap<GrantRef, Arc<GuestPage>>>,
        live: Arc<Mutex<HashSet<GrantRef>>>,
        peak: Mutex<usize>,
        copies: Mutex<usize>,
    }

    struct GuestPage(UnsafeCell<[u8; PAGE_SIZE]>);

    // SAFETY: the tests use a page from one thread at a time (maps and grant
    // copies of one cache, called in turn).
    unsafe impl Sync for GuestPage {}

    impl Counting {
        fn page(&self, gref: GrantRef) -> Arc<GuestPage> {
            let mut g = self.guest.lock().unwrap();
            g.entry(gref)
                .or_insert_with(|| Arc::new(GuestPage(UnsafeCell::new([0; PAGE_SIZE]))))
                .clone()
        }
    }

    struct Page {
        mem: Arc<GuestPage>,
        gref: GrantRef,
        live: Arc<Mutex<HashSet<GrantRef>>>,
    }

    // SAFETY: the guest page, kept alive by the Arc, reached only through
    // as_ptr() (UnsafeCell).
    unsafe impl ForeignMapping for Page {
        fn as_ptr(&self) -> *mut u8 {
            self.mem.0.get().cast()
        }
        fn len(&self) -> usize {
            PAGE_SIZE
        }
        fn is_writable(&self) -> bool {
            true
        }
    }

    impl Drop for Page {
        fn drop(&mut self) {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.remove(&self.gref);
        }
    }

    impl Platform for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn xenstore(&self) -> io::Result<XsClient> {
            Err(io::Error::other("no xenstore here"))
        }
        fn map_grant_refs(
            &self,
            _domid: DomId,
            refs: &[GrantRef],
            _writable: bool,
        ) -> io::Result<Box<dyn ForeignMapping>> {
            assert_eq!(refs.len(), 1, "persistent grants map one page at a time");
            let mut live = self.live.lock().unwrap();
            assert!(live.insert(refs[0]), "ref {} mapped twice", refs[0]);
            let mut peak = self.peak.lock().unwrap();
            *peak = (*peak).max(live.len());
            Ok(Box::new(Page {
                mem: self.page(refs[0]),
                gref: refs[0],
                live: self.live.clone(),
            }))
        }
        fn grant_copy(
            &self,
            _domid: DomId,
            segs: &mut [CopySeg<'_>],
            status: &mut [GrantStatus],
        ) -> io::Result<()> {
            *self.copies.lock().unwrap() += segs.len();
            for seg in segs.iter_mut() {
                let (gref, offset) = match seg {
                    CopySeg::FromGuest { gref, offset, .. }
                    | CopySeg::ToGuest { gref, offset, .. } => (*gref, usize::from(*offset)),
                };
                let page = self.page(gref);
                // SAFETY: the page is alive (Arc) and used by this thread only;
                // the callers checked offset + len <= PAGE_SIZE.
                let mem = unsafe { &mut *page.0.get() };
                match seg {
                    CopySeg::FromGuest { dst, .. } => {
                        dst.copy_from_slice(&mem[offset..offset + dst.len()])
                    }
                    CopySeg::ToGuest { src, .. } => {
                        mem[offset..offset + src.len()].copy_from_slice(src)
                    }
                }
            }
            status.fill(GrantStatus::Okay);
            Ok(())
        }
        fn bind_interdomain(
            &self,
            _domid: DomId,
            _port: Port,
        ) -> io::Result<Box<dyn EventChannel>> {
            Err(io::Error::other("no event channels here"))
        }
        fn domain_exists(&self, _domid: DomId) -> io::Result<bool> {
            Ok(true)
        }
    }

    /// The cache never holds more than its bound, neither by its own count nor
    /// by the platform's; a page it has no room for is grant-copied, with
    /// the same data; beyond the first `MAX` maps there is at most one map
    /// per `PURGE_EVERY` page uses.
    #[test]
    fn the_cache_is_bounded_and_copies_what_it_has_no_room_for() {
        const MAX: usize = 8;
        let platform = Arc::new(Counting::default());
        let mut pg = PersistentGrants::new(platform.clone(), 7, MAX);
        // 40 distinct pages, each written and read back twice.
        for gref in 0..40 {
            for at in [8, 100] {
                assert!(round_trip(&mut pg, gref, at), "page {gref} lost its data");
            }
            let mapped = platform.live.lock().unwrap().len();
            assert!(
                pg.len() <= MAX && mapped <= MAX,
                "after page {gref}: {} cached, {mapped} mapped; the bound is {MAX}",
                pg.len(),
            );
        }
        let uses = 40 * 4;
        assert_eq!(*platform.peak.lock().unwrap(), MAX, "peak of live maps");
        assert!(
            pg.mapped <= (MAX as u64) + uses / PURGE_EVERY,
            "{} maps for {uses} uses of a cache of {MAX}",
            pg.mapped
        );
        assert!(pg.grant_copies > 0, "nothing was grant-copied");
        assert_eq!(*platform.copies.lock().unwrap() as u64, pg.grant_copies);
        pg.clear().unwrap();
        assert!(pg.is_empty());
        assert!(platform.live.lock().unwrap().is_empty(), "clear unmaps");
    }

    /// A guest cycling through twice as many pages as the cache holds (1 MiB
    /// reads at depth 8 are 2048 pages against 1056) keeps one stable half
    /// mapped and copies the other: no page is mapped twice. A
    /// least-recently-used cache maps a page on every use here, because the
    /// page it drops is always the next one the cycle needs.
    #[test]
    fn a_pool_larger_than_the_cache_does_not_thrash_it() {
        const MAX: usize = 8;
        const ROUNDS: u64 = 50;
        let platform = Arc::new(Counting::default());
        let mut pg = PersistentGrants::new(platform.clone(), 7, MAX);
        let mut buf = [0u8; 4];
        for _ in 0..ROUNDS {
            for gref in 0..2 * MAX as u32 {
                pg.copy_from(gref, 0, &mut buf).unwrap();
            }
        }
        assert_eq!(
            (pg.mapped, pg.evicted),
            (MAX as u64, 0),
            "maps and evictions for {ROUNDS} rounds of {} pages",
            2 * MAX
        );
        assert_eq!(pg.grant_copies, ROUNDS * MAX as u64);
        assert_eq!(*platform.peak.lock().unwrap(), MAX);
    }

    /// When the guest moves on to other pages, the old ones are dropped
    /// (within two purge passes) and the new ones take their place: from
    /// then on every use is a cache hit.
    #[test]
    fn pages_the_guest_stopped_using_make_room_for_new_ones() {
        const MAX: usize = 8;
        let platform = Arc::new(Counting::default());
        let mut pg = PersistentGrants::new(platform.clone(), 7, MAX);
        for gref in 0..MAX as u32 {
            assert!(round_trip(&mut pg, gref, 0));
        }
        let new: Vec<GrantRef> = (100..100 + MAX as u32).collect();
        let passes = 3 * PURGE_EVERY as usize * MAX;
        for i in 0..passes {
            let gref = new[i % MAX];
            assert!(round_trip(&mut pg, gref, 4), "page {gref} lost its data");
        }
        let live = platform.live.lock().unwrap().clone();
        assert_eq!(
            live,
            new.iter().copied().collect::<HashSet<_>>(),
            "after {passes} uses of the new pages"
        );
        assert_eq!((pg.mapped, pg.evicted), (2 * MAX as u64, MAX as u64));
        let copies = pg.grant_copies;
        for &gref in new.iter().cycle().take(10 * MAX) {
            assert!(round_trip(&mut pg, gref, 12));
        }
        assert_eq!(pg.grant_copies, copies, "a cached page was grant-copied");
    }

    /// A page pinned by a read in flight is never evicted, and never unmapped
    /// before its pin is dropped, even when the cache is cleared (disconnect);
    /// a cache full of pinned pages refuses new pins and copies with a grant
    /// copy, so it stays within its bound and fails nothing.
    #[test]
    fn pinned_pages_are_neither_evicted_nor_unmapped() {
        const MAX: usize = 4;
        let platform = Arc::new(Counting::default());
        let live = || platform.live.lock().unwrap().clone();
        let mut pg = PersistentGrants::new(platform.clone(), 7, MAX);
        let mut pins: Vec<Pin> = (0..MAX as u32)
            .map(|g| pg.pin(g).expect("room in the cache").1)
            .collect();
        assert_eq!(pg.pinned(), MAX);
        assert!(
            pg.pin(100).is_none(),
            "pinned a page into a cache full of pins"
        );
        pg.copy_to(101, 0, b"copied").unwrap();
        let mut buf = [0u8; 6];
        pg.copy_from(102, 0, &mut buf).unwrap();
        assert_eq!((pg.grant_copies, *platform.copies.lock().unwrap()), (2, 2));
        assert_eq!(pg.evicted, 0, "evicted a pinned page");
        assert_eq!(live(), (0..MAX as u32).collect::<HashSet<_>>());
        assert_eq!(*platform.peak.lock().unwrap(), MAX, "went past the bound");
        // Page 0's read completes (unpinned); nothing uses it any more while
        // pages 1..3 stay pinned. It is the only page a purge pass may drop:
        // the first pass due finds every page used since the start; the
        // next one drops page 0, and only it, though 2 and 3 are as old.
        pins.remove(0);
        let hits = || PURGE_EVERY as usize * MAX;
        for _ in 0..hits() {
            pg.copy_from(1, 0, &mut buf).unwrap();
        }
        assert!(
            pg.pin(100).is_none(),
            "first pass dropped a page used since the start"
        );
        assert_eq!(pg.evicted, 0);
        for _ in 0..hits() {
            pg.copy_from(1, 0, &mut buf).unwrap();
        }
        let (_, p100) = pg.pin(100).expect("page 0 dropped to make room");
        assert_eq!(pg.evicted, 1);
        assert_eq!(live(), [1, 2, 3, 100].into_iter().collect::<HashSet<_>>());
        // Disconnect with reads in flight: the cache lets go, the pinned
        // pages stay mapped until their reads complete.
        pg.clear().unwrap();
        assert!(pg.is_empty());
        assert_eq!(live(), [1, 2, 3, 100].into_iter().collect::<HashSet<_>>());
        drop(pins);
        assert_eq!(live(), [100].into_iter().collect::<HashSet<_>>());
        drop(p100);
        assert!(live().is_empty(), "a pin outlived its mapping");
    }
}
