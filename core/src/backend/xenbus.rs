//! The xenbus side of every device, in one place (the lesson of Linux
//! xen-blkback's `xenbus.c`): reading the states of both ends, every write of
//! the backend's `state` node — with the nodes that must change with it, in
//! one transaction — and the transitions between the states. The rest of a
//! device ([`super::device`]: its image, rings and queues) never reads or
//! writes a `state` node; it is told what to build or tear down from here.
//!
//! The machine is level-triggered: every watch event (backend directory,
//! frontend `state`, `@releaseDomain`), queue exit and the control thread's
//! tick re-reads its [`Inputs`] and moves the device at most one step
//! ([`decide`], a pure function of the backend's state and the inputs):
//!
//! | backend | when | then |
//! |---|---|---|
//! | (new) | the toolstack created the device with refblk's script | publish the features, InitWait ([`probe`]) |
//! | InitWait | `online` = 0, domain gone, or frontend Closed | Closed |
//! | InitWait | frontend Closing | Closing (follow a frontend that gives up, as blkback) |
//! | InitWait | image attached (hotplug `add`), frontend Initialised or Connected, and its `backend` node names this device | connect: rings, then the disk's nodes and Connected in one transaction, then the queues; Closing if that fails |
//! | Connected | a queue failed, `online` = 0, domain gone, or frontend Closing, Closed or gone | disconnect; Closed if the domain or the frontend is gone or Closed, else Closing |
//! | Closing | always | disconnect; Closed once the domain or the frontend is gone or Closed |
//! | Closed | `online`, domain alive, frontend Initialising | InitWait (the frontend reconnects) |
//! | any | the device cannot be driven (xenstore error, bad frontend key) | disconnect; Closing unless Closed ([`failed`]) |
//! | any | hotplug `remove` (`detach`) | release the image; Closed; quiet until the directory goes ([`removed`]) |
//! | Connected | the image's size changed | `sectors` and Connected again in one transaction ([`resize`]) |
//! | Connected (restart) | a previous daemon left both ends Connected on the same rings | Connected, nothing written ([`check_resumable`], [`Bus::resumed`]) |
//!
//! `online` missing counts as 1; a frontend `state` that is missing or not a
//! state is Unknown (parsed by [`crate::blkif::frontend_keys::parse_state`]:
//! the guest writes it). A frontend is connected to only if its `backend`
//! node names this very directory: a vbd and a vbd3 directory of the same
//! domain and device id name the same frontend directory, and only the one
//! the toolstack wrote into it (a stale directory of the other kind must not)
//! may map its rings.

use std::io;
use std::sync::Arc;

use log::info;

use super::device::Device;
use super::worker::Runtime;
use super::{BackendConfig, DevKey, Kind};
use crate::blkif::frontend_keys::{names_backend, parse_state};
use crate::blkif::DiskInfo;
use crate::platform::Platform;
use crate::xenstore::XsClient;
use xen_sys::xenbus::XenbusState;

use XenbusState as S;

/// Read a key; `Ok(None)` if it does not exist.
pub(crate) fn read_opt(xs: &XsClient, path: &str) -> io::Result<Option<String>> {
    xs.try_read_string(0, path)
        .map_err(|e| io::Error::other(format!("xenstore read {path}: {e}")))
}

/// The state in the `state` node of directory `dir` (`Unknown` if it or the
/// directory is gone).
fn state_of(xs: &XsClient, dir: &str) -> io::Result<XenbusState> {
    Ok(read_opt(xs, &format!("{dir}/state"))?.map_or(S::Unknown, |s| parse_state(&s)))
}

/// Whether the toolstack wants the device (`online` missing counts as 1).
fn online(xs: &XsClient, be: &str) -> io::Result<bool> {
    Ok(read_opt(xs, &format!("{be}/online"))?
        .map(|s| s.trim_end_matches('\0') != "0")
        .unwrap_or(true))
}

/// Whether the toolstack's backend directory `be` is there (it writes
/// `frontend-id` and `script` with the rest, and removes them with it).
pub(crate) fn backend_present(xs: &XsClient, be: &str) -> io::Result<bool> {
    Ok(read_opt(xs, &format!("{be}/frontend-id"))?.is_some()
        || read_opt(xs, &format!("{be}/script"))?.is_some())
}

