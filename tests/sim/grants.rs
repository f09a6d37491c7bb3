//! Grant map and grant copy on the simulated Xen, across two processes: the
//! guest is a separate process (a re-exec of this test binary driven over a
//! pipe), the backend is this process. Every failure Xen gives must come back
//! as an error or a per-segment status, never a crash.

use std::collections::HashSet;

use crate::support::{hex, machine_dir, pattern, unhex, Peer};
use refblk_core::platform::{CopySeg, GrantMapError, GrantStatus, Platform, PAGE_SIZE};
use refblk_sim::{SimGuest, SimPlatform};

const ENTRY: &str = "grants::peer_process_entry";
const DOM: u16 = 5;

/// Entry point of the peer process (see `sim_support`). Run by the harness
/// without the peer environment it has nothing to do.
#[test]
fn peer_process_entry() {
    crate::support::peer_main();
}

fn setup(pages: u32) -> (tempfile::TempDir, Peer, SimPlatform) {
    setup_in(machine_dir(), pages)
}

fn setup_in(dir: tempfile::TempDir, pages: u32) -> (tempfile::TempDir, Peer, SimPlatform) {
    let mut g = Peer::spawn(dir.path(), ENTRY);
    g.cmd(&format!("create {DOM} {pages}"));
    let p = SimPlatform::new(dir.path()).expect("platform");
    (dir, g, p)
}

fn copy_from(
    p: &SimPlatform,
    dom: u16,
    gref: u32,
    offset: u16,
    len: usize,
) -> (GrantStatus, Vec<u8>) {
    let mut buf = vec![0xAAu8; len];
    let mut st = [GrantStatus::GeneralError];
    p.grant_copy(
        dom,
        &mut [CopySeg::FromGuest {
            gref,
            offset,
            dst: &mut buf,
        }],
        &mut st,
    )
    .expect("grant copy call");
    (st[0], buf)
}

fn copy_to(p: &SimPlatform, dom: u16, gref: u32, offset: u16, data: &[u8]) -> GrantStatus {
    let mut st = [GrantStatus::GeneralError];
    p.grant_copy(
        dom,
        &mut [CopySeg::ToGuest {
            gref,
            offset,
            src: data,
        }],
        &mut st,
    )
    .expect("grant copy call");
    st[0]
}

fn map_status(p: &SimPlatform, dom: u16, refs: &[u32], writable: bool) -> GrantStatus {
    match p.map_grant_refs(dom, refs, writable) {
        Ok(_) => GrantStatus::Okay,
        Err(e) => {
            GrantMapError::status_of(&e).unwrap_or_else(|| panic!("map error without status: {e}"))
        }
    }
}

