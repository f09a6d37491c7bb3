//! Small shared helpers.
//!
//! - [`size`]: parse and format byte sizes such as `10G`, `512M`, `4096`.
//! - [`time`]: seconds since the epoch and UTC dates.

pub mod size;
pub mod time;
