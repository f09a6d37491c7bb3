//! `refblk sim` (to be written).

use super::{CliError, CliResult};

/// Arguments of `refblk sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {}

/// Run `refblk sim`.
pub fn run(_args: SimArgs) -> CliResult {
    Err(CliError::failed("refblk sim: not built yet"))
}
