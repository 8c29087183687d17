//! Every resource a pin consumes, checked before it is consumed: node
//! memory (free plus what reclaim can give, above the watermarks), the
//! memory cgroup's limit, hugepage pools (per node, and the reservations
//! other mappings hold), memlock, file descriptors. And while numapin
//! prefaults, it is the OOM killer's first choice ([`OomGuard`]), so that a
//! bystander never dies for it.
//!
//! What user space cannot rule out: memory another process takes between
//! the check and the fault, and reclaim that gives less than the estimate.
//! The prefault re-checks the node between chunks and stops with
//! [`Error::NodeMemoryShort`] before the node runs dry; what is left is an
//! OOM kill of numapin itself, never of another process (unless that
//! process also set `oom_score_adj` to 1000).
//!
//! The estimate follows the kernel's own `si_mem_available` per node: free
//! pages above the zones' high watermarks, plus half the file LRU and half
//! the reclaimable slab (`/sys/devices/system/node/nodeN/meminfo`,
//! `/proc/zoneinfo`).

use std::sync::Mutex;

use crate::addr::{NodeId, PageSize};
use crate::backend::Accounting;
use crate::error::{Error, Result};
use crate::sys;

/// What a node can give a new base-page region, in bytes, and how that was
/// reckoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeHeadroom {
    /// `MemFree`.
    pub(crate) free: u64,
    /// Half of `Active(file)` + `Inactive(file)` + half of `KReclaimable`
    /// (or `SReclaimable` on older kernels).
    pub(crate) reclaimable: u64,
    /// The sum of the node's zones' high watermarks.
    pub(crate) watermark: u64,
}

impl NodeHeadroom {
    /// Bytes a region can take without pushing the node below its
    /// watermarks.
    pub(crate) fn available(&self) -> u64 {
        (self.free + self.reclaimable).saturating_sub(self.watermark)
    }
}

/// Parses the node's meminfo and the zoneinfo text into a headroom.
pub(crate) fn parse_headroom(meminfo: &str, zoneinfo: &str, node: NodeId) -> Option<NodeHeadroom> {
    let field = |f: &str| sys::parse_node_meminfo(meminfo, f);
    let free = field("MemFree")?;
    let file = field("Active(file)").unwrap_or(0) + field("Inactive(file)").unwrap_or(0);
    let slab = field("KReclaimable")
        .or_else(|| field("SReclaimable"))
        .unwrap_or(0);
    let page = crate::addr::base_page_size();
    Some(NodeHeadroom {
        free,
        reclaimable: file / 2 + slab / 2,
        watermark: high_watermarks(zoneinfo, node) * page,
    })
}

/// The sum of `high` over the node's zones, in pages.
fn high_watermarks(zoneinfo: &str, node: NodeId) -> u64 {
    let mut mine = false;
    let mut sum = 0;
    for line in zoneinfo.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Node ") {
            let n = rest.split(',').next().unwrap_or("").trim();
            mine = n.parse::<u32>().ok() == Some(node.0);
            continue;
        }
        if mine {
            let mut it = t.split_whitespace();
            if let (Some("high"), Some(v)) = (it.next(), it.next()) {
                sum += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    sum
}

/// The node's headroom now.
pub(crate) fn node_headroom(node: NodeId) -> Option<NodeHeadroom> {
    let meminfo =
        std::fs::read_to_string(format!("/sys/devices/system/node/node{}/meminfo", node.0)).ok()?;
    let zoneinfo = std::fs::read_to_string("/proc/zoneinfo").ok()?;
    parse_headroom(&meminfo, &zoneinfo, node)
}

/// Fails with [`Error::NodeMemoryShort`] when `len` more bytes of base pages
/// would push `node` below its watermarks. (Hugetlb regions come from their
/// pool, checked by [`crate::numa::Topology::check_capacity`].)
pub(crate) fn check_node_memory(node: NodeId, len: u64, page_size: PageSize) -> Result<()> {
    if page_size.is_huge() {
        return Ok(());
    }
    match node_headroom(node) {
        Some(h) if h.available() < len => Err(short(node, len, 0, h)),
        _ => Ok(()),
    }
}

/// The error for a node that cannot give `len - done` more bytes.
pub(crate) fn short(node: NodeId, len: u64, done: u64, h: NodeHeadroom) -> Error {
    Error::NodeMemoryShort {
        node,
        len,
        done,
        free: h.free,
        reclaimable: h.reclaimable,
        watermark: h.watermark,
    }
}

/// The memory cgroup (v2) of this process: its limit and usage, when it
/// has a limit.
pub(crate) fn memcg() -> Option<(String, u64, u64)> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = parse_cgroup_v2(&cg)?;
    let dir = format!("/sys/fs/cgroup{path}");
    let max = std::fs::read_to_string(format!("{dir}/memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current = std::fs::read_to_string(format!("{dir}/memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((path, max, current))
}

/// The v2 path (`0::/PATH`) of `/proc/self/cgroup`.
pub(crate) fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Fails with [`Error::CgroupMemoryLimit`] when the region does not fit
/// under the memory cgroup's `memory.max` (the usual OOM in containers).
/// Hugetlb pages are not charged to `memory.max`.
pub(crate) fn check_memcg(len: u64, page_size: PageSize) -> Result<()> {
    if page_size.is_huge() {
        return Ok(());
    }
    match memcg() {
        Some((path, max, current)) if current.saturating_add(len) > max => {
            Err(Error::CgroupMemoryLimit {
                cgroup: path,
                max,
                current,
                len,
            })
        }
        _ => Ok(()),
    }
}

/// Fails when the hugepages the region needs are held by other mappings'
/// reservations (`HugePages_Rsvd`): a node's free pages are not all
/// available then.
pub(crate) fn check_hugepage_reservations(len: u64, page_size: PageSize) -> Result<()> {
    if !page_size.is_huge() {
        return Ok(());
    }
    let dir = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        page_size.bytes() >> 10
    );
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(free), Some(rsvd)) = (read("free_hugepages"), read("resv_hugepages")) else {
        return Ok(());
    };
    let needed = len / page_size.bytes();
    if free.saturating_sub(rsvd) < needed {
        return Err(Error::HugepagesReserved {
            page_size,
            needed,
            free,
            reserved: rsvd,
        });
    }
    Ok(())
}

