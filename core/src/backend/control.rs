//! The daemon's control socket: one text line per request, one JSON line per
//! answer, so that the hotplug script (and administrators) get a failure as an
//! exit code with a message.
//!
//! Requests:
//! - `attach <backend-path> <image> [ro] [sector-size=512|4096] [LIMIT=VALUE ...]`
//! - `attach-volume <backend-path> <pool-dir> <vid> [ro] [sector-size=N] [LIMIT=VALUE ...]`
//!   (a volume's stored limits apply first, the line's keys override them)
//! - `detach <backend-path>`
//! - `resize`
//! - `status` (every device with its counters, statistics and limits)
//! - `limit <target> [LIMIT=VALUE ...]` (no pairs: show the current limits; target: domain id or name, a backend
//!   path or DOMAIN/VDEV; see `docs/operations.md`)
//!
//! LIMIT is one of `read-iops`, `write-iops`, `read-bps`, `write-bps`,
//! `iops`, `bps`, `burst` (see [`super::limits`]).
//!
//! Answers: `{"version":1,"ok":true, ...}` or `{"version":1,"ok":false,"error":"..."}`
//! (`version`: [`JSON_VERSION`], the shape convention in docs/operations.md).
//!
//! A second, read-only socket ([`Access::StatusOnly`]) answers `status` only,
//! for a non-root exporter (`refblk serve --status-group GROUP`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use std::os::fd::AsFd;

pub mod messages;

use super::{AttachOptions, BackendHandle, DeviceStatus, LimitTarget};
use crate::limits::{LimitsPatch, KEYS};

/// Longest request line accepted.
const MAX_LINE: usize = 8192;

/// The version of every JSON answer's shape (the `version` field). It grows
/// when a field changes meaning or goes away; new fields do not change it.
pub const JSON_VERSION: u64 = 1;

/// What a socket's clients may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everything (the root-only control socket).
    Full,
    /// `status` only (the group-readable status socket).
    StatusOnly,
}

/// Facts about the daemon that `status` reports beside its devices.
#[derive(Debug, Clone, Copy)]
pub struct DaemonInfo {
    /// io_uring worker threads.
    pub workers: usize,
    /// When the daemon started.
    pub started: std::time::Instant,
    /// The same moment on the wall clock, seconds since the epoch.
    pub started_unix: f64,
}

static DAEMON: std::sync::OnceLock<DaemonInfo> = std::sync::OnceLock::new();

/// Record the daemon's facts for `status` (once, by `refblk serve`).
pub fn set_daemon_info(workers: usize) {
    let started_unix = crate::util::time::now_secs_f64();
    let _ = DAEMON.set(DaemonInfo {
        workers,
        started: std::time::Instant::now(),
        started_unix,
    });
}

/// The version and git commit this binary was built from (`build.rs`).
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit (`unknown` outside a git checkout).
pub use crate::BUILD_COMMIT;

/// Make the socket at `path` readable and writable by its owner and by
/// `group` (mode 0660, group `group`), or by its owner only (0600) without
/// one. Connecting to a unix socket needs write permission on it.
pub fn share_with_group(path: &Path, group: Option<nix::unistd::Gid>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    if let Some(g) = group {
        nix::unistd::chown(path, None, Some(g))
            .map_err(|e| io::Error::other(format!("chgrp {}: {e}", path.display())))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", path.display())))
}

/// A listening control socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listen on `path` (a stale socket file is replaced).
    pub fn spawn(path: &Path, backend: BackendHandle) -> io::Result<ControlServer> {
        Self::spawn_with(path, backend, Access::Full)
    }

    /// Listen on `path` answering what `access` allows.
    pub fn spawn_with(
        path: &Path,
        backend: BackendHandle,
        access: Access,
    ) -> io::Result<ControlServer> {
        Self::spawn_shared(path, backend, access, None)
    }

    /// Listen on `path` answering what `access` allows; `group` (with
    /// [`Access::StatusOnly`]) may connect too (see [`share_with_group`]).
    pub fn spawn_shared(
        path: &Path,
        backend: BackendHandle,
        access: Access,
        group: Option<nix::unistd::Gid>,
    ) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another refblk serve is running", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if access == Access::StatusOnly {
            share_with_group(path, group)?;
        }
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        match access {
            Access::Full => info!("control socket {}", path.display()),
            Access::StatusOnly => info!("read-only status socket {}", path.display()),
        }
        let thread = std::thread::Builder::new()
            .name("refblk-ctl".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let b = backend.clone();
                            let _ = std::thread::Builder::new()
                                .name("refblk-ctl-conn".into())
                                .spawn(move || serve_conn(s, b, access));
                        }
                        // Sleep until a client connects (answered at once: the
                        // hotplug script waits on this), waking now and then to
                        // see the stop flag.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                            let _ = poll(&mut fds, PollTimeout::from(200u16));
                        }
                        Err(e) => {
                            warn!("control socket: {e}");
                            std::thread::sleep(Duration::from_millis(50))
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_conn(s: UnixStream, backend: BackendHandle, access: Access) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(std::io::Read::take(s, MAX_LINE as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = writeln!(w, "{}", json!({"ok": false, "error": "request too long"}));
                return;
            }
            Ok(_) => {}
        }
        let line = line.trim_end();
        let answer = if access == Access::StatusOnly
            && line.split_whitespace().next() != Some("status")
        {
            versioned(
                json!({"ok": false, "error": "this is the read-only status socket: only `status` is answered"}),
            )
        } else {
            handle_line(line, &backend)
        };
        if writeln!(w, "{answer}").is_err() {
            return;
        }
    }
}

