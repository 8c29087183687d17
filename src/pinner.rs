//! [`Pinner`]: the service object above the two seams of
//! [`crate::backend`]. It opens a device (or takes a container
//! someone else owns), and for each request checks what it can before
//! touching the kernel, allocates and prefaults on the node, takes the pin
//! through the pin source and the mapping through the mapper, proves both,
//! and hands out a [`PinnedRegion`]. On any failure it undoes what it did.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use vfio_ioctls::VfioDevice;

use crate::addr::{Iova, VirtAddr};
use crate::backend::{self, Accounting, Backend, DmaAddressing, IovaMapper, NoMapper, PinSource};
use crate::error::{Error, Result};
use crate::numa::{NodeMemory, Topology};
use crate::precheck::{self, OomGuard, check_memlock};
use crate::prove::{self, Range};
use crate::region::{PinnedRegion, RegionParts};
use crate::request::{PinRequest, iova_align};
use crate::sys;
use crate::uring::UringPin;
use crate::vfio::info::IommuInfo;
use crate::vfio::sysfs::{DeviceInfo, describe};
use crate::vfio::{ContainerKind, DeviceFd, container::Type1Container, noiommu, open};

mod caller;
mod iommufd;

/// The device numapin opened, kept open as long as any region lives: its
/// group keeps the container's IOMMU domain (and so every mapping) alive.
enum OpenDevice {
    Type1(VfioDevice),
    NoIommu(noiommu::NoIommuDevice),
    Cdev(crate::iommufd::CdevDevice),
}

/// What a [`Pinner`] and its regions share.
struct Shared {
    // Field order is drop order: the device (and with it the group) goes
    // before the container the mapper holds.
    /// `None` on a container someone else owns.
    device: Option<OpenDevice>,
    mapper: Arc<dyn IovaMapper>,
    source: PinSource,
    /// The device numapin opened (`None` on a container someone else owns).
    dev: Option<DeviceInfo>,
    kind: ContainerKind,
    /// The interface in use (never `Auto`).
    backend: Backend,
    /// For messages: the device's name, or "the caller's container".
    name: String,
    topology: Topology,
    /// CAP_IPC_LOCK at open time (RLIMIT_MEMLOCK does not apply with it).
    ipc_lock: bool,
    /// The kernel seam for the accounting counter (tests replace it).
    read_counter: fn(Accounting) -> Result<u64>,
}

/// The service handle: a VFIO device, its group and container, the
/// container's IOMMU info, and an IOVA allocator over its usable ranges.
///
/// How a region is pinned depends on the [`ContainerKind`]:
/// - IOMMU-backed type1: one `VFIO_IOMMU_MAP_DMA`, which pins every page
///   long-term and maps it at the region's IOVA;
/// - mdev-only type1: an io_uring long-term pin (registered buffers), then
///   MAP_DMA, which there only records the IOVA for the vendor driver;
/// - no-IOMMU: the io_uring pin alone; the device uses physical addresses.
///
/// Cloning is cheap and shares the container.
#[derive(Clone)]
pub struct Pinner {
    inner: Arc<Shared>,
}

impl fmt::Debug for Pinner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinner")
            .field("device", &self.inner.name)
            .field("group", &self.inner.dev.as_ref().map(|d| d.group))
            .field("kind", &self.inner.kind)
            .finish()
    }
}

