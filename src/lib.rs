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
//! let pinner = Pinner::open("0000:3b:00.0")?;
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
//! The front door is the names re-exported here. Behind them, one module
//! per concept (the layout is described in `docs/design.md`): [`Pinner`]
//! sits above two seams, who maps the IOVA ([`vfio`]'s type1 container,
//! an [`iommufd`] IOAS, or nothing for a no-IOMMU device; [`Backend`]
//! chooses) and who holds the pin (the mapping itself, or an io_uring
//! long-term pin, each with its [`backend::Accounting`]), and [`PinnedRegion`]
//! below them.
//! Public modules: [`addr`] (newtypes and parsing), [`numa`] (topology,
//! node-bound allocation, placement), [`iova`] (the allocator), [`vfio`]
//! (device discovery, the container's ioctls, GET_INFO), [`iommufd`] (the
//! cdev + `/dev/iommu` backend, its raw ioctls), [`phys`]
//! (pagemap), [`translate`] (vaddr ↔ IOVA ↔ PA over many regions),
//! [`error`].
//!
//! The `tools` feature (pulled in by `cli`) adds what numapin's own CLI
//! and test runners use, with no stability promise: `bind` (vfio-pci
//! binding), `edu` (QEMU's DMA test device), `sys` (raw syscalls) and
//! `uring` (the io_uring pin).
//!
//! The library never prints: it logs through the [`log`] facade (a failed
//! unmap on drop, a leaked region) and returns errors.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod addr;
pub mod error;
pub mod iommufd;
pub mod iova;
pub mod numa;
pub mod phys;
pub mod translate;
pub mod vfio;

pub mod backend;
mod cancel;
pub mod memfd;
pub mod pfnnode;
mod pinner;
mod precheck;
mod prove;
mod region;
mod request;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "tools")]
pub mod bind;
#[cfg(feature = "tools")]
pub mod edu;
#[cfg(feature = "vm-memory")]
pub mod guest;
#[cfg(feature = "tools")]
pub mod sys;
#[cfg(not(feature = "tools"))]
mod sys;
#[cfg(feature = "tools")]
pub mod uring;
#[cfg(not(feature = "tools"))]
mod uring;

pub use addr::{Iova, NodeId, PageSize, PhysAddr, VirtAddr};
pub use backend::Backend;
pub use cancel::Cancel;
pub use error::{Error, ErrorKind, Result};
pub use numa::Backing;
pub use pinner::Pinner;
pub use region::{PinnedRegion, Suspended, Verification};
pub use request::{OnMemfd, PinRequest, Proof};
pub use vfio::{ContainerKind, DeviceInfo};
