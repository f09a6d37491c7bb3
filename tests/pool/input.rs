//! Bad input to `refblk pool` / `refblk volume` (issue 19, "Input"): each is
//! refused with the exit code docs/pool.md documents and a message that says
//! what is wrong, and leaves the pool byte-identical — no phantom volume, no
//! half-created directory, no lock file. Results go to stdout once.

use std::path::Path;

use crate::common::*;
use refblk_sim::scratchfs::FsKind;

thread_local! {
    /// This test's misses (each test runs on its own thread).
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `args` exits `code`, its message contains `want`, prints nothing on stdout,
/// and `dir` is unchanged. A miss is recorded (all are reported at the end, so
/// one run shows every input that is not refused).
fn refused(dir: &Path, args: &[&str], code: i32, want: &str) {
    let before = listing(dir);
    let o = refblk(args);
    let t = text(&o);
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    let mut bad = Vec::new();
    if o.status.code() != Some(code) {
        bad.push(format!("exit {:?}, not {code}", o.status.code()));
    }
    if !msg.contains(want) {
        bad.push(format!("no {want:?} in the message"));
    }
    if !o.stdout.is_empty() {
        bad.push("a result on stdout".to_string());
    }
    let after = listing(dir);
    if after != before {
        let added: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
        let gone: Vec<_> = before.iter().filter(|l| !after.contains(l)).collect();
        bad.push(format!("the pool changed: +{added:?} -{gone:?}"));
        // a changed pool cannot be put back for the next case: stop here
        let miss = format!("{args:?}: {}: {t}", bad.join("; "));
        FAILURES.with(|f| f.borrow_mut().push(miss));
        panic!("{:#?}", FAILURES.with(|f| f.borrow().clone()));
    }
    if bad.is_empty() {
        eprintln!("bad input {args:?} -> exit {code}: {}", msg.trim());
    } else {
        let miss = format!("{args:?}: {}: {t}", bad.join("; "));
        FAILURES.with(|f| f.borrow_mut().push(miss));
    }
}

fn no_failures() {
    let f = FAILURES.with(|f| f.borrow().clone());
    assert!(
        f.is_empty(),
        "{} bad input(s) not refused properly:\n{}",
        f.len(),
        f.join("\n")
    );
}

fn bad_input(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let pool = fs.path().join("pool");
    let d = pool.to_str().unwrap();
    ok(&["pool", "init", d]);
    let v = "appvms/w/private";
    // a result goes to stdout once, nothing on stderr
    let o = refblk(&["volume", "create", "-p", d, v, "--size", "4M"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("created")
            .count(),
        1,
        "{}",
        text(&o)
    );
    assert!(o.stderr.is_empty(), "result also on stderr: {}", text(&o));
    ok(&["volume", "start", "-p", d, v]);
    ok(&["volume", "stop", "-p", d, v]);

    // sizes
    let t = "appvms/t/private";
    refused(
        &pool,
        &["volume", "create", "-p", d, t, "--size", "0"],
        2,
        "cannot be empty",
    );
    for s in ["100", "1000", "4097"] {
        refused(
            &pool,
            &["volume", "create", "-p", d, t, "--size", s],
            2,
            "512-byte sectors",
        );
    }
    refused(
        &pool,
        &["volume", "create", "-p", d, t, "--size", "8E"],
        2,
        "largest file size",
    );
    refused(
        &pool,
        &["volume", "create", "-p", d, t, "--size", "16E"],
        2,
        "does not fit",
    );
    refused(
        &pool,
        &["volume", "create", "-p", d, t, "--size", "-1"],
        2,
        "size",
    );
    refused(
        &pool,
        &["volume", "create", "-p", d, t, "--size", "1.5G"],
        2,
        "size",
    );
    refused(
        &pool,
        &["volume", "resize", "-p", d, v, "1000"],
        2,
        "512-byte sectors",
    );
    refused(
        &pool,
        &["volume", "resize", "-p", d, v, "0"],
        2,
        "cannot be empty",
    );
    refused(
        &pool,
        &["volume", "resize", "-p", d, v, "8E"],
        2,
        "largest file size",
    );
    refused(
        &pool,
        &["volume", "resize", "-p", d, v, "1M"],
        2,
        "--allow-shrink",
    );
    refused(
        &pool,
        &[
            "volume",
            "create",
            "-p",
            d,
            t,
            "--size",
            "1M",
            "--kind",
            "volatile",
            "--revisions-to-keep",
            "x",
        ],
        2,
        "invalid value",
    );

    // clone onto itself
    refused(&pool, &["volume", "clone", "-p", d, v, v], 2, "onto itself");

    // not found: exit 3, no phantom, no lock file, no directory
    let n = "appvms/typo/private";
    for args in [
        vec!["volume", "stop", "-p", d, n],
        vec!["volume", "stop", "-p", d, n, "--discard"],
        vec!["volume", "start", "-p", d, n],
        vec!["volume", "revert", "-p", d, n],
        vec!["volume", "resize", "-p", d, n, "8M"],
        vec!["volume", "remove", "-p", d, n],
        vec!["volume", "config", "-p", d, n],
        vec!["volume", "config", "-p", d, n, "--revisions-to-keep", "3"],
        vec!["volume", "config", "-p", d, n, "--kind", "volatile"],
        vec!["volume", "info", "-p", d, n],
        vec!["volume", "revisions", "-p", d, n],
        vec!["volume", "export", "-p", d, n],
        vec!["volume", "clone", "-p", d, n, "appvms/c/private"],
    ] {
        refused(&pool, &args, 3, "appvms/typo/private");
    }
    let list = ok(&["volume", "list", "-p", d]);
    assert!(!list.contains("typo"), "{list}");
    ok(&["pool", "check", d]);

    // import never changes the size unless asked
    let small = fs.path().join("small.img");
    std::fs::write(&small, pattern(3, MIB as usize)).unwrap();
    ok(&["volume", "import", "-p", d, v, small.to_str().unwrap()]);
    let clean = pool.join(format!("{v}.img"));
    assert_eq!(
        std::fs::metadata(&clean).unwrap().len(),
        4 * MIB,
        "import shrank the volume"
    );
    assert_eq!(
        read(&clean),
        image_with(4 * MIB, 0, &pattern(3, MIB as usize))
    );
    let big = fs.path().join("big.img");
    std::fs::write(&big, pattern(4, 5 * MIB as usize)).unwrap();
    refused(
        &pool,
        &["volume", "import", "-p", d, v, big.to_str().unwrap()],
        2,
        "--size",
    );
    refused(
        &pool,
        &[
            "volume",
            "import",
            "-p",
            d,
            v,
            small.to_str().unwrap(),
            "--size",
            "2M",
        ],
        2,
        "--allow-shrink",
    );
    refused(
        &pool,
        &[
            "volume",
            "import",
            "-p",
            d,
            v,
            small.to_str().unwrap(),
            "--size",
            "1000",
        ],
        2,
        "512-byte sectors",
    );
    refused(
        &pool,
        &["volume", "import", "-p", d, v, "/nonexistent/file.img"],
        3,
        "/nonexistent/file.img",
    );
    refused(
        &pool,
        &["volume", "import", "-p", d, n, small.to_str().unwrap()],
        3,
        "does not exist",
    );
    ok(&[
        "volume",
        "import",
        "-p",
        d,
        v,
        big.to_str().unwrap(),
        "--size",
        "5M",
    ]);
    assert_eq!(std::fs::metadata(&clean).unwrap().len(), 5 * MIB);
    ok(&[
        "volume",
        "import",
        "-p",
        d,
        v,
        small.to_str().unwrap(),
        "--size",
        "1M",
        "--allow-shrink",
    ]);
    assert_eq!(std::fs::metadata(&clean).unwrap().len(), MIB);

    // export does not create directories
    let missing = fs.path().join("no/such/dir/out.img");
    refused(
        &pool,
        &["volume", "export", "-p", d, v, missing.to_str().unwrap()],
        3,
        "does not exist",
    );
    assert!(!fs.path().join("no").exists(), "export created a directory");
    no_failures();
}

#[test]
fn bad_input_is_refused_on_btrfs() {
    bad_input(FsKind::Btrfs);
}

#[test]
fn bad_input_is_refused_on_xfs() {
    bad_input(FsKind::Xfs);
}

/// A refused `pool init` (no reflinks on tmpfs) removes every directory it
/// made, parents included; `bench --dir` of a missing directory creates none.
#[test]
fn refusals_leave_no_directories() {
    let base = tempfile::Builder::new()
        .prefix("refblk-input")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    if refblk_core::pool::reflink_supported(base.path()).unwrap_or(false) {
        eprintln!(
            "{} can reflink; the init refusal is not exercised",
            base.path().display()
        );
    } else {
        let p = base.path().join("a/b/pool");
        let o = refblk(&["pool", "init", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(8), "{}", text(&o));
        assert!(
            !base.path().join("a").exists(),
            "pool init left its parents"
        );
    }
    let b = base.path().join("nodir");
    let o = refblk(&["bench", "--dir", b.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!b.exists(), "bench --dir created {}", b.display());
}

/// `pool check` without --repair writes nothing, not even lock files (a pool laid
/// out by hand or by Qubes has none); --repair says what it did.
#[test]
fn check_without_repair_writes_nothing() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let pool = fs.path().join("pool");
    let d = pool.to_str().unwrap();
    ok(&["pool", "init", d]);
    // a volume laid out by hand: images only, no sidecar, no lock file
    std::fs::create_dir_all(pool.join("appvms/q")).unwrap();
    std::fs::write(pool.join("appvms/q/private.img"), vec![1u8; 8192]).unwrap();
    std::fs::write(pool.join("appvms/q/private.img~abcdefgh"), b"junk").unwrap();
    std::fs::write(pool.join("appvms/q/root-dirty.img"), vec![2u8; 8192]).unwrap();
    let before = listing(&pool);
    let o = refblk(&["pool", "check", d]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o));
    assert!(text(&o).contains("private.img~abcdefgh"), "{}", text(&o));
    assert_eq!(
        listing(&pool),
        before,
        "report-only check wrote into the pool"
    );
    let o = refblk(&["pool", "check", d, "--json"]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o));
    assert_eq!(
        listing(&pool),
        before,
        "report-only check wrote into the pool"
    );
    let o = refblk(&["pool", "check", d, "--repair"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("repaired: appvms/q/private: leftover temporary file"),
        "{}",
        text(&o)
    );
    assert!(!pool.join("appvms/q/private.img~abcdefgh").exists());
}
