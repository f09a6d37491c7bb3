//! `refblk pool` / `refblk volume` from the outside: help everywhere, exit codes,
//! JSON output, concurrent processes, and real process kills (abort at step N via the
//! REFBLK_FAULT test hook) followed by recovery with the CLI.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::*;
use clap::CommandFactory;
use refblk_sim::scratchfs::FsKind;

fn refblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("REFBLK_FAULT")
        .env_remove("REFBLK_POOL")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = refblk(args);
    assert!(
        o.status.success(),
        "refblk {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str], code: i32) -> String {
    let o = refblk(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "refblk {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn clap_definition_is_valid_and_help_works_everywhere() {
    refblk::cli::Cli::command().debug_assert();
    ok(&["pool", "--help"]);
    ok(&["volume", "--help"]);
    for sub in ["init", "info", "check"] {
        let h = ok(&["pool", sub, "--help"]);
        assert!(h.contains("Exit codes"), "{sub}");
    }
    for sub in [
        "create",
        "import",
        "export",
        "clone",
        "resize",
        "start",
        "stop",
        "revert",
        "revisions",
        "info",
        "list",
        "remove",
        "config",
    ] {
        let h = ok(&["volume", sub, "--help"]);
        assert!(h.contains("--pool"), "volume {sub} --help lacks --pool");
    }
}

#[test]
fn cli_lifecycle_and_exit_codes() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let Some(ext) = scratch(FsKind::Ext4) else {
        return;
    };
    let e4 = ext.path().join("pool");
    let e = fails(&["pool", "init", e4.to_str().unwrap()], 8);
    assert!(e.contains("ext4") && e.contains("--no-setup-check"), "{e}");
    ok(&["pool", "init", "--no-setup-check", e4.to_str().unwrap()]);
    // a large (sparse) image copied without reflink reports progress on stderr
    let e4s = e4.to_str().unwrap();
    ok(&[
        "volume",
        "create",
        "-p",
        e4s,
        "appvms/big/private",
        "--size",
        "1M",
    ]);
    let big = ext.path().join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    for off in [0u64, 300 << 20, (1 << 30) - MIB] {
        write_at(&big, off, &pattern(off, MIB as usize));
    }
    let o = refblk(&[
        "volume",
        "import",
        "-p",
        e4s,
        "appvms/big/private",
        big.to_str().unwrap(),
        "--size", // import grows a volume only when asked
        "1G",
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refblk: copying") && err.contains("%"),
        "{err}"
    );
    assert!(err.contains("refblk: copied"), "{err}");
    let clean = e4.join("appvms/big/private.img");
    assert_eq!(std::fs::metadata(&clean).unwrap().len(), 1 << 30);
    assert!(blocks(&clean) * 512 < 16 * MIB, "sparse copy is not sparse");
    ok(&["volume", "remove", "-p", e4s, "appvms/big/private"]);
    std::fs::remove_file(&big).unwrap();

    let dir = fs.path().join("pool");
    let d = dir.to_str().unwrap();
    ok(&["pool", "init", d]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["pool", "info", d, "--json"])).unwrap();
    assert_eq!(info["fs_type"], "btrfs");
    assert_eq!(info["reflink"], true);
    ok(&[
        "volume",
        "create",
        "-p",
        d,
        "appvms/w/private",
        "--size",
        "2M",
    ]);
    fails(
        &[
            "volume",
            "create",
            "-p",
            d,
            "appvms/w/private",
            "--size",
            "2M",
        ],
        4,
    );
    fails(&["volume", "create", "-p", d, "../evil", "--size", "2M"], 2);
    fails(
        &["volume", "create", "-p", d, "appvms/w/x", "--size", "2Q"],
        2,
    );
    fails(&["volume", "start", "appvms/w/private"], 2); // no pool given
    let path = ok(&["volume", "start", "-p", d, "appvms/w/private"]);
    let path = Path::new(path.trim());
    assert_eq!(path, dir.join("appvms/w/private-dirty.img"));
    let e = fails(&["volume", "start", "-p", d, "appvms/w/private"], 5);
    assert!(e.contains("already running"), "{e}");
    fails(&["volume", "revert", "-p", d, "appvms/w/private"], 5);
    write_at(path, 0, &pattern(1, 8192));
    assert!(ok(&["volume", "stop", "-p", d, "appvms/w/private"]).contains("committed"));
    let revs: serde_json::Value = serde_json::from_str(&ok(&[
        "volume",
        "revisions",
        "-p",
        d,
        "appvms/w/private",
        "--json",
    ]))
    .unwrap();
    assert_eq!(revs.as_array().unwrap().len(), 1);
    assert_eq!(revs[0]["revision"], "1");
    let e = fails(&["volume", "revert", "-p", d, "appvms/w/private", "42"], 3);
    assert!(e.contains("42"), "{e}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["volume", "list", "-p", d, "--json"])).unwrap();
    assert_eq!(list[0]["vid"], "appvms/w/private");
    assert_eq!(list[0]["state"], "stopped");
    assert_eq!(list[0]["size"], 2 * MIB);
    // export to a file and to stdout, import from stdin
    let out = fs.path().join("out.img");
    ok(&[
        "volume",
        "export",
        "-p",
        d,
        "appvms/w/private",
        out.to_str().unwrap(),
    ]);
    assert_eq!(read(&out)[..8192], pattern(1, 8192)[..]);
    let o = Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["volume", "export", "-p", d, "appvms/w/private", "-"])
        .output()
        .unwrap();
    assert_eq!(o.stdout, read(&out));
    let mut child = Command::new(env!("CARGO_BIN_EXE_refblk"))
        // (3 MiB into a 2 MiB volume: the size grows only when asked)
        .args([
            "volume",
            "import",
            "-p",
            d,
            "appvms/w/private",
            "-",
            "--size",
            "3M",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&pattern(2, 3 * MIB as usize))
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(
        read(&dir.join("appvms/w/private.img")),
        pattern(2, 3 * MIB as usize)
    );
    // clone across pools (btrfs -> ext4: sparse copy)
    ok(&[
        "volume",
        "clone",
        "-p",
        e4.to_str().unwrap(),
        "--src-pool",
        d,
        "appvms/w/private",
        "appvms/copy/private",
    ]);
    assert_eq!(
        read(&e4.join("appvms/copy/private.img")),
        pattern(2, 3 * MIB as usize)
    );
    // resize: grow, refuse shrink
    ok(&["volume", "resize", "-p", d, "appvms/w/private", "4M"]);
    fails(&["volume", "resize", "-p", d, "appvms/w/private", "1M"], 2);
    // wrong kind
    ok(&[
        "volume",
        "create",
        "-p",
        d,
        "appvms/w/volatile",
        "--size",
        "1M",
        "--kind",
        "volatile",
    ]);
    fails(&["volume", "revert", "-p", d, "appvms/w/volatile"], 6);
    // check: a leftover temp file is found (exit 9), repaired, then clean
    std::fs::write(dir.join("appvms/w/private.img~abcdefgh"), b"junk").unwrap();
    let o = refblk(&["pool", "check", d]);
    assert_eq!(o.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&o.stdout).contains("private.img~abcdefgh"));
    ok(&["pool", "check", d, "--repair"]);
    ok(&["pool", "check", d]);
    // remove
    ok(&["volume", "remove", "-p", d, "appvms/w/private"]);
    fails(&["volume", "info", "-p", d, "appvms/w/private"], 3);
}

