//! I/O limits as an administrator sets them: four rates and a burst, their
//! text form (`read-iops=500 write-bps=20M burst=1s`) and its parsing. The
//! backend enforces them (`backend::limiter`); the pool stores a volume's
//! (`pool::limits`); the CLI and the control socket parse and print them.
//! This module depends on nothing else in the crate, so all three can use it.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default burst: 100 ms of the rate (as QEMU's throttling without a max).
pub const DEFAULT_BURST_MS: u64 = 100;

/// Longest burst accepted: one hour.
pub const MAX_BURST_MS: u64 = 3_600_000;

/// Rates of one device or domain. Every rate 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub read_iops: u64,
    pub write_iops: u64,
    /// Bytes per second.
    pub read_bps: u64,
    /// Bytes per second.
    pub write_bps: u64,
    /// Bucket size, as milliseconds of the rate.
    pub burst_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UNLIMITED
    }
}

/// The keys of a limit, as written on the control socket, disk lines and
/// pool volume settings.
pub const KEYS: [&str; 7] = [
    "read-iops",
    "write-iops",
    "read-bps",
    "write-bps",
    "iops",
    "bps",
    "burst",
];

/// A bad limit value: which key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError(pub String);

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitError {}

/// A change to some of the keys of a [`Limits`] (the others stay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsPatch {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub burst_ms: Option<u64>,
}

impl LimitsPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == LimitsPatch::default()
    }

    /// Every key set: the limits become exactly `l`.
    pub fn all(l: Limits) -> LimitsPatch {
        LimitsPatch {
            read_iops: Some(l.read_iops),
            write_iops: Some(l.write_iops),
            read_bps: Some(l.read_bps),
            write_bps: Some(l.write_bps),
            burst_ms: Some(l.burst_ms),
        }
    }

    /// Set one `key` (see [`KEYS`]; `iops` and `bps` set read and write)
    /// from its text value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), LimitError> {
        match key {
            "read-iops" => self.read_iops = Some(parse_count(key, value)?),
            "write-iops" => self.write_iops = Some(parse_count(key, value)?),
            "iops" => {
                let n = parse_count(key, value)?;
                self.read_iops = Some(n);
                self.write_iops = Some(n);
            }
            "read-bps" => self.read_bps = Some(parse_size(key, value)?),
            "write-bps" => self.write_bps = Some(parse_size(key, value)?),
            "bps" => {
                let n = parse_size(key, value)?;
                self.read_bps = Some(n);
                self.write_bps = Some(n);
            }
            "burst" => self.burst_ms = Some(parse_burst(value)?),
            _ => {
                return Err(LimitError(format!(
                    "unknown limit {key:?} (known: {})",
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Parse `key=value` words (all of them must be limit keys).
    pub fn parse_pairs<'a>(
        words: impl IntoIterator<Item = &'a str>,
    ) -> Result<LimitsPatch, LimitError> {
        let mut p = LimitsPatch::default();
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(LimitError(format!(
                    "{w:?}: want key=value with key one of {}",
                    KEYS.join(", ")
                )));
            };
            p.set(k, v)?;
        }
        Ok(p)
    }

    /// The `key=value` words of the keys set.
    pub fn to_pairs(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |k: &str, x: Option<u64>| {
            if let Some(x) = x {
                v.push(format!("{k}={x}"));
            }
        };
        add("read-iops", self.read_iops);
        add("write-iops", self.write_iops);
        add("read-bps", self.read_bps);
        add("write-bps", self.write_bps);
        if let Some(b) = self.burst_ms {
            v.push(format!("burst={b}ms"));
        }
        v
    }
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        read_iops: 0,
        write_iops: 0,
        read_bps: 0,
        write_bps: 0,
        burst_ms: DEFAULT_BURST_MS,
    };

    /// Whether no rate is set.
    pub fn is_unlimited(&self) -> bool {
        self.read_iops == 0 && self.write_iops == 0 && self.read_bps == 0 && self.write_bps == 0
    }

    /// These limits with `p` applied.
    pub fn patched(&self, p: &LimitsPatch) -> Limits {
        Limits {
            read_iops: p.read_iops.unwrap_or(self.read_iops),
            write_iops: p.write_iops.unwrap_or(self.write_iops),
            read_bps: p.read_bps.unwrap_or(self.read_bps),
            write_bps: p.write_bps.unwrap_or(self.write_bps),
            burst_ms: p.burst_ms.unwrap_or(self.burst_ms),
        }
    }

    /// The JSON `status` reports.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("limits are plain numbers")
    }

    /// Parse a whole `key=value,key=value` list (commas or white space
    /// between pairs), starting from unlimited.
    pub fn parse_list(s: &str) -> Result<Limits, LimitError> {
        let p = LimitsPatch::parse_pairs(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty()),
        )?;
        Ok(Limits::UNLIMITED.patched(&p))
    }
}

