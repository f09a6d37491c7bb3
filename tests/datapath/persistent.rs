//! Persistent grants: negotiated only when both ends want them; data served
//! through persistently mapped pages is the same as through grant copy; the
//! backend never holds more of a guest's pages mapped than its bound
//! (`max_persistent_grants` per queue, plus the rings) and evicts to stay
//! under it.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::kit::*;
use refblk_core::backend::{AttachOptions, Backend, BackendConfig};
use refblk_core::platform::{
    CopySeg, DomId, EventChannel, ForeignMapping, GrantRef, GrantStatus, Platform, Port,
};
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, Protocol, Toolstack, VbdSpec};
use refblk_sim::{SimPlatform, SimXen};

const MIB: u64 = 1 << 20;

fn session(rig: &Rig, domid: u16, frontend_offers: bool, expect: bool, protocol: Protocol) {
    let image = make_image(rig.dir.path(), &format!("p{domid}.img"), 8 * MIB);
    let guest = rig.guest(domid, 16384);
    let vbd = rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
    let opts = FrontendOptions {
        persistent: frontend_offers,
        protocol,
        ring_page_order: 1,
        ..FrontendOptions::default()
    };
    let mut fe = rig.connect(&guest, XVDA, opts);
    let info = fe.info().expect("connected").clone();
    assert_eq!(info.persistent, expect, "{info:?}");
    let (reqs, model) = random_rw(&mut fe, 7 + u64::from(domid), 200, 16, 64, 8 * MIB);
    assert!(reqs >= 200);
    assert!(
        std::fs::read(&image).unwrap() == model,
        "image differs from the model"
    );
    let st = rig.status(domid, XVDA);
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.ts.destroy_domain(domid).unwrap();
}

#[test]
fn persistent_grants_when_both_ends_want_them() {
    let Some(rig) = Rig::with_config(BackendConfig {
        persistent_grants: true,
        // Fewer than one batch of requests uses, so pages are grant-copied,
        // dropped and mapped again.
        max_persistent_grants: 8,
        ..BackendConfig::default()
    }) else {
        return;
    };
    session(&rig, 11, true, true, Protocol::X86_64);
    session(&rig, 12, true, true, Protocol::X86_32);
    session(&rig, 13, false, false, Protocol::X86_64);
    rig.shutdown();
}

#[test]
fn no_persistent_grants_unless_the_backend_allows_them() {
    let Some(rig) = Rig::new() else {
        return;
    };
    session(&rig, 14, true, false, Protocol::X86_64);
    rig.shutdown();
}

/// What the backend holds mapped of the guest's pages, as the hypervisor sees
/// it: counted where maps are made and dropped, whatever the backend's own
/// bookkeeping says.
#[derive(Default)]
pub(crate) struct MapCount {
    /// Pages mapped right now.
    pub(crate) live: AtomicUsize,
    /// The most pages ever mapped at once.
    pub(crate) peak: AtomicUsize,
    /// Mappings dropped.
    pub(crate) unmapped: AtomicUsize,
}

/// The simulated platform, with every grant map counted in a [`MapCount`].
pub(crate) struct Counting {
    pub(crate) inner: SimPlatform,
    pub(crate) count: Arc<MapCount>,
}

struct CountedMap {
    inner: Box<dyn ForeignMapping>,
    pages: usize,
    count: Arc<MapCount>,
}

