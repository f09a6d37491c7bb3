//! `refblk status`: a table of every device the daemon serves, with rates
//! and latencies; `--watch` redraws it like `top`, `--json` prints the
//! daemon's full statistics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::serve::DEFAULT_CONTROL;
use super::{socket_of, CliError, CliResult};
use refblk_core::backend::control;
use refblk_core::backend::stats::{OpClass, StatsSnapshot};

/// Arguments of `refblk status`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Rates (IOPS, MiB/s) and latencies (p50, p99, from the daemon's log2 \
histograms, all operations) are measured between two samples INTERVAL \
apart, so the table appears after one interval. QD is the number of \
requests taken off the ring and not answered yet; ERR the requests answered \
with an error status since the device was attached (I/O errors and \
requests refused by validation). Lines fit the terminal (80 columns when \
not a terminal): IMAGE is shown where room is left, --wide prints \
everything in full. LIMIT shows the device's \
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
    /// Lines at most N columns wide (default: the terminal's width, else
    /// 80): long domain names and limits are cut with '~', and IMAGE is shown
    /// (cut from the left) only where room is left.
    #[arg(long, value_name = "N", conflicts_with = "wide")]
    pub width: Option<usize>,
    /// Print every column in full, however wide the lines get.
    #[arg(long)]
    pub wide: bool,
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
    let width = if a.wide {
        None
    } else {
        Some(a.width.unwrap_or_else(terminal_width))
    };
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
            write!(out, "{}", render(&prev.0, &cur.0, dt, now_utc(), width))?;
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
    refblk_core::util::time::utc(refblk_core::util::time::now_secs())
}

/// Columns of the terminal on standard output, else 80.
fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which
    // lives across the call; on a non-terminal it fails and writes nothing.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

/// A latency in µs, at most 6 characters: `87us`, `48.9ms`, `123ms`, `3.4s`.
fn fmt_latency(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000.0 => format!("{us:.0}us"),
        Some(us) if us < 99_950.0 => format!("{:.1}ms", us / 1000.0),
        Some(us) if us < 999_500.0 => format!("{:.0}ms", us / 1000.0),
        Some(us) if us < 99_950_000.0 => format!("{:.1}s", us / 1e6),
        Some(us) => format!("{:.0}s", us / 1e6),
    }
}

/// A count or rate in at most 6 characters: `12345`, `123k`, `1.2M`.
fn fmt_count(n: f64) -> String {
    let n = n.max(0.0);
    if n < 99_999.5 {
        return format!("{n:.0}");
    }
    for (unit, div) in [("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)] {
        let v = n / div;
        if v < 9.95 {
            return format!("{v:.1}{unit}");
        }
        if v < 999.5 {
            return format!("{v:.0}{unit}");
        }
    }
    format!("{:.0}P", n / 1e15)
}

/// MiB/s in at most 6 characters: `0.0` ... `9999.9`, then whole numbers.
fn fmt_mibs(m: f64) -> String {
    if m < 9999.95 {
        format!("{m:.1}")
    } else {
        fmt_count(m)
    }
}

/// The xenbus state in at most 9 characters.
fn fmt_state(s: &str) -> String {
    match s {
        "Initialising" => "Initing".into(),
        "Initialised" => "Inited".into(),
        "Reconfiguring" => "Reconfing".into(),
        "Reconfigured" => "Reconfed".into(),
        s => cut_end(s, 9),
    }
}

/// `s` cut to `w` characters, a `~` marking the cut at the end.
fn cut_end(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.into();
    }
    let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
    t.push('~');
    t
}

/// `s` cut to `w` characters, a `~` marking the cut at the start (paths:
/// the file name is the informative end).
fn cut_start(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        return s.into();
    }
    let mut t = String::from("~");
    t.extend(s.chars().skip(n - w.saturating_sub(1)));
    t
}

/// Compact limits: `r500/s,w20MiB/s`; `-` when unlimited.
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
    errors: u64,
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
    // Every request answered with an error status: the I/O errors (flat
    // `errors`, kept with or without per-request statistics) and the requests
    // validation refused (`rejected`, not in `errors`).
    let errors = d["errors"].as_u64().unwrap_or(cur.errors) + cur.rejected;
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
        errors,
        limit,
        image: d["image"].as_str().unwrap_or("-").to_string(),
    }
}

