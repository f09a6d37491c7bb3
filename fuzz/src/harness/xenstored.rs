//! Target `xenstored`: the simulated xenstored's request handling
//! (`refblk_sim::xenstored::InProcess`, the engine behind the
//! socket daemon) driven by a hostile domU connection and a dom0 connection
//! with arbitrary message types, ids, transaction ids and payloads built from
//! paths, permission strings, numbers and raw bytes.
//!
//! Checked after every request: no panic; exactly one reply, first, to the
//! caller, echoing its `req_id`/`tx_id`, of the request's type or `XS_ERROR`
//! with a known error name; everything else is a well-formed watch event for
//! an open connection; no message is over 4096 payload bytes. Security: a node
//! dom0 created with `n0` permissions is never shown to the domU (its value
//! never appears in anything sent to the domU) and is unchanged at the end.

use refblk_core::xenstore::wire::{self, split_strings, Header, HEADER_LEN, PAYLOAD_MAX};
use refblk_sim::xenstored::InProcess;
use xen_sys::xs_wire as abi;

use super::input::Input;

const SECRET: &[u8] = b"SECRET-7f3a91";
const DOMU: u16 = 7;

const WORDS: &[&[u8]] = &[
    b"/",
    b"/secret",
    b"/local",
    b"/local/domain",
    b"/local/domain/7",
    b"/local/domain/7/data",
    b"/local/domain/7/data/x",
    b"/local/domain/0",
    b"/local/domain/0/backend",
    b"data",
    b"data/x",
    b"../secret",
    b"a//b",
    b"/local/domain/7/",
    b"@releaseDomain",
    b"@introduceDomain",
    b"@other",
    b"/tool/xenstored",
    b"",
    b"n0",
    b"b7",
    b"r0",
    b"w7",
    b"n7",
    b"b0",
    b"r7",
    b"x7",
    b"0",
    b"1",
    b"7",
    b"8",
    b"65535",
    b"32752",
    b"4294967296",
    b"-1",
    b"T",
    b"F",
    b"sim-as-domain",
    b"help",
    b"print",
    b"check",
    b"tok",
    b"SECRET",
];

struct Daemon {
    d: InProcess,
    dom0: u64,
    domu: u64,
    watcher: u64,
    req: u32,
    tx: [u32; 2],
}

impl Daemon {
    /// Send one request; check and return the reply's (type, payload).
    fn send(&mut self, from: u64, ty: u32, req_id: u32, tx_id: u32, p: &[u8]) -> (u32, Vec<u8>) {
        let out = self.d.request(from, ty, req_id, tx_id, p);
        let mut reply = None;
        for (i, (to, m)) in out.iter().enumerate() {
            assert!(m.len() >= HEADER_LEN, "short message");
            let h = Header::from_bytes(m[..HEADER_LEN].try_into().unwrap());
            let body = &m[HEADER_LEN..];
            assert_eq!(h.len as usize, body.len(), "header length");
            assert!(body.len() <= PAYLOAD_MAX, "oversized message");
            assert!(
                [self.dom0, self.domu, self.watcher].contains(to),
                "message to unknown connection {to}"
            );
            if *to == self.domu {
                assert!(
                    !body.windows(SECRET.len()).any(|w| w == SECRET),
                    "secret leaked to the domU in reply to type {ty} {:?}",
                    String::from_utf8_lossy(p)
                );
            }
            if i == 0 {
                assert_eq!(*to, from, "first message is not the caller's reply");
                assert_eq!((h.req_id, h.tx_id), (req_id, tx_id), "reply ids");
                assert!(
                    h.ty == ty || h.ty == abi::XS_ERROR,
                    "reply type {} to {ty}",
                    h.ty
                );
                if h.ty == abi::XS_ERROR && ty != abi::XS_ERROR {
                    let (parts, tail) = split_strings(body);
                    assert!(
                        tail.is_empty() && parts.len() == 1,
                        "error payload {body:?}"
                    );
                    let name = std::str::from_utf8(parts[0]).expect("error name");
                    assert!(wire::errno_for_name(name).is_some(), "unknown error {name}");
                }
                reply = Some((h.ty, body.to_vec()));
            } else {
                assert_eq!(h.ty, abi::XS_WATCH_EVENT, "extra message of type {}", h.ty);
                assert_eq!(h.req_id, 0);
                let (parts, _) = split_strings(body);
                assert!(parts.len() >= 2, "watch event {body:?}");
            }
        }
        reply.expect("every request gets a reply")
    }

