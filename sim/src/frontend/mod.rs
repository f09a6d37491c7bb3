//! A simulated guest's blkfront: the frontend half of blkif, following Linux
//! `xen-blkfront`, on the simulated Xen ([`crate`]). Used by the
//! integration tests, `refblk demo` and benchmarks.
//!
//! Written from `xen/io/blkif.h` and `xen/io/ring.h` independently of the
//! backend's parser ([`refblk_core::blkif`]): the byte layout is in [`wire`].
//!
//! - [`Toolstack`] creates a vbd as libxl does (backend and frontend
//!   directories, permissions), plays the hotplug script's `add` (hands the
//!   image to the backend with [`BackendHandle::attach`](refblk_core::backend::BackendHandle::attach))
//!   and removes the device as libxl does.
//! - [`Frontend::connect`] does blkfront's handshake as the guest domain:
//!   waits for the backend's InitWait, reads its limits, sets up rings and
//!   event channels (1..16 pages per ring, 1..N queues), publishes them in one
//!   transaction, goes Initialised, waits for Connected and reads the disk.
//! - I/O: [`Frontend::submit`] queues a request of any size (split into direct
//!   requests of at most 11 segments, or INDIRECT requests up to the
//!   negotiated segment count) without waiting; [`Frontend::poll`],
//!   [`Frontend::wait`] and [`Frontend::wait_for`] collect [`Completion`]s.
//!   [`Frontend::read`], [`Frontend::write`], ... are the blocking forms.
//!   Data pages are granted per request (read-only for writes) and the
//!   access is ended after the response, unless persistent grants were
//!   negotiated.
//! - Hostile mode ([`Frontend::raw_push`], [`Frontend::raw_set_req_prod`],
//!   [`Frontend::raw_write_slot`], [`Frontend::revoke_grants`],
//!   [`Frontend::raw_ring_pages`],
//!   [`FrontendOptions::xenstore_overrides`], [`Frontend::xs`],
//!   [`Frontend::guest`]): write any bytes into ring slots, indices, grant
//!   entries and xenstore keys.
//! - Every response is checked ([`Anomalies`]): padding bytes must be zero
//!   or what we wrote, the rest of the slot must be untouched, the operation
//!   echoed must be the one expected, ids must be ours.
//! - [`Frontend::disconnect`] (Closing, wait for the backend, Closed, end the
//!   ring grants, give the cached data pages back to the guest) and
//!   [`Frontend::reconnect`] (back to Initialising).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use refblk::frontend::*;
//! # fn demo(sim: &refblk::platform::sim::SimXen, ts: &Toolstack) -> std::io::Result<()> {
//! ts.create_domain(5)?;
//! let guest = Arc::new(sim.create_guest(5, 1024)?);
//! ts.add_vbd(&VbdSpec::new(5, 51712, "/tmp/disk.img"))?;
//! let mut fe = Frontend::connect(&sim.xenstored_path(), guest, 51712, FrontendOptions::default())?;
//! fe.write(0, &[7u8; 4096])?;
//! assert_eq!(fe.read(0, 4096)?, vec![7u8; 4096]);
//! fe.disconnect()?;
//! # Ok(()) }
//! ```

mod ring;
mod toolstack;
pub mod wire;

pub use toolstack::{pool_target, Toolstack, Vbd, VbdSpec};
pub use wire::Abi;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use xen_sys::xenbus::XenbusState;

use crate::SimGuest;
use refblk_core::platform::{DomId, EventChannel, GrantRef};
use refblk_core::xenstore::XsClient;
use ring::FrontRing;
use wire::Seg;

/// Guest pages taken from the guest's allocator at once for data.
const DATA_PAGE_BATCH: u32 = 64;

/// Which `protocol` key the frontend writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `x86_64-abi`
    X86_64,
    /// `x86_32-abi`
    X86_32,
    /// No `protocol` key: the backend assumes x86_32 (as blkback does on
    /// x86), so the ring uses the x86_32 layout.
    Absent,
}

impl Protocol {
    /// The ring layout this choice implies.
    pub fn abi(self) -> Abi {
        match self {
            Protocol::X86_64 => Abi::X86_64,
            Protocol::X86_32 | Protocol::Absent => Abi::X86_32,
        }
    }
}

/// How the frontend connects.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// ABI / `protocol` key.
    pub protocol: Protocol,
    /// Wanted ring order (pages = 2^order), capped by `max-ring-page-order`.
    pub ring_page_order: u32,
    /// Wanted queues, capped by `multi-queue-max-queues`.
    pub queues: u32,
    /// Use INDIRECT requests if the backend offers them.
    pub indirect: bool,
    /// Our cap on segments per indirect request (Linux's `max_indirect_segments`).
    pub max_indirect_segments: u32,
    /// Offer `feature-persistent`.
    pub persistent: bool,
    /// Fill bytes of each request slot that no field covers with junk (a
    /// correct backend ignores them).
    pub scribble: bool,
    /// Timeout of every wait (xenstore states, responses).
    pub timeout: Duration,
    /// Hostile: keys (relative to the frontend directory) written (`Some`) or
    /// removed (`None`) in the connect transaction after the normal ones.
    pub xenstore_overrides: Vec<(String, Option<String>)>,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            protocol: Protocol::X86_64,
            ring_page_order: 0,
            queues: 1,
            indirect: true,
            max_indirect_segments: 256,
            persistent: false,
            scribble: true,
            timeout: Duration::from_secs(20),
            xenstore_overrides: Vec::new(),
        }
    }
}

/// What the backend told us about the disk, and what we negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// `sectors` (512-byte units).
    pub sectors: u64,
    /// `sector-size`
    pub sector_size: u32,
    /// `physical-sector-size` (defaults to `sector-size`)
    pub physical_sector_size: u32,
    /// `info` bits
    pub info: u32,
    /// `info & VDISK_READONLY`
    pub read_only: bool,
    /// `feature-flush-cache`
    pub flush: bool,
    /// `feature-barrier`
    pub barrier: bool,
    /// `feature-discard`
    pub discard: bool,
    /// `discard-granularity` (defaults to `sector-size`)
    pub discard_granularity: u32,
    /// `discard-alignment`
    pub discard_alignment: u32,
    /// `discard-secure`
    pub discard_secure: bool,
    /// Persistent grants in use (both sides said 1).
    pub persistent: bool,
    /// `feature-max-indirect-segments` of the backend (0 = none).
    pub backend_max_indirect_segments: u32,
    /// Segments we put in one request (11 without indirect).
    pub segments_per_request: usize,
    /// Pages per ring.
    pub ring_pages: usize,
    /// Slots per ring.
    pub ring_size: u32,
    /// Queues in use.
    pub queues: usize,
    /// Ring layout.
    pub abi: Abi,
}