#[test]
fn concurrent_processes_one_start_wins() {
    let Some(fs) = scratch(FsKind::Xfs) else {
        return;
    };
    let dir = fs.path().join("pool");
    let d = dir.to_str().unwrap();
    ok(&["pool", "init", d]);
    ok(&[
        "volume",
        "create",
        "-p",
        d,
        "appvms/w/private",
        "--size",
        "1M",
    ]);
    let children: Vec<_> = (0..5)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_refblk"))
                .args(["volume", "start", "-p", d, "appvms/w/private"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 5).count(), 4, "{codes:?}");
}

/// Kill `refblk volume stop` (a commit) at every step with abort(); recover with the
/// CLI; the committed data is the old or the new version, never anything else.
#[test]
fn killed_commit_recovers_at_every_step() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let dir = fs.path().join("pool");
    let d = dir.to_str().unwrap();
    ok(&["pool", "init", d, "--revisions-to-keep", "2"]);
    let old = pattern(1, 64 * 1024);
    let new = pattern(2, 64 * 1024);
    let mut n = 1;
    loop {
        let vid = format!("appvms/k{n}/private");
        ok(&["volume", "create", "-p", d, &vid, "--size", "1M"]);
        let p = ok(&["volume", "start", "-p", d, &vid]);
        write_at(Path::new(p.trim()), 0, &old);
        ok(&["volume", "stop", "-p", d, &vid]);
        let p = ok(&["volume", "start", "-p", d, &vid]);
        write_at(Path::new(p.trim()), 0, &new);
        let o = Command::new(env!("CARGO_BIN_EXE_refblk"))
            .args(["volume", "stop", "-p", d, &vid])
            .env("REFBLK_FAULT", format!("abort:{n}"))
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let clean = dir.join(format!("appvms/k{n}/private.img"));
        let legit = |c: &[u8]| c[..old.len()] == old[..] || c[..new.len()] == new[..];
        if o.status.success() {
            assert!(n > 3, "stop finished before any step was aborted");
            assert_eq!(read(&clean)[..new.len()], new[..]);
            break;
        }
        assert_eq!(o.status.code(), None, "step {n}: not killed by a signal");
        assert!(legit(&read(&clean)), "step {n}: committed data damaged");
        // recovery: repair, finish the stop, start and stop again
        let _ = refblk(&["pool", "check", d, "--repair"]);
        ok(&["volume", "stop", "-p", d, &vid]);
        ok(&["volume", "start", "-p", d, &vid]);
        ok(&["volume", "stop", "-p", d, &vid]);
        assert!(legit(&read(&clean)), "step {n}: recovered data damaged");
        assert!(temps(&dir).is_empty(), "step {n}: {:?}", temps(&dir));
        ok(&["pool", "check", d]);
        n += 1;
        assert!(n < 100, "stop never completed");
    }
}
