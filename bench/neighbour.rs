//! Noisy neighbour (issue 7): does a misbehaving guest slow a well-behaved one
//! down? One refblk backend on the simulated Xen (in process, as the tests
//! run it) serves two guests. Guest B runs a fixed, verified workload: random
//! 4 KiB reads and writes (half each) at queue depth 8 over a 16 MiB disk,
//! every read checked against a model of what B wrote, for `--secs` seconds.
//! It runs alone, then while guest A misbehaves in each way of
//! `tests/kit/hostile.rs` (the same code the hostile-guest tests
//! use): flooding its ring without consuming responses, reconnecting in a
//! tight loop, revoking grants mid-request, sending garbage requests,
//! unmapping and reusing its ring, switching `protocol` on every reconnect.
//! Runs are interleaved (alone, A1, ..., A6, alone, A1, ...) `--reps` times so
//! that machine drift hits every scenario alike. Two reference runs have A
//! well-behaved and busy (B's own workload flat out; and 24 x 64 KiB writes
//! flat out, the revocation scenario's bandwidth without the revocation):
//! what any busy neighbour costs B here, to read the hostile rows against. The
//! table gives B's IOPS (median, min-max), the ratio of the medians to B
//! alone, pass/fail against 0.80 (issue 7: within 20 % of running alone),
//! the ratio to the busy reference ("vs ref": what the misbehaviour costs
//! beyond being a busy neighbour) and what happened to A's own device. Exit
//! status 1 if a scenario fails the bound.
//!
//! CPU placement: on Xen, A's frontend runs on A's own vCPUs; what A can take
//! from B is dom0's work on A's behalf (the backend). Here every frontend is a
//! thread of this process, so by default (`--pin`, on a machine with 2 or
//! more CPUs) the backend, the simulated Xen and B run on CPU 0 and A's
//! frontend on CPU 1: A's own CPU use does not count against B, the
//! backend's work for A does. `--no-pin` leaves placement to the scheduler
//! (then A's frontend competes with B for the CPUs as well).
//!
//! A timing measurement, so it is not part of `cargo test`: run it on a quiet
//! machine (as root, or with RLIMIT_MEMLOCK >= 256 MiB):
//!
//! ```sh
//! cargo run --release --example neighbour -- [--secs 3] [--reps 5] [--json FILE] [--no-pin]
//! ```
//!
//! Figures and their machine load: docs/security.md.

#[path = "../tests/kit/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refblk::bench::stats::Spread;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{Frontend, FrontendOptions};
use support::hostile::{back_to_initialising, HostileGuest, Misbehaviour, Outcome};
use support::{machine_dir, make_image, submit_rw, Rig, Rng, LONG, XVDA};

const B_DISK: u64 = 16 << 20;
const A_DISK: u64 = 4 << 20;
const QD: usize = 8;
const BOUND: f64 = 0.80;
const DOM_B: u16 = 10;
const DOM_A: u16 = 20;

struct Args {
    secs: f64,
    reps: usize,
    json: Option<String>,
    pin: bool,
}

fn args() -> Args {
    let mut a = Args {
        secs: 3.0,
        reps: 5,
        json: None,
        pin: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{k} needs a value (see bench/neighbour.rs)"))
        };
        match k.as_str() {
            "--secs" => a.secs = val().parse().expect("--secs: a number of seconds"),
            "--reps" => a.reps = val().parse().expect("--reps: a count"),
            "--json" => a.json = Some(val()),
            "--pin" => a.pin = true,
            "--no-pin" => a.pin = false,
            "-h" | "--help" => {
                println!(
                    "neighbour [--secs S] [--reps N] [--json FILE] [--no-pin]  (see bench/neighbour.rs)"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?} (see bench/neighbour.rs)"),
        }
    }
    a
}

