//! The pinned region handle. It sits below the seams of
//! [`crate::backend`]: it holds the mapper that mapped it (to unmap) and
//! the pin source's pin (to unpin), and never calls back into
//! [`crate::Pinner`].

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::addr::{Iova, NodeId, PageSize, PhysAddr, VirtAddr};
use crate::backend::{self, IovaMapper, PinSource};
use crate::error::{Error, Result};
use crate::numa::NodeMemory;
use crate::phys::{self, Frames, PhysExtent};
use crate::translate::DmaAddr;
use crate::uring::UringPin;
use crate::vfio::ContainerKind;

/// Pinned memory: its pages cannot migrate, and its IOVA (if the device has
/// IOVAs) maps to them until the region is dropped or released.
///
/// The pin is one `VFIO_IOMMU_MAP_DMA` behind a real IOMMU, or an io_uring
/// long-term pin for mdev and no-IOMMU devices (plus MAP_DMA for the mdev
/// vendor driver's IOVA). Dropping unmaps the IOVA range, unpins, and then
/// frees the memory numapin allocated. If the unmap fails, the memory is
/// leaked on purpose rather than freed while a device may still reach it.
pub struct PinnedRegion {
    mapper: Arc<dyn IovaMapper>,
    /// Keeps the device (and so the container's domain) open while the
    /// region lives.
    _keep: Arc<dyn Send + Sync>,
    kind: ContainerKind,
    source: PinSource,
    device: String,
    iova: Option<Iova>,
    len: u64,
    vaddr: VirtAddr,
    node: Option<NodeId>,
    page_size: PageSize,
    memory: Option<NodeMemory>,
    uring: Option<UringPin>,
    pfns: Option<Frames>,
    /// Mapped by file and offset (`IOMMU_IOAS_MAP_FILE`), not by address.
    by_file: bool,
    released: bool,
}

impl fmt::Debug for PinnedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedRegion")
            .field("device", &self.device)
            .field("iova", &self.iova)
            .field("kind", &self.kind)
            .field("len", &format_args!("{:#x}", self.len))
            .field("vaddr", &self.vaddr)
            .field("node", &self.node)
            .field("page_size", &self.page_size)
            .field("owned", &self.memory.is_some())
            .finish()
    }
}

/// A mapping kept across an exec ([`PinnedRegion::suspend`]): what the new
/// process needs to adopt it ([`crate::Pinner::resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspended {
    /// The mapping's IOVA.
    pub iova: Iova,
    /// Its length in bytes.
    pub len: u64,
    /// The node its pages were checked on.
    pub node: Option<NodeId>,
    /// What backs it.
    pub page_size: PageSize,
}

/// Whether the mapping at `addr` is shared (`s` in its maps permissions).
fn shared_at(addr: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (Some(r), Some(p)) = (f.next(), f.next()) else {
                return false;
            };
            let Some((a, b)) = r.split_once('-') else {
                return false;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                return false;
            };
            (a..b).contains(&addr) && p.ends_with('s')
        })
    })
}

/// What [`PinnedRegion::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Pages checked (in units of the region's page size).
    pub pages: u64,
    /// Pages not on the region's node (0 when no node was requested).
    pub off_node: u64,
    /// Base pages whose PFN differs from the snapshot taken at pin time, or
    /// `None` when PFNs are hidden (no CAP_SYS_ADMIN).
    pub pfn_changed: Option<u64>,
}

impl Verification {
    /// True when nothing moved.
    pub fn is_intact(&self) -> bool {
        self.off_node == 0 && self.pfn_changed.unwrap_or(0) == 0
    }
}

/// Everything a region is made of, from [`crate::Pinner`].
pub(crate) struct RegionParts {
    pub(crate) mapper: Arc<dyn IovaMapper>,
    pub(crate) keep: Arc<dyn Send + Sync>,
    pub(crate) kind: ContainerKind,
    pub(crate) source: PinSource,
    pub(crate) device: String,
    pub(crate) iova: Option<Iova>,
    pub(crate) len: u64,
    pub(crate) vaddr: VirtAddr,
    pub(crate) node: Option<NodeId>,
    pub(crate) page_size: PageSize,
    pub(crate) memory: Option<NodeMemory>,
    pub(crate) uring: Option<UringPin>,
    pub(crate) pfns: Option<Frames>,
    pub(crate) by_file: bool,
}

