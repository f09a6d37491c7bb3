//! Request handling of the simulated xenstored, without any I/O: a request in,
//! a list of (connection, message) out — the reply for the caller plus watch
//! events for whoever's watches matched.

use std::collections::HashMap;

use xen_sys::xs_wire as abi;

use super::store::{self, canonicalize, is_child, rights, Caller, Tree};
use refblk_core::xenstore::wire::{self, Header, Permissions};

/// Identifies a client connection.
pub(super) type ConnId = u64;

/// First reserved domid (`DOMID_FIRST_RESERVED`); real domains are below.
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

/// Quotas applied to unprivileged connections (xenstored's defaults).
pub(super) const QUOTA_NODES: usize = 1000;
pub(super) const QUOTA_WATCHES: usize = 128;
pub(super) const QUOTA_TRANSACTIONS: usize = 10;
pub(super) const QUOTA_ENTRY_SIZE: usize = 2048;
pub(super) const QUOTA_PERMS: usize = 5;
/// Sanity bounds for privileged connections.
const PRIV_MAX_WATCHES: usize = 4096;
const PRIV_MAX_TRANSACTIONS: usize = 1024;

const SPECIAL_INTRODUCE: &str = "@introduceDomain";
const SPECIAL_RELEASE: &str = "@releaseDomain";

/// A change to report to watches.
#[derive(Debug, Clone)]
enum Change {
    /// A node was written, created, or had its permissions changed; the
    /// permissions are those that decide who may see the event.
    Modify {
        path: String,
        perms: Vec<Permissions>,
    },
    /// A subtree was removed (`removed`: every removed node, root first).
    Remove {
        path: String,
        removed: Vec<(String, Permissions)>,
    },
    /// A special event (`@introduceDomain`, `@releaseDomain`).
    Special(&'static str),
}

#[derive(Debug)]
struct Watch {
    /// Canonical path (or special name).
    node: String,
    token: Vec<u8>,
    /// Registered with a relative path: events are reported relative too.
    relative: bool,
}

struct Transaction {
    tree: Tree,
    changes: Vec<Change>,
}

struct Conn {
    domid: u16,
    watches: Vec<Watch>,
    transactions: HashMap<u32, Transaction>,
    next_tx: u32,
}

#[derive(Debug, Default)]
struct Domain {
    introduced: bool,
    target: Option<u16>,
}

/// Outgoing messages: (destination connection, whole wire message).
pub(super) type Outbox = Vec<(ConnId, Vec<u8>)>;

type OpResult = Result<Vec<u8>, i32>;

const OK: &[u8] = b"OK\0";

/// The whole daemon state.
pub(super) struct Engine {
    tree: Tree,
    gen: u64,
    conns: HashMap<ConnId, Conn>,
    domains: HashMap<u16, Domain>,
    /// Permissions of the special watch nodes.
    special_perms: HashMap<&'static str, Permissions>,
}

fn onearg(p: &[u8]) -> Result<&[u8], i32> {
    match p.iter().position(|&b| b == 0) {
        Some(i) if i + 1 == p.len() => Ok(&p[..i]),
        _ => Err(libc::EINVAL),
    }
}

/// Exactly `n` NUL-terminated strings (trailing unterminated bytes ignored,
/// as xenstored does).
fn nargs(p: &[u8], n: usize) -> Result<Vec<&[u8]>, i32> {
    let (v, _) = wire::split_strings(p);
    if v.len() == n {
        Ok(v)
    } else {
        Err(libc::EINVAL)
    }
}

fn parse_num<T: std::str::FromStr>(s: &[u8]) -> Result<T, i32> {
    if s.is_empty() || s.len() > 20 {
        return Err(libc::EINVAL);
    }
    std::str::from_utf8(s)
        .map_err(|_| libc::EINVAL)?
        .parse()
        .map_err(|_| libc::EINVAL)
}

fn parse_domid(s: &[u8]) -> Result<u16, i32> {
    let d: u32 = parse_num(s)?;
    if d >= DOMID_FIRST_RESERVED {
        return Err(libc::EINVAL);
    }
    Ok(d as u16)
}

fn event_frame(path: &str, token: &[u8]) -> Option<Vec<u8>> {
    let mut p = wire::join_strings(&[path.as_bytes()]);
    p.extend_from_slice(token);
    p.push(0);
    // Over-long events are not sent (as xenstored).
    wire::encode(abi::XS_WATCH_EVENT, 0, 0, &p).ok()
}

/// errno for a node that does not exist: ENOENT if the caller has `need` on
/// the nearest existing ancestor, else EACCES (don't reveal existence).
fn errno_from_parents(t: &mut Tree, c: &Caller, path: &str, need_write: bool) -> i32 {
    let ancestor_perms = t
        .existing_ancestor(path)
        .and_then(|a| t.get(&a).map(|n| n.perms.clone()));
    match ancestor_perms {
        Some(p) => {
            let r = rights(c, &p);
            if (need_write && r.write) || (!need_write && r.read) {
                libc::ENOENT
            } else {
                libc::EACCES
            }
        }
        // Only "/" has no ancestor, and it always exists.
        None => libc::ENOENT,
    }
}

/// Look up a node the caller must be able to read.
fn readable<'t>(t: &'t mut Tree, c: &Caller, path: &str) -> Result<&'t store::Node, i32> {
    let perms = match t.get(path) {
        Some(n) => n.perms.clone(),
        None => return Err(errno_from_parents(t, c, path, false)),
    };
    if !rights(c, &perms).read {
        return Err(libc::EACCES);
    }
    Ok(t.get(path).expect("node checked above"))
}

