//! What a workload runs against: a block target that takes tagged reads, writes and
//! discards and hands back completions. The `file` and `loop` paths use refblk's own
//! io_uring [`Engine`] on the image file or on the loop device; the `refblk` path puts
//! blkif requests on a (simulated) guest's ring (see [`super::refblk`]).

use std::io;
use std::path::Path;

use refblk_core::engine::{BufRegion, DirectPolicy, Engine, EngineConfig, IoMode, Op, TaskRun};

use super::stats::{iowq_tids, own_tid};

/// One I/O operation of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    /// Deallocate the range (punch hole / blkif discard).
    Discard,
}

/// A block device as seen by a workload generator. Single-threaded: the generator
/// owns it. `submit` queues; `kick` makes queued operations visible to the server;
/// `wait` sleeps until at least `min` completions arrived and appends
/// `(tag, result)` pairs (negative errno on failure, else bytes or 0).
pub trait BlockTarget {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Most operations this target takes in flight.
    fn max_depth(&self) -> usize;
    /// Queue one operation tagged `tag` (tags are the caller's, < `max_depth`).
    fn submit(&mut self, tag: u64, op: IoOp, offset: u64, len: u32) -> io::Result<()>;
    /// Make queued operations visible to the server (one doorbell per batch).
    fn kick(&mut self) -> io::Result<()>;
    /// Wait for at least `min` completions (kicking first) and append them to `out`.
    fn wait(&mut self, min: usize, out: &mut Vec<(u64, i32)>) -> io::Result<()>;
    /// The threads that serve this target's I/O now (their CPU time is the
    /// serving CPU, see [`super::stats::cpu_since`]). For the engine paths that
    /// is the generator's own thread (it issues and reaps; called from it), for
    /// refblk the backend's io_uring workers; both plus the io_uring worker
    /// threads (io-wq) of the process, which run punted operations for the
    /// ring's owner.
    fn serving_threads(&self) -> Vec<u32>;
    /// Synchronously write `data` at `offset` (data checks; not timed).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Synchronously read `buf.len()` bytes at `offset` (data checks; not timed).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// How the I/O reaches the disk (e.g. "O_DIRECT", "buffered: ...").
    fn io_mode(&self) -> String;
}

/// Byte pattern for written data: incompressible, not zero, the same on every path.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// `REFBLK_BENCH_TASKRUN=defer|coop`: the io_uring task-run mode of every engine
/// the bench builds (the `file` and `loop` paths' and the refblk backend's), for
/// A/B runs (docs/benchmarks.md, "What each change bought"). Unset or anything
/// else: the engine's default.
pub fn task_run_from_env() -> Option<TaskRun> {
    match std::env::var("REFBLK_BENCH_TASKRUN").ok()?.as_str() {
        "defer" => Some(TaskRun::Defer),
        "coop" => Some(TaskRun::Coop),
        _ => None,
    }
}

/// The `file` and `loop` paths: refblk's io_uring engine straight on a file or device,
/// O_DIRECT, registered buffers and files, one enter per batch.
pub struct EngineTarget {
    engine: Engine,
    depth: usize,
    done: Vec<refblk_core::engine::Completion>,
}

impl EngineTarget {
    /// Open `path` for up to `depth` operations of up to `max_len` bytes each.
    pub fn open(path: &Path, depth: usize, max_len: usize) -> io::Result<EngineTarget> {
        let slab = (depth * max_len).next_power_of_two().max(4 << 20);
        let cfg = EngineConfig {
            queue_depth: (depth as u32).next_power_of_two().max(8),
            slab_bytes: slab,
            read_only: false,
            direct: DirectPolicy::Auto,
            task_run: task_run_from_env().unwrap_or_default(),
            ..Default::default()
        };
        let mut engine = Engine::open(path, &cfg)?;
        // Fill the whole slab with the pattern once: writes then carry non-zero,
        // incompressible data without a per-I/O fill (as fio does by default).
        let all = engine.free_buffer_bytes();
        if let Some(r) = engine.alloc(all) {
            fill_pattern(engine.buf_mut(&r), 0x5eed);
            engine.free(r);
        }
        Ok(EngineTarget {
            engine,
            depth,
            done: Vec::with_capacity(depth * 2),
        })
    }

    /// The engine (for its counters).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn sync_op(&mut self, op: Op) -> io::Result<Option<BufRegion>> {
        self.engine
            .push(u64::MAX, op)
            .map_err(|r| r.into_io_error())?;
        loop {
            self.engine.submit_and_wait(1)?;
            self.done.clear();
            self.engine.reap(&mut self.done);
            if let Some(c) = self.done.pop() {
                if c.result < 0 {
                    if let Some(r) = c.region {
                        self.engine.free(r);
                    }
                    return Err(io::Error::from_raw_os_error(-c.result));
                }
                return Ok(c.region);
            }
        }
    }
}

impl BlockTarget for EngineTarget {
    fn size(&self) -> u64 {
        self.engine.info().size
    }

    fn max_depth(&self) -> usize {
        self.depth
    }

    fn submit(&mut self, tag: u64, op: IoOp, offset: u64, len: u32) -> io::Result<()> {
        let op = match op {
            IoOp::Read | IoOp::Write => {
                let region = self.engine.alloc(len as usize).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::OutOfMemory, "engine buffer slab exhausted")
                })?;
                if op == IoOp::Read {
                    Op::Read { offset, region }
                } else {
                    Op::Write { offset, region }
                }
            }
            IoOp::Discard => Op::Discard {
                offset,
                len: len as u64,
            },
        };
        self.engine.push(tag, op).map_err(|r| r.into_io_error())
    }

    fn kick(&mut self) -> io::Result<()> {
        self.engine.submit().map(|_| ())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        let mut got = 0;
        loop {
            self.engine
                .submit_and_wait(min.saturating_sub(got).max(1))?;
            self.done.clear();
            got += self.engine.reap(&mut self.done);
            for c in self.done.drain(..) {
                if let Some(r) = c.region {
                    self.engine.free(r);
                }
                out.push((c.user_data, c.result));
            }
            if got >= min {
                return Ok(());
            }
        }
    }

    fn serving_threads(&self) -> Vec<u32> {
        let mut v = iowq_tids();
        v.push(own_tid());
        v
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let region = self
            .engine
            .alloc(data.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "slab exhausted"))?;
        self.engine.buf_mut(&region)[..data.len()].copy_from_slice(data);
        if let Some(r) = self.sync_op(Op::Write { offset, region })? {
            self.engine.free(r);
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let region = self
            .engine
            .alloc(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "slab exhausted"))?;
        if let Some(r) = self.sync_op(Op::Read { offset, region })? {
            buf.copy_from_slice(&self.engine.buf(&r)[..buf.len()]);
            self.engine.free(r);
        }
        Ok(())
    }

    fn io_mode(&self) -> String {
        match &self.engine.info().io_mode {
            IoMode::Direct { .. } => "O_DIRECT".into(),
            IoMode::Buffered { reason } => format!("buffered ({reason})"),
        }
    }
}
