//! `refblk sim --dir DIR` as a separate process: Debian's xenstore-utils talk to
//! its xenstored, a guest in this process grants a page and binds an event
//! channel through its broker, a backend maps and kicks it, and SIGTERM stops it
//! and removes its sockets.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kit::{wait_until, HANG};
use refblk_core::platform::{CopySeg, GrantStatus, Platform};
use refblk_sim::scratchfs::{have_tool, skip_or_fail};
use refblk_sim::{SimGuest, SimPlatform};

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sim(dir: &Path) -> Sim {
    let child = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["sim", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn refblk sim");
    let sim = Sim(child);
    assert!(
        wait_until(HANG, || dir.join("xenstored.sock").exists()
            && dir.join("evtchn.sock").exists()),
        "refblk sim did not create its sockets"
    );
    sim
}

fn xs_tool(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .env("XENSTORED_PATH", dir.join("xenstored.sock"))
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sim_process_serves_xenstore_grants_and_event_channels_then_stops_cleanly() {
    if !have_tool("xenstore-write") && !skip_or_fail("xenstore-utils are not installed") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("machine");
    let mut sim = start_sim(&dir);

    // xenstore through a client nobody here wrote.
    xs_tool(&dir, "xenstore-write", &["/local/domain/7/name", "guest7"]);
    assert_eq!(
        xs_tool(&dir, "xenstore-read", &["/local/domain/7/name"]),
        "guest7"
    );
    let be: Arc<dyn Platform> = Arc::new(SimPlatform::new(&dir).unwrap());
    let xs = be.xenstore().unwrap();
    assert_eq!(xs.read_string(0, "/local/domain/7/name").unwrap(), "guest7");

    // A guest (this process) and a backend (also this process, but only through
    // the files and sockets of the sim process) share a page and a channel.
    let guest = SimGuest::create(&dir, 7, 16).unwrap();
    let page = guest.alloc_page().unwrap();
    guest.write_page(page, 100, b"hello from dom7").unwrap();
    let gref = guest.grant(page, 0, false).unwrap();
    let mut buf = [0u8; 15];
    let mut st = [GrantStatus::GeneralError];
    be.grant_copy(
        7,
        &mut [CopySeg::FromGuest {
            gref,
            offset: 100,
            dst: &mut buf,
        }],
        &mut st,
    )
    .unwrap();
    assert_eq!(st[0], GrantStatus::Okay);
    assert_eq!(&buf, b"hello from dom7");
    let mut st = [GrantStatus::GeneralError];
    be.grant_copy(
        7,
        &mut [CopySeg::FromGuest {
            gref: gref + 1000,
            offset: 0,
            dst: &mut buf,
        }],
        &mut st,
    )
    .unwrap();
    assert_ne!(st[0], GrantStatus::Okay, "an ungranted ref must fail");

    let g_ch = guest.alloc_unbound(0).unwrap();
    let b_ch = be.bind_interdomain(7, g_ch.local_port()).unwrap();
    assert!(!g_ch.wait_pending(Some(Duration::from_millis(50))).unwrap());
    b_ch.notify().unwrap();
    assert!(g_ch.wait_pending(Some(Duration::from_secs(30))).unwrap());
    assert!(g_ch.ack().unwrap());
    g_ch.notify().unwrap();
    assert!(b_ch.wait_pending(Some(Duration::from_secs(30))).unwrap());
    drop(b_ch);
    drop(g_ch);
    drop(xs);

    // SIGTERM: the process exits 0 and removes its sockets.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sim.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sim.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "refblk sim ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "refblk sim exited with {status}");
    assert!(!dir.join("xenstored.sock").exists());
    assert!(!dir.join("evtchn.sock").exists());
}
