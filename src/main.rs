//! `numapin`: pin node-local memory through VFIO from the command line.
//!
//! Every failure prints one line on stderr (`numapin: error: <what
//! happened>; <what to do>`) and exits with its class's code
//! ([`numapin::ErrorKind::exit_code`]: 2 usage, 3 permission, 4 resource
//! limit, 5 device state, 6 guarantee broken, 7 internal; 128 + the signal
//! for a run cancelled by SIGINT or SIGTERM). With `--json` the error is
//! also printed on stdout as `{"error": {"kind", "message", "hint"}}`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Whether the command asked for JSON. Read from the raw arguments so an
    // error from any command (and from parsing its own values) honours it.
    let json = std::env::args().skip(1).any(|a| a == "--json");
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
            let kind = e.kind();
            let code = match (kind, cli::cancelling_signal()) {
                (numapin::ErrorKind::Cancelled, Some(sig)) => {
                    eprintln!("numapin: cancelled by {}: {line}", cli::signal_name(sig));
                    128 + sig as u8
                }
                _ => {
                    eprintln!("numapin: error: {line}");
                    kind.exit_code()
                }
            };
            // `check --json` already printed its document, failures included.
            if json && !matches!(e, numapin::Error::ChecksFailed { .. }) {
                let (message, hint) = match line.split_once("; ") {
                    Some((m, h)) => (m.to_string(), Some(h.to_string())),
                    None => (line.clone(), None),
                };
                let doc = serde_json::json!({
                    "error": { "kind": kind.name(), "message": message, "hint": hint }
                });
                println!("{doc}");
            }
            ExitCode::from(code)
        }
    }
}
