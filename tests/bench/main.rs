//! numapin's guest-side benchmark: `cargo xtask bench` boots the bench VM
//! and runs `numapin-bench --results /dev/ttyS1` in it.
//!
//! It measures, on node 0, for each page mode (base pages with THP off, THP,
//! 2 MiB hugetlb) and each region size that fits the VM:
//! - the floor: one raw `VFIO_IOMMU_MAP_DMA` on prefaulted memory, and its
//!   `UNMAP_DMA` (vfio-ioctls, no numapin);
//! - numapin pinning that caller memory (`pin_user`: pin only), and
//!   allocate + prefault + pin + verify (`pin` then `verify`);
//! - one `MAP_DMA` per page, as DPDK maps per memseg;
//! - io_uring's `IORING_REGISTER_BUFFERS` of the same memory;
//! - prefault with one thread against one per CPU of the node;
//! - the DMA mappings (DMA_AVAIL entries) one region costs.
//!
//! Then NUMA balancing: hinting faults and migrations attributable to a
//! numapin region touched from node 1, against default-policy memory; and
//! the pinning service (`service`): numapind's allocate and release against
//! the library pinning the same memfd in-process, 8 clients' requests per
//! second, and a 4 KiB memfd against THP-backed memory.
//!
//! The host computes medians and ratios; this program only sends raw samples
//! in the results protocol of `xtask/src/results.rs`: a `plan` naming the
//! phases, `measure` and `info` lines, a `result` per phase, then `done`.

#[path = "../common/args.rs"]
mod args;
mod balance;
#[path = "../common/balancing.rs"]
mod balancing;
#[path = "../common/caps.rs"]
mod caps;
mod cases;
#[path = "../common/daemon.rs"]
mod daemon;
#[path = "../common/procfs.rs"]
mod procfs;
mod raw;
mod service;
#[path = "../common/step.rs"]
mod step;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use numapin::numa::Topology;
use numapin::{NodeId, PageSize};
use serde_json::json;

/// Region sizes tried by default, smallest first; those that do not fit the
/// VM are left out (and named in an `info` line).
const DEFAULT_SIZES: &[u64] = &[64 << 20, 256 << 20, 1 << 30, 2 << 30];

/// How the measured memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 4 KiB pages, transparent hugepages off.
    Base,
    /// Anonymous memory with `MADV_HUGEPAGE`, THP in `madvise` mode.
    Thp,
    /// 2 MiB hugetlb pages.
    Hugetlb2M,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Base, Mode::Thp, Mode::Hugetlb2M];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Base => "base",
            Mode::Thp => "thp",
            Mode::Hugetlb2M => "hugetlb-2M",
        }
    }

    /// The page size numapin is told (THP memory is base-page memory to it).
    pub fn page_size(self) -> PageSize {
        match self {
            Mode::Hugetlb2M => PageSize::Huge2M,
            Mode::Base | Mode::Thp => PageSize::Base,
        }
    }

    /// The granule a per-page mapper would use: the backing page (a DPDK
    /// memseg is one hugepage; a THP-backed range comes in 2 MiB folios).
    pub fn dma_page(self) -> u64 {
        match self {
            Mode::Base => 4096,
            Mode::Thp | Mode::Hugetlb2M => 2 << 20,
        }
    }

    /// Sets `/sys/kernel/mm/transparent_hugepage/enabled` for this mode.
    pub fn apply(self) -> Result<(), String> {
        let v = match self {
            Mode::Base => "never",
            Mode::Thp | Mode::Hugetlb2M => "madvise",
        };
        std::fs::write(THP_ENABLED, v).map_err(|e| format!("write {v} to {THP_ENABLED}: {e}"))
    }
}

pub const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// `64M`, `1G`.
pub fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// Parses `64M,1G`.
fn parse_sizes(list: &str) -> Result<Vec<u64>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| numapin::addr::parse_size(s).map_err(|e| format!("--sizes {s}: {e}")))
        .collect()
}

/// The results port: one JSON document per line, flushed at once.
pub struct Out {
    file: File,
}

