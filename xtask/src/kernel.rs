//! The guest kernels and their machine-wide cache.
//!
//! - `stock`, `trixie`, `backports`: Debian's own kernel images (Debian 12's
//!   6.1, Debian 13's 6.12, the newest in trixie-backports), unpacked from
//!   their .debs; their VFIO modules go into the initramfs.
//! - `custom`: Debian's `linux-source-7.3` (trixie-backports) built with
//!   `tinyconfig` plus the options in `xtask/guest/kernel.config`, everything
//!   built in.
//!
//! Every package version is pinned in [`pins`]; apt reads Debian's archives
//! through a private state under the cache, never the system's sources.
//!
//! A prepared kernel is a directory `<cache>/kernels/<key>/` holding `vmlinuz`,
//! `config`, `release` and, for the stock kernels, `modules/*.ko` with
//! `modules/load-order`. The key names what the kernel was made from (package
//! and version, fragment hash, [`RECIPE`]), so a pin or fragment change makes
//! a new entry and nothing else does; a cached entry needs no network. Entries
//! are assembled in `<cache>/tmp/` and renamed into place, so a killed run
//! leaves no half entry.

mod apt;
mod custom;
mod fragment;
mod modules;
pub mod pins;
mod stock;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, layout};

/// Bump when the way a cache entry is made changes (build steps, module
/// selection, entry layout): every cached kernel is then remade once.
/// (2: stock kernels from a private apt at pinned versions, 7.x split
/// packages, virtio-iommu module.)
pub const RECIPE: u32 = 2;

/// Which guest kernel a VM boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum KernelKind {
    /// Debian 12's stock kernel (6.1), VFIO as modules.
    Stock,
    /// Debian 13's stock kernel (6.12), VFIO as modules.
    Trixie,
    /// The newest stock kernel in trixie-backports (7.3), VFIO as modules.
    Backports,
    /// Self-built from trixie-backports' linux-source-7.3, everything built in.
    Custom,
}

impl KernelKind {
    pub const ALL: &[KernelKind] = &[
        KernelKind::Stock,
        KernelKind::Trixie,
        KernelKind::Backports,
        KernelKind::Custom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Stock => "stock",
            KernelKind::Trixie => "trixie",
            KernelKind::Backports => "backports",
            KernelKind::Custom => "custom",
        }
    }

    /// Whether this is one of Debian's own builds (fetched, not built).
    pub fn is_stock(self) -> bool {
        self != KernelKind::Custom
    }
}

/// A kernel ready to boot.
#[derive(Debug)]
pub struct Kernel {
    pub kind: KernelKind,
    /// The bzImage QEMU loads with `-kernel`.
    pub image: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// What it was made from, e.g. `linux-image-6.1.0-56-amd64 6.1.192-2`.
    pub origin: String,
    /// Modules for the initramfs, in the order /init loads them.
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// Reads a finished cache entry.
    fn load(kind: KernelKind, dir: &Path) -> Result<Kernel> {
        let read = |name: &str| {
            fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("cache entry {} lacks {name}", dir.display()))
        };
        let order = dir.join("modules").join("load-order");
        let modules = match fs::read_to_string(&order) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| dir.join("modules").join(l))
                .collect(),
            Err(_) => Vec::new(),
        };
        Ok(Kernel {
            kind,
            image: dir.join("vmlinuz"),
            release: read("release")?,
            origin: read("origin")?,
            modules,
        })
    }
}

/// Returns the kernel of `kind`, fetching or building it on first use.
pub fn prepare(kind: KernelKind) -> Result<Kernel> {
    println!("==> kernel {}", kind.name());
    let start = Instant::now();
    let cache = Cache::open()?;
    let (kernel, fresh) = match kind {
        KernelKind::Custom => custom::prepare(&cache)?,
        stock => stock::prepare(&cache, stock)?,
    };
    println!(
        "    kernel {}: {} ({}), {} in {}",
        kind.name(),
        kernel.release,
        kernel.origin,
        if fresh { "prepared" } else { "cached" },
        cmd::secs(start.elapsed())
    );
    Ok(kernel)
}