#[test]
fn copy_moves_data_both_ways() {
    let (_dir, mut g, p) = setup(16);
    let page = g.num("alloc 1");
    g.cmd(&format!("pattern {page} 42"));
    let gref = g.num(&format!("grant {page} 0 rw"));
    let (st, data) = copy_from(&p, DOM, gref, 0, PAGE_SIZE);
    assert_eq!(st, GrantStatus::Okay);
    assert_eq!(data, pattern(42), "guest data seen by the backend");
    let (st, part) = copy_from(&p, DOM, gref, 1000, 512);
    assert_eq!(st, GrantStatus::Okay);
    assert_eq!(part, pattern(42)[1000..1512]);

    let payload: Vec<u8> = (0..300u32).map(|i| (i * 3 + 1) as u8).collect();
    assert_eq!(copy_to(&p, DOM, gref, 3796, &payload), GrantStatus::Okay);
    assert_eq!(
        unhex(&g.cmd(&format!("read {page} 3796 300"))),
        payload,
        "backend data seen by the guest"
    );
    // The rest of the page is untouched.
    assert_eq!(
        unhex(&g.cmd(&format!("read {page} 0 3796"))),
        pattern(42)[..3796]
    );

    // A batch with every kind of failure mixed with good segments.
    let ro_page = g.num("alloc 1");
    g.cmd(&format!("pattern {ro_page} 7"));
    let ro = g.num(&format!("grant {ro_page} 0 ro"));
    let other = g.num(&format!("grant {page} 9 rw"));
    let wild = g.num(&format!("grant {page} 0 rw"));
    g.cmd(&format!("raw {wild} 1 0 99999")); // permit_access to us, frame outside memory
    let ended = g.num(&format!("grant {page} 0 rw"));
    assert_eq!(g.cmd(&format!("end {ended}")), "true");
    let never = 2000; // in range, never granted
    let reserved = 0; // reserved by Xen, never granted by guests
    let out_of_range = 1_000_000;
    let mut bufs = vec![vec![0u8; 16]; 9];
    let src = [1u8; 16];
    let mut it = bufs.iter_mut();
    let mut segs = vec![
        CopySeg::FromGuest {
            gref,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref: ro,
            offset: 16,
            dst: it.next().unwrap(),
        },
        CopySeg::ToGuest {
            gref: ro,
            offset: 0,
            src: &src,
        },
        CopySeg::FromGuest {
            gref: other,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref: ended,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref: never,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref: reserved,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref: out_of_range,
            offset: 0,
            dst: it.next().unwrap(),
        },
        CopySeg::FromGuest {
            gref,
            offset: 4090,
            dst: it.next().unwrap(),
        },
        CopySeg::ToGuest {
            gref,
            offset: 4095,
            src: &src[..2],
        },
        CopySeg::FromGuest {
            gref: wild,
            offset: 0,
            dst: it.next().unwrap(),
        },
    ];
    let mut st = vec![GrantStatus::Okay; segs.len()];
    p.grant_copy(DOM, &mut segs, &mut st).expect("batch");
    use GrantStatus::*;
    assert_eq!(
        st,
        vec![
            Okay,
            Okay,
            PermissionDenied, // read-only grant written
            PermissionDenied, // granted to domain 9
            BadGntref,        // ended
            BadGntref,        // never granted
            BadGntref,        // reserved ref
            BadGntref,        // out of range
            BadCopyArg,       // 4090 + 16 > 4096
            BadCopyArg,       // 4095 + 2 > 4096
            GeneralError,     // frame outside the guest's memory
        ]
    );
    drop(segs);
    assert_eq!(bufs[0], pattern(42)[..16]);
    assert_eq!(bufs[1], pattern(7)[16..32], "read-only grant is readable");
    assert_eq!(
        bufs[2],
        vec![0u8; 16],
        "failed segment leaves the buffer alone"
    );
    assert_eq!(
        unhex(&g.cmd(&format!("read {ro_page} 0 16"))),
        pattern(7)[..16],
        "read-only page unchanged"
    );
    assert_eq!(
        unhex(&g.cmd(&format!("read {page} 4095 1"))),
        payload[299..],
        "failed segment wrote nothing at the page end"
    );

    // Mismatched status slice is a call error.
    let mut b = [0u8; 4];
    let err = p
        .grant_copy(
            DOM,
            &mut [CopySeg::FromGuest {
                gref,
                offset: 0,
                dst: &mut b,
            }],
            &mut [],
        )
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

    // Unknown domain.
    assert_eq!(copy_from(&p, 77, gref, 0, 8).0, BadDomain);
}

#[test]
fn ring_maps_of_1_to_16_scattered_pages_keep_order() {
    // On a regular file system rather than tmpfs.
    let (_dir, mut g, p) = setup_in(crate::support::machine_dir_on_disk(), 128);
    // Allocate everything, then use a scattered, descending set of frames.
    let base = g.num("alloc 100");
    for n in [1usize, 2, 4, 8, 16] {
        let frames: Vec<u32> = (0..n as u32)
            .map(|i| base + 97 - i * 6 - (n as u32 % 3))
            .collect();
        assert_eq!(frames.iter().collect::<HashSet<_>>().len(), n);
        let mut refs = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            g.cmd(&format!("pattern {f} {}", 1000 * n + i));
            refs.push(g.num(&format!("grant {f} 0 rw")));
        }
        let m = p.map_grant_refs(DOM, &refs, true).expect("map ring");
        assert_eq!(m.len(), n * PAGE_SIZE);
        assert!(m.is_writable());
        for i in 0..n {
            let mut page = vec![0u8; PAGE_SIZE];
            m.copy_out(i * PAGE_SIZE, &mut page).expect("read mapping");
            assert_eq!(
                page,
                pattern((1000 * n + i) as u32),
                "ring of {n}: page {i} in order"
            );
        }
        // Live sharing both ways.
        g.cmd(&format!("write {} 8 c0ffee", frames[n - 1]));
        let mut b = [0u8; 3];
        m.copy_out((n - 1) * PAGE_SIZE + 8, &mut b).unwrap();
        assert_eq!(hex(&b), "c0ffee", "guest write visible in the mapping");
        m.copy_in(16, &[0xde, 0xad]).unwrap();
        assert_eq!(
            g.cmd(&format!("read {} 16 2", frames[0])),
            "dead",
            "mapping write visible to the guest"
        );
        // Out-of-range access through the mapping is an error, not a fault.
        assert!(m.copy_out(n * PAGE_SIZE - 1, &mut b).is_err());
        // Mapped grants cannot be ended; after unmapping they can.
        assert_eq!(g.cmd(&format!("end {}", refs[0])), "false");
        drop(m);
        for r in &refs {
            assert_eq!(g.cmd(&format!("end {r}")), "true");
        }
    }
}

