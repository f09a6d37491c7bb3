//! The node tree of the simulated xenstored: values, permissions, children in
//! creation order, and a generation number per node (bumped on every change)
//! that transactions use to detect conflicts.

use std::collections::{HashMap, HashSet};

use xen_sys::xs_wire::{XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX};

use refblk_core::xenstore::wire::{Access, Permissions};

/// Who is asking: dom0 (privileged) or a domain, possibly with a target.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    pub domid: u16,
    pub target: Option<u16>,
}

impl Caller {
    pub fn privileged(&self) -> bool {
        self.domid == 0
    }

    /// `/local/domain/<domid>`, the base of relative paths.
    pub fn home(&self) -> String {
        format!("/local/domain/{}", self.domid)
    }
}

/// What a caller may do with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rights {
    pub read: bool,
    pub write: bool,
    pub owner: bool,
}

/// xenstored's rule: dom0 and the owner (or a domain targeting the owner) get
/// everything; otherwise the first ACL entry naming the caller (or its
/// target); otherwise the "others" access of the owner entry.
pub(super) fn rights(c: &Caller, p: &Permissions) -> Rights {
    let is = |d: u16| d == c.domid || c.target == Some(d);
    if c.privileged() || is(p.owner) {
        return Rights {
            read: true,
            write: true,
            owner: true,
        };
    }
    let a = p
        .acl
        .iter()
        .find(|e| is(e.domid))
        .map(|e| e.access)
        .unwrap_or(p.others);
    Rights {
        read: a.can_read(),
        write: a.can_write(),
        owner: false,
    }
}

/// Canonicalize and validate a path from the wire: allowed characters
/// (alphanumerics and `-/_@`), relative paths under the caller's home, no
/// trailing or doubled slashes, length limits. Special `@...` names are
/// returned as they are when `allow_special`.
pub(super) fn canonicalize(c: &Caller, raw: &[u8], allow_special: bool) -> Result<String, i32> {
    let ok_char = |b: &u8| b.is_ascii_alphanumeric() || b"-/_@".contains(b);
    if raw.is_empty() || !raw.iter().all(ok_char) {
        return Err(libc::EINVAL);
    }
    // All bytes are ASCII now.
    let s = String::from_utf8_lossy(raw).into_owned();
    if s.starts_with('@') {
        return if allow_special && s.len() <= XENSTORE_ABS_PATH_MAX {
            Ok(s)
        } else {
            Err(libc::EINVAL)
        };
    }
    let name = if s.starts_with('/') {
        s
    } else {
        format!("{}/{}", c.home(), s)
    };
    if (name.ends_with('/') && name != "/") || name.contains("//") {
        return Err(libc::EINVAL);
    }
    if name.len() > XENSTORE_ABS_PATH_MAX {
        return Err(libc::EINVAL);
    }
    if let Some(rel) = relative_part(&name) {
        if rel.len() > XENSTORE_REL_PATH_MAX {
            return Err(libc::EINVAL);
        }
    }
    Ok(name)
}

/// The part after `/local/domain/<N>/`, if the path is in a domain's home.
pub(super) fn relative_part(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/local/domain/")?;
    let slash = rest.find('/')?;
    let (dom, tail) = rest.split_at(slash);
    if dom.is_empty() || dom.len() > 5 || !dom.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(&tail[1..])
}

/// `child` is `parent` or below it.
pub(super) fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    match child.strip_prefix(parent) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The parent path ("/" has none).
pub(super) fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub value: Vec<u8>,
    pub perms: Permissions,
    pub children: Vec<String>,
    pub gen: u64,
}

/// The tree. The global store has no access log; a transaction's private copy
/// records the generation of every node it touches (at first touch) and the
/// set of nodes it changed.
#[derive(Debug, Clone)]
pub(super) struct Tree {
    nodes: HashMap<String, Node>,
    accessed: Option<HashMap<String, Option<u64>>>,
    dirty: Option<HashSet<String>>,
}

impl Tree {
    /// The initial store of xenstored: `/`, `/tool`, `/tool/xenstored`, owned
    /// by dom0 with no access for others.
    pub fn new(gen: &mut u64) -> Tree {
        let mut t = Tree {
            nodes: HashMap::new(),
            accessed: None,
            dirty: None,
        };
        *gen += 1;
        t.nodes.insert(
            "/".into(),
            Node {
                value: Vec::new(),
                perms: Permissions::new(0, Access::None),
                children: Vec::new(),
                gen: *gen,
            },
        );
        let dom0 = Caller {
            domid: 0,
            target: None,
        };
        t.create("/tool/xenstored", Vec::new(), &dom0, gen);
        t
    }

