//! Tables for people, JSON for programs. JSON addresses are `0x` hex
//! strings; lengths and page sizes are numbers of bytes.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use numapin::addr::human_size;
use numapin::bind::BindReport;
use numapin::phys::PhysExtent;
use numapin::vfio::DeviceInfo;
use numapin::vfio::info::IommuInfo;
use numapin::{ContainerKind, Error, PinnedRegion, Pinner, Result};
use serde::Serialize;

use super::locality::{DeviceLocality, TopologyReport};

/// Prints `v` as one pretty JSON document on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)
        .map_err(|e| Error::Invalid(format!("JSON output: {e}")))?;
    writeln!(out).ok();
    out.flush().ok();
    Ok(())
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Pools with pages, as `64 x 2M (60 free)`.
fn pools(n: &numapin::numa::Node) -> String {
    let v: Vec<String> = n
        .hugepages
        .iter()
        .filter(|p| p.total > 0)
        .map(|p| format!("{}x{} ({} free)", p.total, short(p.page_size), p.free))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// CPUs as the kernel writes them: `0-3,8`.
fn cpulist(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

fn short(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    }
}

/// The `topology` table: one row per node, then the PCI devices by node.
pub fn print_topology(t: &TopologyReport) {
    let ids: Vec<u32> = t.nodes.iter().map(|n| n.node.id).collect();
    let dist_head = format!(
        "distance to {}",
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<5} {:<10} {:>10} {:>10}  {:<14}  hugepages",
        "node", "cpus", "total", "free", "distances"
    );
    for r in &t.nodes {
        let n = &r.node;
        let cpus = n
            .cpus
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let dist = if r.distances.is_empty() {
            "-".to_string()
        } else {
            r.distances
                .values()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<5} {:<10} {:>10} {:>10}  {:<14}  {}",
            n.id,
            if cpus.is_empty() { "-".into() } else { cpus },
            human_size(n.mem_total),
            human_size(n.mem_free),
            dist,
            pools(n)
        );
    }
    println!();
    println!("distances: {dist_head} (firmware SLIT units: 10 = local, 20 = twice as far)");
    for r in &t.nodes {
        println!(
            "node {} PCI devices: {}",
            r.node.id,
            if r.pci_devices.is_empty() {
                "-".to_string()
            } else {
                r.pci_devices.join(" ")
            }
        );
    }
    println!(
        "no node (numa_node -1): {} PCI device{} (`numapin topology --json` lists them)",
        t.devices_without_node.len(),
        if t.devices_without_node.len() == 1 {
            ""
        } else {
            "s"
        }
    );
}

/// `bind` and `unbind`: `BDF: old -> new`, the uses overridden by --force,
/// the group's other members, and (for a dry run) every planned write.
pub fn print_bind(r: &BindReport, verb: &str) {
    let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "no driver".into());
    println!(
        "{}: {} -> {}{}",
        r.device,
        name(&r.previous),
        name(&r.current),
        if r.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    for u in &r.in_use {
        println!("  in use (--force): {u}");
    }
    if r.dry_run && r.steps.is_empty() {
        println!("  nothing to {verb}");
    }
    if r.dry_run {
        for (i, s) in r.steps.iter().enumerate() {
            println!("  {}. {s}", i + 1);
        }
    }
    match r.group {
        Some(g) if r.members.is_empty() => println!("  IOMMU group {g}: no other device"),
        Some(g) => {
            println!("  IOMMU group {g} also holds:");
            for m in &r.members {
                println!("    {} ({}): {}", m.device, name(&m.driver), m.effect);
            }
        }
        None => println!("  no IOMMU group yet (no-IOMMU mode: vfio-pci makes one)"),
    }
}

/// `numapin info`.
#[derive(Serialize)]
pub struct InfoReport {
    device: String,
    sysfs: String,
    driver: Option<String>,
    /// NUMA placement: `numa_node` (-1 = none), `local_cpus`, `memory`.
    #[serde(flatten)]
    locality: DeviceLocality,
    group: u32,
    group_node: String,
    members: Vec<numapin::vfio::GroupMember>,
    backend: &'static str,
    /// What takes the long-term pin for this kind of device.
    pin: &'static str,
    /// What the device puts on the bus: `iova` or `physical`.
    dma_addresses: &'static str,
    /// `kernel.io_uring_disabled` where io_uring does the pinning (absent
    /// before Linux 6.6).
    #[serde(skip_serializing_if = "Option::is_none")]
    io_uring_disabled: Option<u32>,
    iommu: Option<IommuReport>,
}

/// What pins memory for a device of this kind.
fn pin_mechanism(kind: ContainerKind) -> &'static str {
    match kind {
        ContainerKind::Type1Iommu => "vfio-map-dma",
        ContainerKind::MdevOnly | ContainerKind::NoIommu => "io_uring",
    }
}

