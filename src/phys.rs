//! Physical addresses from `/proc/self/pagemap`.
//!
//! `pagemap` holds one little-endian `u64` per virtual page of the process
//! (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`):
//!
//! | bits  | meaning                                              |
//! |-------|------------------------------------------------------|
//! | 63    | page present in RAM                                  |
//! | 62    | page swapped out                                     |
//! | 61    | file page or shared anonymous page                   |
//! | 56    | page exclusively mapped (4.3+)                       |
//! | 55    | PTE soft-dirty                                       |
//! | 0–54  | page frame number (PFN), when present and not swapped |
//!
//! Since Linux 4.3 (commit 1c90308e7a77; 4.0–4.2 refuse the open without
//! CAP_SYS_ADMIN) the PFN reads as 0 unless the *opener* of the file has
//! CAP_SYS_ADMIN (the check is made at `open`), so a privileged helper may
//! open it and pass the file on: hence the `*_from(&File, ..)` variants.
//!
//! This module decodes entries ([`PagemapEntry`]), turns PFNs into
//! contiguous physical runs ([`merge_extents`]) and reads the file
//! ([`read_pagemap`], [`phys_extents`]). pagemap shows the *current* page
//! table: it proves where pinned pages are only while the mapping that
//! pinned them is still in place.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::addr::{PhysAddr, base_page_size, is_aligned};

mod frames;
mod scan;

use frames::FramesBuilder;
pub use frames::{Frames, Strided};

/// The pagemap of the calling process.
pub const PAGEMAP_PATH: &str = "/proc/self/pagemap";

/// Bytes per pagemap entry.
const ENTRY_LEN: usize = 8;

/// Why physical addresses could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PhysError {
    /// Every PFN reads as 0: the kernel hides them from this process.
    #[error(
        "/proc/self/pagemap reports PFN 0 for all {pages} pages at {vaddr:#x}: physical addresses \
         are hidden from this process; run as root or grant CAP_SYS_ADMIN; without it \
         /proc/self/pagemap reports PFN 0 since Linux 4.3"
    )]
    PfnHidden {
        /// First virtual address of the range.
        vaddr: u64,
        /// Number of pages read.
        pages: usize,
    },
    /// A page with no physical frame (never touched, or swapped out).
    #[error(
        "the page at virtual address {vaddr:#x} is not in RAM (never touched, or swapped out), so \
         it has no physical address; touch the memory first and keep it pinned"
    )]
    NotPresent {
        /// The virtual address of the page.
        vaddr: u64,
    },
    /// A range that is not page-aligned, or wraps around.
    #[error(
        "virtual range {vaddr:#x} + {len:#x} is not aligned to the page size {page_size:#x} or wraps \
         around; pass the page-aligned address and length of a region"
    )]
    BadRange {
        /// The virtual address given.
        vaddr: u64,
        /// The length given.
        len: u64,
        /// The base page size.
        page_size: u64,
    },
    /// A page of a hugetlb range whose base pages are not one huge frame.
    #[error(
        "the {page_size:#x}-byte page at virtual address {vaddr:#x} is not one huge frame in \
         /proc/self/pagemap (its base pages are not the consecutive frames of an aligned head); \
         pass the page size the memory was mapped with"
    )]
    NotHuge {
        /// The virtual address of the page.
        vaddr: u64,
        /// The page size the range was said to have.
        page_size: u64,
    },
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open {path}; check that /proc is mounted and readable")]
    Open {
        /// The path.
        path: &'static str,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// Reading the pagemap failed.
    #[error("reading {pages} pagemap entries for virtual address {vaddr:#x} failed")]
    Read {
        /// First virtual address of the range.
        vaddr: u64,
        /// Number of pages asked for.
        pages: usize,
        /// The error from `pread`.
        #[source]
        source: io::Error,
    },
    /// The pagemap ended before all entries were read.
    #[error(
        "pagemap ended after {got} of {pages} entries for virtual address {vaddr:#x}; the range \
         runs past the end of the user address space: pass an address inside a mapping"
    )]
    ShortRead {
        /// First virtual address of the range.
        vaddr: u64,
        /// Number of pages asked for.
        pages: usize,
        /// Number of whole entries read.
        got: usize,
    },
}

