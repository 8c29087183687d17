//! Command line and results file of the guest programs (the VM suite and
//! the bench). Shared by path: `#[path = "../common/args.rs"] mod args;`.

use std::fs::File;

/// The value after `key` on the command line, if any.
pub fn value(key: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The results file named by `--results` (default `/dev/ttyS1`, the
/// second serial port); `prog` exits with 2 when it cannot be opened.
pub fn open_results(prog: &str) -> File {
    let path = value("--results").unwrap_or_else(|| "/dev/ttyS1".into());
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{prog}: cannot open results {path}: {e}");
            std::process::exit(2);
        }
    }
}
