//! `numapin demo`: the original failure re-enacted, with evidence.
//!
//! Three regions of the same size start side by side on node 0: memory as
//! a 2013 hypervisor kept guest RAM (`mmap`, `MADV_DONTFORK`, `mlock`:
//! locked, not pinned), plain default-policy memory (the control), and a
//! region numapin pinned through VFIO. Three phases then try to move them,
//! one mechanism each: automatic NUMA balancing (a thread on the other node
//! touches every page), the explicit storm (`move_pages`, `migrate_pages`),
//! and compaction. PFN snapshots before, during and after each phase say
//! which pages changed frame in which phase. Finally QEMU's edu device reads
//! numapin's region through its DMA addresses, and (no-IOMMU only) reads the
//! other two through the physical addresses recorded before phase 1.

mod balancing;
mod memory;
mod report;

use std::time::{Duration, Instant};

use clap::Args;
use numapin::edu::{Edu, MAX_TRANSFER};
use numapin::numa::Topology;
use numapin::{ContainerKind, Error, NodeId, PinRequest, Pinner, Result};

use balancing::{Balancing, Counters, Worker};
use memory::{Mapping, NEW, OLD, PAGE, STAMP, Tracked};
use report::{DeviceCheck, Phase, Report, Seen, StaleReads, StaleSample, Three};

/// `numapin demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The edu device (default: the first 1234:11e8 device).
    #[arg(long, short)]
    device: Option<String>,
    /// Size of each of the three regions.
    #[arg(long, default_value = "8M", value_parser = super::parse_size_arg)]
    size: u64,
    /// Longest time NUMA balancing gets in phase 1, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    balance_secs: u64,
    /// Pages of numapin's region the device reads (spread over the region,
    /// first and last included; edu needs about 0.1 s per page).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=1024))]
    samples: u64,
    /// Pages of each of the other two regions the device reads through the
    /// physical addresses recorded before phase 1 (no-IOMMU only).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=31))]
    stale_samples: u64,
    /// Width of edu's DMA mask: 28 is QEMU's default; `cargo xtask` starts
    /// edu with `dma_mask=0xffffffffff` (40). No-IOMMU DMA goes to physical
    /// addresses, which are usually above 256 MiB.
    #[arg(long, value_name = "BITS", default_value_t = 28, value_parser = clap::value_parser!(u32).range(12..=64))]
    dma_mask_bits: u32,
    /// Print one JSON document with every figure instead of the story.
    #[arg(long)]
    json: bool,
}

/// Prints unless the output is JSON.
macro_rules! say {
    ($args:expr, $($fmt:tt)*) => {
        if !$args.json {
            println!($($fmt)*);
        }
    };
}

const NAMES: [&str; 3] = ["locked", "plain", "numapin"];

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn observe_all(t: &mut [Tracked; 3]) -> Result<()> {
    t.iter_mut().try_for_each(Tracked::observe)
}

fn begin_all(t: &mut [Tracked; 3]) {
    t.iter_mut().for_each(Tracked::begin_phase)
}

fn moved(t: &[Tracked; 3]) -> Three<u64> {
    Three::from_fn(|i| t[i].moved_in_phase())
}

fn on_node(t: &[Tracked; 3], node: NodeId) -> Result<Three<u64>> {
    Ok(Three {
        locked: t[0].on_node(node.0)?,
        plain: t[1].on_node(node.0)?,
        numapin: t[2].on_node(node.0)?,
    })
}