impl Pinner {
    /// Opens `spec` (a PCI address such as `0000:3b:00.0`, an mdev UUID, or
    /// a sysfs path) through the backend the environment variable
    /// `NUMAPIN_BACKEND` names (`auto`, `type1`, `iommufd`), [`Backend::Auto`]
    /// when it is unset: through the device's VFIO cdev into an iommufd IOAS
    /// where the kernel and device offer it, else in a new type1v2 container
    /// through vfio-ioctls, or, for a no-IOMMU group, in a no-IOMMU
    /// container; then reads the usable IOVA ranges (`VFIO_IOMMU_GET_INFO`
    /// on type1, `IOMMU_IOAS_IOVA_RANGES` on iommufd).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `NUMAPIN_BACKEND` names no backend;
    /// [`Error::DeviceNotFound`], [`Error::NotBoundToVfio`],
    /// [`Error::NoIommuGroup`], [`Error::GroupNotViable`],
    /// [`Error::PermissionDenied`], [`Error::GroupBusy`], and for no-IOMMU
    /// groups [`Error::NoIommuNeedsRawio`] and [`Error::NoIommuModeOff`].
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> numapin::Result<()> {
    /// let pinner = numapin::Pinner::open("0000:3b:00.0")?;
    /// println!("{} in group {:?}", pinner.kind().name(), pinner.device_info().map(|d| d.group));
    /// # Ok(()) }
    /// ```
    pub fn open(spec: &str) -> Result<Pinner> {
        Pinner::open_with(spec, Backend::from_env()?)
    }

    /// Opens `spec` through the chosen backend. [`Pinner::open`] is this
    /// with the backend `NUMAPIN_BACKEND` names, [`Backend::Auto`] by
    /// default. With iommufd the device is opened through its VFIO cdev,
    /// bound to a new `/dev/iommu` context and attached to an IOAS before
    /// the IOAS's IOVA ranges are read (see [`crate::iommufd`]); every pin
    /// then grows `VmPin`.
    ///
    /// # Errors
    /// Those of [`Pinner::open`], and [`Error::IommufdUnavailable`] when
    /// [`Backend::Iommufd`] is asked for a device or kernel that lacks it.
    pub fn open_with(spec: &str, backend: Backend) -> Result<Pinner> {
        let dev = describe(spec)?;
        dev.check_openable()?;
        let topology = Topology::read()?;
        let ipc_lock = sys::has_cap(sys::Cap::IpcLock);
        let backend = backend.resolve(&dev, crate::iommufd::available());
        if backend == Backend::Iommufd && dev.kind != ContainerKind::Type1Iommu {
            return Err(Error::IommufdUnavailable {
                device: dev.name.clone(),
                reason: format!(
                    "it is {}, which numapin pins through io_uring in a VFIO container",
                    dev.kind
                ),
            });
        }
        let (device, mapper): (OpenDevice, Arc<dyn IovaMapper>) = match dev.kind {
            _ if backend == Backend::Iommufd => {
                let (device, mapper) = crate::iommufd::open(&dev, ipc_lock)?;
                (OpenDevice::Cdev(device), Arc::new(mapper))
            }
            ContainerKind::NoIommu => (
                OpenDevice::NoIommu(noiommu::open(&dev)?),
                Arc::new(NoMapper {
                    device: dev.name.clone(),
                }),
            ),
            kind => {
                let (device, container) = open::open_type1(&dev)?;
                let pins = kind == ContainerKind::Type1Iommu;
                let mapper = Type1Container::opened(container, pins, dev.name.clone(), ipc_lock)?;
                (OpenDevice::Type1(device), Arc::new(mapper))
            }
        };
        let source = PinSource::for_mapper(mapper.as_ref());
        log::debug!(
            "opened {} (group {}, {}, {}): pins with {}",
            dev.name,
            dev.group,
            dev.kind.name(),
            backend.name(),
            source.call()
        );
        Ok(Pinner {
            inner: Arc::new(Shared {
                device: Some(device),
                mapper,
                source,
                kind: dev.kind,
                backend,
                name: dev.name.clone(),
                dev: Some(dev),
                topology,
                ipc_lock,
                read_counter: prove::read_counter,
            }),
        })
    }

    /// The device as sysfs described it when it was opened (`None` on a
    /// container the caller owns).
    pub fn device_info(&self) -> Option<&DeviceInfo> {
        self.inner.dev.as_ref()
    }

    /// The container kind.
    pub fn kind(&self) -> ContainerKind {
        self.inner.kind
    }

    /// The backend in use: [`Backend::Type1`] or [`Backend::Iommufd`].
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// How a pin through this pinner is accounted: the `/proc/self/status`
    /// counter that grows by each region's size (`VmLck` on type1,
    /// `VmPin` on iommufd and io_uring).
    pub fn accounting(&self) -> Accounting {
        self.inner.source.accounting()
    }

    /// The container's `VFIO_IOMMU_GET_INFO` as read at open time (`None`
    /// in no-IOMMU mode, which has no IOMMU to describe).
    pub fn iommu_info(&self) -> Option<&IommuInfo> {
        self.inner.mapper.info()
    }

    /// Reads `VFIO_IOMMU_GET_INFO` again (e.g. for a current DMA_AVAIL);
    /// `None` in no-IOMMU mode.
    ///
    /// # Errors
    /// [`Error::Sys`] if the ioctl fails, [`Error::Info`] if its reply
    /// cannot be parsed.
    pub fn refresh_info(&self) -> Result<Option<IommuInfo>> {
        self.inner.mapper.refresh_info()
    }

    /// The NUMA topology read at open time.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The opened VFIO device fd, for register and config-space access
    /// (`None` on a container the caller owns: use the caller's device).
    pub fn device_fd(&self) -> Option<DeviceFd<'_>> {
        Some(match self.inner.device.as_ref()? {
            OpenDevice::Type1(d) => {
                use std::os::fd::AsRawFd;
                let raw = d.as_raw_fd();
                // SAFETY: the fd is the VfioDevice's VFIO device fd, and the
                // device lives as long as `self`, so it outlives the borrow.
                unsafe { DeviceFd::new(BorrowedFd::borrow_raw(raw)) }
            }
            OpenDevice::NoIommu(d) => d.fd(),
            // SAFETY: the cdev fd is the device fd and lives as long as
            // `self`, so it outlives the borrow.
            OpenDevice::Cdev(d) => unsafe { DeviceFd::new(d.fd()) },
        })
    }

