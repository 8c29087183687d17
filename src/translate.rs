//! Address translation over many pinned regions: virtual address → IOVA,
//! IOVA → virtual address, and virtual address → physical address.
//!
//! A VMM or a user-space driver that keeps many regions pinned translates
//! addresses on every I/O: each buffer in a descriptor ring must become the
//! address the device will use, and each completion's address must become a
//! pointer again. SPDK keeps memory maps for the same reason. [`AddressMap`]
//! is that table: it holds one [`Mapping`] per pinned region and answers the
//! lookups in `O(log n)` time with no allocation, no locking and no system
//! call. It is pure bookkeeping: it never pins, maps or reads `pagemap`. The
//! caller fills it from what it pinned (for example a
//! [`PinnedRegion`](crate::PinnedRegion) and its
//! [`phys_extents`](crate::PinnedRegion::phys_extents)) and keeps it in step
//! when a region is released.
//!
//! - [`Mapping`]: one region: its virtual range, its IOVA (if the device sits
//!   behind an IOMMU) and its physical runs in virtual order.
//! - [`AddressMap`]: the table. [`insert`](AddressMap::insert) rejects
//!   mappings that overlap another one in virtual or IOVA space;
//!   [`iova_of`](AddressMap::iova_of), [`vaddr_of`](AddressMap::vaddr_of),
//!   [`phys_of`](AddressMap::phys_of) and [`dma_addr_of`](AddressMap::dma_addr_of)
//!   translate one address.
//! - [`DmaAddr`]: what a device puts on the bus: an IOVA, or the physical
//!   address itself for a device without an IOMMU (VFIO no-IOMMU mode).
//! - [`TranslateError`]: why a mapping was refused.
//!
//! # Layout
//!
//! Regions are kept sorted by virtual start address, with the starts in a
//! dense `Vec<u64>` of their own so that the binary search touches few cache
//! lines. A second sorted array indexes the regions that have an IOVA by
//! IOVA start. Each region keeps its physical extents as `(offset in region,
//! physical address)` pairs sorted by offset, searched in turn for
//! [`phys_of`](AddressMap::phys_of). Inserting or removing a region shifts
//! the arrays (`O(n)`): maps change rarely and are read on every I/O.
//!
//! All ranges are half-open, `[start, start + len)`. A region may end at
//! the very top of the 64-bit space.
//!
//! # Example
//!
//! ```
//! use numapin::translate::{AddressMap, DmaAddr, Mapping};
//! use numapin::phys::PhysExtent;
//! use numapin::{Iova, PhysAddr};
//!
//! let mut map = AddressMap::new();
//! // 4 MiB at 0x7f00_0000_0000, mapped at IOVA 0x1_0000_0000, backed by two
//! // 2 MiB physical runs.
//! map.insert(Mapping {
//!     vaddr: 0x7f00_0000_0000,
//!     len: 4 << 20,
//!     iova: Some(Iova(0x1_0000_0000)),
//!     extents: vec![
//!         PhysExtent { pa: PhysAddr(0x4000_0000), len: 2 << 20 },
//!         PhysExtent { pa: PhysAddr(0x9000_0000), len: 2 << 20 },
//!     ],
//! })?;
//!
//! let v = 0x7f00_0020_0010; // 16 bytes into the second 2 MiB
//! assert_eq!(map.iova_of(v), Some(Iova(0x1_0020_0010)));
//! assert_eq!(map.vaddr_of(Iova(0x1_0020_0010)), Some(v));
//! assert_eq!(map.phys_of(v), Some(PhysAddr(0x9000_0010)));
//! assert_eq!(map.dma_addr_of(v), Some(DmaAddr::Iova(Iova(0x1_0020_0010))));
//! // One past the end is not mapped.
//! assert_eq!(map.iova_of(0x7f00_0040_0000), None);
//!
//! // A second region that overlaps the first in IOVA space is refused.
//! let clash = Mapping {
//!     vaddr: 0x7f00_1000_0000,
//!     len: 2 << 20,
//!     iova: Some(Iova(0x1_0030_0000)),
//!     extents: vec![],
//! };
//! assert!(map.insert(clash).is_err());
//! # Ok::<(), numapin::translate::TranslateError>(())
//! ```

