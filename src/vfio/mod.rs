//! The VFIO side: finding a device and its IOMMU group, opening them in a
//! type1v2 container (through `vfio-ioctls`), reading
//! `VFIO_IOMMU_GET_INFO`, and the one `VFIO_IOMMU_MAP_DMA` per region that
//! takes the long-term pin.
//!
//! [`Pinner`] is the service handle: one device, its group, its container,
//! and an IOVA allocator over the container's usable ranges. Regions it pins
//! ([`crate::region::PinnedRegion`]) keep it alive.

pub mod device;
pub mod info;
mod noiommu;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE, vfio_iommu_type1_info};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_io_nr;

use crate::addr::{Iova, NodeId, PageSize};
use crate::error::{Error, Result};
use crate::iova::{IovaAllocator, IovaRange};
use crate::numa::{NodeMemory, Progress, Topology};
use crate::region::PinnedRegion;
use crate::sys;
use crate::uring::UringPin;
pub use device::DeviceFd;
use info::IommuInfo;

mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
}
use ioctls::VFIO_IOMMU_GET_INFO;

/// What kind of IOMMU context a VFIO container gives its devices, which
/// decides whether `VFIO_IOMMU_MAP_DMA` pins anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerKind {
    /// type1 with an IOMMU-backed domain: MAP_DMA pins with FOLL_LONGTERM.
    Type1Iommu,
    /// type1 holding only mdev (emulated IOMMU) groups: MAP_DMA records the
    /// IOVA but pins nothing.
    MdevOnly,
    /// `VFIO_NOIOMMU_IOMMU`: no MAP_DMA at all; the device DMAs to physical
    /// addresses.
    NoIommu,
}

impl ContainerKind {
    /// Short name used in JSON and tables.
    pub fn name(self) -> &'static str {
        match self {
            ContainerKind::Type1Iommu => "type1-iommu",
            ContainerKind::MdevOnly => "mdev-only",
            ContainerKind::NoIommu => "no-iommu",
        }
    }
}

impl fmt::Display for ContainerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerKind::Type1Iommu => "behind an IOMMU (type1)",
            ContainerKind::MdevOnly => "an mdev device (emulated IOMMU, mdev-only container)",
            ContainerKind::NoIommu => "in VFIO no-IOMMU mode",
        })
    }
}

/// A device of an IOMMU group and the driver it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Device name (PCI address or mdev UUID).
    pub device: String,
    /// Bound driver, if any.
    pub driver: Option<String>,
}

/// What sysfs says about a device, before anything is opened.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// The device's name (PCI address, or mdev UUID).
    pub name: String,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
    /// Its driver.
    pub driver: Option<String>,
    /// IOMMU group number.
    pub group: u32,
    /// The group's device node.
    pub group_node: PathBuf,
    /// Every device in the group (the device itself included).
    pub members: Vec<GroupMember>,
    /// The kind of container the device goes into.
    pub kind: ContainerKind,
}

fn driver_of(sysfs: &Path) -> Option<String> {
    std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Whether VFIO accepts a group member bound to `driver` (vfio drivers,
/// pci-stub, bridges' pcieport, or no driver at all).
fn driver_allows_vfio(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
    }
}

/// Resolves what a user typed (`0000:00:03.0`, `00:03.0`, an mdev UUID, or a
/// sysfs path) to the device's sysfs directory.
pub fn resolve_device(spec: &str) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if spec.starts_with('/') {
        vec![PathBuf::from(spec)]
    } else if spec.len() == 36 && spec.chars().filter(|&c| c == '-').count() == 4 {
        vec![Path::new("/sys/bus/mdev/devices").join(spec)]
    } else if spec.matches(':').count() == 1 {
        vec![Path::new("/sys/bus/pci/devices").join(format!("0000:{spec}"))]
    } else {
        vec![Path::new("/sys/bus/pci/devices").join(spec)]
    };
    let path = &candidates[0];
    if !path.exists() {
        return Err(Error::DeviceNotFound {
            spec: spec.to_string(),
            path: path.clone(),
        });
    }
    Ok(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
}

/// Describes a device from sysfs without opening anything: its group, the
/// group's members and drivers, and which container kind it would get.
pub fn describe(spec: &str) -> Result<DeviceInfo> {
    let sysfs = resolve_device(spec)?;
    let name = sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    let driver = driver_of(&sysfs);
    let group_link =
        std::fs::read_link(sysfs.join("iommu_group")).map_err(|_| Error::NoIommuGroup {
            device: name.clone(),
        })?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::NoIommuGroup {
            device: name.clone(),
        })?;
    let mut members = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices")) {
        for e in rd.flatten() {
            members.push(GroupMember {
                device: e.file_name().to_string_lossy().into_owned(),
                driver: driver_of(&e.path()),
            });
        }
    }
    members.sort_by(|a, b| a.device.cmp(&b.device));
    let noiommu = Path::new(&format!("/dev/vfio/noiommu-{group}")).exists();
    let kind = if noiommu {
        ContainerKind::NoIommu
    } else if sysfs.join("mdev_type").exists() {
        ContainerKind::MdevOnly
    } else {
        ContainerKind::Type1Iommu
    };
    let group_node = if noiommu {
        PathBuf::from(format!("/dev/vfio/noiommu-{group}"))
    } else {
        PathBuf::from(format!("/dev/vfio/{group}"))
    };
    Ok(DeviceInfo {
        name,
        sysfs,
        driver,
        group,
        group_node,
        members,
        kind,
    })
}

