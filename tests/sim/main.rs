//! The simulated Xen: grant tables and event channels across processes (the
//! peer is a re-exec of this binary, see `support.rs`) and `refblk sim`.

#[path = "../kit/mod.rs"]
mod kit;
mod support;

mod cli;
mod evtchn;
mod grants;
