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
use std::path::Path;

use serde::Serialize;

use crate::addr::{NodeId, PageSize};
use crate::error::{Error, Result};
use crate::sys;

mod memory;

pub(crate) use memory::THP_ALIGN;
pub use memory::{Backing, NodeMemory, PARALLEL_PREFAULT_MIN};

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
    use std::sync::atomic::{AtomicU64, Ordering};

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