impl PinnedRegion {
    pub(crate) fn new(p: RegionParts) -> PinnedRegion {
        PinnedRegion {
            mapper: p.mapper,
            _keep: p.keep,
            kind: p.kind,
            source: p.source,
            device: p.device,
            iova: p.iova,
            len: p.len,
            vaddr: p.vaddr,
            node: p.node,
            page_size: p.page_size,
            memory: p.memory,
            uring: p.uring,
            pfns: p.pfns,
            by_file: p.by_file,
            released: false,
        }
    }

    /// The IOVA the device uses for the first byte; `None` for a no-IOMMU
    /// device, which uses physical addresses ([`PinnedRegion::dma_addr`]).
    pub fn iova(&self) -> Option<Iova> {
        self.iova
    }

    /// Whether the IOMMU mapping was made from the backing file and offset
    /// (`IOMMU_IOAS_MAP_FILE`, iommufd on Linux 6.13+) rather than from
    /// this process's addresses: such a mapping does not depend on this
    /// process's page tables, and only such mappings can move to another
    /// process on iommufd ([`PinnedRegion::suspend`]).
    pub fn is_file_mapping(&self) -> bool {
        self.by_file
    }

    /// The kind of container the region is pinned through.
    pub fn kind(&self) -> ContainerKind {
        self.kind
    }

