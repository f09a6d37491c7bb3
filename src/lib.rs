//! refblk: a userspace Xen block backend for file images, and a reflink volume pool.
//!
//! Module map (one folder per concern):
//! - [`platform`]: the Xen platform abstraction, real (`/dev/xen/*`) and simulated.
//! - [`xenstore`]: xenstore wire codec and client (used by both platforms).
//! - [`blkif`]: blkif shared-ring handling, request parsing and validation.
//! - [`engine`]: the io_uring I/O engine.
//! - [`backend`]: the xenbus device state machine and the serve loop.
//! - [`pool`]: the reflink pool / volume control plane.
//! - [`cli`]: the `refblk` subcommands.
//! - [`util`]: small shared helpers (size parsing, scratch file systems for tests).

pub mod backend;
pub mod bench;
pub mod blkif;
pub mod cli;
pub mod engine;
pub mod frontend;
pub mod platform;
pub mod pool;
pub mod util;
pub mod xenstore;
