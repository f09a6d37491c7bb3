//! The simulated xenstored through the refblk client: every message type,
//! watch semantics, transactions, domU permissions.

use std::time::Duration;

use refblk_core::xenstore::{Access, Permissions, WatchEvent, XsClient, XsError, XBT_NULL};
use refblk_sim::xenstored::Xenstored;

/// A bound that turns a hang into a failure, not a speed target: a loaded
/// machine must never reach it.
const T: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_millis(200);

fn daemon() -> (tempfile::TempDir, Xenstored) {
    let dir = tempfile::tempdir().expect("tempdir");
    let xs = Xenstored::spawn(&dir.path().join("xenstored.sock")).expect("spawn xenstored");
    (dir, xs)
}

fn ev(c: &XsClient) -> WatchEvent {
    c.events().recv_timeout(T).expect("expected a watch event")
}

fn no_event(c: &XsClient) {
    if let Ok(e) = c.events().recv_timeout(QUIET) {
        panic!("unexpected watch event {e:?}");
    }
}

fn we(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

fn name(e: XsError) -> String {
    e.name().unwrap_or("not a xenstore error").to_string()
}

#[test]
fn read_write_mkdir_rm_directory() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    c.write(XBT_NULL, "/a/b/c", b"hello").unwrap();
    assert_eq!(c.read(XBT_NULL, "/a/b/c").unwrap(), b"hello");
    assert_eq!(
        c.read_string(XBT_NULL, "/a/b").unwrap(),
        "",
        "implicit parent is empty"
    );
    // Binary values, including NULs, round-trip.
    c.write(XBT_NULL, "/a/bin", b"x\0y\xff").unwrap();
    assert_eq!(c.read(XBT_NULL, "/a/bin").unwrap(), b"x\0y\xff");
    assert!(c.read_string(XBT_NULL, "/a/bin").is_err());
    // Overwrite.
    c.write(XBT_NULL, "/a/b/c", b"bye").unwrap();
    assert_eq!(c.read_string(XBT_NULL, "/a/b/c").unwrap(), "bye");
    // Directory keeps creation order.
    c.mkdir(XBT_NULL, "/a/z").unwrap();
    c.mkdir(XBT_NULL, "/a/m").unwrap();
    assert_eq!(c.directory(XBT_NULL, "/a").unwrap(), ["b", "bin", "z", "m"]);
    assert!(c.directory(XBT_NULL, "/a/z").unwrap().is_empty());
    // mkdir of an existing node keeps its value.
    c.mkdir(XBT_NULL, "/a/b/c").unwrap();
    assert_eq!(c.read_string(XBT_NULL, "/a/b/c").unwrap(), "bye");
    // Root content as xenstored creates it.
    assert!(c
        .directory(XBT_NULL, "/")
        .unwrap()
        .contains(&"tool".to_string()));
    // rm is recursive; removing a missing node with an existing parent is ok.
    c.rm(XBT_NULL, "/a/b").unwrap();
    assert!(c.read(XBT_NULL, "/a/b/c").unwrap_err().is_enoent());
    assert!(c.read(XBT_NULL, "/a/b").unwrap_err().is_enoent());
    c.rm(XBT_NULL, "/a/b").unwrap();
    assert!(c.rm(XBT_NULL, "/nope/x").unwrap_err().is_enoent());
    assert_eq!(name(c.rm(XBT_NULL, "/").unwrap_err()), "EINVAL");
    assert!(!c.exists(XBT_NULL, "/a/b").unwrap());
    assert!(c.exists(XBT_NULL, "/a").unwrap());
    assert_eq!(c.try_read_string(XBT_NULL, "/a/none").unwrap(), None);
    // Relative paths of a dom0 socket connection live under /local/domain/0.
    c.write(XBT_NULL, "rel/key", b"1").unwrap();
    assert_eq!(
        c.read_string(XBT_NULL, "/local/domain/0/rel/key").unwrap(),
        "1"
    );
}

#[test]
fn path_validation() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    for bad in ["/a/", "/a//b", "/a b", "/a.b", "/ä", "@foo", ""] {
        let e = c.write(XBT_NULL, bad, b"v").unwrap_err();
        assert_eq!(name(e), "EINVAL", "path {bad:?}");
    }
    let long = format!("/{}", "a".repeat(3072));
    assert!(c.write(XBT_NULL, &long, b"").unwrap_err().is_einval());
    let ok = format!("/{}", "a".repeat(3071));
    c.write(XBT_NULL, &ok, b"").unwrap();
    c.write(XBT_NULL, "/Aa0-_@x", b"v").unwrap();
}

