//! The io_uring I/O engine: one [`Engine`] per io_uring worker thread, shared
//! by every queue (blkif ring) that worker serves: each queue attaches its
//! image ([`Engine::attach`]) and tags its ops' user_data with its place in
//! the worker's table (`backend::request`). See `docs/engine.md` for the
//! design and the measurements behind it.
//!
//! Typical loop of the thread that owns an engine:
//!
//! ```no_run
//! # use refblk_core::engine::*;
//! # fn demo(mut e: Engine, evtchn_fd: i32) -> std::io::Result<()> {
//! let mut done = Vec::with_capacity(256);
//! e.push(u64::MAX, Op::PollAdd { fd: evtchn_fd }).map_err(|r| r.into_io_error())?;
//! loop {
//!     // ... take requests from the ring, alloc regions, copy data in, push ops ...
//!     e.submit_and_wait(1)?; // the one place the thread sleeps
//!     e.reap(&mut done);
//!     for c in done.drain(..) {
//!         // respond; free c.region; re-arm the poll when c.user_data == u64::MAX
//! #       let _ = c;
//!     }
//! }
//! # }
//! ```

mod foreign;
mod image;
mod slab;

pub use foreign::{ForeignBufs, MAX_PIECES};
pub use image::{DirectPolicy, FsCaps, ImageFile, IoMode};
pub use slab::{BufRegion, PAGE_SIZE};

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use image::ctx_err;
use slab::Slab;

/// How completions' task work is run by the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskRun {
    /// IORING_SETUP_DEFER_TASKRUN: completions are processed only when the owning thread
    /// enters the kernel to wait/submit. Cheapest (measured 310 ns vs 357 ns per NOP).
    #[default]
    Defer,
    /// IORING_SETUP_COOP_TASKRUN: processed at the next kernel transition, without IPIs.
    Coop,
}

/// Engine settings. `Default` gives the production choice.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Submission-queue entries (rounded up to a power of two by the kernel). The
    /// completion queue is twice as large and bounds the ops in flight.
    pub queue_depth: u32,
    /// Bytes of registered buffer memory (rounded up to pages, at most 1 GiB).
    pub slab_bytes: usize,
    /// Open the image read-only.
    pub read_only: bool,
    /// Whether to try O_DIRECT.
    pub direct: DirectPolicy,
    /// Preferred task-run mode; the engine falls back when the kernel refuses it.
    pub task_run: TaskRun,
    /// Enable SQPOLL with this idle time in milliseconds. Off by default: on a 2-vCPU
    /// dom0 the poller thread costs more than it saves (see docs/engine.md).
    pub sqpoll_idle_ms: Option<u32>,
    /// Images one engine can serve through registered (fixed) files; more are served
    /// through plain fds. Bounded by RLIMIT_NOFILE at setup.
    pub max_fixed_images: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_depth: 128,
            slab_bytes: 4 << 20,
            read_only: false,
            direct: DirectPolicy::Auto,
            task_run: TaskRun::Defer,
            sqpoll_idle_ms: None,
            max_fixed_images: 256,
        }
    }
}

/// The io_uring setup flags the kernel accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetupFlags {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
    pub taskrun_flag: bool,
    pub sqpoll: bool,
    /// Ring created disabled and enabled by the first submit (so SINGLE_ISSUER binds the
    /// ring to the thread that drives it, not to the one that built it).
    pub r_disabled: bool,
}

/// What the engine found out about the image and the ring.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// Size in bytes when opened (see [`Engine::refresh_size`]).
    pub size: u64,
    pub read_only: bool,
    pub io_mode: IoMode,
    pub fs: FsCaps,
    pub setup: SetupFlags,
    /// Submission-queue entries the kernel gave us.
    pub sq_entries: u32,
    /// Maximum number of ops in flight (the completion-queue size).
    pub max_in_flight: usize,
    /// Registered buffer memory in bytes.
    pub slab_bytes: usize,
}

/// One operation. Read and Write move their buffer region into the engine; it comes
/// back in the [`Completion`].
#[derive(Debug)]
pub enum Op {
    /// Read `region.len()` bytes at `offset` into the region (READ_FIXED). Short reads
    /// are continued internally; a read that reaches end of file completes with the
    /// full length and the part past EOF zero-filled (the disk is its advertised size
    /// even if the file is shorter; data past EOF reads as a hole would).
    Read { offset: u64, region: BufRegion },
    /// Read `bufs.len()` bytes at `offset` straight into memory outside the slab
    /// (READV; zero-copy reads into a guest's mapped pages). Short reads and end of
    /// file as for `Read`. The engine keeps `bufs` (and so what keeps its memory
    /// mapped) until the completion, which hands it back.
    ReadInto { offset: u64, bufs: ForeignBufs },
    /// Write the region's bytes at `offset` (WRITE_FIXED). Short writes are continued
    /// internally; a write that makes no progress completes with -EIO.
    Write { offset: u64, region: BufRegion },
    /// fdatasync of the image (FSYNC with DATASYNC): the backend's flush.
    Fdatasync,
    /// fallocate(PUNCH_HOLE|KEEP_SIZE): deallocate, reads return zeros.
    Discard { offset: u64, len: u64 },
    /// fallocate(ZERO_RANGE|KEEP_SIZE): zero the range (secure discard).
    ZeroRange { offset: u64, len: u64 },
    /// One-shot poll for POLLIN on any fd (event channel, control eventfd). Completes
    /// with the returned poll mask. Not counted as I/O for draining.
    PollAdd { fd: RawFd },
    /// One-shot timer: completes with -ETIME after `after` (a wake-up for timed work,
    /// e.g. rate limiting, without a second place to sleep). Not counted as I/O.
    Timeout { after: Duration },
}

