//! `refblk status`: a table of every device the daemon serves, with rates
//! and latencies; `--watch` redraws it like `top`, `--json` prints the
//! daemon's full statistics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::serve::DEFAULT_CONTROL;
use super::{socket_of, CliError, CliResult};
use crate::backend::control;
use crate::backend::stats::{OpClass, StatsSnapshot};

/// Arguments of `refblk status`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Rates (IOPS, MiB/s) and latencies (p50, p99, from the daemon's log2 \
histograms, all operations) are measured between two samples INTERVAL \
apart, so the table appears after one interval. QD is the number of \
requests taken off the ring and not answered yet. LIMIT shows the device's \
limits and, after a '+', its domain's. --json prints the daemon's answer \
(cumulative counters and histograms; see docs/operations.md) at once; \
--prometheus the same as Prometheus metrics (for node_exporter's textfile \
collector: --prometheus --output FILE writes FILE atomically). With --watch, \
a daemon that stops answering (a restart) is waited for and the screen \
says so.")]
pub struct StatusArgs {
    /// The daemon's control socket (or its read-only status socket).
    #[arg(long, value_name = "PATH", env = "REFBLK_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Talk to the daemon of the simulated Xen in DIR (its DIR/refblk.sock;
    /// overrides --control).
    #[arg(long, value_name = "DIR")]
    pub sim: Option<PathBuf>,
    /// Redraw every INTERVAL seconds until interrupted (like top).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between the two samples (and between screens with --watch).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub interval: f64,
    /// With --watch: stop after N screens.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Print JSON (one object per sample; with --watch one line per interval).
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print Prometheus metrics (text format 0.0.4) of one sample.
    #[arg(long, conflicts_with = "watch")]
    pub prometheus: bool,
    /// With --prometheus: write FILE (through a temporary file and a rename,
    /// so a collector never reads half of it) instead of standard output.
    #[arg(long, value_name = "FILE", requires = "prometheus")]
    pub output: Option<PathBuf>,
}

