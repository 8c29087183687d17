//! NUMA topology (sysfs), node-bound allocation, prefault, and placement
//! checks.
//!
//! The order matters and is the whole point of [`NodeMemory::allocate`]: the
//! range is bound to the node with `mbind(MPOL_BIND)` *before* any page is
//! touched, then faulted in with `MADV_POPULATE_WRITE` (by threads on the
//! node's CPUs for large ranges). A long-term pin taken later may still move a
//! page out of ZONE_MOVABLE/CMA to another node, so placement is checked again
//! after pinning ([`nodes_of`]).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use serde::Serialize;

use crate::addr::{NodeId, PageSize};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::sys;

const NODE_ROOT: &str = "/sys/devices/system/node";

/// One hugetlb pool of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugePool {
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages free (`free_hugepages`).
    pub free: u64,
}

/// One online NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Node id.
    pub id: u32,
    /// CPUs of the node.
    pub cpus: Vec<u32>,
    /// `MemTotal` in bytes.
    pub mem_total: u64,
    /// `MemFree` in bytes.
    pub mem_free: u64,
    /// Hugetlb pools (2 MiB, 1 GiB where the kernel has them).
    pub hugepages: Vec<HugePool>,
}

impl Node {
    /// The pool of `page_size`, if the kernel has one.
    pub fn pool(&self, page_size: PageSize) -> Option<&HugePool> {
        self.hugepages
            .iter()
            .find(|p| p.page_size == page_size.bytes())
    }
}

/// The machine's online NUMA nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Online nodes, by id.
    pub nodes: Vec<Node>,
}

impl Topology {
    /// Reads `/sys/devices/system/node`.
    ///
    /// A kernel without `CONFIG_NUMA` has no such directory; it is reported
    /// as one node 0 holding every CPU and all memory.
    pub fn read() -> Result<Topology> {
        Self::read_from(Path::new(NODE_ROOT))
    }

    fn read_from(root: &Path) -> Result<Topology> {
        let online = match std::fs::read_to_string(root.join("online")) {
            Ok(s) => parse_cpulist(&s).map_err(Error::Invalid)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![0],
            Err(e) => return Err(Error::sys(format!("read {}/online", root.display()), "", e)),
        };
        let mut nodes = Vec::new();
        for id in online {
            let dir = root.join(format!("node{id}"));
            let cpus = std::fs::read_to_string(dir.join("cpulist"))
                .ok()
                .map(|s| parse_cpulist(&s).map_err(Error::Invalid))
                .transpose()?
                .unwrap_or_default();
            let meminfo = std::fs::read_to_string(dir.join("meminfo")).unwrap_or_default();
            let mut hugepages = Vec::new();
            if let Ok(rd) = std::fs::read_dir(dir.join("hugepages")) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(kb) = name
                        .strip_prefix("hugepages-")
                        .and_then(|s| s.strip_suffix("kB"))
                        .and_then(|s| s.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let read = |f: &str| {
                        std::fs::read_to_string(e.path().join(f))
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    hugepages.push(HugePool {
                        page_size: kb * 1024,
                        total: read("nr_hugepages"),
                        free: read("free_hugepages"),
                    });
                }
            }
            hugepages.sort_by_key(|p| p.page_size);
            nodes.push(Node {
                id,
                cpus,
                mem_total: parse_node_meminfo(&meminfo, "MemTotal").unwrap_or(0),
                mem_free: parse_node_meminfo(&meminfo, "MemFree").unwrap_or(0),
                hugepages,
            });
        }
        Ok(Topology { nodes })
    }

    /// The node with `id`, if online.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id.0)
    }

    /// Ids of the online nodes.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| NodeId(n.id)).collect()
    }

    /// The node with `id`, or [`Error::NodeNotOnline`].
    pub fn require(&self, id: NodeId) -> Result<&Node> {
        self.node(id).ok_or_else(|| Error::NodeNotOnline {
            node: id,
            online: self.ids(),
        })
    }

    /// Checks that `node` can back `len` bytes of `page_size` pages: the node
    /// is online and, for hugetlb, its pool has enough free pages.
    pub fn check_capacity(&self, node: NodeId, len: u64, page_size: PageSize) -> Result<()> {
        let n = self.require(node)?;
        if page_size.is_huge() {
            let needed = len / page_size.bytes();
            let (free, total) = n.pool(page_size).map_or((0, 0), |p| (p.free, p.total));
            if free < needed {
                return Err(Error::NotEnoughHugepages {
                    node,
                    page_size,
                    needed,
                    free,
                    total,
                });
            }
        }
        Ok(())
    }
}

