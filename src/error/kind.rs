//! The class of every error: what kind of action fixes it, and the exit
//! code the CLI gives it.

use std::io;

use super::Error;

/// The class of an error: what kind of thing went wrong, and so what kind
/// of action fixes it. The CLI exits with [`ErrorKind::exit_code`], its
/// `--json` error object carries [`ErrorKind::name`], and the service's
/// protocol uses the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request itself is wrong (a size, an alignment, an address, a
    /// device string that names no device): change the arguments.
    Usage,
    /// The caller lacks a right (a capability, access to a device node).
    Permission,
    /// A resource the pin needs is short: node memory, hugepages, memlock,
    /// DMA mappings, IOVA space, file descriptors.
    ResourceLimit,
    /// The device or the system is not in the state pinning needs (driver,
    /// IOMMU, group, io_uring, a device held by another process).
    DeviceState,
    /// The kernel did not give the guarantee: a page off its node, a pin not
    /// accounted, a frame that changed. Never retried silently.
    GuaranteeBroken,
    /// The caller cancelled the work.
    Cancelled,
    /// A system call failed for a reason numapin does not recognise.
    Internal,
}

impl ErrorKind {
    /// The name used in JSON and the protocol (`usage`, `permission`, …).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::Permission => "permission",
            ErrorKind::ResourceLimit => "resource-limit",
            ErrorKind::DeviceState => "device-state",
            ErrorKind::GuaranteeBroken => "guarantee-broken",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }

    /// The CLI's exit status for this kind: 2 usage, 3 permission, 4
    /// resource limit, 5 device state, 6 guarantee broken, 7 internal. A
    /// cancelled run exits 128 + the signal number instead (130 for SIGINT,
    /// 143 for SIGTERM); without a signal, 130.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 2,
            ErrorKind::Permission => 3,
            ErrorKind::ResourceLimit => 4,
            ErrorKind::DeviceState => 5,
            ErrorKind::GuaranteeBroken => 6,
            ErrorKind::Internal => 7,
            ErrorKind::Cancelled => 130,
        }
    }
}

fn errno_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => ErrorKind::Permission,
        Some(libc::ENOMEM | libc::ENOSPC | libc::EMFILE | libc::ENFILE | libc::EAGAIN) => {
            ErrorKind::ResourceLimit
        }
        Some(libc::EBUSY | libc::ENODEV | libc::ENXIO) => ErrorKind::DeviceState,
        Some(libc::EINVAL | libc::EFAULT | libc::EEXIST) => ErrorKind::Usage,
        _ => ErrorKind::Internal,
    }
}

impl Error {
    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            Error::ZeroSize
            | Error::UnalignedSize { .. }
            | Error::UnalignedForIommu { .. }
            | Error::UnalignedIova { .. }
            | Error::NodeNotOnline { .. }
            | Error::IovaOverlap { .. }
            | Error::DeviceNotFound { .. }
            | Error::NotADevice { .. }
            | Error::IovaWithoutIommu { .. }
            | Error::UnalignedUserMemory { .. }
            | Error::NotPinnable { .. }
            | Error::Parse(_)
            | Error::Invalid(_) => K::Usage,
            Error::Iova(e) => match e {
                crate::iova::IovaError::Exhausted { .. } => K::ResourceLimit,
                _ => K::Usage,
            },
            Error::PermissionDenied { .. }
            | Error::NoIommuNeedsRawio { .. }
            | Error::NodeNotAllowed { .. } => K::Permission,
            Error::NotEnoughHugepages { .. }
            | Error::MemlockLimit { .. }
            | Error::DmaEntriesExhausted { .. }
            | Error::PinNoMemory { .. }
            | Error::OutOfFds { .. }
            | Error::NodeMemoryShort { .. }
            | Error::CgroupMemoryLimit { .. }
            | Error::HugepagesReserved { .. }
            | Error::Populate { .. }
            | Error::ExtentTooSmall { .. } => K::ResourceLimit,
            Error::NotBoundToVfio { .. }
            | Error::NoIommuGroup { .. }
            | Error::GroupNotViable { .. }
            | Error::GroupBusy { .. }
            | Error::NoIommuModeOff { .. }
            | Error::UringDisabled { .. }
            | Error::UringUnsupported
            | Error::ChecksFailed { .. }
            | Error::DeviceInUse { .. }
            | Error::IommufdUnavailable { .. } => K::DeviceState,
            Error::Misplaced { .. } | Error::NotAccounted { .. } => K::GuaranteeBroken,
            Error::Cancelled { .. } => K::Cancelled,
            Error::Phys(e) => match e {
                crate::phys::PhysError::PfnHidden { .. } => K::Permission,
                _ => K::Internal,
            },
            Error::Info(_) | Error::Vfio { .. } => K::Internal,
            Error::Sys { cause, .. } => errno_kind(cause),
            Error::Service { kind, .. } => *kind,
        }
    }

    /// The message split into what happened and what to do: every message
    /// reads `<what happened>; <what to do>`, and the hint is what follows
    /// the first `; ` (`None` when the message has no remedy part).
    pub fn parts(&self) -> (String, Option<String>) {
        let text = self.to_string();
        match text.split_once("; ") {
            Some((what, hint)) => (what.to_string(), Some(hint.to_string())),
            None => (text, None),
        }
    }
}
