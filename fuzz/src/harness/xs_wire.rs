//! Target `xs_wire`: the xenstore wire codec both sides use
//! (`refblk_core::xenstore::wire`): message framing from a byte stream delivered
//! in arbitrary chunks (`read_message`), NUL-separated payload strings, error
//! names and permission strings.
//!
//! Checked: no panic; a message read is exactly what `encode` would produce
//! for its header and payload (so re-encoding reproduces the bytes consumed)
//! and never over 4096 payload bytes; `split_strings`/`join_strings` round
//! trip; parsed permissions format back to strings that parse to the same.

use std::io::{self, Read};

use refblk_core::xenstore::wire::{
    self, encode, errno_for_name, error_name, join_strings, read_message, split_strings, Header,
    ReadError, HEADER_LEN, PAYLOAD_MAX,
};
use refblk_core::xenstore::{Perm, Permissions};

use super::input::Input;

/// A reader handing out the stream in chunks of the sizes given, sometimes
/// interrupted (EINTR must be retried by the reader).
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<u8>,
    i: usize,
    interrupts: u8,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.i += 1;
        let s = self
            .sizes
            .get(self.i % self.sizes.len().max(1))
            .copied()
            .unwrap_or(255);
        if s == 0 && self.interrupts > 0 {
            self.interrupts -= 1;
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = usize::from(s.max(1)).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let nsizes = usize::from(inp.u8() % 8);
    let sizes = inp.up_to(nsizes).to_vec();
    let stream = inp.rest();

    // Framing.
    let mut r = Chunked {
        data: stream,
        sizes,
        i: 0,
        interrupts: 4,
    };
    let mut consumed = 0usize;
    for _ in 0..64 {
        let before = r.data.len();
        match read_message(&mut r) {
            Ok((hdr, payload)) => {
                assert_eq!(hdr.len as usize, payload.len());
                assert!(payload.len() <= PAYLOAD_MAX);
                let m = encode(hdr.ty, hdr.req_id, hdr.tx_id, &payload).expect("fits");
                assert_eq!(m.len(), before - r.data.len());
                assert_eq!(&m[..], &stream[consumed..consumed + m.len()]);
                consumed += m.len();
                check_payload(&payload);
            }
            Err(ReadError::Eof) => {
                assert_eq!(consumed, stream.len());
                break;
            }
            Err(ReadError::TooBig(h)) => {
                assert!(h.len as usize > PAYLOAD_MAX);
                let hb: [u8; HEADER_LEN] =
                    stream[consumed..consumed + HEADER_LEN].try_into().unwrap();
                assert_eq!(Header::from_bytes(&hb), h);
                break;
            }
            Err(ReadError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                assert!(stream.len() - consumed < HEADER_LEN + PAYLOAD_MAX);
                break;
            }
        }
    }
    if stream.len() > PAYLOAD_MAX {
        assert!(encode(1, 0, 0, stream).is_err());
    }
}

fn check_payload(p: &[u8]) {
    let (parts, tail) = split_strings(p);
    let mut again = join_strings(&parts);
    again.extend_from_slice(tail);
    assert_eq!(again, p);
    assert!(!tail.contains(&0));
    for s in &parts {
        assert!(!s.contains(&0));
    }
    if let Some(perms) = Permissions::from_strings(&parts) {
        let strs = perms.to_strings();
        assert_eq!(strs.len(), parts.len());
        assert_eq!(Permissions::from_strings(&strs), Some(perms.clone()));
        let disp = perms.to_string();
        assert_eq!(disp.split(',').count(), parts.len());
    }
    for s in &parts {
        if let Some(perm) = Perm::parse(s) {
            assert_eq!(Perm::parse(perm.to_string().as_bytes()), Some(perm));
        }
        if let Ok(name) = std::str::from_utf8(s) {
            if let Some(errno) = errno_for_name(name) {
                assert_eq!(error_name(errno), name);
            }
        }
    }
    if p.len() >= 4 {
        let errno = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        assert!(errno_for_name(error_name(errno)).is_some());
    }
    let _ = wire::type_name(u32::from_le_bytes([
        p.first().copied().unwrap_or(0),
        0,
        0,
        0,
    ]));
}
