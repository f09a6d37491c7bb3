//! The systemd unit (issue 20): it passes `--handover-on-exit` (so `systemctl
//! restart` keeps guests' disks), is `Type=notify`, lets the daemon's own
//! refusal reach the journal (no ConditionPathExists on blkback), and scores
//! at most 5 in `systemd-analyze security`; its ExecStart, run the way
//! systemd runs it (NOTIFY_SOCKET, JOURNAL_STREAM, the environment file's
//! REFBLK_SERVE_ARGS), notifies READY=1 and logs lines with `<N>` syslog
//! priorities and no timestamps.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kit::serve::Stopped;
use refblk_sim::scratchfs::{have_tool, skip_or_fail};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/refblk.service");
const T: Duration = crate::kit::HANG;

fn unit() -> String {
    std::fs::read_to_string(UNIT).unwrap()
}

/// The values of `key=` lines in the unit (comments skipped).
fn values(key: &str) -> Vec<String> {
    unit()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
        .collect()
}

#[test]
fn the_unit_hands_over_on_restart_notifies_and_lets_the_refusal_through() {
    let exec = values("ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert!(
        exec[0]
            .split_whitespace()
            .any(|w| w == "--handover-on-exit"),
        "systemctl restart would disconnect every guest's disk: {}",
        exec[0]
    );
    assert_eq!(values("Type"), ["notify"]);
    assert!(
        !unit()
            .lines()
            .any(|l| l.starts_with("Condition") && l.contains("blkback")),
        "a Condition on xen_blkback would keep the daemon from serving vbd3 devices beside blkback"
    );
    assert_eq!(values("RuntimeDirectoryPreserve"), ["yes"]);
    // Documentation= points at things the package installs.
    let docs = values("Documentation").join(" ");
    for d in docs.split_whitespace() {
        assert!(
            d.starts_with("man:refblk") || d.starts_with("file:/usr/share/doc/refblk/"),
            "{d}"
        );
    }
}

#[test]
fn the_unit_scores_at_most_5_in_systemd_analyze_security() {
    if !have_tool("systemd-analyze")
        && !skip_or_fail("systemd-analyze is not installed (Debian: systemd)")
    {
        return;
    }
    let out = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            "--threshold=50",
            "--no-pager",
            UNIT,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    println!("{line}");
    assert!(score <= 5.0, "{line}");
}

/// Shell-like words of ExecStart with `$REFBLK_SERVE_ARGS` expanded (systemd
/// splits an unbraced `$VAR` at white space).
fn exec_start(binary: &Path, serve_args: &str) -> Vec<String> {
    let exec = values("ExecStart").remove(0);
    let mut words = Vec::new();
    for (i, w) in exec.split_whitespace().enumerate() {
        if i == 0 {
            assert_eq!(w, "/usr/bin/refblk", "the package installs /usr/bin/refblk");
            words.push(binary.display().to_string());
        } else if w == "$REFBLK_SERVE_ARGS" {
            words.extend(serve_args.split_whitespace().map(str::to_string));
        } else {
            words.push(w.to_string());
        }
    }
    words
}

#[test]
fn exec_start_as_systemd_runs_it_notifies_ready_and_logs_for_journald() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("machine");
    let bin = Path::new(env!("CARGO_BIN_EXE_refblk"));
    let _sim = Stopped(
        Command::new(bin)
            .args(["sim", "--dir"])
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + T;
    while !dir.join("xenstored.sock").exists() || !dir.join("evtchn.sock").exists() {
        assert!(Instant::now() < deadline, "refblk sim did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The unit's command line; the control socket moved into the scratch
    // directory, the simulated Xen given through REFBLK_SERVE_ARGS as an
    // administrator would in /etc/default/refblk.
    let control = dir.join("control.sock");
    let mut args = exec_start(bin, &format!("--sim {} --workers 1", dir.display()));
    for a in &mut args {
        if a == "/run/refblk/control.sock" {
            *a = control.display().to_string();
        }
    }
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let log_path = tmp.path().join("journal");
    let log = File::create(&log_path).unwrap();
    let md = log.metadata().unwrap();
    let mut serve = Stopped(
        Command::new(&args[0])
            .args(&args[1..])
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &notify_path)
            .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("READY=1 within the hang bound");
    assert_eq!(&buf[..n], b"READY=1");
    let st = Command::new(bin)
        .args(["status", "--json", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(st.status.success(), "ready but not answering");
    // systemctl stop: SIGTERM; the daemon says STOPPING=1 and hands over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify
        .recv(&mut buf)
        .expect("STOPPING=1 within the hang bound");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = serve.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "refblk serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let journal = std::fs::read_to_string(&log_path).unwrap();
    assert!(!journal.is_empty());
    for line in journal.lines() {
        let prio = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .map(|(p, _)| p);
        assert!(
            matches!(prio, Some("3" | "4" | "6" | "7")),
            "no syslog priority prefix: {line:?}"
        );
        // env_logger's own format starts with "[20" (an RFC 3339 time).
        assert!(!line.contains("[20"), "own timestamp: {line:?}");
    }
    assert!(journal.contains("<6>"), "{journal}");

    // A refusal reaches the journal as an error line.
    let log = File::create(&log_path).unwrap();
    let md = log.metadata().unwrap();
    let out = Command::new(bin)
        .args(["serve", "--sim"])
        .arg(tmp.path().join("no-such-machine"))
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .stderr(log)
        .status()
        .unwrap();
    assert!(!out.success());
    let journal = std::fs::read_to_string(&log_path).unwrap();
    assert!(journal.starts_with("<3>refblk: "), "{journal}");
    // Outside journald (JOURNAL_STREAM names another stream): no prefix.
    let out = Command::new(bin)
        .args(["serve", "--sim"])
        .arg(tmp.path().join("no-such-machine"))
        .env("JOURNAL_STREAM", "1:1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("refblk: "));
}
