use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = refblk::cli::Cli::parse();
    // The demo prints its own story on stdout and the bench its progress on
    // stderr (its embedded daemon's info lines would bury it): keep the log
    // to warnings unless RUST_LOG asks.
    let default = match cli.command {
        refblk::cli::Command::Demo(_) | refblk::cli::Command::Bench(_) => "warn",
        _ => "info",
    };
    let mut log =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    let journal = stderr_is_journal();
    if journal {
        // journald stamps each line itself and reads the priority from a
        // `<N>` prefix (sd-daemon(3)): `journalctl -p warning` then works.
        log.format(|buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "<{}>{}: {}",
                syslog_priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    log.init();
    match refblk::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}refblk: {e}", if journal { "<3>" } else { "" });
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}

/// The syslog priority of a log level (3 err, 4 warning, 6 info, 7 debug).
fn syslog_priority(l: log::Level) -> u8 {
    match l {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether stderr is connected to journald: systemd sets `$JOURNAL_STREAM`
/// to the `device:inode` of that stream; it must match our stderr (a child
/// whose stderr was redirected inherits the variable but not the stream).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}
