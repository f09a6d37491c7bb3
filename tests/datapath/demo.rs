//! `refblk demo` runs the whole simulated path and says what it did.

use std::process::Command;

#[test]
fn demo_writes_discards_and_reads_through_refblk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["demo", "--size", "32M", "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "wrote and read back /local/domain/5/name = \"demo-guest\"",
        "guest blkfront:  connected: 65536 sectors of 512 bytes",
        "every page matches what was written",
        "range reads back as zeros",
        "0 errors, 1 fdatasync(s)",
        "protocol anomalies seen by the guest: none",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}