/// Write `text` to `path` atomically (a temporary file beside it, renamed).
fn write_atomically(path: &std::path::Path, text: &str) -> CliResult {
    let name = path
        .file_name()
        .ok_or_else(|| CliError::usage(format!("{}: not a file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let fail = |e: std::io::Error| CliError::failed(format!("{}: {e}", tmp.display()));
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::failed(format!("{}: {e}", path.display()))
    })
}

fn sample(a: &StatusArgs) -> Result<(Value, Instant), CliError> {
    let v = control::request(&socket_of(&a.control, a.sim.as_deref()), "status")?;
    if v["ok"] != Value::Bool(true) {
        return Err(CliError::failed(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ));
    }
    Ok((v, Instant::now()))
}

/// Run `refblk status`.
pub fn run(a: StatusArgs) -> CliResult {
    if !(a.interval.is_finite() && (0.05..=3600.0).contains(&a.interval)) {
        return Err(CliError::usage(format!(
            "--interval {}: want seconds between 0.05 and 3600",
            a.interval
        )));
    }
    let interval = Duration::from_secs_f64(a.interval);
    if a.prometheus {
        let (v, _) = sample(&a)?;
        let text = super::metrics::render(&v);
        return match &a.output {
            Some(p) => write_atomically(p, &text),
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()?;
                Ok(())
            }
        };
    }
    if a.json && !a.watch {
        let (v, _) = sample(&a)?;
        println!("{v}");
        return Ok(());
    }
    let mut prev = sample(&a)?;
    let mut screens = 0u64;
    loop {
        std::thread::sleep(interval);
        let cur = match sample(&a) {
            Ok(c) => c,
            // A restarting daemon (`systemctl restart`): wait for it.
            Err(e) if a.watch => {
                eprintln!("refblk status: {e}; waiting for the daemon to answer again");
                loop {
                    std::thread::sleep(interval);
                    if let Ok(c) = sample(&a) {
                        break c;
                    }
                }
            }
            Err(e) => return Err(e),
        };
        if a.watch && cur.0["daemon"]["pid"] != prev.0["daemon"]["pid"] {
            // A new daemon: its counters are not comparable with the old ones.
            eprintln!(
                "refblk status: reconnected (daemon pid {} -> {})",
                prev.0["daemon"]["pid"], cur.0["daemon"]["pid"]
            );
            prev = cur;
            continue;
        }
        let mut out = std::io::stdout().lock();
        if a.json {
            writeln!(out, "{}", cur.0)?;
        } else {
            if a.watch {
                // Clear the screen and go home, as top does.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            // The daemon's own sample times when it gives them (same daemon:
            // later and not absurdly far from ours), else ours.
            let local = cur.1.duration_since(prev.1).as_secs_f64();
            let dt = match (prev.0["sampled_us"].as_u64(), cur.0["sampled_us"].as_u64()) {
                (Some(a), Some(b)) if b > a && ((b - a) as f64 / 1e6) < local * 2.0 + 1.0 => {
                    (b - a) as f64 / 1e6
                }
                _ => local,
            };
            write!(out, "{}", render(&prev.0, &cur.0, dt, now_utc()))?;
        }
        out.flush()?;
        drop(out);
        screens += 1;
        if !a.watch || a.count.is_some_and(|n| screens >= n) {
            return Ok(());
        }
        prev = cur;
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC of now.
fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A latency in µs, short: `87us`, `1.2ms`, `3.4s`.
fn fmt_latency(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000.0 => format!("{us:.0}us"),
        Some(us) if us < 1_000_000.0 => format!("{:.1}ms", us / 1000.0),
        Some(us) => format!("{:.1}s", us / 1e6),
    }
}

/// Compact limits: `r500/s w20M/s`; `-` when unlimited.
fn fmt_limits(l: &Value) -> String {
    let u = |k: &str| l[k].as_u64().unwrap_or(0);
    let size = |n: u64| {
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            format!("{}Mi", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            format!("{}Ki", n >> 10)
        } else {
            n.to_string()
        }
    };
    let mut parts = Vec::new();
    if u("read_iops") > 0 {
        parts.push(format!("r{}/s", u("read_iops")));
    }
    if u("write_iops") > 0 {
        parts.push(format!("w{}/s", u("write_iops")));
    }
    if u("read_bps") > 0 {
        parts.push(format!("r{}B/s", size(u("read_bps"))));
    }
    if u("write_bps") > 0 {
        parts.push(format!("w{}B/s", size(u("write_bps"))));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// One device's row values from two samples `dt` seconds apart.
struct Row {
    domain: String,
    vdev: String,
    state: String,
    iops: f64,
    mbps: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    qd: u64,
    limit: String,
    image: String,
}

fn row(prev: Option<&Value>, d: &Value, dt: f64) -> Row {
    let cur = StatsSnapshot::from_json(&d["stats"]);
    let before = prev.map_or_else(StatsSnapshot::default, |p| {
        StatsSnapshot::from_json(&p["stats"])
    });
    let delta = cur.delta(&before);
    let dt = dt.max(1e-3);
    let (iops, mbps) = if delta.collected {
        let reqs: u64 = delta.ops.iter().map(|o| o.requests).sum();
        let sect = delta.op(OpClass::Read).sectors + delta.op(OpClass::Write).sectors;
        (reqs as f64 / dt, sect as f64 * 512.0 / MIB / dt)
    } else {
        (
            delta.requests as f64 / dt,
            (delta.bytes_read + delta.bytes_written) as f64 / MIB / dt,
        )
    };
    let all = delta.all_ops();
    let domain = d["domain_name"]
        .as_str()
        .map_or_else(|| d["domid"].to_string(), str::to_string);
    let mut limit = fmt_limits(&d["limits"]);
    let dom = fmt_limits(&d["domain_limits"]);
    if dom != "-" {
        limit = format!("{limit}+{dom}");
    }
    Row {
        domain,
        vdev: d["vdev"]
            .as_str()
            .map_or_else(|| d["devid"].to_string(), str::to_string),
        state: d["state"].as_str().unwrap_or("?").to_string(),
        iops,
        mbps,
        p50: all.percentile_us(0.50),
        p99: all.percentile_us(0.99),
        qd: cur.queue_depth,
        limit,
        image: d["image"].as_str().unwrap_or("-").to_string(),
    }
}

/// The table for two `status` answers `dt` seconds apart.
pub fn render(prev: &Value, cur: &Value, dt: f64, when: String) -> String {
    let before: BTreeMap<&str, &Value> = prev["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["backend"].as_str()?, d)))
        .collect();
    let devs: Vec<&Value> = cur["devices"].as_array().into_iter().flatten().collect();
    let mut rows: Vec<Row> = devs
        .iter()
        .map(|d| {
            let p = d["backend"].as_str().and_then(|b| before.get(b).copied());
            row(p, d, dt)
        })
        .collect();
    rows.sort_by(|a, b| (&a.domain, &a.vdev).cmp(&(&b.domain, &b.vdev)));
    let (tiops, tmb) = rows
        .iter()
        .fold((0.0, 0.0), |(i, m), r| (i + r.iops, m + r.mbps));
    let mut s = format!(
        "refblk  {when} UTC  {} device(s)  {tiops:.0} IOPS  {tmb:.1} MiB/s  (over {dt:.1} s)\n\n",
        rows.len()
    );
    let w_dom = rows
        .iter()
        .map(|r| r.domain.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let w_lim = rows.iter().map(|r| r.limit.len()).max().unwrap_or(0).max(5);
    s.push_str(&format!(
        "{:<w_dom$}  {:<6}  {:<12}  {:>8}  {:>8}  {:>7}  {:>7}  {:>4}  {:<w_lim$}  IMAGE\n",
        "DOMAIN", "VDEV", "STATE", "IOPS", "MiB/s", "P50", "P99", "QD", "LIMIT"
    ));
    for r in &rows {
        s.push_str(&format!(
            "{:<w_dom$}  {:<6}  {:<12}  {:>8.0}  {:>8.1}  {:>7}  {:>7}  {:>4}  {:<w_lim$}  {}\n",
            r.domain,
            r.vdev,
            r.state,
            r.iops,
            r.mbps,
            fmt_latency(r.p50),
            fmt_latency(r.p99),
            r.qd,
            r.limit,
            r.image
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rates_come_from_the_difference_of_two_samples() {
        let mut a = StatsSnapshot {
            collected: true,
            ..Default::default()
        };
        a.ops[0].requests = 100;
        a.ops[0].sectors = 800;
        a.ops[0].hist[7] = 100; // [64,128) us
        let mut b = a.clone();
        b.ops[0].requests = 600;
        b.ops[0].sectors = 800 + 4096;
        b.ops[0].hist[7] = 350;
        b.ops[0].hist[11] = 250; // [1024,2048) us
        let dev = |s: &StatsSnapshot| {
            json!({"devices": [{"backend": "/be/5/51712", "domid": 5, "devid": 51712,
                "domain_name": "work", "vdev": "xvda", "state": "Connected",
                "image": "/img", "stats": s.to_json(),
                "limits": {"read_iops": 500}, "domain_limits": {}}]})
        };
        let t = render(&dev(&a), &dev(&b), 2.0, "now".into());
        let line = t.lines().find(|l| l.starts_with("work")).expect(&t);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "xvda");
        assert_eq!(cols[3], "250"); // 500 requests in 2 s
        assert_eq!(cols[4], "1.0"); // 4096 sectors * 512 / 2 s = 1 MiB/s
        assert!(cols[5].ends_with("us"), "{line}"); // p50 in the fast bucket
        assert!(cols[6].ends_with("ms"), "{line}"); // p99 in the slow one
        assert_eq!(cols[8], "r500/s");
    }

    #[test]
    fn utc_dates() {
        let s = now_utc();
        assert_eq!(s.len(), 19);
        assert!(s.starts_with("20"), "{s}");
    }
}