use std::fmt;

use crate::addr::{Iova, PhysAddr};
use crate::phys::PhysExtent;

/// One pinned region as the translation table sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The process's virtual address of the first byte.
    pub vaddr: u64,
    /// The length in bytes (not zero).
    pub len: u64,
    /// The IOVA of the first byte, or `None` for a device without an IOMMU
    /// (VFIO no-IOMMU mode), whose DMA address is the physical address.
    pub iova: Option<Iova>,
    /// The region's physically contiguous runs in virtual order; their
    /// lengths add up to `len`. May be empty when the physical addresses
    /// are unknown (reading them needs CAP_SYS_ADMIN), but only if `iova`
    /// is set: otherwise the region would have no DMA address.
    pub extents: Vec<PhysExtent>,
}

/// The address a device uses for DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaAddr {
    /// An I/O virtual address, translated by the IOMMU.
    Iova(Iova),
    /// A physical address, used as is by a device without an IOMMU.
    Phys(PhysAddr),
}

impl DmaAddr {
    /// The raw bus address, to write into a descriptor.
    pub const fn raw(self) -> u64 {
        match self {
            DmaAddr::Iova(a) => a.0,
            DmaAddr::Phys(a) => a.0,
        }
    }
}

impl fmt::Display for DmaAddr {
    /// `IOVA 0x100000000` or `PA 0x40000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaAddr::Iova(a) => write!(f, "IOVA {a}"),
            DmaAddr::Phys(a) => write!(f, "PA {a}"),
        }
    }
}

/// Why [`AddressMap::insert`] refused a mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// A mapping of zero bytes.
    #[error(
        "mapping at virtual address {vaddr:#x} has length 0; give the length of the pinned region \
         in bytes"
    )]
    ZeroLength {
        /// The virtual address given.
        vaddr: u64,
    },
    /// `vaddr + len` wraps past the end of the 64-bit address space.
    #[error(
        "virtual range {vaddr:#x} + {len:#x} wraps past the end of the 64-bit address space; \
         check the region's address and length"
    )]
    VaddrWraps {
        /// The virtual address given.
        vaddr: u64,
        /// The length given.
        len: u64,
    },
    /// `iova + len` wraps past the end of the 64-bit IOVA space.
    #[error(
        "IOVA range {iova} + {len:#x} wraps past the end of the 64-bit IOVA space; pass the IOVA \
         the region was mapped at"
    )]
    IovaWraps {
        /// The IOVA given.
        iova: Iova,
        /// The length given.
        len: u64,
    },
    /// A mapping with neither an IOVA nor physical extents.
    #[error(
        "mapping at virtual address {vaddr:#x} has neither an IOVA nor physical extents, so it has \
         no DMA address; pass the IOVA it was mapped at, or (for a device without an IOMMU) its \
         physical extents, which reading /proc/self/pagemap needs CAP_SYS_ADMIN for"
    )]
    NoDmaAddress {
        /// The virtual address given.
        vaddr: u64,
    },
    /// A physical extent of zero bytes.
    #[error(
        "physical extent {index} of the mapping at virtual address {vaddr:#x} has length 0; drop \
         empty extents (phys::merge_extents never makes them)"
    )]
    EmptyExtent {
        /// The mapping's virtual address.
        vaddr: u64,
        /// The position of the extent in the list.
        index: usize,
    },
    /// A physical extent whose end wraps past the 64-bit space.
    #[error(
        "physical extent {pa} + {len:#x} of the mapping at virtual address {vaddr:#x} wraps past \
         the end of the 64-bit physical address space; pass the extents that phys::phys_extents \
         reads"
    )]
    ExtentWraps {
        /// The mapping's virtual address.
        vaddr: u64,
        /// The extent's physical address.
        pa: PhysAddr,
        /// The extent's length.
        len: u64,
    },
    /// The extents do not cover the mapping exactly.
    #[error(
        "the physical extents of the mapping at virtual address {vaddr:#x} cover {covered:#x} \
         bytes, but the mapping is {len:#x} bytes; pass the extents of exactly this range in \
         virtual order (phys::phys_extents(vaddr, len)), or none if they are unknown"
    )]
    ExtentsMismatch {
        /// The mapping's virtual address.
        vaddr: u64,
        /// The mapping's length.
        len: u64,
        /// What the extents add up to (saturating at `u64::MAX`).
        covered: u64,
    },
    /// The virtual range overlaps a mapping already in the table.
    #[error(
        "virtual range [{vaddr:#x}, +{len:#x}) overlaps the mapping already at [{other_vaddr:#x}, \
         +{other_len:#x}); remove that mapping first, or insert each pinned region once"
    )]
    VaddrOverlap {
        /// The virtual address given.
        vaddr: u64,
        /// The length given.
        len: u64,
        /// The virtual address of the mapping in the way.
        other_vaddr: u64,
        /// The length of the mapping in the way.
        other_len: u64,
    },
    /// The IOVA range overlaps a mapping already in the table.
    #[error(
        "IOVA range [{iova}, +{len:#x}) overlaps the IOVA range [{other_iova}, +{other_len:#x}) of \
         the mapping at virtual address {other_vaddr:#x}; one IOVA cannot reach two regions: \
         remove that mapping first, or pass the IOVA this region was really mapped at"
    )]
    IovaOverlap {
        /// The IOVA given.
        iova: Iova,
        /// The length given.
        len: u64,
        /// The IOVA of the mapping in the way.
        other_iova: Iova,
        /// The length of the mapping in the way.
        other_len: u64,
        /// The virtual address of the mapping in the way.
        other_vaddr: u64,
    },
}