/// What the device uses as DMA addresses.
fn dma_addresses(kind: ContainerKind) -> &'static str {
    match kind {
        ContainerKind::NoIommu => "physical",
        _ => "iova",
    }
}

#[derive(Serialize)]
struct IommuReport {
    /// Whether an IOMMU-backed domain translates for the container. An
    /// mdev-only container has none: the vendor driver translates, and the
    /// kernel's page sizes and (missing) IOVA ranges describe no IOMMU.
    domain: bool,
    /// `None` without a domain (the kernel reports every size from 4K).
    page_sizes: Option<Vec<u64>>,
    iova_ranges: Option<Vec<RangeReport>>,
    dma_mappings_available: Option<u32>,
}

#[derive(Serialize)]
struct RangeReport {
    start: String,
    end: String,
}

impl InfoReport {
    pub fn new(d: &DeviceInfo, locality: DeviceLocality, info: Option<&IommuInfo>) -> InfoReport {
        InfoReport {
            device: d.name.clone(),
            sysfs: d.sysfs.display().to_string(),
            driver: d.driver.clone(),
            locality,
            group: d.group,
            group_node: d.group_node.display().to_string(),
            members: d.members.clone(),
            backend: d.kind.name(),
            pin: pin_mechanism(d.kind),
            dma_addresses: dma_addresses(d.kind),
            io_uring_disabled: match d.kind {
                ContainerKind::Type1Iommu => None,
                _ => numapin::uring::disabled_sysctl(),
            },
            iommu: info.map(|i| IommuReport {
                domain: d.kind == ContainerKind::Type1Iommu,
                page_sizes: (d.kind == ContainerKind::Type1Iommu).then(|| i.page_sizes()),
                iova_ranges: i.iova_ranges.as_ref().map(|rs| {
                    rs.iter()
                        .map(|r| RangeReport {
                            start: r.start.to_string(),
                            end: r.end.to_string(),
                        })
                        .collect()
                }),
                dma_mappings_available: i.dma_avail,
            }),
        }
    }
}

/// The `info` text.
pub fn print_info(r: &InfoReport) {
    println!(
        "device      {} ({})",
        r.device,
        r.driver.as_deref().unwrap_or("no driver")
    );
    println!("sysfs       {}", r.sysfs);
    let l = &r.locality;
    if l.numa_node < 0 {
        println!("numa node   none (numa_node -1: the firmware gives this device no node)");
    } else {
        println!("numa node   {}", l.numa_node);
    }
    println!(
        "local cpus  {}",
        if l.local_cpus.is_empty() {
            "-".to_string()
        } else {
            cpulist(&l.local_cpus)
        }
    );
    if l.numa_node < 0 && !l.memory.is_empty() {
        println!("memory      locality unknown on every node (the device has no node)");
    }
    for m in l.memory.iter().filter(|_| l.numa_node >= 0) {
        let how = match (m.local, m.distance) {
            (None, _) => "locality unknown".to_string(),
            (Some(true), d) => format!(
                "local{}",
                d.map_or(String::new(), |d| format!(" (distance {d})"))
            ),
            (Some(false), d) => format!(
                "remote{}",
                d.map_or(String::new(), |d| format!(" (distance {d}, local is 10)"))
            ),
        };
        println!("memory      node {}: {how}", m.node);
    }
    println!("group       {} ({})", r.group, r.group_node);
    for m in &r.members {
        println!(
            "  member    {} ({})",
            m.device,
            m.driver.as_deref().unwrap_or("no driver")
        );
    }
    println!("backend     {}", r.backend);
    println!(
        "pin         {}{}",
        r.pin,
        match r.backend {
            "mdev-only" => " (MAP_DMA records the IOVA but does not pin here)",
            "no-iommu" => " (no MAP_DMA in no-IOMMU mode)",
            _ => " (MAP_DMA pins with FOLL_LONGTERM)",
        }
    );
    println!("dma         {} addresses", r.dma_addresses);
    if let Some(v) = r.io_uring_disabled {
        println!(
            "io_uring    kernel.io_uring_disabled = {v}{}",
            if v == 0 { "" } else { " (pinning will fail)" }
        );
    }
    match &r.iommu {
        None if r.dma_addresses == "physical" => {
            println!("iommu       none: the device DMAs to physical addresses")
        }
        None => println!("iommu       not opened"),
        Some(i) if !i.domain => {
            println!(
                "iommu       no IOMMU domain: the mdev's vendor driver translates IOVAs \
                 (page sizes and IOVA ranges do not apply; numapin picks IOVAs below 2^48)"
            );
            if let Some(n) = i.dma_mappings_available {
                println!("dma avail   {n} mappings");
            }
        }
        Some(i) => {
            let ps: Vec<String> = i.page_sizes.iter().flatten().map(|&p| short(p)).collect();
            println!("page sizes  {}", ps.join(" "));
            match &i.iova_ranges {
                Some(rs) => {
                    for (k, rr) in rs.iter().enumerate() {
                        println!(
                            "{} {}-{}",
                            if k == 0 { "iova ranges" } else { "           " },
                            rr.start,
                            rr.end
                        );
                    }
                }
                None => println!("iova ranges not reported{}", older_than(5, 4)),
            }
            match i.dma_mappings_available {
                Some(n) => println!("dma avail   {n} mappings"),
                None => println!("dma avail   not reported{}", older_than(5, 10)),
            }
        }
    }
}