    /// Allocates `req.size` bytes on `req.node`, faults them in there, pins
    /// them (see [`Pinner`] for how, per container kind), and proves the pin
    /// as `req.proof` asks (by default: the accounting grew by the size,
    /// every page is on the node, and a PFN snapshot is kept).
    ///
    /// On error nothing is left behind: no mapping, no pinned or locked
    /// memory, no allocation, no IOVA reservation.
    ///
    /// # Errors
    /// Before anything is allocated: [`Error::ZeroSize`],
    /// [`Error::UnalignedSize`], [`Error::UnalignedIova`],
    /// [`Error::UnalignedForIommu`], [`Error::NodeNotOnline`],
    /// [`Error::NotEnoughHugepages`], [`Error::MemlockLimit`],
    /// [`Error::Iova`], [`Error::IovaWithoutIommu`]. While allocating:
    /// [`Error::Populate`], [`Error::Cancelled`]. While pinning and proving:
    /// the pin source's and mapper's errors ([`Error::PinNoMemory`],
    /// [`Error::DmaEntriesExhausted`], [`Error::IovaOverlap`], io_uring's
    /// errors), [`Error::NotAccounted`], [`Error::Misplaced`],
    /// [`Error::ExtentTooSmall`].
    ///
    /// # Example
    /// ```no_run
    /// use numapin::{NodeId, PageSize, PinRequest, Pinner};
    /// # fn main() -> numapin::Result<()> {
    /// let pinner = Pinner::open("0000:3b:00.0")?;
    /// let region = pinner.pin(&PinRequest {
    ///     page_size: PageSize::Huge2M,
    ///     ..PinRequest::new(NodeId(1), 64 << 20)
    /// })?;
    /// assert!(region.verify()?.is_intact());
    /// # Ok(()) }
    /// ```
    pub fn pin(&self, req: &PinRequest<'_>) -> Result<PinnedRegion> {
        req.validate()?;
        let node = req.node.ok_or_else(|| {
            Error::Invalid(
                "memory numapin allocates needs a node; set PinRequest::node (see `numapin topology`)".into(),
            )
        })?;
        let (size, page_size) = (req.size, req.page_size);
        self.check_iommu_alignment(size)?;
        self.inner.topology.require(node)?;
        // Hugepage counts change at run time: read them now, not at open.
        Topology::read()?.check_capacity(node, size, page_size)?;
        precheck::check_hugepage_reservations(size, page_size)?;
        precheck::check_node_memory(node, size, page_size)?;
        precheck::check_memcg(size, page_size)?;
        self.check_pin_resources(None, size, page_size)?;
        // NodeMemory puts a region of 2 MiB or more on a 2 MiB boundary
        // (so any 2 MiB-aligned address stands for it here).
        let align = iova_align(0, size, page_size.bytes());
        let reservation = self.reserve_iova(req.iova, size, align)?;
        // If the node still runs dry, the OOM killer takes numapin, not a
        // bystander.
        let oom = OomGuard::new();
        let mem = NodeMemory::allocate_backed(
            &self.inner.topology,
            node,
            size,
            page_size,
            req.backing,
            req.threads,
            req.progress,
            req.cancel.as_ref(),
        )?;
        drop(oom);
        if req.cancel.as_ref().is_some_and(crate::Cancel::is_cancelled) {
            // Prefault finished as the cancel came: pin nothing. `mem` is
            // freed and the IOVA returned as they drop.
            return Err(Error::Cancelled {
                step: "pin",
                done: 0,
                len: size,
            });
        }
        let range = Range {
            vaddr: VirtAddr(mem.addr() as u64),
            len: size,
            node: Some(node),
            page_size,
            min_extent: req.min_extent,
            proof: req.proof,
        };
        if let (Some(f), Some(fd)) = (req.on_memfd, mem.memfd()) {
            f(fd);
        }
        // A memfd region is mapped by file where the backend can.
        let file = mem.memfd().map(|f| (f.as_raw_fd(), 0));
        self.pin_range(reservation, range, file, Some(mem))
    }