/// Runs the demo; fails (after reporting) when numapin's region moved, the
/// device read wrong bytes, or nothing moved at all (then nothing was shown).
pub fn run(args: &DemoArgs) -> Result<()> {
    let device = match &args.device {
        Some(d) => d.clone(),
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
            "the demo needs two online NUMA nodes; run it in the VM: `cargo xtask demo`".into(),
        ));
    }
    let (home, away) = (&topo.nodes[0], &topo.nodes[1]);
    let (home_id, away_id) = (NodeId(home.id), NodeId(away.id));
    if args.size == 0 || args.size % PAGE as u64 != 0 {
        return Err(Error::Invalid(format!(
            "--size {} is not a non-zero multiple of 4 KiB",
            args.size
        )));
    }
    let len = args.size as usize;
    let pages = args.size / PAGE as u64;
    let samples = memory::spread(pages, args.samples);
    let mailbox = (0..pages).find(|p| !samples.contains(p)).ok_or_else(|| {
        Error::Invalid(format!(
            "--samples {} leaves no page of the {pages}-page region for the device to write back into; sample fewer pages or make --size larger",
            args.samples
        ))
    })?;

    // The main thread stays on node 0: the plain and locked regions are
    // faulted in there (the default policy allocates on the local node),
    // and it never touches them from afar.
    numapin::sys::set_thread_affinity(&home.cpus)
        .map_err(|e| Error::sys("sched_setaffinity (node 0's CPUs)", "", e))?;
    let bal = Balancing::enable()?;
    let pinner = Pinner::open(&device)?;
    let kind = pinner.kind();
    if kind == ContainerKind::MdevOnly {
        return Err(Error::Invalid(format!(
            "{device} is an mdev: it has no DMA engine to check; give the demo the edu device (1234:11e8)"
        )));
    }
    let dma_limit = if args.dma_mask_bits >= 64 {
        u64::MAX
    } else {
        1u64 << args.dma_mask_bits
    };
    let edu = Edu::open(pinner.device_fd().expect("the demo opens its own device"))?
        .with_dma_limit(dma_limit);

    let locked_mem = Mapping::locked(len)?;
    let plain_mem = Mapping::plain(len)?;
    let pinned = pinner.pin(&PinRequest::new(home_id, args.size))?;
    let addrs = [
        locked_mem.addr(),
        plain_mem.addr(),
        pinned.vaddr().as_usize(),
    ];
    for (i, &a) in addrs.iter().enumerate() {
        memory::write_stamps(a, len, OLD, i as u8);
    }
    let mut t = [
        Tracked::new(addrs[0], len)?,
        Tracked::new(addrs[1], len)?,
        Tracked::new(addrs[2], len)?,
    ];
    let start_home = on_node(&t, home_id)?;
    if start_home.locked != pages || start_home.plain != pages {
        return Err(Error::Invalid(format!(
            "node {home_id} did not take the regions: locked {} and plain {} of {pages} pages landed there; free memory on node {home_id} and retry",
            start_home.locked, start_home.plain
        )));
    }
    check_dma_reach(&pinned, &samples, mailbox, dma_limit, args.dma_mask_bits)?;

    let dma_name = match pinned.iova() {
        Some(i) => format!(
            "IOVA {:#x} (an I/O virtual address, which the IOMMU translates)",
            i.raw()
        ),
        None => format!(
            "physical address {:#x} (no IOMMU: the device uses physical addresses)",
            pinned.dma_addr(0).map_or(0, |d| d.raw())
        ),
    };
    let mut report = Report::new(
        &device,
        kind,
        args.size,
        pages,
        home_id.0,
        away_id.0,
        away.cpus.clone(),
        dma_name,
        &bal,
    );
    report.numapin_iova = pinned.iova().map(|i| i.raw());
    say!(args, "{}", report.setup_text());

    // Phase 1: NUMA balancing.
    say!(
        args,
        "{}",
        report::phase1_intro(away_id.0, &away.cpus, args.balance_secs)
    );
    begin_all(&mut t);
    let c0 = Counters::read();
    let worker = Worker::start(addrs.iter().map(|&a| (a, len)).collect(), away.cpus.clone())?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(args.balance_secs);
    let mut plain_done: Option<Duration> = None;
    let why = loop {
        std::thread::sleep(Duration::from_millis(250));
        observe_all(&mut t)?;
        let el = t0.elapsed();
        let most = |r: &Tracked| r.moved_in_phase() * 10 >= r.pages() * 9;
        if plain_done.is_none() && most(&t[1]) {
            plain_done = Some(el);
        }
        match plain_done {
            Some(d) if most(&t[0]) => {
                break format!(
                    "plain memory had moved after {:.1} s and locked memory too",
                    d.as_secs_f64()
                );
            }
            Some(d) if el >= (d * 2).max(d + Duration::from_secs(2)) => {
                break format!(
                    "plain memory had moved after {:.1} s, and the demo waited as long again for the locked memory",
                    d.as_secs_f64()
                );
            }
            _ if el >= limit => {
                break format!("the time limit of {} s was reached", args.balance_secs);
            }
            _ => {}
        }
    };
    let passes = worker.stop()?;
    let secs = t0.elapsed().as_secs_f64();
    report.phases.push(Phase {
        name: "numa-balancing",
        secs: round2(secs),
        moved: moved(&t),
        on_away_node: on_node(&t, away_id)?,
        counters: Counters::read().since(c0),
        note: format!("{why}; the worker made {passes} passes over the three regions"),
    });
    say!(args, "  done after {secs:.1} s: {why}.");

    // Phase 2: the explicit storm.
    say!(args, "{}", report::phase2_intro(home_id.0, away_id.0));
    begin_all(&mut t);
    let c0 = Counters::read();
    let t0 = Instant::now();
    for r in &t {
        numapin::numa::move_range(r.addr, r.len, PAGE as u64, away_id)
            .map_err(|e| Error::sys("move_pages", "", e))?;
    }
    observe_all(&mut t)?;
    let after_move = on_node(&t, away_id)?;
    let refused = numapin::sys::migrate_pages(0, away_id, home_id)
        .map_err(|e| Error::sys("migrate_pages", "", e))?;
    observe_all(&mut t)?;
    report.phases.push(Phase {
        name: "move_pages+migrate_pages",
        secs: round2(t0.elapsed().as_secs_f64()),
        moved: moved(&t),
        on_away_node: after_move,
        counters: Counters::read().since(c0),
        note: format!(
            "after move_pages, pages on node {away_id}: locked {}, plain {}, numapin {}; migrate_pages then reported {} pages of the process it could not move back",
            report::n(after_move.locked),
            report::n(after_move.plain),
            report::n(after_move.numapin),
            report::n(refused as u64)
        ),
    });

    // Phase 3: compaction of node 0, where the storm left every region.
    let knob = [
        format!("/sys/devices/system/node/node{home_id}/compact"),
        "/proc/sys/vm/compact_memory".to_string(),
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    say!(args, "{}", report::phase3_intro(knob.as_deref()));
    begin_all(&mut t);
    let c0 = Counters::read();
    let t0 = Instant::now();
    let note = match &knob {
        Some(path) => {
            std::fs::write(path, "1")
                .map_err(|e| Error::sys(format!("start compaction (write 1 to {path})"), "", e))?;
            format!("wrote 1 to {path}")
        }
        None => "skipped: this kernel has no compaction (CONFIG_COMPACTION)".to_string(),
    };
    observe_all(&mut t)?;
    report.phases.push(Phase {
        name: "compaction",
        secs: round2(t0.elapsed().as_secs_f64()),
        moved: moved(&t),
        on_away_node: on_node(&t, away_id)?,
        counters: Counters::read().since(c0),
        note,
    });
    drop(bal);

    // The CPU writes new data; then the device reads.
    for (i, &a) in addrs.iter().enumerate() {
        memory::write_stamps(a, len, NEW, i as u8);
    }
    say!(
        args,
        "{}",
        report::device_intro(samples.len(), pinned.iova().is_some())
    );
    report.device_check = check_numapin(&edu, &pinned, &samples, mailbox)?;
    report.stale = stale_reads(
        &edu,
        &pinned,
        &t,
        (samples[0], mailbox),
        args.stale_samples,
        dma_limit,
    )?;

    // Every frame of numapin's region, on the CPU side.
    observe_all(&mut t)?;
    report.numapin_frames_changed = t[2].off_start();
    report.numapin_frames_changed_since_pin = pinned.pinned_frames().map(|at_pin| {
        at_pin
            .iter()
            .enumerate()
            .filter(|&(i, f)| f != t[2].now(i as u64))
            .count() as u64
    });
    report.numapin_off_node = pages - t[2].on_node(home_id.0)?;
    report.finish();
    pinned.release()?;
    drop((locked_mem, plain_mem));

    if args.json {
        super::output::print_json(&report)?;
    } else {
        println!("{}", report.results_text());
    }
    match report.failure() {
        None => Ok(()),
        Some(why) => Err(Error::Invalid(format!("demo failed: {why}"))),
    }
}

