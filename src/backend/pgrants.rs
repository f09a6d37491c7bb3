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
