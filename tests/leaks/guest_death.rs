//! A guest destroyed with I/O in flight: the backend notices, answers what it
//! can, unmaps, unbinds and closes the device, leaving no mapping of the
//! guest's memory, no file descriptor and no thread behind; the toolstack
//! then removes the device. Counts process-wide resources: in the leaks
//! binary, alone (`leak::exclusive`).

use std::time::Duration;

use crate::kit::leak::exclusive;
use crate::kit::*;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{FrontendOptions, IoRequest};
use xen_sys::xenbus::XenbusState;

/// Mappings of files of destroyed domains (guest memory, grant tables):
/// their files are deleted, the mappings say so.
fn dead_maps(dir: &std::path::Path) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let d = dir.to_string_lossy();
    maps.lines()
        .filter(|l| l.contains(&*d) && l.ends_with("(deleted)"))
        .map(str::to_string)
        .collect()
}

/// Closing a dead guest's device and its connections is asynchronous: wait
/// for it (a leak never settles).
fn settle(ok: impl FnMut() -> bool) -> bool {
    crate::kit::leak::settle(Duration::from_secs(30), ok)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    /// The guest closes the device.
    Clean,
    /// The domain is destroyed with I/O in flight.
    Die,
    /// The toolstack removes the device's directories with I/O in flight.
    ForceRemove,
}

/// One guest life, ending as `end` says.
fn life(rig: &Rig, image: &std::path::Path, domid: u16, end: End) {
    let guest = rig.guest(domid, 16384);
    let vbd = rig.attach(domid, XVDA, image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            ring_page_order: 2,
            queues: 2,
            ..Default::default()
        },
    );
    let data = vec![0x77u8; 128 * 1024];
    fe.write(0, &data).unwrap();
    if end == End::Clean {
        fe.disconnect().unwrap();
        assert!(rig.ts.remove_vbd(&vbd).unwrap());
        drop(fe);
        drop(guest);
        rig.ts.destroy_domain(domid).unwrap();
        return;
    }
    // Fill both rings with reads and writes (48 MiB), then the domain dies.
    let data = vec![0x78u8; 512 * 1024];
    fe.plug();
    for i in 0..96u64 {
        let req = if i % 2 == 0 {
            IoRequest::Write {
                sector: 1024 * i,
                data: &data,
            }
        } else {
            IoRequest::Read {
                sector: 1024 * i,
                len: data.len(),
            }
        };
        fe.submit(None, req).unwrap();
    }
    assert_eq!(fe.in_flight(), 96);
    // All of it reaches the backend at once, and the end comes at once.
    fe.unplug().unwrap();
    if end == End::ForceRemove {
        rig.ts.force_remove_vbd(&vbd).unwrap();
        assert!(
            settle(|| rig.backend.status().iter().all(|s| s.domid != domid)),
            "the backend did not drop the removed device"
        );
        let answered = fe.poll().len();
        eprintln!("dom{domid} removed with {answered} of 96 requests answered");
        assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
        drop(fe);
        drop(guest);
        rig.ts.destroy_domain(domid).unwrap();
        return;
    }
    drop(fe);
    drop(guest); // the last reference: SimGuest::drop destroys the domain
    let st = rig.status(domid, XVDA);
    eprintln!(
        "dom{domid} died with {} of 96 requests started ({} failed)",
        st.reads + st.writes - 1,
        st.errors
    );
    // The backend closes the device on its own (no frontend will).
    let closed = settle(|| {
        matches!(
            rig.ts.backend_state(&vbd),
            Ok(XenbusState::Closed | XenbusState::Unknown)
        )
    });
    assert!(closed, "backend did not close the device of the dead guest");
    // libxl's domain destruction removes the device.
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    rig.ts.destroy_domain(domid).unwrap();
}

#[test]
fn destroyed_guest_leaves_nothing_behind() {
    let _alone = exclusive();
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    let image = make_image(d.path(), "death.img", 64 << 20);
    // A guest that stays connected all along: the daemon keeps serving (and
    // the simulated platform drops dead domains from its cache on its next
    // call, which this device's periodic check makes).
    let witness_img = make_image(d.path(), "witness.img", 1 << 20);
    let witness = rig.guest(49, 256);
    rig.attach(49, XVDA, &witness_img, "w", AttachOptions::default());
    let mut wfe = rig.connect(&witness, XVDA, FrontendOptions::default());
    // Warm up with a clean life, then take the baseline.
    life(&rig, &image, 50, End::Clean);
    assert!(settle(|| rig.backend.status().len() == 1));
    assert!(
        settle(|| dead_maps(rig.dir.path()).is_empty()),
        "maps left after a clean life"
    );
    let fd_base = fds();
    let thread_base = threads();
    for (i, (domid, end)) in [
        (51u16, End::Die),
        (52, End::ForceRemove),
        (52, End::Die),
        (51, End::ForceRemove),
    ]
    .into_iter()
    .enumerate()
    {
        life(&rig, &image, domid, end);
        assert!(
            settle(|| rig.backend.status().len() == 1),
            "{end:?} {i}: the backend still holds the device"
        );
        assert!(
            settle(|| dead_maps(rig.dir.path()).is_empty()),
            "{end:?} {i}: mappings of dead guest memory left:\n{}",
            dead_maps(rig.dir.path()).join("\n")
        );
        assert!(
            settle(|| fds() <= fd_base),
            "{end:?} {i}: fds grew from {fd_base} to {}",
            fds()
        );
        assert!(
            settle(|| threads() <= thread_base),
            "{end:?} {i}: threads grew from {thread_base} to {}",
            threads()
        );
    }
    // The daemon still serves: the witness and a new guest.
    wfe.write(0, &[5u8; 4096]).unwrap();
    assert!(wfe.read(0, 4096).unwrap() == vec![5u8; 4096]);
    assert!(wfe.anomalies().is_clean());
    life(&rig, &image, 53, End::Clean);
    wfe.disconnect().unwrap();
    drop(wfe);
    rig.shutdown();
}
