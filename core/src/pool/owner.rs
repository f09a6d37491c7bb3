//! The claim a serving daemon holds on a pool volume ("owner").
//!
//! While `refblk serve` serves a volume, the volume's start record
//! (`.refblk/volumes/<vid>.running`) names the daemon: its pid and the pid's start
//! time (so a recycled pid is not mistaken for it), the domain and device it serves
//! the volume to, and the device's restart-state file. Every refblk process reads
//! it under the volume's `flock` before changing the volume's files and refuses
//! while the claim holds.
//!
//! A claim holds while
//! - the record is of this boot, and
//! - the daemon process is alive (same pid, same start time), **or** it died and
//!   the device's restart-state file still exists: the guest keeps running on the
//!   volume and the next `refblk serve` with that state directory takes the device
//!   over (and the claim with it).
//!
//! Otherwise it is stale (daemon gone and nothing left to take the device over, or
//! a previous boot), and the volume is an ordinary running/interrupted volume.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who serves a volume: a `refblk serve` process and the device it serves it on
/// (the `owner` object of a volume's start record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The daemon's pid.
    pub pid: u32,
    /// The pid's start time (`/proc/<pid>/stat` field 22, clock ticks since boot).
    pub pid_start: u64,
    /// The guest domain.
    pub domid: u32,
    /// The virtual device number.
    pub devid: u32,
    /// The xenstore backend path of the device.
    pub backend: String,
    /// The device's restart-state file, if the daemon keeps restart state.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

/// Whether a recorded claim still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The daemon runs.
    Live,
    /// The daemon died, its device's restart state remains (the guest still uses
    /// the volume; the next daemon takes it over).
    Orphaned,
    /// Nothing holds the volume any more.
    Stale,
}

/// The start time of `pid` (`/proc/<pid>/stat` field 22), or `None` if it does not
/// exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22 → index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Owner {
    /// A claim by this process for the device `domid`/`devid` at `backend`.
    pub fn this_process(
        domid: u32,
        devid: u32,
        backend: &str,
        state_file: Option<PathBuf>,
    ) -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            pid_start: process_start_time(pid).unwrap_or(0),
            domid,
            devid,
            backend: backend.to_string(),
            state_file,
        }
    }

    /// JSON for the start record.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("an owner is plain data")
    }

    /// Parse the start record's `owner` object (None if it is not one).
    pub fn from_json(v: &Value) -> Option<Owner> {
        serde_json::from_value(v.clone()).ok()
    }

    /// Whether the claiming daemon is this process.
    pub fn is_this_process(&self) -> bool {
        self.pid == std::process::id()
            && process_start_time(self.pid).is_some_and(|t| t == self.pid_start)
    }

    /// Whether the daemon runs.
    pub fn daemon_alive(&self) -> bool {
        process_start_time(self.pid).is_some_and(|t| t == self.pid_start)
    }

    /// Whether the claim holds (the caller checked the record is of this boot).
    pub fn liveness(&self) -> Liveness {
        if self.daemon_alive() {
            Liveness::Live
        } else if self.state_file.as_deref().is_some_and(Path::exists) {
            Liveness::Orphaned
        } else {
            Liveness::Stale
        }
    }

    /// "domain 5, device 51712, refblk serve pid 123" — for listings.
    pub fn short(&self) -> String {
        format!(
            "domain {}, device {}, refblk serve pid {}",
            self.domid, self.devid, self.pid
        )
    }

    /// Who holds the volume and how to let go of it, for refusals.
    pub fn explain(&self, liveness: Liveness) -> String {
        match liveness {
            Liveness::Orphaned => format!(
                "it is served to domain {} as device {} ({}) by refblk serve pid {}, which died; \
                 its restart state {} remains, so the guest still uses the volume and the next \
                 `refblk serve` takes it over. Restart the daemon and detach the disk \
                 (`refblk ctl detach {}`) or shut the guest down; if the guest is gone, \
                 restarting the daemon releases the volume",
                self.domid,
                self.devid,
                self.backend,
                self.pid,
                self.state_file
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                self.backend,
            ),
            _ => format!(
                "it is served to domain {} as device {} ({}) by refblk serve pid {}. \
                 Detach the disk first (`refblk ctl detach {}`, or `xl block-detach`), \
                 or shut the guest down; the daemon then commits it",
                self.domid, self.devid, self.backend, self.pid, self.backend,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_and_roundtrip() {
        let me = Owner::this_process(5, 51712, "/local/domain/0/backend/vbd/5/51712", None);
        assert!(me.pid_start > 0);
        assert!(me.is_this_process());
        assert_eq!(me.liveness(), Liveness::Live);
        assert_eq!(Owner::from_json(&me.to_json()), Some(me.clone()));
        let mut other = me.clone();
        other.pid_start += 1; // a recycled pid
        assert!(!other.is_this_process());
        assert_eq!(other.liveness(), Liveness::Stale);
        other.state_file = Some(PathBuf::from("/proc/self/stat"));
        assert_eq!(other.liveness(), Liveness::Orphaned);
    }
}