    /// A private copy for a transaction.
    pub fn snapshot(&self) -> Tree {
        Tree {
            nodes: self.nodes.clone(),
            accessed: Some(HashMap::new()),
            dirty: Some(HashSet::new()),
        }
    }

    fn touch(&mut self, path: &str) {
        if let Some(acc) = &mut self.accessed {
            if !acc.contains_key(path) {
                acc.insert(path.to_string(), self.nodes.get(path).map(|n| n.gen));
            }
        }
    }

    fn mark(&mut self, path: &str, gen: &mut u64) {
        *gen += 1;
        if let Some(n) = self.nodes.get_mut(path) {
            n.gen = *gen;
        }
        if let Some(d) = &mut self.dirty {
            d.insert(path.to_string());
        }
    }

    /// Look a node up (recorded as an access in a transaction).
    pub fn get(&mut self, path: &str) -> Option<&Node> {
        self.touch(path);
        self.nodes.get(path)
    }

    /// The nearest existing proper ancestor of `path`.
    pub fn existing_ancestor(&mut self, path: &str) -> Option<String> {
        let mut p = parent_of(path)?.to_string();
        loop {
            if self.get(&p).is_some() {
                return Some(p);
            }
            p = parent_of(&p)?.to_string();
        }
    }

    /// Create `path` (and missing parents) with `value`. New nodes inherit the
    /// parent's permissions; an unprivileged creator becomes their owner.
    /// Returns the paths created, topmost first. The caller checked that the
    /// node does not exist.
    pub fn create(&mut self, path: &str, value: Vec<u8>, c: &Caller, gen: &mut u64) -> Vec<String> {
        let mut missing = vec![path.to_string()];
        let mut cur = path.to_string();
        let mut parent = loop {
            let Some(p) = parent_of(&cur) else {
                // Only "/" has no parent and it always exists.
                return Vec::new();
            };
            let p = p.to_string();
            if self.get(&p).is_some() {
                break p;
            }
            missing.push(p.clone());
            cur = p;
        };
        missing.reverse();
        let n = missing.len();
        for (i, name) in missing.iter().enumerate() {
            self.touch(name);
            self.touch(&parent);
            let mut perms = self.nodes[&parent].perms.clone();
            if !c.privileged() {
                perms.owner = c.domid;
            }
            if let Some(p) = self.nodes.get_mut(&parent) {
                p.children.push(basename(name).to_string());
            }
            self.mark(&parent, gen);
            self.nodes.insert(
                name.clone(),
                Node {
                    value: if i + 1 == n {
                        value.clone()
                    } else {
                        Vec::new()
                    },
                    perms,
                    children: Vec::new(),
                    gen: 0,
                },
            );
            self.mark(name, gen);
            parent = name.clone();
        }
        missing
    }

    /// Replace an existing node's value.
    pub fn set_value(&mut self, path: &str, value: Vec<u8>, gen: &mut u64) {
        self.touch(path);
        if let Some(n) = self.nodes.get_mut(path) {
            n.value = value;
        }
        self.mark(path, gen);
    }

    /// Replace an existing node's permissions.
    pub fn set_perms(&mut self, path: &str, perms: Permissions, gen: &mut u64) {
        self.touch(path);
        if let Some(n) = self.nodes.get_mut(path) {
            n.perms = perms;
        }
        self.mark(path, gen);
    }

