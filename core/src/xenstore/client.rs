//! A thread-safe xenstore client over any xenstored byte stream.
//!
//! One connection carries many concurrent requests: each caller writes a whole
//! message tagged with a fresh `req_id` and waits for the reply with that id.
//! A reader thread demultiplexes replies from `XS_WATCH_EVENT` messages, which
//! go to a channel ([`XsClient::events`]) a daemon loop can `select!` on.
//!
//! Everything read from the daemon is validated: a payload longer than 4096
//! bytes, a reply to a request never sent, or the end of the stream fail every
//! pending and future call with an error (the client never panics, and a call
//! never waits longer than its timeout).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xen_sys::xs_wire as abi;

use super::wire::{self, Header, Permissions, ReadError};

/// A transaction id; [`XBT_NULL`] (0) means "no transaction".
pub type TxId = u32;
/// No transaction.
pub const XBT_NULL: TxId = 0;

/// The standard xenstored socket.
pub const DEFAULT_SOCKET: &str = "/var/run/xenstored/socket";
/// The xenbus character device (same protocol through the kernel).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// The XS_CONTROL command of the simulated xenstored that makes a connection
/// act as an unprivileged domain (see docs/xenstore.md).
pub const SIM_AS_DOMAIN_COMMAND: &str = "sim-as-domain";

/// How many times [`XsClient::transaction`] retries a transaction that ended
/// with EAGAIN.
pub const TRANSACTION_RETRIES: usize = 16;

/// Default limit for one request's round trip.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A watch fired: `path` changed (or the watch was just set), `token` is the
/// caller's token from [`XsClient::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (relative if the watch was set relative).
    pub path: String,
    /// The token given when the watch was set.
    pub token: String,
}

/// A xenstore client error.
#[derive(Debug)]
pub enum XsError {
    /// xenstored answered an error (`name` is e.g. "ENOENT").
    Xenstore {
        /// The error name from the wire.
        name: String,
        /// The request type ("READ", ...).
        op: &'static str,
        /// The path or argument the request was about.
        arg: String,
    },
    /// Reading from or writing to the connection failed.
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        source: io::Error,
    },
    /// The daemon sent something that breaks the protocol, or a request
    /// could not be encoded (e.g. a payload over 4096 bytes).
    Protocol(String),
    /// The connection is gone; the reason says why.
    Closed(String),
    /// No reply within the client's timeout.
    TimedOut {
        /// The request type.
        op: &'static str,
        /// The path or argument.
        arg: String,
    },
}

impl XsError {
    /// The xenstore error name, if xenstored answered with an error.
    pub fn name(&self) -> Option<&str> {
        match self {
            XsError::Xenstore { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The errno for this error (the xenstore error's errno, the io error's
    /// errno, EPROTO for protocol errors, EPIPE when closed, ETIMEDOUT).
    pub fn errno(&self) -> i32 {
        match self {
            XsError::Xenstore { name, .. } => wire::errno_for_name(name).unwrap_or(libc::EINVAL),
            XsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            XsError::Protocol(_) => libc::EPROTO,
            XsError::Closed(_) => libc::EPIPE,
            XsError::TimedOut { .. } => libc::ETIMEDOUT,
        }
    }

    /// xenstored said ENOENT (no such node).
    pub fn is_enoent(&self) -> bool {
        self.name() == Some("ENOENT")
    }
    /// xenstored said EAGAIN (transaction conflict).
    pub fn is_eagain(&self) -> bool {
        self.name() == Some("EAGAIN")
    }
    /// xenstored said EACCES (permission denied).
    pub fn is_eacces(&self) -> bool {
        self.name() == Some("EACCES")
    }
    /// xenstored said EEXIST.
    pub fn is_eexist(&self) -> bool {
        self.name() == Some("EEXIST")
    }
    /// xenstored said EINVAL.
    pub fn is_einval(&self) -> bool {
        self.name() == Some("EINVAL")
    }
    /// The connection is unusable (closed, broken, or protocol violation).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            XsError::Closed(_) | XsError::Io { .. } | XsError::Protocol(_)
        )
    }
}

impl fmt::Display for XsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsError::Xenstore { name, op, arg } => write!(f, "xenstore {op} {arg:?}: {name}"),
            XsError::Io { context, source } => write!(f, "xenstore {context}: {source}"),
            XsError::Protocol(m) => write!(f, "xenstore protocol error: {m}"),
            XsError::Closed(m) => write!(f, "xenstore connection closed: {m}"),
            XsError::TimedOut { op, arg } => write!(f, "xenstore {op} {arg:?}: no reply in time"),
        }
    }
}