/// The cache directory, held under an exclusive lock while a kernel is
/// prepared (two runs must not build the same entry at once).
pub struct Cache {
    dir: PathBuf,
    _lock: File,
}

impl Cache {
    fn open() -> Result<Cache> {
        let dir = layout::cache_dir()?;
        for sub in ["kernels", "tmp", "logs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("could not create {}", dir.join(sub).display()))?;
        }
        let lock = layout::lock_file(&dir.join("lock"), "another run to release the kernel cache")?;
        // Holding the lock, nothing else uses tmp/: whatever is there was left
        // by a run that was killed mid-build (an unpacked tree is ~1.5 GB).
        for stale in fs::read_dir(dir.join("tmp"))?.filter_map(|e| e.ok()) {
            let _ = fs::remove_dir_all(stale.path());
        }
        Ok(Cache { dir, _lock: lock })
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.dir.join("kernels").join(key)
    }

    /// The build log for `key` (kept after a failure).
    fn log(&self, key: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{key}.log"))
    }

    /// A fresh scratch directory under `<cache>/tmp`, removed when dropped.
    fn scratch(&self, label: &str) -> Result<Scratch> {
        let path = self
            .dir
            .join("tmp")
            .join(format!("{label}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)
            .with_context(|| format!("could not create {}", path.display()))?;
        Ok(Scratch(path))
    }

    /// Moves a finished entry from scratch into place (one rename).
    fn commit(&self, staged: &Path, key: &str) -> Result<PathBuf> {
        let dest = self.entry(key);
        fs::rename(staged, &dest).with_context(|| {
            format!("could not move {} to {}", staged.display(), dest.display())
        })?;
        Ok(dest)
    }
}

/// A directory removed (with its contents) on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A private apt for `pin`'s suites, its lists refreshed, after checking
/// that they still carry the pinned version. When they do not, fails naming
/// the newest package there; when they carry a newer one too, says so.
fn side_apt(cache: &Cache, pin: &pins::Pin) -> Result<apt::SideApt> {
    let side = apt::SideApt::new(
        cache.path().join(format!("apt-{}", pin.apt_label())),
        pin.sources,
    )?;
    side.update()
        .with_context(|| format!("could not read the package lists of {}", pin.suites()))?;
    let prefix = if pin.kind.is_stock() {
        "linux-image-"
    } else {
        "linux-source-"
    };
    let newest = side.newest(pin.meta, prefix);
    let have = side.versions(pin.package)?;
    if !have.iter().any(|v| v == pin.version) {
        let newer = match &newest {
            Ok((pkg, version)) => format!("the newest there is {pkg} {version}"),
            Err(err) => format!("the newest could not be found ({err:#})"),
        };
        bail!(
            "{} {} (the {} kernel's pin in xtask/src/kernel/pins.rs) is no longer in {} \
             (versions of that package there: {}); {newer}. Update the pin and the README's \
             VM matrix, then run again",
            pin.package,
            pin.version,
            pin.kind.name(),
            pin.suites(),
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            },
        );
    }
    if let Ok((pkg, version)) = &newest
        && (pkg != pin.package || version != pin.version)
    {
        println!(
            "    note: {} has {pkg} {version}, newer than the pinned {} {}",
            pin.suites(),
            pin.package,
            pin.version
        );
    }
    Ok(side)
}

/// Turns a package version into something safe for a directory name
/// (`6.12.95-1~bpo12+1` → `6.12.95-1_bpo12+1`).
fn key_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Finds the single `*.deb` in `dir`.
fn find_deb(dir: &Path) -> Result<PathBuf> {
    let mut debs = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"));
    match (debs.next(), debs.next()) {
        (Some(deb), None) => Ok(deb),
        (None, _) => bail!("apt-get download left no .deb in {}", dir.display()),
        (Some(_), Some(_)) => bail!("more than one .deb in {}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_part_keeps_versions_readable() {
        assert_eq!(key_part("6.12.95-1~bpo12+1"), "6.12.95-1_bpo12+1");
        assert_eq!(key_part("1:7.2+dfsg-7"), "1_7.2+dfsg-7");
        assert_eq!(
            key_part("linux-image-6.1.0-56-amd64"),
            "linux-image-6.1.0-56-amd64"
        );
    }
}
