//! Metrics and monitoring (issue 20): the Prometheus text of a busy device is
//! accepted by `promtool check metrics` and agrees with the JSON status; a
//! `refblk serve` process serves it on its `--metrics` socket, tells systemd
//! it is ready (sd_notify) once its control socket answers, and opens a
//! read-only status socket that a non-root member of `--status-group` can
//! read while the control socket stays root-only; JSON answers carry
//! `version`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::kit::serve::Stopped;
use crate::kit::*;
use refblk::cli::metrics;
use refblk_core::backend::control::handle_line;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{FrontendOptions, IoRequest};
use refblk_sim::scratchfs::{have_tool, skip_or_fail};

const MIB: u64 = 1 << 20;
const T: Duration = crate::kit::HANG;

/// Run `promtool check metrics` on `text`; panics with its complaints.
fn promtool_accepts(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n--- the metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_promtool() -> bool {
    have_tool("promtool")
        || skip_or_fail("promtool is not installed (Debian: prometheus; scripts/test installs it)")
}

/// The value of the sample `series` (name and labels exactly) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} not in the metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_of_a_busy_device_pass_promtool_and_match_the_status() {
    if !have_promtool() {
        return;
    }
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "m.img", 16 * MIB);
    let guest = rig.guest(4, 16384);
    let _vbd = rig.attach(4, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    random_io(&mut fe, 7, 300, 8, 64, 8 * MIB, true);
    // One read past the end: an error the metrics must count.
    let bad = fe
        .submit(
            None,
            IoRequest::Read {
                sector: 16 * MIB / 512,
                len: 4096,
            },
        )
        .unwrap();
    assert_ne!(fe.wait_for(bad, T).unwrap().status, 0);

    let status = handle_line("status", &rig.backend);
    assert_eq!(status["version"], 1, "{status}");
    let text = metrics::render(&status);
    promtool_accepts(&text);

    let d = &status["devices"][0];
    let l = format!(
        "domid=\"4\",devid=\"{XVDA}\",domain=\"{}\",vdev=\"xvda\"",
        d["domain_name"].as_str().unwrap_or("")
    );
    for (op, key) in [("read", "reads"), ("write", "writes"), ("flush", "flushes")] {
        assert_eq!(
            value(
                &text,
                &format!("refblk_device_requests_total{{{l},op=\"{op}\"}}")
            ),
            d[key].as_u64().unwrap() as f64,
            "{op}"
        );
    }
    assert!(d["reads"].as_u64().unwrap() > 10 && d["writes"].as_u64().unwrap() > 10);
    assert_eq!(
        value(
            &text,
            &format!("refblk_device_bytes_total{{{l},op=\"write\"}}")
        ),
        d["bytes_written"].as_u64().unwrap() as f64
    );
    assert_eq!(
        value(
            &text,
            &format!("refblk_device_errors_total{{{l},op=\"read\"}}")
        ),
        1.0
    );
    // Every request is in its histogram; the buckets only grow and end in +Inf.
    for op in ["read", "write", "flush", "discard"] {
        let h = &d["stats"]["ops"][op];
        let n = h["requests"].as_u64().unwrap() as f64;
        let count = value(
            &text,
            &format!("refblk_device_request_duration_seconds_count{{{l},op=\"{op}\"}}"),
        );
        assert_eq!(count, n, "{op} _count");
        let inf = value(
            &text,
            &format!(
                "refblk_device_request_duration_seconds_bucket{{{l},op=\"{op}\",le=\"+Inf\"}}"
            ),
        );
        assert_eq!(inf, n, "{op} +Inf bucket");
        let prefix = format!("refblk_device_request_duration_seconds_bucket{{{l},op=\"{op}\",");
        let buckets: Vec<f64> = text
            .lines()
            .filter(|x| x.starts_with(&prefix))
            .map(|x| x.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), 32, "{op}: one sample per log2 bucket");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{op}: {buckets:?}"
        );
        let sum = value(
            &text,
            &format!("refblk_device_request_duration_seconds_sum{{{l},op=\"{op}\"}}"),
        );
        assert!(
            (sum - h["latency_us_sum"].as_u64().unwrap() as f64 / 1e6).abs() < 1e-9,
            "{op} _sum in seconds"
        );
    }
    assert_eq!(value(&text, "refblk_devices"), 1.0);
    drop(fe);
    rig.shutdown();
}

