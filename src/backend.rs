//! The two seams every pin goes through.
//!
//! 1. **Who maps the IOVA**: an `IovaMapper`. A VFIO type1 container
//!    (`crate::vfio::container::Type1Container`), or `NoMapper` for a
//!    device in VFIO's no-IOMMU mode, whose DMA addresses are physical, or
//!    an iommufd IOAS with the device attached through its VFIO cdev
//!    ([`crate::iommufd`]). A mapper may sit on a container
//!    numapin opened itself or on one the caller owns: it holds a file
//!    descriptor and its own IOVA allocator, never the device.
//! 2. **Who holds the pin**: a `PinSource`. The mapping itself where the
//!    kernel pins at map time (type1 with an IOMMU-backed domain:
//!    `vfio_pin_pages_remote` with FOLL_LONGTERM), or an io_uring
//!    long-term pin (`uring`) where it does not (an mdev-only
//!    container records the mapping without pinning, a no-IOMMU container
//!    has no mapping at all).
//!
//! Each pin source owns its accounting rule ([`Accounting`]): which
//! counter of `/proc/self/status` grows, and whose `RLIMIT_MEMLOCK` it is
//! checked against. Where the mapping pins, the rule is the mapper's
//! (`IovaMapper::map_pin`): type1 charges `VmLck`, iommufd `VmPin`. [`crate::Pinner`] sits above both seams and
//! [`crate::PinnedRegion`] below them; neither calls into the other's
//! internals.
//!
//! The seam is also what host unit tests stand on: a fake mapper returns
//! chosen errnos and records unmaps, so the pin path's undo logic runs on a
//! machine without an IOMMU.

use std::io;
use std::sync::Mutex;

use crate::addr::{Iova, VirtAddr};
use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::sys;
use crate::vfio::ContainerKind;
use crate::vfio::info::IommuInfo;
use crate::vfio::sysfs::DeviceInfo;

/// Where a mapper's IOVAs come from, as [`crate::Pinner`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaAddressing {
    /// The device uses IOVAs that the mapper programs into an IOMMU (or,
    /// for an mdev, that the vendor driver translates).
    Iova,
    /// The device uses physical addresses (no-IOMMU): nothing to map.
    Physical,
}

/// Which kernel interface maps and pins for a device numapin opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// iommufd when the kernel has `/dev/iommu` and the device (behind an
    /// IOMMU) has a VFIO cdev, else type1.
    Auto,
    /// The VFIO group in a `/dev/vfio/vfio` container (type1, or the
    /// no-IOMMU and mdev variants).
    Type1,
    /// The device's VFIO cdev bound to `/dev/iommu`, mapping into an IOAS.
    Iommufd,
}

impl Backend {
    /// Short name used in JSON, tables and `NUMAPIN_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Type1 => "type1",
            Backend::Iommufd => "iommufd",
        }
    }

    /// Parses `auto`, `type1` or `iommufd`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for anything else.
    pub fn parse(s: &str) -> Result<Backend> {
        match s {
            "auto" => Ok(Backend::Auto),
            "type1" => Ok(Backend::Type1),
            "iommufd" => Ok(Backend::Iommufd),
            other => Err(Error::Invalid(format!(
                "unknown backend {other:?}: give auto, type1 or iommufd"
            ))),
        }
    }

    /// The backend `NUMAPIN_BACKEND` names, [`Backend::Auto`] when unset.
    ///
    /// # Errors
    /// [`Error::Invalid`] when it names none.
    pub fn from_env() -> Result<Backend> {
        match std::env::var("NUMAPIN_BACKEND") {
            Ok(v) if !v.is_empty() => Backend::parse(&v),
            _ => Ok(Backend::Auto),
        }
    }

    /// What `Auto` resolves to for `dev`: iommufd only for a device behind
    /// an IOMMU that has a cdev, on a kernel with `/dev/iommu`
    /// (`have_iommufd`). mdev and no-IOMMU devices stay on their container
    /// (their pin is io_uring's).
    pub(crate) fn resolve(self, dev: &DeviceInfo, have_iommufd: bool) -> Backend {
        match self {
            Backend::Auto
                if dev.kind == ContainerKind::Type1Iommu && dev.cdev.is_some() && have_iommufd =>
            {
                Backend::Iommufd
            }
            Backend::Auto => Backend::Type1,
            b => b,
        }
    }
}

