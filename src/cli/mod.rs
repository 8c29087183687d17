//! Command-line parsing and the commands.

mod demo;
mod hold;
pub use hold::{cancelling_signal, signal_name};
mod output;
mod service;
mod spec;

use std::io::Write;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use numapin::numa::Topology;
use numapin::{Pinner, Result};
use spec::RegionSpec;

use output::{PinReport, RegionReport};

/// Node-local memory pinned long-term through Linux VFIO, with fixed IOVAs
/// and physical addresses.
#[derive(Debug, Parser)]
#[command(name = "numapin", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Online NUMA nodes: CPUs, memory, hugepage pools.
    Topology {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bind a PCI device to vfio-pci (driver_override), remembering its driver.
    Bind {
        /// PCI address, e.g. 0000:00:03.0.
        device: String,
    },
    /// Give a PCI device back to the driver it had before `numapin bind`.
    Unbind {
        /// PCI address, e.g. 0000:00:03.0.
        device: String,
    },
    /// The device's IOMMU group, container kind, IOVA ranges, page sizes and
    /// DMA mappings available.
    Info {
        /// PCI address, mdev UUID, or sysfs path.
        #[arg(long, short)]
        device: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Allocate node-local memory, pin it through the device's container,
    /// print where it is, and hold the pins until a signal or timeout.
    Pin(PinArgs),
    /// Side by side: an unpinned region and a pinned one through a
    /// migration storm, with a device DMA check (needs QEMU's edu device).
    Demo {
        /// The edu device (default: the first 1234:11e8 device).
        #[arg(long, short)]
        device: Option<String>,
        /// Size of each region.
        #[arg(long, default_value = "8M", value_parser = parse_size_arg)]
        size: u64,
        /// Rounds of the migration storm.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
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
struct PinArgs {
    /// PCI address (bound to vfio-pci, behind an IOMMU or in no-IOMMU
    /// mode), mdev UUID, or sysfs path.
    /// With --service: one of the daemon's devices (default: its first).
    #[arg(long, short, required_unless_present = "service")]
    device: Option<String>,
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
    regions: Vec<RegionSpec>,
    /// Also print each region's physical extents (needs CAP_SYS_ADMIN;
    /// always printed for a no-IOMMU device, whose DMA addresses they are).
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
    match cli.cmd {
        Command::Topology { json } => {
            let t = Topology::read()?;
            if json {
                output::print_json(&t)
            } else {
                output::print_topology(&t);
                Ok(())
            }
        }
        Command::Bind { device } => {
            print_bind(&numapin::bind::bind(&device)?);
            Ok(())
        }
        Command::Unbind { device } => {
            print_bind(&numapin::bind::unbind(&device)?);
            Ok(())
        }
        Command::Info { device, json } => info(&device, json),
        Command::Pin(mut args) if args.service.is_some() => {
            let socket = args.service.take().unwrap_or_default();
            service::pin(args, &socket)
        }
        Command::Pin(args) => pin(args),
        Command::Status { socket, json } => service::status(&socket, json),
        Command::Demo {
            device,
            size,
            rounds,
        } => demo::run(device.as_deref(), size, rounds),
    }
}

/// `BDF: old driver -> new driver`.
fn print_bind(o: &numapin::bind::BindOutcome) {
    let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "no driver".into());
    println!(
        "{}: {} -> {}",
        o.device,
        name(&o.previous),
        name(&o.current)
    );
}

fn info(device: &str, json: bool) -> Result<()> {
    let desc = numapin::vfio::describe(device)?;
    // Opening needs the device on vfio-pci; report sysfs facts either way.
    // A no-IOMMU device has no IOMMU to describe, and opening it would need
    // CAP_SYS_RAWIO and reset it: sysfs is the whole answer there.
    let opened = match desc.kind {
        numapin::ContainerKind::NoIommu => desc.check_openable().map(|()| None),
        _ => desc
            .check_openable()
            .and_then(|()| Pinner::open(device))
            .map(Some),
    };
    let pinner = opened.as_ref().ok().and_then(Option::as_ref);
    let report = output::InfoReport::new(&desc, pinner.and_then(|p| p.iommu_info()));
    if json {
        output::print_json(&report)?;
    } else {
        output::print_info(&report);
    }
    opened.map(drop)
}

fn pin(args: PinArgs) -> Result<()> {
    // Block SIGINT/SIGTERM before any thread starts so that they are
    // delivered to sigtimedwait, and a signal during pinning still releases.
    let signals = hold::SignalSet::block_termination()?.watch();
    let pinner = Pinner::open(args.device.as_deref().unwrap_or_default())?;
    let mut regions = Vec::with_capacity(args.regions.len());
    for spec in &args.regions {
        if signals.cancel.is_cancelled() {
            // The regions pinned so far are released as they drop.
            return Err(numapin::Error::Cancelled {
                step: "pin",
                done: 0,
                len: spec.0.size,
            });
        }
        let bar = output::prefault_progress(spec.0.size);
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
            ..spec.0.clone()
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
    let timeout = match (args.hold, args.hold_forever) {
        (Some(secs), _) => Some(Duration::from_secs(secs)),
        _ => None,
    };
    if timeout != Some(Duration::ZERO) {
        signals.wait(timeout);
    }
    for r in regions {
        r.release()?;
    }
    Ok(())
}
