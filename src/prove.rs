//! The checks around a pin: the memlock limit before it, and after it the
//! accounting, the placement, the PFN snapshot and the minimum extent.
//!
//! Each check reads the kernel's own view: `/proc/self/status` for the
//! accounting, `/proc/self/pagemap` for the frames (every entry; for
//! hugetlb each page's head, whose frame the kernel's other entries of the
//! page are computed from: `phys::pfns_by_page`), and for
//! placement the node of each frame
//! from sysfs's memory-block map (`pfnnode`). Where the frames are hidden
//! (no CAP_SYS_ADMIN) or a frame is in no known block (or in one listed
//! under two nodes), placement comes
//! from `move_pages(2)` with a null node list (`do_pages_stat`), one query
//! per page.

use std::io;

use crate::addr::{NodeId, PageSize, VirtAddr};
use crate::backend::{Accounting, PinSource};
use crate::error::{Error, MisplacedCause, Result};
use crate::request::{Proof, validate_min_extent};
use crate::sys;

/// A range to pin, as the pin path passes it around.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    pub(crate) vaddr: VirtAddr,
    pub(crate) len: u64,
    pub(crate) node: Option<NodeId>,
    pub(crate) page_size: PageSize,
    pub(crate) min_extent: Option<u64>,
    pub(crate) proof: Proof,
}

/// Reads the counter the pin source grows, for the before/after check.
pub(crate) fn read_counter(acct: Accounting) -> Result<u64> {
    acct.read()
        .map_err(|e| Error::sys(format!("read {}", acct.counter()), "", e))
}

/// The checks after the pin: accounting (against `before`), placement,
/// PFN snapshot, minimum extent. Returns the snapshot, if taken.
///
/// `needs_pfns`: the device DMAs to physical addresses, so the frames are
/// required, not a bonus.
pub(crate) fn prove(
    r: &Range,
    source: PinSource,
    before: u64,
    read: &dyn Fn() -> Result<u64>,
    needs_pfns: bool,
) -> Result<Option<crate::phys::Frames>> {
    if r.proof != Proof::None && source.accounting_visible() {
        let after = read()?;
        let grew = after.saturating_sub(before);
        if grew < r.len {
            return Err(Error::NotAccounted {
                counter: source.accounting().counter(),
                by: source.call(),
                grew,
                len: r.len,
            });
        }
    }
    let needs_pfns = needs_pfns || r.min_extent.is_some();
    if r.proof != Proof::Full && !needs_pfns {
        return Ok(None);
    }
    // One pagemap read gives the snapshot and, through the memory-block
    // map, every page's node (for hugetlb, from each page's head frame). Without the frames
    // (no CAP_SYS_ADMIN) or the map, move_pages(2) tells the nodes.
    let pfns = crate::phys::pfns_by_page(r.vaddr.raw(), r.len, r.page_size.bytes());
    if let (Some(node), Proof::Full) = (r.node, r.proof) {
        match pfns
            .as_ref()
            .ok()
            .and_then(|p| off_node_by_pfn(p, r.page_size, node))
        {
            Some(o) => misplaced(
                r.vaddr,
                node,
                r.page_size,
                o.pages,
                o.off,
                o.first.map(|(i, n)| (i, n as i32)),
            )?,
            None => check_placement(r.vaddr, r.len, node, r.page_size)?,
        }
    }
    // A no-IOMMU device needs the physical addresses; elsewhere they are
    // a bonus (hidden without CAP_SYS_ADMIN).
    let pfns = match pfns {
        Ok(p) => Some(p),
        Err(e) if needs_pfns => return Err(e.into()),
        Err(_) => None,
    };
    if let (Some(min), Some(p)) = (r.min_extent, &pfns) {
        check_extents(p, min)?;
    }
    Ok(pfns)
}

/// Checks that every page of the range is on `node`.
pub(crate) fn check_placement(
    vaddr: VirtAddr,
    len: u64,
    node: NodeId,
    page_size: PageSize,
) -> Result<()> {
    let status = crate::numa::nodes_of(vaddr.as_usize(), len as usize, page_size.bytes())
        .map_err(|e| Error::sys("move_pages (query nodes)", "", e))?;
    placement_verdict(vaddr, node, page_size, &status)
}

