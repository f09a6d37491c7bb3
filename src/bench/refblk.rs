//! The `refblk` path: a simulated guest puts blkif requests on its ring, refblk's
//! backend grant-copies and does the I/O with io_uring, responses come back.
//!
//! The guest side is the simulated blkfront of `src/frontend`. Everything the
//! benchmark needs from it is behind [`BlockTarget`], so this module is the only place
//! that knows how a guest is set up.

use std::io;
use std::path::Path;

use super::target::BlockTarget;

/// Serving-side threads of the backend are named `vbd<domid>.<devid>q<N>`.
pub const QUEUE_THREAD_PREFIX: &str = "vbd";

/// Whether this build can run the refblk path.
pub fn available() -> Result<(), String> {
    Err("the simulated guest blkfront (src/frontend) is not in this build yet".into())
}

/// Start a simulated Xen in `work_dir`, a backend serving `image`, and a guest whose
/// blkfront is connected to it; returns the guest's block device.
pub fn connect(_image: &Path, _work_dir: &Path, _depth: usize) -> io::Result<Box<dyn BlockTarget>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        available().unwrap_err(),
    ))
}
