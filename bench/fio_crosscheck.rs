//! Cross-check of the benchmark's own workload generator against fio: the `file`
//! path (refblk's io_uring engine, O_DIRECT, registered buffers) and fio's io_uring
//! engine with the same parameters must agree within 15 % on each profile.
//!
//! fio is the instrument users know; if our numbers drifted from it, every ratio in
//! `refblk bench` would be suspect.
//!
//! The suite's `tests/bench_fio.rs` checks two sequential profiles on tmpfs; this
//! example runs any profile, on any directory, with more runs: `cargo run --release
//! --example fio_crosscheck [-- OPTIONS]`. It exits non-zero when the two disagree
//! by more than 15 % on a profile. The comparison itself is `refblk::bench::fio`.
//!
//! Options: `--profiles a,b` (default seq1m_q1t1_read,seq1m_q8t1_read,rnd4k_q32t1_read),
//! `--runs N` (fio runs per profile, default 11), `--runtime-ms N` (per run, default
//! 300), `--dir DIR` (default /dev/shm: tmpfs takes the disk out, leaving the software
//! path), `--only ours|fio` (run one side in a loop, for `perf`/`strace`).

use std::path::PathBuf;
use std::time::Duration;

use refblk::bench::fio::{compare, fio_iops, ours_iops};
use refblk::bench::profile::{self, Kind};
use refblk::bench::write_dense;
use refblk::util::scratchfs::{have_tool, skip_or_fail};

const SIZE: u64 = 256 << 20;

struct Opts {
    profiles: String,
    runs: usize,
    runtime_ms: u64,
    dir: PathBuf,
    only: Option<String>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        profiles: "seq1m_q1t1_read,seq1m_q8t1_read,rnd4k_q32t1_read".into(),
        runs: 11,
        runtime_ms: 300,
        dir: PathBuf::from("/dev/shm"),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| panic!("option {a} needs a value"))
        };
        match a.as_str() {
            "--profiles" => o.profiles = val(),
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--runtime-ms" => o.runtime_ms = val().parse().expect("--runtime-ms N"),
            "--dir" => o.dir = PathBuf::from(val()),
            "--only" => o.only = Some(val()),
            other => panic!("unknown option {other} (see the header of bench/fio_crosscheck.rs)"),
        }
    }
    o
}

fn main() {
    if !have_tool("fio") && !skip_or_fail("fio is not installed (apt-get install fio)") {
        return;
    }
    let o = parse_opts();
    let profiles = profile::parse_profiles(&o.profiles).expect("--profiles");
    let dir = tempfile::Builder::new()
        .prefix("refblk-bench-fio.")
        .tempdir_in(&o.dir)
        .unwrap();
    let file = dir.path().join("image");
    write_dense(&file, SIZE).unwrap();
    let mut failed = Vec::new();
    for p in profiles {
        let Kind::Io(spec, _) = p.kind else {
            panic!("{} is not an I/O profile", p.name)
        };
        let rt = Duration::from_millis(o.runtime_ms);
        match o.only.as_deref() {
            Some("ours") => {
                let v: Vec<f64> = (0..o.runs as u64)
                    .map(|r| ours_iops(&file, &spec, SIZE, rt, r).unwrap())
                    .collect();
                eprintln!("{}: ours {v:.0?}", p.name);
                continue;
            }
            Some("fio") => {
                let v: Vec<f64> = (0..o.runs)
                    .map(|_| fio_iops(&file, &spec, SIZE, rt).unwrap())
                    .collect();
                eprintln!("{}: fio {v:.0?}", p.name);
                continue;
            }
            Some(other) => panic!("--only {other}: ours or fio"),
            None => {}
        }
        let a = compare(&file, &spec, SIZE, o.runs, rt).unwrap();
        println!("{}: {}", p.name, a.summary());
        if !a.agrees(0.15) {
            failed.push(format!("{} (ratio {:.3})", p.name, a.ratio().median));
        }
    }
    assert!(
        failed.is_empty(),
        "our file path and fio disagree by more than 15 %: {}",
        failed.join(", ")
    );
}