/// Parses a kernel cpulist / nodelist such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> std::result::Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("`{}` is not a kernel CPU/node list (e.g. 0-3,8)", s.trim());
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad())?;
                let b: u32 = b.trim().parse().map_err(|_| bad())?;
                if b < a {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

pub use crate::sys::parse_node_meminfo;

/// Progress callback: called with the number of bytes faulted in so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// What in `node` a long-term pin would migrate away: the pages of its
/// ZONE_MOVABLE and its CMA areas, from `/proc/zoneinfo` (`present` of zone
/// `Movable`, `cma` of every zone), e.g. `["ZONE_MOVABLE (262144 pages)"]`.
/// Empty when the node has neither (or zoneinfo cannot be read).
pub fn movable_memory(node: NodeId) -> Vec<String> {
    std::fs::read_to_string("/proc/zoneinfo")
        .map(|t| parse_movable(&t, node))
        .unwrap_or_default()
}

/// [`movable_memory`] on zoneinfo text.
pub fn parse_movable(zoneinfo: &str, node: NodeId) -> Vec<String> {
    let mut out = Vec::new();
    let mut zone: Option<String> = None;
    let mut cma = 0u64;
    let flush = |zone: &Option<String>, cma: u64, out: &mut Vec<String>| {
        if cma > 0 {
            out.push(format!(
                "CMA in zone {} ({cma} pages)",
                zone.as_deref().unwrap_or("?")
            ));
        }
    };
    for line in zoneinfo.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Node ") {
            flush(&zone, cma, &mut out);
            cma = 0;
            let (n, z) = rest.split_once(", zone").unwrap_or((rest, ""));
            zone = (n.trim().parse::<u32>().ok() == Some(node.0)).then(|| z.trim().to_string());
            continue;
        }
        let Some(z) = &zone else { continue };
        let mut it = t.split_whitespace();
        match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("present"), Some(n)) if z == "Movable" && n > 0 => {
                out.push(format!("ZONE_MOVABLE ({n} pages)"));
            }
            (Some("cma"), Some(n)) => cma = n,
            _ => {}
        }
    }
    flush(&zone, cma, &mut out);
    out
}

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

/// One entry per page from `move_pages(…, NULL, status)`: the node the page is
/// on, or the negative errno the kernel reported.
pub fn nodes_of(addr: usize, len: usize, page_size: u64) -> io::Result<Vec<i32>> {
    let pages: Vec<usize> = (0..len)
        .step_by(page_size as usize)
        .map(|o| addr + o)
        .collect();
    let mut status = vec![0i32; pages.len()];
    for (p, s) in pages.chunks(16384).zip(status.chunks_mut(16384)) {
        sys::move_pages(0, p, None, s)?;
    }
    Ok(status)
}

/// The outcome of asking the kernel to move pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MoveOutcome {
    /// Pages asked to move (pages already on the target are not asked).
    pub asked: u64,
    /// Pages that changed node to the target.
    pub moved: u64,
}

