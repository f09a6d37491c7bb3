//! Zero-copy reads (issue 21): with persistent grants, a read whose segments
//! are all mapped (and fit the image's direct-I/O alignment) goes straight
//! from io_uring into the guest's mapped pages. The data must be exactly what
//! the copy path gives — on tmpfs, btrfs (NOCOW), XFS and ext4, for full
//! pages, partial segments, EOF and indirect requests — the `zero_copy_reads`
//! counter must say which path a read took, a page must never be unmapped
//! while a read into it is in flight, writes must keep copying (a guest
//! changing its page during a write on btrfs cannot break a data checksum),
//! and a btrfs file with data checksums is read through the copy path (a
//! guest changing its page during a read cannot make btrfs report
//! corruption).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::kit::*;
use crate::persistent::counted_backend;
use refblk_core::backend::{AttachOptions, BackendConfig};
use refblk_core::engine::{DirectPolicy, ImageFile, IoMode};
use refblk_sim::frontend::{wire, Frontend, FrontendOptions, IoRequest, VbdSpec};
use refblk_sim::scratchfs::{have_tool, run, skip_or_fail, FsKind, ScratchFs};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;

fn zero_copy_config() -> BackendConfig {
    BackendConfig {
        persistent_grants: true,
        ..BackendConfig::default()
    }
}

fn zero_copy_reads(rig: &Rig, domid: u16) -> u64 {
    rig.status(domid, XVDA).stats.zero_copy_reads
}

/// The backend's rule for a read of `len` bytes at `sector` laid out on the
/// page grid as the test frontend (and Linux's page cache) does: the file
/// offset and every segment's length must be multiples of the direct-I/O
/// offset alignment, every segment's start in its page of the memory
/// alignment. A buffered image takes any read.
fn fits_direct_io(mode: &IoMode, sector: u64, len: usize) -> bool {
    let IoMode::Direct {
        offset_align,
        mem_align,
    } = mode
    else {
        return true;
    };
    let (oa, ma) = (u64::from(*offset_align), u64::from(*mem_align));
    if !(sector * 512).is_multiple_of(oa) {
        return false;
    }
    let nsect = len as u64 / 512;
    let mut cur = 0;
    while cur < nsect {
        let first = (sector + cur) % 8;
        let n = (8 - first).min(nsect - cur);
        if !(first * 512).is_multiple_of(ma) || !(n * 512).is_multiple_of(oa) {
            return false;
        }
        cur += n;
    }
    true
}

/// How a test makes its image file, and so which path its reads must take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageKind {
    /// An ordinary file: zero-copy where the alignment allows, except on
    /// btrfs, whose data checksums mean the copy path for every read.
    Plain,
    /// A NOCOW file (`chattr +C` while empty; on btrfs: no data checksums).
    Nocow,
}

/// Create `path` as `kind` with `data` in it.
fn write_image(path: &Path, kind: ImageKind, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    if kind == ImageKind::Nocow {
        run("chattr", &["+C", &path.to_string_lossy()]).expect("chattr +C");
        let attrs = run("lsattr", &[&path.to_string_lossy()]).expect("lsattr");
        let flags = attrs.split_whitespace().next().unwrap_or_default();
        assert!(flags.contains('C'), "not NOCOW: {attrs}");
    }
    std::os::unix::fs::FileExt::write_all_at(&f, data, 0).unwrap();
    f.sync_all().unwrap();
}

/// Attach `image` to `domid`, connect a frontend with persistent grants (it
/// must get them) and grant `pages` whole pages of a known pattern: the
/// frontend, the pages' frames and one whole-page segment per page.
fn persistent_pages(
    rig: &Rig,
    guest: &Arc<refblk_sim::SimGuest>,
    domid: u16,
    image: &Path,
    pages: u32,
) -> (Frontend, Vec<u32>, Vec<wire::Seg>) {
    rig.attach(domid, XVDA, image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        guest,
        XVDA,
        FrontendOptions {
            persistent: true,
            ..FrontendOptions::default()
        },
    );
    assert!(fe.info().expect("connected").persistent);
    let mut frames = Vec::new();
    let mut segs = Vec::new();
    for i in 0..pages {
        let (frame, gref) = fe
            .raw_grant_page(&pattern(u64::from(i), 4096), false)
            .unwrap();
        frames.push(frame);
        segs.push(wire::Seg {
            gref,
            first_sect: 0,
            last_sect: 7,
        });
    }
    (fe, frames, segs)
}

