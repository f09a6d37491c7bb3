//! The simulated xenstored's request engine without sockets or threads: bytes
//! of a request in, wire messages out. For fuzzing and for tests that want to
//! see exactly which connection gets which message. Behaves as the socket
//! daemon does for well-framed requests (the socket layer only adds framing
//! errors: oversized headers and truncated messages).

use super::engine::{ConnId, Engine};
use refblk_core::xenstore::wire::{self, Header, HEADER_LEN};

/// A simulated xenstored in this thread (see the module docs).
pub struct InProcess {
    engine: Engine,
    next: ConnId,
}

impl Default for InProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcess {
    /// A fresh daemon: the initial tree, dom0 introduced, no connections.
    pub fn new() -> InProcess {
        InProcess {
            engine: Engine::new(),
            next: 1,
        }
    }

    /// Open a privileged (dom0) connection; returns its id.
    pub fn connect(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        self.engine.add_conn(id);
        id
    }

    /// Close a connection (its watches and transactions go away).
    pub fn disconnect(&mut self, id: u64) {
        self.engine.remove_conn(id);
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.engine.conn_count()
    }

    /// Handle one request with the given header fields (the header's `len` is
    /// the payload's). The payload must be at most [`wire::PAYLOAD_MAX`] bytes,
    /// as the socket layer guarantees; longer ones get `E2BIG` like there.
    /// Returns the messages to send: (connection id, whole wire message).
    pub fn request(
        &mut self,
        id: u64,
        ty: u32,
        req_id: u32,
        tx_id: u32,
        payload: &[u8],
    ) -> Vec<(u64, Vec<u8>)> {
        if payload.len() > wire::PAYLOAD_MAX {
            return wire::encode(xen_sys::xs_wire::XS_ERROR, req_id, tx_id, b"E2BIG\0")
                .map(|m| vec![(id, m)])
                .unwrap_or_default();
        }
        let hdr = Header {
            ty,
            req_id,
            tx_id,
            len: payload.len() as u32,
        };
        self.engine.handle(id, hdr, payload)
    }

    /// Handle one framed message (16-byte header + payload) as read from a
    /// socket. `None` if `msg` is not exactly one message of at most
    /// [`wire::PAYLOAD_MAX`] payload bytes (the socket daemon would close the
    /// connection).
    pub fn message(&mut self, id: u64, msg: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
        let hb: &[u8; HEADER_LEN] = msg.get(..HEADER_LEN)?.try_into().ok()?;
        let hdr = Header::from_bytes(hb);
        let payload = &msg[HEADER_LEN..];
        if hdr.len as usize != payload.len() || payload.len() > wire::PAYLOAD_MAX {
            return None;
        }
        Some(self.engine.handle(id, hdr, payload))
    }
}
