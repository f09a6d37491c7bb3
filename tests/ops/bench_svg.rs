//! `refblk bench --svg` (issue 20): readable at any number of profiles and
//! paths. Checked on the picture's structure: every text (title, legend,
//! axis ticks, profile names, bar labels), estimated at 0.6 em per character
//! (0.65 bold; DejaVu Sans, the usual sans-serif fallback, averages about
//! that), lies inside the viewBox; every label is present; each measured bar
//! carries its absolute IOPS and MiB/s; and no bar is clipped (the axis runs
//! to the largest ratio). `REFBLK_SVG_OUT=DIR` keeps the pictures to look at.

use refblk::bench::profile::{PathKind, ALL};
use refblk::bench::report::svg;
use refblk::bench::{BenchReport, IoResult, Sample};

fn report(places: &[&str], profiles: &[&'static str], paths: &[PathKind]) -> BenchReport {
    let mut io = Vec::new();
    for (pi, place) in places.iter().enumerate() {
        for (fi, prof) in profiles.iter().enumerate() {
            for (ki, &path) in paths.iter().enumerate() {
                // file 1000..; others up to 2.7x of it (a buffered loop
                // device reading from dom0's page cache), one not measured.
                let iops = 1000.0 * (1 + fi) as f64 * [1.0, 0.6, 2.7, 0.93][ki % 4];
                let unmeasured = pi == 0 && fi == 1 && path == PathKind::LoopDio;
                io.push(IoResult {
                    place: place.to_string(),
                    profile: prof,
                    path,
                    io_mode: "O_DIRECT".into(),
                    cache_regime: "cold",
                    samples: if unmeasured {
                        vec![]
                    } else {
                        vec![Sample {
                            iops,
                            mbps: iops * 4096.0 / 1048576.0,
                            ..Default::default()
                        }]
                    },
                    error: unmeasured.then(|| "losetup failed".to_string()),
                });
            }
        }
    }
    BenchReport {
        host: "a host with a rather long description (2 vCPU, 3.8 GiB, Linux 6.1.0-57-amd64)"
            .into(),
        backing: "ram".into(),
        runtime_s: 1.0,
        size: 1 << 30,
        reps: 3,
        io,
        ..Default::default()
    }
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let i = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(tag[i..][..tag[i..].find('"')?].to_string())
}

fn num(tag: &str, name: &str) -> f64 {
    attr(tag, name)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} of {tag}"))
}

/// (viewBox width, height, every text as (x0, x1, top, baseline, content),
/// every rect as (x, y, width, height), every bar as (title, width)).
type Texts = Vec<(f64, f64, f64, f64, String)>;
type Rects = Vec<(f64, f64, f64, f64)>;
fn parse(svg: &str) -> (f64, f64, Texts, Rects, Vec<(String, f64)>) {
    let head = &svg[..svg.find('>').unwrap()];
    let vb: Vec<f64> = attr(head, "viewBox")
        .expect("a viewBox")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(&vb[..2], [0.0, 0.0]);
    assert_eq!(num(head, "width"), vb[2], "width = viewBox width");
    let mut texts = Vec::new();
    for part in svg.split("<text").skip(1) {
        let tag = &part[..part.find('>').unwrap()];
        let content = part[tag.len() + 1..part.find("</text>").unwrap()]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&");
        let (x, y, size) = (num(tag, "x"), num(tag, "y"), num(tag, "font-size"));
        let bold = attr(tag, "font-weight").is_some();
        let w = content.chars().count() as f64 * size * if bold { 0.65 } else { 0.6 };
        let x0 = match attr(tag, "text-anchor").as_deref() {
            Some("end") => x - w,
            Some("middle") => x - w / 2.0,
            _ => x,
        };
        assert!(!tag.contains("rotate"), "rotated text: {tag}");
        texts.push((x0, x0 + w, y - size, y, content));
    }
    let rects = svg
        .split("<rect")
        .skip(1)
        .map(|p| &p[..p.find('>').unwrap()])
        .filter(|t| attr(t, "x").is_some())
        .map(|t| (num(t, "x"), num(t, "y"), num(t, "width"), num(t, "height")))
        .collect();
    let bars = svg
        .split("<rect")
        .skip(1)
        .filter_map(|p| {
            let tag = &p[..p.find('>').unwrap()];
            let t = p.strip_prefix(tag)?.strip_prefix("><title>")?;
            Some((t[..t.find("</title>")?].to_string(), num(tag, "width")))
        })
        .collect();
    (vb[2], vb[3], texts, rects, bars)
}