/// One read on queue 0, checked against `want`; returns how many of its
/// ring requests went zero-copy (by the counter).
fn checked_read(rig: &Rig, fe: &mut Frontend, domid: u16, sector: u64, want: &[u8]) -> u64 {
    let before = zero_copy_reads(rig, domid);
    let t = fe
        .submit(
            Some(0),
            IoRequest::Read {
                sector,
                len: want.len(),
            },
        )
        .expect("submit read");
    let c = fe.wait_for(t, LONG).expect("read completes");
    assert_eq!(c.status, 0, "read of {} at sector {sector}", want.len());
    assert_eq!(c.ring_requests, 1, "one ring request per read here");
    if c.data != want {
        let pos = c.data.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "read of {} bytes at sector {sector}: first difference at byte {pos:?}",
            want.len()
        );
    }
    zero_copy_reads(rig, domid) - before
}

/// Verified reads of every shape on an image of `kind` in `dir`: full pages,
/// partial segments, 11 direct segments, indirect (16 and 256 segments), a
/// random verified workload with up to 16 requests in flight, then reads
/// across and past the end of a file truncated under the device. Each read's
/// path is checked against the rule: with `zero_copy` false (a btrfs file
/// with data checksums) every read must take the copy path. Returns the
/// image's I/O mode (None: skipped).
fn verified_reads_on(
    dir: &Path,
    domid: u16,
    label: &str,
    kind: ImageKind,
    zero_copy: bool,
) -> Option<IoMode> {
    let rig = Rig::with_config(zero_copy_config())?;
    let image = dir.join(format!("zc{domid}.img"));
    write_image(&image, kind, &pattern(u64::from(domid), DISK as usize));
    let opened = ImageFile::open(&image, true, DirectPolicy::Auto)
        .expect("open the image as the backend does");
    let mode = opened.io_mode.clone();
    eprintln!(
        "{label} ({kind:?}): image I/O mode {mode:?}, data checksums {}",
        opened.fs.data_checksums
    );
    assert_eq!(
        opened.fs.data_checksums, !zero_copy,
        "{label} ({kind:?}): what the backend finds out about the file"
    );
    let guest = rig.guest(domid, 16384);
    let vbd = rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            persistent: true,
            ring_page_order: 1,
            ..FrontendOptions::default()
        },
    );
    assert!(fe.info().expect("connected").persistent);
    let content = std::fs::read(&image).unwrap();
    // (sector, bytes): full pages; partial first/last segments; 11 direct
    // segments; indirect with 16 and 256 segments (1 MiB).
    let cases: [(u64, usize); 10] = [
        (0, 4096),
        (8, 8192),
        (64, 11 * 4096),
        (256, 64 << 10),
        (4096, 1 << 20),
        (1, 512),
        (3, 3 * 512),
        (7, 4096),
        (9, 20 * 512),
        (2045, 40 * 512),
    ];
    let (mut zc, mut copied) = (0, 0);
    for (sector, len) in cases {
        let at = (sector * 512) as usize;
        let took = checked_read(&rig, &mut fe, domid, sector, &content[at..at + len]);
        let want = zero_copy && fits_direct_io(&mode, sector, len);
        assert_eq!(
            took,
            u64::from(want),
            "{label} ({kind:?}): read of {len} bytes at sector {sector} ({mode:?}): zero-copy expected {want}"
        );
        if want {
            zc += 1;
        } else {
            copied += 1;
        }
    }
    if zero_copy {
        assert!(zc >= 5, "{label}: page-aligned reads went zero-copy");
    } else {
        assert_eq!(zc, 0, "{label}: every read copied");
    }
    if let IoMode::Direct { offset_align, .. } = mode {
        if offset_align > 512 {
            assert!(
                copied > 0,
                "{label}: partial segments must take the copy path"
            );
        }
    }
    // Many reads and writes in flight, verified against a model.
    let before = zero_copy_reads(&rig, domid);
    let (_, mut model) = random_rw(&mut fe, 100 + u64::from(domid), 300, 16, 64, DISK);
    assert!(
        std::fs::read(&image).unwrap() == model,
        "{label}: image differs from the model"
    );
    assert_eq!(
        zero_copy_reads(&rig, domid) > before,
        zero_copy,
        "{label} ({kind:?}): zero-copy reads under load: expected {zero_copy}"
    );
    // End of file: truncated (not on a sector boundary) under the device,
    // which keeps its size; what lies past the end reads as zeros.
    let eof = DISK - 5000;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(eof)
        .unwrap();
    model[eof as usize..].fill(0);
    for (sector, len) in [(DISK / 512 - 128, 64 << 10), (DISK / 512 - 8, 4096)] {
        let at = (sector * 512) as usize;
        let took = checked_read(&rig, &mut fe, domid, sector, &model[at..at + len]);
        assert_eq!(
            took,
            u64::from(zero_copy),
            "{label} ({kind:?}): EOF read at sector {sector}: zero-copy expected {zero_copy}"
        );
    }
    let st = rig.status(domid, XVDA);
    assert_eq!(st.stats.errors, 0, "{st:?}");
    assert_eq!(st.stats.stalls, 0, "{st:?}");
    if !zero_copy {
        assert_eq!(st.stats.zero_copy_reads, 0, "{label}: {st:?}");
    }
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    eprintln!(
        "{label}: {} zero-copy reads of {} reads",
        st.stats.zero_copy_reads,
        st.stats
            .op(refblk_core::backend::stats::OpClass::Read)
            .requests
    );
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.shutdown();
    Some(mode)
}

