//! `numapin`: pin node-local memory through VFIO from the command line.
//!
//! Every failure prints one line on stderr (`numapin: error: …`, the cause
//! and what to do) and exits non-zero.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("numapin: error: {e}");
            ExitCode::FAILURE
        }
    }
}
