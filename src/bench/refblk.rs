//! The `refblk` path: a simulated guest puts blkif requests on its ring, refblk's
//! backend grant-copies and does the I/O with io_uring, responses come back.
//!
//! Everything runs in this process: the simulated Xen (xenstored, grant tables,
//! event channels) and the backend on their own threads, the guest's blkfront
//! ([`refblk_sim::frontend`]) on the generator's thread. The serving side's CPU is the
//! backend's io_uring workers (`refblk-io<N>`), read from
//! `/proc/self/task/<tid>/schedstat`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use refblk_core::backend::{Backend, BackendConfig, BackendHandle};
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Toolstack, VbdSpec};
use refblk_sim::{SimGuest, SimXen};

use super::stats::{iowq_tids, threads_named};
use super::target::BlockTarget;

/// Serving-side threads of the backend (its io_uring workers) are named `refblk-io<N>`.
pub const QUEUE_THREAD_PREFIX: &str = "refblk-io";

const DOMID: u16 = 7;
const XVDA: u32 = 51712;
/// Segments per indirect request the guest uses (the backend offers 256; Linux
/// blkfront's default `max_indirect_segments` is 32).
pub const INDIRECT_SEGMENTS: u32 = 256;

/// Whether this build can run the refblk path.
pub fn available() -> Result<(), String> {
    Ok(())
}

static MACHINES: AtomicU32 = AtomicU32::new(0);

/// A simulated machine: Xen, the refblk backend, a toolstack, one guest with a
/// connected blkfront. Field order is teardown order.
pub struct RefblkTarget {
    fe: Option<Frontend>,
    ts: Toolstack,
    backend: BackendHandle,
    join: Option<JoinHandle<io::Result<()>>>,
    guest: Option<Arc<SimGuest>>,
    sim: Option<SimXen>,
    dir: PathBuf,
    /// Frontend tag -> generator tag.
    tags: HashMap<u64, u64>,
    size: u64,
    depth: usize,
    plugged: bool,
    queue_tids: Vec<u32>,
    mode: String,
}

fn machine_dir(work_dir: &Path) -> io::Result<PathBuf> {
    // Guest memory and grant tables are shared-memory files: tmpfs when there is one.
    let n = MACHINES.fetch_add(1, Ordering::SeqCst);
    let name = format!("refblk-bench-sim.{}.{n}", std::process::id());
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm } else { work_dir };
    let d = base.join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d)?;
    Ok(d)
}

/// Start a simulated Xen, a backend serving `image`, and a guest whose blkfront is
/// connected to it; returns the guest's block device. `depth` operations of up to
/// `max_len` bytes may be in flight.
pub fn connect(image: &Path, work_dir: &Path, depth: usize) -> io::Result<Box<dyn BlockTarget>> {
    connect_with(image, work_dir, depth, 1 << 20).map(|t| Box::new(t) as Box<dyn BlockTarget>)
}

/// [`connect`] with the largest operation size given.
pub fn connect_with(
    image: &Path,
    work_dir: &Path,
    depth: usize,
    max_len: usize,
) -> io::Result<RefblkTarget> {
    let dir = machine_dir(work_dir)?;
    let sim = SimXen::start(&dir)?;
    let platform = Arc::new(sim.platform()?);
    let mut cfg = BackendConfig::default();
    // The workers' busy-poll budget, for comparing runs (see docs/benchmarks.md).
    if let Some(us) = std::env::var("REFBLK_BENCH_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.poll_us = us;
    }
    // Persistent grants (both ends), and with them zero-copy reads unless
    // REFBLK_BENCH_ZERO_COPY=0: for A/B runs of the read path
    // (docs/benchmarks.md, "What each change bought").
    let env_on = |k: &str| std::env::var(k).is_ok_and(|v| v != "0" && !v.is_empty());
    let persistent = env_on("REFBLK_BENCH_PERSISTENT");
    cfg.persistent_grants = persistent;
    cfg.zero_copy_reads = std::env::var("REFBLK_BENCH_ZERO_COPY").map_or(true, |v| v != "0");
    if let Some(t) = super::target::task_run_from_env() {
        cfg.engine.task_run = t;
    }
    let cfg_zero_copy = cfg.zero_copy_reads;
    let (backend, join) = Backend::spawn(platform, cfg)?;
    let xs = XsClient::connect_unix(&sim.xenstored_path())
        .map_err(|e| io::Error::other(format!("toolstack xenstore: {e}")))?;
    let ts = Toolstack::new(xs, backend.clone());
    ts.create_domain(DOMID)?;
    // Data pages for every operation in flight, plus ring and indirect pages.
    let pages = (depth * max_len.div_ceil(4096) + 1024) as u32;
    let guest = Arc::new(sim.create_guest(DOMID, pages)?);
    ts.add_vbd(&VbdSpec::new(DOMID, XVDA, image))?;
    let opts = FrontendOptions {
        scribble: false,
        persistent,
        max_indirect_segments: INDIRECT_SEGMENTS,
        ..Default::default()
    };
    let fe = Frontend::connect(&sim.xenstored_path(), guest.clone(), XVDA, opts)?;
    let info = fe
        .info()
        .cloned()
        .ok_or_else(|| io::Error::other("frontend connected without disk info"))?;
    // The serving side is the backend's io_uring workers (started with it).
    let queue_tids: Vec<u32> = threads_named(QUEUE_THREAD_PREFIX)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    if queue_tids.is_empty() {
        log::warn!(
            "refblk bench: no backend worker thread {QUEUE_THREAD_PREFIX}*; serving CPU will read 0"
        );
    }
    let mut mode = format!(
        "blkif ring {} slots, {} segs/request, {} queue(s) -> refblk io_uring",
        info.ring_size, info.segments_per_request, info.queues
    );
    if info.persistent {
        mode += if cfg_zero_copy {
            ", persistent grants, zero-copy reads"
        } else {
            ", persistent grants, reads copied"
        };
    }
    Ok(RefblkTarget {
        fe: Some(fe),
        ts,
        backend,
        join: Some(join),
        guest: Some(guest),
        sim: Some(sim),
        dir,
        tags: HashMap::with_capacity(depth * 2),
        size: info.sectors * 512,
        depth,
        plugged: false,
        queue_tids,
        mode,
    })
}

