//! The layout's rules (README, "Layout"), checked from the source:
//! - the workspace's crates depend on each other one way only:
//!   xen-sys <- refblk-core <- refblk-sim <- refblk;
//! - inside each crate, the top-level modules import each other without
//!   cycles, and refblk-core's follow the layer order its lib.rs lists;
//! - in the `refblk` crate only the bench and the `demo`, `sim`, `sim-guest`
//!   and `bench` subcommands name the simulator (`refblk_sim`), so `serve`,
//!   the pool commands and `ctl` run nothing of it.
//!
//! An import is any path `crate::m` (also inside `use crate::{m, ...}`) or
//! `super::...::m` that resolves to another top-level module, outside
//! comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir`, sorted.
fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The source without comments (line, block and doc comments) and without
/// the contents of string literals, so neither a doc link nor a message
/// text counts as an import.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            // A raw string r#"..."# needs no special case here: its body is
            // skipped up to the first quote, which is good enough for code
            // that names no module inside raw strings.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('"', '\'', '\n'); lifetimes ('a) pass through.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a path starting at `rest` (just after `crate::`)
/// names: one ident, or each first ident inside a `{...}` group.
fn heads(rest: &str) -> Vec<String> {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        let mut out = Vec::new();
        let mut depth = 0;
        let mut start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => start = true,
                c if start && depth == 0 && (c.is_ascii_alphabetic() || c == '_') => {
                    out.push(ident_at(&group[i..]).to_string());
                    start = false;
                }
                c if !c.is_whitespace() => start = false,
                _ => {}
            }
        }
        out
    } else {
        vec![ident_at(rest).to_string()]
    }
}

/// `src` = the crate's source folder; the file's module path below it
/// (`backend/queue.rs` -> ["backend", "queue"], `backend/mod.rs` ->
/// ["backend"], `lib.rs` -> []).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// Edges between top-level modules of the crate whose sources are in `src`:
/// (from, to) -> one file that makes it.
fn module_edges(src: &Path) -> BTreeMap<(String, String), String> {
    edges_within(src, "")
}

/// Edges between the child modules of the module `within` ("" for the crate
/// root, "cli" for `src/cli/`): (from, to) -> one file that makes it.
fn edges_within(src: &Path, within: &str) -> BTreeMap<(String, String), String> {
    let root = if within.is_empty() {
        src.to_path_buf()
    } else {
        src.join(within)
    };
    let prefix = if within.is_empty() {
        String::new()
    } else {
        format!("{within}::")
    };
    let src = root.as_path();
    let mut edges = BTreeMap::new();
    for file in rs_files(src) {
        let path = module_path(src, &file);
        let Some(me) = path.first().cloned() else {
            continue; // lib.rs declares the modules
        };
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let mut targets = Vec::new();
        for (i, _) in code.match_indices("crate::") {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue; // refblk_crate::, $crate::
            }
            let rest = &code[i + "crate::".len()..];
            if let Some(rest) = rest.strip_prefix(prefix.as_str()) {
                targets.extend(heads(rest));
            }
        }
        for (i, _) in code.match_indices("super::") {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue; // counted from the first super:: of a chain
            }
            // Inline `mod tests { use super::* }` blocks sit one level below
            // the file; a `super::` there names the file's own module, which
            // never leaves the top-level module unless the file is top-level.
            let mut rest = &code[i..];
            let mut up = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                up += 1;
                rest = r;
            }
            if up >= path.len() {
                targets.extend(heads(rest));
            }
        }
        for t in targets {
            let is_module =
                !t.is_empty() && (src.join(&t).is_dir() || src.join(format!("{t}.rs")).exists());
            if t != me && is_module {
                let shown = file
                    .strip_prefix(REPO)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                edges.entry((me.clone(), t)).or_insert(shown);
            }
        }
    }
    edges
}

