//! Tables for people, JSON for programs. JSON addresses are `0x` hex
//! strings; lengths and page sizes are numbers of bytes.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use numapin::addr::human_size;
use numapin::numa::Topology;
use numapin::phys::PhysExtent;
use numapin::vfio::DeviceInfo;
use numapin::vfio::info::IommuInfo;
use numapin::{Error, PinnedRegion, Pinner, Result};
use serde::Serialize;

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

fn short(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    }
}

/// The `topology` table.
pub fn print_topology(t: &Topology) {
    println!(
        "{:<5} {:<10} {:>10} {:>10}  hugepages",
        "node", "cpus", "total", "free"
    );
    for n in &t.nodes {
        let cpus = n
            .cpus
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<5} {:<10} {:>10} {:>10}  {}",
            n.id,
            if cpus.is_empty() { "-".into() } else { cpus },
            human_size(n.mem_total),
            human_size(n.mem_free),
            pools(n)
        );
    }
}

/// `numapin info`.
#[derive(Serialize)]
pub struct InfoReport {
    device: String,
    sysfs: String,
    driver: Option<String>,
    group: u32,
    group_node: String,
    members: Vec<numapin::vfio::GroupMember>,
    backend: &'static str,
    pins_memory: bool,
    iommu: Option<IommuReport>,
}

#[derive(Serialize)]
struct IommuReport {
    page_sizes: Vec<u64>,
    iova_ranges: Option<Vec<RangeReport>>,
    dma_mappings_available: Option<u32>,
}

#[derive(Serialize)]
struct RangeReport {
    start: String,
    end: String,
}

impl InfoReport {
    pub fn new(d: &DeviceInfo, info: Option<&IommuInfo>) -> InfoReport {
        InfoReport {
            device: d.name.clone(),
            sysfs: d.sysfs.display().to_string(),
            driver: d.driver.clone(),
            group: d.group,
            group_node: d.group_node.display().to_string(),
            members: d.members.clone(),
            backend: d.kind.name(),
            pins_memory: d.kind == numapin::ContainerKind::Type1Iommu,
            iommu: info.map(|i| IommuReport {
                page_sizes: i.page_sizes(),
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
    println!("group       {} ({})", r.group, r.group_node);
    for m in &r.members {
        println!(
            "  member    {} ({})",
            m.device,
            m.driver.as_deref().unwrap_or("no driver")
        );
    }
    println!(
        "backend     {}{}",
        r.backend,
        if r.pins_memory {
            ""
        } else {
            " (MAP_DMA does not pin here)"
        }
    );
    match &r.iommu {
        None => println!("iommu       not opened"),
        Some(i) => {
            let ps: Vec<String> = i.page_sizes.iter().map(|&p| short(p)).collect();
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
                None => println!("iova ranges not reported (kernel before 5.4)"),
            }
            match i.dma_mappings_available {
                Some(n) => println!("dma avail   {n} mappings"),
                None => println!("dma avail   not reported (kernel before 5.10)"),
            }
        }
    }
}

/// `numapin pin`'s document.
#[derive(Serialize)]
pub struct PinReport {
    pid: u32,
    backend: &'static str,
    device: String,
    group: u32,
    pub regions: Vec<RegionReport>,
}

/// One pinned region.
#[derive(Serialize)]
pub struct RegionReport {
    node: Option<u32>,
    vaddr: String,
    iova: String,
    len: u64,
    page_size: u64,
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
            device: p.device_info().name.clone(),
            group: p.device_info().group,
            regions: Vec::new(),
        }
    }
}

impl RegionReport {
    pub fn new(r: &PinnedRegion, extents: Option<Vec<PhysExtent>>) -> RegionReport {
        RegionReport {
            node: r.node().map(|n| n.0),
            vaddr: hex(r.vaddr() as u64),
            iova: r.iova().to_string(),
            len: r.len(),
            page_size: r.page_size().bytes(),
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
        "pid {}  device {}  group {}  backend {}",
        r.pid, r.device, r.group, r.backend
    );
    println!(
        "{:<4} {:<18} {:<18} {:>10} {:>5}",
        "node", "vaddr", "iova", "size", "page"
    );
    for g in &r.regions {
        println!(
            "{:<4} {:<18} {:<18} {:>10} {:>5}",
            g.node.map_or("-".into(), |n| n.to_string()),
            g.vaddr,
            g.iova,
            human_size(g.len),
            short(g.page_size)
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
