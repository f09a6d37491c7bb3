//! The benchmark's instrument against fio, without timing: for a profile and a
//! fixed number of operations, our workload generator (the `file` path behind every
//! `refblk bench` ratio) and fio with the same parameters issue the same
//! operations — the same count of reads and writes, the same sizes, offsets in the
//! same range (for sequential profiles the same offsets in the same order), and the
//! same queue depth reached. Ours come from the counters the generator keeps
//! (`refblk::bench::workload::IoCounts`), fio's from its I/O log
//! (`--write_iolog`) and its JSON summary (`total_ios`, `io_bytes`,
//! `iodepth_level`); `refblk::bench::fio::mismatches` lists what differs.
//!
//! Nothing here depends on how fast either side runs: these can fail only if the
//! generator issues something other than the profile (or fio changes its meaning of
//! a parameter). How fast the two are side by side is what `refblk bench` reports
//! in its calibration table (docs/benchmarks.md).
//!
//! On tmpfs (/dev/shm): small, and no disk in the way.

use std::fs::File;
use std::path::Path;

use refblk::bench::fio::{issued, mismatches, run_ours};
use refblk::bench::profile::{parse_profiles, Kind, Prep};
use refblk::bench::workload::{Pattern, Stop};
use refblk::bench::write_dense;
use refblk_sim::scratchfs::{have_tool, skip_or_fail};

const SIZE: u64 = 64 << 20;

/// Operations per run: enough to wrap the 64 one-MiB blocks three times, and for the
/// random profiles' offsets to spread over the region (see `mismatches`).
fn ops_for(bs: u32, pattern: Pattern) -> u64 {
    match (pattern, bs) {
        // Each block once: the whole region.
        (Pattern::RandUnique, _) => SIZE / u64::from(bs),
        (_, bs) if bs >= 1 << 20 => 200,
        _ => 2000,
    }
}

#[test]
fn our_generator_and_fio_issue_the_same_operations() {
    if !have_tool("fio") && !skip_or_fail("fio is not installed (scripts/test installs it)") {
        return;
    }
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "/dev/shm (tmpfs) is needed for the fio comparison"
    );
    let dir = tempfile::Builder::new()
        .prefix("refblk-test-fio.")
        .tempdir_in(shm)
        .unwrap();
    let dense = dir.path().join("image");
    write_dense(&dense, SIZE).unwrap();
    let profiles =
        parse_profiles("seq1m_q8t1_read,seq1m_q1t1_write,rnd4k_q32t1_read,rnd4k_q1t1_write,alloc")
            .unwrap();
    let mut failed = Vec::new();
    for p in profiles {
        let Kind::Io(spec, prep) = p.kind else {
            panic!("{} is not an I/O profile", p.name)
        };
        // A sparse image for `alloc`, as `refblk bench` gives it; the dense one else.
        let image = |side: &str| {
            if prep == Prep::Sparse {
                let f = dir.path().join(format!("{}.{side}", p.name));
                File::create(&f).unwrap().set_len(SIZE).unwrap();
                f
            } else {
                dense.clone()
            }
        };
        let n = ops_for(spec.bs, spec.pattern);
        let (ours, direct) = run_ours(&image("ours"), &spec, SIZE, Stop::Ops(n), 7).unwrap();
        let fio = issued(&image("fio"), &spec, SIZE, n, direct).unwrap();
        println!(
            "{}: {n} operations, O_DIRECT {direct}\n  ours {:?}\n  fio  {:?}, iodepth_level {:?}",
            p.name, ours.issued, fio.counts, fio.depth_levels
        );
        assert_eq!(
            ours.issued.ops(),
            n,
            "{}: ours issued a different count than asked",
            p.name
        );
        assert_eq!(ours.ops, n, "{}: ours completed a different count", p.name);
        let m = mismatches(&spec, SIZE, &ours.issued, &fio);
        if !m.is_empty() {
            failed.push(format!("{}:\n    {}", p.name, m.join("\n    ")));
        }
    }
    assert!(
        failed.is_empty(),
        "our generator and fio issued different operations:\n  {}",
        failed.join("\n  ")
    );
}
