//! The benchmark's own workload generator against fio, the instrument users know:
//! our `file` path (refblk's io_uring engine, O_DIRECT, registered buffers) and
//! fio's io_uring engine with the same parameters on the same file.
//!
//! Runs alternate (ours, fio, ours, ..., ours) and each fio run is compared with the
//! mean of our runs right before and after it, so drift of the machine hits both
//! sides alike; the median of those ratios ignores other tenants' bursts. Each run
//! gets a new io_uring instance and a fresh buffer, and starts with the file's
//! page cache dropped. Used by `tests/bench_fio.rs` (the agreement test) and
//! `bench/fio_crosscheck.rs` (the same, for any profile, by hand).

use std::io;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::drop_cache;
use super::stats::Spread;
use super::target::{BlockTarget, EngineTarget, IoOp};
use super::workload::{self, IoSpec, Pattern};

/// fio's command line for `spec` on `file` (the first `size` bytes): the same
/// engine features as our `file` path.
pub fn args(file: &Path, spec: &IoSpec, size: u64, runtime: Duration) -> Vec<String> {
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
    v.push(format!("--size={size}"));
    v.push(format!("--runtime={}ms", runtime.as_millis().max(1)));
    v
}

/// One fio run: its IOPS.
pub fn fio_iops(file: &Path, spec: &IoSpec, size: u64, runtime: Duration) -> io::Result<f64> {
    drop_cache(file)?;
    let out = Command::new("fio")
        .args(args(file, spec, size, runtime))
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run fio: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "fio on {} failed ({}): {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| io::Error::other(format!("fio's JSON output: {e}")))?;
    let side = if spec.op == IoOp::Write {
        "write"
    } else {
        "read"
    };
    v["jobs"][0][side]["iops"]
        .as_f64()
        .ok_or_else(|| io::Error::other(format!("fio's JSON output has no jobs[0].{side}.iops")))
}

/// One run of our generator on the `file` path: its IOPS. Fails unless the file
/// can be opened with O_DIRECT (fio runs with `--direct=1`).
pub fn ours_iops(
    file: &Path,
    spec: &IoSpec,
    size: u64,
    runtime: Duration,
    seed: u64,
) -> io::Result<f64> {
    drop_cache(file)?;
    let mut t = EngineTarget::open(file, spec.qd as usize, spec.bs as usize)?;
    if t.io_mode() != "O_DIRECT" {
        return Err(io::Error::other(format!(
            "{}: the file system does not take O_DIRECT ({}), fio would not match",
            file.display(),
            t.io_mode()
        )));
    }
    Ok(workload::run(&mut t, spec, size, runtime, seed)?.iops())
}

/// The outcome of one comparison.
#[derive(Debug, Clone)]
pub struct Agreement {
    /// Our runs (one more than fio's: they bracket every fio run).
    pub ours: Vec<f64>,
    pub fio: Vec<f64>,
    /// ours ÷ fio, per fio run (ours = the mean of the runs around it).
    pub ratios: Vec<f64>,
}

impl Agreement {
    pub fn ratio(&self) -> Spread {
        Spread::of(&self.ratios)
    }

    /// Whether the median ratio is within `tolerance` (0.15 = 15 %) of 1.
    pub fn agrees(&self, tolerance: f64) -> bool {
        (self.ratio().median - 1.0).abs() <= tolerance
    }

    /// One line: medians, ranges and the ratio.
    pub fn summary(&self) -> String {
        let (o, f, r) = (Spread::of(&self.ours), Spread::of(&self.fio), self.ratio());
        format!(
            "ours {:.0} IOPS ({:.0}–{:.0}), fio {:.0} ({:.0}–{:.0}); ratio median {:.3} ({:.3}–{:.3}) over {} fio runs",
            o.median,
            o.min,
            o.max,
            f.median,
            f.min,
            f.max,
            r.median,
            r.min,
            r.max,
            self.fio.len()
        )
    }
}

/// `runs` fio runs of `spec`, each bracketed by runs of ours.
pub fn compare(
    file: &Path,
    spec: &IoSpec,
    size: u64,
    runs: usize,
    runtime: Duration,
) -> io::Result<Agreement> {
    let mut ours = vec![ours_iops(file, spec, size, runtime, 0)?];
    let mut fio = Vec::with_capacity(runs);
    for rep in 0..runs {
        fio.push(fio_iops(file, spec, size, runtime)?);
        ours.push(ours_iops(file, spec, size, runtime, rep as u64 + 1)?);
    }
    let ratios = pair_ratios(&ours, &fio);
    Ok(Agreement { ours, fio, ratios })
}

/// ours ÷ fio per fio run, with ours the mean of the two runs around it
/// (`ours` has one run more than `fio`).
pub fn pair_ratios(ours: &[f64], fio: &[f64]) -> Vec<f64> {
    fio.iter()
        .zip(ours.windows(2))
        .map(|(f, o)| (o[0] + o[1]) / 2.0 / f)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(op: IoOp, pattern: Pattern) -> IoSpec {
        IoSpec {
            op,
            bs: 4096,
            qd: 32,
            pattern,
        }
    }

    #[test]
    fn fio_gets_the_same_parameters() {
        let a = args(
            Path::new("/x/img"),
            &spec(IoOp::Write, Pattern::Rand),
            1 << 30,
            Duration::from_millis(300),
        );
        for want in [
            "--rw=randwrite",
            "--bs=4096",
            "--iodepth=32",
            "--size=1073741824",
            "--runtime=300ms",
            "--direct=1",
            "--ioengine=io_uring",
            "--filename=/x/img",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        let s = args(
            Path::new("/x"),
            &spec(IoOp::Read, Pattern::Seq),
            1,
            Duration::ZERO,
        );
        assert!(s.iter().any(|x| x == "--rw=read"));
        assert!(s.iter().any(|x| x == "--runtime=1ms"));
    }

    #[test]
    fn the_ratio_pairs_each_fio_run_with_the_runs_around_it() {
        let ours = vec![100.0, 120.0, 80.0];
        let fio = vec![110.0, 200.0];
        let ratios = pair_ratios(&ours, &fio);
        assert_eq!(ratios, [1.0, 0.5]);
        let a = Agreement { ours, fio, ratios };
        assert_eq!(a.ratio().median, 0.75);
        assert!(!a.agrees(0.15));
        let b = Agreement {
            ratios: vec![0.9, 1.1, 1.12],
            ..a
        };
        assert!(b.agrees(0.15));
    }
}
