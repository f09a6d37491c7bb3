//! fio, the instrument users know, beside the benchmark's own workload generator:
//! the same profile (block size, queue depth, read or write, sequential, random or
//! each block once) on the same file with the engine features of our `file` path
//! (io_uring, O_DIRECT, registered buffers and files).
//!
//! Two uses:
//! - `refblk bench` calibrates its ceiling with it: every repetition runs fio for
//!   the same time as the paths, interleaved with them, and the report shows our
//!   `file` path ÷ fio ([`run_timed`]; docs/benchmarks.md, "Calibration").
//! - `tests/ops/bench_fio.rs` checks, without timing anything, that for a fixed number
//!   of operations the two issue the same operations ([`issued`], compared by
//!   [`mismatches`]).

use std::io;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::target::{BlockTarget, EngineTarget, IoOp};
use super::workload::{IoCounts, IoSpec, Pattern, Stop};
use super::Sample;
use refblk_sim::scratchfs::have_tool;

/// fio's version (`fio-3.33`), or why it cannot be used.
pub fn available() -> Result<String, String> {
    if !have_tool("fio") {
        return Err("fio is not installed (apt-get install fio)".into());
    }
    let out = Command::new("fio")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio --version failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// fio's command line for `spec` on `file` (the first `size` bytes), until `stop`:
/// the same engine features as our `file` path, with `--direct=1` when that path
/// runs with O_DIRECT. Err for what fio cannot do the way we do.
pub fn args(
    file: &Path,
    spec: &IoSpec,
    size: u64,
    stop: Stop,
    direct: bool,
) -> Result<Vec<String>, String> {
    let rw = match (spec.op, spec.pattern) {
        (IoOp::Read, Pattern::Seq) => "read",
        (IoOp::Write, Pattern::Seq) => "write",
        (IoOp::Read, _) => "randread",
        (IoOp::Write, _) => "randwrite",
        (IoOp::Discard, _) => {
            return Err(
                "fio trims only block devices (BLKDISCARD; a regular file gets ENOTTY), \
                 our file path punches holes"
                    .into(),
            )
        }
    };
    let mut v: Vec<String> = [
        "--name=refblk-calibration",
        "--ioengine=io_uring",
        "--fixedbufs",
        "--registerfiles",
        "--randrepeat=0",
        // Our generator fills its buffers once, so does fio without scrambling.
        "--scramble_buffers=0",
        "--lat_percentiles=1",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--direct={}", u8::from(direct)));
    v.push(format!("--filename={}", file.display()));
    v.push(format!("--rw={rw}"));
    v.push(format!("--bs={}", spec.bs));
    v.push(format!("--iodepth={}", spec.qd));
    v.push(format!("--size={size}"));
    // Rand: uniformly random blocks, repeats allowed. RandUnique: fio's random map
    // hands out each block once, and the run ends when all were used, as ours does.
    if spec.pattern == Pattern::Rand {
        v.push("--norandommap".into());
    }
    match stop {
        Stop::After(runtime) => {
            // Seq and Rand go on (wrapping) until the time is up; RandUnique stops
            // early at the end of the region, as ours does.
            if spec.pattern != Pattern::RandUnique {
                v.push("--time_based".into());
            }
            v.push(format!("--runtime={}ms", runtime.as_millis().max(1)));
        }
        Stop::Ops(n) => v.push(format!("--io_size={}", n * u64::from(spec.bs))),
    }
    Ok(v)
}

/// `fio ARGS` as one line to paste into a shell (our arguments need no quoting
/// unless the path has spaces).
pub fn command_line(args: &[String]) -> String {
    let mut s = String::from("fio");
    for a in args {
        s.push(' ');
        if a.contains(' ') {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(a);
        }
    }
    s
}

fn run_json(file: &Path, args: &[String]) -> io::Result<Value> {
    let out = Command::new("fio")
        .args(args)
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
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| io::Error::other(format!("fio's JSON output: {e}")))?;
    let err = v["jobs"][0]["error"].as_i64().unwrap_or(0);
    if err != 0 {
        return Err(io::Error::other(format!(
            "fio on {}: job error {err} ({})",
            file.display(),
            io::Error::from_raw_os_error(err as i32)
        )));
    }
    Ok(v)
}

fn side(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read",
        IoOp::Write => "write",
        IoOp::Discard => "trim",
    }
}

