//! The two-level tables: one entry per 2 MiB of address space below 2^48.
//!
//! An address `a` below [`LIMIT`] is found in two dependent loads: the top
//! level, indexed by `a >> 30` (2^18 `u32`s, allocated on the first
//! insert), names a leaf, indexed by `(a >> 21) & 511`. The leaves of one
//! table lie in one dense array (leaf 0 is all empty, for the top-level
//! slots no region reaches), so a lookup touches one top-level word and one
//! leaf cache line, and an 8-byte leaf makes a leaf exactly one 4 KiB page.
//!
//! [`Tables`] keeps four such tables in step: vaddr → IOVA, vaddr → PA and
//! IOVA → vaddr of [`Entry`]s (the translation itself when one region holds
//! the whole granule), and vaddr → region slot (for the lookups that need
//! the region, such as the physical run's length).

use std::collections::HashMap;
use std::fmt;

use super::sorted::{Region, SortedMap};

/// Bits of the granule: 2 MiB.
pub(super) const SHIFT: u32 = 21;
/// Bytes per granule.
pub(super) const GRANULE: u64 = 1 << SHIFT;
/// Bits of the leaf index: 512 entries per leaf (one top-level slot: 1 GiB).
const LEAF_BITS: u32 = 9;
const LEAF_LEN: usize = 1 << LEAF_BITS;
/// The tables cover `[0, LIMIT)`; addresses above go to the sorted arrays.
pub(super) const LIMIT: u64 = 1 << 48;
/// Top-level slots.
const TOP_LEN: usize = (LIMIT >> (SHIFT + LEAF_BITS)) as usize;

/// What one granule holds, for one direction, in 8 bytes: the low two bits
/// say which case, the rest is the payload.
///
/// - `0`: no region touches the granule.
/// - `delta | 1` (`delta` with its low two bits clear): one region holds
///   the whole granule and `address + delta` translates it.
/// - `slot << 2 | 2`: one region touches the granule (in part, or with a
///   `delta` whose low bits are set); the lookup reads the region in `slot`
///   and checks its bounds.
/// - `3`: more than one region touches it: ask the sorted arrays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Entry(u64);

/// An [`Entry`] decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// No region.
    Empty,
    /// Add this to the address.
    Direct(u64),
    /// The region in this slot.
    Slot(usize),
    /// More than one region.
    Multi,
}

impl Entry {
    const TAG: u64 = 3;
    const MULTI: Entry = Entry(3);

    /// The entry that translates by adding `delta`, or `None` if `delta`
    /// has one of the two tag bits set.
    fn direct(delta: u64) -> Option<Entry> {
        (delta & Self::TAG == 0).then_some(Entry(delta | 1))
    }

    fn slot(slot: u32) -> Entry {
        Entry(u64::from(slot) << 2 | 2)
    }

    /// Exactly one region touches the granule.
    fn is_one(self) -> bool {
        matches!(self.0 & Self::TAG, 1 | 2)
    }

    #[inline]
    pub(super) fn kind(self) -> Kind {
        match self.0 & Self::TAG {
            0 => Kind::Empty,
            1 => Kind::Direct(self.0 & !Self::TAG),
            // The payload came from a u32 slot.
            2 => Kind::Slot((self.0 >> 2) as usize),
            _ => Kind::Multi,
        }
    }
}

/// A vaddr-to-slot entry: 0 none, [`MANY`] more than one region, else the
/// slot plus one.
const MANY: u32 = u32::MAX;

/// One table: a value per 2 MiB granule, `T::default()` where nothing was
/// written.
#[derive(Clone, Default)]
pub(super) struct Table<T: Copy + Default> {
    /// Leaf index per GiB; 0, the empty leaf, where no region reaches.
    top: Vec<u32>,
    /// The leaves, dense; `leaves[0]` stays empty. Never shrinks: a leaf
    /// once made stays (the entries of removed regions are cleared).
    leaves: Vec<[T; LEAF_LEN]>,
}

