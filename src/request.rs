//! What to pin: one request type for memory numapin allocates
//! ([`crate::Pinner::pin`]) and for memory the caller owns
//! ([`crate::Pinner::pin_user`]), with the proof, prefault threads,
//! progress and cancellation as options.

use crate::addr::{Iova, NodeId, PageSize};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::numa::{Backing, Progress};

/// How much of the pin numapin proves before returning the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proof {
    /// The accounting grew by the size, every page is on the node (if one
    /// was given), and a PFN snapshot is kept for
    /// [`crate::PinnedRegion::verify`].
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

/// What to pin.
///
/// For [`crate::Pinner::pin`], numapin allocates `size` bytes of
/// `page_size` pages on `node` (required there) and faults them in from the
/// node's CPUs. For [`crate::Pinner::pin_user`], the caller's memory is
/// `size` bytes at the address it passes, `page_size` says what backs it,
/// and `node`, if given, is checked after the pin.
///
/// ```
/// use numapin::{Iova, NodeId, PageSize, PinRequest};
/// let req = PinRequest {
///     page_size: PageSize::Huge2M,
///     iova: Some(Iova(0x1_0000_0000)),
///     ..PinRequest::new(NodeId(1), 64 << 20)
/// };
/// assert_eq!(req.node, Some(NodeId(1)));
/// ```
#[derive(Clone, Default)]
pub struct PinRequest<'a> {
    /// The node the memory must live on (`None`: caller memory on any node).
    pub node: Option<NodeId>,
    /// Size in bytes; a non-zero multiple of the page size.
    pub size: u64,
    /// Backing page size (4 KiB, 2 MiB or 1 GiB).
    pub page_size: PageSize,
    /// A fixed IOVA (e.g. a guest-physical address), or `None` to pick one.
    /// A no-IOMMU device has no IOVAs.
    pub iova: Option<Iova>,
    /// The shortest physically contiguous extent accepted, in bytes. Checked
    /// after pinning; needs CAP_SYS_ADMIN to read PFNs.
    pub min_extent: Option<u64>,
    /// How much to prove before returning.
    pub proof: Proof,
    /// What backs memory numapin allocates: private anonymous memory, or a
    /// sealed memfd another process can map ([`crate::PinnedRegion::memfd`]).
    pub backing: Backing,
    /// Prefault threads for memory numapin allocates (0: one per CPU of
    /// the node).
    pub threads: usize,
    /// Called with the bytes faulted in so far.
    pub progress: Option<Progress<'a>>,
    /// Stops a long prefault at its next chunk boundary.
    pub cancel: Option<Cancel>,
    /// For [`crate::Pinner::pin_user`]: the file (memfd, hugetlbfs) and
    /// byte offset that the caller's memory maps `MAP_SHARED`. Where the
    /// backend can map by file (iommufd on Linux 6.13+:
    /// `IOMMU_IOAS_MAP_FILE`), numapin maps the file range instead of the
    /// addresses, which iommufd live update needs
    /// ([`crate::PinnedRegion::suspend`]); elsewhere it maps the addresses
    /// as without it ([`crate::PinnedRegion::is_file_mapping`] says which).
    /// numapin checks in `/proc/self/maps` that the memory is a shared
    /// mapping of this file at this offset. [`crate::Pinner::pin`] ignores
    /// it: a region numapin allocates as a memfd ([`Backing::Memfd`]) is
    /// mapped by file wherever the backend can.
    pub file: Option<(std::os::fd::BorrowedFd<'a>, u64)>,
    /// For [`crate::Pinner::pin`] with [`Backing::Memfd`]: called once
    /// with the region's memfd when its memory is allocated, placed and
    /// faulted in, before the pin is taken. A process the fd goes to may
    /// map it and fault its own mapping in while numapin pins and proves
    /// the region (what numapind does to hide a client's populate behind
    /// its pin). Until `pin` returns the pages are not pinned yet: the
    /// long-term pin may still migrate one out of `ZONE_MOVABLE` or CMA,
    /// and migration updates every mapping of the file, so an early mapping
    /// ends on the pinned frames all the same; if `pin` fails the region is
    /// gone and whoever holds the fd holds the file's pages until it closes
    /// or punches it ([`crate::memfd::discard`]). Not called for anonymous
    /// memory or by [`crate::Pinner::pin_user`].
    pub on_memfd: Option<OnMemfd<'a>>,
}

