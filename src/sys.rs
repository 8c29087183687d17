//! Thin wrappers over the memory-policy syscalls and `/proc/self` reads that
//! libc does not wrap. Each wrapper names the kernel call it makes.
// Without the `tools` feature this module is private and only the pin
// path uses it: the rest is for numapin's own binaries.
#![cfg_attr(not(feature = "tools"), allow(dead_code))]

use std::io;

use crate::addr::NodeId;

/// `MPOL_BIND` from `<linux/mempolicy.h>`.
pub const MPOL_BIND: i32 = 2;
/// `MPOL_MF_STRICT`: fail when existing pages do not follow the policy.
pub const MPOL_MF_STRICT: u32 = 1 << 0;
/// `MPOL_MF_MOVE`: move this process's pages to follow the policy.
pub const MPOL_MF_MOVE: u32 = 1 << 1;
/// `MPOL_F_NODE` for `get_mempolicy`.
pub const MPOL_F_NODE: u32 = 1 << 0;
/// `MPOL_F_ADDR` for `get_mempolicy`.
pub const MPOL_F_ADDR: u32 = 1 << 1;
/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in writable, returning an
/// error instead of raising SIGBUS.
pub const MADV_POPULATE_WRITE: i32 = 23;

/// Bits in a node mask handed to the kernel; covers `CONFIG_NODES_SHIFT` up to 10.
pub const MAX_NODES: usize = 1024;

/// A node mask as `mbind`/`migrate_pages` take it.
#[derive(Clone)]
pub struct NodeMask([libc::c_ulong; MAX_NODES / 64]);

impl NodeMask {
    /// A mask with only `node` set.
    pub fn single(node: NodeId) -> NodeMask {
        let mut m = NodeMask([0; MAX_NODES / 64]);
        m.set(node);
        m
    }

    /// Sets `node`.
    pub fn set(&mut self, node: NodeId) {
        let n = node.0 as usize;
        assert!(n < MAX_NODES, "node {n} beyond MAX_NODES");
        self.0[n / 64] |= 1 << (n % 64);
    }

    fn as_ptr(&self) -> *const libc::c_ulong {
        self.0.as_ptr()
    }

    /// `maxnode` as the syscalls want it (bits + 1).
    fn maxnode() -> libc::c_ulong {
        MAX_NODES as libc::c_ulong + 1
    }
}

fn last_err<T>(ret: libc::c_long, v: T) -> io::Result<T> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// `mbind(addr, len, MPOL_BIND, {node}, flags)`: binds a range to one node.
///
/// Safe: the kernel validates the range; a policy change has no effect on
/// memory safety.
pub fn mbind(addr: usize, len: usize, node: NodeId, flags: u32) -> io::Result<()> {
    let mask = NodeMask::single(node);
    // SAFETY: the kernel only reads `maxnode` bits from `mask`, which is that long;
    // changing a memory policy does not invalidate any Rust reference.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            NodeMask::maxnode(),
            flags,
        )
    };
    last_err(ret, ())
}

/// `mbind(addr, len, MPOL_DEFAULT, NULL, 0, 0)`: drops a range's policy so it
/// follows the process default again (first touch, NUMA balancing).
pub fn mbind_default(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: a null mask with maxnode 0 is what MPOL_DEFAULT takes; a policy
    // change does not affect memory safety.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            0,
            std::ptr::null::<libc::c_ulong>(),
            0 as libc::c_ulong,
            0u32,
        )
    };
    last_err(ret, ())
}

/// `move_pages(pid, n, pages, nodes, status, 0)`.
///
/// With `nodes == None` nothing moves and `status` receives, per page, the
/// node it is on or a negative errno (`-ENOENT` not present, `-EFAULT` not
/// mapped). With `nodes`, each page is asked to move to its node and `status`
/// receives the node it ended on or why it did not move. Returns the number of
/// pages that were *not* moved (the kernel's return value).
pub fn move_pages(
    pid: libc::pid_t,
    pages: &[usize],
    nodes: Option<&[i32]>,
    status: &mut [i32],
) -> io::Result<usize> {
    assert_eq!(pages.len(), status.len());
    if let Some(n) = nodes {
        assert_eq!(n.len(), pages.len());
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: the three arrays have `pages.len()` entries; the kernel writes
    // only `status`, which we own mutably; moving pages preserves their contents.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            0,
        )
    };
    last_err(ret, ret as usize)
}

