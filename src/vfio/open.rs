//! Opening a device numapin owns: its group into a new type1v2 container
//! through vfio-ioctls, with every failure turned into a cause and a remedy.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};

use super::sysfs::DeviceInfo;
use crate::error::{Error, Result};

/// Opens `dev`'s group in a new type1v2 container and gets the device fd
/// (`VfioDevice::new` attaches the group, sets the IOMMU, and resets the
/// device).
///
/// # Errors
/// [`Error::PermissionDenied`], [`Error::GroupBusy`],
/// [`Error::NotBoundToVfio`], [`Error::GroupNotViable`], or
/// [`Error::Vfio`] for what vfio-ioctls reports otherwise.
pub(crate) fn open_type1(dev: &DeviceInfo) -> Result<(VfioDevice, Arc<VfioContainer>)> {
    let container = Arc::new(VfioContainer::new(None).map_err(|e| open_error(dev, e))?);
    let device =
        VfioDevice::new(&dev.sysfs, container.clone(), false).map_err(|e| open_error(dev, e))?;
    Ok((device, container))
}

/// Turns a vfio-ioctls error from opening into numapin's error with a remedy.
fn open_error(dev: &DeviceInfo, e: VfioError) -> Error {
    let io_kind = |err: &io::Error, path: PathBuf| match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Error::PermissionDenied { path }),
        Some(libc::EBUSY) => Some(Error::GroupBusy { path }),
        Some(libc::ENOENT) => Some(Error::NotBoundToVfio {
            device: dev.name.clone(),
            driver: dev.driver.clone(),
        }),
        _ => None,
    };
    let mapped = match &e {
        VfioError::OpenContainer(err) => io_kind(err, PathBuf::from("/dev/vfio/vfio")),
        VfioError::OpenGroup(err, _) => io_kind(err, dev.group_node.clone()),
        VfioError::GroupViable => Some(dev.not_viable()),
        VfioError::GroupSetContainer => Some(Error::GroupBusy {
            path: dev.group_node.clone(),
        }),
        VfioError::GroupGetDeviceFD(err) if err.errno() == libc::EBUSY => Some(Error::GroupBusy {
            path: dev.group_node.clone(),
        }),
        _ => None,
    };
    mapped.unwrap_or(Error::Vfio {
        op: format!("open {} (group {})", dev.name, dev.group),
        cause: e,
    })
}