impl<T: Copy + Default> fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("leaves", &self.leaves.len())
            .finish()
    }
}

impl<T: Copy + Default> Table<T> {
    /// The value of the granule holding `a` (`a < LIMIT`).
    #[inline]
    pub(super) fn get(&self, a: u64) -> T {
        debug_assert!(a < LIMIT);
        let g = a >> SHIFT;
        let t = self.top.get((g >> LEAF_BITS) as usize).map_or(0, |&t| t);
        match self.leaves.get(t as usize) {
            Some(leaf) => leaf[g as usize & (LEAF_LEN - 1)],
            None => T::default(),
        }
    }

    /// The value of granule number `g`, its leaf made if missing.
    fn at_mut(&mut self, g: u64) -> &mut T {
        if self.top.is_empty() {
            self.top = vec![0; TOP_LEN];
            self.leaves.push([T::default(); LEAF_LEN]);
        }
        let t = &mut self.top[(g >> LEAF_BITS) as usize];
        if *t == 0 {
            *t = u32::try_from(self.leaves.len()).expect("fewer than 2^32 leaves");
            if self.leaves.len() == self.leaves.capacity() {
                self.leaves = grown(&self.leaves);
            }
            self.leaves.push([T::default(); LEAF_LEN]);
        }
        &mut self.leaves[*t as usize][g as usize & (LEAF_LEN - 1)]
    }

    /// Heap bytes the table takes (allocated, not only used).
    pub(super) fn heap_bytes(&self) -> usize {
        self.top.capacity() * std::mem::size_of::<u32>()
            + self.leaves.capacity() * std::mem::size_of::<[T; LEAF_LEN]>()
    }
}

/// A copy of `leaves` with room for half as many more, its memory advised
/// to be backed by transparent huge pages before it is first written.
///
/// A table of many regions spans more 4 KiB pages than the TLB holds (the
/// vaddr → IOVA leaves of 100,000 regions of about 14 MiB with gaps: some
/// 17 MiB), and lookups at random addresses would miss it on most pages;
/// 2 MiB pages keep it in a few TLB entries. A `Vec`'s own growth could
/// move pages already faulted in as 4 KiB ones, hence the copy.
fn grown<L: Copy>(leaves: &[L]) -> Vec<L> {
    const HUGE: usize = 2 << 20;
    let mut more = Vec::with_capacity(leaves.len() + (leaves.len() / 2).max(16));
    let start = more.as_ptr() as usize;
    let end = start + more.capacity() * std::mem::size_of::<L>();
    let (from, to) = (start.next_multiple_of(HUGE), end & !(HUGE - 1));
    if from < to {
        // SAFETY: `[from, to)` lies inside `more`'s own allocation, which
        // nothing else uses. MADV_HUGEPAGE only tells the kernel which page
        // size to back the range with: it changes neither the contents nor
        // the validity of the memory. Without THP it fails, harmlessly: the
        // result is ignored.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
    more.extend_from_slice(leaves);
    more
}

/// The granules `[start, start + len)` touches below [`LIMIT`], by number.
pub(super) fn granules(start: u64, len: u64) -> impl Iterator<Item = u64> {
    let last = start + (len - 1);
    let n = if start >= LIMIT {
        0
    } else {
        (last.min(LIMIT - 1) >> SHIFT) - (start >> SHIFT) + 1
    };
    (start >> SHIFT..).take(n as usize)
}

/// Whether `[start, start + len)` covers granule `g` whole.
fn covers(start: u64, len: u64, g: u64) -> bool {
    let gs = g << SHIFT;
    start <= gs && gs + (GRANULE - 1) <= start + (len - 1)
}

/// Who touches one granule.
enum Holder<'a> {
    None,
    One(&'a Region, u32),
    Many,
}

/// The four tables of an [`AddressMap`](super::AddressMap).
#[derive(Debug, Clone, Default)]
pub(super) struct Tables {
    /// vaddr → IOVA.
    pub(super) v2i: Table<Entry>,
    /// vaddr → PA.
    pub(super) v2p: Table<Entry>,
    /// vaddr → slot ([`Tables::slot_of`]).
    v2s: Table<u32>,
    /// IOVA → vaddr.
    pub(super) i2v: Table<Entry>,
}

/// What the tables look regions up in: the regions by slot and the slot of
/// each region by virtual start.
pub(super) struct Slots<'a> {
    pub(super) regions: &'a [Region],
    pub(super) by_vaddr: &'a HashMap<u64, u32>,
}

