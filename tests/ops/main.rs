//! Operations: limits, statistics, restart and hand-over of the daemon,
//! the benchmark machinery and many guests on one daemon.

#[path = "../kit/mod.rs"]
mod kit;
mod load;

mod bench_fio;
mod bench_ram;
mod bench_smoke;
mod bench_svg;
mod layers;
mod limits;
mod metrics;
mod package;
mod restart_live;
mod restart_volume;
mod scale_guests;
mod sim_guest;
mod stats;
mod status_table;
mod unit;
mod vbd3;
