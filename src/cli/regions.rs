//! `--region` arguments, checked against the machine before any device is
//! opened: the node is online and has memory, the size is a non-zero
//! multiple of the page size and fits the node, a fixed IOVA is aligned,
//! the hugepage pools have the pages, and a size written without a unit is
//! not a slip for megabytes.

use std::collections::BTreeMap;
use std::str::FromStr;

use numapin::addr::human_size;
use numapin::numa::Topology;
use numapin::{Error, NodeId, PageSize, PinRequest, Result};

use super::spec::RegionSpec;

/// One `--region NODE:SIZE[:PAGESIZE][@IOVA]`, with the text it came from.
#[derive(Debug, Clone)]
pub struct RegionArg {
    /// What the user typed.
    pub text: String,
    /// The request it parses to.
    pub req: PinRequest<'static>,
}

impl FromStr for RegionArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let RegionSpec(req) = s.parse()?;
        Ok(RegionArg {
            text: s.to_string(),
            req,
        })
    }
}

impl RegionArg {
    /// The node the region asks for (a `--region` always names one).
    pub fn node(&self) -> NodeId {
        self.req.node.expect("a --region always names its node")
    }

    /// The size field as typed, when it is plain decimal (no unit, no `0x`).
    fn unitless_size(&self) -> Option<&str> {
        let body = self.text.split('@').next()?;
        let size = body.split(':').nth(1)?.trim();
        (!size.is_empty() && size.chars().all(|c| c.is_ascii_digit() || c == '_')).then_some(size)
    }
}

/// Checks every region against `topo`, hugepage pools included; the first
/// fault is the error.
pub fn validate(topo: &Topology, regions: &[RegionArg]) -> Result<()> {
    validate_shape(topo, regions)?;
    validate_pools(topo, regions)
}

/// Pages asked of each hugepage pool: (node, page size) -> (pages, regions).
pub fn pool_demand(regions: &[RegionArg]) -> BTreeMap<(u32, PageSize), (u64, usize)> {
    let mut pool_use: BTreeMap<(u32, PageSize), (u64, usize)> = BTreeMap::new();
    for r in regions.iter().filter(|r| r.req.page_size.is_huge()) {
        let e = pool_use.entry((r.node().0, r.req.page_size)).or_default();
        e.0 += r.req.size / r.req.page_size.bytes();
        e.1 += 1;
    }
    pool_use
}

/// Everything but the hugepage pools: nodes, sizes, alignment.
pub fn validate_shape(topo: &Topology, regions: &[RegionArg]) -> Result<()> {
    let mut node_use: BTreeMap<u32, u64> = BTreeMap::new();
    for r in regions {
        validate_one(topo, r)?;
        let n = node_use.entry(r.node().0).or_default();
        *n = n.saturating_add(r.req.size);
    }
    for (&node, &bytes) in &node_use {
        let n = topo.require(NodeId(node))?;
        if bytes > n.mem_total {
            return Err(Error::Invalid(format!(
                "the regions ask node {node} for {} but it has {} of memory in all; ask for less \
                 or spread the regions over other nodes (see `numapin topology`)",
                human_size(bytes),
                human_size(n.mem_total)
            )));
        }
    }
    Ok(())
}

/// The hugepage pools have the free pages the regions need, summed over the
/// regions of each node.
pub fn validate_pools(topo: &Topology, regions: &[RegionArg]) -> Result<()> {
    for (&(node, page_size), &(needed, count)) in &pool_demand(regions) {
        let n = topo.require(NodeId(node))?;
        let (free, total) = n.pool(page_size).map_or((0, 0), |p| (p.free, p.total));
        if needed <= free {
            continue;
        }
        if count == 1 {
            return Err(Error::NotEnoughHugepages {
                node: NodeId(node),
                page_size,
                needed,
                free,
                total,
            });
        }
        return Err(Error::Invalid(format!(
            "node {node} has {free} free {page_size} hugepages but the {count} regions on it need \
             {needed} together; reserve more with `echo {} > \
             /sys/devices/system/node/node{node}/hugepages/hugepages-{}kB/nr_hugepages`",
            total + needed - free,
            page_size.bytes() >> 10
        )));
    }
    Ok(())
}

