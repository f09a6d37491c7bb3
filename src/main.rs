use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = refblk::cli::Cli::parse();
    match refblk::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refblk: {e}");
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}
