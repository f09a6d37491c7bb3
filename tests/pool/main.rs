//! The reflink volume pool: life cycle, crashes, concurrency, ENOSPC, the
//! Qubes file-reflink compatibility and the `refblk pool` command line.

mod common;
#[path = "../kit/mod.rs"]
mod kit;

mod cli;
mod concurrency;
mod crash;
mod enospc;
mod foreign;
mod input;
mod lifecycle;
mod owner;
mod qubes;
mod qubes_compat;
mod scratchfs;