/// The xenbus side of one device: the backend's state as we last wrote it,
/// and the frontend we watch.
#[derive(Debug)]
pub(crate) struct Bus {
    /// Written only by this module.
    state: XenbusState,
    /// The frontend's directory (the backend's `frontend` node), once read.
    fe: Option<String>,
    /// Our watch on the frontend's `state` (path, token).
    fe_watch: Option<(String, String)>,
}

impl Bus {
    /// A device not claimed yet (no state written).
    pub fn new() -> Bus {
        Bus {
            state: S::Unknown,
            fe: None,
            fe_watch: None,
        }
    }

    /// A device a previous daemon left Connected (checked by
    /// [`check_resumable`]): Connected without a handshake. The next
    /// [`step`] reads the frontend's directory and watches it.
    pub fn resumed() -> Bus {
        Bus {
            state: S::Connected,
            fe: None,
            fe_watch: None,
        }
    }

    /// The backend's state.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// The frontend's directory, once known.
    pub fn frontend(&self) -> Option<&str> {
        self.fe.as_deref()
    }

    /// Drop the frontend watch (the device goes away, or the daemon stops).
    pub fn unwatch(&mut self, xs: &XsClient) {
        if let Some((p, t)) = self.fe_watch.take() {
            let _ = xs.unwatch(&p, &t);
        }
    }
}

/// The watch token of device `key`'s frontend state:
/// `refblk:fe:<kind>:<domid>:<devid>`.
fn frontend_token(key: DevKey) -> String {
    format!("refblk:fe:{}:{}:{}", key.kind, key.domid, key.devid)
}

/// The device whose frontend watch fired with `token`, if it is one.
pub(crate) fn key_of_token(token: &str) -> Option<DevKey> {
    let mut it = token.strip_prefix("refblk:fe:")?.split(':');
    let kind = Kind::parse(it.next()?)?;
    let domid = it.next()?.parse().ok()?;
    let devid = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(DevKey::new(kind, domid, devid))
}

/// Write state `s` (and `nodes`, relative to the backend directory, in the
/// same transaction) and remember it.
fn switch(
    d: &mut Device,
    xs: &XsClient,
    nodes: &[(&str, String)],
    s: XenbusState,
) -> io::Result<()> {
    let be = d.be.clone();
    let what = format!("{be}: state {}", s as u32);
    if nodes.is_empty() {
        xs.write(0, &format!("{be}/state"), (s as u32).to_string().as_bytes())
    } else {
        xs.transaction(|tx| {
            for (k, v) in nodes {
                xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }
            xs.write(
                tx,
                &format!("{be}/state"),
                (s as u32).to_string().as_bytes(),
            )
        })
    }
    .map_err(|e| io::Error::other(format!("{what}: {e}")))?;
    if d.bus.state != s {
        info!("{}: state {:?} -> {s:?}", d.name(), d.bus.state);
    }
    d.bus.state = s;
    Ok(())
}

/// Claim the device: publish what we support and move to InitWait (libxl
/// waits for exactly InitWait before it runs the hotplug script).
pub(crate) fn probe(d: &mut Device, xs: &XsClient, cfg: &BackendConfig) -> io::Result<()> {
    let nodes = [
        (
            "feature-max-indirect-segments",
            cfg.max_indirect_segments.to_string(),
        ),
        ("multi-queue-max-queues", cfg.max_queues.to_string()),
        ("max-ring-page-order", cfg.max_ring_page_order.to_string()),
        ("feature-flush-cache", "1".into()),
        ("feature-barrier", "1".into()),
    ];
    switch(d, xs, &nodes, S::InitWait)?;
    info!("{}: claimed", d.name());
    Ok(())
}

