//! `cargo xtask dist`: shell completions and man pages, generated from the
//! CLI's clap definitions, into dist/.
//!
//! The generator is the `numapin` binary itself (its hidden `__generate DIR`
//! subcommand), so the files describe exactly the parser that ships. The
//! host test `dist_is_fresh` in tests/cli.rs regenerates them and fails when
//! the committed files differ.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

use crate::{cmd, layout};

/// The generated directories under dist/.
const GENERATED: &[&str] = &["completions", "man"];

/// Rebuilds `numapin` and writes dist/completions and dist/man afresh.
pub fn dist() -> Result<ExitCode> {
    let dist = layout::root().join("dist");
    for d in GENERATED {
        let path = dist.join(d);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("could not remove {}", path.display()))?;
        }
    }
    let mut c = Command::new(layout::cargo());
    c.current_dir(layout::root())
        .args([
            "run",
            "--quiet",
            "--features",
            "cli",
            "--bin",
            "numapin",
            "--",
        ])
        .arg("__generate")
        .arg(&dist);
    cmd::run(&mut c)?;
    println!(
        "wrote {}/{{{}}}; commit them",
        dist.display(),
        GENERATED.join(",")
    );
    Ok(ExitCode::SUCCESS)
}