/// The node exists and the caller may write it: Ok(Some(perms)); it does
/// not exist but could be created: Ok(None).
fn writable(t: &mut Tree, c: &Caller, path: &str) -> Result<Option<Permissions>, i32> {
    match t.get(path).map(|n| n.perms.clone()) {
        Some(p) if rights(c, &p).write => Ok(Some(p)),
        Some(_) => Err(libc::EACCES),
        None => match errno_from_parents(t, c, path, true) {
            libc::ENOENT => Ok(None),
            e => Err(e),
        },
    }
}

fn create_checked(
    t: &mut Tree,
    c: &Caller,
    path: &str,
    value: Vec<u8>,
    gen: &mut u64,
) -> Result<(), i32> {
    if !c.privileged() {
        // Count how many nodes would be created.
        let mut missing = 1;
        let mut p = path.to_string();
        while let Some(parent) = store::parent_of(&p) {
            if t.get(parent).is_some() {
                break;
            }
            missing += 1;
            p = parent.to_string();
        }
        if t.owned_by(c.domid) + missing > QUOTA_NODES {
            return Err(libc::ENOSPC);
        }
    }
    t.create(path, value, c, gen);
    Ok(())
}

fn op_read(t: &mut Tree, c: &Caller, p: &[u8], _: &mut u64, _: &mut Vec<Change>) -> OpResult {
    let path = canonicalize(c, onearg(p)?, false)?;
    Ok(readable(t, c, &path)?.value.clone())
}

fn op_directory(t: &mut Tree, c: &Caller, p: &[u8], _: &mut u64, _: &mut Vec<Change>) -> OpResult {
    let path = canonicalize(c, onearg(p)?, false)?;
    Ok(wire::join_strings(&readable(t, c, &path)?.children))
}