/// Table columns: header, right-aligned, the narrowest a cut may make it
/// (`None`: never cut).
const COLUMNS: [(&str, bool, Option<usize>); 11] = [
    ("DOMAIN", false, Some(8)),
    ("VDEV", false, Some(7)),
    ("STATE", false, None),
    ("IOPS", true, None),
    ("MiB/s", true, None),
    ("P50", true, None),
    ("P99", true, None),
    ("QD", true, None),
    ("ERR", true, None),
    ("LIMIT", false, Some(8)),
    ("IMAGE", false, Some(12)),
];
const IMAGE: usize = 10;

/// The table for two `status` answers `dt` seconds apart, its lines at most
/// `width` columns wide (`None`: no limit).
pub fn render(prev: &Value, cur: &Value, dt: f64, when: String, width: Option<usize>) -> String {
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
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    let title = format!(
        "{when} UTC  {} device{}  {} IOPS  {} MiB/s  {errors} error{}  ({dt:.1} s)",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        fmt_count(tiops),
        fmt_mibs(tmb),
        if errors == 1 { "" } else { "s" },
    );
    let mut s = match width {
        Some(w) => cut_end(&title, w),
        None => title,
    };
    s.push_str("\n\n");
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|r| {
            [
                r.domain.clone(),
                r.vdev.clone(),
                fmt_state(&r.state),
                fmt_count(r.iops),
                fmt_mibs(r.mbps),
                fmt_latency(r.p50),
                fmt_latency(r.p99),
                fmt_count(r.qd as f64),
                fmt_count(r.errors as f64),
                r.limit.clone(),
                r.image.clone(),
            ]
        })
        .collect();
    let mut w: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (h, _, _))| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut show_image = true;
    if let Some(limit) = width {
        // One space between columns. DOMAIN, VDEV and LIMIT are cut to 16, 7
        // and 24 characters at most (the image matters more than their
        // tails), then LIMIT, DOMAIN and VDEV down to their narrowest until
        // the columns before IMAGE fit; IMAGE gets what is left, or goes when
        // that is less than its narrowest.
        for (col, most) in [(0, 16), (1, 7), (9, 24)] {
            w[col] = w[col].min(most);
        }
        let before_image = |w: &[usize]| w[..IMAGE].iter().sum::<usize>() + IMAGE - 1;
        for col in [9, 0, 1] {
            let over = before_image(&w).saturating_sub(limit);
            let min = COLUMNS[col].2.unwrap_or(w[col]).min(w[col]);
            w[col] -= over.min(w[col] - min);
        }
        let room = limit.saturating_sub(before_image(&w) + 1);
        if room >= COLUMNS[IMAGE].2.unwrap_or(0) {
            w[IMAGE] = w[IMAGE].min(room);
        } else {
            show_image = false;
        }
    }
    let ncols = if show_image { IMAGE + 1 } else { IMAGE };
    let line = |vals: &[String]| {
        let mut l = String::new();
        for (i, v) in vals.iter().take(ncols).enumerate() {
            let (_, right, _) = COLUMNS[i];
            let v = match i {
                IMAGE => cut_start(v, w[i]),
                _ => cut_end(v, w[i]),
            };
            if i > 0 {
                l.push(' ');
            }
            let pad = w[i].saturating_sub(v.chars().count());
            if right {
                l.extend(std::iter::repeat_n(' ', pad));
                l.push_str(&v);
            } else {
                l.push_str(&v);
                if i + 1 < ncols {
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        l.push('\n');
        l
    };
    let header: Vec<String> = COLUMNS.iter().map(|(h, _, _)| h.to_string()).collect();
    s.push_str(&line(&header));
    for c in &cells {
        s.push_str(&line(c));
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
        let t = render(&dev(&a), &dev(&b), 2.0, "now".into(), Some(80));
        let line = t.lines().find(|l| l.starts_with("work")).expect(&t);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "xvda");
        assert_eq!(cols[3], "250"); // 500 requests in 2 s
        assert_eq!(cols[4], "1.0"); // 4096 sectors * 512 / 2 s = 1 MiB/s
        assert!(cols[5].ends_with("us"), "{line}"); // p50 in the fast bucket
        assert!(cols[6].ends_with("ms"), "{line}"); // p99 in the slow one
        assert_eq!(cols[8], "0"); // no error
        assert_eq!(cols[9], "r500/s");
        assert!(t.lines().all(|l| l.chars().count() <= 80), "{t}");
    }

    #[test]
    fn utc_dates() {
        let s = now_utc();
        assert_eq!(s.len(), 19);
        assert!(s.starts_with("20"), "{s}");
    }
}
