//! Which parts of a range are mapped huge, from `PAGEMAP_SCAN` (Linux 6.7,
//! commit 52526ca7fdb9): an ioctl on `/proc/self/pagemap` that answers
//! with ranges of pages sharing categories instead of one entry per page.
//! `PAGE_IS_HUGE` marks a PMD-mapped transparent huge page
//! (`pagemap_thp_category`) and a hugetlb page (`pagemap_hugetlb_category`,
//! `fs/proc/task_mmu.c`); a THP mapped by PTEs is not huge there.
//!
//! Written by hand because neither libc nor rustix wraps this ioctl: the
//! argument and result structs are linux-raw-sys's (generated from the
//! uapi headers), the opcode is rustix's `_IOWR` arithmetic, the call is
//! one `ioctl(2)`.

use std::fs::File;
use std::os::fd::AsRawFd;

use linux_raw_sys::general::{PAGE_IS_HUGE, PAGE_IS_PRESENT, page_region, pm_scan_arg};

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`
/// (`include/uapi/linux/fs.h`).
const PAGEMAP_SCAN: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<pm_scan_arg>(b'f', 16);

/// Ranges asked for per call; a region of huge pages mapped next to each
/// other comes back as one range, so one call is the usual case.
const RANGES_PER_CALL: usize = 64;

/// The present, huge-mapped ranges `[start, end)` within `[start, end)`, in
/// address order, merged where they touch. `None` where the kernel has no
/// `PAGEMAP_SCAN` (before 6.7: `ENOTTY`) or refuses it: the caller then
/// reads every entry, as it would anyway.
pub(super) fn huge_ranges(file: &File, start: u64, end: u64) -> Option<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut from = start;
    while from < end {
        let mut vec = [page_region {
            start: 0,
            end: 0,
            categories: 0,
        }; RANGES_PER_CALL];
        let mut arg = pm_scan_arg {
            size: std::mem::size_of::<pm_scan_arg>() as u64,
            flags: 0,
            start: from,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: RANGES_PER_CALL as u64,
            max_pages: 0,
            category_inverted: 0,
            // Required: present and huge.
            category_mask: u64::from(PAGE_IS_HUGE | PAGE_IS_PRESENT),
            category_anyof_mask: 0,
            return_mask: u64::from(PAGE_IS_HUGE),
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions to `vec`, both ours and alive for the call; it returns
        // the number written, or -1 with errno.
        let n = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                PAGEMAP_SCAN as _,
                &mut arg as *mut pm_scan_arg,
            )
        };
        if n < 0 {
            return None;
        }
        for r in &vec[..(n as usize).min(RANGES_PER_CALL)] {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        // The walk stops early only when the vector is full.
        if arg.walk_end <= from || arg.walk_end > end {
            return None;
        }
        from = arg.walk_end;
    }
    Some(out)
}