fn op_directory_part(
    t: &mut Tree,
    c: &Caller,
    p: &[u8],
    _: &mut u64,
    _: &mut Vec<Change>,
) -> OpResult {
    let a = nargs(p, 2)?;
    let path = canonicalize(c, a[0], false)?;
    let off: usize = parse_num(a[1])?;
    let node = readable(t, c, &path)?;
    let all = wire::join_strings(&node.children);
    let mut out = wire::join_strings(&[node.gen.to_string()]);
    if off >= all.len() {
        out.push(0);
        return Ok(out);
    }
    // Whole child names only, leaving room for the final extra NUL.
    let room = wire::PAYLOAD_MAX - out.len() - 1;
    let mut len = 0;
    for name in all[off..].split_inclusive(|&b| b == 0) {
        if len + name.len() > room {
            break;
        }
        len += name.len();
    }
    if len == 0 {
        // Offset in the middle of a name, or a name that cannot fit.
        return Err(libc::EINVAL);
    }
    out.extend_from_slice(&all[off..off + len]);
    if off + len == all.len() {
        out.push(0);
    }
    Ok(out)
}

fn op_get_perms(t: &mut Tree, c: &Caller, p: &[u8], _: &mut u64, _: &mut Vec<Change>) -> OpResult {
    let path = canonicalize(c, onearg(p)?, false)?;
    Ok(wire::join_strings(
        &readable(t, c, &path)?.perms.to_strings(),
    ))
}

fn op_write(t: &mut Tree, c: &Caller, p: &[u8], gen: &mut u64, ch: &mut Vec<Change>) -> OpResult {
    let nul = p.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
    let path = canonicalize(c, &p[..nul], false)?;
    let value = p[nul + 1..].to_vec();
    if !c.privileged() && value.len() > QUOTA_ENTRY_SIZE {
        return Err(libc::ENOSPC);
    }
    match writable(t, c, &path)? {
        Some(_) => t.set_value(&path, value, gen),
        None => create_checked(t, c, &path, value, gen)?,
    }
    let perms = t.get(&path).map(|n| n.perms.clone()).into_iter().collect();
    ch.push(Change::Modify { path, perms });
    Ok(OK.to_vec())
}

fn op_mkdir(t: &mut Tree, c: &Caller, p: &[u8], gen: &mut u64, ch: &mut Vec<Change>) -> OpResult {
    let path = canonicalize(c, onearg(p)?, false)?;
    if writable(t, c, &path)?.is_none() {
        create_checked(t, c, &path, Vec::new(), gen)?;
        let perms = t.get(&path).map(|n| n.perms.clone()).into_iter().collect();
        ch.push(Change::Modify { path, perms });
    }
    Ok(OK.to_vec())
}

fn op_rm(t: &mut Tree, c: &Caller, p: &[u8], gen: &mut u64, ch: &mut Vec<Change>) -> OpResult {
    let path = canonicalize(c, onearg(p)?, false)?;
    match writable(t, c, &path) {
        Ok(Some(_)) => {}
        Ok(None) | Err(libc::ENOENT) => {
            // Not there: fine if the parent exists.
            return match store::parent_of(&path) {
                Some(parent) if t.get(parent).is_some() => Ok(OK.to_vec()),
                _ => Err(libc::ENOENT),
            };
        }
        Err(e) => return Err(e),
    }
    if path == "/" {
        return Err(libc::EINVAL);
    }
    let removed = t.remove(&path, gen);
    ch.push(Change::Remove { path, removed });
    Ok(OK.to_vec())
}

fn parse_set_perms(c: &Caller, p: &[u8]) -> Result<(String, Permissions), i32> {
    let (a, _) = wire::split_strings(p);
    if a.len() < 2 {
        return Err(libc::EINVAL);
    }
    if !c.privileged() && a.len() - 1 > QUOTA_PERMS {
        return Err(libc::ENOSPC);
    }
    let perms = Permissions::from_strings(&a[1..]).ok_or(libc::EINVAL)?;
    let path = canonicalize(c, a[0], true)?;
    Ok((path, perms))
}

