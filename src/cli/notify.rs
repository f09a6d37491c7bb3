//! systemd's readiness protocol (`Type=notify`), by hand: one datagram such
//! as `READY=1` to the unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`). Without `$NOTIFY_SOCKET` (not run
//! by systemd) it does nothing. A crate for this would add more than these
//! few lines.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. `READY=1`, `STOPPING=1`, `STATUS=...`) to systemd, if
/// it asked for notifications. Returns whether a message was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    notify_to(&target, state)?;
    Ok(true)
}

/// Send `state` to the notify socket `target`.
pub fn notify_to(target: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        // An abstract name (how systemd usually passes it).
        let name = format!("refblk-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
