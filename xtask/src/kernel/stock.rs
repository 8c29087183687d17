//! Debian's stock kernel: resolved from `linux-image-amd64` at run time,
//! fetched with `apt-get download`, unpacked with `dpkg -x`. Only the image,
//! its config and the VFIO modules (decompressed, in load order) are kept.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Cache, Kernel, KernelKind, RECIPE, apt, find_deb, key_part, modules};
use crate::cmd;

/// The metapackage whose dependency names the current stock kernel.
const META: &str = "linux-image-amd64";

/// The modules /init must load: vfio-pci (for the edu device) and the type1
/// IOMMU backend; their dependencies (vfio, vfio_virqfd, irqbypass,
/// vfio-pci-core) follow from `.modinfo`.
const MODULE_ROOTS: &[&str] = &["vfio_iommu_type1", "vfio_pci"];

/// Returns the stock kernel and whether it was fetched just now.
pub fn prepare(cache: &Cache) -> Result<(Kernel, bool)> {
    let suffix = format!("-r{RECIPE}");
    apt::refresh_system_lists();
    let resolved =
        apt::system_image_package(META).and_then(|pkg| Ok((apt::system_candidate(&pkg)?, pkg)));
    let (version, pkg) = match resolved {
        Ok(found) => found,
        Err(err) => match cache.newest("stock-", &suffix) {
            Some(dir) => {
                eprintln!(
                    "    warning: could not resolve the current stock kernel ({err:#}); \
                     using the cached {}",
                    dir.display()
                );
                return Ok((Kernel::load(KernelKind::Stock, &dir)?, false));
            }
            None => return Err(err),
        },
    };
    let key = format!("stock-{}-{}{suffix}", key_part(&pkg), key_part(&version));
    let entry = cache.entry(&key);
    if entry.is_dir() {
        return Ok((Kernel::load(KernelKind::Stock, &entry)?, false));
    }
    println!("    fetching {pkg} {version}");
    let scratch = cache.scratch("stock")?;
    apt::system_download(&pkg, &version, scratch.path())?;
    let deb = find_deb(scratch.path())?;
    let unpacked = scratch.path().join("deb");
    cmd::output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let staged = scratch.path().join("entry");
    stage(&unpacked, &staged, &format!("{pkg} {version}"))?;
    let dir = cache.commit(&staged, &key)?;
    Ok((Kernel::load(KernelKind::Stock, &dir)?, true))
}

/// Builds the cache entry in `staged` from the unpacked package.
fn stage(unpacked: &Path, staged: &Path, origin: &str) -> Result<()> {
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d))
        .find(|d| d.is_dir())
        .context("the kernel package has no lib/modules directory")?;
    let release = only_child(&modules_root)?;
    let release_name = release.file_name().unwrap().to_string_lossy().into_owned();
    let boot = unpacked.join("boot");
    let image = boot.join(format!("vmlinuz-{release_name}"));
    if !image.is_file() {
        bail!("the kernel package has no {}", image.display());
    }
    let out_modules = staged.join("modules");
    fs::create_dir_all(&out_modules)?;
    fs::copy(&image, staged.join("vmlinuz"))?;
    let config = boot.join(format!("config-{release_name}"));
    if config.is_file() {
        fs::copy(&config, staged.join("config"))?;
    }

    let index = modules::index(&release.join("kernel"))?;
    let mut bytes = std::collections::HashMap::new();
    let order = modules::load_order(MODULE_ROOTS, |name| {
        let path = index.get(name).with_context(|| {
            format!("the stock kernel ships no module `{name}` (is VFIO built in or missing?)")
        })?;
        let data = modules::read_decompressed(path)?;
        let info =
            modules::modinfo(&data).with_context(|| format!("reading {}", path.display()))?;
        bytes.insert(name.to_owned(), data);
        Ok(modules::depends(&info))
    })?;
    let mut listing = String::new();
    for name in &order {
        let file = format!("{name}.ko");
        fs::write(out_modules.join(&file), &bytes[name])?;
        listing.push_str(&file);
        listing.push('\n');
    }
    fs::write(out_modules.join("load-order"), listing)?;
    fs::write(staged.join("release"), format!("{release_name}\n"))?;
    fs::write(staged.join("origin"), format!("{origin}\n"))?;
    println!("    modules, in load order: {}", order.join(" "));
    Ok(())
}

/// The single subdirectory of `dir` (the kernel release under lib/modules).
fn only_child(dir: &Path) -> Result<PathBuf> {
    let mut dirs = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path());
    match (dirs.next(), dirs.next()) {
        (Some(d), None) => Ok(d),
        _ => bail!(
            "expected exactly one kernel release under {}",
            dir.display()
        ),
    }
}
