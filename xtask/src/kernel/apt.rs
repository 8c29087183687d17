//! A private apt: its own sources list and state directory per set of
//! suites, so that fetching a guest kernel never touches the system's apt
//! configuration, lists or caches.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::pins::Archive;
use crate::{cmd, layout};

/// The keyring that signs bookworm and trixie (and their updates, security
/// and backports suites).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// An apt pointed at some suites of the Debian archives, with its lists and
/// caches in `dir`.
pub struct SideApt {
    dir: PathBuf,
}

impl SideApt {
    /// Sets up `dir` for one `deb <archive> <suite> main` line per source,
    /// signed by Debian's keyring.
    pub fn new(dir: PathBuf, sources: &[(Archive, &str)]) -> Result<SideApt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("could not create {}", dir.join(sub).display()))?;
        }
        let lines: String = sources
            .iter()
            .map(|(archive, suite)| {
                format!(
                    "deb [signed-by={DEBIAN_KEYRING}] {} {suite} main\n",
                    archive.url()
                )
            })
            .collect();
        fs::write(dir.join("sources.list"), lines)?;
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

    /// Every version of `pkg` these suites carry (empty when none).
    pub fn versions(&self, pkg: &str) -> Result<Vec<String>> {
        let out = cmd::output(self.command("apt-cache").args(["madison", pkg]))?;
        Ok(parse_madison(&out, pkg))
    }

    /// The newest versioned package `meta` depends on (the candidate's
    /// dependency starting with `prefix` and a digit), with its version.
    pub fn newest(&self, meta: &str, prefix: &str) -> Result<(String, String)> {
        let out = cmd::output(self.command("apt-cache").args(["depends", meta]))?;
        let pkg = parse_versioned_depends(&out, prefix).with_context(|| {
            format!("`apt-cache depends {meta}` names no {prefix}<version> package")
        })?;
        let out = cmd::output(self.command("apt-cache").args(["policy", &pkg]))?;
        let version = parse_candidate(&out).with_context(|| format!("{pkg} has no candidate"))?;
        Ok((pkg, version))
    }

    /// The packages `pkg` depends on (its candidate's `Depends:` lines,
    /// virtual ones left out).
    pub fn depends(&self, pkg: &str) -> Result<Vec<String>> {
        let out = cmd::output(self.command("apt-cache").args(["depends", pkg]))?;
        Ok(parse_depends(&out))
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

/// The real (not virtual, not alternative) `Depends:` of `apt-cache depends`:
///
/// ```text
/// linux-image-7.3.4+deb13-amd64
///  |Depends: <dracut>
///   Depends: linux-binary-7.3.4+deb13-amd64
/// ```
fn parse_depends(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .filter(|dep| !dep.starts_with('<'))
        .map(str::to_owned)
        .collect()
}

/// Picks the versioned package (`prefix` then a digit) from `apt-cache
/// depends` output, alternatives and virtual names included:
///
/// ```text
/// linux-image-amd64
///   Depends: linux-image-6.1.0-56-amd64
/// ```
fn parse_versioned_depends(out: &str, prefix: &str) -> Option<String> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches('|');
            line.strip_prefix("Depends:")
        })
        .map(|dep| dep.trim().trim_matches(|c| c == '<' || c == '>'))
        .find(|dep| {
            dep.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_owned)
}

/// The versions in `apt-cache madison` output (`pkg | version | source`).
fn parse_madison(out: &str, pkg: &str) -> Vec<String> {
    let mut versions: Vec<String> = out
        .lines()
        .filter_map(|line| {
            let mut cols = line.split('|').map(str::trim);
            (cols.next()? == pkg).then(|| cols.next().map(str::to_owned))?
        })
        .collect();
    versions.dedup();
    versions
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
            parse_versioned_depends(out, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
    }

    #[test]
    fn image_from_depends_skips_other_packages_and_alternatives() {
        let out = "linux-image-amd64\n  Depends: linux-base\n |Depends: <linux-image-6.12.9-amd64>\n  Depends: linux-image-6.12.10-amd64\n";
        assert_eq!(
            parse_versioned_depends(out, "linux-image-").as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(
            parse_versioned_depends("linux-image-amd64\n", "linux-image-"),
            None
        );
        assert_eq!(
            parse_versioned_depends("  Depends: linux-image-amd64-signed\n", "linux-image-"),
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

    #[test]
    fn versions_from_madison() {
        let out = "linux-source-7.2 | 7.2.12-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages\n\
                   linux-source-7.2 | 7.2.11-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages\n\
                   linux-source-7.20 | 7.20.1-1 | elsewhere\n";
        assert_eq!(
            parse_madison(out, "linux-source-7.2"),
            ["7.2.12-1~bpo13+1", "7.2.11-1~bpo13+1"]
        );
        assert!(parse_madison("", "linux-source-7.2").is_empty());
    }

    #[test]
    fn split_image_depends() {
        let out = "linux-image-7.3.4+deb13-amd64\n  PreDepends: linux-base\n |Depends: <dracut>\n  Depends: <linux-initramfs-tool>\n  Depends: linux-base-7.3.4+deb13-amd64\n  Depends: linux-binary-7.3.4+deb13-amd64\n  Depends: linux-modules-7.3.4+deb13-amd64\n  Breaks: <fwupdate>\n";
        assert_eq!(
            parse_depends(out),
            [
                "linux-base-7.3.4+deb13-amd64",
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
        assert_eq!(
            parse_versioned_depends(
                "linux-source\n  Depends: linux-source-7.3\n",
                "linux-source-"
            )
            .as_deref(),
            Some("linux-source-7.3")
        );
    }
}