/// The pages (of `page_size`) of a range off `node`, from the PFN of every
/// base page, by the memory-block map: one frame per page (a hugetlb page
/// is one frame, so its first base page speaks for it; base pages, THP and
/// its 4K fallbacks alike are looked at one by one). `None` if a frame is
/// in no known memory block even after re-reading sysfs, or the frames are
/// hidden.
pub(crate) fn off_node_by_pfn(
    pfns: &crate::phys::Frames,
    page_size: PageSize,
    node: NodeId,
) -> Option<crate::pfnnode::OffNode> {
    let base = crate::addr::base_page_size();
    let per = (page_size.bytes() / base).max(1);
    // Hidden frames (all 0) never get here: reading them fails.
    if pfns.is_empty() {
        return None;
    }
    crate::pfnnode::off_node(pfns.strided(per), base, node.0)
}

/// Fails with [`Error::Misplaced`] unless every page's `status` (its node,
/// or a negative errno) is `node`.
fn placement_verdict(
    vaddr: VirtAddr,
    node: NodeId,
    page_size: PageSize,
    status: &[i32],
) -> Result<()> {
    let mut off = status
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s != node.0 as i32);
    let first = off.next().map(|(i, &s)| (i, s));
    let count = first.map_or(0, |_| 1 + off.count() as u64);
    misplaced(vaddr, node, page_size, status.len() as u64, count, first)
}

/// [`Error::Misplaced`] if `off` of the `pages` pages are off `node`; the
/// first of them is page `first.0`, on node (or negative errno) `first.1`.
fn misplaced(
    vaddr: VirtAddr,
    node: NodeId,
    page_size: PageSize,
    pages: u64,
    off: u64,
    first: Option<(usize, i32)>,
) -> Result<()> {
    let Some((i, s)) = first else {
        return Ok(());
    };
    let first_offset = i as u64 * page_size.bytes();
    Err(Error::Misplaced {
        node,
        pages,
        off_node: off,
        first_offset,
        first_node: if s >= 0 {
            format!("node {s}")
        } else {
            io::Error::from_raw_os_error(-s).to_string()
        },
        cause: misplaced_cause(vaddr.as_usize() + first_offset as usize, node),
    })
}

/// Why the page at `addr` is off `node`, from evidence: the policy at the
/// page, then the node's zones.
fn misplaced_cause(addr: usize, node: NodeId) -> MisplacedCause {
    match sys::policy_of(addr) {
        Ok(p) if !p.binds_to(node) => {
            return MisplacedCause::NotBound {
                policy: p.to_string(),
            };
        }
        Ok(_) => {}
        Err(e) => {
            return MisplacedCause::PolicyUnreadable {
                error: e.to_string(),
            };
        }
    }
    let zones = crate::numa::movable_memory(node);
    if zones.is_empty() {
        MisplacedCause::Unknown
    } else {
        MisplacedCause::MovableMemory { zones }
    }
}

/// Fails unless every physically contiguous run of `pfns` (the last one
/// included) is at least `min` bytes long (or, for a region shorter than
/// `min`, unless it is one run).
pub(crate) fn check_extents(pfns: &crate::phys::Frames, min: u64) -> Result<()> {
    validate_min_extent(min)?;
    let base = crate::addr::base_page_size();
    let extents = pfns.extents(base);
    let total = pfns.len() * base;
    let smallest = extents.iter().map(|e| e.len).min().unwrap_or(0);
    if smallest < min.min(total) {
        return Err(Error::ExtentTooSmall {
            min,
            smallest,
            count: extents.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_against_a_minimum() {
        let page = crate::addr::base_page_size();
        // One run of four pages, then a gap, then two.
        let pfns = crate::phys::Frames::from(vec![10, 11, 12, 13, 20, 21]);
        assert!(check_extents(&pfns, 2 * page).is_ok());
        match check_extents(&pfns, 4 * page) {
            Err(Error::ExtentTooSmall {
                min,
                smallest,
                count,
            }) => {
                assert_eq!((min, smallest, count), (4 * page, 2 * page, 2));
            }
            other => panic!("{other:?}"),
        }
        // A region shorter than the minimum passes only as one run.
        assert!(check_extents(&crate::phys::Frames::from(vec![5, 6]), 64 * page).is_ok());
        assert!(check_extents(&crate::phys::Frames::from(vec![5, 7]), 64 * page).is_err());
        // Descending frames are not contiguous.
        assert!(check_extents(&crate::phys::Frames::from(vec![9, 8]), 2 * page).is_err());
    }
}
