//! The reduced scale run of issue #8 (the full one is `bench/scale.rs`):
//! one `refblk serve` process (a child, measured through /proc) serves 32
//! simulated guests at once, each running 4 KiB random reads and writes for a
//! few seconds, every read checked against what that guest wrote.
//!
//! Asserted (correctness and leaks, not speed): every guest made progress
//! (read, wrote and read back) with no failed request, no response anomaly
//! and no wrong data (also on a read-back of every written block after the
//! load); the daemon counted the same requests as the guests; after
//! detaching every device the daemon has no device and no descriptor more
//! than its baseline, and its RSS is back within glibc's allowance
//! (`rss_tolerance_kib`: 8 MiB on 2 CPUs) or half of what the 32 attached
//! devices took, whichever is larger; a second attach/detach round of all 32
//! devices adds no descriptor and at most that allowance of RSS; it stops
//! cleanly on SIGTERM.
//!
//! Not asserted, because a loaded machine moves them (they are the bench's,
//! `cargo run --release --example scale`): fairness (min/mean IOPS of the
//! guests), I/O inside the timed window, the speed and memory targets (2 MiB
//! per idle device, 50 ms per attach). They are printed.

use std::time::Duration;

use refblk::bench::scale::{self, ScaleConfig};

const GUESTS: usize = 32;

#[test]
fn thirty_two_guests_progress_read_back_their_data_and_leave_no_trace() {
    if !crate::kit::require_memlock_or_skip() {
        return;
    }
    let mut cfg = ScaleConfig::new(env!("CARGO_BIN_EXE_refblk"));
    cfg.guests = GUESTS;
    cfg.load = Duration::from_secs(2);
    cfg.warmup = Duration::from_millis(300);
    // Small disks, so most reads hit blocks written before.
    cfg.image_size = 4 << 20;
    cfg.final_verify = true;
    cfg.settle = Duration::from_millis(300);
    // One more round keeps the test near 15 s; at 32 devices the first
    // re-attach grows the heap by about 120 KiB, well inside the bound.
    cfg.extra_rounds = 1;
    let rep = scale::run(&cfg);
    // glibc's malloc arenas keep some freed memory: a constant per CPU, not
    // per device (see rss_tolerance_kib; 8 MiB on 2 CPUs).
    let tolerance = scale::rss_tolerance_kib(rep.cpus);
    eprint!("{}", rep.summary());
    for t in rep.targets(tolerance) {
        eprintln!(
            "scale_guests: bench target {} {}: {} (goal {})",
            if t.met { "ok" } else { "miss" },
            t.name,
            t.value,
            t.goal
        );
    }
    assert!(rep.error.is_none(), "the run stopped: {:?}", rep.error);

    let load = rep.load.as_ref().expect("load step ran");
    assert_eq!(load.guests.len(), GUESTS);
    for g in &load.guests {
        assert!(g.error.is_none(), "dom{}: {:?}", g.domid, g.error);
        assert!(
            g.anomalies.is_none(),
            "dom{}: response anomalies {:?}",
            g.domid,
            g.anomalies
        );
        assert!(
            g.reads > 0 && g.writes > 0 && g.final_verified > 0,
            "dom{}: {} reads, {} writes, {} blocks read back",
            g.domid,
            g.reads,
            g.writes,
            g.final_verified
        );
    }
    let of_written: u64 = load.guests.iter().map(|g| g.reads_of_written).sum();
    assert!(
        of_written > 0,
        "no read hit a block written before: the data check checked nothing"
    );
    assert_eq!(
        load.daemon_requests, load.guest_requests,
        "the daemon's request counters disagree with what the guests completed"
    );

    assert_eq!(rep.devices_left, Some(0), "devices left in the daemon");
    // No more than the baseline (which a connection still closing when it
    // was sampled can only raise).
    let fds = rep.fd_delta().expect("detach step ran");
    assert!(
        fds <= 0,
        "daemon descriptors after detaching all vs baseline {fds:+}; gained {:?}, gone {:?}",
        rep.fds_gained,
        rep.fds_lost
    );
    // What the attached devices took: a leak of their state keeps most of it.
    let (base, idle) = (rep.baseline.expect("baseline"), rep.idle.expect("idle"));
    let devices_kib = idle.rss_kib.saturating_sub(base.rss_kib);
    let tolerance = tolerance.max(devices_kib / 2);
    let rss = rep.rss_delta_kib().expect("detach step ran");
    assert!(
        rss <= tolerance as i64,
        "daemon RSS {rss:+} KiB vs baseline after detaching all (tolerance {tolerance} KiB); \
         largest anonymous mappings: {:?}",
        rep.anon_after_detach
    );
    // The leak check proper: another attach/detach round of every device
    // (no load) leaves the descriptors at the baseline and the RSS flat.
    assert_eq!(rep.rounds_after.len(), 1, "the extra round ran");
    assert_eq!(
        rep.second_round_fds(),
        Some(0),
        "descriptors grew over more attach/detach rounds"
    );
    // glibc's arenas, which the bench's 1 MiB target assumes settled, grow
    // with how the daemon's threads happened to contend: the same allowance
    // as above; a leak of 256 KiB per device and round exceeds it.
    let r = rep.second_round_rss_kib().expect("extra rounds ran");
    let second = scale::rss_tolerance_kib(rep.cpus).max(scale::SECOND_ROUND_TOLERANCE_KIB);
    assert!(
        r <= second as i64,
        "daemon RSS grew {r:+} KiB over a second round of attaching and detaching {GUESTS} devices"
    );
    let exit = rep.daemon_exit.as_deref().unwrap_or("");
    assert!(exit.contains("exit status: 0"), "daemon stop: {exit}");
}
