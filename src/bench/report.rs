//! Output of `refblk bench`: Markdown tables (stdout), JSON and a hand-written SVG
//! bar chart (throughput relative to the `file` path, ratios and absolute figures
//! labeled).

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::profile::{Kind, PathKind};
use super::stats::Spread;
use super::{fmt_bytes, BenchReport, Calibration, IoResult, Sample};

fn spread(r: &IoResult, f: impl Fn(&Sample) -> f64) -> Spread {
    Spread::of(&r.samples.iter().map(f).collect::<Vec<_>>())
}

/// Median IOPS of `path` for (place, profile), if measured.
pub fn median_iops(rep: &BenchReport, place: &str, profile: &str, path: PathKind) -> Option<f64> {
    rep.io
        .iter()
        .find(|r| {
            r.place == place && r.profile == profile && r.path == path && !r.samples.is_empty()
        })
        .map(|r| spread(r, |s| s.iops).median)
}

/// The refblk path's median IOPS ÷ fio's median IOPS for a calibration's
/// (place, profile): refblk against the instrument, where our `file` path
/// is not the ceiling (docs/benchmarks.md, "Why the `file` path trails fio").
fn refblk_over_fio(rep: &BenchReport, c: &Calibration) -> Option<f64> {
    let ours = median_iops(rep, &c.place, c.profile, PathKind::Refblk)?;
    let iops: Vec<f64> = c.samples.iter().map(|x| x.iops).collect();
    let fio = Spread::of(&iops).median;
    (!iops.is_empty() && fio > 0.0).then(|| ours / fio)
}

/// Ratio of two paths' median throughput for (place, profile).
pub fn ratio(
    rep: &BenchReport,
    place: &str,
    profile: &str,
    a: PathKind,
    b: PathKind,
) -> Option<f64> {
    let x = median_iops(rep, place, profile, a)?;
    let y = median_iops(rep, place, profile, b)?;
    (y > 0.0).then(|| x / y)
}

/// The median of `f` over the samples of `path` for (place, profile), if measured.
fn median_of(
    rep: &BenchReport,
    place: &str,
    profile: &str,
    path: PathKind,
    f: impl Fn(&Sample) -> f64,
) -> Option<f64> {
    rep.io
        .iter()
        .find(|r| {
            r.place == place && r.profile == profile && r.path == path && !r.samples.is_empty()
        })
        .map(|r| spread(r, f).median)
}

/// The queue depth of a known I/O profile.
pub fn queue_depth(profile: &str) -> Option<u32> {
    super::profile::ALL
        .iter()
        .find(|p| p.name == profile)
        .and_then(|p| match p.kind {
            Kind::Io(spec, _) => Some(spec.qd),
            _ => None,
        })
}

/// The latency `path` adds over the `file` path at queue depth 1: its median
/// p50 minus the file path's (µs; negative if it is faster). None at other
/// depths, for `file` itself, or where either did not run. At QD1 each
/// operation waits for nothing but itself, so the difference is what the
/// path's software adds to a round trip.
pub fn added_p50_us(rep: &BenchReport, place: &str, profile: &str, path: PathKind) -> Option<f64> {
    if path == PathKind::File || queue_depth(profile) != Some(1) {
        return None;
    }
    let mine = median_of(rep, place, profile, path, |s| s.lat_p50_us)?;
    let file = median_of(rep, place, profile, PathKind::File, |s| s.lat_p50_us)?;
    Some(mine - file)
}

/// Our `file` path's IOPS ÷ fio's, per repetition where both ran (the runs of one
/// repetition are interleaved, so each ratio compares runs made close together).
pub fn calibration_ratios(rep: &BenchReport, c: &Calibration) -> Vec<f64> {
    let Some(file) = rep
        .io
        .iter()
        .find(|r| r.place == c.place && r.profile == c.profile && r.path == PathKind::File)
    else {
        return Vec::new();
    };
    file.samples
        .iter()
        .zip(&c.samples)
        .filter(|(_, f)| f.iops > 0.0)
        .map(|(o, f)| o.iops / f.iops)
        .collect()
}

fn places(rep: &BenchReport) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in rep
        .io
        .iter()
        .map(|r| &r.place)
        .chain(rep.meta.iter().map(|m| &m.place))
    {
        if !v.contains(p) {
            v.push(p.clone());
        }
    }
    v
}

