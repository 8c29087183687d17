//! The iommufd and VFIO-cdev ioctl numbers numapin issues itself, in one
//! table: the calls `iommufd-ioctls` 0.4 does not wrap
//! (`include/uapi/linux/iommufd.h`: `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_*)`;
//! `include/uapi/linux/vfio.h`: `_IO(VFIO_TYPE, VFIO_BASE + n)`).
#![allow(missing_docs)]

use iommufd_bindings::iommufd::{
    IOMMUFD_CMD_IOAS_CHANGE_PROCESS, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_CMD_OPTION, IOMMUFD_TYPE,
};
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
use vmm_sys_util::ioctl_io_nr;

// `/dev/iommu` (and iommufd's `/dev/vfio/vfio`).
ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
ioctl_io_nr!(IOMMU_OPTION, IOMMUFD_TYPE as u32, IOMMUFD_CMD_OPTION);
// Linux 6.13+.
ioctl_io_nr!(
    IOMMU_IOAS_CHANGE_PROCESS,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_CHANGE_PROCESS
);
// VFIO device cdev (`/dev/vfio/devices/vfioN`, Linux 6.6+).
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE as u32, VFIO_BASE + 18);
ioctl_io_nr!(
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_TYPE as u32,
    VFIO_BASE + 19
);

#[cfg(test)]
mod tests {
    use super::*;

    // The numbers as the 6.12 headers compute them: ';' = 0x3b, ';' = 59;
    // VFIO_TYPE ';' as well, VFIO_BASE 100.
    #[test]
    fn numbers_match_the_headers() {
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        assert_eq!(IOMMU_OPTION(), 0x3b87);
        // 7.3's header: IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92.
        assert_eq!(IOMMU_IOAS_CHANGE_PROCESS(), 0x3b92);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD(), 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT(), 0x3b77);
    }
}
