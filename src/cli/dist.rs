//! `numapin __generate DIR`: shell completions and man pages from the clap
//! definitions, for `cargo xtask dist` to write into dist/.
//!
//! The generator is the binary itself, so what dist/ holds is exactly what
//! this build of `numapin` parses; a host test regenerates and compares.

use std::path::Path;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;
use numapin::{Error, Result};

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::sys(format!("create {}", dir.display()), "", e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::sys(format!("write {}", path.display()), "", e))
}

/// The command as users see it: `numapin`'s name, version and about, and
/// the user commands, without the hidden generator.
pub fn command() -> clap::Command {
    let full = super::Cli::command();
    let base = clap::Command::new("numapin")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .subcommand_required(true);
    super::Command::augment_subcommands(base)
}

/// Writes `completions/` (bash, zsh, fish) and `man/` (numapin.1 and one
/// page per subcommand) under `dir`.
pub fn generate(dir: &Path) -> Result<()> {
    for (shell, file) in [
        (Shell::Bash, "numapin.bash"),
        (Shell::Zsh, "_numapin"),
        (Shell::Fish, "numapin.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command(), "numapin", &mut out);
        write(&dir.join("completions").join(file), &out)?;
    }
    let mut cmd = command();
    cmd.build();
    let render = |c: clap::Command, file: String| -> Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(c)
            .render(&mut out)
            .map_err(|e| Error::sys("render the man page", "", e))?;
        write(&dir.join("man").join(file), &out)
    };
    // After build(), each subcommand's display name is `numapin-NAME`,
    // which clap_mangen uses as the page's title.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("numapin-{}", sub.get_name());
        render(sub.clone(), format!("{name}.1"))?;
    }
    render(cmd, "numapin.1".into())
}