    /// Pins caller-owned memory: `req.size` bytes at `vaddr`, at `req.iova`
    /// (or at an IOVA numapin picks) — the VMM case, guest RAM pinned at
    /// IOVA = guest-physical address. `req.page_size` says what backs the
    /// memory (it sets the placement-check stride); if `req.node` is given,
    /// every page must be on it after pinning. The region does not own the
    /// memory and never unmaps it; `req.threads`, `progress` and `cancel`
    /// do not apply (nothing is prefaulted).
    ///
    /// # Safety
    /// The memory must stay mapped (not `munmap`ed or replaced) until the
    /// returned region is dropped or released: the device keeps DMA access
    /// to the pinned pages until then. While pinned, a device may read and
    /// write it at any time, so the caller must not hold Rust references to
    /// it — only raw pointers with volatile or atomic access, or system
    /// calls.
    ///
    /// # Errors
    /// [`Error::UnalignedUserMemory`] for an address or length off the page
    /// size, and the errors of [`Pinner::pin`] from the IOMMU alignment on
    /// (nothing is allocated here).
    pub unsafe fn pin_user(&self, vaddr: *mut u8, req: &PinRequest<'_>) -> Result<PinnedRegion> {
        let addr = VirtAddr::of(vaddr);
        let len = req.size;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let page = req.page_size.bytes().max(crate::addr::base_page_size());
        if !addr.is_aligned(page) || len % page != 0 {
            return Err(Error::UnalignedUserMemory {
                vaddr: addr.raw(),
                len,
                page,
            });
        }
        req.validate()?;
        self.check_iommu_alignment(len)?;
        if let Some(n) = req.node {
            self.inner.topology.require(n)?;
        }
        if let Some((fd, offset)) = req.file {
            caller::check_backing_file(addr, len, fd, offset)?;
        }
        self.check_pin_resources(Some(addr.raw() as usize), len, req.page_size)?;
        let reservation = self.reserve_iova(req.iova, len, iova_align(addr.raw(), len, page))?;
        let range = Range {
            vaddr: addr,
            len,
            node: req.node,
            page_size: req.page_size,
            min_extent: req.min_extent,
            proof: req.proof,
        };
        let file = req.file.map(|(f, off)| (f.as_raw_fd(), off));
        self.pin_range(reservation, range, file, None)
    }

    /// Pins and checks the range at the reserved IOVA and wraps it in a
    /// region (owning `mem`, if given). `file`: the file and offset the
    /// range maps, open for the duration of the call, to map by file where
    /// the backend can. If a mapping could not be undone after a failed
    /// check, neither the IOVA nor the memory is ever reused: a device may
    /// still reach it.
    fn pin_range(
        &self,
        reservation: Option<IovaReservation<'_>>,
        range: Range,
        file: Option<(RawFd, u64)>,
        mem: Option<NodeMemory>,
    ) -> Result<PinnedRegion> {
        let iova = reservation.as_ref().map(|r| r.iova);
        let (uring, pfns, by_file) = match self.pin_checked(&range, iova, file) {
            Ok(p) => p,
            Err(MapFailure {
                error,
                still_mapped,
            }) => {
                if still_mapped {
                    reservation.map(IovaReservation::keep);
                    if let Some(m) = mem {
                        m.leak();
                    }
                }
                return Err(error);
            }
        };
        let iova = reservation.map(IovaReservation::keep);
        Ok(PinnedRegion::new(RegionParts {
            iova,
            node: range.node,
            memory: mem,
            uring,
            pfns,
            by_file,
            ..self.region_parts(range.vaddr, range.len, range.page_size)
        }))
    }

    /// What every region of this pinner is made of: the mapper that maps
    /// it, the shared state that keeps the device open, the kind and pin
    /// source; no IOVA, node, memory, io_uring pin or PFNs yet.
    fn region_parts(&self, vaddr: VirtAddr, len: u64, page_size: crate::PageSize) -> RegionParts {
        let keep: Arc<dyn Send + Sync> = self.inner.clone();
        RegionParts {
            mapper: self.inner.mapper.clone(),
            keep,
            kind: self.inner.kind,
            source: self.inner.source,
            device: self.inner.name.clone(),
            iova: None,
            len,
            vaddr,
            node: None,
            page_size,
            memory: None,
            uring: None,
            pfns: None,
            by_file: false,
        }
    }

