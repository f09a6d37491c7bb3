//! The control-plane profiles: `snapshot` (FICLONE of a dense and of a fragmented
//! image — what a VM start pays) and `commit` (a pool volume's stop after the VM
//! wrote to it), at several image sizes. Reflink cost should follow extents, not size.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use refblk_core::pool::{InitOptions, Pool, VolumeConfig};

use super::target::fill_pattern;
use super::{clone_or_copy, drop_cache, extents, fmt_bytes, write_dense, MetaResult, Progress};

/// One pass of the control-plane measurements in a directory.
pub struct MetaBench<'a> {
    pub dir: &'a Path,
    pub label: &'a str,
    pub reps: usize,
    pub frag_writes: u64,
    pub progress: &'a Progress,
}

/// `n` random, distinct-ish 4 KiB writes into `path` (buffered, then fsync): each
/// becomes its own extent on a CoW file system.
pub fn fragment(path: &Path, n: u64, seed: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let blocks = f.metadata()?.len() / 4096;
    if blocks == 0 {
        return Ok(());
    }
    let mut buf = [0u8; 4096];
    let mut x = seed | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        fill_pattern(&mut buf, x ^ i);
        f.write_all_at(&buf, (x % blocks) * 4096)?;
    }
    f.sync_all()
}

fn time_ms(f: impl FnOnce() -> io::Result<()>) -> io::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn pool_err(e: refblk_core::pool::PoolError) -> io::Error {
    io::Error::other(e.to_string())
}

impl MetaBench<'_> {
    fn ficlone_times(&self, src: &Path) -> io::Result<(Vec<f64>, bool)> {
        let dst = self.dir.join("snapshot.tmp");
        let mut v = Vec::new();
        let mut reflinked = true;
        for _ in 0..self.reps {
            let ms = time_ms(|| {
                reflinked &= clone_or_copy(src, &dst)?;
                File::open(&dst)?.sync_all()
            })?;
            v.push(ms);
            fs::remove_file(&dst)?;
        }
        Ok((v, reflinked))
    }

    /// Measure at one image size.
    pub fn run(&mut self, size: u64, snapshot: bool, commit: bool) -> io::Result<Vec<MetaResult>> {
        let mut out = Vec::new();
        let sz = fmt_bytes(size);
        let pool_dir = self.dir.join("pool");
        let pool = Pool::init(
            &pool_dir,
            &InitOptions {
                setup_check: false,
                revisions_to_keep: 1,
            },
        )
        .map_err(pool_err)?;
        let vid = format!("bench{}", size >> 20);
        let vol = pool
            .create_volume(&vid, VolumeConfig::origin(1), size)
            .map_err(pool_err)?;
        let clean = vol.clean_path().to_path_buf();
        self.progress
            .step(&format!(
                "{}: snapshot/commit: writing a {sz} image",
                self.label
            ))
            .map_err(io::Error::other)?;
        write_dense(&clean, size)?;
        let mk = |what: &str, ms: Vec<f64>, ext: u64, note: Option<String>, profile| MetaResult {
            place: self.label.to_string(),
            profile,
            what: what.to_string(),
            image_bytes: size,
            extents: ext,
            ms,
            note,
        };
        if snapshot {
            self.progress
                .step(&format!("{}: snapshot of the dense {sz} image", self.label))
                .map_err(io::Error::other)?;
            let ext = extents(&clean);
            let (ms, rl) = self.ficlone_times(&clean)?;
            let note = (!rl).then(|| "no reflink: full copy".to_string());
            out.push(mk("ficlone+fsync dense", ms, ext, note, "snapshot"));
        }
        self.progress.show(&format!(
            "{}: fragmenting the {sz} image ({} random 4 KiB writes)",
            self.label, self.frag_writes
        ));
        // Writes fragment a file only where its blocks are shared (XFS overwrites
        // unshared blocks in place): keep a reflink while writing, as a VM's dirty
        // image is one.
        let hold = self.dir.join("fragment-hold.tmp");
        clone_or_copy(&clean, &hold)?;
        fragment(&clean, self.frag_writes, size)?;
        fs::remove_file(&hold)?;
        drop_cache(&clean)?;
        let ext = extents(&clean);
        if snapshot {
            self.progress
                .step(&format!(
                    "{}: snapshot of the fragmented {sz} image",
                    self.label
                ))
                .map_err(io::Error::other)?;
            let (ms, rl) = self.ficlone_times(&clean)?;
            let note = (!rl).then(|| "no reflink: full copy".to_string());
            out.push(mk("ficlone+fsync fragmented", ms, ext, note, "snapshot"));
        }
        if commit {
            let mut start = Vec::new();
            let mut stop = Vec::new();
            for r in 0..self.reps {
                self.progress
                    .step(&format!(
                        "{}: commit of the {sz} volume rep {}/{}",
                        self.label,
                        r + 1,
                        self.reps
                    ))
                    .map_err(io::Error::other)?;
                let t = Instant::now();
                let dirty = vol.start().map_err(pool_err)?;
                start.push(t.elapsed().as_secs_f64() * 1000.0);
                // What a VM run leaves behind: scattered writes, durable.
                fragment(&dirty, (self.frag_writes / 8).max(1), r as u64 + 99)?;
                let t = Instant::now();
                vol.stop().map_err(pool_err)?;
                stop.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            out.push(mk(
                "pool start (volume start)",
                start,
                ext,
                Some("after a commit the start renames the precache".into()),
                "commit",
            ));
            out.push(mk(
                "pool commit (volume stop)",
                stop,
                ext,
                Some(format!(
                    "after {} random 4 KiB writes; revisions_to_keep=1",
                    (self.frag_writes / 8).max(1)
                )),
                "commit",
            ));
        }
        vol.remove(true).map_err(pool_err)?;
        let _ = fs::remove_dir_all(&pool_dir);
        Ok(out)
    }
}
