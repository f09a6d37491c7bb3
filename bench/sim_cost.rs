//! CPU cost of the `refblk` bench path's simulated guest (blkfront + the simulated
//! Xen's grant table and event channels), per I/O, next to the backend's serving CPU.
//!
//! On real Xen the guest runs on its own vCPUs and the grant copy is the
//! hypervisor's; in `refblk bench` the simulated guest shares the machine with the
//! backend, so what it costs distorts the refblk ÷ file ratio. This example measures
//! it without timing anything: CPU time per operation from
//! `/proc/self/task/*/schedstat` (the generator's thread = the guest; the backend's
//! queue threads and io-wq = serving; every thread = process).
//!
//! `cargo run --release --example sim_cost [-- --runs N --runtime-ms N --dir DIR
//! --profiles a,b]` (defaults: 5 runs of 1000 ms, /dev/shm,
//! rnd4k_q32t1_read,rnd4k_q32t1_write,rnd4k_q1t1_read,seq1m_q8t1_read). Prints the
//! median of the runs.

use std::path::PathBuf;
use std::time::Duration;

use refblk::bench::profile::{self, Kind};
use refblk::bench::refblk::connect_with;
use refblk::bench::stats::{task_cpu_ns, thread_cpu_ns, threads_named, Spread};
use refblk::bench::{workload, write_dense};

const SIZE: u64 = 256 << 20;

fn process_cpu_ns() -> u64 {
    threads_named("")
        .into_iter()
        .filter_map(|(t, _)| task_cpu_ns(t))
        .sum()
}

fn main() {
    let mut runs = 5usize;
    let mut runtime_ms = 1000u64;
    let mut dir = PathBuf::from("/dev/shm");
    let mut profiles =
        "rnd4k_q32t1_read,rnd4k_q32t1_write,rnd4k_q1t1_read,seq1m_q8t1_read".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = val().parse().expect("--runs N"),
            "--runtime-ms" => runtime_ms = val().parse().expect("--runtime-ms N"),
            "--dir" => dir = PathBuf::from(val()),
            "--profiles" => profiles = val(),
            other => panic!("unknown option {other}"),
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("refblk-sim-cost.")
        .tempdir_in(&dir)
        .unwrap();
    let image = tmp.path().join("image");
    write_dense(&image, SIZE).unwrap();
    println!("| profile | IOPS | guest CPU µs/IO | serving CPU µs/IO | process CPU µs/IO |");
    println!("|---|---|---|---|---|");
    for p in profile::parse_profiles(&profiles).expect("--profiles") {
        let Kind::Io(spec, _) = p.kind else {
            panic!("{} is not an I/O profile", p.name)
        };
        let (mut iops, mut guest, mut serving, mut process) = (vec![], vec![], vec![], vec![]);
        for rep in 0..runs {
            let mut t =
                connect_with(&image, tmp.path(), spec.qd as usize, spec.bs as usize).unwrap();
            let (g0, p0) = (thread_cpu_ns(), process_cpu_ns());
            let r = workload::run(
                &mut t,
                &spec,
                SIZE,
                Duration::from_millis(runtime_ms),
                rep as u64,
            )
            .unwrap();
            let (g1, p1) = (thread_cpu_ns(), process_cpu_ns());
            let per = |ns: u64| ns as f64 / 1000.0 / r.ops.max(1) as f64;
            iops.push(r.iops());
            guest.push(per(g1 - g0));
            serving.push(r.cpu_us_per_io());
            process.push(per(p1.saturating_sub(p0)));
        }
        let m = |v: &[f64]| Spread::of(v);
        let f = |s: Spread| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max);
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            p.name,
            m(&iops).median,
            f(m(&guest)),
            f(m(&serving)),
            f(m(&process))
        );
    }
}
