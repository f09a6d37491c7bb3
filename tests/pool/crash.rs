//! Crash safety: every operation is killed at every step boundary (fault injection in
//! "crash" mode: step N and everything after it fail, so the disk sees exactly what a
//! process killed at step N leaves), and fails with ENOSPC at every single step. After
//! each, the committed content must be one of the two legitimate versions, and the
//! recovery path (`pool check --repair`, `stop` if it still counts as running, then
//! `start`/`stop`) must work and leave no temporary files.

use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use refblk_core::pool::{
    ErrorKind, FaultMode, Faults, ImportSource, Pool, Volume, VolumeConfig, VolumeKind, VolumeState,
};
use refblk_sim::scratchfs::FsKind;

const SIZE: u64 = MIB;
const RTK: i64 = 2;

const OFF: usize = 64 * 1024;

fn content(seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    let p = pattern(seed.into(), 96 * 1024);
    v[OFF..OFF + p.len()].copy_from_slice(&p);
    v
}

/// Write only the non-zero part of `content(seed)` (the rest is zero in every
/// version), so the test allocates little space.
fn put(path: &Path, seed: u8) {
    write_at(path, OFF as u64, &pattern(seed.into(), 96 * 1024));
}

/// Create `vid` and commit `content(seed)` into it (not counted).
fn committed(pool: &Pool, vid: &str, rtk: i64, seed: u8) -> Volume {
    let v = pool
        .create_volume(vid, VolumeConfig::origin(rtk), SIZE)
        .unwrap();
    let d = v.start().unwrap();
    put(&d, seed);
    v.stop().unwrap();
    v
}

struct Case {
    name: &'static str,
    rtk: i64,
    /// Prepare the volume; returns the legitimate committed contents after the op.
    setup: fn(&Pool, &str, i64) -> Vec<Vec<u8>>,
    op: fn(&Pool, &str) -> refblk_core::pool::Result<()>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "create",
            rtk: RTK,
            setup: |_, _, _| vec![vec![0u8; SIZE as usize]],
            op: |p, vid| {
                p.create_volume(vid, VolumeConfig::origin(RTK), SIZE)
                    .map(|_| ())
            },
        },
        Case {
            name: "start",
            rtk: RTK,
            setup: |p, vid, rtk| {
                committed(p, vid, rtk, 1);
                vec![content(1)]
            },
            op: |p, vid| p.volume(vid)?.start().map(|_| ()),
        },
        Case {
            name: "start-precache-missing",
            rtk: RTK,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                std::fs::remove_file(v.precache_path()).unwrap();
                vec![content(1)]
            },
            op: |p, vid| p.volume(vid)?.start().map(|_| ()),
        },
        Case {
            name: "stop-commit",
            rtk: RTK,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                put(&v.start().unwrap(), 2);
                vec![content(1), content(2)]
            },
            op: |p, vid| p.volume(vid)?.stop().map(|_| ()),
        },
        Case {
            name: "stop-discard",
            rtk: RTK,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                put(&v.start().unwrap(), 2);
                vec![content(1), content(2)]
            },
            op: |p, vid| p.volume(vid)?.discard().map(|_| ()),
        },
        Case {
            name: "revert",
            rtk: RTK,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                put(&v.start().unwrap(), 2);
                v.stop().unwrap();
                vec![content(1), content(2)]
            },
            op: |p, vid| p.volume(vid)?.revert(None).map(|_| ()),
        },
        Case {
            name: "import",
            rtk: RTK,
            setup: |p, vid, rtk| {
                committed(p, vid, rtk, 1);
                let src = p.dir().join(format!("{}.src", vid.replace('/', "_")));
                std::fs::File::create(&src).unwrap().set_len(SIZE).unwrap();
                put(&src, 3);
                vec![content(1), content(3)]
            },
            op: |p, vid| {
                let src = p.dir().join(format!("{}.src", vid.replace('/', "_")));
                p.volume(vid)?.import(ImportSource::File(&src), None)
            },
        },
        Case {
            name: "resize-stopped",
            rtk: RTK,
            setup: |p, vid, rtk| {
                committed(p, vid, rtk, 1);
                let mut big = content(1);
                big.resize(2 * SIZE as usize, 0);
                vec![content(1), big]
            },
            op: |p, vid| p.volume(vid)?.resize(2 * SIZE, false),
        },
        Case {
            name: "resize-running",
            rtk: RTK,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                put(&v.start().unwrap(), 2);
                let mut big = content(2);
                big.resize(2 * SIZE as usize, 0);
                vec![content(1), content(2), big]
            },
            op: |p, vid| p.volume(vid)?.resize(2 * SIZE, false),
        },
        Case {
            name: "start-no-snapshots",
            rtk: -1,
            setup: |p, vid, rtk| {
                committed(p, vid, rtk, 1);
                vec![content(1)]
            },
            op: |p, vid| p.volume(vid)?.start().map(|_| ()),
        },
        Case {
            name: "stop-no-snapshots",
            rtk: -1,
            setup: |p, vid, rtk| {
                let v = committed(p, vid, rtk, 1);
                put(&v.start().unwrap(), 2);
                vec![content(1), content(2)]
            },
            op: |p, vid| p.volume(vid)?.stop().map(|_| ()),
        },
        Case {
            name: "clone-into-existing",
            rtk: RTK,
            setup: |p, vid, rtk| {
                committed(p, vid, rtk, 1);
                let src = format!("{vid}-src").replace("/private-src", "src/private");
                if !p.volume(&src).unwrap().exists().unwrap() {
                    committed(p, &src, rtk, 4);
                }
                vec![content(1), content(4)]
            },
            op: |p, vid| {
                let src = format!("{vid}-src").replace("/private-src", "src/private");
                let s = p.volume(&src)?;
                p.volume(vid)?.clone_from(&s, None)
            },
        },
    ]
}

