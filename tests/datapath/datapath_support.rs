//! The kit under its former name, for modules that still say
//! `mod datapath_support;` (see `main.rs`).
pub use crate::kit::*;