/// Fails with [`Error::OutOfFds`] when a pin that keeps `keep` descriptors
/// open (an io_uring ring per region) would pass `RLIMIT_NOFILE`; one more
/// is counted for the short reads of `/proc` the proof makes.
pub(crate) fn check_fds(keep: u64) -> Result<()> {
    let (Ok(limit), Ok(open)) = (sys::nofile_limit(), sys::open_fds()) else {
        return Ok(());
    };
    let needed = keep + 1;
    if open + needed > limit {
        return Err(Error::OutOfFds {
            op: "the io_uring pin".into(),
            system: false,
            open: Some(open),
            limit: Some(limit),
            needed,
        });
    }
    Ok(())
}

/// The memlock error for pinning `len` more bytes under `acct`, if the
/// limit forbids it. VFIO type1 counts against `VmLck`; io_uring against
/// the user's locked memory, of which this process's share is `VmPin`
/// (other processes of the same user may hold more: the kernel's refusal
/// is the final word).
pub(crate) fn memlock_error(acct: Accounting, len: u64, ipc_lock: bool) -> Option<Error> {
    if ipc_lock {
        return None;
    }
    let limit = sys::memlock_limit().ok()?;
    let locked = acct.read_limited().ok()?;
    (locked.saturating_add(len) > limit).then_some(Error::MemlockLimit { limit, locked, len })
}

/// Fails with [`Error::MemlockLimit`] when the pin would exceed the limit.
pub(crate) fn check_memlock(acct: Accounting, len: u64, ipc_lock: bool) -> Result<()> {
    memlock_error(acct, len, ipc_lock).map_or(Ok(()), Err)
}

/// How many prefaults hold the raised `oom_score_adj`, and the value to
/// restore when the last one ends.
static OOM: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

const OOM_SCORE_ADJ: &str = "/proc/self/oom_score_adj";

/// While alive, this process is the OOM killer's first choice
/// (`oom_score_adj` = 1000): if a prefault still runs a node dry, numapin
/// dies, not a bystander. Raising the value needs no privilege; the old
/// value is written back when the last guard drops (lowering back to it is
/// allowed, since it is not below `oom_score_adj_min`).
pub(crate) struct OomGuard;

impl OomGuard {
    pub(crate) fn new() -> OomGuard {
        let mut g = OOM.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 == 0 {
            g.1 = std::fs::read_to_string(OOM_SCORE_ADJ).ok();
            if let Err(e) = std::fs::write(OOM_SCORE_ADJ, "1000") {
                log::warn!("could not raise oom_score_adj for the prefault: {e}");
            }
        }
        g.0 += 1;
        OomGuard
    }
}

impl Drop for OomGuard {
    fn drop(&mut self) {
        let mut g = OOM.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if g.0 == 0 {
            if let Some(old) = g.1.take() {
                if let Err(e) = std::fs::write(OOM_SCORE_ADJ, old.trim()) {
                    log::warn!("could not restore oom_score_adj to {}: {e}", old.trim());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "Node 0 MemTotal:       2097152 kB\n\
                           Node 0 MemFree:         1048576 kB\n\
                           Node 0 Active(file):     204800 kB\n\
                           Node 0 Inactive(file):   204800 kB\n\
                           Node 0 KReclaimable:      20480 kB\n";
    const ZONEINFO: &str = "Node 0, zone    DMA32\n  pages free 1000\n        min      100\n        low      200\n        high     300\n\
                            Node 0, zone   Normal\n        min      1000\n        low      2000\n        high     3000\n\
                            Node 1, zone   Normal\n        high     9999\n";

    #[test]
    fn headroom_is_free_plus_half_the_reclaimable_above_the_watermarks() {
        let h = parse_headroom(MEMINFO, ZONEINFO, NodeId(0)).unwrap();
        let page = crate::addr::base_page_size();
        assert_eq!(h.free, 1 << 30);
        assert_eq!(h.reclaimable, (200 << 20) + (10 << 20));
        assert_eq!(h.watermark, 3300 * page);
        assert_eq!(h.available(), (1 << 30) + (210 << 20) - 3300 * page);
        // A node below its watermarks has nothing to give.
        let starved = NodeHeadroom {
            free: 1,
            reclaimable: 0,
            watermark: 10,
        };
        assert_eq!(starved.available(), 0);
    }

    #[test]
    fn cgroup_v2_path() {
        assert_eq!(
            parse_cgroup_v2("12:pids:/x\n0::/system.slice/numapin.service\n").as_deref(),
            Some("/system.slice/numapin.service")
        );
        assert_eq!(parse_cgroup_v2("1:name=systemd:/\n"), None);
    }

    #[test]
    fn the_oom_guard_restores_the_score() {
        let before = std::fs::read_to_string(OOM_SCORE_ADJ).unwrap();
        {
            let _a = OomGuard::new();
            let _b = OomGuard::new();
            assert_eq!(
                std::fs::read_to_string(OOM_SCORE_ADJ).unwrap().trim(),
                "1000"
            );
        }
        assert_eq!(std::fs::read_to_string(OOM_SCORE_ADJ).unwrap(), before);
    }
}