impl DeviceInfo {
    /// The error for a group the kernel calls not viable: every other
    /// member and its driver.
    pub(crate) fn not_viable(&self) -> Error {
        Error::GroupNotViable {
            group: self.group,
            others: self
                .members
                .iter()
                .filter(|m| m.device != self.name)
                .map(|m| {
                    (
                        m.device.clone(),
                        m.driver.clone().unwrap_or_else(|| "no driver".into()),
                    )
                })
                .collect(),
        }
    }

    /// Checks what would make opening fail, with an error that says what to do:
    /// the device's own driver, and the other members' drivers.
    pub fn check_openable(&self) -> Result<()> {
        if self.kind != ContainerKind::MdevOnly
            && !self.driver.as_deref().is_some_and(|d| d.contains("vfio"))
        {
            return Err(Error::NotBoundToVfio {
                device: self.name.clone(),
                driver: self.driver.clone(),
            });
        }
        let others: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|m| m.device != self.name && !driver_allows_vfio(m.driver.as_deref()))
            .map(|m| (m.device.clone(), m.driver.clone().unwrap_or_default()))
            .collect();
        if !others.is_empty() {
            return Err(Error::GroupNotViable {
                group: self.group,
                others,
            });
        }
        Ok(())
    }
}

/// Turns a vfio-ioctls error from opening into numapin's error with a remedy.
fn open_error(dev: &DeviceInfo, e: VfioError) -> Error {
    let io_kind = |err: &io::Error, path: PathBuf| match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Error::PermissionDenied { path }),
        Some(libc::EBUSY) => Some(Error::GroupBusy { path }),
        Some(libc::ENOENT) => Some(Error::NotBoundToVfio {
            device: dev.name.clone(),
            driver: dev.driver.clone(),
        }),
        _ => None,
    };
    let mapped = match &e {
        VfioError::OpenContainer(err) => io_kind(err, PathBuf::from("/dev/vfio/vfio")),
        VfioError::OpenGroup(err, _) => io_kind(err, dev.group_node.clone()),
        VfioError::GroupViable => Some(dev.not_viable()),
        VfioError::GroupSetContainer => Some(Error::GroupBusy {
            path: dev.group_node.clone(),
        }),
        VfioError::GroupGetDeviceFD(err) if err.errno() == libc::EBUSY => Some(Error::GroupBusy {
            path: dev.group_node.clone(),
        }),
        _ => None,
    };
    mapped.unwrap_or(Error::Vfio {
        op: format!("open {} (group {})", dev.name, dev.group),
        cause: e,
    })
}

/// Serialises each pin + its accounting check (and every unpin) so that
/// concurrent pins in one process do not blur each other's accounting.
static PIN_LOCK: Mutex<()> = Mutex::new(());

/// A type1 container with the device's group in it (IOMMU-backed or
/// mdev-only).
struct Type1 {
    // Field order is drop order: the device (and with it the group) goes
    // before the container.
    device: VfioDevice,
    container: Arc<VfioContainer>,
    info: IommuInfo,
    iova: Mutex<IovaAllocator>,
}

/// How the device was opened.
enum Backend {
    Type1(Box<Type1>),
    NoIommu(noiommu::NoIommuDevice),
}

pub(crate) struct Inner {
    backend: Backend,
    dev: DeviceInfo,
    topology: Topology,
    /// CAP_IPC_LOCK at open time (RLIMIT_MEMLOCK does not apply with it).
    ipc_lock: bool,
}