fn fmt_num(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The regime in a few words: `backing ram`, or that it was not recorded.
pub fn backing_label(rep: &BenchReport) -> String {
    if rep.backing.is_empty() {
        "backing not recorded".into()
    } else {
        format!("backing {}", rep.backing)
    }
}

/// Markdown tables: one per place for the I/O profiles, one for snapshot/commit.
pub fn markdown(rep: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "refblk bench, {} — {}; {}; image {}, {:.1} s per run, median of {} reps (± = half the range, % of the median)\n",
        rep.started_utc,
        rep.host,
        backing_label(rep),
        fmt_bytes(rep.size),
        rep.runtime_s,
        rep.reps
    );
    if !rep.backing.is_empty() {
        let _ = writeln!(
            s,
            "Regime: backing **{}** ({}); cache: every run starts with the image out of dom0's page cache, each path's regime at the end.\n",
            rep.backing, rep.backing_detail
        );
    }
    for place in places(rep) {
        let rows: Vec<&IoResult> = rep.io.iter().filter(|r| r.place == place).collect();
        if !rows.is_empty() {
            let _ = writeln!(s, "### {place}\n");
            let _ = writeln!(
                s,
                "| profile | path | IOPS | MB/s | mean µs | p50 µs | p99 µs | QD1 p50 − file µs | CPU µs/IO | kworker µs/IO | host CPU µs/IO | cache MiB | ×file | ×loop-dio | ×loop-buf |"
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for r in &rows {
                if r.samples.is_empty() {
                    let _ = writeln!(
                        s,
                        "| {} | {} | — | | | | | | | | | | | | | {}",
                        r.profile,
                        r.path,
                        r.error.as_deref().unwrap_or("not measured")
                    );
                    continue;
                }
                let iops = spread(r, |x| x.iops);
                let mbps = spread(r, |x| x.mbps).median;
                let lat = spread(r, |x| x.lat_mean_us).median;
                let p50 = spread(r, |x| x.lat_p50_us).median;
                let added = added_p50_us(rep, &place, r.profile, r.path)
                    .map(|d| format!("{d:+.1}"))
                    .unwrap_or_default();
                let p99 = spread(r, |x| x.lat_p99_us).median;
                let cpu = spread(r, |x| x.cpu_us_per_io).median;
                let host = spread(r, |x| x.host_cpu_us_per_io).median;
                let kw = spread(r, |x| x.kworker_us_per_io).median;
                let cache = r.samples.iter().map(|x| x.cache_bytes).max().unwrap_or(0);
                let rt = |b: PathKind| {
                    if b == r.path || (b != PathKind::File && r.path != PathKind::Refblk) {
                        String::new()
                    } else {
                        ratio(rep, &place, r.profile, r.path, b)
                            .map(|x| format!("{x:.2}"))
                            .unwrap_or_default()
                    }
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ±{:.0}% | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                    r.profile,
                    r.path,
                    fmt_num(iops.median),
                    iops.spread_pct(),
                    fmt_num(mbps),
                    fmt_num(lat),
                    fmt_num(p50),
                    fmt_num(p99),
                    added,
                    fmt_num(cpu),
                    fmt_num(kw),
                    fmt_num(host),
                    cache as f64 / (1 << 20) as f64,
                    rt(PathKind::File),
                    rt(PathKind::LoopDio),
                    rt(PathKind::LoopBuf),
                );
            }
            let _ = writeln!(s);
            let added: Vec<String> = rows
                .iter()
                .filter(|r| r.path == PathKind::Refblk)
                .filter_map(|r| {
                    let d = added_p50_us(rep, &place, r.profile, r.path)?;
                    let file = median_of(rep, &place, r.profile, PathKind::File, |s| s.lat_p50_us)?;
                    Some(format!(
                        "{} {d:+.1} µs ({} → {})",
                        r.profile,
                        fmt_num(file),
                        fmt_num(file + d)
                    ))
                })
                .collect();
            if !added.is_empty() {
                let _ = writeln!(
                    s,
                    "refblk's added latency at queue depth 1 (median p50, refblk − file; file → refblk µs): {}\n",
                    added.join("; ")
                );
            }
        }
        let cal: Vec<&Calibration> = rep
            .calibration
            .iter()
            .filter(|c| c.place == place)
            .collect();
        if !cal.is_empty() {
            let _ = writeln!(
                s,
                "Calibration of the ceiling: our `file` path ÷ fio ({}) on the same image, same profile, interleaved, {}; median of the per-rep ratios (range). refblk ÷ fio: the ratio of the medians, refblk against fio instead of against our `file` path\n",
                rep.fio.as_deref().unwrap_or("fio"),
                backing_label(rep)
            );
            let _ = writeln!(
                s,
                "| profile | file IOPS | fio IOPS | fio MB/s | fio mean µs | fio p50 µs | fio p99 µs | file ÷ fio | refblk ÷ fio |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
            for c in cal {
                let ours = median_iops(rep, &place, c.profile, PathKind::File)
                    .map(fmt_num)
                    .unwrap_or_else(|| "—".into());
                let ratios = calibration_ratios(rep, c);
                if c.samples.is_empty() || ratios.is_empty() {
                    let _ = writeln!(
                        s,
                        "| {} | {ours} | — | | | | | {} | |",
                        c.profile,
                        c.error.as_deref().unwrap_or("not measured")
                    );
                    continue;
                }
                let sp = |f: fn(&Sample) -> f64| {
                    Spread::of(&c.samples.iter().map(f).collect::<Vec<_>>())
                };
                let r = Spread::of(&ratios);
                let refblk = refblk_over_fio(rep, c)
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {ours} | {} ±{:.0}% | {} | {} | {} | {} | {:.2} ({:.2}–{:.2}) | {refblk} |{}",
                    c.profile,
                    fmt_num(sp(|x| x.iops).median),
                    sp(|x| x.iops).spread_pct(),
                    fmt_num(sp(|x| x.mbps).median),
                    fmt_num(sp(|x| x.lat_mean_us).median),
                    fmt_num(sp(|x| x.lat_p50_us).median),
                    fmt_num(sp(|x| x.lat_p99_us).median),
                    r.median,
                    r.min,
                    r.max,
                    c.error
                        .as_deref()
                        .map(|e| format!(" {e}"))
                        .unwrap_or_default()
                );
            }
            let _ = writeln!(s);
        }
    }
    if !rep.meta.is_empty() {
        let _ = writeln!(
            s,
            "### snapshot / commit (ms, median of {} reps)\n",
            rep.reps
        );
        let _ = writeln!(
            s,
            "| fs | operation | image | extents | ms | range ms | note |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for m in &rep.meta {
            let sp = Spread::of(&m.ms);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {}–{} | {} |",
                m.place,
                m.what,
                fmt_bytes(m.image_bytes),
                m.extents,
                fmt_num(sp.median),
                fmt_num(sp.min),
                fmt_num(sp.max),
                m.note.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(s);
    }
    let mut modes: Vec<String> = Vec::new();
    for r in &rep.io {
        let m = format!("{}: {} ({})", r.path, r.io_mode, r.cache_regime);
        if !r.io_mode.is_empty() && !modes.contains(&m) {
            modes.push(m);
        }
    }
    if !modes.is_empty() {
        let _ = writeln!(
            s,
            "I/O modes and cache regimes ({}): {}\n",
            backing_label(rep),
            modes.join("; ")
        );
    }
    for n in &rep.notes {
        let _ = writeln!(s, "Note: {n}");
    }
    s
}

fn spread_json(sp: Spread) -> Value {
    json!({"median": sp.median, "min": sp.min, "max": sp.max})
}

/// The whole report as JSON (every sample, plus medians).
pub fn to_json(rep: &BenchReport) -> Value {
    let io: Vec<Value> = rep
        .io
        .iter()
        .map(|r| {
            json!({
                "fs": r.place,
                "profile": r.profile,
                "path": r.path.name(),
                "io_mode": r.io_mode,
                "cache_regime": r.cache_regime,
                "error": r.error,
                "iops": spread_json(spread(r, |x| x.iops)),
                "mbps": spread_json(spread(r, |x| x.mbps)),
                "lat_mean_us": spread_json(spread(r, |x| x.lat_mean_us)),
                "lat_p50_us": spread_json(spread(r, |x| x.lat_p50_us)),
                "lat_p99_us": spread_json(spread(r, |x| x.lat_p99_us)),
                "added_p50_us_over_file": added_p50_us(rep, &r.place, r.profile, r.path),
                "cpu_us_per_io": spread_json(spread(r, |x| x.cpu_us_per_io)),
                "host_cpu_us_per_io": spread_json(spread(r, |x| x.host_cpu_us_per_io)),
                "kworker_us_per_io": spread_json(spread(r, |x| x.kworker_us_per_io)),
                "ratio_to_file": ratio(rep, &r.place, r.profile, r.path, PathKind::File),
                "ratio_to_loop_dio": ratio(rep, &r.place, r.profile, r.path, PathKind::LoopDio),
                "ratio_to_loop_buf": ratio(rep, &r.place, r.profile, r.path, PathKind::LoopBuf),
                "samples": r.samples.iter().map(|x| json!({
                    "iops": x.iops, "mbps": x.mbps, "lat_mean_us": x.lat_mean_us,
                    "lat_p50_us": x.lat_p50_us,
                    "lat_p99_us": x.lat_p99_us, "cpu_us_per_io": x.cpu_us_per_io,
                    "host_cpu_us_per_io": x.host_cpu_us_per_io,
                    "kworker_us_per_io": x.kworker_us_per_io, "cache_bytes": x.cache_bytes,
                    "ops": x.ops, "secs": x.secs,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let meta: Vec<Value> = rep
        .meta
        .iter()
        .map(|m| {
            json!({
                "fs": m.place, "profile": m.profile, "operation": m.what,
                "image_bytes": m.image_bytes, "extents": m.extents,
                "ms": spread_json(Spread::of(&m.ms)), "samples_ms": m.ms, "note": m.note,
            })
        })
        .collect();
    let calibration: Vec<Value> = rep
        .calibration
        .iter()
        .map(|c| {
            let sp = |f: fn(&Sample) -> f64| {
                spread_json(Spread::of(&c.samples.iter().map(f).collect::<Vec<_>>()))
            };
            let ratios = calibration_ratios(rep, c);
            json!({
                "fs": c.place,
                "profile": c.profile,
                "fio_command": c.command,
                "error": c.error,
                "file_iops": median_iops(rep, &c.place, c.profile, PathKind::File),
                "fio_iops": sp(|x| x.iops),
                "fio_mbps": sp(|x| x.mbps),
                "fio_lat_mean_us": sp(|x| x.lat_mean_us),
                "fio_lat_p50_us": sp(|x| x.lat_p50_us),
                "fio_lat_p99_us": sp(|x| x.lat_p99_us),
                "file_over_fio": (!ratios.is_empty()).then(|| spread_json(Spread::of(&ratios))),
                "refblk_over_fio": refblk_over_fio(rep, c),
                "ratios": ratios,
                "fio_samples": c.samples.iter().map(|x| json!({
                    "iops": x.iops, "mbps": x.mbps, "lat_mean_us": x.lat_mean_us,
                    "lat_p50_us": x.lat_p50_us,
                    "lat_p99_us": x.lat_p99_us, "cache_bytes": x.cache_bytes,
                    "ops": x.ops, "secs": x.secs,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "started_utc": rep.started_utc,
        "host": rep.host,
        "backing": rep.backing,
        "backing_detail": rep.backing_detail,
        "runtime_s": rep.runtime_s,
        "image_bytes": rep.size,
        "reps": rep.reps,
        "io": io,
        "meta": meta,
        "fio": rep.fio,
        "calibration": calibration,
        "notes": rep.notes,
    })
}

/// A report read back from [`to_json`]'s output: what the I/O results need
/// (every sample's IOPS, MiB/s, latencies and CPU figures; the header), so an
/// old run can be drawn again (`refblk bench --replot`). Control-plane timings
/// and the calibration are left out.
pub fn from_json(v: &Value) -> Result<BenchReport, String> {
    let f = |s: &Value, k: &str| s[k].as_f64().unwrap_or(0.0);
    let mut io = Vec::new();
    for (i, r) in v["io"]
        .as_array()
        .ok_or("no \"io\" array")?
        .iter()
        .enumerate()
    {
        let name = r["profile"]
            .as_str()
            .ok_or(format!("io[{i}]: no profile"))?;
        // Known profiles keep their static name; an unknown one (a later
        // version's) is kept too.
        let profile: &'static str = super::profile::ALL
            .iter()
            .find(|p| p.name == name)
            .map_or_else(
                || &*Box::leak(name.to_string().into_boxed_str()),
                |p| p.name,
            );
        let path = r["path"].as_str().unwrap_or("");
        let path = PathKind::parse_list(path)
            .ok()
            .and_then(|v| v.first().copied())
            .ok_or(format!("io[{i}]: unknown path {path:?}"))?;
        let samples = r["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| Sample {
                iops: f(s, "iops"),
                mbps: f(s, "mbps"),
                lat_mean_us: f(s, "lat_mean_us"),
                lat_p50_us: f(s, "lat_p50_us"),
                lat_p99_us: f(s, "lat_p99_us"),
                cpu_us_per_io: f(s, "cpu_us_per_io"),
                host_cpu_us_per_io: f(s, "host_cpu_us_per_io"),
                kworker_us_per_io: f(s, "kworker_us_per_io"),
                cache_bytes: s["cache_bytes"].as_u64().unwrap_or(0),
                ops: s["ops"].as_u64().unwrap_or(0),
                secs: f(s, "secs"),
            })
            .collect();
        io.push(IoResult {
            place: r["fs"].as_str().unwrap_or("?").to_string(),
            profile,
            path,
            io_mode: r["io_mode"].as_str().unwrap_or("").to_string(),
            cache_regime: "",
            samples,
            error: r["error"].as_str().map(str::to_string),
        });
    }
    Ok(BenchReport {
        started_utc: v["started_utc"].as_str().unwrap_or("").to_string(),
        host: v["host"].as_str().unwrap_or("").to_string(),
        backing: v["backing"].as_str().unwrap_or("").to_string(),
        backing_detail: v["backing_detail"].as_str().unwrap_or("").to_string(),
        runtime_s: f(v, "runtime_s"),
        size: v["image_bytes"].as_u64().unwrap_or(0),
        reps: v["reps"].as_u64().unwrap_or(0) as usize,
        io,
        ..Default::default()
    })
}

fn color(p: PathKind) -> &'static str {
    match p {
        PathKind::File => "#4c72b0",
        PathKind::LoopDio => "#dd8452",
        PathKind::LoopBuf => "#c9a227",
        PathKind::Refblk => "#55a868",
    }
}

/// What each path is, for the legend.
fn path_legend(p: PathKind) -> &'static str {
    match p {
        PathKind::File => "file: io_uring O_DIRECT on the image (the ceiling, 1.0×)",
        PathKind::LoopDio => "loop-dio: loop device, direct I/O",
        PathKind::LoopBuf => "loop-buf: loop device, buffered",
        PathKind::Refblk => "refblk: simulated guest through refblk",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Width in px of `s` at `size` px, an upper bound for the usual sans-serif
/// fonts (DejaVu Sans, the widest common one, averages about 0.6 em per
/// character and 0.64 em per digit): the layout makes room for this much.
pub fn text_width(s: &str, size: f64, bold: bool) -> f64 {
    s.chars().count() as f64 * size * if bold { 0.72 } else { 0.66 }
}

/// A tick step giving at most 8 ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    [
        0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0,
    ]
    .into_iter()
    .find(|s| max / s <= 8.0)
    .unwrap_or(max / 8.0)
}

/// SVG text element bookkeeping: every text goes through here, which also
/// records its right edge so the picture is made wide enough for it.
struct Svg {
    body: String,
    right: f64,
}

impl Svg {
    #[allow(clippy::too_many_arguments)]
    fn text(&mut self, x: f64, y: f64, size: f64, bold: bool, anchor: &str, fill: &str, s: &str) {
        let w = text_width(s, size, bold);
        let right = match anchor {
            "end" => x,
            "middle" => x + w / 2.0,
            _ => x + w,
        };
        self.right = self.right.max(right);
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}"{}{} fill="{fill}">{}</text>"#,
            if bold { r#" font-weight="bold""# } else { "" },
            if anchor == "start" {
                String::new()
            } else {
                format!(r#" text-anchor="{anchor}""#)
            },
            esc(s)
        );
    }
}

/// A horizontal bar chart per file system: for each profile one bar per path,
/// its length the path's median throughput relative to the `file` path (the
/// ceiling, 1.0×; where `file` did not run, relative to the fastest path of
/// that profile), labeled with the ratio and the absolute median IOPS and
/// MiB/s. Nothing is clipped: the axis runs to the largest ratio, the picture
/// is as wide as its longest text (estimated by [`text_width`]) and as tall as
/// its rows.
pub fn svg(rep: &BenchReport) -> String {
    let places: Vec<String> = places(rep)
        .into_iter()
        .filter(|p| rep.io.iter().any(|r| &r.place == p))
        .collect();
    let mut paths: Vec<PathKind> = rep.io.iter().map(|r| r.path).collect();
    paths.sort();
    paths.dedup();
    let mut profiles: Vec<&str> = Vec::new();
    for r in &rep.io {
        if !profiles.contains(&r.profile) {
            profiles.push(r.profile);
        }
    }
    // The base each bar divides by, and whether any group lacked `file`.
    let mut fallback = false;
    let mut base = |place: &str, prof: &str| -> Option<f64> {
        if let Some(f) = median_iops(rep, place, prof, PathKind::File).filter(|f| *f > 0.0) {
            return Some(f);
        }
        let best = paths
            .iter()
            .filter_map(|p| median_iops(rep, place, prof, *p))
            .fold(0.0f64, f64::max);
        fallback = true;
        (best > 0.0).then_some(best)
    };
    struct Bar {
        path: PathKind,
        ratio: Option<f64>,
        label: String,
    }
    /// A profile's bars, and a file system's profiles.
    type Group<'a> = (&'a str, Vec<Bar>);
    let mut panels: Vec<(&str, Vec<Group>)> = Vec::new();
    let mut xmax: f64 = 1.0;
    for place in &places {
        let mut groups = Vec::new();
        for prof in &profiles {
            if !rep
                .io
                .iter()
                .any(|r| &r.place == place && r.profile == *prof)
            {
                continue;
            }
            let b = base(place, prof);
            let bars = paths
                .iter()
                .map(|&path| {
                    let r = rep
                        .io
                        .iter()
                        .find(|r| &r.place == place && r.profile == *prof && r.path == path)
                        .filter(|r| !r.samples.is_empty());
                    match r {
                        None => Bar {
                            path,
                            ratio: None,
                            label: format!("{}: not measured", path.name()),
                        },
                        Some(r) => {
                            let iops = spread(r, |s| s.iops).median;
                            let mbps = spread(r, |s| s.mbps).median;
                            let ratio = b.map(|b| iops / b);
                            xmax = xmax.max(ratio.unwrap_or(0.0));
                            Bar {
                                path,
                                ratio,
                                label: format!(
                                    "{}{} IOPS, {} MiB/s",
                                    ratio.map_or(String::new(), |x| format!("{x:.2}×  ")),
                                    fmt_num(iops),
                                    fmt_num(mbps)
                                ),
                            }
                        }
                    }
                })
                .collect();
            groups.push((*prof, bars));
        }
        panels.push((place.as_str(), groups));
    }
    let step = tick_step(xmax);
    let xmax = (xmax / step).ceil() * step;

    let margin = 16.0;
    let font = 11.0;
    let left = margin
        + profiles
            .iter()
            .map(|p| text_width(p, font, false))
            .fold(0.0, f64::max)
        + 10.0;
    let plot_w = 360.0;
    let xpx = |v: f64| left + v / xmax * plot_w;
    let bar_h = 14.0;
    let mut g = Svg {
        body: String::new(),
        right: left + plot_w,
    };
    let mut y = 26.0;
    g.text(
        margin,
        y,
        15.0,
        true,
        "start",
        "#000",
        &format!(
            "refblk bench ({}): throughput of each path, relative to the raw file",
            backing_label(rep)
        ),
    );
    y += 18.0;
    g.text(
        margin,
        y,
        font,
        false,
        "start",
        "#555",
        &format!(
            "{} — image {}, {:.1} s runs, median of {} rep(s)",
            rep.host,
            fmt_bytes(rep.size),
            rep.runtime_s,
            rep.reps
        ),
    );
    y += 16.0;
    g.text(
        margin,
        y,
        font,
        false,
        "start",
        "#555",
        if fallback {
            "bar length: median IOPS ÷ the file path's (where file did not run: ÷ the fastest path's); labels: that ratio, median IOPS and MiB/s"
        } else {
            "bar length: median IOPS ÷ the file path's; labels: that ratio, median IOPS and MiB/s"
        },
    );
    // Legend: one entry per line (entries are long; a line each never clips).
    for p in &paths {
        y += 17.0;
        let _ = writeln!(
            g.body,
            r#"<rect x="{margin}" y="{:.1}" width="12" height="12" fill="{}"/>"#,
            y - 10.0,
            color(*p)
        );
        g.text(
            margin + 18.0,
            y,
            font,
            false,
            "start",
            "#000",
            path_legend(*p),
        );
    }
    y += 14.0;
    for (place, groups) in &panels {
        y += 22.0;
        g.text(margin, y, 13.0, true, "start", "#000", place);
        // The axis on top of each panel: ticks and their labels.
        y += 18.0;
        let axis_y = y;
        let rows: f64 = groups
            .iter()
            .map(|(_, b)| b.len() as f64 * bar_h + 8.0)
            .sum();
        let bottom = axis_y + 6.0 + rows;
        let ticks = (xmax / step).round() as usize;
        for i in 0..=ticks {
            let t = i as f64 * step;
            let x = xpx(t);
            let dash = if (t - 1.0).abs() < 1e-9 {
                r##" stroke="#555""##
            } else {
                r##" stroke="#ccc" stroke-dasharray="3,3""##
            };
            let _ = writeln!(
                g.body,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{bottom:.1}"{dash}/>"#,
                axis_y + 3.0
            );
            let label = format!("{t:.2}");
            let label = label.trim_end_matches('0').trim_end_matches('.');
            g.text(
                x,
                axis_y,
                10.0,
                false,
                "middle",
                "#333",
                &format!("{label}×"),
            );
        }
        y = axis_y + 6.0;
        for (prof, bars) in groups {
            let gh = bars.len() as f64 * bar_h;
            g.text(
                left - 8.0,
                y + gh / 2.0 + 4.0,
                font,
                false,
                "end",
                "#000",
                prof,
            );
            for b in bars {
                let w = b.ratio.map_or(0.0, |r| r / xmax * plot_w);
                if b.ratio.is_some() {
                    let _ = writeln!(
                        g.body,
                        r#"<rect x="{left:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{} {} {}: {}</title></rect>"#,
                        y + 1.0,
                        bar_h - 2.0,
                        color(b.path),
                        esc(place),
                        esc(prof),
                        b.path.name(),
                        esc(&b.label)
                    );
                }
                g.text(
                    left + w + 4.0,
                    y + bar_h - 3.0,
                    9.0,
                    false,
                    "start",
                    "#000",
                    &b.label,
                );
                y += bar_h;
            }
            y += 8.0;
        }
        let _ = writeln!(
            g.body,
            r##"<line x1="{left:.1}" x2="{left:.1}" y1="{:.1}" y2="{bottom:.1}" stroke="#000"/>"##,
            axis_y + 3.0
        );
    }
    let width = (g.right + margin).ceil();
    let height = (y + margin).ceil();
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Verdana, sans-serif">"#
    );
    s.push('\n');
    s.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    s.push('\n');
    s.push_str(&g.body);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{IoResult, Sample};

    fn res(path: PathKind, iops: f64) -> IoResult {
        IoResult {
            place: "xfs".into(),
            profile: "rnd4k_q1t1_read",
            path,
            io_mode: "O_DIRECT".into(),
            cache_regime: "cold",
            samples: vec![Sample {
                iops,
                ..Default::default()
            }],
            error: None,
        }
    }

    #[test]
    fn ratios_tables_and_svg_agree() {
        let rep = BenchReport {
            io: vec![res(PathKind::File, 1000.0), res(PathKind::Refblk, 800.0)],
            reps: 1,
            ..Default::default()
        };
        let r = ratio(
            &rep,
            "xfs",
            "rnd4k_q1t1_read",
            PathKind::Refblk,
            PathKind::File,
        )
        .unwrap();
        assert!((r - 0.8).abs() < 1e-9);
        assert!(markdown(&rep).contains("| 0.80 |"));
        let svg = svg(&rep);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">0.80×  800 IOPS"), "{svg}");
        let j = to_json(&rep);
        assert_eq!(j["io"][1]["ratio_to_file"].as_f64().unwrap(), r);
        assert!(j["fio"].is_null() && j["calibration"].as_array().unwrap().is_empty());
    }

    #[test]
    fn the_added_latency_is_the_qd1_p50_over_the_file_paths() {
        let lat = |path, profile, p50s: &[f64]| IoResult {
            profile,
            samples: p50s
                .iter()
                .map(|&p50| Sample {
                    iops: 1000.0,
                    lat_mean_us: p50 * 3.0,
                    lat_p50_us: p50,
                    lat_p99_us: p50 * 2.0,
                    ..Default::default()
                })
                .collect(),
            ..res(path, 1000.0)
        };
        let rep = BenchReport {
            io: vec![
                lat(PathKind::File, "rnd4k_q1t1_read", &[40.0, 38.0, 60.0]),
                lat(PathKind::Refblk, "rnd4k_q1t1_read", &[65.0, 90.0, 64.0]),
                lat(PathKind::LoopDio, "rnd4k_q1t1_read", &[30.0, 50.0, 45.0]),
                lat(PathKind::File, "rnd4k_q32t1_read", &[40.0]),
                lat(PathKind::Refblk, "rnd4k_q32t1_read", &[400.0]),
            ],
            reps: 3,
            ..Default::default()
        };
        let q1 = "rnd4k_q1t1_read";
        // Medians: file 40, refblk 65, loop-dio 45 (not the means, not the p99s).
        assert_eq!(added_p50_us(&rep, "xfs", q1, PathKind::Refblk), Some(25.0));
        assert_eq!(added_p50_us(&rep, "xfs", q1, PathKind::LoopDio), Some(5.0));
        assert_eq!(added_p50_us(&rep, "xfs", q1, PathKind::File), None);
        // At depth 32 a p50 holds queueing, not what the path adds.
        let q32 = "rnd4k_q32t1_read";
        assert_eq!(added_p50_us(&rep, "xfs", q32, PathKind::Refblk), None);
        let md = markdown(&rep);
        assert!(
            md.contains(
                "| rnd4k_q1t1_read | refblk | 1000 ±0% | 0.00 | 195 | 65.0 | 130 | +25.0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("refblk's added latency at queue depth 1 (median p50, refblk − file; file → refblk µs): rnd4k_q1t1_read +25.0 µs (40.0 → 65.0)\n"),
            "{md}"
        );
        let j = to_json(&rep);
        assert_eq!(j["io"][1]["added_p50_us_over_file"].as_f64(), Some(25.0));
        assert_eq!(j["io"][1]["lat_p50_us"]["median"].as_f64(), Some(65.0));
        assert!(j["io"][0]["added_p50_us_over_file"].is_null());
        assert!(j["io"][4]["added_p50_us_over_file"].is_null());
        let back = from_json(&j).unwrap();
        assert_eq!(back.io[1].samples[1].lat_p50_us, 90.0);
    }

    #[test]
    fn the_calibration_divides_each_file_run_by_the_fio_run_of_its_rep() {
        let mut file = res(PathKind::File, 1000.0);
        file.samples.push(Sample {
            iops: 900.0,
            ..Default::default()
        });
        let fio = |iops| Sample {
            iops,
            ..Default::default()
        };
        let rep = BenchReport {
            io: vec![file, res(PathKind::Refblk, 450.0)],
            reps: 2,
            fio: Some("fio-3.33".into()),
            calibration: vec![
                Calibration {
                    place: "xfs".into(),
                    profile: "rnd4k_q1t1_read",
                    command: "fio --rw=randread".into(),
                    samples: vec![fio(800.0), fio(1000.0)],
                    error: None,
                },
                Calibration {
                    place: "xfs".into(),
                    profile: "discard_4k",
                    command: String::new(),
                    samples: vec![],
                    error: Some("not calibrated: fio trims only block devices".into()),
                },
            ],
            ..Default::default()
        };
        let c = &rep.calibration[0];
        assert_eq!(calibration_ratios(&rep, c), [1.25, 0.9]);
        let md = markdown(&rep);
        assert!(md.contains("Calibration of the ceiling"), "{md}");
        assert!(md.contains("| rnd4k_q1t1_read | 950 | 900 ±11% |"), "{md}");
        assert!(md.contains("| 1.07 (0.90–1.25) | 0.50 |"), "{md}");
        assert!(md.contains("fio trims only block devices"), "{md}");
        let j = to_json(&rep);
        assert_eq!(j["fio"], "fio-3.33");
        let c = &j["calibration"][0];
        assert_eq!(c["file_over_fio"]["median"].as_f64().unwrap(), 1.075);
        assert_eq!(c["fio_iops"]["median"].as_f64().unwrap(), 900.0);
        assert_eq!(c["fio_command"], "fio --rw=randread");
        assert!(j["calibration"][1]["file_over_fio"].is_null());
        assert_eq!(c["refblk_over_fio"].as_f64().unwrap(), 0.5);
        assert!(j["calibration"][1]["refblk_over_fio"].is_null());
    }
}
