//! Address translation over many pinned regions: virtual address → IOVA,
//! IOVA → virtual address, and virtual address → physical address.
//!
//! A VMM or a user-space driver that keeps many regions pinned translates
//! addresses on every I/O: each buffer in a descriptor ring must become the
//! address the device will use, and each completion's address must become a
//! pointer again. SPDK keeps memory maps for the same reason. [`AddressMap`]
//! is that table: it holds one [`Mapping`] per pinned region and answers the
//! lookups in constant time (for regions aligned to 2 MiB) with no
//! allocation, no locking and no system call. It is pure bookkeeping: it
//! never pins, maps or reads `pagemap`. The caller fills it from what it
//! pinned (for example a
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
//! Four two-level tables hold one value per 2 MiB granule below 2^48: a
//! top level indexed by `address >> 30` (2^18 `u32` slots, 1 MiB,
//! allocated on the first insert) names a leaf of 512 values indexed by
//! `(address >> 21) & 511`, and each table keeps its leaves in one dense
//! array. Three of them, vaddr → IOVA, vaddr → PA and IOVA → vaddr, hold
//! 8-byte entries (a leaf is one 4 KiB page). For a granule that one region
//! covers whole, the entry is the difference to add (IOVA − vaddr, PA −
//! vaddr when the granule lies in one physical extent, vaddr − IOVA), so a
//! lookup is two dependent loads (a top-level word and one cache line of a
//! leaf) and an add, whatever the number of regions. The entry's two low
//! bits say what it holds, so the difference must be a multiple of 4 (true
//! for page-aligned regions); otherwise, and for a granule a region covers
//! in part, the entry names the region's slot (one more load and a bounds
//! check). The fourth table gives each virtual granule its region's slot
//! (4 bytes), for [`phys_extent_of`](AddressMap::phys_extent_of), whose
//! physical runs come from the region's extents, `(offset, physical
//! address)` pairs searched by offset. Regions not aligned to 2 MiB can
//! share a granule: its entries then send the lookup to [`SortedMap`], the
//! regions in sorted arrays searched in `O(log n)` (the structure this map
//! had before its tables, kept as the bench's baseline), as do addresses at
//! or above 2^48.
//!
//! Memory: each table costs 1 MiB of top level once a region is in it, and
//! each GiB of address space a region reaches costs a whole leaf: 20 bytes
//! per 2 MiB granule of virtual space (4 KiB + 4 KiB + 2 KiB per GiB) and 8
//! bytes per granule of IOVA space (4 KiB per GiB). The sorted arrays and a
//! copy of each region's extents come on top ([`AddressMap::heap_bytes`]).
//! Inserting or removing a region shifts the sorted arrays (`O(n)`) and
//! writes one entry per granule it spans in each table; leaves, once made,
//! stay: maps change rarely and are read on every I/O.
//!
//! All ranges are half-open, `[start, start + len)`. A region may end at
//! the very top of the 64-bit space.
//!
//! # Example
//!
//! ```
//! use numapin::translate::{AddressMap, DmaAddr, Mapping};
//! use numapin::phys::PhysExtent;
//! use numapin::{Iova, PhysAddr, VirtAddr};
//!
//! let mut map = AddressMap::new();
//! // 4 MiB at 0x7f00_0000_0000, mapped at IOVA 0x1_0000_0000, backed by two
//! // 2 MiB physical runs.
//! map.insert(Mapping {
//!     vaddr: VirtAddr(0x7f00_0000_0000),
//!     len: 4 << 20,
//!     iova: Some(Iova(0x1_0000_0000)),
//!     extents: vec![
//!         PhysExtent { pa: PhysAddr(0x4000_0000), len: 2 << 20 },
//!         PhysExtent { pa: PhysAddr(0x9000_0000), len: 2 << 20 },
//!     ],
//! })?;
//!
//! let v = VirtAddr(0x7f00_0020_0010); // 16 bytes into the second 2 MiB
//! assert_eq!(map.iova_of(v), Some(Iova(0x1_0020_0010)));
//! assert_eq!(map.vaddr_of(Iova(0x1_0020_0010)), Some(v));
//! assert_eq!(map.phys_of(v), Some(PhysAddr(0x9000_0010)));
//! assert_eq!(map.dma_addr_of(v), Some(DmaAddr::Iova(Iova(0x1_0020_0010))));
//! // One past the end is not mapped.
//! assert_eq!(map.iova_of(VirtAddr(0x7f00_0040_0000)), None);
//!
//! // A second region that overlaps the first in IOVA space is refused.
//! let clash = Mapping {
//!     vaddr: VirtAddr(0x7f00_1000_0000),
//!     len: 2 << 20,
//!     iova: Some(Iova(0x1_0030_0000)),
//!     extents: vec![],
//! };
//! assert!(map.insert(clash).is_err());
//! # Ok::<(), numapin::translate::TranslateError>(())
//! ```

use std::fmt;

use crate::addr::{Iova, PhysAddr, VirtAddr};
use crate::phys::PhysExtent;

/// One pinned region as the translation table sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The process's virtual address of the first byte.
    pub vaddr: VirtAddr,
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

