//! The toolstack's part of a vbd's life, as libxl does it: create the backend
//! and frontend directories in one transaction with libxl's permissions, run
//! the hotplug script's `add` once the backend is in InitWait (here: hand the
//! image to refblk with [`BackendHandle::attach`]), and remove the device
//! (`online` = 0 and backend state Closing, wait for Closed, remove the
//! directories).
//!
//! Both kinds of backend directory libxl writes for a disk ([`Kind`]): `vbd`
//! (the `phy` backend, `params` = the target as given) and, as libxl 4.19+
//! does for `backendtype=tap`, `vbd3` (`backend/vbd3/<domid>/<devid>`,
//! `params` = `aio:<target>` for a raw image, `type` = `vbd3`,
//! `specification` = `xen`). The frontend is `device/vbd/<devid>` for both.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use xen_sys::xenbus::XenbusState;

use refblk_core::backend::{AttachOptions, BackendHandle, DevKey, Kind};
use refblk_core::platform::DomId;
use refblk_core::xenstore::{Access, Perm, Permissions, XsClient};

/// A vbd to create.
#[derive(Debug, Clone)]
pub struct VbdSpec {
    /// The guest.
    pub domid: DomId,
    /// The device id (`virtual-device`; 51712 = xvda).
    pub devid: u32,
    /// The image (the `params` key; what the hotplug script resolves).
    pub image: PathBuf,
    /// `mode`: "w" or "r".
    pub mode: String,
    /// `script` (refblk claims devices whose script ends with `block-refblk`).
    pub script: String,
    /// `dev` (the guest's name for it).
    pub vdev: String,
    /// What the hotplug step passes to the backend.
    pub attach: AttachOptions,
    /// The backend directory's kind: `vbd` (libxl's phy backend) or `vbd3`
    /// (libxl >= 4.19 with `backendtype=tap`).
    pub kind: Kind,
    /// The `params` node, as libxl writes the disk line's target: `None` =
    /// the image (`aio:` and the image for a vbd3, libxl's prefix for a raw
    /// image). Set it for what only a hotplug script reads (a format prefix,
    /// `,KEY=VALUE` items).
    pub params: Option<String>,
}

impl VbdSpec {
    /// A writable refblk disk.
    pub fn new(domid: DomId, devid: u32, image: impl Into<PathBuf>) -> VbdSpec {
        VbdSpec {
            domid,
            devid,
            image: image.into(),
            mode: "w".into(),
            script: "/etc/xen/scripts/block-refblk".into(),
            vdev: "xvda".into(),
            attach: AttachOptions::default(),
            kind: Kind::Vbd,
            params: None,
        }
    }

    /// A writable refblk disk as libxl 4.19+ creates it for
    /// `backendtype=tap,script=block-refblk`: a vbd3 device.
    pub fn vbd3(domid: DomId, devid: u32, image: impl Into<PathBuf>) -> VbdSpec {
        VbdSpec {
            kind: Kind::Vbd3,
            ..VbdSpec::new(domid, devid, image)
        }
    }

    /// The `params` node libxl writes.
    pub fn params(&self) -> String {
        if let Some(p) = &self.params {
            return p.clone();
        }
        let target = self.image.to_string_lossy();
        match self.kind {
            Kind::Vbd => target.into_owned(),
            // libxl__device_disk_string_of_format(RAW) is "aio".
            Kind::Vbd3 => format!("aio:{target}"),
        }
    }
}

/// The pool directory and volume id of a `pool:DIR:VID` target (the vid is
/// what follows the last colon), else `None`.
pub fn pool_target(target: &std::path::Path) -> Option<(&str, &str)> {
    let rest = target.to_str()?.strip_prefix("pool:")?;
    let (pool, vid) = rest.rsplit_once(':')?;
    (!pool.is_empty() && !vid.is_empty()).then_some((pool, vid))
}

