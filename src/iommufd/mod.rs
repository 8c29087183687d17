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
mod ioas;
mod ioctls;

pub use file::FileMapping;
pub(crate) use ioas::{CdevDevice, IommufdMapper, open};

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use iommufd_bindings::iommufd::{
    iommu_ioas_iova_ranges, iommu_iova_range, iommu_option,
    iommufd_option_IOMMU_OPTION_RLIMIT_MODE, iommufd_option_ops_IOMMU_OPTION_OP_GET,
    iommufd_option_ops_IOMMU_OPTION_OP_SET,
};
use serde::Serialize;
use vfio_bindings::bindings::vfio::{vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::addr::Iova;
use crate::iova::IovaRange;

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

/// `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.13+): moves the pinned-page
/// accounting of every mapping in every IOAS of the context `fd` to the
/// calling process (its `VmPin`, and its user's or its own locked memory
/// by the context's mode), for a process that took the context over, e.g.
/// across an exec (`iommufd_ioas_change_process`, drivers/iommu/iommufd/
/// ioas.c). The mappings, pins and IOMMU entries stay as they are. The
/// kernel takes it only when every mapping came from
/// `IOMMU_IOAS_MAP_FILE`, and changes nothing when it refuses. Calling it
/// again from the same process changes nothing.
///
/// # Errors
/// The raw errno: `EINVAL` when a mapping in the context was made by
/// address (`IOMMU_IOAS_MAP`), `ENOTTY` before Linux 6.13, `ENOMEM` when
/// the pages exceed this process's memlock limit.
pub fn change_process(fd: BorrowedFd<'_>) -> io::Result<()> {
    let arg = iommufd_bindings::iommufd::iommu_ioas_change_process {
        size: std::mem::size_of::<iommufd_bindings::iommufd::iommu_ioas_change_process>() as u32,
        __reserved: 0,
    };
    // SAFETY: `arg` is valid for its `size` bytes; the kernel only reads it.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ref(&fd, ioctls::IOMMU_IOAS_CHANGE_PROCESS(), &arg)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    // kvm-ioctls style: the raw wrappers on an fd that is not an iommufd
    // return the kernel's errno.
    #[test]
    fn wrappers_on_a_bogus_fd() {
        let f = std::fs::File::open("/dev/null").unwrap();
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
}
