//! Per-volume I/O limits, applied by the daemon when it serves the volume
//! (`attach-volume`).
//!
//! Stored in `DIR/.refblk/volumes/<vid>.limits` beside the volume's other
//! sidecars (a directory Qubes never looks at), one line of `key=value`
//! words as the control socket takes them, e.g.
//! `read-iops=500 write-bps=20M burst=100ms`. No file means unlimited;
//! setting every rate to 0 removes the file. The file is replaced atomically
//! (written beside, fsynced, renamed).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::limits::Limits;

/// The limits file of volume `vid` in the pool at `pool_dir`.
pub fn path(pool_dir: &Path, vid: &str) -> io::Result<PathBuf> {
    super::layout::validate_vid(vid).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut o = pool_dir.join(".refblk/volumes").join(vid).into_os_string();
    o.push(".limits");
    Ok(PathBuf::from(o))
}

/// The stored limits of `vid` (unlimited without a file).
pub fn load(pool_dir: &Path, vid: &str) -> io::Result<Limits> {
    let p = path(pool_dir, vid)?;
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Limits::UNLIMITED),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
    };
    Limits::parse_list(text.trim())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display())))
}

/// Store the limits of `vid` (removes the file when `l` is unlimited).
pub fn save(pool_dir: &Path, vid: &str, l: &Limits) -> io::Result<()> {
    let p = path(pool_dir, vid)?;
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    if l.is_unlimited() {
        return match std::fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ctx(e)),
            _ => Ok(()),
        };
    }
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    }
    let mut tmp = p.clone().into_os_string();
    tmp.push(format!("~{}", super::fsops::random_suffix()));
    let tmp = PathBuf::from(tmp);
    let line = format!(
        "read-iops={} write-iops={} read-bps={} write-bps={} burst={}ms\n",
        l.read_iops, l.write_iops, l.read_bps, l.write_bps, l.burst_ms
    );
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(line.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(ctx)?;
    if let Some(dir) = p.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let vid = "appvms/work/private";
        assert!(load(d.path(), vid).unwrap().is_unlimited());
        let l = Limits::parse_list("read-iops=500 write-bps=20M burst=2s").unwrap();
        save(d.path(), vid, &l).unwrap();
        assert_eq!(load(d.path(), vid).unwrap(), l);
        let p = path(d.path(), vid).unwrap();
        assert!(p.ends_with(".refblk/volumes/appvms/work/private.limits"));
        std::fs::write(&p, "read-iops=lots\n").unwrap();
        let e = load(d.path(), vid).unwrap_err().to_string();
        assert!(
            e.contains("private.limits") && e.contains("read-iops"),
            "{e}"
        );
        save(d.path(), vid, &Limits::UNLIMITED).unwrap();
        assert!(!p.exists());
        assert!(path(d.path(), "../x").is_err());
    }
}
