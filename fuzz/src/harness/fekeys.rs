//! Target `fekeys`: the xenstore values a frontend controls (`protocol`,
//! `multi-queue-num-queues`, `ring-page-order`, `ring-ref*`, `event-channel`,
//! `feature-persistent`) — garbage, huge, negative, missing, not UTF-8 —
//! through `refblk_core::blkif::frontend_keys::parse_frontend_keys`, and every
//! generated value through `parse_state` (the frontend's `state` node).
//!
//! Checked: no panic; lookups stay under the frontend's directory and are
//! bounded in number; an accepted result respects the advertised limits and
//! equals a reference reading of the same map; a refusal names a key under the
//! frontend's directory.

use std::collections::HashMap;

use refblk_core::blkif::frontend_keys::{parse_frontend_keys, parse_state, Advertised, FeKeyError};
use refblk_core::blkif::Abi;
use xen_sys::xenbus::XenbusState;

use super::input::Input;

const FE: &str = "/local/domain/7/device/vbd/51712";

const KEYS: &[&str] = &[
    "protocol",
    "multi-queue-num-queues",
    "ring-page-order",
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref2",
    "ring-ref3",
    "ring-ref7",
    "ring-ref15",
    "event-channel",
    "feature-persistent",
];

const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "16",
    "-1",
    "+1",
    " 1",
    "1 ",
    "0x10",
    "1e3",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "",
    "\0",
    "1\0",
    "x86_64-abi",
    "x86_32-abi",
    "x86_64-abi\0",
    "arm-abi",
    "X86_64-ABI",
    "00000000000000000001",
    "000000000000000000001",
];

/// Strict decimal written independently of the parser under test.
fn reference_uint(s: &str) -> Option<u64> {
    let s = s.trim_end_matches('\0');
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn value(inp: &mut Input) -> Result<String, String> {
    match inp.u8() % 8 {
        0..=4 => Ok(inp.pick(VALUES).to_string()),
        5 => Ok(inp.u32().to_string()),
        6 => {
            let n = usize::from(inp.u16()) % 4097;
            let fill = inp.pick(&["9", "0", "a", "\u{e9}"]);
            Ok(fill.repeat(n))
        }
        _ => {
            let n = usize::from(inp.u8());
            // As XsClient::read_string: a non-UTF-8 value is a read error.
            String::from_utf8(inp.up_to(n).to_vec()).map_err(|_| "value is not UTF-8".to_string())
        }
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let limits = Advertised {
        max_ring_page_order: inp.pick(&[0, 1, 2, 4, 4, 5, 31, 32, u32::MAX]),
        max_queues: inp.pick(&[0, 1, 2, 4, 4, 16, 255, u32::MAX]),
    };
    let mut map: HashMap<String, Result<String, String>> = HashMap::new();
    let dirs = [
        "",
        "queue-0/",
        "queue-1/",
        "queue-2/",
        "queue-3/",
        "queue-17/",
    ];
    while !inp.is_empty() && map.len() < 64 {
        let dir = inp.pick(&dirs);
        let key = inp.pick(KEYS);
        let v = value(&mut inp);
        map.insert(format!("{FE}/{dir}{key}"), v);
    }
    // Any value as the frontend's `state`: a state only for a strict decimal 0..=8.
    for v in map.values().flatten() {
        let want = reference_uint(v)
            .and_then(|n| u32::try_from(n).ok())
            .and_then(XenbusState::from_u32)
            .unwrap_or(XenbusState::Unknown);
        assert_eq!(parse_state(v), want, "state {v:?}");
    }
    let mut lookups = 0usize;
    let res = parse_frontend_keys(FE, &limits, |k: &str| {
        lookups += 1;
        assert!(
            k.starts_with(FE) && k.len() > FE.len(),
            "lookup outside the frontend: {k}"
        );
        match map.get(k) {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v.clone())),
            Some(Err(e)) => Err(e.clone()),
        }
    });
    let max_q = u64::from(limits.max_queues.max(1));
    assert!(lookups as u64 <= 3 + max_q * 18, "{lookups} lookups");
    let get = |k: &str| map.get(&format!("{FE}/{k}"));
    match res {
        Ok(keys) => {
            let proto = get("protocol");
            let want_abi = match proto {
                None => Abi::X86_32,
                Some(Ok(p)) if p.trim_end_matches('\0') == "x86_64-abi" => Abi::X86_64,
                Some(Ok(p)) if p.trim_end_matches('\0') == "x86_32-abi" => Abi::X86_32,
                other => panic!("protocol {other:?} accepted"),
            };
            assert_eq!(keys.abi, want_abi);
            let nq = keys.queues.len() as u64;
            assert!(nq >= 1 && nq <= max_q, "{nq} queues, max {max_q}");
            match get("multi-queue-num-queues") {
                None => assert_eq!(nq, 1),
                Some(Ok(v)) => assert_eq!(reference_uint(v), Some(nq)),
                Some(Err(e)) => panic!("failed lookup ignored: {e}"),
            }
            for (i, q) in keys.queues.iter().enumerate() {
                let dir = if nq == 1 {
                    String::new()
                } else {
                    format!("queue-{i}/")
                };
                let want_path = if nq == 1 {
                    FE.to_string()
                } else {
                    format!("{FE}/queue-{i}")
                };
                assert_eq!(q.path, want_path);
                let n = q.ring_refs.len();
                assert!(n.is_power_of_two() && n <= 16);
                assert!(n <= 1 << limits.max_ring_page_order.min(4));
                let refkey = |j: usize| {
                    // ring-page-order sits in the frontend directory for all queues.
                    if get("ring-page-order").is_some() {
                        format!("{dir}ring-ref{j}")
                    } else {
                        format!("{dir}ring-ref")
                    }
                };
                for (j, r) in q.ring_refs.iter().enumerate() {
                    let v = get(&refkey(j)).expect("ref key present").as_ref().unwrap();
                    assert_eq!(reference_uint(v), Some(u64::from(*r)));
                }
                let ev = get(&format!("{dir}event-channel"))
                    .unwrap()
                    .as_ref()
                    .unwrap();
                assert_eq!(reference_uint(ev), Some(u64::from(q.event_channel)));
            }
            let want_persistent = matches!(get("feature-persistent"),
                Some(Ok(v)) if reference_uint(v).is_some_and(|x| x != 0));
            assert_eq!(keys.persistent, want_persistent);
        }
        Err(e) => {
            let key = match &e {
                FeKeyError::Lookup { key, .. }
                | FeKeyError::Missing { key }
                | FeKeyError::BadValue { key, .. } => key,
            };
            assert!(key.starts_with(FE), "error names {key}");
            if let FeKeyError::BadValue { value, .. } = &e {
                assert!(value.chars().count() <= 32, "error quotes a huge value");
            }
            let msg = e.to_string();
            assert!(msg.contains(key.as_str()) && msg.len() < 512, "{msg}");
        }
    }
}
