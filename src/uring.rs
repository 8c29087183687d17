//! Long-term pins without a device: io_uring registered buffers.
//!
//! Where VFIO does not pin — a type1 container holding only mdev groups, or
//! a no-IOMMU container — numapin takes the pin itself with
//! `IORING_REGISTER_BUFFERS`, which calls `pin_user_pages(FOLL_WRITE |
//! FOLL_LONGTERM)` on every page. While registered, the pages cannot be
//! migrated by NUMA balancing, compaction or `move_pages`; unregistering
//! unpins them synchronously.
//!
//! The kernel's limits, and how this module meets them:
//! - at most 1 GiB per buffer: the range is cut into 1 GiB buffers;
//! - at most 16,384 buffers per ring, and a ring registers once: one ring
//!   per 16 TiB, so in practice one ring per region;
//! - the pages are accounted to the user's locked memory and to the
//!   process's `VmPin` (not `VmLck`), checked against `RLIMIT_MEMLOCK`
//!   unless the process has CAP_IPC_LOCK;
//! - `kernel.io_uring_disabled` (6.6+) can forbid io_uring altogether.
// Without the `tools` feature this module is private and only the pin
// path uses it: the rest is for numapin's own binaries.
#![cfg_attr(not(feature = "tools"), allow(dead_code))]

use std::io;

use io_uring::IoUring;

use crate::error::{Error, Result};
use crate::sys;

/// Largest buffer one `IORING_REGISTER_BUFFERS` entry may cover.
pub const MAX_BUFFER: u64 = 1 << 30;
/// Most buffers one ring registers (`IORING_MAX_REG_BUFFERS`).
pub const MAX_BUFFERS_PER_RING: usize = 1 << 14;

/// Where the sysctl that can turn io_uring off lives.
const DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// A range held by io_uring registered buffers: its pages are pinned
/// (FOLL_LONGTERM) until [`UringPin::release`] or drop.
pub struct UringPin {
    rings: Vec<IoUring>,
    vaddr: usize,
    len: u64,
}

impl std::fmt::Debug for UringPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringPin")
            .field("vaddr", &format_args!("{:#x}", self.vaddr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("rings", &self.rings.len())
            .finish()
    }
}

/// How `[vaddr, vaddr+len)` is cut: per ring, the `(start, len)` of each
/// buffer. Buffers are at most [`MAX_BUFFER`]; rings hold at most
/// [`MAX_BUFFERS_PER_RING`].
pub fn plan(vaddr: usize, len: u64) -> Vec<Vec<(usize, u64)>> {
    let mut buffers = Vec::new();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MAX_BUFFER);
        buffers.push((vaddr + off as usize, n));
        off += n;
    }
    buffers
        .chunks(MAX_BUFFERS_PER_RING)
        .map(<[_]>::to_vec)
        .collect()
}

/// Whether registering buffers raises this process's `VmPin`, measured
/// once with one page: kernels that skip the accounting for a process with
/// CAP_IPC_LOCK (7.2.12 and 7.3.4's `io_buffer_account_pin`) leave it
/// unchanged. If the probe cannot run, `true`: the proof stays strict.
pub fn charges_vmpin() -> bool {
    static MEASURED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MEASURED.get_or_init(|| probe_vmpin().unwrap_or(true))
}

fn probe_vmpin() -> Option<bool> {
    let page = crate::addr::base_page_size() as usize;
    // SAFETY: a fresh anonymous page of our own, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let result = (|| {
        let ring = IoUring::new(1).ok()?;
        let before = sys::pinned_bytes().ok()?;
        let iov = [libc::iovec {
            iov_base: p,
            iov_len: page,
        }];
        // SAFETY: the page stays mapped until after the unregister below.
        unsafe { ring.submitter().register_buffers(&iov) }.ok()?;
        let after = sys::pinned_bytes().ok()?;
        let _ = ring.submitter().unregister_buffers();
        Some(after > before)
    })();
    // SAFETY: our own page; the ring is gone.
    unsafe { libc::munmap(p, page) };
    if result == Some(false) {
        log::info!(
            "io_uring does not charge VmPin for this process (CAP_IPC_LOCK); its pins are proven without the accounting check"
        );
    }
    result
}

/// How many rings (each one fd) an io_uring pin of `len` bytes keeps open.
pub fn rings_for(len: u64) -> u64 {
    len.div_ceil(MAX_BUFFER)
        .div_ceil(MAX_BUFFERS_PER_RING as u64)
}

