//! The `refblk` command line: one binary, one subcommand per job.

use std::fmt;

use clap::{Parser, Subcommand};

pub mod bench;
pub mod demo;
pub mod instance;
pub mod limit;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod serve;
pub mod signals;
pub mod sim;
pub mod simguest;
pub mod status;

/// A command's failure: a message for the administrator and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code (1 = operation failed, 2 = usage/bad input; commands may
    /// document more specific codes).
    pub code: i32,
    /// What went wrong, naming the file and the cause.
    pub msg: String,
}

impl CliError {
    /// A failure with exit code 1.
    pub fn failed(msg: impl Into<String>) -> Self {
        CliError {
            code: 1,
            msg: msg.into(),
        }
    }
    /// Bad input with exit code 2.
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError {
            code: 2,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for CliError {}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::failed(e.to_string())
    }
}

/// The control socket a client command uses: DIR/refblk.sock with `--sim
/// DIR`, else `--control` (which clap fills from `$REFBLK_CONTROL` or the
/// default).
pub fn socket_of(control: &std::path::Path, sim: Option<&std::path::Path>) -> std::path::PathBuf {
    match sim {
        Some(dir) => dir.join("refblk.sock"),
        None => control.to_path_buf(),
    }
}

/// Result of a subcommand.
pub type CliResult = Result<(), CliError>;

/// `refblk --version`: the package version and the git commit it was built
/// from (`unknown` outside a git checkout; see core/build.rs).
pub const VERSION: &str = refblk_core::VERSION;

/// refblk: a userspace Xen block backend for file images, with a reflink pool.
#[derive(Parser, Debug)]
#[command(name = "refblk", version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the simulated Xen (xenstored, grant tables, event channels) in a directory.
    Sim(sim::SimArgs),
    /// Serve blkif devices to guests (the dom0 daemon).
    Serve(serve::ServeArgs),
    /// Talk to a running `refblk serve` (attach, resize, status).
    Ctl(serve::CtlArgs),
    /// Show a simulated guest using a disk served by refblk.
    Demo(demo::DemoArgs),
    /// Manage reflink pools.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Manage volumes in a reflink pool.
    #[command(subcommand)]
    Volume(pool::VolumeCommand),
    /// Benchmark refblk against the raw image file and a loop device.
    Bench(bench::BenchArgs),
    /// Change (or show) the I/O limits of a domain or a device on the running daemon.
    Limit(limit::LimitCmdArgs),
    /// Show every device with its IOPS, MiB/s, latency and limits (--watch, --json).
    Status(status::StatusArgs),
    /// Write man pages (refblk.1, refblk-SUBCOMMAND.1) generated from the
    /// command line definitions into DIR (the package build uses it).
    #[command(hide = true)]
    GenMan {
        /// Output directory (created).
        dir: std::path::PathBuf,
    },
    /// Write bash, zsh and fish completions into DIR (refblk.bash, _refblk,
    /// refblk.fish).
    #[command(hide = true)]
    GenCompletions {
        /// Output directory (created).
        dir: std::path::PathBuf,
    },
}

/// Man pages for `refblk` and every visible subcommand (nested ones too).
fn gen_man(dir: &std::path::Path) -> CliResult {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    fn walk(cmd: &clap::Command, name: String, bin: String, dir: &std::path::Path) -> CliResult {
        // clap wants a 'static name (without its "string" feature); this
        // one-shot command may leak the few names.
        let n: &'static str = Box::leak(name.clone().into_boxed_str());
        let cmd = cmd.clone().name(n).display_name(n).bin_name(bin.clone());
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut buf)
            .map_err(|e| CliError::failed(format!("man page {name}: {e}")))?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let s = sub.get_name();
            walk(sub, format!("{name}-{s}"), format!("{bin} {s}"), dir)?;
        }
        Ok(())
    }
    walk(&cmd, "refblk".into(), "refblk".into(), dir)
}

/// Shell completions for bash, zsh and fish.
fn gen_completions(dir: &std::path::Path) -> CliResult {
    use clap::CommandFactory;
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = Cli::command();
        clap_complete::generate_to(shell, &mut cmd, "refblk", dir)
            .map_err(|e| CliError::failed(format!("{shell} completions: {e}")))?;
    }
    Ok(())
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Sim(a) => sim::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Ctl(a) => serve::run_ctl(a),
        Command::Demo(a) => demo::run(a),
        Command::Pool(c) => pool::run_pool(c),
        Command::Volume(c) => pool::run_volume(c),
        Command::Bench(a) => bench::run(a),
        Command::Limit(a) => limit::run(a),
        Command::Status(a) => status::run(a),
        Command::GenMan { dir } => gen_man(&dir),
        Command::GenCompletions { dir } => gen_completions(&dir),
    }
}