fn status_json(s: &DeviceStatus) -> Value {
    json!({
        "domid": s.domid,
        "devid": s.devid,
        "backend": s.backend_path,
        "image": s.image.as_ref().map(|p| p.display().to_string()),
        "state": format!("{:?}", s.state),
        "queues": s.queues,
        "protocol": s.protocol,
        "requests": s.requests,
        "reads": s.reads,
        "writes": s.writes,
        "flushes": s.flushes,
        "discards": s.discards,
        "errors": s.errors,
        "fdatasyncs": s.fdatasyncs,
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "replayed": s.replayed,
        "domain_name": s.domain_name,
        "vdev": s.vdev,
        "waiting_for_commit": s.waiting_for_commit,
        "stats": s.stats.to_json(),
        "limits": s.limits.to_json(),
        "domain_limits": s.domain_limits.to_json(),
    })
}

/// Microseconds since the daemon's first status answer (monotonic).
fn sampled_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// `v` with `"version": JSON_VERSION` first.
fn versioned(v: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("version".into(), json!(JSON_VERSION));
    if let Value::Object(o) = v {
        m.extend(o);
    }
    Value::Object(m)
}

/// The `daemon` object of a `status` answer.
fn daemon_json(devices: usize) -> Value {
    let d = DAEMON.get();
    json!({
        "version": BUILD_VERSION,
        "commit": BUILD_COMMIT,
        "pid": std::process::id(),
        "workers": d.map(|d| d.workers),
        "devices": devices,
        "uptime_seconds": d.map(|d| d.started.elapsed().as_secs_f64()),
        "start_time_seconds": d.map(|d| d.started_unix),
    })
}

/// Answer one request line.
pub fn handle_line(line: &str, backend: &BackendHandle) -> Value {
    versioned(answer_line(line, backend))
}

