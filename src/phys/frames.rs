//! [`Frames`]: the frame (PFN) of every base page of a virtual range, kept
//! as runs of consecutive frames instead of one number per page.
//!
//! A pin's PFN snapshot lives as long as its region. One `u64` per 4 KiB
//! is 0.2 % of the memory (128 MiB for a 64 GiB guest's RAM), most of it
//! saying what a huge page's head already says: a 2 MiB page is 512
//! consecutive frames, a 1 GiB page 262,144. Runs keep such memory in a
//! few entries, and reading the snapshot of huge pages no longer has to
//! fill (and fault in) a page-sized array per 2 MiB. Memory whose frames
//! are scattered (base pages the allocator handed out one by one) stays a
//! plain array, whichever of the two is smaller, so no snapshot is bigger
//! than the array was.

use super::{PhysExtent, merge_extents};
use crate::addr::PhysAddr;

/// Consecutive frames of consecutive base pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// Index of the first base page in the range.
    page: u64,
    /// Its frame.
    pfn: u64,
    /// Base pages (and frames) in the run.
    pages: u64,
}

impl Run {
    /// The physical extent of the run, frames of `page_size` bytes
    /// (addresses beyond 64 bits saturate).
    fn extent(&self, page_size: u64) -> PhysExtent {
        PhysExtent {
            pa: PhysAddr(self.pfn.saturating_mul(page_size)),
            len: self.pages.saturating_mul(page_size),
        }
    }
}

/// What a run costs against one `u64` per page.
const RUN_WORDS: u64 = 3;

/// Whether `runs` runs take more room than `pages` frames one by one.
fn array_is_smaller(runs: u64, pages: u64) -> bool {
    runs * RUN_WORDS > pages
}

#[derive(Debug, Clone)]
enum Repr {
    /// Runs in page order, maximally merged.
    Runs(Vec<Run>),
    /// One frame per base page.
    Pages(Vec<u64>),
}

/// The frame of every base page of a range, in virtual order: what
/// `/proc/self/pagemap` reported (PFNs in base pages, also for hugetlb
/// memory). Equal snapshots compare equal whatever their storage.
#[derive(Debug, Clone)]
pub struct Frames {
    pages: u64,
    repr: Repr,
}

impl Default for Frames {
    fn default() -> Self {
        Frames {
            pages: 0,
            repr: Repr::Runs(Vec::new()),
        }
    }
}

impl PartialEq for Frames {
    fn eq(&self, other: &Self) -> bool {
        if self.pages != other.pages {
            return false;
        }
        match (&self.repr, &other.repr) {
            // Both canonical: the same frames give the same runs.
            (Repr::Runs(a), Repr::Runs(b)) => a == b,
            (Repr::Pages(a), Repr::Pages(b)) => a == b,
            _ => self.iter().eq(other.iter()),
        }
    }
}

impl Eq for Frames {}

impl From<Vec<u64>> for Frames {
    /// The frames of consecutive base pages, one per page.
    fn from(pages: Vec<u64>) -> Self {
        // Stop building runs once the array is smaller, before they grow
        // past it.
        let mut b = FramesBuilder::default();
        for &p in &pages {
            if b.push(p, 1) && array_is_smaller(b.runs.len() as u64, pages.len() as u64) {
                return Frames {
                    pages: pages.len() as u64,
                    repr: Repr::Pages(pages),
                };
            }
        }
        b.finish()
    }
}

impl Frames {
    /// Base pages covered.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the range has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The frame of base page `page` (0 is the range's first), if inside.
    pub fn get(&self, page: u64) -> Option<u64> {
        match &self.repr {
            Repr::Pages(v) => usize::try_from(page).ok().and_then(|i| v.get(i).copied()),
            Repr::Runs(runs) => {
                let i = runs.partition_point(|r| r.page <= page).checked_sub(1)?;
                let r = runs[i];
                (page < r.page + r.pages).then(|| r.pfn + (page - r.page))
            }
        }
    }

