//! `refblk bench --backing ram` (issue 21): the scratch file systems on a
//! loop device over a file in /dev/shm. Runs the binary for a fraction of a
//! second per path on a 64 MiB image and checks what it reports (the regime
//! in the Markdown, the JSON and the SVG; p50 and p99 latency, serving CPU
//! per I/O and refblk's added latency at QD1 present and sane) and what it
//! leaves behind: no loop device, mount or file of its own in /dev/shm or the
//! temp directory, also when it fails midway, is stopped by SIGTERM, or
//! refuses. Nothing here is timed: the numbers' sizes are the bench's
//! business, their presence and consistency are this test's.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use refblk_sim::scratchfs::{require_root_or_skip, require_tools_or_skip};
use serde_json::Value;

use crate::kit::{wait_until, HANG};

fn needs() -> bool {
    require_root_or_skip(
        "scratch XFS on a loop device over /dev/shm for refblk bench --backing ram",
    ) && require_tools_or_skip(
        &["mkfs.xfs", "losetup", "mount", "umount"],
        "refblk bench --backing ram",
    )
}

fn bench(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refblk"));
    c.arg("bench").args(args).stdin(Stdio::null());
    c
}

/// A tiny RAM-regime run: XFS, 64 MiB image, 0.2 s per run.
const TINY: &[&str] = &[
    "--backing",
    "ram",
    "--fs",
    "xfs",
    "--size",
    "64M",
    "--runtime",
    "0.2",
];

/// What bench process `pid` left behind: its files in /dev/shm and the temp
/// directory (scratch images `refblk-scratch.PID.N`, simulated machines
/// `refblk-bench-sim.PID.N`), loop devices over its scratch images, mounts.
fn leftovers(pid: u32) -> Vec<String> {
    let mut v = Vec::new();
    let tag = format!(".{pid}.");
    let scratch = format!("refblk-scratch.{pid}.");
    for d in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("refblk-") && name.contains(&tag) {
                v.push(e.path().display().to_string());
            }
        }
    }
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing =
            std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if backing.contains(&scratch) {
            v.push(format!("/dev/{name} over {}", backing.trim()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    v.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&scratch))
            .map(|l| format!("mount {l}")),
    );
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The bound on one of these runs (seconds each when the machine is idle): a
/// hung bench fails the test instead of hanging it; not a speed target.
const RUN_BOUND: Duration = Duration::from_secs(300);