/// A submitted request (one user operation, maybe several ring requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u64);

/// An I/O operation for [`Frontend::submit`]. Sectors are 512-byte units;
/// lengths must be multiples of 512 (the frontend does not check the range
/// or the alignment to `sector-size`: that is the backend's job).
#[derive(Debug, Clone, Copy)]
pub enum IoRequest<'a> {
    /// Read `len` bytes at `sector`.
    Read { sector: u64, len: usize },
    /// Write `data` at `sector`.
    Write { sector: u64, data: &'a [u8] },
    /// Read `len` bytes at `sector` into guest pages and leave them there, as an
    /// O_DIRECT read does in a real guest (blkfront grants the application's
    /// pages; nothing is copied): the completion carries no data. For load
    /// generation.
    ReadInPlace { sector: u64, len: usize },
    /// Write `len` bytes at `sector` from guest pages as they are, without
    /// copying data into them first (an O_DIRECT write of a buffer the
    /// application filled earlier). The bytes written are whatever those pages
    /// hold. For load generation.
    WriteInPlace { sector: u64, len: usize },
    /// FLUSH_DISKCACHE.
    Flush,
    /// WRITE_BARRIER with `data` (at most 11 pages; may be empty).
    Barrier { sector: u64, data: &'a [u8] },
    /// DISCARD of `nr_sectors` at `sector`, `secure` sets BLKIF_DISCARD_SECURE.
    Discard {
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
}

/// A finished operation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub tag: Tag,
    /// Worst status of its ring requests (`wire::RSP_*`).
    pub status: i16,
    /// Data of a read (all zeros where a part failed).
    pub data: Vec<u8>,
    /// Ring requests it took.
    pub ring_requests: usize,
}

impl Completion {
    /// `Ok(data)` for BLKIF_RSP_OKAY, else an error naming the status.
    pub fn into_result(self) -> io::Result<Vec<u8>> {
        status_result(self.status).map(|()| self.data)
    }
}

fn status_result(status: i16) -> io::Result<()> {
    match status {
        wire::RSP_OKAY => Ok(()),
        wire::RSP_EOPNOTSUPP => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "backend answered BLKIF_RSP_EOPNOTSUPP",
        )),
        s => Err(io::Error::other(format!("backend answered status {s}"))),
    }
}

/// A response to a [`Frontend::raw_push`] request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawResponse {
    pub queue: usize,
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// Protocol violations seen in the backend's responses. A correct backend
/// leaves every counter at 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Anomalies {
    /// Response padding bytes that are neither 0 nor what we had written there.
    pub padding_not_ours: u64,
    /// Slot bytes past the response that changed.
    pub slot_tail_changed: u64,
    /// Responses echoing another operation than the request's (inner op for INDIRECT).
    pub wrong_operation: u64,
    /// Responses with an id we never used (or answered twice).
    pub unknown_id: u64,
    /// Grants still mapped by the backend after their response.
    pub grants_left_mapped: u64,
    /// `rsp_prod` more than a ring ahead of what we consumed.
    pub bogus_rsp_prod: u64,
}

