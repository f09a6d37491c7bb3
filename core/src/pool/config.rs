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

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Format version written into the sidecars.
pub const FORMAT: u64 = 1;

/// Why a volume's or the pool's settings are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown volume kind {0:?} (origin, snapshot, origin+snapshot, volatile)")]
    UnknownKind(String),
    #[error("revisions_to_keep {0} is invalid (use -1, 0 or a positive number)")]
    BadRevisions(i64),
    #[error("revisions_to_keep -1 (no snapshots) only applies to origin volumes, not {0}")]
    NoSnapshotsOnlyForOrigin(VolumeKind),
    #[error("a {0} volume needs a source volume")]
    NeedsSource(VolumeKind),
    #[error("a {0} volume takes no source volume")]
    TakesNoSource(VolumeKind),
    #[error("pool revisions_to_keep {0} must be 0 or more")]
    BadPoolRevisions(i64),
    /// The sidecar's JSON does not have the fields or types it must have.
    #[error("{0}")]
    Syntax(String),
}

/// The four Qubes volume kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
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

impl From<VolumeKind> for &'static str {
    fn from(k: VolumeKind) -> &'static str {
        k.as_str()
    }
}

impl TryFrom<String> for VolumeKind {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl FromStr for VolumeKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "origin" => VolumeKind::Origin,
            "snapshot" => VolumeKind::Snapshot,
            "origin+snapshot" | "origin-snapshot" => VolumeKind::OriginSnapshot,
            "volatile" => VolumeKind::Volatile,
            _ => return Err(ConfigError::UnknownKind(s.to_string())),
        })
    }
}

/// A volume's settings (its sidecar's JSON, after `format`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default = "yes")]
    pub rw: bool,
}

fn yes() -> bool {
    true
}

/// A sidecar file: the format version, then the settings.
#[derive(Serialize, Deserialize)]
struct Sidecar<T> {
    format: u64,
    /// Written into pool.json only, for a human reading it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    driver: Option<String>,
    #[serde(flatten)]
    settings: T,
}

fn parse_sidecar<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ConfigError> {
    serde_json::from_value::<Sidecar<T>>(v.clone())
        .map(|s| s.settings)
        .map_err(|e| ConfigError::Syntax(e.to_string()))
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.revisions_to_keep < -1 {
            return Err(ConfigError::BadRevisions(self.revisions_to_keep));
        }
        if self.revisions_to_keep == -1 && self.kind != VolumeKind::Origin {
            return Err(ConfigError::NoSnapshotsOnlyForOrigin(self.kind));
        }
        if self.kind.snap_on_start() && self.source.is_none() {
            return Err(ConfigError::NeedsSource(self.kind));
        }
        if !self.kind.snap_on_start() && self.source.is_some() {
            return Err(ConfigError::TakesNoSource(self.kind));
        }
        Ok(())
    }

    /// The sidecar JSON.
    pub fn to_json(&self) -> Value {
        sidecar_json(self, None)
    }

    /// Parse a sidecar.
    pub fn from_json(v: &Value) -> Result<VolumeConfig, ConfigError> {
        let c: VolumeConfig = parse_sidecar(v)?;
        c.validate()?;
        Ok(c)
    }
}

fn sidecar_json<T: Serialize>(settings: &T, driver: Option<&str>) -> Value {
    serde_json::to_value(Sidecar {
        format: FORMAT,
        driver: driver.map(str::to_string),
        settings,
    })
    .expect("settings are plain data")
}

/// Pool-wide settings (pool.json, after `format` and `driver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Default revisions_to_keep of volumes without a sidecar.
    pub revisions_to_keep: i64,
    /// Whether `pool init` required reflink support.
    #[serde(default = "yes")]
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
        sidecar_json(self, Some("file-reflink"))
    }

    /// Parse `pool.json`.
    pub fn from_json(v: &Value) -> Result<PoolConfig, ConfigError> {
        let c: PoolConfig = parse_sidecar(v)?;
        if c.revisions_to_keep < 0 {
            return Err(ConfigError::BadPoolRevisions(c.revisions_to_keep));
        }
        Ok(c)
    }
}
