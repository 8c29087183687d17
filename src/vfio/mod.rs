//! The VFIO side, one file per kernel object:
//!
//! - [`sysfs`]: finding a device, its IOMMU group and the group's members
//!   before anything is opened;
//! - [`open`](self) (private): opening a device numapin owns into a new
//!   type1v2 container through vfio-ioctls, with each failure's cause;
//! - [`container`]: a type1 container fd as an IOVA mapper
//!   (`VFIO_IOMMU_GET_INFO`, `MAP_DMA`, `UNMAP_DMA`);
//! - [`info`]: the pure parser of `VFIO_IOMMU_GET_INFO`'s reply;
//! - [`device`]: region access on a device fd;
//! - `noiommu` (private): VFIO's unsafe no-IOMMU mode, which has no
//!   mapper at all;
//! - `ioctls` (private): every VFIO ioctl number.

pub mod container;
pub mod device;
pub mod info;
mod ioctls;
pub(crate) mod noiommu;
pub(crate) mod open;
pub mod sysfs;

use std::fmt;

use serde::Serialize;

pub use device::DeviceFd;
pub use info::IommuInfo;
pub use sysfs::{DeviceInfo, GroupMember, describe, resolve_device};

/// What kind of IOMMU context a VFIO container gives its devices, which
/// decides whether `VFIO_IOMMU_MAP_DMA` pins anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerKind {
    /// type1 with an IOMMU-backed domain: MAP_DMA pins with FOLL_LONGTERM.
    Type1Iommu,
    /// type1 holding only mdev (emulated IOMMU) groups: MAP_DMA records the
    /// IOVA but pins nothing.
    MdevOnly,
    /// `VFIO_NOIOMMU_IOMMU`: no MAP_DMA at all; the device DMAs to physical
    /// addresses.
    NoIommu,
}

impl ContainerKind {
    /// Short name used in JSON and tables.
    pub fn name(self) -> &'static str {
        match self {
            ContainerKind::Type1Iommu => "type1-iommu",
            ContainerKind::MdevOnly => "mdev-only",
            ContainerKind::NoIommu => "no-iommu",
        }
    }
}

impl fmt::Display for ContainerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerKind::Type1Iommu => "behind an IOMMU (type1)",
            ContainerKind::MdevOnly => "an mdev device (emulated IOMMU, mdev-only container)",
            ContainerKind::NoIommu => "in VFIO no-IOMMU mode",
        })
    }
}
