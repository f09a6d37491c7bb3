//! The control socket's messages as types. A request travels as one text
//! line (so that an administrator can type it into `socat`, and the hotplug
//! script's `refblk ctl` is a thin client); [`Request::parse`] turns a line
//! into a [`Request`] and [`Request::to_line`] back. Every answer is one
//! JSON line: an [`Answer`] envelope (`version`, `ok`, `error`) around the
//! request's own answer type, all serde-derived, so the daemon writes and the
//! CLI reads the same definitions.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backend::stats::StatsSnapshot;
use crate::limits::{LimitError, Limits, LimitsPatch, KEYS};

/// The version of every answer's shape (the `version` field). It grows when
/// a field changes meaning or goes away; new fields do not change it.
pub const JSON_VERSION: u64 = 1;

/// Options of an `attach` or `attach-volume` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachLine {
    /// `ro`.
    pub read_only: bool,
    /// `sector-size=N` (512 or 4096; the daemon checks).
    pub sector_size: Option<u32>,
    /// `read-iops=...` etc.: on top of a volume's stored limits.
    pub limits: LimitsPatch,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `attach <backend-path> <image> [ro] [sector-size=N] [LIMIT=VALUE ...]`
    Attach {
        backend: String,
        image: PathBuf,
        options: AttachLine,
    },
    /// `attach-volume <backend-path> <pool-dir> <vid> [ro] [sector-size=N] [LIMIT=VALUE ...]`
    AttachVolume {
        backend: String,
        pool: PathBuf,
        vid: String,
        options: AttachLine,
    },
    /// `detach <backend-path>`
    Detach { backend: String },
    /// `resize`: every device looks at its image's size again.
    Resize,
    /// `status`: every device with its counters, statistics and limits.
    Status,
    /// `limit <target> [LIMIT=VALUE ...]` (no pairs: show the current limits).
    Limit { target: String, patch: LimitsPatch },
}

/// Why a request line is refused before anything is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty request")]
    Empty,
    #[error("unknown request {0:?}")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(String),
    #[error("unknown option {0:?}")]
    UnknownOption(String),
    #[error("{0}")]
    BadLimit(#[from] LimitError),
    #[error("{0:?}: a path or name with white space cannot be sent on the control socket")]
    WhiteSpace(String),
}

const USAGE_ATTACH: &str = "attach <backend-path> <image> [ro] [sector-size=N] [LIMIT=VALUE ...]";
const USAGE_VOLUME: &str =
    "attach-volume <backend-path> <pool-dir> <vid> [ro] [sector-size=N] [LIMIT=VALUE ...]";