/// A physical extent stored by its offset in its region.
#[derive(Debug, Clone, Copy)]
struct Ext {
    /// Offset of the extent's first byte from the region's start.
    off: u64,
    /// Physical address of the extent's first byte.
    pa: u64,
}

/// One region in virtual order.
#[derive(Debug, Clone)]
struct Region {
    vaddr: u64,
    len: u64,
    iova: Option<Iova>,
    /// Sorted by `off`; `exts[0].off == 0` unless empty (PAs unknown).
    exts: Box<[Ext]>,
}

impl Region {
    /// The byte offset of `vaddr` in the region, if it lies inside.
    #[inline]
    fn offset_of(&self, vaddr: u64) -> Option<u64> {
        // Wraps to a huge value below the start, so one compare suffices;
        // also right for a region that ends at 2^64.
        let off = vaddr.wrapping_sub(self.vaddr);
        (off < self.len).then_some(off)
    }

    /// The physical run from offset `off` (inside the region) to the end of
    /// its extent.
    #[inline]
    fn phys_run(&self, off: u64) -> Option<PhysExtent> {
        // Extents after the one holding `off` start past it.
        let i = self.exts.partition_point(|e| e.off <= off).checked_sub(1)?;
        let e = self.exts[i];
        let end = self.exts.get(i + 1).map_or(self.len, |n| n.off);
        let into = off - e.off;
        Some(PhysExtent {
            pa: PhysAddr(e.pa + into),
            len: end - off,
        })
    }

    fn to_mapping(&self) -> Mapping {
        let extents = self
            .exts
            .iter()
            .enumerate()
            .map(|(i, e)| PhysExtent {
                pa: PhysAddr(e.pa),
                len: self.exts.get(i + 1).map_or(self.len, |n| n.off) - e.off,
            })
            .collect();
        Mapping {
            vaddr: self.vaddr,
            len: self.len,
            iova: self.iova,
            extents,
        }
    }
}

/// The IOVA index entry of a region that has an IOVA.
#[derive(Debug, Clone, Copy)]
struct IovaSlot {
    len: u64,
    vaddr: u64,
}

/// A translation table over many pinned regions.
///
/// Lookups take `&self` and never allocate, so a table that no longer
/// changes can be shared between threads (it is `Send + Sync`). See the
/// [module documentation](self) for the layout and an example.
#[derive(Debug, Clone, Default)]
pub struct AddressMap {
    /// `regions[i].vaddr`, sorted, for the search.
    vstarts: Vec<u64>,
    /// The regions, in the order of `vstarts`.
    regions: Vec<Region>,
    /// IOVA starts of the regions that have one, sorted.
    istarts: Vec<u64>,
    /// In the order of `istarts`.
    islots: Vec<IovaSlot>,
}

