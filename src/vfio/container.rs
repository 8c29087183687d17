//! A VFIO type1 container as an IOVA mapper: `VFIO_IOMMU_GET_INFO`,
//! `VFIO_IOMMU_MAP_DMA` and `VFIO_IOMMU_UNMAP_DMA` on its fd.
//!
//! The three wrappers take any container fd ([`BorrowedFd`]), not a
//! `vfio_ioctls::VfioContainer`: a VMM that owns its container (and its
//! vfio-ioctls version) hands numapin the fd, and numapin's API does not
//! depend on that crate's types. vfio-ioctls has no fd-level entry points,
//! which is why these few ioctls are written here; opening devices still
//! goes through vfio-ioctls (the private `open` module).
//!
//! The errno of a failed `MAP_DMA` becomes a cause and a remedy in
//! `map_error`, a pure function with its own tests.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info,
};
use vfio_ioctls::VfioContainer;
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};

use super::info::IommuInfo;
use super::ioctls;
use crate::addr::{Iova, VirtAddr, human_size};
use crate::backend::{DmaAddressing, IovaMapper, MapPin};
use crate::error::{Error, Result};
use crate::iova::{IovaAllocator, IovaRange};

/// `VFIO_IOMMU_GET_INFO` on a container fd, with the capability chain:
/// called once for the size, then with a buffer that large
/// (`vfio_iommu_type1_get_info` in `drivers/vfio/vfio_iommu_type1.c`).
///
/// # Errors
/// [`Error::Sys`] with the errno: `EINVAL` (or `ENOTTY`) when the fd is not
/// a container with an IOMMU set, i.e. no group was attached yet.
///
/// # Example
/// ```no_run
/// # fn main() -> numapin::Result<()> {
/// let container = std::fs::File::open("/dev/vfio/vfio").expect("open");
/// // Fails: no group attached, so no IOMMU is set.
/// assert!(numapin::vfio::container::get_info(std::os::fd::AsFd::as_fd(&container)).is_err());
/// # Ok(()) }
/// ```
pub fn get_info(fd: BorrowedFd<'_>) -> Result<IommuInfo> {
    let hdr = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut argsz = hdr as u32;
    for _ in 0..2 {
        // u64 storage keeps the struct 8-byte aligned.
        let mut buf = vec![0u64; (argsz as usize).div_ceil(8)];
        let bytes = buf.len() * 8;
        buf[0] = u64::from(argsz);
        // SAFETY: the buffer is `bytes >= argsz` long and 8-byte aligned; the
        // kernel writes at most argsz bytes into it.
        let ret =
            unsafe { ioctl_with_mut_ptr(&fd, ioctls::VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(Error::sys(
                "VFIO_IOMMU_GET_INFO",
                "the container has no IOMMU set; was a group attached?",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: reinterpreting initialised u64s as bytes.
        let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), bytes) };
        let wanted = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        if wanted as usize <= bytes {
            return Ok(IommuInfo::parse(&raw[..wanted.max(hdr as u32) as usize])?);
        }
        argsz = wanted;
    }
    Err(Error::Invalid(
        "VFIO_IOMMU_GET_INFO kept growing its argsz".into(),
    ))
}

/// `VFIO_IOMMU_MAP_DMA`: maps `[vaddr, vaddr+len)` read-write at `iova`.
/// With an IOMMU-backed domain in the container this pins every page with
/// FOLL_LONGTERM (`vfio_pin_pages_remote`) and charges `VmLck`.
///
/// # Errors
/// The raw errno: `ENOMEM` (memlock limit, or the pin failed), `ENOSPC` (no
/// DMA entries left), `EEXIST` (IOVA overlap), `EINVAL` (misaligned or
/// outside the usable IOVA ranges), `EFAULT` (memory not mapped or not
/// writable).
///
/// # Safety
/// The memory must stay mapped until the range is unmapped: the IOMMU, and
/// the kernel's page references, point at it until then.
pub unsafe fn map_dma(fd: BorrowedFd<'_>, vaddr: VirtAddr, len: u64, iova: Iova) -> io::Result<()> {
    let flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    // SAFETY: the caller keeps the memory mapped (this function's contract).
    unsafe { map_dma_flags(fd, flags, vaddr, len, iova) }
}

/// `VFIO_IOMMU_MAP_DMA` of `[vaddr, vaddr+len)` at `iova` with `flags`.
///
/// # Safety
/// As [`map_dma`] and [`map_vaddr`]: the memory stays mapped until the
/// range is unmapped.
unsafe fn map_dma_flags(
    fd: BorrowedFd<'_>,
    flags: u32,
    vaddr: VirtAddr,
    len: u64,
    iova: Iova,
) -> io::Result<()> {
    let arg = vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr: vaddr.raw(),
        iova: iova.raw(),
        size: len,
    };
    // SAFETY: `arg` is a valid vfio_iommu_type1_dma_map the kernel only
    // reads; the caller keeps the memory mapped (this function's contract).
    let ret = unsafe { ioctl_with_ref(&fd, ioctls::VFIO_IOMMU_MAP_DMA(), &arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova+len)`; returns the bytes the
/// kernel unmapped (type1v2 refuses to split a mapping: `EINVAL`).
///
/// # Errors
/// The raw errno.
///
/// # Example
/// ```no_run
/// // On a file that is not a container the kernel answers ENOTTY.
/// let f = std::fs::File::open("/dev/null").unwrap();
/// let e = numapin::vfio::container::unmap_dma(std::os::fd::AsFd::as_fd(&f), numapin::Iova(0), 4096);
/// assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOTTY));
/// ```
pub fn unmap_dma(fd: BorrowedFd<'_>, iova: Iova, len: u64) -> io::Result<u64> {
    unmap_dma_flags(fd, 0, iova, len)
}

/// `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova+len)` with `flags`; returns the
/// size the kernel wrote back.
fn unmap_dma_flags(fd: BorrowedFd<'_>, flags: u32, iova: Iova, len: u64) -> io::Result<u64> {
    let mut arg = vfio_iommu_type1_dma_unmap {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
        flags,
        iova: iova.raw(),
        size: len,
        ..Default::default()
    };
    // SAFETY: `arg` is a valid vfio_iommu_type1_dma_unmap; the kernel writes
    // the unmapped size back into it. Unmapping never touches user memory.
    let ret = unsafe { ioctl_with_mut_ref(&fd, ioctls::VFIO_IOMMU_UNMAP_DMA(), &mut arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(arg.size)
}

/// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_VADDR` (Linux 5.12):
/// invalidates the virtual address of the mapping at `[iova, iova+len)`;
/// its pins and IOMMU entries stay, so the device keeps working while the
/// process re-executes.
///
/// # Errors
/// The raw errno (`EINVAL` for a range that is not one whole mapping).
pub fn unmap_vaddr(fd: BorrowedFd<'_>, iova: Iova, len: u64) -> io::Result<()> {
    let flags = vfio_bindings::bindings::vfio::VFIO_DMA_UNMAP_FLAG_VADDR;
    unmap_dma_flags(fd, flags, iova, len).map(drop)
}

/// `VFIO_IOMMU_MAP_DMA` with `VFIO_DMA_MAP_FLAG_VADDR` (Linux 5.12; the
/// accounting moves to the calling process since 6.3): gives a mapping
/// whose virtual address was invalidated its new one. Nothing is pinned
/// again.
///
/// # Errors
/// The raw errno (`ENOENT`: no mapping at `iova`; `EINVAL`: its vaddr was
/// not invalidated, or the size differs).
///
/// # Safety
/// `[vaddr, vaddr+len)` must map the pages the mapping holds (the same
/// file at the same offset) until the range is unmapped.
pub unsafe fn map_vaddr(
    fd: BorrowedFd<'_>,
    vaddr: VirtAddr,
    len: u64,
    iova: Iova,
) -> io::Result<()> {
    let flags = vfio_bindings::bindings::vfio::VFIO_DMA_MAP_FLAG_VADDR;
    // SAFETY: the caller keeps the new mapping in place (this function's
    // contract).
    unsafe { map_dma_flags(fd, flags, vaddr, len, iova) }
}

/// What a failed `VFIO_IOMMU_MAP_DMA` means (`vfio_dma_do_map`,
/// `vfio_pin_map_dma` in `drivers/vfio/vfio_iommu_type1.c`).
///
/// - `ENOMEM`: `RLIMIT_MEMLOCK` exceeded (when `memlock` has the numbers),
///   else the kernel could not pin (a page in ZONE_MOVABLE/CMA failed to
///   migrate, or memory ran out);
/// - `ENOSPC`: no DMA entries left (`dma_entry_limit`);
/// - `EEXIST`: the IOVA range overlaps a mapping;
/// - `EFAULT`: the memory is not mapped, not writable, or not pinnable
///   long-term (`/proc/self/maps`, read at the failure, tells which);
/// - anything else: the errno as is, with the call and its arguments.
pub(crate) fn map_error(ctx: MapContext<'_>, err: io::Error) -> Error {
    let (iova, len) = (ctx.iova, ctx.len);
    match err.raw_os_error() {
        Some(libc::ENOMEM) => match ctx.memlock {
            Some(e) => e,
            None => Error::PinNoMemory { iova, len },
        },
        Some(libc::ENOSPC) => Error::DmaEntriesExhausted {
            avail: ctx.dma_avail.unwrap_or(0),
        },
        Some(libc::EEXIST) => Error::IovaOverlap { iova, len },
        Some(libc::EFAULT) => {
            Error::not_pinnable("VFIO_IOMMU_MAP_DMA", ctx.vaddr.raw(), len, ctx.maps)
        }
        _ => Error::sys(
            format!(
                "VFIO_IOMMU_MAP_DMA of {} at {iova} for {}",
                human_size(len),
                ctx.device
            ),
            "",
            err,
        ),
    }
}

/// What [`map_error`] knows about the failed call.
pub(crate) struct MapContext<'a> {
    pub(crate) device: &'a str,
    pub(crate) vaddr: VirtAddr,
    pub(crate) iova: Iova,
    pub(crate) len: u64,
    /// The memlock error, if the limit explains an ENOMEM.
    pub(crate) memlock: Option<Error>,
    /// DMA_AVAIL read after the failure.
    pub(crate) dma_avail: Option<u32>,
    /// What `/proc/self/maps` says about the range, read after an EFAULT.
    pub(crate) maps: Option<crate::sys::RangeMapping>,
}

/// The container fd, owned by numapin or handed over by its owner.
enum ContainerFd {
    /// A container numapin opened (through vfio-ioctls).
    Opened(Arc<VfioContainer>),
    /// A container someone else owns; numapin holds a duplicate of its fd.
    Given(OwnedFd),
}

impl ContainerFd {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            // SAFETY: the VfioContainer owns this fd and lives as long as
            // `self`, which the borrow cannot outlive.
            ContainerFd::Opened(c) => unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) },
            ContainerFd::Given(fd) => fd.as_fd(),
        }
    }
}