/// One pagemap entry: the state of one virtual page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Bit 63: the page is present in RAM.
    pub const PRESENT: u64 = 1 << 63;
    /// Bit 62: the page is swapped out.
    pub const SWAPPED: u64 = 1 << 62;
    /// Bit 61: a file page or a shared anonymous page.
    pub const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    /// Bit 56: the page is mapped exclusively (by this process only).
    pub const EXCLUSIVE: u64 = 1 << 56;
    /// Bit 55: the PTE is soft-dirty.
    pub const SOFT_DIRTY: u64 = 1 << 55;
    /// Bits 0–54: the PFN (or swap type/offset when swapped).
    pub const PFN_MASK: u64 = (1 << 55) - 1;

    /// Whether the page is present in RAM.
    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    /// Whether the page is swapped out.
    pub fn swapped(self) -> bool {
        self.0 & Self::SWAPPED != 0
    }
    /// Whether the page is a file page or shared anonymous memory.
    pub fn file_or_shared_anon(self) -> bool {
        self.0 & Self::FILE_OR_SHARED_ANON != 0
    }
    /// Whether the page is mapped by this process only.
    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    /// Whether the PTE is soft-dirty.
    pub fn soft_dirty(self) -> bool {
        self.0 & Self::SOFT_DIRTY != 0
    }
    /// The raw bits 0–54, whatever they mean for this entry.
    pub fn raw_pfn(self) -> u64 {
        self.0 & Self::PFN_MASK
    }
    /// The PFN, in base pages (also for hugetlb pages), if the page is
    /// present and not swapped. A PFN of 0 usually means the kernel hid it
    /// (no CAP_SYS_ADMIN).
    pub fn pfn(self) -> Option<u64> {
        (self.present() && !self.swapped()).then_some(self.raw_pfn())
    }
}

/// A physically contiguous run of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysExtent {
    /// The first physical address.
    pub pa: PhysAddr,
    /// The length in bytes.
    pub len: u64,
}

/// Merges PFNs, in the order given, into physically contiguous extents.
///
/// A PFN joins the current extent only if it is exactly the next frame
/// (`pfn == last + 1`); anything else (a gap, a lower PFN, a repeat) starts a
/// new extent. So the order of the input is kept, and expanding the extents
/// page by page gives back the input exactly. `page_size` is the size of one
/// PFN: the base page size (4096 on x86-64), even for hugetlb memory.
/// Addresses beyond 64 bits saturate (real PFNs are far below that: physical
/// addresses have at most 52 bits).
pub fn merge_extents(pfns: impl IntoIterator<Item = u64>, page_size: u64) -> Vec<PhysExtent> {
    let mut runs = FramesBuilder::default();
    for pfn in pfns {
        runs.push(pfn, 1);
    }
    runs.into_extents(page_size)
}

