//! Prometheus metrics: the daemon's `status` answer in the Prometheus text
//! exposition format (version 0.0.4, what node_exporter's textfile collector
//! and a Prometheus scrape read), for `refblk status --prometheus` and the
//! opt-in listener of `refblk serve --metrics unix:PATH|127.0.0.1:PORT`.
//!
//! Names and units follow Prometheus' conventions: `refblk_` prefix, base
//! units (seconds, bytes), counters end in `_total`, latencies are histograms
//! whose buckets are the daemon's log2 microsecond buckets (`le` = the upper
//! edge, 2^i µs, in seconds). The metric list is in docs/operations.md.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;

use refblk_core::backend::control;
use refblk_core::backend::stats::{bucket_range, OpClass, StatsSnapshot, HIST_BUCKETS};
use refblk_core::backend::BackendHandle;

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value escaped for the text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as the text format wants it.
fn num(x: f64) -> String {
    if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{x}")
    }
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }
}

/// A metric with one sample per device: name, help, value.
type Simple = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);

/// One device's labels and values.
struct Dev<'a> {
    labels: String,
    json: &'a Value,
    stats: StatsSnapshot,
}

/// The metrics of one `status` answer (`{"ok":true,"daemon":{..},"devices":[..]}`).
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let daemon = &status["daemon"];
    let devs: Vec<Dev<'_>> = status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let domain = d["domain_name"].as_str().unwrap_or("");
            let vdev = d["vdev"].as_str().unwrap_or("");
            Dev {
                labels: format!(
                    "domid=\"{}\",devid=\"{}\",domain=\"{}\",vdev=\"{}\"",
                    d["domid"].as_u64().unwrap_or(0),
                    d["devid"].as_u64().unwrap_or(0),
                    esc(domain),
                    esc(vdev)
                ),
                json: d,
                stats: StatsSnapshot::from_json(&d["stats"]),
            }
        })
        .collect();

    // The daemon.
    f.head(
        "refblk_build_info",
        "gauge",
        "Version and git commit of the running daemon (always 1).",
    );
    f.sample(
        "refblk_build_info",
        &format!(
            "version=\"{}\",commit=\"{}\"",
            esc(daemon["version"].as_str().unwrap_or("unknown")),
            esc(daemon["commit"].as_str().unwrap_or("unknown"))
        ),
        1,
    );
    f.head(
        "refblk_devices",
        "gauge",
        "Devices the daemon serves (any state).",
    );
    f.sample("refblk_devices", "", devs.len());
    if let Some(w) = daemon["workers"].as_u64() {
        f.head("refblk_workers", "gauge", "io_uring worker threads.");
        f.sample("refblk_workers", "", w);
    }
    if let Some(u) = daemon["uptime_seconds"].as_f64() {
        f.head(
            "refblk_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
        );
        f.sample("refblk_uptime_seconds", "", num(u));
    }
    if let Some(t) = daemon["start_time_seconds"].as_f64() {
        f.head(
            "refblk_start_time_seconds",
            "gauge",
            "When the daemon started, seconds since the Unix epoch.",
        );
        f.sample("refblk_start_time_seconds", "", num(t));
    }

    // Per device.
    f.head(
        "refblk_device_info",
        "gauge",
        "A device the daemon serves, with its image, xenbus state and ring protocol (always 1).",
    );
    for d in &devs {
        let state = d.json["state"].as_str().unwrap_or("?");
        f.sample(
            "refblk_device_info",
            &format!(
                "{},backend=\"{}\",image=\"{}\",state=\"{}\",protocol=\"{}\"",
                d.labels,
                esc(d.json["backend"].as_str().unwrap_or("")),
                esc(d.json["image"].as_str().unwrap_or("")),
                esc(state),
                esc(d.json["protocol"].as_str().unwrap_or(""))
            ),
            1,
        );
    }
    f.head(
        "refblk_device_connected",
        "gauge",
        "1 when the device's xenbus state is Connected, else 0.",
    );
    for d in &devs {
        let c = d.json["state"].as_str() == Some("Connected");
        f.sample("refblk_device_connected", &d.labels, u8::from(c));
    }
    f.head(
        "refblk_device_queues",
        "gauge",
        "Rings (queues) the frontend connected.",
    );
    for d in &devs {
        f.sample(
            "refblk_device_queues",
            &d.labels,
            d.json["queues"].as_u64().unwrap_or(0),
        );
    }

    // Requests, bytes and errors per operation. The flat counters are always
    // kept (also with REFBLK_NO_STATS=1); errors per operation need the
    // per-request statistics.
    let flat = [
        ("read", "reads"),
        ("write", "writes"),
        ("flush", "flushes"),
        ("discard", "discards"),
    ];
    f.head(
        "refblk_device_requests_total",
        "counter",
        "Requests answered, by operation (write includes WRITE_BARRIER).",
    );
    for d in &devs {
        for (op, key) in flat {
            f.sample(
                "refblk_device_requests_total",
                &format!("{},op=\"{op}\"", d.labels),
                d.json[key].as_u64().unwrap_or(0),
            );
        }
    }
    f.head(
        "refblk_device_bytes_total",
        "counter",
        "Bytes read, written and discarded for the guest.",
    );
    for d in &devs {
        let discard = d.stats.op(OpClass::Discard).sectors * 512;
        for (op, v) in [
            ("read", d.json["bytes_read"].as_u64().unwrap_or(0)),
            ("write", d.json["bytes_written"].as_u64().unwrap_or(0)),
            ("discard", discard),
        ] {
            f.sample(
                "refblk_device_bytes_total",
                &format!("{},op=\"{op}\"", d.labels),
                v,
            );
        }
    }
    f.head(
        "refblk_device_errors_total",
        "counter",
        "Requests answered with an error status, by operation.",
    );
    for d in &devs {
        for c in OpClass::ALL {
            f.sample(
                "refblk_device_errors_total",
                &format!("{},op=\"{}\"", d.labels, c.name()),
                d.stats.op(c).errors,
            );
        }
    }
    let counters: [Simple; 7] = [
        (
            "refblk_device_rejected_requests_total",
            "Requests refused by validation (malformed, out of range).",
            |s| s.rejected,
        ),
        (
            "refblk_device_throttled_total",
            "Times a queue found its next request held back by an I/O limit.",
            |s| s.throttled,
        ),
        (
            "refblk_device_buffer_waits_total",
            "Requests that waited for the worker's shared buffers (backpressure).",
            |s| s.buffer_waits,
        ),
        (
            "refblk_device_stalls_total",
            "Liveness violations (consumed requests with nothing to wake them); 0 unless refblk has a bug.",
            |s| s.stalls,
        ),
        (
            "refblk_device_fdatasyncs_total",
            "fdatasync calls on the image (flushes, barriers).",
            |s| s.fdatasyncs,
        ),
        (
            "refblk_device_replayed_requests_total",
            "Requests re-executed after a daemon restart.",
            |s| s.replayed,
        ),
        (
            "refblk_device_zero_copy_reads_total",
            "Reads done straight into the guest's persistently mapped pages (no backend buffer, no copy).",
            |s| s.zero_copy_reads,
        ),
    ];
    for (name, help, get) in counters {
        f.head(name, "counter", help);
        for d in &devs {
            f.sample(name, &d.labels, get(&d.stats));
        }
    }
    let gauges: [Simple; 2] = [
        (
            "refblk_device_queue_depth",
            "Requests taken off the rings and not answered yet (waiting and in flight).",
            |s| s.queue_depth,
        ),
        (
            "refblk_device_in_flight_requests",
            "Requests started on the image and not answered yet.",
            |s| s.in_flight,
        ),
    ];
    for (name, help, get) in gauges {
        f.head(name, "gauge", help);
        for d in &devs {
            f.sample(name, &d.labels, get(&d.stats));
        }
    }

    // Limits (0 = unlimited).
    f.head(
        "refblk_device_limit_iops",
        "gauge",
        "The device's own I/O limit in requests per second (0 = unlimited).",
    );
    for d in &devs {
        for op in ["read", "write"] {
            f.sample(
                "refblk_device_limit_iops",
                &format!("{},op=\"{op}\"", d.labels),
                d.json["limits"][format!("{op}_iops")].as_u64().unwrap_or(0),
            );
        }
    }
    f.head(
        "refblk_device_limit_bytes_per_second",
        "gauge",
        "The device's own I/O limit in bytes per second (0 = unlimited).",
    );
    for d in &devs {
        for op in ["read", "write"] {
            f.sample(
                "refblk_device_limit_bytes_per_second",
                &format!("{},op=\"{op}\"", d.labels),
                d.json["limits"][format!("{op}_bps")].as_u64().unwrap_or(0),
            );
        }
    }

    // Latency histograms.
    let name = "refblk_device_request_duration_seconds";
    f.head(
        name,
        "histogram",
        "Time from taking a request off the ring to answering it (includes waiting for a limit), by operation.",
    );
    for d in &devs {
        for c in OpClass::ALL {
            let o = d.stats.op(c);
            let mut cum = 0u64;
            for (b, n) in o.hist.iter().enumerate().take(HIST_BUCKETS - 1) {
                cum += n;
                let le = bucket_range(b).1 as f64 / 1e6;
                f.sample(
                    &format!("{name}_bucket"),
                    &format!("{},op=\"{}\",le=\"{}\"", d.labels, c.name(), num(le)),
                    cum,
                );
            }
            let total: u64 = o.hist.iter().sum();
            f.sample(
                &format!("{name}_bucket"),
                &format!("{},op=\"{}\",le=\"+Inf\"", d.labels, c.name()),
                total,
            );
            f.sample(
                &format!("{name}_sum"),
                &format!("{},op=\"{}\"", d.labels, c.name()),
                num(o.latency_us as f64 / 1e6),
            );
            f.sample(
                &format!("{name}_count"),
                &format!("{},op=\"{}\"", d.labels, c.name()),
                total,
            );
        }
    }
    out
}

