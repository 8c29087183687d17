//! Region access on any VFIO device file descriptor: the one vfio-ioctls
//! opened for a type1 container, or the one numapin opened itself for a
//! no-IOMMU group. Just what a small user-space driver needs: region info,
//! reads and writes through the device fd, and BAR mmaps.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vfio_bindings::bindings::vfio::vfio_region_info;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::ioctls;
use crate::error::{Error, Result};

/// One region of a VFIO device (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

/// A VFIO device fd, borrowed from whoever owns it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFd<'a> {
    fd: BorrowedFd<'a>,
}

impl<'a> DeviceFd<'a> {
    /// Wraps a VFIO device fd. [`crate::Pinner::device_fd`] gives one
    /// safely.
    ///
    /// # Safety
    /// `fd` must be a VFIO device fd: the methods issue VFIO ioctls on it
    /// whose argument layout another driver could read differently, and
    /// callers mmap its regions.
    pub unsafe fn new(fd: BorrowedFd<'a>) -> DeviceFd<'a> {
        DeviceFd { fd }
    }

    /// The raw fd (for mmap).
    pub fn fd(&self) -> BorrowedFd<'a> {
        self.fd
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    pub fn region(&self, index: u32) -> Result<RegionInfo> {
        let mut info = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most argsz bytes into `info`, which we own.
        let ret = unsafe {
            ioctl_with_mut_ref(&self.fd, ioctls::VFIO_DEVICE_GET_REGION_INFO(), &mut info)
        };
        if ret < 0 {
            return Err(Error::sys(
                format!("VFIO_DEVICE_GET_REGION_INFO (region {index})"),
                "the device has no such region",
                io::Error::last_os_error(),
            ));
        }
        Ok(RegionInfo {
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// Reads `buf.len()` bytes at `offset` within region `index`.
    pub fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.region(index)?;
        self.check(index, &r, offset, buf.len())?;
        // SAFETY: pread into a buffer we own, of its own length.
        let n = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                (r.offset + offset) as libc::off_t,
            )
        };
        self.done(n, buf.len(), "read", index)
    }

    /// Writes `buf` at `offset` within region `index`.
    pub fn write(&self, index: u32, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.region(index)?;
        self.check(index, &r, offset, buf.len())?;
        // SAFETY: pwrite from a buffer we own, of its own length.
        let n = unsafe {
            libc::pwrite(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                (r.offset + offset) as libc::off_t,
            )
        };
        self.done(n, buf.len(), "write", index)
    }

    fn check(&self, index: u32, r: &RegionInfo, offset: u64, len: usize) -> Result<()> {
        if offset.saturating_add(len as u64) > r.size {
            return Err(Error::Invalid(format!(
                "access at {offset:#x}+{len} is beyond region {index} ({:#x} bytes)",
                r.size
            )));
        }
        Ok(())
    }

    fn done(&self, n: isize, want: usize, what: &str, index: u32) -> Result<()> {
        if n < 0 {
            return Err(Error::sys(
                format!("{what} VFIO region {index}"),
                "",
                io::Error::last_os_error(),
            ));
        }
        if n as usize != want {
            return Err(Error::Invalid(format!(
                "short {what} on VFIO region {index}: {n} of {want} bytes"
            )));
        }
        Ok(())
    }
}