/// Asks `move_pages(2)` to move every page of the range that is not on `to`
/// yet, and counts the pages whose node really changed to `to`. Pinned pages
/// stay where they are.
pub fn move_range(addr: usize, len: usize, page_size: u64, to: NodeId) -> io::Result<MoveOutcome> {
    let target = to.0 as i32;
    let before = nodes_of(addr, len, page_size)?;
    let pages: Vec<usize> = (0..len)
        .step_by(page_size as usize)
        .zip(&before)
        .filter(|&(_, &n)| n != target)
        .map(|(o, _)| addr + o)
        .collect();
    let nodes = vec![target; pages.len()];
    let mut status = vec![0i32; pages.len()];
    for ((p, n), s) in pages
        .chunks(16384)
        .zip(nodes.chunks(16384))
        .zip(status.chunks_mut(16384))
    {
        sys::move_pages(0, p, Some(n), s)?;
    }
    let after = nodes_of(addr, len, page_size)?;
    let moved = before
        .iter()
        .zip(&after)
        .filter(|&(&b, &a)| b != target && a == target)
        .count() as u64;
    Ok(MoveOutcome {
        asked: pages.len() as u64,
        moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist("0"), Ok(vec![0]));
        assert_eq!(parse_cpulist("\n"), Ok(vec![]));
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("a-b").is_err());
    }

    #[test]
    fn node_meminfo() {
        let t = "Node 1 MemTotal:        2097152 kB\nNode 1 MemFree:          1000 kB\nNode 1 HugePages_Total:    64\n";
        assert_eq!(parse_node_meminfo(t, "MemTotal"), Some(2097152 * 1024));
        assert_eq!(parse_node_meminfo(t, "MemFree"), Some(1000 * 1024));
        assert_eq!(parse_node_meminfo(t, "HugePages_Total"), Some(64));
        assert_eq!(parse_node_meminfo(t, "Active"), None);
    }

    #[test]
    fn topology_from_fixture() {
        let dir = std::env::temp_dir().join(format!("numapin-topo-{}", std::process::id()));
        let n1 = dir.join("node1");
        std::fs::create_dir_all(n1.join("hugepages/hugepages-2048kB")).unwrap();
        std::fs::create_dir_all(dir.join("node0")).unwrap();
        std::fs::write(dir.join("online"), "0-1\n").unwrap();
        std::fs::write(dir.join("node0/cpulist"), "0\n").unwrap();
        std::fs::write(n1.join("cpulist"), "1\n").unwrap();
        std::fs::write(
            n1.join("meminfo"),
            "Node 1 MemTotal: 4 kB\nNode 1 MemFree: 2 kB\n",
        )
        .unwrap();
        std::fs::write(n1.join("hugepages/hugepages-2048kB/nr_hugepages"), "64\n").unwrap();
        std::fs::write(n1.join("hugepages/hugepages-2048kB/free_hugepages"), "60\n").unwrap();
        let t = Topology::read_from(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.ids(), vec![NodeId(0), NodeId(1)]);
        let n = t.node(NodeId(1)).unwrap();
        assert_eq!(n.cpus, vec![1]);
        assert_eq!(n.mem_total, 4096);
        assert_eq!(n.pool(PageSize::Huge2M).unwrap().free, 60);
        assert!(
            t.check_capacity(NodeId(1), 60 << 21, PageSize::Huge2M)
                .is_ok()
        );
        let e = t
            .check_capacity(NodeId(1), 61 << 21, PageSize::Huge2M)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("node1/hugepages/hugepages-2048kB/nr_hugepages"),
            "{e}"
        );
        assert!(e.to_string().contains("echo 65"), "{e}");
        let e = t
            .check_capacity(NodeId(0), 1 << 30, PageSize::Huge1G)
            .unwrap_err();
        assert!(matches!(e, Error::NotEnoughHugepages { free: 0, .. }));
        let e = t
            .check_capacity(NodeId(7), 4096, PageSize::Base)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "NUMA node 7 is not online; online nodes: 0, 1 (see `numapin topology`)"
        );
    }

    #[test]
    fn parallel_prefault_leaves_caller_affinity_alone() {
        let affinity = || {
            // SAFETY: plain data, filled by the kernel.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid set of the size passed.
            let r = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
            };
            assert_eq!(r, 0);
            // SAFETY: CPU_COUNT reads the set.
            unsafe { libc::CPU_COUNT(&set) }
        };
        let before = affinity();
        let topo = Topology::read().unwrap();
        let node = topo.ids()[0];
        let len = PARALLEL_PREFAULT_MIN;
        let seen = AtomicU64::new(0);
        let progress = |d: u64| {
            seen.fetch_max(d, Ordering::Relaxed);
        };
        let m = NodeMemory::allocate(&topo, node, len, PageSize::Base, 2, Some(&progress), None)
            .unwrap();
        assert_eq!(
            seen.load(Ordering::Relaxed),
            len,
            "progress did not reach the full size"
        );
        let nodes = nodes_of(m.addr(), m.len(), 4096).unwrap();
        assert!(nodes.iter().all(|&n| n == node.0 as i32));
        assert_eq!(
            affinity(),
            before,
            "prefault changed the caller's CPU affinity"
        );
    }

    #[test]
    fn base_page_memory_is_thp_aligned() {
        let topo = Topology::read().unwrap();
        let node = topo.ids()[0];
        for len in [2 << 20, 6 << 20, (4 << 20) + 4096] {
            let m = NodeMemory::allocate(&topo, node, len, PageSize::Base, 1, None, None).unwrap();
            assert_eq!(m.addr() % THP_ALIGN, 0, "{len:#x} at {:#x}", m.addr());
            assert_eq!(m.len(), len as usize);
        }
    }

    #[test]
    fn allocate_on_host_node() {
        let topo = Topology::read().unwrap();
        let node = topo.ids()[0];
        let m = NodeMemory::allocate(&topo, node, 1 << 20, PageSize::Base, 0, None, None).unwrap();
        let nodes = nodes_of(m.addr(), m.len(), 4096).unwrap();
        assert_eq!(nodes.len(), 256);
        assert!(nodes.iter().all(|&n| n == node.0 as i32), "{nodes:?}");
        assert!(matches!(
            NodeMemory::allocate(&topo, node, 0, PageSize::Base, 0, None, None),
            Err(Error::ZeroSize)
        ));
        assert!(matches!(
            NodeMemory::allocate(&topo, node, 4097, PageSize::Base, 0, None, None),
            Err(Error::UnalignedSize { .. })
        ));
    }

    #[test]
    fn movable_memory_from_zoneinfo() {
        let zi = "Node 0, zone      DMA\n  pages free 3840\n        present  3998\n        cma      0\n\
                  Node 0, zone   Normal\n        present  500000\n        cma      2048\n\
                  Node 1, zone   Normal\n        present  400000\n        cma      0\n\
                  Node 1, zone  Movable\n        present  262144\n        cma      0\n";
        assert_eq!(
            parse_movable(zi, NodeId(0)),
            ["CMA in zone Normal (2048 pages)"]
        );
        assert_eq!(
            parse_movable(zi, NodeId(1)),
            ["ZONE_MOVABLE (262144 pages)"]
        );
        assert!(parse_movable(zi, NodeId(2)).is_empty());
    }
}

