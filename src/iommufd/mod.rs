//! The iommufd backend: the device's VFIO cdev (`/dev/vfio/devices/vfioN`,
//! Linux 6.6+) bound to a `/dev/iommu` context, attached to one IOAS
//! (I/O address space), and the IOAS as an IOVA mapper (`backend::IovaMapper`).
//!
//! # The order of the steps
//! An IOAS without an attached domain only records mappings; the pages are
//! pinned when a domain is attached (or, for a mapping made later, at map
//! time once one is). The IOAS's usable IOVA ranges start as the whole space
//! and narrow with each attached device. So numapin opens the context, sets
//! its accounting mode (which the kernel allows only while the context has
//! no objects), binds the device (`VFIO_DEVICE_BIND_IOMMUFD`), allocates
//! the IOAS, attaches the device to it (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`),
//! and only then reads `IOMMU_IOAS_IOVA_RANGES` and builds the IOVA
//! allocator. Every `IOMMU_IOAS_MAP` after that pins, and each region is
//! proven by the counter that grows.
//!
//! # Accounting (Linux 6.12.95, `drivers/iommu/iommufd/`)
//! - `do_update_pinned` (pages.c:858-885) always adds the pinned pages to
//!   `mm->pinned_vm` (`VmPin`, pages.c:880-883), whatever the mode. That is
//!   the counter numapin's proof reads.
//! - On top, per `iopt_pages` (pages.c:1172-1175, `iopt_alloc_pages`): a
//!   process with CAP_IPC_LOCK is charged nothing more
//!   (`IOPT_PAGES_ACCOUNT_NONE`); otherwise the default mode,
//!   `IOPT_PAGES_ACCOUNT_USER`, charges the **user's** `locked_vm`
//!   (`incr_user_locked_vm`, pages.c:804-821: summed over every process of
//!   the user, checked against this task's `RLIMIT_MEMLOCK`, `ENOMEM` past
//!   it), which `/proc/self/status` does not show.
//! - `IOMMU_OPTION_RLIMIT_MODE` = 1 switches the context to
//!   `IOPT_PAGES_ACCOUNT_MM` (io_pagetable.c:427-429 upgrades USER pages,
//!   never NONE ones): `update_mm_locked_vm` (pages.c:831-856) charges
//!   `mm->locked_vm` (`VmLck`) through `__account_locked_vm`, like VFIO
//!   type1. Setting it needs CAP_SYS_RESOURCE and a context with no
//!   objects yet (`iommufd_option_rlimit_mode`, ioas.c:334-365: `EPERM`,
//!   `EBUSY`). iommufd's `/dev/vfio/vfio` compatibility container starts in
//!   this mode (main.c:266-269).
//!
//! # Which mode numapin uses
//! - With CAP_IPC_LOCK (root): none is set. The pages are
//!   `IOPT_PAGES_ACCOUNT_NONE`, so the mode would change nothing; `VmPin`
//!   proves the pin.
//! - Without CAP_IPC_LOCK: numapin asks for mode 1 (per process). With
//!   CAP_SYS_RESOURCE the kernel grants it, and the limit is then this
//!   process's own (`VmLck`, which numapin reads before each pin, like
//!   type1's) instead of a budget shared with every other process of the
//!   user (a VMM, another numapin). Unprivileged, the kernel refuses
//!   (`EPERM`) and the default per-user mode stays; numapin's pre-check
//!   then compares `VmPin` (this process's share) with the limit, and the
//!   kernel's `ENOMEM` is the final word.
//!
//! # What is not here
//! `IOMMU_IOAS_MAP_FILE` (memfd-backed mappings, Linux 6.13+) is
//! `crate::Pinner::map_memfd`, outside the pin path (no placement proof:
//! the pages are the file's). `/dev/vfio/vfio` provided by iommufd (its VFIO
//! compatibility container) is detected by [`vfio_container_provider`]
//! and used like native type1.

mod file;
mod ioctls;

