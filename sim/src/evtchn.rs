//! Simulated interdomain event channels: eventfds brokered over
//! `DIR/evtchn.sock` (a `SOCK_SEQPACKET` unix socket).
//!
//! Protocol (one text request per packet, one reply packet):
//! - `ALLOC <domid> <remote_domid>`: a guest allocates an unbound port (like
//!   `EVTCHNOP_alloc_unbound`). Reply `OK <port>` with two fds (SCM_RIGHTS): the
//!   port's own eventfd and the peer's eventfd.
//! - `BIND <domid> <remote_domid> <remote_port>`: a backend binds to a guest's
//!   unbound port (`EVTCHNOP_bind_interdomain`). Reply `OK <local_port>` with the
//!   binder's own eventfd and the guest's eventfd.
//! - `DESTROY <domid>`: close every port of a domain that is going away.
//! - Errors: `ERR <errno> <message>`.
//!
//! After `OK` to ALLOC/BIND the connection stays open and stands for the port:
//! when it closes (drop, exit or crash of the owner) the port is closed. As in
//! Xen, closing one end of a bound pair leaves the other end allocated and
//! unbound; a guest port whose backend went away can be bound again (a restarted
//! backend), and notifications sent to an unbound peer are dropped.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use super::domain::domain_dir;
use refblk_core::platform::{DomId, EventChannel, Port};

/// Largest request or reply packet.
const MAX_MSG: usize = 512;
/// Highest port number handed out per domain (Xen 2-level ABI on 64-bit: 4096).
const MAX_PORTS: Port = 4096;

fn nix_err(e: Errno, what: &str) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| nix_err(e, "socket(AF_UNIX, SOCK_SEQPACKET)"))
}

fn send_packet(fd: RawFd, msg: &str, fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(msg.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| nix_err(e, "sendmsg"))?;
    Ok(())
}

/// Receive one packet; `Ok(None)` at EOF.
fn recv_packet(fd: RawFd) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MSG];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 2]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match socket::recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg
                    .cmsgs()
                    .map_err(|e| nix_err(e, "recvmsg control data"))?
                {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed this descriptor in
                            // our table for us (SCM_RIGHTS); nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
                break (msg.bytes, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(nix_err(e, "recvmsg")),
        }
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(Some((text, fds)))
}

/// An event channel end in the simulation: the broker connection that keeps the
/// port open, our eventfd and the peer's eventfd.
pub struct SimEventChannel {
    conn: OwnedFd,
    own: OwnedFd,
    peer: OwnedFd,
    port: Port,
}

impl SimEventChannel {
    fn request(sock: &Path, req: &str) -> io::Result<SimEventChannel> {
        let conn = seqpacket()?;
        let addr = UnixAddr::new(sock).map_err(|e| nix_err(e, &sock.display().to_string()))?;
        socket::connect(conn.as_raw_fd(), &addr).map_err(|e| {
            nix_err(
                e,
                &format!(
                    "connect to the simulated event channel broker {} (is `refblk sim` running?)",
                    sock.display()
                ),
            )
        })?;
        send_packet(conn.as_raw_fd(), req, &[])?;
        let (reply, mut fds) = recv_packet(conn.as_raw_fd())?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "{}: broker closed the connection on `{req}`",
                    sock.display()
                ),
            )
        })?;
        let port = parse_reply(&reply, sock, req)?;
        if fds.len() != 2 {
            return Err(io::Error::other(format!(
                "{}: broker sent {} fds for `{req}`, expected 2",
                sock.display(),
                fds.len()
            )));
        }
        let peer = fds.pop().expect("two fds");
        let own = fds.pop().expect("two fds");
        Ok(SimEventChannel {
            conn,
            own,
            peer,
            port,
        })
    }

    /// Guest side: allocate an unbound port of `domid` for `remote` to bind.
    pub(crate) fn alloc_unbound(dir: &Path, domid: DomId, remote: DomId) -> io::Result<Self> {
        Self::request(&dir.join("evtchn.sock"), &format!("ALLOC {domid} {remote}"))
    }

    /// Backend side: bind `domid`'s new port to `remote`'s `remote_port`.
    pub(crate) fn bind(
        dir: &Path,
        domid: DomId,
        remote: DomId,
        remote_port: Port,
    ) -> io::Result<Self> {
        Self::request(
            &dir.join("evtchn.sock"),
            &format!("BIND {domid} {remote} {remote_port}"),
        )
    }
}