impl Request {
    /// Parse one request line.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let mut w = line.split_whitespace();
        let usage = |u: &str| RequestError::Usage(u.to_string());
        match w.next() {
            None => Err(RequestError::Empty),
            Some("attach") => {
                let (Some(be), Some(img)) = (w.next(), w.next()) else {
                    return Err(usage(USAGE_ATTACH));
                };
                Ok(Request::Attach {
                    backend: be.into(),
                    image: img.into(),
                    options: attach_options(w)?,
                })
            }
            Some("attach-volume") => {
                let (Some(be), Some(pool), Some(vid)) = (w.next(), w.next(), w.next()) else {
                    return Err(usage(USAGE_VOLUME));
                };
                Ok(Request::AttachVolume {
                    backend: be.into(),
                    pool: pool.into(),
                    vid: vid.into(),
                    options: attach_options(w)?,
                })
            }
            Some("detach") => match (w.next(), w.next()) {
                (Some(be), None) => Ok(Request::Detach { backend: be.into() }),
                _ => Err(usage("detach <backend-path>")),
            },
            Some("resize") => Ok(Request::Resize),
            Some("status") => Ok(Request::Status),
            Some("limit") => {
                let Some(target) = w.next() else {
                    return Err(RequestError::Usage(format!(
                        "limit <domain|backend-path|DOMAIN/VDEV> KEY=VALUE ... (keys: {})",
                        KEYS.join(", ")
                    )));
                };
                let patch = LimitsPatch::parse_pairs(w)
                    .map_err(|e| LimitError(format!("limit {target}: {e}")))?;
                Ok(Request::Limit {
                    target: target.into(),
                    patch,
                })
            }
            Some(other) => Err(RequestError::Unknown(other.into())),
        }
    }

    /// The request's line (what [`parse`](Self::parse) reads back). Refused
    /// for a path or name with white space, which the line cannot carry.
    pub fn to_line(&self) -> Result<String, RequestError> {
        let word = |s: &str| -> Result<String, RequestError> {
            if s.is_empty() || s.chars().any(char::is_whitespace) {
                Err(RequestError::WhiteSpace(s.to_string()))
            } else {
                Ok(s.to_string())
            }
        };
        let path = |p: &PathBuf| word(&p.to_string_lossy());
        let opts = |o: &AttachLine| {
            let mut v = Vec::new();
            if o.read_only {
                v.push("ro".to_string());
            }
            if let Some(n) = o.sector_size {
                v.push(format!("sector-size={n}"));
            }
            v.extend(o.limits.to_pairs());
            v
        };
        let words: Vec<String> = match self {
            Request::Attach {
                backend,
                image,
                options,
            } => [
                vec!["attach".into(), word(backend)?, path(image)?],
                opts(options),
            ]
            .concat(),
            Request::AttachVolume {
                backend,
                pool,
                vid,
                options,
            } => [
                vec![
                    "attach-volume".into(),
                    word(backend)?,
                    path(pool)?,
                    word(vid)?,
                ],
                opts(options),
            ]
            .concat(),
            Request::Detach { backend } => vec!["detach".into(), word(backend)?],
            Request::Resize => vec!["resize".into()],
            Request::Status => vec!["status".into()],
            Request::Limit { target, patch } => {
                [vec!["limit".into(), word(target)?], patch.to_pairs()].concat()
            }
        };
        Ok(words.join(" "))
    }

    /// May the read-only status socket answer it?
    pub fn is_read_only(&self) -> bool {
        matches!(self, Request::Status)
    }
}

fn attach_options<'a>(words: impl Iterator<Item = &'a str>) -> Result<AttachLine, RequestError> {
    let mut o = AttachLine::default();
    for w in words {
        if w == "ro" {
            o.read_only = true;
        } else if let Some(n) = w.strip_prefix("sector-size=") {
            let n = n
                .parse()
                .map_err(|_| RequestError::UnknownOption(w.to_string()))?;
            o.sector_size = Some(n);
        } else if let Some((k, v)) = w.split_once('=').filter(|(k, _)| KEYS.contains(k)) {
            o.limits.set(k, v)?;
        } else {
            return Err(RequestError::UnknownOption(w.to_string()));
        }
    }
    Ok(o)
}

/// Every answer: the shape's version, whether it worked, why not, and the
/// request's own answer (flattened into the same object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    pub version: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub body: Option<T>,
}

impl<T> Answer<T> {
    pub fn ok(body: T) -> Answer<T> {
        Answer {
            version: JSON_VERSION,
            ok: true,
            error: None,
            body: Some(body),
        }
    }

    pub fn refused(error: impl std::fmt::Display) -> Answer<T> {
        Answer {
            version: JSON_VERSION,
            ok: false,
            error: Some(error.to_string()),
            body: None,
        }
    }
}

/// `attach` and `attach-volume`: the image the device now serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub image: String,
}

/// `detach`: what happened to the device's image or volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub result: String,
}

/// `resize`: the devices whose size changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resized {
    pub resized: Vec<ResizedDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizedDevice {
    pub backend: String,
    pub sectors: u64,
}

