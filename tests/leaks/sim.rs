//! Attach/detach cycles on the simulated Xen must not leak file descriptors
//! (the backend must stay flat over many guest lifetimes). Counts the
//! process's fds: in the leaks binary, alone (`leak::exclusive`).

use std::time::Duration;

use crate::kit::leak::{exclusive, fds, settle};
use crate::kit::machine_dir;
use refblk_core::platform::{ForeignMapping, Platform};
use refblk_sim::{EvtchnBroker, SimGuest, SimPlatform};

const DOM: u16 = 8;
/// A bound on a hang, not a speed target.
const LONG: Duration = Duration::from_secs(30);

#[test]
fn attach_detach_cycles_leak_no_fds() {
    let _alone = exclusive();
    // Guest, broker and backend all in this process, so every fd the simulation
    // opens is counted here.
    let dir = machine_dir();
    let _broker = EvtchnBroker::spawn(dir.path()).expect("broker");
    let p = SimPlatform::new(dir.path()).unwrap();
    let cycle = |i: u32| {
        let guest = SimGuest::create(dir.path(), DOM, 8).expect("guest");
        let ring = guest.alloc_pages(2).unwrap();
        let refs = [
            guest.grant(ring, 0, false).unwrap(),
            guest.grant(ring + 1, 0, false).unwrap(),
        ];
        let gch = guest.alloc_unbound(0).unwrap();
        let bch = p.bind_interdomain(DOM, gch.local_port()).unwrap();
        let m = p.map_grant_refs(DOM, &refs, true).unwrap();
        m.copy_in(0, &i.to_le_bytes()).unwrap();
        let view = guest.pages(ring, 2).unwrap();
        let mut b = [0u8; 4];
        view.copy_out(0, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), i);
        gch.notify().unwrap();
        assert!(bch.wait_pending(Some(LONG)).unwrap());
        assert!(bch.ack().unwrap());
        // Detach in the order a backend does: unmap, unbind; then the guest dies.
        drop(m);
        drop(bch);
        assert!(guest.end_access(refs[0]).unwrap());
        drop(gch);
        if i.is_multiple_of(2) {
            guest.destroy().unwrap();
        } else {
            drop(guest); // dropping destroys too
        }
        assert!(!p.domain_exists(DOM).unwrap());
    };
    cycle(0);
    let before = fds();
    for i in 1..=100 {
        cycle(i);
    }
    // Broker connection threads close their ends asynchronously (a leak
    // never settles).
    assert!(
        settle(Duration::from_secs(30), || fds() <= before),
        "fds grew from {before} to {} over 100 cycles",
        fds()
    );
}