/// Who maps IOVAs for a device: the first seam.
///
/// Implementations hold the container (or IOAS) fd and an IOVA allocator
/// over its usable ranges. They never own the memory they map.
pub(crate) trait IovaMapper: Send + Sync {
    /// Whether the device uses IOVAs or physical addresses.
    fn addressing(&self) -> DmaAddressing;

    /// Whether a successful [`IovaMapper::map`] takes the long-term pin
    /// itself (type1 with an IOMMU-backed domain). When false, the pin
    /// comes from io_uring.
    fn pins_on_map(&self) -> bool;

    /// `VFIO_IOMMU_GET_INFO` (or the IOAS's equivalent) as read at open.
    fn info(&self) -> Option<&IommuInfo>;

    /// The same, read now (e.g. for the current DMA_AVAIL).
    fn refresh_info(&self) -> Result<Option<IommuInfo>>;

    /// The allocator over the usable IOVA ranges (`None` without IOVAs).
    fn allocator(&self) -> Option<&Mutex<IovaAllocator>>;

    /// Maps `[vaddr, vaddr+len)` at `iova`.
    ///
    /// # Safety
    /// The memory must stay mapped until [`IovaMapper::unmap`] of the same
    /// range returns success: the IOMMU (and, where the mapping pins, the
    /// kernel's page references) point at it until then.
    unsafe fn map(&self, vaddr: VirtAddr, len: u64, iova: Iova) -> Result<()>;

    /// Maps `len` bytes of the memfd `file` from `offset` at `iova`
    /// (`IOMMU_IOAS_MAP_FILE`; only an iommufd IOAS can).
    ///
    /// # Safety
    /// The device may read and write the file's pages from now until the
    /// unmap: whoever maps the file must not hold Rust references to them.
    unsafe fn map_file(
        &self,
        _file: std::os::fd::BorrowedFd<'_>,
        _offset: u64,
        _len: u64,
        _iova: Iova,
    ) -> Result<()> {
        Err(Error::Invalid(
            "mapping a memfd by file needs the iommufd backend (Backend::Iommufd)".into(),
        ))
    }

    /// Unmaps what [`IovaMapper::map`] mapped at `iova`.
    fn unmap(&self, iova: Iova, len: u64) -> Result<()>;

    /// How a pinning map is accounted and named: type1's MAP_DMA unless
    /// the mapper says otherwise. Only asked when
    /// [`IovaMapper::pins_on_map`] is true.
    fn map_pin(&self) -> MapPin {
        MapPin::TYPE1
    }

    /// What the mapper knows about an iommufd context (`None` elsewhere).
    fn iommufd(&self) -> Option<&crate::iommufd::IommufdInfo> {
        None
    }

    /// Live update, step 1: forgets the virtual address of the mapping at
    /// `iova` while its pins and IOMMU entries stay (type1:
    /// `VFIO_DMA_UNMAP_FLAG_VADDR`, Linux 5.12+, not with mdev groups).
    fn suspend_vaddr(&self, _iova: Iova, _len: u64) -> Result<()> {
        Err(Error::Invalid(
            "this container cannot keep mappings across an exec: live update needs a type1 container \
             with VFIO_UPDATE_VADDR (Linux 5.12+, no mdev groups)"
                .into(),
        ))
    }

