//! Containers and mappings the caller owns: a pinner on a VMM's own type1
//! container, and the adoption of mappings a previous process image kept
//! across an exec (live update).

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::{Pinner, Shared};
use crate::addr::VirtAddr;
use crate::backend::{self, Backend, IovaMapper, PinSource};
use crate::error::{Error, Result};
use crate::numa::Topology;
use crate::prove;
use crate::region::{PinnedRegion, RegionParts};
use crate::sys;
use crate::vfio::{ContainerKind, container::Type1Container};

impl Pinner {
    /// A pinner on a VFIO type1 container that the caller owns, with any
    /// number of groups already in it (a VMM's container). numapin then only
    /// maps, proves, translates and unmaps: it never opens, resets or closes
    /// a device. It keeps a duplicate of the fd (`F_DUPFD_CLOEXEC`), so the
    /// container lives as long as the pinner or any of its regions; the
    /// mappings live as long as a group stays in the container, which is the
    /// caller's to keep.
    ///
    /// `kind` says what the container holds, or `None` to find out from
    /// `VFIO_IOMMU_GET_INFO` ([`crate::vfio::info::IommuInfo::has_iommu_domain`]):
    /// [`ContainerKind::Type1Iommu`] when an IOMMU-backed group is in it
    /// (MAP_DMA pins), [`ContainerKind::MdevOnly`] when only mdev groups are
    /// (numapin takes an io_uring pin before each mapping). A kind that
    /// contradicts what the kernel reports is refused.
    ///
    /// If the caller later attaches an IOMMU-backed group to an mdev-only
    /// container, the kernel pins and maps every existing mapping into the
    /// new domain (`vfio_iommu_replay`): the regions stay pinned, now twice
    /// (their io_uring pin, `VmPin`, and VFIO's, `VmLck`) until released.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`ContainerKind::NoIommu`] (a no-IOMMU
    /// container has no mappings: open the device with [`Pinner::open`]) or
    /// a kind the kernel's report contradicts, [`Error::Sys`] when the fd
    /// cannot be duplicated or is not a container with an IOMMU set
    /// (`VFIO_IOMMU_GET_INFO` fails).
    pub fn with_type1_container(
        container: BorrowedFd<'_>,
        kind: Option<ContainerKind>,
    ) -> Result<Pinner> {
        if kind == Some(ContainerKind::NoIommu) {
            return Err(Error::Invalid(
                "a no-IOMMU container has no DMA mappings to share; open the device with Pinner::open".into(),
            ));
        }
        let info = crate::vfio::container::get_info(container)?;
        let found = if info.has_iommu_domain() {
            ContainerKind::Type1Iommu
        } else {
            ContainerKind::MdevOnly
        };
        if let Some(k) = kind.filter(|&k| k != found) {
            return Err(Error::Invalid(format!(
                "the container was given as {} but VFIO_IOMMU_GET_INFO reports it {found} \
                 (page sizes {:#x}, {} IOVA ranges); pass None to use what the kernel reports",
                k,
                info.iova_pgsizes,
                info.iova_ranges.as_ref().map_or(0, Vec::len)
            )));
        }
        let kind = found;
        let fd = container
            .try_clone_to_owned()
            .map_err(|e| Error::sys("dup the container fd", "", e))?;
        let ipc_lock = sys::has_cap(sys::Cap::IpcLock);
        let name = "the caller's container".to_string();
        let pins = kind == ContainerKind::Type1Iommu;
        let mapper: Arc<dyn IovaMapper> =
            Arc::new(Type1Container::given(fd, pins, name.clone(), ipc_lock)?);
        Pinner::on_callers(mapper, kind, Backend::Type1, name, ipc_lock)
    }

    /// A pinner on a mapper over a container or IOAS the caller owns: no
    /// device of numapin's own.
    pub(super) fn on_callers(
        mapper: Arc<dyn IovaMapper>,
        kind: ContainerKind,
        backend: Backend,
        name: String,
        ipc_lock: bool,
    ) -> Result<Pinner> {
        let source = PinSource::for_mapper(mapper.as_ref());
        Ok(Pinner {
            inner: Arc::new(Shared {
                device: None,
                mapper,
                source,
                dev: None,
                kind,
                backend,
                name,
                topology: Topology::read()?,
                ipc_lock,
                read_counter: prove::read_counter,
            }),
        })
    }

    /// Live update, after the exec: adopts a mapping the previous process
    /// suspended ([`PinnedRegion::suspend`]) at the address where this
    /// process mapped the same memory again. Nothing is pinned again: the
    /// pages the device has used all along stay.
    /// - type1: the mapping gets its new address (`VFIO_DMA_MAP_FLAG_VADDR`)
    ///   and the kernel moves its accounting to this process.
    /// - iommufd: `IOMMU_IOAS_CHANGE_PROCESS` moves the accounting of every
    ///   mapping in the context to this process at the first resume (later
    ///   ones find nothing left to move); the kernel refuses it while any
    ///   mapping in the context was made by address. The kernel is not
    ///   asked about the single IOVA, so `s` must name a mapping suspended
    ///   in this context.
    ///
    /// The region takes a fresh PFN snapshot (when PFNs are readable and
    /// the new mapping has its pages faulted in, e.g. with
    /// `MADV_POPULATE_READ`) for [`PinnedRegion::verify`].
    ///
    /// # Safety
    /// `vaddr` must map the same pages (the same file at the same offset)
    /// for `s.len` bytes, and the caller takes on [`Pinner::pin_user`]'s
    /// contract for them.
    ///
    /// # Errors
    /// The kernel's refusal: on type1 `ENOENT` (no mapping at the IOVA),
    /// `EINVAL` (not suspended, or another length); on iommufd
    /// [`Error::Invalid`] for a context holding mappings made by address,
    /// [`Error::IommufdUnavailable`] before Linux 6.13, and `ENOMEM` past
    /// this process's memlock limit.
    pub unsafe fn resume(
        &self,
        vaddr: *mut u8,
        s: &crate::region::Suspended,
    ) -> Result<PinnedRegion> {
        let vaddr = VirtAddr::of(vaddr);
        let mapper = &self.inner.mapper;
        // SAFETY: the caller's contract is resume_vaddr's.
        backend::serialized(|| unsafe { mapper.resume_vaddr(vaddr, s.iova, s.len) })?;
        let pfns = crate::phys::pfns(vaddr.raw(), s.len).ok();
        Ok(PinnedRegion::new(RegionParts {
            iova: Some(s.iova),
            node: s.node,
            pfns,
            // On iommufd only file mappings are suspended.
            by_file: mapper.iommufd().is_some(),
            ..self.region_parts(vaddr, s.len, s.page_size)
        }))
    }
}

/// Checks that `[addr, addr+len)` is a `MAP_SHARED` mapping of `fd` from
/// byte `offset` (`PinRequest::file`), before anything is reserved.
pub(super) fn check_backing_file(
    addr: VirtAddr,
    len: u64,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> Result<()> {
    match crate::sys::check_file_mapping(addr.raw(), len, fd, offset) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(Error::Invalid(format!(
            "PinRequest::file does not back the memory at {addr}: {why}"
        ))),
        Err(e) => Err(Error::sys(
            "check PinRequest::file against /proc/self/maps",
            "",
            e,
        )),
    }
}
