//! Shared by the simulated-Xen tests: a scripted peer process (re-exec of the
//! test binary) that acts as a guest (SimGuest) or as a second backend
//! (SimPlatform), driven line by line over stdin/stdout.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use refblk_core::platform::{EventChannel, ForeignMapping, Platform, PAGE_SIZE};
use refblk_sim::SimGuest;
use refblk_sim::SimPlatform;

/// Env var that turns the child-entry test into the scripted peer.
pub const CHILD_ENV: &str = "REFBLK_SIM_PEER_DIR";
/// Prefix of protocol lines (libtest prints its own lines too).
const TAG: &str = "@@ ";

pub use crate::kit::machine_dir;

/// A page of the kit's pattern for `seed`.
pub fn pattern(seed: u32) -> Vec<u8> {
    crate::kit::pattern(seed.into(), PAGE_SIZE)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// A machine directory on the file system of the build's target directory
/// (normally not tmpfs): the simulation must work there too.
pub fn machine_dir_on_disk() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("refblk-sim-test")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir in CARGO_TARGET_TMPDIR")
}

/// The scripted peer process.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Start a peer on machine `dir`; `entry` is the name of the test function
    /// that calls [`peer_main`] in this test binary.
    pub fn spawn(dir: &Path, entry: &str) -> Peer {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args([entry, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    /// Send a command; Ok(payload) or Err(message).
    pub fn try_cmd(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}").expect("write to peer");
        self.stdin.flush().expect("flush to peer");
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read from peer");
            assert!(n > 0, "peer exited during `{cmd}`");
            // libtest may print "test NAME ... " before our first line.
            if let Some(at) = line.find(TAG) {
                let rest = line[at + TAG.len()..].trim_end();
                return match rest.split_once(' ') {
                    Some(("ok", p)) => Ok(p.trim().to_string()),
                    None if rest == "ok" => Ok(String::new()),
                    Some(("err", m)) => Err(m.to_string()),
                    _ => panic!("bad peer line `{rest}`"),
                };
            }
        }
    }

    /// Send a command that must succeed.
    pub fn cmd(&mut self, cmd: &str) -> String {
        match self.try_cmd(cmd) {
            Ok(p) => p,
            Err(e) => panic!("peer `{cmd}` failed: {e}"),
        }
    }

    pub fn num(&mut self, cmd: &str) -> u32 {
        self.cmd(cmd).parse().expect("number from peer")
    }

    /// SIGKILL the peer (a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// The peer's command loop. Returns false (doing nothing) when not running as
/// a peer.
pub fn peer_main() -> bool {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return false;
    };
    let mut guest: Option<SimGuest> = None;
    let mut chans: HashMap<u32, Box<dyn EventChannel>> = HashMap::new();
    let mut bchans: HashMap<u32, Box<dyn EventChannel>> = HashMap::new();
    let mut maps: Vec<Box<dyn ForeignMapping>> = Vec::new();
    let backend = SimPlatform::new(&dir).expect("machine dir");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> u32 { w.get(i).and_then(|s| s.parse().ok()).unwrap_or(u32::MAX) };
        let g = |gs: &Option<SimGuest>| -> Result<(), String> {
            gs.as_ref()
                .map(|_| ())
                .ok_or_else(|| "no domain".to_string())
        };
        let res: Result<String, String> = (|| match w.first().copied().unwrap_or("") {
            "exit" => Err("exit".into()),
            "create" => {
                guest = Some(SimGuest::create(&dir, n(1) as u16, n(2)).map_err(|e| e.to_string())?);
                Ok(String::new())
            }
            cmd => {
                if cmd.starts_with('b') {
                    return backend_cmd(&backend, &mut maps, &mut bchans, &w, &n);
                }
                g(&guest)?;
                let gs = guest.as_ref().expect("checked");
                guest_cmd(gs, &mut chans, &w, &n).or_else(|e| {
                    if e == "destroy" {
                        chans.clear();
                        guest
                            .take()
                            .expect("checked")
                            .destroy()
                            .map_err(|e| e.to_string())?;
                        Ok(String::new())
                    } else {
                        Err(e)
                    }
                })
            }
        })();
        match res {
            Err(e) if e == "exit" => break,
            Ok(p) => writeln!(out, "{TAG}ok {p}").expect("stdout"),
            Err(e) => writeln!(out, "{TAG}err {e}").expect("stdout"),
        }
        out.flush().expect("stdout");
    }
    drop(chans);
    drop(bchans);
    drop(maps);
    true
}

