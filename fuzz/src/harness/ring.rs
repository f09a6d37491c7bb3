//! Target `ring`: the whole ring consumer, end to end. The real refblk backend
//! (`Backend`: xenbus state machine, its io_uring workers, `BackRing`, `parse_request`,
//! the io_uring `Engine`) serves three vbd devices of one simulated guest
//! (`SimXen`: simulated xenstored, grant tables and event channels) from image
//! files in a temp dir. The fuzz input is the guest: batches of ring slots
//! (structured requests of every kind, or raw bytes), indirect page contents,
//! and producer indices, including bogus ones.
//!
//! Devices: 0 = x86_64 ABI, 1-page ring, 512-byte sectors; 1 = x86_32 ABI,
//! 2-page ring (`ring-page-order` 1), 4096-byte sectors; 2 = no `protocol` key
//! (x86_32), single `ring-ref`, read-only.
//!
//! Checked after every batch:
//! - every consumed request is answered exactly once (the multiset of
//!   (id, operation) of the responses is that of the requests), and the status
//!   is what an independent model says (`blkif::model`, plus which grant refs
//!   the guest really granted and how);
//! - liveness: the backend's stall counter (`QueueStats::stalls`: consumed
//!   requests left with nothing in flight to wake them, checked by each
//!   worker before it sleeps) stays 0 — asserted while waiting for answers,
//!   so a stalled request fails at once instead of after the timeout;
//! - a bogus producer index disconnects the device (and it reconnects);
//! - no byte the backend was not meant to write changes: response padding is
//!   zero, the rest of each slot keeps the guest's request bytes, the ring
//!   header changes only in `rsp_prod`/`req_event`;
//! - the image file never grows; each of its sectors is either unchanged or
//!   holds what an answered write or discard of this batch put there, and an
//!   answered write's data is really there;
//! - guest memory changes only where a read of this batch pointed, and only to
//!   image data of the right disk sector (so no backend memory ever leaks);
//! - every grant copy the backend asks for stays inside one 4096-byte page and
//!   names the guest's domain (checked in a wrapping `Platform`).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use refblk_core::backend::{AttachOptions, Backend, BackendConfig, BackendHandle};
use refblk_core::blkif::{Abi, DiskInfo, Features};
use refblk_core::platform::{
    CopySeg, DomId, EventChannel, ForeignMapping, GrantRef, GrantStatus, Platform, Port,
};
use refblk_core::xenstore::XsClient;
use refblk_sim::{GuestPages, SimGuest, SimPlatform, SimXen};

use super::blkif::{model, model_indirect, off, Expect};
use super::input::Input;

const DOMID: DomId = 5;
const IMAGE_BYTES: usize = 512 * 1024;
const SECTOR: usize = 512;
const PAGE: usize = 4096;
/// Data pages granted read-write, read-only; indirect pages (read-only).
const NR_RW: usize = 16;
const NR_RO: usize = 4;
const NR_IND: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(20);
const MAX_INDIRECT: u32 = 256;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_BARRIER: u8 = 2;
const OP_FLUSH: u8 = 3;
const OP_DISCARD: u8 = 5;
const OP_INDIRECT: u8 = 6;

// ------------------------------------------------------------ checked platform

/// The simulated platform, with every grant copy checked.
struct Checked {
    inner: SimPlatform,
    violations: Mutex<Vec<String>>,
}

impl Platform for Checked {
    fn name(&self) -> &'static str {
        "sim-checked"
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
        self.inner.map_grant_refs(domid, refs, writable)
    }
    fn grant_copy(
        &self,
        domid: DomId,
        segs: &mut [CopySeg<'_>],
        status: &mut [GrantStatus],
    ) -> io::Result<()> {
        {
            let mut v = self.violations.lock().unwrap();
            if domid != DOMID {
                v.push(format!("grant copy with domain {domid}"));
            }
            for s in segs.iter() {
                let (gref, offset, len) = match s {
                    CopySeg::FromGuest { gref, offset, dst } => (*gref, *offset, dst.len()),
                    CopySeg::ToGuest { gref, offset, src } => (*gref, *offset, src.len()),
                };
                if usize::from(offset) + len > PAGE || len == 0 {
                    v.push(format!(
                        "grant copy outside a page: ref {gref} +{offset} len {len}"
                    ));
                }
            }
        }
        self.inner.grant_copy(domid, segs, status)
    }
    fn bind_interdomain(&self, domid: DomId, port: Port) -> io::Result<Box<dyn EventChannel>> {
        self.inner.bind_interdomain(domid, port)
    }
    fn domain_exists(&self, domid: DomId) -> io::Result<bool> {
        self.inner.domain_exists(domid)
    }
}

// ------------------------------------------------------------ the rig

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Grant {
    Rw(usize),
    Ro(usize),
    Ind(usize),
}

struct Conn {
    pages: GuestPages,
    evtchn: Box<dyn EventChannel>,
    req_prod: u32,
    rsp_cons: u32,
}

struct Dev {
    devid: u32,
    abi: Abi,
    order: Option<u32>,
    protocol_key: bool,
    read_only: bool,
    lss: u32,
    image: PathBuf,
    disk: DiskInfo,
    ring_first: u32,
    ring_refs: Vec<GrantRef>,
    conn: Option<Conn>,
    shadow: Vec<u8>,
    connects: u64,
}

