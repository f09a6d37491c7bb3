//! Every lifecycle step of the reflink pool on btrfs, XFS (reflink) and ext4 (copy
//! fallback), with content checks and Qubes' revision naming/pruning rules.

use std::io::{self, Cursor, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::common::*;
use refblk_core::pool::layout::isodate;
use refblk_core::pool::{
    ErrorKind, ImportSource, InitOptions, Overrides, Pool, ResizeNotifier, StopOutcome,
    VolumeConfig, VolumeKind, VolumeState,
};
use refblk_sim::scratchfs::FsKind;

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, u64)>>);

impl ResizeNotifier for Recorder {
    fn volume_resized(&self, vid: &str, _path: &Path, new_size: u64) -> io::Result<()> {
        self.0.lock().unwrap().push((vid.to_string(), new_size));
        Ok(())
    }
}

fn run_all(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let root = fs.path();
    setup_check(root, kind);
    origin_lifecycle(root, kind);
    snapshot_and_volatile(root, kind);
    revisions_variants(root, kind);
    bad_input(root, kind);
    copies_share_blocks(root, kind);
}

fn free_bytes(p: &Path) -> u64 {
    nix::unistd::sync();
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_free() * st.fragment_size()
}

/// On btrfs/XFS a start without precache and a commit's revision are reflinks (no
/// new data blocks); on ext4 they are real (sparse) copies.
fn copies_share_blocks(root: &Path, kind: FsKind) {
    let pool = pool(root, "p5", kind);
    let size = 16 * MIB;
    let v = pool
        .create_volume("appvms/r/private", VolumeConfig::origin(1), size)
        .unwrap();
    write_at(&v.start().unwrap(), 0, &pattern(1, size as usize));
    v.stop().unwrap();
    std::fs::remove_file(v.precache_path()).unwrap();
    let before = free_bytes(root);
    v.start().unwrap(); // copies clean -> dirty
    let used = before.saturating_sub(free_bytes(root));
    if kind.supports_reflink() {
        assert!(
            used < 4 * MIB,
            "{kind}: start used {used} bytes: not a reflink"
        );
    } else {
        assert!(
            used >= 15 * MIB,
            "{kind}: start used only {used} bytes for a copy"
        );
    }
    v.discard().unwrap();
}

#[test]
fn btrfs_lifecycle() {
    run_all(FsKind::Btrfs);
}

#[test]
fn xfs_lifecycle() {
    run_all(FsKind::Xfs);
}

#[test]
fn ext4_lifecycle() {
    run_all(FsKind::Ext4);
}

fn setup_check(root: &Path, kind: FsKind) {
    let dir = root.join("checked");
    let r = Pool::init(&dir, &InitOptions::default());
    if kind.supports_reflink() {
        let pool = r.unwrap();
        assert!(dir.join("appvms").is_dir() && dir.join("vm-templates").is_dir());
        assert!(dir.join(".refblk/pool.json").is_file());
        let info = pool.info().unwrap();
        assert!(info.reflink);
        assert_eq!(info.fs_type, kind.to_string());
    } else {
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.msg.contains("ext4"), "{e}");
        assert!(e.msg.contains("--no-setup-check"), "{e}");
        assert!(!dir.exists(), "refused init left {}", dir.display());
        let pool = Pool::init(
            &dir,
            &InitOptions {
                setup_check: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!pool.info().unwrap().reflink);
    }
}