/// A created vbd.
#[derive(Debug, Clone)]
pub struct Vbd {
    pub kind: Kind,
    pub domid: DomId,
    pub devid: u32,
    pub backend_path: String,
    pub frontend_path: String,
}

/// How the hotplug step reaches refblk.
#[derive(Clone)]
enum Hotplug {
    /// A backend in this process.
    Handle(BackendHandle),
    /// A `refblk serve` process, through its control socket (as the hotplug
    /// script does with `refblk ctl attach`).
    Socket(PathBuf),
}

/// A dom0 toolstack driving xenstore and the refblk backend.
pub struct Toolstack {
    xs: XsClient,
    hotplug: Hotplug,
    backend_domid: DomId,
    /// libxl's LIBXL_INIT_TIMEOUT / LIBXL_DESTROY_TIMEOUT (10 s).
    pub timeout: Duration,
}

fn xs_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Toolstack {
    /// A toolstack using the privileged connection `xs` and the backend `backend`
    /// (running in domain 0).
    pub fn new(xs: XsClient, backend: BackendHandle) -> Toolstack {
        Toolstack {
            xs,
            hotplug: Hotplug::Handle(backend),
            backend_domid: 0,
            timeout: Duration::from_secs(10),
        }
    }

    /// The xenstore connection.
    pub fn xs(&self) -> &XsClient {
        &self.xs
    }

    /// A toolstack whose hotplug step talks to a `refblk serve` process on
    /// its control socket `control`.
    pub fn with_control_socket(xs: XsClient, control: impl Into<PathBuf>) -> Toolstack {
        Toolstack {
            xs,
            hotplug: Hotplug::Socket(control.into()),
            backend_domid: 0,
            timeout: Duration::from_secs(10),
        }
    }

    /// The backend handle (`None` for a backend in another process).
    pub fn backend(&self) -> Option<&BackendHandle> {
        match &self.hotplug {
            Hotplug::Handle(h) => Some(h),
            Hotplug::Socket(_) => None,
        }
    }

    /// Make `/local/domain/<domid>` as libxl does: owned by dom0 and readable
    /// by the guest, with `device/` owned by the guest.
    pub fn create_domain(&self, domid: DomId) -> io::Result<()> {
        let dom = format!("/local/domain/{domid}");
        self.xs
            .transaction(|tx| {
                self.xs.mkdir(tx, &dom)?;
                self.xs.set_perms(
                    tx,
                    &dom,
                    &Permissions::new(0, Access::None).with(domid, Access::Read),
                )?;
                self.xs
                    .write(tx, &format!("{dom}/domid"), domid.to_string().as_bytes())?;
                let dev = format!("{dom}/device");
                self.xs.mkdir(tx, &dev)?;
                self.xs
                    .set_perms(tx, &dev, &Permissions::new(domid, Access::None))
            })
            .map_err(|e| xs_err(&format!("create {dom}"), e))
    }

    /// Remove the domain's xenstore directory (after its devices).
    pub fn destroy_domain(&self, domid: DomId) -> io::Result<()> {
        let dom = format!("/local/domain/{domid}");
        self.xs
            .rm(0, &dom)
            .map_err(|e| xs_err(&format!("rm {dom}"), e))
    }

    fn backend_path(&self, kind: Kind, domid: DomId, devid: u32) -> String {
        DevKey::new(kind, domid, devid).backend_path(self.backend_domid)
    }

    /// Create the vbd (libxl's `device_disk_add`), wait for the backend's
    /// InitWait, run the hotplug `add` step (attach the image) and write
    /// `hotplug-status` = connected.
    pub fn add_vbd(&self, spec: &VbdSpec) -> io::Result<Vbd> {
        let vbd = self.create_vbd_nodes(spec)?;
        self.wait_state(&vbd.backend_path, |s| s == XenbusState::InitWait)?;
        self.hotplug_add(&vbd, spec)?;
        Ok(vbd)
    }

    /// Only the xenstore part of [`add_vbd`](Self::add_vbd).
    pub fn create_vbd_nodes(&self, spec: &VbdSpec) -> io::Result<Vbd> {
        let (domid, devid) = (spec.domid, spec.devid);
        let be = self.backend_path(spec.kind, domid, devid);
        let fe = format!("/local/domain/{domid}/device/vbd/{devid}");
        let bd = self.backend_domid;
        let be_perms = Permissions {
            owner: bd,
            others: Access::None,
            acl: vec![Perm {
                domid,
                access: Access::Read,
            }],
        };
        let fe_perms = Permissions {
            owner: domid,
            others: Access::None,
            acl: vec![Perm {
                domid: bd,
                access: Access::Read,
            }],
        };
        let params = spec.params();
        self.xs
            .transaction(|tx| {
                let xs = &self.xs;
                xs.rm(tx, &be)
                    .or_else(|e| if e.is_enoent() { Ok(()) } else { Err(e) })?;
                xs.rm(tx, &fe)
                    .or_else(|e| if e.is_enoent() { Ok(()) } else { Err(e) })?;
                xs.mkdir(tx, &be)?;
                xs.set_perms(tx, &be, &be_perms)?;
                xs.mkdir(tx, &fe)?;
                xs.set_perms(tx, &fe, &fe_perms)?;
                let wb = |k: &str, v: &str| xs.write(tx, &format!("{be}/{k}"), v.as_bytes());
                wb("frontend", &fe)?;
                wb("frontend-id", &domid.to_string())?;
                wb("online", "1")?;
                wb("removable", "0")?;
                wb("bootable", "1")?;
                wb("state", &(XenbusState::Initialising as u32).to_string())?;
                wb("dev", &spec.vdev)?;
                wb(
                    "type",
                    match spec.kind {
                        Kind::Vbd => "phy",
                        Kind::Vbd3 => "vbd3",
                    },
                )?;
                if spec.kind == Kind::Vbd3 {
                    wb("specification", "xen")?;
                }
                wb("mode", &spec.mode)?;
                wb("device-type", "disk")?;
                wb("discard-enable", "1")?;
                wb("params", &params)?;
                wb("script", &spec.script)?;
                let wf = |k: &str, v: &str| xs.write(tx, &format!("{fe}/{k}"), v.as_bytes());
                wf("backend", &be)?;
                wf("backend-id", &bd.to_string())?;
                wf("state", &(XenbusState::Initialising as u32).to_string())?;
                wf("virtual-device", &devid.to_string())?;
                wf("device-type", "disk")?;
                Ok(())
            })
            .map_err(|e| xs_err(&format!("create vbd {be}"), e))?;
        Ok(Vbd {
            kind: spec.kind,
            domid,
            devid,
            backend_path: be,
            frontend_path: fe,
        })
    }

    /// The hotplug script's `add`: give the backend the image, or, for a
    /// `pool:DIR:VID` target (what `block-refblk` accepts; the vid follows
    /// the last colon), have it start and serve the pool volume.
    pub fn hotplug_add(&self, vbd: &Vbd, spec: &VbdSpec) -> io::Result<()> {
        let volume = pool_target(&spec.image);
        let r = match (&self.hotplug, volume) {
            (Hotplug::Handle(h), None) => h
                .attach(&vbd.backend_path, &spec.image, spec.attach.clone())
                .map_err(|e| e.to_string()),
            (Hotplug::Handle(h), Some((pool, vid))) => h
                .attach_volume(&vbd.backend_path, pool, vid, spec.attach.clone())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Hotplug::Socket(sock), volume) => {
                let what = match volume {
                    None => format!("attach {} {}", vbd.backend_path, spec.image.display()),
                    Some((pool, vid)) => {
                        format!("attach-volume {} {pool} {vid}", vbd.backend_path)
                    }
                };
                let line = format!(
                    "{what}{} sector-size={}",
                    if spec.attach.read_only { " ro" } else { "" },
                    spec.attach.sector_size
                );
                match refblk_core::backend::control::request(sock, &line) {
                    Err(e) => Err(format!("{}: {e}", sock.display())),
                    Ok(v) if v["ok"] == serde_json::Value::Bool(true) => Ok(()),
                    Ok(v) => Err(v["error"].as_str().unwrap_or("refused").to_string()),
                }
            }
        };
        r.map_err(|e| {
            io::Error::other(format!(
                "{}: hotplug add of {}: {e}",
                vbd.backend_path,
                spec.image.display()
            ))
        })?;
        self.xs
            .write(
                0,
                &format!("{}/hotplug-status", vbd.backend_path),
                b"connected",
            )
            .map_err(|e| xs_err(&format!("{}/hotplug-status", vbd.backend_path), e))
    }

    /// The backend's state.
    pub fn backend_state(&self, vbd: &Vbd) -> io::Result<XenbusState> {
        self.state_of(&vbd.backend_path)
    }

    fn state_of(&self, dir: &str) -> io::Result<XenbusState> {
        let p = format!("{dir}/state");
        Ok(self
            .xs
            .try_read_string(0, &p)
            .map_err(|e| xs_err(&format!("read {p}"), e))?
            .and_then(|s| s.trim().parse::<u32>().ok())
            .and_then(XenbusState::from_u32)
            .unwrap_or(XenbusState::Unknown))
    }

    /// Poll `dir/state` until `pred` holds (libxl's devstate wait; polling
    /// keeps the toolstack's connection free of watch traffic).
    fn wait_state(&self, dir: &str, pred: impl Fn(XenbusState) -> bool) -> io::Result<XenbusState> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let s = self.state_of(dir)?;
            if pred(s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{dir}: state {s:?} after {:?}", self.timeout),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Remove the vbd as libxl does: `online` = 0 and backend state Closing
    /// (unless already Closed) in one transaction, wait up to `timeout` for
    /// Closed, then remove both directories (forced removal after a
    /// timeout, as libxl). Returns whether the backend reached Closed.
    pub fn remove_vbd(&self, vbd: &Vbd) -> io::Result<bool> {
        let be = &vbd.backend_path;
        let present = self
            .xs
            .transaction(|tx| {
                let state = self.xs.try_read_string(tx, &format!("{be}/state"))?;
                let Some(state) = state else {
                    return Ok(false);
                };
                self.xs.write(tx, &format!("{be}/online"), b"0")?;
                if state.trim() != (XenbusState::Closed as u32).to_string() {
                    self.xs.write(
                        tx,
                        &format!("{be}/state"),
                        (XenbusState::Closing as u32).to_string().as_bytes(),
                    )?;
                }
                Ok(true)
            })
            .map_err(|e| xs_err(&format!("remove vbd {be}"), e))?;
        let closed = present
            && self
                .wait_state(be, |s| {
                    matches!(s, XenbusState::Closed | XenbusState::Unknown)
                })
                .is_ok();
        // The hotplug script's `remove` (libxl runs it once the backend is
        // Closed): `refblk ctl detach`, which releases the device and stops
        // (commits) its pool volume. A daemon that already let the device go
        // answers with an error, which changes nothing.
        if let Hotplug::Socket(sock) = &self.hotplug {
            let _ = refblk_core::backend::control::request(sock, &format!("detach {be}"));
        }
        self.force_remove_vbd(vbd)?;
        Ok(closed)
    }

    /// libxl's forced removal (`xl block-detach --force`, or a backend that
    /// did not close in time): remove both directories at once, whatever
    /// state the device is in.
    pub fn force_remove_vbd(&self, vbd: &Vbd) -> io::Result<()> {
        let be = &vbd.backend_path;
        self.xs
            .transaction(|tx| {
                for p in [&vbd.frontend_path, be] {
                    match self.xs.rm(tx, p) {
                        Ok(()) => {}
                        Err(e) if e.is_enoent() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .map_err(|e| xs_err(&format!("remove {be}"), e))
    }
}
