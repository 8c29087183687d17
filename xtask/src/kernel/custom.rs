//! The self-built kernel: Debian's `linux-source-7.3` at its pinned version
//! (from trixie-backports through a private apt state), `make tinyconfig`,
//! the repo's fragment enabled with `scripts/config -e`, `make olddefconfig`,
//! a check that every requested option survived (scripts/config accepts
//! names the kernel does not have), then `make bzImage`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::fragment::Fragment;
use super::{Cache, Kernel, KernelKind, RECIPE, find_deb, key_part, pins, side_apt};
use crate::{cmd, layout};

/// Returns the custom kernel and whether it was built just now.
pub fn prepare(cache: &Cache) -> Result<(Kernel, bool)> {
    let fragment_path = layout::guest_dir().join("kernel.config");
    let text = fs::read_to_string(&fragment_path)
        .with_context(|| format!("could not read {}", fragment_path.display()))?;
    let fragment = Fragment::parse(&text)?;
    let pin = pins::of(KernelKind::Custom);
    let (source, version) = (pin.package, pin.version);
    let key = format!(
        "custom-{}-{}-r{RECIPE}",
        key_part(version),
        &fragment.hash()[..12]
    );
    let entry = cache.entry(&key);
    if entry.is_dir() {
        return Ok((Kernel::load(KernelKind::Custom, &entry)?, false));
    }
    let side = side_apt(cache, pin)?;

    let log = cache.log(&key);
    let _ = fs::remove_file(&log);
    println!(
        "    building {source} {version} (a few minutes; log: {})",
        log.display()
    );
    let scratch = cache.scratch("custom")?;
    let start = Instant::now();
    side.download(source, version, scratch.path())?;
    let deb = find_deb(scratch.path())?;
    let unpacked = scratch.path().join("deb");
    cmd::output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    fs::remove_file(&deb)?;
    let tarball = unpacked.join(format!("usr/src/{source}.tar.xz"));
    cmd::run_logged(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(scratch.path()),
        &log,
    )?;
    let tree = scratch.path().join(source);
    if !tree.join("Makefile").is_file() {
        bail!("{} did not unpack to {}", tarball.display(), tree.display());
    }
    println!("    fetched and unpacked in {}", cmd::secs(start.elapsed()));

    let staged = scratch.path().join("entry");
    build(&tree, &fragment, &staged, &log)?;
    fs::write(staged.join("origin"), format!("{source} {version}\n"))?;
    println!("    built in {}", cmd::secs(start.elapsed()));
    let dir = cache.commit(&staged, &key)?;
    Ok((Kernel::load(KernelKind::Custom, &dir)?, true))
}

/// Configures and builds `tree`, then stages bzImage, .config and the release.
fn build(tree: &Path, fragment: &Fragment, staged: &Path, log: &Path) -> Result<()> {
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.current_dir(tree)
            .env("KBUILD_BUILD_USER", "numapin")
            .env("KBUILD_BUILD_HOST", "xtask")
            .args(args);
        c
    };
    cmd::run_logged(&mut make(&["tinyconfig"]), log)?;
    cmd::run_logged(
        Command::new(tree.join("scripts/config"))
            .current_dir(tree)
            .args(["--file", ".config"])
            .args(fragment.enable_args()),
        log,
    )?;
    cmd::run_logged(&mut make(&["olddefconfig"]), log)?;
    let dotconfig = fs::read_to_string(tree.join(".config"))?;
    let missing = fragment.missing_in(&dotconfig);
    if !missing.is_empty() {
        bail!(
            "after `make olddefconfig` these options of xtask/guest/kernel.config are not =y \
             (a dependency is missing from the fragment, or the option does not exist in this \
             kernel): {}",
            missing
                .iter()
                .map(|o| format!("CONFIG_{o}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
    let start = Instant::now();
    cmd::run_logged(&mut make(&[&format!("-j{jobs}"), "bzImage"]), log)?;
    println!("    make -j{jobs} bzImage: {}", cmd::secs(start.elapsed()));
    let release = cmd::output(make(&["-s", "kernelrelease"]).stderr(std::process::Stdio::null()))?;

    fs::create_dir_all(staged)?;
    let image: PathBuf = tree.join("arch/x86/boot/bzImage");
    fs::copy(&image, staged.join("vmlinuz"))
        .with_context(|| format!("the build made no {}", image.display()))?;
    fs::copy(tree.join(".config"), staged.join("config"))?;
    fs::write(staged.join("release"), format!("{}\n", release.trim()))?;
    Ok(())
}