#[test]
fn map_failures_are_errors_and_release_everything() {
    let (_dir, mut g, p) = setup(16);
    let page = g.num("alloc 1");
    g.cmd(&format!("pattern {page} 3"));
    let good = g.num(&format!("grant {page} 0 rw"));
    let ro = g.num(&format!("grant {page} 0 ro"));
    let other = g.num(&format!("grant {page} 4 rw"));
    let ended = g.num(&format!("grant {page} 0 rw"));
    assert_eq!(g.cmd(&format!("end {ended}")), "true");
    use GrantStatus::*;
    assert_eq!(
        map_status(&p, DOM, &[1_000_000], false),
        BadGntref,
        "out of range"
    );
    assert_eq!(
        map_status(&p, DOM, &[3000], false),
        BadGntref,
        "never granted"
    );
    assert_eq!(map_status(&p, DOM, &[ended], false), BadGntref, "ended");
    assert_eq!(
        map_status(&p, DOM, &[other], false),
        PermissionDenied,
        "granted to domain 4"
    );
    assert_eq!(
        map_status(&p, DOM, &[ro], true),
        PermissionDenied,
        "read-only mapped writable"
    );
    assert_eq!(
        map_status(&p, 99, &[good], false),
        BadDomain,
        "no such domain"
    );
    assert!(p.map_grant_refs(DOM, &[], false).is_err(), "no refs");
    // One bad ref among good ones: nothing stays mapped.
    assert_eq!(
        map_status(&p, DOM, &[good, ro, other, good], false),
        PermissionDenied
    );
    assert_eq!(
        g.cmd(&format!("end {good}")),
        "true",
        "failed map released its refs"
    );
    // Read-only grant mapped read-only works; writing through it is refused.
    let m = p.map_grant_refs(DOM, &[ro], false).expect("ro map");
    assert!(!m.is_writable());
    let mut b = [0u8; 4];
    m.copy_out(0, &mut b).unwrap();
    assert_eq!(b[..], pattern(3)[..4]);
    assert!(m.copy_in(0, &[1]).is_err());
    // The same ref mapped twice stays mapped until both are gone.
    let m2 = p.map_grant_refs(DOM, &[ro], false).expect("second map");
    drop(m);
    assert_eq!(g.cmd(&format!("end {ro}")), "false");
    drop(m2);
    assert_eq!(g.cmd(&format!("end {ro}")), "true");
}

