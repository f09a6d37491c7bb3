//! File names of Qubes' file-reflink layout and their parsing.
//!
//! For a volume id `vid` in pool directory `DIR`:
//! - `DIR/<vid>.img` clean image, `DIR/<vid>-dirty.img` the running image,
//!   `DIR/<vid>-precache.img` a spare reflink of the clean image (same size and
//!   mtime_ns), `DIR/<vid>-import.img` an import in progress;
//! - revisions `DIR/<vid>.img.<N>@<YYYY-MM-DDTHH:MM:SS>Z`, N a decimal counter (the
//!   newest is the highest N) and the timestamp the UTC mtime, in whole seconds, of the
//!   clean image at the time it was archived;
//! - temporary files `<any of the above>~<random>`.
//!
//! refblk's own files live under `DIR/.refblk/` and never next to the images.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Suffixes that end a volume's last component in the layout; a vid may not end in
/// them (its clean image would collide with another volume's file).
const RESERVED_SUFFIXES: [&str; 3] = ["-dirty", "-precache", "-import"];

/// Why a volume id was rejected.
pub fn validate_vid(vid: &str) -> Result<(), String> {
    if vid.is_empty() {
        return Err("volume id is empty".into());
    }
    if vid.contains('\0') {
        return Err(format!("volume id {vid:?} contains a NUL byte"));
    }
    if vid.starts_with('/') {
        return Err(format!(
            "volume id {vid:?} is an absolute path; give it relative to the pool, e.g. appvms/work/private"
        ));
    }
    if vid.chars().any(|c| c.is_control()) {
        return Err(format!("volume id {vid:?} contains a control character"));
    }
    if vid.contains('~') {
        return Err(format!(
            "volume id {vid:?} contains '~', which marks temporary files in the pool"
        ));
    }
    for comp in vid.split('/') {
        match comp {
            "" => return Err(format!("volume id {vid:?} has an empty path component")),
            "." | ".." => {
                return Err(format!(
                    "volume id {vid:?} contains {comp:?}; volumes must stay inside the pool"
                ))
            }
            c if c.starts_with('.') => {
                return Err(format!(
                    "volume id {vid:?}: component {c:?} starts with '.', reserved for refblk's own files"
                ))
            }
            c if c.len() > 200 => {
                return Err(format!("volume id {vid:?}: component too long"))
            }
            _ => {}
        }
    }
    let last = vid.rsplit('/').next().unwrap_or(vid);
    for s in RESERVED_SUFFIXES {
        if last.ends_with(s) {
            return Err(format!(
                "volume id {vid:?} ends with {s:?}, which the pool layout reserves for image states"
            ));
        }
    }
    if last.contains(".img") {
        return Err(format!(
            "volume id {vid:?} contains \".img\"; give the volume id without the image suffix"
        ));
    }
    Ok(())
}

/// The paths of one volume.
#[derive(Debug, Clone)]
pub struct VolPaths {
    /// `<vid>.img`
    pub clean: PathBuf,
    /// `<vid>-dirty.img`
    pub dirty: PathBuf,
    /// `<vid>-precache.img`
    pub precache: PathBuf,
    /// `<vid>-import.img`
    pub import: PathBuf,
    /// The directory holding the images.
    pub dir: PathBuf,
    /// The last vid component.
    pub name: String,
}

impl VolPaths {
    /// Paths of `vid` (already validated) in `pool`.
    pub fn new(pool: &Path, vid: &str) -> VolPaths {
        let base = pool.join(vid);
        let with = |s: &str| {
            let mut o = base.as_os_str().to_owned();
            o.push(s);
            PathBuf::from(o)
        };
        VolPaths {
            clean: with(".img"),
            dirty: with("-dirty.img"),
            precache: with("-precache.img"),
            import: with("-import.img"),
            dir: base.parent().map(Path::to_path_buf).unwrap_or_default(),
            name: vid.rsplit('/').next().unwrap_or(vid).to_string(),
        }
    }

    /// The path of revision `n` with `timestamp` (without the trailing Z).
    pub fn revision(&self, n: u64, timestamp: &str) -> PathBuf {
        let mut o = self.clean.as_os_str().to_owned();
        o.push(format!(".{n}@{timestamp}Z"));
        PathBuf::from(o)
    }

    /// Whether `file_name` (in `dir`) is one of this volume's temporary files, i.e.
    /// `<one of our file names>~<anything>`.
    pub fn is_temp(&self, file_name: &str) -> bool {
        let Some((stem, _)) = file_name.split_once('~') else {
            return false;
        };
        let n = &self.name;
        stem == format!("{n}.img")
            || stem == format!("{n}-dirty.img")
            || stem == format!("{n}-precache.img")
            || stem == format!("{n}-import.img")
            || stem
                .strip_prefix(&format!("{n}.img."))
                .is_some_and(|r| parse_revision_suffix(r).is_some())
    }
}

