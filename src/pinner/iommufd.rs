//! The iommufd side of [`Pinner`]: a pinner on an IOAS the caller owns,
//! the iommufd details, memfd mappings (`IOMMU_IOAS_MAP_FILE`), and the
//! DMA-mask ceiling every mapper's allocator can take.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;

use super::Pinner;
use crate::addr::Iova;
use crate::backend::{Backend, IovaMapper};
use crate::error::{Error, Result};
use crate::sys;
use crate::vfio::ContainerKind;

impl Pinner {
    /// A pinner on an iommufd IOAS that the caller owns (a VMM's), in the
    /// caller's `/dev/iommu` context `ctx`. numapin keeps a duplicate of the
    /// fd, reads the IOAS's IOVA ranges now, and from then on only maps,
    /// proves, translates and unmaps: it never binds, attaches or detaches a
    /// device. The caller must have attached a device to the IOAS already:
    /// without an attached domain a mapping pins nothing, and the proof
    /// (`VmPin` growing by the size) fails with [`Error::NotAccounted`].
    ///
    /// # Errors
    /// [`Error::Sys`] when the fd cannot be duplicated or
    /// `IOMMU_IOAS_IOVA_RANGES` fails (not an iommufd, or no such IOAS).
    pub fn with_iommufd_ioas(ctx: BorrowedFd<'_>, ioas_id: u32) -> Result<Pinner> {
        let ipc_lock = sys::has_cap(sys::Cap::IpcLock);
        let name = format!("the caller's IOAS {ioas_id}");
        let mapper: Arc<dyn IovaMapper> = Arc::new(crate::iommufd::IommufdMapper::given(
            ctx,
            ioas_id,
            name.clone(),
            ipc_lock,
        )?);
        Pinner::on_callers(
            mapper,
            ContainerKind::Type1Iommu,
            Backend::Iommufd,
            name,
            ipc_lock,
        )
    }

    /// What the iommufd backend set up: cdev, ids, accounting mode, IOVA
    /// ranges read after the attach (`None` on type1).
    pub fn iommufd_info(&self) -> Option<&crate::iommufd::IommufdInfo> {
        self.inner.mapper.iommufd()
    }

    /// Limits every IOVA numapin hands out (or accepts) from now on to the
    /// lowest `2^bits` bytes: the device's DMA mask (32 for a device that
    /// drives 32 address bits). Applies to every clone of this pinner.
    ///
    /// # Errors
    /// [`Error::IovaWithoutIommu`] for a device without IOVAs, and
    /// [`Error::Iova`] for a width outside 12..=64 or a live region above
    /// the new ceiling.
    pub fn set_dma_mask(&self, bits: u32) -> Result<()> {
        let alloc = self
            .inner
            .mapper
            .allocator()
            .ok_or_else(|| Error::IovaWithoutIommu {
                device: self.inner.name.clone(),
            })?;
        alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_dma_mask(bits)?;
        Ok(())
    }

    /// Maps `len` bytes of the memfd `file` from byte `offset` into the
    /// IOAS with `IOMMU_IOAS_MAP_FILE` (iommufd on Linux 6.13+), at `iova`
    /// or at one numapin picks, and proves the pin by `VmPin` growing by
    /// `len`. The pages are the file's: the mapping holds them whether or
    /// not this process maps the file, and no placement is checked (bind
    /// the file's memory with `mbind` before faulting it in).
    ///
    /// # Safety
    /// The device may read and write the file's pages until the mapping is
    /// dropped or released: whoever maps the file must not hold Rust
    /// references to that memory, only raw pointers or system calls.
    ///
    /// # Errors
    /// [`Error::Invalid`] on type1, [`Error::IommufdUnavailable`] on a
    /// kernel without the call, [`Error::ZeroSize`], the IOVA errors of
    /// [`Pinner::pin`], [`Error::NotAccounted`], and the kernel's errno
    /// (a file that is not a memfd, a range past its end).
    pub unsafe fn map_memfd(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: Option<Iova>,
    ) -> Result<crate::iommufd::FileMapping> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        self.check_iommu_alignment(len)?;
        let keep: Arc<dyn Send + Sync> = self.inner.clone();
        // SAFETY: this function's contract is map_checked's.
        unsafe {
            crate::iommufd::FileMapping::map_checked(
                self.inner.mapper.clone(),
                keep,
                &self.inner.name,
                file,
                offset,
                len,
                iova,
            )
        }
    }

    /// Maps the range from `file` (`IOMMU_IOAS_MAP_FILE`) when there is
    /// one and the mapper is an iommufd IOAS; `Ok(false)` when the range
    /// is to be mapped by address instead (no file, type1, or a kernel
    /// before 6.13, whose refusal maps nothing).
    pub(super) fn map_by_file(
        &self,
        r: &crate::prove::Range,
        iova: Iova,
        file: Option<(RawFd, u64)>,
    ) -> Result<bool> {
        let Some((fd, offset)) = file else {
            return Ok(false);
        };
        let mapper = &self.inner.mapper;
        if mapper.iommufd().is_none() {
            return Ok(false);
        }
        // SAFETY: the caller keeps `fd` open for this call (pin_range's
        // contract); the mapping's contract is the range's, as for `map`.
        match unsafe { mapper.map_file(BorrowedFd::borrow_raw(fd), offset, r.len, iova) } {
            Ok(()) => Ok(true),
            Err(Error::IommufdUnavailable { .. }) => {
                log::debug!("no IOMMU_IOAS_MAP_FILE on this kernel: mapping {iova} by address");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