/// Spawn `c`, collect its output, and return it with the child's pid. A run
/// still going after [`RUN_BOUND`] is killed (it then leaves its scratch file
/// system for the next bench to remove) and fails the test.
fn run(mut c: Command) -> (Output, u32) {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start refblk bench");
    let pid = child.id();
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let exited = wait_until(RUN_BOUND, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().expect("refblk bench status");
    let o = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(exited, "still running after {RUN_BOUND:?}: {}", show(&o));
    (o, pid)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_ram_run_names_its_regime_in_every_report_with_p50_p99_cpu_and_added_latency() {
    if !needs() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let (json, svg) = (out.path().join("ram.json"), out.path().join("ram.svg"));
    let mut c = bench(TINY);
    c.args([
        "--profiles",
        "rnd4k_q1t1_read,rnd4k_q32t1_write",
        "--paths",
        "file,loop-dio,refblk",
        "--reps",
        "2",
        "-q",
    ])
    .arg("--json")
    .arg(&json)
    .arg("--svg")
    .arg(&svg);
    let (o, pid) = run(c);
    assert!(o.status.success(), "{}", show(&o));
    let md = text(&o.stdout);
    // The results go to stdout once; stderr (logs, progress) holds none.
    assert_eq!(md.matches("refblk bench, ").count(), 1, "{}", show(&o));
    assert_eq!(md.matches("### xfs").count(), 1, "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        !err.contains("| profile |") && !err.contains("Regime:"),
        "results on stderr: {}",
        show(&o)
    );
    for want in [
        "; backing ram; image 64M",
        "Regime: backing **ram** (scratch file systems on a loop device (direct I/O) over a file in /dev/shm (tmpfs)",
        "I/O modes and cache regimes (backing ram): file: O_DIRECT (cold: O_DIRECT)",
        "| QD1 p50 − file µs | CPU µs/IO | kworker µs/IO |",
        "refblk's added latency at queue depth 1 (median p50, refblk − file; file → refblk µs): rnd4k_q1t1_read ",
    ] {
        assert!(md.contains(want), "{want:?} missing from:\n{md}");
    }
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["backing"], "ram", "{j}");
    assert!(j["backing_detail"]
        .as_str()
        .unwrap()
        .contains("/dev/shm (tmpfs)"));
    // Where the scratch file system really was: its image in /dev/shm, on tmpfs.
    let notes: Vec<&str> = j["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let scratch = format!("over /dev/shm/refblk-scratch.{pid}.");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("xfs: scratch file system on /dev/loop")
                && n.contains(&scratch)
                && n.ends_with("(tmpfs, ram backing)")),
        "{notes:?}"
    );
    assert!(
        text(&std::fs::read(&svg).unwrap())
            .contains("refblk bench (backing ram): throughput of each path"),
        "the SVG's title names no regime"
    );
    let io = j["io"].as_array().unwrap();
    assert_eq!(io.len(), 6, "two profiles × three paths: {j}");
    let entry = |profile: &str, path: &str| {
        io.iter()
            .find(|r| r["profile"] == profile && r["path"] == path)
            .unwrap_or_else(|| panic!("no {profile} {path} in {j}"))
    };
    for r in io {
        let what = format!("{} {}", r["profile"], r["path"]);
        assert!(r["error"].is_null(), "{what}: {}", r["error"]);
        assert_eq!(r["cache_regime"], "cold: O_DIRECT", "{what}");
        let samples = r["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{what}: samples");
        for s in samples {
            let (p50, p99) = (f(&s["lat_p50_us"]), f(&s["lat_p99_us"]));
            assert!(p50 > 0.0 && p99 >= p50, "{what}: p50 {p50}, p99 {p99}");
            assert!(f(&s["iops"]) > 0.0, "{what}: {s}");
            assert!(f(&s["cpu_us_per_io"]) > 0.0, "{what}: no serving CPU: {s}");
            // The kernel workers' share (loop devices): context, maybe 0.
            assert!(f(&s["kworker_us_per_io"]) >= 0.0, "{what}: {s}");
        }
        assert!(f(&r["lat_p99_us"]["median"]) >= f(&r["lat_p50_us"]["median"]));
    }
    // The added latency: at QD1 for the paths that are not the file path, the
    // difference of the median p50s; nowhere else.
    let med = |profile, path, k: &str| f(&entry(profile, path)[k]["median"]);
    for path in ["refblk", "loop-dio"] {
        let added = f(&entry("rnd4k_q1t1_read", path)["added_p50_us_over_file"]);
        let want = med("rnd4k_q1t1_read", path, "lat_p50_us")
            - med("rnd4k_q1t1_read", "file", "lat_p50_us");
        assert!((added - want).abs() < 1e-9, "{path}: {added} vs {want}");
        assert!(entry("rnd4k_q32t1_write", path)["added_p50_us_over_file"].is_null());
    }
    assert!(entry("rnd4k_q1t1_read", "file")["added_p50_us_over_file"].is_null());
    // fio calibrates the file path under this regime as under the other.
    if j["fio"].is_string() {
        assert!(
            md.contains("interleaved, backing ram; median of the per-rep ratios"),
            "{md}"
        );
        let cal = j["calibration"].as_array().unwrap();
        assert_eq!(cal.len(), 2, "{j}");
        for c in cal {
            assert!(c["error"].is_null(), "{c}");
            assert_eq!(c["fio_samples"].as_array().unwrap().len(), 2, "{c}");
            let (p50, p99) = (
                f(&c["fio_lat_p50_us"]["median"]),
                f(&c["fio_lat_p99_us"]["median"]),
            );
            assert!(p50 > 0.0 && p99 >= p50, "fio p50 {p50}, p99 {p99}");
            assert!(f(&c["file_over_fio"]["median"]) > 0.0, "{c}");
        }
    }
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind");
}

#[test]
fn a_ram_run_that_fails_midway_leaves_no_loop_device_or_tmpfs_file() {
    if !needs() {
        return;
    }
    // An impossible profile after a possible one: the I/O profile runs, then
    // snapshot/commit cannot make a volume of 1000 bytes (not whole sectors).
    let mut c = bench(TINY);
    c.args([
        "--profiles",
        "rnd4k_q1t1_read,snapshot",
        "--snapshot-sizes",
        "1000",
        "--paths",
        "file",
        "--reps",
        "1",
    ]);
    let (o, pid) = run(c);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("xfs: rnd4k_q1t1_read rep 1/1 file"),
        "the I/O profile did not run first: {err}"
    );
    assert!(err.contains("snapshot/commit of"), "{err}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind");
}

