//! One owner per running volume (issue 19): while `refblk serve` serves a pool
//! volume, every volume verb that would change its files is refused, naming the
//! owner and the way out, and the pool stays byte-identical — while the daemon
//! runs, after it was killed with SIGKILL (its restart state keeps the claim),
//! and after a restarted daemon took the device over. After the detach the verbs
//! work again. Also: a second `refblk serve` / `refblk sim` on the same
//! directory is refused without changing anything of the first, and `ctl
//! detach` of a device whose volume is no longer running says so (non-zero).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{listing, run_env, text};
use crate::kit::serve::{attach_over_control, wait_first_device_connected, Daemon};
use crate::kit::*;
use refblk_core::backend::control;
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::Frontend;
use refblk_sim::scratchfs::{FsKind, ScratchFs};
use refblk_sim::SimXen;

/// `refblk ARGS` with warnings logged (the daemons and simulators it starts
/// too).
fn refblk(args: &[&str]) -> Output {
    run_env(args, &[("RUST_LOG", "warn")])
}

const MIB: u64 = 1 << 20;
const VID: &str = "appvms/work/private";

/// Kills a daemon the test started if it still runs when the test ends (a
/// failing assertion must not leave `refblk serve` behind).
struct Reap(u32);
impl Drop for Reap {
    fn drop(&mut self) {
        let cmd = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("serve") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// How a daemon that must refuse to start exited; a daemon still running
/// after 30 s is killed and the test fails.
fn exits_soon(d: &mut Daemon) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = d.child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            d.kill9();
            panic!("a second daemon kept running; log:\n{}", d.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_control(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while control::request(sock, "status").is_err() {
        assert!(Instant::now() < deadline, "control socket never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Attach `vid` of `pool` to a new guest `domid` served by the daemon at
/// `sock`, connect the guest's frontend.
fn attach_guest(
    sim: &SimXen,
    sock: &Path,
    domid: u16,
    pool: &Path,
    vid: &str,
) -> (refblk_sim::frontend::Vbd, Frontend) {
    attach_over_control(
        sim,
        sock,
        domid,
        &format!("refblk:{}:{vid}", pool.display()),
        &format!("attach-volume {{be}} {} {vid}", pool.display()),
    )
}

/// Every verb that would change the volume's files: refused with exit 5, the
/// message naming the domain, the device, the daemon's pid and the way out;
/// the pool byte-identical afterwards.
fn all_verbs_refused(pool: &Path, scratch: &Path, domid: u16, pid: u32, phase: &str) {
    let d = pool.to_str().unwrap();
    let before = listing(pool);
    let src = scratch.join("import-src.img");
    std::fs::write(&src, vec![0x5au8; MIB as usize]).unwrap();
    let s = src.to_str().unwrap();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["volume", "stop", "-p", d, VID],
        vec!["volume", "stop", "-p", d, VID, "--discard"],
        vec!["volume", "revert", "-p", d, VID],
        vec!["volume", "revert", "-p", d, VID, "1"],
        vec!["volume", "resize", "-p", d, VID, "16M"],
        vec!["volume", "resize", "-p", d, VID, "4M", "--allow-shrink"],
        vec!["volume", "import", "-p", d, VID, s, "--size", "8M"],
        vec!["volume", "remove", "-p", d, VID],
        vec!["volume", "remove", "-p", d, VID, "--force"],
        vec!["volume", "clone", "-p", d, "appvms/other/private", VID],
        vec!["volume", "start", "-p", d, VID],
        vec!["volume", "start", "-p", d, VID, "--takeover"],
        vec!["volume", "config", "-p", d, VID, "--revisions-to-keep", "3"],
    ];
    for args in &verbs {
        let o = refblk(args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(5), "{phase}: {args:?}: {t}");
        for want in [
            format!("domain {domid}"),
            format!("device {XVDA}"),
            format!("pid {pid}"),
            "detach".to_string(),
        ] {
            assert!(t.contains(&want), "{phase}: {args:?}: no {want:?} in {t}");
        }
        assert!(
            o.stdout.is_empty(),
            "{phase}: {args:?}: a refusal printed a result: {t}"
        );
        assert_eq!(listing(pool), before, "{phase}: {args:?} changed the pool");
    }
    // pool check, report-only and --repair: the served volume is left alone
    for args in [
        vec!["pool", "check", d],
        vec!["pool", "check", d, "--repair"],
    ] {
        let o = refblk(&args);
        assert_eq!(o.status.code(), Some(0), "{phase}: {args:?}: {}", text(&o));
        assert_eq!(listing(pool), before, "{phase}: {args:?} changed the pool");
    }
    // the listing shows who serves it
    let o = refblk(&["volume", "list", "-p", d, "--json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let me = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["vid"] == VID)
        .unwrap();
    assert_eq!(me["state"], "running", "{phase}: {me}");
    assert_eq!(me["owner"]["pid"], pid, "{phase}: {me}");
    assert_eq!(me["owner"]["domid"], domid, "{phase}: {me}");
    assert_eq!(listing(pool), before, "{phase}: list changed the pool");
}

fn served_volume_refuses_every_verb(kind: FsKind) {
    if !require_memlock_or_skip() {
        return;
    }
    let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size().max(256 * MIB)) else {
        return;
    };
    let mdir = machine_dir();
    let sim = SimXen::start(mdir.path()).expect("simulated Xen");
    let pool = fs.path().join("pool");
    let d = pool.to_str().unwrap();
    for args in [
        vec!["pool", "init", d],
        vec![
            "volume",
            "create",
            "-p",
            d,
            VID,
            "--size",
            "8M",
            "--revisions-to-keep",
            "2",
        ],
        vec![
            "volume",
            "create",
            "-p",
            d,
            "appvms/other/private",
            "--size",
            "8M",
        ],
    ] {
        let o = refblk(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    // one committed revision, so that `revert` has something to do
    for args in [
        vec!["volume", "start", "-p", d, VID],
        vec!["volume", "stop", "-p", d, VID],
    ] {
        let o = refblk(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    let sock = mdir.path().join("refblk.sock");
    let mut daemon = Daemon::spawn(mdir.path(), 0, &[]);
    let _reap0 = Reap(daemon.child.id());
    wait_control(&sock);
    let domid = 7;
    let (vbd, mut fe) = attach_guest(&sim, &sock, domid, &pool, VID);
    wait_first_device_connected(&sock, &daemon.log);
    let a = vec![0xa1u8; 256 << 10];
    fe.write(0, &a).expect("guest write");
    fe.flush().expect("flush");

    all_verbs_refused(&pool, fs.path(), domid, daemon.child.id(), "served");

    // A second daemon on the same control socket and state directory is
    // refused before it takes anything over; the first keeps serving.
    let before = listing(&pool);
    let state_before = listing(&mdir.path().join("state"));
    let mut second = Daemon::spawn(mdir.path(), 2, &[]);
    let _reap2 = Reap(second.child.id());
    let st = exits_soon(&mut second);
    let log2 = second.log_text();
    assert_eq!(st.code(), Some(5), "second daemon: {log2}");
    assert!(
        log2.contains("another refblk serve") && log2.contains(&daemon.child.id().to_string()),
        "{log2}"
    );
    // ... also with its own control socket: the state directory is locked
    let other = mdir.path().join("other.sock");
    let mut third = Daemon::spawn(mdir.path(), 3, &["--control", other.to_str().unwrap()]);
    let _reap3 = Reap(third.child.id());
    let st = exits_soon(&mut third);
    let log3 = third.log_text();
    assert_eq!(st.code(), Some(5), "daemon on the same state dir: {log3}");
    assert!(log3.contains("restart state"), "{log3}");
    assert!(
        !other.exists(),
        "the refused daemon made its control socket"
    );
    assert_eq!(listing(&pool), before, "the second daemon changed the pool");
    assert_eq!(
        listing(&mdir.path().join("state")),
        state_before,
        "the second daemon changed the first one's state"
    );
    assert!(
        control::request(&sock, "status").is_ok(),
        "the first daemon's socket is gone"
    );
    fe.write(8, &a)
        .expect("guest write after the second daemon");
    fe.flush().expect("flush");

    // kill -9: the guest keeps the volume; the restart state keeps the claim
    let dead = daemon.child.id();
    daemon.kill9();
    all_verbs_refused(&pool, fs.path(), domid, dead, "daemon killed");
    // restart: the new daemon takes the device and the claim over
    let mut daemon = Daemon::spawn(mdir.path(), 1, &[]);
    let _reap1 = Reap(daemon.child.id());
    wait_first_device_connected(&sock, &daemon.log);
    assert_eq!(fe.read(0, a.len()).unwrap(), a);
    all_verbs_refused(&pool, fs.path(), domid, daemon.child.id(), "restarted");

    // detach (the hotplug `remove`): committed, and the verbs work again
    let o = refblk(&[
        "ctl",
        "--control",
        sock.to_str().unwrap(),
        "detach",
        &vbd.backend_path,
    ]);
    assert!(o.status.success(), "detach: {}", text(&o));
    let clean = std::fs::read(pool.join(format!("{VID}.img"))).unwrap();
    assert_eq!(
        &clean[..a.len()],
        &a[..],
        "the guest's write was not committed"
    );
    for (args, want) in [
        (vec!["volume", "stop", "-p", d, VID], "was not running"),
        (vec!["volume", "revert", "-p", d, VID], "reverted"),
        (vec!["volume", "resize", "-p", d, VID, "16M"], "resized"),
        (
            vec!["volume", "config", "-p", d, VID, "--revisions-to-keep", "3"],
            "revisions_to_keep=3",
        ),
        (vec!["volume", "start", "-p", d, VID], "-dirty.img"),
        (
            vec!["volume", "stop", "-p", d, VID, "--discard"],
            "discarded",
        ),
        (vec!["volume", "remove", "-p", d, VID], "removed"),
    ] {
        let o = refblk(&args);
        assert!(o.status.success(), "after detach: {args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(want),
            "after detach: {args:?}: {}",
            text(&o)
        );
    }
    std::mem::forget(fe); // its backend is gone; don't wait on a close handshake
    assert!(daemon.term(), "daemon exit after SIGTERM");
}

#[test]
fn a_served_volume_refuses_every_verb_on_btrfs() {
    served_volume_refuses_every_verb(FsKind::Btrfs);
}

#[test]
fn a_served_volume_refuses_every_verb_on_xfs() {
    served_volume_refuses_every_verb(FsKind::Xfs);
}

/// `ctl detach` of a device whose volume was stopped behind the daemon's back
/// (here: its dirty image renamed away) says so and exits non-zero.
#[test]
fn detach_of_a_volume_that_is_not_running_fails() {
    if !require_memlock_or_skip() {
        return;
    }
    let mdir = machine_dir();
    let sim = SimXen::start(mdir.path()).expect("simulated Xen");
    let pool = pool_with_volume(mdir.path(), VID, 1, 8 * MIB);
    let sock = mdir.path().join("refblk.sock");
    let mut daemon = Daemon::spawn(mdir.path(), 0, &[]);
    let _reap = Reap(daemon.child.id());
    wait_control(&sock);
    let (vbd, fe) = attach_guest(&sim, &sock, 3, &pool, VID);
    wait_first_device_connected(&sock, &daemon.log);
    let dirty = pool.join(format!("{VID}-dirty.img"));
    std::fs::rename(&dirty, mdir.path().join("stolen.img")).unwrap();
    let o = refblk(&[
        "ctl",
        "--control",
        sock.to_str().unwrap(),
        "detach",
        &vbd.backend_path,
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("was not running"), "{}", text(&o));
    std::mem::forget(fe);
    assert!(daemon.term(), "daemon exit after SIGTERM");
}

/// A second `refblk sim --dir D` while one runs in D exits 5 and leaves the
/// first one's sockets in place (it used to delete xenstored.sock).
#[test]
fn a_second_simulator_in_one_directory_is_refused() {
    let mdir = machine_dir();
    let log = std::fs::File::create(mdir.path().join("sim1.log")).unwrap();
    /// Stops a simulator it was given, also when the test fails.
    struct Sim(std::process::Child);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
    let mut first = Sim(Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["sim", "--dir"])
        .arg(mdir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap());
    let xs = mdir.path().join("xenstored.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Up = both of its sockets are there: it binds xenstored's first, the
    // event channel broker's after (comparing before that would see a
    // missing evtchn.sock "replaced" by the first simulator itself).
    let ev = mdir.path().join("evtchn.sock");
    while XsClient::connect_unix(&xs).is_err() || !ev.exists() {
        assert!(Instant::now() < deadline, "first simulator never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
    let (xs_ino, ev_ino) = (ino(&xs), ino(&mdir.path().join("evtchn.sock")));
    // (spawned with a guard: a broken build runs a second simulator that
    // never exits by itself)
    let second = Sim(Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["sim", "--dir"])
        .arg(mdir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut second = second;
    let status = loop {
        if let Some(st) = second.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "a second simulator kept running in the first one's directory"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let o = Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    };
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("another refblk sim") && text(&o).contains(&first.0.id().to_string()),
        "{}",
        text(&o)
    );
    assert_eq!(ino(&xs), xs_ino, "xenstored.sock was replaced");
    assert_eq!(
        ino(&mdir.path().join("evtchn.sock")),
        ev_ino,
        "evtchn.sock was replaced"
    );
    let c = XsClient::connect_unix(&xs).expect("the first simulator still answers");
    c.write(0, "/probe", b"1").expect("xenstore write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(first.0.wait().unwrap().success());
}
