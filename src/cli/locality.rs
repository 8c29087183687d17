//! Which node a device is on, and how far each node's memory is from it:
//! what `info` and `topology` add to the library's node list.

use std::collections::BTreeMap;
use std::path::Path;

use numapin::NodeId;
use numapin::numa::{self, Node, Topology};
use serde::Serialize;

/// A device's place in the NUMA topology.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLocality {
    /// The kernel's `numa_node` (-1: the firmware gives the device none).
    pub numa_node: i64,
    /// `local_cpulist`: the CPUs near the device.
    pub local_cpus: Vec<u32>,
    /// For each node asked about: is memory there local to the device?
    pub memory: Vec<MemoryLocality>,
}

/// Memory on one node, seen from the device.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryLocality {
    /// The node.
    pub node: u32,
    /// `true` when it is the device's node; `null` when the device has none.
    pub local: Option<bool>,
    /// The distance from the device's node (10 = local); `null` when the
    /// device has no node or the kernel gives no distances.
    pub distance: Option<u32>,
}

/// Reads `numa_node` and `local_cpulist` of the device at `sysfs` (for an
/// mdev device, its parent's), and rates memory on each of `asked`.
pub fn device(sysfs: &Path, topo: &Topology, asked: &[NodeId]) -> DeviceLocality {
    let node = numa::device_node(sysfs);
    let cpulist = |dir: &Path| std::fs::read_to_string(dir.join("local_cpulist")).ok();
    let cpus = cpulist(sysfs)
        .or_else(|| {
            std::fs::canonicalize(sysfs)
                .ok()
                .and_then(|p| p.parent().and_then(cpulist))
        })
        .and_then(|s| numa::parse_cpulist(&s).ok())
        .unwrap_or_default();
    let row = node.and_then(|n| numa::distances(n).ok());
    let memory = asked
        .iter()
        .map(|&m| MemoryLocality {
            node: m.0,
            local: node.map(|n| n == m),
            distance: row.as_ref().and_then(|r| {
                topo.nodes
                    .iter()
                    .position(|x| x.id == m.0)
                    .and_then(|i| r.get(i).copied())
            }),
        })
        .collect();
    DeviceLocality {
        numa_node: node.map_or(-1, |n| i64::from(n.0)),
        local_cpus: cpus,
        memory,
    }
}

/// `topology`: the library's nodes, with distances and local PCI devices.
#[derive(Debug, Serialize)]
pub struct TopologyReport {
    /// Online nodes.
    pub nodes: Vec<NodeReport>,
    /// PCI devices that report no node (`numa_node` = -1).
    pub devices_without_node: Vec<String>,
}

/// One node.
#[derive(Debug, Serialize)]
pub struct NodeReport {
    /// What the library reads (id, CPUs, memory, hugepage pools).
    #[serde(flatten)]
    pub node: Node,
    /// Distance to each online node, by node id (10 = local). Empty when
    /// the kernel gives none.
    pub distances: BTreeMap<u32, u32>,
    /// PCI devices whose `numa_node` is this node.
    pub pci_devices: Vec<String>,
}

impl TopologyReport {
    /// Builds the report from `topo`, `nodeN/distance` and the PCI
    /// devices' `numa_node`.
    pub fn new(topo: Topology, devices: Vec<(String, Option<NodeId>)>) -> TopologyReport {
        let ids: Vec<u32> = topo.nodes.iter().map(|n| n.id).collect();
        let mut without = Vec::new();
        let mut by_node: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (dev, node) in devices {
            match node {
                Some(n) => by_node.entry(n.0).or_default().push(dev),
                None => without.push(dev),
            }
        }
        let nodes = topo
            .nodes
            .into_iter()
            .map(|node| {
                let distances = numa::distances(NodeId(node.id))
                    .map(|row| ids.iter().copied().zip(row).collect())
                    .unwrap_or_default();
                NodeReport {
                    pci_devices: by_node.remove(&node.id).unwrap_or_default(),
                    distances,
                    node,
                }
            })
            .collect();
        // A device on a node that is not online (firmware oddity) is as good
        // as on none for placement.
        without.extend(by_node.into_values().flatten());
        without.sort();
        TopologyReport {
            nodes,
            devices_without_node: without,
        }
    }
}
