//! Guest RAM as a VMM has it (vm-memory 0.18 regions), pinned at IOVA = GPA
//! with one mapping per region, each on the host node its virtual node maps
//! to; then translated GPA ↔ host address ↔ PA, hot-added and removed, and
//! discarded only through numapin.
//!
//! The regions are the VMM's: numapin never maps or unmaps them. Anonymous,
//! memfd- and hugetlbfs-backed regions are all pinned the same way (the
//! kernel pins the pages behind the host address); placement is checked on
//! the pages themselves (`move_pages`), whatever put them there (a VMA
//! policy, a shmem file's shared policy, the first touch).
//!
//! **Hotplug.** Each region is its own mapping, because type1 refuses to
//! unmap part of one (`EINVAL`). A region costs one of the container's DMA
//! entries (65,535 by default, `dma_entry_limit`): hot-plugging in 128 MiB
//! blocks (virtio-mem's default) reaches the limit at 8 TiB; use larger
//! aligned blocks where the guest allows.
//!
//! **Discard.** A pinned page that the VMM discards (`MADV_DONTNEED`,
//! `MADV_REMOVE`, a balloon) is replaced in the page tables while the IOMMU
//! keeps the old one: the device and the CPU then see different memory.
//! [`GuestRam::discard`] therefore unmaps the region first, discards, and
//! pins the region again (the device sees the new zero pages, as the CPU
//! does). A discard done behind numapin's back shows in
//! [`GuestRam::verify`] as changed PFNs where PFNs are readable
//! (CAP_SYS_ADMIN); without them numapin cannot see it.
//!
//! **Fork.** A VMM that forks (to exec a helper) should mark guest RAM
//! `MADV_DONTFORK`: numapin does not change the caller's memory. Since Linux
//! 5.9 a pinned anonymous page stays with the parent and the child gets a
//! copy (hugetlb since 5.12), so the device's view stays intact either way.

use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::addr::{Iova, NodeId, PageSize, PhysAddr, VirtAddr};
use crate::error::{Error, Result};
use crate::region::{PinnedRegion, Verification};
use crate::request::PinRequest;
use crate::translate::AddressMap;
use crate::{Pinner, Proof};

/// Where a slot is and what backs it: everything but its pin.
#[derive(Debug, Clone, Copy)]
struct Place {
    gpa: GuestAddress,
    host: VirtAddr,
    len: u64,
    node: Option<NodeId>,
    page_size: PageSize,
    /// The backing file and offset, when vm-memory knows one (memfd,
    /// hugetlbfs): what `IOMMU_IOAS_MAP_FILE` and live update need.
    file: Option<(i32, u64)>,
}

/// One pinned region of guest RAM.
#[derive(Debug)]
pub struct Slot {
    at: Place,
    region: PinnedRegion,
}

impl Slot {
    /// The guest-physical address of the first byte (also its IOVA).
    pub fn gpa(&self) -> GuestAddress {
        self.at.gpa
    }

    /// The host virtual address of the first byte.
    pub fn host_addr(&self) -> VirtAddr {
        self.at.host
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.at.len
    }

    /// Never true: a slot covers a region.
    pub fn is_empty(&self) -> bool {
        self.at.len == 0
    }

    /// The host node its pages were checked on, if one was asked for.
    pub fn node(&self) -> Option<NodeId> {
        self.at.node
    }

    /// The page size backing it, as the kernel reports it for the mapping
    /// (`KernelPageSize` in `/proc/self/smaps`).
    pub fn page_size(&self) -> PageSize {
        self.at.page_size
    }

    /// The raw fd and offset of its backing file, if vm-memory has one.
    pub fn file(&self) -> Option<(i32, u64)> {
        self.at.file
    }

    /// The pinned region.
    pub fn region(&self) -> &PinnedRegion {
        &self.region
    }
}

/// How [`GuestRam::discard`] discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// `MADV_DONTNEED`: private memory reads back as zero.
    DontNeed,
    /// `MADV_REMOVE`: frees the backing of shared (memfd, hugetlbfs) memory.
    Remove,
}

/// Guest RAM pinned at IOVA = GPA, region by region.
#[derive(Debug)]
pub struct GuestRam {
    pinner: Pinner,
    /// Sorted by GPA.
    slots: Vec<Slot>,
    map: AddressMap,
    proof: Proof,
}

/// The page size the kernel uses for the mapping at `addr`.
fn page_size_at(addr: VirtAddr) -> Result<PageSize> {
    let bytes = crate::sys::kernel_page_size(addr.raw())
        .map_err(|e| Error::sys("read /proc/self/smaps", "", e))?;
    PageSize::from_bytes(bytes).ok_or_else(|| {
        Error::Invalid(format!(
            "the mapping at {addr} uses {bytes}-byte pages, which numapin does not pin; back guest RAM with 4K, 2M or 1G pages"
        ))
    })
}

