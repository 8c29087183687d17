//! Helpers the scenarios share: the context (device, nodes), out-of-band
//! reads of another process's accounting, nodes and PFNs, control regions,
//! and running the CLI.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use numapin::edu::Edu;
use numapin::numa::{self, NodeMemory, Topology};
use numapin::{ContainerKind, NodeId, PageSize, Pinner, sys};
use serde_json::Value;

/// Fails the scenario with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// What every scenario needs.
pub struct Ctx {
    /// The edu device's PCI address (bound to vfio-pci by /init).
    pub bdf: String,
    /// The device the suite pins through: the edu device, or (suite `mdev`)
    /// an mtty mdev's UUID.
    pub device: String,
    /// Its container kind.
    pub kind: ContainerKind,
    /// Its IOMMU group number.
    pub group: u32,
    /// Node 0 and node 1.
    pub home: NodeId,
    pub away: NodeId,
    /// CPUs of each node.
    pub home_cpus: Vec<u32>,
    pub away_cpus: Vec<u32>,
}

impl Ctx {
    pub fn new(suite: &str) -> Result<Ctx, String> {
        let bdf = numapin::edu::find().ok_or("no edu device (1234:11e8) in the guest")?;
        let device = if suite == "mdev" {
            create_mtty(MTTY_UUID)?
        } else {
            bdf.clone()
        };
        let info = numapin::vfio::describe(&device).map_err(|e| e.to_string())?;
        let want = match suite {
            "mdev" => ContainerKind::MdevOnly,
            "noiommu" => ContainerKind::NoIommu,
            _ => ContainerKind::Type1Iommu,
        };
        if info.kind != want {
            return Err(format!(
                "suite {suite} needs a {} device, {device} is {}",
                want.name(),
                info.kind.name()
            ));
        }
        let topo = Topology::read().map_err(|e| e.to_string())?;
        if topo.nodes.len() < 2 {
            return Err(format!(
                "the VM must have two NUMA nodes, it has {}",
                topo.nodes.len()
            ));
        }
        Ok(Ctx {
            bdf,
            device,
            kind: info.kind,
            group: info.group,
            home: NodeId(topo.nodes[0].id),
            away: NodeId(topo.nodes[1].id),
            home_cpus: topo.nodes[0].cpus.clone(),
            away_cpus: topo.nodes[1].cpus.clone(),
        })
    }
}

impl Ctx {
    /// The accounting a pin through this device grows: `VmLck` for VFIO
    /// type1 MAP_DMA, `VmPin` for io_uring (mdev, no-IOMMU).
    pub fn counter(&self) -> &'static str {
        match self.kind {
            ContainerKind::Type1Iommu => "VmLck",
            _ => "VmPin",
        }
    }

    /// What [`Ctx::counter`] grows by when `len` bytes are pinned: `len`,
    /// or 0 on kernels whose io_uring charges nothing to a CAP_IPC_LOCK
    /// process (7.2+, measured once by `numapin::uring::charges_vmpin`).
    pub fn charged(&self, len: u64) -> u64 {
        match self.kind {
            ContainerKind::Type1Iommu => len,
            _ if numapin::uring::charges_vmpin() => len,
            _ => 0,
        }
    }

    /// This process's [`Ctx::counter`] in bytes.
    pub fn pinned(&self) -> u64 {
        self.pinned_of(std::process::id()).expect("read own status")
    }

    /// Another process's [`Ctx::counter`] in bytes.
    pub fn pinned_of(&self, pid: u32) -> Result<u64, String> {
        let s = e(
            std::fs::read_to_string(format!("/proc/{pid}/status")),
            "read status",
        )?;
        sys::parse_status_kb(&s, self.counter())
            .ok_or_else(|| format!("no {} in /proc/{pid}/status", self.counter()))
    }
}

/// The UUID of the mtty mdev the `mdev` suite creates.
pub const MTTY_UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

/// Creates an mtty mdev (type mtty-2) with `uuid` unless it exists.
pub fn create_mtty(uuid: &str) -> Result<String, String> {
    if std::path::Path::new(&format!("/sys/bus/mdev/devices/{uuid}")).exists() {
        return Ok(uuid.to_string());
    }
    let create = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create";
    e(
        std::fs::write(create, uuid),
        &format!("create an mtty mdev through {create} (is CONFIG_SAMPLE_VFIO_MDEV_MTTY on?)"),
    )?;
    Ok(uuid.to_string())
}

