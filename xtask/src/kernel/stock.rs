//! Debian's stock kernels (Debian 12's 6.1, Debian 13's 6.12 and the newest
//! in trixie-backports), each at its pinned version ([`super::pins`]),
//! fetched with `apt-get download` through a private apt state and unpacked
//! with `dpkg -x`. Only the image, its config and the VFIO modules
//! (decompressed, in load order) are kept.
//!
//! Up to 6.12 one `linux-image-<abi>` package holds `/boot/vmlinuz-<abi>`,
//! `/boot/config-<abi>` and the modules. From 7.x that package is empty and
//! depends on `linux-binary-<abi>` (`/usr/lib/modules/<abi>/vmlinuz`),
//! `linux-modules-<abi>` (the `.ko.xz` files) and `linux-base-<abi>`
//! (`/usr/lib/modules/<abi>/config`); all three are fetched then.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Cache, Kernel, KernelKind, RECIPE, key_part, modules, pins, side_apt};
use crate::cmd;

/// The modules /init must load: vfio-pci (for the edu devices) and the type1
/// IOMMU backend; their dependencies (vfio, irqbypass, vfio-pci-core and, up
/// to 6.1, vfio_virqfd) follow from `.modinfo`.
const MODULE_ROOTS: &[&str] = &["vfio_iommu_type1", "vfio_pci"];

/// Modules loaded when the kernel has them as modules: the virtio-iommu
/// driver (`CONFIG_VIRTIO_IOMMU=m` in Debian's kernels). It must be loaded
/// before /init binds the edu devices, whose IOMMU it then is.
const OPTIONAL_ROOTS: &[&str] = &["virtio_iommu"];

/// The split packages a 7.x `linux-image-<abi>` depends on.
const SPLIT_PARTS: &[&str] = &["linux-binary-", "linux-modules-", "linux-base-"];

/// Returns the pinned stock kernel of `kind` and whether it was fetched just now.
pub fn prepare(cache: &Cache, kind: KernelKind) -> Result<(Kernel, bool)> {
    let pin = pins::of(kind);
    let key = format!(
        "{}-{}-{}-r{RECIPE}",
        kind.name(),
        key_part(pin.package),
        key_part(pin.version)
    );
    let entry = cache.entry(&key);
    if entry.is_dir() {
        return Ok((Kernel::load(kind, &entry)?, false));
    }
    let side = side_apt(cache, pin)?;
    let mut packages = vec![pin.package.to_owned()];
    let abi = pin.package.trim_start_matches("linux-image-");
    let depends = side.depends(pin.package)?;
    if depends.iter().any(|d| d == &format!("linux-binary-{abi}")) {
        packages = SPLIT_PARTS.iter().map(|p| format!("{p}{abi}")).collect();
    }
    println!("    fetching {} {}", packages.join(" "), pin.version);
    let scratch = cache.scratch(kind.name())?;
    let unpacked = scratch.path().join("deb");
    for pkg in &packages {
        let dl = scratch.path().join("dl");
        fs::create_dir_all(&dl)?;
        side.download(pkg, pin.version, &dl)?;
        let deb = super::find_deb(&dl)?;
        cmd::output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        fs::remove_dir_all(&dl)?;
    }
    let staged = scratch.path().join("entry");
    stage(
        &unpacked,
        &staged,
        &format!("{} {} ({})", pin.package, pin.version, pin.suites()),
    )?;
    let dir = cache.commit(&staged, &key)?;
    Ok((Kernel::load(kind, &dir)?, true))
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
    // /boot/vmlinuz-<abi> up to 6.12, /usr/lib/modules/<abi>/vmlinuz from 7.x.
    let first = |candidates: [PathBuf; 2]| candidates.into_iter().find(|p| p.is_file());
    let image = first([
        boot.join(format!("vmlinuz-{release_name}")),
        release.join("vmlinuz"),
    ])
    .with_context(|| {
        format!(
            "the kernel package has neither boot/vmlinuz-{release_name} nor {}",
            release.join("vmlinuz").display()
        )
    })?;
    let out_modules = staged.join("modules");
    fs::create_dir_all(&out_modules)?;
    fs::copy(&image, staged.join("vmlinuz"))?;
    let config = first([
        boot.join(format!("config-{release_name}")),
        release.join("config"),
    ]);
    if let Some(config) = &config {
        fs::copy(config, staged.join("config"))?;
    }

    let index = modules::index(&release.join("kernel"))?;
    let mut bytes = std::collections::HashMap::new();
    let mut roots: Vec<&str> = OPTIONAL_ROOTS
        .iter()
        .copied()
        .filter(|m| index.contains_key(*m))
        .collect();
    roots.extend(MODULE_ROOTS);
    let order = modules::load_order(&roots, |name| {
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
