//! Finding a device in sysfs before anything is opened: what the user
//! typed resolved to a device directory, its IOMMU group, the group's
//! members and their drivers, and the container kind the device gets.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ContainerKind;
use crate::error::{Error, Result};

/// A device of an IOMMU group and the driver it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Device name (PCI address or mdev UUID).
    pub device: String,
    /// Bound driver, if any.
    pub driver: Option<String>,
}

/// What sysfs says about a device, before anything is opened.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// The device's name (PCI address, or mdev UUID).
    pub name: String,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
    /// Its driver.
    pub driver: Option<String>,
    /// IOMMU group number.
    pub group: u32,
    /// The group's device node.
    pub group_node: PathBuf,
    /// Every device in the group (the device itself included).
    pub members: Vec<GroupMember>,
    /// The kind of container the device goes into.
    pub kind: ContainerKind,
    /// The device's VFIO cdev (`/dev/vfio/devices/vfioN`, Linux 6.6+ with
    /// `CONFIG_VFIO_DEVICE_CDEV`), found through `<sysfs>/vfio-dev/vfioN`;
    /// `None` when the kernel made none.
    pub cdev: Option<PathBuf>,
    /// Who provides `/dev/vfio/vfio`: VFIO itself, or iommufd's
    /// compatibility container.
    pub vfio_container: crate::iommufd::VfioContainerProvider,
}

/// The device's VFIO cdev: `<sysfs>/vfio-dev/vfioN` names
/// `/dev/vfio/devices/vfioN` (`vfio_device_add` in
/// drivers/vfio/vfio_main.c, Linux 6.6+).
pub fn cdev_of(sysfs: &Path) -> Option<PathBuf> {
    let node = Path::new("/dev/vfio/devices").join(cdev_name(sysfs)?);
    node.exists().then_some(node)
}

/// The `vfioN` entry of `<sysfs>/vfio-dev`, if any.
fn cdev_name(sysfs: &Path) -> Option<String> {
    std::fs::read_dir(sysfs.join("vfio-dev"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("vfio")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .min()
}

fn driver_of(sysfs: &Path) -> Option<String> {
    std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Whether VFIO accepts a group member bound to `driver` (vfio drivers,
/// pci-stub, bridges' pcieport, or no driver at all).
fn driver_allows_vfio(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
    }
}

/// Resolves what a user typed (`0000:00:03.0`, `00:03.0`, an mdev UUID, or a
/// sysfs path) to the device's sysfs directory.
pub fn resolve_device(spec: &str) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if spec.starts_with('/') {
        vec![PathBuf::from(spec)]
    } else if spec.len() == 36 && spec.chars().filter(|&c| c == '-').count() == 4 {
        vec![Path::new("/sys/bus/mdev/devices").join(spec)]
    } else if spec.matches(':').count() == 1 {
        vec![Path::new("/sys/bus/pci/devices").join(format!("0000:{spec}"))]
    } else {
        vec![Path::new("/sys/bus/pci/devices").join(spec)]
    };
    let path = &candidates[0];
    if !path.exists() {
        return Err(Error::DeviceNotFound {
            spec: spec.to_string(),
            path: path.clone(),
        });
    }
    Ok(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
}

/// Describes a device from sysfs without opening anything: its group, the
/// group's members and drivers, and which container kind it would get.
pub fn describe(spec: &str) -> Result<DeviceInfo> {
    let sysfs = resolve_device(spec)?;
    let name = sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    let driver = driver_of(&sysfs);
    let group_link =
        std::fs::read_link(sysfs.join("iommu_group")).map_err(|_| Error::NoIommuGroup {
            device: name.clone(),
        })?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::NoIommuGroup {
            device: name.clone(),
        })?;
    let mut members = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices")) {
        for e in rd.flatten() {
            members.push(GroupMember {
                device: e.file_name().to_string_lossy().into_owned(),
                driver: driver_of(&e.path()),
            });
        }
    }
    members.sort_by(|a, b| a.device.cmp(&b.device));
    let noiommu = Path::new(&format!("/dev/vfio/noiommu-{group}")).exists();
    let kind = if noiommu {
        ContainerKind::NoIommu
    } else if sysfs.join("mdev_type").exists() {
        ContainerKind::MdevOnly
    } else {
        ContainerKind::Type1Iommu
    };
    let group_node = if noiommu {
        PathBuf::from(format!("/dev/vfio/noiommu-{group}"))
    } else {
        PathBuf::from(format!("/dev/vfio/{group}"))
    };
    Ok(DeviceInfo {
        cdev: cdev_of(&sysfs),
        vfio_container: crate::iommufd::vfio_container_provider(),
        name,
        sysfs,
        driver,
        group,
        group_node,
        members,
        kind,
    })
}

impl DeviceInfo {
    /// The error for a group the kernel calls not viable: every other
    /// member and its driver.
    pub(crate) fn not_viable(&self) -> Error {
        Error::GroupNotViable {
            group: self.group,
            others: self
                .members
                .iter()
                .filter(|m| m.device != self.name)
                .map(|m| {
                    (
                        m.device.clone(),
                        m.driver.clone().unwrap_or_else(|| "no driver".into()),
                    )
                })
                .collect(),
        }
    }

    /// Checks what would make opening fail, with an error that says what to do:
    /// the device's own driver, and the other members' drivers.
    pub fn check_openable(&self) -> Result<()> {
        if self.kind != ContainerKind::MdevOnly
            && !self.driver.as_deref().is_some_and(|d| d.contains("vfio"))
        {
            return Err(Error::NotBoundToVfio {
                device: self.name.clone(),
                driver: self.driver.clone(),
            });
        }
        let others: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|m| m.device != self.name && !driver_allows_vfio(m.driver.as_deref()))
            .map(|m| (m.device.clone(), m.driver.clone().unwrap_or_default()))
            .collect();
        if !others.is_empty() {
            return Err(Error::GroupNotViable {
                group: self.group,
                others,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdev_name_is_the_vfio_n_entry() {
        let dir = std::env::temp_dir().join(format!("numapin-cdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cdev_name(&dir), None, "no vfio-dev directory");
        std::fs::create_dir_all(dir.join("vfio-dev/vfio7")).unwrap();
        std::fs::create_dir_all(dir.join("vfio-dev/vfiox")).unwrap();
        std::fs::create_dir_all(dir.join("vfio-dev/vfio")).unwrap();
        assert_eq!(cdev_name(&dir).as_deref(), Some("vfio7"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
