//! Programs other than refblk that use a volume's images: a process holding an
//! image open for writing (from `/proc/<pid>/fd` and `/proc/<pid>/fdinfo`), and a
//! loop device backed by an image (`/sys/block/loop*/loop/backing_file`), and a
//! xenstore backend whose `params` names an image (a toolstack attaching or
//! detaching it). Such a volume is running, by someone else: refblk shows it so
//! and refuses to start, stop, revert, resize, import or remove it.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::xenstore::XsClient;

/// One foreign use of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The process (0 for a loop device or a xenstore backend).
    pub pid: u32,
    /// What uses it, for messages: `pid 1234 (qemu-system-x86)`, `/dev/loop3`,
    /// or a xenstore backend path.
    pub who: String,
    /// The image it uses.
    pub image: String,
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.who.starts_with("/local/") {
            write!(
                f,
                "xenstore backend {} names {} (params)",
                self.who, self.image
            )
        } else if self.pid == 0 {
            write!(f, "loop device {} is backed by {}", self.who, self.image)
        } else {
            write!(f, "{} has {} open for writing", self.who, self.image)
        }
    }
}

/// Which xenstore to look at for backends naming a volume's images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum XenstoreSetting {
    /// The real one (`$XENSTORED_PATH`, the xenstored socket, `/dev/xen/xenbus`)
    /// when there is one; none on a machine without Xen.
    #[default]
    Auto,
    /// The simulated Xen in this directory (`refblk sim --dir DIR`).
    Sim(PathBuf),
    /// Do not look.
    Off,
}

impl XenstoreSetting {
    /// A connection, or None when there is no xenstore to ask (silently).
    fn connect(&self) -> Option<XsClient> {
        let c = match self {
            XenstoreSetting::Off => return None,
            XenstoreSetting::Sim(dir) => {
                let sock = dir.join(crate::platform::SIM_XENSTORED_SOCK);
                if !sock.exists() {
                    return None;
                }
                XsClient::connect_unix(&sock)
            }
            XenstoreSetting::Auto => {
                let any = std::env::var_os("XENSTORED_PATH").is_some()
                    || Path::new(crate::platform::real::XENSTORED_SOCKET).exists()
                    || Path::new("/dev/xen/xenbus").exists();
                if !any {
                    return None;
                }
                XsClient::open_default()
            }
        };
        match c {
            Ok(c) => {
                c.set_timeout(Some(Duration::from_secs(5)));
                Some(c)
            }
            Err(e) => {
                log::debug!("no xenstore to look for backends in: {e}");
                None
            }
        }
    }
}

/// The file a backend's `params` names: the whole value when it is an absolute
/// path, else what follows a `format:` prefix (`aio:/x.img`, `file:/x.img`).
/// refblk's own `pool:DIR:VID` targets name no file.
fn params_path(params: &str) -> Option<&str> {
    let p = params.trim_end_matches('\0');
    if p.starts_with("pool:") {
        return None;
    }
    if p.starts_with('/') {
        return Some(p);
    }
    p.find(":/").map(|i| &p[i + 1..])
}

/// The dom0 backends (`/local/domain/0/backend/<type>/<domid>/<devid>`) whose
/// `params` names one of `images` (by path, or by inode where both exist),
/// other than the `exclude`d backend paths. Nothing when no xenstore is
/// reachable.
pub fn xenstore_users(images: &[&Path], exclude: &[&str], xs: &XenstoreSetting) -> Vec<User> {
    let Some(c) = xs.connect() else {
        return Vec::new();
    };
    let root = "/local/domain/0/backend";
    let dir = |p: &str| c.directory(0, p).unwrap_or_default();
    let ids: Vec<Option<(u64, u64)>> = images
        .iter()
        .map(|p| fs::metadata(p).ok().map(|m| (m.dev(), m.ino())))
        .collect();
    let mut out = Vec::new();
    for ty in dir(root) {
        for dom in dir(&format!("{root}/{ty}")) {
            for dev in dir(&format!("{root}/{ty}/{dom}")) {
                let be = format!("{root}/{ty}/{dom}/{dev}");
                if exclude.contains(&be.as_str()) {
                    continue;
                }
                let Ok(Some(params)) = c.try_read_string(0, &format!("{be}/params")) else {
                    continue;
                };
                let Some(named) = params_path(&params) else {
                    continue;
                };
                let named_id = fs::metadata(named).ok().map(|m| (m.dev(), m.ino()));
                let hit = images.iter().zip(&ids).find(|(p, id)| {
                    Path::new(named) == **p || (named_id.is_some() && **id == named_id)
                });
                if let Some((p, _)) = hit {
                    out.push(User {
                        pid: 0,
                        who: be.clone(),
                        image: p.display().to_string(),
                    });
                }
            }
        }
    }
    out
}