    /// Every base page's frame, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (runs, pages): (&[Run], &[u64]) = match &self.repr {
            Repr::Runs(r) => (r, &[]),
            Repr::Pages(v) => (&[], v),
        };
        runs.iter()
            .flat_map(|r| r.pfn..r.pfn + r.pages)
            .chain(pages.iter().copied())
    }

    /// Every base page's frame, as one array.
    pub fn to_vec(&self) -> Vec<u64> {
        match &self.repr {
            Repr::Pages(v) => v.clone(),
            Repr::Runs(_) => self.iter().collect(),
        }
    }

    /// The frames of pages `0, stride, 2·stride, ..` (for pages of
    /// `stride` base pages: each one's first frame), without copying them
    /// out.
    pub fn strided(&self, stride: u64) -> Strided<'_> {
        Strided {
            frames: self,
            at: 0,
            run: 0,
            stride: stride.max(1),
        }
    }

    /// The physically contiguous extents, in virtual order, of frames of
    /// `page_size` bytes (the base page size): as
    /// [`merge_extents`] of every frame.
    pub fn extents(&self, page_size: u64) -> Vec<PhysExtent> {
        match &self.repr {
            Repr::Pages(v) => merge_extents(v.iter().copied(), page_size),
            // Runs are maximally merged: one extent each.
            Repr::Runs(runs) => runs.iter().map(|r| r.extent(page_size)).collect(),
        }
    }

    /// Pages whose frame differs between the two snapshots (a page one of
    /// them lacks counts as changed).
    pub fn changed(&self, other: &Frames) -> u64 {
        if self == other {
            return 0;
        }
        let common = self
            .iter()
            .zip(other.iter())
            .filter(|(a, b)| a != b)
            .count() as u64;
        common + self.pages.abs_diff(other.pages)
    }

    /// Bytes of heap the snapshot holds.
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Runs(r) => r.capacity() * std::mem::size_of::<Run>(),
            Repr::Pages(v) => v.capacity() * std::mem::size_of::<u64>(),
        }
    }
}

/// The iterator of [`Frames::strided`].
#[derive(Debug, Clone)]
pub struct Strided<'a> {
    frames: &'a Frames,
    /// The next page to give.
    at: u64,
    /// The run that holds it or one before (runs only).
    run: usize,
    stride: u64,
}

impl Iterator for Strided<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.at >= self.frames.pages {
            return None;
        }
        let pfn = match &self.frames.repr {
            Repr::Pages(v) => v[self.at as usize],
            Repr::Runs(runs) => {
                // `at` is below `pages`, so a run holds it.
                while runs[self.run].page + runs[self.run].pages <= self.at {
                    self.run += 1;
                }
                let r = runs[self.run];
                r.pfn + (self.at - r.page)
            }
        };
        self.at = self.at.saturating_add(self.stride);
        Some(pfn)
    }
}

/// Builds [`Frames`] page by page or run by run, in virtual order.
#[derive(Debug, Default)]
pub(crate) struct FramesBuilder {
    pages: u64,
    runs: Vec<Run>,
}

impl FramesBuilder {
    /// Appends `pages` pages whose frames are `pfn, pfn + 1, ..`; true if
    /// that began a new run.
    pub(crate) fn push(&mut self, pfn: u64, pages: u64) -> bool {
        if pages == 0 {
            return false;
        }
        let at = self.pages;
        self.pages += pages;
        if let Some(last) = self.runs.last_mut()
            && last.pfn.checked_add(last.pages) == Some(pfn)
        {
            last.pages += pages;
            return false;
        }
        self.runs.push(Run {
            page: at,
            pfn,
            pages,
        });
        true
    }

    /// The runs so far as physical extents of frames of `page_size` bytes.
    pub(crate) fn into_extents(self, page_size: u64) -> Vec<PhysExtent> {
        self.runs.iter().map(|r| r.extent(page_size)).collect()
    }

