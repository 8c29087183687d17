//! Running host commands with errors that name the command and what it said.

use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The command line as a person would type it (for messages).
pub fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '\'', '"', '$']) {
            let _ = write!(line, " '{}'", arg.replace('\'', r"'\''"));
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// Runs `cmd` with stdout and stderr appended to `log`; on failure the error
/// quotes the log's last lines and says where the whole log is.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("could not open log {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!(
            "`{}` failed ({status}); last lines of {}:\n{}",
            display(cmd),
            log.display(),
            tail(&text, 30)
        );
    }
    Ok(())
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `1.2s`, `4m17s`: short human durations for progress lines.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

/// Measures one step and prints `label ... done in 1.2s`.
pub fn timed<T>(label: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    println!("==> {label}");
    let value = f()?;
    println!("    {label}: {}", secs(start.elapsed()));
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", "Dir::Etc::sourceparts=-", "download", "a b", "it's"]);
        assert_eq!(
            display(&cmd),
            r"apt-get -o Dir::Etc::sourceparts=- download 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn secs_formats_short_and_long() {
        assert_eq!(secs(Duration::from_millis(1234)), "1.2s");
        assert_eq!(secs(Duration::from_secs(257)), "4m17s");
    }
}
