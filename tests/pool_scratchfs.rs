//! ScratchFs: each kind mounts, is writable, reports reflink support truthfully, and
//! is gone (unmounted, loop device detached) after drop.

use refblk::util::scratchfs::{FsKind, ScratchFs};
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
        let r = refblk::pool::fsops::try_reflink(&src, &dst).unwrap();
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
