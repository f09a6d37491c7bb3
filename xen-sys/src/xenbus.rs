//! Xenbus device states (`xen/io/xenbus.h`), the value of the `state` node of a
//! frontend and a backend directory in xenstore (as a decimal string).

/// `enum xenbus_state`
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    /// Finished early initialisation, waiting for the peer's information.
    InitWait = 2,
    /// Waiting for a connection from the peer.
    Initialised = 3,
    Connected = 4,
    /// Being closed because of an error or an unplug.
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// The state with this numeric value, if any.
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }
}