    /// Remove an existing node (not "/") and its subtree; returns the removed
    /// paths with their permissions, the node itself first.
    pub fn remove(&mut self, path: &str, gen: &mut u64) -> Vec<(String, Permissions)> {
        let mut removed = Vec::new();
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            self.touch(&p);
            if let Some(n) = self.nodes.remove(&p) {
                if let Some(d) = &mut self.dirty {
                    d.insert(p.clone());
                }
                for ch in &n.children {
                    stack.push(if p == "/" {
                        format!("/{ch}")
                    } else {
                        format!("{p}/{ch}")
                    });
                }
                removed.push((p, n.perms));
            }
        }
        if let Some(parent) = parent_of(path) {
            let parent = parent.to_string();
            self.touch(&parent);
            let base = basename(path);
            if let Some(n) = self.nodes.get_mut(&parent) {
                n.children.retain(|c| c != base);
            }
            self.mark(&parent, gen);
        }
        removed
    }

    /// Number of nodes owned by `domid` (quota accounting).
    pub fn owned_by(&self, domid: u16) -> usize {
        self.nodes
            .values()
            .filter(|n| n.perms.owner == domid)
            .count()
    }

    /// Apply a committed transaction's tree to this (global) tree. Fails with
    /// `EAGAIN` if any node the transaction touched changed meanwhile.
    pub fn commit(&mut self, tx: Tree, gen: &mut u64) -> Result<(), i32> {
        let Tree {
            mut nodes,
            accessed,
            dirty,
        } = tx;
        for (p, g) in accessed.iter().flatten() {
            if self.nodes.get(p).map(|n| n.gen) != *g {
                return Err(libc::EAGAIN);
            }
        }
        for p in dirty.into_iter().flatten() {
            match nodes.remove(&p) {
                Some(mut n) => {
                    *gen += 1;
                    n.gen = *gen;
                    self.nodes.insert(p, n);
                }
                None => {
                    self.nodes.remove(&p);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM0: Caller = Caller {
        domid: 0,
        target: None,
    };

    #[test]
    fn paths() {
        let d3 = Caller {
            domid: 3,
            target: None,
        };
        assert_eq!(
            canonicalize(&d3, b"x/y", false).unwrap(),
            "/local/domain/3/x/y"
        );
        assert_eq!(canonicalize(&DOM0, b"/", false).unwrap(), "/");
        for bad in [
            &b""[..],
            b"/a/",
            b"/a//b",
            b"/a b",
            b"/a\xff",
            b"/a.b",
            b"@x",
        ] {
            assert_eq!(
                canonicalize(&DOM0, bad, false),
                Err(libc::EINVAL),
                "{bad:?}"
            );
        }
        assert_eq!(
            canonicalize(&DOM0, b"@releaseDomain", true).unwrap(),
            "@releaseDomain"
        );
        let long = vec![b'a'; 3100];
        let mut p = b"/".to_vec();
        p.extend_from_slice(&long);
        assert_eq!(canonicalize(&DOM0, &p, false), Err(libc::EINVAL));
        let rel = vec![b'a'; 2049];
        assert_eq!(canonicalize(&d3, &rel, false), Err(libc::EINVAL));
        assert!(is_child("/a/b", "/a") && is_child("/a", "/a") && is_child("/a", "/"));
        assert!(!is_child("/ab", "/a"));
        assert_eq!(parent_of("/a"), Some("/"));
        assert_eq!(parent_of("/a/b"), Some("/a"));
        assert_eq!(relative_part("/local/domain/7/x/y"), Some("x/y"));
        assert_eq!(relative_part("/local/domain/x/y"), None);
    }

    #[test]
    fn create_inherits_and_remove_recurses() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        let d5 = Caller {
            domid: 5,
            target: None,
        };
        t.create("/a", vec![], &DOM0, &mut g);
        t.set_perms(
            "/a",
            Permissions::new(0, Access::None).with(5, Access::Both),
            &mut g,
        );
        let made = t.create("/a/b/c", b"v".to_vec(), &d5, &mut g);
        assert_eq!(made, vec!["/a/b", "/a/b/c"]);
        let c = t.get("/a/b/c").unwrap().clone();
        assert_eq!(c.value, b"v");
        assert_eq!(c.perms.owner, 5);
        assert_eq!(t.get("/a").unwrap().children, vec!["b"]);
        let removed = t.remove("/a/b", &mut g);
        assert_eq!(removed.len(), 2);
        assert!(t.get("/a/b/c").is_none());
        assert!(t.get("/a").unwrap().children.is_empty());
    }

    #[test]
    fn commit_detects_conflicts() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        t.create("/x", b"1".to_vec(), &DOM0, &mut g);
        let mut tx = t.snapshot();
        assert_eq!(tx.get("/x").unwrap().value, b"1");
        tx.set_value("/x", b"2".to_vec(), &mut g);
        let tx2 = tx.clone();
        t.commit(tx, &mut g).unwrap();
        assert_eq!(t.get("/x").unwrap().value, b"2");
        // tx2 read /x at its old generation; the commit above changed it.
        assert_eq!(t.commit(tx2, &mut g), Err(libc::EAGAIN));
    }

    #[test]
    fn rights_follow_owner_and_acl() {
        let p = Permissions::new(4, Access::Read)
            .with(6, Access::None)
            .with(7, Access::Write);
        let c = |d| Caller {
            domid: d,
            target: None,
        };
        assert!(rights(&c(4), &p).owner);
        assert!(rights(&c(0), &p).write);
        assert_eq!(
            rights(&c(5), &p),
            Rights {
                read: true,
                write: false,
                owner: false
            }
        );
        assert!(!rights(&c(6), &p).read);
        assert!(rights(&c(7), &p).write && !rights(&c(7), &p).read);
        let dm = Caller {
            domid: 9,
            target: Some(4),
        };
        assert!(rights(&dm, &p).owner);
    }
}