/// Where `serve --metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        let s2 = s.replace("localhost:", "127.0.0.1:");
        let a: SocketAddr = s2
            .parse()
            .map_err(|_| format!("{s:?}: want unix:PATH, 127.0.0.1:PORT or [::1]:PORT"))?;
        if !a.ip().is_loopback() {
            return Err(format!(
                "{s}: only a loopback address is allowed (the metrics name domains \
                 and images; put a reverse proxy or node_exporter in front to export them)"
            ));
        }
        Ok(MetricsAddr::Tcp(a))
    }
}

/// The metrics listener; stops (and removes its socket file) when dropped.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl MetricsServer {
    /// Listen on `addr`; `group`: a group that may read a unix socket.
    pub fn spawn(
        addr: &MetricsAddr,
        backend: BackendHandle,
        group: Option<nix::unistd::Gid>,
    ) -> io::Result<MetricsServer> {
        let (listener, unix_path) = match addr {
            MetricsAddr::Unix(p) => {
                if p.exists() {
                    if UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{}: something listens there", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                control::share_with_group(p, group)?;
                l.set_nonblocking(true)?;
                (Listener::Unix(l), Some(p.clone()))
            }
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?;
                l.set_nonblocking(true)?;
                (Listener::Tcp(l), None)
            }
        };
        log::info!("metrics on {addr:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("refblk-metrics".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let r = match &listener {
                        Listener::Unix(l) => l.accept().map(|(s, _)| {
                            let b = backend.clone();
                            std::thread::spawn(move || {
                                let w = s.try_clone();
                                if let Ok(w) = w {
                                    serve_http(s, w, &b)
                                }
                            });
                        }),
                        Listener::Tcp(l) => l.accept().map(|(s, _)| {
                            let b = backend.clone();
                            std::thread::spawn(move || {
                                let w: io::Result<TcpStream> = s.try_clone();
                                if let Ok(w) = w {
                                    serve_http(s, w, &b)
                                }
                            });
                        }),
                    };
                    match r {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let fd = match &listener {
                                Listener::Unix(l) => l.as_fd(),
                                Listener::Tcp(l) => l.as_fd(),
                            };
                            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                            let _ = poll(&mut fds, PollTimeout::from(200u16));
                        }
                        Err(e) => {
                            log::warn!("metrics listener: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
            unix_path,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Answer one HTTP/1.x request: `GET /metrics` (or `/`) with the metrics.
fn serve_http<R: io::Read + SetTimeout, W: Write>(r: R, mut w: W, backend: &BackendHandle) {
    let _ = r.timeout(Duration::from_secs(10));
    let mut r = BufReader::new(io::Read::take(r, 16 * 1024));
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    // Skip the headers.
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        )
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "text/plain", "GET /metrics\n".to_string())
    } else {
        let v = control::handle_line("status", backend);
        ("200 OK", CONTENT_TYPE, render(&v))
    };
    let _ = write!(
        w,
        "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        let _ = w.write_all(body.as_bytes());
    }
    let _ = w.flush();
}