impl Dev {
    fn nr_pages(&self) -> usize {
        1 << self.order.unwrap_or(0)
    }
    fn size(&self) -> u32 {
        32 * self.nr_pages() as u32
    }
    fn be(&self) -> String {
        format!("/local/domain/0/backend/vbd/{DOMID}/{}", self.devid)
    }
    fn fe(&self) -> String {
        format!("/local/domain/{DOMID}/device/vbd/{}", self.devid)
    }
}

struct Rig {
    // Drop order: backend first, then the guest, then the simulator.
    backend: BackendHandle,
    backend_thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    platform: Arc<Checked>,
    xs: XsClient,
    devs: Vec<Dev>,
    guest: SimGuest,
    /// gref -> what it grants.
    grants: HashMap<GrantRef, Grant>,
    rw_refs: Vec<GrantRef>,
    ro_refs: Vec<GrantRef>,
    ind_refs: Vec<GrantRef>,
    rw_first: u32,
    ro_first: u32,
    ind_first: u32,
    salt: u32,
    _sim: SimXen,
    _dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.backend.stop();
        if let Some(t) = self.backend_thread.take() {
            let _ = t.join();
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("refblk-fuzz-ring")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("refblk-fuzz-ring")
        .tempdir()
        .expect("temp dir")
}

fn pattern(salt: u32, a: usize, b: usize) -> u8 {
    let x = salt
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add((a as u32).wrapping_mul(0x85EB_CA6B))
        .wrapping_add((b as u32).wrapping_mul(0xC2B2_AE35));
    (x ^ (x >> 15) ^ (x >> 24)) as u8
}

impl Rig {
    fn new() -> Rig {
        let dir = tempdir();
        let sim = SimXen::start(&dir.path().join("xen")).expect("start simulated Xen");
        let platform = Arc::new(Checked {
            inner: sim.platform().expect("sim platform"),
            violations: Mutex::new(Vec::new()),
        });
        let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("xenstore");
        let cfg = BackendConfig {
            max_indirect_segments: MAX_INDIRECT,
            ..BackendConfig::default()
        };
        let (backend, thread) =
            Backend::spawn(platform.clone() as Arc<dyn Platform>, cfg).expect("spawn backend");
        let guest = sim.create_guest(DOMID, 256).expect("guest");
        let mut grants = HashMap::new();
        let mut grant_range = |n: usize, ro: bool, kind: fn(usize) -> Grant| {
            let first = guest.alloc_pages(n as u32).expect("pages");
            let refs: Vec<GrantRef> = (0..n)
                .map(|i| {
                    let g = guest.grant(first + i as u32, 0, ro).expect("grant");
                    grants.insert(g, kind(i));
                    g
                })
                .collect();
            (first, refs)
        };
        let (rw_first, rw_refs) = grant_range(NR_RW, false, Grant::Rw);
        let (ro_first, ro_refs) = grant_range(NR_RO, true, Grant::Ro);
        let (ind_first, ind_refs) = grant_range(NR_IND, true, Grant::Ind);
        let specs = [
            (51712, Abi::X86_64, None, true, false, 512u32),
            (51728, Abi::X86_32, Some(1), true, false, 4096),
            (51744, Abi::X86_32, None, false, true, 512),
        ];
        let mut devs = Vec::new();
        for (devid, abi, order, protocol_key, read_only, lss) in specs {
            let image = dir.path().join(format!("disk{devid}.img"));
            let shadow: Vec<u8> = (0..IMAGE_BYTES).map(|i| pattern(devid, i, 7)).collect();
            std::fs::write(&image, &shadow).expect("write image");
            let nr = 1usize << order.unwrap_or(0);
            let ring_first = guest.alloc_pages(nr as u32).expect("ring pages");
            let ring_refs = (0..nr)
                .map(|i| {
                    guest
                        .grant(ring_first + i as u32, 0, false)
                        .expect("grant ring")
                })
                .collect();
            devs.push(Dev {
                devid,
                abi,
                order,
                protocol_key,
                read_only,
                lss,
                image,
                disk: DiskInfo {
                    sectors: 0,
                    logical_sector_size: lss,
                    read_only,
                    max_indirect_segments: MAX_INDIRECT,
                    features: Features::default(),
                },
                ring_first,
                ring_refs,
                conn: None,
                shadow,
                connects: 0,
            });
        }
        let mut rig = Rig {
            backend,
            backend_thread: Some(thread),
            platform,
            xs,
            devs,
            guest,
            grants,
            rw_refs,
            ro_refs,
            ind_refs,
            rw_first,
            ro_first,
            ind_first,
            salt: 1,
            _sim: sim,
            _dir: dir,
        };
        for i in 0..rig.devs.len() {
            rig.toolstack_add(i);
            rig.connect(i);
        }
        rig
    }

    fn w(&self, path: &str, v: &str) {
        self.xs
            .write(0, path, v.as_bytes())
            .unwrap_or_else(|e| panic!("xenstore write {path}: {e}"));
    }

