//! The benchmark profiles (Qubes OS `storage_perf` names plus the VM-host operations
//! of issue 6) and the benchmark paths.

use std::fmt;

use super::target::IoOp;
use super::workload::{IoSpec, Pattern};

/// What image a profile starts from, fresh for every repetition where it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prep {
    /// The shared dense image (written once per file system).
    Dense,
    /// A new sparse file of the image size: first writes allocate.
    Sparse,
    /// A fresh FICLONE of the dense image (a copy where reflinks are missing): the
    /// state of a VM's dirty image right after start.
    Clone,
}

/// What a profile measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A timed I/O workload on every path.
    Io(IoSpec, Prep),
    /// FICLONE of a dense and of a fragmented image (VM start).
    Snapshot,
    /// Committing a volume of the pool after it ran (VM stop).
    Commit,
}

/// A named profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub kind: Kind,
}

const fn io(
    name: &'static str,
    op: IoOp,
    bs: u32,
    qd: u32,
    pattern: Pattern,
    prep: Prep,
) -> Profile {
    Profile {
        name,
        kind: Kind::Io(
            IoSpec {
                op,
                bs,
                qd,
                pattern,
            },
            prep,
        ),
    }
}

const M: u32 = 1 << 20;
const K4: u32 = 4096;

/// Every profile, in report order.
pub const ALL: &[Profile] = &[
    io(
        "seq1m_q8t1_read",
        IoOp::Read,
        M,
        8,
        Pattern::Seq,
        Prep::Dense,
    ),
    io(
        "seq1m_q8t1_write",
        IoOp::Write,
        M,
        8,
        Pattern::Seq,
        Prep::Dense,
    ),
    io(
        "seq1m_q1t1_read",
        IoOp::Read,
        M,
        1,
        Pattern::Seq,
        Prep::Dense,
    ),
    io(
        "seq1m_q1t1_write",
        IoOp::Write,
        M,
        1,
        Pattern::Seq,
        Prep::Dense,
    ),
    io(
        "rnd4k_q32t1_read",
        IoOp::Read,
        K4,
        32,
        Pattern::Rand,
        Prep::Dense,
    ),
    io(
        "rnd4k_q32t1_write",
        IoOp::Write,
        K4,
        32,
        Pattern::Rand,
        Prep::Dense,
    ),
    io(
        "rnd4k_q1t1_read",
        IoOp::Read,
        K4,
        1,
        Pattern::Rand,
        Prep::Dense,
    ),
    io(
        "rnd4k_q1t1_write",
        IoOp::Write,
        K4,
        1,
        Pattern::Rand,
        Prep::Dense,
    ),
    io(
        "alloc",
        IoOp::Write,
        K4,
        32,
        Pattern::RandUnique,
        Prep::Sparse,
    ),
    io(
        "overwrite",
        IoOp::Write,
        K4,
        32,
        Pattern::RandUnique,
        Prep::Clone,
    ),
    io(
        "discard_4k",
        IoOp::Discard,
        K4,
        1,
        Pattern::RandUnique,
        Prep::Clone,
    ),
    io(
        "discard_64k",
        IoOp::Discard,
        64 << 10,
        1,
        Pattern::RandUnique,
        Prep::Clone,
    ),
    io(
        "discard_1m",
        IoOp::Discard,
        M,
        1,
        Pattern::RandUnique,
        Prep::Clone,
    ),
    Profile {
        name: "snapshot",
        kind: Kind::Snapshot,
    },
    Profile {
        name: "commit",
        kind: Kind::Commit,
    },
];

/// Look profiles up by a comma-separated list of names; `all` and group names
/// (`seq`, `rnd`, `discard`) select several.
pub fn parse_profiles(list: &str) -> Result<Vec<Profile>, String> {
    let mut out: Vec<Profile> = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let picked: Vec<Profile> = match word {
            "all" => ALL.to_vec(),
            "io" => ALL
                .iter()
                .filter(|p| matches!(p.kind, Kind::Io(..)))
                .copied()
                .collect(),
            "discard" => ALL
                .iter()
                .filter(|p| p.name.starts_with("discard"))
                .copied()
                .collect(),
            "seq" | "rnd" => ALL
                .iter()
                .filter(|p| p.name.starts_with(word))
                .copied()
                .collect(),
            name => match ALL.iter().find(|p| p.name == name) {
                Some(p) => vec![*p],
                None => {
                    return Err(format!(
                        "unknown profile {name:?}; known: all, io, seq, rnd, discard, {}",
                        ALL.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
                    ))
                }
            },
        };
        for p in picked {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err("no profile selected".into());
    }
    Ok(out)
}

/// A way from a workload to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    /// io_uring, O_DIRECT, straight on the image: the ceiling.
    File,
    /// A loop device over the image with `--direct-io=on`.
    LoopDio,
    /// A loop device over the image with `--direct-io=off` (buffered in dom0).
    LoopBuf,
    /// A simulated guest's blkfront through refblk.
    Refblk,
}

impl PathKind {
    pub const ALL: [PathKind; 4] = [
        PathKind::File,
        PathKind::LoopDio,
        PathKind::LoopBuf,
        PathKind::Refblk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::File => "file",
            PathKind::LoopDio => "loop-dio",
            PathKind::LoopBuf => "loop-buf",
            PathKind::Refblk => "refblk",
        }
    }

    /// Parse a comma-separated list (`loop` means both loop variants).
    pub fn parse_list(list: &str) -> Result<Vec<PathKind>, String> {
        let mut v = Vec::new();
        for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let add: &[PathKind] = match w {
                "all" => &PathKind::ALL,
                "file" => &[PathKind::File],
                "loop" => &[PathKind::LoopDio, PathKind::LoopBuf],
                "loop-dio" => &[PathKind::LoopDio],
                "loop-buf" => &[PathKind::LoopBuf],
                "refblk" => &[PathKind::Refblk],
                _ => {
                    return Err(format!(
                        "unknown path {w:?}; known: file, loop, loop-dio, loop-buf, refblk, all"
                    ))
                }
            };
            for p in add {
                if !v.contains(p) {
                    v.push(*p);
                }
            }
        }
        if v.is_empty() {
            return Err("no path selected".into());
        }
        v.sort();
        Ok(v)
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lists_parse_groups_and_reject_unknown_names() {
        assert_eq!(parse_profiles("all").unwrap().len(), ALL.len());
        let d = parse_profiles("discard,discard_4k").unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(parse_profiles("rnd").unwrap().len(), 4);
        assert!(parse_profiles("rnd4k_q64")
            .unwrap_err()
            .contains("unknown profile"));
        assert!(parse_profiles(",").is_err());
    }

    #[test]
    fn path_lists_parse() {
        assert_eq!(
            PathKind::parse_list("refblk,loop").unwrap(),
            [PathKind::LoopDio, PathKind::LoopBuf, PathKind::Refblk]
        );
        assert!(PathKind::parse_list("nbd").is_err());
    }
}