fn origin_lifecycle(root: &Path, kind: FsKind) {
    let rec = Arc::new(Recorder::default());
    let pool = pool(root, "p1", kind).with_notifier(rec.clone());
    let dir = pool.dir().to_path_buf();
    let vid = "appvms/work/private";
    let size = 4 * MIB;
    let v = pool
        .create_volume(vid, VolumeConfig::origin(1), size)
        .unwrap();
    let clean = dir.join("appvms/work/private.img");
    let dirty = dir.join("appvms/work/private-dirty.img");
    let precache = dir.join("appvms/work/private-precache.img");
    assert_eq!(v.clean_path(), clean);
    assert_eq!(read(&clean), vec![0u8; size as usize]);
    assert_eq!(blocks(&clean), 0, "new image is not sparse");
    assert_eq!(mtime_ns(&precache), mtime_ns(&clean));
    assert_eq!(
        ls(&dir.join("appvms/work")),
        ["private-precache.img", "private.img"]
    );
    let e = pool
        .create_volume(vid, VolumeConfig::origin(1), size)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);

    // start consumes the precache by rename
    let pc_ino = ino(&precache);
    let served = v.start().unwrap();
    assert_eq!(served, dirty);
    assert_eq!(ino(&dirty), pc_ino, "start did not reuse the precache");
    assert!(!exists(&precache));
    assert_eq!(v.state(), VolumeState::Running);
    let e = v.start().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.msg.contains("already running"), "{e}");
    let a = pattern(1, 256 * 1024);
    write_at(&dirty, MIB, &a);
    // a restarted daemon takes the running volume over, data as it is
    let dirty_ino = ino(&dirty);
    assert_eq!(v.resume().unwrap(), dirty);
    assert_eq!(ino(&dirty), dirty_ino);
    assert_eq!(read(&dirty)[MIB as usize..MIB as usize + a.len()], a[..]);

    // commit: revision 1 named after the old clean's mtime, precache refreshed
    let old_mtime = mtime_ns(&clean).0;
    assert_eq!(v.stop().unwrap(), StopOutcome::Committed);
    let rev1 = format!("private.img.1@{}Z", isodate(old_mtime));
    assert_eq!(
        ls(&dir.join("appvms/work")),
        vec![
            "private-precache.img".to_string(),
            "private.img".into(),
            rev1.clone()
        ]
    );
    let img_a = image_with(size, MIB, &a);
    assert_eq!(read(&clean), img_a);
    assert_eq!(
        read(&dir.join("appvms/work").join(&rev1)),
        vec![0u8; size as usize]
    );
    assert_eq!(mtime_ns(&precache), mtime_ns(&clean));
    assert_eq!(read(&precache), img_a);
    assert_eq!(v.state(), VolumeState::Stopped);
    assert_eq!(v.stop().unwrap(), StopOutcome::NotRunning);

    // second round: revision 2 = A, revision 1 pruned (revisions_to_keep = 1)
    v.start().unwrap();
    let b = pattern(2, 128 * 1024);
    write_at(&dirty, 0, &b);
    let a_mtime = mtime_ns(&clean).0;
    v.stop().unwrap();
    let img_b = {
        let mut x = img_a.clone();
        x[..b.len()].copy_from_slice(&b);
        x
    };
    assert_eq!(read(&clean), img_b);
    let revs = v.revisions().unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].n, 2);
    assert_eq!(revs[0].timestamp, isodate(a_mtime));
    assert_eq!(read(&revs[0].path), img_a);

    // discard keeps the committed data
    v.start().unwrap();
    write_at(&dirty, 0, &pattern(3, 4096));
    assert_eq!(v.discard().unwrap(), StopOutcome::Discarded);
    assert_eq!(read(&clean), img_b);
    assert!(!exists(&dirty));
    assert_eq!(v.revisions().unwrap().len(), 1);

    // revert refused while running
    v.start().unwrap();
    assert_eq!(v.revert(None).unwrap_err().kind, ErrorKind::Busy);
    v.discard().unwrap();

    // revert to newest: clean = A, B archived as revision 3
    let b_mtime = mtime_ns(&clean).0;
    let r = v.revert(None).unwrap();
    assert_eq!(r.n, 2);
    assert_eq!(read(&clean), img_a);
    let revs = v.revisions().unwrap();
    assert_eq!(revs.iter().map(|r| r.n).collect::<Vec<_>>(), [3]);
    assert_eq!(revs[0].timestamp, isodate(b_mtime));
    assert_eq!(read(&revs[0].path), img_b);
    assert_eq!(mtime_ns(&precache), mtime_ns(&clean));
    // revert by name to 3: back to B
    v.revert(Some("3")).unwrap();
    assert_eq!(read(&clean), img_b);
    assert_eq!(v.revisions().unwrap()[0].n, 4);
    // unknown revision: clear error, nothing changed
    let before = snapshot(&dir);
    let e = v.revert(Some("99")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.msg.contains("99") && e.msg.contains("4@"), "{e}");
    assert_eq!(
        v.revert(Some("x")).unwrap_err().kind,
        ErrorKind::InvalidInput
    );
    assert_eq!(snapshot(&dir), before);

    // resize stopped: grow keeps content, shrink refused unless allowed
    v.resize(8 * MIB, false).unwrap();
    let mut img_b8 = img_b.clone();
    img_b8.resize(8 * MIB as usize, 0);
    assert_eq!(read(&clean), img_b8);
    assert_eq!(mtime_ns(&precache), mtime_ns(&clean));
    let before = snapshot(&dir);
    let e = v.resize(2 * MIB, false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.msg.contains("--allow-shrink"), "{e}");
    assert_eq!(snapshot(&dir), before);
    assert!(rec.0.lock().unwrap().is_empty(), "stopped resize notified");
    // resize running: dirty truncated, backend told
    v.start().unwrap();
    v.resize(12 * MIB, false).unwrap();
    assert_eq!(std::fs::metadata(&dirty).unwrap().len(), 12 * MIB);
    assert_eq!(*rec.0.lock().unwrap(), [(vid.to_string(), 12 * MIB)]);
    v.stop().unwrap();
    assert_eq!(std::fs::metadata(&clean).unwrap().len(), 12 * MIB);
    v.resize(8 * MIB, true).unwrap();
    assert_eq!(read(&clean), img_b8);

    // export
    assert_eq!(v.export(None).unwrap(), clean);
    let out = root.join("exported.img");
    v.export(Some(&out)).unwrap();
    assert_eq!(read(&out), img_b8);

    // import from a file (new size from the file), old data archived
    let d = pattern(4, 3 * MIB as usize);
    let src = root.join("import-src.img");
    std::fs::write(&src, &d).unwrap();
    let nrev = v.revisions().unwrap().last().unwrap().n;
    v.import(ImportSource::File(&src), None).unwrap();
    assert_eq!(read(&clean), d);
    let revs = v.revisions().unwrap();
    assert_eq!(revs.last().unwrap().n, nrev + 1);
    assert_eq!(read(&revs.last().unwrap().path), img_b8);
    assert!(!exists(&dir.join("appvms/work/private-import.img")));
    // import from a stream with an explicit size
    let e2 = pattern(5, 100_000);
    let mut cur = Cursor::new(e2.clone());
    v.import(ImportSource::Reader(&mut cur, "stdin"), Some(2 * MIB))
        .unwrap();
    assert_eq!(read(&clean), image_with(2 * MIB, 0, &e2));
    // a stream larger than the size is refused, old data kept
    let mut big = Cursor::new(vec![1u8; 3 * MIB as usize]);
    let e = v
        .import(ImportSource::Reader(&mut big, "stdin"), Some(2 * MIB))
        .unwrap_err();
    assert!(e.msg.contains("more than"), "{e}");
    assert_eq!(read(&clean), image_with(2 * MIB, 0, &e2));
    // a failing stream: old data kept, no leftovers
    struct Broken(usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("pipe broke"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(9);
            self.0 -= n;
            Ok(n)
        }
    }
    let mut br = Broken(1_500_000);
    let e = v
        .import(ImportSource::Reader(&mut br, "stdin"), None)
        .unwrap_err();
    assert!(e.msg.contains("pipe broke"), "{e}");
    assert_eq!(read(&clean), image_with(2 * MIB, 0, &e2));
    assert!(temps(&dir).is_empty(), "{:?}", temps(&dir));
    assert!(!exists(&dir.join("appvms/work/private-import.img")));

    // import into a volume that does not exist: refused, nothing created
    let none = pool.volume("appvms/none/private").unwrap();
    let e = none.import(ImportSource::File(&src), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(!dir.join("appvms/none").exists());

    // clone to a new volume, then into an existing one
    let c = pool.volume("appvms/copy/private").unwrap();
    c.clone_from(&v, None).unwrap();
    assert_eq!(read(c.clean_path()), image_with(2 * MIB, 0, &e2));
    assert_eq!(c.config().unwrap().kind, VolumeKind::Origin);
    c.start().unwrap();
    write_at(c.dirty_path(), 0, &pattern(6, 4096));
    c.stop().unwrap();
    v.clone_from(&c, None).unwrap();
    assert_eq!(read(&clean), read(c.clean_path()));

    // list
    let vids = pool.list().unwrap();
    assert_eq!(vids, ["appvms/copy/private", "appvms/work/private"]);

    // remove: every file, the VM directory, the sidecar
    v.start().unwrap();
    assert_eq!(v.remove(false).unwrap_err().kind, ErrorKind::Busy);
    v.stop().unwrap();
    v.remove(false).unwrap();
    assert!(!dir.join("appvms/work").exists());
    assert!(!dir
        .join(".refblk/volumes/appvms/work/private.json")
        .exists());
    assert_eq!(pool.list().unwrap(), ["appvms/copy/private"]);
    assert_eq!(v.remove(false).unwrap_err().kind, ErrorKind::NotFound);
    assert!(temps(&dir).is_empty());
}