    /// Live update, step 2 (in the new process): gives the suspended
    /// mapping at `iova` its new virtual address; the kernel moves the
    /// accounting to this process (`VFIO_DMA_MAP_FLAG_VADDR`).
    ///
    /// # Safety
    /// `[vaddr, vaddr+len)` must map the same pages the mapping was made of
    /// (the same file at the same offset) and stay mapped until the unmap.
    unsafe fn resume_vaddr(&self, _vaddr: VirtAddr, _iova: Iova, _len: u64) -> Result<()> {
        Err(Error::Invalid(
            "this container cannot adopt mappings from before an exec (needs type1 with VFIO_UPDATE_VADDR)".into(),
        ))
    }

    /// Returns an IOVA to the allocator.
    fn free_iova(&self, iova: Iova) {
        if let Some(a) = self.allocator() {
            let _ = a.lock().unwrap_or_else(|p| p.into_inner()).free(iova);
        }
    }

    /// Marks `[iova, iova+len)` used after [`IovaMapper::resume_vaddr`]
    /// adopted a mapping from before an exec, so the allocator never hands
    /// it out. A range outside the allocator's is logged, not refused: the
    /// kernel already holds the mapping.
    fn reserve_resumed(&self, iova: Iova, len: u64) {
        if let Some(a) = self.allocator() {
            let mut a = a.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = a.reserve(iova, len) {
                log::warn!("resumed mapping {iova}+{len:#x} outside numapin's allocator: {e}");
            }
        }
    }
}

/// The mapper of a device in VFIO no-IOMMU mode: it has no IOVAs, the
/// device DMAs to the physical addresses of the pinned pages.
pub(crate) struct NoMapper {
    /// The device's name, for the error when an IOVA is asked for.
    pub(crate) device: String,
}

impl IovaMapper for NoMapper {
    fn addressing(&self) -> DmaAddressing {
        DmaAddressing::Physical
    }
    fn pins_on_map(&self) -> bool {
        false
    }
    fn info(&self) -> Option<&IommuInfo> {
        None
    }
    fn refresh_info(&self) -> Result<Option<IommuInfo>> {
        Ok(None)
    }
    fn allocator(&self) -> Option<&Mutex<IovaAllocator>> {
        None
    }
    unsafe fn map(&self, _: VirtAddr, _: u64, _: Iova) -> Result<()> {
        Err(Error::IovaWithoutIommu {
            device: self.device.clone(),
        })
    }
    fn unmap(&self, _: Iova, _: u64) -> Result<()> {
        Ok(())
    }
}

/// Which counter a pin grows, and whose limit it is charged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// The names are the `/proc/self/status` fields.
#[allow(clippy::enum_variant_names)]
pub enum Accounting {
    /// `mm->locked_vm` (`VmLck`), checked against this process's
    /// `RLIMIT_MEMLOCK` unless it has CAP_IPC_LOCK: VFIO type1
    /// (`vfio_lock_acct`).
    VmLck,
    /// `mm->pinned_vm` (`VmPin`) and the user's `locked_vm`, checked
    /// against `RLIMIT_MEMLOCK` summed over the user's processes unless
    /// the process has CAP_IPC_LOCK: io_uring registered buffers
    /// (`io_account_mem`).
    /// Also iommufd's default (`IOPT_PAGES_ACCOUNT_USER`): `pinned_vm`
    /// and the user's `locked_vm`.
    VmPin,
    /// `mm->pinned_vm` (`VmPin`, the counter that proves the pin) and
    /// `mm->locked_vm` (`VmLck`, checked against this process's
    /// `RLIMIT_MEMLOCK`): iommufd in `IOMMU_OPTION_RLIMIT_MODE` 1
    /// (`IOPT_PAGES_ACCOUNT_MM`, `update_mm_locked_vm`).
    VmPinAndVmLck,
}

