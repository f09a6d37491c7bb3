//! Helpers shared by the pool integration tests.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use refblk_core::pool::{InitOptions, Pool};
use refblk_sim::scratchfs::{FsKind, ScratchFs};

pub const MIB: u64 = 1 << 20;

/// A scratch fs of `kind` (small), or None when skipping.
pub fn scratch(kind: FsKind) -> Option<ScratchFs> {
    ScratchFs::new_or_skip(kind, kind.min_size().max(256 * MIB))
}

/// A pool in `root/name`; ext4 pools are made with the setup check off.
pub fn pool(root: &Path, name: &str, kind: FsKind) -> Pool {
    let opts = InitOptions {
        setup_check: kind.supports_reflink(),
        ..Default::default()
    };
    Pool::init(&root.join(name), &opts).unwrap()
}

pub use crate::kit::pattern;

/// Write `data` at `off` into an existing file.
pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// An image of `size` bytes with `data` at `off` and zeros elsewhere.
pub fn image_with(size: u64, off: u64, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    v[off as usize..off as usize + data.len()].copy_from_slice(data);
    v
}

/// Sorted file names in `dir` (non-recursive).
pub fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// All files under `dir` (recursive, relative paths), sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, rel: &str, out: &mut Vec<String>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    n.clone()
                } else {
                    format!("{rel}/{n}")
                };
                if e.file_type().unwrap().is_dir() {
                    out.push(format!("{r}/"));
                    walk(&e.path(), &r, out);
                } else {
                    out.push(r);
                }
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, "", &mut v);
    v.sort();
    v
}

/// A snapshot of every file's content under `dir` except refblk's lock files.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tree(dir)
        .into_iter()
        .filter(|p| !p.ends_with('/') && !p.ends_with(".lock"))
        .map(|p| {
            let c = fs::read(dir.join(&p)).unwrap_or_default();
            (p, c)
        })
        .collect()
}

pub fn mtime_ns(p: &Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

pub fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

pub fn blocks(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks()
}

pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Files of `dir` containing '~' (temporary files).
pub fn temps(dir: &Path) -> Vec<String> {
    tree(dir).into_iter().filter(|p| p.contains('~')).collect()
}

pub fn p(base: &Path, rel: &str) -> PathBuf {
    base.join(rel)
}

/// `refblk ARGS` as an administrator runs it: the log left at its default
/// (warnings for pool commands), no qubes.xml from the caller's environment,
/// then `env`.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("REFBLK_QUBES_XML")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run refblk")
}

/// `refblk ARGS` (see [`run_env`]).
pub fn refblk(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// Exit code, stdout and stderr of a run, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `refblk ARGS` must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = refblk(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// Every file and directory under `dir` (`.refblk/` included) with its size,
/// link count and a checksum of its bytes, sorted: equal listings mean a
/// byte-identical pool.
pub fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if md.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                let sum: u64 = fs::read(&p)
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (i as u64 + 1).wrapping_mul(b as u64 + 1))
                    .fold(0u64, u64::wrapping_add);
                out.push(format!(
                    "{rel} size={} nlink={} sum={sum:x}",
                    md.len(),
                    md.nlink()
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