impl fmt::Display for Limits {
    /// `read-iops=500 write-bps=10M burst=100ms`, or `unlimited`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        let mut parts = Vec::new();
        if self.read_iops > 0 {
            parts.push(format!("read-iops={}", self.read_iops));
        }
        if self.write_iops > 0 {
            parts.push(format!("write-iops={}", self.write_iops));
        }
        if self.read_bps > 0 {
            parts.push(format!("read-bps={}", fmt_size(self.read_bps)));
        }
        if self.write_bps > 0 {
            parts.push(format!("write-bps={}", fmt_size(self.write_bps)));
        }
        parts.push(format!("burst={}ms", self.burst_ms));
        f.write_str(&parts.join(" "))
    }
}

fn fmt_size(n: u64) -> String {
    for (s, m) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n.is_multiple_of(m) {
            return format!("{}{s}", n / m);
        }
    }
    n.to_string()
}

/// A whole number of operations per second.
fn parse_count(key: &str, v: &str) -> Result<u64, LimitError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LimitError(format!(
            "{key}: {v:?} is not a whole number of operations per second (0 = unlimited)"
        )));
    }
    v.parse::<u64>()
        .ok()
        .filter(|&n| n <= 1 << 40)
        .ok_or_else(|| LimitError(format!("{key}: {v} is too large")))
}

/// Bytes per second: a whole number with an optional binary suffix
/// K, M, G, T (also KiB, MiB, ...; case-insensitive), an optional `/s`.
fn parse_size(key: &str, v: &str) -> Result<u64, LimitError> {
    let bad = || {
        LimitError(format!(
            "{key}: {v:?} is not a rate in bytes per second (a whole number with an optional \
             K, M, G or T suffix, e.g. 20M; 0 = unlimited)"
        ))
    };
    let s = v.strip_suffix("/s").unwrap_or(v);
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let (num, suffix) = s.split_at(digits);
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(bad()),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n <= 1 << 50)
        .ok_or_else(|| LimitError(format!("{key}: {v} is too large")))
}

/// A burst: `250ms`, `2s`, or a plain number of seconds (`0.5`, `2`).
fn parse_burst(v: &str) -> Result<u64, LimitError> {
    let bad = |why: &str| {
        LimitError(format!(
            "burst: {v:?} {why} (a duration such as 100ms, 2s or 0.5; between 1ms and 1h)"
        ))
    };
    let ms = if let Some(n) = v.strip_suffix("ms") {
        n.parse::<u64>().map_err(|_| bad("is not a duration"))?
    } else {
        let n = v.strip_suffix('s').unwrap_or(v);
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(bad("is not a duration"));
        }
        let secs: f64 = n.parse().map_err(|_| bad("is not a duration"))?;
        if !secs.is_finite() || secs > (MAX_BURST_MS / 1000) as f64 {
            return Err(bad("is out of range"));
        }
        (secs * 1000.0).round() as u64
    };
    if ms == 0 || ms > MAX_BURST_MS {
        return Err(bad("is out of range"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_gives_clear_errors() {
        let l = Limits::parse_list("read-iops=500,write-bps=20M burst=2s").unwrap();
        assert_eq!(l.read_iops, 500);
        assert_eq!(l.write_bps, 20 << 20);
        assert_eq!(l.burst_ms, 2000);
        assert_eq!(l.to_string(), "read-iops=500 write-bps=20M burst=2000ms");
        let l = Limits::parse_list("iops=7 bps=1KiB/s burst=0.25").unwrap();
        assert_eq!((l.read_iops, l.write_iops), (7, 7));
        assert_eq!((l.read_bps, l.write_bps), (1024, 1024));
        assert_eq!(l.burst_ms, 250);
        assert!(Limits::parse_list("read-iops=0").unwrap().is_unlimited());
        for (bad, word) in [
            ("read-iops=-1", "read-iops"),
            ("read-iops=abc", "whole number"),
            ("write-bps=12Q", "write-bps"),
            ("write-bps=", "write-bps"),
            ("burst=0", "out of range"),
            ("burst=2h", "burst"),
            ("burst=99999", "out of range"),
            ("reads=5", "unknown limit"),
            ("read-iops", "key=value"),
            ("read-iops=99999999999999999999", "too large"),
        ] {
            let e = Limits::parse_list(bad).unwrap_err().to_string();
            assert!(e.contains(word), "{bad}: {e}");
        }
        let p = LimitsPatch::parse_pairs(["write-iops=3"]).unwrap();
        let l = Limits::parse_list("read-iops=5").unwrap().patched(&p);
        assert_eq!((l.read_iops, l.write_iops), (5, 3));
        assert_eq!(
            LimitsPatch::parse_pairs(p.to_pairs().iter().map(String::as_str)).unwrap(),
            p
        );
    }
}
