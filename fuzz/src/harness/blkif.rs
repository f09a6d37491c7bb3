//! Target `blkif_request`: one ring slot (either ABI) and, for INDIRECT, the
//! indirect pages, parsed and validated against an arbitrary disk.
//!
//! Besides "no panic", every outcome is compared with a reference model
//! written here from `docs/protocol.md` and `blkif.h` (field offsets typed in
//! from the header, not taken from `xen-sys`), and accepted requests are
//! checked for the safety properties the backend relies on:
//! the byte range lies inside the disk and is aligned to the logical sector,
//! the pieces add up to the length and each stays inside its 4096-byte page,
//! nothing writes to a read-only disk, and only advertised features pass.

use refblk_core::blkif::{
    parse_indirect_segments, parse_request, Abi, DiskInfo, Features, RawRequest, Request, RwOp,
    RwRequest,
};

use super::input::Input;

const RSP_ERROR: i16 = -1;
const RSP_EOPNOTSUPP: i16 = -2;

/// Offsets from blkif.h (docs/protocol.md table), typed in independently.
pub struct Off {
    pub slot: usize,
    pub id: usize,
    pub sector: usize,
    pub seg: usize,
    pub discard_nr: usize,
    pub ind_nr: usize,
    pub ind_grefs: usize,
}

const OFF_64: Off = Off {
    slot: 112,
    id: 8,
    sector: 16,
    seg: 24,
    discard_nr: 24,
    ind_nr: 2,
    ind_grefs: 28,
};
const OFF_32: Off = Off {
    slot: 108,
    id: 4,
    sector: 12,
    seg: 20,
    discard_nr: 20,
    ind_nr: 2,
    ind_grefs: 24,
};