impl Accounting {
    /// The `/proc/self/status` field that proves the pin.
    pub fn counter(self) -> &'static str {
        match self {
            Accounting::VmLck => "VmLck",
            Accounting::VmPin | Accounting::VmPinAndVmLck => "VmPin",
        }
    }

    /// Reads the proving counter for this process, in bytes.
    pub(crate) fn read(self) -> io::Result<u64> {
        match self {
            Accounting::VmLck => sys::locked_bytes(),
            Accounting::VmPin | Accounting::VmPinAndVmLck => sys::pinned_bytes(),
        }
    }

    /// Reads what this process has charged against `RLIMIT_MEMLOCK`, in
    /// bytes (for a per-user charge, this process's share of it).
    pub(crate) fn read_limited(self) -> io::Result<u64> {
        match self {
            Accounting::VmLck | Accounting::VmPinAndVmLck => sys::locked_bytes(),
            Accounting::VmPin => sys::pinned_bytes(),
        }
    }
}

/// How a mapping that pins is accounted and named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapPin {
    /// The accounting rule.
    pub(crate) accounting: Accounting,
    /// The kernel call, for messages.
    pub(crate) call: &'static str,
    /// What holds the pages, as JSON and tables name it.
    pub(crate) name: &'static str,
}

impl MapPin {
    /// VFIO type1 `VFIO_IOMMU_MAP_DMA` (`vfio_lock_acct`).
    pub(crate) const TYPE1: MapPin = MapPin {
        accounting: Accounting::VmLck,
        call: "VFIO_IOMMU_MAP_DMA",
        name: "vfio-map-dma",
    };

    /// `VFIO_IOMMU_MAP_DMA` on iommufd's `/dev/vfio/vfio`: an iommufd
    /// context in process mode (6.12.95 `iommufd/main.c` 266-269), so
    /// `VmPin` always grows and `VmLck` too without CAP_IPC_LOCK.
    pub(crate) const IOMMUFD_COMPAT: MapPin = MapPin {
        accounting: Accounting::VmPinAndVmLck,
        call: "VFIO_IOMMU_MAP_DMA",
        name: "vfio-map-dma",
    };
}

/// Who holds the pages: the second seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinSource {
    /// The IOVA mapping pins (type1 with an IOMMU-backed domain, an IOAS
    /// with an attached domain), accounted as the mapper says.
    Mapping(MapPin),
    /// An io_uring registered-buffer pin taken before the mapping (if any).
    Uring,
}

impl PinSource {
    /// The pin source a mapper needs.
    pub(crate) fn for_mapper(m: &dyn IovaMapper) -> PinSource {
        if m.pins_on_map() {
            PinSource::Mapping(m.map_pin())
        } else {
            PinSource::Uring
        }
    }

    /// How the pin is accounted.
    pub(crate) fn accounting(self) -> Accounting {
        match self {
            PinSource::Mapping(m) => m.accounting,
            PinSource::Uring => Accounting::VmPin,
        }
    }

    /// Whether the pin shows in this process's accounting. io_uring on
    /// newer kernels charges nothing for a ring whose creator has
    /// CAP_IPC_LOCK (`io_buffer_account_pin` returns early without
    /// `ctx->user`; seen in 7.2.12 and 7.3.4's `io_uring/rsrc.c`, not in
    /// 6.12.95's); numapin measures that once per process
    /// ([`crate::uring::charges_vmpin`]) instead of guessing from the
    /// version. Where it does not show, the proof rests on the register
    /// call's success and the PFN snapshot.
    pub(crate) fn accounting_visible(self) -> bool {
        match self {
            PinSource::Mapping(_) => true,
            PinSource::Uring => crate::uring::charges_vmpin(),
        }
    }

    /// The kernel call that takes the pin, for messages.
    pub(crate) fn call(self) -> &'static str {
        match self {
            PinSource::Mapping(m) => m.call,
            PinSource::Uring => "IORING_REGISTER_BUFFERS",
        }
    }

    /// What holds the pages, as JSON and tables name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            PinSource::Mapping(m) => m.name,
            PinSource::Uring => "io_uring",
        }
    }
}

/// Serialises each pin with its accounting check, and every unpin, so that
/// concurrent pins in one process do not blur each other's before/after
/// reading of the counter.
static ACCOUNTING_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` with the accounting lock held.
pub(crate) fn serialized<R>(f: impl FnOnce() -> R) -> R {
    let _guard = ACCOUNTING_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    f()
}