/// ` (kernel X.Y, before A.B)` when the running kernel is older than
/// `A.B`, else ` by this kernel (X.Y)`: blame the version only when it is
/// the reason.
fn older_than(major: u32, minor: u32) -> String {
    match numapin::sys::kernel_version() {
        Some(v) if v < (major, minor) => {
            format!(" (kernel {}.{}, before {major}.{minor})", v.0, v.1)
        }
        Some(v) => format!(" by this kernel ({}.{})", v.0, v.1),
        None => String::new(),
    }
}

/// `numapin pin`'s document.
#[derive(Serialize)]
pub struct PinReport {
    pid: u32,
    backend: &'static str,
    /// The kernel interface: `type1` or `iommufd`.
    interface: &'static str,
    device: String,
    group: u32,
    pub regions: Vec<RegionReport>,
}

/// One pinned region.
#[derive(Serialize)]
pub struct RegionReport {
    node: Option<u32>,
    vaddr: String,
    /// Absent for a no-IOMMU device (it uses `phys_extents`).
    #[serde(skip_serializing_if = "Option::is_none")]
    iova: Option<String>,
    len: u64,
    page_size: u64,
    /// What holds the pages: `vfio-map-dma` or `io_uring`.
    pin: &'static str,
    /// The shortest physically contiguous extent (when PFNs are readable).
    #[serde(skip_serializing_if = "Option::is_none")]
    min_extent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phys_extents: Option<Vec<ExtentReport>>,
}

#[derive(Serialize)]
struct ExtentReport {
    pa: String,
    len: u64,
}

impl PinReport {
    pub fn new(p: &Pinner) -> PinReport {
        PinReport {
            pid: std::process::id(),
            backend: p.kind().name(),
            interface: p.backend().name(),
            device: p.device_info().map_or_else(String::new, |d| d.name.clone()),
            group: p.device_info().map_or(0, |d| d.group),
            regions: Vec::new(),
        }
    }
}

impl RegionReport {
    pub fn new(r: &PinnedRegion, extents: Option<Vec<PhysExtent>>) -> RegionReport {
        RegionReport {
            node: r.node().map(|n| n.0),
            vaddr: hex(r.vaddr().raw()),
            iova: r.iova().map(|i| i.to_string()),
            len: r.len(),
            page_size: r.page_size().bytes(),
            pin: r.pin_kind(),
            min_extent: r.min_extent(),
            phys_extents: extents.map(|v| {
                v.iter()
                    .map(|e| ExtentReport {
                        pa: e.pa.to_string(),
                        len: e.len,
                    })
                    .collect()
            }),
        }
    }
}

/// The `pin` table.
pub fn print_pin(r: &PinReport) {
    println!(
        "pid {}  device {}  group {}  backend {} ({})",
        r.pid, r.device, r.group, r.backend, r.interface
    );
    println!(
        "{:<4} {:<18} {:<18} {:>10} {:>5} {:<12} {:>10}",
        "node", "vaddr", "iova", "size", "page", "pin", "min extent"
    );
    for g in &r.regions {
        println!(
            "{:<4} {:<18} {:<18} {:>10} {:>5} {:<12} {:>10}",
            g.node.map_or("-".into(), |n| n.to_string()),
            g.vaddr,
            g.iova.as_deref().unwrap_or("- (physical)"),
            human_size(g.len),
            short(g.page_size),
            g.pin,
            g.min_extent.map_or("-".into(), human_size)
        );
        for e in g.phys_extents.iter().flatten() {
            println!("       phys {:<18} {:>10}", e.pa, human_size(e.len));
        }
    }
}

/// A progress bar on stderr for prefaulting 1 GiB or more (none when stderr
/// is not a terminal).
pub fn prefault_progress(len: u64) -> Option<ProgressBar> {
    if len < (1 << 30) {
        return None;
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("prefault {bar:40} {binary_bytes}/{binary_total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}
