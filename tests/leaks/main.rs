//! Leak checks: each test counts a process-wide resource (open descriptors,
//! threads) before and after many cycles, so these run in a binary of their own.

#[path = "../kit/mod.rs"]
mod kit;
#[path = "../sim/support.rs"]
mod support;

mod datapath_cycles;
mod guest_death;
mod sim;
mod xenstore;
