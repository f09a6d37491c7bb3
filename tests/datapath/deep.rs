//! A 16-page ring (512 slots) kept full: more requests in flight than the
//! backend's io_uring takes ops at once, so the backend must queue them, not
//! fail them.

use crate::kit::*;
use refblk_core::backend::{AttachOptions, BackendConfig};
use refblk_core::engine::EngineConfig;
use refblk_sim::frontend::FrontendOptions;

#[test]
fn full_order4_ring_with_a_small_engine_queue() {
    let Some(rig) = Rig::with_config(BackendConfig {
        engine: EngineConfig {
            queue_depth: 32, // 64 ops in flight at most, far below 512 slots
            ..EngineConfig::default()
        },
        ..BackendConfig::default()
    }) else {
        return;
    };
    let image = make_image(rig.dir.path(), "deep.img", 16 << 20);
    let guest = rig.guest(21, 32768);
    let vbd = rig.attach(21, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &guest,
        XVDA,
        FrontendOptions {
            ring_page_order: 4,
            ..FrontendOptions::default()
        },
    );
    assert_eq!(fe.info().unwrap().ring_size, 512);
    let (reqs, model) = random_rw(&mut fe, 99, 3000, 480, 8, 16 << 20);
    assert!(reqs >= 3000);
    assert!(std::fs::read(&image).unwrap() == model);
    let st = rig.status(21, XVDA);
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(fe.anomalies().is_clean(), "{:?}", fe.anomalies());
    fe.disconnect().unwrap();
    assert!(rig.ts.remove_vbd(&vbd).unwrap());
    drop(fe);
    rig.shutdown();
}
