//! The simulated xenstored: the real xenstore wire protocol on a unix socket,
//! served by threads in this process.
//!
//! Model (see docs/xenstore.md): a tree of nodes with values and permissions,
//! watches with tokens, transactions on private snapshots that fail with
//! EAGAIN on conflict, domain introduction/release with the special
//! `@introduceDomain`/`@releaseDomain` watches. Socket connections are dom0;
//! the sim-only `XS_CONTROL` command `sim-as-domain <N>` turns a connection
//! into domain N with domU permission semantics
//! ([`refblk_core::xenstore::XsClient::connect_as_domain`]).
//!
//! Threads: one acceptor, and per connection a reader (parses requests, runs
//! them under the global lock) and a writer (drains a bounded queue to the
//! socket). A client that does not read its replies only stalls itself; one
//! whose queue is full when a watch event must be queued is disconnected, so
//! it can never block the daemon.

mod engine;
mod inprocess;
mod store;

pub use inprocess::InProcess;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};
use xen_sys::xs_wire as abi;

use engine::{ConnId, Engine};
use refblk_core::xenstore::wire::{self, ReadError};
use refblk_core::xenstore::{XsClient, XsResult};

/// Messages queued per connection before it counts as not reading.
pub const CONN_QUEUE_LEN: usize = 1024;
/// Connections served at once; more are closed right after accept.
pub const MAX_CONNECTIONS: usize = 512;

struct ConnIo {
    out: Sender<Vec<u8>>,
    stream: UnixStream,
}

struct Inner {
    engine: Engine,
    conns: HashMap<ConnId, ConnIo>,
}

struct Daemon {
    inner: Mutex<Inner>,
    stopping: AtomicBool,
    next_conn: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulated xenstored (threads in this process); stops, closes
/// every connection and removes its socket when dropped.
pub struct Xenstored {
    sock: PathBuf,
    daemon: Arc<Daemon>,
    listener: UnixListener,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Xenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstored")
            .field("sock", &self.sock)
            .finish()
    }
}

impl Xenstored {
    /// Listen on the unix socket `sock` and serve the xenstore wire protocol.
    /// A stale socket file at `sock` is replaced.
    pub fn spawn(sock: &Path) -> io::Result<Xenstored> {
        if let Ok(m) = std::fs::symlink_metadata(sock) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                std::fs::remove_file(sock)?;
            }
        }
        let listener = UnixListener::bind(sock).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("xenstored: cannot listen on {}: {e}", sock.display()),
            )
        })?;
        let daemon = Arc::new(Daemon {
            inner: Mutex::new(Inner {
                engine: Engine::new(),
                conns: HashMap::new(),
            }),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
        });
        let l2 = listener.try_clone()?;
        let d2 = Arc::clone(&daemon);
        let acceptor = std::thread::Builder::new()
            .name("xenstored-accept".into())
            .spawn(move || accept_loop(d2, l2))?;
        log::debug!("xenstored: listening on {}", sock.display());
        Ok(Xenstored {
            sock: sock.to_path_buf(),
            daemon,
            listener,
            acceptor: Some(acceptor),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.sock
    }

    /// A new privileged (dom0) client connection.
    pub fn client(&self) -> XsResult<XsClient> {
        XsClient::connect_unix(&self.sock)
    }

    /// A new client connection acting as unprivileged domain `domid`.
    pub fn client_as_domain(&self, domid: u16) -> XsResult<XsClient> {
        XsClient::connect_as_domain(&self.sock, domid)
    }

    /// Number of client connections currently open.
    pub fn connection_count(&self) -> usize {
        lock(&self.daemon.inner).engine.conn_count()
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        self.daemon.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() on Linux.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener.as_fd()),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for c in lock(&self.daemon.inner).conns.values() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.daemon.threads));
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
        log::debug!("xenstored: stopped ({})", self.sock.display());
    }
}

fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let res = listener.accept();
        if daemon.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match res {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("xenstored: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if let Err(e) = start_conn(&daemon, stream) {
            log::warn!("xenstored: cannot serve a new connection: {e}");
        }
    }
}

fn start_conn(daemon: &Arc<Daemon>, stream: UnixStream) -> io::Result<()> {
    {
        let mut threads = lock(&daemon.threads);
        threads.retain(|t| !t.is_finished());
    }
    let id = daemon.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(CONN_QUEUE_LEN);
    {
        let mut inner = lock(&daemon.inner);
        if inner.conns.len() >= MAX_CONNECTIONS {
            log::warn!("xenstored: too many connections, refusing one");
            return Ok(());
        }
        inner.engine.add_conn(id);
        inner.conns.insert(
            id,
            ConnIo {
                out: tx.clone(),
                stream: stream.try_clone()?,
            },
        );
    }
    let mut wstream = stream.try_clone()?;
    let writer = std::thread::Builder::new()
        .name(format!("xenstored-w{id}"))
        .spawn(move || {
            for msg in rx {
                if wstream.write_all(&msg).is_err() {
                    let _ = wstream.shutdown(Shutdown::Both);
                    break;
                }
            }
        });
    let d2 = Arc::clone(daemon);
    let reader = std::thread::Builder::new()
        .name(format!("xenstored-r{id}"))
        .spawn(move || serve_conn(d2, id, stream, tx));
    let mut threads = lock(&daemon.threads);
    match (writer, reader) {
        (Ok(w), Ok(r)) => {
            threads.push(w);
            threads.push(r);
            Ok(())
        }
        (w, r) => {
            drop(threads);
            drop_conn(daemon, id);
            let mut threads = lock(&daemon.threads);
            threads.extend(w.ok());
            threads.extend(r.ok());
            Err(io::Error::other("spawning connection threads failed"))
        }
    }
}

fn drop_conn(daemon: &Daemon, id: ConnId) {
    let mut inner = lock(&daemon.inner);
    inner.engine.remove_conn(id);
    if let Some(c) = inner.conns.remove(&id) {
        let _ = c.stream.shutdown(Shutdown::Read);
    }
}

fn serve_conn(daemon: Arc<Daemon>, id: ConnId, mut stream: UnixStream, out: Sender<Vec<u8>>) {
    loop {
        let (hdr, payload) = match wire::read_message(&mut stream) {
            Ok(m) => m,
            Err(ReadError::Eof) => break,
            Err(ReadError::TooBig(h)) => {
                log::warn!(
                    "xenstored: connection {id} sent a {}-byte payload (limit {}); closing it",
                    h.len,
                    wire::PAYLOAD_MAX
                );
                if let Ok(m) = wire::encode(abi::XS_ERROR, h.req_id, h.tx_id, b"E2BIG\0") {
                    let _ = out.send(m);
                }
                break;
            }
            Err(ReadError::Io(e)) => {
                log::debug!("xenstored: connection {id}: {e}");
                break;
            }
        };
        let own = {
            let mut inner = lock(&daemon.inner);
            let msgs = inner.engine.handle(id, hdr, &payload);
            let mut own = Vec::new();
            let mut overflowed = Vec::new();
            for (to, m) in msgs {
                if to == id {
                    own.push(m);
                } else if let Some(c) = inner.conns.get(&to) {
                    match c.out.try_send(m) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => overflowed.push(to),
                        Err(TrySendError::Disconnected(_)) => {}
                    }
                }
            }
            for to in overflowed {
                log::warn!("xenstored: connection {to} does not read its watch events; closing it");
                if let Some(c) = inner.conns.get(&to) {
                    let _ = c.stream.shutdown(Shutdown::Both);
                }
            }
            own
        };
        for m in own {
            if out.send(m).is_err() {
                drop_conn(&daemon, id);
                return;
            }
        }
    }
    drop_conn(&daemon, id);
}
