//! Restart with a pool volume: `refblk serve` serving a volume's dirty image
//! is killed with SIGKILL and started again; the new daemon takes the volume
//! over (`Volume::resume`) with the device, the guest's writes before and
//! after the restart are on the disk, and the hotplug `remove` (`detach`)
//! commits them into the volume's clean image.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::kit::serve::{attach_over_control, wait_first_device_connected, Daemon};
use crate::kit::*;
use refblk_core::backend::control;
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::Frontend;
use refblk_sim::SimXen;
use xen_sys::xenbus::XenbusState;

const MIB: u64 = 1 << 20;

/// A daemon (`refblk serve` child 0) serving one vbd of guest `domid`, given
/// its image by the control-socket line `attach_line` (`{be}` = the backend
/// path), and the guest's frontend connected to it.
struct Served {
    daemon: Daemon,
    vbd: refblk_sim::frontend::Vbd,
    fe: Frontend,
}

fn serve_one(
    dir: &Path,
    sim: &SimXen,
    sock: &Path,
    domid: u16,
    target: &str,
    attach_line: &str,
) -> Served {
    let daemon = Daemon::spawn(dir, 0, &[]);
    assert!(
        wait_until(HANG, || control::request(sock, "status").is_ok()),
        "control socket never came up"
    );
    let (vbd, fe) = attach_over_control(sim, sock, domid, target, attach_line);
    wait_first_device_connected(sock, &daemon.log);
    Served { daemon, vbd, fe }
}

#[test]
fn a_pool_volume_is_taken_over_by_the_restarted_daemon_and_committed_on_detach() {
    restart_with_volume(false);
}

/// The guest shuts down while no daemon runs (found by the Xen lab: a kill
/// fell on the guest's poweroff). The new daemon cannot take the rings over,
/// but it must keep the volume, so that the hotplug `remove` commits it.
#[test]
fn a_volume_whose_guest_closed_during_the_restart_is_still_committed() {
    restart_with_volume(true);
}

fn restart_with_volume(closing_during_restart: bool) {
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let sim = SimXen::start(dir.path()).expect("simulated Xen");
    let vid = "appvms/work/private";
    let pool_dir = pool_with_volume(dir.path(), vid, 2, 8 * MIB);
    let sock = dir.path().join("refblk.sock");
    let Served {
        mut daemon,
        vbd,
        mut fe,
    } = serve_one(
        dir.path(),
        &sim,
        &sock,
        9,
        &format!("refblk:{}:{vid}", pool_dir.display()),
        &format!("attach-volume {{be}} {} {vid}", pool_dir.display()),
    );
    let a = vec![0xa1u8; 256 << 10];
    fe.write(0, &a).expect("write before the crash");
    fe.flush().expect("flush");

    daemon.kill9();
    if closing_during_restart {
        let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("xenstore");
        xs.write(
            0,
            &format!("{}/state", fe.frontend_path()),
            (XenbusState::Closing as u32).to_string().as_bytes(),
        )
        .expect("frontend Closing");
        let mut daemon = Daemon::spawn(dir.path(), 1, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = daemon.log_text();
            if text.contains("kept") {
                assert!(text.contains("cannot take the device over"), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "volume not kept; log:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The frontend finishes closing; the toolstack's `remove` commits.
        xs.write(
            0,
            &format!("{}/state", fe.frontend_path()),
            (XenbusState::Closed as u32).to_string().as_bytes(),
        )
        .expect("frontend Closed");
        let v = control::request(&sock, &format!("detach {}", vbd.backend_path)).expect("detach");
        assert_eq!(v["ok"], true, "{v}");
        let clean = std::fs::read(pool_dir.join(format!("{vid}.img"))).expect("clean image");
        assert_eq!(
            &clean[..a.len()],
            &a[..],
            "the guest's flushed write was not committed; log:\n{}",
            daemon.log_text()
        );
        assert!(
            !pool_dir.join(format!("{vid}-dirty.img")).exists(),
            "the dirty image is left"
        );
        std::mem::forget(fe); // its daemon-side is gone; don't wait on a close handshake
        assert!(daemon.term(), "daemon exit after SIGTERM");
        return;
    }
    let mut daemon = Daemon::spawn(dir.path(), 1, &[]);
    wait_first_device_connected(&sock, &daemon.log);
    let text = daemon.log_text();
    assert!(
        text.contains("resumed after a restart") && text.contains("taking over"),
        "the volume was not taken over; log:\n{text}"
    );
    let b = vec![0xb2u8; 256 << 10];
    fe.write(MIB / 512, &b).expect("write after the restart");
    fe.flush().expect("flush");
    assert_eq!(fe.read(0, a.len()).unwrap(), a);
    assert_eq!(fe.read(MIB / 512, b.len()).unwrap(), b);

    // The hotplug `remove`: the device closes and the volume is committed.
    let v = control::request(&sock, &format!("detach {}", vbd.backend_path)).expect("detach");
    assert_eq!(v["ok"], true, "{v}");
    let clean = std::fs::read(pool_dir.join(format!("{vid}.img"))).expect("clean image");
    assert_eq!(
        &clean[..a.len()],
        &a[..],
        "write before the crash not committed"
    );
    assert_eq!(
        &clean[MIB as usize..MIB as usize + b.len()],
        &b[..],
        "write after the restart not committed"
    );
    drop(fe);
    assert!(daemon.term(), "daemon exit after SIGTERM");
}

/// Limits given on the disk line of a plain image (no pool volume to store
/// them) survive a restart: the state file records them.
#[test]
fn a_plain_images_disk_line_limits_survive_a_restart() {
    if !require_memlock_or_skip() {
        return;
    }
    let dir = machine_dir();
    let sim = SimXen::start(dir.path()).expect("simulated Xen");
    let image = make_image(dir.path(), "plain.img", 8 * MIB);
    let sock = dir.path().join("refblk.sock");
    let Served {
        mut daemon,
        vbd,
        mut fe,
    } = serve_one(
        dir.path(),
        &sim,
        &sock,
        11,
        &image.display().to_string(),
        &format!(
            "attach {{be}} {} read-iops=77 write-bps=3M",
            image.display()
        ),
    );
    fe.write(0, &[7u8; 4096]).expect("write");
    daemon.kill9();
    let mut daemon = Daemon::spawn(dir.path(), 1, &[]);
    wait_first_device_connected(&sock, &daemon.log);
    let v = control::request(&sock, "status").expect("status");
    let l = &v["devices"][0]["limits"];
    assert_eq!(l["read_iops"], 77, "{v}");
    assert_eq!(l["write_bps"], 3 * MIB, "{v}");
    assert_eq!(fe.read(0, 4096).unwrap(), vec![7u8; 4096]);
    let v = control::request(&sock, &format!("detach {}", vbd.backend_path)).expect("detach");
    assert_eq!(v["ok"], true, "{v}");
    drop(fe);
    assert!(daemon.term(), "daemon exit after SIGTERM");
}