/// The PFNs of `entries`, which describe consecutive pages from `vaddr`.
///
/// # Errors
/// [`PhysError::NotPresent`] for the first page that is not present (or is
/// swapped); [`PhysError::PfnHidden`] if every PFN is 0, which is how the
/// kernel hides PFNs from a process without CAP_SYS_ADMIN.
pub fn decode_pfns(
    vaddr: u64,
    entries: &[PagemapEntry],
    page_size: u64,
) -> Result<Vec<u64>, PhysError> {
    let pfns = entries
        .iter()
        .zip(0u64..)
        .map(|(e, i)| {
            e.pfn().ok_or(PhysError::NotPresent {
                vaddr: vaddr.wrapping_add(i.wrapping_mul(page_size)),
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    if !pfns.is_empty() && pfns.iter().all(|&p| p == 0) {
        return Err(PhysError::PfnHidden {
            vaddr,
            pages: pfns.len(),
        });
    }
    Ok(pfns)
}

fn open_pagemap() -> Result<File, PhysError> {
    File::open(PAGEMAP_PATH).map_err(|source| PhysError::Open {
        path: PAGEMAP_PATH,
        source,
    })
}

/// Reads the pagemap entries of `pages` pages from the page containing
/// `vaddr`, from `/proc/self/pagemap`.
///
/// # Errors
/// [`PhysError::Open`], [`PhysError::Read`], [`PhysError::ShortRead`],
/// [`PhysError::BadRange`] if `pages` is too large to read.
pub fn read_pagemap(vaddr: u64, pages: usize) -> Result<Vec<PagemapEntry>, PhysError> {
    read_pagemap_from(&open_pagemap()?, vaddr, pages)
}

/// Like [`read_pagemap`], from an already-open pagemap file (for example one
/// that a process with CAP_SYS_ADMIN opened and passed on). The file must be
/// the pagemap of the process that owns `vaddr`.
///
/// # Errors
/// [`PhysError::Read`], [`PhysError::ShortRead`], [`PhysError::BadRange`]
/// if `pages` is too large to read.
pub fn read_pagemap_from(
    file: &File,
    vaddr: u64,
    pages: usize,
) -> Result<Vec<PagemapEntry>, PhysError> {
    let page_size = base_page_size();
    let Some(nbytes) = pages.checked_mul(ENTRY_LEN) else {
        return Err(PhysError::BadRange {
            vaddr,
            len: u64::MAX,
            page_size,
        });
    };
    let mut buf = vec![0u8; nbytes];
    read_raw(file, vaddr, pages, &mut buf)?;
    Ok(buf
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let mut b = [0u8; ENTRY_LEN];
            b.copy_from_slice(c);
            PagemapEntry(u64::from_le_bytes(b))
        })
        .collect())
}

/// Fills `buf` with the pagemap entries of `pages` pages from `vaddr`.
fn read_raw(file: &File, vaddr: u64, pages: usize, buf: &mut [u8]) -> Result<(), PhysError> {
    let offset = vaddr / base_page_size() * ENTRY_LEN as u64;
    let nbytes = buf.len();
    let mut filled = 0;
    while filled < nbytes {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => {
                return Err(PhysError::ShortRead {
                    vaddr,
                    pages,
                    got: filled / ENTRY_LEN,
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(PhysError::Read {
                    vaddr,
                    pages,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The PFN of every base page of `[vaddr, vaddr + len)`, in virtual order,
/// from `/proc/self/pagemap`, as [`Frames`] (runs of consecutive frames:
/// a huge page is one run, not 512 numbers).
///
/// Where the kernel has `PAGEMAP_SCAN` (6.7+) and the range is at least
/// [`SCAN_MIN`] long, the scan first names the ranges mapped huge (a
/// PMD-mapped transparent huge page, a hugetlb page): of those only each
/// 2 MiB head's entry is read, the other frames filled in as the kernel
/// computes them (`pagemap_pmd_range` and `pagemap_hugetlb_range` give
/// the head's frame plus the offset), and every other page's entry is
/// read as before. A THP region's 4 KiB fallbacks are read one by one. The
/// scan is repeated after the reads; if the huge ranges changed meanwhile
/// (a split, a collapse), or a head is not aligned as a huge page's, every
/// entry is read again. In the bench VM (7.3, TCG) reading every entry of
/// 2 GiB of THP took 31 ms of the proof's 36 ms over the raw pin; with the
/// heads, the read per page against a base-page region's in the same run
/// fell from 0.43 to 0.16 (hugetlb: 0.36 to 0.11). What is left is
/// `pagemap_read`'s own work per call (it takes the mmap lock, walks,
/// allocates and frees a 4 KiB buffer), not the system call: in a 6.1 TCG
/// guest a 1-entry read of pagemap took about 12 µs and a 512-entry one
/// 24 µs, against about 1 µs for an 8-byte read of `/dev/zero` (busybox
/// `dd`, 20,000 reads each, three rounds); for a 120 MiB hugetlb region
/// the 60 head reads took 1.2–1.7 ms in the quieter of five rounds (another
/// VM shared the host), and allocating and filling a per-base-page
/// snapshot (8 bytes per 4 KiB, faulted in fresh, as this function
/// returned before [`Frames`]) another 0.8–1.0 ms. So the proof is still
/// well above the pin on this VM. Spreading
/// the reads over the caller's CPUs does not help there: in one run (6.1,
/// 2 vCPUs, hugetlb) two reader threads took 3.08 ms for 64 MiB and
/// 50.8 ms for 2 GiB, one thread 1.70 and 47.9 ms, so the reads stay on
/// the calling thread.
///
/// # Errors
/// As [`decode_pfns`], and the I/O errors of [`read_pagemap`].
pub fn pfns(vaddr: u64, len: u64) -> Result<Frames, PhysError> {
    let page = base_page_size();
    let pages = (len / page) as usize;
    if pages.checked_mul(ENTRY_LEN).is_none() || vaddr.checked_add(len).is_none() {
        return Err(PhysError::BadRange {
            vaddr,
            len,
            page_size: page,
        });
    }
    let file = open_pagemap()?;
    let pmd = page * (page / ENTRY_LEN as u64);
    if len >= SCAN_MIN && is_aligned(vaddr, page) {
        if let Some(huge) = scan::huge_ranges(&file, vaddr, vaddr + len) {
            if let Ok(out) = pfns_by_heads(&file, vaddr, len, pmd, &huge)? {
                // Without huge ranges every entry was read: nothing to
                // confirm.
                if huge.is_empty()
                    || scan::huge_ranges(&file, vaddr, vaddr + len).as_ref() == Some(&huge)
                {
                    return Ok(out);
                }
            }
        }
    }
    let mut out = vec![0u64; pages];
    read_into(&file, vaddr, &mut out)?;
    decode_in_place(vaddr, &mut out, 0)?;
    if pages > 0 && out.iter().all(|&p| p == 0) {
        return Err(PhysError::PfnHidden { vaddr, pages });
    }
    Ok(Frames::from(out))
}

/// Ranges from this length on ask `PAGEMAP_SCAN` which of their parts are
/// huge (below it, reading every entry costs less than the scan).
pub const SCAN_MIN: u64 = 4 << 20;

/// Reads the raw pagemap entries of `out.len()` pages from `vaddr` into
/// `out` (undecoded).
fn read_into(file: &File, vaddr: u64, out: &mut [u64]) -> Result<(), PhysError> {
    let pages = out.len();
    // SAFETY: the bytes of `out`'s initialised u64s, as u8 (no alignment
    // needed, and any bytes are a valid u64); `pages * 8` was checked not
    // to overflow by the caller's range.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), pages * ENTRY_LEN) };
    read_raw(file, vaddr, pages, bytes)
}

/// Decodes raw entries in place into PFNs; `first` is the index of
/// `out[0]` in the range that starts at `vaddr`.
fn decode_in_place(vaddr: u64, out: &mut [u64], first: usize) -> Result<(), PhysError> {
    let page = base_page_size();
    for (i, e) in out.iter_mut().enumerate() {
        let Some(pfn) = PagemapEntry(u64::from_le(*e)).pfn() else {
            return Err(PhysError::NotPresent {
                vaddr: vaddr.wrapping_add(((first + i) as u64).wrapping_mul(page)),
            });
        };
        *e = pfn;
    }
    Ok(())
}

/// [`pfns`] with the huge ranges known: every entry outside them, one per
/// `pmd` bytes inside (the head of each huge page of that size, the rest
/// filled in from it). `Ok(Err(at))` when the head at `at` is not aligned
/// as a huge page's, or a range is not `pmd`-aligned (`at` is its start):
/// [`pfns`] then reads every entry, [`pfns_by_page`] refuses.
fn pfns_by_heads(
    file: &File,
    vaddr: u64,
    len: u64,
    pmd: u64,
    huge: &[(u64, u64)],
) -> Result<Result<Frames, u64>, PhysError> {
    let page = base_page_size();
    let per = pmd / page;
    let idx = |a: u64| ((a - vaddr) / page) as usize;
    let hidden = || PhysError::PfnHidden {
        vaddr,
        pages: (len / page) as usize,
    };
    let mut out = FramesBuilder::default();
    let mut gap = Vec::new();
    let mut at = vaddr;
    let mut any_frame = false;
    let end = vaddr + len;
    for &(s, e) in huge.iter().chain(std::iter::once(&(end, end))) {
        let (s, e) = (s.clamp(at, end), e.clamp(at, end));
        if s < e && (!is_aligned(s, pmd) || !is_aligned(e, pmd)) {
            return Ok(Err(s));
        }
        if s > at {
            gap.clear();
            gap.resize(idx(s) - idx(at), 0);
            read_into(file, at, &mut gap)?;
            decode_in_place(vaddr, &mut gap, idx(at))?;
            for &p in &gap {
                any_frame |= p != 0;
                out.push(p, 1);
            }
        }
        let mut h = s;
        while h < e {
            let mut head = [0u64];
            read_into(file, h, &mut head)?;
            decode_in_place(vaddr, &mut head, idx(h))?;
            let head = head[0];
            if head == 0 {
                // Hidden: pagemap shows every frame or none (`show_pfn` is
                // fixed when the file is opened), and no user page is
                // frame 0.
                return Err(hidden());
            } else if head % per != 0 {
                return Ok(Err(h));
            } else {
                any_frame = true;
                out.push(head, per);
            }
            h += pmd;
        }
        at = e.max(at);
    }
    if !any_frame && len >= page {
        return Err(hidden());
    }
    Ok(Ok(out.finish()))
}

/// Like [`pfns`], for a range of pages of `page_size` bytes (hugetlb): one
/// 8-byte `pread` of each huge page's first entry, the rest of its frames
/// filled in by the run arithmetic of a huge page (its base pages are the
/// head's PFN, a multiple of the base pages per page, and the ones after
/// it). That is what the kernel reports for them: `pagemap_hugetlb_range`
/// (`fs/proc/task_mmu.c`, 6.1 and 7.3) computes every entry of a hugetlb
/// page from its head as the head's frame plus the offset, so reading the
/// other 511 entries of a 2 MiB page proves nothing more, and costs: in
/// the bench VM (6.1, TCG) reading all 524,288 entries of 2 GiB took 27 ms
/// of the proof's 31 ms over the raw pin (per page, 0.49 of a base-page
/// region's read in the same run; with the heads 0.22). A head that is not aligned to its
/// page's base-page count is refused ([`PhysError::NotHuge`]): it is not a
/// hugetlb page's head.
///
/// # Errors
/// As [`pfns`]; [`PhysError::NotHuge`] for a page whose head frame is not
/// aligned as a huge page's.
pub fn pfns_by_page(vaddr: u64, len: u64, page_size: u64) -> Result<Frames, PhysError> {
    let base = base_page_size();
    if page_size <= base {
        return pfns(vaddr, len);
    }
    let bad = PhysError::BadRange {
        vaddr,
        len,
        page_size,
    };
    if !is_aligned(vaddr, page_size)
        || !is_aligned(len, page_size)
        || vaddr.checked_add(len).is_none()
    {
        return Err(bad);
    }
    let whole = [(vaddr, vaddr + len)];
    match pfns_by_heads(&open_pagemap()?, vaddr, len, page_size, &whole)? {
        Ok(out) => Ok(out),
        Err(at) => Err(PhysError::NotHuge {
            vaddr: at,
            page_size,
        }),
    }
}

/// The physical extents backing `[vaddr, vaddr + len)`, in virtual order,
/// read from `/proc/self/pagemap`. `vaddr` and `len` must be multiples of
/// the base page size; `len == 0` gives no extents.
///
/// # Errors
/// [`PhysError::BadRange`], [`PhysError::NotPresent`],
/// [`PhysError::PfnHidden`] (no CAP_SYS_ADMIN), and the I/O errors of
/// [`read_pagemap`].
pub fn phys_extents(vaddr: u64, len: u64) -> Result<Vec<PhysExtent>, PhysError> {
    phys_extents_from(&open_pagemap()?, vaddr, len)
}

/// Like [`phys_extents`], from an already-open pagemap file.
///
/// # Errors
/// As [`phys_extents`], without [`PhysError::Open`].
pub fn phys_extents_from(file: &File, vaddr: u64, len: u64) -> Result<Vec<PhysExtent>, PhysError> {
    let page_size = base_page_size();
    let bad = PhysError::BadRange {
        vaddr,
        len,
        page_size,
    };
    if !is_aligned(vaddr, page_size)
        || !is_aligned(len, page_size)
        || vaddr.checked_add(len).is_none()
    {
        return Err(bad);
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let pages = usize::try_from(len / page_size).map_err(|_| bad)?;
    let entries = read_pagemap_from(file, vaddr, pages)?;
    let pfns = decode_pfns(vaddr, &entries, page_size)?;
    Ok(merge_extents(pfns, page_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u64 = 4096;

    /// Reading one entry per huge page where the ranges are huge gives
    /// what reading every entry gives. The huge ranges are the ones the
    /// full read shows (aligned runs of 512 frames; none where this host
    /// gave no THP, which then tests the gaps alone), as `PAGEMAP_SCAN`
    /// would name them; hidden frames (not root) are refused alike.
    #[test]
    fn heads_of_huge_ranges_give_every_frame() {
        const LEN: usize = 8 << 20;
        const PMD: u64 = 2 << 20;
        // SAFETY: a fresh private anonymous mapping; 2 MiB-aligned inside
        // it below; unmapped at the end.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN + PMD as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let base = (raw as u64).next_multiple_of(PMD);
        // SAFETY: advice and writes inside the mapping.
        unsafe {
            libc::madvise(base as *mut libc::c_void, LEN, libc::MADV_HUGEPAGE);
            std::ptr::write_bytes(base as *mut u8, 1, LEN);
        }
        let file = open_pagemap().unwrap();
        let mut all = vec![0u64; LEN / PS as usize];
        read_into(&file, base, &mut all).unwrap();
        decode_in_place(base, &mut all, 0).unwrap();
        let got = if all.iter().all(|&p| p == 0) {
            assert!(matches!(
                pfns_by_heads(&file, base, LEN as u64, PMD, &[]),
                Err(PhysError::PfnHidden { .. })
            ));
            None
        } else {
            let huge: Vec<(u64, u64)> = all
                .chunks(512)
                .enumerate()
                .filter(|(_, c)| c[0] % 512 == 0 && c.iter().zip(c[0]..).all(|(&p, w)| p == w))
                .map(|(i, _)| (base + i as u64 * PMD, base + (i as u64 + 1) * PMD))
                .collect();
            Some(pfns_by_heads(&file, base, LEN as u64, PMD, &huge).unwrap())
        };
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(raw, LEN + PMD as usize) };
        if let Some(got) = got {
            assert_eq!(got, Ok(Frames::from(all)));
        }
    }

    fn ext(pfn: u64, pages: u64) -> PhysExtent {
        PhysExtent {
            pa: PhysAddr(pfn * PS),
            len: pages * PS,
        }
    }

    #[test]
    fn entry_decoding() {
        let e = PagemapEntry(PagemapEntry::PRESENT | PagemapEntry::EXCLUSIVE | 0x12345);
        assert!(e.present() && e.exclusive());
        assert!(!e.swapped() && !e.soft_dirty() && !e.file_or_shared_anon());
        assert_eq!(e.pfn(), Some(0x12345));

        let e = PagemapEntry(
            PagemapEntry::PRESENT
                | PagemapEntry::FILE_OR_SHARED_ANON
                | PagemapEntry::SOFT_DIRTY
                | PagemapEntry::PFN_MASK,
        );
        assert!(e.file_or_shared_anon() && e.soft_dirty());
        assert_eq!(
            e.pfn(),
            Some((1 << 55) - 1),
            "bit 55 is not part of the PFN"
        );

        // Swapped: bits 0-54 hold swap type/offset, not a PFN.
        let e = PagemapEntry(PagemapEntry::SWAPPED | 0x3_0001);
        assert!(e.swapped() && !e.present());
        assert_eq!((e.pfn(), e.raw_pfn()), (None, 0x3_0001));
        // Not present, never touched.
        assert_eq!(PagemapEntry(0).pfn(), None);
        // Present with the PFN hidden.
        assert_eq!(PagemapEntry(PagemapEntry::PRESENT).pfn(), Some(0));
        // Bits 57-60 are ignored.
        assert_eq!(
            PagemapEntry(PagemapEntry::PRESENT | (0xf << 57) | 7).pfn(),
            Some(7)
        );
    }

    #[test]
    fn merging() {
        assert_eq!(merge_extents([], PS), vec![]);
        assert_eq!(merge_extents([7], PS), vec![ext(7, 1)]);
        assert_eq!(merge_extents([10, 11, 12, 13], PS), vec![ext(10, 4)]);
        assert_eq!(
            merge_extents([10, 11, 20, 21, 22, 30], PS),
            vec![ext(10, 2), ext(20, 3), ext(30, 1)]
        );
        // Descending frames are not contiguous in virtual order.
        assert_eq!(
            merge_extents([12, 11, 10], PS),
            vec![ext(12, 1), ext(11, 1), ext(10, 1)]
        );
        // A repeated frame starts a new extent (order is kept).
        assert_eq!(merge_extents([5, 5, 6], PS), vec![ext(5, 1), ext(5, 2)]);
        // A 2 MiB hugetlb page shows as 512 consecutive base PFNs.
        assert_eq!(merge_extents(0x200..0x400, PS), vec![ext(0x200, 0x200)]);
        // No overflow on absurd PFNs.
        assert_eq!(merge_extents([u64::MAX, 0], PS).len(), 2);
    }

    #[test]
    fn decoding_pfns() {
        let p = |pfn| PagemapEntry(PagemapEntry::PRESENT | pfn);
        let base = 0x7f00_0000_0000;
        assert_eq!(decode_pfns(base, &[p(1), p(2)], PS).unwrap(), vec![1, 2]);
        assert!(decode_pfns(base, &[], PS).unwrap().is_empty());
        // One zero PFN among real ones is kept (frame 0 exists).
        assert_eq!(decode_pfns(base, &[p(0), p(2)], PS).unwrap(), vec![0, 2]);
        assert!(matches!(
            decode_pfns(base, &[p(1), p(2), PagemapEntry(0)], PS),
            Err(PhysError::NotPresent { vaddr }) if vaddr == base + 2 * PS
        ));
        assert!(matches!(
            decode_pfns(base, &[PagemapEntry(PagemapEntry::SWAPPED | 9), p(1)], PS),
            Err(PhysError::NotPresent { vaddr }) if vaddr == base
        ));
        assert!(matches!(
            decode_pfns(base, &[p(0), p(0), p(0)], PS),
            Err(PhysError::PfnHidden { vaddr, pages: 3 }) if vaddr == base
        ));
    }

    #[test]
    fn messages() {
        let m = PhysError::PfnHidden {
            vaddr: 0x1000,
            pages: 2,
        }
        .to_string();
        assert!(
            m.contains("CAP_SYS_ADMIN") && m.contains("run as root") && m.contains("Linux 4.3"),
            "{m}"
        );
        let m = PhysError::NotPresent {
            vaddr: 0x7f00_dead_b000,
        }
        .to_string();
        assert!(m.contains("0x7f00deadb000") && m.contains("touch"), "{m}");
        let m = PhysError::BadRange {
            vaddr: 0x1001,
            len: 0x1000,
            page_size: PS,
        }
        .to_string();
        assert!(m.contains("0x1001") && m.contains("page-aligned"), "{m}");
    }

    #[test]
    fn bad_ranges() {
        let ps = base_page_size();
        for (vaddr, len) in [(ps + 1, ps), (ps, ps + 1), (u64::MAX - ps + 1, 2 * ps)] {
            assert!(
                matches!(phys_extents(vaddr, len), Err(PhysError::BadRange { .. })),
                "{vaddr:#x}+{len:#x}"
            );
        }
        assert!(phys_extents(ps, 0).unwrap().is_empty());
    }

    #[test]
    fn short_read() {
        let empty = File::open("/dev/null").unwrap();
        assert!(matches!(
            read_pagemap_from(&empty, 0x1000, 2),
            Err(PhysError::ShortRead {
                pages: 2,
                got: 0,
                ..
            })
        ));
        assert!(read_pagemap_from(&empty, 0x1000, 0).unwrap().is_empty());
    }

    #[test]
    fn own_touched_page_is_present() {
        let ps = base_page_size() as usize;
        let mut buf = vec![0u8; 3 * ps];
        buf.iter_mut().for_each(|b| *b = 1);
        let start = buf.as_ptr() as u64;
        let page = start.next_multiple_of(ps as u64);
        let entries = read_pagemap(page, 1).unwrap();
        assert!(entries[0].present(), "{:#x}", entries[0].0);
        assert!(!entries[0].swapped());
        // As root the PFN is visible; without CAP_SYS_ADMIN it is hidden.
        match phys_extents(page, ps as u64) {
            Ok(ex) => {
                assert_eq!(ex.len(), 1);
                assert_eq!(ex[0].len, ps as u64);
                assert!(ex[0].pa.0 != 0 && ex[0].pa.is_aligned(ps as u64));
            }
            Err(PhysError::PfnHidden { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        std::hint::black_box(&buf);
    }

    #[test]
    fn pfns_decode_in_place_as_entries_do() {
        let ps = base_page_size();
        let buf = vec![1u8; 5 * ps as usize];
        let page = (buf.as_ptr() as u64).next_multiple_of(ps);
        let entries = read_pagemap(page, 3).unwrap();
        match (pfns(page, 3 * ps), decode_pfns(page, &entries, ps)) {
            (Ok(a), Ok(b)) => assert_eq!(a.to_vec(), b),
            (Err(PhysError::PfnHidden { pages: 3, .. }), Err(PhysError::PfnHidden { .. })) => {}
            other => panic!("{other:?}"),
        }
        // A page never touched has no frame.
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * ps as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(m, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(m.cast::<u8>(), 1) };
        let at = m as u64;
        assert!(matches!(
            pfns(at, 2 * ps),
            Err(PhysError::NotPresent { vaddr }) if vaddr == at + ps
        ));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(m, 2 * ps as usize) };
        std::hint::black_box(&buf);
    }

    proptest! {
        /// The extents expand back to exactly the PFNs given, in order, and
        /// neighbouring extents are never physically contiguous.
        #[test]
        fn extents_cover_exactly(pfns in prop::collection::vec(
            prop_oneof![0..64u64, (1u64 << 30)..(1u64 << 30) + 8],
            0..80,
        )) {
            let ex = merge_extents(pfns.iter().copied(), PS);
            let mut back = vec![];
            for e in &ex {
                prop_assert!(e.len > 0 && e.len % PS == 0 && e.pa.0 % PS == 0);
                let first = e.pa.0 / PS;
                back.extend(first..first + e.len / PS);
            }
            prop_assert_eq!(&back, &pfns);
            for w in ex.windows(2) {
                prop_assert!(w[0].pa.0 + w[0].len != w[1].pa.0, "contiguous neighbours {:?}", w);
            }
        }

        /// Sorted, deduplicated PFNs give extents in ascending, disjoint order.
        #[test]
        fn sorted_input_gives_sorted_disjoint_extents(mut pfns in prop::collection::vec(0..200u64, 0..80)) {
            pfns.sort_unstable();
            pfns.dedup();
            let ex = merge_extents(pfns, PS);
            for w in ex.windows(2) {
                prop_assert!(w[0].pa.0 + w[0].len < w[1].pa.0);
            }
        }
    }
}
