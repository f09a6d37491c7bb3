//! One running instance per socket and per directory: `refblk serve` and
//! `refblk sim` take an exclusive `flock` before they touch anything, and a
//! second instance is refused (exit 5) naming the first one's pid.

use std::path::{Path, PathBuf};

use super::CliError;

/// Exit code of `refblk serve` / `refblk sim` when another instance owns the
/// socket or directory (nothing was changed).
pub const INSTANCE_BUSY: i32 = 5;

/// `<path>.lock` next to a socket.
pub fn lock_path_for(sock: &Path) -> PathBuf {
    let mut o = sock.as_os_str().to_owned();
    o.push(".lock");
    PathBuf::from(o)
}

/// Take the exclusive, non-blocking `flock` of `lock` (created, with its parent
/// directory, if missing) for one running instance of `who` using `what`, and
/// write our pid into it. Held until the returned file is dropped (the process
/// exits): a second instance is refused with the first one's pid before it
/// touches anything.
pub fn instance_lock(
    lock: &Path,
    who: &str,
    what: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, CliError> {
    use std::io::{Read, Seek, Write};
    if let Some(d) = lock.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| CliError::failed(format!("{}: {e}", d.display())))?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock)
        .map_err(|e| CliError::failed(format!("{}: {e}", lock.display())))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut l) => {
            let pid = std::process::id();
            let r = l
                .set_len(0)
                .and_then(|()| l.rewind())
                .and_then(|()| writeln!(l, "{pid}"));
            if let Err(e) = r {
                log::warn!("{}: {e}", lock.display());
            }
            Ok(l)
        }
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            Err(CliError {
                code: INSTANCE_BUSY,
                msg: format!(
                    "{}: another {who} (pid {}) is using it (lock {} held); stop that one first, \
                     or give this one its own directory/socket. Nothing was changed",
                    what.display(),
                    pid.trim(),
                    lock.display()
                ),
            })
        }
        Err((_, e)) => Err(CliError::failed(format!("flock {}: {e}", lock.display()))),
    }
}

/// Take the exclusive, non-blocking `flock` of the state directory itself
/// (created, mode 0700, if missing): no file is left in it, so a clean stop
/// still leaves the directory empty.
pub fn dir_lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::failed(format!("{}: {e}", dir.display())))?;
    let f = std::fs::File::open(dir)
        .map_err(|e| CliError::failed(format!("{}: {e}", dir.display())))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(CliError {
            code: INSTANCE_BUSY,
            msg: format!(
                "{}: another refblk serve keeps its restart state in this directory (it holds \
                 its lock); stop that one first, or give this one its own --state-dir. \
                 Nothing was changed",
                dir.display()
            ),
        }),
        Err((_, e)) => Err(CliError::failed(format!("flock {}: {e}", dir.display()))),
    }
}
