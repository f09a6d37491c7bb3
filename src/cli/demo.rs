//! `refblk demo` (to be written).

use super::{CliError, CliResult};

/// Arguments of `refblk demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

/// Run `refblk demo`.
pub fn run(_args: DemoArgs) -> CliResult {
    Err(CliError::failed("refblk demo: not built yet"))
}