fn parse_reply(reply: &str, sock: &Path, req: &str) -> io::Result<Port> {
    let mut it = reply.splitn(3, ' ');
    match (it.next(), it.next(), it.next()) {
        (Some("OK"), Some(p), None) => p
            .parse()
            .map_err(|_| io::Error::other(format!("{}: bad reply `{reply}`", sock.display()))),
        (Some("ERR"), Some(errno), msg) => {
            let errno: i32 = errno.parse().unwrap_or(libc::EIO);
            Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!("event channel `{req}`: {}", msg.unwrap_or("failed")),
            ))
        }
        _ => Err(io::Error::other(format!(
            "{}: bad reply `{reply}`",
            sock.display()
        ))),
    }
}

/// Tell the broker in `dir` that `domid` is gone (best effort).
pub(crate) fn destroy_domain(dir: &Path, domid: DomId) -> io::Result<()> {
    let sock = dir.join("evtchn.sock");
    let conn = seqpacket()?;
    let addr = UnixAddr::new(&sock).map_err(|e| nix_err(e, &sock.display().to_string()))?;
    socket::connect(conn.as_raw_fd(), &addr).map_err(|e| nix_err(e, "connect"))?;
    let req = format!("DESTROY {domid}");
    send_packet(conn.as_raw_fd(), &req, &[])?;
    match recv_packet(conn.as_raw_fd())? {
        Some((reply, _)) => parse_reply(&reply, &sock, &req).map(|_| ()),
        None => Err(io::Error::other("broker closed the connection")),
    }
}

impl EventChannel for SimEventChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> io::Result<()> {
        match nix::unistd::write(&self.peer, &1u64.to_ne_bytes()) {
            // EAGAIN: the counter is saturated, an event is pending anyway.
            Ok(_) | Err(Errno::EAGAIN) => Ok(()),
            Err(e) => Err(nix_err(e, "event channel notify (eventfd write)")),
        }
    }

    fn fd(&self) -> RawFd {
        self.own.as_raw_fd()
    }

    fn ack(&self) -> io::Result<bool> {
        let mut b = [0u8; 8];
        match nix::unistd::read(&self.own, &mut b) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN) => Ok(false),
            Err(e) => Err(nix_err(e, "event channel ack (eventfd read)")),
        }
    }
}

impl std::fmt::Debug for SimEventChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEventChannel")
            .field("port", &self.port)
            .field("conn", &self.conn.as_raw_fd())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// The broker.

struct Chan {
    uid: u64,
    /// The domain allowed to bind (or bound).
    remote: DomId,
    /// The bound peer port.
    peer: Option<(DomId, Port)>,
    /// (own, binder's) eventfds for ports made by ALLOC; None for BIND ports.
    fds: Option<(Arc<OwnedFd>, Arc<OwnedFd>)>,
}

#[derive(Default)]
struct State {
    chans: HashMap<(DomId, Port), Chan>,
    next_uid: u64,
    /// Live connections (for shutdown on stop).
    conns: HashMap<u64, RawFd>,
    threads: Vec<JoinHandle<()>>,
    stopping: bool,
    /// How long a binder's port stays bound after its connection closed
    /// (see [`EvtchnBroker::set_release_delay`]).
    release_delay: Duration,
}

impl State {
    fn free_port(&self, dom: DomId) -> Option<Port> {
        (1..MAX_PORTS).find(|p| !self.chans.contains_key(&(dom, *p)))
    }

    fn close(&mut self, key: (DomId, Port), uid: u64) {
        let matches = self.chans.get(&key).map(|c| c.uid == uid).unwrap_or(false);
        if !matches {
            return;
        }
        let chan = self.chans.remove(&key).expect("checked");
        if let Some(peer) = chan.peer {
            if let Some(p) = self.chans.get_mut(&peer) {
                p.peer = None;
            }
        }
        log::debug!("evtchn: closed port {} of domain {}", key.1, key.0);
    }
}

type Reply = (String, Vec<Arc<OwnedFd>>, Option<((DomId, Port), u64)>);

fn err_reply(errno: i32, msg: String) -> Reply {
    (format!("ERR {errno} {msg}"), Vec::new(), None)
}

