//! README's "A guest anyone can start" walk-through, executed: its commands
//! are read from README.md (between the walkthrough markers), the machine
//! directory moved into a scratch directory, the long-running ones started
//! in the background (the guest for a few seconds, `status --watch` for two
//! screens), and the guest must verify reads, see no error, and slow down to
//! the limit set while it runs.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::kit::serve::Stopped;

const T: Duration = crate::kit::HANG;

/// The walk-through's command lines, comments and continuation lines removed.
fn walkthrough() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough")
        .expect("README has the walkthrough");
    let end = readme[start..].find("<!-- end walkthrough -->").unwrap() + start;
    readme[start..end]
        .lines()
        .filter_map(|l| {
            let cmd = l.split(" #").next().unwrap().trim();
            (cmd.starts_with("refblk ") || cmd.starts_with("export ")).then(|| cmd.to_string())
        })
        .collect()
}

fn words(line: &str, dir: &Path) -> Vec<String> {
    line.replace("/dev/shm/xen", &dir.display().to_string())
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn refblk(args: &[String], control: Option<&str>) -> Command {
    assert_eq!(args[0], "refblk");
    let mut c = Command::new(env!("CARGO_BIN_EXE_refblk"));
    c.args(&args[1..]).env("RUST_LOG", "warn");
    match control {
        Some(p) => c.env("REFBLK_CONTROL", p),
        None => c.env_remove("REFBLK_CONTROL"),
    };
    c
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_readme_walkthrough_runs_a_verified_guest_that_status_sees_and_limit_slows() {
    // The daemon pins io_uring buffers (locked memory): root.
    if !nix::unistd::geteuid().is_root()
        && !refblk_sim::scratchfs::skip_or_fail("refblk serve needs root (locked memory)")
    {
        return;
    }
    let lines = walkthrough();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let tmp = tempfile::Builder::new()
        .prefix("refblk-walk")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let dir = tmp.path().join("xen");

    // Terminal 1: the simulated Xen.
    let sim = words(&lines[0], &dir);
    assert_eq!(sim[1], "sim");
    let _sim = Stopped(refblk(&sim, None).stdin(Stdio::null()).spawn().unwrap());
    let deadline = Instant::now() + T;
    while !dir.join("xenstored.sock").exists() || !dir.join("evtchn.sock").exists() {
        assert!(Instant::now() < deadline, "refblk sim did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Terminal 2: the daemon (one worker: the test machine is small).
    let mut serve = words(&lines[1], &dir);
    assert_eq!(serve[1], "serve");
    serve.extend(["--workers".into(), "1".into()]);
    let _serve = Stopped(refblk(&serve, None).stdin(Stdio::null()).spawn().unwrap());
    let control = dir.join("refblk.sock");
    let deadline = Instant::now() + T;
    while !control.exists() {
        assert!(Instant::now() < deadline, "refblk serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Terminal 3: the guest, for 6 seconds.
    let mut guest = words(&lines[2], &dir);
    assert_eq!(guest[1..3], ["sim".to_string(), "guest".to_string()]);
    for (i, w) in guest.clone().iter().enumerate() {
        if w == "--size" {
            guest[i + 1] = "32M".into(); // smaller than the README's, same command
        }
    }
    guest.extend(["--seconds".into(), "6".into()]);
    let guest_out = tmp.path().join("guest.out");
    let g = refblk(&guest, None)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&guest_out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = Stopped(g);

    // Terminal 4: REFBLK_CONTROL, status, limit.
    let export = &lines[3];
    let control_s = export
        .strip_prefix("export REFBLK_CONTROL=")
        .unwrap()
        .replace("/dev/shm/xen", &dir.display().to_string());
    assert_eq!(Path::new(&control_s), control);
    // Wait until the guest's disk is served.
    let deadline = Instant::now() + T;
    loop {
        let o = Command::new(env!("CARGO_BIN_EXE_refblk"))
            .args(["status", "--json", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["devices"][0]["state"] == "Connected" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's disk never connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut status = words(&lines[4], &dir);
    assert_eq!(status[1..3], ["status".to_string(), "--watch".to_string()]);
    status.extend(["--count", "1", "--interval", "0.5"].map(String::from));
    // One screen of `status --watch` shows the guest's I/O. Rates over half a
    // second: on a loaded machine one screen may catch none, so look again
    // (bounded by the hang bound), never judge a rate.
    let mut last = String::new();
    let seen = crate::kit::wait_until(T, || {
        let o = refblk(&status, Some(&control_s)).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let screen = String::from_utf8_lossy(&o.stdout).to_string();
        let row = screen
            .lines()
            .find(|l| l.starts_with("work "))
            .unwrap_or_else(|| panic!("no row of the guest work:\n{screen}"))
            .to_string();
        // The IOPS column as `status` prints it: a count, or from 100,000 on
        // a figure with a unit (`123k`, `1.2M`).
        let field = row.split_whitespace().nth(3).unwrap_or("").to_string();
        let digits = field.trim_end_matches(['k', 'M', 'G', 'T']);
        let iops: f64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("IOPS column '{field}' is not a rate: {row}"));
        last = row;
        iops > 0.0
    });
    assert!(seen, "status --watch never showed the guest's I/O: {last}");

    let limit = words(&lines[5], &dir);
    let o = refblk(&limit, Some(&control_s)).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read-iops=500 write-iops=500"),
        "{}",
        text(&o)
    );

    // The guest finishes by itself, with no error and verified reads.
    let deadline = Instant::now() + T;
    let st = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the guest did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(g.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let out = std::fs::read_to_string(&guest_out).unwrap();
    assert!(st.success(), "guest: {st:?}\n{out}\n{err}");
    let last = out.lines().last().unwrap_or("");
    assert!(
        last.starts_with("done: ") && last.ends_with(" 0 errors"),
        "{out}"
    );
    let verified: u64 = last
        .split(", ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(verified > 0, "no read was verified:\n{out}");
    // A progress line printed a second or more after the limit shows at most
    // the limit's rate (500 reads + 500 writes per second), with slack for
    // the burst and a line's interval straddling the change.
    let rates: Vec<f64> = out
        .lines()
        .filter(|l| l.contains(" IOPS "))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    let tail = rates.last().copied().unwrap_or(f64::MAX);
    assert!(
        tail <= 1500.0,
        "the limit did not slow the guest: {rates:?}\n{out}"
    );
    // --sim DIR names the daemon's socket for every client command.
    for args in [
        &["status", "--json", "--sim"][..],
        &["ctl", "--sim"][..],
        &["limit", "work", "--sim"][..],
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_refblk"));
        c.args(args).arg(&dir).env_remove("REFBLK_CONTROL");
        if args[0] == "ctl" {
            c.arg("status");
        }
        let o = c.output().unwrap();
        // limit: the guest's domain is gone by now, so the daemon answers
        // (no such domain) rather than the socket being missing.
        if args[0] == "limit" {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(!e.contains("is `refblk serve` running"), "{}", text(&o));
        } else {
            assert!(o.status.success(), "{args:?}: {}", text(&o));
        }
    }
    // Its disk was detached and its domain removed.
    let o = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["status", "--json", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let deadline = Instant::now() + T;
    let mut v = v;
    while v["devices"].as_array().is_some_and(|d| !d.is_empty()) {
        assert!(Instant::now() < deadline, "the guest's disk stayed: {v}");
        std::thread::sleep(Duration::from_millis(50));
        let o = Command::new(env!("CARGO_BIN_EXE_refblk"))
            .args(["status", "--json", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        v = serde_json::from_slice(&o.stdout).unwrap();
    }
}

/// `refblk sim guest --disk pool:DIR:VID`: the daemon starts the pool
/// volume, the guest's verified I/O runs on it, and when the guest stops the
/// volume is committed (a new revision, the dirty image gone) with what the
/// guest wrote.
#[test]
fn a_sim_guest_runs_on_a_pool_volume_which_is_committed_when_it_stops() {
    if !nix::unistd::geteuid().is_root()
        && !refblk_sim::scratchfs::skip_or_fail("refblk serve needs root (locked memory)")
    {
        return;
    }
    let tmp = crate::kit::machine_dir();
    let dir = tmp.path().join("xen");
    let dir_s = dir.display().to_string();
    let vid = "appvms/work/private";
    let pool = crate::kit::pool_with_volume(tmp.path(), vid, 2, 8 << 20);
    let clean = pool.join(format!("{vid}.img"));
    let before = std::fs::read(&clean).unwrap();
    assert!(before.iter().all(|&b| b == 0));

    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let _sim = Stopped(
        refblk(&args(&["refblk", "sim", "--dir", &dir_s]), None)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + T;
    while !dir.join("xenstored.sock").exists() || !dir.join("evtchn.sock").exists() {
        assert!(Instant::now() < deadline, "refblk sim did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _serve = Stopped(
        refblk(
            &args(&["refblk", "serve", "--sim", &dir_s, "--workers", "1"]),
            None,
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let control = dir.join("refblk.sock");
    let deadline = Instant::now() + T;
    while refblk_core::backend::control::request(&control, "status").is_err() {
        assert!(Instant::now() < deadline, "refblk serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The target as a disk line names it; --seconds bounds the guest, the
    // hang bound the wait for it.
    let target = format!("pool:{}:{vid}", pool.display());
    let mut g = Stopped(
        refblk(
            &args(&[
                "refblk",
                "sim",
                "guest",
                "--sim",
                &dir_s,
                "--disk",
                &target,
                "--name",
                "work",
                "--workload",
                "randrw",
                "--verify",
                "--seconds",
                "2",
            ]),
            None,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    // While it runs, the daemon serves the volume's dirty image.
    let dirty = pool.join(format!("{vid}-dirty.img"));
    let mut seen = String::new();
    let served = crate::kit::wait_until(T, || {
        let Ok(v) = refblk_core::backend::control::request(&control, "status") else {
            return false;
        };
        seen = v["devices"].to_string();
        v["devices"][0]["image"] == dirty.display().to_string()
    });
    assert!(
        served,
        "the daemon never served {}: {seen}",
        dirty.display()
    );
    let deadline = Instant::now() + T;
    let st = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the guest did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::io::Read::read_to_string(g.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(g.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(st.success(), "guest: {st:?}\n{out}\n{err}");
    assert!(out.contains(&format!("xvda -> {target}")), "{out}");
    let last = out.lines().last().unwrap_or("");
    assert!(last.ends_with(" 0 errors"), "{out}");
    // Committed: the dirty image is gone, the old clean image is a revision,
    // and the clean image holds the guest's writes.
    assert!(!dirty.exists(), "the dirty image is left after the guest");
    let revisions = std::fs::read_dir(clean.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("private.img."))
        .count();
    assert_eq!(revisions, 1, "no new revision of {vid}");
    let after = std::fs::read(&clean).unwrap();
    assert!(
        after.iter().any(|&b| b != 0),
        "the committed volume holds none of the guest's writes"
    );
    let v = refblk_core::backend::control::request(&control, "status").unwrap();
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(0), "{v}");
}
