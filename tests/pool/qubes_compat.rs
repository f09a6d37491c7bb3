//! A pool directory laid out by hand exactly as Qubes' file-reflink driver lays it out
//! (no `.refblk/` sidecars; extra VM files around; revisions with Qubes' names) is
//! listed, started, committed and reverted following Qubes' rules, and what refblk
//! leaves behind is again exactly Qubes' layout.

use std::fs;
use std::path::Path;

use crate::common::*;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use refblk_core::pool::layout::isodate;
use refblk_core::pool::{Overrides, Pool, StopOutcome, VolumeKind, VolumeState};
use refblk_sim::scratchfs::FsKind;

fn set_mtime(p: &Path, secs: i64) {
    let t = TimeSpec::new(secs, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
}

fn put(dir: &Path, rel: &str, data: &[u8], mtime: i64) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    set_mtime(&p, mtime);
}

// 2024-05-06T07:08:09Z
const T_CLEAN: i64 = 1_714_979_289;

fn hand_laid(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let dir = fs.path().join("qubes");
    let size = 256 * 1024;
    let x = pattern(1, size);
    let r3 = pattern(3, size);
    let r5 = pattern(5, size);
    let r10 = pattern(10, size);
    let t = pattern(20, size);
    put(&dir, "appvms/work/private.img", &x, T_CLEAN);
    put(
        &dir,
        "appvms/work/private.img.3@2024-01-01T00:00:00Z",
        &r3,
        1_704_067_200,
    );
    put(
        &dir,
        "appvms/work/private.img.5@2024-03-01T00:00:00Z",
        &r5,
        1_709_251_200,
    );
    put(
        &dir,
        "appvms/work/private.img.10@2024-04-01T00:00:00Z",
        &r10,
        1_711_929_600,
    );
    // a precache from an older session: wrong mtime, must not be used
    put(&dir, "appvms/work/private-precache.img", &r3, 1_700_000_000);
    put(
        &dir,
        "appvms/work/firewall.xml",
        b"<firewall/>",
        1_700_000_000,
    );
    put(&dir, "appvms/work/icon.png", b"png", 1_700_000_000);
    put(&dir, "vm-templates/fedora/root.img", &t, 1_700_000_000);
    put(&dir, "vm-templates/fedora/private.img", &x, 1_700_000_000);
    put(
        &dir,
        "appvms/work/notes.img.txt",
        b"not a volume",
        1_700_000_000,
    );

    let pool = Pool::open(&dir).unwrap();
    assert_eq!(
        pool.list().unwrap(),
        [
            "appvms/work/private",
            "vm-templates/fedora/private",
            "vm-templates/fedora/root"
        ]
    );
    let v = pool.volume("appvms/work/private").unwrap();
    let info = v.info().unwrap();
    assert_eq!(info.config.kind, VolumeKind::Origin);
    assert_eq!(info.config.revisions_to_keep, 1);
    assert!(!info.has_sidecar);
    assert_eq!(info.state, VolumeState::Stopped);
    assert_eq!(
        info.revisions
            .iter()
            .map(|r| (r.n, r.timestamp.as_str()))
            .collect::<Vec<_>>(),
        [
            (3, "2024-01-01T00:00:00"),
            (5, "2024-03-01T00:00:00"),
            (10, "2024-04-01T00:00:00")
        ]
    );

    // start: the stale precache is dropped, dirty is a copy of clean
    let served = v.start().unwrap();
    assert_eq!(served, dir.join("appvms/work/private-dirty.img"));
    assert!(!exists(&dir.join("appvms/work/private-precache.img")));
    assert_eq!(read(&served), x);
    let y = pattern(2, 8192);
    write_at(&served, 4096, &y);
    assert_eq!(v.stop().unwrap(), StopOutcome::Committed);
    // revision 11 (max + 1, numeric order) named after the old clean's mtime; pruned to 1
    let rev11 = format!("private.img.11@{}Z", isodate(T_CLEAN));
    assert_eq!(rev11, "private.img.11@2024-05-06T07:08:09Z");
    assert_eq!(
        ls(&dir.join("appvms/work")),
        vec![
            "firewall.xml".to_string(),
            "icon.png".into(),
            "notes.img.txt".into(),
            "private-precache.img".into(),
            "private.img".into(),
            rev11.clone()
        ]
    );
    let mut xy = x.clone();
    xy[4096..4096 + y.len()].copy_from_slice(&y);
    assert_eq!(read(&dir.join("appvms/work/private.img")), xy);
    assert_eq!(read(&dir.join("appvms/work").join(&rev11)), x);
    let pc = dir.join("appvms/work/private-precache.img");
    assert_eq!(
        mtime_ns(&pc),
        mtime_ns(&dir.join("appvms/work/private.img"))
    );

    // revert to 11: X again, XY archived as 12
    v.revert(Some("11")).unwrap();
    assert_eq!(read(&dir.join("appvms/work/private.img")), x);
    let revs = v.revisions().unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].n, 12);
    assert_eq!(read(&revs[0].path), xy);

    // a dirty image Qubes left behind (VM was running at a crash) is reused and committed
    put(&dir, "appvms/work/private-dirty.img", &r5, 1_700_000_000);
    let dirty_ino = ino(&dir.join("appvms/work/private-dirty.img"));
    assert_eq!(v.state(), VolumeState::Interrupted);
    let served = v.start().unwrap();
    assert_eq!(ino(&served), dirty_ino);
    v.stop().unwrap();
    assert_eq!(read(&dir.join("appvms/work/private.img")), r5);

    // snapshot of the template, settings given as overrides (they live in qubes.xml)
    let root = pool
        .volume_with(
            "appvms/work/root",
            Overrides {
                kind: Some(VolumeKind::Snapshot),
                source: Some("vm-templates/fedora/root".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let served = root.start().unwrap();
    assert_eq!(
        ino(&dir.join("appvms/work/root.img")),
        ino(&dir.join("vm-templates/fedora/root.img"))
    );
    assert_eq!(read(&served), t);
    assert_eq!(root.stop().unwrap(), StopOutcome::Discarded);
    assert!(!exists(&dir.join("appvms/work/root.img")));
    // volatile with a size override
    let vol = pool
        .volume_with(
            "appvms/work/volatile",
            Overrides {
                kind: Some(VolumeKind::Volatile),
                revisions_to_keep: Some(0),
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
    let served = vol.start().unwrap();
    assert_eq!(fs::metadata(&served).unwrap().len(), 1 << 20);
    vol.stop().unwrap();

    // what refblk leaves outside .refblk/ is exactly Qubes' layout: no sidecars were
    // invented for hand-laid volumes, only lock files
    let outside: Vec<String> = tree(&dir)
        .into_iter()
        .filter(|p| !p.starts_with(".refblk"))
        .collect();
    assert_eq!(
        outside,
        [
            "appvms/",
            "appvms/work/",
            "appvms/work/firewall.xml",
            "appvms/work/icon.png",
            "appvms/work/notes.img.txt",
            "appvms/work/private-precache.img",
            "appvms/work/private.img",
            "appvms/work/private.img.13@2024-05-06T07:08:09Z"
                .replace("2024-05-06T07:08:09", &revs_ts(&pool))
                .as_str(),
            "vm-templates/",
            "vm-templates/fedora/",
            "vm-templates/fedora/private.img",
            "vm-templates/fedora/root.img",
        ]
    );
    let sidecars: Vec<String> = tree(&dir.join(".refblk"))
        .into_iter()
        .filter(|p| p.ends_with(".json"))
        .collect();
    assert!(sidecars.is_empty(), "{sidecars:?}");
}

fn revs_ts(pool: &Pool) -> String {
    let v = pool.volume("appvms/work/private").unwrap();
    let r = v.revisions().unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].n, 13);
    r[0].timestamp.clone()
}

#[test]
fn qubes_layout_btrfs() {
    hand_laid(FsKind::Btrfs);
}

#[test]
fn qubes_layout_xfs() {
    hand_laid(FsKind::Xfs);
}

#[test]
fn qubes_layout_ext4() {
    hand_laid(FsKind::Ext4);
}
