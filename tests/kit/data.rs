//! Deterministic test data: one PRNG, one fill pattern, one scratch directory.

use std::path::Path;

/// xorshift64*: deterministic, dependency-free test randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform enough in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `len` bytes of deterministic data for `seed`, none of them zero (so that
/// data is never mistaken for a hole or a discarded block), different in
/// every 4 KiB block and for every seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed ^ 0x5EED).fill(&mut v);
    for b in v.iter_mut() {
        if *b == 0 {
            *b = 1;
        }
    }
    v
}

/// A scratch directory for a simulated machine (its sockets, guest memory,
/// images): on tmpfs (/dev/shm) when there is one, else in the temp dir.
pub fn machine_dir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("refblk-test")
            .tempdir_in(base)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("refblk-test")
        .tempdir()
        .expect("temp dir")
}