#[test]
fn large_directory_falls_back_to_directory_part() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    let names: Vec<String> = (0..400)
        .map(|i| format!("child-with-a-long-name-{i:04}"))
        .collect();
    c.transaction(|tx| {
        for n in &names {
            c.mkdir(tx, &format!("/big/{n}"))?;
        }
        Ok(())
    })
    .unwrap();
    // 400 * 28 bytes > 4096: DIRECTORY answers E2BIG, the client pages.
    assert_eq!(c.directory(XBT_NULL, "/big").unwrap(), names);
    assert_eq!(c.directory_part(XBT_NULL, "/big").unwrap(), names);
    c.mkdir(XBT_NULL, "/small/x").unwrap();
    assert_eq!(c.directory_part(XBT_NULL, "/small").unwrap(), ["x"]);
    c.mkdir(XBT_NULL, "/empty").unwrap();
    assert!(c.directory_part(XBT_NULL, "/empty").unwrap().is_empty());
}

#[test]
fn permissions_get_set() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    c.write(XBT_NULL, "/p/q", b"v").unwrap();
    assert_eq!(
        c.get_perms(XBT_NULL, "/p/q").unwrap(),
        Permissions::new(0, Access::None)
    );
    let p = Permissions::new(3, Access::Read).with(5, Access::Both);
    c.set_perms(XBT_NULL, "/p", &p).unwrap();
    assert_eq!(c.get_perms(XBT_NULL, "/p").unwrap(), p);
    // New children inherit the parent's permissions.
    c.write(XBT_NULL, "/p/new", b"").unwrap();
    assert_eq!(c.get_perms(XBT_NULL, "/p/new").unwrap(), p);
    assert!(c.get_perms(XBT_NULL, "/p/none").unwrap_err().is_enoent());
    assert!(c
        .set_perms(XBT_NULL, "/p/none", &Permissions::new(0, Access::None))
        .unwrap_err()
        .is_enoent());
    // Special nodes have permissions too.
    let rel = Permissions::new(0, Access::None).with(7, Access::Read);
    c.set_perms(XBT_NULL, "@releaseDomain", &rel).unwrap();
    assert_eq!(c.get_perms(XBT_NULL, "@releaseDomain").unwrap(), rel);
    assert!(c.get_perms(XBT_NULL, "@other").unwrap_err().is_enoent());
}

#[test]
fn watch_fires_initially_recursively_and_on_rm_and_perms() {
    let (_d, xs) = daemon();
    let w = xs.client().unwrap();
    let c = xs.client().unwrap();
    w.watch("/w", "tok1").unwrap();
    assert_eq!(ev(&w), we("/w", "tok1"), "initial fire");
    no_event(&w);
    c.write(XBT_NULL, "/w/a/b", b"1").unwrap();
    assert_eq!(ev(&w), we("/w/a/b", "tok1"));
    c.write(XBT_NULL, "/other", b"1").unwrap();
    c.write(XBT_NULL, "/wx", b"1").unwrap();
    no_event(&w);
    c.mkdir(XBT_NULL, "/w/m").unwrap();
    assert_eq!(ev(&w), we("/w/m", "tok1"));
    c.mkdir(XBT_NULL, "/w/m").unwrap();
    no_event(&w);
    c.set_perms(XBT_NULL, "/w/m", &Permissions::new(0, Access::Read))
        .unwrap();
    assert_eq!(ev(&w), we("/w/m", "tok1"));
    // A second watch below, with another token.
    w.watch("/w/a/b", "deep").unwrap();
    assert_eq!(ev(&w), we("/w/a/b", "deep"));
    // Duplicate path+token is refused.
    assert!(w.watch("/w/a/b", "deep").unwrap_err().is_eexist());
    // Removing the parent fires the watch above with the removed path and the
    // watch below with its own path.
    c.rm(XBT_NULL, "/w/a").unwrap();
    let mut got = vec![ev(&w), ev(&w)];
    got.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(got, [we("/w/a/b", "deep"), we("/w/a", "tok1")]);
    // Unwatch.
    w.unwatch("/w/a/b", "deep").unwrap();
    assert!(w.unwatch("/w/a/b", "deep").unwrap_err().is_enoent());
    c.write(XBT_NULL, "/w/a/b", b"2").unwrap();
    assert_eq!(ev(&w), we("/w/a/b", "tok1"));
    no_event(&w);
    // Reset removes every watch.
    w.reset_watches().unwrap();
    c.write(XBT_NULL, "/w/x", b"3").unwrap();
    no_event(&w);
    // Watches belong to their connection only.
    no_event(&c);
}