/// Where PCI devices are listed in sysfs.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The distances from `node` to every online node (`nodeN/distance`), in the
/// order of [`Topology::nodes`]: the firmware's ACPI SLIT figures, where 10
/// means local and, say, 21 means about 2.1 times the local latency.
///
/// # Errors
/// [`Error::Sys`] when the file cannot be read (a kernel without
/// `CONFIG_NUMA` has none); [`Error::Invalid`] when it is not a list of
/// numbers.
pub fn distances(node: NodeId) -> Result<Vec<u32>> {
    distances_in(Path::new(NODE_ROOT), node)
}

fn distances_in(root: &Path, node: NodeId) -> Result<Vec<u32>> {
    let path = root.join(format!("node{}/distance", node.0));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::sys(
            format!("read {}", path.display()),
            "the kernel reports node distances only with CONFIG_NUMA",
            e,
        )
    })?;
    text.split_whitespace()
        .map(|d| {
            d.parse().map_err(|_| {
                Error::Invalid(format!(
                    "{} holds `{}`, not a list of distances",
                    path.display(),
                    text.trim()
                ))
            })
        })
        .collect()
}

/// The NUMA node a device's sysfs directory reports (`numa_node`; -1, or no
/// such file, is `None`). An mdev device has no `numa_node` of its own; its
/// parent's is used.
pub fn device_node(sysfs: &Path) -> Option<NodeId> {
    let read = |dir: &Path| {
        std::fs::read_to_string(dir.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
    };
    let raw = read(sysfs).or_else(|| {
        std::fs::canonicalize(sysfs)
            .ok()
            .and_then(|p| p.parent().and_then(read))
    })?;
    u32::try_from(raw).ok().map(NodeId)
}

/// Every PCI device and the node it reports, sorted by address.
pub fn pci_device_nodes() -> Vec<(String, Option<NodeId>)> {
    pci_device_nodes_in(Path::new(PCI_DEVICES))
}

fn pci_device_nodes_in(root: &Path) -> Vec<(String, Option<NodeId>)> {
    let mut out: Vec<(String, Option<NodeId>)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                device_node(&e.path()),
            )
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod locality_tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn distances_are_read_per_node() {
        let tmp = tempfile::tempdir().unwrap();
        write(&tmp.path().join("node0/distance"), "10 21\n");
        write(&tmp.path().join("node1/distance"), "21 10\n");
        assert_eq!(distances_in(tmp.path(), NodeId(0)).unwrap(), [10, 21]);
        assert_eq!(distances_in(tmp.path(), NodeId(1)).unwrap(), [21, 10]);
        assert!(distances_in(tmp.path(), NodeId(2)).is_err());
        write(&tmp.path().join("node2/distance"), "10 x\n");
        let e = distances_in(tmp.path(), NodeId(2)).unwrap_err().to_string();
        assert!(e.contains("not a list of distances"), "{e}");
    }

    #[test]
    fn devices_report_their_node_and_minus_one_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        let pci = tmp.path().join("pci");
        write(&pci.join("0000:00:03.0/numa_node"), "-1\n");
        write(&pci.join("0000:3b:00.0/numa_node"), "1\n");
        std::fs::create_dir_all(pci.join("0000:00:1f.0")).unwrap();
        // An mdev under its parent takes the parent's node.
        write(&pci.join("0000:3b:00.0/8a1c-mdev/mdev_type"), "");
        assert_eq!(
            pci_device_nodes_in(&pci),
            vec![
                ("0000:00:03.0".to_string(), None),
                ("0000:00:1f.0".to_string(), None),
                ("0000:3b:00.0".to_string(), Some(NodeId(1))),
            ]
        );
        assert_eq!(
            device_node(&pci.join("0000:3b:00.0/8a1c-mdev")),
            Some(NodeId(1))
        );
    }
}
