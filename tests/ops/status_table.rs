//! `refblk status`'s table (issue 20): its lines fit 80 columns whatever the
//! domain names, limits and image paths, and its ERR column counts the
//! requests a device answered with an error status.

use std::process::{Command, Output};
use std::time::Duration;

use crate::kit::*;
use refblk_core::backend::control::ControlServer;
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{FrontendOptions, IoRequest};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

fn refblk(args: &[&str]) -> Output {
    // stdout is a pipe: no terminal, so the table is 80 columns wide.
    Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("COLUMNS")
        .output()
        .expect("run refblk")
}

/// The value in `row` under `col` of `header` (whitespace-separated cells;
/// this test's cells hold no spaces).
fn cell<'a>(header: &str, row: &'a str, col: &str) -> &'a str {
    let i = header
        .split_whitespace()
        .position(|h| h == col)
        .unwrap_or_else(|| panic!("no column {col} in {header:?}"));
    row.split_whitespace()
        .nth(i)
        .unwrap_or_else(|| panic!("no cell {i} in {row:?}"))
}

#[test]
fn the_table_fits_80_columns_and_counts_errors() {
    let Some(rig) = Rig::new() else { return };
    // A long path, a long domain name and every limit set: the widest row.
    let deep = rig
        .dir
        .path()
        .join("a-directory-with-a-long-name/and-another-one-below-it");
    std::fs::create_dir_all(&deep).unwrap();
    let bad_image = make_image(&deep, "the-guest-that-reads-past-its-end.img", 16 * MIB);
    let good_image = make_image(rig.dir.path(), "quiet.img", 16 * MIB);
    let long_name = "a-domain-whose-name-is-longer-than-any-column";
    let bad = rig.guest(9, 16384);
    let good = rig.guest(10, 16384);
    rig.ts
        .xs()
        .write(0, "/local/domain/9/name", long_name.as_bytes())
        .unwrap();
    rig.ts
        .xs()
        .write(0, "/local/domain/10/name", b"quiet")
        .unwrap();
    let _vbd9 = rig.attach(9, XVDA, &bad_image, "w", AttachOptions::default());
    let _vbd10 = rig.attach(10, XVDA, &good_image, "w", AttachOptions::default());
    let mut fe9 = rig.connect(&bad, XVDA, FrontendOptions::default());
    let mut fe10 = rig.connect(&good, XVDA, FrontendOptions::default());
    fe10.write(0, &vec![1u8; 64 << 10]).unwrap();
    fe9.write(0, &vec![2u8; 64 << 10]).unwrap();
    // Three reads past the end of the disk: each answered with an error.
    for i in 0..3u64 {
        let t = fe9
            .submit(
                Some(0),
                IoRequest::Read {
                    sector: 16 * MIB / 512 + i * 8,
                    len: 4096,
                },
            )
            .unwrap();
        assert_ne!(fe9.wait_for(t, T).unwrap().status, 0, "read past the end");
    }
    let sock = rig.dir.path().join("ctl.sock");
    let _ctl = ControlServer::spawn(&sock, rig.backend.clone()).expect("control socket");
    let s = sock.to_str().unwrap();
    for (target, args) in [
        ("9/xvda", ["--iops", "123456", "--bps", "999M"]),
        ("9", ["--iops", "654321", "--bps", "777K"]),
    ] {
        let o = refblk(&[&["limit", "--control", s, target][..], &args[..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let o = refblk(&["status", "--control", s, "--interval", "0.2"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for l in out.lines() {
        assert!(
            l.chars().count() <= 80,
            "a line of {} columns:\n{l}\nin\n{out}",
            l.chars().count()
        );
    }
    let header = out.lines().find(|l| l.starts_with("DOMAIN")).expect(&out);
    for col in [
        "VDEV", "STATE", "IOPS", "MiB/s", "P50", "P99", "QD", "ERR", "LIMIT",
    ] {
        assert!(header.split_whitespace().any(|h| h == col), "{header}");
    }
    let row9 = out.lines().find(|l| l.starts_with("a-domain")).expect(&out);
    let row10 = out.lines().find(|l| l.starts_with("quiet")).expect(&out);
    assert_eq!(cell(header, row9, "ERR"), "3", "{out}");
    assert_eq!(cell(header, row10, "ERR"), "0", "{out}");
    assert_eq!(cell(header, row9, "STATE"), "Connected", "{out}");
    assert!(
        out.lines().next().unwrap().contains("  3 errors  "),
        "{out}"
    );

    // --wide: everything in full.
    let o = refblk(&["status", "--control", s, "--interval", "0.1", "--wide"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let row9 = out.lines().find(|l| l.starts_with(long_name)).expect(&out);
    assert!(row9.ends_with(bad_image.to_str().unwrap()), "{out}");
    assert!(
        row9.contains("r123456/s,w123456/s,r999MiB/s,w999MiB/s+r654321/s"),
        "{out}"
    );
    // A wider terminal (--width) shows the images, cut from the left.
    let o = refblk(&[
        "status",
        "--control",
        s,
        "--interval",
        "0.1",
        "--width",
        "132",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.lines().all(|l| l.chars().count() <= 132), "{out}");
    let row10 = out.lines().find(|l| l.starts_with("quiet")).expect(&out);
    assert!(row10.ends_with("quiet.img"), "{out}");

    fe9.disconnect().unwrap();
    fe10.disconnect().unwrap();
    rig.shutdown();
}