impl fmt::LowerHex for DmaAddr {
    /// The raw bus address in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.raw(), f)
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
        vaddr: VirtAddr,
    },
    /// `vaddr + len` wraps past the end of the 64-bit address space.
    #[error(
        "virtual range {vaddr:#x} + {len:#x} wraps past the end of the 64-bit address space; \
         check the region's address and length"
    )]
    VaddrWraps {
        /// The virtual address given.
        vaddr: VirtAddr,
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
        vaddr: VirtAddr,
    },
    /// A physical extent of zero bytes.
    #[error(
        "physical extent {index} of the mapping at virtual address {vaddr:#x} has length 0; drop \
         empty extents (phys::merge_extents never makes them)"
    )]
    EmptyExtent {
        /// The mapping's virtual address.
        vaddr: VirtAddr,
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
        vaddr: VirtAddr,
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
        vaddr: VirtAddr,
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
        vaddr: VirtAddr,
        /// The length given.
        len: u64,
        /// The virtual address of the mapping in the way.
        other_vaddr: VirtAddr,
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
        other_vaddr: VirtAddr,
    },
}

mod sorted;
mod table;

pub use sorted::SortedMap;

use sorted::Region;
use table::{Kind, LIMIT, Slots, Tables};

/// A translation table over many pinned regions.
///
/// Lookups take `&self` and never allocate, so a table that no longer
/// changes can be shared between threads (it is `Send + Sync`). See the
/// [module documentation](self) for the layout and an example.
#[derive(Debug, Clone, Default)]
pub struct AddressMap {
    /// Every region: the overlap checks, the ordered listing and the
    /// addresses the tables send on.
    sorted: SortedMap,
    /// One entry per 2 MiB granule, per direction.
    tables: Tables,
    /// The regions by slot (a removed region leaves a free slot).
    slots: Vec<Region>,
    free: Vec<u32>,
    /// Slot of each region, by virtual start.
    slot_of: std::collections::HashMap<u64, u32>,
}

impl AddressMap {
    /// An empty table.
    pub fn new() -> AddressMap {
        AddressMap::default()
    }

