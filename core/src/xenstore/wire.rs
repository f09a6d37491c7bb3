//! The xenstore wire codec: message framing, payload strings, error names and
//! permission strings. Shared by the client and the simulated xenstored.

use std::fmt;
use std::io::{self, Read};

use xen_sys::xs_wire::{self as abi, XENSTORE_PAYLOAD_MAX, XSD_ERRORS};

/// Size of the message header on the wire.
pub const HEADER_LEN: usize = 16;
/// Maximum payload length in either direction.
pub const PAYLOAD_MAX: usize = XENSTORE_PAYLOAD_MAX;

/// A message header (`struct xsd_sockmsg`), in host order as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// `XS_*` message type.
    pub ty: u32,
    /// Request id, echoed by the daemon.
    pub req_id: u32,
    /// Transaction id, 0 for none.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Encode to the 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }

    /// Decode from the 16 wire bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// Build a complete message (header + payload). The caller keeps the payload
/// within [`PAYLOAD_MAX`]; longer payloads are refused with `InvalidInput`.
pub fn encode(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> io::Result<Vec<u8>> {
    if payload.len() > PAYLOAD_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "xenstore {} payload of {} bytes exceeds the {PAYLOAD_MAX}-byte limit",
                type_name(ty),
                payload.len()
            ),
        ));
    }
    let hdr = Header {
        ty,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&hdr.to_bytes());
    v.extend_from_slice(payload);
    Ok(v)
}

/// Why reading a message failed.
#[derive(Debug)]
pub enum ReadError {
    /// Clean end of stream before any byte of a new message.
    Eof,
    /// The header announced a payload longer than [`PAYLOAD_MAX`].
    TooBig(Header),
    /// I/O error, or end of stream in the middle of a message.
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Eof => write!(f, "connection closed"),
            ReadError::TooBig(h) => write!(
                f,
                "message type {} announces {} payload bytes (limit {PAYLOAD_MAX})",
                h.ty, h.len
            ),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Read one message: the header, then exactly `len` payload bytes.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<(Header, Vec<u8>), ReadError> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hb[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Eof),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {got} of {HEADER_LEN} header bytes"),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let hdr = Header::from_bytes(&hb);
    if hdr.len as usize > PAYLOAD_MAX {
        return Err(ReadError::TooBig(hdr));
    }
    let mut payload = vec![0u8; hdr.len as usize];
    r.read_exact(&mut payload).map_err(|e| {
        ReadError::Io(io::Error::new(
            e.kind(),
            format!("reading {} payload bytes: {e}", hdr.len),
        ))
    })?;
    Ok((hdr, payload))
}

/// Split a payload into its NUL-terminated strings. Bytes after the last NUL
/// (an unterminated tail) are returned separately.
pub fn split_strings(payload: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some(pos) = rest.iter().position(|&b| b == 0) {
        out.push(&rest[..pos]);
        rest = &rest[pos + 1..];
    }
    (out, rest)
}

/// Concatenate strings, each followed by a NUL.
pub fn join_strings<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_ref());
        v.push(0);
    }
    v
}

/// Human-readable name of a message type ("READ", "WATCH_EVENT", ...).
pub fn type_name(ty: u32) -> &'static str {
    match ty {
        abi::XS_CONTROL => "CONTROL",
        abi::XS_DIRECTORY => "DIRECTORY",
        abi::XS_READ => "READ",
        abi::XS_GET_PERMS => "GET_PERMS",
        abi::XS_WATCH => "WATCH",
        abi::XS_UNWATCH => "UNWATCH",
        abi::XS_TRANSACTION_START => "TRANSACTION_START",
        abi::XS_TRANSACTION_END => "TRANSACTION_END",
        abi::XS_INTRODUCE => "INTRODUCE",
        abi::XS_RELEASE => "RELEASE",
        abi::XS_GET_DOMAIN_PATH => "GET_DOMAIN_PATH",
        abi::XS_WRITE => "WRITE",
        abi::XS_MKDIR => "MKDIR",
        abi::XS_RM => "RM",
        abi::XS_SET_PERMS => "SET_PERMS",
        abi::XS_WATCH_EVENT => "WATCH_EVENT",
        abi::XS_ERROR => "ERROR",
        abi::XS_IS_DOMAIN_INTRODUCED => "IS_DOMAIN_INTRODUCED",
        abi::XS_RESUME => "RESUME",
        abi::XS_SET_TARGET => "SET_TARGET",
        abi::XS_RESET_WATCHES => "RESET_WATCHES",
        abi::XS_DIRECTORY_PART => "DIRECTORY_PART",
        _ => "UNKNOWN",
    }
}

/// The wire name of an errno ("ENOENT"); errnos outside the xenstore table map
/// to "EINVAL", as xenstored does.
pub fn error_name(errno: i32) -> &'static str {
    XSD_ERRORS
        .iter()
        .find(|e| e.errnum == errno)
        .map(|e| e.errstring)
        .unwrap_or("EINVAL")
}

/// The errno for a wire error name, if it is one of xenstore's.
pub fn errno_for_name(name: &str) -> Option<i32> {
    XSD_ERRORS
        .iter()
        .find(|e| e.errstring == name)
        .map(|e| e.errnum)
}

