//! The Debian package (issue 20): `scripts/build-deb` builds a .deb from the
//! repository (with this test's binary, so no second cargo build) that holds
//! the binary, the hotplug script, the unit, /etc/default/refblk as a
//! conffile, the blkback blacklist as an inactive file, generated man pages
//! and completions, and the docs; `lintian` finds no error in it; `refblk
//! --version` names the git commit.

use std::path::Path;
use std::process::Command;

use refblk_sim::scratchfs::{have_tool, skip_or_fail};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn version_names_the_commit() {
    let v = run(Command::new(env!("CARGO_BIN_EXE_refblk")).arg("--version"));
    let v = v.trim();
    let commit = v
        .strip_prefix(&format!("refblk {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{v}"));
    let in_git = Command::new("git")
        .args(["-C", REPO, "rev-parse", "HEAD"])
        .output()
        .is_ok_and(|o| o.status.success());
    if in_git {
        assert!(
            commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{v}"
        );
    } else {
        assert_eq!(commit, "unknown");
    }
}

#[test]
fn the_deb_builds_holds_what_an_admin_needs_and_passes_lintian() {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "strip", "lintian"] {
        if !have_tool(tool)
            && !skip_or_fail(&format!(
                "{tool} is not installed (Debian: dpkg-dev, binutils, lintian)"
            ))
        {
            return;
        }
    }
    let out = tempfile::tempdir().unwrap();
    let deb = run(Command::new(Path::new(REPO).join("scripts/build-deb"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_refblk"))
        .arg("--out")
        .arg(out.path()));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb") && Path::new(deb).exists(), "{deb}");

    let list = run(Command::new("dpkg-deb").args(["-c", deb]));
    let files: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for want in [
        "./usr/bin/refblk",
        "./etc/xen/scripts/block-refblk",
        "./lib/systemd/system/refblk.service",
        "./etc/default/refblk",
        "./usr/share/refblk/blacklist-xen-blkback.conf",
        "./usr/share/man/man1/refblk.1.gz",
        "./usr/share/man/man1/refblk-serve.1.gz",
        "./usr/share/man/man1/refblk-volume-create.1.gz",
        "./usr/share/bash-completion/completions/refblk",
        "./usr/share/zsh/vendor-completions/_refblk",
        "./usr/share/fish/vendor_completions.d/refblk.fish",
        "./usr/share/doc/refblk/copyright",
        "./usr/share/doc/refblk/changelog.gz",
        "./usr/share/doc/refblk/xen.md",
        "./usr/share/doc/refblk/restart.md",
        "./usr/share/doc/refblk/operations.md",
    ] {
        assert!(
            files.contains(&want),
            "{want} missing from the package:\n{list}"
        );
    }
    // The blacklist is never active by surprise.
    assert!(
        !files.iter().any(|f| f.starts_with("./etc/modprobe.d/")),
        "{list}"
    );
    let conffiles = run(Command::new("dpkg-deb").args(["-I", deb, "conffiles"]));
    let conffiles: Vec<&str> = conffiles.lines().collect();
    assert!(conffiles.contains(&"/etc/default/refblk"), "{conffiles:?}");
    assert!(
        conffiles.contains(&"/etc/xen/scripts/block-refblk"),
        "{conffiles:?}"
    );
    // The unit's Documentation= entries are installed.
    let unit = std::fs::read_to_string(Path::new(REPO).join("scripts/refblk.service")).unwrap();
    for d in unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
    {
        let path = if let Some(p) = d.strip_prefix("file:") {
            format!(".{p}")
        } else if let Some(m) = d.strip_prefix("man:") {
            let (page, _) = m.split_once('(').unwrap();
            format!("./usr/share/man/man1/{page}.1.gz")
        } else {
            panic!("{d}")
        };
        assert!(
            files.contains(&path.as_str()),
            "Documentation={d} not installed"
        );
    }

    // lintian: no errors (warnings and notes are printed, not failed on).
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit", deb])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("lintian:\n{text}");
    assert!(out.status.success(), "lintian: {text}");
    assert!(!text.lines().any(|l| l.starts_with("E:")), "{text}");
}