/// The service handle: a VFIO device, its group and container, the
/// container's IOMMU info, and an IOVA allocator over its usable ranges.
///
/// How a region is pinned depends on the [`ContainerKind`]:
/// - IOMMU-backed type1: one `VFIO_IOMMU_MAP_DMA`, which pins every page
///   long-term and maps it at the region's IOVA;
/// - mdev-only type1: an io_uring long-term pin ([`crate::uring`]), then
///   MAP_DMA, which there only records the IOVA for the vendor driver;
/// - no-IOMMU: the io_uring pin alone; the device uses physical addresses.
///
/// Cloning is cheap and shares the container.
#[derive(Clone)]
pub struct Pinner {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pinner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinner")
            .field("device", &self.inner.dev.name)
            .field("group", &self.inner.dev.group)
            .field("kind", &self.inner.dev.kind)
            .finish()
    }
}

/// What to pin: `size` bytes of `page_size` pages on `node`, at `iova` or at
/// an IOVA numapin picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinRequest {
    /// Node the memory must live on.
    pub node: NodeId,
    /// Size in bytes; a non-zero multiple of the page size.
    pub size: u64,
    /// Backing page size.
    pub page_size: PageSize,
    /// A fixed IOVA, or `None` to allocate one (no-IOMMU devices have none).
    pub iova: Option<Iova>,
    /// The shortest physically contiguous extent the caller accepts, if
    /// any (a no-IOMMU device DMAs to physical addresses and may need long
    /// runs). Checked after pinning; needs CAP_SYS_ADMIN to read PFNs.
    pub min_extent: Option<u64>,
}

/// How much of the pin numapin proves before returning the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proof {
    /// The accounting grew by the size, every page is on the node (if one
    /// was given), and a PFN snapshot is kept for [`PinnedRegion::verify`].
    #[default]
    Full,
    /// Only the accounting check: the kernel pinned the region. No node
    /// check, no PFN snapshot (`verify` then checks nodes only).
    Accounting,
    /// Nothing beyond the pin call's own success: the fast path for a VMM
    /// that maps guest RAM in many slots and calls `verify` later, if at
    /// all. The container kind still decides how the pin is taken.
    None,
}

/// The alignment of an IOVA numapin picks for `len` bytes at `vaddr`: the
/// page size, raised to 2 MiB when the range is that long and starts on a
/// 2 MiB boundary. The IOMMU can use a 2 MiB superpage only where the IOVA
/// and the physical address agree modulo 2 MiB, so THP- and hugetlb-backed
/// memory at an IOVA that is merely 4 KiB-aligned is mapped 4 KiB at a time.
fn iova_align(vaddr: u64, len: u64, page: u64) -> u64 {
    const SUPERPAGE: u64 = crate::numa::THP_ALIGN as u64;
    if len >= SUPERPAGE && vaddr % SUPERPAGE == 0 {
        page.max(SUPERPAGE)
    } else {
        page
    }
}

/// Caller-owned memory to pin ([`Pinner::pin_user_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMemory {
    /// First byte; aligned to the page size.
    pub vaddr: *mut u8,
    /// Length; a multiple of the page size.
    pub len: u64,
    /// A fixed IOVA (e.g. the guest-physical address), or `None` to pick one.
    pub iova: Option<Iova>,
    /// The node every page must be on after pinning, if any.
    pub node: Option<NodeId>,
    /// What backs the memory.
    pub page_size: PageSize,
    /// The shortest physically contiguous extent accepted, if any.
    pub min_extent: Option<u64>,
    /// How much to prove before returning (default: everything).
    pub proof: Proof,
}

impl UserMemory {
    /// `len` bytes of base pages at `vaddr`, any node, any IOVA.
    pub fn new(vaddr: *mut u8, len: u64) -> UserMemory {
        UserMemory {
            vaddr,
            len,
            iova: None,
            node: None,
            page_size: PageSize::Base,
            min_extent: None,
            proof: Proof::Full,
        }
    }
}

impl PinRequest {
    /// `size` bytes of base pages on `node`, at an IOVA numapin picks.
    pub fn new(node: NodeId, size: u64) -> PinRequest {
        PinRequest {
            node,
            size,
            page_size: PageSize::Base,
            iova: None,
            min_extent: None,
        }
    }
}

