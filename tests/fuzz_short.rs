//! The short fuzz run of the test suite: every fuzz target's body (shared with
//! the libFuzzer binaries in `fuzz/`, see `fuzz/README.md`) runs on
//! 1. the committed seed corpus `fuzz/corpus/<target>/`,
//! 2. every input that once crashed a target, `fuzz/regressions/<target>/`
//!    (kept as regression tests after the fix),
//! 3. a fixed number of deterministic mutations of the corpus (xorshift PRNG
//!    with a fixed seed, so a failure reproduces; `REFBLK_FUZZ_SEED` picks
//!    another seed and `REFBLK_FUZZ_ITERS` scales the count for a longer run).
//!
//! A failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-failures/` and its
//! path printed, ready for `cargo fuzz run <target> <file>` or a copy into
//! `fuzz/regressions/<target>/`.

#[path = "../fuzz/src/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use harness::input::Rng;

fn inputs_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, Vec<u8>)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    v.sort();
    v
}

fn save_failure(target: &str, what: &str, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{target}-{what}"));
    let _ = std::fs::write(&p, data);
    p
}

fn run_one(target: &str, what: &str, body: fn(&[u8]), data: &[u8]) {
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| body(data))) {
        let p = save_failure(target, what, data);
        eprintln!(
            "fuzz target {target} failed on {what} ({} bytes), input saved as {}",
            data.len(),
            p.display()
        );
        std::panic::resume_unwind(e);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Replay the corpus and regressions of `target`, then `iters` mutations.
fn short_run(target: &str, body: fn(&[u8]), iters: u64, max_len: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs_in(&root.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ has no seed inputs (it is committed with the repository)"
    );
    let regressions = inputs_in(&root.join("regressions").join(target));
    for (p, data) in corpus.iter().chain(&regressions) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        run_one(target, &name, body, data);
    }
    let seed = env_u64("REFBLK_FUZZ_SEED", 0x0005_eed0_f7ef_0b1c);
    let iters = iters * env_u64("REFBLK_FUZZ_ITERS", 1);
    let mut rng = Rng::new(seed ^ target.len() as u64);
    let all: Vec<&[u8]> = corpus
        .iter()
        .chain(&regressions)
        .map(|(_, d)| d.as_slice())
        .collect();
    for i in 0..iters {
        let a = all[rng.below(all.len())];
        let b = all[rng.below(all.len())];
        let data = rng.mutate(a, b, max_len);
        run_one(target, &format!("seed{seed:x}-iter{i}"), body, &data);
    }
    eprintln!(
        "{target}: {} corpus + {} regression inputs, {iters} mutations (seed {seed:#x})",
        corpus.len(),
        regressions.len()
    );
}

#[test]
fn fuzz_blkif_request() {
    short_run("blkif_request", harness::blkif::run, 100_000, 8192);
}

#[test]
fn fuzz_fekeys() {
    short_run("fekeys", harness::fekeys::run, 30_000, 2048);
}

#[test]
fn fuzz_xs_wire() {
    short_run("xs_wire", harness::xs_wire::run, 50_000, 9000);
}

#[test]
fn fuzz_xenstored() {
    short_run("xenstored", harness::xenstored::run, 5_000, 4096);
}

#[test]
fn fuzz_ring() {
    short_run("ring", harness::ring::run, 300, 4096);
    harness::ring::shutdown();
}

#[test]
fn fuzz_xs_client() {
    short_run("xs_client", harness::xs_client::run, 1_000, 2048);
}