pub fn off(abi: Abi) -> &'static Off {
    match abi {
        Abi::X86_64 => &OFF_64,
        Abi::X86_32 => &OFF_32,
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

/// What the reference model expects.
#[derive(Debug, PartialEq, Eq)]
pub enum Expect {
    Rw {
        write: bool,
        barrier: bool,
        sector: u64,
        /// (gref, byte offset, byte len)
        pieces: Vec<(u32, u16, u16)>,
    },
    Indirect {
        write: bool,
        sector: u64,
        nr: u16,
        grefs: [u32; 8],
    },
    Flush,
    Discard {
        sector: u64,
        nr: u64,
        secure: bool,
    },
    Reject(i16),
}

fn mask(d: &DiskInfo) -> u64 {
    u64::from(d.logical_sector_size.max(512)) / 512 - 1
}

fn in_disk(sector: u64, n: u64, d: &DiskInfo) -> bool {
    sector
        .checked_add(n)
        .is_some_and(|e| e <= d.sectors && e <= u64::MAX / 512)
}

/// Validate (gref, first, last) segments of a read/write.
pub fn model_segments(
    write: bool,
    barrier: bool,
    sector: u64,
    segs: &[(u32, u8, u8)],
    d: &DiskInfo,
) -> Expect {
    if write && d.read_only {
        return Expect::Reject(RSP_ERROR);
    }
    let m = mask(d);
    if sector & m != 0 {
        return Expect::Reject(RSP_ERROR);
    }
    let mut pieces = Vec::new();
    let mut n = 0u64;
    for &(gref, first, last) in segs {
        if first > last || last > 7 {
            return Expect::Reject(RSP_ERROR);
        }
        if (u64::from(first) | (u64::from(last) + 1)) & m != 0 {
            return Expect::Reject(RSP_ERROR);
        }
        let k = u64::from(last - first) + 1;
        n += k;
        pieces.push((gref, u16::from(first) * 512, (k * 512) as u16));
    }
    if n > 0 && !in_disk(sector, n, d) {
        return Expect::Reject(RSP_ERROR);
    }
    Expect::Rw {
        write,
        barrier,
        sector,
        pieces,
    }
}

/// The reference model of `parse_request`.
pub fn model(abi: Abi, b: &[u8], d: &DiskInfo) -> Expect {
    let o = off(abi);
    let op = b[0];
    let max_ind = d.max_indirect_segments.min(4096);
    match op {
        0..=2 => {
            let barrier = op == 2;
            if barrier && !d.features.barrier {
                return Expect::Reject(RSP_EOPNOTSUPP);
            }
            let nr = b[1];
            if nr > 11 || (nr == 0 && !barrier) {
                return Expect::Reject(RSP_ERROR);
            }
            let segs: Vec<(u32, u8, u8)> = (0..usize::from(nr))
                .map(|i| {
                    let at = o.seg + 8 * i;
                    (le32(b, at), b[at + 4], b[at + 5])
                })
                .collect();
            model_segments(op != 0, barrier, le64(b, o.sector), &segs, d)
        }
        3 if d.features.flush => {
            // With data: a write run as a barrier (Linux blkback: preflush + write).
            let nr = b[1];
            if nr == 0 {
                return Expect::Flush;
            }
            if nr > 11 {
                return Expect::Reject(RSP_ERROR);
            }
            let segs: Vec<(u32, u8, u8)> = (0..usize::from(nr))
                .map(|i| {
                    let at = o.seg + 8 * i;
                    (le32(b, at), b[at + 4], b[at + 5])
                })
                .collect();
            model_segments(true, true, le64(b, o.sector), &segs, d)
        }
        5 if d.features.discard => {
            if d.read_only {
                return Expect::Reject(RSP_ERROR);
            }
            let sector = le64(b, o.sector);
            let nr = le64(b, o.discard_nr);
            if !in_disk(sector, nr, d) || (sector | nr) & mask(d) != 0 {
                return Expect::Reject(RSP_ERROR);
            }
            Expect::Discard {
                sector,
                nr,
                secure: d.features.discard_secure && b[1] & 1 == 1,
            }
        }
        6 if max_ind > 0 => {
            let write = match b[1] {
                0 => false,
                1 => true,
                _ => return Expect::Reject(RSP_ERROR),
            };
            if write && d.read_only {
                return Expect::Reject(RSP_ERROR);
            }
            let nr = le16(b, o.ind_nr);
            let sector = le64(b, o.sector);
            if nr == 0 || u32::from(nr) > max_ind || sector & mask(d) != 0 || !in_disk(sector, 1, d)
            {
                return Expect::Reject(RSP_ERROR);
            }
            let mut grefs = [0u32; 8];
            for (i, g) in grefs.iter_mut().enumerate() {
                *g = le32(b, o.ind_grefs + 4 * i);
            }
            Expect::Indirect {
                write,
                sector,
                nr,
                grefs,
            }
        }
        _ => Expect::Reject(RSP_EOPNOTSUPP),
    }
}

/// Model of `IndirectRequest::complete` on the given page bytes.
pub fn model_indirect(write: bool, sector: u64, nr: u16, pages: &[u8], d: &DiskInfo) -> Expect {
    let n = usize::from(nr);
    if n == 0 || n > 4096 || pages.len() < n * 8 {
        return Expect::Reject(RSP_ERROR);
    }
    let segs: Vec<(u32, u8, u8)> = (0..n)
        .map(|i| (le32(pages, 8 * i), pages[8 * i + 4], pages[8 * i + 5]))
        .collect();
    model_segments(write, false, sector, &segs, d)
}

/// Safety properties of an accepted read/write, independent of the model.
pub fn check_rw(r: &RwRequest, d: &DiskInfo) {
    let sum: u64 = r.pieces().iter().map(|p| u64::from(p.len())).sum();
    assert_eq!(sum, r.len(), "pieces must add up to the length: {r:?}");
    for p in r.pieces() {
        assert!(!p.is_empty() && p.len() % 512 == 0, "piece length {p:?}");
        assert!(
            usize::from(p.offset()) + usize::from(p.len()) <= 4096,
            "piece outside its page: {p:?}"
        );
        assert_eq!(p.offset() % 512, 0, "piece offset {p:?}");
    }
    let lss = u64::from(d.logical_sector_size.max(512));
    if !r.is_empty() {
        assert_eq!(r.offset(), r.sector() * 512);
        let end = r.offset().checked_add(r.len()).expect("range overflows");
        assert!(
            u128::from(end) <= u128::from(d.sectors) * 512,
            "range {}+{} outside a disk of {} sectors",
            r.offset(),
            r.len(),
            d.sectors
        );
        assert_eq!(r.offset() % lss, 0, "start not aligned to {lss}");
        assert_eq!(r.len() % lss, 0, "length not a multiple of {lss}");
        for p in r.pieces() {
            assert_eq!(
                u64::from(p.len()) % lss,
                0,
                "piece not whole logical sectors"
            );
        }
    } else {
        assert!(
            r.barrier(),
            "an empty transfer that is not a pure barrier: {r:?}"
        );
    }
    if d.read_only {
        assert_eq!(r.op(), RwOp::Read, "write accepted on a read-only disk");
    }
    if r.barrier() {
        // WRITE_BARRIER needs feature-barrier; a FLUSH_DISKCACHE with data
        // (run as a barrier) needs feature-flush-cache.
        match r.response_op() {
            2 => assert!(d.features.barrier),
            3 => assert!(d.features.flush && !r.pieces().is_empty()),
            op => panic!("barrier with response op {op}"),
        }
        assert_eq!(r.op(), RwOp::Write);
    }
}

fn same_rw(r: &RwRequest, e: &Expect) -> bool {
    let Expect::Rw {
        write,
        barrier,
        sector,
        pieces,
    } = e
    else {
        return false;
    };
    let got: Vec<(u32, u16, u16)> = r
        .pieces()
        .iter()
        .map(|p| (p.gref(), p.offset(), p.len()))
        .collect();
    (r.op() == RwOp::Write) == *write
        && r.barrier() == *barrier
        && r.sector() == *sector
        && &got == pieces
}

/// A disk description drawn from the input, biased to edge cases.
pub fn disk(inp: &mut Input) -> DiskInfo {
    let flags = inp.u8();
    let sectors = match inp.u8() % 8 {
        0 => 0,
        1 => 1,
        2 => 8,
        3 => u64::from(inp.u16()),
        4 => u64::from(inp.u32()),
        5 => u64::MAX,
        6 => u64::MAX / 512,
        _ => inp.u64(),
    };
    let lss = inp.pick(&[512u32, 4096, 1024, 2048, 512, 4096, 0, 8192]);
    let max_indirect = match inp.u8() % 8 {
        0 => 0,
        1 => 1,
        2 => 32,
        3 => 256,
        4 => 4096,
        5 => 5000,
        6 => u32::MAX,
        _ => inp.u32(),
    };
    DiskInfo {
        sectors,
        logical_sector_size: lss,
        read_only: flags & 1 != 0,
        max_indirect_segments: max_indirect,
        features: Features {
            flush: flags & 2 != 0,
            barrier: flags & 4 != 0,
            discard: flags & 8 != 0,
            discard_secure: flags & 16 != 0,
        },
    }
}

/// The fuzz target body.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let abi = if inp.bool() { Abi::X86_64 } else { Abi::X86_32 };
    let d = disk(&mut inp);
    let slot = inp.bytes(off(abi).slot);
    let pages = inp.rest();

    let raw = RawRequest::from_bytes(abi, &slot).expect("slot of the ABI's size");
    assert!(RawRequest::from_bytes(abi, &slot[1..]).is_none());
    let expect = model(abi, &slot, &d);
    let got = parse_request(&raw, &d);
    let id = le64(&slot, off(abi).id);
    let echo = if slot[0] == 6 { slot[1] } else { slot[0] };
    match (&got, &expect) {
        (Err(rej), Expect::Reject(st)) => {
            assert_eq!(rej.status, *st, "{rej}");
            assert_eq!(rej.id, id);
            assert_eq!(rej.operation, echo);
            assert!(!rej.to_string().is_empty());
        }
        (Ok(Request::Rw(r)), e) if same_rw(r, e) => {
            check_rw(r, &d);
            assert_eq!(r.id(), id);
            assert_eq!(r.response_op(), slot[0]);
        }
        (Ok(Request::Flush { id: i }), Expect::Flush) => assert_eq!(*i, id),
        (
            Ok(Request::Discard {
                id: i,
                sector,
                nr_sectors,
                secure,
            }),
            Expect::Discard {
                sector: s,
                nr: n,
                secure: sec,
            },
        ) => {
            assert_eq!((*i, *sector, *nr_sectors, *secure), (id, *s, *n, *sec));
            assert!(!d.read_only && d.features.discard);
            assert!(sector.checked_add(*nr_sectors).unwrap() <= d.sectors);
        }
        (
            Ok(Request::Indirect(ind)),
            Expect::Indirect {
                write,
                sector,
                nr,
                grefs,
            },
        ) => {
            assert_eq!(ind.id(), id);
            assert_eq!(ind.op() == RwOp::Write, *write);
            assert_eq!((ind.sector(), ind.nr_segments()), (*sector, *nr));
            assert_eq!(ind.indirect_grefs(), grefs);
            let n = ind.nr_pages();
            assert!((1..=8).contains(&n) && n * 512 >= usize::from(*nr));
            assert_eq!(ind.page_grefs(), &grefs[..n]);
            assert_eq!(ind.response_op(), slot[1]);
            // The pages as given (maybe short), and as the queue hands them
            // over (whole pages, zero-filled past what the guest wrote).
            let mut whole = pages.to_vec();
            whole.resize(n * 4096, 0);
            for buf in [pages, &whole[..]] {
                let e = model_indirect(*write, *sector, *nr, buf, &d);
                match (ind.complete(buf, &d), &e) {
                    (Err(rej), Expect::Reject(st)) => {
                        assert_eq!(rej.status, *st);
                        assert_eq!((rej.id, rej.operation), (id, slot[1]));
                    }
                    (Ok(r), e) if same_rw(&r, e) => {
                        check_rw(&r, &d);
                        assert_eq!((r.id(), r.response_op()), (id, slot[1]));
                        assert_eq!(r.pieces().len(), usize::from(*nr));
                    }
                    (g, e) => panic!("indirect complete: got {g:?}, model {e:?}"),
                }
            }
        }
        (g, e) => panic!("{abi:?} {d:?}: parse_request gave {g:?}, model expects {e:?}"),
    }
    assert_eq!(got.as_ref().map(|r| r.id()).unwrap_or(id), id);

    // The decoding step alone, with an arbitrary count.
    let nr = le16(&slot, 2);
    match parse_indirect_segments(pages, nr) {
        Ok(segs) => {
            assert_eq!(segs.len(), usize::from(nr));
            for (i, s) in segs.iter().enumerate() {
                assert_eq!(s.gref, le32(pages, 8 * i));
                assert_eq!(
                    (s.first_sect, s.last_sect),
                    (pages[8 * i + 4], pages[8 * i + 5])
                );
            }
        }
        Err(_) => assert!(pages.len() < usize::from(nr) * 8),
    }
}