    fn state(&self, path: &str) -> u32 {
        self.xs
            .try_read_string(0, path)
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// Liveness violations the backend counted on any device (see
    /// `QueueStats::stalls`).
    fn stalls(&self) -> u64 {
        self.backend.status().iter().map(|d| d.stats.stalls).sum()
    }

    fn wait_state(&self, i: usize, want: &[u32], what: &str) -> u32 {
        let p = format!("{}/state", self.devs[i].be());
        let t0 = Instant::now();
        loop {
            let s = self.state(&p);
            if want.contains(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < TIMEOUT,
                "device {i}: backend state {s}, waited for {want:?} ({what})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the toolstack (libxl) writes, then the hotplug script's attach.
    fn toolstack_add(&mut self, i: usize) {
        let d = &self.devs[i];
        let (be, fe) = (d.be(), d.fe());
        self.w(&format!("{fe}/backend"), &be);
        self.w(&format!("{fe}/backend-id"), "0");
        self.w(&format!("{fe}/state"), "1");
        self.w(&format!("{be}/frontend"), &fe);
        self.w(&format!("{be}/frontend-id"), &DOMID.to_string());
        self.w(&format!("{be}/mode"), if d.read_only { "r" } else { "w" });
        self.w(&format!("{be}/online"), "1");
        self.w(&format!("{be}/state"), "1");
        self.w(&format!("{be}/script"), "/etc/xen/scripts/block-refblk");
        self.wait_state(i, &[2], "probe");
        let opts = AttachOptions {
            read_only: d.read_only,
            sector_size: d.lss,
            ..AttachOptions::default()
        };
        self.backend
            .attach(&be, d.image.clone(), opts)
            .unwrap_or_else(|e| panic!("attach {be}: {e}"));
    }

    /// The frontend's side of connecting (blkfront `talk_to_blkback`).
    fn connect(&mut self, i: usize) {
        let rings = {
            let d = &mut self.devs[i];
            d.conn = None;
            d.connects += 1;
            // A fresh ring: indices 0, padding with a pattern we check later.
            let pages = self
                .guest
                .pages(d.ring_first, d.nr_pages() as u32)
                .expect("ring pages");
            let mut init = vec![0u8; d.nr_pages() * PAGE];
            for (k, b) in init.iter_mut().enumerate().skip(16).take(48) {
                *b = pattern(0xabc, k, 0);
            }
            pages.copy_in(0, &init).expect("init ring");
            pages
        };
        let evtchn = self.guest.alloc_unbound(0).expect("alloc evtchn");
        let d = &self.devs[i];
        let fe = d.fe();
        if d.protocol_key {
            self.w(&format!("{fe}/protocol"), d.abi.protocol_name());
        }
        match d.order {
            None => self.w(&format!("{fe}/ring-ref"), &d.ring_refs[0].to_string()),
            Some(o) => {
                self.w(&format!("{fe}/ring-page-order"), &o.to_string());
                for (k, r) in d.ring_refs.iter().enumerate() {
                    self.w(&format!("{fe}/ring-ref{k}"), &r.to_string());
                }
            }
        }
        self.w(
            &format!("{fe}/event-channel"),
            &evtchn.local_port().to_string(),
        );
        self.w(&format!("{fe}/state"), "3");
        self.wait_state(i, &[4], "connect");
        let be = d.be();
        let key = |k: &str| {
            self.xs
                .try_read_string(0, &format!("{be}/{k}"))
                .ok()
                .flatten()
        };
        let sectors: u64 = key("sectors")
            .and_then(|s| s.parse().ok())
            .expect("sectors");
        let discard = key("feature-discard").as_deref() == Some("1");
        let secure = key("discard-secure").as_deref() == Some("1");
        assert_eq!(key("feature-flush-cache").as_deref(), Some("1"));
        assert_eq!(key("feature-barrier").as_deref(), Some("1"));
        assert_eq!(sectors as usize * SECTOR, IMAGE_BYTES, "advertised size");
        let d = &mut self.devs[i];
        d.disk.sectors = sectors;
        d.disk.features = Features {
            flush: true,
            barrier: true,
            discard,
            discard_secure: secure,
        };
        self.w(&format!("{fe}/state"), "4");
        let d = &mut self.devs[i];
        d.conn = Some(Conn {
            pages: rings,
            evtchn,
            req_prod: 0,
            rsp_cons: 0,
        });
    }

    /// After the backend gave up on a ring: the frontend closes and reconnects.
    fn reconnect(&mut self, i: usize) {
        let fe = self.devs[i].fe();
        self.devs[i].conn = None;
        self.w(&format!("{fe}/state"), "5");
        self.wait_state(i, &[5, 6], "closing");
        self.w(&format!("{fe}/state"), "6");
        self.wait_state(i, &[6], "closed");
        self.w(&format!("{fe}/state"), "1");
        self.wait_state(i, &[2], "reconnect");
        self.connect(i);
    }

    fn page_of(&self, gref: GrantRef) -> Option<(u32, Grant)> {
        self.grants.get(&gref).map(|g| {
            let page = match *g {
                Grant::Rw(k) => self.rw_first + k as u32,
                Grant::Ro(k) => self.ro_first + k as u32,
                Grant::Ind(k) => self.ind_first + k as u32,
            };
            (page, *g)
        })
    }
}

// ------------------------------------------------------------ input -> slots

fn gref_from(rig: &Rig, sel: u8, inp: &mut Input) -> GrantRef {
    match sel % 32 {
        s @ 0..=15 => rig.rw_refs[usize::from(s)],
        s @ 16..=19 => rig.ro_refs[usize::from(s - 16)],
        s @ 20..=27 => rig.ind_refs[usize::from(s - 20)],
        28 => 0,
        29 => 9999,
        30 => u32::MAX,
        _ => inp.u32(),
    }
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// One slot's bytes, mostly well-formed requests so the I/O paths are reached.
fn make_slot(rig: &Rig, d: &Dev, inp: &mut Input, id: u64) -> Vec<u8> {
    let o = off(d.abi);
    let kind = inp.u8();
    if kind.is_multiple_of(8) {
        return inp.bytes(o.slot);
    }
    let mut s = vec![0u8; o.slot];
    // Fill with recognisable junk: the backend must not care about it.
    for (k, b) in s.iter_mut().enumerate() {
        *b = pattern(id as u32, k, 3);
    }
    let op = match kind >> 3 {
        0..=7 => OP_READ,
        8..=15 => OP_WRITE,
        16 | 17 => OP_BARRIER,
        18 | 19 => OP_FLUSH,
        20 | 21 => OP_DISCARD,
        22..=27 => OP_INDIRECT,
        _ => inp.u8(),
    };
    s[0] = op;
    put(&mut s, o.id, &id.to_le_bytes());
    let per = u64::from(d.lss) / 512;
    let sectors = d.disk.sectors.max(1);
    let sector = match inp.u8() % 8 {
        0 => sectors - per,
        1 => sectors,
        2 => inp.u64(),
        3 => u64::from(inp.u16()) % (sectors + 16),
        _ => (u64::from(inp.u16()) % sectors) / per * per,
    };
    put(&mut s, o.sector, &sector.to_le_bytes());
    match op {
        // A plain flush mostly; sometimes a flush carrying data (run as a
        // barrier write), which takes segments like a write below.
        OP_FLUSH if !inp.u8().is_multiple_of(4) => s[1] = 0,
        OP_DISCARD => {
            s[1] = inp.u8() & 1;
            let n = match inp.u8() % 4 {
                0 => u64::from(inp.u32()),
                1 => 0,
                _ => u64::from(inp.u8() % 64 + 1) * per,
            };
            put(&mut s, o.discard_nr, &n.to_le_bytes());
        }
        OP_INDIRECT => {
            s[1] = match inp.u8() % 8 {
                0 => inp.u8(),
                1..=3 => OP_WRITE,
                _ => OP_READ,
            };
            let nr: u16 = match inp.u8() % 8 {
                0 => inp.u16(),
                1 => 0,
                2 => 257,
                _ => u16::from(inp.u8()) + 1,
            };
            put(&mut s, o.ind_nr, &nr.to_le_bytes());
            for k in 0..8 {
                // Reads take their segment list from indirect pages 0..,
                // writes from 4.. (see fill_indirect).
                let first = if s[1] == OP_WRITE { 4 } else { 0 };
                let g = if inp.u8().is_multiple_of(8) {
                    gref_from(rig, inp.u8(), inp)
                } else {
                    rig.ind_refs[(first + k) % NR_IND]
                };
                put(&mut s, o.ind_grefs + 4 * k, &g.to_le_bytes());
            }
        }
        _ => {
            let nr = match inp.u8() % 8 {
                0 => inp.u8(),
                _ => inp.u8() % 11 + 1,
            };
            s[1] = nr;
            for k in 0..usize::from(nr.min(11)) {
                let sel = inp.u8();
                // Reads land in rw pages 0..8, writes come from pages 8..16 and
                // the read-only ones, unless the input insists (sel >= 32).
                let g = match (op, sel) {
                    (OP_READ, s) if s < 32 => rig.rw_refs[usize::from(s % 8)],
                    (_, s) if s < 32 => {
                        if s % 5 == 0 {
                            rig.ro_refs[usize::from(s % 4)]
                        } else {
                            rig.rw_refs[8 + usize::from(s % 8)]
                        }
                    }
                    _ => gref_from(rig, sel, inp),
                };
                let (first, last) = match inp.u8() % 8 {
                    0 => (inp.u8() % 10, inp.u8() % 10),
                    1 => {
                        let f = inp.u8() % 8;
                        (f, f + inp.u8() % (8 - f))
                    }
                    _ => (0, 7),
                };
                let at = o.seg + 8 * k;
                put(&mut s, at, &g.to_le_bytes());
                s[at + 4] = first;
                s[at + 5] = last;
            }
        }
    }
    s
}

/// The indirect pages' contents for one batch (segment descriptors): the same
/// runs twice, on pages 0.. pointing at the read-destination pages (rw 0..8)
/// and on pages 4.. pointing at the write-source pages (rw 8..16), so that
/// indirect reads and writes of one batch do not share guest pages.
fn fill_indirect(rig: &Rig, inp: &mut Input) {
    let half = NR_IND / 2 * PAGE;
    let mut buf = vec![0u8; NR_IND * PAGE];
    let runs = inp.u8() % 8;
    let mut at = 0;
    for _ in 0..runs {
        let count = usize::from(inp.u8()) + 1;
        let sel = inp.u8();
        let (first, last) = match inp.u8() % 4 {
            0 => (inp.u8() % 10, inp.u8() % 10),
            _ => (0, 7),
        };
        let odd = if sel >= 32 {
            Some(gref_from(rig, sel, inp))
        } else {
            None
        };
        for c in 0..count {
            if at + 8 > half {
                break;
            }
            for (base, region) in [(0, 0), (half, 8)] {
                let g = odd.unwrap_or(rig.rw_refs[region + (usize::from(sel) + c) % 8]);
                put(&mut buf, base + at, &g.to_le_bytes());
                buf[base + at + 4] = first;
                buf[base + at + 5] = last;
            }
            at += 8;
        }
    }
    rig.guest
        .write_page(rig.ind_first, 0, &buf)
        .expect("indirect pages");
}

// ------------------------------------------------------------ one batch

/// (gref, byte offset in the page, byte length) of a transfer's pieces.
type Pieces = Vec<(u32, u16, u16)>;

struct Sent {
    id: u64,
    echo: u8,
    bytes: Vec<u8>,
}

/// Read a whole page's content by gref (as it was before the batch).
fn page_bytes(rig: &Rig, gref: GrantRef) -> Option<Vec<u8>> {
    let (page, _) = rig.page_of(gref)?;
    let mut v = vec![0u8; PAGE];
    rig.guest.read_page(page, 0, &mut v).ok()?;
    Some(v)
}

/// What the model says the status of `s` must be, or None if it cannot know.
/// Also returns the transfer: (write, first disk sector, pieces).
#[allow(clippy::type_complexity)]
fn expected(
    rig: &Rig,
    d: &Dev,
    s: &Sent,
) -> (Option<Vec<i16>>, Option<(bool, u64, Vec<(u32, u16, u16)>)>) {
    let e = match model(d.abi, &s.bytes, &d.disk) {
        Expect::Indirect {
            write,
            sector,
            nr,
            grefs,
        } => {
            let np = usize::from(nr).div_ceil(512).min(8);
            let mut pages = Vec::new();
            for g in &grefs[..np] {
                match rig.page_of(*g) {
                    // An indirect page the guest also reads into: content unknown.
                    Some((_, Grant::Rw(_))) => return (None, None),
                    Some(_) => pages.extend(page_bytes(rig, *g).unwrap()),
                    None => return (Some(vec![-1]), None),
                }
            }
            model_indirect(write, sector, nr, &pages, &d.disk)
        }
        e => e,
    };
    match e {
        Expect::Reject(st) => (Some(vec![st]), None),
        Expect::Flush => (Some(vec![0]), None),
        // A zero-length discard is answered OKAY without I/O (as Linux blkback).
        Expect::Discard { nr: 0, .. } => (Some(vec![0]), None),
        Expect::Discard { .. } => (Some(vec![0]), None),
        Expect::Rw {
            write,
            sector,
            pieces,
            ..
        } => {
            let ok = pieces.iter().all(|(g, _, _)| match rig.page_of(*g) {
                Some((_, Grant::Rw(_))) => true,
                Some(_) => write,
                None => false,
            });
            (
                Some(vec![if ok { 0 } else { -1 }]),
                Some((write, sector, pieces)),
            )
        }
        Expect::Indirect { .. } => unreachable!("resolved above"),
    }
}

fn rd32(p: &GuestPages, at: usize) -> u32 {
    let mut b = [0u8; 4];
    p.copy_out(at, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr32(p: &GuestPages, at: usize, v: u32) {
    p.copy_in(at, &v.to_le_bytes()).unwrap();
}

/// Run one batch on device `i`. Returns false if the device was disconnected
/// (and has been reconnected).
fn batch(rig: &mut Rig, i: usize, inp: &mut Input) {
    rig.salt = rig.salt.wrapping_add(1);
    let salt = rig.salt;
    // Bogus producer indices (251..=253) cost a disconnect and a reconnect
    // through xenstore, 100 times an honest batch: a second byte gates them
    // so the fuzzer spends its time mostly on requests.
    let mode = match inp.u8() {
        m @ 251..=253 if inp.u8() < 64 => m,
        251..=253 => 0,
        m => m,
    };
    let k = u32::from(inp.u8()) % (rig.devs[i].size() + 1);
    let d = &rig.devs[i];
    let o = off(d.abi);
    let size = d.size();
    let conn = d.conn.as_ref().expect("connected");
    let (req_prod0, rsp_cons0) = (conn.req_prod, conn.rsp_cons);
    assert_eq!(req_prod0, rsp_cons0, "previous batch fully answered");

    // Guest data pages get fresh contents, so stale or foreign bytes show.
    let mut rw_before = vec![0u8; NR_RW * PAGE];
    for (k2, b) in rw_before.iter_mut().enumerate() {
        *b = pattern(salt, k2 / SECTOR, k2 % SECTOR);
    }
    rig.guest.write_page(rig.rw_first, 0, &rw_before).unwrap();
    let mut ro = vec![0u8; NR_RO * PAGE];
    for (k2, b) in ro.iter_mut().enumerate() {
        *b = pattern(salt ^ 0x5a5a, k2 / SECTOR, k2 % SECTOR);
    }
    rig.guest.write_page(rig.ro_first, 0, &ro).unwrap();
    fill_indirect(rig, inp);

    let d = &rig.devs[i];
    let mut sent = Vec::new();
    for n in 0..k {
        let id = u64::from(salt) << 32 | u64::from(n);
        let bytes = make_slot(rig, d, inp, id);
        let idx = req_prod0.wrapping_add(n);
        let at = 64 + (idx & (size - 1)) as usize * o.slot;
        d.conn.as_ref().unwrap().pages.copy_in(at, &bytes).unwrap();
        let echo = if bytes[0] == OP_INDIRECT {
            bytes[1]
        } else {
            bytes[0]
        };
        let id = u64::from_le_bytes(bytes[o.id..o.id + 8].try_into().unwrap());
        sent.push(Sent { id, echo, bytes });
    }
    // The producer index: honest, or bogus.
    let (new_prod, bogus) = match mode {
        251 => (req_prod0.wrapping_add(size + 1 + u32::from(inp.u8())), true),
        252 => (req_prod0.wrapping_sub(1 + u32::from(inp.u8())), true),
        253 => {
            let p = inp.u32();
            let bogus = p.wrapping_sub(req_prod0) > size;
            if !bogus {
                // A "random" but valid index: the slots' contents are what was
                // there before; only structural checks apply.
                (p, false)
            } else {
                (p, true)
            }
        }
        _ => (req_prod0.wrapping_add(k), false),
    };
    let honest = mode < 251;
    let conn = rig.devs[i].conn.as_ref().unwrap();
    let pages = &conn.pages;
    let mut header_before = [0u8; 64];
    pages.copy_out(0, &mut header_before).unwrap();
    let ring_before = {
        let mut v = vec![0u8; rig.devs[i].nr_pages() * PAGE];
        pages.copy_out(0, &mut v).unwrap();
        v
    };
    if mode == 250 {
        // Do not ask for notifications.
        wr32(pages, 12, rsp_cons0.wrapping_sub(1000));
    } else {
        wr32(pages, 12, rsp_cons0.wrapping_add(1));
    }
    wr32(pages, 0, new_prod);
    conn.evtchn.notify().expect("kick");

    // Wait for the answers, or for the device to be dropped.
    let want = new_prod.wrapping_sub(rsp_cons0);
    let t0 = Instant::now();
    let be_state = format!("{}/state", rig.devs[i].be());
    let mut disconnected = false;
    loop {
        let rsp = rd32(pages, 8);
        let got = rsp.wrapping_sub(rsp_cons0);
        assert!(
            got <= want || bogus,
            "device {i}: {got} responses for {want} requests"
        );
        if got == want && !bogus {
            break;
        }
        if bogus && rig.state(&be_state) != 4 {
            disconnected = true;
            break;
        }
        // Liveness: the backend's workers check, before each sleep, that no
        // consumed request waits with nothing in flight to wake it. One that
        // does is a failure now, not after the timeout.
        let stalls = rig.stalls();
        assert!(
            stalls == 0,
            "device {i}: liveness: {got} of {want} requests answered and the backend \
             reports {stalls} stall(s): a consumed request waits with nothing in flight"
        );
        assert!(
            t0.elapsed() < TIMEOUT,
            "device {i}: {got} of {want} requests answered after {TIMEOUT:?} (bogus index: {bogus}, violations {:?})",
            rig.platform.violations.lock().unwrap()
        );
        // As RING_FINAL_CHECK_FOR_RESPONSES: ask for the next one, look again.
        if mode != 250 {
            wr32(pages, 12, rsp.wrapping_add(1));
            if rd32(pages, 8) != rsp {
                continue;
            }
        }
        if conn
            .evtchn
            .wait_pending(Some(Duration::from_millis(2)))
            .unwrap_or(false)
        {
            let _ = conn.evtchn.ack();
        }
    }
    let v = std::mem::take(&mut *rig.platform.violations.lock().unwrap());
    assert!(v.is_empty(), "backend broke grant-copy rules: {v:?}");
    let stalls = rig.stalls();
    assert!(
        stalls == 0,
        "device {i}: liveness: the backend reports {stalls} stall(s) after the batch"
    );
    if bogus {
        assert!(disconnected);
        let len = std::fs::metadata(&rig.devs[i].image).unwrap().len();
        assert_eq!(len as usize, IMAGE_BYTES, "image size changed");
        rig.devs[i].shadow = std::fs::read(&rig.devs[i].image).unwrap();
        rig.reconnect(i);
        return;
    }
    let conn = rig.devs[i].conn.as_mut().unwrap();
    conn.req_prod = new_prod;
    conn.rsp_cons = new_prod;
    let conn = rig.devs[i].conn.as_ref().unwrap();
    let pages = &conn.pages;
    let mut ring_after = vec![0u8; rig.devs[i].nr_pages() * PAGE];
    pages.copy_out(0, &mut ring_after).unwrap();

    // Header: the guest owns req_prod and rsp_event, the backend writes
    // req_event and rsp_prod; the padding after them must not change.
    assert_eq!(
        &header_before[16..],
        &ring_after[16..64],
        "backend wrote the ring header's padding"
    );
    assert_eq!(rd32(pages, 0), new_prod, "backend wrote req_prod");

    // Responses: one per request, padding zero, rest of the slot untouched.
    let rsp_size = d_rsp_size(rig.devs[i].abi);
    let mut answers: Vec<(u64, u8, i16)> = Vec::new();
    for n in 0..want {
        let idx = rsp_cons0.wrapping_add(n);
        let at = 64 + (idx & (size - 1)) as usize * o.slot;
        let slot = &ring_after[at..at + o.slot];
        let id = u64::from_le_bytes(slot[0..8].try_into().unwrap());
        let op = slot[8];
        assert_eq!(slot[9], 0, "response padding byte 9 not zero");
        let st = i16::from_le_bytes([slot[10], slot[11]]);
        if rsp_size == 16 {
            assert_eq!(
                &slot[12..16],
                &[0, 0, 0, 0],
                "response padding 12..16 not zero"
            );
        }
        assert_eq!(
            &slot[rsp_size..],
            &ring_before[at + rsp_size..at + o.slot],
            "backend wrote past the response in slot {idx}"
        );
        assert!([0, -1, -2].contains(&st), "status {st}");
        answers.push((id, op, st));
    }
    // The rest of the ring (slots not in this batch) is untouched.
    let first_slot_end = 64 + size as usize * o.slot;
    for n in want..size {
        let idx = rsp_cons0.wrapping_add(n);
        let at = 64 + (idx & (size - 1)) as usize * o.slot;
        assert_eq!(
            &ring_after[at..at + o.slot],
            &ring_before[at..at + o.slot],
            "backend wrote to an unused slot {idx}"
        );
    }
    assert_eq!(
        &ring_after[first_slot_end..],
        &ring_before[first_slot_end..],
        "backend wrote past the last slot"
    );

    if !honest {
        // Slots not written by this batch: only structure was checked.
        check_image_unchanged_size(rig, i);
        rig.devs[i].shadow = std::fs::read(&rig.devs[i].image).unwrap();
        return;
    }

    // Match requests to responses (any order) and check the statuses.
    let d = &rig.devs[i];
    let mut pool: Vec<Option<(u64, u8, i16)>> = answers.into_iter().map(Some).collect();
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new(); // (sector, data) of OKAY writes
    let mut discards: Vec<(u64, u64)> = Vec::new();
    let mut reads: Vec<(bool, u64, Pieces)> = Vec::new(); // (ok, sector, pieces)
                                                          // A guest page both read into and written from in one batch (only when
                                                          // the input insists): the written data is then unknowable; the
                                                          // structural checks above and the statuses still apply.
    let mut read_pages = std::collections::HashSet::new();
    let mut write_pages = std::collections::HashSet::new();
    for s in &sent {
        if let (_, Some((write, _, pieces))) = expected(rig, d, s) {
            for (g, _, _) in &pieces {
                if let Some((_, Grant::Rw(p))) = rig.page_of(*g) {
                    if write {
                        write_pages.insert(p);
                    } else {
                        read_pages.insert(p);
                    }
                }
            }
        }
    }
    let data_checks = read_pages.is_disjoint(&write_pages);
    for s in &sent {
        let (exp, xfer) = expected(rig, d, s);
        // Requests share ids only if the input made them so; take any match
        // with an allowed status.
        let pos = pool
            .iter()
            .position(|a| {
                a.is_some_and(|(id, op, st)| {
                    id == s.id && op == s.echo && exp.as_ref().is_none_or(|e| e.contains(&st))
                })
            })
            .unwrap_or_else(|| {
                panic!(
                    "device {i}: no response for request id {:#x} op {} (expected status {exp:?}); responses {pool:?}",
                    s.id, s.echo
                )
            });
        let (_, _, st) = pool[pos].take().unwrap();
        if let Some((write, sector, pieces)) = xfer {
            if write && st == 0 {
                let mut data = Vec::new();
                for (g, off, len) in &pieces {
                    let p = page_bytes_before(rig, *g, &rw_before, &ro);
                    data.extend_from_slice(&p[usize::from(*off)..usize::from(*off + *len)]);
                }
                writes.push((sector, data));
            } else if !write {
                reads.push((st == 0, sector, pieces));
            }
        }
        if s.bytes[0] == OP_DISCARD && st == 0 {
            let o = off(d.abi);
            let sector = u64::from_le_bytes(s.bytes[o.sector..o.sector + 8].try_into().unwrap());
            let nr =
                u64::from_le_bytes(s.bytes[o.discard_nr..o.discard_nr + 8].try_into().unwrap());
            discards.push((sector, nr));
        }
    }

    if !data_checks {
        check_image_unchanged_size(rig, i);
        rig.devs[i].shadow = std::fs::read(&rig.devs[i].image).unwrap();
        return;
    }

    // The image: each sector unchanged, or written/discarded by this batch.
    let post = std::fs::read(&d.image).unwrap();
    assert_eq!(post.len(), IMAGE_BYTES, "image size changed");
    let pre = &d.shadow;
    let mut cands: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    for (sector, data) in &writes {
        for (j, chunk) in data.chunks(SECTOR).enumerate() {
            cands
                .entry(*sector as usize + j)
                .or_default()
                .push(chunk.to_vec());
        }
    }
    for (sector, nr) in &discards {
        for s in *sector..sector + nr {
            cands.entry(s as usize).or_default().push(vec![0u8; SECTOR]);
        }
    }
    let zero_ok = |s: usize| {
        discards
            .iter()
            .any(|(a, n)| (*a..a + n).contains(&(s as u64)))
    };
    for s in 0..IMAGE_BYTES / SECTOR {
        let now = &post[s * SECTOR..(s + 1) * SECTOR];
        let was = &pre[s * SECTOR..(s + 1) * SECTOR];
        let c = cands.get(&s);
        let allowed = now == was || c.is_some_and(|c| c.iter().any(|x| x == now));
        assert!(
            allowed || (zero_ok(s) && now.iter().all(|b| *b == 0)),
            "device {i}: image sector {s} holds bytes no request of this batch wrote"
        );
        // An answered write with no competitor must have landed.
        if let Some(c) = c {
            if c.len() == 1 && !zero_ok(s) {
                assert_eq!(
                    now,
                    &c[0][..],
                    "device {i}: answered write to sector {s} not on disk"
                );
            }
        }
    }

    // Guest memory: rw pages change only where a read pointed, to image data.
    let mut rw_after = vec![0u8; NR_RW * PAGE];
    rig.guest.read_page(rig.rw_first, 0, &mut rw_after).unwrap();
    // (page index, sector in page) -> disk sectors that may land there.
    let mut dest: HashMap<(usize, usize), Vec<(usize, bool)>> = HashMap::new();
    for (ok, sector, pieces) in &reads {
        let mut ds = *sector as usize;
        for (g, off, len) in pieces {
            let Some((_, Grant::Rw(p))) = rig.page_of(*g) else {
                ds += usize::from(*len) / SECTOR;
                continue;
            };
            for q in 0..usize::from(*len) / SECTOR {
                dest.entry((p, usize::from(*off) / SECTOR + q))
                    .or_default()
                    .push((ds + q, *ok));
            }
            ds += usize::from(*len) / SECTOR;
        }
    }
    let image_ok = |ds: usize, bytes: &[u8]| {
        bytes == &pre[ds * SECTOR..(ds + 1) * SECTOR]
            || bytes == &post[ds * SECTOR..(ds + 1) * SECTOR]
            || cands.get(&ds).is_some_and(|c| c.iter().any(|x| x == bytes))
            || (zero_ok(ds) && bytes.iter().all(|b| *b == 0))
    };
    for p in 0..NR_RW {
        for q in 0..PAGE / SECTOR {
            let at = p * PAGE + q * SECTOR;
            let now = &rw_after[at..at + SECTOR];
            let was = &rw_before[at..at + SECTOR];
            let targets = dest.get(&(p, q));
            if now != was {
                let t = targets.unwrap_or_else(|| {
                    panic!(
                        "device {i}: guest page {p} sector {q} changed but no read pointed there"
                    )
                });
                assert!(
                    t.iter().any(|(ds, _)| image_ok(*ds, now)),
                    "device {i}: guest page {p} sector {q} got bytes that are not the disk's (sectors {t:?})"
                );
            } else if let Some(t) = targets {
                if t.len() == 1 && t[0].1 {
                    // An answered read must have delivered (the salted page
                    // content cannot equal image data).
                    assert!(
                        image_ok(t[0].0, now),
                        "device {i}: answered read left guest page {p} sector {q} untouched"
                    );
                }
            }
        }
    }
    rig.devs[i].shadow = post;
}

fn page_bytes_before(rig: &Rig, g: GrantRef, rw: &[u8], ro: &[u8]) -> Vec<u8> {
    match rig.page_of(g) {
        Some((_, Grant::Rw(k))) => rw[k * PAGE..(k + 1) * PAGE].to_vec(),
        Some((_, Grant::Ro(k))) => ro[k * PAGE..(k + 1) * PAGE].to_vec(),
        Some(_) => page_bytes(rig, g).unwrap(),
        None => unreachable!("an answered write names only granted pages"),
    }
}

fn check_image_unchanged_size(rig: &Rig, i: usize) {
    let len = std::fs::metadata(&rig.devs[i].image).unwrap().len();
    assert_eq!(len as usize, IMAGE_BYTES, "image size changed");
}

fn d_rsp_size(abi: Abi) -> usize {
    abi.response_size()
}

static RIG: OnceLock<Mutex<Option<Rig>>> = OnceLock::new();

/// The fuzz target body. The simulated machine and the backend are set up
/// once per process and reused (devices reconnect after a bogus ring).
pub fn run(data: &[u8]) {
    let cell = RIG.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
    let rig = guard.get_or_insert_with(Rig::new);
    let mut inp = Input::new(data);
    let i = usize::from(inp.u8()) % rig.devs.len();
    for _ in 0..8 {
        if inp.is_empty() {
            break;
        }
        batch(rig, i, &mut inp);
    }
}

/// Tear the shared rig down (tests call this so the temp dir is removed).
pub fn shutdown() {
    if let Some(cell) = RIG.get() {
        let rig = cell.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(rig);
    }
}
