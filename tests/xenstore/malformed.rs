//! Raw wire tests of the simulated xenstored: exact reply formats, and
//! malformed, oversized, truncated and hostile input. The daemon must answer
//! with an error or close that one connection, and keep serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use refblk_core::xenstore::wire::{self, Header, ReadError};
use refblk_core::xenstore::XBT_NULL;
use refblk_sim::xenstored::Xenstored;
use xen_sys::xs_wire as abi;

/// A bound that turns a hang into a failure, not a speed target: a loaded
/// machine must never reach it.
const T: Duration = Duration::from_secs(30);

fn daemon() -> (tempfile::TempDir, Xenstored) {
    let dir = tempfile::tempdir().expect("tempdir");
    let xs = Xenstored::spawn(&dir.path().join("xenstored.sock")).expect("spawn xenstored");
    (dir, xs)
}

fn raw(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

fn send(s: &mut UnixStream, ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) {
    s.write_all(&wire::encode(ty, req_id, tx_id, payload).unwrap())
        .unwrap();
}

fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    match wire::read_message(s) {
        Ok(m) => m,
        Err(e) => panic!("expected a message: {e}"),
    }
}

fn expect_error(s: &mut UnixStream, req_id: u32, name: &str) {
    let (h, p) = recv(s);
    assert_eq!(
        h.ty,
        abi::XS_ERROR,
        "reply {:?} {:?}",
        h,
        String::from_utf8_lossy(&p)
    );
    assert_eq!(h.req_id, req_id);
    assert_eq!(p, format!("{name}\0").as_bytes());
}

/// The connection is closed by the daemon (EOF, maybe after some messages).
fn expect_closed(s: &mut UnixStream) {
    loop {
        match wire::read_message(s) {
            Err(ReadError::Eof) => return,
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected EOF, got {e}"),
            Ok(_) => continue,
        }
    }
}

/// Another connection still gets service.
fn still_serving(xs: &Xenstored) {
    let c = xs.client().expect("daemon still accepts");
    c.write(XBT_NULL, "/alive", b"yes").unwrap();
    assert_eq!(c.read(XBT_NULL, "/alive").unwrap(), b"yes");
}

