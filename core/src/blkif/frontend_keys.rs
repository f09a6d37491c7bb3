//! The xenstore values a blkfront writes, parsed without I/O.
//!
//! Everything under the frontend's directory is written by the guest and is
//! hostile input: `protocol`, `multi-queue-num-queues`, `ring-page-order`,
//! `ring-ref`/`ring-ref<N>`, `event-channel` (per queue under `queue-<N>` when
//! there are several queues), `feature-persistent` and `state`. This module
//! (beside the ring parser: together they are everything the guest writes)
//! turns them into typed values: [`parse_frontend_keys`] gives a
//! [`FrontendKeys`] or a [`FeKeyError`] naming the key and the value, given a
//! `lookup` closure that reads one key (`Ok(None)` = missing);
//! [`parse_state`] gives the frontend's xenbus state. Being pure functions of
//! their input, they are fuzzed directly (`fuzz/fuzz_targets/fekeys.rs`).
//!
//! Rules (Linux `xen-blkback/xenbus.c` `connect_ring`/`read_per_ring_refs`,
//! stricter where Linux uses `sscanf`):
//! - numbers are plain decimal: ASCII digits only, at most 20 of them, no sign,
//!   no blanks, no `0x`; trailing NUL bytes are ignored (C frontends sometimes
//!   write the terminator);
//! - `protocol`: missing = `x86_32-abi` (Linux `BLKIF_PROTOCOL_DEFAULT`);
//!   `x86_64-abi`, `x86_32-abi`; anything else is refused;
//! - `multi-queue-num-queues`: missing = 1; 0 or more than we advertised is
//!   refused; with 1 queue the keys sit in the frontend directory itself,
//!   otherwise in `queue-0` .. `queue-<n-1>`;
//! - `ring-page-order`: missing = one page named by `ring-ref`; otherwise at
//!   most what we advertised (never more than 4, ring.h
//!   `XENBUS_MAX_RING_GRANT_ORDER`) and `ring-ref0` .. `ring-ref<2^order-1>`
//!   must all be there; grant refs and the event channel are `u32`;
//! - `feature-persistent`: the frontend's offer; missing, `0` or garbage =
//!   false, any other number = true. The backend takes it only when it is
//!   configured to (`refblk serve --persistent-grants`,
//!   `BackendConfig::persistent_grants`), and then maps data pages once
//!   instead of a grant copy per request;
//! - `state`: a decimal xenbus state (0..=8); missing or anything else is
//!   `Unknown`, which the backend treats as a frontend that is gone;
//! - `backend`: the toolstack writes the backend's directory there, but the
//!   directory is the guest's: it only ever decides whether a backend
//!   connects to this frontend ([`names_backend`]: exactly its own path).

use std::fmt;

use super::Abi;
use crate::platform::{GrantRef, Port};
use xen_sys::xenbus::XenbusState;

/// Largest `ring-page-order` any backend may accept (16 pages).
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Longest value quoted back in an error message.
const QUOTE_MAX: usize = 32;

