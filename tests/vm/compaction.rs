//! Compaction as an attack on pinned pages, shared by e.compaction (a pin
//! in this process) and s.compaction (a region numapind serves).
//!
//! A node's compaction runs two scanners through each zone: the migrate
//! scanner upwards from the bottom, taking movable pages, and the free
//! scanner downwards from the top, taking free pages to move them to. They
//! meet where the movable pages below match the free pages above, and
//! nothing above that point is ever tried. A run only says something about
//! pinned pages if it demonstrably went past them: a [`Filler`] of unpinned
//! base pages supplies the pages to pin (or to leave to the daemon) at its
//! low end and, above them, free holes and a control that must move.

use numapin::NodeId;
use numapin::numa::NodeMemory;

use crate::ensure;
use crate::util::*;

/// Unpinned base pages on one node (THP off: compaction skips compound
/// pages), with their frames at the start and the zone holding most of
/// them.
pub struct Filler {
    mem: NodeMemory,
    /// The PFN of each page when the filler was made.
    pub before: Vec<u64>,
    pub zone: Zone,
}

/// One compaction of a node, as seen from a [`Filler`]'s control.
pub struct Run {
    /// Control pages (those [`Filler::punch_above`] kept).
    pub control: usize,
    /// The old PFN of each control page that moved.
    pub moved: Vec<u64>,
    /// `pgmigrate_success`, `pgmigrate_fail` and `compact_migrate_scanned`
    /// grew by these (counted over the whole machine).
    pub migrated: u64,
    pub failed: u64,
    pub scanned: u64,
}

impl Filler {
    /// `len` bytes of unpinned base pages on `node`.
    pub fn new(node: NodeId, len: u64) -> Result<Filler, String> {
        let mem = control_region(node, len)?;
        let before = pfns(mem.addr(), len)?;
        let zone = zones()?
            .into_iter()
            .max_by_key(|z| before.iter().filter(|&&f| z.contains(f)).count())
            .ok_or("no zones in /proc/zoneinfo")?;
        Ok(Filler { mem, before, zone })
    }

    /// Indices of the `n` pages with the lowest frames in the zone,
    /// lowest first.
    pub fn lowest(&self, n: usize) -> Vec<usize> {
        let mut low: Vec<usize> = (0..self.before.len())
            .filter(|&i| self.zone.contains(self.before[i]))
            .collect();
        low.sort_by_key(|&i| self.before[i]);
        low.truncate(n);
        low
    }

    /// The address of page `i`.
    pub fn page(&self, i: usize) -> *mut u8 {
        assert!(i < self.before.len(), "page {i} is outside the filler");
        // SAFETY: inside the filler mapping (checked above).
        unsafe { self.mem.as_ptr().add(i * 4096) }
    }

    /// Returns page `i`'s frame to the kernel; the page reads as a hole
    /// from then on.
    pub fn free(&self, i: usize) {
        // SAFETY: dropping a page of memory this filler owns and nobody
        // references.
        unsafe { libc::madvise(self.page(i).cast(), 4096, libc::MADV_DONTNEED) };
    }

    /// Prepares the zone above frame `top` (the highest pinned one) and
    /// returns the control there. That part of the filler is cut by PFN
    /// into runs of 32 frames; three runs in four are freed, the fourth
    /// kept as the control. Compaction's free scanner samples one frame in
    /// 32 of a pageblock once it finds little, and takes the buddy it hits:
    /// it finds these holes, where it would step over single free pages.
    /// The more of the filler is free, the further above `top` the
    /// scanners meet.
    pub fn punch_above(&self, top: u64) -> Result<Vec<usize>, String> {
        let above = |i: &usize| self.zone.contains(self.before[*i]) && self.before[*i] > top;
        let (holes, control): (Vec<usize>, Vec<usize>) = (0..self.before.len())
            .filter(above)
            .partition(|&i| self.before[i] % 128 < 96);
        let pcp = short_pcp_lists()?;
        for &i in &holes {
            self.free(i);
        }
        drop(pcp);
        ensure!(
            !control.is_empty() && !holes.is_empty(),
            "too few filler pages above PFN {top:#x} in zone {} of node {}: {} kept, {} freed",
            self.zone.name,
            self.zone.node,
            control.len(),
            holes.len()
        );
        Ok(control)
    }

    /// Compacts `node` (its sysfs `compact` knob) and finds which of
    /// `control` moved.
    pub fn compact(&self, node: NodeId, control: &[usize]) -> Result<Run, String> {
        let m0 = vmstat("pgmigrate_success");
        let f0 = vmstat("pgmigrate_fail");
        let s0 = vmstat("compact_migrate_scanned");
        let knob = format!("/sys/devices/system/node/node{}/compact", node.0);
        e(std::fs::write(&knob, "1"), &format!("write 1 to {knob}"))?;
        let migrated = vmstat("pgmigrate_success") - m0;
        let failed = vmstat("pgmigrate_fail") - f0;
        let scanned = vmstat("compact_migrate_scanned") - s0;
        let after = pfns_or_holes(self.mem.addr(), self.mem.len())?;
        let moved = control
            .iter()
            .filter(|&&i| after[i] != Some(self.before[i]))
            .map(|&i| self.before[i])
            .collect();
        Ok(Run {
            control: control.len(),
            moved,
            migrated,
            failed,
            scanned,
        })
    }
}

/// Keeps the per-CPU free lists short while it lives. Freed pages go to
/// those lists first (6.7+ grows them to tens of thousands of pages),
/// where compaction's free scanner cannot see them and from where the
/// freeing CPU's next allocations are served; with short lists, freed
/// pages soon reach the buddy allocator. (A large fraction gives a small
/// list.)
pub fn short_pcp_lists() -> Result<Knob, String> {
    Knob::set("/proc/sys/vm/percpu_pagelist_high_fraction", "100000")
}