impl Out {
    fn line(&mut self, v: serde_json::Value) {
        let _ = writeln!(self.file, "{v}");
        let _ = self.file.flush();
    }

    /// The samples of one figure (seconds or counts).
    pub fn measure(&mut self, mode: &str, size: u64, metric: &str, unit: &str, samples: &[f64]) {
        self.line(json!({"type": "measure", "mode": mode, "size": size, "metric": metric, "unit": unit, "samples": samples}));
    }

    /// Seconds, from durations.
    pub fn seconds(&mut self, mode: Mode, size: u64, metric: &str, d: &[std::time::Duration]) {
        let s: Vec<f64> = d.iter().map(|d| d.as_secs_f64()).collect();
        self.measure(mode.name(), size, metric, "s", &s);
    }

    /// One count of a page mode's figure.
    pub fn count(&mut self, mode: Mode, size: u64, metric: &str, n: f64) {
        self.measure(mode.name(), size, metric, "count", &[n]);
    }

    pub fn info(&mut self, key: &str, value: impl std::fmt::Display) {
        eprintln!("numapin-bench: {key} = {value}");
        self.line(json!({"type": "info", "key": key, "value": value.to_string()}));
    }
}

/// What every phase needs.
pub struct Ctx {
    pub bdf: String,
    pub sysfs: PathBuf,
    pub home: NodeId,
    pub away: NodeId,
    pub home_cpus: Vec<u32>,
    pub away_cpus: Vec<u32>,
}

impl Ctx {
    fn new() -> Result<Ctx, String> {
        let bdf = numapin::edu::find().ok_or("no edu device (1234:11e8) in the guest")?;
        let sysfs = numapin::vfio::resolve_device(&bdf).map_err(|e| e.to_string())?;
        let topo = Topology::read().map_err(|e| e.to_string())?;
        if topo.nodes.len() < 2 {
            return Err(format!(
                "the VM has {} NUMA node(s), not 2",
                topo.nodes.len()
            ));
        }
        Ok(Ctx {
            bdf,
            sysfs,
            home: NodeId(topo.nodes[0].id),
            away: NodeId(topo.nodes[1].id),
            home_cpus: topo.nodes[0].cpus.clone(),
            away_cpus: topo.nodes[1].cpus.clone(),
        })
    }
}

/// Whether a region of `size` bytes in `mode` fits on the home node, and why
/// not. Base and THP regions need the memory twice over at one point (the
/// caller memory is dropped before numapin allocates its own, but the
/// kernel needs headroom), hugetlb needs the pool.
fn fits(topo: &Topology, home: NodeId, mode: Mode, size: u64) -> Result<(), String> {
    let node = topo.require(home).map_err(|e| e.to_string())?;
    match mode {
        Mode::Hugetlb2M => {
            let free = node.pool(PageSize::Huge2M).map_or(0, |p| p.free);
            let needed = size / (2 << 20);
            if free < needed {
                return Err(format!("needs {needed} free 2 MiB pages, node has {free}"));
            }
        }
        Mode::Base | Mode::Thp => {
            let headroom = 512 << 20;
            if node.mem_free < size + headroom {
                return Err(format!(
                    "needs {} MiB free, node has {} MiB",
                    (size + headroom) >> 20,
                    node.mem_free >> 20
                ));
            }
        }
    }
    Ok(())
}