impl UringPin {
    /// Registers `[vaddr, vaddr+len)` as io_uring fixed buffers, pinning
    /// every page long-term. On error nothing stays registered.
    ///
    /// # Safety
    /// The memory must stay mapped until the pin is released or dropped:
    /// the kernel keeps references to the pages, and the ring's fixed
    /// buffers describe this range.
    pub unsafe fn new(vaddr: *mut u8, len: u64) -> Result<UringPin> {
        let vaddr = vaddr as usize;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let mut pin = UringPin {
            rings: Vec::new(),
            vaddr,
            len,
        };
        for ring_bufs in plan(vaddr, len) {
            let ring = IoUring::new(1).map_err(setup_error)?;
            let iov: Vec<libc::iovec> = ring_bufs
                .iter()
                .map(|&(base, n)| libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: n as usize,
                })
                .collect();
            // SAFETY: the caller keeps the range mapped until this pin is
            // released or dropped, which unregisters (and closes) the ring.
            unsafe { ring.submitter().register_buffers(&iov) }
                .map_err(|e| register_error(e, vaddr, len))?;
            // On a later failure, `pin`'s drop unregisters what is already
            // registered.
            pin.rings.push(ring);
        }
        Ok(pin)
    }

    /// First byte of the pinned range.
    pub fn vaddr(&self) -> usize {
        self.vaddr
    }

    /// Length of the pinned range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: a pin covers at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rings used (one per 16 TiB).
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Unregisters every buffer, which unpins the pages and returns the
    /// accounting before this call returns (closing a ring would do it
    /// later, from a kernel worker).
    pub fn release(mut self) -> Result<()> {
        self.unregister()
    }

    fn unregister(&mut self) -> Result<()> {
        let mut first = None;
        for ring in self.rings.drain(..) {
            if let Err(e) = ring.submitter().unregister_buffers() {
                first.get_or_insert(Error::sys("IORING_UNREGISTER_BUFFERS", "", e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for UringPin {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            log::warn!("{e}; the pages stay pinned until the ring closes");
        }
    }
}

/// Reads `kernel.io_uring_disabled` (absent before 6.6: `None`).
pub fn disabled_sysctl() -> Option<u32> {
    std::fs::read_to_string(DISABLED_SYSCTL)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether this process may use io_uring under `kernel.io_uring_disabled =
/// 1`: CAP_SYS_ADMIN, or membership of `kernel.io_uring_group`.
fn allowed_when_restricted() -> bool {
    if sys::has_cap(sys::Cap::SysAdmin) {
        return true;
    }
    let Some(gid) = std::fs::read_to_string("/proc/sys/kernel/io_uring_group")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    else {
        return false;
    };
    if gid < 0 {
        return false;
    }
    // SAFETY: getegid has no preconditions.
    if i64::from(unsafe { libc::getegid() }) == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: the buffer holds groups.len() entries.
    let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    n > 0 && groups[..n as usize].iter().any(|&g| i64::from(g) == gid)
}

fn setup_error(e: io::Error) -> Error {
    let filtered = |e| {
        Error::sys(
            "io_uring_setup",
            "a seccomp filter or LSM forbids io_uring for this process (container runtimes often do); allow io_uring_setup and io_uring_register",
            e,
        )
    };
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => match disabled_sysctl() {
            Some(2) => Error::UringDisabled { value: 2 },
            Some(1) if !allowed_when_restricted() => Error::UringDisabled { value: 1 },
            _ => filtered(e),
        },
        Some(libc::ENOSYS) => Error::UringUnsupported,
        _ => Error::sys(
            "io_uring_setup",
            "check the open-file limit (`ulimit -n`) and free memory",
            e,
        ),
    }
}

fn register_error(e: io::Error, vaddr: usize, len: u64) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOMEM) if !sys::has_cap(sys::Cap::IpcLock) => {
            let limit = sys::memlock_limit().unwrap_or(u64::MAX);
            let pinned = sys::pinned_bytes().unwrap_or(0);
            if pinned.saturating_add(len) > limit {
                Error::MemlockLimit {
                    limit,
                    locked: pinned,
                    len,
                }
            } else {
                Error::sys(
                    "IORING_REGISTER_BUFFERS",
                    "io_uring counts pinned memory per user, so other processes of this user count against \
                     RLIMIT_MEMLOCK too (raise it, or grant CAP_IPC_LOCK); otherwise memory ran out or a page \
                     in ZONE_MOVABLE/CMA could not be migrated for the long-term pin",
                    e,
                )
            }
        }
        Some(libc::EFAULT) => Error::not_pinnable(
            "IORING_REGISTER_BUFFERS",
            vaddr as u64,
            len,
            sys::range_mapping(vaddr as u64, len).ok(),
        ),
        Some(libc::EOPNOTSUPP) => Error::sys(
            "IORING_REGISTER_BUFFERS",
            "the memory cannot be pinned long-term (file-backed, device or secret memory); use anonymous memory \
             or hugetlbfs (older kernels also refuse memfd/shmem)",
            e,
        ),
        Some(libc::EINVAL) => Error::sys(
            "IORING_REGISTER_BUFFERS",
            "the kernel refused the buffer table; before Linux 5.14 a ring takes at most 1024 buffers (1 TiB): \
             pin smaller regions",
            e,
        ),
        _ => Error::sys(
            "IORING_REGISTER_BUFFERS",
            "out of memory, or a page in ZONE_MOVABLE/CMA could not be migrated for the long-term pin; free memory and retry",
            e,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_cuts_at_one_gib_and_fills_rings() {
        assert_eq!(plan(0x1000, 4096), vec![vec![(0x1000, 4096)]]);
        let g = MAX_BUFFER;
        let p = plan(0x4000_0000, 2 * g + 4096);
        assert_eq!(
            p,
            vec![vec![
                (0x4000_0000, g),
                (0x4000_0000 + g as usize, g),
                (0x4000_0000 + 2 * g as usize, 4096)
            ]]
        );
        let big = plan(0, (MAX_BUFFERS_PER_RING as u64 + 1) * g);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].len(), MAX_BUFFERS_PER_RING);
        assert_eq!(big[1], vec![(MAX_BUFFERS_PER_RING * g as usize, g)]);
        assert!(plan(0, 0).is_empty());
    }
}