/// A type1 container as an IOVA mapper.
pub(crate) struct Type1Container {
    fd: ContainerFd,
    info: IommuInfo,
    iova: Mutex<IovaAllocator>,
    /// Whether MAP_DMA pins (an IOMMU-backed domain is in the container).
    pins: bool,
    /// For messages: the device (or "the container") being mapped for.
    device: String,
    /// CAP_IPC_LOCK at open: RLIMIT_MEMLOCK does not bite with it.
    ipc_lock: bool,
    /// How a pinning MAP_DMA is accounted: VFIO's container charges
    /// `VmLck`; iommufd's compatibility container always `VmPin` (and
    /// `VmLck` only without CAP_IPC_LOCK).
    map_pin: MapPin,
}

/// Usable IOVA ranges when the kernel predates the IOVA-range capability
/// (before 5.4, commit a717072007e8 "vfio/type1: Add IOVA range capability
/// support"): a 48-bit space without the x86 MSI window.
fn default_iova_ranges() -> Vec<IovaRange> {
    [(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)]
        .into_iter()
        .filter_map(|(s, e)| IovaRange::new(Iova(s), Iova(e)))
        .collect()
}

impl Type1Container {
    /// A container numapin opened with `device`'s group in it.
    pub(crate) fn opened(
        container: Arc<VfioContainer>,
        pins: bool,
        device: String,
        ipc_lock: bool,
    ) -> Result<Type1Container> {
        Type1Container::new(ContainerFd::Opened(container), pins, device, ipc_lock)
    }