fn check(name: &str, places: &[&str], profiles: &[&'static str], paths: &[PathKind]) {
    let rep = report(places, profiles, paths);
    let pic = svg(&rep);
    if let Some(dir) = std::env::var_os("REFBLK_SVG_OUT") {
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.svg")), &pic).unwrap();
    }
    let (w, h, texts, rects, bars) = parse(&pic);
    for (x0, x1, top, base, t) in &texts {
        assert!(
            *x0 >= 0.0 && *x1 <= w && *top >= 0.0 && *base <= h,
            "{name}: text {t:?} spans x {x0:.0}..{x1:.0}, y {top:.0}..{base:.0}, outside the {w}x{h} picture"
        );
    }
    for (x, y, rw, rh) in &rects {
        assert!(
            *x >= 0.0 && x + rw <= w && *y >= 0.0 && y + rh <= h,
            "{name}: a bar at ({x},{y}) {rw}x{rh} leaves the {w}x{h} picture"
        );
    }
    let has = |s: &str| texts.iter().any(|t| t.4.contains(s));
    assert!(
        has("refblk bench (backing ram): throughput"),
        "{name}: no title naming the regime"
    );
    assert!(has("relative to the raw file"), "{name}: no title");
    assert!(has("1×"), "{name}: no axis tick at 1×");
    assert!(has("median IOPS"), "{name}: the axis' unit is not said");
    for p in places {
        assert!(texts.iter().any(|t| t.4 == *p), "{name}: no panel {p}");
    }
    for p in profiles {
        assert!(texts.iter().any(|t| t.4 == *p), "{name}: no label {p}");
    }
    for p in paths {
        assert!(
            texts
                .iter()
                .any(|t| t.4.starts_with(&format!("{}: ", p.name()))),
            "{name}: no legend entry for {}",
            p.name()
        );
    }
    // Every measured bar: its absolute figures.
    let labels = texts.iter().filter(|t| t.4.contains(" IOPS, ")).count();
    let measured = rep.io.iter().filter(|r| !r.samples.is_empty()).count();
    assert_eq!(labels, measured, "{name}: bars with absolute figures");
    assert!(
        has("1000 IOPS, 3.91 MiB/s"),
        "{name}: the file bar's figures"
    );
    // No clipping: the loop-buf bar (2.7× file) is 2.7 times as long as
    // the file bar of its profile.
    if paths.contains(&PathKind::LoopBuf) {
        let prof = profiles[0];
        let bar = |path: PathKind| {
            bars.iter()
                .find(|(title, _)| {
                    title.starts_with(&format!("{} {prof} {}: ", places[0], path.name()))
                })
                .unwrap_or_else(|| panic!("{name}: no bar {prof} {}", path.name()))
                .1
        };
        let r = bar(PathKind::LoopBuf) / bar(PathKind::File);
        assert!(
            (r - 2.7).abs() < 0.01,
            "{name}: the 2.7× bar is {r:.2} times the file bar (clipped?)"
        );
        assert!(has("2.70×  "), "{name}: the 2.7× bar is not labeled 2.70×");
    }
}

#[test]
fn one_profile_one_path_is_not_clipped() {
    check("one", &["xfs"], &["rnd4k_q1t1_read"], &[PathKind::File]);
    check(
        "one-two",
        &["xfs"],
        &["rnd4k_q1t1_read"],
        &[PathKind::File, PathKind::Refblk],
    );
}

#[test]
fn every_profile_path_and_file_system_is_readable() {
    let profiles: Vec<&'static str> = ALL
        .iter()
        .map(|p| p.name)
        .filter(|n| *n != "snapshot" && *n != "commit")
        .collect();
    assert!(profiles.len() >= 10);
    check(
        "many",
        &[
            "btrfs",
            "xfs",
            "dir:/srv/a/rather/long/directory/name/for/a/place",
        ],
        &profiles,
        &PathKind::ALL,
    );
}

/// `refblk bench --replot JSON --svg OUT` draws an earlier run's JSON: the
/// same picture as the run itself would have drawn.
#[test]
fn replot_draws_an_earlier_runs_json() {
    let rep = report(
        &["xfs"],
        &["rnd4k_q1t1_read", "seq1m_q8t1_write"],
        &PathKind::ALL,
    );
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = dir.path().join("run.svg");
    std::fs::write(&json, refblk::bench::report::to_json(&rep).to_string()).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["bench", "--replot"])
        .arg(&json)
        .arg("--svg")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), svg(&rep));
}
