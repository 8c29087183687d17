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
/// `MADV_POPULATE_READ` (Linux 5.14): map the pages that exist (a file's
/// page cache) without writing them.
pub const MADV_POPULATE_READ: i32 = 22;

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
    use std::io::Read;
    // One read into a buffer on the stack (the text is about 1.5 KiB): the
    // kernel writes the whole file at the first read, so a larger one
    // only spills into a heap buffer.
    let mut f = std::fs::File::open("/proc/self/status")?;
    let mut buf = [0u8; 8192];
    let mut filled = 0;
    let mut spill = Vec::new();
    loop {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == buf.len() {
                    spill.extend_from_slice(&buf);
                    f.read_to_end(&mut spill)?;
                    filled = 0;
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bytes = if spill.is_empty() {
        &buf[..filled]
    } else {
        &spill[..]
    };
    let status = String::from_utf8_lossy(bytes);
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

/// A memory policy as `get_mempolicy(2)` reports it for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `MPOL_DEFAULT` (0), `MPOL_PREFERRED` (1), `MPOL_BIND` (2),
    /// `MPOL_INTERLEAVE` (3), `MPOL_LOCAL` (4), `MPOL_PREFERRED_MANY` (5),
    /// `MPOL_WEIGHTED_INTERLEAVE` (6), with the mode flags masked off.
    pub mode: i32,
    /// The nodes of the policy's mask.
    pub nodes: Vec<NodeId>,
}

impl Policy {
    /// Whether the policy confines the page to exactly `node`.
    pub fn binds_to(&self, node: NodeId) -> bool {
        self.mode == MPOL_BIND && self.nodes == [node]
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.mode {
            0 => "default (first touch)",
            1 => "preferred",
            MPOL_BIND => "bind",
            3 => "interleave",
            4 => "local",
            5 => "preferred-many",
            6 => "weighted-interleave",
            _ => "unknown",
        };
        f.write_str(name)?;
        if !self.nodes.is_empty() {
            let n: Vec<String> = self.nodes.iter().map(|n| n.0.to_string()).collect();
            write!(f, " to node {}", n.join(","))?;
        }
        Ok(())
    }
}

/// `get_mempolicy(&mode, mask, MAX_NODES, addr, MPOL_F_ADDR)`: the policy of
/// the VMA (or shared object) at `addr`.
///
/// # Errors
/// `EFAULT` when `addr` is not mapped.
pub fn policy_of(addr: usize) -> io::Result<Policy> {
    let mut mode: libc::c_int = 0;
    let mut mask = NodeMask([0; MAX_NODES / 64]);
    // SAFETY: the kernel writes one int to `mode` and at most MAX_NODES bits
    // to `mask`, which has room for them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.0.as_mut_ptr(),
            MAX_NODES as libc::c_ulong,
            addr,
            MPOL_F_ADDR,
        )
    };
    last_err(ret, ())?;
    let nodes = (0..MAX_NODES)
        .filter(|&i| mask.0[i / 64] & (1 << (i % 64)) != 0)
        .map(|i| NodeId(i as u32))
        .collect();
    // Mode flags (MPOL_F_STATIC_NODES, ...) sit in the high bits.
    Ok(Policy {
        mode: mode & 0xff,
        nodes,
    })
}

/// The soft `RLIMIT_NOFILE`.
///
/// # Errors
/// The `getrlimit` errno (none expected).
pub fn nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r.rlim_cur)
}

/// The descriptors this process has open (`/proc/self/fd`, counted with
/// one more open for the directory itself, which is not counted).
///
/// # Errors
/// Reading `/proc/self/fd` fails (EMFILE among others).
pub fn open_fds() -> io::Result<u64> {
    // The directory's own fd shows up in the listing.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1) as u64)
}

/// Reads `Node N FIELD:  X kB` from a node's `meminfo`, in bytes.
pub fn parse_node_meminfo(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == "Node").then_some(())?;
        it.next()?;
        (it.next()?.strip_suffix(':')? == field).then_some(())?;
        let v: u64 = it.next()?.parse().ok()?;
        Some(if it.next() == Some("kB") { v * 1024 } else { v })
    })
}