/// Operation kinds, for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Fdatasync,
    Discard,
    ZeroRange,
    PollAdd,
    Timeout,
    /// An [`Engine::cancel`].
    Cancel,
}

impl OpKind {
    /// PollAdd, Timeout and Cancel wait for events rather than doing I/O.
    pub fn is_wait(self) -> bool {
        matches!(self, OpKind::PollAdd | OpKind::Timeout | OpKind::Cancel)
    }
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Read { .. } | Op::ReadInto { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Fdatasync => OpKind::Fdatasync,
            Op::Discard { .. } => OpKind::Discard,
            Op::ZeroRange { .. } => OpKind::ZeroRange,
            Op::PollAdd { .. } => OpKind::PollAdd,
            Op::Timeout { .. } => OpKind::Timeout,
        }
    }
    /// Take the buffer region back out of a rejected op.
    pub fn into_region(self) -> Option<BufRegion> {
        match self {
            Op::Read { region, .. } | Op::Write { region, .. } => Some(region),
            _ => None,
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag from [`Engine::push`].
    pub user_data: u64,
    /// Negative errno, or: bytes transferred (Read/Write, always the full length on
    /// success), 0 (Fdatasync/Discard/ZeroRange), the poll mask (PollAdd). A Timeout
    /// that fired completes with -ETIME (not counted as an error).
    pub result: i32,
    /// The buffer region of a Read/Write, handed back to the caller.
    pub region: Option<BufRegion>,
    /// The memory of a ReadInto, handed back to the caller (dropping it releases
    /// what kept the memory mapped).
    pub foreign: Option<ForeignBufs>,
}

/// Per-kind operation counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub read: u64,
    pub write: u64,
    pub fdatasync: u64,
    pub discard: u64,
    pub zero_range: u64,
    pub poll: u64,
    pub timeout: u64,
    pub cancel: u64,
}

impl OpCounts {
    fn bump(&mut self, k: OpKind) {
        match k {
            OpKind::Read => self.read += 1,
            OpKind::Write => self.write += 1,
            OpKind::Fdatasync => self.fdatasync += 1,
            OpKind::Discard => self.discard += 1,
            OpKind::ZeroRange => self.zero_range += 1,
            OpKind::PollAdd => self.poll += 1,
            OpKind::Timeout => self.timeout += 1,
            OpKind::Cancel => self.cancel += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.read
            + self.write
            + self.fdatasync
            + self.discard
            + self.zero_range
            + self.poll
            + self.timeout
            + self.cancel
    }
}

/// Engine counters (plain integers: the engine is single-threaded; copy them out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Ops accepted by `push`.
    pub submitted: OpCounts,
    /// Ops completed (handed to the caller), whatever the result.
    pub completed: OpCounts,
    /// Completions with a negative result.
    pub errors: u64,
    /// Fdatasync ops that completed successfully: data reached stable storage.
    pub fdatasyncs: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// io_uring_enter system calls made.
    pub enter_calls: u64,
    /// Continuations of short reads/writes.
    pub short_resubmits: u64,
    /// Reads that hit end of file and were zero-filled.
    pub eof_zero_fills: u64,
    /// Read/write SQEs sent to the buffered fd because they were not O_DIRECT-aligned.
    pub buffered_routed: u64,
}

/// Why `push` refused an op (the op is handed back, with its region).
#[derive(Debug)]
pub enum RejectReason {
    /// `max_in_flight` ops are in flight: reap completions first.
    QueueFull,
    /// The submission queue was full and submitting it failed.
    Submit(io::Error),
}

/// A refused op.
#[derive(Debug)]
pub struct Rejected {
    pub op: Op,
    pub reason: RejectReason,
}

impl Rejected {
    /// Turn into an io::Error (drops the op; free its region first if you need it).
    pub fn into_io_error(self) -> io::Error {
        match self.reason {
            RejectReason::QueueFull => io::Error::new(
                io::ErrorKind::WouldBlock,
                "io_uring engine: too many operations in flight",
            ),
            RejectReason::Submit(e) => e,
        }
    }
}

/// An image attached to an engine ([`Engine::attach`]); `push_to` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageId(u32);

impl ImageId {
    /// The first image attached: the one [`Engine::open`] opened and [`Engine::push`] uses.
    pub const FIRST: ImageId = ImageId(0);
}

/// The file a read or write of an image goes to: with an O_DIRECT image that
/// has a buffered twin, the O_DIRECT file when `aligned(offset_align,
/// mem_align)` says the op meets its direct-I/O alignment, else the twin
/// (counted in `buffered_routed`); otherwise the image's one file.
fn route(
    io_mode: &IoMode,
    primary: FileRef,
    buffered: Option<FileRef>,
    stats: &mut EngineStats,
    aligned: impl FnOnce(u64, usize) -> bool,
) -> FileRef {
    match (io_mode, buffered) {
        (
            IoMode::Direct {
                offset_align,
                mem_align,
            },
            Some(buffered),
        ) => {
            if aligned(u64::from(*offset_align), *mem_align as usize) {
                primary
            } else {
                stats.buffered_routed += 1;
                buffered
            }
        }
        _ => primary,
    }
}