impl Anomalies {
    /// Whether nothing was seen.
    pub fn is_clean(&self) -> bool {
        *self == Anomalies::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct Page {
    frame: u32,
    gref: GrantRef,
}

struct DataSeg {
    page: Page,
    page_off: usize,
    len: usize,
    buf_off: usize,
    revoked: bool,
}

/// One ring request in flight.
struct RingReq {
    /// The user operation, or None for raw (hostile) requests.
    tag: Option<u64>,
    expect_op: u8,
    segs: Vec<DataSeg>,
    indirect: Vec<Page>,
    indirect_revoked: bool,
}

struct UserOp {
    remaining: usize,
    total: usize,
    status: i16,
    data: Vec<u8>,
    is_read: bool,
}

struct Queue {
    ring: FrontRing,
    ring_first_page: u32,
    ring_pages: u32,
    ring_grefs: Vec<GrantRef>,
    evtchn: Box<dyn EventChannel>,
    inflight: HashMap<u64, RingReq>,
    /// What we last wrote into each slot.
    shadow: Vec<Vec<u8>>,
}

/// The guest's block frontend for one vbd. See the module docs.
///
/// Dropping it without [`disconnect`](Frontend::disconnect) is what a crashed
/// guest kernel does: nothing is closed in xenstore and the grants stay in
/// the guest's table (destroy the [`SimGuest`] to end the domain).
pub struct Frontend {
    xs: XsClient,
    guest: Arc<SimGuest>,
    domid: DomId,
    devid: u32,
    fe_path: String,
    be_path: String,
    backend_id: DomId,
    opts: FrontendOptions,
    state: XenbusState,
    info: Option<DiskInfo>,
    queues: Vec<Queue>,
    next_id: u64,
    next_tag: u64,
    ops: HashMap<u64, UserOp>,
    done: VecDeque<Completion>,
    free_pages: Vec<u32>,
    persistent_pool: Vec<Page>,
    anomalies: Anomalies,
    raw_responses: Vec<RawResponse>,
    next_queue: usize,
    plugged: bool,
}

fn xs_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn timed_out(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

fn parse_state(s: Option<String>) -> XenbusState {
    s.and_then(|v| v.trim().parse::<u32>().ok())
        .and_then(XenbusState::from_u32)
        .unwrap_or(XenbusState::Unknown)
}

impl Frontend {
    /// Connect device `devid` of `guest` (whose directories a [`Toolstack`]
    /// made) as blkfront does; returns once both ends are Connected.
    /// `xenstored` is the simulator's socket ([`crate::SimXen::xenstored_path`]).
    pub fn connect(
        xenstored: &Path,
        guest: Arc<SimGuest>,
        devid: u32,
        opts: FrontendOptions,
    ) -> io::Result<Frontend> {
        let domid = guest.domid();
        let xs = XsClient::connect_as_domain(xenstored, domid).map_err(|e| {
            xs_err(
                &format!("{}: xenstore as dom{domid}", xenstored.display()),
                e,
            )
        })?;
        let fe_path = format!("/local/domain/{domid}/device/vbd/{devid}");
        let be_path = xs
            .read_string(0, &format!("{fe_path}/backend"))
            .map_err(|e| xs_err(&format!("{fe_path}/backend"), e))?;
        let backend_id = xs
            .read_string(0, &format!("{fe_path}/backend-id"))
            .map_err(|e| xs_err(&format!("{fe_path}/backend-id"), e))?
            .trim()
            .parse::<DomId>()
            .map_err(|e| xs_err(&format!("{fe_path}/backend-id"), e))?;
        xs.watch(&format!("{be_path}/state"), "fe:be-state")
            .map_err(|e| xs_err(&format!("watch {be_path}/state"), e))?;
        let mut fe = Frontend {
            xs,
            guest,
            domid,
            devid,
            fe_path,
            be_path,
            backend_id,
            opts,
            state: XenbusState::Initialising,
            info: None,
            queues: Vec::new(),
            next_id: 1,
            next_tag: 1,
            ops: HashMap::new(),
            done: VecDeque::new(),
            free_pages: Vec::new(),
            persistent_pool: Vec::new(),
            anomalies: Anomalies::default(),
            raw_responses: Vec::new(),
            next_queue: 0,
            plugged: false,
        };
        fe.talk_to_backend(false)?;
        Ok(fe)
    }

    // ---------------------------------------------------------------- xenbus

    fn read_opt(&self, path: &str) -> io::Result<Option<String>> {
        self.xs
            .try_read_string(0, path)
            .map_err(|e| xs_err(&format!("read {path}"), e))
    }

    fn read_be_uint(&self, key: &str, default: u64) -> io::Result<u64> {
        let p = format!("{}/{key}", self.be_path);
        match self.read_opt(&p)? {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|e| xs_err(&format!("{p}: bad value {v:?}"), e)),
        }
    }

    fn switch_state(&mut self, s: XenbusState) -> io::Result<()> {
        let p = format!("{}/state", self.fe_path);
        self.xs
            .write(0, &p, (s as u32).to_string().as_bytes())
            .map_err(|e| xs_err(&format!("write {p}"), e))?;
        debug!("dom{} vbd {}: frontend {:?}", self.domid, self.devid, s);
        self.state = s;
        Ok(())
    }

    /// The backend's current state (`Unknown` once the toolstack removed the
    /// directory, which a guest may no longer be allowed to look at).
    pub fn backend_state(&self) -> io::Result<XenbusState> {
        let p = format!("{}/state", self.be_path);
        match self.xs.try_read_string(0, &p) {
            Ok(v) => Ok(parse_state(v)),
            Err(e) if e.is_eacces() || e.is_enoent() => Ok(XenbusState::Unknown),
            Err(e) => Err(xs_err(&format!("read {p}"), e)),
        }
    }

    /// Wait until the backend's state satisfies `pred` (or `timeout`).
    pub fn wait_backend_state(
        &self,
        pred: impl Fn(XenbusState) -> bool,
        timeout: Duration,
    ) -> io::Result<XenbusState> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.backend_state()?;
            if pred(s) {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(format!(
                    "{}: backend stayed in state {s:?}",
                    self.be_path
                )));
            }
            // Any watch event (or a slice of time) makes us look again.
            let _ = self
                .xs
                .events()
                .recv_timeout(left.min(Duration::from_millis(200)));
        }
    }

    /// blkfront's `talk_to_blkback` + `blkfront_connect`.
    /// `reconnecting`: the backend is still Closed from the last connection
    /// until it notices our Initialising; wait through that.
    fn talk_to_backend(&mut self, reconnecting: bool) -> io::Result<()> {
        use XenbusState as S;
        let s = self.wait_backend_state(
            |s| matches!(s, S::InitWait | S::Closing) || (s == S::Closed && !reconnecting),
            self.opts.timeout,
        )?;
        if s != S::InitWait {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{}: backend is {s:?}, not InitWait", self.be_path),
            ));
        }
        let max_order = self.read_be_uint("max-ring-page-order", 0)?;
        let max_queues = self.read_be_uint("multi-queue-max-queues", 1)?.max(1);
        let order = u64::from(self.opts.ring_page_order).min(max_order).min(4) as u32;
        let nq = u64::from(self.opts.queues.max(1)).min(max_queues) as usize;
        let abi = self.opts.protocol.abi();
        let nr_pages = 1u32 << order;

        if let Err(e) = self.setup_queues(nq, nr_pages, abi) {
            self.teardown_queues();
            return Err(e);
        }
        if let Err(e) = self.publish(order, nr_pages) {
            self.teardown_queues();
            return Err(e);
        }
        self.switch_state(S::Initialised)?;
        let s = self.wait_backend_state(
            |s| matches!(s, S::Connected | S::Closing | S::Closed),
            self.opts.timeout,
        );
        match s {
            Ok(S::Connected) => {}
            Ok(other) => {
                let _ = self.switch_state(S::Closed);
                self.teardown_queues();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{}: backend went {other:?} instead of Connected",
                        self.be_path
                    ),
                ));
            }
            Err(e) => {
                let _ = self.switch_state(S::Closed);
                self.teardown_queues();
                return Err(e);
            }
        }
        let info = self.read_disk_info(nr_pages as usize, abi)?;
        debug!("dom{} vbd {}: connected: {info:?}", self.domid, self.devid);
        self.info = Some(info);
        self.switch_state(S::Connected)
    }

    fn setup_queues(&mut self, nq: usize, nr_pages: u32, abi: Abi) -> io::Result<()> {
        for _ in 0..nq {
            let first = self.guest.alloc_pages(nr_pages)?;
            let pages = self.guest.pages(first, nr_pages)?;
            let ring = FrontRing::new(pages, abi);
            let mut grefs = Vec::new();
            for i in 0..nr_pages {
                match self.guest.grant(first + i, self.backend_id, false) {
                    Ok(g) => grefs.push(g),
                    Err(e) => {
                        for g in grefs {
                            let _ = self.guest.end_access(g);
                        }
                        let _ = self.guest.free_pages(first, nr_pages);
                        return Err(e);
                    }
                }
            }
            let evtchn = match self.guest.alloc_unbound(self.backend_id) {
                Ok(e) => e,
                Err(e) => {
                    for g in grefs {
                        let _ = self.guest.end_access(g);
                    }
                    let _ = self.guest.free_pages(first, nr_pages);
                    return Err(e);
                }
            };
            let size = ring.size() as usize;
            self.queues.push(Queue {
                ring,
                ring_first_page: first,
                ring_pages: nr_pages,
                ring_grefs: grefs,
                evtchn,
                inflight: HashMap::new(),
                shadow: vec![vec![0u8; abi.slot_size()]; size],
            });
        }
        Ok(())
    }

    /// Write the transport keys in one transaction (blkfront's talk_to_blkback).
    fn publish(&self, order: u32, nr_pages: u32) -> io::Result<()> {
        let fe = &self.fe_path;
        let xs = &self.xs;
        let nq = self.queues.len();
        xs.transaction(|tx| {
            let w = |k: &str, v: String| xs.write(tx, &format!("{fe}/{k}"), v.as_bytes());
            if nr_pages > 1 {
                w("ring-page-order", order.to_string())?;
            }
            if nq > 1 {
                w("multi-queue-num-queues", nq.to_string())?;
            }
            for (i, q) in self.queues.iter().enumerate() {
                let dir = if nq == 1 {
                    String::new()
                } else {
                    format!("queue-{i}/")
                };
                if nr_pages == 1 {
                    w(&format!("{dir}ring-ref"), q.ring_grefs[0].to_string())?;
                } else {
                    for (j, g) in q.ring_grefs.iter().enumerate() {
                        w(&format!("{dir}ring-ref{j}"), g.to_string())?;
                    }
                }
                w(
                    &format!("{dir}event-channel"),
                    q.evtchn.local_port().to_string(),
                )?;
            }
            match self.opts.protocol {
                Protocol::Absent => {}
                p => w("protocol", p.abi().protocol().to_string())?,
            }
            w(
                "feature-persistent",
                u8::from(self.opts.persistent).to_string(),
            )?;
            for (k, v) in &self.opts.xenstore_overrides {
                match v {
                    Some(v) => w(k, v.clone())?,
                    None => xs.rm(tx, &format!("{fe}/{k}"))?,
                }
            }
            Ok(())
        })
        .map_err(|e| xs_err(&format!("{fe}: publishing the rings"), e))
    }

    fn read_disk_info(&self, ring_pages: usize, abi: Abi) -> io::Result<DiskInfo> {
        let sectors = self.read_be_uint("sectors", u64::MAX)?;
        if sectors == u64::MAX {
            return Err(io::Error::other(format!(
                "{}/sectors missing",
                self.be_path
            )));
        }
        let sector_size = self.read_be_uint("sector-size", 512)? as u32;
        let info = self.read_be_uint("info", 0)? as u32;
        let be_ind = self.read_be_uint("feature-max-indirect-segments", 0)? as u32;
        let seg_cap = if self.opts.indirect && be_ind > 0 {
            (be_ind.min(self.opts.max_indirect_segments) as usize).clamp(
                wire::MAX_SEGMENTS_PER_REQUEST,
                wire::MAX_INDIRECT_PAGES * wire::SEGMENTS_PER_INDIRECT_PAGE,
            )
        } else {
            wire::MAX_SEGMENTS_PER_REQUEST
        };
        let be_persistent = self.read_be_uint("feature-persistent", 0)? == 1;
        Ok(DiskInfo {
            sectors,
            sector_size,
            physical_sector_size: self.read_be_uint("physical-sector-size", sector_size.into())?
                as u32,
            info,
            read_only: info & wire::VDISK_READONLY != 0,
            flush: self.read_be_uint("feature-flush-cache", 0)? == 1,
            barrier: self.read_be_uint("feature-barrier", 0)? == 1,
            discard: self.read_be_uint("feature-discard", 0)? == 1,
            discard_granularity: self.read_be_uint("discard-granularity", sector_size.into())?
                as u32,
            discard_alignment: self.read_be_uint("discard-alignment", 0)? as u32,
            discard_secure: self.read_be_uint("discard-secure", 0)? == 1,
            persistent: self.opts.persistent && be_persistent,
            backend_max_indirect_segments: be_ind,
            segments_per_request: seg_cap,
            ring_pages,
            ring_size: abi.ring_size(ring_pages),
            queues: self.queues.len(),
            abi,
        })
    }

    /// End the ring grants (retrying while the backend still maps them),
    /// free the ring pages, close the event channels.
    fn teardown_queues(&mut self) {
        for q in std::mem::take(&mut self.queues) {
            let mut all_ended = true;
            for g in &q.ring_grefs {
                if !self.end_access_retry(*g) {
                    all_ended = false;
                }
            }
            if all_ended {
                let _ = self.guest.free_pages(q.ring_first_page, q.ring_pages);
            } else {
                self.anomalies.grants_left_mapped += 1;
            }
            for (_, r) in q.inflight {
                self.release_ring_req(r);
            }
        }
        for p in std::mem::take(&mut self.persistent_pool) {
            if self.end_access_retry(p.gref) {
                self.free_pages.push(p.frame);
            }
        }
    }

    fn end_access_retry(&self, gref: GrantRef) -> bool {
        for _ in 0..50 {
            match self.guest.end_access(gref) {
                Ok(true) => return true,
                Ok(false) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return false,
            }
        }
        false
    }

    /// Close the device as blkfront does on unplug: finish what is in flight,
    /// Closing, wait for the backend to close, Closed; then end the ring
    /// grants. The frontend can [`reconnect`](Self::reconnect) afterwards.
    pub fn disconnect(&mut self) -> io::Result<()> {
        use XenbusState as S;
        if self.state == S::Closed {
            return Ok(());
        }
        let deadline = Instant::now() + self.opts.timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            if self.backend_state()? != S::Connected {
                break;
            }
            let _ = self.wait_any(Duration::from_millis(200));
        }
        self.switch_state(S::Closing)?;
        self.wait_backend_state(
            |s| matches!(s, S::Closing | S::Closed | S::Unknown),
            self.opts.timeout,
        )?;
        self.switch_state(S::Closed)?;
        let r = self.wait_backend_state(|s| matches!(s, S::Closed | S::Unknown), self.opts.timeout);
        // Answers that came in while closing.
        self.process_all();
        self.teardown_queues();
        // The data pages cached for reuse go back to the guest: a closed
        // frontend holds no guest memory (a guest that connects and closes
        // many times, possibly through new `Frontend`s, must not run out).
        for p in std::mem::take(&mut self.free_pages) {
            let _ = self.guest.free_page(p);
        }
        // Requests the backend never answered are gone with the rings.
        self.ops.clear();
        self.info = None;
        r.map(|_| ())
    }

    /// After [`disconnect`](Self::disconnect): go back to Initialising and
    /// connect again (the backend answers with a fresh InitWait).
    pub fn reconnect(&mut self) -> io::Result<()> {
        if self.state != XenbusState::Closed {
            return Err(io::Error::other(format!(
                "{}: reconnect from state {:?}",
                self.fe_path, self.state
            )));
        }
        self.switch_state(XenbusState::Initialising)?;
        self.talk_to_backend(true)
    }

    /// Re-read the backend's `sectors`, as blkfront does when the backend
    /// rewrites its state while connected (an online resize). Returns the
    /// new size when it changed.
    pub fn refresh_size(&mut self) -> io::Result<Option<u64>> {
        let sectors = self.read_be_uint("sectors", 0)?;
        let Some(info) = self.info.as_mut() else {
            return Ok(None);
        };
        if sectors == info.sectors {
            return Ok(None);
        }
        debug!(
            "dom{} vbd {}: resized from {} to {sectors} sectors",
            self.domid, self.devid, info.sectors
        );
        info.sectors = sectors;
        Ok(Some(sectors))
    }

    // ------------------------------------------------------------- accessors

    /// The negotiated disk, once connected.
    pub fn info(&self) -> Option<&DiskInfo> {
        self.info.as_ref()
    }

    fn disk(&self) -> io::Result<&DiskInfo> {
        self.info
            .as_ref()
            .ok_or_else(|| io::Error::other(format!("{}: not connected", self.fe_path)))
    }

    /// Our xenbus state.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// The guest (for hostile grant-table writes).
    pub fn guest(&self) -> &Arc<SimGuest> {
        &self.guest
    }

    /// Our xenstore connection, acting as the guest domain.
    pub fn xs(&self) -> &XsClient {
        &self.xs
    }

    /// The frontend directory.
    pub fn frontend_path(&self) -> &str {
        &self.fe_path
    }

    /// The backend directory.
    pub fn backend_path(&self) -> &str {
        &self.be_path
    }

    /// The backend's domain.
    pub fn backend_domid(&self) -> DomId {
        self.backend_id
    }

    /// Number of queues (rings).
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Protocol violations seen so far.
    pub fn anomalies(&self) -> Anomalies {
        self.anomalies
    }

    /// User operations submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    // -------------------------------------------------------------- data I/O

    fn alloc_page(&mut self) -> io::Result<u32> {
        if let Some(p) = self.free_pages.pop() {
            return Ok(p);
        }
        // Take guest pages 64 at a time: the guest's allocator scans its
        // memory on every call.
        match self.guest.alloc_pages(DATA_PAGE_BATCH) {
            Ok(first) => {
                self.free_pages
                    .extend((first + 1..first + DATA_PAGE_BATCH).rev());
                Ok(first)
            }
            Err(_) => self.guest.alloc_page(),
        }
    }

    /// A granted page for data: from the persistent pool (writable grant) or
    /// freshly granted.
    fn data_page(&mut self, readonly: bool) -> io::Result<Page> {
        let persistent = self.info.as_ref().is_some_and(|i| i.persistent);
        if persistent {
            if let Some(p) = self.persistent_pool.pop() {
                return Ok(p);
            }
        }
        let frame = self.alloc_page()?;
        match self
            .guest
            .grant(frame, self.backend_id, readonly && !persistent)
        {
            Ok(gref) => Ok(Page { frame, gref }),
            Err(e) => {
                self.free_pages.push(frame);
                Err(e)
            }
        }
    }

    fn release_page(&mut self, p: Page, revoked: bool) {
        let persistent = self.info.as_ref().is_some_and(|i| i.persistent);
        if persistent && !revoked {
            self.persistent_pool.push(p);
            return;
        }
        if revoked {
            self.free_pages.push(p.frame);
            return;
        }
        match self.guest.end_access(p.gref) {
            Ok(true) => self.free_pages.push(p.frame),
            Ok(false) => {
                // Still mapped after its response: leak the page, like a
                // frontend that cannot get its page back.
                self.anomalies.grants_left_mapped += 1;
            }
            Err(_) => {}
        }
    }

    fn release_ring_req(&mut self, r: RingReq) {
        for s in r.segs {
            self.release_page(s.page, s.revoked);
        }
        for p in r.indirect {
            self.release_page(p, r.indirect_revoked);
        }
    }

    fn pick_queue(&mut self, queue: Option<usize>) -> io::Result<usize> {
        let n = self.queues.len();
        if n == 0 {
            return Err(io::Error::other(format!("{}: not connected", self.fe_path)));
        }
        match queue {
            Some(q) if q < n => Ok(q),
            Some(q) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {q} of {n}"),
            )),
            None => {
                let q = self.next_queue % n;
                self.next_queue = self.next_queue.wrapping_add(1);
                Ok(q)
            }
        }
    }

    /// Queue an operation on `queue` (None: round robin) without waiting for
    /// it; waits only for free ring slots. Collect it with [`poll`](Self::poll),
    /// [`wait`](Self::wait) or [`wait_for`](Self::wait_for).
    pub fn submit(&mut self, queue: Option<usize>, req: IoRequest<'_>) -> io::Result<Tag> {
        let q = self.pick_queue(queue)?;
        let disk = self.disk()?.clone();
        let tag = self.next_tag;
        self.next_tag += 1;
        let (is_read, len) = match req {
            IoRequest::Read { len, .. } => (true, len),
            _ => (false, 0),
        };
        let bytes = match req {
            IoRequest::Read { len, .. }
            | IoRequest::ReadInPlace { len, .. }
            | IoRequest::WriteInPlace { len, .. } => Some((len, false)),
            IoRequest::Write { data, .. } => Some((data.len(), false)),
            IoRequest::Barrier { data, .. } => Some((data.len(), true)),
            IoRequest::Flush | IoRequest::Discard { .. } => None,
        };
        if let Some((n, may_be_empty)) = bytes {
            if n % wire::SECTOR != 0 || (n == 0 && !may_be_empty) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a transfer of {n} bytes: must be a non-zero multiple of 512"),
                ));
            }
        }
        self.ops.insert(
            tag,
            UserOp {
                remaining: 0,
                total: 0,
                status: wire::RSP_OKAY,
                data: vec![0u8; len],
                is_read,
            },
        );
        let r = match req {
            IoRequest::Read { sector, len } | IoRequest::ReadInPlace { sector, len } => {
                self.submit_rw(q, tag, wire::OP_READ, sector, None, len, &disk)
            }
            IoRequest::WriteInPlace { sector, len } => {
                self.submit_rw(q, tag, wire::OP_WRITE, sector, None, len, &disk)
            }
            IoRequest::Write { sector, data } => self.submit_rw(
                q,
                tag,
                wire::OP_WRITE,
                sector,
                Some(data),
                data.len(),
                &disk,
            ),
            IoRequest::Barrier { sector, data } => {
                if data.len() > wire::MAX_SEGMENTS_PER_REQUEST * 4096 {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a barrier carries at most 11 pages",
                    ))
                } else {
                    self.submit_rw(
                        q,
                        tag,
                        wire::OP_WRITE_BARRIER,
                        sector,
                        Some(data),
                        data.len(),
                        &disk,
                    )
                }
            }
            IoRequest::Flush => {
                let mut slot = self.blank_slot(q);
                let id = self.alloc_id();
                wire::encode_rw(
                    disk.abi,
                    &mut slot,
                    wire::OP_FLUSH_DISKCACHE,
                    0,
                    self.handle(),
                    id,
                    0,
                    &[],
                );
                self.post(
                    q,
                    id,
                    slot,
                    Some(tag),
                    wire::OP_FLUSH_DISKCACHE,
                    vec![],
                    vec![],
                )
            }
            IoRequest::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                let mut slot = self.blank_slot(q);
                let id = self.alloc_id();
                let flag = if secure { wire::DISCARD_SECURE } else { 0 };
                wire::encode_discard(
                    disk.abi,
                    &mut slot,
                    flag,
                    self.handle(),
                    id,
                    sector,
                    nr_sectors,
                );
                self.post(q, id, slot, Some(tag), wire::OP_DISCARD, vec![], vec![])
            }
        };
        let published = if self.plugged {
            Ok(())
        } else {
            self.publish_requests(q)
        };
        if let Err(e) = r {
            // Parts already on the ring complete normally; the rest never will.
            if let Some(op) = self.ops.get_mut(&tag) {
                if op.total == 0 {
                    self.ops.remove(&tag);
                } else {
                    op.status = wire::RSP_ERROR;
                }
            }
            return Err(e);
        }
        published?;
        Ok(Tag(tag))
    }

    /// Plug: [`submit`](Self::submit) puts requests on the rings without
    /// publishing them, until [`unplug`](Self::unplug) publishes every ring
    /// at once (blk-mq's batch commit). A full ring is still published.
    pub fn plug(&mut self) {
        self.plugged = true;
    }

    /// Publish what was queued while plugged, kicking the backend where it
    /// asked for it.
    pub fn unplug(&mut self) -> io::Result<()> {
        self.plugged = false;
        for q in 0..self.queues.len() {
            self.publish_requests(q)?;
        }
        Ok(())
    }

    fn handle(&self) -> u16 {
        self.devid as u16
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A slot to encode a request into: junk where no field goes (unless
    /// `scribble` is off), varying with the ring position.
    fn blank_slot(&self, q: usize) -> Vec<u8> {
        let salt = self.queues[q].ring.req_prod_pvt;
        let slot_size = self.opts.protocol.abi().slot_size();
        if self.opts.scribble {
            (0..slot_size)
                .map(|i| (0xa5u32 ^ (i as u32).wrapping_mul(29) ^ salt) as u8)
                .collect()
        } else {
            vec![0u8; slot_size]
        }
    }

    /// Split a read/write into ring requests and post them.
    #[allow(clippy::too_many_arguments)]
    fn submit_rw(
        &mut self,
        q: usize,
        tag: u64,
        op: u8,
        sector: u64,
        data: Option<&[u8]>,
        len: usize,
        disk: &DiskInfo,
    ) -> io::Result<()> {
        let cap = if op == wire::OP_WRITE_BARRIER {
            wire::MAX_SEGMENTS_PER_REQUEST
        } else {
            disk.segments_per_request
        };
        let nsect = (len / wire::SECTOR) as u64;
        let mut done: u64 = 0;
        // A barrier without data is one request with no segments.
        let mut first_round = true;
        while done < nsect || (first_round && nsect == 0) {
            first_round = false;
            let start = sector.wrapping_add(done);
            // Segments follow the page grid of the disk, as page-cache I/O does:
            // the first one starts at (sector % 8) within its page.
            let mut segs: Vec<(u8, u8, usize)> = Vec::new(); // first, last, buf_off
            let mut cur = done;
            while cur < nsect && segs.len() < cap {
                let s = sector.wrapping_add(cur);
                let first = (s % 8) as u8;
                let n = (8 - u64::from(first)).min(nsect - cur);
                segs.push((first, first + n as u8 - 1, cur as usize * wire::SECTOR));
                cur += n;
            }
            let mut dsegs = Vec::with_capacity(segs.len());
            let readonly = op != wire::OP_READ;
            for &(first, last, buf_off) in &segs {
                let page = match self.data_page(readonly) {
                    Ok(p) => p,
                    Err(e) => {
                        for d in dsegs {
                            let d: DataSeg = d;
                            self.release_page(d.page, false);
                        }
                        return Err(e);
                    }
                };
                let page_off = usize::from(first) * wire::SECTOR;
                let n = (usize::from(last - first) + 1) * wire::SECTOR;
                if let Some(data) = data {
                    self.guest
                        .write_page(page.frame, page_off, &data[buf_off..buf_off + n])?;
                }
                dsegs.push(DataSeg {
                    page,
                    page_off,
                    len: n,
                    buf_off,
                    revoked: false,
                });
            }
            let wsegs: Vec<Seg> = dsegs
                .iter()
                .zip(&segs)
                .map(|(d, &(first, last, _))| Seg {
                    gref: d.page.gref,
                    first_sect: first,
                    last_sect: last,
                })
                .collect();
            let id = self.alloc_id();
            let mut slot = self.blank_slot(q);
            let mut indirect = Vec::new();
            if wsegs.len() <= wire::MAX_SEGMENTS_PER_REQUEST {
                wire::encode_rw(
                    disk.abi,
                    &mut slot,
                    op,
                    wsegs.len() as u8,
                    self.handle(),
                    id,
                    start,
                    &wsegs,
                );
            } else {
                let npages = wsegs.len().div_ceil(wire::SEGMENTS_PER_INDIRECT_PAGE);
                for chunk in wsegs.chunks(wire::SEGMENTS_PER_INDIRECT_PAGE) {
                    let mut page = vec![0u8; 4096];
                    for (i, s) in chunk.iter().enumerate() {
                        wire::encode_segment(
                            &mut page[i * wire::SEGMENT_BYTES..(i + 1) * wire::SEGMENT_BYTES],
                            *s,
                        );
                    }
                    let p = match self.data_page(true) {
                        Ok(p) => p,
                        Err(e) => {
                            for d in dsegs {
                                self.release_page(d.page, false);
                            }
                            for p in indirect {
                                self.release_page(p, false);
                            }
                            return Err(e);
                        }
                    };
                    self.guest.write_page(p.frame, 0, &page)?;
                    indirect.push(p);
                }
                debug_assert_eq!(indirect.len(), npages);
                let grefs: Vec<u32> = indirect.iter().map(|p| p.gref).collect();
                wire::encode_indirect(
                    disk.abi,
                    &mut slot,
                    op,
                    wsegs.len() as u16,
                    self.handle(),
                    id,
                    start,
                    &grefs,
                );
            }
            self.post(q, id, slot, Some(tag), op, dsegs, indirect)?;
            done = cur;
        }
        Ok(())
    }

    /// Put one request on ring `q` (waiting for a free slot).
    #[allow(clippy::too_many_arguments)]
    fn post(
        &mut self,
        q: usize,
        id: u64,
        slot: Vec<u8>,
        tag: Option<u64>,
        expect_op: u8,
        segs: Vec<DataSeg>,
        indirect: Vec<Page>,
    ) -> io::Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        while self.queues[q].ring.free_slots() == 0 {
            self.publish_requests(q)?;
            self.process_all();
            if self.queues[q].ring.free_slots() > 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(format!("{}: ring {q} stayed full", self.fe_path)));
            }
            self.wait_event(left.min(Duration::from_millis(100)))?;
        }
        let qq = &mut self.queues[q];
        let idx = qq.ring.req_prod_pvt;
        qq.ring.write_slot(idx, &slot);
        let mask = (qq.ring.size() - 1) as usize;
        qq.shadow[idx as usize & mask] = slot;
        qq.ring.req_prod_pvt = idx.wrapping_add(1);
        qq.inflight.insert(
            id,
            RingReq {
                tag,
                expect_op,
                segs,
                indirect,
                indirect_revoked: false,
            },
        );
        if let Some(t) = tag {
            if let Some(op) = self.ops.get_mut(&t) {
                op.remaining += 1;
                op.total += 1;
            }
        }
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY` and kick the backend if asked.
    fn publish_requests(&mut self, q: usize) -> io::Result<()> {
        let qq = &self.queues[q];
        if qq.ring.push_requests_and_check_notify() {
            qq.evtchn.notify()?;
        }
        Ok(())
    }

    /// Consume every response on every ring (ring.h final check included).
    fn process_all(&mut self) {
        for q in 0..self.queues.len() {
            self.process_queue(q);
        }
    }

    fn process_queue(&mut self, q: usize) {
        let abi = self.opts.protocol.abi();
        let slot_size = abi.slot_size();
        let mut buf = vec![0u8; slot_size];
        loop {
            let rp = self.queues[q].ring.rsp_prod();
            let cons = self.queues[q].ring.rsp_cons;
            let size = self.queues[q].ring.size();
            if rp.wrapping_sub(cons) > size {
                self.anomalies.bogus_rsp_prod += 1;
                return;
            }
            let mut i = cons;
            while i != rp {
                let qq = &mut self.queues[q];
                qq.ring.read_slot(i, &mut buf);
                let mask = (size - 1) as usize;
                let shadow = &qq.shadow[i as usize & mask];
                let rsize = abi.response_size();
                for &p in wire::response_padding(abi) {
                    if buf[p] != 0 && buf[p] != shadow[p] {
                        self.anomalies.padding_not_ours += 1;
                    }
                }
                if buf[rsize..] != shadow[rsize..] {
                    self.anomalies.slot_tail_changed += 1;
                }
                let rsp = wire::decode_response(&buf);
                i = i.wrapping_add(1);
                let qq = &mut self.queues[q];
                qq.ring.rsp_cons = i;
                let Some(req) = qq.inflight.remove(&rsp.id) else {
                    self.anomalies.unknown_id += 1;
                    continue;
                };
                self.finish_ring_req(q, req, rsp);
            }
            if !self.queues[q].ring.final_check_for_responses() {
                break;
            }
        }
    }

    fn finish_ring_req(&mut self, q: usize, req: RingReq, rsp: wire::Response) {
        if rsp.operation != req.expect_op {
            self.anomalies.wrong_operation += 1;
        }
        let Some(tag) = req.tag else {
            self.raw_responses.push(RawResponse {
                queue: q,
                id: rsp.id,
                operation: rsp.operation,
                status: rsp.status,
            });
            self.release_ring_req(req);
            return;
        };
        if let Some(op) = self.ops.get_mut(&tag) {
            if rsp.status != wire::RSP_OKAY && op.status == wire::RSP_OKAY {
                op.status = rsp.status;
            }
            if op.is_read && rsp.status == wire::RSP_OKAY {
                for s in &req.segs {
                    let _ = self.guest.read_page(
                        s.page.frame,
                        s.page_off,
                        &mut op.data[s.buf_off..s.buf_off + s.len],
                    );
                }
            }
            op.remaining -= 1;
            if op.remaining == 0 {
                let op = self.ops.remove(&tag).expect("present");
                self.done.push_back(Completion {
                    tag: Tag(tag),
                    status: op.status,
                    data: op.data,
                    ring_requests: op.total,
                });
            }
        }
        self.release_ring_req(req);
    }

    /// Sleep until an event channel fires or `timeout` passes; consume the events.
    fn wait_event(&mut self, timeout: Duration) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let fds: Vec<_> = self
            .queues
            .iter()
            .map(|q| {
                // SAFETY: the descriptor belongs to the queue's event channel,
                // which lives in `self.queues` for the whole call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(q.evtchn.fd()) }
            })
            .collect();
        let mut pfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|f| PollFd::new(*f, PollFlags::POLLIN))
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match poll(
            &mut pfds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::other(format!("poll event channels: {e}"))),
        }
        for q in &self.queues {
            let _ = q.evtchn.ack();
        }
        Ok(())
    }

    fn wait_any(&mut self, timeout: Duration) -> io::Result<()> {
        self.process_all();
        if self.done.is_empty() {
            self.wait_event(timeout)?;
            self.process_all();
        }
        Ok(())
    }

    /// Collect finished operations without sleeping.
    pub fn poll(&mut self) -> Vec<Completion> {
        self.process_all();
        self.done.drain(..).collect()
    }

    /// Wait until at least one operation finished (or none is in flight), up
    /// to `timeout`; returns every finished one.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process_all();
            if !self.done.is_empty() || self.ops.is_empty() {
                return Ok(self.done.drain(..).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(format!(
                    "{}: {} operation(s) unanswered after {timeout:?}",
                    self.fe_path,
                    self.ops.len()
                )));
            }
            self.wait_event(left.min(Duration::from_millis(500)))?;
        }
    }

    /// Wait for one operation; other completions stay queued for `poll`/`wait`.
    pub fn wait_for(&mut self, tag: Tag, timeout: Duration) -> io::Result<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process_all();
            if let Some(pos) = self.done.iter().position(|c| c.tag == tag) {
                return Ok(self.done.remove(pos).expect("position is valid"));
            }
            if !self.ops.contains_key(&tag.0) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no operation {tag:?} in flight", self.fe_path),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(format!(
                    "{}: operation {tag:?} unanswered after {timeout:?}",
                    self.fe_path
                )));
            }
            self.wait_event(left.min(Duration::from_millis(500)))?;
        }
    }

    fn run(&mut self, req: IoRequest<'_>) -> io::Result<Vec<u8>> {
        let t = self.submit(None, req)?;
        let timeout = self.opts.timeout;
        self.wait_for(t, timeout)?.into_result()
    }

    /// Read `len` bytes at `sector` (blocking).
    pub fn read(&mut self, sector: u64, len: usize) -> io::Result<Vec<u8>> {
        self.run(IoRequest::Read { sector, len })
    }

    /// Write `data` at `sector` (blocking).
    pub fn write(&mut self, sector: u64, data: &[u8]) -> io::Result<()> {
        self.run(IoRequest::Write { sector, data }).map(|_| ())
    }

    /// FLUSH_DISKCACHE (blocking).
    pub fn flush(&mut self) -> io::Result<()> {
        self.run(IoRequest::Flush).map(|_| ())
    }

    /// WRITE_BARRIER with `data` (blocking).
    pub fn barrier(&mut self, sector: u64, data: &[u8]) -> io::Result<()> {
        self.run(IoRequest::Barrier { sector, data }).map(|_| ())
    }

    /// DISCARD (blocking).
    pub fn discard(&mut self, sector: u64, nr_sectors: u64, secure: bool) -> io::Result<()> {
        self.run(IoRequest::Discard {
            sector,
            nr_sectors,
            secure,
        })
        .map(|_| ())
    }

    // ---------------------------------------------------------------- hostile

    /// Hostile: end the access of every data and indirect grant of `tag`'s
    /// ring requests that are still in flight (the backend may be using
    /// them). Returns how many grants were revoked.
    pub fn revoke_grants(&mut self, tag: Tag) -> usize {
        let mut n = 0;
        let guest = self.guest.clone();
        for q in &mut self.queues {
            for r in q.inflight.values_mut() {
                if r.tag != Some(tag.0) {
                    continue;
                }
                for s in &mut r.segs {
                    if !s.revoked && guest.end_access(s.page.gref).unwrap_or(false) {
                        s.revoked = true;
                        n += 1;
                    }
                }
                if !r.indirect_revoked {
                    let mut all = true;
                    for p in &r.indirect {
                        if guest.end_access(p.gref).unwrap_or(false) {
                            n += 1;
                        } else {
                            all = false;
                        }
                    }
                    r.indirect_revoked = all;
                }
            }
        }
        n
    }

    /// Hostile: a zeroed slot-sized buffer to fill with [`wire`] encoders.
    pub fn raw_slot(&self) -> Vec<u8> {
        vec![0u8; self.opts.protocol.abi().slot_size()]
    }

    /// Hostile: write `bytes` into the next request slot of ring `queue`
    /// without publishing it; the response to `id` will be reported by
    /// [`take_raw_responses`](Self::take_raw_responses) (an id of ours must
    /// not be used). Returns the ring index used.
    pub fn raw_push(&mut self, queue: usize, id: u64, bytes: &[u8]) -> io::Result<u32> {
        let q = self.pick_queue(Some(queue))?;
        let qq = &mut self.queues[q];
        if qq.ring.free_slots() == 0 {
            return Err(io::Error::other("ring full"));
        }
        let idx = qq.ring.req_prod_pvt;
        let mut slot = vec![0u8; self.opts.protocol.abi().slot_size()];
        let n = bytes.len().min(slot.len());
        slot[..n].copy_from_slice(&bytes[..n]);
        qq.ring.write_slot(idx, &slot);
        let mask = (qq.ring.size() - 1) as usize;
        // Remember the op the backend should echo (inner op for INDIRECT).
        let expect_op = if slot[0] == wire::OP_INDIRECT {
            slot[1]
        } else {
            slot[0]
        };
        qq.shadow[idx as usize & mask] = slot;
        qq.ring.req_prod_pvt = idx.wrapping_add(1);
        qq.inflight.insert(
            id,
            RingReq {
                tag: None,
                expect_op,
                segs: Vec::new(),
                indirect: Vec::new(),
                indirect_revoked: false,
            },
        );
        Ok(idx)
    }

    /// Hostile: publish raw requests (and kick the backend if it asked).
    pub fn raw_publish(&mut self, queue: usize) -> io::Result<()> {
        let q = self.pick_queue(Some(queue))?;
        self.publish_requests(q)
    }

    /// Hostile: write any bytes into the slot of ring index `idx` (nothing is
    /// published or tracked).
    pub fn raw_write_slot(&mut self, queue: usize, idx: u32, bytes: &[u8]) -> io::Result<()> {
        let q = self.pick_queue(Some(queue))?;
        let qq = &mut self.queues[q];
        qq.ring.write_slot(idx, bytes);
        let mask = (qq.ring.size() - 1) as usize;
        let sh = &mut qq.shadow[idx as usize & mask];
        let n = bytes.len().min(sh.len());
        sh[..n].copy_from_slice(&bytes[..n]);
        Ok(())
    }

    /// Hostile: store `value` in the shared `req_prod` of ring `queue` and kick
    /// the backend.
    pub fn raw_set_req_prod(&mut self, queue: usize, value: u32) -> io::Result<()> {
        let q = self.pick_queue(Some(queue))?;
        self.queues[q].ring.set_shared_req_prod(value);
        self.queues[q].evtchn.notify()
    }

    /// Ring `queue`'s private producer index and size (for raw requests).
    pub fn raw_ring_state(&self, queue: usize) -> Option<(u32, u32)> {
        self.queues
            .get(queue)
            .map(|q| (q.ring.req_prod_pvt, q.ring.size()))
    }

    /// Hostile: where ring `queue` lives: its first guest frame, its number
    /// of pages and its grant references (in `ring-ref<N>` order). With
    /// [`Frontend::guest`] a test can play a guest that unmaps or frees its
    /// ring while the backend has it mapped: try `end_access` (refused while
    /// mapped, as Xen refuses `gnttab_end_foreign_access_ref`), clear the
    /// entries anyway with `set_grant_entry_raw`, reuse the pages with
    /// `write_page`. This frontend's own view of the ring is then
    /// meaningless (responses it reads may count as [`Anomalies`]).
    pub fn raw_ring_pages(&self, queue: usize) -> Option<(u32, u32, Vec<GrantRef>)> {
        self.queues
            .get(queue)
            .map(|q| (q.ring_first_page, q.ring_pages, q.ring_grefs.clone()))
    }

    /// Hostile: kick the backend on ring `queue`.
    pub fn notify(&self, queue: usize) -> io::Result<()> {
        self.queues
            .get(queue)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such queue"))?
            .evtchn
            .notify()
    }

    /// Hostile: allocate a page holding `data` (up to 4096 bytes) and grant
    /// it to the backend. The caller owns it (end it with
    /// `guest().end_access(gref)`).
    pub fn raw_grant_page(&mut self, data: &[u8], readonly: bool) -> io::Result<(u32, GrantRef)> {
        let frame = self.alloc_page()?;
        self.guest
            .write_page(frame, 0, &data[..data.len().min(4096)])?;
        let gref = self.guest.grant(frame, self.backend_id, readonly)?;
        Ok((frame, gref))
    }

    /// Responses to raw requests received so far (taken out).
    pub fn take_raw_responses(&mut self) -> Vec<RawResponse> {
        self.process_all();
        std::mem::take(&mut self.raw_responses)
    }

    /// Wait until `n` raw responses arrived (or `timeout`), and take them.
    pub fn wait_raw_responses(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> io::Result<Vec<RawResponse>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process_all();
            if self.raw_responses.len() >= n {
                return Ok(std::mem::take(&mut self.raw_responses));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(format!(
                    "{}: {} of {n} raw responses after {timeout:?}",
                    self.fe_path,
                    self.raw_responses.len()
                )));
            }
            self.wait_event(left.min(Duration::from_millis(200)))?;
        }
    }
}
