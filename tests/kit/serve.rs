//! `refblk serve --sim` as a child process, for tests that kill and restart
//! the daemon. `CARGO_BIN_EXE_refblk` exists only for integration tests, not
//! for the benchmarks that include the kit too: they compile, and cannot run
//! a daemon.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use refblk_core::backend::control;

/// The refblk binary cargo built for the integration tests.
fn refblk_exe() -> &'static str {
    match option_env!("CARGO_BIN_EXE_refblk") {
        Some(p) => p,
        None => panic!("only integration tests can run the daemon"),
    }
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// `refblk serve --sim DIR --state-dir DIR/state EXTRA...`, its log in
    /// `DIR/serve-N.log`.
    pub fn spawn(dir: &Path, n: usize, extra: &[&str]) -> Daemon {
        let log = dir.join(format!("serve-{n}.log"));
        let f = std::fs::File::create(&log).expect("daemon log");
        let child = Command::new(refblk_exe())
            .arg("serve")
            .arg("--sim")
            .arg(dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start refblk serve");
        Daemon { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the control socket answers `status` (30 s).
    pub fn wait_control(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::request(sock, "status").is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("refblk serve exited ({st}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "control socket never came up; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send `sig`, reap, and return how it exited.
    pub fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal the daemon");
        self.child.wait().expect("reap the daemon")
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    /// SIGTERM, reap, and return whether it exited 0.
    pub fn term(&mut self) -> bool {
        self.signal(nix::sys::signal::Signal::SIGTERM).success()
    }
}

/// A daemon still running when its test ends (an assertion failed) is
/// killed, so that it does not outlive the test.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The refblk binary, for tests that run it (or a script that runs it).
pub fn exe() -> &'static str {
    refblk_exe()
}

/// The daemon's status of device (domid, XVDA-like devid), if it knows it.
pub fn device_status(sock: &Path, domid: u16, devid: u32) -> Option<serde_json::Value> {
    let v = control::request(sock, "status").ok()?;
    v["devices"]
        .as_array()?
        .iter()
        .find(|d| d["domid"] == domid && d["devid"] == devid)
        .cloned()
}

/// A child process (a simulator, a daemon, a simulated guest) stopped with
/// SIGTERM when dropped — also when an assertion fails — then killed if it has
/// not exited within the hang bound.
pub struct Stopped(pub Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let child = &mut self.0;
        if !super::wait_until(super::HANG, || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Wait (at most the hang bound) until the daemon at `sock` reports its first
/// device Connected; fails with the daemon's log `log` otherwise.
pub fn wait_first_device_connected(sock: &Path, log: &Path) {
    let connected = super::wait_until(super::HANG, || {
        control::request(sock, "status").is_ok_and(|v| v["devices"][0]["state"] == "Connected")
    });
    assert!(
        connected,
        "device not Connected; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// As the toolstack and the hotplug script do it against a `refblk serve` at
/// `sock`: create guest `domid` and the nodes of its xvda with `target`, wait
/// for the backend's InitWait, send `attach_line` (`{be}` = the backend path)
/// over the control socket, and connect the guest's frontend.
pub fn attach_over_control(
    sim: &refblk_sim::SimXen,
    sock: &Path,
    domid: u16,
    target: &str,
    attach_line: &str,
) -> (refblk_sim::frontend::Vbd, refblk_sim::frontend::Frontend) {
    use refblk_sim::frontend::{Frontend, FrontendOptions, Toolstack, VbdSpec};
    use xen_sys::xenbus::XenbusState;
    let xs =
        refblk_core::xenstore::XsClient::connect_unix(&sim.xenstored_path()).expect("xenstore");
    let ts = Toolstack::with_control_socket(xs, sock);
    ts.create_domain(domid).expect("domain");
    let guest = std::sync::Arc::new(sim.create_guest(domid, 2048).expect("guest"));
    let vbd = ts
        .create_vbd_nodes(&VbdSpec::new(domid, super::XVDA, target))
        .expect("vbd nodes");
    assert!(
        super::wait_until(super::HANG, || {
            ts.backend_state(&vbd).unwrap() == XenbusState::InitWait
        }),
        "backend never reached InitWait"
    );
    let line = attach_line.replace("{be}", &vbd.backend_path);
    let v = control::request(sock, &line).expect("attach");
    assert_eq!(v["ok"], true, "{line}: {v}");
    let fe = Frontend::connect(
        &sim.xenstored_path(),
        guest,
        super::XVDA,
        FrontendOptions {
            timeout: Duration::from_secs(60),
            ..FrontendOptions::default()
        },
    )
    .expect("frontend");
    (vbd, fe)
}