#[test]
fn gone_domain_gives_bad_domain_and_mappings_survive() {
    let (dir, mut g, p) = setup(8);
    let page = g.num("alloc 1");
    g.cmd(&format!("pattern {page} 11"));
    let gref = g.num(&format!("grant {page} 0 rw"));
    assert!(p.domain_exists(DOM).unwrap());
    assert_eq!(copy_from(&p, DOM, gref, 0, 8).0, GrantStatus::Okay);
    let m = p.map_grant_refs(DOM, &[gref], false).expect("map");
    g.cmd("destroy");
    assert!(!p.domain_exists(DOM).unwrap(), "domain gone");
    assert_eq!(copy_from(&p, DOM, gref, 0, 8).0, GrantStatus::BadDomain);
    assert_eq!(copy_to(&p, DOM, gref, 0, &[1, 2]), GrantStatus::BadDomain);
    assert_eq!(map_status(&p, DOM, &[gref], false), GrantStatus::BadDomain);
    // Like a zombie domain's pages under Xen, the mapping stays readable.
    let mut b = vec![0u8; PAGE_SIZE];
    m.copy_out(0, &mut b).unwrap();
    assert_eq!(b, pattern(11));
    drop(m);
    assert!(
        !dir.path().join("dom").join(DOM.to_string()).exists(),
        "files removed"
    );
    // A new domain with the same id is a different domain: the backend notices.
    g.cmd(&format!("create {DOM} 8"));
    let page = g.num("alloc 1");
    g.cmd(&format!("pattern {page} 12"));
    let gref2 = g.num(&format!("grant {page} 0 rw"));
    assert!(p.domain_exists(DOM).unwrap());
    let (st, data) = copy_from(&p, DOM, gref2, 0, PAGE_SIZE);
    assert_eq!(st, GrantStatus::Okay);
    assert_eq!(data, pattern(12));
}

#[test]
fn backend_crash_releases_its_mappings() {
    // Roles reversed: this process is the guest, the peer is a backend that
    // maps a grant and is killed.
    let dir = machine_dir();
    let guest = SimGuest::create(dir.path(), DOM, 8).expect("guest");
    let page = guest.alloc_page().unwrap();
    let gref = guest.grant(page, 0, false).unwrap();
    let mut b = Peer::spawn(dir.path(), ENTRY);
    b.cmd(&format!("bmap {DOM} {gref},{gref} rw"));
    assert!(!guest.end_access(gref).unwrap(), "mapped by the backend");
    b.kill();
    assert!(
        guest.end_access(gref).unwrap(),
        "the dead backend's map is gone"
    );
    assert!(guest.end_access(gref).is_err(), "ending twice is an error");
}

#[test]
fn guest_api_rejects_bad_arguments() {
    let dir = machine_dir();
    let guest = SimGuest::create(dir.path(), 3, 4).expect("guest");
    assert!(SimGuest::create(dir.path(), 3, 4).is_err(), "domain exists");
    assert!(SimGuest::create(dir.path(), 4, 0).is_err(), "no memory");
    assert!(guest.alloc_pages(5).is_err());
    let p = guest.alloc_pages(4).unwrap();
    assert!(guest.alloc_page().is_err(), "memory full");
    guest.free_page(p + 1).unwrap();
    assert!(guest.free_page(p + 1).is_err(), "double free");
    assert!(guest.grant(4, 0, false).is_err(), "page outside memory");
    assert!(
        guest.write_page(3, 4000, &[0u8; 200]).is_err(),
        "write past memory"
    );
    assert!(guest.read_page(9, 0, &mut [0u8; 1]).is_err());
    assert!(guest.pages_ptr(2, 3).is_err());
    assert!(guest
        .set_grant_entry_raw(guest.nr_grants(), 1, 0, 0)
        .is_err());
    assert!(guest.end_access(100).is_err(), "not in use");
    guest.destroy().unwrap();
    assert!(!dir.path().join("dom/3").exists());
}

