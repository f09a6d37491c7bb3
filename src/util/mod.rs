//! Small shared helpers.
//!
//! - [`size`]: parse and format byte sizes such as `10G`, `512M`, `4096`.
//! - [`scratchfs`]: throw-away btrfs / XFS / ext4 file systems on loop devices for tests
//!   and benchmarks, plus the project's "needs root or skip" rule.

pub mod scratchfs;
pub mod size;
