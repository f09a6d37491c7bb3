//! blkif: the backend's side of one blkif device — ring handling, request
//! parsing and validation, and the frontend's xenstore keys. No I/O happens
//! here.
//!
//! The guest is untrusted; this module is where everything it writes enters
//! the backend, as typed and validated values: the ring slots ([`BackRing`],
//! [`parse_request`]) and the xenstore keys of its frontend directory
//! ([`frontend_keys`]: rings, event channels, protocol, queues, persistent
//! grants, its xenbus state).
//!
//! # Use
//!
//! 1. [`frontend_keys::parse_frontend_keys`] on the frontend's directory: the
//!    [`Abi`] (from `protocol`, absent = x86_32), and per queue its `ring-ref`s
//!    and event channel, within what the backend advertised.
//! 2. [`BackRing::new`] with the mapping of the `ring-ref`s (1..16 pages).
//! 3. Loop: [`BackRing::next_request`] copies one slot out **once** into a
//!    [`RawRequest`]. An `Err` means the frontend's producer index is bogus
//!    (`Overflow`: more than a ring ahead of our responses, as Linux blkback's
//!    `RING_REQUEST_PROD_OVERFLOW`; `ProducerBehindConsumer`: moved backwards)
//!    — stop the ring, log the error, disconnect the device.
//! 4. [`parse_request`] validates the copy against the [`DiskInfo`] and yields a
//!    [`Request`] or a [`Rejection`] (id, operation to echo, status
//!    `BLKIF_RSP_ERROR`/`BLKIF_RSP_EOPNOTSUPP`, reason for the log).
//!    - [`Request::Rw`]: one disk byte range (`offset`, `len`) and the list of
//!      [`Piece`]s (gref, page offset, len) in disk order; `barrier` for
//!      WRITE_BARRIER (drain, write, flush; may have no pieces).
//!    - [`Request::Indirect`]: grant-copy `page_grefs()` into a buffer, then
//!      [`IndirectRequest::complete`] gives the [`RwRequest`] (or a rejection).
//!      [`parse_indirect_segments`] is the decoding step alone.
//!    - [`Request::Flush`], [`Request::Discard`].
//! 5. For every consumed request, exactly one [`BackRing::push_response`]
//!    (id, the request's `response_op()`/`Rejection::operation`, status) —
//!    in any order; [`BackRing::outstanding`] counts the unanswered ones and a
//!    push with none outstanding is refused.
//! 6. [`BackRing::push_responses_and_check_notify`] publishes them; notify the
//!    event channel when it returns `true`.
//! 7. Before sleeping, [`BackRing::final_check_for_requests`]; sleep only when
//!    it returns `false` (and with `outstanding() > 0`, also wake on I/O
//!    completions: a full ring yields no request until responses free slots).
//!
//! [`BackRing`] is `Send`: one thread per ring (queue) owns it; nothing in it
//! blocks.
//!
//! The validation rules and where Linux blkback applies the same ones are in
//! `docs/protocol.md`.

pub mod frontend_keys;
mod request;
mod ring;

pub use request::{
    parse_indirect_segments, parse_request, Abi, DiskInfo, Features, IndirectRequest, Piece,
    RawRequest, RejectReason, Rejection, Request, RwOp, RwRequest, Segment, UnknownProtocol,
    MAX_INDIRECT_SEGMENTS, MAX_SLOT_SIZE, SECTOR_SIZE,
};
pub use ring::{BackRing, RingError};

#[cfg(test)]
mod tests;