fn snapshot_and_volatile(root: &Path, kind: FsKind) {
    let pool = pool(root, "p2", kind);
    let dir = pool.dir().to_path_buf();
    let size = 2 * MIB;
    let t = pool
        .create_volume("vm-templates/fedora/root", VolumeConfig::origin(1), size)
        .unwrap();
    t.start().unwrap();
    let t1 = pattern(10, 64 * 1024);
    write_at(t.dirty_path(), 0, &t1);
    t.stop().unwrap();
    let snap_cfg = VolumeConfig {
        kind: VolumeKind::Snapshot,
        source: Some("vm-templates/fedora/root".into()),
        revisions_to_keep: 0,
        size: None,
        rw: true,
    };
    let s = pool
        .create_volume("appvms/work/root", snap_cfg.clone(), size)
        .unwrap();
    assert!(!exists(s.clean_path()), "snapshot create made an image");
    let served = s.start().unwrap();
    assert_eq!(ino(s.clean_path()), ino(t.clean_path()), "not a hardlink");
    assert_eq!(read(&served), image_with(size, 0, &t1));
    assert!(!s.is_outdated().unwrap());
    write_at(&served, 0, &pattern(11, 4096));
    // the template changes while the snapshot runs: outdated
    t.start().unwrap();
    let t2 = pattern(12, 4096);
    write_at(t.dirty_path(), 0, &t2);
    t.stop().unwrap();
    assert!(s.is_outdated().unwrap());
    assert_eq!(s.stop().unwrap(), StopOutcome::Discarded);
    assert!(!exists(s.clean_path()) && !exists(s.dirty_path()));
    assert_eq!(read(t.clean_path()).len(), size as usize);
    // next start sees the new template
    let served = s.start().unwrap();
    let mut tt = image_with(size, 0, &t1);
    tt[..4096].copy_from_slice(&t2);
    assert_eq!(read(&served), tt);
    assert!(!s.is_outdated().unwrap());
    // wrong kinds
    assert_eq!(s.revert(None).unwrap_err().kind, ErrorKind::WrongKind);
    s.stop().unwrap();
    let mut cur = Cursor::new(vec![1u8; 10]);
    assert_eq!(
        s.import(ImportSource::Reader(&mut cur, "stdin"), None)
            .unwrap_err()
            .kind,
        ErrorKind::WrongKind
    );
    assert_eq!(s.export(None).unwrap_err().kind, ErrorKind::WrongKind);

    // origin+snapshot: starts from the template, commits to its own clean
    let os = pool
        .create_volume(
            "appvms/os/root",
            VolumeConfig {
                kind: VolumeKind::OriginSnapshot,
                revisions_to_keep: 1,
                ..snap_cfg.clone()
            },
            size,
        )
        .unwrap();
    let served = os.start().unwrap();
    assert_eq!(read(&served), tt);
    let x = pattern(13, 8192);
    write_at(&served, MIB, &x);
    assert_eq!(os.stop().unwrap(), StopOutcome::Committed);
    let mut ox = tt.clone();
    ox[MIB as usize..MIB as usize + x.len()].copy_from_slice(&x);
    assert_eq!(read(os.clean_path()), ox);
    assert_ne!(ino(os.clean_path()), ino(t.clean_path()));
    assert!(!exists(os.precache_path()));
    assert!(
        pool.check(false).unwrap().is_empty(),
        "{:?}",
        pool.check(false)
    );
    assert_eq!(read(t.clean_path()), tt, "template changed by a snapshot");

    // volatile: a fresh sparse image each start, nothing kept
    let vcfg = VolumeConfig {
        kind: VolumeKind::Volatile,
        source: None,
        revisions_to_keep: 0,
        size: None,
        rw: true,
    };
    let vo = pool
        .create_volume("appvms/work/volatile", vcfg, MIB)
        .unwrap();
    let served = vo.start().unwrap();
    assert_eq!(read(&served), vec![0u8; MIB as usize]);
    write_at(&served, 0, &pattern(14, 4096));
    assert_eq!(vo.stop().unwrap(), StopOutcome::Discarded);
    assert!(!exists(&served));
    let served = vo.start().unwrap();
    assert_eq!(read(&served), vec![0u8; MIB as usize]);
    vo.stop().unwrap();
    assert_eq!(vo.revert(None).unwrap_err().kind, ErrorKind::WrongKind);
    assert!(temps(&dir).is_empty());
}

