//! Host packages: check with dpkg, install with apt-get as root, otherwise
//! say exactly what to run.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{cmd, layout};

/// Packages every VM run needs: QEMU (with SeaBIOS), a static busybox for the
/// initramfs, and the decompressors for kernel modules and source tarballs.
pub const VM: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "gzip",
    "xz-utils",
    "zstd",
];

/// Packages the stock kernel needs on top of [`VM`]: apt fetches it, dpkg unpacks it.
pub const STOCK_KERNEL: &[&str] = &["apt", "dpkg"];

/// Packages building the custom kernel needs (`make tinyconfig` … `bzImage`).
pub const KERNEL_BUILD: &[&str] = &[
    "make",
    "gcc",
    "libc6-dev",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "tar",
];

/// Makes sure every package in `wanted` is installed.
///
/// As root, runs `apt-get update` and `apt-get install` for the missing ones;
/// otherwise fails with the exact command to run.
pub fn ensure(wanted: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for &pkg in wanted {
        if !missing.contains(&pkg) && !installed(pkg)? {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !layout::is_root() {
        bail!(
            "missing host packages: {list}\n\
             install them (as root) and run again:\n    \
             sudo apt-get update && sudo apt-get install -y --no-install-recommends {list}"
        );
    }
    println!("==> installing host packages: {list}");
    cmd::run(Command::new("apt-get").args(["-q", "update"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "-y", "--no-install-recommends", "install"])
            .args(&missing),
    )?;
    let still: Vec<&str> = missing
        .into_iter()
        .filter(|p| !installed(p).unwrap_or(false))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// Whether dpkg has `pkg` installed (status `ii`).
fn installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", pkg])
        .output();
    match out {
        Ok(out) => Ok(is_installed_status(&String::from_utf8_lossy(&out.stdout))),
        Err(err) => {
            bail!("could not run dpkg-query ({err}): numapin's VM tests need a Debian host")
        }
    }
}

/// Parses `dpkg-query -f '${db:Status-Abbrev}'`: `ii ` means installed;
/// `rc`, `un` or nothing (unknown package) mean not.
fn is_installed_status(abbrev: &str) -> bool {
    abbrev.starts_with("ii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_abbrev() {
        assert!(is_installed_status("ii "));
        assert!(!is_installed_status("rc "));
        assert!(!is_installed_status("un "));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn lists_have_no_blank_names() {
        for pkg in VM.iter().chain(STOCK_KERNEL).chain(KERNEL_BUILD) {
            assert!(!pkg.is_empty() && !pkg.contains(' '), "{pkg:?}");
        }
    }
}
