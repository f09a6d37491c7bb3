//! Cross-check of the benchmark's own workload generator against fio: the `file`
//! path (refblk's io_uring engine, O_DIRECT, registered buffers) and fio's io_uring
//! engine with the same parameters must agree within 15 % on each profile.
//!
//! fio is the instrument users know; if our numbers drifted from it, every ratio in
//! `refblk bench` would be suspect.
//!
//! This is a timing comparison, so it lives with the benchmarks, not in the test
//! suite (speed checks never gate `cargo test`; docs/benchmarks.md, "What each change
//! bought", has the measurements on a loaded machine that show why): run it with
//! `cargo run --release --example fio_crosscheck [-- OPTIONS]`. It exits non-zero
//! when the two disagree by more than 15 % on a profile.
//!
//! Options: `--profiles a,b` (default seq1m_q1t1_read,seq1m_q8t1_read,rnd4k_q32t1_read),
//! `--runs N` (fio runs per profile, default 11), `--runtime-ms N` (per run, default
//! 300), `--dir DIR` (default /dev/shm: tmpfs takes the disk out, leaving the software
//! path), `--only ours|fio` (run one side in a loop, for `perf`/`strace`).
//!
//! Runs alternate (ours, fio, ours, ...) and each fio run is compared with the mean of
//! our runs right before and after it, so machine drift hits both sides alike; the
//! median of those ratios ignores the other tenants' bursts. Both sides read the same
//! file, each run with a new io_uring instance and a fresh process-side buffer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use refblk::bench::profile::{self, Kind};
use refblk::bench::stats::Spread;
use refblk::bench::target::{BlockTarget, EngineTarget, IoOp};
use refblk::bench::workload::{self, IoSpec, Pattern};
use refblk::bench::{drop_cache, write_dense};
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

/// fio's options for `spec`: the same engine features as our `file` path.
fn fio_args(file: &Path, spec: &IoSpec, runtime_ms: u64) -> Vec<String> {
    let rw = match (spec.op, spec.pattern) {
        (IoOp::Read, Pattern::Seq) => "read",
        (IoOp::Write, Pattern::Seq) => "write",
        (IoOp::Read, _) => "randread",
        (IoOp::Write, _) => "randwrite",
        (IoOp::Discard, _) => "trim",
    };
    let mut v: Vec<String> = [
        "--name=xcheck",
        "--ioengine=io_uring",
        "--direct=1",
        "--fixedbufs",
        "--registerfiles",
        "--norandommap",
        "--randrepeat=0",
        "--time_based",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--filename={}", file.display()));
    v.push(format!("--rw={rw}"));
    v.push(format!("--bs={}", spec.bs));
    v.push(format!("--iodepth={}", spec.qd));
    v.push(format!("--size={SIZE}"));
    v.push(format!("--runtime={runtime_ms}ms"));
    v
}

fn fio_iops(file: &Path, spec: &IoSpec, runtime_ms: u64) -> f64 {
    let out = Command::new("fio")
        .args(fio_args(file, spec, runtime_ms))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON output");
    let job = &v["jobs"][0];
    let side = if spec.op == IoOp::Write {
        "write"
    } else {
        "read"
    };
    job[side]["iops"].as_f64().expect("fio iops")
}

fn ours_iops(file: &Path, spec: &IoSpec, runtime_ms: u64, rep: u64) -> f64 {
    drop_cache(file).unwrap();
    let mut t = EngineTarget::open(file, spec.qd as usize, spec.bs as usize).unwrap();
    assert_eq!(
        t.io_mode(),
        "O_DIRECT",
        "the directory of {} must support O_DIRECT",
        file.display()
    );
    workload::run(&mut t, spec, SIZE, Duration::from_millis(runtime_ms), rep)
        .unwrap()
        .iops()
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
        match o.only.as_deref() {
            Some("ours") => {
                let v: Vec<f64> = (0..o.runs as u64)
                    .map(|r| ours_iops(&file, &spec, o.runtime_ms, r))
                    .collect();
                eprintln!("{}: ours {v:.0?}", p.name);
                continue;
            }
            Some("fio") => {
                let v: Vec<f64> = (0..o.runs)
                    .map(|_| {
                        drop_cache(&file).unwrap();
                        fio_iops(&file, &spec, o.runtime_ms)
                    })
                    .collect();
                eprintln!("{}: fio {v:.0?}", p.name);
                continue;
            }
            Some(other) => panic!("--only {other}: ours or fio"),
            None => {}
        }
        // ours, fio, ours, fio, ..., ours
        let mut ours = vec![ours_iops(&file, &spec, o.runtime_ms, 0)];
        let mut fio = Vec::new();
        for rep in 0..o.runs {
            drop_cache(&file).unwrap();
            fio.push(fio_iops(&file, &spec, o.runtime_ms));
            ours.push(ours_iops(&file, &spec, o.runtime_ms, rep as u64 + 1));
        }
        let ratios: Vec<f64> = fio
            .iter()
            .enumerate()
            .map(|(i, f)| (ours[i] + ours[i + 1]) / 2.0 / f)
            .collect();
        let r = Spread::of(&ratios);
        let (os, fs) = (Spread::of(&ours), Spread::of(&fio));
        println!(
            "{}: ours {:.0} IOPS ({:.0}–{:.0}), fio {:.0} ({:.0}–{:.0}); ratio median {:.3} ({:.3}–{:.3})",
            p.name, os.median, os.min, os.max, fs.median, fs.min, fs.max, r.median, r.min, r.max
        );
        if !(0.85..=1.15).contains(&r.median) {
            failed.push(format!("{} (ratio {:.3})", p.name, r.median));
        }
    }
    assert!(
        failed.is_empty(),
        "our file path and fio disagree by more than 15 %: {}",
        failed.join(", ")
    );
}
