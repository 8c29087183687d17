//! `numapin demo`: the problem and the answer side by side.
//!
//! Two regions of the same size on node 0: one plain (bound and faulted in,
//! like `mlock`-era drivers had it) and one pinned by numapin. A migration
//! storm (`move_pages` to the other node and back, `migrate_pages`,
//! compaction) then runs over both. The plain region's pages move and every
//! physical address a device was given goes stale; the pinned region's pages
//! stay, and QEMU's edu device still DMAs correctly through its IOVA.

use numapin::addr::human_size;
use numapin::edu::{DmaCheck, Edu};
use numapin::numa::{self, NodeMemory, Topology};
use numapin::phys;
use numapin::{Error, NodeId, PageSize, PinRequest, Pinner, Result};

struct Row {
    name: &'static str,
    pages: u64,
    moved: u64,
    pfn_changed: u64,
    node_now: String,
    dma: String,
}

fn pfns(addr: usize, len: usize) -> Result<Vec<u64>> {
    Ok(phys::pfns(addr as u64, len as u64)?)
}

fn node_summary(addr: usize, len: usize) -> Result<String> {
    let nodes = numa::nodes_of(addr, len, numapin::addr::base_page_size())
        .map_err(|e| Error::sys("move_pages (query)", "", e))?;
    let mut ids: Vec<i32> = nodes.clone();
    ids.sort();
    ids.dedup();
    Ok(ids
        .iter()
        .map(|n| format!("{n}:{}", nodes.iter().filter(|&x| x == n).count()))
        .collect::<Vec<_>>()
        .join(" "))
}

/// A region under the storm: its original PFNs, and which pages have
/// been seen on another frame at any point.
struct Tracked {
    addr: usize,
    len: usize,
    original: Vec<u64>,
    ever_moved: Vec<bool>,
    moves: u64,
}

impl Tracked {
    fn new(addr: usize, len: usize) -> Result<Tracked> {
        let original = pfns(addr, len)?;
        let ever_moved = vec![false; original.len()];
        Ok(Tracked {
            addr,
            len,
            original,
            ever_moved,
            moves: 0,
        })
    }

    /// Re-reads the PFNs and marks every page whose frame differs.
    fn observe(&mut self) -> Result<()> {
        let now = pfns(self.addr, self.len)?;
        for ((m, a), b) in self.ever_moved.iter_mut().zip(&self.original).zip(&now) {
            *m |= a != b;
        }
        Ok(())
    }

    /// `move_pages` to `to`, then observe.
    fn move_to(&mut self, to: NodeId) -> Result<()> {
        let page = numapin::addr::base_page_size();
        let out = numa::move_range(self.addr, self.len, page, to)
            .map_err(|e| Error::sys("move_pages", "", e))?;
        self.moves += out.moved;
        self.observe()
    }

    fn pages_moved(&self) -> u64 {
        self.ever_moved.iter().filter(|&&m| m).count() as u64
    }
}

