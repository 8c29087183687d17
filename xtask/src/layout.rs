//! Where things are: the workspace, its target directory, the machine-wide
//! kernel cache, and which cargo to call.

use std::ffi::OsString;
use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The workspace root (the directory above `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The files the guest side is made of, kept in `xtask/guest/`.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

/// Cargo's target directory (`$CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        _ => root().join("target"),
    }
}

/// Per-VM scratch: console log, results, initramfs (`target/vm/<config>`).
pub fn vm_dir(config: &str) -> PathBuf {
    target_dir().join("vm").join(config)
}

/// Takes `target/vm/<config>.lock` for as long as the returned file lives, so
/// that two runs in one work tree (several people compile here) do not write
/// the same console log and results file at once.
pub fn lock_vm_dir(config: &str) -> Result<File> {
    let path = target_dir().join("vm").join(format!("{config}.lock"));
    std::fs::create_dir_all(path.parent().unwrap())?;
    lock_file(&path, &format!("another run using {config}"))
}

/// Creates `path` and takes an exclusive lock on it, waiting (and saying so)
/// while `holder` has it. The lock lasts as long as the returned file.
pub fn lock_file(path: &Path, holder: &str) -> Result<File> {
    let file =
        File::create(path).with_context(|| format!("could not create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            println!("    waiting for {holder} ({})", path.display());
            file.lock()?;
        }
        Err(TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("could not lock {}", path.display()));
        }
    }
    Ok(file)
}

/// The cargo that runs us (`$CARGO`), so toolchain overrides carry through.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Whether we run as root (then apt-get may install, and the cache is
/// machine-wide under /var/cache).
pub fn is_root() -> bool {
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The kernel cache: `$NUMAPIN_CACHE`, else `/var/cache/numapin` as root,
/// else `$XDG_CACHE_HOME/numapin` or `~/.cache/numapin`. It lives outside the
/// repository so that fresh clones (CI) reuse what an earlier run built.
pub fn cache_dir() -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let dir = if let Some(dir) = env("NUMAPIN_CACHE") {
        PathBuf::from(dir)
    } else if is_root() {
        PathBuf::from("/var/cache/numapin")
    } else if let Some(xdg) = env("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("numapin")
    } else {
        let home = env("HOME").context("HOME is not set: set NUMAPIN_CACHE to a directory")?;
        PathBuf::from(home).join(".cache").join("numapin")
    };
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "could not create the cache {} (set NUMAPIN_CACHE)",
            dir.display()
        )
    })?;
    Ok(dir)
}