impl GuestRam {
    /// An empty set on `pinner`'s container. `proof` is the proof level of
    /// every pin (a VMM that maps through the same container from other
    /// threads should not use [`Proof::Accounting`] or [`Proof::Full`]'s
    /// accounting check unless numapin does all of its mappings: the counter
    /// is per process).
    pub fn new(pinner: Pinner, proof: Proof) -> GuestRam {
        GuestRam {
            pinner,
            slots: Vec::new(),
            map: AddressMap::new(),
            proof,
        }
    }

    /// Pins every region of `mem` at IOVA = GPA; `host_node(gpa)` gives the
    /// host node each region's pages must be on (`None`: any). On error the
    /// regions this call pinned are released again.
    ///
    /// # Safety
    /// Every region's memory must stay mapped until its slot is removed or
    /// the `GuestRam` is dropped, and no Rust reference to it may be held
    /// while it is pinned (a device may write it at any time): the contract
    /// of [`Pinner::pin_user`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for a region without a host address, or one that
    /// overlaps a slot; the errors of [`Pinner::pin_user`].
    pub unsafe fn pin_all<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        host_node: impl Fn(GuestAddress) -> Option<NodeId>,
    ) -> Result<()> {
        let mut added = Vec::new();
        for r in mem.iter() {
            // SAFETY: the caller's contract covers every region of `mem`.
            match unsafe { self.add(r, host_node(r.start_addr())) } {
                Ok(()) => added.push(r.start_addr()),
                Err(e) => {
                    for gpa in added {
                        let _ = self.remove(gpa);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Hot-adds one region: pins it at IOVA = its GPA, one mapping.
    ///
    /// # Safety
    /// As for [`GuestRam::pin_all`].
    ///
    /// # Errors
    /// As for [`GuestRam::pin_all`].
    pub unsafe fn add<R: GuestMemoryRegion>(&mut self, r: &R, node: Option<NodeId>) -> Result<()> {
        let gpa = r.start_addr();
        let ptr = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| {
            Error::Invalid(format!(
                "guest region at GPA {:#x} has no host address ({e}); pin only mmap-backed regions",
                gpa.0
            ))
        })?;
        let host = VirtAddr::of(ptr);
        let at = Place {
            gpa,
            host,
            len: r.len(),
            node,
            page_size: page_size_at(host)?,
            file: r.file_offset().map(|f| (f.file().as_raw_fd(), f.start())),
        };
        // SAFETY: the caller's contract is pin_user's.
        let region = unsafe { self.pin(&at) }?;
        self.insert(Slot { at, region })
    }

    /// Puts a slot in the translation table and the list, in GPA order;
    /// releases its region if the table refuses it (an overlap).
    fn insert(&mut self, slot: Slot) -> Result<()> {
        if let Err(e) = self.map.insert(slot.region.mapping()) {
            let gpa = slot.at.gpa.0;
            slot.region.release()?;
            return Err(Error::Invalid(format!("guest region at GPA {gpa:#x}: {e}")));
        }
        let i = self.slots.partition_point(|s| s.at.gpa < slot.at.gpa);
        self.slots.insert(i, slot);
        Ok(())
    }

    /// Takes the slot at index `i` out of the list and the table.
    fn take(&mut self, i: usize) -> Slot {
        let slot = self.slots.remove(i);
        self.map.remove(slot.at.host);
        slot
    }

    /// Pins a slot; a file-backed one by file where the backend can
    /// (iommufd on Linux 6.13+), which iommufd live update needs.
    ///
    /// # Safety
    /// pin_user's contract for the place's memory.
    unsafe fn pin(&self, at: &Place) -> Result<PinnedRegion> {
        let req = PinRequest {
            node: at.node,
            iova: Some(Iova(at.gpa.0)),
            page_size: at.page_size,
            proof: self.proof,
            // SAFETY: the fd is the region's backing file, which vm-memory
            // keeps open as long as the region, and the region outlives the
            // slot (the caller's contract).
            file: at
                .file
                .map(|(fd, off)| (unsafe { BorrowedFd::borrow_raw(fd) }, off)),
            ..PinRequest::any_node(at.len)
        };
        // SAFETY: the caller's contract is pin_user's.
        unsafe { self.pinner.pin_user(at.host.as_mut_ptr(), &req) }
    }

    /// Hot-removes the region that starts at `gpa`: unmaps it (its pages
    /// are unpinned; the memory stays the caller's).
    ///
    /// # Errors
    /// [`Error::Invalid`] if no slot starts at `gpa`; the unmap's error (the
    /// region is then leaked as mapped, see [`PinnedRegion::release`]).
    pub fn remove(&mut self, gpa: GuestAddress) -> Result<()> {
        let i = self
            .slots
            .binary_search_by_key(&gpa, |s| s.at.gpa)
            .map_err(|_| Error::Invalid(format!("no guest RAM slot starts at GPA {:#x}", gpa.0)))?;
        self.take(i).region.release()
    }

    /// Discards `[gpa, gpa+len)` the only safe way: unmaps the whole slot
    /// holding it (type1 cannot unmap part of a mapping), discards with
    /// `how`, and pins the slot again, so that the device and the CPU see
    /// the same (new) pages.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a range outside one slot or not page-aligned;
    /// the errors of unmapping, of `madvise`, and of pinning again (then
    /// the slot is gone and the error says so).
    pub fn discard(&mut self, gpa: GuestAddress, len: u64, how: Discard) -> Result<()> {
        let i = self
            .slots
            .iter()
            .position(|s| gpa >= s.at.gpa && gpa.0.saturating_add(len) <= s.at.gpa.0 + s.at.len)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "GPA range {:#x}+{len:#x} is not inside one guest RAM slot",
                    gpa.0
                ))
            })?;
        let page = self.slots[i].at.page_size;
        if gpa.0 % page.bytes() != 0 || len % page.bytes() != 0 || len == 0 {
            return Err(Error::Invalid(format!(
                "discard {:#x}+{len:#x}: align both to the slot's {page} pages",
                gpa.0
            )));
        }
        let Slot { at, region } = self.take(i);
        region.release()?;
        let addr = at.host.raw() + (gpa.0 - at.gpa.0);
        let advice = match how {
            Discard::DontNeed => libc::MADV_DONTNEED,
            Discard::Remove => libc::MADV_REMOVE,
        };
        // SAFETY: the range lies inside the caller's region, which is no
        // longer pinned; the caller asked for its contents to go.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) } != 0 {
            let e = std::io::Error::last_os_error();
            log::error!(
                "discard at {addr:#x} failed ({e}); the slot at GPA {:#x} stays unpinned",
                at.gpa.0
            );
            return Err(Error::sys(format!("madvise({how:?}) at {addr:#x}"), "", e));
        }
        // Fault the discarded range in again where the policy says, then pin.
        // SAFETY: as above: the caller's memory, not referenced by Rust.
        unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                len as usize,
                crate::sys::MADV_POPULATE_WRITE,
            )
        };
        // SAFETY: the caller's contract from `add` still holds for the slot.
        let region = unsafe { self.pin(&at) }.map_err(|e| {
            Error::Invalid(format!(
                "the slot at GPA {:#x} was discarded and could not be pinned again ({e}); it is removed",
                at.gpa.0
            ))
        })?;
        self.insert(Slot { at, region })
    }

    /// The slots, by GPA.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The host address of guest-physical address `gpa`.
    pub fn gpa_to_host(&self, gpa: GuestAddress) -> Option<VirtAddr> {
        self.map.vaddr_of(Iova(gpa.0))
    }

    /// The guest-physical address of host address `host`.
    pub fn host_to_gpa(&self, host: VirtAddr) -> Option<GuestAddress> {
        self.map.iova_of(host).map(|i| GuestAddress(i.raw()))
    }

    /// The physical address behind `gpa`, from the PFNs recorded at pin
    /// time (`None` when they were hidden: no CAP_SYS_ADMIN).
    pub fn gpa_to_phys(&self, gpa: GuestAddress) -> Option<PhysAddr> {
        self.map.phys_of(self.gpa_to_host(gpa)?)
    }

    /// [`PinnedRegion::verify`] for every slot: nodes, and PFNs against
    /// the pin-time snapshot (which is how a discard done behind numapin's
    /// back shows).
    ///
    /// # Errors
    /// The first slot whose check failed to run.
    pub fn verify(&self) -> Result<Vec<(GuestAddress, Verification)>> {
        self.slots
            .iter()
            .map(|s| Ok((s.at.gpa, s.region.verify()?)))
            .collect()
    }

    /// Live update, before the exec: suspends every slot (see
    /// [`PinnedRegion::suspend`]: type1 forgets the addresses, iommufd
    /// needs every slot mapped by file) and returns what the new process needs to
    /// adopt them with [`GuestRam::resume`]. Every slot must be file-backed
    /// (memfd, hugetlbfs) and shared: that is checked for all of them before
    /// any is touched. If the kernel refuses one, the slots suspended before
    /// it get their address back, and the whole set is handed back with the
    /// error.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming an anonymous slot; the kernel's refusal.
    pub fn suspend(mut self) -> std::result::Result<Vec<SuspendedSlot>, Box<(Error, GuestRam)>> {
        if let Some(s) = self.slots.iter().find(|s| s.at.file.is_none()) {
            let e = Error::Invalid(format!(
                "the slot at GPA {:#x} is anonymous memory, which the new process cannot map again; back guest RAM \
                 with memfd or hugetlbfs files to keep it pinned across an exec",
                s.at.gpa.0
            ));
            return Err(Box::new((e, self)));
        }
        let mut parked: Vec<(Place, crate::Suspended)> = Vec::new();
        while !self.slots.is_empty() {
            let Slot { at, region } = self.take(self.slots.len() - 1);
            match region.suspend() {
                Ok(sus) => parked.push((at, sus)),
                Err(refused) => {
                    let (e, region) = *refused;
                    let _ = self.insert(Slot { at, region });
                    // Give the suspended ones their address back.
                    for (at, sus) in parked {
                        // SAFETY: the same mapping of the same file, still in place.
                        match unsafe { self.pinner.resume(at.host.as_mut_ptr(), &sus) } {
                            Ok(region) => {
                                let _ = self.insert(Slot { at, region });
                            }
                            Err(e2) => {
                                log::error!("slot at GPA {:#x} stays suspended: {e2}", at.gpa.0)
                            }
                        }
                    }
                    return Err(Box::new((e, self)));
                }
            }
        }
        let mut out: Vec<SuspendedSlot> = parked
            .into_iter()
            .map(|(at, sus)| SuspendedSlot {
                gpa: at.gpa.0,
                offset: at.file.map_or(0, |(_, o)| o),
                mapping: sus,
            })
            .collect();
        out.sort_by_key(|s| s.gpa);
        Ok(out)
    }

    /// Live update, after the exec: adopts the slots the previous process
    /// suspended, each at the host address where this process mapped the
    /// same file again (a region of `mem` at the slot's GPA). Nothing is
    /// pinned again.
    ///
    /// # Safety
    /// Each region of `mem` must map the same file range the slot was made
    /// of, and [`GuestRam::pin_all`]'s contract holds for it from now on.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a slot `mem` has no region for; the kernel's
    /// refusal ([`crate::Pinner::resume`]).
    pub unsafe fn resume<M: GuestMemoryBackend>(
        pinner: Pinner,
        proof: Proof,
        mem: &M,
        slots: &[SuspendedSlot],
    ) -> Result<GuestRam> {
        let mut ram = GuestRam::new(pinner, proof);
        for s in slots {
            let r = mem
                .iter()
                .find(|r| r.start_addr().0 == s.gpa && r.len() == s.mapping.len)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "no guest memory region of {:#x} bytes at GPA {:#x}",
                        s.mapping.len, s.gpa
                    ))
                })?;
            let ptr = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| Error::Invalid(format!("GPA {:#x}: no host address ({e})", s.gpa)))?;
            // The new mapping has no page-table entries yet: map the file's
            // pages (they are the pinned ones) so the PFN snapshot sees them.
            // SAFETY: populating a mapping of the caller's file reads nothing
            // and writes nothing.
            unsafe {
                libc::madvise(
                    ptr.cast(),
                    s.mapping.len as usize,
                    crate::sys::MADV_POPULATE_READ,
                )
            };
            // SAFETY: the caller's contract.
            let region = unsafe { ram.pinner.resume(ptr, &s.mapping) }?;
            let at = Place {
                gpa: GuestAddress(s.gpa),
                host: VirtAddr::of(ptr),
                len: s.mapping.len,
                node: s.mapping.node,
                page_size: s.mapping.page_size,
                file: r.file_offset().map(|f| (f.file().as_raw_fd(), f.start())),
            };
            ram.insert(Slot { at, region })?;
        }
        Ok(ram)
    }

    /// Releases every slot.
    ///
    /// # Errors
    /// The first failed unmap (the others are still released).
    pub fn release(mut self) -> Result<()> {
        let mut first = None;
        for s in self.slots.drain(..) {
            if let Err(e) = s.region.release() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// A slot kept across an exec: its GPA, the offset in its file, and the
/// mapping ([`crate::Suspended`]). Plain data, to hand to the new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuspendedSlot {
    /// Guest-physical address (also the IOVA).
    pub gpa: u64,
    /// Offset of the slot in its backing file.
    pub offset: u64,
    /// The suspended mapping.
    pub mapping: crate::Suspended,
}

/// The borrowed fd of a slot's backing file, for callers that need it.
///
/// # Safety
/// The fd must still be open (it belongs to the vm-memory region).
pub unsafe fn slot_file(s: &Slot) -> Option<BorrowedFd<'_>> {
    // SAFETY: the caller guarantees the region's file is still open.
    s.at.file
        .map(|(fd, _)| unsafe { BorrowedFd::borrow_raw(fd) })
}
