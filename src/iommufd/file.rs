//! `IOMMU_IOAS_MAP_FILE`: a memfd's pages mapped into the IOAS by file
//! and offset instead of by user address (Linux 6.13+; absent from
//! 6.12.95's `include/uapi/linux/iommufd.h`). The pages are the file's, so
//! the mapping does not depend on this process keeping them mapped; the
//! kernel pins them (`iopt_alloc_file_pages`) and accounts them as it
//! accounts user pages: `VmPin` grows by the length.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::addr::Iova;
use crate::backend::{self, Accounting, IovaMapper};
use crate::error::{Error, Result};
use crate::prove::read_counter;

/// A memfd range mapped into the IOAS; unmapped on drop or
/// [`FileMapping::release`].
pub struct FileMapping {
    pub(crate) mapper: Arc<dyn IovaMapper>,
    /// Keeps the pinner (its device and context) alive.
    pub(crate) keep: Arc<dyn Send + Sync>,
    pub(crate) iova: Iova,
    pub(crate) len: u64,
    pub(crate) released: bool,
}

impl std::fmt::Debug for FileMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMapping")
            .field("iova", &self.iova)
            .field("len", &self.len)
            .finish()
    }
}

impl FileMapping {
    /// Reserves the IOVA (or `iova`), maps the memfd range there and proves
    /// the pin by `VmPin` growing by `len`, under the accounting lock; on
    /// failure undoes the mapping (keeping the IOVA reserved if the undo
    /// fails: a device may still reach the pages).
    ///
    /// # Safety
    /// As `crate::Pinner::map_memfd`.
    pub(crate) unsafe fn map_checked(
        mapper: Arc<dyn IovaMapper>,
        keep: Arc<dyn Send + Sync>,
        device: &str,
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: Option<Iova>,
    ) -> Result<FileMapping> {
        let alloc = mapper.allocator().ok_or_else(|| Error::IovaWithoutIommu {
            device: device.to_string(),
        })?;
        let at = {
            let mut a = alloc.lock().unwrap_or_else(|p| p.into_inner());
            match iova {
                Some(i) => a.reserve(i, len).map(|()| i)?,
                None => a.allocate(
                    len,
                    crate::request::iova_align(0, len, crate::addr::base_page_size()),
                )?,
            }
        };
        // Err((error, still mapped)).
        let mapped = backend::serialized(|| {
            let unmapped = |e: Error| (e, false);
            let before = read_counter(Accounting::VmPin).map_err(unmapped)?;
            // SAFETY: this function's contract is map_file's.
            unsafe { mapper.map_file(file, offset, len, at) }.map_err(unmapped)?;
            let after = read_counter(Accounting::VmPin);
            let grew = after.as_ref().map_or(0, |a| a.saturating_sub(before));
            if grew >= len {
                return Ok(());
            }
            let still = match mapper.unmap(at, len) {
                Ok(()) => false,
                Err(e) => {
                    log::error!("could not undo the file mapping at {at} ({e}); leaking its IOVA");
                    true
                }
            };
            let error = after.err().unwrap_or(Error::NotAccounted {
                counter: "VmPin",
                by: "IOMMU_IOAS_MAP_FILE",
                grew,
                len,
            });
            Err((error, still))
        });
        if let Err((error, still_mapped)) = mapped {
            if !still_mapped {
                mapper.free_iova(at);
            }
            return Err(error);
        }
        Ok(FileMapping {
            mapper,
            keep,
            iova: at,
            len,
            released: false,
        })
    }

    /// The IOVA the device uses for byte 0 of the range.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never: a zero length is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Unmaps (unpinning the file's pages), reporting a failure. On failure
    /// the IOVA stays reserved: a device may still reach the pages.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let (mapper, iova, len) = (&self.mapper, self.iova, self.len);
        backend::serialized(|| mapper.unmap(iova, len))?;
        mapper.free_iova(iova);
        let _ = &self.keep;
        Ok(())
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.teardown() {
                log::error!("unmapping the file range at {}: {e}", self.iova);
            }
        }
    }
}

/// What the kernel's answer to `IOMMU_IOAS_MAP_FILE` means.
pub(crate) fn map_file_error(device: &str, iova: Iova, len: u64, err: std::io::Error) -> Error {
    match err.raw_os_error() {
        // iommufd_fops_ioctl hands an unknown command number on to the
        // VFIO compatibility ioctls, which answer ENOIOCTLCMD (ENOTTY).
        Some(libc::ENOTTY) => Error::IommufdUnavailable {
            device: device.to_string(),
            reason: "this kernel has no IOMMU_IOAS_MAP_FILE (Linux 6.13+); map the memfd into \
                     this process and pin that address range instead"
                .into(),
        },
        Some(libc::EEXIST) => Error::IovaOverlap { iova, len },
        Some(libc::ENOMEM) => Error::PinNoMemory { iova, len },
        _ => Error::sys(
            format!("IOMMU_IOAS_MAP_FILE of {len:#x} bytes at {iova} for {device}"),
            "the fd must be a memfd (shmem or hugetlbfs) at least offset + len long",
            err,
        ),
    }
}

/// Issues `IOMMU_IOAS_MAP_FILE` on `ctx` (through iommufd-ioctls).
pub(crate) fn map_file(
    ctx: &iommufd_ioctls::IommuFd,
    ioas_id: u32,
    file: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    iova: Iova,
) -> std::io::Result<()> {
    use iommufd_bindings::iommufd::*;
    use std::os::fd::AsRawFd;
    let arg = iommu_ioas_map_file {
        size: std::mem::size_of::<iommu_ioas_map_file>() as u32,
        flags: iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
            | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id,
        fd: file.as_raw_fd(),
        start: offset,
        length: len,
        iova: iova.raw(),
    };
    ctx.map_iommu_ioas_file(&arg)
        .map_err(|e| super::ioas::io_of(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_kernel_is_named() {
        let e = map_file_error(
            "0000:00:03.0",
            Iova(0x1000),
            4096,
            std::io::Error::from_raw_os_error(libc::ENOTTY),
        );
        assert!(matches!(e, Error::IommufdUnavailable { .. }), "{e}");
        assert!(e.to_string().contains("Linux 6.13"), "{e}");
        let e = map_file_error(
            "d",
            Iova(0x1000),
            4096,
            std::io::Error::from_raw_os_error(libc::EEXIST),
        );
        assert!(matches!(e, Error::IovaOverlap { .. }));
    }
}
