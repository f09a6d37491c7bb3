//! Image file trouble under a running device: a full file system (ENOSPC), a
//! file system that fails every I/O (EIO: an XFS forced shutdown), an image
//! truncated or deleted under the device. In each case the guest gets
//! BLKIF_RSP_ERROR (or, for truncation/deletion, what a loop device gives),
//! the daemon keeps serving, the device stays Connected, and another guest's
//! device on the same daemon keeps working with its data.

use std::io::Write;
use std::process::Command;

use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{Frontend, FrontendOptions};
use refblk_sim::scratchfs::{require_tools_or_skip, FsKind, ScratchFs};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;

/// A second guest on a tmpfs image, running verified random I/O.
fn bystander(rig: &Rig, domid: u16) -> Frontend {
    let g = rig.guest(domid, 2048);
    let img = make_image(rig.dir.path(), &format!("by{domid}.img"), 8 * MIB);
    rig.attach(domid, XVDA, &img, "w", AttachOptions::default());
    rig.connect(&g, XVDA, FrontendOptions::default())
}

#[test]
fn enospc_gives_write_errors_reads_keep_working() {
    let Some(sfs) = ScratchFs::new_or_skip(FsKind::Ext4, 64 * MIB) else {
        return;
    };
    let Some(rig) = Rig::new() else { return };
    let g = rig.guest(3, 4096);
    let img = sfs.path().join("full.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("image on ext4");
    rig.attach(3, XVDA, &img, "w", AttachOptions::default());
    let mut fe = rig.connect(&g, XVDA, FrontendOptions::default());
    let mut other = bystander(&rig, 4);

    let a = pattern(1, MIB as usize);
    fe.write(0, &a).expect("write before the disk fills");
    fe.flush().expect("flush");

    // Fill the file system.
    let filler = sfs.path().join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0x5au8; MIB as usize];
    let mut filled = 0u64;
    while f.write_all(&chunk).is_ok() {
        filled += 1;
    }
    let _ = f.sync_all();
    drop(f);
    assert!(filled > 8, "could only write {filled} MiB of filler");

    // Writes to unallocated parts of the sparse image fail, one by one.
    let mut failed = 0;
    for k in 0..16u64 {
        let d = pattern(10 + k, 256 << 10);
        let sector = (8 * MIB + k * MIB) / 512;
        if fe.write(sector, &d).is_err() {
            failed += 1;
        }
    }
    assert!(
        failed >= 12,
        "only {failed} of 16 writes to a full file system failed"
    );
    // Reads still work and return what was written before.
    assert_eq!(fe.read(0, MIB as usize).expect("read on a full fs"), a);
    // The other guest is not affected.
    random_rw(&mut other, 7, 300, 16, 32, 8 * MIB);
    let st = rig.status(3, XVDA);
    assert_eq!(st.state, XenbusState::Connected);
    assert!(st.errors >= failed, "errors counter {}", st.errors);

    // Space again: writes work again.
    std::fs::remove_file(&filler).expect("remove filler");
    let d = pattern(99, MIB as usize);
    fe.write(20 * MIB / 512, &d)
        .expect("write after freeing space");
    fe.flush().expect("flush after freeing space");
    assert_eq!(fe.read(20 * MIB / 512, MIB as usize).unwrap(), d);
    assert!(fe.anomalies().is_clean());
    fe.disconnect().expect("disconnect");
    other.disconnect().expect("disconnect");
    rig.shutdown();
    drop(sfs);
}