/// What drives the transitions, read from xenstore and the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Inputs {
    /// The backend's `online` node (missing = true).
    pub online: bool,
    /// The frontend's domain exists.
    pub alive: bool,
    /// The frontend's state (`Unknown` if gone, or the domain is).
    pub frontend: XenbusState,
    /// The frontend's `backend` node names this device's directory.
    pub ours: bool,
    /// The hotplug `add` gave the device its image.
    pub image: bool,
    /// A queue of the connection stopped on its own (broken ring, I/O error,
    /// a bug caught on its worker).
    pub queue_failed: bool,
}

/// One step of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Stay,
    /// Write this state.
    Switch(XenbusState),
    /// Build the connection and go Connected (Closing if that fails).
    Connect,
    /// Stop the queues, then write this state if there is one.
    Disconnect(Option<XenbusState>),
}

/// The transitions (the table in the module docs).
pub(crate) fn decide(state: XenbusState, i: &Inputs) -> Step {
    let fe_gone = !i.alive || matches!(i.frontend, S::Closed | S::Unknown);
    match state {
        S::InitWait => {
            if !i.online || !i.alive || i.frontend == S::Closed {
                Step::Switch(S::Closed)
            } else if i.frontend == S::Closing {
                Step::Switch(S::Closing)
            } else if i.image && i.ours && matches!(i.frontend, S::Initialised | S::Connected) {
                Step::Connect
            } else {
                Step::Stay
            }
        }
        S::Connected => {
            if i.queue_failed
                || !i.online
                || !i.alive
                || matches!(i.frontend, S::Closing | S::Closed | S::Unknown)
            {
                Step::Disconnect(Some(if fe_gone { S::Closed } else { S::Closing }))
            } else {
                Step::Stay
            }
        }
        S::Closing => Step::Disconnect(fe_gone.then_some(S::Closed)),
        S::Closed if i.online && i.alive && i.frontend == S::Initialising => {
            Step::Switch(S::InitWait)
        }
        _ => Step::Stay,
    }
}

/// What connecting needs beside xenstore.
pub(crate) struct Env<'a> {
    pub platform: &'a Arc<dyn Platform>,
    pub cfg: &'a BackendConfig,
    pub rt: &'a Runtime,
}

/// Move device `d` one step towards what xenstore says it should be.
pub(crate) fn step(d: &mut Device, xs: &XsClient, env: &Env<'_>) -> io::Result<()> {
    if d.detached {
        return Ok(());
    }
    if d.bus.fe.is_none() {
        if let Some(fe) = read_opt(xs, &format!("{}/frontend", d.be))? {
            let token = frontend_token(d.key);
            let p = format!("{fe}/state");
            xs.watch(&p, &token)
                .map_err(|e| io::Error::other(format!("watch {p}: {e}")))?;
            d.bus.fe_watch = Some((p, token));
            d.bus.fe = Some(fe);
        }
    }
    let alive = env.platform.domain_exists(d.key.domid)?;
    let (frontend, ours) = match &d.bus.fe {
        Some(fe) if alive => (
            state_of(xs, fe)?,
            names_backend(read_opt(xs, &format!("{fe}/backend"))?.as_deref(), &d.be),
        ),
        _ => (S::Unknown, false),
    };
    let inputs = Inputs {
        online: online(xs, &d.be)?,
        alive,
        frontend,
        ours,
        image: d.image.is_some(),
        queue_failed: d.queue_failed(),
    };
    match decide(d.bus.state, &inputs) {
        Step::Stay => Ok(()),
        Step::Switch(s) => {
            if s == S::InitWait {
                info!("{}: frontend reconnecting", d.name());
            }
            switch(d, xs, &[], s)
        }
        Step::Connect => {
            if let Err(e) = connect(d, xs, env) {
                log::warn!("{}: cannot connect: {e}", d.name());
                switch(d, xs, &[], S::Closing)?;
            }
            Ok(())
        }
        Step::Disconnect(s) => {
            d.disconnect();
            match s {
                Some(s) => switch(d, xs, &[], s),
                None => Ok(()),
            }
        }
    }
}

