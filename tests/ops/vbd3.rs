//! vbd3 devices end to end (issue 18): `scripts/block-refblk` itself, run the
//! way libxl 4.19+ runs it for `backendtype=tap,script=block-refblk`
//! (`XENBUS_PATH=backend/vbd3/<domid>/<devid>`, after the backend's InitWait),
//! against `refblk serve --sim` and the simulated xenstored (the script's
//! `xenstore-read`/`-write` are Debian's xenstore-utils, which find it through
//! `XENSTORED_PATH`); and a vbd3 device taken over by a restarted daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::kit::serve::{self, Daemon};
use crate::kit::*;
use refblk_core::backend::control;
use refblk_core::pool::{InitOptions, Pool, VolumeConfig, VolumeState};
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, Toolstack, Vbd, VbdSpec};
use refblk_sim::scratchfs::require_tools_or_skip;
use refblk_sim::{SimGuest, SimXen};
use serde_json::Value;
use xen_sys::xenbus::XenbusState;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/block-refblk");
const MIB: u64 = 1 << 20;

/// A simulated Xen with `refblk serve --sim` and a toolstack talking to it
/// over its control socket.
struct Machine {
    // Dropped first: the daemon, then the machine it serves.
    daemon: Daemon,
    ts: Toolstack,
    sock: PathBuf,
    sim: SimXen,
    dir: tempfile::TempDir,
}

impl Machine {
    fn start() -> Option<Machine> {
        if !require_memlock_or_skip()
            || !require_tools_or_skip(
                &["bash", "xenstore-read", "xenstore-write", "timeout"],
                "running block-refblk (install xenstore-utils)",
            )
        {
            return None;
        }
        let dir = machine_dir();
        let sim = SimXen::start(dir.path()).expect("simulated Xen");
        let sock = dir.path().join("refblk.sock");
        let mut daemon = Daemon::spawn(dir.path(), 0, &[]);
        daemon.wait_control(&sock);
        let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("toolstack xenstore");
        let ts = Toolstack::with_control_socket(xs, &sock);
        Some(Machine {
            daemon,
            ts,
            sock,
            sim,
            dir,
        })
    }

    fn guest(&self, domid: u16) -> Arc<SimGuest> {
        self.ts.create_domain(domid).expect("domain");
        Arc::new(self.sim.create_guest(domid, 4096).expect("guest"))
    }

    /// libxl's part before the script: the nodes, then InitWait.
    fn nodes(&self, spec: &VbdSpec) -> Vbd {
        let vbd = self.ts.create_vbd_nodes(spec).expect("vbd nodes");
        assert!(
            wait_until(HANG, || self.ts.backend_state(&vbd).unwrap()
                == XenbusState::InitWait),
            "the daemon never moved {} to InitWait; log:\n{}",
            vbd.backend_path,
            self.daemon.log_text()
        );
        vbd
    }

