//! Command-line parsing and the commands.

mod check;
mod demo;
mod dist;
mod hold;
pub use hold::{cancelling_signal, signal_name};
mod locality;
mod output;
mod regions;
mod service;
mod spec;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use numapin::numa::Topology;
use numapin::{NodeId, Pinner, Result};

use output::{PinReport, RegionReport};
use regions::RegionArg;

/// Node-local memory pinned long-term through Linux VFIO, with fixed IOVAs
/// and physical addresses.
#[derive(Debug, Parser)]
#[command(name = "numapin", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

/// The commands, and the hidden generator beside them (kept out of
/// [`Command`] so that completions and man pages never mention it).
#[derive(Debug, Subcommand)]
enum Top {
    #[command(flatten)]
    User(Command),
    /// Write shell completions and man pages into DIR (what `cargo xtask
    /// dist` runs).
    #[command(name = "__generate", hide = true)]
    Generate {
        /// Where completions/ and man/ go.
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Online NUMA nodes: CPUs, memory, hugepage pools, distances between
    /// nodes, and the PCI devices local to each.
    Topology {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bind a PCI device to vfio-pci (driver_override), remembering its
    /// driver. Refuses a device the host is using (an interface that is up
    /// or routed, a mounted, held or swap block device, the boot display)
    /// unless --force; rolls back to the old driver if a step fails.
    Bind(BindArgs),
    /// Give a PCI device back to the driver it had before `numapin bind`.
    /// Refuses while a process holds its VFIO group or cdev open (the
    /// kernel would block the unbind until it lets go), unless --force;
    /// --wait polls for the holders to go before writing anything.
    Unbind(UnbindArgs),
    /// The device's NUMA node and local CPUs, how near each node's memory is,
    /// its IOMMU group, container kind, IOVA ranges, page sizes and DMA
    /// mappings available.
    Info {
        /// PCI address, mdev UUID, or sysfs path.
        #[arg(long, short)]
        device: String,
        /// The kernel interface to open it through: `type1` (the VFIO group
        /// in a container), `iommufd` (the VFIO cdev and /dev/iommu), or
        /// `auto` (iommufd where the kernel and device have it). Default:
        /// $NUMAPIN_BACKEND, else auto.
        #[arg(long, value_parser = parse_backend, value_name = "auto|type1|iommufd")]
        backend: Option<numapin::Backend>,
        /// Say whether memory on this node would be local to the device
        /// (repeatable; default: every online node).
        #[arg(long, value_name = "NODE")]
        node: Vec<u32>,
        /// Say whether these regions' memory would be local to the device.
        #[arg(long = "region", short, value_name = "NODE:SIZE[:PAGESIZE][@IOVA]")]
        regions: Vec<RegionArg>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Preflight: IOMMU, vfio-pci, the device's group, the regions against
    /// the topology, memlock, hugepages, io_uring, NUMA balancing; each with
    /// a fix. Exits 5 (device state) when a check fails.
    Check {
        /// The device to check (PCI address, mdev UUID, or sysfs path).
        #[arg(long, short)]
        device: Option<String>,
        /// Regions to check memlock and hugepages against (repeatable).
        #[arg(long = "region", short, value_name = "NODE:SIZE[:PAGESIZE][@IOVA]")]
        regions: Vec<RegionArg>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Allocate node-local memory, pin it through the device's container,
    /// print where it is, and hold the pins until a signal or timeout: a
    /// check and a reservation tool (programs use the library).
    Pin(PinArgs),
    /// The original failure re-enacted: mlocked, plain and numapin-pinned
    /// memory through NUMA balancing, a migration storm and compaction, with
    /// device DMA checks (needs QEMU's edu device: `cargo xtask demo`).
    Demo(demo::DemoArgs),
    /// numapind's regions, usage per user and node, DMA mappings left.
    Status {
        /// The daemon's socket.
        #[arg(long, default_value = numapin::client::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct BindArgs {
    /// PCI address, e.g. 0000:3b:00.0 (find yours with `lspci -nn -D`).
    device: String,
    /// Go ahead although the host is using the device.
    #[arg(long)]
    force: bool,
    /// Show the checks and every sysfs write, in order, without writing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct UnbindArgs {
    #[command(flatten)]
    common: BindArgs,
    /// Wait up to SECS seconds for the processes holding the device to close
    /// it (checked before any write), saying what it waits for.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

impl BindArgs {
    fn options(&self) -> numapin::bind::Options {
        numapin::bind::Options {
            force: self.force,
            dry_run: self.dry_run,
        }
    }
}

#[derive(Debug, Args)]
struct PinArgs {
    /// PCI address (bound to vfio-pci, behind an IOMMU or in no-IOMMU
    /// mode), mdev UUID, or sysfs path.
    /// With --service: one of the daemon's devices (default: its first).
    #[arg(long, short, required_unless_present = "service")]
    device: Option<String>,
    /// The kernel interface: `type1`, `iommufd` or `auto` (iommufd where
    /// the kernel and device have it). Default: $NUMAPIN_BACKEND, else auto.
    #[arg(long, value_parser = parse_backend, value_name = "auto|type1|iommufd")]
    backend: Option<numapin::Backend>,
    /// Allocate through numapind at SOCKET instead of opening the device
    /// (default socket: /run/numapin/numapin.sock).
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = numapin::client::DEFAULT_SOCKET)]
    service: Option<std::path::PathBuf>,
    /// NODE:SIZE[:PAGESIZE][@IOVA], e.g. 0:512M, 1:1G:2M, 0:64M@0x100000000.
    /// Repeat for several regions.
    #[arg(
        long = "region",
        short,
        required = true,
        value_name = "NODE:SIZE[:PAGESIZE][@IOVA]",
        allow_hyphen_values = true
    )]
    regions: Vec<RegionArg>,
    /// Also print each region's physical extents (needs CAP_SYS_ADMIN;
    /// always printed for a no-IOMMU device, whose DMA addresses they are).
    /// With --service: ask numapind for them (users in its phys_users).
    #[arg(long)]
    phys: bool,
    /// Fail unless every physically contiguous extent of each region is at
    /// least this long (e.g. 2M; hugepages give extents of their size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    min_extent: Option<u64>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// Hold the pins this many seconds (or until SIGINT/SIGTERM), then release.
    #[arg(long, value_name = "SECS", conflicts_with = "hold_forever")]
    hold: Option<u64>,
    /// Hold the pins until SIGINT/SIGTERM (the default).
    #[arg(long)]
    hold_forever: bool,
    /// Prefault threads per region (default: one per CPU of the node).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    numapin::addr::parse_size(s).map_err(|e| e.to_string())
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let cmd = match cli.cmd {
        Top::User(c) => c,
        Top::Generate { dir } => return dist::generate(&dir),
    };
    match cmd {
        Command::Topology { json } => {
            let t =
                locality::TopologyReport::new(Topology::read()?, numapin::numa::pci_device_nodes());
            if json {
                output::print_json(&t)
            } else {
                output::print_topology(&t);
                Ok(())
            }
        }
        Command::Bind(a) => {
            let r =
                numapin::bind::bind_with(&numapin::bind::Roots::system(), &a.device, a.options())?;
            output::print_bind(&r, "bind");
            Ok(())
        }
        Command::Unbind(a) => {
            let roots = numapin::bind::Roots::system();
            if let Some(secs) = a.wait {
                wait_for_holders(&roots, &a.common.device, Duration::from_secs(secs))?;
            }
            let r = numapin::bind::unbind_with(&roots, &a.common.device, a.common.options())?;
            output::print_bind(&r, "unbind");
            Ok(())
        }
        Command::Pin(mut args) if args.service.is_some() => {
            let socket = args.service.take().unwrap_or_default();
            service::pin(args, &socket)
        }
        Command::Status { socket, json } => service::status(&socket, json),
        Command::Info {
            device,
            backend,
            node,
            regions,
            json,
        } => info(&device, backend, &node, &regions, json),
        Command::Check {
            device,
            regions,
            json,
        } => {
            let r = check::run(&check::Host::system(), device.as_deref(), &regions)?;
            if json {
                output::print_json(&r)?;
            } else {
                check::print(&r);
            }
            match check::failure(&r) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        Command::Pin(args) => pin(args),
        Command::Demo(args) => demo::run(&args),
    }
}

/// Polls the device's holders until none is left or `limit` passes; tells
/// once, on stderr, what it waits for. Nothing is written meanwhile, so an
/// interrupt leaves the device as it was.
fn wait_for_holders(roots: &numapin::bind::Roots, device: &str, limit: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        // An unseen holder is left for the unbind to refuse, with the count.
        let (held, _unseen) = numapin::bind::unbind_holders(roots, device)?;
        if held.is_empty() {
            if told {
                eprintln!(
                    "numapin: {device} is free after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if !told {
            let what: Vec<String> = held.iter().map(|u| u.to_string()).collect();
            eprintln!(
                "numapin: waiting up to {} s for {} to close {device}",
                limit.as_secs(),
                what.join(", ")
            );
            told = true;
        }
        if start.elapsed() >= limit {
            // Let the unbind refuse with the holders it sees now.
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Opens `device` through `backend`, or as `Pinner::open` chooses.
fn open(device: &str, backend: Option<numapin::Backend>) -> Result<Pinner> {
    match backend {
        Some(b) => Pinner::open_with(device, b),
        None => Pinner::open(device),
    }
}

fn parse_backend(s: &str) -> std::result::Result<numapin::Backend, String> {
    numapin::Backend::parse(s).map_err(|e| e.to_string())
}

fn info(
    device: &str,
    backend: Option<numapin::Backend>,
    nodes: &[u32],
    regions: &[RegionArg],
    json: bool,
) -> Result<()> {
    let topo = Topology::read()?;
    regions::validate_shape(&topo, regions)?;
    let mut asked: Vec<NodeId> = Vec::new();
    for n in nodes
        .iter()
        .map(|&n| NodeId(n))
        .chain(regions.iter().map(|r| r.node()))
    {
        topo.require(n)?;
        if !asked.contains(&n) {
            asked.push(n);
        }
    }
    if asked.is_empty() {
        asked = topo.ids();
    }
    let desc = numapin::vfio::describe(device)?;
    let place = locality::device(&desc.sysfs, &topo, &asked);
    // Opening needs the device on vfio-pci; report sysfs facts either way.
    // A no-IOMMU device has no IOMMU to describe, and opening it would need
    // CAP_SYS_RAWIO and reset it: sysfs is the whole answer there.
    let opened = match desc.kind {
        numapin::ContainerKind::NoIommu => desc.check_openable().map(|()| None),
        _ => desc
            .check_openable()
            .and_then(|()| open(device, backend))
            .map(Some),
    };
    let pinner = opened.as_ref().ok().and_then(Option::as_ref);
    let report = output::InfoReport::new(&desc, place, pinner.and_then(|p| p.iommu_info()));
    if json {
        output::print_json(&report)?;
    } else {
        output::print_info(&report);
    }
    opened.map(drop)
}

fn pin(args: PinArgs) -> Result<()> {
    // Every region is checked against the machine before the device is
    // touched: a typo fails here, not after opening and resetting it.
    regions::validate(&Topology::read()?, &args.regions)?;
    // Block SIGINT/SIGTERM before any thread starts so that they are
    // delivered to sigtimedwait, and a signal during pinning still releases.
    let signals = hold::SignalSet::block_termination()?.watch();
    let pinner = open(args.device.as_deref().unwrap_or_default(), args.backend)?;
    let mut regions = Vec::with_capacity(args.regions.len());
    for spec in &args.regions {
        if signals.cancel.is_cancelled() {
            // The regions pinned so far are released as they drop.
            return Err(numapin::Error::Cancelled {
                step: "pin",
                done: 0,
                len: spec.req.size,
            });
        }
        let bar = output::prefault_progress(spec.req.size);
        let progress = |done: u64| {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        };
        let req = numapin::PinRequest {
            min_extent: args.min_extent,
            threads: args.threads,
            progress: Some(&progress),
            cancel: Some(signals.cancel.clone()),
            ..spec.req.clone()
        };
        let region = pinner.pin(&req)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        regions.push(region);
    }
    let mut report = PinReport::new(&pinner);
    for r in &regions {
        report.regions.push(RegionReport::new(
            r,
            if args.phys || r.iova().is_none() {
                Some(r.phys_extents()?)
            } else {
                None
            },
        ));
    }
    if args.json {
        output::print_json(&report)?;
    } else {
        output::print_pin(&report);
    }
    std::io::stdout().flush().ok();
    signals.hold(args.hold);
    for r in regions {
        r.release()?;
    }
    Ok(())
}
