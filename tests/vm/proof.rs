//! The full proof reads each page's node from its PFN (sysfs memory
//! blocks) instead of asking move_pages(2) per page: these scenarios show it
//! still catches a page on the wrong node and a changed frame.

use numapin::{Error, NodeId, PinRequest, Pinner, Proof};

use crate::Scenario;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("p.proof.misplaced-by-pfn", misplaced_by_pfn),
        (
            "p.proof.pfn-changed-after-discard",
            pfn_changed_after_discard,
        ),
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
    let snap = r.pinned_pfns().map(<[u64]>::len);
    ensure!(snap == Some(LEN / 4096), "snapshot: {snap:?} frames");
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