/// B's workload for `secs`: random 4 KiB reads and writes at QD8, reads
/// verified against `model`. Returns IOPS.
fn run_b(fe: &mut Frontend, rng: &mut Rng, model: &mut [u8], secs: f64) -> f64 {
    let blocks = model.len() as u64 / 4096;
    let mut inflight: HashMap<u64, (u64, usize, bool)> = HashMap::new();
    let mut done = 0u64;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < end || !inflight.is_empty() {
        while Instant::now() < end && inflight.len() < QD {
            let s = rng.below(blocks) * 8;
            if inflight.values().any(|&(s2, _, _)| s2 == s) {
                continue;
            }
            let write = rng.below(2) == 0;
            submit_rw(fe, rng, None, s, 4096, write, model, &mut inflight);
        }
        for c in fe.wait(LONG).expect("B: completions") {
            let (s, len, is_read) = inflight.remove(&c.tag.0).expect("B: our completion");
            assert_eq!(c.status, 0, "B: request at sector {s} failed");
            if is_read {
                let off = (s * 512) as usize;
                assert!(
                    c.data == model[off..off + len],
                    "B: read at sector {s} does not match what B wrote"
                );
            }
            done += 1;
        }
    }
    done as f64 / t0.elapsed().as_secs_f64()
}

/// Pin the calling thread (and the threads it spawns later) to `cpu`.
fn pin_to(cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU number");
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .unwrap_or_else(|e| panic!("pin to CPU {cpu}: {e}"));
}

/// What guest A does while B is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    /// A is not connected.
    Alone,
    /// Reference: A is well-behaved and runs B's own workload flat out (what
    /// any busy neighbour costs B on this machine).
    Busy,
    /// Reference matched to the revocation scenario's bandwidth: A writes
    /// 24 x 64 KiB at a time, flat out, and revokes nothing.
    BusyLarge,
    Hostile(Misbehaviour),
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Alone => "B alone",
            Scenario::Busy => "(ref) A busy, well-behaved",
            Scenario::BusyLarge => "(ref) A 24x64K writes, no revoke",
            Scenario::Hostile(m) => m.name(),
        }
    }
}

/// Guest A's side of one run: connect, do `sc` until `stop`, leave the vbd
/// ready for the next connect.
fn guest_a(
    xs: &std::path::Path,
    guest: Arc<refblk_sim::SimGuest>,
    sc: Scenario,
    seed: u64,
    started: &AtomicBool,
    stop: &AtomicBool,
) -> Outcome {
    let mut h = HostileGuest::connect(xs, guest, XVDA, seed);
    started.store(true, Ordering::Release);
    let o = match sc {
        Scenario::Hostile(m) => h.run(m, &|| stop.load(Ordering::Acquire)),
        Scenario::Busy => {
            let fe = h.fe.as_mut().expect("connected");
            let mut model = fe.read(0, A_DISK as usize).expect("A: read its disk");
            let mut rng = Rng::new(seed);
            let mut o = Outcome::default();
            while !stop.load(Ordering::Acquire) {
                let iops = run_b(fe, &mut rng, &mut model, 0.1);
                o.rounds += 1;
                o.ok += (iops * 0.1) as u64;
            }
            o
        }
        Scenario::BusyLarge => {
            let fe = h.fe.as_mut().expect("connected");
            let data = vec![0x3cu8; 64 * 1024];
            let mut o = Outcome::default();
            while !stop.load(Ordering::Acquire) {
                let first = (o.rounds * 24 * 128) % (A_DISK / 512 - 24 * 128);
                let tags: Vec<_> = (0..24u64)
                    .map(|i| {
                        fe.submit(
                            None,
                            refblk_sim::frontend::IoRequest::Write {
                                sector: first + 128 * i,
                                data: &data,
                            },
                        )
                        .expect("A: submit")
                    })
                    .collect();
                for t in tags {
                    let c = fe.wait_for(t, LONG).expect("A: completion");
                    assert_eq!(c.status, 0, "A: a well-behaved write failed");
                    o.ok += 1;
                }
                o.rounds += 1;
            }
            o
        }
        Scenario::Alone => unreachable!("A does not run alone"),
    };
    let mut fe = h.fe.take().expect("frontend");
    let _ = fe.disconnect();
    back_to_initialising(&fe);
    o
}

