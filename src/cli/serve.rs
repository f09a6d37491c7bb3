//! `refblk serve` (to be written).

use super::{CliError, CliResult};

/// Arguments of `refblk serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

/// Run `refblk serve`.
pub fn run(_args: ServeArgs) -> CliResult {
    Err(CliError::failed("refblk serve: not built yet"))
}