#[test]
fn zero_copy_reads_verified_on_tmpfs() {
    let dir = machine_dir();
    verified_reads_on(dir.path(), 61, "tmpfs", ImageKind::Plain, true);
}

fn on_fs(kind: FsKind, domid: u16) {
    let Some(fs) = ScratchFs::new_or_skip(kind, kind.min_size().max(64 * MIB)) else {
        return;
    };
    verified_reads_on(
        fs.path(),
        domid,
        &format!("{kind:?}"),
        ImageKind::Plain,
        true,
    );
}

/// On btrfs an ordinary file has data checksums: every read takes the copy
/// path (`guest_changing_pages_during_reads_cannot_make_btrfs_report_corruption`
/// says why). A NOCOW file has none, and its reads go zero-copy where the
/// alignment allows.
#[test]
fn zero_copy_reads_verified_on_btrfs() {
    if !have_tool("chattr") && !skip_or_fail("chattr (e2fsprogs) is not installed") {
        return;
    }
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Btrfs, FsKind::Btrfs.min_size().max(64 * MIB))
    else {
        return;
    };
    verified_reads_on(fs.path(), 62, "Btrfs", ImageKind::Plain, false);
    verified_reads_on(fs.path(), 66, "Btrfs", ImageKind::Nocow, true);
}

#[test]
fn zero_copy_reads_verified_on_xfs() {
    on_fs(FsKind::Xfs, 63);
}

#[test]
fn zero_copy_reads_verified_on_ext4() {
    on_fs(FsKind::Ext4, 64);
}

/// XFS on a loop device with 4 KiB logical sectors: O_DIRECT needs 4 KiB
/// alignment, so reads with partial segments must take the copy path (the
/// test checks that some did) and still read right.
#[test]
fn zero_copy_reads_verified_on_xfs_with_4k_sectors() {
    let Some(fs) =
        ScratchFs::with_sector_size_or_skip(FsKind::Xfs, FsKind::Xfs.min_size(), Some(4096))
    else {
        return;
    };
    let mode = verified_reads_on(fs.path(), 65, "Xfs-4k", ImageKind::Plain, true);
    assert!(
        mode.is_none()
            || matches!(
                mode,
                Some(IoMode::Direct {
                    offset_align: 4096,
                    ..
                })
            ),
        "not the 4 KiB direct-I/O alignment this test is about: {mode:?}"
    );
}