#[test]
fn watch_on_root_and_relative_watch() {
    let (_d, xs) = daemon();
    let w = xs.client().unwrap();
    w.watch("/", "all").unwrap();
    assert_eq!(ev(&w), we("/", "all"));
    w.write(XBT_NULL, "/x/y", b"").unwrap();
    assert_eq!(ev(&w), we("/x/y", "all"));
    w.unwatch("/", "all").unwrap();
    // A relative watch reports relative paths.
    w.watch("dev", "rel").unwrap();
    assert_eq!(ev(&w), we("dev", "rel"));
    w.write(XBT_NULL, "/local/domain/0/dev/vbd", b"1").unwrap();
    assert_eq!(ev(&w), we("dev/vbd", "rel"));
}

#[test]
fn transactions_commit_abort_and_conflict() {
    let (_d, xs) = daemon();
    let a = xs.client().unwrap();
    let b = xs.client().unwrap();
    a.write(XBT_NULL, "/t/x", b"0").unwrap();
    a.watch("/t", "t").unwrap();
    assert_eq!(ev(&a), we("/t", "t"));

    // Commit: invisible until the end, watches fire on commit only.
    let tx = a.transaction_start().unwrap();
    assert_ne!(tx, 0);
    a.write(tx, "/t/x", b"1").unwrap();
    a.write(tx, "/t/new/deep", b"n").unwrap();
    assert_eq!(a.read_string(tx, "/t/x").unwrap(), "1");
    assert_eq!(b.read_string(XBT_NULL, "/t/x").unwrap(), "0");
    assert!(b.read(XBT_NULL, "/t/new/deep").unwrap_err().is_enoent());
    no_event(&a);
    a.transaction_end(tx, true).unwrap();
    let mut paths = vec![ev(&a).path, ev(&a).path];
    paths.sort();
    assert_eq!(paths, ["/t/new/deep", "/t/x"]);
    assert_eq!(b.read_string(XBT_NULL, "/t/x").unwrap(), "1");
    assert_eq!(b.read_string(XBT_NULL, "/t/new/deep").unwrap(), "n");
    // The id is gone after the end.
    assert!(a.transaction_end(tx, true).unwrap_err().is_enoent());
    assert!(a.read(tx, "/t/x").unwrap_err().is_enoent());
    assert!(a.transaction_end(0, true).unwrap_err().is_enoent());

    // Abort: nothing happens.
    let tx = a.transaction_start().unwrap();
    a.rm(tx, "/t/x").unwrap();
    a.transaction_end(tx, false).unwrap();
    assert_eq!(a.read_string(XBT_NULL, "/t/x").unwrap(), "1");
    no_event(&a);

    // Conflict: b changes a node a's transaction read.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read_string(tx, "/t/x").unwrap(), "1");
    a.write(tx, "/t/y", b"from-a").unwrap();
    b.write(XBT_NULL, "/t/x", b"2").unwrap();
    assert_eq!(ev(&a).path, "/t/x");
    let e = a.transaction_end(tx, true).unwrap_err();
    assert!(e.is_eagain(), "{e}");
    assert!(a.read(XBT_NULL, "/t/y").unwrap_err().is_enoent());
    no_event(&a);

    // Two transactions creating siblings conflict on the parent.
    let t1 = a.transaction_start().unwrap();
    let t2 = b.transaction_start().unwrap();
    a.write(t1, "/t/s1", b"").unwrap();
    b.write(t2, "/t/s2", b"").unwrap();
    a.transaction_end(t1, true).unwrap();
    assert!(b.transaction_end(t2, true).unwrap_err().is_eagain());
    // Unrelated nodes don't conflict.
    let t1 = a.transaction_start().unwrap();
    a.write(t1, "/t/s1", b"v").unwrap();
    b.write(XBT_NULL, "/elsewhere", b"v").unwrap();
    a.transaction_end(t1, true).unwrap();
    // An unknown transaction id is refused.
    let bad = a.transaction_end(12345, true).unwrap_err();
    assert!(bad.is_enoent());
}

