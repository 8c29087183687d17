//! Node-bound memory: mapped (anonymous, hugetlb, or a sealed memfd),
//! bound to the node with `mbind(MPOL_BIND)` before any page is touched,
//! then faulted in by threads on the node's CPUs, in chunks that re-check
//! the node's free memory and honour cancellation.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use super::{Progress, Topology, parse_cpulist};
use crate::addr::{NodeId, PageSize};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::sys;

/// Anonymous (or hugetlb) memory numapin mapped, bound to one node and faulted
/// in. Unmapped on drop.
#[derive(Debug)]
pub struct NodeMemory {
    ptr: NonNull<u8>,
    len: usize,
    node: NodeId,
    page_size: PageSize,
    /// The sealed memfd behind a [`Backing::Memfd`] mapping.
    fd: Option<OwnedFd>,
}

/// What backs memory numapin allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory (THP where the kernel gives it), or
    /// hugetlb for 2 MiB and 1 GiB pages.
    #[default]
    Anonymous,
    /// A memfd (shmem, or hugetlbfs for 2 MiB and 1 GiB pages) with its
    /// size sealed, mapped shared: another process that maps the fd sees
    /// the same frames, and `IOMMU_IOAS_MAP_FILE` can map it by file.
    Memfd,
}

// SAFETY: NodeMemory owns a private mapping; the raw pointer is not aliased by
// any Rust reference and the mapping may be used and unmapped from any thread.
unsafe impl Send for NodeMemory {}
// SAFETY: shared access only exposes the address, never a reference to the bytes.
unsafe impl Sync for NodeMemory {}

/// Ranges at least this large are prefaulted by several threads.
pub const PARALLEL_PREFAULT_MIN: u64 = 64 << 20;
/// The PMD size on x86-64 and arm64 with 4 KiB pages: the THP size, and
/// the smallest IOMMU superpage.
pub(crate) const THP_ALIGN: usize = 2 << 20;

/// What one prefault call covers. `MADV_POPULATE_WRITE` holds the mmap lock
/// (shared) for its whole range, so a short range keeps waits for it short.
const PREFAULT_CHUNK: usize = 4 << 20;

/// Chunks between two re-checks of the node's free memory (64 MiB): often
/// enough to stop before the node runs dry, rare enough to cost nothing.
const RECHECK_CHUNKS: usize = 16;

impl NodeMemory {
    /// Maps `len` bytes of `page_size` pages (private anonymous memory, or
    /// hugetlb), binds them to `node` with `mbind(MPOL_BIND)` and faults
    /// every page in, on that node.
    ///
    /// `len` must be a non-zero multiple of `page_size`; capacity (node online,
    /// hugepages free) should be checked by the caller with
    /// [`Topology::check_capacity`]. `threads` caps the prefault threads
    /// (0 = one per CPU of the node); they run on the node's CPUs. `cancel`
    /// stops the prefault at its next 4 MiB chunk.
    ///
    /// # Errors
    /// [`Error::ZeroSize`], [`Error::UnalignedSize`], [`Error::Sys`] for the
    /// `mmap` (with what to do), [`Error::NodeNotAllowed`] for a node outside
    /// the cpuset, [`Error::NodeMemoryShort`], [`Error::CgroupMemoryLimit`],
    /// [`Error::Populate`], [`Error::Cancelled`].
    pub fn allocate(
        topo: &Topology,
        node: NodeId,
        len: u64,
        page_size: PageSize,
        threads: usize,
        progress: Option<Progress<'_>>,
        cancel: Option<&Cancel>,
    ) -> Result<NodeMemory> {
        Self::allocate_backed(
            topo,
            node,
            len,
            page_size,
            Backing::Anonymous,
            threads,
            progress,
            cancel,
        )
    }

