//! Device locality as an operator asks it: the VM's second edu sits behind
//! a PCIe expander bridge with `numa_node=1`; `numapin info` must say so and
//! rate each node's memory, and `numapin topology` must list it under node
//! 1, while the root-bus edu has no node.

use serde_json::Value;

use crate::Scenario;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![("a.cli.device-locality", device_locality)]
}

fn numa_node(bdf: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/numa_node"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn json(args: &[&str]) -> Result<Value, String> {
    let (code, out, err) = run_cli(args)?;
    ensure!(code == 0, "numapin {args:?}: exit {code}: {err}");
    e(
        serde_json::from_str(&out),
        &format!("parse numapin {args:?}"),
    )
}

fn device_locality(ctx: &Ctx) -> Result<String, String> {
    let far = numapin::edu::find_all()
        .into_iter()
        .find(|d| numa_node(d) == Some(1))
        .ok_or("no edu device with numa_node 1: the VM's pxb-pcie edu is missing")?;
    let doc = json(&["info", "--device", &far, "--json"])?;
    ensure!(doc["numa_node"] == 1, "info {far}: {doc}");
    let mem = doc["memory"].as_array().ok_or("info: no `memory`")?;
    let rate = |n: u32| {
        mem.iter()
            .find(|m| m["node"] == n)
            .cloned()
            .unwrap_or(Value::Null)
    };
    ensure!(
        rate(1)["local"] == true && rate(1)["distance"] == 10,
        "node 1 from {far}: {}",
        rate(1)
    );
    ensure!(
        rate(0)["local"] == false && rate(0)["distance"].as_u64().is_some_and(|d| d > 10),
        "node 0 from {far}: {}",
        rate(0)
    );
    let near = json(&["info", "--device", &ctx.bdf, "--json"])?;
    ensure!(near["numa_node"] == -1, "info {}: {near}", ctx.bdf);
    let topo = json(&["topology", "--json"])?;
    let node1 = topo["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == 1))
        .ok_or("topology: no node 1")?;
    ensure!(
        node1["pci_devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == far.as_str())),
        "topology: node 1 does not list {far}: {node1}"
    );
    Ok(format!(
        "{far}: numa_node 1, node 1 local (distance 10), node 0 at {}; {} has no node; topology lists {far} under node 1",
        rate(0)["distance"],
        ctx.bdf
    ))
}