#[test]
fn transaction_helper_retries_on_eagain() {
    let (_d, xs) = daemon();
    let a = xs.client().unwrap();
    let b = xs.client().unwrap();
    a.write(XBT_NULL, "/ctr", b"0").unwrap();
    let mut attempts = 0;
    a.transaction(|tx| {
        attempts += 1;
        let v: u32 = a.read_string(tx, "/ctr")?.parse().unwrap();
        if attempts == 1 {
            // Someone else bumps the counter meanwhile: the commit conflicts.
            b.write(XBT_NULL, "/ctr", b"10").unwrap();
        }
        a.write(tx, "/ctr", (v + 1).to_string().as_bytes())
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(a.read_string(XBT_NULL, "/ctr").unwrap(), "11");
    // Concurrent increments from several threads never lose an update.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let c = xs.client().unwrap();
                for _ in 0..10 {
                    c.transaction(|tx| {
                        let v: u32 = c.read_string(tx, "/ctr")?.parse().unwrap();
                        c.write(tx, "/ctr", (v + 1).to_string().as_bytes())
                    })
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(a.read_string(XBT_NULL, "/ctr").unwrap(), "51");
    // An error inside aborts and is returned.
    let e = a
        .transaction(|tx| {
            a.write(tx, "/ctr", b"99")?;
            a.read(tx, "/missing")
        })
        .unwrap_err();
    assert!(e.is_enoent());
    assert_eq!(a.read_string(XBT_NULL, "/ctr").unwrap(), "51");
}

#[test]
fn domains_introduce_release_and_special_watches() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    c.watch("@introduceDomain", "intro").unwrap();
    c.watch("@releaseDomain", "rel").unwrap();
    assert_eq!(ev(&c), we("@introduceDomain", "intro"));
    assert_eq!(ev(&c), we("@releaseDomain", "rel"));
    assert!(c.is_domain_introduced(0).unwrap());
    assert!(!c.is_domain_introduced(5).unwrap());
    c.introduce(5, 0x1234, 7).unwrap();
    assert_eq!(ev(&c), we("@introduceDomain", "intro"));
    assert!(c.is_domain_introduced(5).unwrap());
    c.resume(5).unwrap();
    c.introduce(6, 1, 1).unwrap();
    assert_eq!(ev(&c), we("@introduceDomain", "intro"));
    c.set_target(6, 5).unwrap();
    assert!(c.set_target(6, 9).unwrap_err().is_enoent());
    c.release(5).unwrap();
    assert_eq!(ev(&c), we("@releaseDomain", "rel"));
    assert!(!c.is_domain_introduced(5).unwrap());
    assert!(c.release(5).unwrap_err().is_enoent());
    assert!(c.resume(5).unwrap_err().is_enoent());
    assert_eq!(c.get_domain_path(7).unwrap(), "/local/domain/7");
    // Ordinary writes don't fire special watches.
    c.write(XBT_NULL, "/local/domain/5/x", b"").unwrap();
    no_event(&c);
    // Control: help and print.
    let help = c.control(&["help"]).unwrap();
    assert!(String::from_utf8_lossy(&help).contains("sim-as-domain"));
    c.control(&["print", "hello"]).unwrap();
    assert!(c.control(&["no-such-command"]).unwrap_err().is_einval());
}

#[test]
fn domu_permissions() {
    let (_d, xs) = daemon();
    let dom0 = xs.client().unwrap();
    // What a toolstack does: a home owned by the domain, a backend area the
    // domain may only read, a private dom0 area.
    dom0.mkdir(XBT_NULL, "/local/domain/3").unwrap();
    dom0.set_perms(
        XBT_NULL,
        "/local/domain/3",
        &Permissions::new(3, Access::None),
    )
    .unwrap();
    dom0.write(XBT_NULL, "/backend/vbd/3/51712/state", b"1")
        .unwrap();
    dom0.set_perms(
        XBT_NULL,
        "/backend/vbd/3/51712/state",
        &Permissions::new(0, Access::None).with(3, Access::Read),
    )
    .unwrap();
    dom0.write(XBT_NULL, "/secret", b"s").unwrap();

    let g = xs.client_as_domain(3).unwrap();
    // Relative paths resolve under the domain's home, which it owns.
    g.write(XBT_NULL, "device/vbd/51712/state", b"1").unwrap();
    assert_eq!(
        dom0.read_string(XBT_NULL, "/local/domain/3/device/vbd/51712/state")
            .unwrap(),
        "1"
    );
    let p = dom0
        .get_perms(XBT_NULL, "/local/domain/3/device/vbd/51712/state")
        .unwrap();
    assert_eq!(p.owner, 3, "an unprivileged creator owns what it creates");
    // Read-only grant.
    assert_eq!(
        g.read_string(XBT_NULL, "/backend/vbd/3/51712/state")
            .unwrap(),
        "1"
    );
    assert!(g
        .write(XBT_NULL, "/backend/vbd/3/51712/state", b"6")
        .unwrap_err()
        .is_eacces());
    // No access, and no leak about existence below unreadable nodes.
    assert!(g.read(XBT_NULL, "/secret").unwrap_err().is_eacces());
    assert!(g.read(XBT_NULL, "/secret/none").unwrap_err().is_eacces());
    assert!(g.write(XBT_NULL, "/newtop", b"x").unwrap_err().is_eacces());
    assert!(g.directory(XBT_NULL, "/").unwrap_err().is_eacces());
    assert!(g.rm(XBT_NULL, "/secret").unwrap_err().is_eacces());
    // Privileged operations are refused.
    assert!(g.introduce(9, 1, 1).unwrap_err().is_eacces());
    assert!(g.release(3).unwrap_err().is_eacces());
    assert!(g.is_domain_introduced(3).unwrap_err().is_eacces());
    assert!(g.control(&["sim-as-domain", "0"]).unwrap_err().is_eacces());
    assert_eq!(g.get_domain_path(3).unwrap(), "/local/domain/3");
    // Owner may change permissions, but not give the node away.
    g.set_perms(
        XBT_NULL,
        "device",
        &Permissions::new(3, Access::None).with(0, Access::Read),
    )
    .unwrap();
    assert_eq!(
        name(
            g.set_perms(XBT_NULL, "device", &Permissions::new(4, Access::None))
                .unwrap_err()
        ),
        "EPERM"
    );
    assert!(g
        .set_perms(
            XBT_NULL,
            "/backend/vbd/3/51712/state",
            &Permissions::new(3, Access::Both)
        )
        .unwrap_err()
        .is_eacces());
    // Another domain can't see domain 3's home.
    let other = xs.client_as_domain(4).unwrap();
    assert!(other
        .read(XBT_NULL, "/local/domain/3/device/vbd/51712/state")
        .unwrap_err()
        .is_eacces());
    // Watches: a domain only hears about nodes it can read.
    g.watch("/backend/vbd/3", "be").unwrap();
    assert_eq!(ev(&g), we("/backend/vbd/3", "be"));
    dom0.write(XBT_NULL, "/backend/vbd/3/51712/state", b"2")
        .unwrap();
    assert_eq!(ev(&g), we("/backend/vbd/3/51712/state", "be"));
    // A node it cannot read: created with the parent's n0, no event.
    dom0.write(XBT_NULL, "/backend/vbd/3/51712/hidden", b"x")
        .unwrap();
    no_event(&g);
    // Made readable: the permission change is seen; made unreadable again:
    // that change is still seen (old permissions allowed it), later ones not.
    let hidden = "/backend/vbd/3/51712/hidden";
    dom0.set_perms(
        XBT_NULL,
        hidden,
        &Permissions::new(0, Access::None).with(3, Access::Read),
    )
    .unwrap();
    assert_eq!(ev(&g).path, hidden);
    dom0.set_perms(XBT_NULL, hidden, &Permissions::new(0, Access::None))
        .unwrap();
    assert_eq!(ev(&g).path, hidden);
    dom0.write(XBT_NULL, "/backend/vbd/3/51712/hidden", b"y")
        .unwrap();
    no_event(&g);
    // Special watches need read permission on the special node.
    g.watch("@releaseDomain", "rel").unwrap();
    assert_eq!(ev(&g).token, "rel");
    dom0.introduce(3, 1, 1).unwrap();
    dom0.introduce(8, 1, 1).unwrap();
    dom0.release(8).unwrap();
    no_event(&g);
    dom0.set_perms(
        XBT_NULL,
        "@releaseDomain",
        &Permissions::new(0, Access::None).with(3, Access::Read),
    )
    .unwrap();
    dom0.introduce(8, 1, 1).unwrap();
    dom0.release(8).unwrap();
    assert_eq!(ev(&g), we("@releaseDomain", "rel"));
    // Quotas: a domain cannot create unbounded data.
    assert_eq!(
        name(g.write(XBT_NULL, "big", &vec![b'x'; 3000]).unwrap_err()),
        "ENOSPC"
    );
    let txs: Vec<_> = (0..10).map(|_| g.transaction_start().unwrap()).collect();
    assert_eq!(name(g.transaction_start().unwrap_err()), "ENOSPC");
    for t in txs {
        g.transaction_end(t, false).unwrap();
    }
}

#[test]
fn device_model_target_gets_owner_rights() {
    let (_d, xs) = daemon();
    let dom0 = xs.client().unwrap();
    dom0.introduce(5, 1, 1).unwrap();
    dom0.introduce(6, 1, 1).unwrap();
    dom0.write(XBT_NULL, "/local/domain/5/k", b"v").unwrap();
    dom0.set_perms(
        XBT_NULL,
        "/local/domain/5/k",
        &Permissions::new(5, Access::None),
    )
    .unwrap();
    let dm = xs.client_as_domain(6).unwrap();
    assert!(dm
        .read(XBT_NULL, "/local/domain/5/k")
        .unwrap_err()
        .is_eacces());
    dom0.set_target(6, 5).unwrap();
    assert_eq!(dm.read_string(XBT_NULL, "/local/domain/5/k").unwrap(), "v");
}

#[test]
fn client_fails_cleanly_when_daemon_goes_away() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    c.write(XBT_NULL, "/x", b"1").unwrap();
    c.watch("/x", "t").unwrap();
    assert_eq!(ev(&c).token, "t");
    drop(xs);
    let e = c.read(XBT_NULL, "/x").unwrap_err();
    assert!(e.is_connection_error(), "{e}");
    let e = c.write(XBT_NULL, "/x", b"2").unwrap_err();
    assert!(e.is_connection_error(), "{e}");
    // The event channel disconnects.
    assert!(matches!(
        c.events().recv_timeout(T),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn client_is_shared_across_threads() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let c = &c;
            s.spawn(move || {
                for i in 0..50 {
                    let p = format!("/mt/{t}/{i}");
                    c.write(XBT_NULL, &p, p.as_bytes()).unwrap();
                    assert_eq!(c.read(XBT_NULL, &p).unwrap(), p.as_bytes());
                }
            });
        }
    });
    assert_eq!(c.directory(XBT_NULL, "/mt").unwrap().len(), 8);
    let conns = xs.connection_count();
    drop(c);
    let deadline = std::time::Instant::now() + T;
    while xs.connection_count() >= conns && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        xs.connection_count(),
        conns - 1,
        "closed client is forgotten"
    );
}

#[test]
fn oversized_request_is_refused_by_the_client() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    let e = c.write(XBT_NULL, "/x", &vec![b'a'; 4096]).unwrap_err();
    assert!(matches!(e, XsError::Protocol(_)), "{e}");
    // The connection is still fine.
    c.write(XBT_NULL, "/x", &vec![b'a'; 4000]).unwrap();
    assert_eq!(c.read(XBT_NULL, "/x").unwrap().len(), 4000);
}

#[test]
fn spawn_replaces_stale_socket_and_drop_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let xs = Xenstored::spawn(&sock).unwrap();
    std::mem::forget(XsClient::connect_unix(&sock).unwrap());
    drop(xs);
    assert!(!sock.exists(), "socket removed on drop");
    // A leftover socket file from a crashed run.
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(l);
    let xs = Xenstored::spawn(&sock).unwrap();
    xs.client().unwrap().write(XBT_NULL, "/ok", b"").unwrap();
}

#[test]
fn client_and_daemon_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<XsClient>();
    check::<Xenstored>();
    check::<XsError>();
}