/// The index of the last start `<= x`: the only range that can hold `x`.
#[inline]
fn last_at_or_below(starts: &[u64], x: u64) -> Option<usize> {
    starts.partition_point(|&s| s <= x).checked_sub(1)
}

/// Checks a mapping on its own and turns its extents into offsets.
fn validate(m: &Mapping) -> Result<Box<[Ext]>, TranslateError> {
    let vaddr = m.vaddr;
    if m.len == 0 {
        return Err(TranslateError::ZeroLength { vaddr });
    }
    let last = m.len - 1;
    if vaddr.checked_add(last).is_none() {
        return Err(TranslateError::VaddrWraps { vaddr, len: m.len });
    }
    if let Some(iova) = m.iova {
        if iova.checked_add(last).is_none() {
            return Err(TranslateError::IovaWraps { iova, len: m.len });
        }
    } else if m.extents.is_empty() {
        return Err(TranslateError::NoDmaAddress { vaddr });
    }
    let mut exts = Vec::with_capacity(m.extents.len());
    let mut covered = 0u64;
    for (index, e) in m.extents.iter().enumerate() {
        if e.len == 0 {
            return Err(TranslateError::EmptyExtent { vaddr, index });
        }
        if e.pa.checked_add(e.len - 1).is_none() {
            return Err(TranslateError::ExtentWraps {
                vaddr,
                pa: e.pa,
                len: e.len,
            });
        }
        exts.push(Ext {
            off: covered,
            pa: e.pa.0,
        });
        covered = covered.saturating_add(e.len);
    }
    if !m.extents.is_empty() && covered != m.len {
        return Err(TranslateError::ExtentsMismatch {
            vaddr,
            len: m.len,
            covered,
        });
    }
    Ok(exts.into_boxed_slice())
}

impl AddressMap {
    /// An empty table.
    pub fn new() -> AddressMap {
        AddressMap::default()
    }

    /// The number of regions in the table.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the table holds no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Adds a region.
    ///
    /// # Errors
    /// - [`TranslateError::ZeroLength`], [`TranslateError::VaddrWraps`],
    ///   [`TranslateError::IovaWraps`]: the range itself is invalid.
    /// - [`TranslateError::NoDmaAddress`]: neither an IOVA nor extents.
    /// - [`TranslateError::EmptyExtent`], [`TranslateError::ExtentWraps`],
    ///   [`TranslateError::ExtentsMismatch`]: the extents do not describe
    ///   the range.
    /// - [`TranslateError::VaddrOverlap`], [`TranslateError::IovaOverlap`]:
    ///   the range overlaps a region already in the table, in virtual or
    ///   IOVA space.
    ///
    /// On error the table is unchanged.
    pub fn insert(&mut self, m: Mapping) -> Result<(), TranslateError> {
        let exts = validate(&m)?;
        let last = m.len - 1;

        // Virtual space: only the neighbours can overlap.
        let vpos = self.vstarts.partition_point(|&s| s <= m.vaddr);
        let vclash = vpos
            .checked_sub(1)
            .map(|i| &self.regions[i])
            .filter(|r| r.vaddr + (r.len - 1) >= m.vaddr)
            .or_else(|| self.regions.get(vpos).filter(|r| r.vaddr <= m.vaddr + last));
        if let Some(r) = vclash {
            return Err(TranslateError::VaddrOverlap {
                vaddr: m.vaddr,
                len: m.len,
                other_vaddr: r.vaddr,
                other_len: r.len,
            });
        }

        // IOVA space, the same way.
        let ipos = m.iova.map(|iova| {
            let pos = self.istarts.partition_point(|&s| s <= iova.0);
            let below = pos
                .checked_sub(1)
                .map(|i| (self.istarts[i], self.islots[i]))
                .filter(|&(s, slot)| s + (slot.len - 1) >= iova.0);
            let above = || {
                self.islots
                    .get(pos)
                    .map(|&slot| (self.istarts[pos], slot))
                    .filter(|&(s, _)| s <= iova.0 + last)
            };
            match below.or_else(above) {
                Some((s, slot)) => Err(TranslateError::IovaOverlap {
                    iova,
                    len: m.len,
                    other_iova: Iova(s),
                    other_len: slot.len,
                    other_vaddr: slot.vaddr,
                }),
                None => Ok((pos, iova)),
            }
        });
        let ipos = ipos.transpose()?;

        if let Some((pos, iova)) = ipos {
            self.istarts.insert(pos, iova.0);
            self.islots.insert(
                pos,
                IovaSlot {
                    len: m.len,
                    vaddr: m.vaddr,
                },
            );
        }
        self.vstarts.insert(vpos, m.vaddr);
        self.regions.insert(
            vpos,
            Region {
                vaddr: m.vaddr,
                len: m.len,
                iova: m.iova,
                exts,
            },
        );
        Ok(())
    }