fn main() {
    if let Some(socket) = args::value("--service-client") {
        service::client_main(&socket);
    }
    let only = args::value("--only");
    let file = args::open_results("numapin-bench");
    let mut out = Out { file };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let sizes = match args::value("--sizes").map(|s| parse_sizes(&s)).transpose() {
        Ok(s) => s.unwrap_or_else(|| DEFAULT_SIZES.to_vec()),
        Err(e) => {
            eprintln!("numapin-bench: {e}");
            std::process::exit(2);
        }
    };

    let ctx = Ctx::new();
    let topo = Topology::read();
    let mut phases: Vec<String> = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    if let (Ok(ctx), Ok(topo)) = (&ctx, &topo) {
        for mode in Mode::ALL {
            for &size in &sizes {
                match fits(topo, ctx.home, mode, size) {
                    Ok(()) => phases.push(format!("{}.{}", mode.name(), size_name(size))),
                    Err(why) => {
                        left_out.push(format!("{}.{}: {why}", mode.name(), size_name(size)))
                    }
                }
            }
        }
    } else {
        phases.push("setup".into());
    }
    phases.push(balance::PHASE.into());
    phases.push(service::PHASE.into());
    if let Some(o) = &only {
        phases.retain(|p| p.contains(o.as_str()));
    }
    out.line(
        json!({"type": "plan", "suite": "bench", "kernel": kernel.trim(), "scenarios": phases}),
    );

    let ctx = match ctx {
        Ok(c) => c,
        Err(e) => {
            for p in &phases {
                out.line(json!({"type": "result", "name": p, "status": "fail", "secs": 0.0, "detail": format!("setup failed: {e}")}));
            }
            out.line(json!({"type": "done"}));
            std::process::exit(1);
        }
    };
    machine_info(&mut out, &ctx);
    out.info("sizes.left-out", left_out.join("; "));

    let mut failed = 0;
    for phase in &phases {
        eprintln!("numapin-bench: --- {phase}");
        let (status, detail, secs) = step::run(|| run_phase(&ctx, &mut out, phase, &sizes));
        if status != "pass" {
            failed += 1;
        }
        eprintln!("numapin-bench: {phase}: {status} ({secs:.1}s) {detail}");
        out.line(json!({"type": "result", "name": phase, "status": status, "secs": (secs * 100.0).round() / 100.0, "detail": detail}));
    }
    out.line(json!({"type": "done"}));
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn run_phase(ctx: &Ctx, out: &mut Out, phase: &str, sizes: &[u64]) -> Result<String, String> {
    if phase == balance::PHASE {
        return balance::run(ctx, out);
    }
    if phase == service::PHASE {
        return service::run(ctx, out);
    }
    for mode in Mode::ALL {
        for &size in sizes {
            if phase == format!("{}.{}", mode.name(), size_name(size)) {
                return cases::run(ctx, out, mode, size);
            }
        }
    }
    Err(format!("unknown phase {phase}"))
}

/// What the host's report says about the guest.
fn machine_info(out: &mut Out, ctx: &Ctx) {
    if let Ok(topo) = Topology::read() {
        for n in &topo.nodes {
            let cpus: Vec<String> = n.cpus.iter().map(u32::to_string).collect();
            out.info(&format!("node{}.cpus", n.id), cpus.join(","));
            out.info(&format!("node{}.mem_mib", n.id), n.mem_total >> 20);
            if let Some(p) = n.pool(PageSize::Huge2M) {
                out.info(&format!("node{}.hugepages_2M", n.id), p.total);
            }
        }
    }
    out.info(
        "thp.modes",
        std::fs::read_to_string(THP_ENABLED)
            .unwrap_or_else(|e| format!("unreadable: {e}"))
            .trim(),
    );
    out.info("device", &ctx.bdf);
    // DMA mappings and IOVA space of a fresh container.
    match raw::RawVfio::open(&ctx.sysfs).and_then(|r| {
        let avail = r.dma_avail()?;
        Ok((avail, r))
    }) {
        Ok((avail, _raw)) => out.info("dma_avail.fresh", avail),
        Err(e) => out.info("dma_avail.fresh", format!("unknown: {e}")),
    }
    if let Some(info) = numapin::Pinner::open(&ctx.bdf)
        .ok()
        .and_then(|p| p.iommu_info().cloned())
    {
        let usable: u64 = info
            .iova_ranges
            .iter()
            .flatten()
            .map(|r| r.len())
            .fold(0u64, u64::saturating_add);
        out.info("iova.usable_bytes", usable);
        out.info("iommu.page_sizes", format!("{:#x}", info.iova_pgsizes));
    }
}