/// Every revision's content, by path.
fn revision_contents(v: &Volume) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    v.revisions()
        .unwrap()
        .into_iter()
        .map(|r| {
            let c = read(&r.path);
            (r.path, c)
        })
        .collect()
}

/// Revisions never change: each one recorded in `before` is gone (pruned, or
/// renamed into clean by a revert) or holds the same bytes. And after a completed
/// operation no revision is another name of the clean image's inode (a revision
/// is a hard link of the *old* clean image; the commit's rename ends the sharing).
fn assert_revisions_intact(v: &Volume, before: &[(std::path::PathBuf, Vec<u8>)], label: &str) {
    for (path, bytes) in before {
        if exists(path) {
            assert!(read(path) == *bytes, "{label}: {} changed", path.display());
        }
    }
    if exists(v.clean_path()) {
        for r in v.revisions().unwrap() {
            assert_ne!(
                ino(&r.path),
                ino(v.clean_path()),
                "{label}: {} shares the clean image's inode",
                r.path.display()
            );
        }
    }
}

/// After a crash/failure (faults disarmed): check, recover, check again.
fn verify(pool: &Pool, vid: &str, legit: &[Vec<u8>], rtk: i64, label: &str, repair: bool) {
    let v = pool.volume(vid).unwrap();
    let clean = v.clean_path().to_path_buf();
    let revs_before = revision_contents(&v);
    if exists(&clean) {
        let c = read(&clean);
        assert!(
            legit.contains(&c),
            "{label}: committed content is not legitimate"
        );
    }
    if repair {
        let items = pool.check(true).unwrap();
        for i in &items {
            assert!(
                i.repaired || !i.fatal || i.problem.contains("volume start"),
                "{label}: unrepairable: {}",
                i.problem
            );
        }
        let again = pool.check(false).unwrap();
        assert!(
            again.iter().all(|i| i.problem.contains("volume start")),
            "{label}: check after repair still finds {:?}",
            again.iter().map(|i| &i.problem).collect::<Vec<_>>()
        );
    }
    if !exists(&clean) && !exists(v.dirty_path()) && v.revisions().unwrap().is_empty() {
        // an interrupted (or by repair rolled back) create: creating again must work
        assert_eq!(
            legit,
            [vec![0u8; SIZE as usize]],
            "{label}: volume vanished"
        );
        pool.create_volume(vid, VolumeConfig::origin(rtk), SIZE)
            .unwrap();
    }
    if v.state() == VolumeState::Running {
        v.stop()
            .unwrap_or_else(|e| panic!("{label}: recovery stop: {e}"));
    }
    let d = v
        .start()
        .unwrap_or_else(|e| panic!("{label}: recovery start: {e}"));
    let now = read(&d);
    let grown: Vec<Vec<u8>> = legit
        .iter()
        .map(|l| {
            let mut x = l.clone();
            x.resize(now.len(), 0);
            x
        })
        .collect();
    assert!(
        grown.contains(&now),
        "{label}: content after recovery is not legitimate"
    );
    v.stop().unwrap();
    assert!(legit.iter().chain(grown.iter()).any(|l| *l == read(&clean)));
    assert_revisions_intact(&v, &revs_before, label);
    let revs = v.revisions().unwrap();
    assert!(
        revs.len() as i64 <= rtk.max(0),
        "{label}: {} revisions",
        revs.len()
    );
    let vm_dir = clean.parent().unwrap();
    assert!(
        temps(vm_dir).is_empty(),
        "{label}: temps {:?}",
        temps(vm_dir)
    );
    assert!(
        temps(&pool.dir().join(".refblk")).is_empty(),
        "{label}: temps in .refblk"
    );
    assert!(!exists(v.import_path()), "{label}: import left");
    if exists(v.precache_path()) {
        assert_eq!(mtime_ns(v.precache_path()), mtime_ns(&clean), "{label}");
    }
}

