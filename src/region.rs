//! The pinned region handle, and the `NODE:SIZE[:PAGESIZE][@IOVA]` spec the
//! CLI takes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::addr::{Iova, NodeId, PageSize, ParseError, parse_size};
use crate::error::{Error, Result};
use crate::numa::NodeMemory;
use crate::phys::{self, PhysExtent};
use crate::uring::UringPin;
use crate::vfio::{ContainerKind, Inner, PinRequest, Pins};

/// Pinned memory: its pages cannot migrate, and its IOVA (if the device has
/// IOVAs) maps to them until the region is dropped or released.
///
/// The pin is one `VFIO_IOMMU_MAP_DMA` behind a real IOMMU, or an io_uring
/// long-term pin for mdev and no-IOMMU devices (plus MAP_DMA for the mdev
/// vendor driver's IOVA). Dropping unmaps the IOVA range, unpins, and then
/// frees the memory numapin allocated. If the unmap fails, the memory is
/// leaked on purpose rather than freed while a device may still reach it.
pub struct PinnedRegion {
    pinner: Arc<Inner>,
    iova: Option<Iova>,
    len: u64,
    vaddr: usize,
    node: Option<NodeId>,
    page_size: PageSize,
    memory: Option<NodeMemory>,
    uring: Option<UringPin>,
    pfns: Option<Vec<u64>>,
    released: bool,
}

impl fmt::Debug for PinnedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedRegion")
            .field("device", &self.pinner.device_name())
            .field("iova", &self.iova)
            .field("kind", &self.pinner.kind())
            .field("len", &format_args!("{:#x}", self.len))
            .field("vaddr", &format_args!("{:#x}", self.vaddr))
            .field("node", &self.node)
            .field("page_size", &self.page_size)
            .field("owned", &self.memory.is_some())
            .finish()
    }
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

