//! Wall-clock time as refblk prints and stores it: seconds since the epoch
//! and UTC dates (the pool's revision names use Qubes' `isodate` form). One
//! implementation of the civil calendar for the whole project.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch now (0 if the clock is before 1970).
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Seconds since the epoch now, with fractions.
pub fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The UTC calendar date and time of `secs`: (year, month, day, hour,
/// minute, second), proleptic Gregorian (civil-from-days after H. Hinnant's
/// public algorithm).
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (y, mo, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC, as Qubes' `isodate`
/// (`time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))`).
pub fn isodate(secs: i64) -> String {
    let (y, mo, d, h, m, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}")
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (for people: status headers, reports).
pub fn utc(secs: i64) -> String {
    let (y, mo, d, h, m, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_values() {
        assert_eq!(isodate(0), "1970-01-01T00:00:00");
        assert_eq!(isodate(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(isodate(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(isodate(4_102_444_799), "2099-12-31T23:59:59");
        assert_eq!(isodate(-1), "1969-12-31T23:59:59");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
    }
}
