//! Binding a PCI device to vfio-pci through `driver_override`, and giving it
//! back to the driver it had.
//!
//! The previous driver is remembered in `/run/numapin/bound/<BDF>` so that
//! [`unbind`] can restore it, even from another process.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::vfio::resolve_device;

const STATE_DIR: &str = "/run/numapin/bound";
const VFIO_PCI: &str = "vfio-pci";

/// What [`bind`] or [`unbind`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BindOutcome {
    /// The PCI address.
    pub device: String,
    /// Driver before the call.
    pub previous: Option<String>,
    /// Driver after the call.
    pub current: Option<String>,
}

fn write_sysfs(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| {
        Error::sys(
            format!("write `{value}` to {}", path.display()),
            "run as root; binding changes drivers for the whole machine",
            e,
        )
    })
}

fn driver(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn pci_device(spec: &str) -> Result<(PathBuf, String)> {
    let dev = resolve_device(spec)?;
    if !dev.join("driver_override").exists() {
        return Err(Error::Invalid(format!(
            "{} is not a PCI device (no driver_override); bind and unbind take a PCI address such as 0000:00:03.0",
            dev.display()
        )));
    }
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dev, name))
}

/// Binds `spec` (a PCI address) to vfio-pci: unbinds its current driver,
/// sets `driver_override` and reprobes. Binding a device that is already on
/// vfio-pci changes nothing.
pub fn bind(spec: &str) -> Result<BindOutcome> {
    let (dev, name) = pci_device(spec)?;
    let previous = driver(&dev);
    if previous.as_deref() == Some(VFIO_PCI) {
        return Ok(BindOutcome {
            device: name,
            current: previous.clone(),
            previous,
        });
    }
    if !Path::new("/sys/bus/pci/drivers").join(VFIO_PCI).exists() {
        return Err(Error::Invalid(
            "the vfio-pci driver is not loaded; load it with `modprobe vfio-pci`".into(),
        ));
    }
    if let Some(prev) = &previous {
        std::fs::create_dir_all(STATE_DIR)
            .map_err(|e| Error::sys(format!("create {STATE_DIR}"), "run as root", e))?;
        write_sysfs(&Path::new(STATE_DIR).join(&name), prev)?;
        write_sysfs(&dev.join("driver/unbind"), &name)?;
    }
    write_sysfs(&dev.join("driver_override"), VFIO_PCI)?;
    write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &name)?;
    let current = driver(&dev);
    if current.as_deref() != Some(VFIO_PCI) {
        return Err(Error::Invalid(format!(
            "vfio-pci did not take {name} (now {}); check `dmesg` — the device may lack an IOMMU group (boot with intel_iommu=on)",
            current.as_deref().unwrap_or("unbound")
        )));
    }
    Ok(BindOutcome {
        device: name,
        previous,
        current,
    })
}

/// Unbinds `spec` from vfio-pci, clears `driver_override`, and rebinds the
/// driver it had before [`bind`] (or lets the kernel probe one).
pub fn unbind(spec: &str) -> Result<BindOutcome> {
    let (dev, name) = pci_device(spec)?;
    let previous = driver(&dev);
    if previous.as_deref() != Some(VFIO_PCI) {
        return Err(Error::Invalid(format!(
            "{name} is not bound to vfio-pci (it is {}); nothing to unbind",
            previous.as_deref().unwrap_or("unbound")
        )));
    }
    write_sysfs(&dev.join("driver/unbind"), &name)?;
    write_sysfs(&dev.join("driver_override"), "\n")?;
    let state = Path::new(STATE_DIR).join(&name);
    match std::fs::read_to_string(&state) {
        Ok(prev) if !prev.trim().is_empty() => {
            let bind = Path::new("/sys/bus/pci/drivers")
                .join(prev.trim())
                .join("bind");
            write_sysfs(&bind, &name)?;
            let _ = std::fs::remove_file(&state);
        }
        _ => {
            // No driver recorded: let the kernel pick one, if any matches.
            let _ = std::fs::write("/sys/bus/pci/drivers_probe", &name);
        }
    }
    Ok(BindOutcome {
        device: name,
        previous,
        current: driver(&dev),
    })
}
