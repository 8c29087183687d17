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
//! - at most 1 GiB per buffer: the range is cut into buffers of at most
//!   1 GiB, at 1 GiB boundaries of the address;
//! - at most 16,384 buffers per ring, and a ring registers once: without
//!   compound pages one ring per 16 TiB, so in practice one ring per region;
//! - the pages are accounted to the user's locked memory and to the
//!   process's `VmPin` (not `VmLck`), checked against `RLIMIT_MEMLOCK`
//!   unless the process has CAP_IPC_LOCK;
//! - `kernel.io_uring_disabled` (6.6+) can forbid io_uring altogether.
//!
//! A ring here is only the descriptor `io_uring_setup` returns: nothing is
//! ever submitted, so its submission and completion rings are never mapped
//! (in the 6.1 bench VM that made a ring about a third as costly as one
//! the io-uring crate sets up, which maps three areas). On 6.1 each
//! `IORING_UNREGISTER_BUFFERS` waits an RCU grace period (bench: about
//! 18 ms per ring, 1.2 s for 64 rings one after the other), so a release
//! unregisters its rings from several threads at once (138 ms for 65).
//!
//! # Compound pages: rings of [`SCAN_RING_BYTES`]
//!
//! A huge page (THP or hugetlb) is charged once per ring, in full. How the
//! kernel finds out whether a compound page is already charged decides
//! what registering costs:
//! - 6.1 (Debian 12's 6.1.192, `io_uring/rsrc.c`): `io_buffer_account_pin`
//!   calls `headpage_already_acct` for every new compound head, which
//!   scans the buffer's pages so far and every page (bvec) of every buffer
//!   the ring already holds. For a ring of P base pages of 2 MiB compound
//!   pages that is about P²/1024 page checks: the cost per byte grows with
//!   the bytes per ring, whatever the buffer size. numapin's bench on 6.1
//!   (TCG), one ring of THP: 1 GiB 6.6×, 2 GiB 9.4× the registration of
//!   as much base-page memory; in rings of 32 MiB 1.2× and 1.04×.
//! - 6.12 (Debian 13's 6.12.118): the same scan, but `io_try_coalesce_buffer`
//!   first folds a buffer whose pages are whole folios of one size into one
//!   entry per folio, so the scan covers heads, not pages; a buffer mixing
//!   folio sizes (THP next to base pages) is still scanned page by page.
//! - 7.3 (trixie-backports' 7.3.4): `headpage_already_acct` is gone; each
//!   head is looked up in the ring's `hpage_acct` xarray
//!   (`hpage_acct_ref`), and `io_check_coalesce_buffer` coalesces as in
//!   6.12. No cost grows with the bytes per ring.
//!
//! So on kernels before 7.3 ([`accounting_scans`], by version: the
//! sources above), when the memory can hold compound pages (hugetlb, or
//! transparent hugepages not `never`), each ring holds at most
//! [`SCAN_RING_BYTES`] (at least one huge page), cut at multiples of the
//! ring size so that no huge page straddles two rings and is charged
//! twice. That bounds the scan per byte at a constant, at the price of one
//! file descriptor per ring: at most `1 GiB / SCAN_RING_BYTES` + 1 fds per
//! GiB of a region ([`fds_per_gib`]); elsewhere one fd per region (per
//! 16 TiB). [`rings_for`] counts them before a pin (the pinner checks them
//! against `RLIMIT_NOFILE` first).
// Without the `tools` feature this module is private and only the pin
// path uses it: the rest is for numapin's own binaries.
#![cfg_attr(not(feature = "tools"), allow(dead_code))]

use std::io;

use std::os::fd::OwnedFd;

use crate::PageSize;
use crate::error::{Error, Result};
use crate::sys;

