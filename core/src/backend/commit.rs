//! Pool volume commits off the control thread.
//!
//! Releasing a device that serves a pool volume stops the volume (commit or
//! discard, by its kind: fsyncs, renames, a revision, the precache FICLONE —
//! seconds on a large, fragmented image). That runs on a thread of its own,
//! one per commit, so the control thread goes on handling every other
//! device's xenbus events and the control socket's commands. Ordering rules
//! (docs/datapath.md, "Device lifecycle"):
//! - the `detach` that released the device is answered when the commit is
//!   done, with its result;
//! - an `attach-volume` of a volume whose commit runs waits (without blocking
//!   the control thread) and is handled when the commit is done;
//! - the daemon's stop or handover waits for every commit in flight.
//!
//! The commit thread only runs [`Volume::stop`] and reports back with
//! [`Event::Committed`]; every decision stays on the control thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use log::{info, warn};

use super::{Command, Event};
use crate::pool::{StopOutcome, Volume};

/// A volume: (its pool's canonical directory, its vid).
pub(super) type VolumeKey = (PathBuf, String);

/// The key of volume `vid` of the pool in `pool` (the directory resolved as
/// `Pool::open` resolves it).
pub(super) fn volume_key(pool: &Path, vid: &str) -> VolumeKey {
    let dir = std::fs::canonicalize(pool).unwrap_or_else(|_| pool.to_path_buf());
    (dir, vid.to_string())
}

/// One commit in flight.
struct InFlight {
    thread: Option<JoinHandle<()>>,
    /// The device released, for log lines (`vbd 5/51712`).
    device: String,
    /// The `detach` that released the device, answered when the commit is done.
    reply: Option<Sender<Result<String, super::CommandError>>>,
    /// Commands that wait for this commit (an `attach-volume` of the volume).
    waiting: Vec<Command>,
}

/// The commits in flight.
pub(super) struct Commits {
    running: BTreeMap<VolumeKey, InFlight>,
    events: Sender<Event>,
}

impl Commits {
    pub(super) fn new(events: Sender<Event>) -> Commits {
        Commits {
            running: BTreeMap::new(),
            events,
        }
    }

    /// How many commits are in flight.
    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no commit is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether volume `key` is being committed.
    pub(super) fn is_running(&self, key: &VolumeKey) -> bool {
        self.running.contains_key(key)
    }

    /// The vid of the volume whose commit the attach at backend path `be`
    /// waits for, if it waits (for `status`).
    pub(super) fn attach_waiting(&self, be: &str) -> Option<&str> {
        self.running
            .iter()
            .find(|(_, c)| {
                c.waiting.iter().any(|w| {
                    matches!(w, Command::AttachVolume { backend_path, .. } if backend_path == be)
                })
            })
            .map(|(k, _)| k.1.as_str())
    }

    /// Stop `vol`, released by `device`, on a thread of its own; answer
    /// `reply` (a `detach`) when it is done.
    pub(super) fn start(
        &mut self,
        device: String,
        vol: Volume,
        reply: Option<Sender<Result<String, super::CommandError>>>,
    ) {
        let key = (vol.pool().dir().to_path_buf(), vol.vid().to_string());
        // A volume is served by one device at a time, and its attach waits
        // for its commit: there is never a second commit of one volume.
        debug_assert!(!self.running.contains_key(&key), "{key:?}");
        info!(
            "{device}: stopping volume {} (commit or discard, by its kind) on a thread of its own",
            key.1
        );
        let (events, dev, v, k) = (
            self.events.clone(),
            device.clone(),
            vol.clone(),
            key.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("refblk-commit".into())
            .spawn(move || {
                let result = stop_volume(&dev, &v);
                let _ = events.send(Event::Committed { key: k, result });
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // No thread to be had: commit here rather than not at all.
                warn!(
                    "{device}: cannot start a thread for the commit of volume {} ({e}); \
                     committing on the control thread",
                    key.1
                );
                let result = stop_volume(&device, &vol);
                let _ = self.events.send(Event::Committed {
                    key: key.clone(),
                    result,
                });
                None
            }
        };
        self.running.insert(
            key,
            InFlight {
                thread,
                device,
                reply,
                waiting: Vec::new(),
            },
        );
    }

    /// Keep `cmd` until volume `key`'s commit is done. Gives `cmd` back if no
    /// commit of it runs.
    pub(super) fn defer(&mut self, key: &VolumeKey, cmd: Command) -> Option<Command> {
        match self.running.get_mut(key) {
            Some(c) => {
                c.waiting.push(cmd);
                None
            }
            None => Some(cmd),
        }
    }

    /// Volume `key`'s commit is done: join its thread, log a failure, answer
    /// its `detach`. Returns the commands that waited for it.
    pub(super) fn finish(
        &mut self,
        key: &VolumeKey,
        result: Result<String, super::CommandError>,
    ) -> Vec<Command> {
        let Some(mut c) = self.running.remove(key) else {
            return Vec::new();
        };
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = &result {
            warn!("{}: {e}", c.device);
        }
        if let Some(r) = c.reply.take() {
            let _ = r.send(result);
        }
        c.waiting
    }
}

/// Stop (commit or discard, by its kind) the volume a device served; the
/// answer of its `detach`.
fn stop_volume(device: &str, v: &Volume) -> Result<String, super::CommandError> {
    let vid = v.vid();
    match v.stop() {
        Ok(StopOutcome::NotRunning) => super::refuse(format!(
            "volume {vid} was not running when the device was released: its dirty \
             image {} was gone (stopped or removed behind the daemon's back); \
             nothing was committed",
            v.dirty_path().display()
        )),
        Ok(o) => {
            info!("{device}: volume {vid}: {o:?}");
            Ok(format!("volume {vid}: {o:?}"))
        }
        Err(e) => super::refuse(format!("volume {vid}: stop: {e}")),
    }
}