impl Pinner {
    /// Opens `spec` (a PCI address such as `0000:00:03.0`, an mdev UUID, or a
    /// sysfs path): in a new type1v2 container through vfio-ioctls, or, for
    /// a no-IOMMU group, in a no-IOMMU container; then reads the container's
    /// `VFIO_IOMMU_GET_INFO` (type1).
    ///
    /// # Errors
    /// [`Error::DeviceNotFound`], [`Error::NotBoundToVfio`],
    /// [`Error::NoIommuGroup`], [`Error::GroupNotViable`],
    /// [`Error::PermissionDenied`], [`Error::GroupBusy`], and for no-IOMMU
    /// groups [`Error::NoIommuNeedsRawio`] and [`Error::NoIommuModeOff`].
    pub fn open(spec: &str) -> Result<Pinner> {
        let dev = describe(spec)?;
        dev.check_openable()?;
        let topology = Topology::read()?;
        let backend = if dev.kind == ContainerKind::NoIommu {
            Backend::NoIommu(noiommu::open(&dev)?)
        } else {
            let container = Arc::new(VfioContainer::new(None).map_err(|e| open_error(&dev, e))?);
            let device = VfioDevice::new(&dev.sysfs, container.clone(), false)
                .map_err(|e| open_error(&dev, e))?;
            let info = get_info(&container)?;
            let ranges = info.iova_ranges.clone().unwrap_or_else(default_iova_ranges);
            let alloc = IovaAllocator::new(ranges, info.min_page_size())?;
            Backend::Type1(Box::new(Type1 {
                device,
                container,
                info,
                iova: Mutex::new(alloc),
            }))
        };
        Ok(Pinner {
            inner: Arc::new(Inner {
                backend,
                dev,
                topology,
                ipc_lock: sys::has_cap(sys::Cap::IpcLock),
            }),
        })
    }

