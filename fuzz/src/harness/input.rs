//! A tiny byte reader for fuzz inputs: every read succeeds (past the end it
//! yields zeros), so any byte string is a valid input and short inputs still
//! reach the code under test.

/// Reads fields off the front of a fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// `n` bytes, zero-padded past the end.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let take = n.min(self.data.len());
        let mut v = self.data[..take].to_vec();
        self.data = &self.data[take..];
        v.resize(n, 0);
        v
    }

    /// At most `n` bytes, without padding.
    pub fn up_to(&mut self, n: usize) -> &'a [u8] {
        let take = n.min(self.data.len());
        let (a, b) = self.data.split_at(take);
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// One of `choices`, picked by the next byte.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[usize::from(self.u8()) % choices.len()]
    }
}

/// A small deterministic PRNG (xorshift64*) for the seeded short runs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// A mutation of `seed` (or fresh bytes if it is empty): byte flips,
    /// interesting values, insertions, deletions, splices with `other`.
    pub fn mutate(&mut self, seed: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
        let mut v = seed.to_vec();
        if v.is_empty() || self.below(16) == 0 {
            let n = self.below(max_len.min(512) + 1);
            return (0..n).map(|_| self.next() as u8).collect();
        }
        let rounds = 1 + self.below(8);
        for _ in 0..rounds {
            if v.is_empty() {
                v.push(self.next() as u8);
            }
            let at = self.below(v.len());
            match self.below(9) {
                0 => v[at] ^= 1 << self.below(8),
                1 => v[at] = self.next() as u8,
                2 => {
                    const INTERESTING: [u8; 10] = [0, 1, 7, 8, 0x7f, 0x80, 0xfe, 0xff, 11, 6];
                    v[at] = INTERESTING[self.below(INTERESTING.len())];
                }
                3 => {
                    let n = self.below(16) + 1;
                    for _ in 0..n {
                        if v.len() < max_len {
                            v.insert(at, self.next() as u8);
                        }
                    }
                }
                4 => {
                    let n = (self.below(16) + 1).min(v.len() - at);
                    v.drain(at..at + n);
                }
                5 if !other.is_empty() => {
                    let from = self.below(other.len());
                    let n = self.below(other.len() - from) + 1;
                    v.truncate(at);
                    v.extend_from_slice(&other[from..from + n]);
                }
                6 => {
                    // A 32-bit field set to an edge value.
                    let w: u32 = [0, 1, u32::MAX, 0x8000_0000, 4096, 4095][self.below(6)];
                    for (i, b) in w.to_le_bytes().iter().enumerate() {
                        if at + i < v.len() {
                            v[at + i] = *b;
                        }
                    }
                }
                7 => {
                    let n = self.below(8) + 1;
                    let end = (at + n).min(v.len());
                    let chunk = v[at..end].to_vec();
                    let to = self.below(v.len());
                    for (i, b) in chunk.iter().enumerate() {
                        if to + i < v.len() {
                            v[to + i] = *b;
                        }
                    }
                }
                _ => v[at] = v[at].wrapping_add(self.below(5) as u8).wrapping_sub(2),
            }
        }
        v.truncate(max_len);
        v
    }
}
