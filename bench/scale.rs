//! Issue #8's scale benchmark: one `refblk serve` process (a child, measured
//! through /proc) serving many simulated guests at once (this process, one
//! thread per guest).
//!
//! ```sh
//! cargo run --release --example scale -- --guests 128 --seconds 10 [--dir DIR] [--json FILE]
//! ```
//!
//! Steps, figures and targets: `src/bench/scale.rs` and `docs/benchmarks.md`
//! ("Scale"). The `refblk` binary next to this example (same profile) is
//! built first when run through cargo; `--refblk PATH` picks another one.
//! Exit status: 0 when every target is met, 1 when one is missed, 2 when
//! the run could not finish (the report says where it stopped).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use refblk::bench::scale::{self, ScaleConfig};

/// The scale benchmark of issue #8 (see docs/benchmarks.md, "Scale").
#[derive(Parser, Debug)]
#[command(name = "scale")]
struct Args {
    /// Guests, one device each.
    #[arg(long, default_value_t = 128)]
    guests: usize,
    /// Measured load, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Load before the measured window, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Directory for the simulated machine and the images (default /dev/shm).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Image size per guest, MiB (sparse).
    #[arg(long, default_value_t = 64)]
    image_mib: u64,
    /// Operations in flight per guest.
    #[arg(long, default_value_t = 4)]
    qd: usize,
    /// Percentage of reads.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    read_pct: u32,
    /// Queues per device.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Ring page order per queue.
    #[arg(long, default_value_t = 0)]
    ring_page_order: u32,
    /// After the load every guest reads back every block it wrote.
    #[arg(long)]
    final_verify: bool,
    /// Extra argument for `refblk serve` (repeat for several).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// The refblk binary (default: the one of this build profile).
    #[arg(long)]
    refblk: Option<PathBuf>,
    /// Attach/detach rounds after the first (no load; the leak check).
    #[arg(long, default_value_t = 2)]
    extra_rounds: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// target/<profile>/refblk for target/<profile>/examples/scale; built (or
/// found up to date) first when cargo runs us.
fn refblk_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/examples/scale")
        .to_path_buf();
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bin", "refblk", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("scale: building refblk failed ({s}); using what is there"),
            Err(e) => eprintln!("scale: cannot run cargo ({e}); using what is there"),
        }
    }
    profile_dir.join("refblk")
}

fn main() {
    let a = Args::parse();
    let mut cfg = ScaleConfig::new(a.refblk.clone().unwrap_or_else(refblk_binary));
    cfg.guests = a.guests;
    cfg.load = Duration::from_secs_f64(a.seconds);
    cfg.warmup = Duration::from_secs_f64(a.warmup);
    if let Some(d) = a.dir {
        cfg.dir = d;
    }
    cfg.image_size = a.image_mib << 20;
    cfg.queue_depth = a.qd;
    cfg.read_pct = a.read_pct;
    cfg.queues = a.queues;
    cfg.ring_page_order = a.ring_page_order;
    cfg.final_verify = a.final_verify;
    cfg.serve_args = a.serve_args;
    cfg.progress = !a.quiet;
    cfg.extra_rounds = a.extra_rounds;
    if cfg!(debug_assertions) {
        eprintln!("scale: this is a debug build; figures are for `cargo run --release`");
    }
    let rep = scale::run(&cfg);
    // See rss_tolerance_kib: glibc's arenas, not a per-device amount.
    let tolerance = scale::rss_tolerance_kib(rep.cpus);
    print!("{}", rep.summary());
    let targets = rep.targets(tolerance);
    println!("targets:");
    for t in &targets {
        println!(
            "  {:<4} {:<44} {} (target {})",
            if t.met { "ok" } else { "MISS" },
            t.name,
            t.value,
            t.goal
        );
    }
    if let Some(p) = &a.json {
        let s = serde_json::to_string_pretty(&rep.to_json(tolerance)).expect("JSON");
        if let Err(e) = std::fs::write(p, s + "\n") {
            eprintln!("scale: {}: {e}", p.display());
            std::process::exit(2);
        }
    }
    if rep.error.is_some() {
        std::process::exit(2);
    }
    if targets.iter().any(|t| !t.met) {
        std::process::exit(1);
    }
}