    /// Removes the region that starts at `vaddr` and gives it back, or
    /// `None` if no region starts there (an address inside a region does
    /// not count).
    pub fn remove(&mut self, vaddr: u64) -> Option<Mapping> {
        let i = self.vstarts.binary_search(&vaddr).ok()?;
        self.vstarts.remove(i);
        let r = self.regions.remove(i);
        if let Some(iova) = r.iova {
            // Inserted together with the region, so it is there.
            if let Ok(j) = self.istarts.binary_search(&iova.0) {
                self.istarts.remove(j);
                self.islots.remove(j);
            }
        }
        Some(r.to_mapping())
    }

    /// The region holding `vaddr` and the offset of `vaddr` in it.
    #[inline]
    fn find(&self, vaddr: u64) -> Option<(&Region, u64)> {
        let r = &self.regions[last_at_or_below(&self.vstarts, vaddr)?];
        Some((r, r.offset_of(vaddr)?))
    }

    /// The IOVA of the byte at `vaddr`, or `None` if no region holds it or
    /// its region has no IOVA.
    #[inline]
    pub fn iova_of(&self, vaddr: u64) -> Option<Iova> {
        let (r, off) = self.find(vaddr)?;
        r.iova.map(|i| Iova(i.0 + off))
    }

    /// The virtual address of the byte the device reaches at `iova`, or
    /// `None` if no region is mapped there.
    #[inline]
    pub fn vaddr_of(&self, iova: Iova) -> Option<u64> {
        let i = last_at_or_below(&self.istarts, iova.0)?;
        let off = iova.0.wrapping_sub(self.istarts[i]);
        let slot = self.islots[i];
        (off < slot.len).then(|| slot.vaddr + off)
    }

    /// The physical address of the byte at `vaddr`, or `None` if no region
    /// holds it or its physical addresses are unknown.
    #[inline]
    pub fn phys_of(&self, vaddr: u64) -> Option<PhysAddr> {
        self.phys_extent_of(vaddr).map(|e| e.pa)
    }

    /// The physically contiguous run that starts at `vaddr`: its physical
    /// address and how many bytes from `vaddr` on stay contiguous (up to the
    /// end of the extent, never past the region). A driver building a
    /// scatter-gather list takes one entry per run.
    #[inline]
    pub fn phys_extent_of(&self, vaddr: u64) -> Option<PhysExtent> {
        let (r, off) = self.find(vaddr)?;
        r.phys_run(off)
    }

    /// The address a device uses to reach the byte at `vaddr`: its IOVA if
    /// its region has one, else its physical address (a device without an
    /// IOMMU). `None` only if no region holds `vaddr`:
    /// [`insert`](Self::insert) refuses a region with neither.
    #[inline]
    pub fn dma_addr_of(&self, vaddr: u64) -> Option<DmaAddr> {
        let (r, off) = self.find(vaddr)?;
        match r.iova {
            Some(i) => Some(DmaAddr::Iova(Iova(i.0 + off))),
            None => r.phys_run(off).map(|e| DmaAddr::Phys(e.pa)),
        }
    }

    /// Every region, in virtual address order, as it was inserted.
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.regions.iter().map(Region::to_mapping)
    }
}
