//! refblk-sim: the simulated Xen, the blkif test frontend and scratch file
//! systems — for tests, the demo and the bench. The daemon's library
//! (`refblk-core`) does not depend on this crate.
//!
//! - [`frontend`]: a blkif frontend written from blkif.h, independently of the
//!   backend's parser, with a toolstack that creates devices in xenstore.
//! - [`scratchfs`]: throw-away btrfs / XFS / ext4 file systems on loop devices
//!   for tests and benchmarks, plus the project's "needs root or skip" rule.
//!
//! The simulated Xen: guest memory and grant tables in shared memory files,
//! event channels as eventfds, and a xenstored speaking the real wire protocol
//! (see [`xenstored`]). Everything lives in one directory `DIR` (layout in
//! `docs/platform.md`), so a guest process and a backend process can meet:
//!
//! - [`SimXen`]: the simulator (xenstored + event channel broker), run by
//!   `refblk sim --dir DIR` or in-process by tests.
//! - [`SimGuest`]: a guest domain (memory, grants, event channels).
//! - [`SimPlatform`]: the backend's [`Platform`](refblk_core::platform::Platform).

use std::io;
use std::path::{Path, PathBuf};

mod backend;
mod domain;
mod evtchn;
pub mod frontend;
mod guest;
pub mod scratchfs;
mod shm;
pub mod xenstored;

pub use backend::{SimPlatform, MAX_MAP_REFS};
pub use evtchn::{EvtchnBroker, SimEventChannel};
pub use guest::{GuestPages, SimGuest, DEFAULT_GRANT_ENTRIES};

use refblk_core::platform::DomId;
use xenstored::Xenstored;

/// Name of the xenstored socket in `DIR`.
pub const XENSTORED_SOCK: &str = refblk_core::platform::SIM_XENSTORED_SOCK;
/// Name of the event channel broker socket in `DIR`.
pub const EVTCHN_SOCK: &str = "evtchn.sock";

/// A running simulated Xen machine in a directory. Stops (and removes its
/// sockets) when dropped; guest domains' files belong to their `SimGuest`s.
pub struct SimXen {
    dir: PathBuf,
    // Field order = drop order: stop handing out channels first.
    evtchn: EvtchnBroker,
    _xenstored: Xenstored,
}

impl SimXen {
    /// Start the simulator in `dir` (created if missing): xenstored on
    /// `dir/xenstored.sock` and the event channel broker on `dir/evtchn.sock`.
    pub fn start(dir: &Path) -> io::Result<SimXen> {
        std::fs::create_dir_all(dir.join("dom"))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let xs_path = dir.join(XENSTORED_SOCK);
        let xenstored = Xenstored::spawn(&xs_path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: simulated xenstored: {e}", xs_path.display()),
            )
        })?;
        let evtchn = EvtchnBroker::spawn(dir)?;
        Ok(SimXen {
            dir: dir.to_path_buf(),
            evtchn,
            _xenstored: xenstored,
        })
    }

    /// The machine directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the xenstored socket (for `XENSTORED_PATH`).
    pub fn xenstored_path(&self) -> PathBuf {
        self.dir.join(XENSTORED_SOCK)
    }

    /// A backend platform on this machine.
    pub fn platform(&self) -> io::Result<SimPlatform> {
        SimPlatform::new(&self.dir)
    }

    /// A backend's event channel stays bound for `d` after the backend let
    /// go of it (see [`EvtchnBroker::set_release_delay`]).
    pub fn set_evtchn_release_delay(&self, d: std::time::Duration) {
        self.evtchn.set_release_delay(d);
    }

    /// Create a guest domain with `nr_pages` pages on this machine.
    pub fn create_guest(&self, domid: DomId, nr_pages: u32) -> io::Result<SimGuest> {
        SimGuest::create(&self.dir, domid, nr_pages)
    }
}
