//! Persistent grants (`feature-persistent`): when both ends agree, the frontend
//! keeps reusing a pool of granted pages and the backend maps each of them once
//! and keeps the mapping, so a request costs a memcpy instead of a grant-copy
//! hypercall. The cache is bounded; the least recently used mapping is dropped
//! when it is full (the frontend may reuse that page later: it is simply mapped
//! again).
//!
//! Mappings are always writable, as in Linux blkback: the same persistent page
//! carries write data one time and read data the next.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::platform::{DomId, ForeignMapping, GrantRef, GrantStatus, Platform, PAGE_SIZE};

/// Default bound, as Linux blkback's `max_persistent_grants`.
pub const DEFAULT_MAX_PERSISTENT: usize = 1056;

/// A bounded cache of persistently mapped guest pages of one queue.
pub struct PersistentGrants {
    platform: Arc<dyn Platform>,
    domid: DomId,
    max: usize,
    clock: u64,
    maps: HashMap<GrantRef, (Box<dyn ForeignMapping>, u64)>,
    /// Maps made and dropped, for stats and tests.
    pub mapped: u64,
    pub evicted: u64,
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

    fn get(&mut self, gref: GrantRef) -> Result<&dyn ForeignMapping, GrantStatus> {
        self.clock += 1;
        let now = self.clock;
        if !self.maps.contains_key(&gref) {
            if self.maps.len() >= self.max {
                self.evict_lru();
            }
            let m = self
                .platform
                .map_grant_refs(self.domid, &[gref], true)
                .map_err(|e| {
                    crate::platform::GrantMapError::status_of(&e)
                        .unwrap_or(GrantStatus::GeneralError)
                })?;
            self.mapped += 1;
            self.maps.insert(gref, (m, now));
        }
        let e = self.maps.get_mut(&gref).expect("present");
        e.1 = now;
        Ok(&*e.0)
    }

    fn evict_lru(&mut self) {
        if let Some((&g, _)) = self.maps.iter().min_by_key(|(_, (_, t))| *t) {
            self.maps.remove(&g);
            self.evicted += 1;
        }
    }

    /// Copy `dst.len()` bytes at `offset` of the guest page `gref` into `dst`.
    pub fn copy_from(
        &mut self,
        gref: GrantRef,
        offset: u16,
        dst: &mut [u8],
    ) -> Result<(), GrantStatus> {
        check(offset, dst.len())?;
        let m = self.get(gref)?;
        m.copy_out(usize::from(offset), dst)
            .map_err(|_| GrantStatus::BadCopyArg)
    }

    /// Copy `src` into the guest page `gref` at `offset`.
    pub fn copy_to(&mut self, gref: GrantRef, offset: u16, src: &[u8]) -> Result<(), GrantStatus> {
        check(offset, src.len())?;
        let m = self.get(gref)?;
        m.copy_in(usize::from(offset), src)
            .map_err(|_| GrantStatus::PermissionDenied)
    }

    /// Drop every mapping (disconnect).
    pub fn clear(&mut self) -> io::Result<()> {
        self.maps.clear();
        Ok(())
    }
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
            _segs: &mut [CopySeg<'_>],
            _status: &mut [GrantStatus],
        ) -> io::Result<()> {
            Err(io::Error::other("persistent grants never grant-copy"))
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
}
