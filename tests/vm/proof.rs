//! The full proof reads each page's node from its PFN (sysfs memory
//! blocks) instead of asking move_pages(2) per page: these scenarios show it
//! still catches a page on the wrong node and a changed frame.

use numapin::numa::{self, NodeMemory, Topology};
use numapin::{Error, NodeId, PageSize, PinRequest, Pinner, Proof};

use crate::Scenario;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("p.proof.block-map-agrees", block_map_agrees),
        ("p.proof.misplaced-by-pfn", misplaced_by_pfn),
        ("p.proof.misplaced-hugetlb", misplaced_hugetlb),
        (
            "p.proof.pfn-changed-after-discard",
            pfn_changed_after_discard,
        ),
        ("p.proof.thp-heads", thp_heads),
    ]
}

const LEN: usize = 4 << 20;

/// Private anonymous memory bound to `node`, touched page by page (no THP).
struct Anon {
    ptr: *mut u8,
}

impl Anon {
    fn on(node: NodeId) -> Result<Anon, String> {
        // SAFETY: a fresh private anonymous mapping, unmapped in drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure!(
            ptr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let a = Anon { ptr: ptr.cast() };
        // SAFETY: advice on memory this test owns.
        unsafe { libc::madvise(ptr, LEN, libc::MADV_NOHUGEPAGE) };
        e(numapin::sys::mbind(a.addr(), LEN, node, 0), "mbind")?;
        a.touch(0, LEN);
        Ok(a)
    }
    fn addr(&self) -> usize {
        self.ptr as usize
    }
    fn touch(&self, from: usize, len: usize) {
        for off in (from..from + len).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(off), 1) };
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `on`.
        unsafe { libc::munmap(self.ptr.cast(), LEN) };
    }
}

fn request(node: NodeId) -> PinRequest<'static> {
    PinRequest {
        proof: Proof::Full,
        ..PinRequest::new(node, LEN as u64)
    }
}

/// Memory bound to the away node, pinned as if it had to be on the home
/// node: the proof names every page off-node. The control: the same memory
/// pinned for the away node passes, with its snapshot taken (root sees the
/// frames, so the proof took the PFN path).
fn misplaced_by_pfn(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let m = Anon::on(ctx.away)?;
    let before = ctx.pinned();
    // SAFETY: `m` outlives any region made here.
    let err = match unsafe { p.pin_user(m.ptr, &request(ctx.home)) } {
        Ok(r) => {
            drop(r);
            return Err("pinned memory of the away node as on the home node".into());
        }
        Err(e) => e,
    };
    ensure!(ctx.pinned() == before, "the refused pin stayed accounted");
    let Error::Misplaced {
        pages, off_node, ..
    } = err
    else {
        return Err(format!("wanted Misplaced, got: {err}"));
    };
    let want = (LEN / 4096) as u64;
    ensure!(
        pages == want && off_node == want,
        "Misplaced counted {off_node} of {pages} pages off node, wanted {want} of {want}"
    );
    // SAFETY: as above.
    let r = e(
        unsafe { p.pin_user(m.ptr, &request(ctx.away)) },
        "pin_user away",
    )?;
    let snap = r.pinned_frames().map(numapin::phys::Frames::len);
    ensure!(snap == Some(LEN as u64 / 4096), "snapshot: {snap:?} frames");
    let v = e(r.verify(), "verify")?;
    ensure!(v.is_intact(), "verify of the control: {v:?}");
    e(r.release(), "release")?;
    Ok(format!(
        "{off_node}/{pages} pages off node caught; control on node {} intact",
        ctx.away
    ))
}

/// A pinned private page discarded with MADV_DONTNEED and touched again:
/// the page table now points at a new frame while the IOMMU keeps the old
/// one; verify must report it.
fn pfn_changed_after_discard(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let m = Anon::on(ctx.home)?;
    // SAFETY: `m` outlives the region.
    let r = e(unsafe { p.pin_user(m.ptr, &request(ctx.home)) }, "pin_user")?;
    let v = e(r.verify(), "verify before")?;
    ensure!(v.is_intact() && v.pfn_changed == Some(0), "before: {v:?}");
    let old = pfns(m.addr(), 4096)?;
    // SAFETY: discards the first two pages of memory this test owns.
    let rc = unsafe { libc::madvise(m.ptr.cast(), 2 * 4096, libc::MADV_DONTNEED) };
    ensure!(rc == 0, "madvise: {}", std::io::Error::last_os_error());
    m.touch(0, 2 * 4096);
    let new = pfns(m.addr(), 4096)?;
    ensure!(
        old != new,
        "the discarded page kept its frame {old:?}: no control"
    );
    let v = e(r.verify(), "verify after")?;
    ensure!(
        v.pfn_changed == Some(2) && !v.is_intact(),
        "verify after the discard: {v:?}, wanted 2 changed frames"
    );
    e(r.release(), "release")?;
    Ok(format!("verify: {v:?}"))
}