    /// The snapshot: runs, or one frame per page where that is smaller.
    pub(crate) fn finish(mut self) -> Frames {
        if array_is_smaller(self.runs.len() as u64, self.pages) {
            let mut pages = Vec::with_capacity(self.pages as usize);
            for r in &self.runs {
                pages.extend(r.pfn..r.pfn + r.pages);
            }
            return Frames {
                pages: self.pages,
                repr: Repr::Pages(pages),
            };
        }
        self.runs.shrink_to_fit();
        Frames {
            pages: self.pages,
            repr: Repr::Runs(self.runs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn huge(heads: &[u64]) -> Frames {
        let mut b = FramesBuilder::default();
        for &h in heads {
            b.push(h, 512);
        }
        b.finish()
    }

    #[test]
    fn huge_pages_take_a_run_each_at_most() {
        // Two neighbouring 2 MiB pages merge; the third is elsewhere.
        let f = huge(&[1024, 1536, 8192]);
        assert_eq!(f.len(), 1536);
        assert_eq!(f.heap_bytes(), 2 * std::mem::size_of::<Run>());
        assert_eq!(f.get(0), Some(1024));
        assert_eq!(f.get(600), Some(1624));
        assert_eq!(f.get(1024), Some(8192));
        assert_eq!(f.get(1535), Some(8192 + 511));
        assert_eq!(f.get(1536), None);
        assert_eq!(f.strided(512).collect::<Vec<_>>(), [1024, 1536, 8192]);
        assert_eq!(f.extents(4096).len(), 2);
        assert_eq!(f.to_vec().len(), 1536);
    }

    #[test]
    fn scattered_frames_stay_an_array() {
        let v: Vec<u64> = (0..100).map(|i| 1000 - i).collect();
        let f = Frames::from(v.clone());
        assert!(matches!(f.repr, Repr::Pages(_)));
        assert_eq!(f.heap_bytes(), 100 * 8);
        assert_eq!(f.strided(7).count(), 15);
        assert_eq!(f.to_vec(), v);
    }

    #[test]
    fn changed_counts_pages() {
        let a = huge(&[1024, 4096]);
        let mut b = FramesBuilder::default();
        b.push(1024, 512);
        b.push(4096, 100);
        b.push(7, 1);
        b.push(4197, 411);
        let b = b.finish();
        assert_eq!(a.changed(&a.clone()), 0);
        assert_eq!(a.changed(&b), 1);
        assert_eq!(a.changed(&huge(&[1024])), 512);
    }

    proptest! {
        /// Whatever the storage, a snapshot gives back exactly the frames
        /// it was made of, page by page, run by run and as extents, and
        /// is never bigger than one `u64` per page.
        #[test]
        fn frames_round_trip(runs in prop::collection::vec((0..4096u64, 1..600u64), 0..12),
                             stride in 1..700u64) {
            let mut b = FramesBuilder::default();
            let mut flat = Vec::new();
            for &(pfn, n) in &runs {
                b.push(pfn * 512, n);
                flat.extend(pfn * 512..pfn * 512 + n);
            }
            let f = b.finish();
            let g = Frames::from(flat.clone());
            prop_assert_eq!(&f, &g);
            prop_assert_eq!(f.to_vec(), flat.clone());
            prop_assert_eq!(f.iter().collect::<Vec<_>>(), flat.clone());
            prop_assert_eq!(f.len(), flat.len() as u64);
            for (i, &p) in flat.iter().enumerate() {
                prop_assert_eq!(f.get(i as u64), Some(p));
            }
            let every: Vec<u64> = flat.iter().step_by(stride as usize).copied().collect();
            prop_assert_eq!(f.strided(stride).collect::<Vec<_>>(), every.clone());
            prop_assert_eq!(g.strided(stride).collect::<Vec<_>>(), every);
            prop_assert_eq!(f.extents(4096), merge_extents(flat.iter().copied(), 4096));
            prop_assert!(f.heap_bytes() <= (flat.len() * 8).max(std::mem::size_of::<Run>()));
        }

        #[test]
        fn scattered_round_trip(flat in prop::collection::vec(0..64u64, 0..200)) {
            let f = Frames::from(flat.clone());
            prop_assert_eq!(f.to_vec(), flat.clone());
            prop_assert_eq!(f.extents(4096), merge_extents(flat.iter().copied(), 4096));
            prop_assert_eq!(f.changed(&Frames::from(flat.clone())), 0);
        }
    }
}