/// Who other than the processes in `exclude` (and this one) writes to one of
/// `images` or has it behind a loop device. Missing images are skipped.
pub fn users_of(images: &[&Path], exclude: &[u32]) -> Vec<User> {
    let targets: Vec<((u64, u64), &Path)> = images
        .iter()
        .filter_map(|p| fs::metadata(p).ok().map(|m| ((m.dev(), m.ino()), *p)))
        .collect();
    if targets.is_empty() {
        return Vec::new();
    }
    let find = |dev: u64, ino: u64| {
        targets
            .iter()
            .find(|(k, _)| *k == (dev, ino))
            .map(|(_, p)| p.display().to_string())
    };
    let me = std::process::id();
    let my_exe = fs::read_link("/proc/self/exe").ok();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for ent in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || exclude.contains(&pid) {
            continue;
        }
        let base = ent.path();
        if forked_not_yet_exec(&base, me, my_exe.as_deref()) {
            continue;
        }
        for fd in fs::read_dir(base.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            let Some(image) = find(m.dev(), m.ino()) else {
                continue;
            };
            let flags = fs::read_to_string(base.join("fdinfo").join(fd.file_name()))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                });
            let writable = flags.is_some_and(|f| f & libc::O_ACCMODE as u32 != 0);
            if writable && seen.insert((pid, image.clone())) {
                let comm = fs::read_to_string(base.join("comm")).unwrap_or_default();
                out.push(User {
                    pid,
                    who: format!("pid {pid} ({})", comm.trim()),
                    image,
                });
            }
        }
    }
    for ent in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = fs::read_to_string(ent.path().join("loop/backing_file")) else {
            continue;
        };
        let b = b.trim_end_matches('\n');
        let b = b.strip_suffix(" (deleted)").unwrap_or(b);
        let hit = fs::metadata(b)
            .ok()
            .and_then(|m| find(m.dev(), m.ino()))
            .or_else(|| {
                targets
                    .iter()
                    .find(|(_, p)| Path::new(b) == *p)
                    .map(|(_, p)| p.display().to_string())
            });
        if let Some(image) = hit {
            out.push(User {
                pid: 0,
                who: format!("/dev/{name}"),
                image,
            });
        }
    }
    out
}

/// How long a process found writing an image must go on holding it to count
/// (see [`confirmed_users_of`]).
pub const SETTLE: Duration = Duration::from_millis(250);

/// [`users_of`], with each process it finds looked for again after `settle`
/// has run (in use: a sleep of [`SETTLE`]); only a process found both times
/// counts. Between fork and exec any process holds copies of its parent's
/// descriptors, close-on-exec ones included, and on a busy machine that
/// moment can be long: seen in the test suite, where `volume stop` found
/// "pid 944 (refblk) has ...-dirty.img open for writing" — a sibling command
/// forked by another test thread of the process that had just written the
/// image, caught before its exec. Loop devices need no second look.
pub fn confirmed_users_of(images: &[&Path], exclude: &[u32], settle: impl FnOnce()) -> Vec<User> {
    let first = users_of(images, exclude);
    if first.iter().all(|u| u.pid == 0) {
        return first;
    }
    settle();
    users_of(images, exclude)
        .into_iter()
        .filter(|u| u.pid == 0 || first.iter().any(|f| f.pid == u.pid && f.image == u.image))
        .collect()
}

/// Whether the process at `/proc/<pid>` (`base`) is a child of ours that has
/// not exec'd yet: between fork and exec it holds copies of all our
/// descriptors, close-on-exec ones included — our own use, not another
/// program's (seen when a thread spawns a command while another works on a
/// volume).
fn forked_not_yet_exec(base: &Path, me: u32, my_exe: Option<&Path>) -> bool {
    let ppid = fs::read_to_string(base.join("stat")).ok().and_then(|s| {
        let rest = &s[s.rfind(')')? + 1..];
        rest.split_whitespace().nth(1)?.parse::<u32>().ok()
    });
    ppid == Some(me)
        && my_exe.is_some()
        && fs::read_link(base.join("exe")).ok().as_deref() == my_exe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_params_name_files() {
        assert_eq!(params_path("/a/b.img"), Some("/a/b.img"));
        assert_eq!(params_path("aio:/a/b.img"), Some("/a/b.img"));
        assert_eq!(params_path("pool:/var/lib/qubes:appvms/w/private"), None);
        assert_eq!(params_path("phy:sda"), None);
    }

    /// An image `name` in a new directory, and a shell child holding it open
    /// for writing until its stdin closes, with what `users_of` reports once
    /// it sees it (bounded wait: 10 s).
    fn held_image(name: &str) -> (tempfile::TempDir, PathBuf, std::process::Child, Vec<User>) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join(name);
        fs::write(&img, b"data").unwrap();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<>'{}'; read x", img.display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let u = loop {
            let u = users_of(&[&img], &[]);
            if !u.is_empty() || std::time::Instant::now() > deadline {
                break u;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        (d, img, child, u)
    }

    #[test]
    fn a_child_holding_a_file_for_writing_is_found() {
        let (_d, img, mut child, u) = held_image("x-dirty.img");
        assert_eq!(u.len(), 1, "{u:?}");
        assert_eq!(u[0].pid, child.id());
        assert!(users_of(&[&img], &[child.id()]).is_empty());
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(users_of(&[&img], &[]).is_empty());
    }

    /// A process that lets go of the image before the second look (as a
    /// command between fork and exec does) is not a user; one that keeps it
    /// is.
    #[test]
    fn only_a_holder_found_twice_counts() {
        let (_d, img, mut child, _) = held_image("y-dirty.img");
        let kept = confirmed_users_of(&[&img], &[], || {});
        assert_eq!(kept.len(), 1, "a holder that stays: {kept:?}");
        assert_eq!(kept[0].pid, child.id());
        let gone = confirmed_users_of(&[&img], &[], || {
            drop(child.stdin.take());
            child.wait().unwrap();
        });
        assert!(gone.is_empty(), "a holder that let go counted: {gone:?}");
    }
}