/// The memory-block map answers what move_pages(2) answers, page by page,
/// for memory on both nodes (so the proof's PFN path, not its fallback, is
/// what runs here: the map exists and covers the frames).
fn block_map_agrees(ctx: &Ctx) -> Result<String, String> {
    let mut out = vec![];
    for node in [ctx.home, ctx.away] {
        let m = Anon::on(node)?;
        let frames = pfns(m.addr(), LEN as u64)?;
        let by_pfn = numapin::pfnnode::nodes_of_pfns(&frames, 4096)
            .ok_or("sysfs gave no memory-block map covering the frames")?;
        let by_query = e(numa::nodes_of(m.addr(), LEN, 4096), "move_pages")?;
        ensure!(
            by_pfn == by_query,
            "node {node}: the block map and move_pages disagree on {} of {} pages",
            by_pfn.iter().zip(&by_query).filter(|(a, b)| a != b).count(),
            by_pfn.len()
        );
        ensure!(
            on_node(&by_query, node) == by_query.len(),
            "node {node}: only {} of {} pages there",
            on_node(&by_query, node),
            by_query.len()
        );
        out.push(format!("node {node}: {} pages agree", by_pfn.len()));
    }
    Ok(out.join("; "))
}

/// 2 MiB hugetlb pages on the away node, pinned as if on the home node:
/// the proof reads one pagemap entry per huge page and still names each.
fn misplaced_hugetlb(ctx: &Ctx) -> Result<String, String> {
    const HLEN: u64 = 8 << 20;
    let p = e(Pinner::open(&ctx.device), "open")?;
    let topo = e(Topology::read(), "topology")?;
    let mem = e(
        NodeMemory::allocate(&topo, ctx.away, HLEN, PageSize::Huge2M, 1, None, None),
        "allocate 2 MiB pages on the away node",
    )?;
    let req = |node| PinRequest {
        proof: Proof::Full,
        page_size: PageSize::Huge2M,
        ..PinRequest::new(node, HLEN)
    };
    // SAFETY: `mem` outlives any region made here.
    let (pages, off_node) =
        unsafe { expect_misplaced(&p, mem.as_ptr(), &req(ctx.home), "huge pages") }?;
    ensure!(
        pages == 4 && off_node == 4,
        "Misplaced counted {off_node} of {pages} huge pages off node, wanted 4 of 4"
    );
    // SAFETY: as above.
    let r = e(
        unsafe { p.pin_user(mem.as_ptr(), &req(ctx.away)) },
        "pin_user away",
    )?;
    // The snapshot covers every base page, and matches pagemap's own view;
    // it holds at most a run per huge page, not a number per base page.
    let frames = r.pinned_frames().ok_or("no snapshot")?;
    let (held, flat) = (frames.heap_bytes(), HLEN as usize / 4096 * 8);
    let snap = frames.to_vec();
    let full = pfns(mem.addr(), HLEN)?;
    ensure!(
        snap == full,
        "snapshot from one entry per huge page differs from pagemap on {} of {} base pages",
        changed(&snap, &full),
        full.len()
    );
    ensure!(
        held <= 4 * 24,
        "the snapshot of 4 huge pages holds {held} bytes ({flat} as one number per base page)"
    );
    let v = e(r.verify(), "verify")?;
    ensure!(v.is_intact() && v.pages == 4, "verify: {v:?}");
    e(r.release(), "release")?;
    Ok(format!(
        "{off_node}/{pages} huge pages off node caught; snapshot of {} base pages exact, {held} bytes held (not {flat})",
        snap.len()
    ))
}

/// 8 MiB of private anonymous memory bound to `node`, 2 MiB-aligned, with
/// MADV_HUGEPAGE, touched: transparent huge pages where the kernel gives
/// them.
struct Thp {
    raw: *mut libc::c_void,
    ptr: *mut u8,
}

const THP_LEN: usize = 8 << 20;
const PMD: usize = 2 << 20;

impl Thp {
    fn on(node: NodeId) -> Result<Thp, String> {
        // SAFETY: a fresh private anonymous mapping, unmapped in drop.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                THP_LEN + PMD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure!(
            raw != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let t = Thp {
            raw,
            ptr: (raw as usize).next_multiple_of(PMD) as *mut u8,
        };
        // SAFETY: advice on memory this test owns.
        unsafe { libc::madvise(t.ptr.cast(), THP_LEN, libc::MADV_HUGEPAGE) };
        e(
            numapin::sys::mbind(t.ptr as usize, THP_LEN, node, 0),
            "mbind",
        )?;
        for off in (0..THP_LEN).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(t.ptr.add(off), 1) };
        }
        Ok(t)
    }

    /// Every frame, one pagemap entry per base page (the reference).
    fn every_entry(&self) -> Result<Vec<u64>, String> {
        let entries = e(
            numapin::phys::read_pagemap(self.ptr as u64, THP_LEN / 4096),
            "pagemap",
        )?;
        entries
            .iter()
            .map(|x| x.pfn().ok_or_else(|| "a page is not present".to_string()))
            .collect()
    }
}

