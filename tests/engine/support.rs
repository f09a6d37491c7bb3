//! Helpers shared by the engine tests (a module of the engine binary).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use refblk_core::engine::{Completion, Engine, Op};

pub use crate::kit::Rng;

pub use refblk_sim::scratchfs::skip_or_fail;

/// Drive a random read/write workload with up to `max_qd` ops in flight, checking every
/// read against an in-memory model of the file (`model` must equal the file's content
/// on entry and equals it on return). Offsets and lengths are multiples of `unit`;
/// in-flight ops never overlap, so the model is exact.
pub fn random_rw_model(
    e: &mut Engine,
    model: &mut [u8],
    ops: usize,
    max_qd: usize,
    unit: u64,
    max_units: u64,
    seed: u64,
) {
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let mut inflight: HashMap<u64, (bool, u64, u64)> = HashMap::new();
    let mut done = Vec::with_capacity(max_qd * 2);
    let mut issued = 0usize;
    let mut next_tag = 1u64;
    let mut max_seen_qd = 0;
    while issued < ops || !inflight.is_empty() {
        while issued < ops && inflight.len() < max_qd {
            let len = unit * (1 + rng.below(max_units));
            let off = unit * rng.below((size - len) / unit + 1);
            if inflight
                .values()
                .any(|&(_, o, l)| off < o + l && o < off + len)
            {
                break; // overlapping: wait for completions first
            }
            let Some(region) = e.alloc(len as usize) else {
                break; // slab exhausted: backpressure
            };
            let is_write = rng.below(2) == 0;
            let op = if is_write {
                let buf = e.buf_mut(&region);
                rng.fill(buf);
                model[off as usize..(off + len) as usize].copy_from_slice(buf);
                Op::Write {
                    offset: off,
                    region,
                }
            } else {
                Op::Read {
                    offset: off,
                    region,
                }
            };
            e.push(next_tag, op).expect("push");
            inflight.insert(next_tag, (is_write, off, len));
            next_tag += 1;
            issued += 1;
        }
        max_seen_qd = max_seen_qd.max(e.in_flight());
        e.submit_and_wait(1).expect("submit_and_wait");
        e.reap(&mut done);
        for c in done.drain(..) {
            let (is_write, off, len) = inflight.remove(&c.user_data).expect("known tag");
            assert_eq!(
                c.result, len as i32,
                "op tag {} write={is_write} off={off} len={len}",
                c.user_data
            );
            let region = c.region.expect("read/write returns its region");
            if !is_write {
                let got = e.buf(&region);
                let want = &model[off as usize..(off + len) as usize];
                if got != want {
                    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!("read at {off} len {len}: first mismatch at byte {at}");
                }
            }
            e.free(region);
        }
    }
    assert!(
        max_seen_qd >= max_qd.min(ops) / 2,
        "workload never had many ops in flight (max {max_seen_qd})"
    );
    verify_through_engine(e, model);
}

/// Read the whole file through the engine in 256 KiB chunks and compare with `model`.
pub fn verify_through_engine(e: &mut Engine, model: &[u8]) {
    let mut done: Vec<Completion> = Vec::new();
    let chunk = 256 * 1024;
    for (i, want) in model.chunks(chunk).enumerate() {
        let r = e
            .alloc(want.len())
            .expect("slab has room for a verify chunk");
        e.push(
            i as u64,
            Op::Read {
                offset: (i * chunk) as u64,
                region: r,
            },
        )
        .unwrap();
        let c = wait_one(e, &mut done);
        assert_eq!(c.result, want.len() as i32);
        let r = c.region.unwrap();
        assert!(e.buf(&r) == want, "verify read of chunk {i} differs");
        e.free(r);
    }
}

/// Submit and wait until exactly one completion arrives; return it.
pub fn wait_one(e: &mut Engine, done: &mut Vec<Completion>) -> Completion {
    loop {
        if let Some(c) = done.pop() {
            return c;
        }
        e.submit_and_wait(1).expect("submit_and_wait");
        e.reap(done);
    }
}

