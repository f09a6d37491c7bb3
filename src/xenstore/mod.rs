//! xenstore: the wire codec and a client usable by both platforms (the real
//! xenstored socket or `/dev/xen/xenbus`, and the simulator's socket).

mod client;

pub use client::XsClient;
