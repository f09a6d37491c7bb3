//! xenstore: the wire codec and a client usable by both platforms (the real
//! xenstored socket or `/dev/xen/xenbus`, and the simulator's socket).

mod client;
pub mod wire;

pub use client::{
    TxId, WatchEvent, XsClient, XsError, XsResult, DEFAULT_SOCKET, DEFAULT_TIMEOUT,
    SIM_AS_DOMAIN_COMMAND, TRANSACTION_RETRIES, XBT_NULL, XENBUS_DEVICE,
};
pub use wire::{Access, Perm, Permissions};
