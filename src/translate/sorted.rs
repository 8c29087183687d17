//! The baseline: regions in sorted arrays, found by binary search.
//!
//! [`SortedMap`] is what [`AddressMap`](super::AddressMap) was before it
//! had its tables: the regions sorted by virtual start address, with the
//! starts in a dense `Vec<u64>` of their own so that the binary search
//! touches few cache lines, and a second sorted array of the regions that
//! have an IOVA, by IOVA start. Each region keeps its physical extents as
//! `(offset in region, physical address)` pairs sorted by offset. Lookups
//! cost `O(log n)`. [`AddressMap`](super::AddressMap) keeps one inside for
//! its overlap checks, its ordered listing and the addresses its tables do
//! not cover; the translation bench measures it as the baseline.

use crate::addr::{Iova, PhysAddr, VirtAddr};
use crate::phys::PhysExtent;

use super::{DmaAddr, Mapping, TranslateError};

/// A physical extent stored by its offset in its region.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ext {
    /// Offset of the extent's first byte from the region's start.
    pub(super) off: u64,
    /// Physical address of the extent's first byte.
    pub(super) pa: u64,
}

/// One region in virtual order.
#[derive(Debug, Clone)]
pub(super) struct Region {
    pub(super) vaddr: u64,
    pub(super) len: u64,
    pub(super) iova: Option<Iova>,
    /// Sorted by `off`; `exts[0].off == 0` unless empty (PAs unknown).
    pub(super) exts: Box<[Ext]>,
}

impl Region {
    /// The byte offset of `vaddr` in the region, if it lies inside.
    #[inline]
    pub(super) fn offset_of(&self, vaddr: u64) -> Option<u64> {
        // Wraps to a huge value below the start, so one compare suffices;
        // also right for a region that ends at 2^64.
        let off = vaddr.wrapping_sub(self.vaddr);
        (off < self.len).then_some(off)
    }