fn main() {
    let mut a = args();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if a.pin && cpus < 2 {
        eprintln!("neighbour: {cpus} CPU: not pinning");
        a.pin = false;
    }
    if a.pin {
        // Before anything is spawned: the backend, the simulated Xen and B
        // inherit CPU 0.
        pin_to(0);
    }
    let Some(rig) = Rig::new() else {
        return;
    };
    let d = machine_dir();
    // B: connected once for the whole run.
    let b_img = make_image(d.path(), "b.img", B_DISK);
    let b_guest = rig.guest(DOM_B, 8192);
    rig.attach(DOM_B, XVDA, &b_img, "w", AttachOptions::default());
    let mut b = rig.connect(&b_guest, XVDA, FrontendOptions::default());
    let mut model = vec![0u8; B_DISK as usize];
    let mut rng = Rng::new(42);
    // A: its domain and vbd; it connects at the start of each scenario.
    let a_img = make_image(d.path(), "a.img", A_DISK);
    let a_guest = rig.guest(DOM_A, 8192);
    rig.attach(DOM_A, XVDA, &a_img, "w", AttachOptions::default());

    let scenarios: Vec<Scenario> = [Scenario::Alone, Scenario::Busy, Scenario::BusyLarge]
        .into_iter()
        .chain(Misbehaviour::ALL.iter().copied().map(Scenario::Hostile))
        .collect();
    let mut iops: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    eprintln!(
        "neighbour: B = 4 KiB random read/write QD{QD}, verified, {} s per run; {} reps; {}; load {}",
        a.secs,
        a.reps,
        placement(a.pin),
        loadavg()
    );
    // Warm-up (page cache, io_uring, allocator).
    run_b(&mut b, &mut rng, &mut model, 1.0);
    for rep in 0..a.reps {
        for (i, m) in scenarios.iter().enumerate() {
            let v = match *m {
                Scenario::Alone => run_b(&mut b, &mut rng, &mut model, a.secs),
                sc => {
                    let stop = Arc::new(AtomicBool::new(false));
                    let started = Arc::new(AtomicBool::new(false));
                    let (stop2, started2) = (stop.clone(), started.clone());
                    let xs = rig.sim.xenstored_path();
                    let ag = a_guest.clone();
                    let seed = 1000 + rep as u64 * 16 + i as u64;
                    let pin = a.pin;
                    let a_thread = std::thread::spawn(move || {
                        if pin {
                            pin_to(1);
                        }
                        guest_a(&xs, ag, sc, seed, &started2, &stop2)
                    });
                    while !started.load(Ordering::Acquire) && !a_thread.is_finished() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    // Let A get going before measuring.
                    std::thread::sleep(Duration::from_millis(200));
                    let v = run_b(&mut b, &mut rng, &mut model, a.secs);
                    stop.store(true, Ordering::Release);
                    let o = a_thread.join().expect("guest A's thread");
                    outcomes[i].push(o);
                    v
                }
            };
            eprintln!(
                "  rep {}: {:<33} B {:>8.0} IOPS{}",
                rep + 1,
                m.name(),
                v,
                outcomes[i]
                    .last()
                    .filter(|_| *m != Scenario::Alone)
                    .map(|o| format!("   A: {o}"))
                    .unwrap_or_default()
            );
            iops[i].push(v);
        }
    }
    // B's whole disk is what it wrote (through B, and in the image file).
    let mut off = 0usize;
    while off < model.len() {
        let got = b.read((off / 512) as u64, 1 << 20).expect("B: final read");
        assert!(
            got == model[off..off + (1 << 20)],
            "B: final read at byte {off} differs"
        );
        off += 1 << 20;
    }
    assert!(
        b.anomalies().is_clean(),
        "B saw protocol anomalies: {:?}",
        b.anomalies()
    );
    assert_eq!(rig.status(DOM_B, XVDA).errors, 0, "B's device had errors");
    b.disconnect().expect("B disconnects");
    assert!(
        std::fs::read(&b_img).unwrap() == model,
        "B's image file differs from what B wrote"
    );

    let alone = Spread::of(&iops[0]);
    let busy = Spread::of(&iops[1]);
    println!(
        "\nneighbour: guest B, 4 KiB random read/write QD{QD} (verified), {} s x {} reps; {}; load {} (after)",
        a.secs,
        a.reps,
        placement(a.pin),
        loadavg()
    );
    println!(
        "{:<33} {:>22} {:>8} {:>6} {:>7}  guest A's own device (over all reps)",
        "scenario", "B IOPS median (min-max)", "ratio", "≥0.80", "vs ref"
    );
    let mut failed = false;
    let mut rows = Vec::new();
    for (i, m) in scenarios.iter().enumerate() {
        let s = Spread::of(&iops[i]);
        let ratio = s.median / alone.median;
        let pass = ratio >= BOUND;
        let hostile = matches!(m, Scenario::Hostile(_));
        if hostile && !pass {
            failed = true;
        }
        let tot = outcomes[i].iter().fold(Outcome::default(), |t, o| Outcome {
            rounds: t.rounds + o.rounds,
            ok: t.ok + o.ok,
            errors: t.errors + o.errors,
            disconnected: t.disconnected + o.disconnected,
            connects: t.connects + o.connects,
        });
        let a_txt = match m {
            Scenario::Alone => "-".to_string(),
            Scenario::Busy => format!("~{} requests, all OKAY and verified", tot.ok),
            Scenario::BusyLarge => format!("{} rounds; {} writes, all OKAY", tot.rounds, tot.ok),
            Scenario::Hostile(_) => format!(
                "{} rounds; {} ok / {} error responses; disconnected {}x",
                tot.rounds, tot.ok, tot.errors, tot.disconnected
            ),
        };
        let verdict = match m {
            Scenario::Alone => "-",
            Scenario::Busy | Scenario::BusyLarge => "(ref)",
            _ if pass => "pass",
            _ => "FAIL",
        };
        println!(
            "{:<33} {:>8.0} ({:>5.0}-{:>5.0}) {:>8.2} {:>6} {:>7.2}  {}",
            m.name(),
            s.median,
            s.min,
            s.max,
            ratio,
            verdict,
            s.median / busy.median,
            a_txt
        );
        rows.push(serde_json::json!({
            "scenario": m.name(),
            "b_iops": iops[i],
            "b_iops_median": s.median,
            "b_iops_min": s.min,
            "b_iops_max": s.max,
            "ratio_to_alone": ratio,
            "ratio_to_busy_reference": s.median / busy.median,
            "pass": if hostile { serde_json::json!(pass) } else { serde_json::Value::Null },
            "guest_a": (*m != Scenario::Alone).then(|| serde_json::json!({
                "rounds": tot.rounds,
                "ok_responses": tot.ok,
                "error_responses": tot.errors,
                "disconnected_by_backend": tot.disconnected,
                "connects": tot.connects,
            })),
        }));
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "bench": "neighbour",
            "b_workload": {"bs": 4096, "qd": QD, "read_pct": 50, "disk_bytes": B_DISK, "verified": true},
            "secs_per_run": a.secs,
            "reps": a.reps,
            "bound": BOUND,
            "placement": placement(a.pin),
            "loadavg_after": loadavg(),
            "scenarios": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        println!("JSON: {path}");
    }
    drop(b);
    rig.shutdown();
    if failed {
        println!("FAIL: a misbehaving guest took B below {BOUND} of its throughput alone");
        std::process::exit(1);
    }
}

fn placement(pin: bool) -> &'static str {
    if pin {
        "backend+B on CPU 0, A's frontend on CPU 1"
    } else {
        "no pinning"
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
