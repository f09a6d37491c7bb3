//! The client against hostile or broken daemons (a fake server on a unix
//! socket) and over a character-device-like stream (a FIFO): it must fail
//! calls with an error, never panic or hang.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use refblk_core::xenstore::wire::{self, Header};
use refblk_core::xenstore::{WatchEvent, XsClient, XsError, XBT_NULL};
use xen_sys::xs_wire as abi;

/// A bound that turns a hang into a failure, not a speed target: a loaded
/// machine must never reach it.
const T: Duration = Duration::from_secs(30);

/// A fake xenstored: accepts one connection and runs `script` on it.
fn fake<F>(dir: &Path, script: F) -> (std::path::PathBuf, std::thread::JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let sock = dir.join("fake.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        script(s)
    });
    (sock, h)
}

fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    wire::read_message(s).unwrap_or_else(|e| panic!("fake server read: {e}"))
}

#[test]
fn reply_with_oversized_length_fails_pending_and_later_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake(dir.path(), |mut s| {
        let (req, _) = recv(&mut s);
        let bad = Header {
            ty: req.ty,
            req_id: req.req_id,
            tx_id: 0,
            len: 100_000,
        };
        s.write_all(&bad.to_bytes()).unwrap();
        // Keep the connection open until the client lets go: it must not
        // wait for the bytes.
        let _ = s.read(&mut [0u8; 1]);
    });
    let c = XsClient::connect_unix(&sock).unwrap();
    c.set_timeout(Some(T));
    let e = c.read(XBT_NULL, "/x").unwrap_err();
    assert!(matches!(e, XsError::Closed(_)), "{e}");
    let e = c.read(XBT_NULL, "/y").unwrap_err();
    assert!(e.is_connection_error(), "{e}");
    drop(c);
    h.join().unwrap();
}

#[test]
fn reply_to_unknown_request_is_a_protocol_violation() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake(dir.path(), |mut s| {
        let (req, _) = recv(&mut s);
        let m = wire::encode(req.ty, req.req_id.wrapping_add(1000), 0, b"x").unwrap();
        s.write_all(&m).unwrap();
        // Keep the connection open until the client lets go.
        let _ = s.read(&mut [0u8; 1]);
    });
    let c = XsClient::connect_unix(&sock).unwrap();
    c.set_timeout(Some(T));
    let e = c.read(XBT_NULL, "/x").unwrap_err();
    assert!(
        matches!(e, XsError::Closed(ref m) if m.contains("never sent")),
        "{e}"
    );
    drop(c);
    h.join().unwrap();
}

#[test]
fn daemon_closing_mid_reply_fails_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake(dir.path(), |mut s| {
        let (req, _) = recv(&mut s);
        let m = wire::encode(req.ty, req.req_id, 0, b"0123456789").unwrap();
        s.write_all(&m[..20]).unwrap();
        // Close.
    });
    let c = XsClient::connect_unix(&sock).unwrap();
    let e = c.read(XBT_NULL, "/x").unwrap_err();
    assert!(e.is_connection_error(), "{e}");
    assert!(c.events().recv_timeout(T).is_err());
    h.join().unwrap();
}

#[test]
fn wrong_reply_type_and_bad_payloads_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    // The late reply (5) is sent once the client has given up on it.
    let (gave_up, late) = std::sync::mpsc::channel::<()>();
    let (sock, h) = fake(dir.path(), move |mut s| {
        // 1: READ answered as WRITE.
        let (req, _) = recv(&mut s);
        s.write_all(&wire::encode(abi::XS_WRITE, req.req_id, 0, b"OK\0").unwrap())
            .unwrap();
        // 2: TRANSACTION_START answered with garbage.
        let (req, _) = recv(&mut s);
        s.write_all(&wire::encode(req.ty, req.req_id, 0, b"abc\0").unwrap())
            .unwrap();
        // 3: DIRECTORY answered without the final NUL.
        let (req, _) = recv(&mut s);
        s.write_all(&wire::encode(req.ty, req.req_id, 0, b"a\0b").unwrap())
            .unwrap();
        // 4: an error name we don't know, and a watch event with one string.
        let (req, _) = recv(&mut s);
        s.write_all(&wire::encode(abi::XS_WATCH_EVENT, 0, 0, b"only-path\0").unwrap())
            .unwrap();
        s.write_all(&wire::encode(abi::XS_WATCH_EVENT, 0, 0, b"/p\0tok\0").unwrap())
            .unwrap();
        s.write_all(&wire::encode(abi::XS_ERROR, req.req_id, 0, b"EWEIRD\0").unwrap())
            .unwrap();
        // 5: a timeout, then the late reply is ignored.
        let (req5, _) = recv(&mut s);
        let _ = late.recv();
        s.write_all(&wire::encode(req5.ty, req5.req_id, 0, b"late").unwrap())
            .unwrap();
        let (req6, _) = recv(&mut s);
        s.write_all(&wire::encode(req6.ty, req6.req_id, 0, b"fresh").unwrap())
            .unwrap();
    });
    let c = XsClient::connect_unix(&sock).unwrap();
    let e = c.read(XBT_NULL, "/1").unwrap_err();
    assert!(matches!(e, XsError::Protocol(_)), "{e}");
    let e = c.transaction_start().unwrap_err();
    assert!(matches!(e, XsError::Protocol(_)), "{e}");
    let e = c.directory(XBT_NULL, "/3").unwrap_err();
    assert!(matches!(e, XsError::Protocol(_)), "{e}");
    let e = c.read(XBT_NULL, "/4").unwrap_err();
    assert_eq!(e.name(), Some("EWEIRD"));
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(
        c.events().recv_timeout(T).unwrap(),
        WatchEvent {
            path: "/p".into(),
            token: "tok".into()
        },
        "the malformed event was dropped, the good one delivered"
    );
    c.set_timeout(Some(Duration::from_millis(200)));
    let e = c.read(XBT_NULL, "/5").unwrap_err();
    assert!(matches!(e, XsError::TimedOut { .. }), "{e}");
    gave_up.send(()).unwrap();
    c.set_timeout(Some(T));
    assert_eq!(c.read(XBT_NULL, "/6").unwrap(), b"fresh");
    h.join().unwrap();
}

#[test]
fn device_transport_over_a_fifo() {
    // A FIFO opened read-write behaves like a character device that answers
    // every message with itself: the client writes a whole request, its
    // reader thread reads it back and matches it by req_id.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("xenbus");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let c = XsClient::open_path(&fifo).unwrap();
    assert_eq!(c.read(XBT_NULL, "/echo").unwrap(), b"/echo\0");
    // Events injected by a second writer arrive on the channel.
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(&wire::encode(abi::XS_WATCH_EVENT, 0, 0, b"/dev/x\0t\0").unwrap())
        .unwrap();
    assert_eq!(c.events().recv_timeout(T).unwrap().path, "/dev/x");
    // An oversized header from the "device" kills the connection.
    let bad = Header {
        ty: abi::XS_READ,
        req_id: 77,
        tx_id: 0,
        len: 5000,
    };
    w.write_all(&bad.to_bytes()).unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        match c.read(XBT_NULL, "/after") {
            Err(e) if e.is_connection_error() => break,
            _ if std::time::Instant::now() > deadline => panic!("client kept working"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // Dropping the client stops its reader thread even though the device
    // never reports end-of-file.
    drop(c);
}

#[test]
fn open_path_names_a_missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-socket");
    let e = XsClient::open_path(&missing).unwrap_err();
    assert!(e.to_string().contains("no-such-socket"), "{e}");
}