impl std::error::Error for XsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            XsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<XsError> for io::Error {
    fn from(e: XsError) -> io::Error {
        let kind = match &e {
            XsError::Io { source, .. } => source.kind(),
            XsError::TimedOut { .. } => io::ErrorKind::TimedOut,
            XsError::Closed(_) => io::ErrorKind::BrokenPipe,
            XsError::Protocol(_) => io::ErrorKind::InvalidData,
            XsError::Xenstore { .. } => match e.errno() {
                libc::ENOENT => io::ErrorKind::NotFound,
                libc::EACCES | libc::EPERM => io::ErrorKind::PermissionDenied,
                libc::EEXIST => io::ErrorKind::AlreadyExists,
                libc::EINVAL => io::ErrorKind::InvalidInput,
                _ => io::ErrorKind::Other,
            },
        };
        io::Error::new(kind, e)
    }
}

/// Result of a xenstore call.
pub type XsResult<T> = Result<T, XsError>;

type ReplySlot = Sender<XsResult<(Header, Vec<u8>)>>;

struct State {
    pending: HashMap<u32, ReplySlot>,
    /// Requests whose caller gave up (timeout); their late replies are dropped.
    abandoned: HashSet<u32>,
    /// Set once the connection is unusable.
    failed: Option<String>,
}

enum Stream {
    Unix(UnixStream),
    Device(File),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Device(f) => Stream::Device(f.try_clone()?),
        })
    }
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Device(f) => f.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Device(f) => f.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Device(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Shared {
    state: Mutex<State>,
    writer: Mutex<Stream>,
    next_req: AtomicU32,
    wake: EventFd,
    timeout: Mutex<Option<Duration>>,
    what: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these structures inconsistent enough to
    // matter (every update is a single insert/remove), so ignore poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Mark the connection failed and wake every waiting caller with an error.
    fn fail(&self, reason: String) {
        let mut st = lock(&self.state);
        if st.failed.is_none() {
            log::debug!("xenstore connection {}: {reason}", self.what);
            st.failed = Some(reason.clone());
        }
        for (_, slot) in st.pending.drain() {
            let _ = slot.send(Err(XsError::Closed(reason.clone())));
        }
    }
}

/// A xenstore connection (`Send + Sync`; every method takes `&self`).
pub struct XsClient {
    shared: Arc<Shared>,
    events: Receiver<WatchEvent>,
    reader: Option<JoinHandle<()>>,
}

impl fmt::Debug for XsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XsClient")
            .field("what", &self.shared.what)
            .finish()
    }
}

impl XsClient {
    /// Connect to a xenstored unix socket (the real `/var/run/xenstored/socket`
    /// or the simulator's). The connection is privileged (dom0).
    pub fn connect_unix(path: &Path) -> XsResult<XsClient> {
        let s = UnixStream::connect(path).map_err(|e| XsError::Io {
            context: format!("connecting to socket {}", path.display()),
            source: e,
        })?;
        Self::start(Stream::Unix(s), format!("socket {}", path.display()))
    }