/// Largest buffer one `IORING_REGISTER_BUFFERS` entry may cover.
pub const MAX_BUFFER: u64 = 1 << 30;
/// Most buffers one ring registers (`IORING_MAX_REG_BUFFERS`).
pub const MAX_BUFFERS_PER_RING: usize = 1 << 14;
/// Most bytes one ring holds: [`MAX_BUFFERS_PER_RING`] buffers of
/// [`MAX_BUFFER`] (16 TiB).
pub const MAX_RING_BYTES: u64 = MAX_BUFFER * MAX_BUFFERS_PER_RING as u64;
/// Most bytes one ring holds where the kernel's accounting of compound
/// pages scans the ring ([`accounting_scans`]) and the memory can hold
/// them: bounds the scan per byte (see the module documentation).
pub const SCAN_RING_BYTES: u64 = 32 << 20;
/// Most threads a release unregisters rings from at once.
const UNREGISTER_THREADS: usize = 16;

/// Where the sysctl that can turn io_uring off lives.
const DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
/// Whether and how big transparent hugepages are.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const THP_SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
const THP_PMD_SIZE: &str = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size";

/// A range held by io_uring registered buffers: its pages are pinned
/// (FOLL_LONGTERM) until [`UringPin::release`] or drop.
pub struct UringPin {
    rings: Vec<Ring>,
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

/// One io_uring instance used only to hold registered buffers: the fd of
/// `io_uring_setup` with one entry, its submission and completion rings
/// never mapped (nothing is ever submitted), which saves three `mmap`s and
/// `munmap`s per ring. The io-uring crate always maps them; rustix's
/// `io_uring_setup` and `io_uring_register` are the bare calls.
struct Ring(OwnedFd);

impl Ring {
    fn new() -> io::Result<Ring> {
        let mut params = rustix::io_uring::io_uring_params::default();
        // SAFETY: `params` is the kernel's struct, all zero: the defaults.
        let fd = unsafe { rustix::io_uring::io_uring_setup(1, &mut params) }?;
        Ok(Ring(fd))
    }

    /// # Safety
    /// The buffers must stay mapped until [`Ring::unregister`] or the
    /// ring's close.
    unsafe fn register(&self, iov: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: the kernel reads `iov.len()` iovecs; the caller keeps
        // the memory they describe mapped.
        unsafe {
            rustix::io_uring::io_uring_register(
                &self.0,
                rustix::io_uring::IoringRegisterOp::RegisterBuffers,
                iov.as_ptr().cast(),
                iov.len() as u32,
            )
        }?;
        Ok(())
    }

    fn unregister(&self) -> io::Result<()> {
        // SAFETY: this opcode takes no argument.
        unsafe {
            rustix::io_uring::io_uring_register(
                &self.0,
                rustix::io_uring::IoringRegisterOp::UnregisterBuffers,
                std::ptr::null(),
                0,
            )
        }?;
        Ok(())
    }
}

/// Whether this kernel's accounting of compound pages in registered
/// buffers scans the pages the ring already holds, so that registering
/// compound memory costs more per byte the more bytes a ring holds: every
/// kernel before 7.3. 6.1.192's `headpage_already_acct` scans every page;
/// 6.12.118's scans one entry per folio only for buffers
/// `io_try_coalesce_buffer` could coalesce; 7.3.4's `io_buffer_account_pin`
/// looks each head up in an xarray (`hpage_acct_ref`) and scans nothing
/// (`io_uring/rsrc.c` of Debian's linux-source packages of those versions).
/// Kernels between 6.12 and 7.3 were not read and count as scanning.
pub fn accounting_scans() -> bool {
    scans_on(sys::kernel_version())
}

fn scans_on(version: Option<(u32, u32)>) -> bool {
    // An unknown version: assume the old accounting (smaller rings cost
    // descriptors, not correctness).
    version.is_none_or(|v| v < (7, 3))
}

/// Whether memory of `page_size` can hold compound pages here: hugetlb
/// pages always; base-page memory unless transparent hugepages (anonymous
/// and shmem) are off.
fn may_be_compound(page_size: PageSize) -> bool {
    if page_size.is_huge() {
        return true;
    }
    let selected = |path: &str| {
        std::fs::read_to_string(path).ok().and_then(|s| {
            let a = s.find('[')?;
            let b = s[a..].find(']')?;
            Some(s[a + 1..a + b].to_string())
        })
    };
    let anon = selected(THP_ENABLED);
    let shmem = selected(THP_SHMEM_ENABLED);
    let on = |v: Option<String>| v.is_some_and(|v| v != "never" && v != "deny");
    on(anon) || on(shmem)
}

/// The largest huge page memory of `page_size` may hold: the page itself
/// for hugetlb, the PMD size of transparent hugepages (2 MiB on x86-64)
/// for base pages.
fn largest_page(page_size: PageSize) -> u64 {
    if page_size.is_huge() {
        return page_size.bytes();
    }
    std::fs::read_to_string(THP_PMD_SIZE)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|b| b.is_power_of_two())
        .unwrap_or(2 << 20)
}

