//! The io_uring engine on tmpfs, ext4, XFS and btrfs.

#[path = "../kit/mod.rs"]
mod kit;
mod support;

mod basic;
mod fs;