/// Reads of every shape, verified: (the zero-copy counter after them, how
/// many fit the image's direct-I/O alignment).
fn some_reads(rig: &Rig, domid: u16, frontend_persistent: bool) -> (u64, u64) {
    let dir = machine_dir();
    let image = dir.path().join("plain.img");
    let content = pattern(7, (2 * MIB) as usize);
    std::fs::write(&image, &content).unwrap();
    let mode = ImageFile::open(&image, true, DirectPolicy::Auto)
        .unwrap()
        .io_mode
        .clone();
    let guest = rig.guest(domid, 4096);
    rig.attach(domid, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            persistent: frontend_persistent,
            ..FrontendOptions::default()
        },
    );
    let mut fit = 0;
    for (sector, len) in [(0u64, 4096usize), (8, 64 << 10), (3, 512), (512, 1 << 20)] {
        let at = (sector * 512) as usize;
        checked_read(rig, &mut fe, domid, sector, &content[at..at + len]);
        fit += u64::from(fits_direct_io(&mode, sector, len));
    }
    let n = zero_copy_reads(rig, domid);
    fe.disconnect().unwrap();
    (n, fit)
}

/// The copy path stays the default: no zero-copy read without persistent
/// grants (the backend not allowing them, or the frontend not offering
/// them), nor with zero-copy reads turned off; with both, reads go
/// zero-copy.
#[test]
fn zero_copy_reads_only_with_persistent_grants() {
    let Some(rig) = Rig::new() else {
        return;
    };
    assert_eq!(
        some_reads(&rig, 71, true).0,
        0,
        "backend without persistent grants"
    );
    rig.shutdown();
    let Some(rig) = Rig::with_config(BackendConfig {
        zero_copy_reads: false,
        ..zero_copy_config()
    }) else {
        return;
    };
    assert_eq!(
        some_reads(&rig, 72, true).0,
        0,
        "zero-copy reads turned off"
    );
    rig.shutdown();
    let rig = Rig::with_config(zero_copy_config()).expect("rig");
    assert_eq!(
        some_reads(&rig, 73, false).0,
        0,
        "frontend without persistent grants"
    );
    let (zc, fit) = some_reads(&rig, 74, true);
    assert!(fit >= 3, "page-aligned reads fit any alignment");
    assert_eq!(zc, fit, "persistent grants negotiated");
    rig.shutdown();
}

/// Eviction pressure: a cache of 16 pages per queue, 48 reads and writes of
/// up to 5 pages in flight (a pool of up to 240 pages): purge passes drop
/// pages constantly, and must never unmap a page a read in flight is
/// filling. A pass drops only pages unused since the previous one, at most
/// once per 64 page uses, so it takes this many requests in flight for a
/// read's pages to age while it runs. Without the pins (pages released once
/// the read is queued) the dropped mappings are unmapped before the kernel
/// writes them: reads fail (EFAULT) or land in a page mapped at the same
/// address since (wrong data): 6 of 6 runs failed so (with 16 in flight,
/// enough while the cache evicted on every miss, 0 of 3 did). The
/// platform counts every map, so the bound is checked as the hypervisor
/// would see it.
#[test]
fn eviction_pressure_never_unmaps_a_page_a_read_fills() {
    const MAX: usize = 16;
    const RING_ORDER: u32 = 1;
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let cfg = BackendConfig {
        max_persistent_grants: MAX,
        ..zero_copy_config()
    };
    let (sim, count, backend, mut running, ts) = counted_backend(dir.path(), cfg);
    let domid = 75;
    ts.create_domain(domid).expect("create domain");
    let guest = Arc::new(sim.create_guest(domid, 16384).expect("create guest"));
    let image = dir.path().join("evict.img");
    std::fs::write(&image, pattern(75, DISK as usize)).unwrap();
    ts.add_vbd(&VbdSpec::new(domid, XVDA, &image))
        .expect("add vbd");
    let mut fe = Frontend::connect(
        &sim.xenstored_path(),
        guest.clone(),
        XVDA,
        FrontendOptions {
            persistent: true,
            ring_page_order: RING_ORDER,
            ..FrontendOptions::default()
        },
    )
    .expect("frontend connect");
    assert!(fe.info().expect("connected").persistent);
    let zc = || {
        backend
            .status()
            .iter()
            .find(|s| s.domid == domid)
            .map_or(0, |s| s.stats.zero_copy_reads)
    };
    let unmapped_before = count.unmapped.load(Ordering::SeqCst);
    for round in 0..10 {
        let (_, model) = random_rw(&mut fe, 750 + round, 400, 48, 40, DISK);
        assert!(
            std::fs::read(&image).unwrap() == model,
            "round {round}: image differs from the model"
        );
    }
    let st = backend
        .status()
        .into_iter()
        .find(|s| s.domid == domid)
        .expect("device");
    let evicted = count.unmapped.load(Ordering::SeqCst) - unmapped_before;
    let peak = count.peak.load(Ordering::SeqCst);
    let bound = (1 << RING_ORDER) + MAX;
    eprintln!(
        "eviction pressure: {} zero-copy reads, {evicted} pages unmapped while connected, peak {peak} mapped (bound {bound})",
        zc()
    );
    assert_eq!(st.stats.errors, 0, "{st:?}");
    assert!(
        zc() > 100,
        "too few zero-copy reads to mean anything: {}",
        zc()
    );
    assert!(evicted > 100, "the cache hardly purged ({evicted})");
    assert!(peak <= bound, "peak {peak} pages mapped, bound {bound}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    drop(fe);
    backend.stop();
    let join = running.1.take().expect("backend thread");
    join.join().expect("backend thread").expect("backend run");
    assert_eq!(count.live.load(Ordering::SeqCst), 0, "pages still mapped");
}

/// Read `len` bytes at `offset` of `path` with O_DIRECT (past the page cache:
/// btrfs checks the data against its checksums; EIO if they disagree).
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len + 4096];
    let skip = buf.as_ptr().align_offset(4096);
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut buf[skip..skip + len])
        .unwrap_or_else(|e| panic!("O_DIRECT read of the image at {offset}: {e}"));
    buf[skip..skip + len].to_vec()
}

