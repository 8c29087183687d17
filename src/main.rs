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
            // One line: the error, then its causes.
            let mut line = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                line.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("numapin: error: {line}");
            ExitCode::FAILURE
        }
    }
}