fn handle(dir: &Path, st: &Mutex<State>, req: &str) -> Reply {
    let words: Vec<&str> = req.split_ascii_whitespace().collect();
    let num = |i: usize| -> Option<u32> { words.get(i).and_then(|w| w.parse().ok()) };
    let dom = |i: usize| -> Option<DomId> { words.get(i).and_then(|w| w.parse().ok()) };
    let mut st = st.lock().unwrap_or_else(|p| p.into_inner());
    match (words.first().copied(), words.len()) {
        (Some("ALLOC"), 3) => {
            let (Some(d), Some(r)) = (dom(1), dom(2)) else {
                return err_reply(libc::EINVAL, format!("bad request `{req}`"));
            };
            let Some(port) = st.free_port(d) else {
                return err_reply(libc::ENOSPC, format!("domain {d} has no free port"));
            };
            let mk = || {
                EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .map(|e| Arc::new(OwnedFd::from(e)))
            };
            let (own, other) = match (mk(), mk()) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return err_reply(e as i32, format!("eventfd: {e}")),
            };
            st.next_uid += 1;
            let uid = st.next_uid;
            st.chans.insert(
                (d, port),
                Chan {
                    uid,
                    remote: r,
                    peer: None,
                    fds: Some((own.clone(), other.clone())),
                },
            );
            log::debug!("evtchn: domain {d} allocated port {port} for domain {r}");
            (
                format!("OK {port}"),
                vec![own, other],
                Some(((d, port), uid)),
            )
        }
        (Some("BIND"), 4) => {
            let (Some(d), Some(r), Some(rp)) = (dom(1), dom(2), num(3)) else {
                return err_reply(libc::EINVAL, format!("bad request `{req}`"));
            };
            if !domain_dir(dir, r).join("gnttab").exists() {
                return err_reply(libc::ESRCH, format!("domain {r} does not exist"));
            }
            let Some(chan) = st.chans.get(&(r, rp)) else {
                return err_reply(
                    libc::EINVAL,
                    format!("port {rp} of domain {r} is not allocated"),
                );
            };
            let Some((g_own, g_other)) = chan.fds.clone() else {
                return err_reply(
                    libc::EINVAL,
                    format!("port {rp} of domain {r} is not an unbound port"),
                );
            };
            if chan.peer.is_some() {
                return err_reply(
                    libc::EINVAL,
                    format!("port {rp} of domain {r} is already bound"),
                );
            }
            if chan.remote != d {
                return err_reply(
                    libc::EINVAL,
                    format!(
                        "port {rp} of domain {r} is reserved for domain {}, not {d}",
                        chan.remote
                    ),
                );
            }
            let Some(port) = st.free_port(d) else {
                return err_reply(libc::ENOSPC, format!("domain {d} has no free port"));
            };
            // Events sent while nobody was bound are dropped, as Xen does.
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(&*g_other, &mut b);
            st.next_uid += 1;
            let uid = st.next_uid;
            st.chans.get_mut(&(r, rp)).expect("checked").peer = Some((d, port));
            st.chans.insert(
                (d, port),
                Chan {
                    uid,
                    remote: r,
                    peer: Some((r, rp)),
                    fds: None,
                },
            );
            log::debug!("evtchn: domain {d} port {port} bound to domain {r} port {rp}");
            (
                format!("OK {port}"),
                vec![g_other, g_own],
                Some(((d, port), uid)),
            )
        }
        (Some("DESTROY"), 2) => {
            let Some(d) = dom(1) else {
                return err_reply(libc::EINVAL, format!("bad request `{req}`"));
            };
            let keys: Vec<((DomId, Port), u64)> = st
                .chans
                .iter()
                .filter(|(k, _)| k.0 == d)
                .map(|(k, c)| (*k, c.uid))
                .collect();
            for (k, uid) in keys {
                st.close(k, uid);
            }
            ("OK 0".to_string(), Vec::new(), None)
        }
        _ => err_reply(libc::EINVAL, format!("unknown request `{req}`")),
    }
}

fn serve_conn(dir: &Path, st: &Mutex<State>, conn: OwnedFd, conn_id: u64) {
    let fd = conn.as_raw_fd();
    let mut owned: Option<((DomId, Port), u64)> = None;
    loop {
        let req = match recv_packet(fd) {
            Ok(Some((req, _fds))) => req,
            Ok(None) => break,
            Err(e) => {
                log::debug!("evtchn broker: connection error: {e}");
                break;
            }
        };
        if owned.is_some() {
            // The connection stands for a port; anything sent closes it.
            break;
        }
        let (reply, fds, port) = handle(dir, st, &req);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if let Err(e) = send_packet(fd, &reply, &raw) {
            log::debug!("evtchn broker: reply failed: {e}");
            if let Some((k, uid)) = port {
                st.lock().unwrap_or_else(|p| p.into_inner()).close(k, uid);
            }
            break;
        }
        match port {
            Some(p) => owned = Some(p),
            None => break,
        }
    }
    if let Some((k, _)) = owned {
        let delay = {
            let s = st.lock().unwrap_or_else(|p| p.into_inner());
            let binder = s.chans.get(&k).is_some_and(|c| c.fds.is_none());
            if binder && !s.stopping {
                s.release_delay
            } else {
                Duration::ZERO
            }
        };
        if !delay.is_zero() {
            log::debug!(
                "evtchn: port {} of domain {} released in {delay:?}",
                k.1,
                k.0
            );
            std::thread::sleep(delay);
        }
    }
    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((k, uid)) = owned {
        s.close(k, uid);
    }
    // Deregister before the fd is closed so stop() never shuts down a reused fd.
    s.conns.remove(&conn_id);
    drop(s);
    drop(conn);
}

