//! A really full file system (ext4: every start and commit copies data): the pool
//! operations fail with a clear "file system is full" error naming the file, the
//! committed data stays intact, no temporary files remain, and after freeing space
//! everything works again.

use std::fs;

use crate::common::*;
use refblk_core::pool::{ErrorKind, InitOptions, Pool, StopOutcome, VolumeConfig};
use refblk_sim::scratchfs::{FsKind, ScratchFs};

#[test]
fn enospc_on_small_ext4() {
    let Some(sfs) = ScratchFs::new_or_skip(FsKind::Ext4, 40 * MIB) else {
        return;
    };
    let root = sfs.path();
    let pool = Pool::init(
        &root.join("pool"),
        &InitOptions {
            setup_check: false,
            ..Default::default()
        },
    )
    .unwrap();
    let dir = pool.dir().to_path_buf();
    let size = 8 * MIB;
    let v = pool
        .create_volume("appvms/big/private", VolumeConfig::origin(1), size)
        .unwrap();
    let a = pattern(1, size as usize);
    write_at(&v.start().unwrap(), 0, &a);
    v.stop().unwrap();
    assert_eq!(read(v.clean_path()), a);

    // fill the file system, leaving ~5 MiB: a start needs an 8 MiB copy
    fs::remove_file(v.precache_path()).unwrap();
    let filler = root.join("filler");
    let st = nix::sys::statvfs::statvfs(root).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let fill = free.saturating_sub(5 * MIB);
    let f = fs::File::create(&filler).unwrap();
    nix::fcntl::posix_fallocate(&f, 0, fill as i64).unwrap();
    drop(f);

    let e = v.start().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
    assert!(e.msg.contains("full"), "{e}");
    assert!(
        e.msg.contains("private-dirty.img"),
        "error does not name the file: {e}"
    );
    assert_eq!(read(v.clean_path()), a);
    assert!(!exists(v.dirty_path()));
    assert!(temps(&dir).is_empty(), "{:?}", temps(&dir));

    // free space, run, then fill again before the commit. Archiving the old clean
    // image as a revision is a hard link (no data), so the commit itself goes
    // through; only the spare copy made after it (the precache, 8 MiB on ext4)
    // fails, and the stop reports that.
    fs::remove_file(&filler).unwrap();
    let d = v.start().unwrap();
    let b = pattern(2, size as usize);
    write_at(&d, 0, &b);
    let st = nix::sys::statvfs::statvfs(root).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let f = fs::File::create(&filler).unwrap();
    nix::fcntl::posix_fallocate(&f, 0, free.saturating_sub(4 * MIB) as i64).unwrap();
    drop(f);
    let e = v.stop().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
    assert!(e.msg.contains("committed data is intact"), "{e}");
    assert!(e.msg.contains("private-precache.img"), "{e}");
    assert_eq!(read(v.clean_path()), b, "the run was committed");
    assert!(!exists(v.dirty_path()));
    assert!(!exists(v.precache_path()));
    assert_eq!(read(&v.revisions().unwrap()[0].path), a);
    assert!(temps(&dir).is_empty(), "{:?}", temps(&dir));
    assert_eq!(v.stop().unwrap(), StopOutcome::NotRunning);
    // Still full: the next start needs the 8 MiB copy the precache would have been.
    let e = v.start().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
    assert_eq!(read(v.clean_path()), b);
    fs::remove_file(&filler).unwrap();
    let c = pattern(3, size as usize);
    write_at(&v.start().unwrap(), 0, &c);
    assert_eq!(v.stop().unwrap(), StopOutcome::Committed);
    assert_eq!(read(v.clean_path()), c);
    assert_eq!(read(&v.revisions().unwrap()[0].path), b);
    assert!(pool.check(false).unwrap().is_empty());
}