/// How an SQE names an image's file.
#[derive(Clone, Copy, Debug)]
enum FileRef {
    Fixed(u32),
    Raw(RawFd),
}

/// An image attached to this engine.
struct Attached {
    img: Arc<ImageFile>,
    info: ImageInfo,
    primary: FileRef,
    /// For requests not aligned for O_DIRECT (direct mode only).
    buffered: Option<FileRef>,
    /// Ops in flight on this image.
    in_flight: usize,
}

/// Kernel support for IORING_OP_FALLOCATE, probed once per process.
pub(crate) fn kernel_has_fallocate() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Fallocate::CODE)
    })
}

#[derive(Debug)]
struct Slot {
    active: bool,
    user_data: u64,
    kind: OpKind,
    /// Index into the engine's image table (file ops).
    img: u32,
    offset: u64,
    len: u64,
    /// Bytes already transferred (Read/Write).
    done: usize,
    region: Option<BufRegion>,
    /// The memory of a ReadInto (instead of `region`).
    foreign: Option<ForeignBufs>,
    poll_fd: RawFd,
    /// Timeout duration; the kernel reads it while the SQE is submitted, so it lives in
    /// the slot (slots never move: the Vec is allocated once).
    ts: types::Timespec,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            active: false,
            user_data: 0,
            kind: OpKind::Fdatasync,
            img: 0,
            offset: 0,
            len: 0,
            done: 0,
            region: None,
            foreign: None,
            poll_fd: -1,
            ts: types::Timespec::new(),
        }
    }
}

/// CQEs are copied out in batches of this many before processing.
const REAP_BATCH: usize = 64;

/// Facts about the ring itself, copied into every image's [`ImageInfo`].
#[derive(Clone, Copy, Debug)]
struct RingFacts {
    setup: SetupFlags,
    sq_entries: u32,
    max_in_flight: usize,
    slab_bytes: usize,
}

/// An io_uring instance driven by one thread, serving one or more images (a worker
/// serves the queues of many devices with one engine). Fields drop in order: the ring
/// first (the kernel releases fixed files and buffer pins), then the images' files,
/// then the slab.
pub struct Engine {
    ring: IoUring,
    images: Vec<Option<Attached>>,
    /// Fixed-file table slots (pairs) not in use.
    free_fixed: Vec<u32>,
    slab: Slab,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    in_flight: usize,
    in_flight_waits: usize,
    enabled: bool,
    facts: RingFacts,
    stats: EngineStats,
}

fn setup_attempts(cfg: &EngineConfig) -> Vec<SetupFlags> {
    let sqpoll = cfg.sqpoll_idle_ms.is_some();
    let mut v = Vec::new();
    let defer = SetupFlags {
        single_issuer: true,
        defer_taskrun: true,
        taskrun_flag: true,
        sqpoll,
        r_disabled: true,
        ..Default::default()
    };
    let coop = SetupFlags {
        single_issuer: true,
        coop_taskrun: true,
        taskrun_flag: true,
        sqpoll,
        r_disabled: true,
        ..Default::default()
    };
    // DEFER_TASKRUN cannot be combined with SQPOLL.
    if cfg.task_run == TaskRun::Defer && !sqpoll {
        v.push(defer);
    }
    v.push(coop);
    v.push(SetupFlags {
        single_issuer: false,
        ..coop
    });
    v.push(SetupFlags {
        sqpoll,
        r_disabled: true,
        ..Default::default()
    });
    v.push(SetupFlags {
        sqpoll,
        ..Default::default()
    });
    v
}

fn build_ring(cfg: &EngineConfig, f: SetupFlags) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    if f.single_issuer {
        b.setup_single_issuer();
    }
    if f.defer_taskrun {
        b.setup_defer_taskrun();
    }
    if f.coop_taskrun {
        b.setup_coop_taskrun();
    }
    if f.taskrun_flag {
        b.setup_taskrun_flag();
    }
    if f.r_disabled {
        b.setup_r_disabled();
    }
    if let Some(ms) = cfg.sqpoll_idle_ms {
        b.setup_sqpoll(ms);
    }
    b.build(cfg.queue_depth.max(1))
}

impl Engine {
    /// Open `path` and build a ring serving it (the image becomes [`ImageId::FIRST`]).
    /// Errors name the file and the step.
    pub fn open(path: impl AsRef<Path>, cfg: &EngineConfig) -> io::Result<Engine> {
        let path = path.as_ref();
        let img = ImageFile::open(path, cfg.read_only, cfg.direct)?;
        let mut e = Engine::new(cfg).map_err(|e| ctx_err(path, "engine", e))?;
        e.attach(Arc::new(img))?;
        Ok(e)
    }