/// One timed fio run of `spec` on `file` (its page cache dropped by the caller),
/// as a [`Sample`]: IOPS, MB/s, mean, median and 99th percentile of the total latency
/// (submission to completion, what our generator measures), operations, seconds.
/// CPU and page-cache figures are left at 0.
pub fn run_timed(args: &[String], file: &Path, op: IoOp) -> io::Result<Sample> {
    let v = run_json(file, args)?;
    let s = &v["jobs"][0][side(op)];
    let num = |x: &Value, what: &str| {
        x.as_f64().ok_or_else(|| {
            io::Error::other(format!(
                "fio's JSON output has no jobs[0].{}.{what}",
                side(op)
            ))
        })
    };
    Ok(Sample {
        iops: num(&s["iops"], "iops")?,
        mbps: num(&s["bw_bytes"], "bw_bytes")? / 1e6,
        lat_mean_us: num(&s["lat_ns"]["mean"], "lat_ns.mean")? / 1000.0,
        lat_p50_us: s["lat_ns"]["percentile"]["50.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        lat_p99_us: s["lat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        ops: num(&s["total_ios"], "total_ios")? as u64,
        secs: num(&s["runtime"], "runtime")? / 1000.0,
        ..Default::default()
    })
}

/// What fio issued in a run of a fixed number of operations.
#[derive(Debug, Clone, Default)]
pub struct FioIssued {
    /// From its I/O log (`--write_iolog`), counted like our generator counts, in
    /// the order fio issued them. `max_depth` is not in the log (left at 0).
    pub counts: IoCounts,
    /// fio's `iodepth_level`: (bucket, % of operations), the bucket the lowest depth
    /// it covers (1, 2, 4, ..., 32, 64 = "64 and more").
    pub depth_levels: Vec<(u32, f64)>,
}

impl FioIssued {
    /// The highest depth bucket fio's operations reached.
    pub fn max_depth_level(&self) -> u32 {
        self.depth_levels
            .iter()
            .filter(|(_, pct)| *pct > 0.0)
            .map(|(l, _)| *l)
            .max()
            .unwrap_or(0)
    }
}

/// fio's `iodepth_level` bucket holding depth `d`.
pub fn depth_level(d: u32) -> u32 {
    if d == 0 {
        0
    } else {
        (1u32 << d.ilog2()).min(64)
    }
}

/// Count the read, write and trim lines of a fio I/O log (versions 2 and 3:
/// `[time] file action offset length`).
pub fn parse_iolog(text: &str) -> Result<IoCounts, String> {
    let mut c = IoCounts::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 3 {
            continue;
        }
        let op = match w[w.len() - 3] {
            "read" => IoOp::Read,
            "write" => IoOp::Write,
            "trim" => IoOp::Discard,
            _ => continue,
        };
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("fio's I/O log: bad number in {line:?}"))
        };
        let (offset, len) = (num(w[w.len() - 2])?, num(w[w.len() - 1])?);
        let len = u32::try_from(len).map_err(|_| format!("fio's I/O log: {line:?}"))?;
        c.issue(op, offset, len, 0);
    }
    Ok(c)
}

/// Run fio for exactly `ops` operations of `spec` on `file` (fio `io_size=`) and
/// collect what it issued from its I/O log, checked against its JSON summary
/// (`total_ios`, `io_bytes`).
pub fn issued(
    file: &Path,
    spec: &IoSpec,
    size: u64,
    ops: u64,
    direct: bool,
) -> io::Result<FioIssued> {
    let log = file.with_extension("fio-iolog");
    let mut a = args(file, spec, size, Stop::Ops(ops), direct).map_err(io::Error::other)?;
    a.push(format!("--write_iolog={}", log.display()));
    let v = run_json(file, &a);
    let text = std::fs::read_to_string(&log);
    let _ = std::fs::remove_file(&log);
    let v = v?;
    let counts = parse_iolog(&text?).map_err(io::Error::other)?;
    let job = &v["jobs"][0];
    let (mut total_ios, mut io_bytes) = (0, 0);
    for op in [IoOp::Read, IoOp::Write, IoOp::Discard] {
        total_ios += job[side(op)]["total_ios"].as_u64().unwrap_or(0);
        io_bytes += job[side(op)]["io_bytes"].as_u64().unwrap_or(0);
    }
    if (total_ios, io_bytes) != (counts.ops(), counts.bytes) {
        return Err(io::Error::other(format!(
            "fio's I/O log ({} operations, {} bytes) and its JSON summary ({total_ios}, {io_bytes}) disagree",
            counts.ops(),
            counts.bytes
        )));
    }
    let mut depth_levels = Vec::new();
    if let Some(m) = job["iodepth_level"].as_object() {
        for (k, pct) in m {
            let level = if k == ">=64" {
                64
            } else {
                k.parse().unwrap_or(0)
            };
            depth_levels.push((level, pct.as_f64().unwrap_or(0.0)));
        }
    }
    depth_levels.sort_by_key(|(l, _)| *l);
    if depth_levels.is_empty() {
        return Err(io::Error::other("fio's JSON output has no iodepth_level"));
    }
    Ok(FioIssued {
        counts,
        depth_levels,
    })
}

