//! The IOVA allocator: hands out I/O virtual addresses for DMA mappings.
//!
//! This module only does bookkeeping; it never talks to the kernel. The
//! caller feeds it the usable IOVA ranges and the smallest IOMMU page size
//! (both from `VFIO_IOMMU_GET_INFO`, see [`crate::vfio::info`]) and asks for
//! space. It answers with addresses that `VFIO_IOMMU_MAP_DMA` will accept:
//! aligned to the IOMMU page size, inside one usable range, and not
//! overlapping any other mapping of the container.
//!
//! - [`IovaRange`]: one usable range, with an inclusive end as the kernel
//!   reports it (`struct vfio_iova_range`).
//! - [`IovaAllocator`]: first-fit allocation (lowest address first) plus
//!   caller-fixed reservations (the VMM case: IOVA = guest-physical address).
//!   Allocations live in a `BTreeMap`, so lookups are `O(log n)`.
//!
//! The allocator never hands out IOVA 0 on its own: an IOVA of 0 looks like a
//! null pointer to many drivers. A caller may still reserve it explicitly.
//!
//! A device that drives fewer address bits than the IOMMU offers (a 32-bit
//! or 40-bit DMA mask) sets a ceiling ([`IovaAllocator::set_dma_mask`]):
//! no allocation or reservation then ends above `2^bits - 1`.

use std::collections::BTreeMap;
use std::fmt;

use crate::addr::{Iova, align_up, is_aligned};

/// A usable IOVA range, `start..=end` (the end is inclusive, as in the
/// kernel's `struct vfio_iova_range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    /// The first usable address.
    pub start: Iova,
    /// The last usable address (inclusive).
    pub end: Iova,
}

impl IovaRange {
    /// The range `start..=end`, or `None` if `end < start`.
    pub fn new(start: Iova, end: Iova) -> Option<Self> {
        (start <= end).then_some(IovaRange { start, end })
    }

    /// The number of addresses in the range. The full 64-bit space
    /// (`0..=u64::MAX`) has 2^64 addresses, which does not fit: it reports
    /// `u64::MAX`.
    #[allow(clippy::len_without_is_empty)] // An inclusive range always holds at least one address.
    pub fn len(&self) -> u64 {
        (self.end.0 - self.start.0).saturating_add(1)
    }

    /// Whether `iova` lies inside the range.
    pub fn contains(&self, iova: Iova) -> bool {
        self.start <= iova && iova <= self.end
    }

    /// Whether the whole span `[iova, iova + len)` lies inside the range.
    /// An empty span (`len == 0`) is never inside.
    pub fn contains_span(&self, iova: Iova, len: u64) -> bool {
        match last_of(iova.0, len) {
            Some(last) => self.start.0 <= iova.0 && last <= self.end.0,
            None => false,
        }
    }
}

impl fmt::Display for IovaRange {
    /// `0xfef00000-0xffffffffffff`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start.0, self.end.0)
    }
}