/// Most bytes per ring for an io_uring pin of memory of `page_size` on
/// this kernel: [`SCAN_RING_BYTES`] (or one huge page, if larger) where
/// the accounting scans and the memory can hold compound pages, else
/// [`MAX_RING_BYTES`]. Always a power of two.
pub fn ring_bytes(page_size: PageSize) -> u64 {
    ring_bytes_for(
        accounting_scans(),
        may_be_compound(page_size),
        largest_page(page_size),
    )
}

fn ring_bytes_for(scans: bool, compound: bool, largest_page: u64) -> u64 {
    if scans && compound {
        SCAN_RING_BYTES.max(largest_page.next_power_of_two())
    } else {
        MAX_RING_BYTES
    }
}

/// How `[vaddr, vaddr+len)` is cut: per ring, the `(start, len)` of each
/// buffer. Buffers end at multiples of [`MAX_BUFFER`]. Below
/// [`MAX_RING_BYTES`], rings end at multiples of `ring_bytes` (a power of
/// two), so that a huge page never straddles two rings (each would charge
/// it in full); at [`MAX_RING_BYTES`] a ring takes
/// [`MAX_BUFFERS_PER_RING`] buffers.
pub fn plan(vaddr: usize, len: u64, ring_bytes: u64) -> Vec<Vec<(usize, u64)>> {
    debug_assert!(ring_bytes.is_power_of_two() && ring_bytes <= MAX_RING_BYTES);
    let next = |at: u64, step: u64| (at / step + 1) * step;
    let start = vaddr as u64;
    let end = start + len;
    let cut = |from: u64, to: u64, step: u64| {
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let stop = next(at, step).min(to);
            out.push((at, stop));
            at = stop;
        }
        out
    };
    let buffers = |from: u64, to: u64| -> Vec<(usize, u64)> {
        cut(from, to, MAX_BUFFER)
            .into_iter()
            .map(|(a, b)| (a as usize, b - a))
            .collect()
    };
    if ring_bytes >= MAX_RING_BYTES {
        return buffers(start, end)
            .chunks(MAX_BUFFERS_PER_RING)
            .map(<[_]>::to_vec)
            .collect();
    }
    cut(start, end, ring_bytes)
        .into_iter()
        .map(|(a, b)| buffers(a, b))
        .collect()
}

/// How many rings (each one fd) an io_uring pin of `len` bytes of memory
/// of `page_size` keeps open on this kernel: exactly as [`plan`] cuts it
/// when `vaddr` is known, else the most any start could need.
pub fn rings_for(vaddr: Option<usize>, len: u64, page_size: PageSize) -> u64 {
    rings_in(vaddr, len, ring_bytes(page_size))
}