impl PinnedRegion {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pinner: Arc<Inner>,
        iova: Option<Iova>,
        len: u64,
        vaddr: usize,
        node: Option<NodeId>,
        page_size: PageSize,
        memory: Option<NodeMemory>,
        pins: Pins,
    ) -> PinnedRegion {
        PinnedRegion {
            pinner,
            iova,
            len,
            vaddr,
            node,
            page_size,
            memory,
            uring: pins.uring,
            pfns: pins.pfns,
            released: false,
        }
    }

    /// The IOVA the device uses for the first byte; `None` for a no-IOMMU
    /// device, which uses physical addresses ([`PinnedRegion::dma_addr`]).
    pub fn iova(&self) -> Option<Iova> {
        self.iova
    }

    /// The kind of container the region is pinned through.
    pub fn kind(&self) -> ContainerKind {
        self.pinner.kind()
    }

    /// What holds the pages: `"vfio-map-dma"` (IOMMU-backed type1) or
    /// `"io_uring"` (mdev-only and no-IOMMU).
    pub fn pin_kind(&self) -> &'static str {
        if self.uring.is_some() {
            "io_uring"
        } else {
            "vfio-map-dma"
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
    pub fn dma_addr(&self, offset: u64) -> Option<u64> {
        if offset >= self.len {
            return None;
        }
        match self.iova {
            Some(iova) => Some(iova.raw() + offset),
            None => {
                let base = crate::addr::base_page_size();
                let pfn = *self.pfns.as_ref()?.get((offset / base) as usize)?;
                Some(pfn * base + offset % base)
            }
        }
    }

    /// The process's virtual address of the first byte.
    pub fn vaddr(&self) -> usize {
        self.vaddr
    }

    /// Raw pointer to the first byte. A device may write the memory at any
    /// time: use volatile or atomic accesses, never Rust references.
    pub fn as_ptr(&self) -> *mut u8 {
        self.vaddr as *mut u8
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

    /// Whether numapin allocated the memory (and frees it on drop).
    pub fn owns_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The IOVA of `vaddr`, if it lies in the region.
    pub fn iova_of(&self, vaddr: usize) -> Option<Iova> {
        let off = vaddr.checked_sub(self.vaddr)? as u64;
        let base = self.iova?;
        (off < self.len).then(|| Iova(base.raw() + off))
    }

    /// The virtual address of `iova`, if it lies in the region.
    pub fn vaddr_of(&self, iova: Iova) -> Option<usize> {
        let off = iova.checked_offset_from(self.iova?)?;
        (off < self.len).then(|| self.vaddr + off as usize)
    }

    /// The region's physical memory as contiguous runs, read from
    /// `/proc/self/pagemap` (for a no-IOMMU device: the DMA addresses).
    ///
    /// # Errors
    /// [`phys::PhysError::PfnHidden`] without CAP_SYS_ADMIN.
    pub fn phys_extents(&self) -> Result<Vec<PhysExtent>> {
        Ok(phys::phys_extents(self.vaddr as u64, self.len)?)
    }

    /// The region as an entry of a [`crate::translate::AddressMap`]: its
    /// IOVA and the physical runs recorded at pin time (empty when PFNs were
    /// hidden). Remove the entry from the map before releasing the region.
    pub fn mapping(&self) -> crate::translate::Mapping {
        let base = crate::addr::base_page_size();
        crate::translate::Mapping {
            vaddr: self.vaddr as u64,
            len: self.len,
            iova: self.iova,
            extents: self
                .pfns
                .as_ref()
                .map(|p| phys::merge_extents(p.iter().copied(), base))
                .unwrap_or_default(),
        }
    }

    /// The shortest physically contiguous run, from the PFNs recorded at
    /// pin time (`None` when PFNs were hidden).
    pub fn min_extent(&self) -> Option<u64> {
        let base = crate::addr::base_page_size();
        phys::merge_extents(self.pfns.as_ref()?.iter().copied(), base)
            .iter()
            .map(|e| e.len)
            .min()
    }

    /// The PFNs recorded when the region was pinned (base pages), if the
    /// process could read them.
    pub fn pinned_pfns(&self) -> Option<&[u64]> {
        self.pfns.as_deref()
    }

    /// Re-reads every page's node and PFN and reports what changed since the
    /// pin. A pinned region should never change; a report with
    /// [`Verification::is_intact`] false means the guarantee was broken.
    pub fn verify(&self) -> Result<Verification> {
        let status = crate::numa::nodes_of(self.vaddr, self.len as usize, self.page_size.bytes())
            .map_err(|e| Error::sys("move_pages (query nodes)", "", e))?;
        let off_node = match self.node {
            Some(n) => status.iter().filter(|&&s| s != n.0 as i32).count() as u64,
            None => 0,
        };
        let pfn_changed = match &self.pfns {
            Some(before) => {
                let now = phys::pfns(self.vaddr as u64, self.len)?;
                Some(before.iter().zip(&now).filter(|(a, b)| a != b).count() as u64)
            }
            None => None,
        };
        Ok(Verification {
            pages: status.len() as u64,
            off_node,
            pfn_changed,
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
            if let Err(e) = self.pinner.unmap_dma(iova, self.len) {
                if let Some(m) = self.memory.take() {
                    m.leak();
                }
                if let Some(u) = self.uring.take() {
                    std::mem::forget(u);
                }
                return Err(e);
            }
            self.pinner.free_iova(iova);
        }
        let unpinned = match self.uring.take() {
            Some(u) => self.pinner.unpin_uring(u),
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
                eprintln!("numapin: releasing the region at {:#x}: {e}", self.vaddr);
            }
        }
    }
}

/// A region as the CLI describes it: `NODE:SIZE[:PAGESIZE][@IOVA]`, e.g.
/// `0:512M`, `1:1G:2M`, `0:64M:4K@0x100000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec(pub PinRequest);

impl FromStr for RegionSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let usage = |why: String| {
            Error::Invalid(format!(
                "bad region `{s}`: {why}; expected NODE:SIZE[:PAGESIZE][@IOVA], e.g. 0:512M, 1:1G:2M or 0:64M@0x100000000"
            ))
        };
        let (body, iova) = match s.split_once('@') {
            Some((b, i)) => (
                b,
                Some(i.parse::<Iova>().map_err(|e| usage(e.to_string()))?),
            ),
            None => (s, None),
        };
        let parts: Vec<&str> = body.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(usage("wrong number of `:` fields".into()));
        }
        let node = parts[0]
            .trim()
            .parse::<u32>()
            .map(NodeId)
            .map_err(|_| usage(format!("`{}` is not a node number", parts[0])))?;
        let size = parse_size(parts[1]).map_err(|e: ParseError| usage(e.to_string()))?;
        let page_size = match parts.get(2) {
            Some(p) => p.parse::<PageSize>().map_err(|e| usage(e.to_string()))?,
            None => PageSize::Base,
        };
        Ok(RegionSpec(PinRequest {
            node,
            size,
            page_size,
            iova,
            min_extent: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<PinRequest> {
        s.parse::<RegionSpec>().map(|r| r.0)
    }

    #[test]
    fn region_specs() {
        assert_eq!(
            spec("0:512M").unwrap(),
            PinRequest {
                node: NodeId(0),
                size: 512 << 20,
                page_size: PageSize::Base,
                iova: None,
                min_extent: None,
            }
        );
        assert_eq!(
            spec("1:1G:2M@0x100000000").unwrap(),
            PinRequest {
                node: NodeId(1),
                size: 1 << 30,
                page_size: PageSize::Huge2M,
                iova: Some(Iova(0x1_0000_0000)),
                min_extent: None,
            }
        );
        assert_eq!(spec("0:4096:4K").unwrap().page_size, PageSize::Base);
        // Size 0 parses; the pinner rejects it with its own error.
        assert_eq!(spec("0:0").unwrap().size, 0);
        for bad in [
            "",
            "0",
            "x:1M",
            "0:1M:3M",
            "0:1Q",
            "0:1M@4096",
            "0:1M:2M:x",
            "-1:4K",
        ] {
            let e = spec(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected NODE:SIZE[:PAGESIZE][@IOVA]"),
                "{bad}: {e}"
            );
        }
        assert!(
            spec("0:1M:3M")
                .unwrap_err()
                .to_string()
                .contains("use 4K, 2M or 1G")
        );
        assert!(
            spec("0:1M@4096")
                .unwrap_err()
                .to_string()
                .contains("0x-prefixed hex")
        );
    }
}