/// `migrate_pages(pid, maxnode, from, to)`: moves all of a process's pages
/// on `from` to `to`. Returns the number of pages that could not be moved.
pub fn migrate_pages(pid: libc::pid_t, from: NodeId, to: NodeId) -> io::Result<usize> {
    let old = NodeMask::single(from);
    let new = NodeMask::single(to);
    // SAFETY: both masks are MAX_NODES bits long; migration preserves contents.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_migrate_pages,
            pid,
            NodeMask::maxnode(),
            old.as_ptr(),
            new.as_ptr(),
        )
    };
    last_err(ret, ret as usize)
}

/// `get_mempolicy(&node, NULL, 0, addr, MPOL_F_NODE | MPOL_F_ADDR)`: the node
/// of the page at `addr` (faulting it in if needed).
pub fn node_of_addr(addr: usize) -> io::Result<NodeId> {
    let mut node: libc::c_int = -1;
    // SAFETY: the kernel writes one int to `node`; the mask pointer is null with maxnode 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    last_err(ret, NodeId(node as u32))
}

/// Pins the calling thread to `cpus` (`sched_setaffinity(0, …)`).
pub fn set_thread_affinity(cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET bounds-checks against the set's size.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    last_err(ret as libc::c_long, ())
}

/// Reads a `kB` field (e.g. `VmLck`) from `/proc/self/status`, in bytes.
pub fn proc_status_kb(field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_status_kb(&status, field).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {field} in /proc/self/status"),
        )
    })
}

/// Finds `field:   N kB` in `/proc/*/status`-style text, in bytes.
pub fn parse_status_kb(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let num = rest.trim().strip_suffix("kB")?.trim();
        num.parse::<u64>().ok().map(|k| k * 1024)
    })
}

/// Bytes of this process's memory counted as locked (`VmLck`): mlock and
/// VFIO type1 pins both land there.
pub fn locked_bytes() -> io::Result<u64> {
    proc_status_kb("VmLck")
}

/// Bytes of this process's memory counted as pinned (`VmPin`): io_uring
/// registered buffers land there (and in the user's locked-memory count),
/// not in `VmLck`.
pub fn pinned_bytes() -> io::Result<u64> {
    proc_status_kb("VmPin")
}

/// The soft `RLIMIT_MEMLOCK` in bytes (`u64::MAX` when unlimited).
pub fn memlock_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    last_err(ret as libc::c_long, r.rlim_cur)
}

/// Linux capability numbers numapin cares about.
#[derive(Debug, Clone, Copy)]
pub enum Cap {
    /// CAP_IPC_LOCK (14): bypasses RLIMIT_MEMLOCK.
    IpcLock = 14,
    /// CAP_SYS_ADMIN (21): needed to see PFNs in pagemap.
    SysAdmin = 21,
    /// CAP_SYS_RAWIO (17): needed for no-IOMMU VFIO groups.
    SysRawio = 17,
}

/// Whether this process has `cap` in its effective set (`CapEff` in /proc/self/status).
pub fn has_cap(cap: Cap) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .is_some_and(|eff| eff & (1u64 << cap as u32) != 0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(v, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tx\nVmLck:\t     256 kB\nVmPin:\t       0 kB\nCapEff:\t000001ffffffffff\n";

    #[test]
    fn status_fields() {
        assert_eq!(parse_status_kb(STATUS, "VmLck"), Some(256 * 1024));
        assert_eq!(parse_status_kb(STATUS, "VmPin"), Some(0));
        assert_eq!(parse_status_kb(STATUS, "VmRSS"), None);
        assert_eq!(parse_status_kb("VmLckX:\t1 kB", "VmLck"), None);
        assert_eq!(parse_cap_eff(STATUS), Some(0x1ffffffffff));
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000"), Some(0));
    }

    #[test]
    fn node_mask() {
        let m = NodeMask::single(NodeId(65));
        assert_eq!(m.0[1], 2);
        assert_eq!(m.0[0], 0);
    }

    #[test]
    fn own_page_node_is_readable() {
        let v = vec![1u8; 4096];
        // The host has at least node 0; the page was touched, so it has a node.
        let node = node_of_addr(v.as_ptr() as usize).expect("get_mempolicy");
        assert!((node.0 as usize) < MAX_NODES);
        let mut status = [0i32; 1];
        let page = (v.as_ptr() as usize) & !4095;
        move_pages(0, &[page], None, &mut status).expect("move_pages query");
        assert_eq!(status[0] as u32, node.0);
    }
}
