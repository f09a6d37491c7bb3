//! refblk's own per-pool and per-volume settings, kept out of Qubes' way.
//!
//! Qubes keeps a volume's settings (save_on_stop, snap_on_start, source,
//! revisions_to_keep, size) in qubes.xml, not in the pool directory. refblk stores
//! them in sidecar files under `DIR/.refblk/` — a directory Qubes never looks at:
//! - `DIR/.refblk/pool.json`: `{"format":1,"driver":"file-reflink","revisions_to_keep":1,"setup_check":true}`
//! - `DIR/.refblk/volumes/<vid>.json`: `{"format":1,"kind":"origin","revisions_to_keep":1,"size":1073741824,"source":null,"rw":true}`
//! - `DIR/.refblk/volumes/<vid>.lock`: the per-volume flock file;
//! - `DIR/.refblk/volumes/<vid>.running`: written by `start`, removed by `stop`
//!   (`{"boot_id":..,"pid":..,"started":..}`), so a second start is refused.
//!
//! A volume without a sidecar (a pool laid out by hand or by Qubes) is an origin
//! volume with the pool's `revisions_to_keep` and the size of its image; command-line
//! flags can override kind, source and revisions_to_keep.

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

/// Format version written into the sidecars.
pub const FORMAT: u64 = 1;

/// The four Qubes volume kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// `save_on_stop`: changes are committed at stop (e.g. private).
    Origin,
    /// `snap_on_start`: a fresh snapshot of the source at each start, discarded at
    /// stop (e.g. an AppVM's root).
    Snapshot,
    /// Both: starts from the source, but the result is committed (rare).
    OriginSnapshot,
    /// Neither: an empty sparse image at each start (e.g. volatile).
    Volatile,
}

impl VolumeKind {
    /// Qubes' `save_on_stop`.
    pub fn save_on_stop(self) -> bool {
        matches!(self, VolumeKind::Origin | VolumeKind::OriginSnapshot)
    }
    /// Qubes' `snap_on_start`.
    pub fn snap_on_start(self) -> bool {
        matches!(self, VolumeKind::Snapshot | VolumeKind::OriginSnapshot)
    }
    /// The name used in sidecars and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Origin => "origin",
            VolumeKind::Snapshot => "snapshot",
            VolumeKind::OriginSnapshot => "origin+snapshot",
            VolumeKind::Volatile => "volatile",
        }
    }
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "origin" => VolumeKind::Origin,
            "snapshot" => VolumeKind::Snapshot,
            "origin+snapshot" | "origin-snapshot" => VolumeKind::OriginSnapshot,
            "volatile" => VolumeKind::Volatile,
            _ => {
                return Err(format!(
                    "unknown volume kind {s:?} (origin, snapshot, origin+snapshot, volatile)"
                ))
            }
        })
    }
}

/// A volume's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// The kind.
    pub kind: VolumeKind,
    /// For snapshot kinds: the source volume id (in the same pool).
    pub source: Option<String>,
    /// Revisions kept at commit; -1 on an origin: no snapshots at all (the clean image
    /// is renamed to dirty on start and back on stop).
    pub revisions_to_keep: i64,
    /// Size in bytes (for volatile volumes and stopped snapshot volumes; origins take
    /// their size from the image).
    pub size: Option<u64>,
    /// Writable (resize refuses read-only volumes, as Qubes does).
    pub rw: bool,
}

impl VolumeConfig {
    /// An origin volume with `revisions_to_keep` revisions.
    pub fn origin(revisions_to_keep: i64) -> VolumeConfig {
        VolumeConfig {
            kind: VolumeKind::Origin,
            source: None,
            revisions_to_keep,
            size: None,
            rw: true,
        }
    }

    /// Check the combination of fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.revisions_to_keep < -1 {
            return Err(format!(
                "revisions_to_keep {} is invalid (use -1, 0 or a positive number)",
                self.revisions_to_keep
            ));
        }
        if self.revisions_to_keep == -1 && self.kind != VolumeKind::Origin {
            return Err(format!(
                "revisions_to_keep -1 (no snapshots) only applies to origin volumes, not {}",
                self.kind
            ));
        }
        if self.kind.snap_on_start() && self.source.is_none() {
            return Err(format!("a {} volume needs a source volume", self.kind));
        }
        if !self.kind.snap_on_start() && self.source.is_some() {
            return Err(format!("a {} volume takes no source volume", self.kind));
        }
        Ok(())
    }

    /// The sidecar JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "kind": self.kind.as_str(),
            "source": self.source,
            "revisions_to_keep": self.revisions_to_keep,
            "size": self.size,
            "rw": self.rw,
        })
    }

    /// Parse a sidecar.
    pub fn from_json(v: &Value) -> Result<VolumeConfig, String> {
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("missing \"kind\"")?
            .parse()?;
        let source = match v.get("source") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("\"source\" is not a string".into()),
        };
        let revisions_to_keep = v
            .get("revisions_to_keep")
            .and_then(Value::as_i64)
            .ok_or("missing or non-integer \"revisions_to_keep\"")?;
        let size = match v.get("size") {
            None | Some(Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or("\"size\" is not a byte count")?),
        };
        let rw = v.get("rw").and_then(Value::as_bool).unwrap_or(true);
        let c = VolumeConfig {
            kind,
            source,
            revisions_to_keep,
            size,
            rw,
        };
        c.validate()?;
        Ok(c)
    }
}

/// Pool-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Default revisions_to_keep of volumes without a sidecar.
    pub revisions_to_keep: i64,
    /// Whether `pool init` required reflink support.
    pub setup_check: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            revisions_to_keep: 1,
            setup_check: true,
        }
    }
}

impl PoolConfig {
    /// The sidecar JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "driver": "file-reflink",
            "revisions_to_keep": self.revisions_to_keep,
            "setup_check": self.setup_check,
        })
    }

    /// Parse `pool.json`.
    pub fn from_json(v: &Value) -> Result<PoolConfig, String> {
        let revisions_to_keep = v
            .get("revisions_to_keep")
            .and_then(Value::as_i64)
            .ok_or("missing or non-integer \"revisions_to_keep\"")?;
        if revisions_to_keep < 0 {
            return Err(format!(
                "pool revisions_to_keep {revisions_to_keep} must be 0 or more"
            ));
        }
        Ok(PoolConfig {
            revisions_to_keep,
            setup_check: v
                .get("setup_check")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }
}
