//! Target `xs_client`: the xenstore client (`refblk_core::xenstore::XsClient`)
//! talking to a hostile daemon. A fake xenstored on a unix socket answers each
//! request as the input says: a correct reply, an error with any name, a
//! reply with the wrong request id or type, watch events with any payload,
//! oversized or truncated messages, raw garbage, or a closed connection.
//!
//! Checked: no panic; every call returns within its timeout; a correct
//! reply gives the caller exactly the payload sent (READ) or its parse;
//! after the connection is broken every call fails instead of blocking; watch
//! events reach `events()` only as the daemon sent them.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use refblk_core::xenstore::wire::{self, read_message, HEADER_LEN, PAYLOAD_MAX};
use refblk_core::xenstore::{XsClient, XsError};
use xen_sys::xs_wire as abi;

use super::input::Input;

const TIMEOUT: Duration = Duration::from_millis(400);

struct Place {
    _dir: tempfile::TempDir,
    listener: UnixListener,
    path: std::path::PathBuf,
}

fn place() -> &'static Place {
    static P: OnceLock<Place> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("xs.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        Place {
            _dir: dir,
            listener,
            path,
        }
    })
}

/// What the daemon does for one request.
#[derive(Debug, Clone)]
enum Act {
    Reply(Vec<u8>),
    Error(Vec<u8>),
    WrongId(u32, Vec<u8>),
    WrongType(u32, Vec<u8>),
    Event(Vec<u8>),
    TooBig,
    Truncated,
    Raw(Vec<u8>),
    Close,
}

fn script(inp: &mut Input) -> Vec<Vec<Act>> {
    let mut steps = Vec::new();
    while !inp.is_empty() && steps.len() < 8 {
        let mut acts = Vec::new();
        loop {
            let sel = inp.u8();
            let n = usize::from(inp.u8()) * 4;
            let body = if sel & 0x80 != 0 {
                inp.up_to(n).to_vec()
            } else {
                inp.up_to(n.min(64)).to_vec()
            };
            let a = match sel % 16 {
                0..=5 => Act::Reply(body),
                6 => Act::Error(body),
                7 => Act::WrongId(inp.u32(), body),
                8 => Act::WrongType(u32::from(inp.u8()), body),
                9 | 10 => Act::Event(body),
                11 => Act::TooBig,
                12 => Act::Truncated,
                13 => Act::Raw(body),
                14 => Act::Close,
                _ => Act::Reply(body),
            };
            let last = matches!(
                a,
                Act::Reply(_) | Act::Error(_) | Act::TooBig | Act::Truncated | Act::Close
            );
            acts.push(a);
            if last {
                break;
            }
            if acts.len() >= 4 || inp.is_empty() {
                // Always end with an answer: a silent daemon only costs time.
                acts.push(Act::Reply(Vec::new()));
                break;
            }
        }
        steps.push(acts);
    }
    steps
}

fn msg(ty: u32, req: u32, tx: u32, p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    p.truncate(PAYLOAD_MAX);
    wire::encode(ty, req, tx, &p).unwrap()
}

/// The fake daemon: for each request read, perform that step's acts.
fn daemon(mut s: UnixStream, steps: Vec<Vec<Act>>) -> Vec<Vec<u8>> {
    let mut events_sent = Vec::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    for acts in steps {
        let Ok((h, _)) = read_message(&mut s) else {
            return events_sent;
        };
        for a in acts {
            let out = match a {
                Act::Reply(p) => msg(h.ty, h.req_id, h.tx_id, &p),
                Act::Error(p) => msg(abi::XS_ERROR, h.req_id, h.tx_id, &p),
                Act::WrongId(id, p) => msg(h.ty, id, h.tx_id, &p),
                Act::WrongType(t, p) => {
                    let m = msg(t, h.req_id, h.tx_id, &p);
                    // An event is an event whatever its req_id (libxenstore
                    // routes by type too).
                    if t == abi::XS_WATCH_EVENT {
                        events_sent.push(m[HEADER_LEN..].to_vec());
                    }
                    m
                }
                Act::Event(p) => {
                    let m = msg(abi::XS_WATCH_EVENT, 0, 0, &p);
                    events_sent.push(m[HEADER_LEN..].to_vec());
                    m
                }
                Act::TooBig => {
                    let mut m = msg(h.ty, h.req_id, 0, b"");
                    m[12..16].copy_from_slice(&(PAYLOAD_MAX as u32 + 1).to_ne_bytes());
                    m.extend_from_slice(&[0u8; 64]);
                    m
                }
                Act::Truncated => {
                    let mut m = msg(h.ty, h.req_id, 0, b"abcdefgh");
                    m.truncate(HEADER_LEN + 3);
                    let _ = s.write_all(&m);
                    return events_sent;
                }
                Act::Raw(p) => p,
                Act::Close => return events_sent,
            };
            if s.write_all(&out).is_err() {
                return events_sent;
            }
        }
    }
    // Keep the connection open until the client is done.
    let _ = read_message(&mut s);
    events_sent
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let ops: Vec<u8> = (0..4).map(|_| inp.u8()).collect();
    let steps = script(&mut inp);
    let expect_first = steps.first().and_then(|a| match a.as_slice() {
        [Act::Reply(p)] => Some(p.clone()),
        _ => None,
    });
    let p = place();
    let client = XsClient::connect_unix(&p.path).expect("connect");
    let (s, _) = p.listener.accept().expect("accept");
    let d = std::thread::spawn(move || daemon(s, steps));
    client.set_timeout(Some(TIMEOUT));
    let mut broken = false;
    for (i, op) in ops.iter().enumerate() {
        let t0 = Instant::now();
        let r: Result<Vec<u8>, XsError> = match op % 7 {
            0 => client.read(0, "/a"),
            1 => client.directory(0, "/b").map(|v| v.join("\n").into_bytes()),
            2 => client
                .get_perms(0, "/c")
                .map(|p| p.to_string().into_bytes()),
            3 => client
                .transaction_start()
                .map(|t| t.to_string().into_bytes()),
            4 => client.watch("/d", "tok").map(|()| Vec::new()),
            5 => client.write(0, "/e", b"v").map(|()| Vec::new()),
            _ => client.read_string(0, "/f").map(String::into_bytes),
        };
        let took = t0.elapsed();
        assert!(
            took < TIMEOUT + Duration::from_secs(2),
            "call {i} took {took:?}"
        );
        if i == 0 && op % 7 == 0 {
            if let Some(p) = &expect_first {
                let mut p = p.clone();
                p.truncate(PAYLOAD_MAX);
                assert_eq!(
                    r.as_ref().ok(),
                    Some(&p),
                    "correct READ reply not delivered"
                );
            }
        }
        let dead = |e: &XsError| matches!(e, XsError::Closed(_) | XsError::Io { .. });
        if let Err(e) = &r {
            assert!(!e.to_string().is_empty());
            if broken {
                assert!(dead(e), "after a broken connection: {e}");
            }
            broken |= dead(e);
        } else {
            assert!(!broken, "call succeeded on a broken connection");
        }
    }
    let events: Vec<_> = client.events().try_iter().collect();
    drop(client);
    let sent = d.join().expect("daemon thread");
    for ev in events {
        assert!(
            sent.iter().any(|p| {
                let (parts, _) = wire::split_strings(p);
                parts.len() >= 2
                    && parts[0] == ev.path.as_bytes()
                    && parts[1] == ev.token.as_bytes()
            }),
            "event {ev:?} was never sent"
        );
    }
}
