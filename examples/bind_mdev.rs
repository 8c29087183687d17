//! An mdev device, the proof that VFIO alone does not pin for it, and
//! numapin's pin that does.
//!
//! A type1 container that holds only mdev (mediated, emulated-IOMMU) groups
//! accepts `VFIO_IOMMU_MAP_DMA` but pins nothing: the vendor driver pins
//! pages later, one at a time, when it needs them. Until then the "mapped"
//! memory can migrate. numapin pins such regions with io_uring registered
//! buffers (FOLL_LONGTERM) and still issues MAP_DMA so the vendor driver
//! finds the IOVA.
//!
//! Steps: create an mdev through `mdev_supported_types` (default: the
//! kernel's mtty sample, type mtty-2), map memory with a raw MAP_DMA and show
//! that `VmLck` does not grow and `move_pages` moves it; then pin with
//! numapin and show that `VmPin` grows and nothing moves; release; remove
//! the mdev.
//!
//! ```text
//! cargo run --example bind_mdev -- [--parent mtty] [--type mtty-2] [--size 8M]
//! ```
//!
//! Needs root, a kernel with VFIO_MDEV and an mdev parent (the mtty sample:
//! CONFIG_SAMPLE_VFIO_MDEV_MTTY), and two NUMA nodes for the move check.
//! `cargo xtask test` runs it in its mdev VM.

use std::process::ExitCode;
use std::sync::Arc;

use numapin::addr::{human_size, parse_size};
use numapin::numa::{self, NodeMemory, Topology};
use numapin::{ContainerKind, Error, NodeId, PageSize, PinRequest, Pinner, Result, sys};
use vfio_ioctls::{VfioContainer, VfioDevice};

struct Args {
    parent: String,
    mdev_type: String,
    size: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        parent: "mtty".into(),
        mdev_type: "mtty-2".into(),
        size: 8 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| Error::Invalid(format!("{k} needs a value")))
        };
        match k.as_str() {
            "--parent" => a.parent = v()?,
            "--type" => a.mdev_type = v()?,
            "--size" => a.size = parse_size(&v()?)?,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown argument {k}; usage: bind_mdev [--parent NAME] [--type TYPE] [--size SIZE]"
                )));
            }
        }
    }
    Ok(a)
}

/// An mdev created for this run and removed on drop.
struct Mdev {
    uuid: String,
}

impl Mdev {
    fn create(parent: &str, mdev_type: &str) -> Result<Mdev> {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map_err(|e| Error::sys("read a UUID from /proc/sys/kernel/random/uuid", "", e))?
            .trim()
            .to_string();
        let create =
            format!("/sys/class/mdev_bus/{parent}/mdev_supported_types/{mdev_type}/create");
        std::fs::write(&create, &uuid).map_err(|e| {
            Error::sys(
                format!("write {uuid} to {create}"),
                "is the parent's driver loaded (mtty: CONFIG_SAMPLE_VFIO_MDEV_MTTY) and are instances left (available_instances)?",
                e,
            )
        })?;
        Ok(Mdev { uuid })
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let remove = format!("/sys/bus/mdev/devices/{}/remove", self.uuid);
        match std::fs::write(&remove, "1") {
            Ok(()) => println!("removed mdev {}", self.uuid),
            Err(e) => eprintln!("bind_mdev: could not remove mdev {}: {e}", self.uuid),
        }
    }
}

fn kb(b: u64) -> String {
    format!("{} kB", b >> 10)
}

/// Moves the range to `to` and returns (moved, asked), or None with one node.
fn try_move(addr: usize, len: u64, to: Option<NodeId>) -> Result<Option<(u64, u64)>> {
    let Some(to) = to else { return Ok(None) };
    let m = numa::move_range(addr, len as usize, 4096, to)
        .map_err(|e| Error::sys("move_pages", "", e))?;
    Ok(Some((m.moved, m.asked)))
}