fn op_set_perms(
    t: &mut Tree,
    c: &Caller,
    p: &[u8],
    gen: &mut u64,
    ch: &mut Vec<Change>,
) -> OpResult {
    let (path, perms) = parse_set_perms(c, p)?;
    let old = match t.get(&path) {
        Some(n) => n.perms.clone(),
        None => return Err(errno_from_parents(t, c, &path, true)),
    };
    let r = rights(c, &old);
    if !(r.write && r.owner) {
        return Err(libc::EACCES);
    }
    if !c.privileged() && perms.owner != old.owner {
        return Err(libc::EPERM);
    }
    t.set_perms(&path, perms.clone(), gen);
    ch.push(Change::Modify {
        path,
        perms: vec![old, perms],
    });
    Ok(OK.to_vec())
}

type TreeOp = fn(&mut Tree, &Caller, &[u8], &mut u64, &mut Vec<Change>) -> OpResult;

impl Engine {
    pub fn new() -> Engine {
        let mut gen = 0;
        let tree = Tree::new(&mut gen);
        let mut domains = HashMap::new();
        // dom0 is always there.
        domains.insert(
            0,
            Domain {
                introduced: true,
                target: None,
            },
        );
        let mut special_perms = HashMap::new();
        for s in [SPECIAL_INTRODUCE, SPECIAL_RELEASE] {
            special_perms.insert(s, Permissions::new(0, wire::Access::None));
        }
        Engine {
            tree,
            gen,
            conns: HashMap::new(),
            domains,
            special_perms,
        }
    }

    /// A new privileged (dom0) connection.
    pub fn add_conn(&mut self, id: ConnId) {
        self.conns.insert(
            id,
            Conn {
                domid: 0,
                watches: Vec::new(),
                transactions: HashMap::new(),
                next_tx: 1,
            },
        );
    }