    /// The device as sysfs described it when it was opened.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.inner.dev
    }

    /// The container kind.
    pub fn kind(&self) -> ContainerKind {
        self.inner.dev.kind
    }

    /// The container's `VFIO_IOMMU_GET_INFO` as read at open time (`None`
    /// in no-IOMMU mode, which has no IOMMU to describe).
    pub fn iommu_info(&self) -> Option<&IommuInfo> {
        match &self.inner.backend {
            Backend::Type1(t) => Some(&t.info),
            Backend::NoIommu(_) => None,
        }
    }

    /// Reads `VFIO_IOMMU_GET_INFO` again (e.g. for a current DMA_AVAIL);
    /// `None` in no-IOMMU mode.
    pub fn refresh_info(&self) -> Result<Option<IommuInfo>> {
        match &self.inner.backend {
            Backend::Type1(t) => get_info(&t.container).map(Some),
            Backend::NoIommu(_) => Ok(None),
        }
    }

    /// The NUMA topology read at open time.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The opened VFIO device fd, for register and config-space access
    /// (e.g. [`crate::edu::Edu::open`]).
    pub fn device_fd(&self) -> DeviceFd<'_> {
        match &self.inner.backend {
            Backend::Type1(t) => {
                let raw = t.device.as_raw_fd();
                // SAFETY: the fd is the VfioDevice's VFIO device fd, and the
                // device lives as long as `self`, so it outlives the borrow.
                unsafe { DeviceFd::new(BorrowedFd::borrow_raw(raw)) }
            }
            Backend::NoIommu(d) => d.fd(),
        }
    }

    /// The vfio-ioctls device (type1 containers only), for what
    /// [`DeviceFd`] does not offer (IRQs, resets).
    pub fn vfio_device(&self) -> Option<&VfioDevice> {
        match &self.inner.backend {
            Backend::Type1(t) => Some(&t.device),
            Backend::NoIommu(_) => None,
        }
    }

    /// Allocates `req.size` bytes on `req.node`, faults them in there, pins
    /// them (see [`Pinner`] for how, per container kind), and checks that
    /// the accounting grew by the size and that every page is on the node.
    ///
    /// On error nothing is left behind: no mapping, no pinned or locked
    /// memory, no allocation, no IOVA reservation.
    pub fn pin(&self, req: &PinRequest) -> Result<PinnedRegion> {
        self.pin_with(req, 0, None)
    }

    /// [`Pinner::pin`] with control over prefault threads (0 = one per CPU of
    /// the node) and a progress callback (bytes faulted so far).
    pub fn pin_with(
        &self,
        req: &PinRequest,
        threads: usize,
        progress: Option<Progress<'_>>,
    ) -> Result<PinnedRegion> {
        let PinRequest {
            node,
            size,
            page_size,
            iova,
            min_extent,
        } = *req;
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size % page_size.bytes() != 0 {
            return Err(Error::UnalignedSize { size, page_size });
        }
        if let Some(iova) = iova {
            if !iova.is_aligned(page_size.bytes()) {
                return Err(Error::UnalignedIova { iova, page_size });
            }
        }
        self.check_iommu_alignment(size)?;
        if let Some(min) = min_extent {
            validate_min_extent(min)?;
        }
        self.inner.topology.require(node)?;
        // Hugepage counts change at run time: read them now, not at open.
        Topology::read()?.check_capacity(node, size, page_size)?;
        check_memlock(self.kind(), size, self.inner.ipc_lock)?;
        // NodeMemory puts a region of 2 MiB or more on a 2 MiB boundary
        // (so any 2 MiB-aligned address stands for it here).
        let align = iova_align(0, size, page_size.bytes());
        let reservation = self.reserve_iova(iova, size, align)?;
        let mem = NodeMemory::allocate(
            &self.inner.topology,
            node,
            size,
            page_size,
            threads,
            progress,
        )?;
        let vaddr = mem.addr();
        let range = Range {
            vaddr,
            len: size,
            node: Some(node),
            page_size,
            min_extent,
            proof: Proof::Full,
        };
        self.pin_range(reservation, range, Some(mem))
    }

    /// Pins caller-owned memory `[vaddr, vaddr+len)` at `iova` (or at an IOVA
    /// numapin picks): the VMM case, guest RAM pinned at IOVA = guest-physical
    /// address. If `node` is given, every page must be on it after pinning.
    /// `page_size` says what backs the memory (it sets the placement-check
    /// stride). The region does not own the memory and never unmaps it.
    /// [`Pinner::pin_user_memory`] takes the same and a minimum extent.
    ///
    /// # Safety
    /// The memory must stay mapped (not `munmap`ed or replaced) until the
    /// returned region is dropped or released: the device keeps DMA access to
    /// the pinned pages until then. While pinned, a device may read and write
    /// it at any time, so the caller must not hold Rust references to it —
    /// only raw pointers with volatile or atomic access, or system calls.
    pub unsafe fn pin_user(
        &self,
        vaddr: *mut u8,
        len: u64,
        iova: Option<Iova>,
        node: Option<NodeId>,
        page_size: PageSize,
    ) -> Result<PinnedRegion> {
        let m = UserMemory {
            iova,
            node,
            page_size,
            ..UserMemory::new(vaddr, len)
        };
        // SAFETY: the caller upholds this function's contract, which is
        // pin_user_memory's.
        unsafe { self.pin_user_memory(&m) }
    }

    /// [`Pinner::pin_user`] with every option, including the shortest
    /// physically contiguous extent the caller accepts.
    ///
    /// # Safety
    /// As for [`Pinner::pin_user`].
    pub unsafe fn pin_user_memory(&self, m: &UserMemory) -> Result<PinnedRegion> {
        let addr = m.vaddr as u64;
        if m.len == 0 {
            return Err(Error::ZeroSize);
        }
        let page = m.page_size.bytes().max(crate::addr::base_page_size());
        if addr % page != 0 || m.len % page != 0 {
            return Err(Error::UnalignedUserMemory {
                vaddr: addr,
                len: m.len,
                page,
            });
        }
        self.check_iommu_alignment(m.len)?;
        if let Some(min) = m.min_extent {
            validate_min_extent(min)?;
        }
        if let Some(n) = m.node {
            self.inner.topology.require(n)?;
        }
        check_memlock(self.kind(), m.len, self.inner.ipc_lock)?;
        let reservation = self.reserve_iova(m.iova, m.len, iova_align(addr, m.len, page))?;
        let range = Range {
            vaddr: m.vaddr as usize,
            len: m.len,
            node: m.node,
            page_size: m.page_size,
            min_extent: m.min_extent,
            proof: m.proof,
        };
        self.pin_range(reservation, range, None)
    }

    /// Pins and checks the range at the reserved IOVA and wraps it in a
    /// region (owning `mem`, if given). If a mapping could not be undone
    /// after a failed check, neither the IOVA nor the memory is ever
    /// reused: a device may still reach it.
    fn pin_range(
        &self,
        reservation: Option<IovaReservation<'_>>,
        range: Range,
        mem: Option<NodeMemory>,
    ) -> Result<PinnedRegion> {
        let iova = reservation.as_ref().map(|r| r.iova);
        let pins = match self.pin_checked(&range, iova) {
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
        Ok(PinnedRegion::new(
            self.inner.clone(),
            iova,
            range.len,
            range.vaddr,
            range.node,
            range.page_size,
            mem,
            pins,
        ))
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
        let t = match &self.inner.backend {
            Backend::Type1(t) => t,
            Backend::NoIommu(_) => {
                return match iova {
                    Some(_) => Err(Error::IovaWithoutIommu {
                        device: self.inner.dev.name.clone(),
                    }),
                    None => Ok(None),
                };
            }
        };
        let mut alloc = t.iova.lock().unwrap_or_else(|p| p.into_inner());
        let iova = match iova {
            Some(i) => {
                alloc.reserve(i, len)?;
                i
            }
            None => alloc.allocate(len, align)?,
        };
        Ok(Some(IovaReservation {
            inner: &self.inner,
            iova,
            armed: true,
        }))
    }

    /// Takes the pin for this container kind, then proves it: the
    /// accounting (`VmLck` for MAP_DMA, `VmPin` for io_uring) grew by the
    /// length, every page is on the node, and (if asked) the physical
    /// extents are long enough. Undoes everything on failure.
    fn pin_checked(&self, r: &Range, iova: Option<Iova>) -> std::result::Result<Pins, MapFailure> {
        let _guard = PIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let unmapped = |error: Error| MapFailure {
            error,
            still_mapped: false,
        };
        let kind = self.kind();
        let (counter, by): (&'static str, &'static str) = match kind {
            ContainerKind::Type1Iommu => ("VmLck", "VFIO_IOMMU_MAP_DMA"),
            _ => ("VmPin", "IORING_REGISTER_BUFFERS"),
        };
        let read = || match kind {
            ContainerKind::Type1Iommu => sys::locked_bytes(),
            _ => sys::pinned_bytes(),
        };
        let before = match r.proof {
            Proof::None => 0,
            _ => read().map_err(|e| unmapped(Error::sys(format!("read {counter}"), "", e)))?,
        };
        let uring = match kind {
            ContainerKind::Type1Iommu => None,
            // SAFETY: the region keeps the memory mapped until it releases
            // the pin (owned NodeMemory, or caller memory under pin_user's
            // contract); on failure below the pin is dropped first.
            _ => Some(unsafe { UringPin::new(r.vaddr as *mut u8, r.len) }.map_err(unmapped)?),
        };
        if let Some(iova) = iova {
            // A failure drops `uring`, which unregisters the buffers.
            self.inner.map_dma(r.vaddr, r.len, iova).map_err(unmapped)?;
        }
        match self.prove(r, kind, counter, by, before, read) {
            Ok(pfns) => Ok(Pins { uring, pfns }),
            Err(error) => {
                let still_mapped = match iova {
                    Some(iova) => match self.inner.unmap_dma_unlocked(iova, r.len) {
                        Ok(()) => false,
                        Err(e) => {
                            eprintln!(
                                "numapin: could not undo the mapping at {iova} ({e}); leaking it"
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
    }

    /// The checks after the pin: accounting, placement, PFN snapshot,
    /// minimum extent. Returns the snapshot.
    fn prove(
        &self,
        r: &Range,
        kind: ContainerKind,
        counter: &'static str,
        by: &'static str,
        before: u64,
        read: impl Fn() -> io::Result<u64>,
    ) -> Result<Option<Vec<u64>>> {
        if r.proof != Proof::None {
            let after = read().map_err(|e| Error::sys(format!("read {counter}"), "", e))?;
            let grew = after.saturating_sub(before);
            if grew < r.len {
                return Err(Error::NotAccounted {
                    counter,
                    by,
                    grew,
                    len: r.len,
                });
            }
        }
        let needs_pfns = kind == ContainerKind::NoIommu || r.min_extent.is_some();
        if r.proof != Proof::Full && !needs_pfns {
            return Ok(None);
        }
        if let (Some(node), Proof::Full) = (r.node, r.proof) {
            check_placement(r.vaddr, r.len, node, r.page_size)?;
        }
        // A no-IOMMU device needs the physical addresses; elsewhere they are
        // a bonus (hidden without CAP_SYS_ADMIN).
        let pfns = match crate::phys::pfns(r.vaddr as u64, r.len) {
            Ok(p) => Some(p),
            Err(e) if needs_pfns => {
                return Err(e.into());
            }
            Err(_) => None,
        };
        if let (Some(min), Some(p)) = (r.min_extent, &pfns) {
            check_extents(p, min)?;
        }
        Ok(pfns)
    }
}

/// A range to pin, as the pin paths pass it around.
struct Range {
    vaddr: usize,
    len: u64,
    node: Option<NodeId>,
    page_size: PageSize,
    min_extent: Option<u64>,
    proof: Proof,
}

/// What a successful pin holds besides the mapping: the io_uring pin (mdev,
/// no-IOMMU) and the PFN snapshot (when readable).
pub(crate) struct Pins {
    pub(crate) uring: Option<UringPin>,
    pub(crate) pfns: Option<Vec<u64>>,
}

/// A minimum extent must be a non-zero multiple of the base page size.
fn validate_min_extent(min: u64) -> Result<()> {
    let base = crate::addr::base_page_size();
    if min == 0 || min % base != 0 {
        return Err(Error::Invalid(format!(
            "minimum extent {min:#x} must be a non-zero multiple of the {base:#x}-byte page size, e.g. 2M"
        )));
    }
    Ok(())
}

/// Fails unless every physically contiguous run of `pfns` (the last one
/// included) is at least `min`
/// bytes long (or, for a region shorter than `min`, unless it is one run).
fn check_extents(pfns: &[u64], min: u64) -> Result<()> {
    validate_min_extent(min)?;
    let base = crate::addr::base_page_size();
    let extents = crate::phys::merge_extents(pfns.iter().copied(), base);
    let total = pfns.len() as u64 * base;
    let smallest = extents.iter().map(|e| e.len).min().unwrap_or(0);
    if smallest < min.min(total) {
        return Err(Error::ExtentTooSmall {
            min,
            smallest,
            count: extents.len(),
        });
    }
    Ok(())
}

/// A failed map: the error, and whether the range could not be unmapped
/// again (then its memory and IOVA must never be reused).
struct MapFailure {
    error: Error,
    still_mapped: bool,
}

/// An IOVA reservation that is returned to the allocator unless kept.
struct IovaReservation<'a> {
    inner: &'a Arc<Inner>,
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
            self.inner.free_iova(self.iova);
        }
    }
}

impl Inner {
    fn type1(&self) -> Result<&Type1> {
        match &self.backend {
            Backend::Type1(t) => Ok(t),
            Backend::NoIommu(_) => Err(Error::IovaWithoutIommu {
                device: self.dev.name.clone(),
            }),
        }
    }

    pub(crate) fn map_dma(&self, vaddr: usize, len: u64, iova: Iova) -> Result<()> {
        let t = self.type1()?;
        let size = usize::try_from(len).map_err(|_| Error::Invalid("size too large".into()))?;
        // SAFETY: callers pass memory that stays mapped until the matching
        // unmap_dma (NodeMemory owned by the region, or caller memory under
        // pin_user's contract), and numapin never creates references to it.
        let r = unsafe { t.container.vfio_dma_map(iova.raw(), size, vaddr as *mut u8) };
        r.map_err(|e| self.map_error(e, iova, len))
    }

    /// UNMAP_DMA under the pin lock, so that a pin in another thread never
    /// sees `VmLck` shrink between its two reads.
    pub(crate) fn unmap_dma(&self, iova: Iova, len: u64) -> Result<()> {
        let _guard = PIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        self.unmap_dma_unlocked(iova, len)
    }

    fn unmap_dma_unlocked(&self, iova: Iova, len: u64) -> Result<()> {
        self.type1()?
            .container
            .vfio_dma_unmap(iova.raw(), len as usize)
            .map_err(|cause| Error::Vfio {
                op: format!("VFIO_IOMMU_UNMAP_DMA {iova}+{len:#x}"),
                cause,
            })
    }

    pub(crate) fn free_iova(&self, iova: Iova) {
        if let Backend::Type1(t) = &self.backend {
            let mut a = t.iova.lock().unwrap_or_else(|p| p.into_inner());
            let _ = a.free(iova);
        }
    }

    /// Releases an io_uring pin under the pin lock (see [`Inner::unmap_dma`]).
    pub(crate) fn unpin_uring(&self, pin: UringPin) -> Result<()> {
        let _guard = PIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        pin.release()
    }

    pub(crate) fn kind(&self) -> ContainerKind {
        self.dev.kind
    }

    pub(crate) fn device_name(&self) -> &str {
        &self.dev.name
    }

    fn map_error(&self, e: VfioError, iova: Iova, len: u64) -> Error {
        let errno = match &e {
            VfioError::IommuDmaMap(se) => se.errno(),
            _ => 0,
        };
        match errno {
            libc::ENOMEM => match memlock_error(ContainerKind::Type1Iommu, len, self.ipc_lock) {
                Some(err) => err,
                None => Error::PinNoMemory { iova, len },
            },
            libc::ENOSPC => Error::DmaEntriesExhausted {
                avail: self
                    .type1()
                    .ok()
                    .and_then(|t| get_info(&t.container).ok())
                    .and_then(|i| i.dma_avail)
                    .unwrap_or(0),
            },
            libc::EEXIST => Error::IovaOverlap { iova, len },
            _ => Error::Vfio {
                op: format!("VFIO_IOMMU_MAP_DMA {iova}+{len:#x} for {}", self.dev.name),
                cause: e,
            },
        }
    }
}

/// The memlock error for pinning `len` more bytes, if the limit forbids it.
/// VFIO type1 counts against `VmLck`; io_uring against the user's locked
/// memory, of which this process's share is `VmPin` (other processes of the
/// same user may hold more: the kernel's refusal is the final word).
fn memlock_error(kind: ContainerKind, len: u64, ipc_lock: bool) -> Option<Error> {
    if ipc_lock {
        return None;
    }
    let limit = sys::memlock_limit().ok()?;
    let locked = match kind {
        ContainerKind::Type1Iommu => sys::locked_bytes().ok()?,
        _ => sys::pinned_bytes().ok()?,
    };
    (locked.saturating_add(len) > limit).then_some(Error::MemlockLimit { limit, locked, len })
}

fn check_memlock(kind: ContainerKind, len: u64, ipc_lock: bool) -> Result<()> {
    memlock_error(kind, len, ipc_lock).map_or(Ok(()), Err)
}

/// Checks that every page of the range is on `node`.
pub(crate) fn check_placement(
    vaddr: usize,
    len: u64,
    node: NodeId,
    page_size: PageSize,
) -> Result<()> {
    let status = crate::numa::nodes_of(vaddr, len as usize, page_size.bytes())
        .map_err(|e| Error::sys("move_pages (query nodes)", "", e))?;
    let off: Vec<(usize, i32)> = status
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, s)| s != node.0 as i32)
        .collect();
    if let Some(&(i, s)) = off.first() {
        return Err(Error::Misplaced {
            node,
            pages: status.len() as u64,
            off_node: off.len() as u64,
            first_offset: i as u64 * page_size.bytes(),
            first_node: if s >= 0 {
                format!("node {s}")
            } else {
                io::Error::from_raw_os_error(-s).to_string()
            },
        });
    }
    Ok(())
}

/// Usable IOVA ranges when the kernel predates the IOVA-range capability
/// (before 5.4): a 48-bit space without the x86 MSI window.
fn default_iova_ranges() -> Vec<IovaRange> {
    [(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)]
        .into_iter()
        .filter_map(|(s, e)| IovaRange::new(Iova(s), Iova(e)))
        .collect()
}

/// `VFIO_IOMMU_GET_INFO` on a container, with the capability chain: called
/// once for the size, then with a buffer that large.
pub fn get_info(container: &VfioContainer) -> Result<IommuInfo> {
    let hdr = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut argsz = hdr as u32;
    for _ in 0..2 {
        // u64 storage keeps the struct 8-byte aligned.
        let mut buf = vec![0u64; (argsz as usize).div_ceil(8)];
        let bytes = buf.len() * 8;
        buf[0] = u64::from(argsz);
        // SAFETY: the buffer is `bytes >= argsz` long and 8-byte aligned; the
        // kernel writes at most argsz bytes into it.
        let ret = unsafe { ioctl_with_mut_ptr(container, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_alignment_follows_the_memory() {
        const M2: u64 = 2 << 20;
        // 2 MiB-aligned memory of 2 MiB or more: a 2 MiB-aligned IOVA.
        assert_eq!(iova_align(0x7f00_0000_0000, M2, 4096), M2);
        assert_eq!(iova_align(0x7f00_0000_0000, 64 * M2, 4096), M2);
        // Shorter, or not on a 2 MiB boundary: the page size is enough.
        assert_eq!(iova_align(0x7f00_0000_0000, M2 - 4096, 4096), 4096);
        assert_eq!(iova_align(0x7f00_0000_1000, 64 * M2, 4096), 4096);
        // Larger pages keep their own alignment.
        assert_eq!(iova_align(0x7f00_4000_0000, 1 << 30, 1 << 30), 1 << 30);
    }

    #[test]
    fn extents_against_a_minimum() {
        let page = crate::addr::base_page_size();
        // One run of four pages, then a gap, then two.
        let pfns = [10, 11, 12, 13, 20, 21];
        assert!(check_extents(&pfns, 2 * page).is_ok());
        match check_extents(&pfns, 4 * page) {
            Err(Error::ExtentTooSmall {
                min,
                smallest,
                count,
            }) => {
                assert_eq!((min, smallest, count), (4 * page, 2 * page, 2));
            }
            other => panic!("{other:?}"),
        }
        // A region shorter than the minimum passes only as one run.
        assert!(check_extents(&[5, 6], 64 * page).is_ok());
        assert!(check_extents(&[5, 7], 64 * page).is_err());
        // Descending frames are not contiguous.
        assert!(check_extents(&[9, 8], 2 * page).is_err());
    }
}
