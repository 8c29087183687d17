//! numapin's error type. Every variant says what happened and what to do.

use std::io;
use std::path::PathBuf;

use crate::addr::{Iova, NodeId, PageSize, human_size};

mod cause;
mod kind;

pub use cause::MisplacedCause;
pub use kind::ErrorKind;

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

fn pair(a: u64, b: u64) -> [String; 2] {
    crate::addr::human_sizes(a, b)
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

    /// The node is outside this process's cpuset.
    #[error(
        "node {node} is not in this process's cpuset (Mems_allowed_list: {allowed}); run numapin in a cpuset \
         that includes node {node} (cgroup cpuset.mems, `numactl`/`taskset` do not widen it) or pick an allowed node"
    )]
    NodeNotAllowed {
        /// Node asked for.
        node: NodeId,
        /// The cpuset's nodes.
        allowed: String,
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
        pair(*limit, locked + len)[0], pair(*limit, locked + len)[1], hs(locked), hs(len), (locked + len).div_ceil(1024)
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

    /// The device argument names no PCI function or mdev.
    #[error(
        "{why}; give a PCI address such as 0000:3b:00.0 (`lspci -D` lists them), an mdev UUID \
         (see /sys/bus/mdev/devices), or a device's sysfs path"
    )]
    NotADevice {
        /// What the user gave.
        spec: String,
        /// Why it is not a device.
        why: String,
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
        pair(*smallest, *min)[0],
        pair(*smallest, *min)[1]
    )]
    ExtentTooSmall {
        /// The minimum extent asked for.
        min: u64,
        /// The smallest extent found.
        smallest: u64,
        /// How many extents the region has.
        count: usize,
    },

    /// After pinning, some pages are not on the requested node. The cause
    /// is what numapin could establish, or says it could not.
    #[error(
        "{off_node} of {pages} pages are not on node {node} after pinning (first at offset {first_offset:#x}, on {first_node}); {cause}"
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
        /// What the evidence says about why.
        cause: MisplacedCause,
    },

    /// The pinned-memory accounting did not grow by the region's size.
    #[error(
        "{counter} grew by {} instead of {} after {by}: the kernel did not pin the region; \
         check the device kind with `numapin info`",
        pair(*grew, *len)[0],
        pair(*grew, *len)[1]
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

    /// The kernel refused to pin the memory (`EFAULT`): what
    /// `/proc/self/maps` says about it.
    #[error("{call} could not pin {vaddr:#x}+{len:#x}: {why}")]
    NotPinnable {
        /// The pinning call.
        call: &'static str,
        /// First byte.
        vaddr: u64,
        /// Length.
        len: u64,
        /// What the memory is, and what to do.
        why: String,
    },
    /// The node cannot give the region without falling below its
    /// watermarks: the OOM killer would act instead of an error.
    #[error(
        "node {node} cannot give {} more of {} without the OOM killer: {} free + {} reclaimable, {} kept back by the \
         watermarks; free memory on node {node}, pick another node (see `numapin topology`), or pin less",
        hs(&(len - done)), hs(len), hs(free), hs(reclaimable), hs(watermark)
    )]
    NodeMemoryShort {
        /// Node asked for.
        node: NodeId,
        /// Region size.
        len: u64,
        /// Bytes already faulted in when the shortage was seen (0 before).
        done: u64,
        /// `MemFree` of the node.
        free: u64,
        /// Half the node's file pages and reclaimable slab.
        reclaimable: u64,
        /// The node's zones' high watermarks.
        watermark: u64,
    },
    /// The memory cgroup's `memory.max` does not leave room for the region.
    #[error(
        "the memory cgroup {cgroup} allows {} and uses {}, so {} more would end in its OOM killer; raise memory.max \
         (MemoryMax= in systemd, the container's memory limit) or pin less",
        hs(max),
        hs(current),
        hs(len)
    )]
    CgroupMemoryLimit {
        /// The cgroup (v2) path.
        cgroup: String,
        /// `memory.max` in bytes.
        max: u64,
        /// `memory.current` in bytes.
        current: u64,
        /// Bytes the region needs.
        len: u64,
    },
    /// Free hugepages exist but other mappings have reserved them.
    #[error(
        "{needed} {page_size} hugepages are needed and {free} are free, but {reserved} of those are reserved by other \
         mappings (HugePages_Rsvd); reserve more (`numapin topology` shows the pools) or stop the process holding them"
    )]
    HugepagesReserved {
        /// Hugepage size.
        page_size: PageSize,
        /// Pages the region needs.
        needed: u64,
        /// Free pages (all nodes).
        free: u64,
        /// Reserved pages (all nodes).
        reserved: u64,
    },
    /// The process (or the system) ran out of file descriptors.
    #[error(
        "{op} failed: {}; an io_uring-pinned region keeps ring fds open (one, or one per 32 MiB of memory that can hold huge pages before Linux 7.3): raise the limit (`ulimit -n`, \
         LimitNOFILE= in systemd){}",
        match (system, limit) {
            (true, _) => "the system's file table is full (ENFILE, fs.file-max)".to_string(),
            (false, Some(l)) => match open {
                Some(o) => format!("too many open files ({o} open, RLIMIT_NOFILE {l}, {needed} more needed)"),
                None => format!("too many open files (EMFILE, RLIMIT_NOFILE {l})"),
            },
            (false, None) => "too many open files (EMFILE)".to_string(),
        },
        if *system { " or fs.file-max" } else { " or release regions" }
    )]
    OutOfFds {
        /// The call that needed a descriptor.
        op: String,
        /// ENFILE (system-wide) rather than EMFILE (this process).
        system: bool,
        /// Descriptors open, when numapin could count them.
        open: Option<u64>,
        /// The soft RLIMIT_NOFILE, when known.
        limit: Option<u64>,
        /// Descriptors the step needs.
        needed: u64,
    },

    /// The host uses the device (or something holds it open).
    #[error(
        "{device} is in use: {}{}; {action}: stop its users first (`numapin unbind --wait SECS` waits for \
         holders to close it), or pass --force if you are sure",
        if uses.is_empty() { "no holder numapin can see".to_string() } else { uses.join(", ") },
        if *unseen > 0 {
            format!(" (and numapin could not read the open files of {unseen} process{}, so a holder may be hidden: run as root)", if *unseen == 1 { "" } else { "es" })
        } else {
            String::new()
        }
    )]
    DeviceInUse {
        /// The device.
        device: String,
        /// What the refused step would do.
        action: String,
        /// What uses it.
        uses: Vec<String>,
        /// Processes whose open files could not be read.
        unseen: usize,
    },

    /// `numapin check` found checks that failed; each one's fix is in its
    /// report.
    #[error(
        "{} check{} failed ({}); apply the fix{} shown with {}",
        failed.len(),
        if failed.len() == 1 { "" } else { "s" },
        failed.join(", "),
        if failed.len() == 1 { "" } else { "es" },
        if failed.len() == 1 { "it" } else { "them" }
    )]
    ChecksFailed {
        /// The names of the failed checks.
        failed: Vec<String>,
    },

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

    /// numapind refused or failed a request, or the connection to it
    /// ended; the class is the daemon's (`numapin::client`).
    #[error("{message}{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    Service {
        /// The class the daemon named.
        kind: ErrorKind,
        /// What happened.
        message: String,
        /// What to do.
        hint: Option<String>,
    },
}

impl Error {
    /// Wraps the OS error of the call `op`. Running out of file descriptors
    /// (EMFILE, ENFILE) becomes [`Error::OutOfFds`] whatever the call was.
    pub fn sys(op: impl Into<String>, hint: &'static str, source: io::Error) -> Error {
        match source.raw_os_error() {
            Some(e @ (libc::EMFILE | libc::ENFILE)) => Error::OutOfFds {
                op: op.into(),
                system: e == libc::ENFILE,
                open: None,
                limit: crate::sys::nofile_limit().ok(),
                needed: 1,
            },
            _ => Error::Sys {
                op: op.into(),
                hint,
                cause: source,
            },
        }
    }
}