    /// [`NodeMemory::allocate`] with a choice of backing: a sealed memfd
    /// ([`Backing::Memfd`]) gives memory another process can map (the fd
    /// from [`NodeMemory::memfd`]) and still see the same frames.
    ///
    /// # Errors
    /// As [`NodeMemory::allocate`], and [`Error::Sys`] for `memfd_create`,
    /// `ftruncate` and `F_ADD_SEALS`.
    #[allow(clippy::too_many_arguments)]
    pub fn allocate_backed(
        topo: &Topology,
        node: NodeId,
        len: u64,
        page_size: PageSize,
        backing: Backing,
        threads: usize,
        progress: Option<Progress<'_>>,
        cancel: Option<&Cancel>,
    ) -> Result<NodeMemory> {
        let n = topo.require(node)?;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len % page_size.bytes() != 0 {
            return Err(Error::UnalignedSize {
                size: len,
                page_size,
            });
        }
        let ulen = usize::try_from(len).map_err(|_| Error::Invalid("size too large".into()))?;
        let (p, fd) = match backing {
            Backing::Anonymous => (map_anonymous(ulen, page_size)?, None),
            Backing::Memfd => {
                let (p, fd) = crate::memfd::map_sealed(ulen, page_size)?;
                (p, Some(fd))
            }
        };
        let mem = NodeMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len: ulen,
            node,
            page_size,
            fd,
        };
        // A pinned page must stay with this process on fork(); don't copy it to children.
        // SAFETY: the range is our own fresh mapping.
        unsafe { libc::madvise(p, ulen, libc::MADV_DONTFORK) };
        if !page_size.is_huge() && backing == Backing::Anonymous {
            // SAFETY: as above. THP is fine for pinning; this only hints.
            unsafe { libc::madvise(p, ulen, libc::MADV_HUGEPAGE) };
        }
        // For a shmem memfd the policy is the file's (shared by every
        // mapping of it); hugetlb has no shared policy, so its pages go where
        // this mapping's policy puts this process's faults.
        sys::mbind(mem.addr(), ulen, node, sys::MPOL_MF_STRICT)
            .map_err(|e| mbind_error(node, e))?;
        mem.populate(&n.cpus, threads, progress, cancel)?;
        Ok(mem)
    }

    fn populate(
        &self,
        cpus: &[u32],
        threads: usize,
        progress: Option<Progress<'_>>,
        cancel: Option<&Cancel>,
    ) -> Result<()> {
        let want = if threads == 0 {
            cpus.len().max(1)
        } else {
            threads
        };
        let chunks = self.len.div_ceil(PREFAULT_CHUNK);
        let nthreads = if (self.len as u64) < PARALLEL_PREFAULT_MIN {
            1
        } else {
            want.min(chunks).max(1)
        };
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        // Set when a re-check of the node found it running dry.
        let short: Mutex<Option<Error>> = Mutex::new(None);
        // No thread faults until all exist and sit on their CPUs. Creating a
        // thread maps its stack, which takes the mmap lock exclusively and so
        // waits for a sibling's prefault call to end (measured: the second of
        // two threads then started only when the first had finished); and a
        // new thread may start on the CPU where a sibling already faults,
        // and wait there (up to 40 ms measured) before it can move.
        // The gate counts threads ready; the caller opens it when all are.
        let gate = (Mutex::new((0usize, false)), Condvar::new());
        let base = self.addr();
        let len = self.len;
        // Thread `k` runs on one CPU of the node (`cpus[k % n]`), so that
        // two threads never share a CPU while another of the node idles.
        let work = |thread: Option<usize>| -> io::Result<()> {
            if let (Some(k), false) = (thread, cpus.is_empty()) {
                // Best effort: a cpuset may forbid the node's CPUs; pages still follow mbind.
                let _ = sys::set_thread_affinity(&[cpus[k % cpus.len()]]);
            }
            if thread.is_some() {
                let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
                g.0 += 1;
                gate.1.notify_all();
                while !g.1 {
                    g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            }
            loop {
                if cancel.is_some_and(Cancel::is_cancelled) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let off = i * PREFAULT_CHUNK;
                if off >= len {
                    return Ok(());
                }
                // Every 64 MiB, ask the node again: memory taken by others
                // since the pre-check must end in an error, not the OOM killer.
                if i > 0 && i % RECHECK_CHUNKS == 0 && !self.page_size.is_huge() {
                    if let Some(h) = crate::precheck::node_headroom(self.node) {
                        if h.available() < (len - off) as u64 {
                            let d = done.load(Ordering::Relaxed);
                            let e = crate::precheck::short(self.node, len as u64, d, h);
                            *short.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return Err(io::ErrorKind::OutOfMemory.into());
                        }
                    }
                }
                let n = PREFAULT_CHUNK.min(len - off);
                populate_write(base + off, n)?;
                let d = done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if let Some(p) = progress {
                    p(d);
                }
            }
        };
        // The caller's thread never changes affinity: with several threads,
        // all the faulting happens in new threads bound to the node's CPUs.
        let result: io::Result<()> = std::thread::scope(|s| {
            if nthreads == 1 {
                return work(None);
            }
            // A thread that cannot be created is left out: the others share
            // its chunks, and with none the caller's thread does the work.
            let handles: Vec<_> = (0..nthreads)
                .filter_map(|k| {
                    let work = &work;
                    std::thread::Builder::new()
                        .name(format!("numapin-pf-{k}"))
                        .spawn_scoped(s, move || work(Some(k)))
                        .ok()
                })
                .collect();
            let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
            while g.0 < handles.len() {
                g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.1 = true;
            gate.1.notify_all();
            drop(g);
            if handles.is_empty() {
                return work(None);
            }
            let mut r = Ok(());
            for h in handles {
                let hr = h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("prefault thread panicked")));
                r = r.and(hr);
            }
            r
        });
        result.map_err(|cause| {
            if cause.kind() == io::ErrorKind::Interrupted
                && cancel.is_some_and(Cancel::is_cancelled)
            {
                Error::Cancelled {
                    step: "prefault",
                    done: done.load(Ordering::Relaxed),
                    len: self.len as u64,
                }
            } else {
                Error::Populate {
                    node: self.node,
                    len: self.len as u64,
                    cause,
                }
            }
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Start pointer. Never turn it into a reference while a device can DMA to it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a `NodeMemory` is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The node the memory was bound to.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The page size backing it.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The memfd behind the memory ([`Backing::Memfd`]); offset 0 is the
    /// first byte.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Gives up ownership without unmapping (used when the memory may still be
    /// reachable by a device: leaking is safer than reuse).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for NodeMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no reference into it outlives self.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap of owned NodeMemory failed");
    }
}

/// Maps `ulen` bytes of private anonymous memory (hugetlb for huge pages),
/// on a 2 MiB boundary for base pages of 2 MiB or more.
fn map_anonymous(ulen: usize, page_size: PageSize) -> Result<*mut libc::c_void> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if page_size.is_huge() {
        flags |= libc::MAP_HUGETLB
            | ((page_size.bytes().trailing_zeros() as i32) << libc::MAP_HUGE_SHIFT);
        flags &= !libc::MAP_NORESERVE;
    }
    // Base-page memory gets THP where the kernel gives it, which needs
    // 2 MiB-aligned addresses (kernels before 6.8 do not align large
    // anonymous mappings): map 2 MiB more and trim. The prefault chunks
    // then start on 2 MiB boundaries too, so two threads never fault
    // the same huge page (each zeroing one, one of them in vain).
    let slack = if page_size.is_huge() || ulen < THP_ALIGN {
        0
    } else {
        THP_ALIGN
    };
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ulen + slack,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    let p = if p == libc::MAP_FAILED || slack == 0 {
        p
    } else {
        let start = p as usize;
        let aligned = start.next_multiple_of(THP_ALIGN);
        // SAFETY: both ranges lie inside the mapping just made and
        // outside the part kept; nothing refers to them.
        unsafe {
            if aligned > start {
                libc::munmap(p, aligned - start);
            }
            let tail = start + slack - aligned;
            if tail > 0 {
                libc::munmap((aligned + ulen) as *mut libc::c_void, tail);
            }
        }
        aligned as *mut libc::c_void
    };
    if p == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        let strict = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .is_ok_and(|v| v.trim() == "2");
        return Err(Error::sys(
            format!("mmap of {ulen:#x} bytes with {page_size} pages"),
            match (page_size.is_huge(), e.raw_os_error(), strict) {
                (true, _, _) => "reserve hugepages (see `numapin topology`) or use 4K pages",
                (false, Some(libc::ENOMEM), true) => {
                    "strict overcommit (vm.overcommit_memory = 2) refused the mapping: Committed_AS would pass \
                     CommitLimit (/proc/meminfo); raise vm.overcommit_ratio or pin less"
                }
                _ => "the address space or memory ran out; lower the size (RLIMIT_AS, `ulimit -v`)",
            },
            e,
        ));
    }
    Ok(p)
}

