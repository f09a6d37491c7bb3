//! `refblk sim --dir DIR`: run the simulated Xen in the foreground.

use std::path::PathBuf;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::{CliError, CliResult};
use refblk_sim::SimXen;

/// Arguments of `refblk sim`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Runs in the foreground until SIGINT or SIGTERM, then removes its sockets. \
        A second `refblk sim` in the same DIR exits with code 5 and changes nothing \
        (DIR/sim.lock is held while one runs).\n\n\
        DIR/xenstored.sock serves the xenstore wire protocol (use XENSTORED_PATH=DIR/xenstored.sock \
        with xenstore-read/-write/-ls/-watch), DIR/evtchn.sock brokers event channels, and \
        simulated guests keep their memory and grant tables in DIR/dom/<domid>/. \
        Put DIR on tmpfs (e.g. /dev/shm) for speed; any directory works. \
        See docs/platform.md."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    /// Directory of the simulated machine (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<SimCommand>,
}

/// What else `refblk sim` does.
#[derive(clap::Subcommand, Debug)]
pub enum SimCommand {
    /// Start a simulated guest with a live (verified) workload on a running
    /// `refblk sim` + `refblk serve --sim`.
    Guest(super::simguest::GuestArgs),
}

/// Run `refblk sim`.
/// The backend platform of `refblk serve --sim DIR`: the simulated Xen
/// running in DIR. The only way `serve` reaches the simulator.
pub fn backend_platform(
    dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn refblk_core::platform::Platform>, CliError> {
    let p = refblk_sim::SimPlatform::new(dir).map_err(|e| {
        CliError::failed(format!(
            "simulated Xen in {}: {e} (start it with `refblk sim --dir {}`)",
            dir.display(),
            dir.display()
        ))
    })?;
    Ok(std::sync::Arc::new(p))
}

pub fn run(args: SimArgs) -> CliResult {
    if let Some(SimCommand::Guest(g)) = args.cmd {
        return super::simguest::run(g);
    }
    let Some(dir) = args.dir else {
        return Err(CliError::usage(
            "refblk sim: --dir DIR (run the simulated Xen) or `refblk sim guest ...`",
        ));
    };
    // Block the stop signals before any thread starts, so every thread inherits
    // the mask and only sigwait below sees them.
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| CliError::failed(format!("refblk sim: blocking signals: {e}")))?;
    // Another simulator in DIR? Find out before touching its sockets.
    let _instance = super::instance::instance_lock(&dir.join("sim.lock"), "refblk sim", &dir)?;
    let xs = dir.join(refblk_sim::XENSTORED_SOCK);
    if std::os::unix::net::UnixStream::connect(&xs).is_ok() {
        return Err(CliError {
            code: super::instance::INSTANCE_BUSY,
            msg: format!(
                "{}: another simulated Xen answers on this socket; stop it first (nothing was changed)",
                xs.display()
            ),
        });
    }
    let sim = SimXen::start(&dir)
        .map_err(|e| CliError::failed(format!("refblk sim: {}: {e}", dir.display())))?;
    log::info!(
        "simulated Xen running in {}: xenstored {}, event channels {}, domains in {}",
        sim.dir().display(),
        sim.xenstored_path().display(),
        sim.dir().join(refblk_sim::EVTCHN_SOCK).display(),
        sim.dir().join("dom").display()
    );
    let sig = set
        .wait()
        .map_err(|e| CliError::failed(format!("refblk sim: waiting for signals: {e}")))?;
    log::info!("{sig:?}: stopping the simulated Xen");
    drop(sim);
    Ok(())
}