/// [`PinRequest::on_memfd`]: called with the region's memfd before the pin.
pub type OnMemfd<'a> = &'a (dyn Fn(std::os::fd::BorrowedFd<'_>) + Sync);

impl std::fmt::Debug for PinRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinRequest")
            .field("node", &self.node)
            .field("size", &format_args!("{:#x}", self.size))
            .field("page_size", &self.page_size)
            .field("iova", &self.iova)
            .field("min_extent", &self.min_extent)
            .field("proof", &self.proof)
            .field("backing", &self.backing)
            .field("threads", &self.threads)
            .field("cancellable", &self.cancel.is_some())
            .field("file", &self.file)
            .field("on_memfd", &self.on_memfd.is_some())
            .finish()
    }
}

impl PartialEq for PinRequest<'_> {
    /// Compares what is pinned (node, size, page size, IOVA, extent, proof,
    /// threads), not the callbacks.
    fn eq(&self, o: &Self) -> bool {
        (
            self.node,
            self.size,
            self.page_size,
            self.iova,
            self.min_extent,
        ) == (o.node, o.size, o.page_size, o.iova, o.min_extent)
            && (self.proof, self.threads, self.backing) == (o.proof, o.threads, o.backing)
    }
}

impl PinRequest<'_> {
    /// `size` bytes of base pages on `node`, at an IOVA numapin picks.
    pub fn new(node: NodeId, size: u64) -> Self {
        PinRequest {
            node: Some(node),
            size,
            ..PinRequest::default()
        }
    }

    /// `size` bytes of caller memory on any node.
    pub fn any_node(size: u64) -> Self {
        PinRequest {
            size,
            ..PinRequest::default()
        }
    }

    /// Checks what needs no kernel: size and IOVA against the page size, the
    /// minimum extent.
    pub(crate) fn validate(&self) -> Result<()> {
        let (size, page_size) = (self.size, self.page_size);
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size % page_size.bytes() != 0 {
            return Err(Error::UnalignedSize { size, page_size });
        }
        if let Some(iova) = self.iova {
            if !iova.is_aligned(page_size.bytes()) {
                return Err(Error::UnalignedIova { iova, page_size });
            }
        }
        if let Some(min) = self.min_extent {
            validate_min_extent(min)?;
        }
        Ok(())
    }
}

/// A minimum extent must be a non-zero multiple of the base page size.
pub(crate) fn validate_min_extent(min: u64) -> Result<()> {
    let base = crate::addr::base_page_size();
    if min == 0 || min % base != 0 {
        return Err(Error::Invalid(format!(
            "minimum extent {min:#x} must be a non-zero multiple of the {base:#x}-byte page size, e.g. 2M"
        )));
    }
    Ok(())
}

/// The alignment of an IOVA numapin picks for `len` bytes at `vaddr`: the
/// page size, raised to 2 MiB when the range is that long and starts on a
/// 2 MiB boundary. The IOMMU can use a 2 MiB superpage only where the IOVA
/// and the physical address agree modulo 2 MiB, so THP- and hugetlb-backed
/// memory at an IOVA that is merely 4 KiB-aligned is mapped 4 KiB at a time.
pub(crate) fn iova_align(vaddr: u64, len: u64, page: u64) -> u64 {
    const SUPERPAGE: u64 = crate::numa::THP_ALIGN as u64;
    if len >= SUPERPAGE && vaddr % SUPERPAGE == 0 {
        page.max(SUPERPAGE)
    } else {
        page
    }
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
    fn requests_are_checked_before_the_kernel() {
        let ok = PinRequest::new(NodeId(0), 2 << 20);
        assert!(ok.validate().is_ok());
        assert!(matches!(
            PinRequest::new(NodeId(0), 0).validate(),
            Err(Error::ZeroSize)
        ));
        let unaligned = PinRequest {
            page_size: PageSize::Huge2M,
            ..PinRequest::new(NodeId(0), 3 << 20)
        };
        assert!(matches!(
            unaligned.validate(),
            Err(Error::UnalignedSize { .. })
        ));
        let bad_iova = PinRequest {
            iova: Some(Iova(0x1000)),
            page_size: PageSize::Huge2M,
            ..PinRequest::new(NodeId(0), 2 << 20)
        };
        assert!(matches!(
            bad_iova.validate(),
            Err(Error::UnalignedIova { .. })
        ));
        let bad_extent = PinRequest {
            min_extent: Some(100),
            ..ok.clone()
        };
        assert!(bad_extent.validate().is_err());
    }
}
