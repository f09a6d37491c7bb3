//! The simulated xenstored (to be written).

use std::io;
use std::path::Path;

/// A running simulated xenstored (threads in this process); stops when dropped.
pub struct Xenstored {}

impl Xenstored {
    /// Listen on the unix socket `sock` and serve the xenstore wire protocol.
    pub fn spawn(sock: &Path) -> io::Result<Xenstored> {
        let _ = sock;
        Err(io::Error::new(io::ErrorKind::Unsupported, "not built yet"))
    }
}
