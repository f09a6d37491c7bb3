//! `refblk demo` runs a simulated guest against refblk and says what it saw.

mod datapath_support;

use std::process::Command;

#[test]
fn demo_writes_reads_and_discards() {
    if !datapath_support::require_memlock_or_skip() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["demo", "--size", "32M", "--io", "4M"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run refblk demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "refblk demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "xvda connected: 32M",
        "wrote 4M at sector 0 and flushed (backend fdatasyncs: 1)",
        "read back 4M: identical",
        "discarded the first 2M: reads zeros",
        "0 errors",
        "backend stopped",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn demo_refuses_bad_sizes() {
    let out = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["demo", "--size", "8M", "--io", "16M"])
        .output()
        .expect("run refblk demo");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--io"));
}