fn guest_cmd(
    gs: &SimGuest,
    chans: &mut HashMap<u32, Box<dyn EventChannel>>,
    w: &[&str],
    n: &dyn Fn(usize) -> u32,
) -> Result<String, String> {
    let e = |e: std::io::Error| e.to_string();
    match w[0] {
        "alloc" => gs.alloc_pages(n(1)).map(|p| p.to_string()).map_err(e),
        "free" => gs.free_pages(n(1), n(2)).map(|_| String::new()).map_err(e),
        "pattern" => gs
            .write_page(n(1), 0, &pattern(n(2)))
            .map(|_| String::new())
            .map_err(e),
        "write" => gs
            .write_page(n(1), n(2) as usize, &unhex(w[3]))
            .map(|_| String::new())
            .map_err(e),
        "read" => {
            let mut b = vec![0u8; n(3) as usize];
            gs.read_page(n(1), n(2) as usize, &mut b).map_err(e)?;
            Ok(hex(&b))
        }
        "grant" => gs
            .grant(n(1), n(2) as u16, w.get(3) == Some(&"ro"))
            .map(|r| r.to_string())
            .map_err(e),
        "end" => gs.end_access(n(1)).map(|b| b.to_string()).map_err(e),
        "raw" => gs
            .set_grant_entry_raw(n(1), n(2) as u16, n(3) as u16, n(4))
            .map(|_| String::new())
            .map_err(e),
        "evtchn" => {
            let c = gs.alloc_unbound(n(1) as u16).map_err(e)?;
            let p = c.local_port();
            chans.insert(p, c);
            Ok(p.to_string())
        }
        "churn" => {
            // Grant `page` (alternately rw/ro) and end it again, n times; count
            // the end_access calls refused because the backend had it mapped.
            let (page, n) = (n(1), n(2));
            let mut refused = 0u32;
            for i in 0..n {
                let r = gs.grant(page, 0, i % 2 == 1).map_err(e)?;
                while !gs.end_access(r).map_err(e)? {
                    refused += 1;
                    std::thread::yield_now();
                }
            }
            Ok(refused.to_string())
        }
        "destroy" => Err("destroy".into()),
        _ => chan_cmd(chans, w, n),
    }
}

fn chan_cmd(
    chans: &mut HashMap<u32, Box<dyn EventChannel>>,
    w: &[&str],
    n: &dyn Fn(usize) -> u32,
) -> Result<String, String> {
    let e = |e: std::io::Error| e.to_string();
    let cmd = w[0].trim_start_matches('b');
    if cmd == "close" {
        return chans
            .remove(&n(1))
            .map(|_| String::new())
            .ok_or("no such channel".into());
    }
    let c = chans
        .get(&n(1))
        .ok_or_else(|| format!("no channel {}", n(1)))?;
    match cmd {
        "notify" => c.notify().map(|_| String::new()).map_err(e),
        "ack" => c.ack().map(|b| b.to_string()).map_err(e),
        "wait" => c
            .wait_pending(Some(Duration::from_millis(u64::from(n(2)))))
            .map(|b| {
                if b {
                    "woke".to_string()
                } else {
                    "timeout".to_string()
                }
            })
            .map_err(e),
        other => Err(format!("unknown command `{other}`")),
    }
}

/// Backend-side commands (prefixed `b`): `bmap <domid> <ref,ref,..> <rw|ro>`,
/// `bbind <domid> <port>`, `bnotify/bwait/back/bclose <port>`.
fn backend_cmd(
    backend: &SimPlatform,
    maps: &mut Vec<Box<dyn ForeignMapping>>,
    chans: &mut HashMap<u32, Box<dyn EventChannel>>,
    w: &[&str],
    n: &dyn Fn(usize) -> u32,
) -> Result<String, String> {
    let e = |e: std::io::Error| e.to_string();
    match w[0] {
        "bmap" => {
            let refs: Vec<u32> = w[2].split(',').map(|r| r.parse().expect("ref")).collect();
            let m = backend
                .map_grant_refs(n(1) as u16, &refs, w.get(3) == Some(&"rw"))
                .map_err(e)?;
            maps.push(m);
            Ok((maps.len() - 1).to_string())
        }
        "bbind" => {
            let c = backend.bind_interdomain(n(1) as u16, n(2)).map_err(e)?;
            let p = c.local_port();
            chans.insert(p, c);
            Ok(p.to_string())
        }
        _ => chan_cmd(chans, w, n),
    }
}