    /// Build a ring with its registered buffer slab and no image yet.
    pub fn new(cfg: &EngineConfig) -> io::Result<Engine> {
        let slab = Slab::new(cfg.slab_bytes)?;
        let mut last_err = None;
        let mut built = None;
        for flags in setup_attempts(cfg) {
            match build_ring(cfg, flags) {
                Ok(r) => {
                    built = Some((r, flags));
                    break;
                }
                Err(e) => {
                    log::debug!("io_uring setup with {flags:?} refused: {e}");
                    last_err = Some(e)
                }
            }
        }
        let (ring, setup) = match built {
            Some(b) => b,
            None => {
                let e = last_err.unwrap_or_else(|| io::Error::other("no setup attempted"));
                return Err(io::Error::new(e.kind(), format!("io_uring_setup: {e}")));
            }
        };
        if !ring.params().is_feature_nodrop() {
            log::warn!("io_uring without IORING_FEAT_NODROP; the in-flight bound keeps the CQ from overflowing");
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring register probe: {e}")))?;
        for (code, name) in [
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("this kernel's io_uring lacks IORING_OP_{name}"),
                ));
            }
        }
        // A sparse fixed-file table, two entries per image (the O_DIRECT fd and its
        // buffered twin). The kernel bounds its size by RLIMIT_NOFILE; images beyond
        // it are served through plain fds, which costs a file lookup per op.
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let pairs = u64::from(cfg.max_fixed_images).min(nofile / 2) as u32;
        let free_fixed = if pairs > 0 && ring.submitter().register_files_sparse(2 * pairs).is_ok() {
            (0..pairs).rev().collect()
        } else {
            log::info!("io_uring: no fixed-file table; images are served through plain fds");
            Vec::new()
        };
        slab.register(&ring.submitter())
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring register buffers: {e}")))?;
        let sq_entries = ring.params().sq_entries();
        let max_in_flight = ring.params().cq_entries() as usize;
        let slots = (0..max_in_flight).map(|_| Slot::empty()).collect();
        let free_slots = (0..max_in_flight as u32).rev().collect();
        let facts = RingFacts {
            setup,
            sq_entries,
            max_in_flight,
            slab_bytes: slab.bytes(),
        };
        log::debug!("engine: {facts:?}");
        Ok(Engine {
            ring,
            images: Vec::new(),
            free_fixed,
            slab,
            slots,
            free_slots,
            in_flight: 0,
            in_flight_waits: 0,
            enabled: !setup.r_disabled,
            facts,
            stats: EngineStats::default(),
        })
    }

    /// Serve `img` on this engine: register its files (when the fixed-file table has
    /// room). Returns the id to pass to [`push_to`](Self::push_to).
    pub fn attach(&mut self, img: Arc<ImageFile>) -> io::Result<ImageId> {
        let (primary, buffered) = match self.free_fixed.pop() {
            Some(pair) => {
                let mut fds = vec![img.primary.as_raw_fd()];
                if let Some(b) = &img.buffered {
                    fds.push(b.as_raw_fd());
                }
                match self.ring.submitter().register_files_update(2 * pair, &fds) {
                    Ok(_) => (
                        FileRef::Fixed(2 * pair),
                        img.buffered.as_ref().map(|_| FileRef::Fixed(2 * pair + 1)),
                    ),
                    Err(e) => {
                        self.free_fixed.push(pair);
                        return Err(ctx_err(&img.path, "io_uring register files", e));
                    }
                }
            }
            None => (
                FileRef::Raw(img.primary.as_raw_fd()),
                img.buffered.as_ref().map(|b| FileRef::Raw(b.as_raw_fd())),
            ),
        };
        let info = ImageInfo {
            path: img.path.clone(),
            size: img.size,
            read_only: img.read_only,
            io_mode: img.io_mode.clone(),
            fs: img.fs.clone(),
            setup: self.facts.setup,
            sq_entries: self.facts.sq_entries,
            max_in_flight: self.facts.max_in_flight,
            slab_bytes: self.facts.slab_bytes,
        };
        let a = Attached {
            img,
            info,
            primary,
            buffered,
            in_flight: 0,
        };
        let idx = match self.images.iter().position(Option::is_none) {
            Some(i) => {
                self.images[i] = Some(a);
                i
            }
            None => {
                self.images.push(Some(a));
                self.images.len() - 1
            }
        };
        Ok(ImageId(idx as u32))
    }

    /// Stop serving an image. Refused (the image stays attached) while ops on it
    /// are in flight: finish or cancel them first.
    pub fn detach(&mut self, id: ImageId) -> io::Result<Arc<ImageFile>> {
        let Some(a) = self.images.get(id.0 as usize).and_then(Option::as_ref) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("image {} is not attached", id.0),
            ));
        };
        if a.in_flight > 0 {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{}: {} op(s) still in flight",
                    a.info.path.display(),
                    a.in_flight
                ),
            ));
        }
        let a = self.images[id.0 as usize].take().expect("checked above");
        if let FileRef::Fixed(first) = a.primary {
            let n = if a.buffered.is_some() { 2 } else { 1 };
            let none = [-1; 2];
            match self
                .ring
                .submitter()
                .register_files_update(first, &none[..n])
            {
                Ok(_) => self.free_fixed.push(first / 2),
                // The slot pair stays unusable; the kernel drops the files with the ring.
                Err(e) => log::warn!("{}: unregistering fixed files: {e}", a.info.path.display()),
            }
        }
        while matches!(self.images.last(), Some(None)) {
            self.images.pop();
        }
        Ok(a.img)
    }

    fn attached(&self, id: ImageId) -> Option<&Attached> {
        self.images.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// Facts about an attached image and the ring.
    pub fn image_info(&self, id: ImageId) -> Option<&ImageInfo> {
        self.attached(id).map(|a| &a.info)
    }

    /// Facts about the first image and the ring (engines made with [`open`](Self::open)).
    /// Panics on an engine without an image (a caller bug).
    pub fn info(&self) -> &ImageInfo {
        self.image_info(ImageId::FIRST)
            .expect("Engine::info on an engine whose first image is not attached")
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Re-read the first image's size (after the control plane grew the file).
    pub fn refresh_size(&mut self) -> io::Result<u64> {
        let a = self
            .images
            .first_mut()
            .and_then(Option::as_mut)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no image attached"))?;
        let size = a.img.size_now()?;
        a.info.size = size;
        Ok(size)
    }

    /// Ops in flight (pushed, not yet handed back), polls included.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// I/O ops in flight, i.e. excluding PollAdd and Timeout. The backend implements WRITE_BARRIER
    /// by waiting until this is 0 before pushing the write (see docs/engine.md).
    pub fn in_flight_io(&self) -> usize {
        self.in_flight - self.in_flight_waits
    }

    /// How many more ops `push` accepts right now.
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Allocate a buffer region of `len` bytes (page-granular, page-aligned). `None` if
    /// `len` is 0 or the slab has no free run that long: apply backpressure and retry
    /// after completions freed regions.
    pub fn alloc(&mut self, len: usize) -> Option<BufRegion> {
        self.slab.alloc(len)
    }

    /// Return a region to the slab. Panics if `r` came from another engine (a caller
    /// bug, never a kernel or guest input).
    pub fn free(&mut self, r: BufRegion) {
        self.slab.free(r)
    }

    /// Bytes of the slab not allocated.
    pub fn free_buffer_bytes(&self) -> usize {
        self.slab.free_bytes()
    }

    /// How many regions were freed so far: a caller that found no room
    /// watches it change before it tries again.
    pub fn buffer_frees(&self) -> u64 {
        self.slab.frees()
    }

    /// A region's bytes. Panics like `free` on a foreign region.
    pub fn buf(&self, r: &BufRegion) -> &[u8] {
        self.slab.buf(r)
    }

    /// A region's bytes, mutably (fill before a Write; the region is not in flight since
    /// the caller holds it).
    pub fn buf_mut(&mut self, r: &BufRegion) -> &mut [u8] {
        self.slab.buf_mut(r)
    }

    /// Several regions' bytes, mutably, at once (fill them with one grant copy).
    /// Panics like `free` on a foreign region, or if a region is named twice.
    pub fn bufs_mut(&mut self, rs: &[&BufRegion]) -> Vec<&mut [u8]> {
        self.slab.bufs_mut(rs)
    }

    /// Queue an op on the first image (see [`push_to`](Self::push_to)).
    pub fn push(&mut self, user_data: u64, op: Op) -> Result<(), Rejected> {
        self.push_to(ImageId::FIRST, user_data, op)
    }

    /// Queue an op on image `img`, tagged `user_data`. It reaches the kernel on the next
    /// `submit*` (or earlier, if the submission queue had to be flushed to make room).
    /// PollAdd and Timeout ignore `img`.
    pub fn push_to(&mut self, img: ImageId, user_data: u64, op: Op) -> Result<(), Rejected> {
        let kind = op.kind();
        if !kind.is_wait() && self.attached(img).is_none() {
            return Err(Rejected {
                op,
                reason: RejectReason::Submit(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("io_uring engine: image {} is not attached", img.0),
                )),
            });
        }
        let Some(idx) = self.free_slots.pop() else {
            return Err(Rejected {
                op,
                reason: RejectReason::QueueFull,
            });
        };
        let slot = &mut self.slots[idx as usize];
        slot.active = true;
        slot.user_data = user_data;
        slot.kind = kind;
        slot.img = img.0;
        slot.done = 0;
        slot.region = None;
        slot.foreign = None;
        slot.poll_fd = -1;
        slot.offset = 0;
        slot.len = 0;
        match op {
            Op::Read { offset, region } | Op::Write { offset, region } => {
                slot.offset = offset;
                slot.len = region.len() as u64;
                slot.region = Some(region);
            }
            Op::ReadInto { offset, bufs } => {
                slot.offset = offset;
                slot.len = bufs.len() as u64;
                slot.foreign = Some(bufs);
            }
            Op::Discard { offset, len } | Op::ZeroRange { offset, len } => {
                slot.offset = offset;
                slot.len = len;
            }
            Op::PollAdd { fd } => slot.poll_fd = fd,
            Op::Timeout { after } => {
                slot.ts = after.into();
                slot.len = after.as_nanos().min(u64::MAX as u128) as u64;
            }
            Op::Fdatasync => {}
        }
        if let Err(e) = self.queue_slot(idx) {
            let op = self.release_slot_into_op(idx);
            return Err(Rejected {
                op,
                reason: RejectReason::Submit(e),
            });
        }
        self.in_flight += 1;
        if kind.is_wait() {
            self.in_flight_waits += 1;
        } else if let Some(Some(a)) = self.images.get_mut(img.0 as usize) {
            a.in_flight += 1;
        }
        self.stats.submitted.bump(kind);
        Ok(())
    }

    /// Cancel the in-flight PollAdd or Timeout tagged `target` (the first found).
    /// The cancelled op completes with -ECANCELED (or its own result if it won the
    /// race); the cancel itself completes tagged `user_data`. False if no such op is
    /// in flight (nothing is queued then).
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<bool> {
        let Some(victim) = self
            .slots
            .iter()
            .position(|s| s.active && s.user_data == target && s.kind.is_wait())
        else {
            return Ok(false);
        };
        let Some(idx) = self.free_slots.pop() else {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "io_uring engine: too many operations in flight",
            ));
        };
        let slot = &mut self.slots[idx as usize];
        slot.active = true;
        slot.user_data = user_data;
        slot.kind = OpKind::Cancel;
        slot.region = None;
        slot.len = victim as u64;
        if let Err(e) = self.queue_slot(idx) {
            self.slots[idx as usize].active = false;
            self.free_slots.push(idx);
            return Err(e);
        }
        self.in_flight += 1;
        self.in_flight_waits += 1;
        self.stats.submitted.bump(OpKind::Cancel);
        Ok(true)
    }

    /// Undo a slot taken by `push` whose SQE could not be queued.
    fn release_slot_into_op(&mut self, idx: u32) -> Op {
        let s = &mut self.slots[idx as usize];
        s.active = false;
        let op = match s.kind {
            OpKind::Read => match s.foreign.take() {
                Some(bufs) => Op::ReadInto {
                    offset: s.offset,
                    bufs,
                },
                None => Op::Read {
                    offset: s.offset,
                    region: s.region.take().expect("read slot has a region"),
                },
            },
            OpKind::Write => Op::Write {
                offset: s.offset,
                region: s.region.take().expect("write slot has a region"),
            },
            OpKind::Fdatasync => Op::Fdatasync,
            OpKind::Discard => Op::Discard {
                offset: s.offset,
                len: s.len,
            },
            OpKind::ZeroRange => Op::ZeroRange {
                offset: s.offset,
                len: s.len,
            },
            OpKind::PollAdd => Op::PollAdd { fd: s.poll_fd },
            OpKind::Timeout => Op::Timeout {
                after: Duration::from_nanos(s.len),
            },
            OpKind::Cancel => unreachable!("cancel ops are not made by push"),
        };
        self.free_slots.push(idx);
        op
    }

    /// Build the SQE for a slot's (remaining) work.
    fn sqe_for(&mut self, idx: u32) -> squeue::Entry {
        let s = &self.slots[idx as usize];
        let (primary, buffered, io_mode) = match self.images.get(s.img as usize) {
            Some(Some(a)) => (a.primary, a.buffered, &a.info.io_mode),
            // Only wait ops (which name no image) get here without one.
            _ => (
                FileRef::Raw(-1),
                None,
                &IoMode::Buffered {
                    reason: String::new(),
                },
            ),
        };
        macro_rules! with_file {
            ($f:expr, $build:expr) => {
                match $f {
                    FileRef::Fixed(i) => $build(types::Fixed(i)),
                    FileRef::Raw(fd) => $build(types::Fd(fd)),
                }
            };
        }
        let e = match s.kind {
            OpKind::Read if s.foreign.is_some() => {
                let bufs = s.foreign.as_ref().expect("checked");
                let pos = s.offset + s.done as u64;
                let iov = bufs.remaining();
                let file = route(io_mode, primary, buffered, &mut self.stats, |oa, ma| {
                    pos.is_multiple_of(oa) && bufs.aligned(ma, oa as usize)
                });
                // At most MAX_PIECES iovecs (ForeignBufs::new).
                let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
                with_file!(file, |f| opcode::Readv::new(f, ptr, n).offset(pos).build())
            }
            OpKind::Read | OpKind::Write => {
                let r = s.region.as_ref().expect("read/write slot has a region");
                let pos = s.offset + s.done as u64;
                let len = r.len() - s.done;
                let ptr = self.slab.ptr_at(r, s.done);
                let file = route(io_mode, primary, buffered, &mut self.stats, |oa, ma| {
                    pos.is_multiple_of(oa)
                        && (len as u64).is_multiple_of(oa)
                        && (ptr as usize).is_multiple_of(ma)
                });
                // Region lengths are bounded by the 1 GiB slab, so they fit u32.
                let (index, read) = (r.index(), s.kind == OpKind::Read);
                with_file!(file, |f| if read {
                    opcode::ReadFixed::new(f, ptr, len as u32, index)
                        .offset(pos)
                        .build()
                } else {
                    opcode::WriteFixed::new(f, ptr, len as u32, index)
                        .offset(pos)
                        .build()
                })
            }
            OpKind::Fdatasync => with_file!(primary, |f| opcode::Fsync::new(f)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            OpKind::Discard => with_file!(primary, |f| opcode::Fallocate::new(f, s.len)
                .offset(s.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build()),
            OpKind::ZeroRange => with_file!(primary, |f| opcode::Fallocate::new(f, s.len)
                .offset(s.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build()),
            OpKind::PollAdd => {
                opcode::PollAdd::new(types::Fd(s.poll_fd), libc::POLLIN as u32).build()
            }
            OpKind::Timeout => opcode::Timeout::new(&s.ts as *const types::Timespec).build(),
            OpKind::Cancel => opcode::AsyncCancel::new(s.len).build(),
        };
        e.user_data(idx as u64)
    }

    /// Put a slot's SQE on the submission queue, submitting first if it is full.
    fn queue_slot(&mut self, idx: u32) -> io::Result<()> {
        let sqe = self.sqe_for(idx);
        for _ in 0..2 {
            if self.push_sqe(&sqe) {
                return Ok(());
            }
            self.enter(0)?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{}: io_uring submission queue still full after submitting",
                ENGINE
            ),
        ))
    }

    /// The one place SQEs enter the ring. False if the submission queue is full.
    fn push_sqe(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: every SQE built by this engine references only (a) fixed files
        // registered for the ring's lifetime, (b) memory inside the registered slab, which
        // outlives the ring (field drop order) and belongs to the op's region until its
        // CQE is reaped, (b') memory a slot's ForeignBufs keeps valid until its CQE is
        // reaped (ForeignBufs::new's contract; leaked if the engine drops first, see
        // Drop) and that ForeignBufs' iovec array (its own heap allocation, not moved
        // or changed until the CQE), (c) a slot's Timespec, which lives in the never-reallocated slot
        // table, or (d) a caller fd that the kernel resolves at submission.
        unsafe { self.ring.submission().push(sqe) }.is_ok()
    }

    fn ensure_enabled(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|e| ctx_err(Path::new(ENGINE), "io_uring enable ring", e))?;
            self.enabled = true;
        }
        Ok(())
    }

    /// One io_uring_enter: submit everything queued and wait for `want` completions.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        self.ensure_enabled()?;
        let want = want.min(self.in_flight);
        let pending = self.ring.submission().len();
        if want == 0 && pending == 0 && !self.ring.submission().taskrun() {
            return Ok(0);
        }
        loop {
            self.stats.enter_calls += 1;
            match self.ring.submit_and_wait(want) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    return Err(ctx_err(
                        Path::new(ENGINE),
                        &format!("io_uring_enter (submit {pending}, wait {want})"),
                        e,
                    ))
                }
            }
        }
    }

    /// Submit all queued ops with one io_uring_enter; does not wait. Returns the number
    /// of SQEs the kernel consumed.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.enter(0)
    }

    /// Submit all queued ops and sleep until at least `want` ops (capped at the number
    /// in flight) have completed. This is where an engine thread sleeps; arm a PollAdd
    /// on the fds that should wake it.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.enter(want)
    }

    /// Like [`submit_and_wait`](Self::submit_and_wait), but return after `timeout` even
    /// if fewer completions arrived (Ok(0) then).
    pub fn submit_and_wait_timeout(&mut self, want: usize, timeout: Duration) -> io::Result<usize> {
        self.ensure_enabled()?;
        if !self.ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring_enter with a timeout needs IORING_FEAT_EXT_ARG (Linux 5.11)",
            ));
        }
        let want = want.min(self.in_flight);
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            self.stats.enter_calls += 1;
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(0),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    return Err(ctx_err(
                        Path::new(ENGINE),
                        &format!("io_uring_enter (wait {want}, timeout {timeout:?})"),
                        e,
                    ))
                }
            }
        }
    }

    /// Are completions ready to reap? Without waiting; runs deferred task work
    /// (one non-blocking `io_uring_enter`) only when the kernel flagged some.
    pub fn peek_completions(&mut self) -> bool {
        if !self.ring.completion().is_empty() {
            return true;
        }
        if self.ring.submission().taskrun() {
            if let Err(e) = self.enter(0) {
                log::warn!("{e}");
            }
        }
        !self.ring.completion().is_empty()
    }

    /// Move every available completion into `out` (which keeps its capacity, so steady
    /// state does not allocate). Short reads/writes are continued internally and do not
    /// appear until done. Returns the number of completions appended.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        let mut resubmitted = false;
        if self.ring.completion().is_empty() && self.ring.submission().taskrun() {
            // Deferred task work pending: let the kernel post the CQEs.
            if let Err(e) = self.enter(0) {
                log::warn!("{e}");
            }
        }
        loop {
            let mut batch = [(0u64, 0i32); REAP_BATCH];
            let mut n = 0;
            for cqe in self.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
                if n == REAP_BATCH {
                    break;
                }
            }
            if n == 0 {
                break;
            }
            for &(tag, res) in &batch[..n] {
                resubmitted |= self.complete_one(tag, res, out);
            }
        }
        if resubmitted {
            if let Err(e) = self.enter(0) {
                log::warn!("submitting continuations of short I/O: {e} (retried on next submit)");
            }
        }
        out.len() - before
    }

    /// Submit, wait for `want` completions, and reap into `out`.
    pub fn submit_and_reap(&mut self, want: usize, out: &mut Vec<Completion>) -> io::Result<usize> {
        self.submit_and_wait(want)?;
        Ok(self.reap(out))
    }

    /// Handle one CQE. Returns true if the op was continued (resubmitted).
    fn complete_one(&mut self, tag: u64, res: i32, out: &mut Vec<Completion>) -> bool {
        let idx = tag as usize;
        if idx >= self.slots.len() || !self.slots[idx].active {
            log::warn!(
                "{}: completion for unknown io_uring tag {tag} (result {res}) ignored",
                ENGINE
            );
            return false;
        }
        let kind = self.slots[idx].kind;
        let mut result = res;
        match kind {
            OpKind::Read | OpKind::Write if res >= 0 => {
                let s = &mut self.slots[idx];
                let total = s.len as usize;
                let got = (res as usize).min(total - s.done);
                if kind == OpKind::Read {
                    self.stats.bytes_read += got as u64;
                } else {
                    self.stats.bytes_written += got as u64;
                }
                s.done += got;
                if let Some(bufs) = s.foreign.as_mut() {
                    bufs.advance(got);
                }
                if s.done < total {
                    if got == 0 {
                        if kind == OpKind::Read {
                            // End of file: the rest reads as zeros.
                            if let Some(bufs) = s.foreign.as_mut() {
                                bufs.zero_rest();
                            } else {
                                let r = s.region.as_ref().expect("read slot has a region");
                                let from = s.done;
                                self.slab.buf_mut(r)[from..].fill(0);
                            }
                            self.stats.eof_zero_fills += 1;
                            result = total as i32;
                        } else {
                            result = -libc::EIO;
                        }
                    } else {
                        self.stats.short_resubmits += 1;
                        match self.queue_slot(idx as u32) {
                            Ok(()) => return true,
                            Err(e) => {
                                log::warn!("continuing short I/O: {e}");
                                result = -e.raw_os_error().unwrap_or(libc::EIO);
                            }
                        }
                    }
                } else {
                    result = total as i32;
                }
            }
            OpKind::Fdatasync if res >= 0 => self.stats.fdatasyncs += 1,
            _ => {}
        }
        // A timer that fired, a cancelled wait and a cancel's own result are not errors.
        let is_error = result < 0
            && !(kind == OpKind::Timeout && result == -libc::ETIME)
            && !(kind.is_wait() && result == -libc::ECANCELED)
            && kind != OpKind::Cancel;
        if is_error {
            self.stats.errors += 1;
        }
        let s = &mut self.slots[idx];
        s.active = false;
        let region = s.region.take();
        let foreign = s.foreign.take();
        out.push(Completion {
            user_data: s.user_data,
            result,
            region,
            foreign,
        });
        let img = s.img as usize;
        self.free_slots.push(idx as u32);
        self.in_flight -= 1;
        if kind.is_wait() {
            self.in_flight_waits -= 1;
        } else if let Some(Some(a)) = self.images.get_mut(img) {
            a.in_flight -= 1;
        }
        self.stats.completed.bump(kind);
        false
    }
}