// SAFETY: forwards to the wrapped mapping, which keeps the contract.
unsafe impl ForeignMapping for CountedMap {
    fn as_ptr(&self) -> *mut u8 {
        self.inner.as_ptr()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn copy_out(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.inner.copy_out(offset, buf)
    }
    fn copy_in(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.inner.copy_in(offset, data)
    }
}

impl Drop for CountedMap {
    fn drop(&mut self) {
        self.count.live.fetch_sub(self.pages, Ordering::SeqCst);
        self.count.unmapped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Platform for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn xenstore(&self) -> io::Result<XsClient> {
        self.inner.xenstore()
    }
    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<Box<dyn ForeignMapping>> {
        let inner = self.inner.map_grant_refs(domid, refs, writable)?;
        let now = self.count.live.fetch_add(refs.len(), Ordering::SeqCst) + refs.len();
        self.count.peak.fetch_max(now, Ordering::SeqCst);
        Ok(Box::new(CountedMap {
            inner,
            pages: refs.len(),
            count: self.count.clone(),
        }))
    }
    fn grant_copy(
        &self,
        domid: DomId,
        segs: &mut [CopySeg<'_>],
        status: &mut [GrantStatus],
    ) -> io::Result<()> {
        self.inner.grant_copy(domid, segs, status)
    }
    fn bind_interdomain(&self, domid: DomId, port: Port) -> io::Result<Box<dyn EventChannel>> {
        self.inner.bind_interdomain(domid, port)
    }
    fn domain_exists(&self, domid: DomId) -> io::Result<bool> {
        self.inner.domain_exists(domid)
    }
}

/// Stops the backend even when the test fails half-way.
pub(crate) struct Running(
    pub(crate) refblk_core::backend::BackendHandle,
    pub(crate) Option<std::thread::JoinHandle<io::Result<()>>>,
);

/// A simulated Xen and a backend with `cfg` on a platform that counts the
/// backend's grant maps, and a toolstack for it: (sim, count, backend,
/// running, toolstack). Bind them in this order: they drop in reverse.
pub(crate) fn counted_backend(
    dir: &Path,
    cfg: BackendConfig,
) -> (
    SimXen,
    Arc<MapCount>,
    refblk_core::backend::BackendHandle,
    Running,
    Toolstack,
) {
    let sim = SimXen::start(dir).expect("start the simulated Xen");
    let count = Arc::new(MapCount::default());
    let platform = Arc::new(Counting {
        inner: sim.platform().expect("sim platform"),
        count: count.clone(),
    });
    let (backend, join) = Backend::spawn(platform, cfg).expect("spawn the backend");
    let running = Running(backend.clone(), Some(join));
    let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("toolstack xenstore");
    let ts = Toolstack::new(xs, backend.clone());
    (sim, count, backend, running, ts)
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stop();
        if let Some(j) = self.1.take() {
            let _ = j.join();
        }
    }
}

/// A guest's random I/O through persistent grants, with fewer cached pages
/// allowed per queue than its requests use: the backend's maps of the guest's
/// pages never exceed the bound (rings + `max_persistent_grants` per queue)
/// at any moment, it evicts while the device is connected, and the data is
/// right. Counted at the platform, so a cache that forgets its bound fails
/// here even if it counts its own entries correctly.
#[test]
fn persistent_maps_never_exceed_the_bound_and_stale_pages_are_dropped() {
    const MAX: usize = 8;
    const QUEUES: usize = 2;
    const RING_ORDER: u32 = 1;
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let cfg = BackendConfig {
        persistent_grants: true,
        max_persistent_grants: MAX,
        ..BackendConfig::default()
    };
    let (sim, count, backend, mut running, ts) = counted_backend(dir.path(), cfg);
    let domid = 21;
    ts.create_domain(domid).expect("create domain");
    let guest = Arc::new(sim.create_guest(domid, 16384).expect("create guest"));
    let image = make_image(dir.path(), "bound.img", 8 * MIB);
    ts.add_vbd(&VbdSpec::new(domid, XVDA, &image))
        .expect("add vbd");
    let mut fe = Frontend::connect(
        &sim.xenstored_path(),
        guest.clone(),
        XVDA,
        FrontendOptions {
            persistent: true,
            queues: QUEUES as u32,
            ring_page_order: RING_ORDER,
            ..FrontendOptions::default()
        },
    )
    .expect("frontend connect");
    let info = fe.info().expect("connected").clone();
    assert!(info.persistent, "{info:?}");
    assert_eq!(fe.num_queues(), QUEUES);
    // 16 requests of up to 64 sectors in flight: far more distinct pages than
    // 8 per queue.
    let (_, model) = random_rw(&mut fe, 31, 400, 16, 64, 8 * MIB);
    let bound = QUEUES * ((1 << RING_ORDER) + MAX);
    let peak = count.peak.load(Ordering::SeqCst);
    let evicted = count.unmapped.load(Ordering::SeqCst);
    eprintln!("persistent grants: peak {peak} pages mapped (bound {bound}), {evicted} unmapped while connected");
    assert!(
        peak <= bound,
        "the backend held {peak} of the guest's pages mapped at once; the bound is {bound} \
         ({QUEUES} queues x ({} ring pages + max_persistent_grants {MAX}))",
        1 << RING_ORDER
    );
    assert!(
        evicted > 0,
        "no persistent mapping was dropped while connected: the cache never purged"
    );
    assert!(
        std::fs::read(&image).unwrap() == model,
        "image differs from the model"
    );
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    backend.stop();
    let join = running.1.take().expect("backend thread");
    join.join().expect("backend thread").expect("backend run");
    assert_eq!(
        count.live.load(Ordering::SeqCst),
        0,
        "pages still mapped after the backend stopped"
    );
}