    /// `block-refblk ACTION` as libxl runs it for `vbd`: its exit status and
    /// what it printed.
    fn hotplug(&self, action: &str, vbd: &Vbd) -> (ExitStatus, String) {
        // Relative, as libxl sets it (backend/vbd3/<domid>/<devid>).
        let rel = vbd
            .backend_path
            .strip_prefix("/local/domain/0/")
            .expect("a dom0 backend");
        let mut child = Command::new("bash")
            .arg(SCRIPT)
            .arg(action)
            .env("XENBUS_PATH", rel)
            .env(
                "XENBUS_TYPE",
                rel.split('/').nth(1).expect("backend/<kind>/..."),
            )
            .env("XENSTORED_PATH", self.sim.xenstored_path())
            .env("REFBLK", serve::exe())
            .env("REFBLK_CONTROL", &self.sock)
            .env("REFBLK_HOTPLUG_STATE", self.hotplug_state())
            .env("REFBLK_DEFAULTS", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run block-refblk");
        // libxl kills the script after 40 s.
        let done = wait_until(Duration::from_secs(40), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("block-refblk output");
        assert!(done, "block-refblk {action} ran past libxl's 40 s");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    fn hotplug_state(&self) -> PathBuf {
        self.dir.path().join("hotplug")
    }

    fn node(&self, path: &str) -> Option<String> {
        self.ts
            .xs()
            .try_read_string(0, path)
            .expect("xenstore read")
    }

    /// The daemon's status of the device at `be`.
    fn status(&self, be: &str) -> Option<Value> {
        let v = control::request(&self.sock, "status").expect("status");
        v["devices"]
            .as_array()?
            .iter()
            .find(|d| d["backend"] == be)
            .cloned()
    }

    fn connect(&self, guest: &Arc<SimGuest>, devid: u32) -> Frontend {
        Frontend::connect(
            &self.sim.xenstored_path(),
            guest.clone(),
            devid,
            FrontendOptions {
                timeout: Duration::from_secs(60),
                ..FrontendOptions::default()
            },
        )
        .expect("frontend connect")
    }

    /// libxl's removal: `online` = 0 and (unless Closed) state Closing in one
    /// transaction, wait for Closed, the script's `remove`, then the
    /// directories go.
    fn remove(&self, vbd: &Vbd) {
        let be = &vbd.backend_path;
        let xs = self.ts.xs();
        xs.transaction(|tx| {
            xs.write(tx, &format!("{be}/online"), b"0")?;
            if xs.try_read_string(tx, &format!("{be}/state"))?.as_deref() != Some("6") {
                xs.write(tx, &format!("{be}/state"), b"5")?;
            }
            Ok(())
        })
        .expect("online=0, state=5");
        assert!(
            wait_until(HANG, || self.ts.backend_state(vbd).unwrap()
                == XenbusState::Closed),
            "{be} never reached Closed; log:\n{}",
            self.daemon.log_text()
        );
        let (st, out) = self.hotplug("remove", vbd);
        assert!(st.success(), "block-refblk remove: {st}\n{out}");
        self.ts
            .force_remove_vbd(vbd)
            .expect("remove the directories");
    }
}

#[test]
fn block_refblk_strips_a_vbd3_format_prefix_and_passes_the_sector_size() {
    let Some(m) = Machine::start() else { return };
    let image = make_image(m.dir.path(), "disk.img", 8 * MIB);
    let guest = m.guest(7);
    let mut spec = VbdSpec::vbd3(7, XVDB, &image);
    // What libxl 4.19 writes for
    // `vdev=xvdb,backendtype=tap,script=block-refblk,target=<image>,sector-size=4096,iops=5000`.
    spec.params = Some(format!(
        "aio:{},sector-size=4096,iops=5000",
        image.display()
    ));
    let vbd = m.nodes(&spec);
    assert_eq!(vbd.backend_path, "/local/domain/0/backend/vbd3/7/51728");
    let (st, out) = m.hotplug("add", &vbd);
    assert!(
        st.success(),
        "block-refblk add: {st}\n{out}\nhotplug-error: {:?}",
        m.node(&format!("{}/hotplug-error", vbd.backend_path))
    );
    let be = &vbd.backend_path;
    assert_eq!(
        m.node(&format!("{be}/hotplug-status")).as_deref(),
        Some("connected")
    );
    let dev = m.status(be).expect("the daemon has the device");
    assert_eq!(dev["kind"], "vbd3");
    assert_eq!(dev["image"], image.display().to_string(), "{dev}");
    assert_eq!(dev["limits"]["read_iops"], 5000, "{dev}");
    assert_eq!(dev["limits"]["write_iops"], 5000, "{dev}");

    // The guest sees a disk of 4096-byte logical sectors.
    let mut fe = m.connect(&guest, XVDB);
    let info = fe.info().expect("connected").clone();
    assert_eq!(info.sector_size, 4096);
    assert_eq!(info.sectors, 8 * MIB / 512);
    assert_eq!(
        m.node(&format!("{be}/sector-size")).as_deref(),
        Some("4096")
    );
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    fe.write(8, &data).expect("aligned write");
    assert_eq!(fe.read(8, 8192).expect("read back"), data);
    assert!(
        fe.read(1, 512).is_err(),
        "a 512-byte read inside a 4096-byte sector was served"
    );

    // The hotplug state of a vbd3 is its own (vbd3-<domid>-<devid>).
    assert!(m.hotplug_state().join("vbd3-7-51728").exists());
    fe.disconnect().expect("disconnect");
    m.remove(&vbd);
    assert!(!m.hotplug_state().join("vbd3-7-51728").exists());
    assert!(
        wait_until(HANG, || m.status(be).is_none()),
        "the daemon kept the removed device"
    );
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&on_disk[8 * 512..8 * 512 + 8192], &data[..]);
}

#[test]
fn block_refblk_refuses_vbd3_formats_other_than_raw_and_bad_sector_sizes() {
    let Some(m) = Machine::start() else { return };
    let image = make_image(m.dir.path(), "disk.img", 4 * MIB);
    let img = image.display();
    let cases = [
        (format!("qcow2:{img}"), "'qcow2' is not supported"),
        (format!("vhd:{img}"), "'vhd' is not supported"),
        (format!("aio:{img},sector-size=1000"), "512 or 4096"),
        (img.to_string(), "no format prefix"),
    ];
    for (i, (params, want)) in cases.iter().enumerate() {
        let domid = 20 + i as u16;
        let _guest = m.guest(domid);
        let mut spec = VbdSpec::vbd3(domid, XVDA, &image);
        spec.params = Some(params.clone());
        let vbd = m.nodes(&spec);
        let be = &vbd.backend_path;
        let (st, out) = m.hotplug("add", &vbd);
        assert_eq!(st.code(), Some(1), "params {params:?} accepted: {out}");
        let err = m.node(&format!("{be}/hotplug-error")).unwrap_or_default();
        assert!(
            err.starts_with("block-refblk: ") && err.contains(want),
            "params {params:?}: hotplug-error {err:?}"
        );
        assert_eq!(
            m.node(&format!("{be}/hotplug-status")).as_deref(),
            Some("error")
        );
        let dev = m.status(be).expect("claimed at InitWait");
        assert_eq!(dev["image"], Value::Null, "{params:?}: attached anyway");
        m.ts.force_remove_vbd(&vbd).unwrap();
    }
}

/// An emulated disk's name (hda, sdb): an HVM guest's device model would need
/// a path it opens itself (`physical-device-path`), which refblk does not
/// give, so QEMU would get no disk and the firmware nothing to boot. The
/// script refuses it on either kind, with a reason xl prints, and attaches
/// nothing.
#[test]
fn block_refblk_refuses_emulated_disk_names() {
    let Some(m) = Machine::start() else { return };
    let image = make_image(m.dir.path(), "disk.img", 4 * MIB);
    for (i, vdev) in ["hda", "sdb", "hda"].iter().enumerate() {
        let domid = 40 + i as u16;
        let _guest = m.guest(domid);
        let mut spec = if i == 2 {
            VbdSpec::new(domid, XVDA, &image)
        } else {
            VbdSpec::vbd3(domid, XVDA, &image)
        };
        spec.vdev = vdev.to_string();
        let vbd = m.nodes(&spec);
        let be = &vbd.backend_path;
        let (st, out) = m.hotplug("add", &vbd);
        assert_eq!(st.code(), Some(1), "vdev {vdev} ({be}) accepted: {out}");
        let err = m.node(&format!("{be}/hotplug-error")).unwrap_or_default();
        assert!(
            err.starts_with(&format!("block-refblk: vdev={vdev} names an emulated disk"))
                && err.contains("use vdev=xvdX"),
            "vdev {vdev}: hotplug-error {err:?}"
        );
        let dev = m.status(be).expect("claimed at InitWait");
        assert_eq!(dev["image"], Value::Null, "vdev {vdev}: attached anyway");
        m.ts.force_remove_vbd(&vbd).unwrap();
    }
    // The same image under an xvd name is served.
    let _guest = m.guest(50);
    let vbd = m.nodes(&VbdSpec::vbd3(50, XVDA, &image));
    let (st, out) = m.hotplug("add", &vbd);
    assert!(st.success(), "xvda refused: {out}");
    m.remove(&vbd);
}

#[test]
fn block_refblk_takes_a_pool_volume_and_limits_after_the_prefix() {
    let Some(m) = Machine::start() else { return };
    let pool_dir = m.dir.path().join("pool");
    let pool = Pool::init(
        &pool_dir,
        &InitOptions {
            setup_check: false,
            ..InitOptions::default()
        },
    )
    .expect("pool init");
    let vid = "appvms/work/private";
    pool.create_volume(vid, VolumeConfig::origin(1), 4 * MIB)
        .expect("volume");
    let guest = m.guest(9);
    let mut spec = VbdSpec::vbd3(9, XVDA, "unused");
    // `backendtype=tap,format=raw,...,target=pool:DIR:VID,write-iops=300`
    spec.params = Some(format!(
        "raw:pool:{}:{vid},write-iops=300",
        pool_dir.display()
    ));
    let vbd = m.nodes(&spec);
    let (st, out) = m.hotplug("add", &vbd);
    assert!(st.success(), "block-refblk add: {st}\n{out}");
    let dev = m.status(&vbd.backend_path).expect("the device");
    let served = dev["image"].as_str().unwrap_or_default().to_string();
    assert!(served.ends_with("private-dirty.img"), "{dev}");
    assert_eq!(dev["limits"]["write_iops"], 300, "{dev}");
    assert_eq!(dev["limits"]["read_iops"], 0, "{dev}");

    let mut fe = m.connect(&guest, XVDA);
    fe.write(0, &[0x5a; 4096]).expect("write");
    fe.flush().expect("flush");
    fe.disconnect().expect("disconnect");
    // The script's remove has the daemon commit the volume.
    m.remove(&vbd);
    let vol = pool.volume(vid).expect("volume");
    assert_eq!(vol.state(), VolumeState::Stopped);
    let clean = std::fs::read(pool_dir.join(format!("{vid}.img"))).unwrap();
    assert_eq!(&clean[..4096], &[0x5a; 4096][..], "not committed");
}

/// The restart state of a vbd3 device records its vbd3 backend path (in the
/// state directory's `vbd3/`) and a daemon killed with SIGKILL is succeeded by
/// one that takes the device over without a handshake.
#[test]
fn a_vbd3_device_is_taken_over_by_a_restarted_daemon() {
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let sim = SimXen::start(dir.path()).expect("simulated Xen");
    let sock = dir.path().join("refblk.sock");
    let mut daemon = Daemon::spawn(dir.path(), 0, &[]);
    daemon.wait_control(&sock);
    let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("toolstack xenstore");
    let ts = Toolstack::with_control_socket(xs, &sock);
    ts.create_domain(7).expect("domain");
    let guest = Arc::new(sim.create_guest(7, 4096).expect("guest"));
    let image = make_image(dir.path(), "disk.img", 4 * MIB);
    let vbd = ts
        .add_vbd(&VbdSpec::vbd3(7, XVDB, &image))
        .expect("add the vbd3");
    let mut fe = Frontend::connect(
        &sim.xenstored_path(),
        guest,
        XVDB,
        FrontendOptions {
            timeout: Duration::from_secs(60),
            ..FrontendOptions::default()
        },
    )
    .expect("frontend");
    serve::wait_first_device_connected(&sock, &daemon.log);
    fe.write(0, &[1u8; 65536]).expect("write before the kill");

    let state: &Path = &dir.path().join("state");
    let file = state.join("vbd3/vbd-7-51728.json");
    let st: Value = serde_json::from_slice(&std::fs::read(&file).expect("vbd3 state file"))
        .expect("state JSON");
    assert_eq!(st["backend"], vbd.backend_path);
    assert!(
        !state.join("vbd-7-51728.json").exists(),
        "a vbd3's state in the vbd's place"
    );

    daemon.kill9();
    let mut daemon = Daemon::spawn(dir.path(), 1, &[]);
    daemon.wait_control(&sock);
    serve::wait_first_device_connected(&sock, &daemon.log);
    let log = daemon.log_text();
    assert!(
        log.contains("vbd3 7/51728: resumed after a restart"),
        "the vbd3 device was not taken over; log:\n{log}"
    );
    assert_eq!(
        fe.read(0, 65536).expect("read after the restart"),
        vec![1u8; 65536]
    );
    fe.write(128, &[2u8; 4096])
        .expect("write after the restart");
    assert_eq!(fe.read(128, 4096).unwrap(), vec![2u8; 4096]);
    let dev = serve::device_status(&sock, 7, XVDB).expect("status");
    assert_eq!(dev["kind"], "vbd3");
    assert_eq!(dev["backend"], vbd.backend_path);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());

    // A clean stop lets go of the state, the vbd3 directory included.
    assert!(daemon.term(), "the daemon's exit after SIGTERM");
    let left: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "state left after a clean stop: {left:?}");
}