/// A cycle in the graph, if any (as a list of modules, first repeated last).
fn find_cycle(edges: &BTreeMap<(String, String), String>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
    }
    fn visit<'a>(
        n: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|m| *m == n) {
            let mut c: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n);
        for m in next.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    for n in next.keys() {
        if let Some(c) = visit(n, &next, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn show(edges: &BTreeMap<(String, String), String>) -> String {
    edges
        .iter()
        .map(|((a, b), f)| format!("  {a} -> {b}  ({f})\n"))
        .collect()
}

#[test]
fn crates_depend_one_way() {
    // Each crate's path dependencies, read from its manifest.
    let deps = |dir: &str| -> BTreeSet<String> {
        let toml = std::fs::read_to_string(Path::new(REPO).join(dir).join("Cargo.toml")).unwrap();
        let mut out = BTreeSet::new();
        let mut in_deps = false;
        for line in toml.lines() {
            let l = line.trim();
            if l.starts_with('[') {
                in_deps = l == "[dependencies]";
            } else if in_deps && l.contains("path =") {
                out.insert(l.split([' ', '=']).next().unwrap().to_string());
            }
        }
        out
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(deps("xen-sys"), set(&[]));
    assert_eq!(deps("core"), set(&["xen-sys"]));
    assert_eq!(deps("sim"), set(&["refblk-core", "xen-sys"]));
    assert_eq!(deps("."), set(&["refblk-core", "refblk-sim", "xen-sys"]));
}

#[test]
fn no_module_cycles_in_any_crate() {
    // Each crate's top-level modules, and the subcommands of the CLI.
    for (src, within) in [
        ("core/src", ""),
        ("sim/src", ""),
        ("src", ""),
        ("src", "cli"),
    ] {
        let edges = edges_within(&Path::new(REPO).join(src), within);
        if let Some(c) = find_cycle(&edges) {
            panic!(
                "{src} {within}: the modules import each other in a cycle: {}\nall imports:\n{}",
                c.join(" -> "),
                show(&edges)
            );
        }
    }
}

#[test]
fn core_modules_follow_the_listed_layers() {
    // Lowest first, as core/src/lib.rs lists them: a module may import only
    // modules listed before it.
    let order = [
        "util", "limits", "xenstore", "platform", "blkif", "engine", "pool", "backend",
    ];
    let lib = std::fs::read_to_string(Path::new(REPO).join("core/src/lib.rs")).unwrap();
    let listed: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert_eq!(
        listed, order,
        "core/src/lib.rs lists the layers in this order"
    );
    let rank = |m: &str| order.iter().position(|o| *o == m);
    let edges = module_edges(&Path::new(REPO).join("core/src"));
    let wrong: BTreeMap<_, _> = edges
        .into_iter()
        .filter(|((a, b), _)| match (rank(a), rank(b)) {
            (Some(a), Some(b)) => b >= a,
            _ => true, // a module that is not in the list
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "refblk-core: imports that point up the layers:\n{}",
        show(&wrong)
    );
}

#[test]
fn only_the_demo_sim_and_bench_commands_name_the_simulator() {
    let allowed = |rel: &str| {
        rel.starts_with("src/bench/")
            || [
                "src/cli/bench.rs",
                "src/cli/demo.rs",
                "src/cli/sim.rs",
                "src/cli/simguest.rs",
            ]
            .contains(&rel)
    };
    let mut wrong = Vec::new();
    for file in rs_files(&Path::new(REPO).join("src")) {
        let rel = file.strip_prefix(REPO).unwrap().display().to_string();
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        if code.contains("refblk_sim") && !allowed(&rel) {
            wrong.push(rel);
        }
    }
    assert!(
        wrong.is_empty(),
        "these files of the refblk crate name refblk_sim, but only the demo, sim and bench commands may: {wrong:?}"
    );
    // And the daemon's library cannot: refblk-core does not depend on it.
    let core = std::fs::read_to_string(Path::new(REPO).join("core/Cargo.toml")).unwrap();
    assert!(!core.contains("refblk-sim"));
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    // The checker itself, on made-up sources: it must see a `use crate::{..}`
    // group, a `super::super::` path and a cycle, and ignore comments and
    // strings.
    let dir = tempfile::tempdir().unwrap();
    let w = |p: &str, s: &str| {
        let p = dir.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    };
    w("lib.rs", "pub mod a; pub mod b; pub mod c;");
    w(
        "a/mod.rs",
        "use crate::{b::X, util};\n// crate::c in a comment\n",
    );
    w(
        "a/deep.rs",
        "fn f() { super::super::c::g(); let s = \"crate::b\"; }",
    );
    w("b.rs", "/// [`x`](crate::a)\nfn f() {}");
    w("c/mod.rs", "use crate::a::Y;");
    let edges = module_edges(dir.path());
    let got: Vec<(String, String)> = edges.keys().cloned().collect();
    let want = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(got, vec![want("a", "b"), want("a", "c"), want("c", "a")]);
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a".to_string(), "c".to_string(), "a".to_string()])
    );
}
