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

/// What a device argument looks like, before sysfs is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceArg {
    /// `DDDD:BB:DD.F`, or `BB:DD.F` (domain 0).
    Pci(String),
    /// An mdev UUID.
    Mdev(String),
    /// A path (absolute or relative).
    Path(PathBuf),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `BB:DD.F` with hex bus (2 digits), device (2) and function (1).
fn is_bdf(s: &str) -> bool {
    let Some((bus, rest)) = s.split_once(':') else {
        return false;
    };
    let Some((dev, func)) = rest.split_once('.') else {
        return false;
    };
    is_hex(bus, 2) && is_hex(dev, 2) && func.len() == 1 && matches!(func.as_bytes()[0], b'0'..=b'7')
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| is_hex(g, n))
}

/// Classifies the argument by its shape alone.
fn classify(spec: &str) -> std::result::Result<DeviceArg, String> {
    if spec.trim().is_empty() {
        return Err("the device argument is empty".into());
    }
    if spec.contains('/') || spec == "." || spec == ".." {
        return Ok(DeviceArg::Path(PathBuf::from(spec)));
    }
    if is_uuid(spec) {
        return Ok(DeviceArg::Mdev(spec.to_ascii_lowercase()));
    }
    if is_bdf(spec) {
        return Ok(DeviceArg::Pci(format!(
            "0000:{}",
            spec.to_ascii_lowercase()
        )));
    }
    if let Some((domain, bdf)) = spec.split_once(':') {
        if is_hex(domain, 4) && is_bdf(bdf) {
            return Ok(DeviceArg::Pci(spec.to_ascii_lowercase()));
        }
    }
    Err(format!(
        "`{spec}` is neither a PCI address (DDDD:BB:DD.F or BB:DD.F, hex), an mdev UUID, nor a path"
    ))
}

/// Resolves what a user typed (`0000:3b:00.0`, `3b:00.0`, an mdev UUID, or a
/// sysfs path) to the device's sysfs directory, under the real `/sys`.
///
/// # Errors
/// [`Error::NotADevice`] when the argument names no PCI function or mdev
/// (empty, malformed, a path outside the sysfs device tree or to a
/// directory that is not a device); [`Error::DeviceNotFound`] for a
/// well-formed address that no device has.
pub fn resolve_device(spec: &str) -> Result<PathBuf> {
    resolve_device_in(Path::new("/sys"), spec)
}

/// [`resolve_device`] against a sysfs mounted at `sys` (tests use a fake
/// tree).
pub(crate) fn resolve_device_in(sys: &Path, spec: &str) -> Result<PathBuf> {
    let not = |why: String| Error::NotADevice {
        spec: spec.to_string(),
        why,
    };
    let path = match classify(spec).map_err(not)? {
        DeviceArg::Pci(addr) => sys.join("bus/pci/devices").join(addr),
        DeviceArg::Mdev(uuid) => sys.join("bus/mdev/devices").join(uuid),
        DeviceArg::Path(p) => {
            let real = std::fs::canonicalize(&p)
                .map_err(|e| not(format!("{} cannot be resolved ({e})", p.display())))?;
            return device_dir(sys, &real).map_err(not);
        }
    };
    if !path.exists() {
        return Err(Error::DeviceNotFound {
            spec: spec.to_string(),
            path,
        });
    }
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    device_dir(sys, &real).map_err(not)
}

