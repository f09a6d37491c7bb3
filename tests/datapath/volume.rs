//! Pool volumes on the hotplug path: `attach_volume` starts the volume (FICLONE
//! clean → dirty) and serves the dirty image; `detach` (hotplug `remove`)
//! commits it; a backend directory removed without `detach` (toolstack crash)
//! still commits; a volatile volume's writes are thrown away. A commit runs off
//! the control thread: other devices are served while it runs, a re-attach of
//! its volume waits for it, and so does the daemon's stop.

use std::path::Path;

use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_core::pool::{InitOptions, Pool, VolumeConfig, VolumeKind};
use refblk_sim::frontend::{FrontendOptions, Vbd, VbdSpec};
use refblk_sim::scratchfs::{FsKind, ScratchFs};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;

/// The toolstack's part of `xl block-attach` with a pool volume as target.
fn add_volume_vbd(rig: &Rig, domid: u16, pool: &Path, vid: &str) -> Vbd {
    let spec = VbdSpec::new(domid, XVDA, format!("refblk:{}:{vid}", pool.display()));
    let vbd = rig.ts.create_vbd_nodes(&spec).expect("vbd nodes");
    assert!(
        wait_until(LONG, || rig.ts.backend_state(&vbd).unwrap()
            == XenbusState::InitWait),
        "backend never reached InitWait"
    );
    let served = rig
        .backend
        .attach_volume(&vbd.backend_path, pool, vid, AttachOptions::default())
        .expect("attach volume");
    assert!(
        served.to_string_lossy().ends_with("-dirty.img"),
        "{served:?}"
    );
    rig.ts
        .xs()
        .write(
            0,
            &format!("{}/hotplug-status", vbd.backend_path),
            b"connected",
        )
        .unwrap();
    vbd
}

fn guest_writes(
    rig: &Rig,
    guest: &std::sync::Arc<refblk_sim::SimGuest>,
    byte: u8,
) -> refblk_sim::frontend::Frontend {
    let mut fe = rig.connect(guest, XVDA, FrontendOptions::default());
    fe.write(0, &vec![byte; 64 * 1024]).expect("guest write");
    fe.flush().expect("guest flush");
    fe
}

fn clean(pool: &Path, vid: &str) -> Vec<u8> {
    std::fs::read(pool.join(format!("{vid}.img"))).expect("clean image")
}

fn run_on(pool_dir: &Path, setup_check: bool) {
    let Some(rig) = Rig::new() else { return };
    let pool = Pool::init(
        pool_dir,
        &InitOptions {
            setup_check,
            ..InitOptions::default()
        },
    )
    .expect("pool init");
    pool.create_volume("appvms/work/private", VolumeConfig::origin(2), 8 * MIB)
        .expect("create origin");
    pool.create_volume(
        "appvms/work/volatile",
        VolumeConfig {
            kind: VolumeKind::Volatile,
            source: None,
            revisions_to_keep: 0,
            size: Some(8 * MIB),
            rw: true,
        },
        8 * MIB,
    )
    .expect("create volatile");
    let vid = "appvms/work/private";

    // 1. Start, write, hotplug remove (detach) commits.
    let g31 = rig.guest(31, 4096);
    let vbd = add_volume_vbd(&rig, 31, pool_dir, vid);
    let mut fe = guest_writes(&rig, &g31, 0xA1);
    assert!(
        clean(pool_dir, vid).iter().all(|&b| b == 0),
        "committed early"
    );
    fe.disconnect().unwrap();
    let what = rig.backend.detach(&vbd.backend_path).expect("detach");
    assert!(what.contains("Committed"), "{what}");
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    let c = clean(pool_dir, vid);
    assert!(c[..64 * 1024].iter().all(|&b| b == 0xA1), "not committed");
    let vol = pool.volume(vid).unwrap();
    assert_eq!(
        vol.revisions().unwrap().len(),
        1,
        "the old clean image is a revision"
    );
    drop(fe);
    rig.ts.destroy_domain(31).unwrap();

    // 2. A second start while the first still runs is refused, and the pool is
    //    left as it was.
    let g32 = rig.guest(32, 4096);
    let vbd = add_volume_vbd(&rig, 32, pool_dir, vid);
    let spec = VbdSpec::new(33, XVDA, "unused");
    let _g33 = rig.guest(33, 16);
    let other = rig.ts.create_vbd_nodes(&spec).unwrap();
    assert!(wait_until(LONG, || rig.ts.backend_state(&other).unwrap()
        == XenbusState::InitWait));
    let err = rig
        .backend
        .attach_volume(&other.backend_path, pool_dir, vid, AttachOptions::default())
        .expect_err("second start of a running volume");
    // The pool's refusal, typed as such.
    assert!(
        matches!(err, refblk_core::backend::CommandError::Pool(_)),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(err.contains("running") || err.contains("busy"), "{err}");
    rig.ts.force_remove_vbd(&other).unwrap();

    // 3. Guest writes, then the toolstack removes the backend directory without
    //    a hotplug remove: the daemon still commits.
    let mut fe = guest_writes(&rig, &g32, 0xB2);
    fe.disconnect().unwrap();
    drop(fe);
    rig.ts.force_remove_vbd(&vbd).unwrap();
    assert!(
        wait_until(LONG, || clean(pool_dir, vid)[0] == 0xB2),
        "not committed after removal"
    );
    assert_eq!(pool.volume(vid).unwrap().revisions().unwrap().len(), 2);

    // 4. A volatile volume: its writes are gone after detach.
    let vv = "appvms/work/volatile";
    let g34 = rig.guest(34, 4096);
    let vbd = add_volume_vbd(&rig, 34, pool_dir, vv);
    let mut fe = guest_writes(&rig, &g34, 0xC3);
    fe.disconnect().unwrap();
    let what = rig.backend.detach(&vbd.backend_path).expect("detach");
    assert!(!what.contains("Committed"), "{what}");
    assert!(!pool_dir.join(format!("{vv}-dirty.img")).exists());
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.shutdown();
}

#[test]
fn volumes_on_tmpfs_with_the_copy_fallback() {
    let d = machine_dir();
    run_on(&d.path().join("pool"), false);
}

#[test]
fn volumes_on_btrfs() {
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Btrfs, 256 * MIB) else {
        return;
    };
    run_on(&fs.path().join("pool"), true);
}

