//! Discard, flush, barrier, 4096-byte sectors and read-only devices, through
//! the test frontend against the refblk backend.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{wire, Frontend, FrontendOptions, IoRequest};
use refblk_sim::scratchfs::{FsKind, ScratchFs};

const MIB: u64 = 1 << 20;

fn status_of(fe: &mut Frontend, req: IoRequest<'_>) -> i16 {
    let t = fe.submit(None, req).expect("submit");
    fe.wait_for(t, LONG).expect("answer").status
}

fn discard_frees_space(kind: FsKind) {
    let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size()) else {
        return;
    };
    let Some(rig) = Rig::new() else {
        return;
    };
    let image = make_image(fs.path(), "disk.img", 16 * MIB);
    let guest = rig.guest(7, 8192);
    rig.attach(7, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let info = fe.info().unwrap().clone();
    assert!(info.discard, "{kind}: discard not offered: {info:?}");
    assert!(info.discard_granularity >= 512);
    let data = pattern(1, (8 * MIB) as usize);
    fe.write(0, &data).unwrap();
    fe.flush().unwrap();
    let blocks_before = std::fs::metadata(&image).unwrap().blocks();
    assert!(blocks_before * 512 >= 8 * MIB, "{kind}: data not allocated");
    // Punch 1 MiB aligned whole extents: [1 MiB, 5 MiB).
    fe.discard(MIB / 512, 4 * MIB / 512, false).unwrap();
    fe.flush().unwrap();
    let back = fe.read(0, (8 * MIB) as usize).unwrap();
    assert!(back[..MIB as usize] == data[..MIB as usize]);
    assert!(
        back[MIB as usize..(5 * MIB) as usize]
            .iter()
            .all(|b| *b == 0),
        "{kind}: discarded range not zero"
    );
    assert!(back[(5 * MIB) as usize..] == data[(5 * MIB) as usize..]);
    let blocks_after = std::fs::metadata(&image).unwrap().blocks();
    assert!(
        blocks_before - blocks_after >= 4 * MIB / 512,
        "{kind}: st_blocks went from {blocks_before} to {blocks_after} after discarding 4 MiB"
    );
    // The file reads zeros there too, and keeps its size.
    let file = std::fs::read(&image).unwrap();
    assert_eq!(file.len() as u64, 16 * MIB);
    assert!(file[MIB as usize..(5 * MIB) as usize]
        .iter()
        .all(|b| *b == 0));
    // Secure discard zeroes where offered.
    if info.discard_secure {
        fe.discard(6 * MIB / 512, 8, true).unwrap();
        let z = fe.read(6 * MIB / 512, 4096).unwrap();
        assert!(
            z.iter().all(|b| *b == 0),
            "{kind}: secure discard left data"
        );
    }
    let st = rig.status(7, XVDA);
    assert!(st.discards >= 1 && st.errors == 0, "{st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn discard_on_btrfs_reads_zeroes_and_frees_blocks() {
    discard_frees_space(FsKind::Btrfs);
}

#[test]
fn discard_on_xfs_reads_zeroes_and_frees_blocks() {
    discard_frees_space(FsKind::Xfs);
}

fn flush_counts(dir: &Path) {
    let Some(rig) = Rig::new() else {
        return;
    };
    let image = make_image(dir, "flush.img", 4 * MIB);
    let guest = rig.guest(8, 2048);
    rig.attach(8, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let info = fe.info().unwrap().clone();
    assert!(info.flush && info.barrier, "{info:?}");
    let s0 = rig.status(8, XVDA).fdatasyncs;
    fe.write(8, &pattern(2, 4096)).unwrap();
    assert_eq!(
        rig.status(8, XVDA).fdatasyncs,
        s0,
        "a plain write must not fdatasync"
    );
    fe.flush().unwrap();
    let s1 = rig.status(8, XVDA).fdatasyncs;
    assert_eq!(s1, s0 + 1, "FLUSH_DISKCACHE did not reach fdatasync");
    // A barrier writes its data, then flushes.
    let b = pattern(3, 3 * 4096);
    fe.barrier(64, &b).unwrap();
    assert_eq!(
        rig.status(8, XVDA).fdatasyncs,
        s1 + 1,
        "WRITE_BARRIER did not fdatasync"
    );
    assert!(fe.read(64, b.len()).unwrap() == b);
    // An empty barrier is a flush.
    fe.barrier(0, &[]).unwrap();
    assert_eq!(rig.status(8, XVDA).fdatasyncs, s1 + 2);
    // Writes queued before a barrier are on disk when it completes.
    let tags: Vec<_> = (0..16u64)
        .map(|i| {
            let d = pattern(100 + i, 4096);
            fe.submit(
                None,
                IoRequest::Write {
                    sector: 256 + 8 * i,
                    data: &d,
                },
            )
            .unwrap()
        })
        .collect();
    fe.barrier(512, &pattern(99, 4096)).unwrap();
    for t in tags {
        assert_eq!(fe.wait_for(t, LONG).unwrap().status, wire::RSP_OKAY);
    }
    let file = std::fs::read(&image).unwrap();
    for i in 0..16u64 {
        let off = ((256 + 8 * i) * 512) as usize;
        assert!(
            file[off..off + 4096] == pattern(100 + i, 4096)[..],
            "write {i} before the barrier is not on disk"
        );
    }
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn flush_and_barrier_reach_fdatasync_on_tmpfs() {
    let d = machine_dir();
    flush_counts(d.path());
}

#[test]
fn flush_and_barrier_reach_fdatasync_on_ext4() {
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Ext4, 32 * MIB) else {
        return;
    };
    flush_counts(fs.path());
}

#[test]
fn logical_sector_4096_rejects_misaligned_requests() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "4k.img", 4 * MIB);
    let guest = rig.guest(9, 2048);
    let opts = AttachOptions {
        sector_size: 4096,
        ..Default::default()
    };
    rig.attach(9, XVDA, &image, "w", opts);
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let info = fe.info().unwrap().clone();
    assert_eq!(info.sector_size, 4096);
    // Units on the wire stay 512-byte sectors.
    assert_eq!(info.sectors, 4 * MIB / 512);
    let good = pattern(4, 8192);
    fe.write(8, &good).unwrap();
    assert!(fe.read(8, 8192).unwrap() == good);
    let bad = pattern(5, 4096);
    // Misaligned start.
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Write {
                sector: 33,
                data: &bad
            }
        ),
        wire::RSP_ERROR
    );
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Read {
                sector: 1,
                len: 4096
            }
        ),
        wire::RSP_ERROR
    );
    // Aligned start, length not a multiple of 4096 (last segment of 1 sector).
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Write {
                sector: 32,
                data: &pattern(6, 4608)
            }
        ),
        wire::RSP_ERROR
    );
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Read {
                sector: 16,
                len: 512
            }
        ),
        wire::RSP_ERROR
    );
    // Discard must be aligned too.
    if info.discard {
        assert_eq!(
            status_of(
                &mut fe,
                IoRequest::Discard {
                    sector: 8,
                    nr_sectors: 4,
                    secure: false
                }
            ),
            wire::RSP_ERROR
        );
        assert_eq!(
            status_of(
                &mut fe,
                IoRequest::Discard {
                    sector: 3,
                    nr_sectors: 8,
                    secure: false
                }
            ),
            wire::RSP_ERROR
        );
        fe.discard(8, 8, false).unwrap();
        assert!(fe.read(8, 4096).unwrap().iter().all(|b| *b == 0));
    }
    // The refused writes changed nothing.
    assert!(
        fe.read(32, 8192).unwrap().iter().all(|b| *b == 0),
        "a refused write reached the disk"
    );
    assert!(fe.read(8, 8192).unwrap()[4096..] == good[4096..]);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