    /// A container someone else owns (a duplicate of its fd).
    pub(crate) fn given(
        fd: OwnedFd,
        pins: bool,
        device: String,
        ipc_lock: bool,
    ) -> Result<Type1Container> {
        Type1Container::new(ContainerFd::Given(fd), pins, device, ipc_lock)
    }

    fn new(fd: ContainerFd, pins: bool, device: String, ipc_lock: bool) -> Result<Type1Container> {
        let info = get_info(fd.fd())?;
        let ranges = info.iova_ranges.clone().unwrap_or_else(default_iova_ranges);
        let alloc = IovaAllocator::new(ranges, info.min_page_size())?;
        // iommufd's /dev/vfio/vfio answers its own ioctls; VFIO's container
        // hands unknown ones to type1, which refuses them (ENOTTY).
        let map_pin = match crate::iommufd::rlimit_mode(fd.fd()) {
            Ok(_) => MapPin::IOMMUFD_COMPAT,
            Err(_) => MapPin::TYPE1,
        };
        Ok(Type1Container {
            fd,
            info,
            iova: Mutex::new(alloc),
            pins,
            device,
            ipc_lock,
            map_pin,
        })
    }
}

impl IovaMapper for Type1Container {
    fn addressing(&self) -> DmaAddressing {
        DmaAddressing::Iova
    }

