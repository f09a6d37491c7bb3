//! The xenstore client and the simulated xenstored: wire ABI, protocol,
//! malformed input, interoperability with the C tools.

#[path = "../kit/mod.rs"]
mod kit;

mod abi;
mod client;
mod interop;
mod malformed;
mod protocol;
