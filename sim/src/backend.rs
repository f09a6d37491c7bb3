//! The backend side of the simulated Xen: [`SimPlatform`] implements
//! [`Platform`] on a simulated machine directory.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::domain::{domain_dir, DomainShm};
use super::evtchn::SimEventChannel;
use super::shm::FrameMap;
use refblk_core::platform::{
    CopySeg, DomId, EventChannel, ForeignMapping, GrantMapError, GrantRef, GrantStatus, Platform,
    Port, PAGE_SIZE,
};
use refblk_core::xenstore::XsClient;

/// Most refs one map call accepts (gntdev's default limit per file is larger;
/// rings need 16, persistent grants 1 per call).
pub use refblk_core::platform::MAX_MAP_REFS;

/// A domain as the backend sees it: its files, and how many of our live
/// mappings hold each ref (the OFD lock on an entry is taken on 0 -> 1 and
/// released on 1 -> 0, since locks of one file description do not stack).
struct Domain {
    shm: DomainShm,
    mapped: Mutex<HashMap<GrantRef, u32>>,
}

impl Domain {
    fn map_ref(&self, gref: GrantRef) -> io::Result<()> {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        let c = m.entry(gref).or_insert(0);
        if *c == 0 {
            self.shm.lock_mapped(gref)?;
        }
        *c += 1;
        Ok(())
    }

    fn unmap_ref(&self, gref: GrantRef) {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(&gref) {
            *c -= 1;
            if *c == 0 {
                m.remove(&gref);
                if let Err(e) = self.shm.unlock_mapped(gref) {
                    log::warn!(
                        "sim: domain {}: release map of ref {gref}: {e}",
                        self.shm.domid
                    );
                }
            }
        }
    }
}

/// The simulated Xen as a backend sees it. Cheap to share (`Arc`) between
/// threads; domains' files are opened on first use and reopened when a domain
/// was destroyed and created again.
pub struct SimPlatform {
    dir: PathBuf,
    me: DomId,
    /// Open domains, few: a linear scan is cheaper than hashing the domid on every
    /// grant copy (this lookup runs once per request batch on every queue thread).
    domains: Mutex<Vec<(DomId, Arc<Domain>)>>,
}

impl SimPlatform {
    /// The backend (domain 0) of the simulated machine in `dir`.
    pub fn new(dir: &Path) -> io::Result<SimPlatform> {
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{}: no simulated Xen directory (start `refblk sim --dir DIR`)",
                    dir.display()
                ),
            ));
        }
        Ok(SimPlatform {
            dir: dir.to_path_buf(),
            me: 0,
            domains: Mutex::new(Vec::new()),
        })
    }

    /// The simulated machine's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live domain `domid`, or None if it does not exist.
    fn domain(&self, domid: DomId) -> io::Result<Option<Arc<Domain>>> {
        let mut doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, d)) = doms.iter().find(|(id, _)| *id == domid) {
            if d.shm.alive() {
                return Ok(Some(d.clone()));
            }
        }
        // Drop every destroyed domain we still hold (files and mappings), not
        // just this one: dead guests must not pin backend memory or fds.
        doms.retain(|(_, d)| d.shm.alive());
        let Some(shm) = DomainShm::open(&self.dir, domid)? else {
            return Ok(None);
        };
        if !shm.alive() {
            return Ok(None);
        }
        let d = Arc::new(Domain {
            shm,
            mapped: Mutex::new(HashMap::new()),
        });
        doms.push((domid, d.clone()));
        Ok(Some(d))
    }
}

/// Connect to the simulated xenstored as dom0.
fn open_xenstore(sock: &Path) -> io::Result<XsClient> {
    XsClient::connect_unix(sock).map_err(|e| io::Error::other(format!("{}: {e}", sock.display())))
}

struct SimMapping {
    /// Always Some until drop.
    map: Option<FrameMap>,
    writable: bool,
    dom: Arc<Domain>,
    refs: Vec<GrantRef>,
}

// SAFETY: the frames stay mapped until drop; len() is that mapping's length
// (0 with no mapping, where as_ptr() is null and nothing is in range).
unsafe impl ForeignMapping for SimMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map
            .as_ref()
            .map_or(std::ptr::null_mut(), |m| m.as_ptr())
    }
    fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        // Unmap the pages first, then tell the guest the grants are free.
        drop(self.map.take());
        for r in std::mem::take(&mut self.refs) {
            self.dom.unmap_ref(r);
        }
    }
}

fn map_err(
    domid: DomId,
    gref: GrantRef,
    status: GrantStatus,
    detail: impl Into<String>,
) -> io::Error {
    GrantMapError {
        domid,
        gref,
        status,
        detail: detail.into(),
    }
    .into_io()
}