/// Access rights in a xenstore permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: no access.
    None,
    /// `r`: read only.
    Read,
    /// `w`: write only.
    Write,
    /// `b`: read and write.
    Both,
}

impl Access {
    /// The permission letter.
    pub fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }

    /// From a permission letter.
    pub fn from_letter(c: u8) -> Option<Access> {
        match c {
            b'n' => Some(Access::None),
            b'r' => Some(Access::Read),
            b'w' => Some(Access::Write),
            b'b' => Some(Access::Both),
            _ => None,
        }
    }

    /// Whether this grants reading.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    /// Whether this grants writing.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry: a domain and its access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain.
    pub domid: u16,
    /// Its access.
    pub access: Access,
}

impl Perm {
    /// Parse `"r5"`-style text.
    pub fn parse(s: &[u8]) -> Option<Perm> {
        let (&first, digits) = s.split_first()?;
        let access = Access::from_letter(first)?;
        if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        Some(Perm {
            domid: u16::try_from(n).ok()?,
            access,
        })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

/// A node's permissions: the first entry names the owner (who has full access)
/// and the access of every domain not listed; further entries are per-domain
/// exceptions. `"n0"` = owned by dom0, no access for others.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Owner domain (full access).
    pub owner: u16,
    /// Access of domains not in `acl`.
    pub others: Access,
    /// Per-domain entries, in order.
    pub acl: Vec<Perm>,
}

impl Permissions {
    /// Owned by `owner`, `others` for everybody else, no ACL.
    pub fn new(owner: u16, others: Access) -> Self {
        Permissions {
            owner,
            others,
            acl: Vec::new(),
        }
    }

    /// Add a per-domain entry (builder style).
    pub fn with(mut self, domid: u16, access: Access) -> Self {
        self.acl.push(Perm { domid, access });
        self
    }

    /// The wire strings, owner entry first ("n0", "r5", ...).
    pub fn to_strings(&self) -> Vec<String> {
        let mut v = vec![Perm {
            domid: self.owner,
            access: self.others,
        }
        .to_string()];
        v.extend(self.acl.iter().map(Perm::to_string));
        v
    }

    /// Parse a list of wire strings (at least one).
    pub fn from_strings<S: AsRef<[u8]>>(parts: &[S]) -> Option<Permissions> {
        let (first, rest) = parts.split_first()?;
        let owner = Perm::parse(first.as_ref())?;
        let acl = rest
            .iter()
            .map(|p| Perm::parse(p.as_ref()))
            .collect::<Option<Vec<_>>>()?;
        Some(Permissions {
            owner: owner.domid,
            others: owner.access,
            acl,
        })
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_strings().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            ty: 2,
            req_id: 7,
            tx_id: 9,
            len: 12,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn encode_rejects_oversized_payload() {
        assert!(encode(abi::XS_WRITE, 1, 0, &[b'a'; PAYLOAD_MAX + 1]).is_err());
        assert_eq!(
            encode(abi::XS_WRITE, 1, 0, &[b'a'; PAYLOAD_MAX])
                .unwrap()
                .len(),
            HEADER_LEN + PAYLOAD_MAX
        );
    }

    #[test]
    fn read_message_validates_length_and_truncation() {
        let mut big = Header {
            ty: 2,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        }
        .to_bytes()
        .to_vec();
        big.extend_from_slice(&[0; 10]);
        assert!(matches!(
            read_message(&mut &big[..]),
            Err(ReadError::TooBig(_))
        ));
        let short = &encode(2, 1, 0, b"abc").unwrap()[..17];
        assert!(matches!(
            read_message(&mut &short[..]),
            Err(ReadError::Io(_))
        ));
        assert!(matches!(read_message(&mut &[][..]), Err(ReadError::Eof)));
        let half = &[0u8; 5][..];
        assert!(matches!(
            read_message(&mut &half[..]),
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn strings_split_and_join() {
        let (s, rest) = split_strings(b"a\0bc\0\0tail");
        assert_eq!(s, vec![&b"a"[..], b"bc", b""]);
        assert_eq!(rest, b"tail");
        assert_eq!(join_strings(&["x", "yz"]), b"x\0yz\0");
    }

    #[test]
    fn errors_map_both_ways() {
        assert_eq!(error_name(libc::ENOENT), "ENOENT");
        assert_eq!(error_name(libc::ENOTTY), "EINVAL");
        assert_eq!(errno_for_name("EAGAIN"), Some(libc::EAGAIN));
        assert_eq!(errno_for_name("EWHAT"), None);
    }

    #[test]
    fn permissions_parse_and_format() {
        let p = Permissions::from_strings(&["n0", "r5", "b7"]).unwrap();
        assert_eq!(p.owner, 0);
        assert_eq!(p.others, Access::None);
        assert_eq!(p.acl.len(), 2);
        assert_eq!(p.to_strings(), vec!["n0", "r5", "b7"]);
        assert!(Permissions::from_strings(&["x0"]).is_none());
        assert!(Permissions::from_strings(&["r"]).is_none());
        assert!(Permissions::from_strings(&["r70000"]).is_none());
        assert!(Permissions::from_strings::<&str>(&[]).is_none());
    }
}