/// Accepts `real` only if it is a PCI function's or an mdev's directory in
/// the sysfs device tree (`<sys>/devices/...`).
fn device_dir(sys: &Path, real: &Path) -> std::result::Result<PathBuf, String> {
    let devices =
        std::fs::canonicalize(sys.join("devices")).unwrap_or_else(|_| sys.join("devices"));
    if !real.starts_with(&devices) {
        return Err(format!(
            "{} is not in the sysfs device tree ({})",
            real.display(),
            devices.display()
        ));
    }
    let subsystem = std::fs::read_link(real.join("subsystem"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    match subsystem.as_deref() {
        Some("pci") | Some("mdev") => Ok(real.to_path_buf()),
        Some(other) => Err(format!(
            "{} is a `{other}` device, not a PCI function or an mdev",
            real.display()
        )),
        None => Err(format!(
            "{} is a directory of the device tree, not a device",
            real.display()
        )),
    }
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
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake sysfs: one PCI function, one mdev, one block device, and the
    /// bus directories that link to them.
    fn fake() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in [
            "devices/pci0000:00/0000:00:03.0",
            "devices/virtual/mtty/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            "devices/virtual/block/loop0",
            "bus/pci/devices",
            "bus/mdev/devices",
            "subsys/pci",
            "subsys/mdev",
            "subsys/block",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let pci = r.join("devices/pci0000:00/0000:00:03.0");
        let mdev = r.join("devices/virtual/mtty/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        // A device's `subsystem` link ends in its bus's (or class's) name.
        symlink(r.join("subsys/pci"), pci.join("subsystem")).unwrap();
        symlink(r.join("subsys/mdev"), mdev.join("subsystem")).unwrap();
        symlink(
            r.join("subsys/block"),
            r.join("devices/virtual/block/loop0/subsystem"),
        )
        .unwrap();
        symlink(&pci, r.join("bus/pci/devices/0000:00:03.0")).unwrap();
        symlink(
            &mdev,
            r.join("bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"),
        )
        .unwrap();
        t
    }

    fn why(sys: &Path, spec: &str) -> String {
        match resolve_device_in(sys, spec) {
            Err(Error::NotADevice { why, .. }) => why,
            other => panic!("{spec}: {other:?}"),
        }
    }

    #[test]
    fn addresses_uuids_and_device_paths_resolve() {
        let t = fake();
        let sys = t.path();
        let pci = std::fs::canonicalize(sys.join("devices/pci0000:00/0000:00:03.0")).unwrap();
        assert_eq!(resolve_device_in(sys, "0000:00:03.0").unwrap(), pci);
        assert_eq!(resolve_device_in(sys, "00:03.0").unwrap(), pci);
        assert_eq!(resolve_device_in(sys, pci.to_str().unwrap()).unwrap(), pci);
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        assert!(resolve_device_in(sys, uuid).unwrap().ends_with(uuid));
        // Well formed, but no such device.
        assert!(matches!(
            resolve_device_in(sys, "0000:3b:00.0"),
            Err(Error::DeviceNotFound { .. })
        ));
    }

    #[test]
    fn strings_that_are_not_devices_say_why() {
        let t = fake();
        let sys = t.path();
        assert!(why(sys, "").contains("empty"));
        assert!(why(sys, "passwd").contains("neither a PCI address"));
        assert!(why(sys, "00:03").contains("neither a PCI address"));
        assert!(why(sys, "0000:00:03.9").contains("neither a PCI address"));
        // Paths: outside the device tree, a directory that is no device, a
        // device of another kind, something that does not exist.
        assert!(why(sys, "/etc/passwd").contains("not in the sysfs device tree"));
        let bus = sys.join("bus/pci/devices");
        assert!(why(sys, bus.to_str().unwrap()).contains("not in the sysfs device tree"));
        let tree = sys.join("devices/pci0000:00");
        assert!(why(sys, tree.to_str().unwrap()).contains("not a device"));
        let block = sys.join("devices/virtual/block/loop0");
        assert!(why(sys, block.to_str().unwrap()).contains("a `block` device"));
        assert!(why(sys, "../../..").contains("not in the sysfs device tree"));
        assert!(why(sys, "/nonexistent/x").contains("cannot be resolved"));
        // The message says what to give instead.
        let e = resolve_device_in(sys, "").unwrap_err().to_string();
        assert!(e.contains("0000:3b:00.0") && e.contains("lspci -D"), "{e}");
    }

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