/// Why the allocator refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IovaError {
    /// The allocator was created without any usable range.
    #[error(
        "no usable IOVA ranges were given; pass the ranges from the container's \
         IOVA-range capability (VFIO_IOMMU_GET_INFO, Linux 5.4+), or the full IOMMU aperture \
         on older kernels"
    )]
    NoRanges,
    /// A usable range whose end lies below its start.
    #[error(
        "IOVA range {start}-{end} ends before it starts; usable ranges are inclusive \
         start..=end with start <= end"
    )]
    BadRange {
        /// The first address given.
        start: Iova,
        /// The (inclusive) last address given.
        end: Iova,
    },
    /// An alignment or IOMMU page size that is not a power of two.
    #[error(
        "alignment {align:#x} is not a power of two; use an IOMMU page size such as 0x1000 (4 KiB), \
         0x200000 (2 MiB) or 0x40000000 (1 GiB)"
    )]
    BadAlign {
        /// The alignment given.
        align: u64,
    },
    /// A request for zero bytes.
    #[error("cannot map 0 bytes of IOVA space; give a size of at least one IOMMU page")]
    ZeroLength,
    /// A length that is not a multiple of the smallest IOMMU page size.
    #[error(
        "size {len:#x} is not a multiple of the IOMMU page size {align:#x}; round the size up \
         to a multiple of {align:#x}"
    )]
    MisalignedLen {
        /// The length asked for.
        len: u64,
        /// The smallest IOMMU page size.
        align: u64,
    },
    /// A fixed IOVA that is not a multiple of the smallest IOMMU page size.
    #[error(
        "IOVA {iova} is not aligned to the IOMMU page size {align:#x}; pick an IOVA that is a \
         multiple of {align:#x}, or omit @IOVA to let numapin choose"
    )]
    MisalignedIova {
        /// The IOVA asked for.
        iova: Iova,
        /// The smallest IOMMU page size.
        align: u64,
    },
    /// `iova + len` wraps past the end of the 64-bit IOVA space.
    #[error(
        "IOVA {iova} + size {len:#x} wraps past the end of the 64-bit IOVA space; pick a lower \
         IOVA or a smaller size"
    )]
    Overflow {
        /// The IOVA asked for.
        iova: Iova,
        /// The length asked for.
        len: u64,
    },
    /// A fixed span that is not inside one usable range (it may cross a
    /// reserved hole such as the x86 MSI window `0xfee00000-0xfeefffff`).
    #[error(
        "IOVA span [{iova}, {end:#x}) is not inside the usable IOVA ranges of this container; \
         pick an IOVA inside one of the usable ranges: {ranges}, or omit @IOVA to let numapin choose",
        end = u128::from(iova.0) + u128::from(*len),
        ranges = RangeList(ranges)
    )]
    OutsideRanges {
        /// The IOVA asked for.
        iova: Iova,
        /// The length asked for.
        len: u64,
        /// The usable ranges (normalised: sorted and merged).
        ranges: Vec<IovaRange>,
    },
    /// A fixed span that overlaps an allocation already made.
    #[error(
        "IOVA span [{iova}, {end:#x}) overlaps the existing mapping [{existing}, {existing_end:#x}); \
         pick an IOVA outside it, release that mapping first, or omit @IOVA to let numapin choose",
        end = u128::from(iova.0) + u128::from(*len),
        existing_end = u128::from(existing.0) + u128::from(*existing_len)
    )]
    Overlap {
        /// The IOVA asked for.
        iova: Iova,
        /// The length asked for.
        len: u64,
        /// The start of the allocation in the way.
        existing: Iova,
        /// The length of the allocation in the way.
        existing_len: u64,
    },
    /// No free, suitably aligned span of this length is left.
    #[error(
        "no free IOVA span of {len:#x} bytes aligned to {align:#x} is left in the usable ranges; \
         release other regions, use fewer or smaller regions, or a smaller page size"
    )]
    Exhausted {
        /// The length asked for.
        len: u64,
        /// The effective alignment (the larger of the requested alignment
        /// and the IOMMU page size).
        align: u64,
    },
    /// A reservation ends above the device's DMA mask.
    #[error(
        "IOVA {iova} + {len:#x} ends above the device's {bits}-bit DMA mask ({ceiling}); \
         choose an IOVA below it, or leave the IOVA to numapin"
    )]
    AboveDmaMask {
        /// The IOVA given.
        iova: Iova,
        /// The length given.
        len: u64,
        /// The mask's width in bits.
        bits: u32,
        /// The highest address the device can drive.
        ceiling: Iova,
    },
    /// A DMA mask of this width cannot be used.
    #[error(
        "a {bits}-bit DMA mask is not usable: give 12 to 64 bits (the device's addressing width)"
    )]
    BadDmaMask {
        /// The width given.
        bits: u32,
    },
    /// A live allocation already lies above the new mask.
    #[error(
        "cannot narrow the DMA mask to {bits} bits: the allocation at {iova} + {len:#x} lies above it; \
         set the mask before pinning"
    )]
    MaskBelowAllocation {
        /// The width asked for.
        bits: u32,
        /// The allocation in the way.
        iova: Iova,
        /// Its length.
        len: u64,
    },
    /// `free` was given an address at which no allocation starts.
    #[error(
        "no IOVA allocation starts at {iova}; free takes the IOVA that allocate or reserve returned"
    )]
    UnknownAllocation {
        /// The IOVA given.
        iova: Iova,
    },
}

/// Formats ranges as `0x0-0xfedfffff, 0xfef00000-0xffffffffffff`.
struct RangeList<'a>(&'a [IovaRange]);

impl fmt::Display for RangeList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The last address of `[start, start + len)`, or `None` if `len == 0` or the
/// span wraps past `u64::MAX`. A span ending exactly at `u64::MAX` is fine.
/// The highest address a `bits`-wide DMA mask reaches (`None`: 64 bits).
fn ceiling_of(bits: Option<u32>) -> u64 {
    match bits {
        Some(b) if b < 64 => (1u64 << b) - 1,
        _ => u64::MAX,
    }
}

fn last_of(start: u64, len: u64) -> Option<u64> {
    len.checked_sub(1).and_then(|l| start.checked_add(l))
}

/// Hands out IOVA spans inside the usable ranges of one container.
///
/// Invariants: the ranges are sorted, disjoint and never adjacent (adjacent
/// or overlapping input ranges are merged); every allocation has a non-zero
/// length that is a multiple of `min_align`, starts at a multiple of
/// `min_align`, lies inside one range, and overlaps no other allocation.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    ranges: Vec<IovaRange>,
    min_align: u64,
    /// start -> length.
    allocs: BTreeMap<u64, u64>,
    /// The DMA mask's width in bits, when below 64.
    mask_bits: Option<u32>,
}

