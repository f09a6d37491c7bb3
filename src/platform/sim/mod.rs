//! The simulated Xen (to be written): guest memory and grant tables in shared
//! memory files, event channels as eventfds, and a xenstored speaking the real
//! wire protocol (see [`xenstored`]).

pub mod xenstored;