    fn pins_on_map(&self) -> bool {
        self.pins
    }

    fn map_pin(&self) -> MapPin {
        self.map_pin
    }

    fn info(&self) -> Option<&IommuInfo> {
        Some(&self.info)
    }

    fn refresh_info(&self) -> Result<Option<IommuInfo>> {
        get_info(self.fd.fd()).map(Some)
    }

    fn allocator(&self) -> Option<&Mutex<IovaAllocator>> {
        Some(&self.iova)
    }

    unsafe fn map(&self, vaddr: VirtAddr, len: u64, iova: Iova) -> Result<()> {
        // SAFETY: this function's contract is map_dma's.
        unsafe { map_dma(self.fd.fd(), vaddr, len, iova) }.map_err(|e| {
            let enomem = e.raw_os_error() == Some(libc::ENOMEM);
            let enospc = e.raw_os_error() == Some(libc::ENOSPC);
            let efault = e.raw_os_error() == Some(libc::EFAULT);
            let ctx = MapContext {
                device: &self.device,
                vaddr,
                iova,
                len,
                memlock: enomem
                    .then(|| {
                        crate::precheck::memlock_error(self.map_pin.accounting, len, self.ipc_lock)
                    })
                    .flatten(),
                dma_avail: if enospc {
                    get_info(self.fd.fd()).ok().and_then(|i| i.dma_avail)
                } else {
                    None
                },
                maps: efault
                    .then(|| crate::sys::range_mapping(vaddr.raw(), len).ok())
                    .flatten(),
            };
            map_error(ctx, e)
        })
    }