    /// The physical run from offset `off` (inside the region) to the end of
    /// its extent.
    #[inline]
    pub(super) fn phys_run(&self, off: u64) -> Option<PhysExtent> {
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

    pub(super) fn to_mapping(&self) -> Mapping {
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
            vaddr: VirtAddr(self.vaddr),
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

/// Regions in sorted arrays, found by binary search: the baseline of
/// [`AddressMap`](super::AddressMap), with the same API and answers.
///
/// Lookups take `&self` and never allocate (`Send + Sync`).
#[derive(Debug, Clone, Default)]
pub struct SortedMap {
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
    let vaddr = m.vaddr.raw();
    if m.len == 0 {
        return Err(TranslateError::ZeroLength {
            vaddr: VirtAddr(vaddr),
        });
    }
    let last = m.len - 1;
    if vaddr.checked_add(last).is_none() {
        return Err(TranslateError::VaddrWraps {
            vaddr: VirtAddr(vaddr),
            len: m.len,
        });
    }
    if let Some(iova) = m.iova {
        if iova.checked_add(last).is_none() {
            return Err(TranslateError::IovaWraps { iova, len: m.len });
        }
    } else if m.extents.is_empty() {
        return Err(TranslateError::NoDmaAddress {
            vaddr: VirtAddr(vaddr),
        });
    }
    let mut exts = Vec::with_capacity(m.extents.len());
    let mut covered = 0u64;
    for (index, e) in m.extents.iter().enumerate() {
        if e.len == 0 {
            return Err(TranslateError::EmptyExtent {
                vaddr: VirtAddr(vaddr),
                index,
            });
        }
        if e.pa.checked_add(e.len - 1).is_none() {
            return Err(TranslateError::ExtentWraps {
                vaddr: VirtAddr(vaddr),
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
            vaddr: VirtAddr(vaddr),
            len: m.len,
            covered,
        });
    }
    Ok(exts.into_boxed_slice())
}

impl SortedMap {
    /// An empty table.
    pub fn new() -> SortedMap {
        SortedMap::default()
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
        let vaddr = m.vaddr.raw();

        // Virtual space: only the neighbours can overlap.
        let vpos = self.vstarts.partition_point(|&s| s <= vaddr);
        let vclash = vpos
            .checked_sub(1)
            .map(|i| &self.regions[i])
            .filter(|r| r.vaddr + (r.len - 1) >= vaddr)
            .or_else(|| self.regions.get(vpos).filter(|r| r.vaddr <= vaddr + last));
        if let Some(r) = vclash {
            return Err(TranslateError::VaddrOverlap {
                vaddr: VirtAddr(vaddr),
                len: m.len,
                other_vaddr: VirtAddr(r.vaddr),
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
                    other_vaddr: VirtAddr(slot.vaddr),
                }),
                None => Ok((pos, iova)),
            }
        });
        let ipos = ipos.transpose()?;

        if let Some((pos, iova)) = ipos {
            self.istarts.insert(pos, iova.0);
            self.islots.insert(pos, IovaSlot { len: m.len, vaddr });
        }
        self.vstarts.insert(vpos, vaddr);
        self.regions.insert(
            vpos,
            Region {
                vaddr,
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
    pub fn remove(&mut self, vaddr: VirtAddr) -> Option<Mapping> {
        let i = self.vstarts.binary_search(&vaddr.raw()).ok()?;
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
    pub fn iova_of(&self, vaddr: VirtAddr) -> Option<Iova> {
        let (r, off) = self.find(vaddr.raw())?;
        r.iova.map(|i| Iova(i.0 + off))
    }

    /// The virtual address of the byte the device reaches at `iova`, or
    /// `None` if no region is mapped there.
    #[inline]
    pub fn vaddr_of(&self, iova: Iova) -> Option<VirtAddr> {
        let i = last_at_or_below(&self.istarts, iova.0)?;
        let off = iova.0.wrapping_sub(self.istarts[i]);
        let slot = self.islots[i];
        (off < slot.len).then(|| VirtAddr(slot.vaddr + off))
    }

    /// The physical address of the byte at `vaddr`, or `None` if no region
    /// holds it or its physical addresses are unknown.
    #[inline]
    pub fn phys_of(&self, vaddr: VirtAddr) -> Option<PhysAddr> {
        self.phys_extent_of(vaddr).map(|e| e.pa)
    }

    /// The physically contiguous run that starts at `vaddr`: its physical
    /// address and how many bytes from `vaddr` on stay contiguous (up to the
    /// end of the extent, never past the region). A driver building a
    /// scatter-gather list takes one entry per run.
    #[inline]
    pub fn phys_extent_of(&self, vaddr: VirtAddr) -> Option<PhysExtent> {
        let (r, off) = self.find(vaddr.raw())?;
        r.phys_run(off)
    }

    /// The address a device uses to reach the byte at `vaddr`: its IOVA if
    /// its region has one, else its physical address (a device without an
    /// IOMMU). `None` only if no region holds `vaddr`:
    /// [`insert`](Self::insert) refuses a region with neither.
    #[inline]
    pub fn dma_addr_of(&self, vaddr: VirtAddr) -> Option<DmaAddr> {
        let (r, off) = self.find(vaddr.raw())?;
        match r.iova {
            Some(i) => Some(DmaAddr::Iova(Iova(i.0 + off))),
            None => r.phys_run(off).map(|e| DmaAddr::Phys(e.pa)),
        }
    }

    /// The region that starts exactly at `vaddr`.
    pub(super) fn region_at(&self, vaddr: u64) -> Option<&Region> {
        let i = self.vstarts.binary_search(&vaddr).ok()?;
        Some(&self.regions[i])
    }

    /// The virtual starts of the regions that overlap `[lo, hi]` in
    /// virtual space.
    pub(super) fn vaddr_overlapping(&self, lo: u64, hi: u64) -> Vec<u64> {
        let Some(top) = last_at_or_below(&self.vstarts, hi) else {
            return Vec::new();
        };
        // Disjoint and sorted, so the ends are sorted too.
        self.regions[..=top]
            .iter()
            .rev()
            .take_while(|r| r.vaddr + (r.len - 1) >= lo)
            .map(|r| r.vaddr)
            .collect()
    }

    /// The virtual starts of the regions whose IOVA range overlaps
    /// `[lo, hi]`.
    pub(super) fn iova_overlapping(&self, lo: u64, hi: u64) -> Vec<u64> {
        let Some(top) = last_at_or_below(&self.istarts, hi) else {
            return Vec::new();
        };
        self.istarts[..=top]
            .iter()
            .zip(&self.islots[..=top])
            .rev()
            .take_while(|(s, slot)| *s + (slot.len - 1) >= lo)
            .map(|(_, slot)| slot.vaddr)
            .collect()
    }

    /// Heap bytes the arrays and the regions' extents take.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.vstarts.capacity() * size_of::<u64>()
            + self.regions.capacity() * size_of::<Region>()
            + self
                .regions
                .iter()
                .map(|r| r.exts.len() * size_of::<Ext>())
                .sum::<usize>()
            + self.istarts.capacity() * size_of::<u64>()
            + self.islots.capacity() * size_of::<IovaSlot>()
    }

    /// Every region, in virtual address order, as it was inserted.
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.regions.iter().map(Region::to_mapping)
    }
}
