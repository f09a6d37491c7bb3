//! Fuzz target bodies, shared by the libFuzzer binaries (`fuzz/fuzz_targets`)
//! and the short deterministic run in the test suite (`tests/fuzz_short.rs`).
//! Each `run(&[u8])` accepts any byte string and panics only when an
//! invariant of refblk is broken.

pub mod blkif;
pub mod fekeys;
pub mod input;
pub mod ring;
pub mod xenstored;
pub mod xs_client;
pub mod xs_wire;
