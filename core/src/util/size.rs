//! Byte sizes as administrators type them: `4096`, `512K`, `512M`, `10G`, `1T`, `10GiB`.
//!
//! Suffixes are binary (K = 1024) as in `truncate(1)` and Qubes' `qvm-volume resize`;
//! `B`, `iB` after the letter are accepted and ignored. No fractions, no negative sizes.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    why: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid size {:?}: {} (examples: 4096, 512M, 10G)",
            self.input, self.why
        )
    }
}

impl std::error::Error for SizeError {}

/// Parse a size: decimal digits followed by an optional unit K/M/G/T/P/E (binary
/// multiples, case-insensitive), optionally followed by `B` or `iB`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError {
        input: s.to_string(),
        why,
    };
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(err("must start with a number"));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| err("number too large"))?;
    let unit = t[digits_end..].trim();
    let lower = unit.to_ascii_lowercase();
    let letter = lower.trim_end_matches("ib").trim_end_matches('b');
    let shift = match letter {
        "" => {
            if !lower.is_empty() && lower != "b" {
                return Err(err("unknown unit"));
            }
            0
        }
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(err("unknown unit")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("does not fit in 64 bits"))
}

/// Format a size for humans: exact binary unit when it divides evenly (`10G`),
/// else bytes (`12345`).
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("E", 60),
        ("P", 50),
        ("T", 40),
        ("G", 30),
        ("M", 20),
        ("K", 10),
    ];
    if n == 0 {
        return "0".into();
    }
    for (u, shift) in UNITS {
        let m = 1u64 << shift;
        if n.is_multiple_of(m) {
            return format!("{}{}", n / m, u);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size(" 3M "), Ok(3 << 20));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "10X",
            "10 GG",
            "99999999999999999999",
            "16E",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        let msg = parse_size("10X").unwrap_err().to_string();
        assert!(msg.contains("10X") && msg.contains("unknown unit"), "{msg}");
    }

    #[test]
    fn formats_round_trip() {
        for n in [0u64, 1, 4096, 512 << 20, 10 << 30, 12345, 3 << 40] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536), "1536");
    }
}