#[test]
fn read_only_device_refuses_writes() {
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "ro.img", 4 * MIB);
    let content = pattern(7, (4 * MIB) as usize);
    std::fs::write(&image, &content).unwrap();
    let guest = rig.guest(11, 2048);
    rig.attach(11, XVDA, &image, "r", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let info = fe.info().unwrap().clone();
    assert!(info.read_only, "info {:#x} lacks VDISK_READONLY", info.info);
    assert!(!info.discard, "discard offered on a read-only device");
    assert!(fe.read(0, 65536).unwrap() == content[..65536]);
    let data = pattern(8, 4096);
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Write {
                sector: 0,
                data: &data
            }
        ),
        wire::RSP_ERROR
    );
    // Through an indirect request too.
    let big = pattern(9, 256 * 1024);
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Write {
                sector: 0,
                data: &big
            }
        ),
        wire::RSP_ERROR
    );
    assert_eq!(
        status_of(
            &mut fe,
            IoRequest::Barrier {
                sector: 0,
                data: &data
            }
        ),
        wire::RSP_ERROR
    );
    assert_ne!(
        status_of(
            &mut fe,
            IoRequest::Discard {
                sector: 0,
                nr_sectors: 8,
                secure: false
            }
        ),
        wire::RSP_OKAY
    );
    assert!(
        std::fs::read(&image).unwrap() == content,
        "a read-only image changed"
    );
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}
