//! Scenarios for the two container kinds where VFIO does not pin: an
//! mdev-only type1 container (mtty) and a no-IOMMU container (edu under
//! `vfio.enable_unsafe_noiommu_mode=1`). numapin pins there with io_uring
//! registered buffers; the common scenarios of `type1.rs` run on top.

use std::sync::Arc;

use numapin::numa::{self, NodeMemory, Topology};
use numapin::{ContainerKind, Error, PageSize, PinRequest, Pinner};
use vfio_ioctls::{VfioContainer, VfioDevice};

use crate::Scenario;
use crate::ensure;
use crate::type1::{open, pin};
use crate::util::*;

pub fn mdev() -> Vec<(&'static str, Scenario)> {
    let mut v: Vec<(&'static str, Scenario)> = vec![
        ("a.mdev.map-dma-alone-does-not-pin", map_dma_alone),
        ("a.mdev.iova-recorded", iova_recorded),
        ("a.cli.mdev-uuid-and-path", cli_mdev),
        ("a.example.bind_mdev", example_mdev),
    ];
    v.extend(crate::type1::common());
    v.extend(shared());
    v.push(("g.cli.memlock", crate::bad_input::g_memlock));
    v
}

pub fn noiommu() -> Vec<(&'static str, Scenario)> {
    let mut v: Vec<(&'static str, Scenario)> = vec![
        ("a.cli.noiommu-info-pin", cli_noiommu),
        ("a.example.bind_noiommu", example_noiommu),
        ("b.dma.edu-physical", crate::type1::dma),
        ("b.dma.hugepage-extents", dma_huge_extents),
    ];
    v.extend(crate::type1::common());
    v.extend(shared());
    v.push(("g.lib.fixed-iova-refused", fixed_iova_refused));
    v
}

fn shared() -> Vec<(&'static str, Scenario)> {
    vec![
        ("a.lib.min-extent", min_extent),
        ("g.lib.io_uring-disabled", uring_disabled),
    ]
}

const LEN: u64 = 8 << 20;

/// The control the mdev example and issue are about: MAP_DMA on an
/// mdev-only container succeeds but pins nothing (VmLck +0, the pages
/// move); numapin's pin of the same kind of memory holds.
fn map_dma_alone(ctx: &Ctx) -> Result<String, String> {
    let topo = e(Topology::read(), "topology")?;
    let mem = e(
        NodeMemory::allocate(&topo, ctx.home, LEN, PageSize::Base, 1, None, None),
        "allocate",
    )?;
    let sysfs = e(numapin::vfio::resolve_device(&ctx.device), "resolve")?;
    let lck0 = vmlck();
    {
        let container = Arc::new(e(VfioContainer::new(None), "open container")?);
        let _dev = e(
            VfioDevice::new(&sysfs, container.clone(), false),
            "open mdev",
        )?;
        // SAFETY: `mem` stays mapped until after the unmap below.
        e(
            unsafe { container.vfio_dma_map(0x10_0000, LEN as usize, mem.as_ptr()) },
            "raw MAP_DMA",
        )?;
        let grew = vmlck() - lck0;
        let m = e(
            numa::move_range(mem.addr(), LEN as usize, 4096, ctx.away),
            "move",
        )?;
        e(container.vfio_dma_unmap(0x10_0000, LEN as usize), "unmap")?;
        ensure!(
            grew == 0,
            "MAP_DMA on an mdev-only container grew VmLck by {grew:#x}: it pins after all?"
        );
        ensure!(
            m.moved == m.asked && m.asked > 0,
            "only {} of {} 'mapped' pages moved: expected all (nothing pins them)",
            m.moved,
            m.asked
        );
    }
    let p = open(ctx)?;
    let r = pin(&p, ctx.home, LEN, PageSize::Base)?;
    let m = e(
        numa::move_range(r.vaddr().as_usize(), LEN as usize, 4096, ctx.away),
        "move numapin region",
    )?;
    ensure!(
        m.moved == 0 && m.asked > 0,
        "{} of {} numapin-pinned pages moved",
        m.moved,
        m.asked
    );
    Ok(format!(
        "raw MAP_DMA: VmLck +0, {n}/{n} pages moved; numapin (io_uring + MAP_DMA): 0/{n} moved",
        n = m.asked
    ))
}

