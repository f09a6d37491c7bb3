//! refblk-core: the daemon's library — everything `refblk serve` and the pool
//! commands run, and nothing else (no simulator, no test frontend, no bench:
//! those live in `refblk-sim` and the `refblk` crate, which depend on this one,
//! never the other way).
//!
//! Layers, lowest first (a module imports only from modules above it in this
//! list; `tests/ops/layers.rs` checks it):
//! - [`util`]: byte sizes.
//! - [`limits`]: I/O limits as set by an administrator (rates, burst, text
//!   form); enforced by `backend::limiter`, stored by `pool::limits`.
//! - [`xenstore`]: the xenstore wire codec and client.
//! - [`platform`]: what a backend needs from Xen (xenstore, foreign mappings,
//!   grant copy, event channels), and the real `/dev/xen/*` implementation.
//! - [`blkif`]: the trust boundary — the shared ring, and parsing and
//!   validating every request the guest writes into a typed value.
//! - [`engine`]: the io_uring I/O engine on an image file.
//! - [`pool`]: the reflink volume pool (the control plane: start, commit,
//!   revisions, owners, Qubes' qubes.xml).
//! - [`backend`]: the xenbus device state machine, the per-queue request path,
//!   the worker threads, the control socket.

/// The git commit this build is from (`unknown` outside a git checkout; see
/// core/build.rs).
pub const BUILD_COMMIT: &str = env!("REFBLK_GIT_COMMIT");

/// `refblk --version`: the version (shared by the workspace's crates) and the
/// git commit.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("REFBLK_GIT_COMMIT"),
    ")"
);

pub mod backend;
pub mod blkif;
pub mod engine;
pub mod limits;
pub mod platform;
pub mod pool;
pub mod util;
pub mod xenstore;
