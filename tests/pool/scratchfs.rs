//! ScratchFs: each kind mounts, is writable, reports reflink support truthfully, and
//! is gone (unmounted, loop device detached) after drop.

use refblk_sim::scratchfs::{FsKind, ScratchFs};
use std::fs;

fn mounted(path: &std::path::Path) -> bool {
    let m = fs::read_to_string("/proc/self/mounts").unwrap();
    let p = path.to_string_lossy().to_string();
    m.lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
}

#[test]
fn scratch_fs_lifecycle_all_kinds() {
    for kind in FsKind::ALL {
        let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size()) else {
            return;
        };
        let mnt = fs.path().to_path_buf();
        let dev = fs.loop_device().unwrap().to_string();
        assert!(mounted(&mnt), "{kind} not mounted at {}", mnt.display());
        let a = mnt.join("a");
        fs::write(&a, vec![7u8; 65536]).unwrap();
        let src = fs::File::open(&a).unwrap();
        let dst = fs::File::create(mnt.join("b")).unwrap();
        let r = refblk_core::pool::fsops::try_reflink(&src, &dst).unwrap();
        assert_eq!(r, kind.supports_reflink(), "FICLONE on {kind}");
        drop((src, dst));
        drop(fs);
        assert!(!mounted(&mnt), "{kind} still mounted after drop");
        assert!(!mnt.exists(), "{} left behind", mnt.display());
        let back = std::process::Command::new("losetup")
            .args(["-j", "/nonexistent"])
            .output()
            .unwrap();
        assert!(back.status.success());
        let show = fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            dev.trim_start_matches("/dev/")
        ))
        .unwrap_or_default();
        assert!(
            !show.contains("refblk-scratch"),
            "{dev} still attached: {show}"
        );
    }
}

/// A scratch mount whose owner process died (no Drop ran) is unmounted and its loop
/// device detached by the next ScratchFs::new.
#[test]
fn leaked_scratch_mount_is_cleaned_up() {
    use std::process::Command;
    if !refblk_sim::scratchfs::require_root_or_skip("mounting a leaked scratch fs") {
        return;
    }
    // a pid that no longer exists
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let base = std::env::temp_dir().join(format!("refblk-scratch.{dead}.77"));
    let _ = fs::remove_dir_all(&base);
    let mnt = base.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let img = base.join("fs.img");
    fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let run = |c: &str, a: &[&str]| {
        let o = Command::new(c).args(a).output().unwrap();
        assert!(
            o.status.success(),
            "{c} {a:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let dev = run("losetup", &["--find", "--show", img.to_str().unwrap()]);
    // (no "is mounted" assertion here: a parallel test's ScratchFs::new may already
    // clean it up, which is the behaviour under test)
    run("mount", &[&dev, mnt.to_str().unwrap()]);
    let Some(fs2) = ScratchFs::new_or_skip(FsKind::Ext4, 16 << 20) else {
        return;
    };
    assert!(!mounted(&mnt), "leaked mount {} not cleaned", mnt.display());
    assert!(!base.exists(), "leaked dir {} not removed", base.display());
    let backing = fs::read_to_string(format!(
        "/sys/block/{}/loop/backing_file",
        dev.trim_start_matches("/dev/")
    ))
    .unwrap_or_default();
    assert!(
        !backing.contains(&format!("refblk-scratch.{dead}.77")),
        "{dev} still attached to the leaked image"
    );
    drop(fs2);
}