impl RefblkTarget {
    fn fe(&mut self) -> &mut Frontend {
        self.fe.as_mut().expect("frontend present until drop")
    }
}

fn status_to_result(status: i16, len: usize) -> i32 {
    match status {
        0 => len as i32,
        -2 => -libc::EOPNOTSUPP,
        _ => -libc::EIO,
    }
}

impl BlockTarget for RefblkTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn max_depth(&self) -> usize {
        self.depth
    }

    fn submit(
        &mut self,
        tag: u64,
        op: super::target::IoOp,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        use super::target::IoOp;
        // Requests of one batch go on the ring together and are published with
        // one index update (and at most one kick) in `kick`, as blk-mq does.
        if !self.plugged {
            self.fe().plug();
            self.plugged = true;
        }
        let sector = offset / 512;
        let len = len as usize;
        let fe = self.fe.as_mut().expect("frontend present until drop");
        // The data stays in guest memory, as an O_DIRECT application's does in a
        // real guest (blkfront grants its pages): the simulated guest copies
        // nothing, as the `file` path copies nothing. Writes carry whatever the
        // recycled guest pages hold, as the `file` path's carry its slab's.
        let t = match op {
            IoOp::Read => fe.submit(None, IoRequest::ReadInPlace { sector, len })?,
            IoOp::Write => fe.submit(None, IoRequest::WriteInPlace { sector, len })?,
            IoOp::Discard => fe.submit(
                None,
                IoRequest::Discard {
                    sector,
                    nr_sectors: len as u64 / 512,
                    secure: false,
                },
            )?,
        };
        self.tags.insert(t.0, tag);
        Ok(())
    }

    fn kick(&mut self) -> io::Result<()> {
        if self.plugged {
            self.plugged = false;
            self.fe().unplug()?;
        }
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        self.kick()?;
        let mut got = 0;
        while got < min {
            let done = self.fe().wait(Duration::from_secs(30))?;
            for c in done {
                let Some(tag) = self.tags.remove(&c.tag.0) else {
                    continue;
                };
                out.push((tag, status_to_result(c.status, c.data.len())));
                got += 1;
            }
        }
        Ok(())
    }

    fn serving_threads(&self) -> Vec<u32> {
        // The guest side does no io_uring: every io-wq worker works for a queue.
        let mut v = iowq_tids();
        v.extend(&self.queue_tids);
        v
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.kick()?;
        self.fe().write(offset / 512, data)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.kick()?;
        let v = self.fe().read(offset / 512, buf.len())?;
        buf.copy_from_slice(&v);
        Ok(())
    }

    fn io_mode(&self) -> String {
        self.mode.clone()
    }
}

impl Drop for RefblkTarget {
    fn drop(&mut self) {
        if let Some(mut fe) = self.fe.take() {
            if let Err(e) = fe.disconnect() {
                log::warn!("refblk bench: frontend disconnect: {e}");
            }
        }
        let _ = &self.ts;
        if self.mode.contains("persistent grants") {
            let (mut zc, mut reads) = (0, 0);
            for d in self.backend.status() {
                zc += d.stats.zero_copy_reads;
                reads += d
                    .stats
                    .op(refblk_core::backend::stats::OpClass::Read)
                    .requests;
            }
            log::info!("refblk bench: {zc} of {reads} reads went zero-copy");
        }
        self.backend.stop();
        if let Some(j) = self.join.take() {
            match j.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("refblk bench: backend: {e}"),
                Err(_) => log::warn!("refblk bench: backend thread panicked"),
            }
        }
        drop(self.guest.take());
        drop(self.sim.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
