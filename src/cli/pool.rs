//! `refblk pool` and `refblk volume` (to be written).

use super::{CliError, CliResult};

/// `refblk pool ...`
#[derive(clap::Subcommand, Debug)]
pub enum PoolCommand {}

/// `refblk volume ...`
#[derive(clap::Subcommand, Debug)]
pub enum VolumeCommand {}

/// Run a pool command.
pub fn run_pool(_c: PoolCommand) -> CliResult {
    Err(CliError::failed("not built yet"))
}

/// Run a volume command.
pub fn run_volume(_c: VolumeCommand) -> CliResult {
    Err(CliError::failed("not built yet"))
}