    /// A connection went away: its watches and transactions go with it.
    pub fn remove_conn(&mut self, id: ConnId) {
        self.conns.remove(&id);
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    fn caller(&self, id: ConnId) -> Caller {
        let domid = self.conns.get(&id).map(|c| c.domid).unwrap_or(0);
        let target = self.domains.get(&domid).and_then(|d| d.target);
        Caller { domid, target }
    }

    /// Handle one request from connection `id`.
    pub fn handle(&mut self, id: ConnId, hdr: Header, payload: &[u8]) -> Outbox {
        let mut out = Outbox::new();
        let res = self.dispatch(id, hdr, payload, &mut out);
        let reply = match res {
            Ok(body) if body.len() <= wire::PAYLOAD_MAX => {
                wire::encode(hdr.ty, hdr.req_id, hdr.tx_id, &body)
            }
            Ok(_) => wire::encode(abi::XS_ERROR, hdr.req_id, hdr.tx_id, b"E2BIG\0"),
            Err(errno) => {
                let name = wire::error_name(errno);
                wire::encode(
                    abi::XS_ERROR,
                    hdr.req_id,
                    hdr.tx_id,
                    &wire::join_strings(&[name]),
                )
            }
        };
        // The reply goes first, then the events the request caused (the
        // caller's own included: WATCH's initial event must follow its OK).
        if let Ok(m) = reply {
            out.insert(0, (id, m));
        }
        out
    }

    fn tree_op(
        &mut self,
        id: ConnId,
        hdr: Header,
        payload: &[u8],
        op: TreeOp,
        out: &mut Outbox,
    ) -> OpResult {
        let caller = self.caller(id);
        let mut changes = Vec::new();
        if hdr.tx_id == 0 {
            let r = op(
                &mut self.tree,
                &caller,
                payload,
                &mut self.gen,
                &mut changes,
            );
            if r.is_ok() {
                for c in &changes {
                    self.fire(c, out);
                }
            }
            r
        } else {
            let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
            let mut tx = conn.transactions.remove(&hdr.tx_id).ok_or(libc::ENOENT)?;
            let r = op(&mut tx.tree, &caller, payload, &mut self.gen, &mut changes);
            if r.is_ok() {
                tx.changes.extend(changes);
            }
            conn.transactions.insert(hdr.tx_id, tx);
            r
        }
    }

    fn require_priv(&self, id: ConnId) -> Result<(), i32> {
        if self.caller(id).privileged() {
            Ok(())
        } else {
            Err(libc::EACCES)
        }
    }

    fn dispatch(&mut self, id: ConnId, hdr: Header, p: &[u8], out: &mut Outbox) -> OpResult {
        match hdr.ty {
            abi::XS_READ => self.tree_op(id, hdr, p, op_read, out),
            abi::XS_DIRECTORY => self.tree_op(id, hdr, p, op_directory, out),
            abi::XS_DIRECTORY_PART => self.tree_op(id, hdr, p, op_directory_part, out),
            abi::XS_GET_PERMS => {
                let c = self.caller(id);
                let raw = onearg(p)?;
                if raw.first() == Some(&b'@') {
                    let name = canonicalize(&c, raw, true)?;
                    let perms = self.special(&name)?;
                    if !rights(&c, &perms).read {
                        return Err(libc::EACCES);
                    }
                    return Ok(wire::join_strings(&perms.to_strings()));
                }
                self.tree_op(id, hdr, p, op_get_perms, out)
            }
            abi::XS_WRITE => self.tree_op(id, hdr, p, op_write, out),
            abi::XS_MKDIR => self.tree_op(id, hdr, p, op_mkdir, out),
            abi::XS_RM => self.tree_op(id, hdr, p, op_rm, out),
            abi::XS_SET_PERMS => {
                let c = self.caller(id);
                if p.first() == Some(&b'@') {
                    let (name, perms) = parse_set_perms(&c, p)?;
                    let old = self.special(&name)?;
                    let r = rights(&c, &old);
                    if !(r.write && r.owner) {
                        return Err(libc::EACCES);
                    }
                    if !c.privileged() && perms.owner != old.owner {
                        return Err(libc::EPERM);
                    }
                    if let Some(slot) = self.special_perms.get_mut(name.as_str()) {
                        *slot = perms;
                    }
                    return Ok(OK.to_vec());
                }
                self.tree_op(id, hdr, p, op_set_perms, out)
            }
            abi::XS_WATCH => self.do_watch(id, p, out),
            abi::XS_UNWATCH => self.do_unwatch(id, p),
            abi::XS_RESET_WATCHES => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.watches.clear();
                    c.transactions.clear();
                }
                Ok(OK.to_vec())
            }
            abi::XS_TRANSACTION_START => self.do_transaction_start(id, hdr),
            abi::XS_TRANSACTION_END => self.do_transaction_end(id, hdr, p, out),
            abi::XS_INTRODUCE => self.do_introduce(id, p, out),
            abi::XS_RELEASE => self.do_release(id, p, out),
            abi::XS_RESUME => {
                self.require_priv(id)?;
                let d = parse_domid(onearg(p)?)?;
                match self.domains.get(&d) {
                    Some(dom) if dom.introduced => Ok(OK.to_vec()),
                    _ => Err(libc::ENOENT),
                }
            }
            abi::XS_SET_TARGET => {
                self.require_priv(id)?;
                let a = nargs(p, 2)?;
                let (d, t) = (parse_domid(a[0])?, parse_domid(a[1])?);
                for x in [d, t] {
                    if !self.domains.get(&x).is_some_and(|dom| dom.introduced) {
                        return Err(libc::ENOENT);
                    }
                }
                if let Some(dom) = self.domains.get_mut(&d) {
                    dom.target = Some(t);
                }
                Ok(OK.to_vec())
            }
            abi::XS_IS_DOMAIN_INTRODUCED => {
                self.require_priv(id)?;
                let d = parse_domid(onearg(p)?)?;
                let yes = self.domains.get(&d).is_some_and(|dom| dom.introduced);
                Ok(if yes {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                })
            }
            abi::XS_GET_DOMAIN_PATH => {
                let d: u16 = parse_num(onearg(p)?)?;
                Ok(wire::join_strings(&[format!("/local/domain/{d}")]))
            }
            abi::XS_CONTROL => self.do_control(id, p),
            _ => Err(libc::ENOSYS),
        }
    }

    fn special(&self, name: &str) -> Result<Permissions, i32> {
        self.special_perms.get(name).cloned().ok_or(libc::ENOENT)
    }

    fn do_watch(&mut self, id: ConnId, p: &[u8], out: &mut Outbox) -> OpResult {
        let caller = self.caller(id);
        let a = nargs(p, 2)?;
        let node = canonicalize(&caller, a[0], true)?;
        let relative = a[0].first() != Some(&b'/') && a[0].first() != Some(&b'@');
        let token = a[1].to_vec();
        let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
        if conn
            .watches
            .iter()
            .any(|w| w.node == node && w.token == token)
        {
            return Err(libc::EEXIST);
        }
        let limit = if caller.privileged() {
            PRIV_MAX_WATCHES
        } else {
            QUOTA_WATCHES
        };
        if conn.watches.len() >= limit {
            return Err(libc::E2BIG);
        }
        // The watch fires once straight away (after the reply).
        let shown = String::from_utf8_lossy(a[0]).into_owned();
        if let Some(f) = event_frame(&shown, &token) {
            out.push((id, f));
        }
        conn.watches.push(Watch {
            node,
            token,
            relative,
        });
        Ok(OK.to_vec())
    }

    fn do_unwatch(&mut self, id: ConnId, p: &[u8]) -> OpResult {
        let caller = self.caller(id);
        let a = nargs(p, 2)?;
        let node = canonicalize(&caller, a[0], true)?;
        let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
        let before = conn.watches.len();
        conn.watches
            .retain(|w| !(w.node == node && w.token == a[1]));
        if conn.watches.len() == before {
            return Err(libc::ENOENT);
        }
        Ok(OK.to_vec())
    }

    fn do_transaction_start(&mut self, id: ConnId, hdr: Header) -> OpResult {
        if hdr.tx_id != 0 {
            return Err(libc::EBUSY);
        }
        let privileged = self.caller(id).privileged();
        let snapshot = self.tree.snapshot();
        let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
        let limit = if privileged {
            PRIV_MAX_TRANSACTIONS
        } else {
            QUOTA_TRANSACTIONS
        };
        if conn.transactions.len() >= limit {
            return Err(libc::ENOSPC);
        }
        let mut txid = conn.next_tx;
        while txid == 0 || conn.transactions.contains_key(&txid) {
            txid = txid.wrapping_add(1);
        }
        conn.next_tx = txid.wrapping_add(1);
        conn.transactions.insert(
            txid,
            Transaction {
                tree: snapshot,
                changes: Vec::new(),
            },
        );
        Ok(wire::join_strings(&[txid.to_string()]))
    }

    fn do_transaction_end(
        &mut self,
        id: ConnId,
        hdr: Header,
        p: &[u8],
        out: &mut Outbox,
    ) -> OpResult {
        let commit = match onearg(p)? {
            b"T" => true,
            b"F" => false,
            _ => return Err(libc::EINVAL),
        };
        let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
        let tx = conn.transactions.remove(&hdr.tx_id).ok_or(libc::ENOENT)?;
        if !commit {
            return Ok(OK.to_vec());
        }
        self.tree.commit(tx.tree, &mut self.gen)?;
        for c in &tx.changes {
            self.fire(c, out);
        }
        Ok(OK.to_vec())
    }

    fn do_introduce(&mut self, id: ConnId, p: &[u8], out: &mut Outbox) -> OpResult {
        self.require_priv(id)?;
        let (a, _) = wire::split_strings(p);
        if a.len() < 3 {
            return Err(libc::EINVAL);
        }
        let d = parse_domid(a[0])?;
        let _mfn: i64 = parse_num(a[1])?;
        let _port: u32 = parse_num(a[2])?;
        let dom = self.domains.entry(d).or_default();
        if !dom.introduced {
            dom.introduced = true;
            self.fire(&Change::Special(SPECIAL_INTRODUCE), out);
        }
        Ok(OK.to_vec())
    }

    fn do_release(&mut self, id: ConnId, p: &[u8], out: &mut Outbox) -> OpResult {
        self.require_priv(id)?;
        let d = parse_domid(onearg(p)?)?;
        if d == 0 {
            return Err(libc::EINVAL);
        }
        match self.domains.get_mut(&d) {
            Some(dom) if dom.introduced => {
                dom.introduced = false;
                dom.target = None;
            }
            _ => return Err(libc::ENOENT),
        }
        self.fire(&Change::Special(SPECIAL_RELEASE), out);
        Ok(OK.to_vec())
    }

    fn do_control(&mut self, id: ConnId, p: &[u8]) -> OpResult {
        self.require_priv(id)?;
        let (a, _) = wire::split_strings(p);
        let cmd = a.first().copied().ok_or(libc::EINVAL)?;
        match cmd {
            b"sim-as-domain" => {
                let d = parse_domid(a.get(1).copied().ok_or(libc::EINVAL)?)?;
                if d == 0 {
                    return Err(libc::EINVAL);
                }
                let conn = self.conns.get_mut(&id).ok_or(libc::EINVAL)?;
                if !conn.transactions.is_empty() {
                    return Err(libc::EBUSY);
                }
                conn.domid = d;
                conn.watches.clear();
                log::debug!("xenstored: connection {id} now acts as domain {d}");
                Ok(OK.to_vec())
            }
            b"print" => {
                let msg: Vec<String> = a[1..]
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                log::info!("xenstored: {}", msg.join(" "));
                Ok(OK.to_vec())
            }
            b"check" | b"log" => Ok(OK.to_vec()),
            b"help" => Ok(b"check\nlog\nprint\nhelp\nsim-as-domain\n\0".to_vec()),
            _ => Err(libc::EINVAL),
        }
    }

    /// Queue watch events for a change on every matching watch.
    fn fire(&self, change: &Change, out: &mut Outbox) {
        for (&cid, conn) in &self.conns {
            let watcher = Caller {
                domid: conn.domid,
                target: self.domains.get(&conn.domid).and_then(|d| d.target),
            };
            let may_see = |perms: &[Permissions]| {
                watcher.privileged() || perms.iter().any(|p| rights(&watcher, p).read)
            };
            for w in &conn.watches {
                let epath: Option<&str> = match change {
                    Change::Special(name) => {
                        let visible = self
                            .special_perms
                            .get(name)
                            .is_some_and(|p| may_see(std::slice::from_ref(p)));
                        (w.node == *name && visible).then_some(*name)
                    }
                    Change::Modify { path, perms } => {
                        (is_child(path, &w.node) && may_see(perms)).then_some(path.as_str())
                    }
                    Change::Remove { path, removed } => {
                        let root_perms: Vec<Permissions> = removed
                            .first()
                            .map(|(_, p)| p.clone())
                            .into_iter()
                            .collect();
                        if is_child(path, &w.node) {
                            may_see(&root_perms).then_some(path.as_str())
                        } else if is_child(&w.node, path) {
                            let perms: Vec<Permissions> = removed
                                .iter()
                                .find(|(p, _)| *p == w.node)
                                .map(|(_, p)| vec![p.clone()])
                                .unwrap_or(root_perms);
                            may_see(&perms).then_some(w.node.as_str())
                        } else {
                            None
                        }
                    }
                };
                let Some(epath) = epath else { continue };
                let shown = if w.relative {
                    store::relative_part(epath).unwrap_or(epath)
                } else {
                    epath
                };
                if let Some(f) = event_frame(shown, &w.token) {
                    out.push((cid, f));
                }
            }
        }
    }
}