fn status_detail(s: GrantStatus, write: bool) -> &'static str {
    match s {
        GrantStatus::BadGntref => "reference out of range or not granted",
        GrantStatus::PermissionDenied if write => "not granted to us, or read-only",
        GrantStatus::PermissionDenied => "not granted to us",
        GrantStatus::GeneralError => "grant names a frame outside the guest's memory",
        _ => "",
    }
}

impl Platform for SimPlatform {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn xenstore(&self) -> io::Result<XsClient> {
        open_xenstore(&self.dir.join("xenstored.sock"))
    }

    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<Box<dyn ForeignMapping>> {
        refblk_core::platform::check_map_refs(domid, refs)?;
        let first = refs[0];
        let dom = self
            .domain(domid)?
            .ok_or_else(|| map_err(domid, first, GrantStatus::BadDomain, "no such domain"))?;
        let mut held = Vec::with_capacity(refs.len());
        let mut frames = Vec::with_capacity(refs.len());
        let mut failure = None;
        for &r in refs {
            if r >= dom.shm.nr_entries {
                failure = Some(map_err(
                    domid,
                    r,
                    GrantStatus::BadGntref,
                    "reference out of range",
                ));
                break;
            }
            // Take the map lock first, then check: a concurrent end_access either
            // finished before (we see the entry cleared) or fails.
            if let Err(e) = dom.map_ref(r) {
                failure = Some(map_err(domid, r, GrantStatus::GeneralError, e.to_string()));
                break;
            }
            held.push(r);
            match dom.shm.check_grant(self.me, r, writable) {
                Ok(f) => frames.push(f),
                Err(s) => {
                    failure = Some(map_err(domid, r, s, status_detail(s, writable)));
                    break;
                }
            }
        }
        if failure.is_none() {
            match FrameMap::map_frames(&dom.shm.mem_file, &frames, writable) {
                Ok(map) => {
                    return Ok(Box::new(SimMapping {
                        map: Some(map),
                        writable,
                        dom,
                        refs: held,
                    }))
                }
                Err(e) => {
                    failure = Some(io::Error::new(
                        e.kind(),
                        format!("domain {domid}: mmap of grants: {e}"),
                    ))
                }
            }
        }
        for r in held {
            dom.unmap_ref(r);
        }
        Err(failure.expect("set on every failing path"))
    }

    fn grant_copy(
        &self,
        domid: DomId,
        segs: &mut [CopySeg<'_>],
        status: &mut [GrantStatus],
    ) -> io::Result<()> {
        refblk_core::platform::check_copy_args(segs, status)?;
        let Some(dom) = self.domain(domid)? else {
            status.iter_mut().for_each(|s| *s = GrantStatus::BadDomain);
            return Ok(());
        };
        for (seg, st) in segs.iter_mut().zip(status.iter_mut()) {
            *st = match seg {
                CopySeg::FromGuest { gref, offset, dst } => {
                    copy_one(&dom.shm, self.me, *gref, *offset, dst.len(), false)
                        .map(|base| {
                            dom.shm.mem.copy_out(base, dst);
                        })
                        .err()
                        .unwrap_or(GrantStatus::Okay)
                }
                CopySeg::ToGuest { gref, offset, src } => {
                    copy_one(&dom.shm, self.me, *gref, *offset, src.len(), true)
                        .map(|base| {
                            dom.shm.mem.copy_in(base, src);
                        })
                        .err()
                        .unwrap_or(GrantStatus::Okay)
                }
            };
        }
        Ok(())
    }

    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Box<dyn EventChannel>> {
        Ok(Box::new(SimEventChannel::bind(
            &self.dir,
            self.me,
            domid,
            remote_port,
        )?))
    }

    fn domain_exists(&self, domid: DomId) -> io::Result<bool> {
        let mut doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        doms.retain(|(_, d)| d.shm.alive());
        if doms.iter().any(|(id, _)| *id == domid) {
            return Ok(true);
        }
        Ok(domain_dir(&self.dir, domid).join("gnttab").exists())
    }
}

/// Check one copy segment; returns the byte offset in guest memory.
fn copy_one(
    shm: &DomainShm,
    me: DomId,
    gref: GrantRef,
    offset: u16,
    len: usize,
    write: bool,
) -> Result<usize, GrantStatus> {
    if offset as usize + len > PAGE_SIZE {
        return Err(GrantStatus::BadCopyArg);
    }
    let frame = shm.check_grant(me, gref, write)?;
    Ok(frame as usize * PAGE_SIZE + offset as usize)
}
