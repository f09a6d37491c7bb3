//! The pool's error type: a kind (mapped to CLI exit codes) and a message naming the
//! file and the cause.

use std::fmt;
use std::io;

use super::fsops;

/// The class of a pool error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad volume id, size, revision syntax, option combination.
    InvalidInput,
    /// Volume, image, revision or pool not found.
    NotFound,
    /// The volume already exists.
    AlreadyExists,
    /// The volume is running (or an operation on it is in progress elsewhere).
    Busy,
    /// The operation does not apply to this volume kind or state.
    WrongKind,
    /// The file system is full.
    NoSpace,
    /// The file system cannot do what the pool needs (reflinks).
    Unsupported,
    /// Any other I/O failure.
    Io,
}

impl ErrorKind {
    /// The CLI exit code for this kind (documented in docs/pool.md).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Io => 1,
            ErrorKind::InvalidInput => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::Busy => 5,
            ErrorKind::WrongKind => 6,
            ErrorKind::NoSpace => 7,
            ErrorKind::Unsupported => 8,
        }
    }
}

/// A pool operation failed.
#[derive(Debug)]
pub struct PoolError {
    /// What class of failure.
    pub kind: ErrorKind,
    /// What failed, naming the volume/file and the cause.
    pub msg: String,
}

impl PoolError {
    /// A new error.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> PoolError {
        PoolError {
            kind,
            msg: msg.into(),
        }
    }

    /// Wrap an I/O error with what we were doing; ENOSPC/EDQUOT become
    /// [`ErrorKind::NoSpace`], ENOENT [`ErrorKind::NotFound`].
    pub fn io(doing: impl fmt::Display, e: io::Error) -> PoolError {
        let kind = match fsops::errno(&e) {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            _ if e.kind() == io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        };
        let hint = if kind == ErrorKind::NoSpace {
            " (the file system is full; committed data is intact — free space and retry)"
        } else {
            ""
        };
        PoolError::new(kind, format!("{doing}: {e}{hint}"))
    }
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for PoolError {}

/// Result of pool operations.
pub type Result<T> = std::result::Result<T, PoolError>;

/// Extension to attach context to io::Results.
pub trait IoContext<T> {
    /// Map the error with [`PoolError::io`].
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| PoolError::io(what(), e))
    }
}
