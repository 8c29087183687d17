//! The IOAS as an IOVA mapper: opening a device through its cdev into a
//! new context (in the order the module doc of [`super`] gives), or taking
//! an IOAS the caller owns; `IOMMU_IOAS_MAP`/`UNMAP` through iommufd-ioctls
//! and the errno of a failed map turned into a cause.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};

use super::{
    IommufdInfo, RlimitMode, attach, available, bind, file, iova_ranges, rlimit_mode,
    set_rlimit_mode,
};
use crate::addr::{Iova, VirtAddr, human_size};
use crate::backend::{Accounting, DmaAddressing, IovaMapper, MapPin};
use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::vfio::info::IommuInfo;
use crate::vfio::sysfs::DeviceInfo;

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

pub(super) fn io_of(e: &IommufdError) -> io::Error {
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

    fn suspend_vaddr(&self, iova: Iova, _len: u64) -> Result<()> {
        // A file mapping does not refer to this process's addresses, so the
        // kernel has nothing to forget; the new process takes the
        // accounting over (resume_vaddr). PinnedRegion::suspend refuses
        // mappings made by address.
        //
        // Pages mapped with CAP_IPC_LOCK are charged to no one
        // (IOPT_PAGES_ACCOUNT_NONE, iopt_alloc_pages in pages.c).
        // CHANGE_PROCESS moves them without charging the new process
        // (need_charge_update in ioas.c is false for them) but makes it
        // their owner, so unmapping them later takes them off the new
        // process's pinned_vm, which goes below zero (Linux 7.3,
        // iopt_pages_update_pinned). Judged by the capability this mapper
        // saw when it was made.
        if self.ipc_lock {
            return Err(Error::Invalid(format!(
                "the mapping at {iova} was made with CAP_IPC_LOCK, so iommufd charged it to no one, and \
                 IOMMU_IOAS_CHANGE_PROCESS would leave the new process's VmPin short by it and below zero once \
                 it is unmapped; pin memory meant to survive an exec on iommufd without CAP_IPC_LOCK in effect \
                 (raise RLIMIT_MEMLOCK instead)"
            )));
        }
        Ok(())
    }

    unsafe fn resume_vaddr(&self, _vaddr: VirtAddr, iova: Iova, len: u64) -> Result<()> {
        // SAFETY: the IommuFd owns the fd and lives as long as `self`.
        let fd = unsafe { BorrowedFd::borrow_raw(self.ctx.as_raw_fd()) };
        super::change_process(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTTY) => Error::IommufdUnavailable {
                device: self.device.clone(),
                reason: "this kernel has no IOMMU_IOAS_CHANGE_PROCESS (Linux 6.13+)".into(),
            },
            Some(libc::EINVAL) => Error::Invalid(format!(
                "IOMMU_IOAS_CHANGE_PROCESS refused the context of {}: some mapping in it was made by \
                 address (IOMMU_IOAS_MAP), and only IOMMU_IOAS_MAP_FILE mappings can change process; \
                 unmap those before the exec",
                self.device
            )),
            _ => Error::sys(
                format!("IOMMU_IOAS_CHANGE_PROCESS for {}", self.device),
                "the pinned pages must fit this process's memlock limit",
                e,
            ),
        })?;
        self.reserve_resumed(iova, len);
        Ok(())
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
        Some(libc::ENOMEM) => crate::precheck::memlock_error(acct, len, ipc_lock)
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
