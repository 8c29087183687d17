//! The two guest kernels and their machine-wide cache.
//!
//! - `stock`: Debian's current `linux-image-*-amd64` from the configured apt
//!   sources, unpacked from its .deb; its VFIO modules go into the initramfs.
//! - `custom`: Debian's `linux-source-6.12` built with `tinyconfig` plus the
//!   options in `xtask/guest/kernel.config`, everything built in.
//!
//! A prepared kernel is a directory `<cache>/kernels/<key>/` holding `vmlinuz`,
//! `config`, `release` and, for the stock kernel, `modules/*.ko` with
//! `modules/load-order`. The key names what the kernel was made from (package
//! and version, fragment hash, [`RECIPE`]), so a new upload or a fragment
//! change makes a new entry and nothing else does. Entries are assembled in
//! `<cache>/tmp/` and renamed into place, so a killed run leaves no half entry.

mod apt;
mod custom;
mod fragment;
mod modules;
mod stock;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, layout};

/// Bump when the way a cache entry is made changes (build steps, module
/// selection, entry layout): every cached kernel is then remade once.
pub const RECIPE: u32 = 1;

/// Which guest kernel a VM boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelKind {
    /// Debian's stock kernel, VFIO as modules.
    Stock,
    /// Self-built 6.12, everything built in.
    Custom,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Stock => "stock",
            KernelKind::Custom => "custom",
        }
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
        KernelKind::Stock => stock::prepare(&cache)?,
        KernelKind::Custom => custom::prepare(&cache)?,
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

    /// The newest finished entry whose name starts with `prefix` and ends with
    /// `suffix`: what to boot when the package index cannot be reached.
    fn newest(&self, prefix: &str, suffix: &str) -> Option<PathBuf> {
        let entries = fs::read_dir(self.dir.join("kernels")).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
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