/// Where `ours` (our generator's counts for a fixed-count run of `spec` over the
/// first `region` bytes) and what fio issued for the same profile differ; empty
/// when they issued the same operations:
/// - the same number of reads, writes and discards, and bytes;
/// - the same smallest and largest operation, none misaligned;
/// - offsets within the region: for a sequential profile the same lowest offset,
///   highest end and number of operations that continue the previous one; for a
///   random one, both spread over the region (lowest offset in its first eighth,
///   highest end in its last) and at most an eighth of operations sequential (with
///   200 or more operations, a uniform generator misses this with probability
///   below 10^-11);
/// - the queue depth: ours reaches the profile's depth, in the same fio
///   `iodepth_level` bucket as fio's highest (needs at least `qd` operations).
pub fn mismatches(spec: &IoSpec, region: u64, ours: &IoCounts, fio: &FioIssued) -> Vec<String> {
    let mut out = Vec::new();
    let f = &fio.counts;
    let mut same = |what: &str, a: u64, b: u64| {
        if a != b {
            out.push(format!("{what}: ours {a}, fio {b}"));
        }
    };
    same("reads", ours.reads, f.reads);
    same("writes", ours.writes, f.writes);
    same("discards", ours.discards, f.discards);
    same("bytes", ours.bytes, f.bytes);
    same("smallest operation", ours.min_len.into(), f.min_len.into());
    same("largest operation", ours.max_len.into(), f.max_len.into());
    same("misaligned operations", ours.misaligned, f.misaligned);
    if spec.pattern == Pattern::Seq {
        same("lowest offset", ours.min_offset, f.min_offset);
        same("highest end", ours.max_end, f.max_end);
        same("sequential operations", ours.sequential, f.sequential);
    }
    for (who, c) in [("ours", ours), ("fio", f)] {
        if c.max_end > region {
            out.push(format!(
                "{who}: an operation ends at {}, past the region of {region} bytes",
                c.max_end
            ));
        }
        if spec.pattern != Pattern::Seq {
            if c.min_offset.saturating_mul(8) >= region || c.max_end.saturating_mul(8) <= region * 7
            {
                out.push(format!(
                    "{who}: random offsets span only {}..{} of a region of {region} bytes",
                    c.min_offset, c.max_end
                ));
            }
            if c.sequential.saturating_mul(8) > c.ops() {
                out.push(format!(
                    "{who}: {} of {} random operations continue the previous one",
                    c.sequential,
                    c.ops()
                ));
            }
        }
    }
    if ours.max_depth != spec.qd {
        out.push(format!(
            "queue depth: ours reached {}, the profile asks for {}",
            ours.max_depth, spec.qd
        ));
    }
    if depth_level(ours.max_depth) != fio.max_depth_level() {
        out.push(format!(
            "queue depth: ours reached {} (fio bucket {}), fio's highest bucket is {} ({:?})",
            ours.max_depth,
            depth_level(ours.max_depth),
            fio.max_depth_level(),
            fio.depth_levels
        ));
    }
    out
}