/// Streams with a read timeout.
trait SetTimeout {
    fn timeout(&self, d: Duration) -> io::Result<()>;
}
impl SetTimeout for UnixStream {
    fn timeout(&self, d: Duration) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(d))
    }
}
impl SetTimeout for TcpStream {
    fn timeout(&self, d: Duration) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses_are_loopback_or_unix() {
        assert_eq!(
            "unix:/run/refblk/metrics.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/refblk/metrics.sock".into()))
        );
        assert!(matches!(
            "127.0.0.1:9380".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp(_))
        ));
        assert!(matches!(
            "[::1]:9380".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp(_))
        ));
        assert!("0.0.0.0:9380".parse::<MetricsAddr>().is_err());
        assert!("192.168.1.2:9380".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let mut s = StatsSnapshot {
            collected: true,
            ..Default::default()
        };
        s.ops[0].hist[7] = 3; // [64,128) us
        s.ops[0].hist[11] = 2; // [1024,2048) us
        s.ops[0].latency_us = 3 * 100 + 2 * 1500;
        let v = serde_json::json!({"ok": true, "daemon": {"workers": 2},
            "devices": [{"domid": 5, "devid": 51712, "domain_name": "we\"ird", "vdev": "xvda",
            "state": "Connected", "stats": s.to_json(), "reads": 5, "limits": {}}]});
        let t = render(&v);
        let l = "domid=\"5\",devid=\"51712\",domain=\"we\\\"ird\",vdev=\"xvda\"";
        let get = |series: &str| {
            t.lines()
                .find_map(|x| x.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} not in\n{t}"))
                .to_string()
        };
        let b = "refblk_device_request_duration_seconds_bucket";
        assert_eq!(get(&format!("{b}{{{l},op=\"read\",le=\"0.000064\"}}")), "0");
        assert_eq!(get(&format!("{b}{{{l},op=\"read\",le=\"0.000128\"}}")), "3");
        assert_eq!(get(&format!("{b}{{{l},op=\"read\",le=\"0.002048\"}}")), "5");
        assert_eq!(get(&format!("{b}{{{l},op=\"read\",le=\"+Inf\"}}")), "5");
        assert_eq!(
            get(&format!(
                "refblk_device_request_duration_seconds_count{{{l},op=\"read\"}}"
            )),
            "5"
        );
        assert_eq!(
            get(&format!(
                "refblk_device_request_duration_seconds_sum{{{l},op=\"read\"}}"
            )),
            "0.0033"
        );
        assert_eq!(
            get(&format!("refblk_device_requests_total{{{l},op=\"read\"}}")),
            "5"
        );
        assert_eq!(get("refblk_workers"), "2");
    }
}