fn rings_in(vaddr: Option<usize>, len: u64, ring_bytes: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    // Blocks of `step` bytes the range touches: exactly, or at most (a
    // start one page before a boundary touches one block more).
    let blocks = |step: u64| match vaddr {
        Some(v) => (v as u64 + len - 1) / step - v as u64 / step + 1,
        None => ((len - 1) / step + 2).min(len.div_ceil(crate::addr::base_page_size())),
    };
    if ring_bytes >= MAX_RING_BYTES {
        blocks(MAX_BUFFER).div_ceil(MAX_BUFFERS_PER_RING as u64)
    } else {
        blocks(ring_bytes)
    }
}

/// The most descriptors an io_uring pin of memory of `page_size` keeps
/// open per GiB of region on this kernel (rounded up; a region's start
/// can add one more).
pub fn fds_per_gib(page_size: PageSize) -> u64 {
    (1u64 << 30).div_ceil(ring_bytes(page_size))
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
        let ring = Ring::new().ok()?;
        let before = sys::pinned_bytes().ok()?;
        let iov = [libc::iovec {
            iov_base: p,
            iov_len: page,
        }];
        // SAFETY: the page stays mapped until after the unregister below.
        unsafe { ring.register(&iov) }.ok()?;
        let after = sys::pinned_bytes().ok()?;
        let _ = ring.unregister();
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

impl UringPin {
    /// Registers `[vaddr, vaddr+len)` as io_uring fixed buffers, pinning
    /// every page long-term, in rings of at most [`ring_bytes`] for memory
    /// of `page_size` ([`plan`]). On error nothing stays registered.
    ///
    /// # Errors
    /// [`Error::UringDisabled`], [`Error::UringUnsupported`] or a system
    /// error from `io_uring_setup` (running out of descriptors is
    /// [`Error::OutOfFds`], naming the rings still needed);
    /// [`Error::MemlockLimit`], [`Error::ZeroSize`] or the kernel's refusal
    /// of a buffer from `IORING_REGISTER_BUFFERS`.
    ///
    /// # Safety
    /// The memory must stay mapped until the pin is released or dropped:
    /// the kernel keeps references to the pages, and the ring's fixed
    /// buffers describe this range.
    pub unsafe fn new(vaddr: *mut u8, len: u64, page_size: PageSize) -> Result<UringPin> {
        // SAFETY: the caller's promise, passed on.
        unsafe { UringPin::in_rings(vaddr, len, ring_bytes(page_size)) }
    }

    /// [`UringPin::new`] with rings of at most `ring_bytes` (a power of
    /// two).
    ///
    /// # Safety
    /// As for [`UringPin::new`].
    unsafe fn in_rings(vaddr: *mut u8, len: u64, ring_bytes: u64) -> Result<UringPin> {
        let vaddr = vaddr as usize;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let mut pin = UringPin {
            rings: Vec::new(),
            vaddr,
            len,
        };
        let plan = plan(vaddr, len, ring_bytes);
        let total = plan.len() as u64;
        for (i, ring_bufs) in plan.into_iter().enumerate() {
            let ring = Ring::new().map_err(|e| match setup_error(e) {
                Error::OutOfFds {
                    op,
                    system,
                    open,
                    limit,
                    ..
                } => Error::OutOfFds {
                    op,
                    system,
                    open,
                    limit,
                    needed: total - i as u64,
                },
                other => other,
            })?;
            let iov: Vec<libc::iovec> = ring_bufs
                .iter()
                .map(|&(base, n)| libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: n as usize,
                })
                .collect();
            // SAFETY: the caller keeps the range mapped until this pin is
            // released or dropped, which unregisters (and closes) the ring.
            unsafe { ring.register(&iov) }.map_err(|e| register_error(e, vaddr, len))?;
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

    /// Rings (file descriptors) this pin keeps open: [`rings_for`].
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Unregisters every buffer, which unpins the pages and returns the
    /// accounting before this call returns (closing a ring would do it
    /// later, from a kernel worker).
    pub fn release(mut self) -> Result<()> {
        self.unregister()
    }

    /// Unregisters every ring's buffers, then closes the rings. On 6.1
    /// each `IORING_UNREGISTER_BUFFERS` waits in `io_rsrc_ref_quiesce` for
    /// the ring's resource node to be released (a `percpu_ref` kill, so an
    /// RCU grace period), so several rings unregister from up to
    /// [`UNREGISTER_THREADS`] threads, whose waits overlap; a thread that
    /// cannot be started leaves its share to this one.
    fn unregister(&mut self) -> Result<()> {
        let rings = std::mem::take(&mut self.rings);
        let one_by_one = |rings: &[Ring]| {
            let mut first = None;
            for ring in rings {
                if let Err(e) = ring.unregister() {
                    first.get_or_insert(e);
                }
            }
            first
        };
        let first = if rings.len() <= 1 {
            one_by_one(&rings)
        } else {
            let share = rings.len().div_ceil(rings.len().min(UNREGISTER_THREADS));
            std::thread::scope(|scope| {
                let mut errors = Vec::new();
                let mut running = Vec::new();
                for part in rings.chunks(share) {
                    match std::thread::Builder::new()
                        .name("numapin-unreg".into())
                        .spawn_scoped(scope, move || one_by_one(part))
                    {
                        Ok(h) => running.push(h),
                        Err(_) => errors.extend(one_by_one(part)),
                    }
                }
                for h in running {
                    // A panic in `one_by_one` cannot happen (no indexing, no
                    // unwrap); count it as a failure all the same.
                    match h.join() {
                        Ok(e) => errors.extend(e),
                        Err(_) => errors.push(io::Error::other("an unregister thread panicked")),
                    }
                }
                errors.into_iter().next()
            })
        };
        drop(rings);
        first.map_or(Ok(()), |e| {
            Err(Error::sys("IORING_UNREGISTER_BUFFERS", "", e))
        })
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

    const G: u64 = MAX_BUFFER;
    const M: u64 = 1 << 20;

    #[test]
    fn plan_cuts_at_one_gib_and_fills_rings() {
        assert_eq!(
            plan(0x1000, 4096, MAX_RING_BYTES),
            vec![vec![(0x1000, 4096)]]
        );
        let p = plan(0x4000_0000, 2 * G + 4096, MAX_RING_BYTES);
        assert_eq!(
            p,
            vec![vec![
                (0x4000_0000, G),
                (0x4000_0000 + G as usize, G),
                (0x4000_0000 + 2 * G as usize, 4096)
            ]]
        );
        // Buffers end at GiB boundaries of the address.
        let p = plan(0x4000_1000, G, MAX_RING_BYTES);
        assert_eq!(
            p,
            vec![vec![(0x4000_1000, G - 0x1000), (0x8000_0000, 0x1000)]]
        );
        let big = plan(0, (MAX_BUFFERS_PER_RING as u64 + 1) * G, MAX_RING_BYTES);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].len(), MAX_BUFFERS_PER_RING);
        assert_eq!(big[1], vec![(MAX_BUFFERS_PER_RING * G as usize, G)]);
        assert!(plan(0, 0, MAX_RING_BYTES).is_empty());
    }

    #[test]
    fn small_rings_end_at_multiples_of_their_size() {
        let r = 16 * M;
        // 2 GiB from a 16 MiB boundary: 128 rings of one 16 MiB buffer.
        let p = plan(0x4000_0000, 2 * G, r);
        assert_eq!(p.len(), 128);
        assert!(p.iter().all(|ring| ring.len() == 1 && ring[0].1 == r));
        assert_eq!(p[1][0].0, 0x4000_0000 + r as usize);
        // From 2 MiB past a boundary: a short first and last ring, and no
        // 2 MiB page in two rings.
        let start = 0x4000_0000 + 2 * M as usize;
        let p = plan(start, 64 * M, r);
        assert_eq!(p.len(), 5);
        assert_eq!(p[0], vec![(start, 14 * M)]);
        assert_eq!(p[4], vec![(0x4000_0000 + 64 * M as usize, 2 * M)]);
        for ring in &p {
            for &(a, n) in ring {
                assert!(a as u64 % (2 * M) == 0 && n % (2 * M) == 0, "{ring:?}");
            }
        }
        let total: u64 = p.iter().flatten().map(|b| b.1).sum();
        assert_eq!(total, 64 * M);
        // Rings larger than a buffer hold several, cut at GiB boundaries.
        let p = plan(0, 8 * G, 4 * G);
        assert_eq!(
            p,
            vec![
                vec![
                    (0, G),
                    (G as usize, G),
                    (2 * G as usize, G),
                    (3 * G as usize, G)
                ],
                vec![
                    (4 * G as usize, G),
                    (5 * G as usize, G),
                    (6 * G as usize, G),
                    (7 * G as usize, G)
                ],
            ]
        );
    }

    #[test]
    fn rings_counted_as_plan_cuts() {
        for ring in [16 * M, 32 * M, G, 4 * G, MAX_RING_BYTES] {
            for (vaddr, len) in [
                (0x4000_0000usize, 4096u64),
                (0x4000_0000, 2 * G),
                (0x4000_0000 + 2 * M as usize, 64 * M),
                (0x4000_1000, 3 * G + 0x5000),
                (0x7f12_3456_7000, 100 * M),
            ] {
                let planned = plan(vaddr, len, ring).len() as u64;
                assert_eq!(
                    rings_in(Some(vaddr), len, ring),
                    planned,
                    "{vaddr:#x}+{len:#x} in {ring:#x}"
                );
                assert!(
                    rings_in(None, len, ring) >= planned,
                    "{vaddr:#x}+{len:#x} in {ring:#x}"
                );
            }
        }
        // The bound without a start: one more ring than the size needs.
        assert_eq!(rings_in(None, G, 16 * M), 65);
        assert_eq!(rings_in(None, 2 * G, MAX_RING_BYTES), 1);
        assert_eq!(rings_in(None, 4096, 16 * M), 1);
        assert_eq!(rings_in(None, 0, 16 * M), 0);
    }

    /// Where this host lets a process use io_uring: 8 MiB pinned in rings
    /// of 1 MiB, released from several threads; the accounting returns.
    #[test]
    fn many_rings_pin_and_release() {
        let len = 8 * M as usize;
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let before = sys::pinned_bytes().unwrap_or(0);
        // Only a host that refuses io_uring outright, or whose memlock
        // limit is below the 8 MiB (the VM suites run it there), skips;
        // anywhere else the pin must work.
        let refused = Ring::new().is_err()
            || sys::memlock_limit().unwrap_or(0) < len as u64 && !sys::has_cap(sys::Cap::IpcLock);
        if !refused {
            // SAFETY: the mapping outlives the pin.
            let pin = unsafe { UringPin::in_rings(p.cast(), len as u64, M) }.unwrap();
            let want = plan(p as usize, len as u64, M).len();
            assert_eq!(pin.rings(), want);
            assert!(want >= 8);
            pin.release().unwrap();
            assert_eq!(sys::pinned_bytes().unwrap_or(0), before);
        }
        // SAFETY: our own mapping; nothing is pinned any more.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn small_rings_only_where_the_kernel_scans_compound_pages() {
        assert!(scans_on(Some((6, 1))));
        assert!(scans_on(Some((6, 12))));
        assert!(scans_on(Some((7, 2))));
        assert!(!scans_on(Some((7, 3))));
        assert!(!scans_on(Some((8, 0))));
        assert!(scans_on(None));
        assert_eq!(ring_bytes_for(true, true, 2 * M), SCAN_RING_BYTES);
        // 1 GiB hugetlb pages: one page per ring, never split.
        assert_eq!(ring_bytes_for(true, true, G), G);
        assert_eq!(ring_bytes_for(true, false, 2 * M), MAX_RING_BYTES);
        assert_eq!(ring_bytes_for(false, true, 2 * M), MAX_RING_BYTES);
    }
}