fn run(kind: FsKind, mode_name: &str) {
    let Some(fs) = scratch(kind) else { return };
    let faults = Arc::new(Faults::new());
    for case in cases() {
        let pool = pool(fs.path(), &format!("{mode_name}-{}", case.name), kind)
            .with_faults(faults.clone());
        // count the steps of a clean run
        let vid0 = "appvms/count/private";
        let legit = (case.setup)(&pool, vid0, case.rtk);
        faults.disarm();
        (case.op)(&pool, vid0).unwrap_or_else(|e| panic!("{}: clean run: {e}", case.name));
        let steps = faults.count();
        let trace = faults.trace();
        assert!(steps >= 1, "{}: no steps counted", case.name);
        verify(&pool, vid0, &legit, case.rtk, case.name, false);
        for n in 1..=steps {
            let vid = format!("appvms/n{n}/private");
            faults.disarm();
            let legit = (case.setup)(&pool, &vid, case.rtk);
            let mode = if mode_name == "crash" {
                FaultMode::Crash
            } else {
                FaultMode::Fail(libc::ENOSPC)
            };
            faults.arm(n, mode);
            let r = (case.op)(&pool, &vid);
            faults.disarm();
            let step = trace.get(n as usize - 1).cloned().unwrap_or_default();
            let label = format!(
                "{kind} {mode_name} {} at step {n}/{steps} ({step})",
                case.name
            );
            let e = r.err().unwrap_or_else(|| panic!("{label}: did not fail"));
            if mode_name == "enospc" {
                assert_eq!(e.kind, ErrorKind::NoSpace, "{label}: {e}");
                assert!(e.msg.contains("full"), "{label}: {e}");
                // a plain failure cleans its temporary files up by itself
                let vm_dir = pool.dir().join(format!("appvms/n{n}"));
                assert!(temps(&vm_dir).is_empty(), "{label}: {:?}", temps(&vm_dir));
            }
            verify(&pool, &vid, &legit, case.rtk, &label, n % 2 == 0);
        }
        eprintln!("{kind} {mode_name} {}: {steps} steps ok", case.name);
        std::fs::remove_dir_all(pool.dir()).unwrap();
    }
}

#[test]
fn crash_at_every_step_btrfs() {
    run(FsKind::Btrfs, "crash");
}

#[test]
fn crash_at_every_step_ext4() {
    run(FsKind::Ext4, "crash");
}

#[test]
fn crash_at_every_step_xfs() {
    run(FsKind::Xfs, "crash");
}

#[test]
fn enospc_at_every_step_btrfs() {
    run(FsKind::Btrfs, "enospc");
}

#[test]
fn enospc_at_every_step_ext4() {
    run(FsKind::Ext4, "enospc");
}

/// Snapshot and volatile volumes killed at every step of start and stop: the source
/// (template) is never touched, and the next start serves a correct fresh image.
fn snapshot_kinds(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let faults = Arc::new(Faults::new());
    let pool = pool(fs.path(), "snap", kind).with_faults(faults.clone());
    let t = committed(&pool, "vm-templates/t/root", 1, 5);
    let t_ino = ino(t.clean_path());
    let snap = VolumeConfig {
        kind: VolumeKind::Snapshot,
        source: Some("vm-templates/t/root".into()),
        revisions_to_keep: 0,
        size: None,
        rw: true,
    };
    let vola = VolumeConfig {
        kind: VolumeKind::Volatile,
        ..VolumeConfig::origin(0)
    };
    for (name, cfg, expect) in [
        ("snapshot", snap, content(5)),
        ("volatile", vola, vec![0u8; SIZE as usize]),
    ] {
        for stop in [false, true] {
            let prep = |vid: &str| {
                faults.disarm();
                let v = pool.create_volume(vid, cfg.clone(), SIZE).unwrap();
                if stop {
                    put(&v.start().unwrap(), 9);
                }
                v
            };
            let op = |v: &Volume| {
                if stop {
                    v.stop().map(|_| ())
                } else {
                    v.start().map(|_| ())
                }
            };
            let v = prep(&format!("appvms/{name}-{stop}-count/root"));
            faults.disarm();
            op(&v).unwrap();
            let steps = faults.count();
            for n in 1..=steps {
                let v = prep(&format!("appvms/{name}-{stop}-{n}/root"));
                faults.arm(n, FaultMode::Crash);
                let r = op(&v);
                faults.disarm();
                let label = format!("{kind} {name} stop={stop} step {n}/{steps}");
                assert!(r.is_err(), "{label}: did not fail");
                assert_eq!(ino(t.clean_path()), t_ino, "{label}: template replaced");
                assert_eq!(
                    read(t.clean_path()),
                    content(5),
                    "{label}: template changed"
                );
                if n % 2 == 0 {
                    pool.check(true).unwrap();
                }
                if v.state() == VolumeState::Running {
                    v.stop().unwrap();
                }
                let d = v
                    .start()
                    .unwrap_or_else(|e| panic!("{label}: recovery start: {e}"));
                assert_eq!(read(&d), expect, "{label}: recovered image");
                v.stop().unwrap();
                assert!(!exists(v.dirty_path()), "{label}");
                assert!(!exists(v.clean_path()), "{label}");
                assert!(
                    temps(pool.dir()).is_empty(),
                    "{label}: {:?}",
                    temps(pool.dir())
                );
            }
            eprintln!("{kind} {name} stop={stop}: {steps} steps ok");
        }
    }
}