    fn ok(&mut self, from: u64, ty: u32, p: &[u8]) -> Vec<u8> {
        self.req += 1;
        let (t, body) = self.send(from, ty, self.req, 0, p);
        assert_eq!(
            t,
            ty,
            "setup request {ty} failed: {:?}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    fn connect_domu(&mut self) -> u64 {
        let c = self.d.connect();
        self.domu = c; // before sending, so its replies are checked as the domU's
        self.ok(
            c,
            abi::XS_CONTROL,
            &wire::join_strings(&["sim-as-domain", "7"]),
        );
        c
    }
}

fn setup() -> Daemon {
    let mut d = InProcess::new();
    let dom0 = d.connect();
    let watcher = d.connect();
    let mut s = Daemon {
        d,
        dom0,
        domu: 0,
        watcher,
        req: 0,
        tx: [0; 2],
    };
    let mut w = b"/secret\0".to_vec();
    w.extend_from_slice(SECRET);
    s.ok(dom0, abi::XS_WRITE, &w);
    s.ok(dom0, abi::XS_SET_PERMS, b"/secret\0n0\0");
    s.ok(dom0, abi::XS_WRITE, b"/local/domain/7\0");
    s.ok(dom0, abi::XS_SET_PERMS, b"/local/domain/7\0n7\0");
    s.ok(watcher, abi::XS_WATCH, b"/\0all\0");
    s.connect_domu();
    s
}

fn payload(inp: &mut Input) -> Vec<u8> {
    let mut p = Vec::new();
    let n = inp.u8() % 5;
    for i in 0..n {
        match inp.u8() % 8 {
            0..=5 => p.extend_from_slice(inp.pick(WORDS)),
            6 => p.extend_from_slice(inp.u32().to_string().as_bytes()),
            _ => {
                let k = usize::from(inp.u8() % 32);
                p.extend_from_slice(inp.up_to(k));
            }
        }
        // Usually terminated; the last one sometimes not (a WRITE value).
        if i + 1 < n || !inp.u8().is_multiple_of(4) {
            p.push(0);
        }
    }
    if inp.u8() == 0xff {
        // A huge payload (value quota, E2BIG paths).
        let k = usize::from(inp.u16()) % (PAYLOAD_MAX + 64);
        p.extend(std::iter::repeat_n(b'a', k));
    }
    p
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut s = setup();
    for _ in 0..64 {
        if inp.is_empty() {
            break;
        }
        let sel = inp.u8();
        if sel == 0xfe {
            // The domU reconnects: its transactions and watches must go.
            let old = s.domu;
            s.d.disconnect(old);
            s.connect_domu();
            s.tx[1] = 0;
            continue;
        }
        let from_domu = !sel.is_multiple_of(4);
        let who = if from_domu { s.domu } else { s.dom0 };
        let ty = match inp.u8() % 16 {
            15 => inp.u32(),
            14 => u32::from(inp.u8()),
            _ => u32::from(inp.u8() % 24),
        };
        s.req = s.req.wrapping_add(1);
        let req_id = if inp.u8().is_multiple_of(8) {
            inp.u32()
        } else {
            s.req
        };
        let tx_id = match inp.u8() % 8 {
            0..=4 => 0,
            5 | 6 => s.tx[usize::from(from_domu)],
            _ => inp.u32() % 16,
        };
        let p = payload(&mut inp);
        // dom0 is trusted and may legitimately expose the secret: touch it,
        // make the domU a device model with SET_TARGET (which gives it the
        // target's rights), or turn its own connection into a domain.
        if !from_domu
            && (p.windows(6).any(|w| w.eq_ignore_ascii_case(b"secret"))
                || ty == abi::XS_SET_TARGET
                || p.windows(13).any(|w| w == b"sim-as-domain"))
        {
            continue;
        }
        let (rty, body) = s.send(who, ty, req_id, tx_id, &p);
        if ty == abi::XS_TRANSACTION_START && rty == ty {
            let (parts, _) = split_strings(&body);
            let id: u32 = std::str::from_utf8(parts[0])
                .unwrap()
                .parse()
                .expect("tx id");
            assert_ne!(id, 0);
            s.tx[usize::from(from_domu)] = id;
        }
    }
    // The secret is intact and still private.
    let v = s.ok(s.dom0, abi::XS_READ, b"/secret\0");
    assert_eq!(v, SECRET, "dom0's private node was changed");
    let perms = s.ok(s.dom0, abi::XS_GET_PERMS, b"/secret\0");
    assert_eq!(
        perms, b"n0\0",
        "dom0's private node's permissions were changed"
    );
    s.req += 1;
    let (t, body) = s.send(s.domu, abi::XS_READ, s.req, 0, b"/secret\0");
    assert_eq!(t, abi::XS_ERROR, "domU read the secret: {body:?}");
    assert!(s.d.connection_count() == 3);
    let _ = DOMU;
}