    /// Open a xenbus character device (`/dev/xen/xenbus`): the same protocol,
    /// whole messages written, replies and events read.
    pub fn open_device(path: &Path) -> XsResult<XsClient> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| XsError::Io {
                context: format!("opening {}", path.display()),
                source: e,
            })?;
        Self::start(Stream::Device(f), format!("device {}", path.display()))
    }

    /// Open xenstore the way libxenstore does: `$XENSTORED_PATH` if set (a
    /// socket or a device), else the standard socket (under
    /// `$XENSTORED_RUNDIR` if set), else `/dev/xen/xenbus`.
    pub fn open_default() -> XsResult<XsClient> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return Self::open_path(Path::new(&p));
        }
        let sock = match std::env::var_os("XENSTORED_RUNDIR") {
            Some(d) => PathBuf::from(d).join("socket"),
            None => PathBuf::from(DEFAULT_SOCKET),
        };
        match Self::connect_unix(&sock) {
            Ok(c) => Ok(c),
            Err(e1) => Self::open_device(Path::new(XENBUS_DEVICE))
                .map_err(|e2| XsError::Closed(format!("no xenstore available: {e1}; {e2}"))),
        }
    }

    /// Open `path`, as a socket if it is one, else as a xenbus device.
    pub fn open_path(path: &Path) -> XsResult<XsClient> {
        let is_sock = std::fs::metadata(path)
            .map(|m| m.file_type().is_socket())
            .map_err(|e| XsError::Io {
                context: format!("looking at {}", path.display()),
                source: e,
            })?;
        if is_sock {
            Self::connect_unix(path)
        } else {
            Self::open_device(path)
        }
    }

    /// Connect to the simulated xenstored at `sock` and turn the connection
    /// into an unprivileged one acting as domain `domid` (sim-only XS_CONTROL
    /// command `sim-as-domain`; see docs/xenstore.md). Relative paths then
    /// resolve under `/local/domain/<domid>` and node permissions apply.
    pub fn connect_as_domain(sock: &Path, domid: u16) -> XsResult<XsClient> {
        let c = Self::connect_unix(sock)?;
        c.control(&[SIM_AS_DOMAIN_COMMAND, &domid.to_string()])?;
        Ok(c)
    }

    fn start(stream: Stream, what: String) -> XsResult<XsClient> {
        let io_err = |context: &str, e: io::Error| XsError::Io {
            context: format!("{context} for {what}"),
            source: e,
        };
        let reader = stream
            .try_clone()
            .map_err(|e| io_err("duplicating the stream", e))?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| io_err("creating an eventfd", e.into()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                abandoned: HashSet::new(),
                failed: None,
            }),
            writer: Mutex::new(stream),
            next_req: AtomicU32::new(1),
            wake,
            timeout: Mutex::new(Some(DEFAULT_TIMEOUT)),
            what: what.clone(),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("xs-reader".into())
            .spawn(move || reader_loop(sh, reader, tx))
            .map_err(|e| io_err("spawning the reader thread", e))?;
        Ok(XsClient {
            shared,
            events: rx,
            reader: Some(handle),
        })
    }

    /// Watch events of this connection. Disconnected once the connection is
    /// closed. The channel is unbounded: consume it.
    pub fn events(&self) -> &Receiver<WatchEvent> {
        &self.events
    }

    /// Limit each round trip (`None`: wait forever). Default [`DEFAULT_TIMEOUT`].
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        *lock(&self.shared.timeout) = timeout;
    }

    /// Send one request and wait for its reply payload.
    fn request(&self, ty: u32, tx: TxId, payload: &[u8], arg: &str) -> XsResult<Vec<u8>> {
        let op = wire::type_name(ty);
        if payload.len() > wire::PAYLOAD_MAX {
            return Err(XsError::Protocol(format!(
                "{op} {arg:?}: request payload of {} bytes exceeds {}",
                payload.len(),
                wire::PAYLOAD_MAX
            )));
        }
        let (slot_tx, slot_rx) = crossbeam_channel::bounded(1);
        let req_id = {
            let mut st = lock(&self.shared.state);
            if let Some(reason) = &st.failed {
                return Err(XsError::Closed(reason.clone()));
            }
            let mut id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
            while id == 0 || st.pending.contains_key(&id) || st.abandoned.contains(&id) {
                id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
            }
            st.pending.insert(id, slot_tx);
            id
        };
        let msg =
            wire::encode(ty, req_id, tx, payload).map_err(|e| XsError::Protocol(e.to_string()))?;
        let written = lock(&self.shared.writer).write_all(&msg);
        if let Err(e) = written {
            let reason = format!("writing {op} to {}: {e}", self.shared.what);
            self.shared.fail(reason.clone());
            return Err(XsError::Io {
                context: format!("{op} {arg:?} on {}", self.shared.what),
                source: e,
            });
        }
        let timeout = *lock(&self.shared.timeout);
        let reply = match timeout {
            Some(t) => match slot_rx.recv_timeout(t) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    let mut st = lock(&self.shared.state);
                    if st.pending.remove(&req_id).is_some() {
                        st.abandoned.insert(req_id);
                        return Err(XsError::TimedOut {
                            op,
                            arg: arg.to_string(),
                        });
                    }
                    drop(st);
                    // The reply raced in while we took the lock.
                    slot_rx
                        .try_recv()
                        .unwrap_or_else(|_| Err(XsError::Closed("reply lost".into())))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Err(XsError::Closed(format!("{} went away", self.shared.what)))
                }
            },
            None => slot_rx.recv().unwrap_or_else(|_| {
                Err(XsError::Closed(format!("{} went away", self.shared.what)))
            }),
        };
        let (hdr, body) = reply?;
        if hdr.ty == abi::XS_ERROR {
            let (strs, tail) = wire::split_strings(&body);
            let raw = strs.first().copied().unwrap_or(tail);
            let name = String::from_utf8_lossy(raw).into_owned();
            return Err(XsError::Xenstore {
                name,
                op,
                arg: arg.to_string(),
            });
        }
        if hdr.ty != ty {
            return Err(XsError::Protocol(format!(
                "{op} {arg:?}: reply has type {} ({})",
                hdr.ty,
                wire::type_name(hdr.ty)
            )));
        }
        Ok(body)
    }

    fn path_request(&self, ty: u32, tx: TxId, path: &str) -> XsResult<Vec<u8>> {
        self.request(ty, tx, &wire::join_strings(&[path]), path)
    }

    fn strings_reply(op: &str, arg: &str, body: &[u8]) -> XsResult<Vec<String>> {
        let (strs, tail) = wire::split_strings(body);
        if !tail.is_empty() {
            return Err(XsError::Protocol(format!(
                "{op} {arg:?}: reply does not end with a NUL"
            )));
        }
        strs.into_iter()
            .map(|s| {
                String::from_utf8(s.to_vec())
                    .map_err(|_| XsError::Protocol(format!("{op} {arg:?}: reply is not UTF-8")))
            })
            .collect()
    }

    fn single_string(op: &str, arg: &str, body: &[u8]) -> XsResult<String> {
        let v = Self::strings_reply(op, arg, body)?;
        match v.as_slice() {
            [s] => Ok(s.clone()),
            _ => Err(XsError::Protocol(format!(
                "{op} {arg:?}: expected one string in the reply, got {}",
                v.len()
            ))),
        }
    }

    /// Read a node's value.
    pub fn read(&self, tx: TxId, path: &str) -> XsResult<Vec<u8>> {
        self.path_request(abi::XS_READ, tx, path)
    }

    /// Read a node's value as UTF-8 text (a non-UTF-8 value is an error:
    /// values written by guests are untrusted).
    pub fn read_string(&self, tx: TxId, path: &str) -> XsResult<String> {
        let v = self.read(tx, path)?;
        String::from_utf8(v)
            .map_err(|_| XsError::Protocol(format!("value of {path:?} is not UTF-8 text")))
    }

    /// Read a node, `None` if it does not exist.
    pub fn try_read_string(&self, tx: TxId, path: &str) -> XsResult<Option<String>> {
        match self.read_string(tx, path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a node exists (and is readable).
    pub fn exists(&self, tx: TxId, path: &str) -> XsResult<bool> {
        match self.read(tx, path) {
            Ok(_) => Ok(true),
            Err(e) if e.is_enoent() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Write a value, creating the node and missing parents.
    pub fn write(&self, tx: TxId, path: &str, value: &[u8]) -> XsResult<()> {
        let mut p = wire::join_strings(&[path]);
        p.extend_from_slice(value);
        self.request(abi::XS_WRITE, tx, &p, path).map(drop)
    }

    /// Create a node (and missing parents) with an empty value; an existing
    /// node is left alone.
    pub fn mkdir(&self, tx: TxId, path: &str) -> XsResult<()> {
        self.path_request(abi::XS_MKDIR, tx, path).map(drop)
    }

    /// Remove a node and everything below it. Not an error if it does not
    /// exist, as long as its parent does.
    pub fn rm(&self, tx: TxId, path: &str) -> XsResult<()> {
        self.path_request(abi::XS_RM, tx, path).map(drop)
    }

    /// The names of a node's children. Falls back to DIRECTORY_PART when the
    /// list does not fit one message (E2BIG), as libxenstore does.
    pub fn directory(&self, tx: TxId, path: &str) -> XsResult<Vec<String>> {
        match self.path_request(abi::XS_DIRECTORY, tx, path) {
            Ok(body) => Self::strings_reply("DIRECTORY", path, &body),
            Err(e) if e.name() == Some("E2BIG") => self.directory_part(tx, path),
            Err(e) => Err(e),
        }
    }

    /// Read a long child list in pieces with DIRECTORY_PART (restarting if the
    /// node's generation changes in between).
    pub fn directory_part(&self, tx: TxId, path: &str) -> XsResult<Vec<String>> {
        'restart: for _ in 0..TRANSACTION_RETRIES {
            let mut all: Vec<u8> = Vec::new();
            let mut gen: Option<Vec<u8>> = None;
            loop {
                let off = all.len().to_string();
                let req = wire::join_strings(&[path, off.as_str()]);
                let body = self.request(abi::XS_DIRECTORY_PART, tx, &req, path)?;
                let nul = body.iter().position(|&b| b == 0).ok_or_else(|| {
                    XsError::Protocol(format!("DIRECTORY_PART {path:?}: no generation"))
                })?;
                let (g, rest) = (&body[..nul], &body[nul + 1..]);
                match &gen {
                    Some(old) if old.as_slice() != g => continue 'restart,
                    Some(_) => {}
                    None => gen = Some(g.to_vec()),
                }
                // The final piece ends with an extra empty string.
                if rest.is_empty() || rest == [0] || rest.ends_with(&[0, 0]) {
                    let end = rest.len().saturating_sub(1);
                    all.extend_from_slice(&rest[..end]);
                    return Self::strings_reply("DIRECTORY_PART", path, &all);
                }
                if rest.last() != Some(&0) {
                    return Err(XsError::Protocol(format!(
                        "DIRECTORY_PART {path:?}: piece does not end with a NUL"
                    )));
                }
                all.extend_from_slice(rest);
            }
        }
        Err(XsError::Protocol(format!(
            "DIRECTORY_PART {path:?}: node kept changing"
        )))
    }

    /// A node's permissions.
    pub fn get_perms(&self, tx: TxId, path: &str) -> XsResult<Permissions> {
        let body = self.path_request(abi::XS_GET_PERMS, tx, path)?;
        let strs = Self::strings_reply("GET_PERMS", path, &body)?;
        Permissions::from_strings(&strs).ok_or_else(|| {
            XsError::Protocol(format!("GET_PERMS {path:?}: bad permissions {strs:?}"))
        })
    }

    /// Set a node's permissions.
    pub fn set_perms(&self, tx: TxId, path: &str, perms: &Permissions) -> XsResult<()> {
        let mut parts = vec![path.to_string()];
        parts.extend(perms.to_strings());
        self.request(abi::XS_SET_PERMS, tx, &wire::join_strings(&parts), path)
            .map(drop)
    }

    /// Watch `path` (and everything below it). The watch fires once right away,
    /// then on every change; events arrive on [`XsClient::events`].
    pub fn watch(&self, path: &str, token: &str) -> XsResult<()> {
        self.request(
            abi::XS_WATCH,
            XBT_NULL,
            &wire::join_strings(&[path, token]),
            path,
        )
        .map(drop)
    }

    /// Remove a watch set with the same path and token.
    pub fn unwatch(&self, path: &str, token: &str) -> XsResult<()> {
        self.request(
            abi::XS_UNWATCH,
            XBT_NULL,
            &wire::join_strings(&[path, token]),
            path,
        )
        .map(drop)
    }

    /// Remove all watches and transactions of this connection.
    pub fn reset_watches(&self) -> XsResult<()> {
        self.request(abi::XS_RESET_WATCHES, XBT_NULL, b"\0", "")
            .map(drop)
    }

    /// Start a transaction.
    pub fn transaction_start(&self) -> XsResult<TxId> {
        let body = self.request(abi::XS_TRANSACTION_START, XBT_NULL, b"\0", "")?;
        let s = Self::single_string("TRANSACTION_START", "", &body)?;
        match s.parse::<u32>() {
            Ok(id) if id != 0 => Ok(id),
            _ => Err(XsError::Protocol(format!(
                "TRANSACTION_START: bad transaction id {s:?}"
            ))),
        }
    }

    /// End a transaction: commit (`true`, may fail with EAGAIN on conflict)
    /// or abort.
    pub fn transaction_end(&self, tx: TxId, commit: bool) -> XsResult<()> {
        let arg = if commit { "T" } else { "F" };
        self.request(
            abi::XS_TRANSACTION_END,
            tx,
            &wire::join_strings(&[arg]),
            arg,
        )
        .map(drop)
    }

    /// Run `f` in a transaction and commit it, retrying the whole thing (up to
    /// [`TRANSACTION_RETRIES`] times) while xenstored answers EAGAIN. An error
    /// from `f` aborts the transaction and is returned (EAGAIN retries).
    pub fn transaction<T, F>(&self, mut f: F) -> XsResult<T>
    where
        F: FnMut(TxId) -> XsResult<T>,
    {
        let mut last = None;
        for attempt in 0..TRANSACTION_RETRIES {
            let tx = self.transaction_start()?;
            match f(tx) {
                Ok(v) => match self.transaction_end(tx, true) {
                    Ok(()) => return Ok(v),
                    Err(e) if e.is_eagain() => last = Some(e),
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    let _ = self.transaction_end(tx, false);
                    if !e.is_eagain() {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
            log::debug!("xenstore transaction conflict, retry {}", attempt + 1);
            std::thread::sleep(Duration::from_millis(1 << attempt.min(6)));
        }
        Err(last.unwrap_or_else(|| XsError::Protocol("transaction never ran".into())))
    }

    /// Tell xenstored about a new domain (privileged).
    pub fn introduce(&self, domid: u16, mfn: u64, port: u32) -> XsResult<()> {
        let (d, m, p) = (domid.to_string(), mfn.to_string(), port.to_string());
        self.request(
            abi::XS_INTRODUCE,
            XBT_NULL,
            &wire::join_strings(&[&d, &m, &p]),
            &d,
        )
        .map(drop)
    }

    /// Tell xenstored a domain is gone (privileged); fires @releaseDomain.
    pub fn release(&self, domid: u16) -> XsResult<()> {
        let d = domid.to_string();
        self.request(abi::XS_RELEASE, XBT_NULL, &wire::join_strings(&[&d]), &d)
            .map(drop)
    }

    /// Re-arm @releaseDomain for a domain (privileged).
    pub fn resume(&self, domid: u16) -> XsResult<()> {
        let d = domid.to_string();
        self.request(abi::XS_RESUME, XBT_NULL, &wire::join_strings(&[&d]), &d)
            .map(drop)
    }

    /// Let `domid` act for `target` (a device model for its guest; privileged).
    pub fn set_target(&self, domid: u16, target: u16) -> XsResult<()> {
        let (d, t) = (domid.to_string(), target.to_string());
        self.request(
            abi::XS_SET_TARGET,
            XBT_NULL,
            &wire::join_strings(&[&d, &t]),
            &d,
        )
        .map(drop)
    }

    /// Whether xenstored is in contact with the domain (privileged).
    pub fn is_domain_introduced(&self, domid: u16) -> XsResult<bool> {
        let d = domid.to_string();
        let body = self.request(
            abi::XS_IS_DOMAIN_INTRODUCED,
            XBT_NULL,
            &wire::join_strings(&[&d]),
            &d,
        )?;
        match Self::single_string("IS_DOMAIN_INTRODUCED", &d, &body)?.as_str() {
            "T" => Ok(true),
            "F" => Ok(false),
            other => Err(XsError::Protocol(format!(
                "IS_DOMAIN_INTRODUCED {d}: reply {other:?}"
            ))),
        }
    }

    /// A domain's home path, `/local/domain/<domid>`.
    pub fn get_domain_path(&self, domid: u16) -> XsResult<String> {
        let d = domid.to_string();
        let body = self.request(
            abi::XS_GET_DOMAIN_PATH,
            XBT_NULL,
            &wire::join_strings(&[&d]),
            &d,
        )?;
        Self::single_string("GET_DOMAIN_PATH", &d, &body)
    }

    /// Send an XS_CONTROL command (privileged); returns the reply payload.
    pub fn control(&self, args: &[&str]) -> XsResult<Vec<u8>> {
        let arg = args.first().copied().unwrap_or("");
        self.request(abi::XS_CONTROL, XBT_NULL, &wire::join_strings(args), arg)
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        let _ = self.shared.wake.write(1);
        if let Stream::Unix(s) = &*lock(&self.shared.writer) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The reader thread: wait for data (or the wake-up from `Drop`), read one
/// message, route it. Any framing problem ends the connection.
fn reader_loop(shared: Arc<Shared>, mut stream: Stream, events: Sender<WatchEvent>) {
    let reason = loop {
        let ready = {
            let mut fds = [
                PollFd::new(stream.fd(), PollFlags::POLLIN),
                PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {
                    if fds[1].any().unwrap_or(false) {
                        break "client closed".to_string();
                    }
                    true
                }
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => break format!("poll failed: {e}"),
            }
        };
        if !ready {
            continue;
        }
        let (hdr, body) = match wire::read_message(&mut stream) {
            Ok(m) => m,
            Err(ReadError::Eof) => break "xenstored closed the connection".to_string(),
            Err(e) => break format!("bad message from xenstored: {e}"),
        };
        if hdr.ty == abi::XS_WATCH_EVENT {
            let (strs, _) = wire::split_strings(&body);
            match (strs.first(), strs.get(1)) {
                (Some(p), Some(t)) => match (std::str::from_utf8(p), std::str::from_utf8(t)) {
                    (Ok(p), Ok(t)) => {
                        let _ = events.send(WatchEvent {
                            path: p.to_string(),
                            token: t.to_string(),
                        });
                    }
                    _ => log::warn!("{}: dropping a non-UTF-8 watch event", shared.what),
                },
                _ => log::warn!("{}: dropping a malformed watch event", shared.what),
            }
            continue;
        }
        let mut st = lock(&shared.state);
        if let Some(slot) = st.pending.remove(&hdr.req_id) {
            let _ = slot.send(Ok((hdr, body)));
        } else if st.abandoned.remove(&hdr.req_id) {
            log::debug!("{}: late reply to request {}", shared.what, hdr.req_id);
        } else {
            break format!(
                "reply of type {} to request id {} that was never sent",
                wire::type_name(hdr.ty),
                hdr.req_id
            );
        }
    };
    shared.fail(reason);
    // Dropping `events` disconnects the event channel.
}