pub fn run(device: Option<&str>, size: u64, rounds: u32) -> Result<()> {
    let device = match device {
        Some(d) => d.to_string(),
        None => numapin::edu::find().ok_or_else(|| {
            Error::Invalid(
                "no QEMU edu device (1234:11e8) found; run the demo in the VM: `cargo xtask demo`"
                    .into(),
            )
        })?,
    };
    numapin::vfio::resolve_device(&device)?;
    let topo = Topology::read()?;
    if topo.nodes.len() < 2 {
        return Err(Error::Invalid(
            "the demo needs two online NUMA nodes to migrate between; run it in the VM: `cargo xtask demo`".into(),
        ));
    }
    let (home, away) = (NodeId(topo.nodes[0].id), NodeId(topo.nodes[1].id));
    let pinner = Pinner::open(&device)?;
    let edu = Edu::open(pinner.device_fd().expect("the demo opens its device"))?;

    println!(
        "numapin demo: two {} regions on node {home}, device {device}",
        human_size(size)
    );
    println!("  plain:   mbind + faulted in (what mlock-era drivers relied on)");
    println!("  numapin: the same, plus one VFIO_IOMMU_MAP_DMA (long-term pin)");
    println!(
        "storm: {rounds} rounds of move_pages to node {away} and back, then\nmigrate_pages {home}->{away}->{home} and compaction\n"
    );

    let plain = NodeMemory::allocate(&topo, home, size, PageSize::Base, 0, None, None)?;
    let pinned = pinner.pin(&PinRequest::new(home, size))?;
    let len = size as usize;
    let mut plain_t = Tracked::new(plain.addr(), len)?;
    let mut pinned_t = Tracked::new(pinned.vaddr().as_usize(), len)?;
    let half = size / 2;
    let count = numapin::edu::MAX_TRANSFER.min(half);
    let dma_before = edu.round_trip(&pinned, 0, &pinned, half, count, 1)?;

    for _ in 0..rounds {
        for to in [away, home] {
            plain_t.move_to(to)?;
            pinned_t.move_to(to)?;
        }
    }
    for (from, to) in [(home, away), (away, home)] {
        numapin::sys::migrate_pages(0, from, to).map_err(|e| Error::sys("migrate_pages", "", e))?;
        plain_t.observe()?;
        pinned_t.observe()?;
    }
    // Compaction is best effort: absent without CONFIG_COMPACTION.
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    plain_t.observe()?;
    pinned_t.observe()?;

    let dma_after = edu.round_trip(&pinned, 0, &pinned, half, count, 2)?;
    let pages = plain_t.original.len() as u64;
    let (plain_moved, pinned_moved) = (plain_t.moves, pinned_t.moves);
    let plain_changed = plain_t.pages_moved();
    let pinned_changed = pinned_t.pages_moved();
    let dma = |c: &DmaCheck| {
        if c.ok() {
            format!("{} B ok", c.bytes)
        } else {
            format!("{} of {} B BAD", c.mismatches, c.bytes)
        }
    };
    let rows = [
        Row {
            name: "plain",
            pages,
            moved: plain_moved,
            pfn_changed: plain_changed,
            node_now: node_summary(plain.addr(), len)?,
            dma: format!("no IOVA; {plain_changed} PAs went stale"),
        },
        Row {
            name: "numapin",
            pages,
            moved: pinned_moved,
            pfn_changed: pinned_changed,
            node_now: node_summary(pinned.vaddr().as_usize(), len)?,
            dma: format!("{} / {}", dma(&dma_before), dma(&dma_after)),
        },
    ];
    println!(
        "{:<8} {:>6} {:>7} {:>8} {:<10} DMA (before / after)",
        "region", "pages", "moves", "pages on", "node:pages"
    );
    println!(
        "{:<8} {:>6} {:>7} {:>8} {:<10}",
        "", "", "", "new PFN", "now"
    );
    for r in &rows {
        println!(
            "{:<8} {:>6} {:>7} {:>8} {:<10} {}",
            r.name, r.pages, r.moved, r.pfn_changed, r.node_now, r.dma
        );
    }
    println!(
        "\nnumapin region: {} -> node {home}, {}",
        match pinned.iova() {
            Some(i) => format!("IOVA {i}"),
            None => "physical addresses".to_string(),
        },
        human_size(size)
    );
    let ok = plain_changed > 0
        && pinned_changed == 0
        && pinned_moved == 0
        && dma_before.ok()
        && dma_after.ok();
    pinned.release()?;
    drop(plain);
    if !ok {
        return Err(Error::Invalid(format!(
            "demo outcome unexpected: plain PFN changes {plain_changed} (want > 0), pinned moves {pinned_moved} and PFN changes {pinned_changed} (want 0), DMA {} / {}",
            dma(&dma_before),
            dma(&dma_after)
        )));
    }
    println!(
        "result: the plain region moved ({plain_changed} of {pages} pages were on a new frame);"
    );
    println!("        the pinned region did not move, and device DMA stayed correct.");
    Ok(())
}