/// The nodes that describe the disk to the frontend, written with Connected
/// (the features' own nodes come from [`crate::blkif::Features`], beside the
/// parser that enforces them).
fn disk_nodes(disk: &DiskInfo, persistent: bool) -> Vec<(&'static str, String)> {
    let info = if disk.read_only {
        xen_sys::blkif::VDISK_READONLY
    } else {
        0
    };
    let mut v = vec![
        ("sectors", disk.sectors.to_string()),
        ("sector-size", disk.logical_sector_size.to_string()),
        ("physical-sector-size", "4096".into()),
        ("info", info.to_string()),
    ];
    v.extend(disk.features.xenstore_nodes());
    v.push(("feature-persistent", u8::from(persistent).to_string()));
    v
}

/// Connect: the device builds the connection from the frontend's keys (rings
/// mapped, channels bound, restart state saved), the disk is announced with
/// Connected in one transaction, then the queues start.
fn connect(d: &mut Device, xs: &XsClient, env: &Env<'_>) -> io::Result<()> {
    let pending = d.negotiate(xs, env.platform, env.cfg)?;
    let nodes = disk_nodes(pending.disk(), pending.persistent());
    if let Err(e) = switch(d, xs, &nodes, S::Connected) {
        d.abandon(pending);
        return Err(e);
    }
    let summary = pending.summary();
    d.start(pending, env.platform, env.cfg, env.rt)?;
    info!("{}: connected ({summary})", d.name());
    Ok(())
}

/// The device cannot be driven (a xenstore error, a bad frontend key): it is
/// closed, so the toolstack and the guest see it.
pub(crate) fn failed(d: &mut Device, xs: &XsClient) {
    d.disconnect();
    if d.bus.state != S::Closed {
        let _ = switch(d, xs, &[], S::Closing);
    }
}

/// The hotplug `remove` (`refblk ctl detach`): release the image and go
/// Closed; the device then stays quiet until its directory goes. Returns
/// the pool volume it served, which the caller stops.
pub(crate) fn removed(d: &mut Device, xs: &XsClient) -> Option<crate::pool::Volume> {
    d.detached = true;
    let vol = d.release();
    if d.bus.state != S::Closed {
        let _ = switch(d, xs, &[], S::Closed);
    }
    vol
}

/// Re-read the image size; if it changed, announce it (`sectors` and
/// Connected in one transaction, as blkback does). Returns the new size in
/// sectors.
pub(crate) fn resize(d: &mut Device, xs: &XsClient) -> io::Result<Option<u64>> {
    let Some(sectors) = d.size_changed()? else {
        return Ok(None);
    };
    switch(d, xs, &[("sectors", sectors.to_string())], S::Connected)?;
    d.set_sectors(sectors);
    info!("{}: resized to {sectors} sectors", d.name());
    Ok(Some(sectors))
}