/// A revision: its number and timestamp (`YYYY-MM-DDTHH:MM:SS`, UTC, no Z).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// The counter N.
    pub n: u64,
    /// The UTC timestamp, without the trailing `Z`.
    pub timestamp: String,
    /// The file.
    pub path: PathBuf,
}

impl Revision {
    /// The Qubes revision name as shown to users: `N`.
    pub fn name(&self) -> String {
        self.n.to_string()
    }
}

/// Parse `<N>@<YYYY-MM-DDTHH:MM:SS>Z` as Qubes' glob `*?@????-??-??T??:??:??Z` and
/// `int(N)` accept it (we require N to be decimal digits).
pub fn parse_revision_suffix(s: &str) -> Option<(u64, String)> {
    let body = s.strip_suffix('Z')?;
    let (n, ts) = body.split_once('@')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let b = ts.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || ts.contains('@')
        || ts.contains('~')
    {
        return None;
    }
    Some((n.parse().ok()?, ts.to_string()))
}

/// The revisions of a volume, oldest (lowest N) first.
pub fn list_revisions(p: &VolPaths) -> std::io::Result<Vec<Revision>> {
    let prefix = format!("{}.img.", p.name);
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&p.dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if let Some((n, ts)) = parse_revision_suffix(rest) {
            out.push(Revision {
                n,
                timestamp: ts,
                path: p.dir.join(name),
            });
        }
    }
    out.sort_by_key(|r| r.n);
    Ok(out)
}

/// Revision timestamps are Qubes' `isodate` of the image's mtime.
pub use crate::util::time::isodate;

/// Split a path inside the pool into (vid, role) if its file name is one of the
/// layout's names. Role is "clean", "dirty", "precache", "import", "revision", "temp".
pub fn classify(rel_dir: &str, file_name: &OsStr) -> Option<(String, &'static str)> {
    let name = file_name.to_str()?;
    let join = |stem: &str| {
        if rel_dir.is_empty() {
            stem.to_string()
        } else {
            format!("{rel_dir}/{stem}")
        }
    };
    let (base, role) = if let Some((stem, _)) = name.split_once('~') {
        let (vid, _) = classify(rel_dir, OsStr::new(stem))?;
        return Some((vid, "temp"));
    } else if let Some(s) = name.strip_suffix("-dirty.img") {
        (s, "dirty")
    } else if let Some(s) = name.strip_suffix("-precache.img") {
        (s, "precache")
    } else if let Some(s) = name.strip_suffix("-import.img") {
        (s, "import")
    } else if let Some(s) = name.strip_suffix(".img") {
        (s, "clean")
    } else if let Some(pos) = name.rfind(".img.") {
        parse_revision_suffix(&name[pos + 5..])?;
        (&name[..pos], "revision")
    } else {
        return None;
    };
    let vid = join(base);
    validate_vid(&vid).ok()?;
    Some((vid, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vids() {
        for ok in [
            "appvms/work/private",
            "vm-templates/fedora-40/root",
            "a/b/c/d",
            "x",
        ] {
            assert!(validate_vid(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/abs/x",
            "a/../b",
            "..",
            "a/./b",
            "a//b",
            "a/b/",
            "a\0b",
            "a/b-dirty",
            "a/b-precache",
            "a/b-import",
            "a/x.img",
            "a/b~1",
            ".refblk/x",
            "a/\nb",
        ] {
            assert!(validate_vid(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn revision_names() {
        assert_eq!(
            parse_revision_suffix("12@2024-01-02T03:04:05Z"),
            Some((12, "2024-01-02T03:04:05".into()))
        );
        for bad in [
            "x@2024-01-02T03:04:05Z",
            "1@2024-01-02T03:04:05",
            "@2024-01-02T03:04:05Z",
            "1@2024-01-02 03:04:05Z",
        ] {
            assert_eq!(parse_revision_suffix(bad), None, "{bad}");
        }
        let p = VolPaths::new(Path::new("/p"), "appvms/w/private");
        assert_eq!(
            p.revision(3, "2024-01-02T03:04:05"),
            PathBuf::from("/p/appvms/w/private.img.3@2024-01-02T03:04:05Z")
        );
        assert!(p.is_temp("private.img~abc"));
        assert!(p.is_temp("private-dirty.img~abc_12"));
        assert!(p.is_temp("private.img.3@2024-01-02T03:04:05Z~x"));
        assert!(!p.is_temp("private2.img~abc"));
        assert!(!p.is_temp("private.img"));
    }

    #[test]
    fn classify_names() {
        let c = |n: &str| classify("appvms/w", OsStr::new(n));
        assert_eq!(c("private.img"), Some(("appvms/w/private".into(), "clean")));
        assert_eq!(
            c("private-dirty.img"),
            Some(("appvms/w/private".into(), "dirty"))
        );
        assert_eq!(
            c("root.img.7@2024-01-02T03:04:05Z"),
            Some(("appvms/w/root".into(), "revision"))
        );
        assert_eq!(c("root.img~abcd"), Some(("appvms/w/root".into(), "temp")));
        assert_eq!(c("notes.txt"), None);
    }
}
