//! The data path: a simulated machine with a refblk backend and test
//! frontends (reads, writes, features, hostile guests, faults, volumes).
//! One module per area of the former one-file test binaries; shared code is
//! in `tests/kit/`.

#[path = "../kit/mod.rs"]
mod kit;

mod blkif_ring;
mod deep;
mod demo;
mod faults_flush;
mod faults_image;
mod features;
mod frontend_selftest;
mod hostile;
mod hostile2;
mod hostile3;
// persistent.rs still declares `mod datapath_support;` (the name of the kit
// before the suite was grouped by area); loaded by path, it finds that
// module beside it, in `datapath_support.rs`, which is the kit.
#[path = "persistent.rs"]
mod persistent;
mod rw;
mod volume;
