//! Opening a device in VFIO's unsafe no-IOMMU mode.
//!
//! vfio-ioctls only opens `/dev/vfio/N` groups into type1 containers, so
//! this is the handful of raw ioctls the mode needs: open the container,
//! check it offers `VFIO_NOIOMMU_IOMMU`, open `/dev/vfio/noiommu-N` (the
//! kernel wants CAP_SYS_RAWIO), attach the group, set the no-IOMMU
//! "IOMMU", and get the device fd. There is no MAP_DMA here: the device
//! DMAs to physical addresses.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU, vfio_group_status,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

use super::DeviceInfo;
use super::device::DeviceFd;
use super::ioctls::*;
use crate::error::{Error, Result};
use crate::sys;

/// A device opened in no-IOMMU mode: its fd, its group and the container.
/// Field order is drop order: device, then group, then container.
pub(crate) struct NoIommuDevice {
    device: File,
    _group: File,
    _container: File,
}

impl NoIommuDevice {
    pub(crate) fn fd(&self) -> DeviceFd<'_> {
        // SAFETY: `device` is the fd VFIO_GROUP_GET_DEVICE_FD returned.
        unsafe { DeviceFd::new(self.device.as_fd()) }
    }
}

fn fail(op: &str, hint: &'static str) -> Error {
    Error::sys(op, hint, io::Error::last_os_error())
}

pub(crate) fn open(dev: &DeviceInfo) -> Result<NoIommuDevice> {
    let container = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vfio/vfio")
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied {
                path: "/dev/vfio/vfio".into(),
            },
            _ => Error::sys(
                "open /dev/vfio/vfio",
                "load the vfio module (`modprobe vfio-pci`)",
                e,
            ),
        })?;
    // SAFETY: argument-less ioctls on the container fd we own.
    let version = unsafe { ioctl(&container, VFIO_GET_API_VERSION()) };
    if version != VFIO_API_VERSION as i32 {
        return Err(Error::Invalid(format!(
            "/dev/vfio/vfio speaks VFIO API {version}, numapin knows {VFIO_API_VERSION}"
        )));
    }
    // SAFETY: as above; the argument is a plain integer.
    let has = unsafe {
        ioctl_with_val(
            &container,
            VFIO_CHECK_EXTENSION(),
            VFIO_NOIOMMU_IOMMU.into(),
        )
    };
    if has <= 0 {
        return Err(Error::NoIommuModeOff {
            device: dev.name.clone(),
        });
    }
    let group = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.group_node)
        .map_err(|e| match e.raw_os_error() {
            // EPERM is the kernel's CAP_SYS_RAWIO check; EACCES the file mode.
            Some(libc::EPERM) if !sys::has_cap(sys::Cap::SysRawio) => Error::NoIommuNeedsRawio {
                path: dev.group_node.clone(),
            },
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                path: dev.group_node.clone(),
            },
            Some(libc::EBUSY) => Error::GroupBusy {
                path: dev.group_node.clone(),
            },
            _ => Error::sys(format!("open {}", dev.group_node.display()), "", e),
        })?;
    let mut status = vfio_group_status {
        argsz: std::mem::size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel fills `status`, which we own.
    if unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) } < 0 {
        return Err(fail("VFIO_GROUP_GET_STATUS", ""));
    }
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(dev.not_viable());
    }
    let cfd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int (the container fd) from `cfd`.
    if unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &cfd) } < 0 {
        return Err(match io::Error::last_os_error().raw_os_error() {
            Some(libc::EBUSY) => Error::GroupBusy {
                path: dev.group_node.clone(),
            },
            _ => fail("VFIO_GROUP_SET_CONTAINER", ""),
        });
    }
    // SAFETY: plain integer argument.
    if unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_NOIOMMU_IOMMU.into()) } < 0 {
        return Err(fail(
            "VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)",
            "the group must be a no-IOMMU group (/dev/vfio/noiommu-N)",
        ));
    }
    let name = CString::new(dev.name.as_str())
        .map_err(|_| Error::Invalid(format!("device name `{}` contains NUL", dev.name)))?;
    // SAFETY: the kernel reads a NUL-terminated string from `name`.
    let fd = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
    if fd < 0 {
        return Err(match io::Error::last_os_error().raw_os_error() {
            Some(libc::EBUSY) => Error::GroupBusy {
                path: dev.group_node.clone(),
            },
            _ => fail(
                "VFIO_GROUP_GET_DEVICE_FD",
                "is the device bound to vfio-pci? (`numapin bind BDF`)",
            ),
        });
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let device = unsafe { File::from_raw_fd(fd) };
    Ok(NoIommuDevice {
        device,
        _group: group,
        _container: container,
    })
}