fn refblk() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refblk"));
    c.env("RUST_LOG", "warn").env_remove("REFBLK_CONTROL");
    c
}

/// `refblk ARGS` as the unprivileged user nobody:nogroup with no other
/// groups (util-linux's setpriv).
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_refblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("REFBLK_CONTROL")
        .output()
        .expect("run setpriv")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// GET `path` over HTTP on the unix socket `sock`: (status line, body).
fn http_get(sock: &Path, path: &str) -> (String, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the metrics socket");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn serve_notifies_systemd_and_shares_read_only_status_and_metrics_with_a_group() {
    if !have_promtool() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        skip_or_fail("needs root to run a client as another user");
        return;
    }
    if !require_memlock_or_skip() {
        return;
    }
    let tmp = machine_dir();
    // nobody must be able to reach the sockets in it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("machine");
    let _sim = Stopped(
        refblk()
            .args(["sim", "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + T;
    while !dir.join("xenstored.sock").exists() || !dir.join("evtchn.sock").exists() {
        assert!(Instant::now() < deadline, "refblk sim did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A non-loopback metrics address is a usage error.
    let o = refblk()
        .args(["serve", "--metrics", "0.0.0.0:9380", "--sim"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // systemd's notify socket, played by this test.
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let metrics_sock = dir.join("metrics.sock");
    let _serve = Stopped(
        refblk()
            .args([
                "serve",
                "--workers",
                "1",
                "--status-group",
                "nogroup",
                "--sim",
            ])
            .arg(&dir)
            .arg("--metrics")
            .arg(format!("unix:{}", metrics_sock.display()))
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("READY=1 from refblk serve within the hang bound");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means answering: the control socket works at once.
    let control = dir.join("refblk.sock");
    let status_sock = dir.join("status.sock");
    let o = refblk()
        .args(["status", "--json", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["daemon"]["workers"], 1);

    // nobody:nogroup reads metrics from the status socket and the metrics
    // socket, and cannot use the control socket.
    let o = as_nobody(&[
        "status",
        "--prometheus",
        "--control",
        status_sock.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let prom = String::from_utf8(o.stdout.clone()).unwrap();
    promtool_accepts(&prom);
    assert_eq!(value(&prom, "refblk_workers"), 1.0);
    assert_eq!(value(&prom, "refblk_devices"), 0.0);
    assert!(value(&prom, "refblk_uptime_seconds") >= 0.0);

    let o = as_nobody(&["status", "--json", "--control", control.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "nobody used the control socket: {}",
        text(&o)
    );
    // The status socket answers status and nothing else.
    let o = refblk()
        .args(["ctl", "--control"])
        .arg(&status_sock)
        .args(["detach", "/local/domain/0/backend/vbd/1/51712"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{}",
        text(&o)
    );

    // REFBLK_CONTROL names the socket for status, as for ctl and limit.
    let o = refblk()
        .args(["status", "--prometheus"])
        .env("REFBLK_CONTROL", &status_sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The HTTP listener.
    let (head, body) = http_get(&metrics_sock, "/metrics");
    assert!(head.contains(" 200 "), "{head}");
    promtool_accepts(&body);
    assert_eq!(value(&body, "refblk_workers"), 1.0);
    let (head, _) = http_get(&metrics_sock, "/nothing");
    assert!(head.contains(" 404 "), "{head}");
    let mode = std::fs::metadata(&metrics_sock)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "metrics socket mode {mode:o}");

    // The textfile collector's file, written atomically.
    let out = tmp.path().join("refblk.prom");
    let o = refblk()
        .args(["status", "--prometheus", "--control"])
        .arg(&status_sock)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    promtool_accepts(&std::fs::read_to_string(&out).unwrap());
}
