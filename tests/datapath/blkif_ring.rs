//! The public `refblk_core::blkif` API driven from outside the crate by a minimal
//! frontend that writes slots at the byte offsets documented in blkif.h
//! (hard-coded here, independent of `xen-sys`), for both ABIs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use refblk_core::blkif::{parse_request, Abi, BackRing, DiskInfo, Features, Request, RingError};
use refblk_core::platform::ForeignMapping;

#[derive(Clone)]
struct Mem(Arc<Vec<AtomicU64>>);

impl Mem {
    fn set(&self, off: usize, v: u8) {
        let w = &self.0[off / 8];
        let mut b = w.load(Ordering::SeqCst).to_le_bytes();
        b[off % 8] = v;
        w.store(u64::from_le_bytes(b), Ordering::SeqCst);
    }
    fn get(&self, off: usize) -> u8 {
        self.0[off / 8].load(Ordering::SeqCst).to_le_bytes()[off % 8]
    }
    fn put(&self, off: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.set(off + i, *b);
        }
    }
    fn take(&self, off: usize, n: usize) -> Vec<u8> {
        (off..off + n).map(|o| self.get(o)).collect()
    }
}

struct Map(Mem);

// SAFETY: the words live as long as the mapping (an Arc); the test's own
// side reads and writes them only as atomics, never through references to
// bytes.
unsafe impl ForeignMapping for Map {
    fn as_ptr(&self) -> *mut u8 {
        self.0 .0.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.0 .0.len() * 8
    }
}

/// (slot size, id offset, sector offset, seg offset) per blkif.h.
fn layout(abi: Abi) -> (usize, usize, usize, usize) {
    match abi {
        Abi::X86_64 => (112, 8, 16, 24),
        Abi::X86_32 => (108, 4, 12, 20),
    }
}

#[test]
fn a_frontend_outside_the_crate_gets_answers() {
    let disk = DiskInfo {
        sectors: 2048,
        logical_sector_size: 512,
        read_only: false,
        max_indirect_segments: 0,
        features: Features {
            flush: true,
            ..Features::default()
        },
    };
    for abi in [Abi::X86_64, Abi::X86_32] {
        let mem = Mem(Arc::new((0..2 * 512).map(|_| AtomicU64::new(0)).collect()));
        let mut ring = BackRing::new(Box::new(Map(mem.clone())), abi).unwrap();
        assert_eq!(ring.size(), 64);
        let (slot, id_off, sec_off, seg_off) = layout(abi);
        // 70 requests in batches of 10 wrap the 64-slot ring.
        for batch in 0..7u64 {
            for k in 0..10u64 {
                let n = batch * 10 + k;
                let base = 64 + (n as usize % 64) * slot;
                mem.put(base, &vec![0; slot]);
                // Even n: a READ of page n; odd n: a WRITE past the end of the disk.
                mem.set(base, (n % 2) as u8);
                mem.set(base + 1, 1);
                mem.put(base + id_off, &(1000 + n).to_le_bytes());
                let sector: u64 = if n % 2 == 1 { 2048 } else { n };
                mem.put(base + sec_off, &sector.to_le_bytes());
                mem.put(base + seg_off, &7u32.to_le_bytes());
                mem.set(base + seg_off + 5, 7);
            }
            mem.put(0, &(((batch + 1) * 10) as u32).to_le_bytes());
            while let Some(raw) = ring.next_request().unwrap() {
                let (id, op, status) = match parse_request(&raw, &disk) {
                    Ok(Request::Rw(rw)) => {
                        assert_eq!(rw.len(), 4096);
                        (rw.id(), rw.response_op(), 0)
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(rej) => (rej.id, rej.operation, rej.status),
                };
                ring.push_response(id, op, status).unwrap();
            }
            assert_eq!(ring.outstanding(), 0);
            ring.push_responses_and_check_notify();
            let rsp_prod = u32::from_le_bytes(mem.take(8, 4).try_into().unwrap());
            assert_eq!(u64::from(rsp_prod), (batch + 1) * 10);
            for k in 0..10u64 {
                let n = batch * 10 + k;
                let base = 64 + (n as usize % 64) * slot;
                let r = mem.take(base, 12);
                assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 1000 + n);
                assert_eq!(r[8], (n % 2) as u8);
                let status = i16::from_le_bytes([r[10], r[11]]);
                assert_eq!(status, if n % 2 == 1 { -1 } else { 0 });
            }
        }
        assert!(!ring.final_check_for_requests());
        // A hostile index: disconnect material.
        mem.put(0, &5000u32.to_le_bytes());
        assert!(matches!(
            ring.next_request(),
            Err(RingError::Overflow { .. })
        ));
    }
}