/// Refuses up front when a DMA address the device will use is beyond its
/// DMA mask (edu would clamp it and reach some other memory).
fn check_dma_reach(
    pinned: &numapin::PinnedRegion,
    samples: &[u64],
    mailbox: u64,
    limit: u64,
    bits: u32,
) -> Result<()> {
    for &p in samples.iter().chain([&mailbox]) {
        let a = pinned
            .dma_addr(p * PAGE as u64)
            .map(|d| d.raw())
            .ok_or_else(|| {
                Error::Invalid(
                    "numapin's region has no DMA address (PFNs hidden): run the demo as root"
                        .into(),
                )
            })?;
        if a + MAX_TRANSFER > limit {
            return Err(Error::Invalid(format!(
                "numapin's region is at DMA address {a:#x}, beyond edu's {bits}-bit DMA mask; \
                 start QEMU with `-device edu,dma_mask=0xffffffffff` and pass --dma-mask-bits 40 \
                 (`cargo xtask` VMs have it)"
            )));
        }
    }
    Ok(())
}

/// The device reads the stamp of every sampled page of numapin's region
/// through its DMA address and writes them all into the mailbox page; the
/// CPU compares each with what it wrote there.
fn check_numapin(
    edu: &Edu,
    pinned: &numapin::PinnedRegion,
    samples: &[u64],
    mailbox: u64,
) -> Result<DeviceCheck> {
    let per_batch = (MAX_TRANSFER as usize) / STAMP;
    let mut wrong = vec![];
    for batch in samples.chunks(per_batch) {
        let sources: Vec<u64> = batch
            .iter()
            .map(|&p| pinned.dma_addr(p * PAGE as u64).expect("checked").raw())
            .collect();
        let want: Vec<Vec<u8>> = batch
            .iter()
            .map(|&p| memory::read_stamp(pinned.vaddr().as_usize(), p))
            .collect();
        let got = edu.gather(&sources, STAMP as u64, pinned, mailbox * PAGE as u64)?;
        for ((&p, w), g) in batch.iter().zip(&want).zip(&got) {
            if w != g {
                wrong.push(p);
            }
        }
    }
    Ok(DeviceCheck {
        through: if pinned.iova().is_some() {
            "iova"
        } else {
            "physical"
        },
        sampled: samples.to_vec(),
        mailbox_page: mailbox,
        bytes_per_page: STAMP as u64,
        correct: (samples.len() - wrong.len()) as u64,
        wrong,
    })
}