/// The edu device behind `p`, taking the 40-bit DMA mask xtask gives it.
pub fn edu(p: &Pinner) -> Result<Edu<'_>, String> {
    let fd = p.device_fd().ok_or("the pinner has no device of its own")?;
    Ok(e(Edu::open(fd), "open edu")?.with_dma_limit(1 << 40))
}

/// Turns any displayable error into the scenario's failure text.
pub fn e<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|err| format!("{what}: {err}"))
}

/// This process's `VmLck`.
pub fn vmlck() -> u64 {
    sys::locked_bytes().expect("VmLck")
}

/// A field of /proc/meminfo in bytes (kB fields) or as a count.
pub fn meminfo(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?.trim();
            let mut it = rest.split_whitespace();
            let v: u64 = it.next()?.parse().ok()?;
            Some(if it.next() == Some("kB") { v * 1024 } else { v })
        })
        .unwrap_or(0)
}

pub use crate::procfs::vmstat;

/// Base-page PFNs of `[addr, addr+len)` in process `pid`, from its pagemap.
pub fn pfns_of(pid: u32, addr: u64, len: u64) -> Result<Vec<u64>, String> {
    let f = e(
        std::fs::File::open(format!("/proc/{pid}/pagemap")),
        "open pagemap",
    )?;
    let entries = e(
        numapin::phys::read_pagemap_from(&f, addr, (len / 4096) as usize),
        "read pagemap",
    )?;
    e(
        numapin::phys::decode_pfns(addr, &entries, 4096),
        "decode pagemap",
    )
}

/// Own PFNs.
pub fn pfns(addr: usize, len: u64) -> Result<Vec<u64>, String> {
    pfns_of(std::process::id(), addr as u64, len)
}

/// How many entries differ.
pub fn changed(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

/// Per-page node of `[addr, len)` in process `pid` (negative: errno).
pub fn nodes_of_pid(pid: u32, addr: u64, len: u64, page: u64) -> Result<Vec<i32>, String> {
    let pages: Vec<usize> = (0..len)
        .step_by(page as usize)
        .map(|o| (addr + o) as usize)
        .collect();
    let mut status = vec![0i32; pages.len()];
    e(
        sys::move_pages(pid as i32, &pages, None, &mut status),
        "move_pages query",
    )?;
    Ok(status)
}

/// Asks the kernel to move every page of `pid`'s range to `to`; returns
/// how many pages ended on `to`.
pub fn move_pid_range(pid: u32, addr: u64, len: u64, to: NodeId) -> Result<usize, String> {
    let pages: Vec<usize> = (0..len)
        .step_by(4096)
        .map(|o| (addr + o) as usize)
        .collect();
    let nodes = vec![to.0 as i32; pages.len()];
    let mut status = vec![0i32; pages.len()];
    e(
        sys::move_pages(pid as i32, &pages, Some(&nodes), &mut status),
        "move_pages",
    )?;
    Ok(status.iter().filter(|&&s| s == to.0 as i32).count())
}

/// Asks `ask` up to `asks` times, `pause` apart, until it reports that some
/// pages of an unpinned control moved (a count above 0); returns that
/// count, or the last ask's 0. The kernel moves pages best effort (a page
/// busy at that moment stays where it is), so a control that must move is
/// asked again. An error from `ask` ends it.
pub fn ask_until_moved(
    asks: usize,
    pause: Duration,
    mut ask: impl FnMut() -> Result<usize, String>,
) -> Result<usize, String> {
    let mut moved = 0;
    for i in 0..asks {
        if i > 0 {
            std::thread::sleep(pause);
        }
        moved = ask()?;
        if moved > 0 {
            break;
        }
    }
    Ok(moved)
}

/// Counts entries equal to `node`.
pub fn on_node(status: &[i32], node: NodeId) -> usize {
    status.iter().filter(|&&s| s == node.0 as i32).count()
}

/// An unpinned region on `node` with the default memory policy afterwards,
/// so migrations and NUMA balancing are free to move it: the control.
pub fn control_region(node: NodeId, len: u64) -> Result<NodeMemory, String> {
    let topo = e(Topology::read(), "topology")?;
    let m = e(
        NodeMemory::allocate(&topo, node, len, PageSize::Base, 1, None, None),
        "allocate control",
    )?;
    // No THP: the control should move page by page, like the pinned side is
    // checked, and compaction skips compound pages. `allocate` faulted the
    // range in already (with THP where the kernel had it), so refault it
    // with THP off; the MPOL_BIND still holds it to `node`.
    // SAFETY: advice on, then writes to, memory this test owns.
    unsafe {
        let p = m.as_ptr();
        libc::madvise(p.cast(), m.len(), libc::MADV_NOHUGEPAGE);
        libc::madvise(p.cast(), m.len(), libc::MADV_DONTNEED);
        for off in (0..m.len()).step_by(4096) {
            std::ptr::write_volatile(p.add(off), 1);
        }
    }
    e(sys::mbind_default(m.addr(), m.len()), "mbind MPOL_DEFAULT")?;
    let nodes = e(numa::nodes_of(m.addr(), m.len(), 4096), "query control")?;
    ensure!(
        on_node(&nodes, node) == nodes.len(),
        "control not on node {node}: {} of {}",
        on_node(&nodes, node),
        nodes.len()
    );
    Ok(m)
}

/// Path of a binary installed next to this runner.
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .with_file_name(name)
}