impl IovaAllocator {
    /// An allocator over `ranges` (in any order, possibly overlapping), with
    /// `min_align` the smallest IOMMU page size (the lowest bit of
    /// `iova_pgsizes`).
    ///
    /// # Errors
    /// [`IovaError::NoRanges`] for an empty list, [`IovaError::BadRange`] for
    /// a range with `end < start`, [`IovaError::BadAlign`] if `min_align` is
    /// not a power of two.
    pub fn new(mut ranges: Vec<IovaRange>, min_align: u64) -> Result<Self, IovaError> {
        if !min_align.is_power_of_two() {
            return Err(IovaError::BadAlign { align: min_align });
        }
        if ranges.is_empty() {
            return Err(IovaError::NoRanges);
        }
        if let Some(r) = ranges.iter().find(|r| r.end < r.start) {
            return Err(IovaError::BadRange {
                start: r.start,
                end: r.end,
            });
        }
        ranges.sort();
        let mut merged: Vec<IovaRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                // Overlapping or adjacent (`last.end + 1 == r.start`): merge.
                Some(last) if r.start.0 <= last.end.0.saturating_add(1) => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push(r),
            }
        }
        Ok(IovaAllocator {
            ranges: merged,
            min_align,
            allocs: BTreeMap::new(),
            mask_bits: None,
        })
    }

    /// Limits every later allocation and reservation to the lowest
    /// `2^bits` bytes of IOVA space: the device's DMA mask (32 for a
    /// device that drives 32 address bits). 64 removes the limit.
    ///
    /// # Errors
    /// [`IovaError::BadDmaMask`] for fewer than 12 or more than 64 bits,
    /// [`IovaError::MaskBelowAllocation`] if a live allocation ends above
    /// the new ceiling (nothing changes then).
    pub fn set_dma_mask(&mut self, bits: u32) -> Result<(), IovaError> {
        if !(12..=64).contains(&bits) {
            return Err(IovaError::BadDmaMask { bits });
        }
        let mask_bits = (bits < 64).then_some(bits);
        let ceiling = ceiling_of(mask_bits);
        if let Some((s, l)) = self
            .allocations()
            .find(|&(s, l)| last_of(s.0, l) > Some(ceiling))
        {
            return Err(IovaError::MaskBelowAllocation {
                bits,
                iova: s,
                len: l,
            });
        }
        self.mask_bits = mask_bits;
        Ok(())
    }

    /// The DMA mask's width (64 when none was set).
    pub fn dma_mask_bits(&self) -> u32 {
        self.mask_bits.unwrap_or(64)
    }

    /// The highest IOVA an allocation may cover.
    pub fn ceiling(&self) -> Iova {
        Iova(ceiling_of(self.mask_bits))
    }

    /// The usable ranges, sorted and merged.
    pub fn ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    /// The smallest IOMMU page size: every IOVA and length is a multiple of it.
    pub fn min_align(&self) -> u64 {
        self.min_align
    }

    /// Allocates `len` bytes at the lowest free IOVA aligned to
    /// `max(align, min_align)`. Never returns IOVA 0.
    ///
    /// # Errors
    /// [`IovaError::ZeroLength`], [`IovaError::BadAlign`] (`align` not a power
    /// of two), [`IovaError::MisalignedLen`] (`len` not a multiple of
    /// `min_align`), [`IovaError::Exhausted`] (no room left).
    pub fn allocate(&mut self, len: u64, align: u64) -> Result<Iova, IovaError> {
        if len == 0 {
            return Err(IovaError::ZeroLength);
        }
        if !align.is_power_of_two() {
            return Err(IovaError::BadAlign { align });
        }
        if !is_aligned(len, self.min_align) {
            return Err(IovaError::MisalignedLen {
                len,
                align: self.min_align,
            });
        }
        let align = align.max(self.min_align);
        let ceiling = ceiling_of(self.mask_bits);
        for range in &self.ranges {
            let end = range.end.0.min(ceiling);
            // Start at 1 at least, so that IOVA 0 is never handed out.
            let mut cursor = align_up(range.start.0.max(1), align);
            while let Some(start) = cursor {
                let Some(last) = last_of(start, len).filter(|&l| l <= end) else {
                    break; // Does not fit in the rest of this range.
                };
                match self.overlapping(start, last) {
                    None => {
                        self.allocs.insert(start, len);
                        return Ok(Iova(start));
                    }
                    // Skip past the allocation in the way. Allocations are
                    // disjoint, so each step passes at least one of them.
                    Some((s, l)) => {
                        cursor = last_of(s, l)
                            .and_then(|e| e.checked_add(1))
                            .and_then(|next| align_up(next, align));
                    }
                }
            }
        }
        Err(IovaError::Exhausted { len, align })
    }

    /// Reserves the caller-chosen span `[iova, iova + len)` exactly.
    ///
    /// Unlike [`allocate`](Self::allocate), IOVA 0 may be reserved (a VMM
    /// maps guest RAM at IOVA = guest-physical address, starting at 0).
    ///
    /// # Errors
    /// [`IovaError::ZeroLength`], [`IovaError::MisalignedIova`],
    /// [`IovaError::MisalignedLen`], [`IovaError::Overflow`],
    /// [`IovaError::OutsideRanges`], [`IovaError::AboveDmaMask`],
    /// [`IovaError::Overlap`].
    pub fn reserve(&mut self, iova: Iova, len: u64) -> Result<(), IovaError> {
        if len == 0 {
            return Err(IovaError::ZeroLength);
        }
        if !iova.is_aligned(self.min_align) {
            return Err(IovaError::MisalignedIova {
                iova,
                align: self.min_align,
            });
        }
        if !is_aligned(len, self.min_align) {
            return Err(IovaError::MisalignedLen {
                len,
                align: self.min_align,
            });
        }
        let Some(last) = last_of(iova.0, len) else {
            return Err(IovaError::Overflow { iova, len });
        };
        // Ranges are merged, so a span inside their union is inside one range.
        let idx = self.ranges.partition_point(|r| r.start <= iova);
        let inside = idx > 0 && self.ranges[idx - 1].contains_span(iova, len);
        if !inside {
            return Err(IovaError::OutsideRanges {
                iova,
                len,
                ranges: self.ranges.clone(),
            });
        }
        if let Some(bits) = self.mask_bits {
            let ceiling = ceiling_of(Some(bits));
            if last > ceiling {
                return Err(IovaError::AboveDmaMask {
                    iova,
                    len,
                    bits,
                    ceiling: Iova(ceiling),
                });
            }
        }
        if let Some((s, l)) = self.overlapping(iova.0, last) {
            return Err(IovaError::Overlap {
                iova,
                len,
                existing: Iova(s),
                existing_len: l,
            });
        }
        self.allocs.insert(iova.0, len);
        Ok(())
    }

    /// Frees the allocation starting at `iova` and returns its length.
    ///
    /// # Errors
    /// [`IovaError::UnknownAllocation`] if no allocation starts at `iova`.
    pub fn free(&mut self, iova: Iova) -> Result<u64, IovaError> {
        self.allocs
            .remove(&iova.0)
            .ok_or(IovaError::UnknownAllocation { iova })
    }

    /// The live allocations as `(start, len)`, lowest address first.
    pub fn allocations(&self) -> impl Iterator<Item = (Iova, u64)> + '_ {
        self.allocs.iter().map(|(&s, &l)| (Iova(s), l))
    }

    /// Whether `iova` lies inside a live allocation.
    pub fn contains(&self, iova: Iova) -> bool {
        self.lookup(iova).is_some()
    }

    /// The allocation `(start, len)` covering `iova`, if any. `O(log n)`.
    pub fn lookup(&self, iova: Iova) -> Option<(Iova, u64)> {
        self.overlapping(iova.0, iova.0).map(|(s, l)| (Iova(s), l))
    }

    /// The allocation overlapping `start..=last`, if any (the one with the
    /// highest start when several do).
    fn overlapping(&self, start: u64, last: u64) -> Option<(u64, u64)> {
        let (&s, &l) = self.allocs.range(..=last).next_back()?;
        // `l > 0`, so `last_of` is `Some`; allocations never wrap.
        (last_of(s, l)? >= start).then_some((s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: u64 = 0x1000;

    fn r(start: u64, end: u64) -> IovaRange {
        IovaRange::new(Iova(start), Iova(end)).unwrap()
    }

    /// The x86 layout: everything below 48 bits except the MSI window.
    fn x86() -> IovaAllocator {
        IovaAllocator::new(
            vec![r(0xfef0_0000, 0xffff_ffff_ffff), r(0, 0xfedf_ffff)],
            PAGE,
        )
        .unwrap()
    }

    #[test]
    fn range_basics() {
        assert_eq!(r(0, 0xfff).len(), 0x1000);
        assert_eq!(r(5, 5).len(), 1);
        assert_eq!(r(0, u64::MAX).len(), u64::MAX);
        assert!(IovaRange::new(Iova(2), Iova(1)).is_none());
        assert!(r(0x1000, 0x1fff).contains_span(Iova(0x1000), 0x1000));
        assert!(!r(0x1000, 0x1fff).contains_span(Iova(0x1000), 0x1001));
        assert!(!r(0x1000, 0x1fff).contains_span(Iova(0x1000), 0));
        assert!(r(0, u64::MAX).contains_span(Iova(u64::MAX - 0xfff), 0x1000));
        assert_eq!(
            r(0xfef0_0000, 0xffff_ffff_ffff).to_string(),
            "0xfef00000-0xffffffffffff"
        );
    }

    #[test]
    fn new_normalises() {
        let a = IovaAllocator::new(
            vec![
                r(0x5000, 0x5fff),
                r(0x1000, 0x2fff),
                r(0x2000, 0x3fff),
                r(0x4000, 0x4fff),
                r(0x9000, 0x9fff),
            ],
            PAGE,
        )
        .unwrap();
        assert_eq!(a.ranges(), &[r(0x1000, 0x5fff), r(0x9000, 0x9fff)]);
        let a = IovaAllocator::new(vec![r(0, u64::MAX), r(0x1000, 0x1fff)], PAGE).unwrap();
        assert_eq!(a.ranges(), &[r(0, u64::MAX)]);
        assert_eq!(a.min_align(), PAGE);
    }

    #[test]
    fn new_errors() {
        assert_eq!(
            IovaAllocator::new(vec![], PAGE).unwrap_err(),
            IovaError::NoRanges
        );
        assert_eq!(
            IovaAllocator::new(vec![r(0, 0xfff)], 0x3000).unwrap_err(),
            IovaError::BadAlign { align: 0x3000 }
        );
        assert_eq!(
            IovaAllocator::new(vec![r(0, 0xfff)], 0).unwrap_err(),
            IovaError::BadAlign { align: 0 }
        );
        let bad = IovaRange {
            start: Iova(0x2000),
            end: Iova(0x1000),
        };
        assert_eq!(
            IovaAllocator::new(vec![bad], PAGE).unwrap_err(),
            IovaError::BadRange {
                start: Iova(0x2000),
                end: Iova(0x1000)
            }
        );
    }

    #[test]
    fn allocate_skips_zero_and_is_first_fit() {
        let mut a = x86();
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x1000)));
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x2000)));
        assert_eq!(a.allocate(0x20_0000, 0x20_0000), Ok(Iova(0x20_0000)));
        // The hole below the 2 MiB allocation is used by the next small request.
        assert_eq!(a.allocate(PAGE, 1), Ok(Iova(0x3000)));
        assert_eq!(a.free(Iova(0x2000)), Ok(PAGE));
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x2000)));
    }

    #[test]
    fn allocate_skips_msi_window() {
        let mut a = x86();
        a.reserve(Iova(0), 0xc000_0000).unwrap();
        // [0xc0000000, 0xfedfffff] is shorter than 1 GiB, so the first
        // 1 GiB-aligned fit is at 4 GiB, past the window.
        assert_eq!(
            a.allocate(0x4000_0000, 0x4000_0000),
            Ok(Iova(0x1_0000_0000))
        );
        // A 16 MiB request still fits just below the window.
        assert_eq!(a.allocate(0x100_0000, 0x100_0000), Ok(Iova(0xc000_0000)));
        // A 2 MiB request that would straddle the window starts after it.
        a.reserve(Iova(0xc100_0000), 0xfee0_0000 - 0xc100_0000)
            .unwrap();
        assert_eq!(a.allocate(0x20_0000, 0x20_0000), Ok(Iova(0xff00_0000)));
    }

    #[test]
    fn allocate_errors() {
        let mut a = x86();
        assert_eq!(a.allocate(0, PAGE), Err(IovaError::ZeroLength));
        assert_eq!(a.allocate(PAGE, 3), Err(IovaError::BadAlign { align: 3 }));
        assert_eq!(a.allocate(PAGE, 0), Err(IovaError::BadAlign { align: 0 }));
        assert_eq!(
            a.allocate(0x1800, PAGE),
            Err(IovaError::MisalignedLen {
                len: 0x1800,
                align: PAGE
            })
        );
        assert_eq!(
            a.allocate(1 << 60, PAGE),
            Err(IovaError::Exhausted {
                len: 1 << 60,
                align: PAGE
            })
        );
        // The effective alignment is reported.
        assert_eq!(
            a.allocate(1 << 60, 1),
            Err(IovaError::Exhausted {
                len: 1 << 60,
                align: PAGE
            })
        );
        assert_eq!(
            a.allocations().count(),
            0,
            "failed calls leave nothing behind"
        );
    }

    #[test]
    fn allocate_at_top_of_space() {
        let mut a = IovaAllocator::new(vec![r(u64::MAX - 0x2fff, u64::MAX)], PAGE).unwrap();
        assert_eq!(a.allocate(0x2000, PAGE), Ok(Iova(u64::MAX - 0x2fff)));
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(u64::MAX - 0xfff)));
        assert_eq!(
            a.lookup(Iova(u64::MAX)),
            Some((Iova(u64::MAX - 0xfff), PAGE))
        );
        assert!(matches!(
            a.allocate(PAGE, PAGE),
            Err(IovaError::Exhausted { .. })
        ));
        // An alignment that rounds past u64::MAX must not panic or wrap.
        let mut a = IovaAllocator::new(vec![r(u64::MAX - 0xfff, u64::MAX)], PAGE).unwrap();
        assert!(matches!(
            a.allocate(PAGE, 1 << 63),
            Err(IovaError::Exhausted { .. })
        ));
    }

    #[test]
    fn zero_is_never_allocated() {
        let mut a = IovaAllocator::new(vec![r(0, 0x1fff)], PAGE).unwrap();
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x1000)));
        assert!(matches!(
            a.allocate(PAGE, PAGE),
            Err(IovaError::Exhausted { .. })
        ));
        // ...but a caller may reserve it.
        assert_eq!(a.reserve(Iova(0), PAGE), Ok(()));
    }

    #[test]
    fn reserve_ok_and_lookup() {
        let mut a = x86();
        a.reserve(Iova(0), 0x8000_0000).unwrap();
        a.reserve(Iova(0x1_0000_0000), 0x1_0000_0000).unwrap();
        assert_eq!(a.lookup(Iova(0)), Some((Iova(0), 0x8000_0000)));
        assert_eq!(a.lookup(Iova(0x7fff_ffff)), Some((Iova(0), 0x8000_0000)));
        assert_eq!(a.lookup(Iova(0x8000_0000)), None);
        assert_eq!(
            a.lookup(Iova(0x1_8000_0000)),
            Some((Iova(0x1_0000_0000), 0x1_0000_0000))
        );
        assert!(a.contains(Iova(0x1_ffff_ffff)));
        assert!(!a.contains(Iova(0x2_0000_0000)));
        assert_eq!(
            a.allocations().collect::<Vec<_>>(),
            vec![(Iova(0), 0x8000_0000), (Iova(0x1_0000_0000), 0x1_0000_0000)]
        );
        // The allocator fills the gap between them.
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x8000_0000)));
    }

    #[test]
    fn reserve_errors() {
        let mut a = x86();
        assert_eq!(a.reserve(Iova(0x1000), 0), Err(IovaError::ZeroLength));
        assert_eq!(
            a.reserve(Iova(0x1800), PAGE),
            Err(IovaError::MisalignedIova {
                iova: Iova(0x1800),
                align: PAGE
            })
        );
        assert_eq!(
            a.reserve(Iova(0x1000), 0x1001),
            Err(IovaError::MisalignedLen {
                len: 0x1001,
                align: PAGE
            })
        );
        let mut full = IovaAllocator::new(vec![r(0, u64::MAX)], PAGE).unwrap();
        assert_eq!(
            full.reserve(Iova(u64::MAX - 0xfff), 0x2000),
            Err(IovaError::Overflow {
                iova: Iova(u64::MAX - 0xfff),
                len: 0x2000
            })
        );
        // Ending exactly at u64::MAX is fine.
        assert_eq!(full.reserve(Iova(u64::MAX - 0xfff), 0x1000), Ok(()));

        // Inside the MSI window, and straddling it.
        for (iova, len) in [
            (0xfee0_0000, PAGE),
            (0xfed0_0000, 0x20_0000),
            (0x1_0000_0000_0000, PAGE),
        ] {
            assert_eq!(
                a.reserve(Iova(iova), len),
                Err(IovaError::OutsideRanges {
                    iova: Iova(iova),
                    len,
                    ranges: vec![r(0, 0xfedf_ffff), r(0xfef0_0000, 0xffff_ffff_ffff)]
                })
            );
        }

        a.reserve(Iova(0x10_0000), 0x10_0000).unwrap();
        for (iova, len) in [
            (0x10_0000, PAGE),
            (0xf_f000, 0x2000),
            (0x1f_f000, PAGE),
            (0, 0x100_0000),
        ] {
            assert_eq!(
                a.reserve(Iova(iova), len),
                Err(IovaError::Overlap {
                    iova: Iova(iova),
                    len,
                    existing: Iova(0x10_0000),
                    existing_len: 0x10_0000
                })
            );
        }
        assert_eq!(
            a.allocations().count(),
            1,
            "failed calls leave nothing behind"
        );
    }

    #[test]
    fn dma_mask_32_bits() {
        let mut a = x86();
        assert_eq!(a.dma_mask_bits(), 64);
        assert_eq!(a.set_dma_mask(11), Err(IovaError::BadDmaMask { bits: 11 }));
        assert_eq!(a.set_dma_mask(65), Err(IovaError::BadDmaMask { bits: 65 }));
        a.set_dma_mask(32).unwrap();
        assert_eq!(a.ceiling(), Iova(0xffff_ffff));
        // Below the MSI window: 0x1000 up to 0xfedfffff; above it up to 4 GiB.
        let big = a.allocate(0xfedf_f000, PAGE).unwrap();
        assert_eq!(big, Iova(0x1000));
        let above_msi = a.allocate(0x100_0000, PAGE).unwrap();
        assert_eq!(above_msi, Iova(0xfef0_0000));
        // 0xfef00000 + 16M = 0xfff00000: 1 MiB is left below 4 GiB.
        assert_eq!(a.allocate(0x10_0000, PAGE), Ok(Iova(0xfff0_0000)));
        assert_eq!(
            a.allocate(PAGE, PAGE),
            Err(IovaError::Exhausted {
                len: PAGE,
                align: PAGE
            })
        );
        // A reservation across 4 GiB is refused, with the mask in the message.
        let e = a.reserve(Iova(0x1_0000_0000), PAGE).unwrap_err();
        assert!(
            matches!(e, IovaError::AboveDmaMask { bits: 32, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("32-bit DMA mask"), "{e}");
        // Narrowing below a live allocation is refused; widening is fine.
        let e = a.set_dma_mask(20).unwrap_err();
        assert!(
            matches!(e, IovaError::MaskBelowAllocation { bits: 20, .. }),
            "{e:?}"
        );
        a.set_dma_mask(64).unwrap();
        assert_eq!(a.allocate(PAGE, PAGE), Ok(Iova(0x1_0000_0000)));
    }

    #[test]
    fn free_errors() {
        let mut a = x86();
        a.reserve(Iova(0x10_0000), 0x10_0000).unwrap();
        assert_eq!(
            a.free(Iova(0x10_1000)),
            Err(IovaError::UnknownAllocation {
                iova: Iova(0x10_1000)
            })
        );
        assert_eq!(a.free(Iova(0x10_0000)), Ok(0x10_0000));
        assert_eq!(
            a.free(Iova(0x10_0000)),
            Err(IovaError::UnknownAllocation {
                iova: Iova(0x10_0000)
            })
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let mut a = x86();
        let e = a.reserve(Iova(0xfee0_0000), PAGE).unwrap_err().to_string();
        assert_eq!(
            e,
            "IOVA span [0xfee00000, 0xfee01000) is not inside the usable IOVA ranges of this \
             container; pick an IOVA inside one of the usable ranges: 0x0-0xfedfffff, \
             0xfef00000-0xffffffffffff, or omit @IOVA to let numapin choose"
        );
        a.reserve(Iova(0x10_0000), 0x10_0000).unwrap();
        let e = a
            .reserve(Iova(0x18_0000), 0x10_0000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[0x180000, 0x280000) overlaps the existing mapping [0x100000, 0x200000)"),
            "{e}"
        );
        // An allocation ending at u64::MAX prints its exclusive end without wrapping.
        let mut full = IovaAllocator::new(vec![r(0, u64::MAX)], PAGE).unwrap();
        full.reserve(Iova(u64::MAX - 0xfff), PAGE).unwrap();
        let e = full
            .reserve(Iova(u64::MAX - 0xfff), PAGE)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[0xfffffffffffff000, 0x10000000000000000)"),
            "{e}"
        );
        let e = a.allocate(1 << 62, 0x20_0000).unwrap_err().to_string();
        assert!(
            e.contains("0x4000000000000000 bytes aligned to 0x200000") && e.contains("release"),
            "{e}"
        );
        for e in [
            IovaError::NoRanges,
            IovaError::ZeroLength,
            IovaError::BadAlign { align: 3 },
            IovaError::MisalignedLen {
                len: 1,
                align: PAGE,
            },
            IovaError::MisalignedIova {
                iova: Iova(1),
                align: PAGE,
            },
            IovaError::Overflow {
                iova: Iova(u64::MAX),
                len: 2,
            },
            IovaError::UnknownAllocation { iova: Iova(1) },
            IovaError::BadRange {
                start: Iova(2),
                end: Iova(1),
            },
        ] {
            let m = e.to_string();
            assert!(m.contains("; "), "message lacks a remedy: {m}");
        }
    }

    // ---- property tests against a brute-force model ----

    /// The property tests work in a small universe of `UNIVERSE` pages
    /// starting at `base` (0, or the top of the 64-bit space).
    const UNIVERSE: u64 = 96;

    #[derive(Debug, Clone)]
    enum Op {
        Allocate { pages: u64, align_shift: u32 },
        Reserve { page: u64, pages: u64 },
        Free { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1..=12u64, 0..5u32).prop_map(|(pages, align_shift)| Op::Allocate { pages, align_shift }),
            2 => (0..UNIVERSE, 1..=12u64).prop_map(|(page, pages)| Op::Reserve { page, pages }),
            2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    /// Usable ranges as page spans `[first, last]`, unsorted and possibly
    /// overlapping, plus the base address.
    fn setup() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
        let base = prop_oneof![Just(0u64), Just(u64::MAX - UNIVERSE * PAGE + 1)];
        let spans = prop::collection::vec((0..UNIVERSE, 0..24u64), 1..5).prop_map(|v| {
            v.into_iter()
                .map(|(a, n)| (a, (a + n).min(UNIVERSE - 1)))
                .collect()
        });
        (base, spans)
    }

    struct Model {
        base: u64,
        usable: Vec<bool>,     // per page
        live: Vec<(u64, u64)>, // (start address, len)
    }

    impl Model {
        fn page_of(&self, addr: u64) -> u64 {
            (addr - self.base) / PAGE
        }
        fn span_free_and_usable(&self, start: u64, len: u64) -> bool {
            let Some(last) = last_of(start, len) else {
                return false;
            };
            if start < self.base {
                return false;
            }
            let (p0, p1) = (self.page_of(start), self.page_of(last));
            if p1 >= UNIVERSE || !(p0..=p1).all(|p| self.usable[p as usize]) {
                return false;
            }
            self.live
                .iter()
                .all(|&(s, l)| last < s || s + (l - 1) < start)
        }
        /// The first-fit answer, by brute force.
        fn first_fit(&self, len: u64, align: u64) -> Option<u64> {
            (0..UNIVERSE)
                .map(|p| self.base + p * PAGE)
                .filter(|&a| a != 0 && a % align == 0)
                .find(|&a| self.span_free_and_usable(a, len))
        }
    }

    fn check_invariants(a: &IovaAllocator, m: &Model) {
        let mut live = m.live.clone();
        live.sort();
        let got: Vec<(u64, u64)> = a.allocations().map(|(s, l)| (s.0, l)).collect();
        assert_eq!(got, live, "allocator and model disagree");
        for w in got.windows(2) {
            assert!(w[0].0 + (w[0].1 - 1) < w[1].0, "allocations overlap: {w:?}");
        }
        for &(s, l) in &got {
            assert!(
                s % PAGE == 0 && l % PAGE == 0,
                "misaligned allocation {s:#x}+{l:#x}"
            );
            let n = a
                .ranges()
                .iter()
                .filter(|r| r.contains_span(Iova(s), l))
                .count();
            assert_eq!(
                n, 1,
                "allocation {s:#x}+{l:#x} is not inside exactly one range"
            );
            assert_eq!(a.lookup(Iova(s)), Some((Iova(s), l)));
            assert_eq!(a.lookup(Iova(s + (l - 1))), Some((Iova(s), l)));
        }
        // The normalised ranges cover exactly the usable pages.
        for p in 0..UNIVERSE {
            let addr = m.base + p * PAGE;
            let covered = a.ranges().iter().any(|r| r.contains_span(Iova(addr), PAGE));
            assert_eq!(covered, m.usable[p as usize], "page {p} coverage");
        }
        for w in a.ranges().windows(2) {
            assert!(w[0].end.0 + 1 < w[1].start.0, "ranges not merged: {w:?}");
        }
    }

    fn build(base: u64, spans: &[(u64, u64)]) -> (IovaAllocator, Model) {
        let ranges = spans
            .iter()
            .map(|&(f, l)| r(base + f * PAGE, base + l * PAGE + (PAGE - 1)))
            .collect();
        let a = IovaAllocator::new(ranges, PAGE).unwrap();
        let mut usable = vec![false; UNIVERSE as usize];
        for &(f, l) in spans {
            for p in f..=l {
                usable[p as usize] = true;
            }
        }
        (
            a,
            Model {
                base,
                usable,
                live: vec![],
            },
        )
    }

    proptest! {
        /// Random operation sequences: the allocator matches a brute-force
        /// model exactly (first fit, reservations honoured, no overlap,
        /// alignment, containment), and failed calls change nothing.
        #[test]
        fn matches_model((base, spans) in setup(), ops in prop::collection::vec(op(), 1..60)) {
            let (mut a, mut m) = build(base, &spans);
            for op in ops {
                match op {
                    Op::Allocate { pages, align_shift } => {
                        let (len, align) = (pages * PAGE, PAGE << align_shift);
                        let expect = m.first_fit(len, align);
                        match a.allocate(len, align) {
                            Ok(iova) => {
                                prop_assert_eq!(Some(iova.0), expect);
                                prop_assert!(iova.0 != 0);
                                prop_assert_eq!(iova.0 % align, 0);
                                m.live.push((iova.0, len));
                            }
                            Err(e) => {
                                prop_assert_eq!(expect, None);
                                prop_assert_eq!(e, IovaError::Exhausted { len, align });
                            }
                        }
                    }
                    Op::Reserve { page, pages } => {
                        let (iova, len) = (base.wrapping_add(page * PAGE), pages * PAGE);
                        let ok = m.span_free_and_usable(iova, len);
                        match a.reserve(Iova(iova), len) {
                            Ok(()) => {
                                prop_assert!(ok, "reserve {:#x}+{:#x} should have failed", iova, len);
                                prop_assert_eq!(a.lookup(Iova(iova)), Some((Iova(iova), len)));
                                m.live.push((iova, len));
                            }
                            Err(e) => {
                                prop_assert!(!ok, "reserve {:#x}+{:#x} failed: {}", iova, len, e);
                                let kind_ok = matches!(
                                    e,
                                    IovaError::Overlap { .. } | IovaError::OutsideRanges { .. } | IovaError::Overflow { .. }
                                );
                                prop_assert!(kind_ok, "unexpected {:?}", e);
                            }
                        }
                    }
                    Op::Free { pick } => {
                        if m.live.is_empty() {
                            continue;
                        }
                        let (s, l) = m.live.swap_remove(pick % m.live.len());
                        prop_assert_eq!(a.free(Iova(s)), Ok(l));
                    }
                }
                check_invariants(&a, &m);
            }
        }

        /// With a DMA mask, every allocation and reservation ends at or
        /// below the ceiling; allocation is still first fit over what lies
        /// below it, and a reservation is refused exactly when it crosses.
        #[test]
        fn dma_mask_is_a_ceiling(
            spans in prop::collection::vec((0..UNIVERSE, 0..24u64), 1..5),
            mask_page in 1..UNIVERSE,
            ops in prop::collection::vec(op(), 1..60),
        ) {
            let spans: Vec<(u64, u64)> =
                spans.into_iter().map(|(a, n)| (a, (a + n).min(UNIVERSE - 1))).collect();
            // A mask reaching `2^bits - 1` with `2^bits` a power of two pages:
            // pick the bits so that the ceiling falls inside the universe.
            let bits = (mask_page * PAGE).next_power_of_two().trailing_zeros();
            let ceiling = (1u64 << bits) - 1;
            let (mut a, mut m) = build(0, &spans);
            prop_assert_eq!(a.set_dma_mask(bits), Ok(()));
            prop_assert_eq!(a.ceiling(), Iova(ceiling));
            // The model: pages above the ceiling are not usable.
            for p in 0..UNIVERSE {
                if p * PAGE + (PAGE - 1) > ceiling {
                    m.usable[p as usize] = false;
                }
            }
            for op in ops {
                match op {
                    Op::Allocate { pages, align_shift } => {
                        let (len, align) = (pages * PAGE, PAGE << align_shift);
                        let expect = m.first_fit(len, align);
                        match a.allocate(len, align) {
                            Ok(iova) => {
                                prop_assert_eq!(Some(iova.0), expect);
                                prop_assert!(iova.0 + (len - 1) <= ceiling);
                                m.live.push((iova.0, len));
                            }
                            Err(e) => {
                                prop_assert_eq!(expect, None);
                                prop_assert_eq!(e, IovaError::Exhausted { len, align });
                            }
                        }
                    }
                    Op::Reserve { page, pages } => {
                        let (iova, len) = (page * PAGE, pages * PAGE);
                        let ok = m.span_free_and_usable(iova, len);
                        match a.reserve(Iova(iova), len) {
                            Ok(()) => {
                                prop_assert!(ok);
                                prop_assert!(iova + (len - 1) <= ceiling);
                                m.live.push((iova, len));
                            }
                            Err(e) => prop_assert!(!ok, "reserve {:#x}+{:#x} failed: {}", iova, len, e),
                        }
                    }
                    Op::Free { pick } => {
                        if m.live.is_empty() {
                            continue;
                        }
                        let (s, l) = m.live.swap_remove(pick % m.live.len());
                        prop_assert_eq!(a.free(Iova(s)), Ok(l));
                    }
                }
                for (s, l) in a.allocations() {
                    prop_assert!(s.0 + (l - 1) <= ceiling, "{} + {:#x} above {:#x}", s, l, ceiling);
                }
            }
        }

        /// Reservations are honoured exactly and never overlapped by later
        /// allocations.
        #[test]
        fn reservations_survive_allocations(
            (base, spans) in setup(),
            fixed in prop::collection::vec((0..UNIVERSE, 1..6u64), 1..6),
            sizes in prop::collection::vec((1..6u64, 0..3u32), 1..40),
        ) {
            let (mut a, _) = build(base, &spans);
            let mut reserved = vec![];
            for (page, pages) in fixed {
                let (iova, len) = (base.wrapping_add(page * PAGE), pages * PAGE);
                if a.reserve(Iova(iova), len).is_ok() {
                    reserved.push((iova, len));
                }
            }
            for (pages, shift) in sizes {
                let _ = a.allocate(pages * PAGE, PAGE << shift);
            }
            let all: Vec<_> = a.allocations().map(|(s, l)| (s.0, l)).collect();
            for (iova, len) in reserved {
                prop_assert!(all.contains(&(iova, len)), "reservation {:#x}+{:#x} lost", iova, len);
                // Nothing else touches it.
                for &(s, l) in &all {
                    if s != iova {
                        prop_assert!(s + (l - 1) < iova || iova + (len - 1) < s);
                    }
                }
            }
        }

        /// Allocating until the space runs out ends in `Exhausted`; freeing
        /// any allocation then makes room for the same request again, and
        /// the freed space is what gets reused.
        #[test]
        fn exhaustion_then_free_reuses((base, spans) in setup(), pages in 1..4u64, pick in any::<usize>()) {
            let (mut a, _) = build(base, &spans);
            let len = pages * PAGE;
            let mut got = vec![];
            let err = loop {
                match a.allocate(len, PAGE) {
                    Ok(iova) => got.push(iova),
                    Err(e) => break e,
                }
                prop_assert!(got.len() as u64 <= UNIVERSE, "never exhausted");
            };
            prop_assert_eq!(err, IovaError::Exhausted { len, align: PAGE });
            if got.is_empty() {
                return Ok(());
            }
            let victim = got[pick % got.len()];
            prop_assert_eq!(a.free(victim), Ok(len));
            prop_assert_eq!(a.allocate(len, PAGE), Ok(victim));
            prop_assert!(a.allocate(len, PAGE).is_err());
        }
    }
}
