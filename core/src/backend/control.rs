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
//! `iops`, `bps`, `burst` (see [`crate::limits`]).
//!
//! Answers: `{"version":1,"ok":true, ...}` or `{"version":1,"ok":false,"error":"..."}`
//! (`version`: [`JSON_VERSION`], the shape convention in docs/operations.md).
//!
//! Both are types ([`messages`]): the daemon parses a line into a [`Request`]
//! and answers with serde-derived structs; clients send a [`Request`] and read
//! the typed answer with [`call`].
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
use serde::Serialize;
use serde_json::Value;
use std::os::fd::AsFd;

pub mod messages;

use super::{AttachOptions, BackendHandle, DeviceStatus, LimitTarget};
use crate::limits::Limits;
pub use messages::{
    Answer, AttachLine, Attached, DaemonStatus, Detached, DeviceStatusJson, LimitsNow, Request,
    RequestError, Resized, ResizedDevice, Status, JSON_VERSION,
};

/// Longest request line accepted.
const MAX_LINE: usize = 8192;

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
                let _ = writeln!(w, "{}", refused("request too long"));
                return;
            }
            Ok(_) => {}
        }
        let answer = answer_line(line.trim_end(), &backend, access);
        if writeln!(w, "{answer}").is_err() {
            return;
        }
    }
}

fn status_of(s: &DeviceStatus) -> DeviceStatusJson {
    DeviceStatusJson {
        kind: s.kind.name().into(),
        domid: u32::from(s.domid),
        devid: s.devid,
        backend: s.backend_path.clone(),
        image: s.image.as_ref().map(|p| p.display().to_string()),
        state: format!("{:?}", s.state),
        queues: s.queues,
        protocol: s.protocol.map(str::to_string),
        requests: s.requests,
        reads: s.reads,
        writes: s.writes,
        flushes: s.flushes,
        discards: s.discards,
        errors: s.errors,
        fdatasyncs: s.fdatasyncs,
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
        replayed: s.replayed,
        domain_name: s.domain_name.clone(),
        vdev: s.vdev.clone(),
        waiting_for_commit: s.waiting_for_commit.clone(),
        stats: s.stats.clone(),
        limits: s.limits,
        domain_limits: s.domain_limits,
    }
}

/// Microseconds since the daemon's first status answer (monotonic).
fn sampled_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// The `daemon` object of a `status` answer.
fn daemon_status(devices: usize) -> DaemonStatus {
    let d = DAEMON.get();
    DaemonStatus {
        version: BUILD_VERSION.into(),
        commit: BUILD_COMMIT.into(),
        pid: std::process::id(),
        workers: d.map(|d| d.workers),
        devices,
        uptime_seconds: d.map(|d| d.started.elapsed().as_secs_f64()),
        start_time_seconds: d.map(|d| d.started_unix),
    }
}

/// An answer as JSON.
fn json_of<T: Serialize>(a: Answer<T>) -> Value {
    serde_json::to_value(a).expect("answers are plain data")
}

/// A refusal as JSON.
fn refused(e: impl std::fmt::Display) -> Value {
    json_of(Answer::<Attached>::refused(e))
}

/// Answer one request line (on the full-access socket).
pub fn handle_line(line: &str, backend: &BackendHandle) -> Value {
    answer_line(line, backend, Access::Full)
}

fn answer_line(line: &str, backend: &BackendHandle, access: Access) -> Value {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    if access == Access::StatusOnly && !req.is_read_only() {
        return refused("this is the read-only status socket: only `status` is answered");
    }
    let opts = |o: &AttachLine, stored: Limits| AttachOptions {
        read_only: o.read_only,
        sector_size: o
            .sector_size
            .unwrap_or(AttachOptions::default().sector_size),
        limits: stored.patched(&o.limits),
    };
    match req {
        Request::Attach {
            backend: be,
            image,
            options,
        } => {
            let shown = image.display().to_string();
            match backend.attach(&be, image, opts(&options, Limits::UNLIMITED)) {
                Ok(()) => json_of(Answer::ok(Attached { image: shown })),
                Err(e) => refused(e),
            }
        }
        Request::AttachVolume {
            backend: be,
            pool,
            vid,
            options,
        } => {
            // The volume's stored limits, then the line's keys on top.
            let r = crate::pool::limits::load(&pool, &vid)
                .map_err(super::CommandError::from)
                .and_then(|stored| backend.attach_volume(&be, &pool, &vid, opts(&options, stored)));
            match r {
                Ok(p) => json_of(Answer::ok(Attached {
                    image: p.display().to_string(),
                })),
                Err(e) => refused(e),
            }
        }
        Request::Detach { backend: be } => match backend.detach(&be) {
            Ok(result) => json_of(Answer::ok(Detached { result })),
            Err(e) => refused(e),
        },
        Request::Resize => match backend.resize() {
            Ok(v) => json_of(Answer::ok(Resized {
                resized: v
                    .into_iter()
                    .map(|(backend, sectors)| ResizedDevice { backend, sectors })
                    .collect(),
            })),
            Err(e) => refused(e),
        },
        Request::Limit { target, patch } => {
            // No pairs: nothing changes, the answer shows the current limits.
            match backend.set_limits(&target, patch) {
                Ok(set) => {
                    let (what, domid, devid, kind) = match set.target {
                        LimitTarget::Domain(d) => ("domain", d, None, None),
                        LimitTarget::Device(k) => (
                            "device",
                            k.domid,
                            Some(k.devid),
                            Some(k.kind.name().to_string()),
                        ),
                    };
                    json_of(Answer::ok(LimitsNow {
                        target: what.into(),
                        domid: u32::from(domid),
                        devid,
                        kind,
                        describe: set.describe,
                        summary: set.limits.to_string(),
                        limits: set.limits,
                    }))
                }
                Err(e) => refused(e),
            }
        }
        Request::Status => {
            let devices: Vec<DeviceStatusJson> = backend.status().iter().map(status_of).collect();
            json_of(Answer::ok(Status {
                sampled_us: sampled_us(),
                daemon: daemon_status(devices.len()),
                devices,
            }))
        }
    }
}

/// Why a typed call to the daemon did not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Talking to the socket failed (no daemon, a timeout).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The request cannot be written as a line.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The daemon answered something this refblk does not read.
    #[error("{socket}: unreadable answer: {why}")]
    BadAnswer { socket: PathBuf, why: String },
    /// The daemon refused the request; its reason.
    #[error("{0}")]
    Refused(String),
}

/// Send a request to the daemon on `socket` and read its typed answer.
pub fn call<T: serde::de::DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, CallError> {
    let v = request(socket, &req.to_line()?)?;
    let a: Answer<T> = serde_json::from_value(v).map_err(|e| CallError::BadAnswer {
        socket: socket.to_path_buf(),
        why: e.to_string(),
    })?;
    match (a.ok, a.body) {
        (true, Some(body)) => Ok(body),
        (true, None) => Err(CallError::BadAnswer {
            socket: socket.to_path_buf(),
            why: "ok without an answer".into(),
        }),
        (false, _) => Err(CallError::Refused(
            a.error.unwrap_or_else(|| "refused without a reason".into()),
        )),
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
        call::<Resized>(&self.socket, &Request::Resize)
            .map_err(|e| io::Error::other(format!("{}: resize: {e}", self.socket.display())))?;
        info!("volume {vid}: daemon announced the new size {new_size}");
        Ok(())
    }
}