    /// What the pin itself consumes: memlock (by the pin source's rule),
    /// the ring descriptors of an io_uring pin (as many as its rings, for
    /// memory of `page_size` at `vaddr`, or at any start when numapin has
    /// not allocated it yet), a DMA mapping entry.
    fn check_pin_resources(
        &self,
        vaddr: Option<usize>,
        len: u64,
        page_size: crate::PageSize,
    ) -> Result<()> {
        let s = &self.inner;
        check_memlock(s.source.accounting(), len, s.ipc_lock)?;
        if s.source == PinSource::Uring {
            precheck::check_fds(crate::uring::rings_for(vaddr, len, page_size))?;
        }
        if s.mapper.addressing() == DmaAddressing::Iova {
            if let Some(0) = s
                .mapper
                .refresh_info()
                .ok()
                .flatten()
                .and_then(|i| i.dma_avail)
            {
                return Err(Error::DmaEntriesExhausted { avail: 0 });
            }
        }
        Ok(())
    }

    fn check_iommu_alignment(&self, size: u64) -> Result<()> {
        let min_page = self
            .iommu_info()
            .map_or(crate::addr::base_page_size(), IommuInfo::min_page_size);
        if size % min_page != 0 {
            return Err(Error::UnalignedForIommu { size, min_page });
        }
        Ok(())
    }

    /// Reserves the IOVA range (or refuses one for a no-IOMMU device, which
    /// has none: `Ok(None)` when none was asked for).
    fn reserve_iova(
        &self,
        iova: Option<Iova>,
        len: u64,
        align: u64,
    ) -> Result<Option<IovaReservation<'_>>> {
        let mapper = self.inner.mapper.as_ref();
        let Some(alloc) = mapper.allocator() else {
            return match iova {
                Some(_) => Err(Error::IovaWithoutIommu {
                    device: self.inner.name.clone(),
                }),
                None => Ok(None),
            };
        };
        let mut alloc = alloc.lock().unwrap_or_else(|p| p.into_inner());
        let iova = match iova {
            Some(i) => {
                alloc.reserve(i, len)?;
                i
            }
            None => alloc.allocate(len, align)?,
        };
        Ok(Some(IovaReservation {
            mapper,
            iova,
            armed: true,
        }))
    }

    /// Takes the pin for this container kind, then proves it. Undoes
    /// everything on failure. Runs under the accounting lock.
    fn pin_checked(
        &self,
        r: &Range,
        iova: Option<Iova>,
        file: Option<(RawFd, u64)>,
    ) -> std::result::Result<Pinned, MapFailure> {
        backend::serialized(|| {
            let unmapped = |error: Error| MapFailure {
                error,
                still_mapped: false,
            };
            let s = &self.inner;
            let acct = s.source.accounting();
            let read = || (s.read_counter)(acct);
            let before = match r.proof {
                crate::Proof::None => 0,
                _ => read().map_err(unmapped)?,
            };
            let uring = match s.source {
                PinSource::Mapping(_) => None,
                PinSource::Uring => {
                    // SAFETY: the region keeps the memory mapped until it
                    // releases the pin (owned NodeMemory, or caller memory
                    // under pin_user's contract); on failure below the pin
                    // is dropped first.
                    let pin = unsafe { UringPin::new(r.vaddr.as_mut_ptr(), r.len, r.page_size) };
                    Some(pin.map_err(unmapped)?)
                }
            };
            let mut by_file = false;
            if let Some(iova) = iova {
                by_file = self.map_by_file(r, iova, file).map_err(unmapped)?;
                if !by_file {
                    // SAFETY: as above; a failure drops `uring`, which
                    // unregisters the buffers.
                    unsafe { s.mapper.map(r.vaddr, r.len, iova) }.map_err(unmapped)?;
                }
            }
            let physical = s.mapper.addressing() == DmaAddressing::Physical;
            match prove::prove(r, s.source, before, &read, physical) {
                Ok(pfns) => Ok((uring, pfns, by_file)),
                Err(error) => {
                    let still_mapped = match iova {
                        Some(iova) => match s.mapper.unmap(iova, r.len) {
                            Ok(()) => false,
                            Err(e) => {
                                log::error!(
                                    "could not undo the mapping at {iova} ({e}); leaking it and its memory"
                                );
                                true
                            }
                        },
                        None => false,
                    };
                    if still_mapped {
                        // The IOVA stays recorded: keep the pages pinned too.
                        std::mem::forget(uring);
                    }
                    Err(MapFailure {
                        error,
                        still_mapped,
                    })
                }
            }
        })
    }
}