/// What `/proc/self/maps` says about `[addr, addr+len)`: the first byte
/// that is not mapped, or the first mapping that is not writable, or that
/// all of it is mapped writable (and what backs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeMapping {
    /// No mapping holds the byte at this address.
    Unmapped(u64),
    /// The mapping at this address lacks write permission (`perms` as
    /// maps shows them, e.g. `r--p`; `path` empty for anonymous memory).
    NotWritable {
        /// First byte of the mapping.
        start: u64,
        /// Its permissions.
        perms: String,
        /// What backs it.
        path: String,
    },
    /// Every byte is mapped writable; the backing of the first mapping.
    Writable {
        /// What backs the first mapping (`""` anonymous, `[heap]`, a file).
        path: String,
    },
}

/// Reads `/proc/self/maps` for the range.
///
/// # Errors
/// Reading the file fails.
pub fn range_mapping(addr: u64, len: u64) -> io::Result<RangeMapping> {
    Ok(parse_range_mapping(
        &std::fs::read_to_string("/proc/self/maps")?,
        addr,
        len,
    ))
}

/// [`range_mapping`] on the text of a maps file.
pub fn parse_range_mapping(maps: &str, addr: u64, len: u64) -> RangeMapping {
    let end = addr.saturating_add(len);
    let mut at = addr;
    let mut first_path = None;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("").to_string();
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if e <= at {
            continue;
        }
        if s > at {
            return RangeMapping::Unmapped(at);
        }
        if !perms.contains('w') {
            return RangeMapping::NotWritable {
                start: s,
                perms: perms.to_string(),
                path,
            };
        }
        first_path.get_or_insert(path);
        at = e;
        if at >= end {
            return RangeMapping::Writable {
                path: first_path.unwrap_or_default(),
            };
        }
    }
    RangeMapping::Unmapped(at)
}

/// Whether `[addr, addr+len)` is mapped `MAP_SHARED` from the file `fd`
/// (compared by inode) with `addr` at byte `offset` of it, throughout
/// (`/proc/self/maps`). `Ok(Err(why))` when it is not.
///
/// # Errors
/// `fstat` of the fd or reading the maps file fails.
pub fn check_file_mapping(
    addr: u64,
    len: u64,
    fd: std::os::fd::BorrowedFd<'_>,
    offset: u64,
) -> io::Result<std::result::Result<(), String>> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::File::from(fd.try_clone_to_owned()?)
        .metadata()?
        .ino();
    Ok(parse_file_mapping(
        &std::fs::read_to_string("/proc/self/maps")?,
        addr,
        len,
        ino,
        offset,
    ))
}

/// [`check_file_mapping`] on the text of a maps file and the file's inode.
pub fn parse_file_mapping(
    maps: &str,
    addr: u64,
    len: u64,
    ino: u64,
    offset: u64,
) -> std::result::Result<(), String> {
    let end = addr.saturating_add(len);
    let mut at = addr;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, off, _dev, inode, ..] = f[..] else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e), Ok(off), Ok(inode)) = (
            u64::from_str_radix(s, 16),
            u64::from_str_radix(e, 16),
            u64::from_str_radix(off, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if e <= at {
            continue;
        }
        if s > at {
            return Err(format!("{at:#x} is not mapped"));
        }
        if !perms.ends_with('s') {
            return Err(format!(
                "the mapping at {s:#x} is private ({perms}), not MAP_SHARED"
            ));
        }
        if inode != ino {
            return Err(format!(
                "the mapping at {s:#x} is of inode {inode}, not of the file given (inode {ino})"
            ));
        }
        let want = offset + (at - addr);
        let have = off + (at - s);
        if want != have {
            return Err(format!(
                "{at:#x} maps byte {have:#x} of the file, not {want:#x}"
            ));
        }
        at = e;
        if at >= end {
            return Ok(());
        }
    }
    Err(format!("{at:#x} is not mapped"))
}

/// The page size the kernel uses for the mapping that holds `addr`
/// (`KernelPageSize` in `/proc/self/smaps`), in bytes.
///
/// # Errors
/// Reading smaps fails, or no mapping holds `addr` (`ENOENT`).
pub fn kernel_page_size(addr: u64) -> io::Result<u64> {
    parse_kernel_page_size(&std::fs::read_to_string("/proc/self/smaps")?, addr)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// [`kernel_page_size`] on smaps text.
pub fn parse_kernel_page_size(smaps: &str, addr: u64) -> Option<u64> {
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                    inside = (s..e).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("KernelPageSize:") {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
                return Some(kb * 1024);
            }
        }
    }
    None
}

