//! vbd3 devices (issue 18): what libxl >= 4.19 writes for a disk line with
//! `backendtype=tap,script=block-refblk` — the backend under
//! `backend/vbd3/<domid>/<devid>`, `params` = `aio:<target>`, `type` = vbd3,
//! the frontend under `device/vbd/<devid>` as for any disk. refblk serves it
//! beside (or instead of) `backend/vbd`, and keys every device by its kind, so
//! that a vbd and a vbd3 directory of the same domain and device id are two
//! devices.

use std::path::Path;

use crate::kit::*;
use refblk_core::backend::{BackendConfig, Kind, LimitTarget};
use refblk_core::limits::LimitsPatch;
use refblk_sim::frontend::{FrontendOptions, VbdSpec};
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;

fn read(rig: &Rig, path: &str) -> Option<String> {
    rig.ts.xs().try_read_string(0, path).expect("xenstore read")
}

fn state_node(rig: &Rig, be: &str) -> Option<String> {
    read(rig, &format!("{be}/state"))
}

#[test]
fn a_vbd3_device_as_libxl_4_19_creates_it_serves_verified_io() {
    let Some(rig) = Rig::new() else { return };
    let images = machine_dir();
    let image = make_image(images.path(), "vbd3.img", 8 * MIB);
    let guest = rig.guest(40, 16384);
    let mut spec = VbdSpec::vbd3(40, XVDB, &image);
    spec.vdev = "xvdb".into();
    let vbd = rig
        .ts
        .add_vbd(&spec)
        .expect("the backend claims the vbd3 device (InitWait) and takes its image");
    assert_eq!(vbd.backend_path, "/local/domain/0/backend/vbd3/40/51728");
    let be = &vbd.backend_path;
    assert_eq!(
        read(&rig, &format!("{be}/params")),
        Some(format!("aio:{}", image.display()))
    );
    assert_eq!(read(&rig, &format!("{be}/type")).as_deref(), Some("vbd3"));

    let mut fe = rig.connect(&guest, XVDB, FrontendOptions::default());
    assert_eq!(fe.backend_path(), be.as_str());
    let (_, model) = random_io(&mut fe, 40, 200, 16, 64, 8 * MIB, true);
    assert!(
        std::fs::read(&image).expect("read image") == model,
        "the image differs from what the guest wrote"
    );

    let st = rig.status_at(be).expect("the device in status");
    assert_eq!((st.kind, st.domid, st.devid), (Kind::Vbd3, 40, XVDB));
    assert_eq!(st.state, XenbusState::Connected);
    assert!(st.writes > 0 && st.reads > 0 && st.errors == 0, "{st:?}");
    assert_eq!(st.vdev.as_deref(), Some("xvdb"));
    // `refblk limit <backend path>` finds it, and says which kind it is.
    let set = rig
        .backend
        .set_limits(be, LimitsPatch::default())
        .expect("limit by the vbd3 backend path");
    assert_eq!(set.describe, "vbd3 40/51728");
    assert!(matches!(set.target, LimitTarget::Device(k) if k.kind == Kind::Vbd3));

    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().expect("disconnect");
    assert!(
        rig.ts.remove_vbd(&vbd).expect("remove"),
        "the vbd3 device did not reach Closed on libxl's removal"
    );
    drop(fe);
    rig.shutdown();
}