impl Drop for Thp {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `on`.
        unsafe { libc::munmap(self.raw, THP_LEN + PMD) };
    }
}

/// The 2 MiB pages of `frames` that are one huge frame (aligned, in a run).
fn huge_chunks(frames: &[u64]) -> Vec<usize> {
    frames
        .chunks(PMD / 4096)
        .enumerate()
        .filter(|(_, c)| c[0] % 512 == 0 && c.iter().zip(c[0]..).all(|(&p, w)| p == w))
        .map(|(i, _)| i)
        .collect()
}

/// THP memory: the full proof's snapshot (which, where the kernel has
/// PAGEMAP_SCAN, 6.7+, reads one entry per PMD-mapped huge page) equals
/// one entry read per base page; a huge page split by discarding one of
/// its base pages and touching it again is read page by page, so verify
/// names exactly that one changed frame; THP memory on the away node
/// pinned as on the home node is caught as Misplaced, every page.
fn thp_heads(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let m = Thp::on(ctx.home)?;
    let all = m.every_entry()?;
    let huge = huge_chunks(&all);
    ensure!(
        huge.len() >= 2,
        "only {} of {} 2 MiB pages are huge: no THP to test",
        huge.len(),
        THP_LEN / PMD
    );
    let req = PinRequest {
        proof: Proof::Full,
        ..PinRequest::new(ctx.home, THP_LEN as u64)
    };
    // SAFETY: `m` outlives the region.
    let r = e(unsafe { p.pin_user(m.ptr, &req) }, "pin_user")?;
    let snap = r
        .pinned_frames()
        .ok_or("no snapshot (root sees the frames)")?
        .to_vec();
    ensure!(
        snap == all,
        "the proof's snapshot differs from every entry read at {} of {} pages",
        snap.iter().zip(&all).filter(|(a, b)| a != b).count(),
        all.len()
    );
    // Split the second huge page: discard one base page inside it and
    // touch it again (a new frame; the IOMMU keeps the old one).
    let split = huge[1];
    let at = split * PMD + 5 * 4096;
    // SAFETY: discards one page of memory this test owns, then touches it.
    let rc = unsafe { libc::madvise(m.ptr.add(at).cast(), 4096, libc::MADV_DONTNEED) };
    ensure!(rc == 0, "madvise: {}", std::io::Error::last_os_error());
    // SAFETY: inside the mapping.
    unsafe { std::ptr::write_volatile(m.ptr.add(at), 2) };
    let now = m.every_entry()?;
    let changed: Vec<usize> = (0..all.len()).filter(|&i| all[i] != now[i]).collect();
    ensure!(
        changed == [at / 4096],
        "the control: discarding page {} changed frames {changed:?}",
        at / 4096
    );
    let v = e(r.verify(), "verify after the split")?;
    ensure!(
        v.pfn_changed == Some(1) && !v.is_intact(),
        "verify after splitting a huge page and replacing one of its frames: {v:?}, wanted 1 changed frame"
    );
    e(r.release(), "release")?;
    drop(m);

    let away = Thp::on(ctx.away)?;
    let away_huge = huge_chunks(&away.every_entry()?).len();
    // SAFETY: `away` outlives any region made here.
    let (pages, off_node) = unsafe { expect_misplaced(&p, away.ptr, &req, "THP memory") }?;
    let want = (THP_LEN / 4096) as u64;
    ensure!(
        pages == want && off_node == want,
        "Misplaced counted {off_node} of {pages} pages off node, wanted {want} of {want}"
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(format!(
        "kernel {}: {} of 4 huge pages, snapshot = every entry; one frame of a split huge page changed, verify: {v:?}; away ({away_huge} huge): {off_node}/{pages} off node",
        kernel.trim(),
        huge.len()
    ))
}

/// Pins memory of the away node as if on `req`'s node: the pin must fail
/// with Misplaced; its (pages, off-node pages).
///
/// # Safety
/// As [`Pinner::pin_user`] for `ptr` and `req.size`.
unsafe fn expect_misplaced(
    p: &Pinner,
    ptr: *mut u8,
    req: &PinRequest<'_>,
    what: &str,
) -> Result<(u64, u64), String> {
    // SAFETY: the caller's contract.
    match unsafe { p.pin_user(ptr, req) } {
        Ok(r) => {
            drop(r);
            Err(format!(
                "pinned {what} of the away node as on the home node"
            ))
        }
        Err(Error::Misplaced {
            pages, off_node, ..
        }) => Ok((pages, off_node)),
        Err(err) => Err(format!("wanted Misplaced, got: {err}")),
    }
}
