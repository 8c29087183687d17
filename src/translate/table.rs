//! The two-level table: one entry per 2 MiB of address space below 2^48.
//!
//! An address `a` below [`LIMIT`] is found in two loads: the top level,
//! indexed by `a >> 30` (2^18 `u32`s, allocated on the first insert),
//! names a second-level table, indexed by `(a >> 21) & 511`, whose
//! [`Entry`] says what holds the 2 MiB granule around `a`: nothing, one
//! region, or more than one (regions not aligned to 2 MiB can share a
//! granule; the caller then asks the sorted arrays).

use std::fmt;

/// Bits of the granule: 2 MiB.
pub(super) const SHIFT: u32 = 21;
/// Bytes per granule.
pub(super) const GRANULE: u64 = 1 << SHIFT;
/// Second-level entries per table (one top-level slot: 1 GiB).
const L2_LEN: usize = 512;
/// The tables cover `[0, LIMIT)`; addresses above go to the sorted arrays.
pub(super) const LIMIT: u64 = 1 << 48;
/// Top-level slots.
const TOP_LEN: usize = (LIMIT >> (SHIFT + 9)) as usize;

/// What one granule holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Entry {
    /// For a [`Entry::FULL`] granule: add to the address to translate it
    /// (IOVA − vaddr in the vaddr table, vaddr − IOVA in the IOVA table).
    pub(super) delta: u64,
    /// For a [`Entry::PA`] granule: add to the vaddr to get the PA.
    pub(super) pa_delta: u64,
    /// The slot of the one region, with [`Entry::ONE`].
    pub(super) slot: u32,
    /// [`Entry::ONE`], [`Entry::FULL`], [`Entry::IOVA`], [`Entry::PA`],
    /// [`Entry::MULTI`]; 0: no region touches the granule.
    pub(super) flags: u32,
}

impl Entry {
    /// Exactly one region touches the granule; `slot` names it.
    pub(super) const ONE: u32 = 1;
    /// The region covers the whole granule: no bounds check needed.
    pub(super) const FULL: u32 = 2;
    /// The region has an IOVA, so `delta` translates.
    pub(super) const IOVA: u32 = 4;
    /// The whole granule lies in one physical extent: `pa_delta` is valid.
    pub(super) const PA: u32 = 8;
    /// More than one region touches the granule: ask the sorted arrays.
    pub(super) const MULTI: u32 = 16;
}

type Level2 = Box<[Entry; L2_LEN]>;

/// One address space's table (virtual or IOVA).
#[derive(Clone, Default)]
pub(super) struct Table {
    /// 0: no second level; else its index in `l2` plus one.
    top: Vec<u32>,
    l2: Vec<Level2>,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("second_level_tables", &self.l2.len())
            .finish()
    }
}

impl Table {
    /// The entry of the granule holding `a` (`a < LIMIT`).
    #[inline]
    pub(super) fn get(&self, a: u64) -> Entry {
        debug_assert!(a < LIMIT);
        let g = a >> SHIFT;
        match self.top.get((g >> 9) as usize) {
            Some(&t) if t != 0 => self.l2[t as usize - 1][(g & 511) as usize],
            _ => Entry::default(),
        }
    }

    /// The entry of granule number `g`, made if missing.
    pub(super) fn entry_mut(&mut self, g: u64) -> &mut Entry {
        if self.top.is_empty() {
            self.top = vec![0; TOP_LEN];
        }
        let t = &mut self.top[(g >> 9) as usize];
        if *t == 0 {
            self.l2.push(Box::new([Entry::default(); L2_LEN]));
            *t = u32::try_from(self.l2.len()).expect("fewer than 2^32 second-level tables");
        }
        &mut self.l2[*t as usize - 1][(g & 511) as usize]
    }

    /// Heap bytes the table takes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.top.capacity() * std::mem::size_of::<u32>()
            + self.l2.len() * std::mem::size_of::<[Entry; L2_LEN]>()
    }
}

/// The granules `[start, start + len)` touches below [`LIMIT`], as
/// `(granule number, whether the range covers it whole)`.
pub(super) fn granules(start: u64, len: u64) -> impl Iterator<Item = (u64, bool)> {
    let last = start + (len - 1);
    let first_g = start >> SHIFT;
    // Nothing below the limit: an empty range of granules.
    let last_g = if start >= LIMIT {
        first_g.wrapping_sub(1)
    } else {
        last.min(LIMIT - 1) >> SHIFT
    };
    let n = if start >= LIMIT {
        0
    } else {
        last_g - first_g + 1
    };
    (first_g..).take(n as usize).map(move |g| {
        let gs = g << SHIFT;
        (g, start <= gs && gs + (GRANULE - 1) <= last)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_of_ranges() {
        let m = GRANULE;
        let g = |s, l| granules(s, l).collect::<Vec<_>>();
        assert_eq!(g(0, m), vec![(0, true)]);
        assert_eq!(g(1, m), vec![(0, false), (1, false)]);
        assert_eq!(g(m, 3 * m), vec![(1, true), (2, true), (3, true)]);
        assert_eq!(g(m - 1, 2), vec![(0, false), (1, false)]);
        assert_eq!(g(LIMIT - m, 4 * m), vec![((LIMIT >> SHIFT) - 1, true)]);
        assert!(g(LIMIT, m).is_empty());
        assert!(g(u64::MAX - m + 1, m).is_empty());
    }

    #[test]
    fn entries_are_made_on_demand() {
        let mut t = Table::default();
        assert_eq!(t.get(0x7f00_0000_0000), Entry::default());
        assert_eq!(t.heap_bytes(), 0);
        t.entry_mut(0x7f00_0000_0000 >> SHIFT).flags = Entry::MULTI;
        assert_eq!(t.get(0x7f00_001f_ffff).flags, Entry::MULTI);
        assert_eq!(t.get(0x7f00_0020_0000), Entry::default());
        assert_eq!(
            t.heap_bytes(),
            TOP_LEN * 4 + std::mem::size_of::<[Entry; L2_LEN]>()
        );
    }
}
