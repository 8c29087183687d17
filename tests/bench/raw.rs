//! The baselines numapin is measured against, without numapin: the raw
//! `VFIO_IOMMU_MAP_DMA`/`UNMAP_DMA` ioctls on a type1 container opened with
//! vfio-ioctls, and io_uring's `IORING_REGISTER_BUFFERS`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use vfio_ioctls::{VfioContainer, VfioDevice};

/// IOVA of the first byte of every raw mapping: above the 32-bit space, so
/// clear of the MSI window, and inside the 39-bit aperture of QEMU's
/// intel-iommu for every size the bench maps.
pub const IOVA_BASE: u64 = 1 << 32;

/// io_uring registers at most 1 GiB per buffer.
const URING_MAX_BUFFER: usize = 1 << 30;

/// The edu device in a type1 container of our own. A group opens in one
/// container at a time: drop this before opening numapin's `Pinner`.
pub struct RawVfio {
    // Field order is drop order: the device (and its group) goes before the
    // container.
    _device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl RawVfio {
    pub fn open(sysfs: &Path) -> Result<RawVfio, String> {
        let container =
            Arc::new(VfioContainer::new(None).map_err(|e| format!("open container: {e}"))?);
        let device = VfioDevice::new(sysfs, container.clone(), false)
            .map_err(|e| format!("open device {}: {e}", sysfs.display()))?;
        let raw = RawVfio {
            _device: device,
            container,
        };
        let info = numapin::vfio::container::get_info(numapin_fd(&raw.container))
            .map_err(|e| e.to_string())?;
        let fits = info.iova_ranges.as_ref().is_none_or(|ranges| {
            ranges
                .iter()
                .any(|r| r.contains_span(numapin::Iova(IOVA_BASE), 4 << 30))
        });
        if !fits {
            return Err(format!(
                "no usable IOVA range holds [{IOVA_BASE:#x}, +4 GiB): {:?}",
                info.iova_ranges
            ));
        }
        Ok(raw)
    }

    /// The container's fd, for a numapin `Pinner` on the same container
    /// (`Pinner::with_type1_container`), so that numapin's pin and the raw
    /// ioctl are timed side by side in each round.
    pub fn container_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        numapin_fd(&self.container)
    }

    /// DMA mappings left in the container (the DMA_AVAIL capability).
    pub fn dma_avail(&self) -> Result<u32, String> {
        numapin::vfio::container::get_info(numapin_fd(&self.container))
            .map_err(|e| e.to_string())?
            .dma_avail
            .ok_or_else(|| "the kernel reports no DMA_AVAIL capability (5.10+)".to_string())
    }

    /// One `VFIO_IOMMU_MAP_DMA`, timed.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay mapped until [`RawVfio::unmap`] of the
    /// same range, with no Rust references into it.
    pub unsafe fn map(&self, iova: u64, addr: usize, len: usize) -> Result<Duration, String> {
        let t = Instant::now();
        // SAFETY: the caller keeps the memory mapped until the unmap.
        let r = unsafe { self.container.vfio_dma_map(iova, len, addr as *mut u8) };
        let d = t.elapsed();
        r.map_err(|e| format!("MAP_DMA {iova:#x}+{len:#x}: {e}"))?;
        Ok(d)
    }

    /// One `VFIO_IOMMU_UNMAP_DMA`, timed.
    pub fn unmap(&self, iova: u64, len: usize) -> Result<Duration, String> {
        let t = Instant::now();
        let r = self.container.vfio_dma_unmap(iova, len);
        let d = t.elapsed();
        r.map_err(|e| format!("UNMAP_DMA {iova:#x}+{len:#x}: {e}"))?;
        Ok(d)
    }
}

/// A ring for `IORING_REGISTER_BUFFERS`.
pub struct Uring {
    ring: IoUring,
}

impl Uring {
    pub fn new() -> Result<Uring, String> {
        let ring = IoUring::new(8).map_err(|e| {
            format!("io_uring_setup: {e} (CONFIG_IO_URING, kernel.io_uring_disabled)")
        })?;
        Ok(Uring { ring })
    }