/// MAP_DMA still records the IOVA for the vendor driver: one DMA entry per
/// region, returned at release; the IOVA is reported.
fn iova_recorded(ctx: &Ctx) -> Result<String, String> {
    let p = open(ctx)?;
    let avail = |p: &Pinner| {
        p.refresh_info()
            .ok()
            .flatten()
            .and_then(|i| i.dma_avail)
            .ok_or("no DMA_AVAIL".to_string())
    };
    let a0 = avail(&p)?;
    let r = pin(&p, ctx.home, LEN, PageSize::Base)?;
    let a1 = avail(&p)?;
    let iova = r.iova().ok_or("mdev region without an IOVA")?;
    ensure!(
        r.pin_kind() == "io_uring",
        "pin kind {}, expected io_uring",
        r.pin_kind()
    );
    ensure!(a0 - a1 == 1, "DMA_AVAIL {a0} -> {a1}: expected one entry");
    e(r.release(), "release")?;
    let a2 = avail(&p)?;
    ensure!(a2 == a0, "DMA_AVAIL {a2} after release, {a0} before");
    Ok(format!(
        "IOVA {iova} recorded: DMA_AVAIL {a0} -> {a1} -> {a2}"
    ))
}

/// The CLI takes the mdev's UUID and its sysfs path.
fn cli_mdev(ctx: &Ctx) -> Result<String, String> {
    let (code, out, err) = run_cli(&["info", "--device", &ctx.device, "--json"])?;
    ensure!(code == 0, "info failed: {err}");
    let v: serde_json::Value = e(serde_json::from_str(&out), "info JSON")?;
    ensure!(
        v["backend"] == "mdev-only" && v["pin"] == "io_uring" && v["dma_addresses"] == "iova",
        "info: {v}"
    );
    let path = format!("/sys/bus/mdev/devices/{}", ctx.device);
    let mut child = std::process::Command::new(sibling("numapin"));
    child.args([
        "pin", "--device", &path, "--json", "--hold", "0", "--region", "1:8M:2M",
    ]);
    let o = e(child.output(), "numapin pin")?;
    ensure!(
        o.status.success(),
        "pin by sysfs path failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let doc: serde_json::Value = e(serde_json::from_slice(&o.stdout), "pin JSON")?;
    let r = &doc["regions"][0];
    ensure!(
        doc["backend"] == "mdev-only" && r["pin"] == "io_uring" && r["iova"].is_string(),
        "pin: {doc}"
    );
    ensure!(
        r["min_extent"].as_u64().is_some_and(|m| m >= 2 << 20),
        "2M region's min_extent {}",
        r["min_extent"]
    );
    Ok(format!(
        "info by UUID: mdev-only/io_uring; pin by {path}: IOVA {}",
        r["iova"]
    ))
}

fn example_mdev(ctx: &Ctx) -> Result<String, String> {
    let pin_line = format!(
        "numapin: VmPin +{} kB, VmLck +0 kB, 0 pages moved of 2048",
        ctx.charged(8 << 20) >> 10
    );
    let text = run_example(
        "bind_mdev",
        &[],
        &[
            "MAP_DMA alone: VmLck +0 kB, 2048 pages moved of 2048",
            &pin_line,
            "released: 8 MiB unpinned (VmPin +0 kB after release)",
            "removed mdev",
        ],
    )?;
    Ok(text
        .lines()
        .filter(|l| l.contains("moved"))
        .collect::<Vec<_>>()
        .join("; "))
}

fn cli_noiommu(ctx: &Ctx) -> Result<String, String> {
    let (code, out, err) = run_cli(&["info", "--device", &ctx.device, "--json"])?;
    ensure!(code == 0, "info failed: {err}");
    let v: serde_json::Value = e(serde_json::from_str(&out), "info JSON")?;
    ensure!(
        v["backend"] == "no-iommu"
            && v["pin"] == "io_uring"
            && v["dma_addresses"] == "physical"
            && v["iommu"].is_null()
            && v["group_node"]
                .as_str()
                .is_some_and(|g| g.starts_with("/dev/vfio/noiommu-")),
        "info: {v}"
    );
    let child = PinChild::spawn(ctx, &["--region", "0:4M:2M", "--min-extent", "2M"])?;
    let r = child.doc["regions"][0].clone();
    ensure!(
        child.doc["backend"] == "no-iommu" && r["iova"].is_null() && r["pin"] == "io_uring",
        "pin: {}",
        child.doc
    );
    let ext = r["phys_extents"].as_array().ok_or("no phys_extents")?;
    ensure!(
        !ext.is_empty() && ext.iter().all(|x| x["len"].as_u64() >= Some(2 << 20)),
        "extents {ext:?}"
    );
    let pinned = ctx.pinned_of(child.pid())?;
    ensure!(pinned == ctx.charged(4 << 20), "child VmPin {pinned:#x}");
    let st = child.stop(libc::SIGTERM)?;
    ensure!(st.success(), "exit {st}");
    Ok(format!(
        "info: no-iommu, physical addresses; pin: no IOVA, {} extents >= 2M, VmPin 4 MiB",
        ext.len()
    ))
}

fn example_noiommu(ctx: &Ctx) -> Result<String, String> {
    let released = format!(
        "released: 4 MiB unpinned (VmPin +{} kB while pinned, +0 kB after release)",
        ctx.charged(4 << 20) >> 10
    );
    let text = run_example(
        "bind_noiommu",
        &["--device", &ctx.device, "--size", "4M", "--page-size", "2M"],
        &[
            "(no-iommu)",
            "pin by io_uring, DMA to physical addresses",
            ": 0 pages moved of 2",
            &released,
        ],
    )?;
    Ok(text
        .lines()
        .filter(|l| l.contains("moved") || l.contains(" +"))
        .collect::<Vec<_>>()
        .join("; "))
}

/// edu DMA through a 2 MiB hugepage region: one transfer that straddles a
/// 4 KiB boundary inside a contiguous extent lands byte for byte.
fn dma_huge_extents(ctx: &Ctx) -> Result<String, String> {
    let p = open(ctx)?;
    let r = e(
        p.pin(&PinRequest {
            page_size: PageSize::Huge2M,
            min_extent: Some(2 << 20),
            ..PinRequest::new(ctx.away, 4 << 20)
        }),
        "pin",
    )?;
    let edu = edu(&p)?;
    let c = e(
        edu.round_trip(&r, 0x1_0c00, &r, 0x2_0f00, 2048, 5),
        "DMA across page boundaries",
    )?;
    ensure!(c.ok(), "{} of {} bytes differ", c.mismatches, c.bytes);
    Ok(format!(
        "2048 bytes at PA {:#x} -> edu -> PA {:#x}, each crossing a 4K boundary; min extent {:?}",
        r.dma_addr(0x1_0c00).map_or(0, |d| d.raw()),
        r.dma_addr(0x2_0f00).map_or(0, |d| d.raw()),
        r.min_extent()
    ))
}

/// A caller's minimum extent: met by hugepages; refused, with nothing left
/// pinned, for two base pages that are virtually adjacent but physically
/// apart (built with mremap, so the refusal does not depend on luck).
fn min_extent(ctx: &Ctx) -> Result<String, String> {
    let p = open(ctx)?;
    let ok = e(
        p.pin(&PinRequest {
            page_size: PageSize::Huge2M,
            min_extent: Some(2 << 20),
            ..PinRequest::new(ctx.home, 4 << 20)
        }),
        "pin 2M pages with min extent 2M",
    )?;
    let got = ok.min_extent().ok_or("no PFNs")?;
    ensure!(got >= 2 << 20, "min extent {got:#x} < 2M");
    drop(ok);
    let split = SplitPages::new()?;
    let before = ctx.pinned();
    let avail = |p: &Pinner| p.refresh_info().ok().flatten().and_then(|i| i.dma_avail);
    let avail0 = avail(&p);
    let m = numapin::PinRequest {
        min_extent: Some(8192),
        ..numapin::PinRequest::any_node(8192)
    };
    // SAFETY: `split` keeps both pages mapped until after the region is gone.
    let err = unsafe { p.pin_user(split.base, &m) }
        .err()
        .ok_or("two physically apart pages were accepted as one 8 KiB extent")?;
    ensure!(
        matches!(
            err,
            Error::ExtentTooSmall {
                smallest: 4096,
                count: 2,
                ..
            }
        ),
        "wrong error: {err}"
    );
    ensure!(err.to_string().contains("hugepages"), "no remedy in: {err}");
    ensure!(
        ctx.pinned() == before,
        "{} {:#x} after the refusal, {before:#x} before",
        ctx.counter(),
        ctx.pinned()
    );
    ensure!(
        avail(&p) == avail0,
        "DMA_AVAIL {:?} after the refusal, {avail0:?} before: a mapping was left",
        avail(&p)
    );
    Ok(format!(
        "2M pages: min extent {} MiB; PFNs {:#x},{:#x}: {err}",
        got >> 20,
        split.pfns[0],
        split.pfns[1]
    ))
}

/// Two base pages at consecutive virtual addresses whose frames are not
/// consecutive.
struct SplitPages {
    base: *mut u8,
    pfns: [u64; 2],
    _pages: Gathered,
    spare: Vec<*mut u8>,
}

impl SplitPages {
    fn new() -> Result<SplitPages, String> {
        let page = || -> Result<*mut u8, String> {
            // SAFETY: a fresh private anonymous page; written once to fault it in.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                ensure!(
                    p != libc::MAP_FAILED,
                    "mmap: {}",
                    std::io::Error::last_os_error()
                );
                std::ptr::write_volatile(p.cast::<u8>(), 1);
                Ok(p.cast())
            }
        };
        let pfn = |p: *mut u8| -> Result<u64, String> { Ok(pfns(p as usize, 4096)?[0]) };
        let a = page()?;
        let mut spare = Vec::new();
        let b = loop {
            let b = page()?;
            if pfn(b)? != pfn(a)? + 1 {
                break b;
            }
            spare.push(b);
        };
        // mremap keeps the frames: two virtually adjacent, physically apart pages.
        let pages = Gathered::new(&[a, b])?;
        let now = pfns(pages.base as usize, 8192)?;
        ensure!(
            now[1] != now[0] + 1,
            "mremap made the frames adjacent: {now:?}"
        );
        Ok(SplitPages {
            base: pages.base,
            pfns: [now[0], now[1]],
            _pages: pages,
            spare,
        })
    }
}