impl Slots<'_> {
    fn holder(&self, starts: &[u64]) -> Holder<'_> {
        match starts {
            [] => Holder::None,
            [v] => {
                let s = self.by_vaddr[v];
                Holder::One(&self.regions[s as usize], s)
            }
            _ => Holder::Many,
        }
    }
}

impl Tables {
    /// The slot of the region that touches the virtual granule holding `v`
    /// (`v < LIMIT`): `Ok(None)` if none does, `Err(())` if more than one.
    #[inline]
    pub(super) fn slot_of(&self, v: u64) -> Result<Option<usize>, ()> {
        match self.v2s.get(v) {
            0 => Ok(None),
            MANY => Err(()),
            s => Ok(Some(s as usize - 1)),
        }
    }

    fn set_vaddr(&mut self, g: u64, h: Holder<'_>) {
        let (vi, vp, vs) = match h {
            Holder::None => (Entry::default(), Entry::default(), 0),
            Holder::Many => (Entry::MULTI, Entry::MULTI, MANY),
            Holder::One(r, s) => {
                let one = Entry::slot(s);
                let gs = g << SHIFT;
                let (mut vi, mut vp) = (one, one);
                if covers(r.vaddr, r.len, g) {
                    if let Some(i) = r.iova {
                        vi = Entry::direct(i.0.wrapping_sub(r.vaddr)).unwrap_or(one);
                    }
                    if let Some(run) = r.phys_run(gs - r.vaddr)
                        && run.len >= GRANULE
                    {
                        vp = Entry::direct(run.pa.0.wrapping_sub(gs)).unwrap_or(one);
                    }
                }
                (vi, vp, s + 1)
            }
        };
        *self.v2i.at_mut(g) = vi;
        *self.v2p.at_mut(g) = vp;
        *self.v2s.at_mut(g) = vs;
    }

    fn set_iova(&mut self, g: u64, h: Holder<'_>) {
        *self.i2v.at_mut(g) = match h {
            Holder::None => Entry::default(),
            Holder::Many => Entry::MULTI,
            Holder::One(r, s) => {
                let i = r.iova.expect("in the IOVA index").0;
                let one = Entry::slot(s);
                if covers(i, r.len, g) {
                    Entry::direct(r.vaddr.wrapping_sub(i)).unwrap_or(one)
                } else {
                    one
                }
            }
        };
    }

    /// Enters region `r` (in `slot`) in every granule it touches; a granule
    /// another region touches too becomes "more than one".
    pub(super) fn add(&mut self, r: &Region, slot: u32) {
        for g in granules(r.vaddr, r.len) {
            let taken = *self.v2s.at_mut(g) != 0;
            self.set_vaddr(
                g,
                if taken {
                    Holder::Many
                } else {
                    Holder::One(r, slot)
                },
            );
        }
        if let Some(i) = r.iova {
            for g in granules(i.0, r.len) {
                let taken = *self.i2v.at_mut(g) != Entry::default();
                self.set_iova(
                    g,
                    if taken {
                        Holder::Many
                    } else {
                        Holder::One(r, slot)
                    },
                );
            }
        }
    }