pub use file::FileMapping;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use iommufd_bindings::iommufd::{
    iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range, iommu_option,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
    iommufd_option_ops_IOMMU_OPTION_OP_GET, iommufd_option_ops_IOMMU_OPTION_OP_SET,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use serde::Serialize;
use vfio_bindings::bindings::vfio::{vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::addr::{Iova, VirtAddr, human_size};
use crate::backend::{Accounting, DmaAddressing, IovaMapper, MapPin};
use crate::error::{Error, Result};
use crate::iova::{IovaAllocator, IovaRange};
use crate::vfio::info::IommuInfo;
use crate::vfio::sysfs::DeviceInfo;

/// `IOMMU_IOAS_IOVA_RANGES`: the IOAS's usable IOVA ranges and the
/// alignment every mapping must keep (`iommufd_ioas_iova_ranges`, Linux
/// 6.2+). Asked once for the count, then with room for it (the kernel
/// answers `EMSGSIZE` with the count when the array is too small).
///
/// # Errors
/// The raw errno: `ENOTTY` on an fd that is not an iommufd, `ENOENT` for
/// an unknown IOAS id.
///
/// # Example
/// ```no_run
/// let f = std::fs::File::open("/dev/null").unwrap();
/// let e = numapin::iommufd::iova_ranges(std::os::fd::AsFd::as_fd(&f), 1).unwrap_err();
/// assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
/// ```
pub fn iova_ranges(fd: BorrowedFd<'_>, ioas_id: u32) -> io::Result<(Vec<IovaRange>, u64)> {
    let mut buf: Vec<iommu_iova_range> = Vec::new();
    for _ in 0..3 {
        let mut arg = iommu_ioas_iova_ranges {
            size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id,
            num_iovas: buf.len() as u32,
            allowed_iovas: buf.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid iommu_ioas_iova_ranges; the kernel writes
        // at most `num_iovas` ranges into `buf`, which has that many.
        let ret = unsafe { ioctl_with_mut_ref(&fd, ioctls::IOMMU_IOAS_IOVA_RANGES(), &mut arg) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EMSGSIZE) && arg.num_iovas as usize > buf.len() {
                buf = vec![iommu_iova_range::default(); arg.num_iovas as usize];
                continue;
            }
            return Err(err);
        }
        let ranges = buf[..arg.num_iovas as usize]
            .iter()
            .filter_map(|r| IovaRange::new(Iova(r.start), Iova(r.last)))
            .collect();
        return Ok((ranges, arg.out_iova_alignment));
    }
    Err(io::Error::other(
        "IOMMU_IOAS_IOVA_RANGES kept asking for more room",
    ))
}

/// `IOMMU_OPTION` get of `IOMMU_OPTION_RLIMIT_MODE` (0: per user, 1: per
/// process).
///
/// # Errors
/// The raw errno (`ENOTTY` or `EINVAL` on an fd that is not an iommufd).
pub fn rlimit_mode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut arg = option(iommufd_option_ops_IOMMU_OPTION_OP_GET, 0);
    // SAFETY: `arg` is a valid iommu_option; the kernel writes val64 back.
    let ret = unsafe { ioctl_with_mut_ref(&fd, ioctls::IOMMU_OPTION(), &mut arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(arg.val64)
}

/// `IOMMU_OPTION` set of `IOMMU_OPTION_RLIMIT_MODE`.
///
/// # Errors
/// `EPERM` without CAP_SYS_RESOURCE, `EBUSY` once the context holds any
/// object, `EINVAL` for a value other than 0 or 1.
pub fn set_rlimit_mode(fd: BorrowedFd<'_>, mode: u64) -> io::Result<()> {
    let mut arg = option(iommufd_option_ops_IOMMU_OPTION_OP_SET, mode);
    // SAFETY: as in rlimit_mode.
    let ret = unsafe { ioctl_with_mut_ref(&fd, ioctls::IOMMU_OPTION(), &mut arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn option(op: u32, val64: u64) -> iommu_option {
    iommu_option {
        size: std::mem::size_of::<iommu_option>() as u32,
        option_id: iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
        op: op as u16,
        object_id: 0,
        val64,
        ..Default::default()
    }
}

/// `VFIO_DEVICE_BIND_IOMMUFD` on a device cdev: binds the device to the
/// iommufd context `iommufd` and returns its id there. Only the fields up
/// to `out_devid` are passed (what 6.6 through 6.12 know; later fields are
/// optional). See `vfio_df_ioctl_bind_iommufd` in drivers/vfio/device_cdev.c.
///
/// # Errors
/// The raw errno: `EBUSY` when the device's group is open (a type1
/// container holds it), `EINVAL` when the device is bound already.
///
/// # Example
/// ```no_run
/// use std::os::fd::AsFd;
/// let open = |p| std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
/// let (cdev, ctx) = (open("/dev/vfio/devices/vfio0"), open("/dev/iommu"));
/// let dev_id = numapin::iommufd::bind(cdev.as_fd(), ctx.as_fd()).unwrap();
/// # let _ = dev_id;
/// ```
pub fn bind(cdev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut arg = vfio_device_bind_iommufd {
        argsz: (std::mem::offset_of!(vfio_device_bind_iommufd, out_devid) + 4) as u32,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        ..Default::default()
    };
    // SAFETY: `arg` is valid for `argsz` bytes; the kernel writes out_devid.
    let ret = unsafe { ioctl_with_mut_ref(&cdev, ioctls::VFIO_DEVICE_BIND_IOMMUFD(), &mut arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(arg.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: attaches the bound device to the page
/// table `pt_id` (an IOAS: the kernel then allocates a domain for it, and
/// mappings in the IOAS from then on pin); returns the id of the hardware
/// page table the kernel used.
///
/// # Errors
/// The raw errno: `EINVAL` for a device not bound yet, `ENOENT` for an
/// unknown id.
pub fn attach(cdev: BorrowedFd<'_>, pt_id: u32) -> io::Result<u32> {
    let mut arg = vfio_device_attach_iommufd_pt {
        argsz: (std::mem::offset_of!(vfio_device_attach_iommufd_pt, pt_id) + 4) as u32,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: `arg` is valid for `argsz` bytes; the kernel writes pt_id back.
    let ret =
        unsafe { ioctl_with_mut_ref(&cdev, ioctls::VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(arg.pt_id)
}

/// Who provides `/dev/vfio/vfio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VfioContainerProvider {
    /// VFIO's own container (`CONFIG_VFIO_CONTAINER`): type1 charges
    /// `VmLck` per process.
    Vfio,
    /// iommufd's compatibility container (`CONFIG_IOMMUFD_VFIO_CONTAINER`):
    /// the type1 calls are served by an iommufd context in process mode,
    /// so pins grow `VmPin` and `VmLck`.
    Iommufd,
    /// No `/dev/vfio/vfio`.
    Absent,
    /// It could not be opened (permissions) or answered neither way.
    Unknown,
}

/// Tells who provides `/dev/vfio/vfio`: an iommufd context answers
/// `IOMMU_OPTION` (get of the rlimit mode) on it, VFIO's own container
/// refuses every ioctl but its three before an IOMMU is set (`EINVAL`,
/// `vfio_fops_unl_ioctl` in drivers/vfio/container.c).
pub fn vfio_container_provider() -> VfioContainerProvider {
    let path = Path::new("/dev/vfio/vfio");
    if !path.exists() {
        return VfioContainerProvider::Absent;
    }
    let Ok(f) = OpenOptions::new().read(true).write(true).open(path) else {
        return VfioContainerProvider::Unknown;
    };
    match rlimit_mode(f.as_fd()) {
        Ok(_) => VfioContainerProvider::Iommufd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
            VfioContainerProvider::Vfio
        }
        Err(_) => VfioContainerProvider::Unknown,
    }
}

/// Whether this kernel offers iommufd to VFIO devices (`/dev/iommu`).
pub fn available() -> bool {
    Path::new("/dev/iommu").exists()
}

/// How the iommufd context charges pins against `RLIMIT_MEMLOCK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RlimitMode {
    /// The user's `locked_vm` (mode 0, the default).
    User,
    /// This process's `locked_vm`, `VmLck` (mode 1).
    Process,
    /// Nothing: the process has CAP_IPC_LOCK.
    NotCharged,
}

/// What numapin set up in the iommufd context, as read after attaching.
#[derive(Debug, Clone)]
pub struct IommufdInfo {
    /// The device's VFIO cdev (`None` on an IOAS the caller owns).
    pub cdev: Option<PathBuf>,
    /// The device's id in the context (`out_devid`; `None` on an IOAS the
    /// caller owns).
    pub dev_id: Option<u32>,
    /// The IOAS numapin maps into.
    pub ioas_id: u32,
    /// The hardware page table the attach used (`None` on an IOAS the
    /// caller owns).
    pub hwpt_id: Option<u32>,
    /// The accounting mode.
    pub rlimit_mode: RlimitMode,
    /// `out_iova_alignment` of `IOMMU_IOAS_IOVA_RANGES`.
    pub iova_alignment: u64,
    /// The usable IOVA ranges after the attach.
    pub iova_ranges: Vec<IovaRange>,
}

/// The device numapin opened through its cdev. Closing the fd detaches and
/// unbinds it (the IOAS's mappings stay until the IOAS is destroyed).
pub(crate) struct CdevDevice {
    file: File,
}

impl CdevDevice {
    /// The device fd (region access works on it as on a group's device fd).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The IOAS a mapper maps into.
enum Ioas {
    /// One numapin allocated: destroyed (unmapping and unpinning whatever
    /// is left) when the mapper goes.
    Owned(IommufdIoas),
    /// One the caller owns, by id, in the caller's context.
    Given(u32),
}

impl Ioas {
    fn id(&self) -> u32 {
        match self {
            Ioas::Owned(i) => i.id(),
            Ioas::Given(id) => *id,
        }
    }
}

/// An IOAS with a device attached, as an IOVA mapper.
pub(crate) struct IommufdMapper {
    // Field order is drop order: the IOAS is destroyed before the context
    // fd closes.
    ioas: Ioas,
    ctx: Arc<IommuFd>,
    info: IommuInfo,
    details: IommufdInfo,
    iova: Mutex<IovaAllocator>,
    accounting: Accounting,
    device: String,
    ipc_lock: bool,
}

/// The errno inside an iommufd-ioctls error.
fn errno_of(e: &IommufdError) -> Option<i32> {
    match e {
        IommufdError::OpenIommufd(io) => io.raw_os_error(),
        IommufdError::IommuIoasAlloc(s)
        | IommufdError::IommuIoasMap(s)
        | IommufdError::IommuIoasMapFile(s)
        | IommufdError::IommuIoasUnmap(s)
        | IommufdError::IommuDestroy(s) => Some(s.errno()),
        _ => None,
    }
}

fn io_of(e: &IommufdError) -> io::Error {
    errno_of(e).map_or_else(
        || io::Error::other(e.to_string()),
        io::Error::from_raw_os_error,
    )
}

/// Opens `dev` through its cdev into a new iommufd context, in the order
/// the module doc gives.
///
/// # Errors
/// [`Error::IommufdUnavailable`] without a cdev or `/dev/iommu`,
/// [`Error::PermissionDenied`] for either node, [`Error::GroupBusy`] when
/// the device's group is open (a type1 container holds it), and
/// [`Error::Sys`] for a failed ioctl.
pub(crate) fn open(dev: &DeviceInfo, ipc_lock: bool) -> Result<(CdevDevice, IommufdMapper)> {
    let unavailable = |reason: String| Error::IommufdUnavailable {
        device: dev.name.clone(),
        reason,
    };
    let cdev = dev.cdev.clone().ok_or_else(|| {
        unavailable(format!(
            "{} has no VFIO cdev (no {}/vfio-dev; needs Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)",
            dev.name,
            dev.sysfs.display()
        ))
    })?;
    if !available() {
        return Err(unavailable(
            "there is no /dev/iommu (CONFIG_IOMMUFD is off or the iommufd module is not loaded)"
                .into(),
        ));
    }
    let open_rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied {
                    path: p.to_path_buf(),
                },
                _ => Error::sys(format!("open {}", p.display()), "", e),
            })
    };
    let file = open_rw(&cdev)?;
    let ctx = Arc::new(IommuFd::new_from_fd(open_rw(Path::new("/dev/iommu"))?));
    let cfd = ctx.as_ref();
    // SAFETY: the IommuFd owns this fd and outlives every use below.
    let ctx_fd = unsafe { BorrowedFd::borrow_raw(cfd.as_raw_fd()) };
    // Before any object exists (the kernel refuses later: EBUSY).
    let rlimit_mode = if ipc_lock {
        RlimitMode::NotCharged
    } else {
        match set_rlimit_mode(ctx_fd, 1) {
            Ok(()) => RlimitMode::Process,
            Err(e) => {
                log::debug!("IOMMU_OPTION_RLIMIT_MODE=1 refused ({e}); per-user accounting");
                RlimitMode::User
            }
        }
    };
    let dev_id = bind(file.as_fd(), ctx_fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => Error::GroupBusy {
            path: dev.group_node.clone(),
        },
        _ => Error::sys(
            format!("VFIO_DEVICE_BIND_IOMMUFD of {}", cdev.display()),
            "",
            e,
        ),
    })?;
    let ioas =
        IommufdIoas::new(ctx.clone()).map_err(|e| Error::sys("IOMMU_IOAS_ALLOC", "", io_of(&e)))?;
    let hwpt_id = attach(file.as_fd(), ioas.id()).map_err(|e| {
        Error::sys(
            format!(
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT of {} to IOAS {}",
                dev.name,
                ioas.id()
            ),
            "",
            e,
        )
    })?;
    // Only now: the ranges narrow with the attached device.
    let (ranges, align) =
        iova_ranges(ctx_fd, ioas.id()).map_err(|e| Error::sys("IOMMU_IOAS_IOVA_RANGES", "", e))?;
    let page = align.max(crate::addr::base_page_size());
    let alloc = IovaAllocator::new(ranges.clone(), page)?;
    let accounting = match rlimit_mode {
        RlimitMode::Process => Accounting::VmPinAndVmLck,
        RlimitMode::User | RlimitMode::NotCharged => Accounting::VmPin,
    };
    log::debug!(
        "{}: iommufd dev {dev_id}, IOAS {}, hwpt {hwpt_id}, {rlimit_mode:?} accounting, ranges {ranges:?}",
        dev.name,
        ioas.id()
    );
    let info = IommuInfo {
        iova_pgsizes: page,
        iova_ranges: Some(ranges.clone()),
        dma_avail: None,
        migration: None,
        unknown_caps: Vec::new(),
    };
    let details = IommufdInfo {
        cdev: Some(cdev),
        dev_id: Some(dev_id),
        ioas_id: ioas.id(),
        hwpt_id: Some(hwpt_id),
        rlimit_mode,
        iova_alignment: align,
        iova_ranges: ranges,
    };
    Ok((
        CdevDevice { file },
        IommufdMapper {
            ioas: Ioas::Owned(ioas),
            ctx,
            info,
            details,
            iova: Mutex::new(alloc),
            accounting,
            device: dev.name.clone(),
            ipc_lock,
        },
    ))
}

impl IommufdMapper {
    /// A mapper on an IOAS the caller owns, in the caller's context `ctx`
    /// (numapin keeps a duplicate of the fd). The caller attached its
    /// device(s) already, so the ranges read here are theirs and maps pin.
    pub(crate) fn given(
        ctx: BorrowedFd<'_>,
        ioas_id: u32,
        name: String,
        ipc_lock: bool,
    ) -> Result<IommufdMapper> {
        let fd = ctx
            .try_clone_to_owned()
            .map_err(|e| Error::sys("dup the iommufd fd", "", e))?;
        let (ranges, align) = iova_ranges(fd.as_fd(), ioas_id).map_err(|e| {
            Error::sys(
                format!("IOMMU_IOAS_IOVA_RANGES of IOAS {ioas_id}"),
                "is the fd a /dev/iommu context and the id one of its IOASes?",
                e,
            )
        })?;
        let rlimit_mode = if ipc_lock {
            RlimitMode::NotCharged
        } else {
            match rlimit_mode(fd.as_fd()) {
                Ok(1) => RlimitMode::Process,
                _ => RlimitMode::User,
            }
        };
        let accounting = match rlimit_mode {
            RlimitMode::Process => Accounting::VmPinAndVmLck,
            _ => Accounting::VmPin,
        };
        let page = align.max(crate::addr::base_page_size());
        let alloc = IovaAllocator::new(ranges.clone(), page)?;
        Ok(IommufdMapper {
            ioas: Ioas::Given(ioas_id),
            ctx: Arc::new(IommuFd::new_from_fd(File::from(fd))),
            info: IommuInfo {
                iova_pgsizes: page,
                iova_ranges: Some(ranges.clone()),
                dma_avail: None,
                migration: None,
                unknown_caps: Vec::new(),
            },
            details: IommufdInfo {
                cdev: None,
                dev_id: None,
                ioas_id,
                hwpt_id: None,
                rlimit_mode,
                iova_alignment: align,
                iova_ranges: ranges,
            },
            iova: Mutex::new(alloc),
            accounting,
            device: name,
            ipc_lock,
        })
    }
}

impl IovaMapper for IommufdMapper {
    fn addressing(&self) -> DmaAddressing {
        DmaAddressing::Iova
    }

    fn pins_on_map(&self) -> bool {
        // A device is attached before the first map.
        true
    }

    fn map_pin(&self) -> MapPin {
        MapPin {
            accounting: self.accounting,
            call: "IOMMU_IOAS_MAP",
            name: "iommufd-ioas-map",
        }
    }

    fn info(&self) -> Option<&IommuInfo> {
        Some(&self.info)
    }

    fn refresh_info(&self) -> Result<Option<IommuInfo>> {
        // SAFETY: the IommuFd owns the fd and lives as long as `self`.
        let fd = unsafe { BorrowedFd::borrow_raw(self.ctx.as_raw_fd()) };
        let (ranges, _) = iova_ranges(fd, self.ioas.id())
            .map_err(|e| Error::sys("IOMMU_IOAS_IOVA_RANGES", "", e))?;
        Ok(Some(IommuInfo {
            iova_ranges: Some(ranges),
            ..self.info.clone()
        }))
    }

    fn allocator(&self) -> Option<&Mutex<IovaAllocator>> {
        Some(&self.iova)
    }

    fn iommufd(&self) -> Option<&IommufdInfo> {
        Some(&self.details)
    }

    unsafe fn map(&self, vaddr: VirtAddr, len: u64, iova: Iova) -> Result<()> {
        let arg = iommu_ioas_map {
            size: std::mem::size_of::<iommu_ioas_map>() as u32,
            flags: iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: self.ioas.id(),
            user_va: vaddr.raw(),
            length: len,
            iova: iova.raw(),
            ..Default::default()
        };
        // The caller keeps the memory mapped until unmap (this function's
        // contract); the kernel pins it with FOLL_LONGTERM here.
        self.ctx.map_iommu_ioas(&arg).map_err(|e| {
            map_error(
                &self.device,
                iova,
                len,
                self.accounting,
                self.ipc_lock,
                io_of(&e),
            )
        })
    }

    unsafe fn map_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: Iova,
    ) -> Result<()> {
        file::map_file(&self.ctx, self.ioas.id(), file, offset, len, iova)
            .map_err(|e| file::map_file_error(&self.device, iova, len, e))
    }

    fn unmap(&self, iova: Iova, len: u64) -> Result<()> {
        let mut arg = iommu_ioas_unmap {
            size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas.id(),
            iova: iova.raw(),
            length: len,
        };
        self.ctx
            .unmap_iommu_ioas(&mut arg)
            .map_err(|e| Error::sys(format!("IOMMU_IOAS_UNMAP {iova}+{len:#x}"), "", io_of(&e)))
    }
}

/// What a failed `IOMMU_IOAS_MAP` means (`iopt_map_user_pages`,
/// `iopt_check_iova` in io_pagetable.c, `do_update_pinned` in pages.c).
fn map_error(
    device: &str,
    iova: Iova,
    len: u64,
    acct: Accounting,
    ipc_lock: bool,
    err: io::Error,
) -> Error {
    match err.raw_os_error() {
        Some(libc::ENOMEM) => crate::prove::memlock_error(acct, len, ipc_lock)
            .unwrap_or(Error::PinNoMemory { iova, len }),
        Some(libc::EEXIST) => Error::IovaOverlap { iova, len },
        _ => Error::sys(
            format!(
                "IOMMU_IOAS_MAP of {} at {iova} for {device}",
                human_size(len)
            ),
            "",
            err,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // kvm-ioctls style: the raw wrappers on an fd that is not an iommufd
    // return the kernel's errno.
    #[test]
    fn wrappers_on_a_bogus_fd() {
        let f = File::open("/dev/null").unwrap();
        assert_eq!(
            iova_ranges(f.as_fd(), 1).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            rlimit_mode(f.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            set_rlimit_mode(f.as_fd(), 1).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            bind(f.as_fd(), f.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            attach(f.as_fd(), 1).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn map_errnos_become_causes() {
        let e = |n| io::Error::from_raw_os_error(n);
        let dev = "0000:00:03.0";
        assert!(matches!(
            map_error(
                dev,
                Iova(0x1000),
                8192,
                Accounting::VmPin,
                true,
                e(libc::ENOMEM)
            ),
            Error::PinNoMemory { len: 8192, .. }
        ));
        assert!(matches!(
            map_error(
                dev,
                Iova(0x1000),
                8192,
                Accounting::VmPin,
                true,
                e(libc::EEXIST)
            ),
            Error::IovaOverlap {
                iova: Iova(0x1000),
                ..
            }
        ));
        let other = map_error(
            dev,
            Iova(0x1000),
            2 << 20,
            Accounting::VmPin,
            true,
            e(libc::EINVAL),
        );
        assert!(
            other
                .to_string()
                .contains("IOMMU_IOAS_MAP of 2 MiB at 0x1000 for 0000:00:03.0"),
            "{other}"
        );
    }
}