/// The event channel broker: serves `DIR/evtchn.sock` from threads of this
/// process until dropped (then removes the socket).
pub struct EvtchnBroker {
    sock: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<EventFd>,
    accept: Option<JoinHandle<()>>,
}

impl EvtchnBroker {
    /// Listen on `dir/evtchn.sock`. Fails if another broker is serving it; a
    /// stale socket file (nobody listening) is replaced.
    pub fn spawn(dir: &Path) -> io::Result<EvtchnBroker> {
        let sock = dir.join("evtchn.sock");
        let addr = UnixAddr::new(&sock).map_err(|e| nix_err(e, &sock.display().to_string()))?;
        if sock.exists() {
            let probe = seqpacket()?;
            if socket::connect(probe.as_raw_fd(), &addr).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another event channel broker is running",
                        sock.display()
                    ),
                ));
            }
            std::fs::remove_file(&sock).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: remove stale socket: {e}", sock.display()),
                )
            })?;
        }
        let listener = seqpacket()?;
        socket::bind(listener.as_raw_fd(), &addr)
            .map_err(|e| nix_err(e, &format!("bind {}", sock.display())))?;
        socket::listen(&listener, Backlog::new(64).expect("valid backlog"))
            .map_err(|e| nix_err(e, &format!("listen {}", sock.display())))?;
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| nix_err(e, "eventfd"))?,
        );
        let state = Arc::new(Mutex::new(State::default()));
        let (st2, stop2, dir2) = (state.clone(), stop.clone(), dir.to_path_buf());
        let accept = std::thread::Builder::new()
            .name("sim-evtchn".into())
            .spawn(move || accept_loop(&dir2, listener, &st2, &stop2))?;
        log::info!("simulated event channels on {}", sock.display());
        Ok(EvtchnBroker {
            sock,
            state,
            stop,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.sock
    }

    /// From now on, a port bound with `BIND` stays bound for `d` after its
    /// owner let go of it (closed, exited, was killed), as on Linux when a
    /// killed daemon's io_uring still holds a poll on the channel's file: the
    /// driver closes the port only when that file's last reference goes, which
    /// io_uring drops in its own exit work, after the process is gone. Ports
    /// allocated with `ALLOC` (the guests') are closed at once as before.
    pub fn set_release_delay(&self, d: Duration) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release_delay = d;
    }
}

fn accept_loop(dir: &Path, listener: OwnedFd, st: &Arc<Mutex<State>>, stop: &EventFd) {
    let mut next_conn = 0u64;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("evtchn broker: poll: {e}");
                return;
            }
        }
        if fds[1].any().unwrap_or(false) {
            return;
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        let conn = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that we now own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(Errno::EINTR) | Err(Errno::ECONNABORTED) | Err(Errno::EAGAIN) => continue,
            Err(e) => {
                log::error!("evtchn broker: accept: {e}");
                // Avoid spinning on e.g. EMFILE.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        next_conn += 1;
        let id = next_conn;
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        if s.stopping {
            return;
        }
        s.threads.retain(|t| !t.is_finished());
        s.conns.insert(id, conn.as_raw_fd());
        let (st2, dir2) = (st.clone(), dir.to_path_buf());
        match std::thread::Builder::new()
            .name("sim-evtchn-conn".into())
            .spawn(move || serve_conn(&dir2, &st2, conn, id))
        {
            Ok(t) => s.threads.push(t),
            Err(e) => {
                // The closure (and the connection) was dropped with the error.
                s.conns.remove(&id);
                log::error!("evtchn broker: spawn: {e}");
            }
        }
    }
}

impl Drop for EvtchnBroker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.stopping = true;
            for &fd in s.conns.values() {
                // Wake the connection thread; it deregisters (under this lock)
                // before closing, so fd is still its connection.
                let _ = socket::shutdown(fd, socket::Shutdown::Both);
            }
            std::mem::take(&mut s.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
        log::info!("event channel broker on {} stopped", self.sock.display());
    }
}
