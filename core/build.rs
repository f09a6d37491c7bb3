//! Names the git commit the binary is built from (`refblk --version`):
//! `REFBLK_GIT_COMMIT` is the short hash from `git rev-parse`, or `unknown`
//! outside a git checkout (a source tarball, a package built from an exported
//! tree). No `-dirty` mark: finding it would mean `git status`, which may
//! rewrite the index and so re-run this script on every build.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=REFBLK_GIT_COMMIT={commit}");
    // Re-run when HEAD moves (a commit, a checkout, a reset).
    for what in ["HEAD", "logs/HEAD"] {
        // (A missing file would make cargo re-run this script every build.)
        if let Some(p) =
            git(&["rev-parse", "--git-path", what]).filter(|p| std::path::Path::new(p).exists())
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
