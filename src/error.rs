//! numapin's error type. Every variant says what happened and what to do.

use std::io;
use std::path::PathBuf;

use crate::addr::{Iova, NodeId, PageSize, human_size};

/// A `Result` with numapin's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn list_nodes(nodes: &[NodeId]) -> String {
    if nodes.is_empty() {
        return "none".into();
    }
    nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn hs(b: &u64) -> String {
    human_size(*b)
}

/// Everything that can go wrong while opening a device or pinning memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A size of zero bytes.
    #[error("region size is 0; give a size such as 64M")]
    ZeroSize,

    /// A size that is not a multiple of the page size.
    #[error(
        "region size {size:#x} ({}) is not a multiple of the {page_size} page size; round it up to {:#x}",
        hs(size), crate::addr::align_up(*size, page_size.bytes()).unwrap_or(0)
    )]
    UnalignedSize {
        /// Requested size.
        size: u64,
        /// Page size of the region.
        page_size: PageSize,
    },

    /// A size not a multiple of the smallest IOMMU page size.
    #[error(
        "region size {size:#x} is not a multiple of the IOMMU's smallest page size {min_page:#x}; round it up"
    )]
    UnalignedForIommu {
        /// Requested size.
        size: u64,
        /// Smallest page size in `iova_pgsizes`.
        min_page: u64,
    },

    /// A caller-fixed IOVA that is not aligned to the region's page size.
    #[error("IOVA {iova} is not aligned to the region's {page_size} page size; choose a multiple of {:#x}", page_size.bytes())]
    UnalignedIova {
        /// The IOVA asked for.
        iova: Iova,
        /// The page size of the region.
        page_size: PageSize,
    },

    /// The IOVA allocator refused the request (outside the usable ranges,
    /// overlap, exhaustion, misalignment).
    #[error(transparent)]
    Iova(#[from] crate::iova::IovaError),

    /// A NUMA node that is not online.
    #[error(
        "NUMA node {node} is not online; online nodes: {} (see `numapin topology`)",
        list_nodes(online)
    )]
    NodeNotOnline {
        /// Node asked for.
        node: NodeId,
        /// Nodes that are online.
        online: Vec<NodeId>,
    },

    /// The node's hugetlb pool has too few free pages.
    #[error(
        "node {node} has {free} free {page_size} hugepages but the region needs {needed}; reserve more with \
         `echo {want} > /sys/devices/system/node/node{node}/hugepages/hugepages-{kb}kB/nr_hugepages`",
        want = total + needed - free, kb = page_size.bytes() >> 10
    )]
    NotEnoughHugepages {
        /// Node asked for.
        node: NodeId,
        /// Hugepage size.
        page_size: PageSize,
        /// Pages the region needs.
        needed: u64,
        /// Free pages in the node's pool.
        free: u64,
        /// Pages in the node's pool.
        total: u64,
    },

    /// RLIMIT_MEMLOCK does not allow pinning the region.
    #[error(
        "RLIMIT_MEMLOCK is {} but pinning needs {} ({} already locked + {} for this region); raise it \
         (`ulimit -l {}` in kB, LimitMEMLOCK= in systemd, /etc/security/limits.conf) or grant CAP_IPC_LOCK",
        hs(limit), hs(&(locked + len)), hs(locked), hs(len), (locked + len).div_ceil(1024)
    )]
    MemlockLimit {
        /// The soft limit in bytes.
        limit: u64,
        /// Bytes already locked by this process (`VmLck`).
        locked: u64,
        /// Bytes the region needs.
        len: u64,
    },

    /// The container has no DMA mapping entries left.
    #[error(
        "no DMA mappings left in this container ({avail} available, vfio_iommu_type1 dma_entry_limit); \
         merge regions into fewer, larger ones or raise the dma_entry_limit module parameter"
    )]
    DmaEntriesExhausted {
        /// Mappings available according to the DMA_AVAIL capability (0 if unknown).
        avail: u32,
    },

    /// The kernel said the IOVA range overlaps an existing mapping.
    #[error(
        "IOVA range {iova}+{len:#x} overlaps an existing DMA mapping in this container; pick another IOVA or omit it"
    )]
    IovaOverlap {
        /// Start of the rejected range.
        iova: Iova,
        /// Length of the rejected range.
        len: u64,
    },

    /// No device at the path or address.
    #[error("no device `{spec}` ({path}); list PCI devices with `lspci -D` or mdev devices under /sys/bus/mdev/devices", path = path.display())]
    DeviceNotFound {
        /// What the user gave.
        spec: String,
        /// Sysfs path looked at.
        path: PathBuf,
    },

    /// The device is bound to another driver (or none).
    #[error("device {device} is {}; bind it with `numapin bind {device}`", match driver { Some(d) => format!("bound to `{d}`, not vfio-pci"), None => "not bound to any driver".to_string() })]
    NotBoundToVfio {
        /// Device name (PCI address).
        device: String,
        /// Current driver, if any.
        driver: Option<String>,
    },

    /// The device has no IOMMU group.
    #[error(
        "device {device} has no IOMMU group: the IOMMU is off or absent; boot with intel_iommu=on (or amd_iommu=on) and check \
         `dmesg | grep -i iommu`, or, without an IOMMU, set vfio.enable_unsafe_noiommu_mode=1 and `numapin bind {device}`"
    )]
    NoIommuGroup {
        /// Device name.
        device: String,
    },

    /// Another device in the group is bound to a non-VFIO driver.
    #[error(
        "IOMMU group {group} is not viable: {}; bind every device of the group to vfio-pci (`numapin bind BDF`) or unbind it",
        others.iter().map(|(d, drv)| format!("{d} is bound to {drv}")).collect::<Vec<_>>().join(", ")
    )]
    GroupNotViable {
        /// Group number.
        group: u32,
        /// Other devices and their drivers.
        others: Vec<(String, String)>,
    },

    /// Permission denied opening a VFIO node.
    #[error("permission denied opening {path}; run as root or give the user access to the group node (e.g. `chown USER {path}`)", path = path.display())]
    PermissionDenied {
        /// The node that could not be opened.
        path: PathBuf,
    },

    /// The group is already in use (held by another process).
    #[error("{path} is busy: another process (or container) holds the group; stop it or use that process", path = path.display())]
    GroupBusy {
        /// The group node.
        path: PathBuf,
    },

    /// A fixed IOVA asked of a no-IOMMU device, which has none.
    #[error(
        "device {device} is in VFIO no-IOMMU mode: it has no IOVAs and DMAs to physical addresses; \
         drop the @IOVA and use the region's physical extents"
    )]
    IovaWithoutIommu {
        /// Device name.
        device: String,
    },

    /// VFIO is not in no-IOMMU mode although the group node says so.
    #[error(
        "VFIO does not offer no-IOMMU mode for {device}; load vfio with `enable_unsafe_noiommu_mode=1` \
         (`echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode`, or vfio.enable_unsafe_noiommu_mode=1 on the kernel command line)"
    )]
    NoIommuModeOff {
        /// Device name.
        device: String,
    },

    /// Opening a no-IOMMU group without CAP_SYS_RAWIO.
    #[error(
        "opening {path} needs CAP_SYS_RAWIO (a no-IOMMU device can DMA anywhere in memory); run as root or grant the capability \
         (`setcap cap_sys_rawio,cap_sys_admin+ep $(which numapin)`)", path = path.display()
    )]
    NoIommuNeedsRawio {
        /// The group node.
        path: PathBuf,
    },

    /// `kernel.io_uring_disabled` forbids the io_uring pin.
    #[error(
        "io_uring is disabled (sysctl kernel.io_uring_disabled = {value}) but numapin pins memory for mdev and no-IOMMU devices \
         with io_uring registered buffers; run `sysctl -w kernel.io_uring_disabled=0`, or set it to 1 and add the user to \
         the group in kernel.io_uring_group"
    )]
    UringDisabled {
        /// The sysctl's value (1: only kernel.io_uring_group, 2: nobody).
        value: u32,
    },

    /// The kernel has no io_uring (or a seccomp filter answers ENOSYS).
    #[error(
        "io_uring_setup is not available (kernel built without CONFIG_IO_URING, or a seccomp filter answering ENOSYS), \
         but numapin needs io_uring to pin memory for mdev and no-IOMMU devices; use a kernel with io_uring, allow the \
         io_uring syscalls, or use a device behind a real IOMMU"
    )]
    UringUnsupported,

    /// Physically contiguous extents shorter than the caller needs.
    #[error(
        "the region's smallest physically contiguous extent is {} ({count} extents) but {} was asked for; \
         back it with larger pages (`:2M` or `:1G` hugepages give extents of at least that size) or ask for less",
        hs(smallest),
        hs(min)
    )]
    ExtentTooSmall {
        /// The minimum extent asked for.
        min: u64,
        /// The smallest extent found.
        smallest: u64,
        /// How many extents the region has.
        count: usize,
    },

    /// After pinning, some pages are not on the requested node.
    #[error(
        "{off_node} of {pages} pages are not on node {node} after pinning (first at offset {first_offset:#x}, on {first_node}); \
         the kernel moved them out of ZONE_MOVABLE/CMA while pinning: free memory on node {node} or disable movable_node/kernelcore"
    )]
    Misplaced {
        /// Node asked for.
        node: NodeId,
        /// Pages checked.
        pages: u64,
        /// Pages elsewhere.
        off_node: u64,
        /// Offset of the first misplaced page.
        first_offset: u64,
        /// Where the first misplaced page is (a node, or an errno).
        first_node: String,
    },

    /// The pinned-memory accounting did not grow by the region's size.
    #[error(
        "{counter} grew by {} instead of {} after {by}: the kernel did not pin the region; \
         check the device kind with `numapin info`",
        hs(grew),
        hs(len)
    )]
    NotAccounted {
        /// The counter read (`VmLck` for VFIO type1, `VmPin` for io_uring).
        counter: &'static str,
        /// The call that should have pinned.
        by: &'static str,
        /// Growth observed.
        grew: u64,
        /// Expected growth.
        len: u64,
    },

    /// MAP_DMA failed with ENOMEM although the memlock limit was not hit.
    #[error(
        "VFIO_IOMMU_MAP_DMA of {} at {iova} failed: out of memory, or a page in ZONE_MOVABLE/CMA could not be migrated for the long-term pin; free memory on the node and retry",
        hs(len)
    )]
    PinNoMemory {
        /// IOVA.
        iova: Iova,
        /// Length.
        len: u64,
    },

    /// Prefaulting (populating) the region failed.
    #[error(
        "could not fault in {} on node {node}: {cause}; free memory on that node or pick another node",
        hs(len)
    )]
    Populate {
        /// Node.
        node: NodeId,
        /// Region size.
        len: u64,
        /// The kernel's error (part of the message).
        cause: io::Error,
    },

    /// Caller memory given to `pin_user` is invalid.
    #[error(
        "caller memory at {vaddr:#x}+{len:#x} is not page-aligned; align address and length to {page:#x}"
    )]
    UnalignedUserMemory {
        /// Address.
        vaddr: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        page: u64,
    },

    /// Physical addresses could not be read.
    #[error(transparent)]
    Phys(#[from] crate::phys::PhysError),

    /// GET_INFO reply could not be parsed.
    #[error(transparent)]
    Info(#[from] crate::vfio::info::InfoError),

    /// A system call failed; `op` names it and `hint` says what to do.
    #[error("{op} failed: {cause}{}", if hint.is_empty() { String::new() } else { format!("; {hint}") })]
    Sys {
        /// The call and its arguments.
        op: String,
        /// What to do about it.
        hint: &'static str,
        /// The OS error (part of the message).
        cause: io::Error,
    },

    /// vfio-ioctls reported an error we do not map to a specific cause.
    #[error("VFIO: {op}: {cause}")]
    Vfio {
        /// What was being done.
        op: String,
        /// The vfio-ioctls error (part of the message).
        cause: vfio_ioctls::VfioError,
    },

    /// Bad value parsed from text.
    #[error(transparent)]
    Parse(#[from] crate::addr::ParseError),

    /// The caller cancelled the work ([`crate::Cancel`]); everything taken
    /// so far was released.
    #[error(
        "cancelled during {step} after {} of {}; nothing is left pinned or allocated",
        hs(done),
        hs(len)
    )]
    Cancelled {
        /// The step that was running.
        step: &'static str,
        /// Bytes of it done.
        done: u64,
        /// Bytes in all.
        len: u64,
    },

    /// Anything else that is invalid input.
    #[error("{0}")]
    Invalid(String),

    /// The iommufd backend was asked for but cannot serve this device.
    #[error(
        "cannot use iommufd for {device}: {reason}; use the type1 backend (Backend::Type1, \
         --backend type1) or Backend::Auto, which falls back to it"
    )]
    IommufdUnavailable {
        /// The device.
        device: String,
        /// Why not.
        reason: String,
    },
}

impl Error {
    /// Wraps the last OS error for the call `op`.
    pub fn sys(op: impl Into<String>, hint: &'static str, source: io::Error) -> Error {
        Error::Sys {
            op: op.into(),
            hint,
            cause: source,
        }
    }
}