/// A `numapin` command.
pub fn numapin() -> Command {
    Command::new(sibling("numapin"))
}

/// Runs the CLI to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> Result<(i32, String, String), String> {
    let out = e(numapin().args(args).output(), "run numapin")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A `numapin pin --json --hold-forever` child and the document it printed.
pub struct PinChild {
    pub child: Child,
    pub doc: Value,
}

impl PinChild {
    /// Starts `numapin pin` with `args` (plus --json --hold-forever) and
    /// waits for its JSON document.
    pub fn spawn(ctx: &Ctx, args: &[&str]) -> Result<PinChild, String> {
        let mut child = e(
            numapin()
                .args(["pin", "--device", &ctx.device, "--json", "--hold-forever"])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn(),
            "spawn numapin pin",
        )?;
        let stdout = child.stdout.take().expect("stdout");
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = e(line, "read numapin output")?;
            text.push_str(&line);
            text.push('\n');
            if line == "}" {
                break;
            }
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(doc) => Ok(PinChild { child, doc }),
            Err(err) => {
                let _ = child.kill();
                let out = child.wait_with_output().ok();
                let stderr = out
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                Err(format!(
                    "numapin pin printed no JSON ({err}): stdout {text:?} stderr {stderr:?}"
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (vaddr, iova, len, page_size, node) of region `i`; iova is `None`
    /// for a no-IOMMU device.
    pub fn region(&self, i: usize) -> Result<(u64, Option<u64>, u64, u64, u32), String> {
        let r = &self.doc["regions"][i];
        let hex = |k: &str| {
            r[k].as_str()
                .and_then(|s| s.strip_prefix("0x"))
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| format!("region {i}: `{k}` is not a 0x hex string: {}", r[k]))
        };
        let num = |k: &str| {
            r[k].as_u64()
                .ok_or_else(|| format!("region {i}: `{k}` is not a number: {}", r[k]))
        };
        Ok((
            hex("vaddr")?,
            if r["iova"].is_null() {
                None
            } else {
                Some(hex("iova")?)
            },
            num("len")?,
            num("page_size")?,
            num("node")? as u32,
        ))
    }

    /// Sends `sig` and waits (bounded) for the exit status.
    pub fn stop(mut self, sig: i32) -> Result<std::process::ExitStatus, String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = e(self.child.try_wait(), "wait numapin")? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err("numapin did not exit within 60 s of the signal".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PinChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an example installed next to the runner; fails unless it exits 0
/// and its stdout contains every line of `wants`. Returns the stdout.
pub fn run_example(name: &str, args: &[&str], wants: &[&str]) -> Result<String, String> {
    let out = e(
        Command::new(sibling(name)).args(args).output(),
        &format!("run {name}"),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{name} exit {}: {}{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in wants {
        ensure!(text.contains(want), "{name} output lacks `{want}`: {text}");
    }
    Ok(text)
}

/// Free memory including the pages parked on per-CPU free lists: MemFree
/// plus every pageset's `count` in /proc/zoneinfo. Freed pages go to those
/// lists first, and MemFree alone misses them (tens of MiB with 6.x's
/// auto-tuned lists).
pub fn free_bytes() -> u64 {
    let pcp: u64 = std::fs::read_to_string("/proc/zoneinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum();
    meminfo("MemFree") + pcp * 4096
}

/// Faulted-in pages moved, with `mremap`, into one fresh virtually
/// contiguous range in the order given; their frames stay what they were.
/// Unmapped on drop.
pub struct Gathered {
    pub base: *mut u8,
    pub len: usize,
}

impl Gathered {
    /// Moves each 4 KiB page at `pages` (page-aligned, mapped, present).
    pub fn new(pages: &[*mut u8]) -> Result<Gathered, String> {
        let len = pages.len() * 4096;
        // SAFETY: a fresh reservation of address space.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure!(
            r != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let g = Gathered {
            base: r.cast(),
            len,
        };
        for (i, &src) in pages.iter().enumerate() {
            // SAFETY: `src` is a page the caller owns; the destination is
            // inside the reservation above, which MREMAP_FIXED replaces.
            let m = unsafe {
                libc::mremap(
                    src.cast(),
                    4096,
                    4096,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    g.base.add(i * 4096).cast::<libc::c_void>(),
                )
            };
            ensure!(
                m != libc::MAP_FAILED,
                "mremap: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(g)
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        // SAFETY: unmapping the range `new` reserved.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// PFN of each base page of `[addr, addr+len)`, `None` where nothing is
/// mapped or present (unlike [`pfns`], holes are not an error).
pub fn pfns_or_holes(addr: usize, len: usize) -> Result<Vec<Option<u64>>, String> {
    let f = e(std::fs::File::open("/proc/self/pagemap"), "open pagemap")?;
    let entries = e(
        numapin::phys::read_pagemap_from(&f, addr as u64, len / 4096),
        "read pagemap",
    )?;
    Ok(entries.iter().map(|x| x.pfn()).collect())
}

/// A memory zone from /proc/zoneinfo: `[start, end)` in PFNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub node: u32,
    pub name: String,
    pub start: u64,
    pub end: u64,
}

impl Zone {
    pub fn contains(&self, pfn: u64) -> bool {
        (self.start..self.end).contains(&pfn)
    }
}

/// The populated zones, from /proc/zoneinfo.
pub fn zones() -> Result<Vec<Zone>, String> {
    let s = e(std::fs::read_to_string("/proc/zoneinfo"), "read zoneinfo")?;
    Ok(parse_zoneinfo(&s))
}

fn parse_zoneinfo(s: &str) -> Vec<Zone> {
    let mut out = Vec::new();
    let mut cur: Option<(u32, String, u64)> = None;
    for l in s.lines() {
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("Node ") {
            // "Node 0, zone   Normal"
            let (n, z) = rest.split_once(", zone").unwrap_or((rest, ""));
            cur = n.trim().parse().ok().map(|n| (n, z.trim().to_string(), 0));
        } else if let Some(v) = t.strip_prefix("spanned") {
            if let Some(c) = cur.as_mut() {
                c.2 = v.trim().parse().unwrap_or(0);
            }
        } else if let Some(v) = t.strip_prefix("start_pfn:") {
            if let (Some((node, name, spanned)), Ok(start)) = (cur.take(), v.trim().parse::<u64>())
            {
                if spanned > 0 {
                    out.push(Zone {
                        node,
                        name,
                        start,
                        end: start + spanned,
                    });
                }
            }
        }
    }
    out
}

/// A sysctl or sysfs knob set for the length of a scenario; the old value
/// is written back on drop.
pub struct Knob {
    path: String,
    old: String,
}

impl Knob {
    pub fn set(path: &str, value: &str) -> Result<Knob, String> {
        let old = e(std::fs::read_to_string(path), &format!("read {path}"))?;
        e(
            std::fs::write(path, value),
            &format!("write {value} to {path}"),
        )?;
        Ok(Knob {
            path: path.to_string(),
            old: old.trim().to_string(),
        })
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// `MemFree` of a node, in kB (0 if unreadable).
pub fn node_mem_free_kb(node: NodeId) -> u64 {
    let path = format!("/sys/devices/system/node/node{}/meminfo", node.0);
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.split_once("MemFree:")?.1;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}
