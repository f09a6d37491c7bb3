//! Volumes another program runs (issue 19, What 2): a volume whose dirty image
//! another process holds open for writing, or that backs a loop device, is
//! shown as running (never "interrupted"), and start/stop/revert/resize/
//! import/remove refuse it (exit 5, naming the program) leaving the pool
//! byte-identical; `pool check` neither calls it interrupted nor repairs it.
//! Once the program lets go, the verbs work.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use refblk_sim::scratchfs::FsKind;

const VID: &str = "appvms/q/private";

/// A pool with VID started and its start record removed: what refblk sees of
/// a volume Qubes (or anyone) runs.
fn pool_with_foreign_run(root: &Path) -> std::path::PathBuf {
    let pool = root.join("pool");
    let d = pool.to_str().unwrap();
    ok(&["pool", "init", d]);
    ok(&["volume", "create", "-p", d, VID, "--size", "4M"]);
    ok(&["volume", "start", "-p", d, VID]);
    ok(&["volume", "stop", "-p", d, VID]); // a revision, for revert
    ok(&["volume", "start", "-p", d, VID]);
    std::fs::remove_file(pool.join(format!(".refblk/volumes/{VID}.running"))).unwrap();
    pool
}

/// Every verb refused with exit 5 naming `who`; pool unchanged; shown running.
fn refused_while_used(pool: &Path, who: &str) {
    let d = pool.to_str().unwrap();
    let before = listing(pool);
    let src = pool.parent().unwrap().join("src.img");
    std::fs::write(&src, vec![1u8; 4096]).unwrap();
    let s = src.to_str().unwrap();
    for args in [
        vec!["volume", "start", "-p", d, VID],
        vec!["volume", "start", "-p", d, VID, "--takeover"],
        vec!["volume", "stop", "-p", d, VID],
        vec!["volume", "stop", "-p", d, VID, "--discard"],
        vec!["volume", "revert", "-p", d, VID],
        vec!["volume", "resize", "-p", d, VID, "8M"],
        vec!["volume", "import", "-p", d, VID, s],
        vec!["volume", "remove", "-p", d, VID],
        vec!["volume", "remove", "-p", d, VID, "--force"],
    ] {
        let o = refblk(&args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o));
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o));
        if !["revert", "resize", "import"].contains(&args[1]) {
            // (those three already refuse any volume with a dirty image)
            assert!(text(&o).contains(who), "{args:?}: no {who:?}: {}", text(&o));
        }
        assert_eq!(listing(pool), before, "{args:?} changed the pool");
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["volume", "info", "-p", d, VID, "--json"])).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["users"].to_string().contains(who), "{v}");
    for args in [
        vec!["pool", "check", d],
        vec!["pool", "check", d, "--repair"],
    ] {
        let o = refblk(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("interrupted"), "{}", text(&o));
    }
    assert_eq!(listing(pool), before, "list/info/check changed the pool");
}

struct Holder(Child);
impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn a_writer_holds_the_dirty_image(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let pool = pool_with_foreign_run(fs.path());
    let dirty = pool.join(format!("{VID}-dirty.img"));
    let holder = Holder(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<>'{}'; echo ready; read x", dirty.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = holder.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == dirty))
    {
        assert!(
            Instant::now() < deadline,
            "the holder never opened the image"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    refused_while_used(&pool, &format!("pid {pid}"));
    drop(holder);
    let d = pool.to_str().unwrap();
    assert!(ok(&["volume", "stop", "-p", d, VID]).contains("committed"));
}

#[test]
fn a_volume_another_process_writes_is_refused_on_btrfs() {
    a_writer_holds_the_dirty_image(FsKind::Btrfs);
}

#[test]
fn a_volume_another_process_writes_is_refused_on_xfs() {
    a_writer_holds_the_dirty_image(FsKind::Xfs);
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_volume_behind_a_loop_device_is_refused() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let pool = pool_with_foreign_run(fs.path());
    let dirty = pool.join(format!("{VID}-dirty.img"));
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&dirty)
        .output()
        .unwrap();
    assert!(o.status.success(), "losetup: {}", text(&o));
    let dev = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let lo = Loop(dev.clone());
    refused_while_used(&pool, &dev);
    drop(lo);
    let d = pool.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = refblk(&["volume", "stop", "-p", d, VID]);
        if o.status.success() {
            break;
        }
        // the kernel lets go of a detached loop device asynchronously
        assert!(
            Instant::now() < deadline,
            "stop after losetup -d: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