/// The running kernel's version as `(major, minor)`, from `uname(2)`'s
/// release (`6.12.95-amd64` → `(6, 12)`); `None` if it cannot be parsed.
pub fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data, filled in by uname.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname to write into.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates the release field.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    parse_kernel_version(&release.to_string_lossy())
}

/// `6.12.95-amd64` → `(6, 12)`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_file_mapping_is_checked_by_inode_offset_and_sharing() {
        let maps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 4242 /memfd:guest (deleted)
7f0000200000-7f0000400000 rw-s 00200000 00:01 4242 /memfd:guest (deleted)
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
7f0000600000-7f0000800000 rw-s 00000000 00:01 777 /memfd:other (deleted)
";
        let base = 0x7f00_0000_0000;
        assert_eq!(parse_file_mapping(maps, base, 0x40_0000, 4242, 0), Ok(()));
        assert_eq!(
            parse_file_mapping(maps, base + 0x1000, 0x1000, 4242, 0x1000),
            Ok(())
        );
        let e = parse_file_mapping(maps, base, 0x1000, 4242, 0x1000).unwrap_err();
        assert!(e.contains("maps byte 0x0"), "{e}");
        let e = parse_file_mapping(maps, base, 0x1000, 99, 0).unwrap_err();
        assert!(e.contains("inode 4242"), "{e}");
        let e = parse_file_mapping(maps, base, 0x60_0000, 4242, 0).unwrap_err();
        assert!(e.contains("private"), "{e}");
        let e = parse_file_mapping(maps, base + 0x80_0000, 0x1000, 4242, 0).unwrap_err();
        assert!(e.contains("not mapped"), "{e}");
    }
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

    #[test]
    fn kernel_versions_from_releases() {
        assert_eq!(parse_kernel_version("6.12.95-amd64"), Some((6, 12)));
        assert_eq!(parse_kernel_version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("7.3.0"), Some((7, 3)));
        assert_eq!(parse_kernel_version("5.4"), Some((5, 4)));
        assert_eq!(parse_kernel_version("linux"), None);
    }

    #[test]
    fn what_maps_says_about_a_range() {
        let maps = "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n\
                    7f0000002000-7f0000003000 r--p 00000000 00:00 0 \n\
                    7f0000004000-7f0000006000 rw-s 00000000 00:05 12 /memfd:x (deleted)\n";
        assert_eq!(
            parse_range_mapping(maps, 0x7f00_0000_0000, 0x2000),
            RangeMapping::Writable {
                path: String::new()
            }
        );
        assert_eq!(
            parse_range_mapping(maps, 0x7f00_0000_1000, 0x2000),
            RangeMapping::NotWritable {
                start: 0x7f00_0000_2000,
                perms: "r--p".into(),
                path: String::new()
            }
        );
        assert_eq!(
            parse_range_mapping(maps, 0x7f00_0000_3000, 0x2000),
            RangeMapping::Unmapped(0x7f00_0000_3000)
        );
        assert_eq!(
            parse_range_mapping(maps, 0x7f00_0000_5000, 0x2000),
            RangeMapping::Unmapped(0x7f00_0000_6000)
        );
        assert_eq!(
            parse_range_mapping(maps, 0x7f00_0000_4000, 0x1000),
            RangeMapping::Writable {
                path: "/memfd:x".into()
            }
        );
    }

    #[test]
    fn kernel_page_size_from_smaps() {
        let smaps = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n\
                     Size:               2048 kB\n\
                     KernelPageSize:        4 kB\n\
                     7f4000000000-7f4040000000 rw-s 00000000 00:0f 7 /memfd:g (deleted)\n\
                     Size:            1048576 kB\n\
                     KernelPageSize:  1048576 kB\n";
        assert_eq!(parse_kernel_page_size(smaps, 0x7f00_0000_1000), Some(4096));
        assert_eq!(
            parse_kernel_page_size(smaps, 0x7f40_0000_0000),
            Some(1 << 30)
        );
        assert_eq!(parse_kernel_page_size(smaps, 0x7f20_0000_0000), None);
    }
}