impl AsRawFd for Engine {
    /// The io_uring fd. With `TaskRun::Coop` it polls readable when completions are
    /// pending, so a thread serving several engines can arm a `PollAdd` on the others'
    /// fds and still sleep in one `submit_and_wait`. With `TaskRun::Defer` (the default)
    /// completions are posted only when the owner enters the kernel, so such an fd never
    /// becomes ready: engines that are polled this way must be built with `Coop`.
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// How errors of the ring itself (not of one image) name their subject.
static ENGINE: &str = "io_uring engine";

/// Tag of the cancel-all SQE issued by Drop (never a slot index).
const CANCEL_TAG: u64 = u64::MAX;

impl Drop for Engine {
    /// Cancel what can be cancelled (polls, timeouts, queued work) and wait, bounded to
    /// about two seconds, for in-flight I/O, so that after the drop the kernel no longer
    /// uses the image or the buffers. Regions of unfinished ops are simply forgotten.
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        if self.ensure_enabled().is_err() {
            self.leak_foreign_in_flight();
            return;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        if !self.push_sqe(&cancel) {
            let _ = self.ring.submit();
            let _ = self.push_sqe(&cancel);
        }
        let ts = types::Timespec::from(Duration::from_millis(200));
        for _ in 0..10 {
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => {
                    log::debug!("{}: draining at drop: {e}", ENGINE);
                    self.leak_foreign_in_flight();
                    return;
                }
            }
            let mut finished = 0;
            for cqe in self.ring.completion() {
                let idx = cqe.user_data() as usize;
                if idx < self.slots.len() && self.slots[idx].active {
                    self.slots[idx].active = false;
                    finished += 1;
                }
            }
            self.in_flight -= finished;
            if self.in_flight == 0 {
                return;
            }
        }
        log::warn!(
            "{}: engine dropped with {} ops still in flight",
            ENGINE,
            self.in_flight
        );
        self.leak_foreign_in_flight();
    }
}

impl Engine {
    /// The engine goes away while ops may still run: what keeps their foreign
    /// memory mapped (a guest's pages) is leaked, never released under the kernel.
    fn leak_foreign_in_flight(&mut self) {
        for s in &mut self.slots {
            if s.active {
                if let Some(b) = s.foreign.take() {
                    b.leak();
                }
            }
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("facts", &self.facts)
            .field("images", &self.images.iter().flatten().count())
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_fallback_chain_prefers_defer_and_never_pairs_it_with_sqpoll() {
        let chain = setup_attempts(&EngineConfig::default());
        assert!(chain[0].single_issuer && chain[0].defer_taskrun && chain[0].r_disabled);
        assert_eq!(chain.last().unwrap(), &SetupFlags::default());
        let coop = setup_attempts(&EngineConfig {
            task_run: TaskRun::Coop,
            ..Default::default()
        });
        assert!(coop.iter().all(|f| !f.defer_taskrun));
        assert!(coop[0].coop_taskrun && coop[0].single_issuer);
        let sq = setup_attempts(&EngineConfig {
            sqpoll_idle_ms: Some(5),
            ..Default::default()
        });
        assert!(sq.iter().all(|f| f.sqpoll && !f.defer_taskrun));
    }
}
