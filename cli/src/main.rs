//! `waybill`: the standalone relay and the operator commands of the waybill outbox and inbox.
//!
//! Run with: `waybill --database-url postgres://... status` (see `waybill --help`).
//!
//! Exit codes: 0 success, 1 runtime error (message on stderr, passwords redacted), 2 usage
//! error, 3 a destructive command was not confirmed (nothing written).

mod cli;
mod db;
mod error;
mod operate;
mod output;
#[cfg(feature = "postgres")]
mod partitions;
mod relay;

use std::process::ExitCode;

use clap::Parser;

use crate::error::CliError;

/// Exit code of a destructive command that was not confirmed.
const EXIT_ABORTED: u8 = 3;

/// Joins the lines of a message (libpq adds hints on lines of their own) so an error is one line.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines.join(" ")
}

fn main() -> ExitCode {
    let args = cli::Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match db::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Aborted) => {
            eprintln!("aborted: nothing was changed");
            ExitCode::from(EXIT_ABORTED)
        }
        Err(error) => {
            eprintln!("error: {}", one_line(&error::chain(&error)));
            ExitCode::FAILURE
        }
    }
}