impl Drop for SplitPages {
    fn drop(&mut self) {
        // SAFETY: unmapping the pages `new` mapped and did not move.
        unsafe {
            for &p in &self.spare {
                libc::munmap(p.cast(), 4096);
            }
        }
    }
}

/// `kernel.io_uring_disabled = 2`: a clear error naming the sysctl, and
/// nothing pinned.
fn uring_disabled(ctx: &Ctx) -> Result<String, String> {
    let _knob = Knob::set("/proc/sys/kernel/io_uring_disabled", "2")?;
    let p = open(ctx)?;
    let before = ctx.pinned();
    let err = p
        .pin(&PinRequest::new(ctx.home, LEN))
        .err()
        .ok_or("pinned although io_uring is disabled")?;
    ensure!(
        matches!(err, Error::UringDisabled { value: 2 }),
        "wrong error: {err}"
    );
    ensure!(
        err.to_string()
            .contains("sysctl -w kernel.io_uring_disabled=0"),
        "no remedy in: {err}"
    );
    ensure!(ctx.pinned() == before, "{} changed", ctx.counter());
    Ok(err.to_string())
}

/// A no-IOMMU device has no IOVAs: asking for one is refused.
fn fixed_iova_refused(ctx: &Ctx) -> Result<String, String> {
    ensure!(ctx.kind == ContainerKind::NoIommu, "not a no-IOMMU device");
    let p = open(ctx)?;
    let err = p
        .pin(&PinRequest {
            iova: Some(numapin::Iova(0x10_0000)),
            ..PinRequest::new(ctx.home, LEN)
        })
        .err()
        .ok_or("a fixed IOVA was accepted")?;
    ensure!(
        matches!(err, Error::IovaWithoutIommu { .. }),
        "wrong error: {err}"
    );
    Ok(err.to_string())
}
