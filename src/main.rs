use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = refblk::cli::Cli::parse();
    // The demo prints its own story on stdout; keep the log to warnings unless asked.
    let default = match cli.command {
        refblk::cli::Command::Demo(_) => "warn",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
    match refblk::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refblk: {e}");
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}