/// A successful pin: the io_uring pin (if that is the source), the PFN
/// snapshot (when readable), and whether the range was mapped by file.
type Pinned = (Option<UringPin>, Option<crate::phys::Frames>, bool);

/// A failed map: the error, and whether the range could not be unmapped
/// again (then its memory and IOVA must never be reused).
struct MapFailure {
    error: Error,
    still_mapped: bool,
}

/// An IOVA reservation that is returned to the allocator unless kept.
struct IovaReservation<'a> {
    mapper: &'a dyn IovaMapper,
    iova: Iova,
    armed: bool,
}

impl IovaReservation<'_> {
    fn keep(mut self) -> Iova {
        self.armed = false;
        self.iova
    }
}

impl Drop for IovaReservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mapper.free_iova(self.iova);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The pin path's error handling on any host, through the mapper seam:
    //! a fake mapper that fails on command and records what was undone,
    //! and a fake accounting counter.
    use std::cell::Cell;
    use std::sync::Mutex;

    use super::*;
    use crate::addr::NodeId;
    use crate::backend::MapPin;
    use crate::iova::{IovaAllocator, IovaRange};
    use crate::request::Proof;

    thread_local! {
        /// What the fake kernel's `VmLck` reads on this test's thread.
        static LOCKED: Cell<u64> = const { Cell::new(0) };
    }

    fn fake_counter(_: Accounting) -> Result<u64> {
        Ok(LOCKED.with(Cell::get))
    }

    #[derive(Default)]
    struct Behaviour {
        /// The error MAP_DMA returns, if any.
        map_fails: Option<fn() -> Error>,
        /// MAP_DMA succeeds but the counter does not grow.
        no_accounting: bool,
        /// UNMAP_DMA fails.
        unmap_fails: bool,
    }

    struct FakeMapper {
        alloc: Mutex<IovaAllocator>,
        how: Behaviour,
        calls: Mutex<Vec<String>>,
    }

    impl FakeMapper {
        fn new(how: Behaviour) -> Arc<FakeMapper> {
            let ranges = vec![IovaRange::new(Iova(0x10_0000), Iova(0xffff_ffff)).unwrap()];
            Arc::new(FakeMapper {
                alloc: Mutex::new(IovaAllocator::new(ranges, 4096).unwrap()),
                how,
                calls: Mutex::new(Vec::new()),
            })
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn allocated(&self) -> usize {
            self.alloc.lock().unwrap().allocations().count()
        }
    }

    impl IovaMapper for FakeMapper {
        fn addressing(&self) -> DmaAddressing {
            DmaAddressing::Iova
        }
        fn pins_on_map(&self) -> bool {
            true
        }
        fn info(&self) -> Option<&IommuInfo> {
            None
        }
        fn refresh_info(&self) -> Result<Option<IommuInfo>> {
            Ok(None)
        }
        fn allocator(&self) -> Option<&Mutex<IovaAllocator>> {
            Some(&self.alloc)
        }
        unsafe fn map(&self, _: VirtAddr, len: u64, iova: Iova) -> Result<()> {
            if let Some(e) = self.how.map_fails {
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("map {iova} failed"));
                return Err(e());
            }
            if !self.how.no_accounting {
                LOCKED.with(|c| c.set(c.get() + len));
            }
            self.calls.lock().unwrap().push(format!("map {iova}"));
            Ok(())
        }
        fn unmap(&self, iova: Iova, len: u64) -> Result<()> {
            if self.how.unmap_fails {
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("unmap {iova} failed"));
                return Err(Error::sys(
                    "VFIO_IOMMU_UNMAP_DMA",
                    "",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            if !self.how.no_accounting {
                LOCKED.with(|c| c.set(c.get() - len));
            }
            self.calls.lock().unwrap().push(format!("unmap {iova}"));
            Ok(())
        }
    }

    fn pinner_on(mapper: Arc<FakeMapper>) -> Pinner {
        Pinner {
            inner: Arc::new(Shared {
                device: None,
                mapper,
                source: PinSource::Mapping(MapPin::TYPE1),
                dev: None,
                kind: ContainerKind::Type1Iommu,
                backend: Backend::Type1,
                name: "fake".into(),
                topology: Topology { nodes: Vec::new() },
                ipc_lock: true,
                read_counter: fake_counter,
            }),
        }
    }

    /// Two pages of anonymous memory the test owns.
    struct Pages(*mut u8);
    const LEN: u64 = 2 * 4096;
    impl Pages {
        fn new() -> Pages {
            // SAFETY: a fresh anonymous mapping aliases nothing.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    LEN as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Pages(p.cast())
        }
    }
    impl Drop for Pages {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no references into it remain.
            unsafe { libc::munmap(self.0.cast(), LEN as usize) };
        }
    }

    fn req() -> PinRequest<'static> {
        PinRequest {
            proof: Proof::Accounting,
            ..PinRequest::any_node(LEN)
        }
    }

    #[test]
    fn a_failed_map_leaves_no_iova_and_no_mapping() {
        let fake = FakeMapper::new(Behaviour {
            map_fails: Some(|| Error::DmaEntriesExhausted { avail: 0 }),
            ..Behaviour::default()
        });
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        // SAFETY: `mem` outlives every region of this test.
        let e = unsafe { p.pin_user(mem.0, &req()) }.unwrap_err();
        assert!(matches!(e, Error::DmaEntriesExhausted { .. }), "{e}");
        assert_eq!(fake.allocated(), 0, "the IOVA went back to the allocator");
        assert_eq!(fake.calls(), ["map 0x100000 failed"]);
    }

    #[test]
    fn a_pin_the_counter_does_not_show_is_undone() {
        let fake = FakeMapper::new(Behaviour {
            no_accounting: true,
            ..Behaviour::default()
        });
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        // SAFETY: as above.
        let e = unsafe { p.pin_user(mem.0, &req()) }.unwrap_err();
        match e {
            Error::NotAccounted {
                counter, grew, len, ..
            } => {
                assert_eq!((counter, grew, len), ("VmLck", 0, LEN));
            }
            other => panic!("{other}"),
        }
        assert_eq!(fake.calls(), ["map 0x100000", "unmap 0x100000"]);
        assert_eq!(fake.allocated(), 0);
    }

    #[test]
    fn an_undo_that_fails_keeps_the_iova_reserved() {
        let fake = FakeMapper::new(Behaviour {
            no_accounting: true,
            unmap_fails: true,
            ..Behaviour::default()
        });
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        // SAFETY: as above.
        let e = unsafe { p.pin_user(mem.0, &req()) }.unwrap_err();
        assert!(matches!(e, Error::NotAccounted { .. }), "{e}");
        // The device may still reach the range: its IOVA is never reused.
        assert_eq!(fake.allocated(), 1);
        // SAFETY: as above.
        let again = unsafe { p.pin_user(mem.0, &req()) }.unwrap_err();
        assert!(matches!(again, Error::NotAccounted { .. }));
        assert_eq!(
            fake.calls(),
            [
                "map 0x100000",
                "unmap 0x100000 failed",
                "map 0x102000",
                "unmap 0x102000 failed"
            ]
        );
    }

    #[test]
    fn release_unmaps_and_frees_the_iova() {
        let fake = FakeMapper::new(Behaviour::default());
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        // SAFETY: as above.
        let r = unsafe { p.pin_user(mem.0, &req()) }.unwrap();
        assert_eq!(r.iova(), Some(Iova(0x10_0000)));
        assert_eq!(r.pin_kind(), "vfio-map-dma");
        assert_eq!(LOCKED.with(Cell::get), LEN);
        drop(p); // the region keeps what it needs
        r.release().unwrap();
        assert_eq!(LOCKED.with(Cell::get), 0);
        assert_eq!(fake.allocated(), 0);
        assert_eq!(fake.calls(), ["map 0x100000", "unmap 0x100000"]);
    }

    #[test]
    fn a_region_whose_unmap_fails_on_drop_keeps_its_iova() {
        let fake = FakeMapper::new(Behaviour {
            unmap_fails: true,
            ..Behaviour::default()
        });
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        // SAFETY: as above.
        let r = unsafe { p.pin_user(mem.0, &req()) }.unwrap();
        assert!(r.release().is_err());
        assert_eq!(fake.allocated(), 1);
    }

    fn device(kind: ContainerKind, cdev: bool) -> DeviceInfo {
        DeviceInfo {
            name: "0000:00:03.0".into(),
            sysfs: "/sys/bus/pci/devices/0000:00:03.0".into(),
            driver: Some("vfio-pci".into()),
            group: 3,
            group_node: "/dev/vfio/3".into(),
            members: Vec::new(),
            kind,
            cdev: cdev.then(|| "/dev/vfio/devices/vfio0".into()),
            vfio_container: crate::iommufd::VfioContainerProvider::Vfio,
        }
    }

    #[test]
    fn auto_takes_iommufd_only_where_it_pins() {
        let pci = device(ContainerKind::Type1Iommu, true);
        assert_eq!(Backend::Auto.resolve(&pci, true), Backend::Iommufd);
        assert_eq!(Backend::Auto.resolve(&pci, false), Backend::Type1);
        let no_cdev = device(ContainerKind::Type1Iommu, false);
        assert_eq!(Backend::Auto.resolve(&no_cdev, true), Backend::Type1);
        for kind in [ContainerKind::MdevOnly, ContainerKind::NoIommu] {
            assert_eq!(
                Backend::Auto.resolve(&device(kind, true), true),
                Backend::Type1
            );
        }
        // An explicit choice is kept (open_with then refuses what cannot work).
        assert_eq!(Backend::Iommufd.resolve(&no_cdev, false), Backend::Iommufd);
        assert_eq!(Backend::Type1.resolve(&pci, true), Backend::Type1);
    }

    #[test]
    fn backend_names_round_trip() {
        for b in [Backend::Auto, Backend::Type1, Backend::Iommufd] {
            assert_eq!(Backend::parse(b.name()).unwrap(), b);
        }
        let e = Backend::parse("vfio").unwrap_err().to_string();
        assert!(e.contains("auto, type1 or iommufd"), "{e}");
    }

    #[test]
    fn set_dma_mask_reaches_the_allocator() {
        let fake = FakeMapper::new(Behaviour::default());
        let p = pinner_on(fake.clone());
        // The fake's range ends at 4 GiB - 1: a 31-bit mask cuts it.
        p.set_dma_mask(31).unwrap();
        assert_eq!(fake.alloc.lock().unwrap().dma_mask_bits(), 31);
        let mem = Pages::new();
        let high = PinRequest {
            iova: Some(Iova(1 << 31)),
            ..req()
        };
        // SAFETY: refused before anything is mapped.
        let e = unsafe { p.pin_user(mem.0, &high) }.unwrap_err();
        assert!(
            matches!(e, Error::Iova(crate::iova::IovaError::AboveDmaMask { .. })),
            "{e}"
        );
        assert!(fake.calls().is_empty());
        assert!(p.set_dma_mask(8).is_err());
    }

    #[test]
    fn a_memfd_needs_iommufd_and_leaves_no_iova() {
        let fake = FakeMapper::new(Behaviour::default());
        let p = pinner_on(fake.clone());
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        // SAFETY: refused before anything is mapped.
        let e = unsafe { p.map_memfd(f.as_fd(), 0, LEN, None) }.unwrap_err();
        assert!(e.to_string().contains("needs the iommufd backend"), "{e}");
        assert_eq!(fake.allocated(), 0);
        // SAFETY: as above.
        let e = unsafe { p.map_memfd(f.as_fd(), 0, 0, None) }.unwrap_err();
        assert!(matches!(e, Error::ZeroSize), "{e}");
    }

    #[test]
    fn requests_fail_before_the_kernel_is_asked() {
        let fake = FakeMapper::new(Behaviour::default());
        let p = pinner_on(fake.clone());
        let mem = Pages::new();
        let misaligned = mem.0.wrapping_add(8);
        // SAFETY: the pin is refused before anything is mapped.
        let e = unsafe { p.pin_user(misaligned, &req()) }.unwrap_err();
        assert!(matches!(e, Error::UnalignedUserMemory { .. }), "{e}");
        // A node the topology does not have.
        let on_node = PinRequest {
            node: Some(NodeId(7)),
            ..req()
        };
        // SAFETY: as above.
        let e = unsafe { p.pin_user(mem.0, &on_node) }.unwrap_err();
        assert!(matches!(e, Error::NodeNotOnline { .. }), "{e}");
        // Memory numapin allocates needs a node.
        let e = p.pin(&PinRequest::any_node(LEN)).unwrap_err();
        assert!(e.to_string().contains("needs a node"), "{e}");
        assert!(fake.calls().is_empty());
        assert_eq!(fake.allocated(), 0);
    }
}