fn revisions_variants(root: &Path, kind: FsKind) {
    let pool = pool(root, "p3", kind);
    let dir = pool.dir().to_path_buf();
    // revisions_to_keep = 3: keeps the newest three, numbered on
    let v = pool
        .create_volume("appvms/a/private", VolumeConfig::origin(3), MIB)
        .unwrap();
    for i in 0..5u8 {
        v.start().unwrap();
        write_at(v.dirty_path(), 0, &[i + 1; 4096]);
        v.stop().unwrap();
    }
    let revs = v.revisions().unwrap();
    assert_eq!(revs.iter().map(|r| r.n).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(read(&revs[2].path)[0], 4);
    assert_eq!(read(&revs[0].path)[0], 2);

    // revisions_to_keep = 0: none kept
    let z = pool
        .create_volume("appvms/z/private", VolumeConfig::origin(0), MIB)
        .unwrap();
    z.start().unwrap();
    write_at(z.dirty_path(), 0, &[7; 4096]);
    z.stop().unwrap();
    assert!(z.revisions().unwrap().is_empty());
    assert_eq!(read(z.clean_path())[0], 7);

    // revisions_to_keep = -1: clean renamed to dirty and back, no copies
    let n = pool
        .create_volume("appvms/n/private", VolumeConfig::origin(-1), MIB)
        .unwrap();
    let ino0 = ino(n.clean_path());
    let served = n.start().unwrap();
    assert!(!exists(n.clean_path()));
    assert_eq!(ino(&served), ino0);
    write_at(&served, 0, &[8; 4096]);
    let e = n.discard().unwrap_err();
    assert_eq!(e.kind, ErrorKind::WrongKind, "{e}");
    assert_eq!(n.stop().unwrap(), StopOutcome::Committed);
    assert_eq!(ino(n.clean_path()), ino0);
    assert_eq!(read(n.clean_path())[0], 8);
    assert!(n.revisions().unwrap().is_empty());
    assert_eq!(ls(&dir.join("appvms/n")), ["private.img"]);
    // -1 is only for origins
    let bad = VolumeConfig {
        kind: VolumeKind::Volatile,
        revisions_to_keep: -1,
        source: None,
        size: None,
        rw: true,
    };
    assert_eq!(
        pool.create_volume("appvms/n/volatile", bad, MIB)
            .unwrap_err()
            .kind,
        ErrorKind::InvalidInput
    );
}

fn bad_input(root: &Path, kind: FsKind) {
    let pool = pool(root, "p4", kind);
    let dir = pool.dir().to_path_buf();
    let before = snapshot(&dir);
    let tree_before: Vec<String> = tree(&dir)
        .into_iter()
        .filter(|p| !p.starts_with(".refblk/volumes/"))
        .collect();
    for vid in [
        "",
        "..",
        "../x",
        "/etc/passwd",
        "appvms/../../x",
        "a\0b",
        "appvms/w/x-dirty",
        "appvms//w",
    ] {
        let e = pool
            .create_volume(vid, VolumeConfig::origin(1), MIB)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{vid:?}: {e}");
        assert_eq!(pool.volume(vid).unwrap_err().kind, ErrorKind::InvalidInput);
    }
    let e = pool
        .volume_with(
            "appvms/w/root",
            Overrides {
                kind: Some(VolumeKind::Snapshot),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.msg.contains("source"), "{e}");
    let v = pool.volume("appvms/none/private").unwrap();
    let e = v.start().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.msg.contains("appvms/none/private.img"), "{e}");
    assert_eq!(v.revert(None).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(v.export(None).unwrap_err().kind, ErrorKind::NotFound);
    let snap = pool
        .create_volume(
            "appvms/w/root",
            VolumeConfig {
                kind: VolumeKind::Snapshot,
                source: Some("vm-templates/missing/root".into()),
                revisions_to_keep: 0,
                size: None,
                rw: true,
            },
            MIB,
        )
        .unwrap_err();
    assert_eq!(snap.kind, ErrorKind::NotFound);
    assert_eq!(snapshot(&dir), before, "bad input changed the pool");
    let after: Vec<String> = tree(&dir)
        .into_iter()
        .filter(|p| !p.starts_with(".refblk/volumes/"))
        .collect();
    assert_eq!(after, tree_before);
}