/// `limit`: the limits now in force on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsNow {
    /// `domain` or `device`.
    pub target: String,
    pub domid: u32,
    /// The device's id (a device target).
    pub devid: Option<u32>,
    /// `vbd` or `vbd3` (a device target).
    #[serde(default)]
    pub kind: Option<String>,
    /// The target in words.
    pub describe: String,
    pub limits: Limits,
    /// The limits in their text form (`read-iops=500 burst=100ms`).
    pub summary: String,
}

/// `status`: the daemon and every device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// When the counters were read, microseconds of the daemon's monotonic
    /// clock (rates from two answers do not depend on the reader's timing).
    pub sampled_us: u64,
    pub daemon: DaemonStatus,
    pub devices: Vec<DeviceStatusJson>,
}

/// The `daemon` object of a `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// refblk's version.
    pub version: String,
    /// The git commit it was built from.
    pub commit: String,
    pub pid: u32,
    pub workers: Option<usize>,
    pub devices: usize,
    pub uptime_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

/// One device of a `status` answer (schema in docs/operations.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatusJson {
    /// `vbd` or `vbd3`.
    #[serde(default = "vbd")]
    pub kind: String,
    pub domid: u32,
    pub devid: u32,
    pub backend: String,
    pub image: Option<String>,
    /// The xenbus state's name (`Connected`).
    pub state: String,
    pub queues: usize,
    pub protocol: Option<String>,
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub errors: u64,
    pub fdatasyncs: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub replayed: u64,
    pub domain_name: Option<String>,
    pub vdev: Option<String>,
    pub waiting_for_commit: Option<String>,
    pub stats: StatsSnapshot,
    pub limits: Limits,
    pub domain_limits: Limits,
}

fn vbd() -> String {
    "vbd".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let reqs = [
            "attach /local/domain/0/backend/vbd/5/51712 /srv/a.img",
            "attach /local/domain/0/backend/vbd3/5/51712 /srv/a.img ro sector-size=4096 read-iops=500",
            "attach-volume /local/domain/0/backend/vbd/5/51712 /var/lib/qubes appvms/w/private iops=7",
            "detach /local/domain/0/backend/vbd/5/51712",
            "resize",
            "status",
            "limit work read-iops=5",
            "limit 5",
        ];
        for line in reqs {
            let r = Request::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let back = r.to_line().unwrap();
            assert_eq!(Request::parse(&back).unwrap(), r, "{line} -> {back}");
        }
        let r = Request::parse("attach be img ro sector-size=4096 write-bps=1M").unwrap();
        let Request::Attach { options, .. } = r else {
            panic!("{r:?}")
        };
        assert!(options.read_only);
        assert_eq!(options.sector_size, Some(4096));
        assert_eq!(options.limits.write_bps, Some(1 << 20));
    }

    #[test]
    fn bad_lines_are_refused_with_the_reason() {
        for (line, word) in [
            ("", "empty"),
            ("frobnicate", "unknown request"),
            ("attach onlyone", "usage: attach"),
            ("attach-volume be pool", "usage: attach-volume"),
            ("detach", "usage: detach"),
            ("detach a b", "usage: detach"),
            ("attach be img rw", "unknown option"),
            ("attach be img sector-size=big", "unknown option"),
            ("attach be img read-iops=x", "read-iops"),
            ("limit", "usage: limit"),
            ("limit 5 reads=1", "unknown limit"),
        ] {
            let e = Request::parse(line).unwrap_err().to_string();
            assert!(e.contains(word), "{line:?}: {e}");
        }
        let r = Request::Detach {
            backend: "a b".into(),
        };
        assert!(r.to_line().is_err());
    }

    #[test]
    fn answers_keep_their_shape() {
        let a = Answer::ok(Attached {
            image: "/srv/a.img".into(),
        });
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 1, "ok": true, "image": "/srv/a.img"})
        );
        let r: Answer<Attached> = Answer::refused("no such device");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 1, "ok": false, "error": "no such device"})
        );
        let back: Answer<Attached> = serde_json::from_value(v).unwrap();
        assert_eq!((back.ok, back.body), (false, None));
    }
}