/// What the backend advertised, i.e. the bounds for the frontend's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    /// `max-ring-page-order` we wrote (clamped to [`MAX_RING_PAGE_ORDER`]).
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues` we wrote.
    pub max_queues: u32,
}

/// One queue's ring and event channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// The directory the keys were read from (the frontend's, or its `queue-N`).
    pub path: String,
    /// The ring's grant refs in order (1, 2, 4, 8 or 16 of them).
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's event channel port.
    pub event_channel: Port,
}

/// Everything a frontend told us, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendKeys {
    pub abi: Abi,
    /// At least one, at most `Advertised::max_queues`.
    pub queues: Vec<QueueKeys>,
    /// `feature-persistent` as the frontend offered it (used only if the
    /// backend is configured for persistent grants).
    pub persistent: bool,
}

/// Why a frontend's keys were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeKeyError {
    /// Reading the key failed (xenstore error, value not UTF-8, ...).
    Lookup { key: String, error: String },
    /// A required key is missing.
    Missing { key: String },
    /// A value is not what the key allows; `value` is quoted (shortened).
    BadValue {
        key: String,
        value: String,
        expected: String,
    },
}

impl fmt::Display for FeKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeKeyError::Lookup { key, error } => write!(f, "{key}: cannot read: {error}"),
            FeKeyError::Missing { key } => write!(f, "{key}: missing"),
            FeKeyError::BadValue {
                key,
                value,
                expected,
            } => write!(f, "{key}: bad value {value:?} (expected {expected})"),
        }
    }
}

impl std::error::Error for FeKeyError {}

impl From<FeKeyError> for std::io::Error {
    fn from(e: FeKeyError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    }
}

/// A strict unsigned decimal (see the module docs), `None` for anything else.
pub fn parse_uint(s: &str) -> Option<u64> {
    let s = s.trim_end_matches('\0');
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The xenbus state in a `state` node's value (the frontend's is the
/// guest's): a strict decimal naming a state, else `Unknown`.
pub fn parse_state(value: &str) -> XenbusState {
    parse_uint(value)
        .and_then(|v| u32::try_from(v).ok())
        .and_then(XenbusState::from_u32)
        .unwrap_or(XenbusState::Unknown)
}

/// Whether a frontend's `backend` node (`None`: missing) names the backend
/// directory `be`, exactly (trailing NUL bytes ignored).
pub fn names_backend(value: Option<&str>, be: &str) -> bool {
    value.is_some_and(|v| v.trim_end_matches('\0') == be)
}

fn quote(s: &str) -> String {
    s.chars().take(QUOTE_MAX).collect()
}

struct Reader<F> {
    lookup: F,
}

impl<F, E> Reader<F>
where
    F: FnMut(&str) -> Result<Option<String>, E>,
    E: fmt::Display,
{
    fn get(&mut self, key: &str) -> Result<Option<String>, FeKeyError> {
        (self.lookup)(key).map_err(|e| FeKeyError::Lookup {
            key: key.to_string(),
            error: e.to_string(),
        })
    }

    /// An optional number in `0..=max`.
    fn uint(&mut self, key: &str, max: u64) -> Result<Option<u64>, FeKeyError> {
        match self.get(key)? {
            None => Ok(None),
            Some(s) => match parse_uint(&s) {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(FeKeyError::BadValue {
                    key: key.to_string(),
                    value: quote(&s),
                    expected: format!("a decimal number 0..={max}"),
                }),
            },
        }
    }

    fn required_u32(&mut self, key: &str) -> Result<u32, FeKeyError> {
        self.uint(key, u64::from(u32::MAX))?
            .map(|v| v as u32)
            .ok_or_else(|| FeKeyError::Missing {
                key: key.to_string(),
            })
    }
}

/// Parse the keys of the frontend at `fe` (its xenstore directory, no trailing
/// slash). `lookup` gets full paths (`<fe>/protocol`, ...).
pub fn parse_frontend_keys<F, E>(
    fe: &str,
    limits: &Advertised,
    lookup: F,
) -> Result<FrontendKeys, FeKeyError>
where
    F: FnMut(&str) -> Result<Option<String>, E>,
    E: fmt::Display,
{
    let mut r = Reader { lookup };
    let key = format!("{fe}/protocol");
    let abi = match r.get(&key)? {
        None => Abi::X86_32,
        Some(p) => Abi::from_protocol(Some(p.trim_end_matches('\0'))).map_err(|_| {
            FeKeyError::BadValue {
                key,
                value: quote(&p),
                expected: "\"x86_64-abi\" or \"x86_32-abi\"".into(),
            }
        })?,
    };

    let key = format!("{fe}/multi-queue-num-queues");
    let max_queues = u64::from(limits.max_queues.max(1));
    let nq = r.uint(&key, max_queues)?.unwrap_or(1);
    if nq == 0 {
        return Err(FeKeyError::BadValue {
            key,
            value: "0".into(),
            expected: format!("1..={max_queues} queues"),
        });
    }

    let max_order = limits.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
    // Not `with_capacity(nq)`: the count is the guest's, and a backend
    // configured with a huge `max_queues` must not allocate for it up front
    // (found by the fekeys fuzz target: 49 GB for 890 million queues).
    // `ring-page-order` is a key of the frontend directory shared by all
    // queues (Linux blkfront writes it there; blkback reads it there).
    let order = r.uint(&format!("{fe}/ring-page-order"), u64::from(max_order))?;
    let mut queues = Vec::new();
    for q in 0..nq {
        let path = if nq == 1 {
            fe.to_string()
        } else {
            format!("{fe}/queue-{q}")
        };
        let ring_refs = match order {
            None => vec![r.required_u32(&format!("{path}/ring-ref"))?],
            Some(o) => (0..1u32 << o)
                .map(|i| r.required_u32(&format!("{path}/ring-ref{i}")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let event_channel = r.required_u32(&format!("{path}/event-channel"))?;
        queues.push(QueueKeys {
            path,
            ring_refs,
            event_channel,
        });
    }

    let persistent = r
        .get(&format!("{fe}/feature-persistent"))?
        .and_then(|s| parse_uint(&s))
        .is_some_and(|v| v != 0);

    Ok(FrontendKeys {
        abi,
        queues,
        persistent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const FE: &str = "/local/domain/5/device/vbd/51712";
    const LIMITS: Advertised = Advertised {
        max_ring_page_order: 4,
        max_queues: 4,
    };

    fn parse(keys: &[(&str, &str)]) -> Result<FrontendKeys, FeKeyError> {
        let m: HashMap<String, String> = keys
            .iter()
            .map(|(k, v)| (format!("{FE}/{k}"), v.to_string()))
            .collect();
        parse_frontend_keys(FE, &LIMITS, |k| Ok::<_, String>(m.get(k).cloned()))
    }

    #[test]
    fn single_page_defaults() {
        let k = parse(&[("ring-ref", "8"), ("event-channel", "17")]).unwrap();
        assert_eq!(k.abi, Abi::X86_32);
        assert_eq!(k.queues.len(), 1);
        assert_eq!(k.queues[0].ring_refs, vec![8]);
        assert_eq!(k.queues[0].event_channel, 17);
        assert_eq!(k.queues[0].path, FE);
        assert!(!k.persistent);
    }

    #[test]
    fn multi_page_multi_queue() {
        let k = parse(&[
            ("protocol", "x86_64-abi\0"),
            ("multi-queue-num-queues", "2"),
            ("ring-page-order", "1"),
            // Per-queue orders are not blkif: ignored.
            ("queue-0/ring-page-order", "3"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "3"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "4294967295"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(k.abi, Abi::X86_64);
        assert_eq!(k.queues[0].ring_refs, vec![10, 11]);
        assert_eq!(k.queues[1].ring_refs, vec![12, 13]);
        assert_eq!(k.queues[1].event_channel, u32::MAX);
        assert!(k.persistent);
    }

    #[test]
    fn hostile_values_are_refused_with_the_key() {
        let base = [("ring-ref", "8"), ("event-channel", "17")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.retain(|(k, _)| *k != extra.0);
            v.push(extra);
            parse(&v)
        };
        for (k, v) in [
            ("protocol", "arm-abi"),
            ("protocol", ""),
            ("multi-queue-num-queues", "0"),
            ("multi-queue-num-queues", "5"),
            ("multi-queue-num-queues", "-1"),
            ("ring-page-order", "5"),
            ("ring-page-order", "99999999999999999999999"),
            ("ring-ref", "4294967296"),
            ("ring-ref", " 8"),
            ("event-channel", "0x11"),
            ("event-channel", "1e3"),
        ] {
            let e = with((k, v)).unwrap_err();
            assert!(
                matches!(&e, FeKeyError::BadValue { key, .. } if key.ends_with(k)),
                "{k}={v:?}: {e}"
            );
        }
        assert_eq!(
            parse(&[("ring-ref", "8")]).unwrap_err(),
            FeKeyError::Missing {
                key: format!("{FE}/event-channel")
            }
        );
        // Order 1 needs ring-ref0 and ring-ref1, not ring-ref.
        let e = parse(&[
            ("ring-page-order", "1"),
            ("ring-ref", "8"),
            ("ring-ref0", "8"),
            ("event-channel", "1"),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            FeKeyError::Missing {
                key: format!("{FE}/ring-ref1")
            }
        );
        // Garbage persistent offers are just not taken.
        assert!(!with(("feature-persistent", "yes")).unwrap().persistent);
    }

    #[test]
    fn lookup_errors_and_silly_limits() {
        let e =
            parse_frontend_keys(FE, &LIMITS, |_| Err::<Option<String>, _>("EACCES")).unwrap_err();
        assert!(matches!(e, FeKeyError::Lookup { .. }));
        // A backend configured with an order above 4 still never accepts 5.
        let limits = Advertised {
            max_ring_page_order: 40,
            max_queues: 0,
        };
        let m: HashMap<String, String> = [("ring-page-order", "31"), ("event-channel", "1")]
            .iter()
            .map(|(k, v)| (format!("{FE}/{k}"), v.to_string()))
            .collect();
        let e =
            parse_frontend_keys(FE, &limits, |k| Ok::<_, String>(m.get(k).cloned())).unwrap_err();
        assert!(matches!(e, FeKeyError::BadValue { .. }), "{e}");
    }

    #[test]
    fn numbers_and_states_are_parsed_strictly() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("4294967295"), Some(u64::from(u32::MAX)));
        assert_eq!(parse_uint("7\0"), Some(7));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1e3",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_uint(bad), None, "{bad:?}");
            assert_eq!(parse_state(bad), XenbusState::Unknown, "{bad:?}");
        }
        assert_eq!(parse_state("4"), XenbusState::Connected);
        let be = "/local/domain/0/backend/vbd3/5/51712";
        assert!(names_backend(Some(be), be));
        assert!(names_backend(Some(&format!("{be}\0")), be));
        for other in [
            "/local/domain/0/backend/vbd/5/51712",
            "",
            " /local/domain/0/backend/vbd3/5/51712",
        ] {
            assert!(!names_backend(Some(other), be), "{other:?}");
        }
        assert!(!names_backend(None, be));
        assert_eq!(parse_state("6\0"), XenbusState::Closed);
        for bad in ["9", "4294967296", "18446744073709551615", "Connected"] {
            assert_eq!(parse_state(bad), XenbusState::Unknown, "{bad:?}");
        }
    }
}