#[test]
fn volumes_on_xfs() {
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Xfs, 320 * MIB) else {
        return;
    };
    run_on(&fs.path().join("pool"), true);
}

/// Issue 17, item 5: a commit never blocks the control thread. Volume A's
/// commit is held (`pool::hold_next_commit`, with the volume's lock taken, as
/// a slow FICLONE would) while device B goes through its whole life —
/// attach, connect, verified I/O, detach, removal — and A's guest "reboots":
/// its re-attach waits for the commit and then serves the committed data.
/// A second held commit keeps the daemon's stop waiting until it is done.
#[test]
fn a_held_commit_blocks_neither_other_devices_nor_a_reattach() {
    let Some(rig) = Rig::new() else { return };
    let vid = "appvms/held/private";
    let pool_dir = pool_with_volume(rig.dir.path(), vid, 1, 8 * MIB);
    let target = format!("pool:{}:{vid}", pool_dir.display());
    const B_DISK: u64 = 4 * MIB;

    let ga = rig.guest(40, 4096);
    let va = add_volume_vbd(&rig, 40, &pool_dir, vid);
    let mut fe = guest_writes(&rig, &ga, 0xA1);
    fe.disconnect().unwrap();
    drop(fe);

    std::thread::scope(|s| {
        // Owned by this closure: a failed assertion drops it, which lets the
        // commit go on, so the scope's threads end.
        let hold = refblk_core::pool::hold_next_commit(vid);
        let detach_a = s.spawn(|| rig.backend.detach(&va.backend_path));
        assert!(hold.wait_held(HANG), "A's commit never started");

        // B's whole life while A's commit is held.
        let img = make_image(rig.dir.path(), "b.img", B_DISK);
        let gb = rig.guest(41, 8192);
        let vb = rig.attach(41, XVDA, &img, "w", AttachOptions::default());
        let mut feb = rig.connect(&gb, XVDA, FrontendOptions::default());
        let (_, model) = random_rw(&mut feb, 17, 200, 16, 64, B_DISK);
        assert!(feb.anomalies().is_clean(), "{:?}", feb.anomalies());
        feb.disconnect().unwrap();
        assert_eq!(rig.backend.detach(&vb.backend_path).unwrap(), "released");
        assert!(rig.ts.remove_vbd(&vb).unwrap(), "B's backend never closed");
        assert!(std::fs::read(&img).unwrap() == model, "B's image");

        // A's guest reboots: the toolstack removes A's vbd and adds the
        // volume again for the new domain. The attach waits for the commit.
        assert!(rig.ts.remove_vbd(&va).unwrap(), "A's backend never closed");
        rig.ts.destroy_domain(40).unwrap();
        let ga2 = rig.guest(42, 4096);
        let reattach = s.spawn(|| rig.ts.add_vbd(&VbdSpec::new(42, XVDA, target.as_str())));
        assert!(
            wait_until(HANG, || rig.backend.status().iter().any(
                |d| d.domid == 42 && d.waiting_for_commit.as_deref() == Some(vid)
            )),
            "A's re-attach is not waiting for the commit"
        );
        assert!(
            !reattach.is_finished(),
            "A's re-attach answered before the commit"
        );
        // The commit is held, so the detach cannot have been answered.
        assert!(
            !detach_a.is_finished(),
            "A's detach answered before its commit"
        );
        hold.release();
        let what = detach_a.join().unwrap().expect("A's detach commits");
        assert!(what.contains("Committed"), "{what}");
        let va2 = reattach
            .join()
            .unwrap()
            .expect("A's re-attach, after the commit");
        assert!(clean(&pool_dir, vid)[..64 * 1024]
            .iter()
            .all(|&b| b == 0xA1));
        let mut fe2 = rig.connect(&ga2, XVDA, FrontendOptions::default());
        assert!(
            fe2.read(0, 64 * 1024).unwrap().iter().all(|&b| b == 0xA1),
            "the re-attached volume does not serve the committed data"
        );
        fe2.write(0, &vec![0xA2; 4096]).unwrap();
        fe2.flush().unwrap();
        fe2.disconnect().unwrap();

        // The daemon's stop waits for a commit in flight, and the commit's
        // detach is answered before the daemon is gone.
        let hold = refblk_core::pool::hold_next_commit(vid);
        let backend = rig.backend.clone();
        let detach_a2 = s.spawn(move || backend.detach(&va2.backend_path));
        assert!(hold.wait_held(HANG), "A's second commit never started");
        rig.backend.stop();
        assert!(!detach_a2.is_finished(), "answered before its commit");
        hold.release();
        let what = detach_a2
            .join()
            .unwrap()
            .expect("A's second detach commits");
        assert!(what.contains("Committed"), "{what}");
    });
    assert_eq!(clean(&pool_dir, vid)[0], 0xA2, "second commit");
    let vol = Pool::open(&pool_dir).unwrap().volume(vid).unwrap();
    assert_eq!(vol.state(), refblk_core::pool::VolumeState::Stopped);
    rig.shutdown();
}
