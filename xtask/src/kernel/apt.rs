//! apt, used two ways: the system's own sources (for the stock kernel), and a
//! private sources list with its own state directory (for `linux-source-6.12`,
//! which bookworm's default sources lack). The private one never touches the
//! system's apt configuration, lists or caches.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::{cmd, layout};

/// The keyring that signs bookworm, bookworm-backports and trixie.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

static SYSTEM_LISTS_REFRESHED: AtomicBool = AtomicBool::new(false);

/// As root, runs the system's `apt-get update` once per xtask run, so that
/// "the current stock kernel" means the current one. Not root: the lists are
/// used as they are. A failure only warns: a cached kernel may still do.
pub fn refresh_system_lists() {
    if !layout::is_root() || SYSTEM_LISTS_REFRESHED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut update = Command::new("apt-get");
    update.args(["-q", "update"]);
    if let Err(err) = cmd::output(&mut update) {
        eprintln!("    warning: {err:#}");
    }
}

/// An apt pointed at one suite of the Debian archive, with its lists and
/// caches in `dir`.
pub struct SideApt {
    dir: PathBuf,
}

impl SideApt {
    /// Sets up `dir` for `deb <mirror> <suite> main`, signed by Debian's keyring.
    pub fn new(dir: PathBuf, mirror: &str, suite: &str) -> Result<SideApt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("could not create {}", dir.join(sub).display()))?;
        }
        let line = format!("deb [signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n");
        fs::write(dir.join("sources.list"), line)?;
        Ok(SideApt { dir })
    }

    /// The `-o` options that point apt at `dir` instead of the system's state.
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "-o".into(),
            format!("Dir::Etc::sourcelist={d}/sources.list"),
            "-o".into(),
            "Dir::Etc::sourceparts=-".into(),
            "-o".into(),
            format!("Dir::State::Lists={d}/lists"),
            "-o".into(),
            format!("Dir::Cache={d}/cache"),
            "-o".into(),
            "APT::Get::List-Cleanup=0".into(),
        ]
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(self.options());
        if layout::is_root() {
            // Our directories are root's; apt's download sandbox user can't write them.
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c
    }

    pub fn update(&self) -> Result<()> {
        cmd::output(self.command("apt-get").args(["-q", "update"])).map(drop)
    }

    /// The candidate version of `pkg` in this suite.
    pub fn candidate(&self, pkg: &str) -> Result<String> {
        let out = cmd::output(self.command("apt-cache").args(["policy", pkg]))?;
        parse_candidate(&out).with_context(|| {
            format!(
                "{pkg} is not in {}/sources.list's suite",
                self.dir.display()
            )
        })
    }

    /// `apt-get download pkg=version` into `dest`.
    pub fn download(&self, pkg: &str, version: &str, dest: &Path) -> Result<()> {
        cmd::output(self.command("apt-get").current_dir(dest).args([
            "-q",
            "download",
            &format!("{pkg}={version}"),
        ]))
        .map(drop)
    }
}

/// The system apt's `apt-cache` / `apt-get`.
fn system(program: &str) -> Command {
    let mut c = Command::new(program);
    if layout::is_root() {
        c.args(["-o", "APT::Sandbox::User=root"]);
    }
    c
}

/// The versioned image package the metapackage `meta` depends on, e.g.
/// `linux-image-amd64` → `linux-image-6.1.0-56-amd64`.
pub fn system_image_package(meta: &str) -> Result<String> {
    let out = cmd::output(system("apt-cache").args(["depends", meta]))?;
    parse_image_depends(&out).with_context(|| {
        format!(
            "`apt-cache depends {meta}` names no linux-image package; \
             run `apt-get update` (as root) and try again"
        )
    })
}

/// The candidate version of `pkg` in the system's sources.
pub fn system_candidate(pkg: &str) -> Result<String> {
    let out = cmd::output(system("apt-cache").args(["policy", pkg]))?;
    parse_candidate(&out).with_context(|| format!("apt has no candidate for {pkg}"))
}

/// `apt-get download pkg=version` from the system's sources into `dest`.
pub fn system_download(pkg: &str, version: &str, dest: &Path) -> Result<()> {
    cmd::output(system("apt-get").current_dir(dest).args([
        "-q",
        "download",
        &format!("{pkg}={version}"),
    ]))
    .map(drop)
}

/// Picks the versioned kernel image from `apt-cache depends` output:
///
/// ```text
/// linux-image-amd64
///   Depends: linux-image-6.1.0-56-amd64
/// ```
fn parse_image_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches('|');
            line.strip_prefix("Depends:")
        })
        .map(|dep| dep.trim().trim_matches(|c| c == '<' || c == '>'))
        .find(|dep| {
            dep.strip_prefix("linux-image-")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_owned)
}

/// The `Candidate:` of `apt-cache policy` output (`(none)` counts as none).
fn parse_candidate(out: &str) -> Result<String> {
    let candidate = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim);
    match candidate {
        Some("(none)") | None => bail!("no candidate version"),
        Some(version) => Ok(version.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_from_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_image_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
    }

    #[test]
    fn image_from_depends_skips_other_packages_and_alternatives() {
        let out = "linux-image-amd64\n  Depends: linux-base\n |Depends: <linux-image-6.12.9-amd64>\n  Depends: linux-image-6.12.10-amd64\n";
        assert_eq!(
            parse_image_depends(out).as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(parse_image_depends("linux-image-amd64\n"), None);
        assert_eq!(
            parse_image_depends("  Depends: linux-image-amd64-signed\n"),
            None
        );
    }

    #[test]
    fn candidate_from_policy() {
        let out = "linux-source-6.12:\n  Installed: (none)\n  Candidate: 6.12.95-1~bpo12+1\n  Version table:\n     6.12.95-1~bpo12+1 100\n";
        assert_eq!(parse_candidate(out).unwrap(), "6.12.95-1~bpo12+1");
    }

    #[test]
    fn no_candidate() {
        assert!(parse_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n").is_err());
        assert!(parse_candidate("").is_err());
    }
}