fn moves(m: Option<(u64, u64)>) -> String {
    match m {
        Some((moved, asked)) => format!("{moved} pages moved of {asked}"),
        None => "one NUMA node, no move check".into(),
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let topo = Topology::read()?;
    let home = NodeId(topo.nodes[0].id);
    let away = topo.nodes.get(1).map(|n| NodeId(n.id));
    let mdev = Mdev::create(&args.parent, &args.mdev_type)?;
    println!(
        "created mdev {} ({} on {})",
        mdev.uuid, args.mdev_type, args.parent
    );

    // 1. What VFIO does on its own.
    let sysfs = numapin::vfio::resolve_device(&mdev.uuid)?;
    let mem = NodeMemory::allocate(&topo, home, args.size, PageSize::Base, 1, None, None)?;
    let lck0 = sys::locked_bytes().map_err(|e| Error::sys("read VmLck", "", e))?;
    let raw = {
        let vfio = |op: &str, e| Error::Vfio {
            op: op.to_string(),
            cause: e,
        };
        let container = Arc::new(VfioContainer::new(None).map_err(|e| vfio("open container", e))?);
        let _dev =
            VfioDevice::new(&sysfs, container.clone(), false).map_err(|e| vfio("open mdev", e))?;
        // SAFETY: `mem` stays mapped until after the unmap below.
        unsafe { container.vfio_dma_map(0x10_0000, args.size as usize, mem.as_ptr()) }
            .map_err(|e| vfio("VFIO_IOMMU_MAP_DMA", e))?;
        let grew = sys::locked_bytes().map_err(|e| Error::sys("read VmLck", "", e))? - lck0;
        let m = try_move(mem.addr(), args.size, away);
        container
            .vfio_dma_unmap(0x10_0000, args.size as usize)
            .map_err(|e| vfio("VFIO_IOMMU_UNMAP_DMA", e))?;
        (grew, m?)
    };
    drop(mem);
    println!(
        "MAP_DMA alone: VmLck +{}, {} (VFIO does not pin for mdev-only containers)",
        kb(raw.0),
        moves(raw.1)
    );

    // 2. numapin.
    let pinner = Pinner::open(&mdev.uuid)?;
    if pinner.kind() != ContainerKind::MdevOnly {
        return Err(Error::Invalid(format!(
            "{} opened as {}, expected mdev-only",
            mdev.uuid,
            pinner.kind().name()
        )));
    }
    let pin0 = sys::pinned_bytes().map_err(|e| Error::sys("read VmPin", "", e))?;
    let lck1 = sys::locked_bytes().map_err(|e| Error::sys("read VmLck", "", e))?;
    let region = pinner.pin(&PinRequest::new(home, args.size))?;
    let pin_grew = sys::pinned_bytes().map_err(|e| Error::sys("read VmPin", "", e))? - pin0;
    let lck_grew = sys::locked_bytes().map_err(|e| Error::sys("read VmLck", "", e))? - lck1;
    println!(
        "{:<4} {:<18} {:<18} {:>8} {:<10}",
        "node", "vaddr", "iova", "size", "pin"
    );
    println!(
        "{:<4} {:#018x} {:<18} {:>8} {:<10}",
        home,
        region.vaddr(),
        region.iova().map_or("-".into(), |i| i.to_string()),
        human_size(region.len()),
        region.pin_kind()
    );
    let m = try_move(region.vaddr().as_usize(), args.size, away)?;
    println!(
        "numapin: VmPin +{}, VmLck +{}, {}",
        kb(pin_grew),
        kb(lck_grew),
        moves(m)
    );
    let v = region.verify()?;
    if !v.is_intact() || m.is_some_and(|(moved, _)| moved != 0) {
        return Err(Error::Invalid(format!("the pinned region moved: {v:?}")));
    }
    region.release()?;
    println!(
        "released: {} unpinned (VmPin +{} after release)",
        human_size(args.size),
        kb(sys::pinned_bytes().map_err(|e| Error::sys("read VmPin", "", e))? - pin0)
    );
    drop(pinner);
    drop(mdev);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bind_mdev: {e}");
            ExitCode::FAILURE
        }
    }
}