/// Writes keep the copy: a guest that keeps rewriting its data pages while
/// its writes are in flight on btrfs (data checksums on) cannot make the
/// image's data disagree with its checksums. After each write the disk reads
/// back (through the device and with O_DIRECT from the image, which btrfs
/// checks against its checksums) the same bytes, and `btrfs scrub` finds no
/// error.
#[test]
fn guest_changing_pages_during_writes_cannot_break_btrfs_checksums() {
    const PAGES: u32 = 8;
    const WRITES: u64 = 24;
    if !have_tool("btrfs") && !skip_or_fail("btrfs-progs (btrfs scrub) is not installed") {
        return;
    }
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Btrfs, FsKind::Btrfs.min_size()) else {
        return;
    };
    let Some(rig) = Rig::with_config(zero_copy_config()) else {
        return;
    };
    let domid = 76;
    let image = make_image(fs.path(), "scribbled.img", DISK);
    let guest = rig.guest(domid, 4096);
    let (mut fe, frames, segs) = persistent_pages(&rig, &guest, domid, &image, PAGES);
    let abi = fe.info().unwrap().abi;
    for w in 0..WRITES {
        let sector = w * 8 * u64::from(PAGES);
        // The guest rewrites its pages as fast as it can while the write runs.
        let stop = Arc::new(AtomicBool::new(false));
        let scribbler = {
            let (stop, guest, frames) = (stop.clone(), guest.clone(), frames.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(w);
                let mut buf = vec![0u8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 4 {
                    rng.fill(&mut buf);
                    for &f in &frames {
                        guest.write_page(f, 0, &buf).unwrap();
                    }
                    n += 1;
                }
                n
            })
        };
        let id = (1 << 60) + w;
        let mut slot = fe.raw_slot();
        wire::encode_rw(
            abi,
            &mut slot,
            wire::OP_WRITE,
            PAGES as u8,
            0,
            id,
            sector,
            &segs,
        );
        fe.raw_push(0, id, &slot).unwrap();
        fe.raw_publish(0).unwrap();
        let r = fe.wait_raw_responses(1, LONG).expect("write answered");
        stop.store(true, Ordering::Relaxed);
        let rounds = scribbler.join().unwrap();
        assert_eq!((r.len(), r[0].id, r[0].status), (1, id, 0), "write {w}");
        assert!(rounds >= 4);
        // What the device reads back is what the image holds, past the page
        // cache (checksums verified by btrfs).
        let len = PAGES as usize * 4096;
        let via_device = fe.read(sector, len).expect("read back");
        let on_disk = read_direct(&image, sector * 512, len);
        assert!(
            via_device == on_disk,
            "write {w}: the device and the image disagree"
        );
    }
    std::fs::File::open(&image).unwrap().sync_all().unwrap();
    run("sync", &[]).unwrap();
    let mnt = fs.path().to_string_lossy().into_owned();
    let scrub = run("btrfs", &["scrub", "start", "-B", "-R", &mnt])
        .unwrap_or_else(|e| panic!("btrfs scrub: {e}"));
    eprintln!("btrfs scrub:\n{scrub}");
    for field in [
        "csum_errors",
        "read_errors",
        "verify_errors",
        "uncorrectable_errors",
    ] {
        let bad = scrub.lines().any(|l| {
            let l = l.trim();
            l.starts_with(field) && l.split_whitespace().nth(1).is_some_and(|v| v != "0")
        });
        assert!(!bad, "btrfs scrub reports {field}:\n{scrub}");
    }
    let st = rig.status(domid, XVDA);
    assert_eq!(st.stats.errors, 0, "{st:?}");
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
}