/// What a failed `mbind(MPOL_BIND)` of fresh memory means: a node outside
/// this process's cpuset (`Mems_allowed_list`) gives EINVAL.
fn mbind_error(node: NodeId, e: io::Error) -> Error {
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Mems_allowed_list:"))
                .map(|v| v.trim().to_string())
        });
    match (e.raw_os_error(), allowed) {
        (Some(libc::EINVAL), Some(list))
            if parse_cpulist(&list).is_ok_and(|ns| !ns.contains(&node.0)) =>
        {
            Error::NodeNotAllowed {
                node,
                allowed: list,
            }
        }
        _ => Error::sys(format!("mbind(MPOL_BIND, node {node})"), "", e),
    }
}

/// Faults `[addr, addr+len)` in for writing with `MADV_POPULATE_WRITE`
/// (5.14+), falling back to touching one byte per page on older kernels.
fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: populating an owned range has no effect on Rust-visible memory.
    let r = unsafe { libc::madvise(addr as *mut _, len, sys::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    let page = crate::addr::base_page_size() as usize;
    for off in (0..len).step_by(page) {
        // SAFETY: the page is inside a mapping this process owns and that no
        // Rust reference covers; a volatile write of zero keeps its contents
        // (fresh anonymous memory is zero).
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 0) };
    }
    Ok(())
}