#[test]
fn grants_and_revokes_race_safely_with_the_backend() {
    let (_dir, mut g, p) = setup(8);
    let page = g.num("alloc 1");
    g.cmd(&format!("pattern {page} 77"));
    let want = pattern(77);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let caught = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let caught2 = caught.clone();
    // The guest grants and ends refs of one page in a loop while this thread
    // maps and copies every ref the churn can use. Every result must be a clean
    // success with the right bytes or a clean refusal.
    let backend = std::thread::spawn(move || {
        let (mut ok_copies, mut ok_maps, mut writes) = (0u32, 0u32, 0u32);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for r in 8..12u32 {
                let (st, data) = copy_from(&p, DOM, r, 100, 64);
                match st {
                    GrantStatus::Okay => {
                        assert_eq!(data, want[100..164]);
                        ok_copies += 1;
                        caught2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    GrantStatus::BadGntref => {}
                    other => panic!("copy from ref {r}: {other:?}"),
                }
                // Write back the same bytes: allowed only while granted rw.
                match copy_to(&p, DOM, r, 200, &want[200..216]) {
                    GrantStatus::Okay => writes += 1,
                    GrantStatus::BadGntref | GrantStatus::PermissionDenied => {}
                    other => panic!("copy to ref {r}: {other:?}"),
                }
                match p.map_grant_refs(DOM, &[r], false) {
                    Ok(m) => {
                        let mut b = vec![0u8; PAGE_SIZE];
                        m.copy_out(0, &mut b).unwrap();
                        assert_eq!(b, want);
                        ok_maps += 1;
                    }
                    // Ended (BadGntref), or refused because the guest sat
                    // in its end_access longer than the simulation lets a
                    // map wait (about 50 ms: a guest must not be able to
                    // block a backend) — a guest process descheduled there
                    // on a loaded machine. Either way nothing is mapped.
                    Err(e) => assert!(
                        GrantMapError::status_of(&e) == Some(GrantStatus::BadGntref)
                            || (GrantMapError::status_of(&e) == Some(GrantStatus::GeneralError)
                                && e.to_string().contains("locked by the guest")),
                        "{e}"
                    ),
                }
            }
        }
        (ok_copies, ok_maps, writes)
    });
    // Churn until the backend has caught live grants a few times (it may start
    // late, and be scheduled rarely, on a loaded machine): a number of rounds
    // failed there; at most 60 s, a bound on a hang, not a speed target.
    let mut refused = 0u32;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        refused += g.num(&format!("churn {page} 3000"));
        if caught.load(std::sync::atomic::Ordering::Relaxed) >= 20 {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (copies, maps, writes) = backend.join().expect("backend thread");
    println!("churn: {copies} copies, {maps} maps, {writes} writes, {refused} refused ends");
    assert!(copies + maps > 0, "the backend never caught a live grant");
    // Nothing left mapped or granted: the page can be granted and ended at once.
    let r = g.num(&format!("grant {page} 0 rw"));
    assert_eq!(g.cmd(&format!("end {r}")), "true");
    assert_eq!(
        unhex(&g.cmd(&format!("read {page} 0 4096"))),
        pattern(77),
        "page intact"
    );
}

#[test]
fn real_platform_without_xen_is_a_clear_error() {
    // The real platform mirrors this one; on a machine without Xen it must fail
    // to open with a message naming the device, not panic.
    match refblk_core::platform::real::RealXen::open() {
        Ok(x) => assert_eq!(x.name(), "xen", "running on a real dom0"),
        Err(e) => assert!(e.to_string().contains("/dev/xen/gntdev"), "{e}"),
    }
}

#[test]
fn guest_holding_its_grant_entry_lock_cannot_hang_a_map() {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsFd;
    let dir = machine_dir();
    let guest = SimGuest::create(dir.path(), DOM, 4).expect("guest");
    let page = guest.alloc_page().unwrap();
    let gref = guest.grant(page, 0, false).unwrap();
    let p = SimPlatform::new(dir.path()).unwrap();
    // A hostile guest process write-locks the entry itself (as end_access does,
    // but forever).
    let gnttab = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join(format!("dom/{DOM}/gnttab")))
        .unwrap();
    let lock = |ty: i32| libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: (4096 + 8 * gref) as libc::off_t,
        l_len: 8,
        l_pid: 0,
    };
    fcntl(gnttab.as_fd(), FcntlArg::F_OFD_SETLK(&lock(libc::F_WRLCK))).expect("lock");
    let e = p
        .map_grant_refs(DOM, &[gref], true)
        .err()
        .expect("map refused");
    assert_eq!(
        GrantMapError::status_of(&e),
        Some(GrantStatus::GeneralError),
        "{e}"
    );
    fcntl(gnttab.as_fd(), FcntlArg::F_OFD_SETLK(&lock(libc::F_UNLCK))).expect("unlock");
    let m = p
        .map_grant_refs(DOM, &[gref], true)
        .expect("map after unlock");
    assert_eq!(m.len(), PAGE_SIZE);
    drop(m);
    assert!(guest.end_access(gref).unwrap());
}

