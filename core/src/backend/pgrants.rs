//! Persistent grants (`feature-persistent`): when both ends agree, the frontend
//! keeps reusing a pool of granted pages and the backend maps each of them once
//! and keeps the mapping, so a request costs a memcpy instead of a grant-copy
//! hypercall — or, for a read, nothing: io_uring reads straight into the
//! mapped pages (zero-copy reads, `request::data`). The cache is bounded; the
//! least recently used mapping is dropped when it is full (the frontend may
//! reuse that page later: it is simply mapped again).
//!
//! **Pins.** A page a zero-copy read is filling is *pinned* ([`PersistentGrants::pin`]):
//! the read's engine op holds a [`Pin`] (a reference to the mapping) until its
//! completion is reaped. Eviction skips pinned pages, and dropping the cache
//! (disconnect, a queue that stops or panics, a restart handover) only drops
//! the cache's reference: a mapping is unmapped when its last holder lets go,
//! so never while the kernel may still write into it. When every cached page
//! is pinned, [`pin`](PersistentGrants::pin) refuses (the read takes the copy
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
    clock: u64,
    maps: HashMap<GrantRef, (Arc<Mapped>, u64)>,
    /// Maps made and dropped, for stats and tests.
    pub mapped: u64,
    pub evicted: u64,
    /// Copies done with a grant copy because every cached page was pinned.
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

    /// The cached mapping of `gref`, mapped and cached now if need be; None
    /// (nothing mapped) when the cache is full of pinned pages.
    fn cached(&mut self, gref: GrantRef) -> Result<Option<Arc<Mapped>>, GrantStatus> {
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.maps.get_mut(&gref) {
            e.1 = now;
            return Ok(Some(e.0.clone()));
        }
        if self.maps.len() >= self.max && !self.evict_lru() {
            return Ok(None);
        }
        let m = self.map(gref)?;
        self.maps.insert(gref, (m.clone(), now));
        Ok(Some(m))
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

    /// Drop the least recently used page that no read pins; false if every
    /// page is pinned.
    fn evict_lru(&mut self) -> bool {
        let victim = self
            .maps
            .iter()
            .filter(|(_, (m, _))| !is_pinned(m))
            .min_by_key(|(_, (_, t))| *t)
            .map(|(&g, _)| g);
        match victim {
            Some(g) => {
                self.maps.remove(&g);
                self.evicted += 1;
                true
            }
            None => false,
        }
    }

    /// Pin the writable mapping of `gref` (mapping and caching it if need be)
    /// for a read straight into it: its address and the pin that keeps it
    /// mapped. None if it cannot be mapped or the cache is full of pinned
    /// pages: the read then takes the copy path.
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

    /// A platform whose maps are plain pages and which records, as the
    /// hypervisor would, which grant refs are mapped right now.
    #[derive(Default)]
    struct Counting {
        live: Arc<Mutex<HashSet<GrantRef>>>,
        peak: Mutex<usize>,
        copies: Mutex<usize>,
    }

    struct Page {
        mem: Box<UnsafeCell<[u8; PAGE_SIZE]>>,
        gref: GrantRef,
        live: Arc<Mutex<HashSet<GrantRef>>>,
    }

    // SAFETY: a boxed page, owned by the value and reached only through
    // as_ptr() (UnsafeCell).
    unsafe impl ForeignMapping for Page {
        fn as_ptr(&self) -> *mut u8 {
            self.mem.get().cast()
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
                mem: Box::new(UnsafeCell::new([0; PAGE_SIZE])),
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
            // Only when the cache is full of pinned pages; the data is not
            // modelled here.
            *self.copies.lock().unwrap() += segs.len();
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
    /// by the platform's; once full, every new page evicts one; what it
    /// evicts is the least recently used page.
    #[test]
    fn the_cache_is_bounded_and_evicts_the_least_recently_used_page() {
        const MAX: usize = 8;
        let platform = Arc::new(Counting::default());
        let mut pg = PersistentGrants::new(platform.clone(), 7, MAX);
        let mut buf = [0u8; 16];
        // 40 distinct pages, each touched twice in a row: 40 maps, 32 evictions.
        for gref in 0..40 {
            pg.copy_to(gref, 8, b"persistent page!").unwrap();
            pg.copy_from(gref, 8, &mut buf).unwrap();
            assert_eq!(&buf, b"persistent page!");
            let mapped = platform.live.lock().unwrap().len();
            assert!(
                pg.len() <= MAX && mapped <= MAX,
                "after page {gref}: {} cached, {mapped} mapped; the bound is {MAX}",
                pg.len(),
            );
        }
        assert_eq!(*platform.peak.lock().unwrap(), MAX, "peak of live maps");
        assert_eq!((pg.mapped, pg.evicted), (40, 32));
        assert_eq!(pg.len(), MAX);
        // Pages 32..40 are cached. Use 32 again, then map a new page: the
        // least recently used is now 33, not 32.
        pg.copy_from(32, 0, &mut buf).unwrap();
        assert_eq!(pg.mapped, 40, "a cached page was mapped again");
        pg.copy_from(100, 0, &mut buf).unwrap();
        let live = platform.live.lock().unwrap().clone();
        assert!(live.contains(&32), "evicted the page just used: {live:?}");
        assert!(
            !live.contains(&33),
            "kept the least recently used: {live:?}"
        );
        assert_eq!(live.len(), MAX);
        pg.clear().unwrap();
        assert!(pg.is_empty());
        assert!(platform.live.lock().unwrap().is_empty(), "clear unmaps");
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
        // Page 0, used last (so the newest), is unpinned (its read
        // completed): the only page that may go; the older 1..3 are pinned.
        pg.copy_to(0, 0, b"x").unwrap();
        pins.remove(0);
        let (_, p100) = pg.pin(100).expect("an unpinned page to evict");
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