/// `btrfs device stats` of the file system mounted at `mnt`: every counter
/// (`[/dev/loopN].corruption_errs 0`, ...) by its name after the dot.
fn btrfs_device_stats(mnt: &str) -> Vec<(String, u64)> {
    let out = run("btrfs", &["device", "stats", mnt])
        .unwrap_or_else(|e| panic!("btrfs device stats: {e}"));
    out.lines()
        .filter_map(|l| {
            let (name, value) = l.trim().split_once(char::is_whitespace)?;
            let field = name.rsplit('.').next()?;
            Some((field.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// What [`scribbled_reads`] saw.
struct Scribbled {
    reads: u64,
    zero_copy: u64,
    /// (round, id, status) of every read that failed.
    failed: Vec<(u64, u64, i16)>,
    /// How many times the guest rewrote all its pages.
    scribbles: u64,
}

/// `rounds` rounds of 8 reads of 8 pages each, in flight at once, from an
/// image of `kind` on the btrfs `fs`, while two threads (two vCPUs, so that
/// one runs beside whichever CPU verifies a read) change all 64 pages as fast
/// as they can: a new 8-byte value in each page per pass, so that every page
/// changes again within microseconds (any changed byte breaks a page's
/// checksum). Then an undisturbed read must equal the image.
fn scribbled_reads(fs: &ScratchFs, domid: u16, kind: ImageKind, rounds: u64) -> Scribbled {
    const PAGES: u32 = 8;
    const IN_FLIGHT: u32 = 8;
    let rig = Rig::with_config(zero_copy_config()).expect("rig");
    // Data on the disk (with checksums unless NOCOW), synced before the reads.
    let image = fs.path().join(format!("scribbled-{domid}.img"));
    write_image(&image, kind, &pattern(u64::from(domid), DISK as usize));
    let guest = rig.guest(domid, 4096);
    let (mut fe, frames, segs) = persistent_pages(&rig, &guest, domid, &image, PAGES * IN_FLIGHT);
    let abi = fe.info().unwrap().abi;
    let stop = Arc::new(AtomicBool::new(false));
    let scribblers: Vec<_> = (0..2usize)
        .map(|t| {
            let (stop, guest, frames) = (stop.clone(), guest.clone(), frames.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for &f in &frames {
                        guest.write_page(f, 8 * t, &n.to_le_bytes()).unwrap();
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut failed = Vec::new();
    let mut reads = 0u64;
    let span = DISK / 512 / u64::from(8 * PAGES);
    for round in 0..rounds {
        let mut ids = Vec::new();
        for r in 0..IN_FLIGHT {
            let n = round * u64::from(IN_FLIGHT) + u64::from(r);
            let id = (1 << 60) + n;
            let mine = &segs[(r * PAGES) as usize..((r + 1) * PAGES) as usize];
            let mut slot = fe.raw_slot();
            let sector = (n % span) * 8 * u64::from(PAGES);
            wire::encode_rw(
                abi,
                &mut slot,
                wire::OP_READ,
                PAGES as u8,
                0,
                id,
                sector,
                mine,
            );
            fe.raw_push(0, id, &slot).unwrap();
            ids.push(id);
        }
        fe.raw_publish(0).unwrap();
        let got = fe
            .wait_raw_responses(ids.len(), LONG)
            .expect("reads answered");
        assert_eq!(got.len(), ids.len(), "round {round}");
        for r in got {
            assert!(ids.contains(&r.id), "round {round}: unknown id {}", r.id);
            reads += 1;
            if r.status != 0 {
                failed.push((round, r.id, r.status));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let scribbles = scribblers.into_iter().map(|s| s.join().unwrap()).sum();
    let zero_copy = zero_copy_reads(&rig, domid);
    // With its pages left alone the guest reads what the image holds.
    let len = PAGES as usize * 4096;
    let via_device = fe.read(0, len).expect("read");
    assert!(
        via_device == read_direct(&image, 0, len),
        "{kind:?}: data differs"
    );
    fe.disconnect().unwrap();
    drop(fe);
    rig.shutdown();
    Scribbled {
        reads,
        zero_copy,
        failed,
        scribbles,
    }
}

/// Reads, the other way round: a guest that keeps rewriting the pages its
/// reads fill, on btrfs with data checksums (the default; no `chattr +C`).
/// An O_DIRECT read on btrfs verifies the checksum on the destination pages
/// after the device filled them; were those the guest's own pages, the guest
/// could change them in between and make the administrator's file system
/// report corruption that is not there (EIO, "csum failed" in the kernel
/// log, `corruption_errs` rising). 8192 reads of 8 pages under scribbling:
/// none may fail and `btrfs device stats` must stay at 0. With zero-copy
/// reads allowed on this file (the rule removed), most runs here failed
/// hundreds to thousands of them and every run of 8192 some. A NOCOW file
/// (no checksums) stays zero-copy under the same scribbling, with no error.
#[test]
fn guest_changing_pages_during_reads_cannot_make_btrfs_report_corruption() {
    for tool in ["btrfs", "chattr", "lsattr"] {
        if !have_tool(tool) && !skip_or_fail(&format!("{tool} is not installed")) {
            return;
        }
    }
    let Some(fs) = ScratchFs::new_or_skip(FsKind::Btrfs, FsKind::Btrfs.min_size()) else {
        return;
    };
    if !require_memlock_or_skip() {
        return;
    }
    let mnt = fs.path().to_string_lossy().into_owned();
    let stats = || btrfs_device_stats(&mnt);
    let before = stats();
    assert!(
        before.iter().any(|(f, _)| f == "corruption_errs"),
        "btrfs device stats shows no corruption_errs: {before:?}"
    );
    assert!(before.iter().all(|(_, v)| *v == 0), "{before:?}");
    for (domid, kind, rounds) in [(77, ImageKind::Plain, 1024), (78, ImageKind::Nocow, 128)] {
        let s = scribbled_reads(&fs, domid, kind, rounds);
        let after = stats();
        eprintln!(
            "{kind:?}: {} reads ({} zero-copy) under {} passes of scribbling: {} failed; \
             btrfs device stats {after:?}",
            s.reads,
            s.zero_copy,
            s.scribbles,
            s.failed.len()
        );
        assert!(s.scribbles > 0, "the guest never scribbled");
        assert!(
            after.iter().all(|(_, v)| *v == 0),
            "{kind:?}: btrfs reports errors the guest made up: {after:?} ({} of {} reads failed)",
            s.failed.len(),
            s.reads
        );
        assert!(
            s.failed.is_empty(),
            "{kind:?}: {} reads failed, the first {:?}",
            s.failed.len(),
            &s.failed[..s.failed.len().min(8)]
        );
        match kind {
            ImageKind::Plain => assert_eq!(s.zero_copy, 0, "checksummed: copy path"),
            ImageKind::Nocow => assert_eq!(s.zero_copy, s.reads, "NOCOW: zero-copy"),
        }
    }
}