    /// Registers `[addr, addr+len)` as fixed buffers of at most 1 GiB each
    /// (the long-term pin), then unregisters them: (register, unregister).
    ///
    /// # Safety
    /// The memory must stay mapped until this returns.
    pub unsafe fn register_unregister(
        &self,
        addr: usize,
        len: usize,
    ) -> Result<(Duration, Duration), String> {
        let iovecs: Vec<libc::iovec> = (0..len)
            .step_by(URING_MAX_BUFFER)
            .map(|off| libc::iovec {
                iov_base: (addr + off) as *mut libc::c_void,
                iov_len: URING_MAX_BUFFER.min(len - off),
            })
            .collect();
        let submitter = self.ring.submitter();
        let t = Instant::now();
        // SAFETY: the buffers stay mapped until they are unregistered below.
        let r = unsafe { submitter.register_buffers(&iovecs) };
        let register = t.elapsed();
        r.map_err(|e| format!("IORING_REGISTER_BUFFERS of {len:#x} bytes: {e}"))?;
        let t = Instant::now();
        let r = submitter.unregister_buffers();
        let unregister = t.elapsed();
        r.map_err(|e| format!("IORING_UNREGISTER_BUFFERS: {e}"))?;
        Ok((register, unregister))
    }
}

/// The ceiling for parallel prefault on this VM, without numapin's
/// prefault code: one thread per CPU in `cpus`, created and bound
/// beforehand, each faulting an equal share of a fresh mapping bound to
/// `node` with one `MADV_POPULATE_WRITE`. Timed from the threads' release
/// to the last one's end; mmap, `mbind` and thread creation are left out.
pub fn prefault_split(
    node: numapin::NodeId,
    cpus: &[u32],
    len: usize,
    page: numapin::PageSize,
) -> Result<Duration, String> {
    use std::sync::Barrier;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if page.is_huge() {
        flags |=
            libc::MAP_HUGETLB | ((page.bytes().trailing_zeros() as i32) << libc::MAP_HUGE_SHIFT);
    }
    // 2 MiB more than needed, so the range used can start on a THP
    // boundary, as numapin's does.
    let slack = if page.is_huge() { 0 } else { 2 << 20 };
    // SAFETY: a fresh anonymous mapping; unmapped below, never referenced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + slack,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let unmap = || {
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len + slack) };
    };
    let addr = if slack == 0 {
        p as usize
    } else {
        (p as usize).next_multiple_of(slack)
    };
    if !page.is_huge() {
        // SAFETY: advice on the fresh mapping (as NodeMemory gives it).
        unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    }
    if let Err(err) = numapin::sys::mbind(addr, len, node, 0) {
        unmap();
        return Err(format!("mbind: {err}"));
    }
    let n = cpus.len().max(1);
    let unit = page.bytes() as usize;
    let share = (len / n).div_ceil(unit) * unit;
    let start = Barrier::new(n + 1);
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let start = &start;
                let cpu = cpus.get(k).copied();
                s.spawn(move || {
                    if let Some(c) = cpu {
                        let _ = numapin::sys::set_thread_affinity(&[c]);
                    }
                    start.wait();
                    let off = (k * share).min(len);
                    let l = share.min(len - off);
                    // SAFETY: populating part of the mapping made above.
                    let r = unsafe {
                        libc::madvise(
                            (addr + off) as *mut libc::c_void,
                            l,
                            numapin::sys::MADV_POPULATE_WRITE,
                        )
                    };
                    (r == 0).then(Instant::now).ok_or_else(|| {
                        format!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error())
                    })
                })
            })
            .collect();
        // Let every thread reach the barrier on its own CPU first.
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        start.wait();
        let mut end = t;
        for h in handles {
            end = end.max(
                h.join()
                    .map_err(|_| "prefault thread panicked".to_string())??,
            );
        }
        Ok(end - t)
    });
    unmap();
    result
}

/// The container's fd, borrowed for numapin's fd-level wrappers.
fn numapin_fd(c: &VfioContainer) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the VfioContainer owns the fd and outlives the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(c.as_raw_fd()) }
}