    /// What holds the pages: `"vfio-map-dma"` (IOMMU-backed type1),
    /// `"iommufd-ioas-map"` (iommufd, mapped by address),
    /// `"iommufd-ioas-map-file"` (iommufd, mapped by file:
    /// [`PinnedRegion::is_file_mapping`]) or `"io_uring"` (mdev-only and
    /// no-IOMMU).
    pub fn pin_kind(&self) -> &'static str {
        if self.by_file {
            "iommufd-ioas-map-file"
        } else {
            self.source.name()
        }
    }

    /// The address the device uses for byte `offset` of the region: the
    /// IOVA, or for a no-IOMMU device the physical address (from the PFNs
    /// recorded at pin time, which the pin keeps valid). `None` beyond the
    /// region, or when PFNs were hidden.
    ///
    /// In no-IOMMU mode nothing stands between the device and memory once
    /// the region is released: stop the device's DMA (or clear its bus
    /// master bit) before releasing or dropping the region.
    pub fn dma_addr(&self, offset: u64) -> Option<DmaAddr> {
        if offset >= self.len {
            return None;
        }
        match self.iova {
            Some(iova) => iova.checked_add(offset).map(DmaAddr::Iova),
            None => {
                let base = crate::addr::base_page_size();
                let pfn = self.pfns.as_ref()?.get(offset / base)?;
                Some(DmaAddr::Phys(PhysAddr(pfn * base + offset % base)))
            }
        }
    }

    /// The process's virtual address of the first byte.
    pub fn vaddr(&self) -> VirtAddr {
        self.vaddr
    }

    /// Raw pointer to the first byte. A device may write the memory at any
    /// time: use volatile or atomic accesses, never Rust references.
    pub fn as_ptr(&self) -> *mut u8 {
        self.vaddr.as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: regions are not empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The node every page is on (checked at pin time), if one was asked for.
    pub fn node(&self) -> Option<NodeId> {
        self.node
    }

    /// The backing page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The sealed memfd behind memory numapin allocated with
    /// [`crate::Backing::Memfd`] (offset 0 is the region's first byte):
    /// another process that maps it shares the pinned frames.
    pub fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.memory.as_ref()?.memfd()
    }

    /// Whether numapin allocated the memory (and frees it on drop).
    pub fn owns_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The IOVA of `vaddr`, if it lies in the region.
    pub fn iova_of(&self, vaddr: VirtAddr) -> Option<Iova> {
        let off = vaddr.checked_offset_from(self.vaddr)?;
        (off < self.len).then_some(())?;
        self.iova?.checked_add(off)
    }

    /// The virtual address of `iova`, if it lies in the region.
    pub fn vaddr_of(&self, iova: Iova) -> Option<VirtAddr> {
        let off = iova.checked_offset_from(self.iova?)?;
        (off < self.len).then_some(())?;
        self.vaddr.checked_add(off)
    }

    /// The region's physical memory as contiguous runs, read from
    /// `/proc/self/pagemap` (for a no-IOMMU device: the DMA addresses).
    ///
    /// # Errors
    /// [`phys::PhysError::PfnHidden`] without CAP_SYS_ADMIN.
    pub fn phys_extents(&self) -> Result<Vec<PhysExtent>> {
        Ok(phys::phys_extents(self.vaddr.raw(), self.len)?)
    }

    /// The region as an entry of a [`crate::translate::AddressMap`]: its
    /// IOVA and the physical runs recorded at pin time (empty when PFNs were
    /// hidden). Remove the entry from the map before releasing the region.
    pub fn mapping(&self) -> crate::translate::Mapping {
        let base = crate::addr::base_page_size();
        crate::translate::Mapping {
            vaddr: self.vaddr,
            len: self.len,
            iova: self.iova,
            extents: self
                .pfns
                .as_ref()
                .map(|p| p.extents(base))
                .unwrap_or_default(),
        }
    }

    /// The shortest physically contiguous run, from the PFNs recorded at
    /// pin time (`None` when PFNs were hidden).
    pub fn min_extent(&self) -> Option<u64> {
        let base = crate::addr::base_page_size();
        self.pfns
            .as_ref()?
            .extents(base)
            .iter()
            .map(|e| e.len)
            .min()
    }

    /// The PFN of every base page recorded when the region was pinned, if
    /// the process could read them (runs of consecutive frames: see
    /// [`Frames`]; `Frames::to_vec` gives one per page).
    pub fn pinned_frames(&self) -> Option<&Frames> {
        self.pfns.as_ref()
    }

    /// Re-reads every page's node and PFN and reports what changed since the
    /// pin. A pinned region should never change; a report with
    /// [`Verification::is_intact`] false means the guarantee was broken.
    pub fn verify(&self) -> Result<Verification> {
        // Every entry, not one per hugetlb page: the snapshot is compared
        // base page by base page.
        let now = match &self.pfns {
            Some(_) => Some(phys::pfns(self.vaddr.raw(), self.len)?),
            None => None,
        };
        let by_pfn = match (self.node, now.as_ref()) {
            (Some(n), Some(p)) => crate::prove::off_node_by_pfn(p, self.page_size, n),
            _ => None,
        };
        let (pages, off_node) = match (by_pfn, self.node) {
            (Some(o), _) => (o.pages, o.off),
            // No node to check: nothing to ask.
            (None, None) => (self.len / self.page_size.bytes(), 0),
            (None, Some(_)) => {
                let status = crate::numa::nodes_of(
                    self.vaddr.as_usize(),
                    self.len as usize,
                    self.page_size.bytes(),
                )
                .map_err(|e| Error::sys("move_pages (query nodes)", "", e))?;
                let off = match self.node {
                    Some(n) => status.iter().filter(|&&s| s != n.0 as i32).count() as u64,
                    None => 0,
                };
                (status.len() as u64, off)
            }
        };
        let pfn_changed = match (&self.pfns, &now) {
            (Some(before), Some(now)) => Some(before.changed(now)),
            _ => None,
        };
        Ok(Verification {
            pages,
            off_node,
            pfn_changed,
        })
    }

    /// Live update, before the exec: keeps the mapping, its pins and its
    /// IOMMU entries for the process the caller is about to become, and
    /// hands the region over. The device keeps working; the returned
    /// [`Suspended`] is what the new process passes to
    /// [`crate::Pinner::resume`] once it has mapped the same memory again.
    /// - type1: the mapping forgets its virtual address
    ///   (`VFIO_DMA_UNMAP_FLAG_VADDR`, Linux 5.12+, no mdev group in the
    ///   container). Container, group and device fds must cross the exec.
    /// - iommufd: nothing is asked of the kernel here. A mapping made from
    ///   its file ([`PinnedRegion::is_file_mapping`]) never depended on this
    ///   process's addresses; the new process takes the accounting over
    ///   with `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.13+). The iommufd fd and
    ///   the bound device cdev fds must cross the exec (the IOAS is an id in
    ///   that context).
    ///
    /// Clear `FD_CLOEXEC` on those fds and on the backing files. Only memory
    /// the new process can map again qualifies: a shared file mapping
    /// (memfd, hugetlbfs) the caller owns.
    ///
    /// # Errors
    /// [`Error::Invalid`] for memory numapin allocated, private or
    /// anonymous memory, a region without an IOVA or pinned through
    /// io_uring, and on iommufd a region mapped by address (pin it with
    /// [`crate::PinRequest::file`] on Linux 6.13+) or by a pinner made with
    /// CAP_IPC_LOCK in effect (iommufd charges such pages to no one, and
    /// `IOMMU_IOAS_CHANGE_PROCESS` would then leave the new process's
    /// `VmPin` short and, once they are unmapped, below zero: pin without
    /// CAP_IPC_LOCK and with a raised memlock limit); the kernel's refusal on
    /// type1 (`VFIO_UPDATE_VADDR` needs Linux 5.12+ and no mdev group). On
    /// error the region is still pinned and mapped, and handed back.
    pub fn suspend(mut self) -> std::result::Result<Suspended, Box<(Error, PinnedRegion)>> {
        let refuse = |why: String| {
            Error::Invalid(format!(
                "the region at {} cannot survive an exec: {why}",
                self.vaddr
            ))
        };
        let why = if self.memory.is_some() {
            Some("numapin allocated it as private memory; pin a memfd or hugetlbfs mapping with pin_user".to_string())
        } else if self.uring.is_some() || self.iova.is_none() {
            Some("only a mapping that pins (type1 MAP_DMA, iommufd) can be kept".to_string())
        } else if self.mapper.iommufd().is_some() && !self.by_file {
            Some(
                "on iommufd only a mapping made from its file (IOMMU_IOAS_MAP_FILE, Linux 6.13+) can move to \
                 another process; this one was mapped by address: pin it with PinRequest::file"
                    .to_string(),
            )
        } else {
            match crate::sys::range_mapping(self.vaddr.raw(), self.len) {
                Ok(crate::sys::RangeMapping::Writable { path })
                    if !path.is_empty() && shared_at(self.vaddr.raw()) =>
                {
                    None
                }
                Ok(_) => Some(
                    "private or anonymous memory cannot be mapped again by the new process; back it with a memfd \
                     or hugetlbfs file mapped MAP_SHARED"
                        .to_string(),
                ),
                Err(e) => Some(format!("/proc/self/maps could not be read ({e})")),
            }
        };
        if let Some(why) = why {
            return Err(Box::new((refuse(why), self)));
        }
        let iova = self.iova.expect("checked above");
        let (mapper, len) = (&self.mapper, self.len);
        if let Err(e) = backend::serialized(|| mapper.suspend_vaddr(iova, len)) {
            return Err(Box::new((e, self)));
        }
        // The mapping now belongs to the kernel and the next process.
        self.released = true;
        Ok(Suspended {
            iova,
            len: self.len,
            node: self.node,
            page_size: self.page_size,
        })
    }

    /// Unmaps the IOVA range (unpinning the pages) and frees owned memory,
    /// reporting an unmap failure instead of only logging it. On failure the
    /// memory is leaked: a device may still reach it.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.teardown()
    }

    /// Unmap (if mapped), unpin (if io_uring holds it), free. An unmap
    /// failure leaks memory, IOVA and pin alike: a device may still reach
    /// the pages. An unregister failure still frees: the ring closes and
    /// drops the pin, the IOMMU holds no mapping to the pages (and in
    /// no-IOMMU mode the caller stopped the device first, see
    /// [`PinnedRegion::dma_addr`]).
    fn teardown(&mut self) -> Result<()> {
        if let Some(iova) = self.iova {
            let (mapper, len) = (&self.mapper, self.len);
            // Under the accounting lock, so that a pin in another thread
            // never sees the counter shrink between its two reads.
            if let Err(e) = backend::serialized(|| mapper.unmap(iova, len)) {
                if let Some(m) = self.memory.take() {
                    m.leak();
                }
                if let Some(u) = self.uring.take() {
                    std::mem::forget(u);
                }
                return Err(e);
            }
            self.mapper.free_iova(iova);
        }
        let unpinned = match self.uring.take() {
            Some(u) => backend::serialized(|| u.release()),
            None => Ok(()),
        };
        drop(self.memory.take());
        unpinned
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.teardown() {
                log::error!("releasing the region at {}: {e}", self.vaddr);
            }
        }
    }
}