/// Push one op and wait for its completion.
pub fn run_one(e: &mut Engine, tag: u64, op: Op) -> Completion {
    e.push(tag, op).expect("push");
    let mut done = Vec::new();
    let c = wait_one(e, &mut done);
    assert!(done.is_empty());
    assert_eq!(c.user_data, tag);
    c
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

// ---------------------------------------------------------------------------------
// PRIVATE SCRATCH FILE SYSTEM HELPER — to be replaced by the shared `ScratchFs` in
// core/src/util once it lands. Creates a file system on a sparse image file, loop-mounts it,
// and unmounts it in Drop (also when a test panics; `mount -o loop` sets autoclear, so
// the loop device detaches on unmount).
// ---------------------------------------------------------------------------------

pub struct ScratchFs {
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub fstype: &'static str,
    mounted: bool,
    loop_dev: Option<String>,
}

impl ScratchFs {
    /// `fstype` is "xfs", "btrfs" or "ramfs" (no image). Returns None (after printing
    /// SKIP) when not root or the tools are missing and skipping is allowed; panics
    /// otherwise.
    pub fn new(fstype: &'static str, mkfs_args: &[&str]) -> Option<ScratchFs> {
        Self::with_sector_size(fstype, mkfs_args, None)
    }

    /// Like `new`, on a loop device with the given logical sector size (e.g. 4096, so
    /// O_DIRECT needs 4096-byte alignment).
    pub fn with_sector_size(
        fstype: &'static str,
        mkfs_args: &[&str],
        sector_size: Option<u32>,
    ) -> Option<ScratchFs> {
        if !nix::unistd::geteuid().is_root() {
            skip_or_fail(&format!("{fstype} scratch file system needs root to mount"));
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("refblk-engine-fs")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut mount = Command::new("mount");
        let mut loop_dev = None;
        if fstype == "ramfs" {
            mount.args(["-t", "ramfs", "ramfs"]).arg(&mnt);
        } else {
            let img = dir.path().join("fs.img");
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(512 << 20).unwrap();
            drop(f);
            let mut target = img.clone();
            if let Some(ss) = sector_size {
                let out = Command::new("losetup")
                    .args(["-f", "--show", "--sector-size", &ss.to_string()])
                    .arg(&img)
                    .output()
                    .expect("run losetup");
                if !out.status.success() {
                    skip_or_fail(&format!(
                        "losetup failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                    return None;
                }
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                target = PathBuf::from(&dev);
                loop_dev = Some(dev);
            }
            let detach = |dev: &Option<String>| {
                if let Some(d) = dev {
                    let _ = Command::new("losetup").args(["-d", d]).status();
                }
            };
            let mkfs = format!("mkfs.{fstype}");
            let out = match Command::new(&mkfs).args(mkfs_args).arg(&target).output() {
                Ok(o) => o,
                Err(e) => {
                    detach(&loop_dev);
                    skip_or_fail(&format!("cannot run {mkfs}: {e}"));
                    return None;
                }
            };
            if !out.status.success() {
                detach(&loop_dev);
                skip_or_fail(&format!(
                    "{mkfs} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
                return None;
            }
            if loop_dev.is_none() {
                mount.args(["-o", "loop"]);
            }
            mount.arg(&target).arg(&mnt);
        }
        let out = mount.output().expect("run mount");
        if !out.status.success() {
            if let Some(d) = &loop_dev {
                let _ = Command::new("losetup").args(["-d", d]).status();
            }
            skip_or_fail(&format!(
                "mount of scratch {fstype} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            return None;
        }
        Some(ScratchFs {
            _dir: dir,
            mnt,
            fstype,
            mounted: true,
            loop_dev,
        })
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted {
            // A closed io_uring drops its file references from a kernel work item, so
            // the mount can be busy for a moment after the engine is gone: retry.
            let mut ok = false;
            for _ in 0..50 {
                ok = Command::new("umount")
                    .arg(&self.mnt)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !ok {
                eprintln!("umount {} still busy; detaching lazily", self.mnt.display());
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            self.mounted = false;
        }
        if let Some(d) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &d]).status();
        }
    }
}