fn validate_one(topo: &Topology, r: &RegionArg) -> Result<()> {
    let node = r.node();
    let PinRequest {
        size,
        page_size,
        iova,
        ..
    } = r.req;
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if let Some(text) = r.unitless_size() {
        if size < 4096 {
            let node_text = r.text.split(':').next().unwrap_or("0");
            return Err(Error::Invalid(format!(
                "region `{}` asks for {size} bytes: a size without a unit is in bytes, and {size} \
                 is less than one 4 KiB page; write the unit, e.g. `{node_text}:{text}M` for \
                 {text} MiB",
                r.text
            )));
        }
    }
    let n = topo.require(node)?;
    if n.mem_total == 0 {
        let with_memory: Vec<String> = topo
            .nodes
            .iter()
            .filter(|m| m.mem_total > 0)
            .map(|m| m.id.to_string())
            .collect();
        return Err(Error::Invalid(format!(
            "NUMA node {node} has no memory (a CPU-only node); pick a node with memory: {} \
             (see `numapin topology`)",
            if with_memory.is_empty() {
                "none".into()
            } else {
                with_memory.join(", ")
            }
        )));
    }
    if size % page_size.bytes() != 0 {
        return Err(Error::UnalignedSize { size, page_size });
    }
    if let Some(iova) = iova {
        if !iova.is_aligned(page_size.bytes()) {
            return Err(Error::UnalignedIova { iova, page_size });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use numapin::numa::{HugePool, Node};

    fn topo() -> Topology {
        let node = |id: u32, mem: u64, free2m: u64| Node {
            id,
            cpus: if mem > 0 { vec![id] } else { vec![id, id + 10] },
            mem_total: mem,
            mem_free: mem / 2,
            hugepages: vec![HugePool {
                page_size: 2 << 20,
                total: free2m + 4,
                free: free2m,
            }],
        };
        Topology {
            nodes: vec![node(0, 4 << 30, 8), node(1, 4 << 30, 0), node(2, 0, 0)],
        }
    }

    fn check(specs: &[&str]) -> std::result::Result<(), String> {
        let args: Vec<RegionArg> = specs.iter().map(|s| s.parse().unwrap()).collect();
        validate(&topo(), &args).map_err(|e| e.to_string())
    }

    #[test]
    fn good_regions_pass() {
        check(&[
            "0:64M",
            "1:1G",
            "0:14M:2M",
            "0:4096",
            "0:0x200000:2M@0x40000000",
        ])
        .unwrap();
    }

    #[test]
    fn a_unitless_size_below_a_page_says_it_is_bytes() {
        for (spec, want) in [("0:64", "`0:64M` for 64 MiB"), ("1:512", "`1:512M`")] {
            let e = check(&[spec]).unwrap_err();
            assert!(
                e.contains(want) && e.contains("without a unit is in bytes"),
                "{e}"
            );
        }
        // With a unit, or a page or more, it is what the user said.
        let e = check(&["0:64B"]).unwrap_err();
        assert!(e.contains("not a multiple of the 4K page size"), "{e}");
        assert!(check(&["0:4096"]).is_ok());
        assert!(check(&["0:64K"]).is_ok());
    }

    #[test]
    fn topology_faults_are_named() {
        let e = check(&["7:4M"]).unwrap_err();
        assert!(
            e.contains("NUMA node 7 is not online; online nodes: 0, 1, 2"),
            "{e}"
        );
        let e = check(&["2:4M"]).unwrap_err();
        assert!(
            e.contains("node 2 has no memory") && e.contains("memory: 0, 1"),
            "{e}"
        );
        let e = check(&["0:3G", "0:2G"]).unwrap_err();
        assert!(e.contains("ask node 0 for 5 GiB but it has 4 GiB"), "{e}");
    }

    #[test]
    fn alignment_and_zero_are_checked() {
        assert!(check(&["0:0"]).unwrap_err().contains("region size is 0"));
        let e = check(&["0:3M:2M"]).unwrap_err();
        assert!(e.contains("not a multiple of the 2M page size"), "{e}");
        let e = check(&["0:4M:2M@0x100000"]).unwrap_err();
        assert!(
            e.contains("is not aligned to the region's 2M page size"),
            "{e}"
        );
    }

    #[test]
    fn hugepage_pools_are_summed_over_regions() {
        // Node 0 has 8 free 2M pages: 16M fits, 16M + 2M does not.
        check(&["0:8M:2M", "0:8M:2M"]).unwrap();
        let e = check(&["0:8M:2M", "0:10M:2M"]).unwrap_err();
        assert!(e.contains("the 2 regions on it need 9 together"), "{e}");
        let e = check(&["1:2M:2M"]).unwrap_err();
        assert!(
            e.contains("node 1 has 0 free 2M hugepages but the region needs 1"),
            "{e}"
        );
    }
}