#[test]
fn reply_formats_on_the_wire() {
    let (_d, xs) = daemon();
    let mut s = raw(xs.path());
    send(&mut s, abi::XS_WRITE, 7, 0, b"/a/b\0val");
    let (h, p) = recv(&mut s);
    assert_eq!((h.ty, h.req_id, h.tx_id), (abi::XS_WRITE, 7, 0));
    assert_eq!(p, b"OK\0");
    send(&mut s, abi::XS_READ, 8, 0, b"/a/b\0");
    let (h, p) = recv(&mut s);
    assert_eq!((h.ty, h.req_id), (abi::XS_READ, 8));
    assert_eq!(p, b"val", "values carry no NUL");
    send(&mut s, abi::XS_MKDIR, 9, 0, b"/a/c\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    send(&mut s, abi::XS_DIRECTORY, 10, 0, b"/a\0");
    assert_eq!(recv(&mut s).1, b"b\0c\0");
    send(&mut s, abi::XS_DIRECTORY_PART, 11, 0, b"/a\x000\0");
    let (h, p) = recv(&mut s);
    assert_eq!(h.ty, abi::XS_DIRECTORY_PART);
    let (parts, tail) = wire::split_strings(&p);
    assert!(tail.is_empty());
    assert!(parts[0].iter().all(u8::is_ascii_digit), "generation first");
    assert_eq!(
        &parts[1..],
        [&b"b"[..], b"c", b""],
        "final piece ends with an empty string"
    );
    send(&mut s, abi::XS_DIRECTORY_PART, 12, 0, b"/a\x0099\0");
    let (_, p) = recv(&mut s);
    assert!(p.ends_with(b"\0\0"), "offset past the end: empty list");
    send(&mut s, abi::XS_GET_PERMS, 13, 0, b"/a\0");
    assert_eq!(recv(&mut s).1, b"n0\0");
    send(&mut s, abi::XS_SET_PERMS, 14, 0, b"/a\0b0\0r3\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    send(&mut s, abi::XS_GET_PERMS, 15, 0, b"/a\0");
    assert_eq!(recv(&mut s).1, b"b0\0r3\0");
    // WATCH: the reply, then the initial event with req_id 0.
    send(&mut s, abi::XS_WATCH, 16, 0, b"/a\0tok\0");
    let (h, p) = recv(&mut s);
    assert_eq!(
        (h.ty, h.req_id, p.as_slice()),
        (abi::XS_WATCH, 16, &b"OK\0"[..])
    );
    let (h, p) = recv(&mut s);
    assert_eq!((h.ty, h.req_id, h.tx_id), (abi::XS_WATCH_EVENT, 0, 0));
    assert_eq!(p, b"/a\0tok\0");
    // Transactions: the id is a decimal string; ops carry it in tx_id.
    send(&mut s, abi::XS_TRANSACTION_START, 17, 0, b"\0");
    let (h, p) = recv(&mut s);
    assert_eq!(h.ty, abi::XS_TRANSACTION_START);
    let id: u32 = std::str::from_utf8(&p[..p.len() - 1])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(p.last(), Some(&0));
    send(&mut s, abi::XS_WRITE, 18, id, b"/a/b\0tx");
    let (h, _) = recv(&mut s);
    assert_eq!((h.ty, h.req_id, h.tx_id), (abi::XS_WRITE, 18, id));
    // Starting a transaction inside a transaction is refused.
    send(&mut s, abi::XS_TRANSACTION_START, 19, id, b"\0");
    expect_error(&mut s, 19, "EBUSY");
    send(&mut s, abi::XS_TRANSACTION_END, 20, id, b"X\0");
    expect_error(&mut s, 20, "EINVAL");
    send(&mut s, abi::XS_TRANSACTION_END, 21, id, b"T\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    let (h, p) = recv(&mut s);
    assert_eq!(
        (h.ty, p.as_slice()),
        (abi::XS_WATCH_EVENT, &b"/a/b\0tok\0"[..])
    );
    send(&mut s, abi::XS_READ, 22, 999, b"/a/b\0");
    expect_error(&mut s, 22, "ENOENT");
    send(&mut s, abi::XS_GET_DOMAIN_PATH, 23, 0, b"12\0");
    assert_eq!(recv(&mut s).1, b"/local/domain/12\0");
    send(&mut s, abi::XS_IS_DOMAIN_INTRODUCED, 24, 0, b"12\0");
    assert_eq!(recv(&mut s).1, b"F\0");
    send(&mut s, abi::XS_INTRODUCE, 25, 0, b"12\x00345\x006\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    send(&mut s, abi::XS_RESET_WATCHES, 26, 0, b"\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    // Pipelined requests are answered in order with their own ids.
    let mut batch = Vec::new();
    for i in 0..20u32 {
        batch.extend(wire::encode(abi::XS_READ, 100 + i, 0, b"/a/b\0").unwrap());
    }
    s.write_all(&batch).unwrap();
    for i in 0..20u32 {
        let (h, p) = recv(&mut s);
        assert_eq!((h.req_id, p.as_slice()), (100 + i, &b"tx"[..]));
    }
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_survives() {
    let (_d, xs) = daemon();
    let mut s = raw(xs.path());
    // Unknown and reply-only types.
    for (i, ty) in [
        999u32,
        20,
        abi::XS_WATCH_EVENT,
        abi::XS_ERROR,
        abi::XS_INVALID,
        u32::MAX,
    ]
    .into_iter()
    .enumerate()
    {
        send(&mut s, ty, i as u32, 0, b"/x\0");
        expect_error(&mut s, i as u32, "ENOSYS");
    }
    // Missing NUL terminator, extra strings, empty payload.
    send(&mut s, abi::XS_READ, 10, 0, b"/x");
    expect_error(&mut s, 10, "EINVAL");
    send(&mut s, abi::XS_READ, 11, 0, b"/x\0/y\0");
    expect_error(&mut s, 11, "EINVAL");
    send(&mut s, abi::XS_READ, 12, 0, b"");
    expect_error(&mut s, 12, "EINVAL");
    send(&mut s, abi::XS_WRITE, 13, 0, b"/x-without-nul");
    expect_error(&mut s, 13, "EINVAL");
    send(&mut s, abi::XS_WATCH, 14, 0, b"/x\0");
    expect_error(&mut s, 14, "EINVAL");
    send(&mut s, abi::XS_SET_PERMS, 15, 0, b"/\0q0\0");
    expect_error(&mut s, 15, "EINVAL");
    send(&mut s, abi::XS_SET_PERMS, 16, 0, b"/\0");
    expect_error(&mut s, 16, "EINVAL");
    send(&mut s, abi::XS_DIRECTORY_PART, 17, 0, b"/\0abc\0");
    expect_error(&mut s, 17, "EINVAL");
    send(&mut s, abi::XS_INTRODUCE, 18, 0, b"x\x001\x001\0");
    expect_error(&mut s, 18, "EINVAL");
    send(&mut s, abi::XS_INTRODUCE, 19, 0, b"40000\x001\x001\0");
    expect_error(&mut s, 19, "EINVAL");
    send(&mut s, abi::XS_GET_DOMAIN_PATH, 20, 0, b"99999999999\0");
    expect_error(&mut s, 20, "EINVAL");
    // Non-UTF-8 and disallowed characters in paths.
    send(&mut s, abi::XS_WRITE, 21, 0, b"/\xff\xfe\0v");
    expect_error(&mut s, 21, "EINVAL");
    send(&mut s, abi::XS_READ, 22, 0, b"/a\nb\0");
    expect_error(&mut s, 22, "EINVAL");
    send(&mut s, abi::XS_MKDIR, 23, 0, b"/../etc\0");
    expect_error(&mut s, 23, "EINVAL");
    // A reply that would exceed 4096 bytes is E2BIG, not a broken message.
    for i in 0..300 {
        send(
            &mut s,
            abi::XS_MKDIR,
            1000 + i,
            0,
            format!("/wide/some-longish-child-{i:05}\0").as_bytes(),
        );
        assert_eq!(recv(&mut s).1, b"OK\0");
    }
    send(&mut s, abi::XS_DIRECTORY, 24, 0, b"/wide\0");
    expect_error(&mut s, 24, "E2BIG");
    // Still usable.
    send(&mut s, abi::XS_WRITE, 30, 0, b"/ok\0fine");
    assert_eq!(recv(&mut s).1, b"OK\0");
    still_serving(&xs);
}

#[test]
fn oversized_message_gets_e2big_and_close() {
    let (_d, xs) = daemon();
    let mut s = raw(xs.path());
    let hdr = Header {
        ty: abi::XS_WRITE,
        req_id: 5,
        tx_id: 0,
        len: 4097,
    };
    s.write_all(&hdr.to_bytes()).unwrap();
    let _ = s.write_all(&[b'a'; 4097]);
    expect_error(&mut s, 5, "E2BIG");
    expect_closed(&mut s);
    // A huge length without the data.
    let mut s = raw(xs.path());
    let hdr = Header {
        ty: abi::XS_READ,
        req_id: 6,
        tx_id: 0,
        len: u32::MAX,
    };
    s.write_all(&hdr.to_bytes()).unwrap();
    expect_error(&mut s, 6, "E2BIG");
    expect_closed(&mut s);
    still_serving(&xs);
}

#[test]
fn truncated_messages_then_close() {
    let (_d, xs) = daemon();
    let c = xs.client().unwrap();
    c.write(XBT_NULL, "/", b"").unwrap();
    {
        let mut s = raw(xs.path());
        s.write_all(&[1, 0, 0, 0, 9, 0]).unwrap(); // half a header
    }
    {
        let mut s = raw(xs.path());
        let m = wire::encode(abi::XS_WRITE, 1, 0, b"/x\0value").unwrap();
        s.write_all(&m[..m.len() - 3]).unwrap(); // header + part of the payload
    }
    {
        let s = raw(xs.path());
        s.shutdown(std::net::Shutdown::Write).unwrap(); // nothing at all
    }
    // Connections are accepted in order: once this one is served, the three
    // above were registered.
    let d = xs.client().unwrap();
    d.write(XBT_NULL, "/y", b"").unwrap();
    let deadline = Instant::now() + T;
    while xs.connection_count() > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        xs.connection_count(),
        2,
        "half-sent connections are cleaned up"
    );
    // The truncated write did not happen.
    assert!(c.read(XBT_NULL, "/x").unwrap_err().is_enoent());
    still_serving(&xs);
}

#[test]
fn slow_client_does_not_block_others() {
    let (_d, xs) = daemon();
    let mut slow = raw(xs.path());
    // Half a header, then nothing: the daemon waits for this client alone.
    slow.write_all(&[2, 0, 0]).unwrap();
    let t0 = Instant::now();
    for _ in 0..20 {
        still_serving(&xs);
    }
    // Each of them has its own bound (T): a daemon waiting for the slow
    // client fails there; this one only turns a hang into a failure.
    assert!(t0.elapsed() < 2 * T, "other clients were served meanwhile");
    // The slow client can still finish its message.
    let m = wire::encode(abi::XS_READ, 3, 0, b"/alive\0").unwrap();
    slow.write_all(&m[3..]).unwrap();
    let (h, p) = recv(&mut slow);
    assert_eq!(
        (h.ty, h.req_id, p.as_slice()),
        (abi::XS_READ, 3, &b"yes"[..])
    );
}

#[test]
fn client_that_never_reads_events_is_dropped_not_waited_for() {
    let (_d, xs) = daemon();
    let mut lazy = raw(xs.path());
    send(&mut lazy, abi::XS_WATCH, 1, 0, b"/flood\0t\0");
    // `lazy` never reads again. Flood it with events from another client:
    // far more than its queue and socket buffer hold.
    assert_eq!(recv(&mut lazy).1, b"OK\0");
    let c = xs.client().unwrap();
    c.write(XBT_NULL, "/flood", b"").unwrap(); // both connections registered
    let base = xs.connection_count();
    assert_eq!(base, 2);
    let t0 = Instant::now();
    let big = vec![b'v'; 100];
    for i in 0..30_000 {
        c.write(XBT_NULL, &format!("/flood/{}", i % 50), &big)
            .unwrap();
        if xs.connection_count() < base {
            break;
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "writer was held up by a client that does not read"
    );
    let deadline = Instant::now() + T;
    while xs.connection_count() >= base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        xs.connection_count(),
        base - 1,
        "the non-reading client was disconnected"
    );
    expect_closed(&mut lazy);
    still_serving(&xs);
}

/// The kit's PRNG, 32 bits at a time.
struct Rng32(crate::kit::Rng);
impl Rng32 {
    fn next(&mut self) -> u32 {
        (self.0.next() >> 32) as u32
    }
}

#[test]
fn garbage_never_kills_the_daemon() {
    let (_d, xs) = daemon();
    let mut rng = Rng32(crate::kit::Rng::new(0x5eed));
    for round in 0..40u32 {
        let mut s = raw(xs.path());
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = Vec::new();
        // Mostly plausible headers with random types/lengths/payloads, some
        // pure noise.
        for _ in 0..(rng.next() % 8 + 1) {
            if round.is_multiple_of(4) {
                for _ in 0..(rng.next() % 64) {
                    buf.push(rng.next() as u8);
                }
                continue;
            }
            let ty = rng.next() % 26;
            let len = if rng.next().is_multiple_of(10) {
                rng.next()
            } else {
                rng.next() % 64
            };
            let h = Header {
                ty,
                req_id: rng.next(),
                tx_id: if rng.next().is_multiple_of(3) {
                    rng.next() % 4
                } else {
                    0
                },
                len,
            };
            buf.extend_from_slice(&h.to_bytes());
            for _ in 0..len.min(80) {
                let b = match rng.next() % 4 {
                    0 => 0,
                    1 => b'/',
                    2 => b'a' + (rng.next() % 26) as u8,
                    _ => rng.next() as u8,
                };
                buf.push(b);
            }
        }
        let _ = s.write_all(&buf);
        // Read whatever comes back until the daemon closes or goes quiet;
        // every message it sends must be well-formed.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        let mut rest = &sink[..];
        while rest.len() >= wire::HEADER_LEN {
            let h = Header::from_bytes(rest[..16].try_into().unwrap());
            assert!(
                h.len as usize <= wire::PAYLOAD_MAX,
                "daemon sent an oversized message"
            );
            let end = (16 + h.len as usize).min(rest.len());
            rest = &rest[end..];
        }
    }
    still_serving(&xs);
}

#[test]
fn domu_cannot_escalate_on_the_wire() {
    let (_d, xs) = daemon();
    let mut s = raw(xs.path());
    send(&mut s, abi::XS_CONTROL, 1, 0, b"sim-as-domain\x005\0");
    assert_eq!(recv(&mut s).1, b"OK\0");
    for (i, (ty, p)) in [
        (abi::XS_CONTROL, &b"sim-as-domain\x000\0"[..]),
        (abi::XS_INTRODUCE, b"6\x001\x001\0"),
        (abi::XS_RELEASE, b"5\0"),
        (abi::XS_SET_TARGET, b"5\x000\0"),
        (abi::XS_IS_DOMAIN_INTRODUCED, b"5\0"),
        (abi::XS_RESUME, b"5\0"),
        (abi::XS_WRITE, b"/tool/x\0v"),
        (abi::XS_READ, b"/tool\0"),
    ]
    .into_iter()
    .enumerate()
    {
        send(&mut s, ty, i as u32, 0, p);
        expect_error(&mut s, i as u32, "EACCES");
    }
    // Own home is fine.
    send(&mut s, abi::XS_WRITE, 50, 0, b"data/x\0v");
    // /local/domain/5 does not exist and "/" is not writable for domain 5.
    expect_error(&mut s, 50, "EACCES");
}

#[test]
fn stopping_the_daemon_never_hangs_on_stuck_clients() {
    let (_d, xs) = daemon();
    // One client pipelines requests and never reads the replies (its queue
    // and socket fill up, its reader thread blocks), another is half-way
    // through a header.
    let mut stuck = raw(xs.path());
    stuck
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let req = wire::encode(abi::XS_READ, 1, 0, b"/tool\0").unwrap();
    let mut batch = Vec::new();
    for _ in 0..2000 {
        batch.extend_from_slice(&req);
    }
    for _ in 0..20 {
        if stuck.write_all(&batch).is_err() {
            break; // the daemon stopped reading us: we are stuck for real
        }
    }
    let mut half = raw(xs.path());
    half.write_all(&[1, 2, 3]).unwrap();
    let c = xs.client().unwrap();
    c.watch("/", "t").unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        drop(xs);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping Xenstored returned");
    // Its clients see the end.
    assert!(c.read(XBT_NULL, "/").unwrap_err().is_connection_error());
    expect_closed(&mut half);
}