#[test]
fn end_access_never_succeeds_while_a_map_is_held() {
    // The guest ends grants without locks when no backend ever announced a map of
    // the entry (the `mapstate` fast path); a backend mapping the same refs at
    // the same time must still make every end_access of a mapped ref fail.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    let dir = machine_dir();
    let guest = Arc::new(SimGuest::create(dir.path(), DOM, 8).expect("guest"));
    let page = guest.alloc_page().unwrap();
    let p = SimPlatform::new(dir.path()).unwrap();
    // Refs come from a LIFO free list: the churn below reuses first..first+4.
    let first = guest.grant(page, 0, false).unwrap();
    assert!(
        guest.end_access(first).unwrap(),
        "never mapped: ended at once"
    );
    const REFS: u32 = 4;
    let held: Arc<Vec<AtomicBool>> = Arc::new((0..REFS).map(|_| AtomicBool::new(false)).collect());
    let generation: Arc<Vec<AtomicU64>> = Arc::new((0..REFS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let maps = Arc::new(AtomicU64::new(0));
    let (h2, g2, s2, m2) = (held.clone(), generation.clone(), stop.clone(), maps.clone());
    let backend = std::thread::spawn(move || {
        while !s2.load(SeqCst) {
            for i in 0..REFS {
                if let Ok(m) = p.map_grant_refs(DOM, &[first + i], false) {
                    g2[i as usize].fetch_add(1, SeqCst);
                    h2[i as usize].store(true, SeqCst);
                    m2.fetch_add(1, SeqCst);
                    std::thread::yield_now();
                    h2[i as usize].store(false, SeqCst);
                    drop(m);
                }
            }
        }
    });
    // Race until an end was refused while the backend held a map (the case
    // under test) and for at least 2 s; at most 60 s, a bound on a machine
    // too loaded to ever interleave the two, not a speed target.
    let (mut ended, mut refused) = (0u32, 0u32);
    let start = std::time::Instant::now();
    let long_enough = |refused: u32| {
        let t = start.elapsed();
        (refused > 0 && maps.load(SeqCst) > 0 && t >= std::time::Duration::from_secs(2))
            || t >= std::time::Duration::from_secs(60)
    };
    while !long_enough(refused) {
        let refs: Vec<u32> = (0..REFS)
            .map(|_| guest.grant(page, 0, false).unwrap())
            .collect();
        for r in refs {
            let i = (r - first) as usize;
            let (h1, gen1) = (held[i].load(SeqCst), generation[i].load(SeqCst));
            loop {
                let ok = guest.end_access(r).unwrap();
                let (h3, gen3) = (held[i].load(SeqCst), generation[i].load(SeqCst));
                assert!(
                    !(ok && h1 && h3 && gen1 == gen3),
                    "ref {r} ended while the backend held map #{gen1} of it"
                );
                if ok {
                    ended += 1;
                    break;
                }
                refused += 1;
            }
        }
    }
    stop.store(true, SeqCst);
    backend.join().expect("backend thread");
    let maps = maps.load(SeqCst);
    println!("{ended} ended, {refused} refused while mapped, {maps} maps");
    assert!(
        maps > 0 && refused > 0,
        "the backend never held a map during an end"
    );
}

#[test]
fn guest_stuck_ending_a_grant_cannot_hang_a_map() {
    // The guest's "ending access" bit in `mapstate` (set during an end_access)
    // left set forever by a hostile guest process: maps of that ref are refused
    // after a short wait, like a write lock held forever.
    let dir = machine_dir();
    let guest = SimGuest::create(dir.path(), DOM, 4).expect("guest");
    let page = guest.alloc_page().unwrap();
    let gref = guest.grant(page, 0, false).unwrap();
    let p = SimPlatform::new(dir.path()).unwrap();
    let path = dir.path().join(format!("dom/{DOM}/mapstate"));
    let word = |v: u32| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&v.to_le_bytes(), 4 * gref as u64).unwrap();
    };
    word(2); // MAP_CLOSING
    let t = std::time::Instant::now();
    let e = p
        .map_grant_refs(DOM, &[gref], true)
        .err()
        .expect("map refused");
    assert_eq!(
        GrantMapError::status_of(&e),
        Some(GrantStatus::GeneralError),
        "{e}"
    );
    // The wait is short by design; this bound only tells it from no bound
    // at all, whatever the machine's load.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "bounded wait"
    );
    word(1); // the backend's hint stays, the closing bit is gone
    let m = p.map_grant_refs(DOM, &[gref], true).expect("map");
    assert!(!guest.end_access(gref).unwrap(), "mapped");
    drop(m);
    assert!(guest.end_access(gref).unwrap());
}