/// A directory of one kind must never be driven as the other. libxl keeps
/// one device-id space per guest, so the two can meet only when one of them
/// is stale — here a vbd directory a crashed toolstack left behind (refblk's,
/// with its image) while the guest got the same disk again as a vbd3. Both
/// name the same frontend directory; only the vbd3 one, which the frontend's
/// `backend` node names, may connect to it. Detaching or removing the stale
/// vbd must not touch the vbd3 device, and a `DOMAIN/VDEV` limit target that
/// could mean either is refused.
#[test]
fn a_vbd_and_a_vbd3_of_the_same_domain_and_device_id_are_not_confused() {
    let Some(rig) = Rig::new() else { return };
    let images = machine_dir();
    let stale = make_image(images.path(), "stale.img", 4 * MIB);
    let served = make_image(images.path(), "served.img", 4 * MIB);
    let guest = rig.guest(41, 8192);
    let old = rig
        .ts
        .add_vbd(&VbdSpec::new(41, XVDA, &stale))
        .expect("the vbd device");
    let new = rig
        .ts
        .add_vbd(&VbdSpec::vbd3(41, XVDA, &served))
        .expect("a vbd3 device of the same domain and device id");
    assert_ne!(old.backend_path, new.backend_path);

    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    assert_eq!(fe.backend_path(), new.backend_path.as_str());
    random_rw(&mut fe, 41, 150, 8, 32, 4 * MIB);

    let st_old = rig.status_at(&old.backend_path).expect("the vbd device");
    let st_new = rig.status_at(&new.backend_path).expect("the vbd3 device");
    assert_eq!(st_old.kind, Kind::Vbd);
    assert_eq!(st_new.kind, Kind::Vbd3);
    assert_eq!(st_new.state, XenbusState::Connected);
    assert_eq!(
        st_old.state,
        XenbusState::InitWait,
        "the stale vbd connected to the vbd3's frontend"
    );
    assert_eq!(st_old.image.as_deref(), Some(stale.as_path()));
    assert_eq!(st_new.image.as_deref(), Some(served.as_path()));
    assert_eq!(st_old.requests, 0, "the stale vbd served requests");
    assert_eq!(state_node(&rig, &new.backend_path).as_deref(), Some("4"));
    assert_eq!(state_node(&rig, &old.backend_path).as_deref(), Some("2"));
    assert_untouched(&stale);

    // Either could be meant by 41/xvda: refused, naming both.
    let e = rig
        .backend
        .set_limits("41/xvda", LimitsPatch::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&old.backend_path) && e.contains(&new.backend_path),
        "{e}"
    );

    // The hotplug `remove` of the stale vbd releases it, and only it.
    let r = rig
        .backend
        .detach(&old.backend_path)
        .expect("detach the vbd");
    assert_eq!(r, "released");
    assert_eq!(state_node(&rig, &old.backend_path).as_deref(), Some("6"));
    let st_new = rig.status_at(&new.backend_path).expect("the vbd3 device");
    assert_eq!(st_new.state, XenbusState::Connected);
    assert_eq!(st_new.image.as_deref(), Some(served.as_path()));
    random_rw(&mut fe, 42, 100, 8, 32, 4 * MIB);

    // libxl removes the stale directory: the daemon forgets that device only.
    rig.ts
        .xs()
        .rm(0, &old.backend_path)
        .expect("rm the vbd directory");
    assert!(
        wait_until(HANG, || rig.status_at(&old.backend_path).is_none()),
        "the removed vbd directory's device was not forgotten"
    );
    let st_new = rig.status_at(&new.backend_path).expect("the vbd3 device");
    assert_eq!(st_new.state, XenbusState::Connected);
    let (_, model) = random_rw(&mut fe, 43, 100, 8, 32, 4 * MIB);
    assert!(std::fs::read(&served).unwrap() == model);
    assert_untouched(&stale);
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());

    fe.disconnect().expect("disconnect");
    assert!(rig.ts.remove_vbd(&new).expect("remove the vbd3"));
    drop(fe);
    rig.shutdown();
}

fn assert_untouched(image: &Path) {
    let data = std::fs::read(image).expect("read image");
    assert!(
        data.iter().all(|&b| b == 0),
        "{} was written to",
        image.display()
    );
}

/// Where kernel blkback is loaded, `refblk serve` serves vbd3 only
/// (`BackendConfig::kinds`): a vbd directory, even one with refblk's script,
/// is left to blkback — never claimed — and a hotplug `add` for it is refused
/// with what to do instead, which `xl` prints.
#[test]
fn a_daemon_serving_vbd3_only_leaves_backend_vbd_to_blkback() {
    let Some(rig) = Rig::with_config(BackendConfig {
        kinds: vec![Kind::Vbd3],
        ..BackendConfig::default()
    }) else {
        return;
    };
    let images = machine_dir();
    let image = make_image(images.path(), "d.img", 4 * MIB);
    let _g42 = rig.guest(42, 4096);
    let guest = rig.guest(43, 4096);
    let vbd = rig
        .ts
        .create_vbd_nodes(&VbdSpec::new(42, XVDA, &image))
        .expect("vbd nodes");
    let vbd3 = rig
        .ts
        .add_vbd(&VbdSpec::vbd3(43, XVDA, &image))
        .expect("the vbd3 device is served");
    let e = rig
        .backend
        .attach(&vbd.backend_path, &image, Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not serve vbd devices") && e.contains("backendtype=tap"),
        "{e}"
    );
    assert!(rig.status_at(&vbd.backend_path).is_none());
    assert_eq!(state_node(&rig, &vbd.backend_path).as_deref(), Some("1"));
    assert_eq!(
        read(
            &rig,
            &format!("{}/feature-max-indirect-segments", vbd.backend_path)
        ),
        None,
        "the vbd directory was probed"
    );
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    fe.write(0, &[7u8; 4096]).expect("write on the vbd3");
    assert_eq!(fe.read(0, 4096).expect("read"), vec![7u8; 4096]);
    fe.disconnect().expect("disconnect");
    assert!(rig.ts.remove_vbd(&vbd3).expect("remove"));
    drop(fe);
    rig.shutdown();
}