#[test]
fn eio_from_a_shut_down_file_system_gives_errors_not_a_crash() {
    if !require_tools_or_skip(&["xfs_io"], "forcing an XFS shutdown for EIO") {
        return;
    }
    let Some(sfs) = ScratchFs::new_or_skip(FsKind::Xfs, 300 * MIB) else {
        return;
    };
    let Some(rig) = Rig::new() else { return };
    let g = rig.guest(3, 4096);
    let img = sfs.path().join("eio.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("image on xfs");
    rig.attach(3, XVDA, &img, "w", AttachOptions::default());
    let mut fe = rig.connect(&g, XVDA, FrontendOptions::default());
    let mut other = bystander(&rig, 4);
    let a = pattern(1, MIB as usize);
    fe.write(0, &a).expect("write before the failure");
    fe.flush().expect("flush");

    let out = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(sfs.path())
        .output()
        .expect("run xfs_io");
    assert!(
        out.status.success(),
        "xfs_io shutdown: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every write and flush now fails with an error response.
    for k in 0..8u64 {
        let d = pattern(20 + k, 64 << 10);
        assert!(
            fe.write(k * 256, &d).is_err(),
            "write {k} on a shut down file system succeeded"
        );
    }
    assert!(
        fe.flush().is_err(),
        "flush on a shut down file system succeeded"
    );
    // Reads fail too (O_DIRECT) or come from the page cache; never a hang.
    let _ = fe.read(0, 4096);
    let st = rig.status(3, XVDA);
    assert_eq!(st.state, XenbusState::Connected, "device dropped on EIO");
    assert!(st.errors >= 9, "errors counter {}", st.errors);
    // The daemon and the other guest are fine.
    random_rw(&mut other, 8, 300, 16, 32, 8 * MIB);
    assert!(fe.anomalies().is_clean());
    fe.disconnect().expect("disconnect");
    other.disconnect().expect("disconnect");
    rig.shutdown();
    drop(sfs);
}

#[test]
fn image_truncated_or_deleted_under_a_running_device() {
    let Some(rig) = Rig::new() else { return };
    let g = rig.guest(3, 4096);
    let img = make_image(rig.dir.path(), "victim.img", 16 * MIB);
    rig.attach(3, XVDA, &img, "w", AttachOptions::default());
    let mut fe = rig.connect(&g, XVDA, FrontendOptions::default());
    let mut other = bystander(&rig, 4);
    let a = pattern(1, 16 * MIB as usize);
    for (k, c) in a.chunks(MIB as usize).enumerate() {
        fe.write(k as u64 * MIB / 512, c).expect("fill the disk");
    }
    fe.flush().expect("flush");

    // Truncated to 4 MiB behind the daemon's back: as with a loop device,
    // the advertised size does not change; reads past the new end of file
    // give zeros, and writes there extend the file again.
    std::fs::File::options()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(4 * MIB))
        .expect("truncate");
    for k in 0..4u64 {
        let r = (k * MIB) as usize..((k + 1) * MIB) as usize;
        assert!(
            fe.read(k * MIB / 512, MIB as usize).unwrap() == a[r],
            "data before the cut changed"
        );
    }
    let past = fe.read(8 * MIB / 512, MIB as usize).expect("read past EOF");
    assert!(past.iter().all(|&b| b == 0), "read past EOF is not zeros");
    let d = pattern(2, MIB as usize);
    fe.write(12 * MIB / 512, &d).expect("write past EOF");
    assert_eq!(fe.read(12 * MIB / 512, MIB as usize).unwrap(), d);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 13 * MIB);

    // Deleted: the daemon keeps its open file, as a loop device does; the
    // guest's data stays consistent until it lets go of the disk.
    std::fs::remove_file(&img).expect("delete the image");
    let d2 = pattern(3, MIB as usize);
    fe.write(0, &d2).expect("write to a deleted image");
    fe.flush().expect("flush a deleted image");
    assert_eq!(fe.read(0, MIB as usize).unwrap(), d2);

    random_rw(&mut other, 9, 300, 16, 32, 8 * MIB);
    assert_eq!(rig.status(3, XVDA).state, XenbusState::Connected);
    assert!(fe.anomalies().is_clean());
    fe.disconnect().expect("disconnect");
    other.disconnect().expect("disconnect");
    rig.shutdown();
}
