//! Memory another process can map: a memfd with its size sealed, mapped
//! shared. The pinning service hands such a memfd to its client
//! (`SCM_RIGHTS`); a VMM's vhost-user guest RAM is the same kind of memory.
//!
//! - `memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING)`, with `MFD_HUGETLB`
//!   and the page size for 2 MiB and 1 GiB pages (sealing hugetlb memfds:
//!   Linux 4.16, commit 47b9012ecdc7);
//! - `ftruncate` to the size, then `F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`: nobody, not even a process the fd is passed to, can
//!   change its size, so a mapping of it can never lose its pages to a
//!   truncation (a hole punched with `fallocate` is still possible: it
//!   breaks only the puncher's view, see `docs/guarantees.md`);
//! - `mmap(MAP_SHARED)`.
//!
//! The pages are the file's: every process that maps the fd maps the same
//! frames, and a long-term pin through any mapping holds them. A shmem
//! memfd's `mbind` policy is shared by every mapping; hugetlb has none, so
//! its pages are placed by the faults of the mapping that touches them
//! first (numapin's prefault).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::addr::PageSize;
use crate::error::{Error, Result};

/// Creates the sealed memfd of `len` bytes of `page_size` pages and maps it
/// shared, read-write. Returns the mapping's address and the fd; the
/// caller owns both and unmaps the mapping (`munmap(addr, len)`) when done
/// (`Backing::Memfd` regions do so on release).
///
/// # Errors
/// [`Error::Sys`] naming the call that failed: `memfd_create` (hugetlb
/// memfds need a pool of that page size), `ftruncate`, `F_ADD_SEALS`,
/// `mmap`. Nothing is left open on error.
pub fn map_sealed(len: usize, page_size: PageSize) -> Result<(*mut libc::c_void, OwnedFd)> {
    let fd = create(len, page_size)?;
    // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen
    // address aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::sys(
            format!("mmap of the {len:#x}-byte memfd"),
            "",
            io::Error::last_os_error(),
        ));
    }
    Ok((p, fd))
}

/// The sealed memfd itself.
fn create(len: usize, page_size: PageSize) -> Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if page_size.is_huge() {
        flags |= libc::MFD_HUGETLB | (page_size.bytes().trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: a valid NUL-terminated name; the kernel returns a new fd.
    let raw = unsafe { libc::memfd_create(c"numapin".as_ptr(), flags) };
    if raw < 0 {
        return Err(Error::sys(
            format!("memfd_create ({page_size} pages)"),
            if page_size.is_huge() {
                "hugetlb memfds need hugetlbfs with a pool of that page size (see `numapin topology`)"
            } else {
                ""
            },
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(Error::sys(
            format!("ftruncate of the memfd to {len:#x} bytes"),
            if page_size.is_huge() {
                "reserve hugepages (see `numapin topology`)"
            } else {
                ""
            },
            io::Error::last_os_error(),
        ));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own fd with an int argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(Error::sys(
            "fcntl(F_ADD_SEALS) on the memfd",
            "",
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// Frees every page of the memfd `fd` (`len` bytes from offset 0) however
/// many processes still hold or map it: `fallocate(FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE)` over the whole file (shmem: Linux 3.5; hugetlbfs:
/// 4.3). Every mapping of the file loses its pages (their PTEs are
/// zapped); a later touch through one faults in a fresh zeroed page,
/// allocated and charged where that fault happens. The size seals do not
/// forbid it; only `F_SEAL_WRITE` would, and numapin never sets it.
///
/// The pinning service calls it when a region ends, after the unpin, so
/// that a client that kept its copy of the fd (or a mapping of it) keeps
/// no memory beyond its region's life.
///
/// # Errors
/// The `fallocate` errno (`EPERM` under `F_SEAL_WRITE`, `EOPNOTSUPP` for a
/// file that cannot punch holes).
pub fn discard(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a borrowed fd with integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The seals on `fd` (`F_GET_SEALS`).
///
/// # Errors
/// The `fcntl` errno (`EINVAL` for a file that does not support seals).
pub fn seals(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: fcntl F_GET_SEALS takes no argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn discard_frees_the_pages_under_every_mapping() {
        let len = 2usize << 20;
        let (p, fd) = map_sealed(len, PageSize::Base).unwrap();
        // SAFETY: the mapping is ours and `len` long.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xa5, len) };
        // st_blocks counts the file's pages in 512-byte units.
        let stat = |fd: &OwnedFd| {
            // SAFETY: all-zero is a valid `stat`.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat of our own fd into a stat we own.
            assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
            (st.st_blocks as u64 * 512, st.st_size as usize)
        };
        assert_eq!(stat(&fd).0, len as u64);
        discard(fd.as_fd(), len as u64).unwrap();
        // The pages are gone, the size stays, the mapping reads a fresh
        // zero page.
        assert_eq!(stat(&fd), (0, len), "the file still holds pages");
        // SAFETY: inside the mapping; then unmapped.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p.cast::<u8>().add(4096)), 0);
            libc::munmap(p, len);
        }
    }

    #[test]
    fn a_sealed_memfd_keeps_its_size() {
        let (p, fd) = map_sealed(2 << 20, PageSize::Base).unwrap();
        let s = seals(fd.as_fd()).unwrap();
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(s & want, want);
        // SAFETY: ftruncate on our own fd; it must be refused.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        // A second mapping of the fd sees what the first wrote.
        // SAFETY: fresh shared mapping of our memfd; only raw accesses below.
        let q = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(q, libc::MAP_FAILED);
        // SAFETY: both mappings are ours and at least one page long.
        unsafe {
            std::ptr::write_volatile(p.cast::<u8>(), 0x5a);
            assert_eq!(std::ptr::read_volatile(q.cast::<u8>()), 0x5a);
            libc::munmap(q, 4096);
            libc::munmap(p, 2 << 20);
        }
    }
}
