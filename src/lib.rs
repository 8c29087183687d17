//! # numapin
//!
//! Memory that the kernel guarantees will never move: allocated on the NUMA
//! node you ask for, pinned long-term through Linux VFIO type1
//! (`VFIO_IOMMU_MAP_DMA` takes a FOLL_LONGTERM pin on every page and maps it
//! in the IOMMU), with a fixed IOVA and known physical addresses.
//!
//! `mlock` does not stop NUMA balancing, compaction or `move_pages` from
//! moving a page; a long-term pin does. numapin needs no kernel code.
//!
//! ```no_run
//! use numapin::{Pinner, PinRequest, NodeId, PageSize};
//! # fn main() -> numapin::Result<()> {
//! let pinner = Pinner::open("0000:00:03.0")?;
//! let region = pinner.pin(&PinRequest {
//!     page_size: PageSize::Huge2M,
//!     ..PinRequest::new(NodeId(1), 64 << 20)
//! })?;
//! println!("{:#x} -> IOVA {:?}", region.vaddr(), region.iova());
//! assert!(region.verify()?.is_intact());
//! region.release()?; // or just drop it
//! # Ok(()) }
//! ```
//!
//! Modules, one concept each: [`addr`] (newtypes and parsing), [`numa`]
//! (topology, node-bound allocation, placement), [`iova`] (allocator),
//! [`vfio`] (device, group, container, GET_INFO), [`uring`] (io_uring
//! long-term pins for mdev and no-IOMMU devices), [`region`] (the pinned
//! handle), [`translate`] (vaddr ↔ IOVA ↔ PA over many regions), [`phys`]
//! (pagemap), [`bind`] (vfio-pci binding), [`edu`] (QEMU's DMA test device),
//! [`sys`] (raw syscalls), [`error`].
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod addr;
pub mod bind;
pub mod edu;
pub mod error;
pub mod iova;
pub mod numa;
pub mod phys;
pub mod region;
pub mod sys;
pub mod translate;
pub mod uring;
pub mod vfio;

pub use addr::{Iova, NodeId, PageSize, PhysAddr};
pub use error::{Error, Result};
pub use region::{PinnedRegion, RegionSpec, Verification};
pub use vfio::{ContainerKind, PinRequest, Pinner, Proof, UserMemory};
