//! refblk: the command line (`refblk serve`, the pool commands, `ctl`, `status`,
//! the simulated demo) and the bench.
//!
//! The layers are crates (README, "Layout"): `xen-sys` (the raw ABI) ←
//! `refblk-core` (the daemon's library) ← `refblk-sim` (the simulated Xen, the
//! test frontend, scratch file systems) ← this crate. Only the `demo`, `sim`
//! and `bench` subcommands reach into `refblk-sim`.
//!
//! - [`cli`]: the subcommands.
//! - [`bench`]: `refblk bench`, refblk beside the raw file and a loop device.

pub mod bench;
pub mod cli;
