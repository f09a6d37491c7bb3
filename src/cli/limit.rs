//! `refblk limit`: change a domain's or a device's I/O limits on the running
//! daemon; also the limit flags of `refblk volume limit`.

use std::path::PathBuf;

use super::serve::DEFAULT_CONTROL;
use super::{socket_of, CliError, CliResult};
use refblk_core::backend::control;
use refblk_core::limits::{Limits, LimitsPatch, DEFAULT_BURST_MS};

/// The limit flags (0 = unlimited). Only the flags given change.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LimitArgs {
    /// Read operations per second (0 = unlimited, as for every rate).
    #[arg(long, value_name = "N")]
    pub read_iops: Option<String>,
    /// Write operations per second.
    #[arg(long, value_name = "N")]
    pub write_iops: Option<String>,
    /// Read and write operations per second (sets both).
    #[arg(long, value_name = "N")]
    pub iops: Option<String>,
    /// Read bytes per second, e.g. 20M, 512K, 1G (binary units).
    #[arg(long, value_name = "SIZE")]
    pub read_bps: Option<String>,
    /// Write bytes per second.
    #[arg(long, value_name = "SIZE")]
    pub write_bps: Option<String>,
    /// Read and write bytes per second (sets both).
    #[arg(long, value_name = "SIZE")]
    pub bps: Option<String>,
    /// Burst allowance: how much of the rate may be used at once after a
    /// quiet time, as a duration (100ms, 2s, 0.5). Default 100ms.
    #[arg(long, value_name = "DURATION")]
    pub burst: Option<String>,
    /// Remove every limit (all rates 0, burst back to the default).
    #[arg(long)]
    pub clear: bool,
}

impl LimitArgs {
    /// The change the flags ask for; bad values are a usage error (exit 2)
    /// naming the flag.
    pub fn patch(&self) -> Result<LimitsPatch, CliError> {
        let mut p = if self.clear {
            let mut p = LimitsPatch::all(Limits::UNLIMITED);
            p.burst_ms = Some(DEFAULT_BURST_MS);
            p
        } else {
            LimitsPatch::default()
        };
        // Both-ways keys first, so that --iops 100 --read-iops 50 means what it says.
        let keys = [
            ("iops", &self.iops),
            ("bps", &self.bps),
            ("read-iops", &self.read_iops),
            ("write-iops", &self.write_iops),
            ("read-bps", &self.read_bps),
            ("write-bps", &self.write_bps),
            ("burst", &self.burst),
        ];
        for (k, v) in keys {
            if let Some(v) = v {
                p.set(k, v).map_err(|e| CliError::usage(format!("--{e}")))?;
            }
        }
        Ok(p)
    }
}

/// Arguments of `refblk limit`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
TARGET is a domain (its id, e.g. 5, or its name, e.g. work) or one device: \
DOMAIN/VDEV (5/xvda, work/51712) or its backend path \
(/local/domain/0/backend/vbd/5/51712). A domain's limits are shared by all \
its devices; a request must pass both its device's and its domain's limits. \
A limited guest is slowed down (its requests wait), never failed. Without \
flags, prints the target's current limits.\n\n\
Exit codes: 0 ok, 1 the daemon refused (unknown target) or is unreachable, \
2 bad value.")]
pub struct LimitCmdArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "REFBLK_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Talk to the daemon of the simulated Xen in DIR (its DIR/refblk.sock;
    /// overrides --control).
    #[arg(long, value_name = "DIR")]
    pub sim: Option<PathBuf>,
    /// A domain (id or name) or a device (DOMAIN/VDEV or a backend path).
    pub target: String,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Run `refblk limit`.
pub fn run(a: LimitCmdArgs) -> CliResult {
    let patch = a.limits.patch()?;
    if a.target.is_empty() || a.target.contains(char::is_whitespace) {
        return Err(CliError::usage(format!("{:?}: bad target", a.target)));
    }
    // No flags: an empty change, the daemon answers with the current limits.
    let req = control::Request::Limit {
        target: a.target.clone(),
        patch,
    };
    let now: control::LimitsNow = control::call(&socket_of(&a.control, a.sim.as_deref()), &req)
        .map_err(|e| CliError::failed(e.to_string()))?;
    println!("{}: {}", now.describe, now.summary);
    Ok(())
}
