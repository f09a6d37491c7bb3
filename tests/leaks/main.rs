//! Leak checks: each test counts a process-wide resource (open descriptors,
//! threads, mappings) before and after many cycles. Other tests in the same
//! process would move those counts, so these run in a binary of their own,
//! and one at a time (each takes `kit::leak::exclusive` first).

#[path = "../kit/mod.rs"]
mod kit;

mod datapath_cycles;
mod guest_death;
mod sim;
mod xenstore;