#[test]
fn crash_snapshot_and_volatile_btrfs() {
    snapshot_kinds(FsKind::Btrfs);
}

#[test]
fn crash_snapshot_and_volatile_ext4() {
    snapshot_kinds(FsKind::Ext4);
}

/// Commit archives the old clean image as a revision by hard-linking it, then
/// renames dirty over clean. Killed between the two, the revision and clean are
/// one inode; whatever runs next (discard, a start that serves clean in place,
/// revert, resize, import, commits) must never change a revision.
fn revisions_never_change(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let faults = Arc::new(Faults::new());
    let pool = pool(fs.path(), "revs", kind).with_faults(faults.clone());
    // Where is the link in a commit? Count it on a twin volume.
    let twin = committed(&pool, "appvms/twin/private", RTK, 1);
    put(&twin.start().unwrap(), 2);
    faults.disarm();
    twin.stop().unwrap();
    let trace = faults.trace();
    let link = trace
        .iter()
        .position(|s| s.starts_with("link"))
        .unwrap_or_else(|| panic!("{kind}: commit made no hard link: {trace:?}"))
        as u64
        + 1;
    let vid = "appvms/work/private";
    let v = committed(&pool, vid, RTK, 1);
    put(&v.start().unwrap(), 2);
    // Killed right after the link (and its directory fsync).
    faults.arm(link + 2, FaultMode::Crash);
    assert!(v.stop().is_err(), "{kind}: the armed stop failed");
    faults.disarm();
    let newest = v.revisions().unwrap().pop().expect("the linked revision");
    assert_eq!(
        ino(&newest.path),
        ino(v.clean_path()),
        "{kind}: crash window reached"
    );
    // Revisions seen so far; a name that disappears may later be reused for a new
    // revision (numbers are max+1, timestamps whole seconds), so it is forgotten.
    let mut seen = revision_contents(&v);
    let mut check = |v: &Volume, label: &str| {
        assert_revisions_intact(v, &seen, label);
        seen.retain(|(p, _)| exists(p));
        for r in revision_contents(v) {
            if !seen.iter().any(|(p, _)| *p == r.0) {
                seen.push(r);
            }
        }
    };
    assert_eq!(read(&newest.path), content(1));
    // Throw the run away: the duplicate name goes, clean and revisions stay.
    v.discard().unwrap();
    check(&v, "discard");
    assert_eq!(read(v.clean_path()), content(1));
    // Serve clean in place (revisions_to_keep -1) and write into it.
    let inplace = pool
        .volume_with(
            vid,
            refblk_core::pool::Overrides {
                revisions_to_keep: Some(-1),
                ..Default::default()
            },
        )
        .unwrap();
    put(&inplace.start().unwrap(), 3);
    check(&v, "in-place start");
    inplace.stop().unwrap();
    check(&v, "in-place stop");
    // Ordinary runs, revert, resize, import: revisions made along the way stay too.
    let src = pool.dir().join("import.src");
    std::fs::File::create(&src).unwrap().set_len(SIZE).unwrap();
    put(&src, 6);
    for (i, op) in ["commit", "revert", "resize", "import", "commit"]
        .iter()
        .enumerate()
    {
        match *op {
            "commit" => {
                put(&v.start().unwrap(), 10 + i as u8);
                v.stop().unwrap();
            }
            "revert" => {
                v.revert(None).unwrap();
            }
            "resize" => v.resize(2 * SIZE, false).unwrap(),
            _ => v.import(ImportSource::File(&src), None).unwrap(),
        }
        check(&v, op);
    }
}

#[test]
fn revisions_never_change_btrfs() {
    revisions_never_change(FsKind::Btrfs);
}

#[test]
fn revisions_never_change_xfs() {
    revisions_never_change(FsKind::Xfs);
}

#[test]
fn revisions_never_change_ext4() {
    revisions_never_change(FsKind::Ext4);
}
