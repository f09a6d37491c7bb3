//! refblk's fuzz targets (see `harness`).
pub mod harness;