    /// The number of regions in the table.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether the table holds no region.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Heap bytes the table takes: the sorted arrays, the regions' extents
    /// (kept twice: once in the arrays, once by slot) and the four
    /// two-level tables (1 MiB of top level each once a region is in them,
    /// and per GiB of address space touched 4 KiB for each of vaddr → IOVA,
    /// vaddr → PA and IOVA → vaddr, 2 KiB for vaddr → region).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.sorted.heap_bytes()
            + self.tables.heap_bytes()
            + self.slots.capacity() * size_of::<Region>()
            + self
                .slots
                .iter()
                .map(|r| std::mem::size_of_val(&*r.exts))
                .sum::<usize>()
            + self.free.capacity() * size_of::<u32>()
            + self.slot_of.capacity() * (size_of::<u64>() + size_of::<u32>())
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
        let vaddr = m.vaddr.raw();
        self.sorted.insert(m)?;
        let r = self
            .sorted
            .region_at(vaddr)
            .expect("the region just inserted")
            .clone();
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = r;
                s
            }
            None => {
                self.slots.push(r);
                // The slot table keeps slot + 1 and one value for "many".
                u32::try_from(self.slots.len() - 1)
                    .ok()
                    .filter(|&s| s < u32::MAX - 1)
                    .expect("fewer than 2^32 - 1 regions")
            }
        };
        self.slot_of.insert(vaddr, slot);
        self.tables.add(&self.slots[slot as usize], slot);
        Ok(())
    }

    /// Removes the region that starts at `vaddr` and gives it back, or
    /// `None` if no region starts there (an address inside a region does
    /// not count).
    pub fn remove(&mut self, vaddr: VirtAddr) -> Option<Mapping> {
        let m = self.sorted.remove(vaddr)?;
        let slot = self
            .slot_of
            .remove(&vaddr.raw())
            .expect("every region has a slot");
        let slots = Slots {
            regions: &self.slots,
            by_vaddr: &self.slot_of,
        };
        self.tables
            .remove(&self.slots[slot as usize], &self.sorted, &slots);
        self.slots[slot as usize].exts = Box::new([]);
        self.free.push(slot);
        Some(m)
    }

    /// The region in `slot` and the offset of `v` in it, if it holds `v`.
    #[inline]
    fn in_slot(&self, slot: usize, v: u64) -> Option<(&Region, u64)> {
        let r = &self.slots[slot];
        Some((r, r.offset_of(v)?))
    }

    /// The IOVA of the byte at `vaddr`, or `None` if no region holds it or
    /// its region has no IOVA.
    #[inline]
    pub fn iova_of(&self, vaddr: VirtAddr) -> Option<Iova> {
        let v = vaddr.raw();
        if v < LIMIT {
            match self.tables.v2i.get(v).kind() {
                Kind::Direct(d) => return Some(Iova(v.wrapping_add(d))),
                Kind::Slot(s) => {
                    let (r, off) = self.in_slot(s, v)?;
                    return r.iova.map(|i| Iova(i.0 + off));
                }
                Kind::Empty => return None,
                Kind::Multi => {}
            }
        }
        self.sorted.iova_of(vaddr)
    }

    /// The virtual address of the byte the device reaches at `iova`, or
    /// `None` if no region is mapped there.
    #[inline]
    pub fn vaddr_of(&self, iova: Iova) -> Option<VirtAddr> {
        let a = iova.0;
        if a < LIMIT {
            match self.tables.i2v.get(a).kind() {
                Kind::Direct(d) => return Some(VirtAddr(a.wrapping_add(d))),
                Kind::Slot(s) => {
                    let r = &self.slots[s];
                    let off = a.wrapping_sub(r.iova?.0);
                    return (off < r.len).then(|| VirtAddr(r.vaddr + off));
                }
                Kind::Empty => return None,
                Kind::Multi => {}
            }
        }
        self.sorted.vaddr_of(iova)
    }

    /// The physical address of the byte at `vaddr`, or `None` if no region
    /// holds it or its physical addresses are unknown.
    #[inline]
    pub fn phys_of(&self, vaddr: VirtAddr) -> Option<PhysAddr> {
        let v = vaddr.raw();
        if v < LIMIT {
            match self.tables.v2p.get(v).kind() {
                Kind::Direct(d) => return Some(PhysAddr(v.wrapping_add(d))),
                Kind::Slot(s) => {
                    let (r, off) = self.in_slot(s, v)?;
                    return r.phys_run(off).map(|e| e.pa);
                }
                Kind::Empty => return None,
                Kind::Multi => {}
            }
        }
        self.sorted.phys_of(vaddr)
    }

    /// The physically contiguous run that starts at `vaddr`: its physical
    /// address and how many bytes from `vaddr` on stay contiguous (up to the
    /// end of the extent, never past the region). A driver building a
    /// scatter-gather list takes one entry per run.
    #[inline]
    pub fn phys_extent_of(&self, vaddr: VirtAddr) -> Option<PhysExtent> {
        let v = vaddr.raw();
        if v < LIMIT
            && let Ok(slot) = self.tables.slot_of(v)
        {
            let (r, off) = self.in_slot(slot?, v)?;
            return r.phys_run(off);
        }
        self.sorted.phys_extent_of(vaddr)
    }

    /// The address a device uses to reach the byte at `vaddr`: its IOVA if
    /// its region has one, else its physical address (a device without an
    /// IOMMU). `None` only if no region holds `vaddr`:
    /// [`insert`](Self::insert) refuses a region with neither.
    #[inline]
    pub fn dma_addr_of(&self, vaddr: VirtAddr) -> Option<DmaAddr> {
        let v = vaddr.raw();
        if v < LIMIT {
            match self.tables.v2i.get(v).kind() {
                Kind::Direct(d) => return Some(DmaAddr::Iova(Iova(v.wrapping_add(d)))),
                Kind::Slot(s) => {
                    let (r, off) = self.in_slot(s, v)?;
                    return match r.iova {
                        Some(i) => Some(DmaAddr::Iova(Iova(i.0 + off))),
                        // No IOMMU: the vaddr → PA table knows.
                        None => self.phys_of(vaddr).map(DmaAddr::Phys),
                    };
                }
                Kind::Empty => return None,
                Kind::Multi => {}
            }
        }
        self.sorted.dma_addr_of(vaddr)
    }

    /// Every region, in virtual address order, as it was inserted.
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.sorted.mappings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lookups on raw `u64` addresses, so the tests read as arithmetic.
    impl AddressMap {
        fn iova_of_raw(&self, v: u64) -> Option<Iova> {
            self.iova_of(VirtAddr(v))
        }
        fn vaddr_of_raw(&self, i: Iova) -> Option<u64> {
            self.vaddr_of(i).map(VirtAddr::raw)
        }
        fn phys_of_raw(&self, v: u64) -> Option<PhysAddr> {
            self.phys_of(VirtAddr(v))
        }
        fn phys_extent_of_raw(&self, v: u64) -> Option<PhysExtent> {
            self.phys_extent_of(VirtAddr(v))
        }
        fn dma_addr_of_raw(&self, v: u64) -> Option<DmaAddr> {
            self.dma_addr_of(VirtAddr(v))
        }
        fn remove_raw(&mut self, v: u64) -> Option<Mapping> {
            self.remove(VirtAddr(v))
        }
    }
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    const MIB2: u64 = 2 << 20;

    fn ext(pa: u64, len: u64) -> PhysExtent {
        PhysExtent {
            pa: PhysAddr(pa),
            len,
        }
    }

    /// 6 MiB at 0x7f00_0000_0000, IOVA 0x1_0000_0000, three 2 MiB runs.
    fn sample() -> Mapping {
        Mapping {
            vaddr: VirtAddr(0x7f00_0000_0000),
            len: 3 * MIB2,
            iova: Some(Iova(0x1_0000_0000)),
            extents: vec![
                ext(0x4000_0000, MIB2),
                ext(0x9000_0000, MIB2),
                ext(0x2000_0000, MIB2),
            ],
        }
    }

    // ---- the reference: a linear scan over the mappings -------------------

    fn naive_iova_of(ms: &[Mapping], v: u64) -> Option<Iova> {
        let m = ms.iter().find(|m| v.wrapping_sub(m.vaddr.raw()) < m.len)?;
        m.iova.map(|i| Iova(i.0 + (v - m.vaddr.raw())))
    }

    fn naive_vaddr_of(ms: &[Mapping], i: Iova) -> Option<u64> {
        ms.iter().find_map(|m| {
            let off = i.0.wrapping_sub(m.iova?.0);
            (off < m.len).then(|| m.vaddr.raw() + off)
        })
    }

    fn naive_phys_extent_of(ms: &[Mapping], v: u64) -> Option<PhysExtent> {
        let m = ms.iter().find(|m| v.wrapping_sub(m.vaddr.raw()) < m.len)?;
        let mut off = v - m.vaddr.raw();
        for e in &m.extents {
            if off < e.len {
                return Some(ext(e.pa.0 + off, e.len - off));
            }
            off -= e.len;
        }
        None
    }

    fn naive_dma_addr_of(ms: &[Mapping], v: u64) -> Option<DmaAddr> {
        let m = ms.iter().find(|m| v.wrapping_sub(m.vaddr.raw()) < m.len)?;
        match m.iova {
            Some(_) => naive_iova_of(ms, v).map(DmaAddr::Iova),
            None => naive_phys_extent_of(ms, v).map(|e| DmaAddr::Phys(e.pa)),
        }
    }

    fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
        a <= b + (blen - 1) && b <= a + (alen - 1)
    }

    /// What `insert` should answer for a valid mapping `m`, by linear scan.
    fn naive_insert(ms: &mut Vec<Mapping>, m: Mapping) -> Result<(), &'static str> {
        if ms
            .iter()
            .any(|o| overlaps(o.vaddr.raw(), o.len, m.vaddr.raw(), m.len))
        {
            return Err("vaddr");
        }
        if ms.iter().any(|o| match (o.iova, m.iova) {
            (Some(a), Some(b)) => overlaps(a.0, o.len, b.0, m.len),
            _ => false,
        }) {
            return Err("iova");
        }
        ms.push(m);
        Ok(())
    }

    /// Every lookup of `map` agrees with the linear scan over `ms` at `v`
    /// (as a virtual address) and at `Iova(v)`.
    fn check_probe(map: &AddressMap, ms: &[Mapping], v: u64) {
        assert_eq!(map.iova_of_raw(v), naive_iova_of(ms, v), "iova_of({v:#x})");
        assert_eq!(
            map.vaddr_of_raw(Iova(v)),
            naive_vaddr_of(ms, Iova(v)),
            "vaddr_of({v:#x})"
        );
        assert_eq!(
            map.phys_extent_of_raw(v),
            naive_phys_extent_of(ms, v),
            "phys_extent_of({v:#x})"
        );
        assert_eq!(
            map.phys_of_raw(v),
            naive_phys_extent_of(ms, v).map(|e| e.pa),
            "phys_of({v:#x})"
        );
        assert_eq!(
            map.dma_addr_of_raw(v),
            naive_dma_addr_of(ms, v),
            "dma_addr_of({v:#x})"
        );
    }

    /// The addresses where an off-by-one would show: around both ends of
    /// every range, and of every extent.
    fn boundary_probes(ms: &[Mapping]) -> Vec<u64> {
        let mut p = vec![0, 1, u64::MAX];
        let mut around = |start: u64, len: u64| {
            let end = start.wrapping_add(len);
            p.extend([
                start.wrapping_sub(1),
                start,
                start.wrapping_add(1),
                end.wrapping_sub(2),
                end.wrapping_sub(1),
                end,
            ]);
        };
        for m in ms {
            around(m.vaddr.raw(), m.len);
            if let Some(i) = m.iova {
                around(i.0, m.len);
            }
            let mut off = 0;
            for e in &m.extents {
                around(m.vaddr.raw() + off, e.len);
                off += e.len;
            }
        }
        p
    }

    // ---- unit tests --------------------------------------------------------

    #[test]
    fn empty_map_finds_nothing() {
        let map = AddressMap::new();
        assert!(map.is_empty());
        for v in [0, 1, 0x7f00_0000_0000, u64::MAX] {
            assert_eq!(map.iova_of_raw(v), None);
            assert_eq!(map.vaddr_of_raw(Iova(v)), None);
            assert_eq!(map.phys_of_raw(v), None);
            assert_eq!(map.dma_addr_of_raw(v), None);
        }
    }

    #[test]
    fn boundaries_of_one_region() {
        let m = sample();
        let mut map = AddressMap::new();
        map.insert(m.clone()).unwrap();
        assert_eq!(map.len(), 1);
        let (v, i) = (m.vaddr.raw(), m.iova.unwrap().0);
        let end = v + m.len;

        // First byte.
        assert_eq!(map.iova_of_raw(v), Some(Iova(i)));
        assert_eq!(map.vaddr_of_raw(Iova(i)), Some(v));
        assert_eq!(map.phys_of_raw(v), Some(PhysAddr(0x4000_0000)));
        // Last byte: in the third extent.
        assert_eq!(map.iova_of_raw(end - 1), Some(Iova(i + m.len - 1)));
        assert_eq!(map.vaddr_of_raw(Iova(i + m.len - 1)), Some(end - 1));
        assert_eq!(
            map.phys_of_raw(end - 1),
            Some(PhysAddr(0x2000_0000 + MIB2 - 1))
        );
        // One past the end, one before the start.
        for out in [end, v - 1] {
            assert_eq!(map.iova_of_raw(out), None, "{out:#x}");
            assert_eq!(map.phys_of_raw(out), None, "{out:#x}");
            assert_eq!(map.dma_addr_of_raw(out), None, "{out:#x}");
        }
        assert_eq!(map.vaddr_of_raw(Iova(i + m.len)), None);
        assert_eq!(map.vaddr_of_raw(Iova(i - 1)), None);

        // Extent boundaries: last byte of the first run, first of the second.
        assert_eq!(
            map.phys_of_raw(v + MIB2 - 1),
            Some(PhysAddr(0x4000_0000 + MIB2 - 1))
        );
        assert_eq!(map.phys_of_raw(v + MIB2), Some(PhysAddr(0x9000_0000)));
        assert_eq!(
            map.dma_addr_of_raw(v + MIB2),
            Some(DmaAddr::Iova(Iova(i + MIB2)))
        );
    }

    #[test]
    fn phys_runs_end_at_the_extent() {
        let mut map = AddressMap::new();
        let m = sample();
        map.insert(m.clone()).unwrap();
        assert_eq!(
            map.phys_extent_of_raw(m.vaddr.raw()),
            Some(ext(0x4000_0000, MIB2))
        );
        assert_eq!(
            map.phys_extent_of_raw(m.vaddr.raw() + MIB2 + 0x10),
            Some(ext(0x9000_0010, MIB2 - 0x10))
        );
        assert_eq!(
            map.phys_extent_of_raw(m.vaddr.raw() + m.len - 1),
            Some(ext(0x2000_0000 + MIB2 - 1, 1))
        );
    }

    #[test]
    fn region_at_the_top_of_the_address_space() {
        let len = 0x3000;
        let top = u64::MAX - len + 1;
        let mut map = AddressMap::new();
        map.insert(Mapping {
            vaddr: VirtAddr(top),
            len,
            iova: Some(Iova(top)),
            extents: vec![ext(0x1000, 0x1000), ext(u64::MAX - 0x1fff, 0x2000)],
        })
        .unwrap();
        assert_eq!(map.iova_of_raw(u64::MAX), Some(Iova(u64::MAX)));
        assert_eq!(map.vaddr_of_raw(Iova(u64::MAX)), Some(u64::MAX));
        assert_eq!(map.phys_of_raw(u64::MAX), Some(PhysAddr(u64::MAX)));
        assert_eq!(map.phys_extent_of_raw(u64::MAX), Some(ext(u64::MAX, 1)));
        assert_eq!(map.iova_of_raw(top - 1), None);
        assert_eq!(map.iova_of_raw(0), None);
    }

    #[test]
    fn touching_regions_are_not_overlaps() {
        let mut map = AddressMap::new();
        let a = sample();
        let b = Mapping {
            vaddr: VirtAddr(a.vaddr.raw() + a.len),
            len: MIB2,
            iova: Some(Iova(a.iova.unwrap().0 - MIB2)),
            extents: vec![ext(0x6000_0000, MIB2)],
        };
        map.insert(a.clone()).unwrap();
        map.insert(b.clone()).unwrap();
        // The last byte of `a` and the first of `b` go to different places.
        assert_eq!(
            map.iova_of_raw(b.vaddr.raw() - 1),
            Some(Iova(a.iova.unwrap().0 + a.len - 1))
        );
        assert_eq!(map.iova_of_raw(b.vaddr.raw()), b.iova);
        assert_eq!(map.vaddr_of_raw(a.iova.unwrap()), Some(a.vaddr.raw()));
        assert_eq!(
            map.vaddr_of_raw(Iova(a.iova.unwrap().0 - 1)),
            Some(b.vaddr.raw() + MIB2 - 1)
        );
    }

    #[test]
    fn overlaps_are_refused_and_leave_the_map_unchanged() {
        let mut map = AddressMap::new();
        let a = sample();
        map.insert(a.clone()).unwrap();
        let probe = |vaddr: u64, len: u64, iova: u64| Mapping {
            vaddr: VirtAddr(vaddr),
            len,
            iova: Some(Iova(iova)),
            extents: vec![],
        };
        let (v, i, len) = (a.vaddr.raw(), a.iova.unwrap().0, a.len);
        let far_v = v + (1 << 40);
        let far_i = i + (1 << 40);
        // Virtual overlaps: same start, inside, straddling either end, covering.
        for (vaddr, l) in [
            (v, len),
            (v + 0x1000, 0x1000),
            (v - 0x1000, 0x2000),
            (v - 0x1000, 0x1001),
            (v + len - 1, 0x1000),
            (v - 0x1000, len + 0x2000),
        ] {
            let e = map.insert(probe(vaddr, l, far_i)).unwrap_err();
            assert_eq!(
                e,
                TranslateError::VaddrOverlap {
                    vaddr: VirtAddr(vaddr),
                    len: l,
                    other_vaddr: VirtAddr(v),
                    other_len: len
                }
            );
        }
        // IOVA overlaps, with a free virtual range.
        for (iova, l) in [(i, 1), (i + len - 1, 0x1000), (i - 0x1000, 0x1001)] {
            let e = map.insert(probe(far_v, l, iova)).unwrap_err();
            assert_eq!(
                e,
                TranslateError::IovaOverlap {
                    iova: Iova(iova),
                    len: l,
                    other_iova: Iova(i),
                    other_len: len,
                    other_vaddr: VirtAddr(v),
                }
            );
        }
        assert_eq!(map.len(), 1);
        assert_eq!(map.mappings().collect::<Vec<_>>(), vec![a]);
        assert_eq!(map.iova_of_raw(far_v), None);
        assert_eq!(map.vaddr_of_raw(Iova(far_i)), None);
    }

    #[test]
    fn invalid_mappings_are_refused() {
        let mut map = AddressMap::new();
        let base = sample();
        let with = |f: &dyn Fn(&mut Mapping)| {
            let mut m = base.clone();
            f(&mut m);
            m
        };
        let cases: Vec<(Mapping, TranslateError)> = vec![
            (
                with(&|m| m.len = 0),
                TranslateError::ZeroLength { vaddr: base.vaddr },
            ),
            (
                with(&|m| m.vaddr = VirtAddr(u64::MAX - MIB2)),
                TranslateError::VaddrWraps {
                    vaddr: VirtAddr(u64::MAX - MIB2),
                    len: base.len,
                },
            ),
            (
                with(&|m| m.iova = Some(Iova(u64::MAX - 0x1000))),
                TranslateError::IovaWraps {
                    iova: Iova(u64::MAX - 0x1000),
                    len: base.len,
                },
            ),
            (
                with(&|m| {
                    m.iova = None;
                    m.extents.clear();
                }),
                TranslateError::NoDmaAddress { vaddr: base.vaddr },
            ),
            (
                with(&|m| m.extents.insert(1, ext(0x5000, 0))),
                TranslateError::EmptyExtent {
                    vaddr: base.vaddr,
                    index: 1,
                },
            ),
            (
                with(&|m| m.extents[2] = ext(u64::MAX, MIB2)),
                TranslateError::ExtentWraps {
                    vaddr: base.vaddr,
                    pa: PhysAddr(u64::MAX),
                    len: MIB2,
                },
            ),
            (
                with(&|m| {
                    m.extents.pop();
                }),
                TranslateError::ExtentsMismatch {
                    vaddr: base.vaddr,
                    len: base.len,
                    covered: 2 * MIB2,
                },
            ),
            (
                with(&|m| m.extents.push(ext(0x1000, 0x1000))),
                TranslateError::ExtentsMismatch {
                    vaddr: base.vaddr,
                    len: base.len,
                    covered: base.len + 0x1000,
                },
            ),
        ];
        for (m, want) in cases {
            assert_eq!(map.insert(m.clone()), Err(want), "{m:x?}");
        }
        assert!(map.is_empty());
    }

    #[test]
    fn messages_say_what_to_do() {
        let m = TranslateError::VaddrOverlap {
            vaddr: VirtAddr(0x7f00_0000_1000),
            len: 0x1000,
            other_vaddr: VirtAddr(0x7f00_0000_0000),
            other_len: 0x20_0000,
        }
        .to_string();
        assert!(
            m.contains("0x7f0000001000") && m.contains("0x7f0000000000") && m.contains("remove"),
            "{m}"
        );
        let m = TranslateError::IovaOverlap {
            iova: Iova(0x1000),
            len: 0x1000,
            other_iova: Iova(0),
            other_len: 0x2000,
            other_vaddr: VirtAddr(0x7f00_0000_0000),
        }
        .to_string();
        assert!(
            m.contains("IOVA range [0x1000")
                && m.contains("0x7f0000000000")
                && m.contains("remove"),
            "{m}"
        );
        let m = TranslateError::NoDmaAddress {
            vaddr: VirtAddr(0x1000),
        }
        .to_string();
        assert!(
            m.contains("pass the IOVA") && m.contains("CAP_SYS_ADMIN"),
            "{m}"
        );
        let m = TranslateError::ExtentsMismatch {
            vaddr: VirtAddr(0x1000),
            len: 0x2000,
            covered: 0x1000,
        }
        .to_string();
        assert!(m.contains("phys::phys_extents"), "{m}");
    }

    #[test]
    fn no_iommu_regions_use_physical_addresses() {
        let mut map = AddressMap::new();
        let m = Mapping {
            iova: None,
            ..sample()
        };
        map.insert(m.clone()).unwrap();
        assert_eq!(map.iova_of_raw(m.vaddr.raw()), None);
        assert_eq!(
            map.dma_addr_of_raw(m.vaddr.raw() + MIB2 + 5),
            Some(DmaAddr::Phys(PhysAddr(0x9000_0005)))
        );
        // It takes no IOVA space: a region with an IOVA may sit anywhere.
        map.insert(Mapping {
            vaddr: VirtAddr(m.vaddr.raw() + (1 << 30)),
            len: MIB2,
            iova: Some(Iova(0x4000_0000)),
            extents: vec![],
        })
        .unwrap();
        assert_eq!(
            map.vaddr_of_raw(Iova(0x4000_0000)),
            Some(m.vaddr.raw() + (1 << 30))
        );
        assert_eq!(map.vaddr_of_raw(Iova(0x9000_0005)), None);
        assert_eq!(DmaAddr::Phys(PhysAddr(0x10)).raw(), 0x10);
        assert_eq!(DmaAddr::Phys(PhysAddr(0x10)).to_string(), "PA 0x10");
        assert_eq!(DmaAddr::Iova(Iova(0x10)).to_string(), "IOVA 0x10");
    }

    #[test]
    fn unknown_physical_addresses() {
        let mut map = AddressMap::new();
        let m = Mapping {
            extents: vec![],
            ..sample()
        };
        map.insert(m.clone()).unwrap();
        assert_eq!(map.phys_of_raw(m.vaddr.raw()), None);
        assert_eq!(map.phys_extent_of_raw(m.vaddr.raw()), None);
        assert_eq!(
            map.dma_addr_of_raw(m.vaddr.raw()),
            Some(DmaAddr::Iova(m.iova.unwrap()))
        );
    }

    #[test]
    fn remove_by_start_only() {
        let mut map = AddressMap::new();
        let a = sample();
        map.insert(a.clone()).unwrap();
        assert_eq!(map.remove_raw(a.vaddr.raw() + 1), None);
        assert_eq!(map.remove_raw(a.vaddr.raw() - 1), None);
        assert_eq!(map.remove_raw(a.vaddr.raw()), Some(a.clone()));
        assert!(map.is_empty());
        assert_eq!(map.remove_raw(a.vaddr.raw()), None);
        assert_eq!(map.iova_of_raw(a.vaddr.raw()), None);
        assert_eq!(map.vaddr_of_raw(a.iova.unwrap()), None);
        // Both its virtual and its IOVA range are free again.
        map.insert(a.clone()).unwrap();
        assert_eq!(map.vaddr_of_raw(a.iova.unwrap()), Some(a.vaddr.raw()));
    }

    #[test]
    fn mappings_come_back_in_virtual_order() {
        let mut map = AddressMap::new();
        let a = sample();
        let b = Mapping {
            vaddr: VirtAddr(a.vaddr.raw() - (1 << 30)),
            len: MIB2,
            iova: None,
            extents: vec![ext(0x1000_0000, 0x1000), ext(0x3000_0000, MIB2 - 0x1000)],
        };
        map.insert(a.clone()).unwrap();
        map.insert(b.clone()).unwrap();
        assert_eq!(map.mappings().collect::<Vec<_>>(), vec![b, a]);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AddressMap>();
    }

    // ---- properties against the linear scan ---------------------------------

    /// Grid unit: small, so that random mappings often overlap.
    const U: u64 = 0x1000;

    /// A byte offset that puts ends next to each other: 0, 1 or -1.
    fn jitter() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX)]
    }

    /// A start address for `len` bytes: on a small grid (give or take a
    /// byte), or near the top of the 64-bit space (ending exactly at 2^64
    /// when `k` is 0).
    fn addr(len: u64, u: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => (1..64u64, jitter()).prop_map(move |(k, j)| (k * u).wrapping_add(j)),
            1 => (0..8u64).prop_map(move |k| u64::MAX - len - k * u + 1),
        ]
    }

    /// A length in bytes: whole pages, give or take a byte, or any size.
    fn length(u: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => (1..8u64, jitter()).prop_map(move |(p, j)| (p * u).wrapping_add(j)),
            1 => 1..8 * u,
        ]
    }

    /// A valid mapping: its extents cut `len` at random points, each with a
    /// random physical address.
    fn mapping(u: u64) -> impl Strategy<Value = Mapping> {
        length(u)
            .prop_flat_map(move |len| {
                (
                    Just(len),
                    addr(len, u),
                    prop::option::weighted(0.75, addr(len, u)),
                    any::<bool>(),
                    prop::collection::vec((1..len.max(2), 0..1u64 << 50), 0..6),
                )
            })
            .prop_map(|(len, vaddr, iova, known, cuts)| {
                let mut at: Vec<(u64, u64)> = cuts.into_iter().filter(|&(c, _)| c < len).collect();
                at.sort_unstable();
                at.dedup_by_key(|c| c.0);
                let mut extents = vec![];
                let mut off = 0;
                let mut pa = 0x8000_0000;
                for (cut, next_pa) in at {
                    extents.push(ext(pa, cut - off));
                    (off, pa) = (cut, next_pa);
                }
                extents.push(ext(pa, len - off));
                if iova.is_some() && !known {
                    extents.clear();
                }
                Mapping {
                    vaddr: VirtAddr(vaddr),
                    len,
                    iova: iova.map(Iova),
                    extents,
                }
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Mapping),
        /// Remove the n-th mapping (modulo the count), or, if `exact` is
        /// false, the address one page into it (which must not remove it).
        Remove {
            n: usize,
            exact: bool,
        },
    }

    fn op(u: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => mapping(u).prop_map(Op::Insert),
            1 => (any::<usize>(), any::<bool>()).prop_map(|(n, exact)| Op::Remove { n, exact }),
        ]
    }

    /// Runs `ops` on an [`AddressMap`] and on the linear scan and checks
    /// that insert's verdicts and every lookup agree, at every boundary and
    /// at the `random` addresses.
    fn run_against_linear_scan(
        ops: Vec<Op>,
        random: Vec<u64>,
        u: u64,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let mut map = AddressMap::new();
        let mut ms: Vec<Mapping> = vec![];
        for op in ops {
            match op {
                Op::Insert(m) => {
                    let want = naive_insert(&mut ms, m.clone());
                    let got = map.insert(m);
                    match (&want, &got) {
                        (Ok(()), Ok(())) => {}
                        (Err("vaddr"), Err(TranslateError::VaddrOverlap { .. })) => {}
                        (Err("iova"), Err(TranslateError::IovaOverlap { .. })) => {}
                        _ => prop_assert!(false, "want {want:?}, got {got:?}"),
                    }
                }
                Op::Remove { n, exact } => {
                    if ms.is_empty() {
                        prop_assert_eq!(map.remove_raw(n as u64), None);
                        continue;
                    }
                    let i = n % ms.len();
                    if exact {
                        let m = ms.remove(i);
                        prop_assert_eq!(map.remove_raw(m.vaddr.raw()), Some(m));
                    } else if ms[i].len > u {
                        prop_assert_eq!(map.remove_raw(ms[i].vaddr.raw() + u), None);
                    }
                }
            }
            prop_assert_eq!(map.len(), ms.len());
        }
        let mut sorted = ms.clone();
        sorted.sort_by_key(|m| m.vaddr.raw());
        prop_assert_eq!(map.mappings().collect::<Vec<_>>(), sorted);
        for v in boundary_probes(&ms).into_iter().chain(random) {
            check_probe(&map, &ms, v);
        }
        Ok(())
    }

    proptest! {
        /// After any sequence of inserts and removes, insert's verdicts and
        /// every lookup match a linear scan, at every boundary and at random
        /// addresses. Regions on a 4 KiB grid: they share 2 MiB granules, so
        /// this drives the sorted-array fallback.
        #[test]
        fn matches_linear_scan(
            ops in prop::collection::vec(op(U), 1..40),
            random in prop::collection::vec(0..80 * U, 32),
        ) {
            run_against_linear_scan(ops, random, U)?;
        }

        /// The same on a 1 MiB grid, so regions cover whole 2 MiB granules,
        /// share some and leave others: this drives the tables.
        #[test]
        fn matches_linear_scan_on_granules(
            ops in prop::collection::vec(op(MIB2 / 2), 1..40),
            random in prop::collection::vec(0..80 * (MIB2 / 2), 32),
        ) {
            run_against_linear_scan(ops, random, MIB2 / 2)?;
        }
    }

    /// Every lookup of `map` and of `sorted` agrees at `v` (as a virtual
    /// address) and at `Iova(v)`.
    fn same_answers(map: &AddressMap, sorted: &SortedMap, v: u64) -> Result<(), TestCaseError> {
        let (va, io) = (VirtAddr(v), Iova(v));
        prop_assert_eq!(map.iova_of(va), sorted.iova_of(va), "iova_of({:#x})", v);
        prop_assert_eq!(map.vaddr_of(io), sorted.vaddr_of(io), "vaddr_of({:#x})", v);
        prop_assert_eq!(map.phys_of(va), sorted.phys_of(va), "phys_of({:#x})", v);
        prop_assert_eq!(
            map.phys_extent_of(va),
            sorted.phys_extent_of(va),
            "phys_extent_of({:#x})",
            v
        );
        prop_assert_eq!(
            map.dma_addr_of(va),
            sorted.dma_addr_of(va),
            "dma_addr_of({:#x})",
            v
        );
        Ok(())
    }

    proptest! {
        /// The tables answer what the sorted arrays (the bench's baseline)
        /// answer, on random region sets on a 2 MiB grid (give or take a
        /// byte, so some share granules and some deltas are not aligned),
        /// before and after removing some: at every boundary and at random
        /// addresses in every region, virtual and IOVA.
        #[test]
        fn matches_sorted_arrays(
            ms in prop::collection::vec(mapping(MIB2), 1..60),
            picks in prop::collection::vec((any::<prop::sample::Index>(), any::<u64>()), 64),
            removes in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut map = AddressMap::new();
            let mut sorted = SortedMap::new();
            let mut kept = vec![];
            for m in ms {
                let got = map.insert(m.clone());
                prop_assert_eq!(&got, &sorted.insert(m.clone()));
                if got.is_ok() {
                    kept.push(m);
                }
            }
            for round in 0..2 {
                let mut probes = boundary_probes(&kept);
                for (i, off) in &picks {
                    if kept.is_empty() {
                        break;
                    }
                    let m = &kept[i.index(kept.len())];
                    let off = off % m.len;
                    probes.push(m.vaddr.raw() + off);
                    if let Some(io) = m.iova {
                        probes.push(io.0 + off);
                    }
                }
                for v in probes {
                    same_answers(&map, &sorted, v)?;
                }
                if round == 0 {
                    for i in &removes {
                        if kept.is_empty() {
                            break;
                        }
                        let m = kept.remove(i.index(kept.len()));
                        prop_assert_eq!(map.remove(m.vaddr), Some(m.clone()));
                        prop_assert_eq!(sorted.remove(m.vaddr), Some(m));
                    }
                }
            }
        }
    }
}