/// What a device given the locked and plain regions' physical addresses
/// before phase 1 would see now. In no-IOMMU mode the device really reads
/// through them (a read is harmless, even of a frame the kernel reused;
/// nothing is ever written there), with one of numapin's pages read through
/// its physical address in the same batch as the control. Behind an IOMMU
/// the device can reach only mapped IOVAs: the addresses are shown instead.
fn stale_reads(
    edu: &Edu,
    pinned: &numapin::PinnedRegion,
    t: &[Tracked; 3],
    (control_page, mailbox): (u64, u64),
    per_region: u64,
    limit: u64,
) -> Result<StaleReads> {
    let mut list = vec![];
    for (ri, r) in t.iter().enumerate().take(2) {
        for p in memory::spread(r.pages(), per_region) {
            list.push((ri, p));
        }
    }
    let mut out = StaleReads {
        device_read: pinned.iova().is_none(),
        control_ok: None,
        samples: list
            .iter()
            .map(|&(ri, p)| {
                let before = t[ri].at_start[p as usize];
                StaleSample {
                    region: NAMES[ri],
                    page: p,
                    moved: before != t[ri].now(p),
                    pa_before: before * PAGE as u64,
                    pa_now: t[ri].now(p) * PAGE as u64,
                    device_read: None,
                }
            })
            .collect(),
    };
    if !out.device_read {
        return Ok(out);
    }
    if let Some(s) = out
        .samples
        .iter()
        .find(|s| s.pa_before + STAMP as u64 > limit)
    {
        return Err(Error::Invalid(format!(
            "{} page {} was at physical address {:#x}, beyond edu's DMA mask; pass a wider --dma-mask-bits \
             (`cargo xtask` VMs start edu with 40)",
            s.region, s.page, s.pa_before
        )));
    }
    let mut sources = vec![
        pinned
            .dma_addr(control_page * PAGE as u64)
            .expect("checked")
            .raw(),
    ];
    sources.extend(out.samples.iter().map(|s| s.pa_before));
    let got = edu.gather(&sources, STAMP as u64, pinned, mailbox * PAGE as u64)?;
    out.control_ok = Some(got[0] == memory::stamp(NEW, 2, control_page));
    for ((s, g), &(ri, p)) in out.samples.iter_mut().zip(&got[1..]).zip(&list) {
        s.device_read = Some(if *g == memory::stamp(NEW, ri as u8, p) {
            Seen::New
        } else if *g == memory::stamp(OLD, ri as u8, p) {
            Seen::Old
        } else {
            Seen::Other
        });
    }
    Ok(out)
}