    fn suspend_vaddr(&self, iova: Iova, len: u64) -> Result<()> {
        unmap_vaddr(self.fd.fd(), iova, len).map_err(|e| {
            Error::sys(
                format!("VFIO_IOMMU_UNMAP_DMA(FLAG_VADDR) {iova}+{len:#x}"),
                "live update needs Linux 5.12+ and a container without mdev groups",
                e,
            )
        })
    }

    unsafe fn resume_vaddr(&self, vaddr: VirtAddr, iova: Iova, len: u64) -> Result<()> {
        // SAFETY: this function's contract is map_vaddr's.
        unsafe { map_vaddr(self.fd.fd(), vaddr, len, iova) }.map_err(|e| {
            Error::sys(
                format!("VFIO_IOMMU_MAP_DMA(FLAG_VADDR) {iova}+{len:#x}"),
                "the IOVA must name a whole mapping suspended before the exec",
                e,
            )
        })?;
        self.reserve_resumed(iova, len);
        Ok(())
    }

    fn unmap(&self, iova: Iova, len: u64) -> Result<()> {
        unmap_dma(self.fd.fd(), iova, len)
            .map(drop)
            .map_err(|e| Error::sys(format!("VFIO_IOMMU_UNMAP_DMA {iova}+{len:#x}"), "", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_null() -> std::fs::File {
        std::fs::File::open("/dev/null").expect("/dev/null")
    }

    // kvm-ioctls style: every wrapper on an fd that is not a container
    // returns the kernel's errno, not a panic or a success.
    #[test]
    fn wrappers_on_a_bogus_fd() {
        let f = dev_null();
        let e = unmap_dma(f.as_fd(), Iova(0), 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        // SAFETY: the kernel refuses the ioctl before looking at memory.
        let e = unsafe { map_dma(f.as_fd(), VirtAddr(0x1000), 4096, Iova(0)) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        match get_info(f.as_fd()) {
            Err(Error::Sys { op, .. }) => assert_eq!(op, "VFIO_IOMMU_GET_INFO"),
            other => panic!("{other:?}"),
        }
    }

    fn ctx(memlock: Option<Error>, dma_avail: Option<u32>) -> MapContext<'static> {
        MapContext {
            device: "0000:3b:00.0",
            vaddr: VirtAddr(0x7f00_0000_0000),
            iova: Iova(0x10_0000),
            len: 2 << 20,
            memlock,
            dma_avail,
            maps: None,
        }
    }

    #[test]
    fn map_errnos_become_causes() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(matches!(
            map_error(ctx(None, None), e(libc::ENOMEM)),
            Error::PinNoMemory { len, .. } if len == 2 << 20
        ));
        let limit = Error::MemlockLimit {
            limit: 64 << 10,
            locked: 0,
            len: 2 << 20,
        };
        assert!(matches!(
            map_error(ctx(Some(limit), None), e(libc::ENOMEM)),
            Error::MemlockLimit { .. }
        ));
        assert!(matches!(
            map_error(ctx(None, Some(0)), e(libc::ENOSPC)),
            Error::DmaEntriesExhausted { avail: 0 }
        ));
        assert!(matches!(
            map_error(ctx(None, None), e(libc::EEXIST)),
            Error::IovaOverlap {
                iova: Iova(0x10_0000),
                ..
            }
        ));
        let ro = MapContext {
            maps: Some(crate::sys::RangeMapping::NotWritable {
                start: 0x7f00_0000_0000,
                perms: "r--p".into(),
                path: String::new(),
            }),
            ..ctx(None, None)
        };
        let msg = map_error(ro, e(libc::EFAULT)).to_string();
        assert!(
            msg.contains("(r--p) is not writable") && msg.contains("PROT_READ|PROT_WRITE"),
            "{msg}"
        );
        let other = map_error(ctx(None, None), e(libc::EIO)).to_string();
        assert!(
            other.contains("VFIO_IOMMU_MAP_DMA of 2 MiB at 0x100000 for 0000:3b:00.0"),
            "{other}"
        );
    }
}