/// One run of our generator on the `file` path (refblk's engine on `file`) until
/// `stop`, and whether it ran with O_DIRECT (fio's `--direct` to match).
pub fn run_ours(
    file: &Path,
    spec: &IoSpec,
    size: u64,
    stop: Stop,
    seed: u64,
) -> io::Result<(super::workload::RunResult, bool)> {
    let mut t = EngineTarget::open(file, spec.qd as usize, spec.bs as usize)?;
    let direct = t.io_mode() == "O_DIRECT";
    let r = super::workload::run_until(&mut t, spec, size, stop, seed)?;
    Ok((r, direct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            Stop::After(Duration::from_millis(300)),
            true,
        )
        .unwrap();
        for want in [
            "--rw=randwrite",
            "--bs=4096",
            "--iodepth=32",
            "--size=1073741824",
            "--runtime=300ms",
            "--time_based",
            "--norandommap",
            "--direct=1",
            "--ioengine=io_uring",
            "--fixedbufs",
            "--registerfiles",
            "--filename=/x/img",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        let s = args(
            Path::new("/x"),
            &spec(IoOp::Read, Pattern::Seq),
            1,
            Stop::Ops(10),
            false,
        )
        .unwrap();
        for want in ["--rw=read", "--io_size=40960", "--direct=0"] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert!(!s
            .iter()
            .any(|x| x.starts_with("--runtime") || x == "--time_based"));
        // Each block once: fio's random map, and no wrapping when the blocks run out.
        let u = args(
            Path::new("/x"),
            &spec(IoOp::Write, Pattern::RandUnique),
            1 << 20,
            Stop::After(Duration::from_secs(1)),
            true,
        )
        .unwrap();
        assert!(u.iter().any(|x| x == "--rw=randwrite"));
        assert!(!u
            .iter()
            .any(|x| x == "--norandommap" || x == "--time_based"));
        assert!(args(
            Path::new("/x"),
            &spec(IoOp::Discard, Pattern::RandUnique),
            1 << 20,
            Stop::Ops(1),
            true
        )
        .is_err());
    }

    #[test]
    fn the_iolog_is_counted_like_our_generator_counts() {
        let log = "fio version 3 iolog\n19 img add\n7257 img open\n\
                   7265 img read 0 1048576\n7446 img read 1048576 1048576\n\
                   7500 img read 0 1048576\n7600 img write 4096 4096\n95348 img close\n";
        let c = parse_iolog(log).unwrap();
        assert_eq!((c.reads, c.writes, c.discards), (3, 1, 0));
        assert_eq!(
            (c.min_len, c.max_len, c.bytes),
            (4096, 1 << 20, 3 * (1 << 20) + 4096)
        );
        assert_eq!((c.min_offset, c.max_end, c.sequential), (0, 2 << 20, 1));
        let v2 = parse_iolog("fio version 2 iolog\nimg read 512 4096\n").unwrap();
        assert_eq!((v2.reads, v2.misaligned), (1, 1));
        assert!(parse_iolog("1 img read x 4096\n").is_err());
    }

    #[test]
    fn depth_buckets_are_fios() {
        let got: Vec<u32> = [0, 1, 2, 3, 4, 7, 8, 31, 32, 63, 64, 500]
            .iter()
            .map(|&d| depth_level(d))
            .collect();
        assert_eq!(got, [0, 1, 2, 2, 4, 4, 8, 16, 32, 32, 64, 64]);
    }

    #[test]
    fn mismatches_name_what_differs() {
        let s = IoSpec {
            op: IoOp::Read,
            bs: 4096,
            qd: 8,
            pattern: Pattern::Seq,
        };
        let mut ours = IoCounts::default();
        let mut theirs = IoCounts::default();
        for i in 0..20u64 {
            ours.issue(IoOp::Read, (i % 10) * 4096, 4096, (i as u32 + 1).min(8));
            theirs.issue(IoOp::Read, (i % 10) * 4096, 4096, 0);
        }
        let fio = FioIssued {
            counts: theirs,
            depth_levels: vec![(1, 5.0), (2, 10.0), (4, 20.0), (8, 65.0), (16, 0.0)],
        };
        assert_eq!(mismatches(&s, 10 * 4096, &ours, &fio), Vec::<String>::new());
        let mut shallow = ours;
        shallow.max_depth = 4;
        let m = mismatches(&s, 10 * 4096, &shallow, &fio);
        assert_eq!(m.len(), 2, "{m:?}");
        let mut past = ours;
        past.max_end += 4096;
        assert!(mismatches(&s, 10 * 4096, &past, &fio)
            .iter()
            .any(|m| m.contains("past the region")));
    }
}
