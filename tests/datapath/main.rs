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
mod large;
mod panic;
mod persistent;
mod power_loss;
mod rw;
mod vbd3;
mod volume;
mod zero_copy;