fn answer_line(line: &str, backend: &BackendHandle) -> Value {
    let mut words = line.split_whitespace();
    let fail = |e: String| json!({"ok": false, "error": e});
    let options =
        |words: std::str::SplitWhitespace<'_>| -> Result<(AttachOptions, LimitsPatch), String> {
            let mut opts = AttachOptions::default();
            let mut limits = LimitsPatch::default();
            for w in words {
                match w {
                    "ro" => opts.read_only = true,
                    _ => match w.strip_prefix("sector-size=").map(str::parse::<u32>) {
                        Some(Ok(n)) => opts.sector_size = n,
                        _ => match w.split_once('=') {
                            Some((k, v)) if KEYS.contains(&k) => {
                                limits.set(k, v).map_err(|e| e.to_string())?
                            }
                            _ => return Err(format!("unknown option {w:?}")),
                        },
                    },
                }
            }
            opts.limits = opts.limits.patched(&limits);
            Ok((opts, limits))
        };
    match words.next() {
        Some("attach") => {
            let (Some(be), Some(img)) = (words.next(), words.next()) else {
                return fail("usage: attach <backend-path> <image> [ro] [sector-size=N]".into());
            };
            let r = options(words).and_then(|(opts, _)| backend.attach(be, img, opts));
            match r {
                Ok(()) => json!({"ok": true, "image": img}),
                Err(e) => fail(e),
            }
        }
        Some("attach-volume") => {
            let (Some(be), Some(pool), Some(vid)) = (words.next(), words.next(), words.next())
            else {
                return fail(
                    "usage: attach-volume <backend-path> <pool-dir> <vid> [ro] [sector-size=N]"
                        .into(),
                );
            };
            // The volume's stored limits, then the line's keys on top.
            let r = options(words).and_then(|(mut opts, line)| {
                let stored =
                    crate::pool::limits::load(Path::new(pool), vid).map_err(|e| e.to_string())?;
                opts.limits = stored.patched(&line);
                backend.attach_volume(be, pool, vid, opts)
            });
            match r {
                Ok(p) => json!({"ok": true, "image": p.display().to_string()}),
                Err(e) => fail(e),
            }
        }
        Some("detach") => {
            let Some(be) = words.next() else {
                return fail("usage: detach <backend-path>".into());
            };
            match backend.detach(be) {
                Ok(what) => json!({"ok": true, "result": what}),
                Err(e) => fail(e),
            }
        }
        Some("resize") => match backend.resize() {
            Ok(v) => {
                json!({"ok": true, "resized": v.iter().map(|(p, s)| json!({"backend": p, "sectors": s})).collect::<Vec<_>>()})
            }
            Err(e) => fail(e),
        },
        Some("limit") => {
            let Some(target) = words.next() else {
                return fail(format!(
                    "usage: limit <domain|backend-path|DOMAIN/VDEV> KEY=VALUE ... (keys: {})",
                    KEYS.join(", ")
                ));
            };
            // No pairs: nothing changes, the answer shows the current limits.
            let patch = match LimitsPatch::parse_pairs(words) {
                Ok(p) => p,
                Err(e) => return fail(format!("limit {target}: {e}")),
            };
            match backend.set_limits(target, patch) {
                Ok(set) => {
                    let (kind, domid, devid) = match set.target {
                        LimitTarget::Domain(d) => ("domain", d, None),
                        LimitTarget::Device((d, v)) => ("device", d, Some(v)),
                    };
                    json!({"ok": true, "target": kind, "domid": domid, "devid": devid,
                           "describe": set.describe, "limits": set.limits.to_json(),
                           "summary": set.limits.to_string()})
                }
                Err(e) => fail(e),
            }
        }
        Some("status") => {
            let devs: Vec<Value> = backend.status().iter().map(status_json).collect();
            // When the counters were read (µs of the daemon's monotonic clock),
            // so that rates from two answers do not depend on the reader's timing.
            let daemon = daemon_json(devs.len());
            json!({"ok": true, "sampled_us": sampled_us(), "daemon": daemon, "devices": devs})
        }
        Some(other) => fail(format!("unknown request {other:?}")),
        None => fail("empty request".into()),
    }
}

/// Send one request to a daemon's control socket and return its answer.
pub fn request(path: &Path, line: &str) -> io::Result<Value> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}: {e} (is `refblk serve` running?)", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: bad answer {answer:?}: {e}", path.display()),
        )
    })
}

/// Tells a running `refblk serve` that a volume it may be serving was resized
/// (used by `refblk volume resize`). Without a daemon on the socket there is
/// nobody to tell, which is not an error.
#[derive(Debug, Clone)]
pub struct DaemonNotifier {
    socket: PathBuf,
}

impl DaemonNotifier {
    /// Notify the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> DaemonNotifier {
        DaemonNotifier {
            socket: socket.into(),
        }
    }
}

impl crate::pool::ResizeNotifier for DaemonNotifier {
    fn volume_resized(&self, vid: &str, path: &Path, new_size: u64) -> io::Result<()> {
        if !self.socket.exists() {
            info!(
                "volume {vid} ({}) is now {new_size} bytes; no refblk daemon at {}",
                path.display(),
                self.socket.display()
            );
            return Ok(());
        }
        let v = request(&self.socket, "resize")?;
        if v["ok"] != Value::Bool(true) {
            return Err(io::Error::other(format!(
                "{}: resize: {}",
                self.socket.display(),
                v["error"].as_str().unwrap_or("unknown error")
            )));
        }
        info!("volume {vid}: daemon announced the new size {new_size}");
        Ok(())
    }
}