#[test]
fn sigterm_midway_through_a_ram_run_removes_its_scratch_file_system() {
    if !needs() {
        return;
    }
    let mut c = bench(TINY);
    c.args([
        "--profiles",
        "rnd4k_q1t1_read",
        "--paths",
        "file,refblk",
        "--reps",
        "100",
    ]);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start refblk bench");
    let pid = child.id();
    // Progress lines come one per step (stderr is no terminal).
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The first timed run's line, within HANG (a run that never gets there
    // fails below; one that keeps printing other lines does not wait longer).
    let deadline = Instant::now() + HANG;
    let started = std::iter::from_fn(|| {
        let left = deadline.checked_duration_since(Instant::now())?;
        rx.recv_timeout(left).ok()
    })
    .any(|l| l.contains("rnd4k_q1t1_read rep 1/100"));
    let running = leftovers(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exited = wait_until(HANG, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert!(started, "no timed run started: {err}");
    assert!(exited, "still running {HANG:?} after SIGTERM: {err}");
    // While it ran, its scratch file system was on a loop device over /dev/shm.
    let shm = format!("/dev/shm/refblk-scratch.{pid}.");
    assert!(
        running.iter().any(|l| l.starts_with(&shm))
            && running
                .iter()
                .any(|l| l.starts_with("/dev/loop") && l.contains(&shm)),
        "no scratch file system in /dev/shm while running: {running:?}"
    );
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: stopped by a signal"), "{err}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind");
}

#[test]
fn a_bad_backing_is_a_usage_error_that_changes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("never.json");
    let mut c = bench(&["--backing", "nvme", "--profiles", "rnd4k_q1t1_read"]);
    c.args(&TINY[2..]);
    c.arg("--json").arg(&json);
    let (o, pid) = run(c);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("[possible values: disk, ram]"),
        "{}",
        show(&o)
    );
    assert!(o.stdout.is_empty(), "{}", show(&o));
    assert!(!json.exists(), "a refused run wrote {}", json.display());
    assert_eq!(leftovers(pid), Vec::<String>::new());
    // With --dir the directory's own storage is measured: no backing to pick.
    let dir = out.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let mut c = bench(&["--backing", "ram", "--dir"]);
    c.arg(&dir);
    let (o, pid) = run(c);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("cannot be used with"),
        "{}",
        show(&o)
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "--dir touched");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

/// Bytes free in /dev/shm and available in the machine, the smaller.
fn ram_room() -> u64 {
    let vfs = nix::sys::statvfs::statvfs(Path::new("/dev/shm")).unwrap();
    let shm = vfs.blocks_available() as u64 * vfs.fragment_size() as u64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        * 1024;
    shm.min(mem)
}

#[test]
fn a_ram_run_that_cannot_fit_is_refused_naming_the_memory_needed_and_available() {
    if !needs() {
        return;
    }
    // An image a quarter of the room and 1 GiB more: the scratch file system
    // (4 images + 1 GiB) needs the room and 5 GiB more, while what a run that
    // went ahead anyway would write (one image) still fits.
    let size_mib = ram_room() / 4 / (1 << 20) + 1024;
    let size = format!("{size_mib}M");
    let mut c = bench(&[
        "--backing",
        "ram",
        "--fs",
        "xfs",
        "--size",
        &size,
        "--profiles",
        "rnd4k_q1t1_read",
        "--paths",
        "file",
        "--runtime",
        "0.1",
        "--reps",
        "1",
    ]);
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("never.json");
    c.arg("--json").arg(&json);
    c.env("RUST_LOG", "warn");
    let (o, pid) = run(c);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        o.stdout.is_empty(),
        "a refused run printed results: {}",
        show(&o)
    );
    assert!(!json.exists(), "a refused run wrote {}", json.display());
    let err = text(&o.stderr);
    for want in [
        "--backing ram: the scratch xfs file system needs up to ",
        " GiB of memory",
        "but /dev/shm has ",
        " GiB free and the machine ",
        " GiB available; lower --size or --snapshot-sizes, or use --backing disk",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    assert!(
        !err.contains("step 1/"),
        "refused only after starting: {err}"
    );
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind");
}

#[test]
fn bench_help_documents_the_ram_backing_with_an_example_and_the_refusal() {
    let o = bench(&["--help"]).output().expect("refblk bench --help");
    assert!(o.status.success(), "{}", show(&o));
    let help = text(&o.stdout);
    for want in [
        "--backing <BACKING>",
        "ram:  A file in /dev/shm (tmpfs)",
        "Examples:",
        "sudo refblk bench --backing ram --fs xfs,btrfs",
        "is refused before anything is made",
        "or use --backing disk",
        "130 stopped by a signal",
    ] {
        assert!(help.contains(want), "{want:?} missing from:\n{help}");
    }
}