/// Whether both ends of the device at `be` are still as a previous daemon
/// left them, so that it can be taken over without a handshake: the domain
/// exists, the backend points at `frontend`, both are Connected, and the
/// toolstack still wants the device.
pub(crate) fn check_resumable(
    xs: &XsClient,
    platform: &Arc<dyn Platform>,
    key: DevKey,
    be: &str,
    frontend: &str,
) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if !platform.domain_exists(key.domid)? {
        return Err(bad(format!("domain {} is gone", key.domid)));
    }
    let bstate = state_of(xs, be)?;
    let fe = read_opt(xs, &format!("{be}/frontend"))?;
    if fe.as_deref() != Some(frontend) {
        return Err(bad(format!("{be}/frontend is now {fe:?}")));
    }
    let fstate = state_of(xs, frontend)?;
    if bstate != S::Connected || fstate != S::Connected {
        return Err(bad(format!(
            "backend is {bstate:?}, frontend {fstate:?} (both must still be Connected)"
        )));
    }
    if !online(xs, be)? {
        return Err(bad(format!("{be}/online is 0")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [XenbusState; 9] = [
        S::Unknown,
        S::Initialising,
        S::InitWait,
        S::Initialised,
        S::Connected,
        S::Closing,
        S::Closed,
        S::Reconfiguring,
        S::Reconfigured,
    ];

    fn up(frontend: XenbusState) -> Inputs {
        Inputs {
            online: true,
            alive: true,
            frontend,
            ours: true,
            image: true,
            queue_failed: false,
        }
    }

    #[test]
    fn initwait_connects_only_with_an_image_and_a_ready_frontend() {
        assert_eq!(decide(S::InitWait, &up(S::Initialised)), Step::Connect);
        assert_eq!(decide(S::InitWait, &up(S::Connected)), Step::Connect);
        for fe in [S::Unknown, S::Initialising, S::InitWait, S::Reconfiguring] {
            assert_eq!(decide(S::InitWait, &up(fe)), Step::Stay, "{fe:?}");
        }
        let no_image = Inputs {
            image: false,
            ..up(S::Initialised)
        };
        assert_eq!(decide(S::InitWait, &no_image), Step::Stay);
        let not_ours = Inputs {
            ours: false,
            ..up(S::Initialised)
        };
        assert_eq!(decide(S::InitWait, &not_ours), Step::Stay);
        assert_eq!(
            decide(S::InitWait, &up(S::Closing)),
            Step::Switch(S::Closing)
        );
        assert_eq!(decide(S::InitWait, &up(S::Closed)), Step::Switch(S::Closed));
        let offline = Inputs {
            online: false,
            ..up(S::Initialised)
        };
        assert_eq!(decide(S::InitWait, &offline), Step::Switch(S::Closed));
    }

    #[test]
    fn connected_closes_on_every_reason_and_only_then() {
        assert_eq!(decide(S::Connected, &up(S::Connected)), Step::Stay);
        let failed = Inputs {
            queue_failed: true,
            ..up(S::Connected)
        };
        assert_eq!(
            decide(S::Connected, &failed),
            Step::Disconnect(Some(S::Closing))
        );
        let offline = Inputs {
            online: false,
            ..up(S::Connected)
        };
        assert_eq!(
            decide(S::Connected, &offline),
            Step::Disconnect(Some(S::Closing))
        );
        assert_eq!(
            decide(S::Connected, &up(S::Closing)),
            Step::Disconnect(Some(S::Closing))
        );
        for fe in [S::Closed, S::Unknown] {
            assert_eq!(
                decide(S::Connected, &up(fe)),
                Step::Disconnect(Some(S::Closed))
            );
        }
        let dead = Inputs {
            alive: false,
            ..up(S::Connected)
        };
        assert_eq!(
            decide(S::Connected, &dead),
            Step::Disconnect(Some(S::Closed))
        );
    }

    #[test]
    fn closing_waits_for_the_frontend_and_closed_reopens_for_it() {
        assert_eq!(
            decide(S::Closing, &up(S::Connected)),
            Step::Disconnect(None)
        );
        assert_eq!(
            decide(S::Closing, &up(S::Closed)),
            Step::Disconnect(Some(S::Closed))
        );
        assert_eq!(
            decide(S::Closed, &up(S::Initialising)),
            Step::Switch(S::InitWait)
        );
        let offline = Inputs {
            online: false,
            ..up(S::Initialising)
        };
        assert_eq!(decide(S::Closed, &offline), Step::Stay);
        for fe in ALL.into_iter().filter(|s| *s != S::Initialising) {
            assert_eq!(decide(S::Closed, &up(fe)), Step::Stay, "{fe:?}");
        }
        // States the backend never takes: nothing happens.
        for st in [
            S::Unknown,
            S::Initialising,
            S::Initialised,
            S::Reconfiguring,
        ] {
            for fe in ALL {
                assert_eq!(decide(st, &up(fe)), Step::Stay, "{st:?} {fe:?}");
            }
        }
    }

    #[test]
    fn frontend_tokens_round_trip_and_refuse_garbage() {
        for kind in Kind::ALL {
            let k = DevKey::new(kind, 5, 51712);
            assert_eq!(key_of_token(&frontend_token(k)), Some(k));
        }
        for bad in [
            "refblk:fe:5:51712",
            "refblk:fe:vbd:5",
            "refblk:be:vbd",
            "refblk:fe:vbd:x:1",
            "refblk:fe:vbd:70000:1",
            "refblk:fe:vbd4:5:51712",
            "refblk:fe:vbd:5:51712:1",
        ] {
            assert_eq!(key_of_token(bad), None, "{bad}");
        }
    }
}