    /// Takes region `r`, already gone from `sorted` and `slots`, out of
    /// every granule it touched: a granule only it touched becomes empty,
    /// a shared one is worked out again from the regions left.
    pub(super) fn remove(&mut self, r: &Region, sorted: &SortedMap, slots: &Slots<'_>) {
        for g in granules(r.vaddr, r.len) {
            let h = if *self.v2s.at_mut(g) == MANY {
                let gs = g << SHIFT;
                slots.holder(&sorted.vaddr_overlapping(gs, gs + (GRANULE - 1)))
            } else {
                Holder::None
            };
            self.set_vaddr(g, h);
        }
        if let Some(i) = r.iova {
            for g in granules(i.0, r.len) {
                let h = if self.i2v.at_mut(g).is_one() {
                    Holder::None
                } else {
                    let gs = g << SHIFT;
                    slots.holder(&sorted.iova_overlapping(gs, gs + (GRANULE - 1)))
                };
                self.set_iova(g, h);
            }
        }
    }

    /// Heap bytes of the four tables.
    pub(super) fn heap_bytes(&self) -> usize {
        self.v2i.heap_bytes()
            + self.v2p.heap_bytes()
            + self.v2s.heap_bytes()
            + self.i2v.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_of_ranges() {
        let m = GRANULE;
        let g = |s, l| granules(s, l).collect::<Vec<_>>();
        assert_eq!(g(0, m), vec![0]);
        assert_eq!(g(1, m), vec![0, 1]);
        assert_eq!(g(m, 3 * m), vec![1, 2, 3]);
        assert_eq!(g(m - 1, 2), vec![0, 1]);
        assert_eq!(g(LIMIT - m, 4 * m), vec![(LIMIT >> SHIFT) - 1]);
        assert!(g(LIMIT, m).is_empty());
        assert!(g(u64::MAX - m + 1, m).is_empty());
        assert!(covers(m, 3 * m, 1) && covers(m, 3 * m, 3) && !covers(m, 3 * m, 4));
        assert!(!covers(1, m, 0) && !covers(1, m, 1));
    }

    #[test]
    fn entries_pack_in_eight_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 8);
        assert_eq!(std::mem::size_of::<[Entry; LEAF_LEN]>(), 4096);
        assert_eq!(Entry::default().kind(), Kind::Empty);
        assert_eq!(Entry::MULTI.kind(), Kind::Multi);
        assert_eq!(Entry::slot(7).kind(), Kind::Slot(7));
        assert_eq!(Entry::slot(u32::MAX).kind(), Kind::Slot(u32::MAX as usize));
        let d = 0u64.wrapping_sub(0x7f00_0000_0000);
        assert_eq!(Entry::direct(d).map(Entry::kind), Some(Kind::Direct(d)));
        assert_eq!(Entry::direct(0).map(Entry::kind), Some(Kind::Direct(0)));
        assert_eq!(Entry::direct(0x1001), None);
        assert_eq!(Entry::direct(u64::MAX), None);
        assert!(Entry::slot(0).is_one() && Entry::direct(4).unwrap().is_one());
        assert!(!Entry::MULTI.is_one() && !Entry::default().is_one());
    }

    #[test]
    fn leaves_are_made_on_demand() {
        let mut t = Table::<u32>::default();
        assert_eq!(t.get(0x7f00_0000_0000), 0);
        assert_eq!(t.heap_bytes(), 0);
        *t.at_mut(0x7f00_0000_0000 >> SHIFT) = 9;
        assert_eq!(t.get(0x7f00_001f_ffff), 9);
        assert_eq!(t.get(0x7f00_0020_0000), 0);
        // The same GiB: no new leaf. Another GiB: one more.
        *t.at_mut(0x7f00_0020_0000 >> SHIFT) = 3;
        assert_eq!(t.leaves.len(), 2);
        *t.at_mut(0x7f00_4000_0000 >> SHIFT) = 4;
        assert_eq!(t.leaves.len(), 3);
        assert_eq!(t.get(0), 0);
        assert!(t.heap_bytes() >= TOP_LEN * 4 + 3 * 2048);
    }
}
