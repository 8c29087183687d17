//! A device in VFIO's unsafe no-IOMMU mode, and memory pinned for it.
//!
//! Without an IOMMU (or with it off), VFIO can still hand a device to user
//! space in "no-IOMMU" mode. There is no `VFIO_IOMMU_MAP_DMA` there: the
//! device DMAs straight to physical addresses, and nothing in VFIO pins the
//! memory behind them. numapin pins it with io_uring registered buffers
//! (FOLL_LONGTERM) and reports the physical extents, which are the DMA
//! addresses.
//!
//! Steps: turn the mode on (`/sys/module/vfio/parameters/
//! enable_unsafe_noiommu_mode`), bind the device to vfio-pci, open it
//! (needs CAP_SYS_RAWIO), pin node-local memory, print the table, show that
//! `move_pages` cannot move it, release.
//!
//! ```text
//! cargo run --example bind_noiommu -- [--device BDF] [--node N] [--size 8M] [--page-size 2M]
//! ```
//!
//! The default device is QEMU's edu. `cargo xtask test` runs this in a VM
//! without a vIOMMU, booted with `vfio.enable_unsafe_noiommu_mode=1`.

use std::process::ExitCode;

use numapin::addr::{human_size, parse_size};
use numapin::numa::{self, Topology};
use numapin::{ContainerKind, Error, NodeId, PageSize, PinRequest, Pinner, Result, sys};

const MODE: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";

struct Args {
    device: Option<String>,
    node: Option<u32>,
    size: u64,
    page_size: PageSize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: None,
        node: None,
        size: 8 << 20,
        page_size: PageSize::Huge2M,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| Error::Invalid(format!("{k} needs a value")))
        };
        match k.as_str() {
            "--device" => a.device = Some(v()?),
            "--node" => {
                let n = v()?;
                a.node = Some(
                    n.parse()
                        .map_err(|_| Error::Invalid(format!("--node {n}: not a node number")))?,
                )
            }
            "--size" => a.size = parse_size(&v()?)?,
            "--page-size" => a.page_size = v()?.parse()?,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown argument {k}; usage: bind_noiommu [--device BDF] [--node N] [--size SIZE] [--page-size 4K|2M|1G]"
                )));
            }
        }
    }
    Ok(a)
}

/// Turns no-IOMMU mode on if VFIO was built with it and it is off.
fn enable_mode() -> Result<&'static str> {
    let now = std::fs::read_to_string(MODE).map_err(|e| {
        Error::sys(
            format!("read {MODE}"),
            "load vfio from a kernel built with CONFIG_VFIO_NOIOMMU",
            e,
        )
    })?;
    if now.trim() == "Y" || now.trim() == "1" {
        return Ok("already on");
    }
    std::fs::write(MODE, "1")
        .map_err(|e| Error::sys(format!("write 1 to {MODE}"), "run as root", e))?;
    Ok("turned on")
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let device = match args.device {
        Some(d) => d,
        None => numapin::edu::find()
            .ok_or_else(|| Error::Invalid("no QEMU edu device found; give --device BDF".into()))?,
    };
    println!("no-IOMMU mode: {}", enable_mode()?);
    let b = numapin::bind::bind(&device)?;
    println!(
        "bind {}: {} -> {}",
        b.device,
        b.previous.as_deref().unwrap_or("no driver"),
        b.current.as_deref().unwrap_or("no driver")
    );
    let pinner = Pinner::open(&device)?;
    if pinner.kind() != ContainerKind::NoIommu {
        return Err(Error::Invalid(format!(
            "{device} opened as {}, not no-iommu: an IOMMU is active for it (this example is for machines without one)",
            pinner.kind().name()
        )));
    }
    let topo = Topology::read()?;
    let node = NodeId(args.node.unwrap_or(topo.nodes[0].id));
    let vmpin = || sys::pinned_bytes().map_err(|e| Error::sys("read VmPin", "", e));
    let pin0 = vmpin()?;
    let region = pinner.pin(&PinRequest {
        page_size: args.page_size,
        min_extent: Some(args.page_size.bytes()),
        ..PinRequest::new(node, args.size)
    })?;
    println!(
        "device {} ({}), group node {}: pin by {}, DMA to physical addresses",
        device,
        pinner.kind().name(),
        pinner
            .device_info()
            .expect("opened by numapin")
            .group_node
            .display(),
        region.pin_kind()
    );
    println!(
        "{:<4} {:<18} {:>8} {:>5}  physical extents (= DMA addresses)",
        "node", "vaddr", "size", "page"
    );
    let extents = region.phys_extents()?;
    for (i, x) in extents.iter().enumerate() {
        if i == 0 {
            print!(
                "{:<4} {:#018x} {:>8} {:>5}  ",
                node,
                region.vaddr(),
                human_size(region.len()),
                args.page_size
            );
        } else {
            print!("{:<41}  ", "");
        }
        println!("{} +{}", x.pa, human_size(x.len));
    }
    match topo.nodes.iter().find(|n| n.id != node.0) {
        Some(other) => {
            let m = numa::move_range(
                region.vaddr().as_usize(),
                region.len() as usize,
                args.page_size.bytes(),
                NodeId(other.id),
            )
            .map_err(|e| Error::sys("move_pages", "", e))?;
            println!(
                "move_pages to node {}: {} pages moved of {}",
                other.id, m.moved, m.asked
            );
        }
        None => println!("one NUMA node: no move_pages check"),
    }
    let v = region.verify()?;
    if !v.is_intact() {
        return Err(Error::Invalid(format!("the pinned region changed: {v:?}")));
    }
    let held = vmpin()? - pin0;
    region.release()?;
    println!(
        "released: {} unpinned (VmPin +{} kB while pinned, +{} kB after release)",
        human_size(args.size),
        held >> 10,
        (vmpin()? - pin0) >> 10
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bind_noiommu: {e}");
            ExitCode::FAILURE
        }
    }
}
