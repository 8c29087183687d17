//! Why pages are off their node, and what the kernel's `EFAULT` on a pin
//! means: causes numapin establishes from evidence (the memory policy at
//! the page, the node's zones, `/proc/self/maps`), or says it cannot.

use super::Error;

/// Why pages ended up off their node, as far as numapin can tell from the
/// memory policy at the page and the node's zones.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MisplacedCause {
    /// The memory's policy does not bind it to the node: its pages are where
    /// they were first touched (or where that policy put them).
    NotBound {
        /// The policy at the first misplaced page (`get_mempolicy`).
        policy: String,
    },
    /// The memory is bound to the node and the node has memory a long-term
    /// pin migrates away (ZONE_MOVABLE, CMA): the pin may have moved the
    /// pages, or something else did before it.
    MovableMemory {
        /// What the node has (`/proc/zoneinfo`).
        zones: Vec<String>,
    },
    /// The memory is bound to the node and the node has nothing a pin would
    /// migrate: something moved the pages before the pin, and numapin
    /// cannot tell what.
    Unknown,
    /// The policy at the page could not be read, so numapin cannot tell.
    PolicyUnreadable {
        /// The `get_mempolicy` error.
        error: String,
    },
}

impl std::fmt::Display for MisplacedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MisplacedCause::NotBound { policy } => write!(
                f,
                "the memory is not bound to that node (its policy is {policy}), so its pages stayed where they were \
                 placed: bind it with mbind(MPOL_BIND) before faulting it in, or pin without a node"
            ),
            MisplacedCause::MovableMemory { zones } => write!(
                f,
                "the memory is bound to the node, which has memory a long-term pin migrates away ({}): the pin may \
                 have moved the pages, or another process did before it (numapin cannot tell which); free \
                 unmovable memory on the node, or boot without movable_node/kernelcore/movablecore",
                zones.join(", ")
            ),
            MisplacedCause::Unknown => f.write_str(
                "the memory is bound to the node and the node has no ZONE_MOVABLE or CMA a pin would migrate from, \
                 so something moved the pages before the pin (another process's migrate_pages/move_pages, a cpuset \
                 change); the cause is unknown to numapin: retry, and look for other tools moving memory",
            ),
            MisplacedCause::PolicyUnreadable { error } => write!(
                f,
                "numapin could not read the memory policy at that page ({error}), so the cause is unknown: check \
                 that the memory is bound to the node (mbind MPOL_BIND) before it is faulted in"
            ),
        }
    }
}

impl Error {
    /// [`Error::NotPinnable`] with the cause `maps` shows (`None`: maps
    /// could not be read).
    pub fn not_pinnable(
        call: &'static str,
        vaddr: u64,
        len: u64,
        maps: Option<crate::sys::RangeMapping>,
    ) -> Error {
        use crate::sys::RangeMapping as M;
        let why = match maps {
            Some(M::Unmapped(at)) => format!(
                "nothing is mapped at {at:#x}; pin only memory that stays mapped for the region's life"
            ),
            Some(M::NotWritable { start, perms, path }) => format!(
                "the mapping at {start:#x} ({perms}{}{path}) is not writable, and a device that writes needs a \
                 writable pin; map it PROT_READ|PROT_WRITE",
                if path.is_empty() { "" } else { " " }
            ),
            Some(M::Writable { path }) => format!(
                "it is mapped writable ({}) but the kernel refused a long-term pin: file mappings that need dirty \
                 tracking, device memory (VM_IO/VM_PFNMAP) and secretmem cannot be pinned; use anonymous memory, \
                 memfd/shmem or hugetlbfs",
                if path.is_empty() { "anonymous" } else { &path }
            ),
            None => "the range is not mapped, not writable, or cannot be pinned long-term (EFAULT; /proc/self/maps \
                     could not be read to tell which); pin writable anonymous, memfd or hugetlbfs memory"
                .to_string(),
        };
        Error::NotPinnable {
            call,
            vaddr,
            len,
            why,
        }
    }
}
