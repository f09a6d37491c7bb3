//! Small shared helpers.
//!
//! - [`size`]: parse and format byte sizes such as `10G`, `512M`, `4096`.

pub mod size;
