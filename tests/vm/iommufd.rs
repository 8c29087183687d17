//! Suite `iommufd`: the edu device opened through its VFIO cdev and bound
//! to `/dev/iommu`, regions mapped into an IOAS. Proves that the backend is
//! chosen automatically, that the IOVA ranges are the attached device's
//! (narrower than a fresh IOAS's), that every pin grows `VmPin` by the
//! region's size and release returns it, placement on both nodes for 4K,
//! THP and 2M hugetlb memory, the DMA-mask ceiling, and (reusing the type1
//! scenarios, which open with `Pinner::open` and so get iommufd here) an edu
//! DMA round trip and move_pages against a moving control.

use numapin::backend::Accounting;
use numapin::numa;
use numapin::{Backend, Error, Iova, NodeId, PageSize, PinRequest, Pinner, sys};

use crate::Scenario;
use crate::caps::{CAP_IPC_LOCK, CAP_SYS_RESOURCE, Effective};
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    let mut v: Vec<(&'static str, Scenario)> = vec![
        ("i.auto-backend", auto_backend),
        ("i.ranges-after-attach", ranges_after_attach),
        ("i.node0-4K", |c| placement(c, c.home, Kind::Small)),
        ("i.node1-4K", |c| placement(c, c.away, Kind::Small)),
        ("i.node0-THP", |c| placement(c, c.home, Kind::Thp)),
        ("i.node1-THP", |c| placement(c, c.away, Kind::Thp)),
        ("i.node0-2M", |c| placement(c, c.home, Kind::Huge)),
        ("i.node1-2M", |c| placement(c, c.away, Kind::Huge)),
        ("i.dma-mask-32", dma_mask_32),
        ("i.accounting-modes", accounting_modes),
        ("i.map-file", map_file),
        ("i.caller-ioas", caller_ioas),
        ("i.cli.backend-flag", cli_backend),
        ("i.by-file", by_file),
        ("i.example.vmm_guest_ram", example_vmm),
        ("i.service-by-file", |c| {
            crate::service::logged(|| service_by_file(c))
        }),
    ];
    // The type1 scenarios that hold for any mapper that pins, run here
    // through Pinner::open (Auto: iommufd, checked by i.auto-backend).
    v.extend(
        crate::type1::scenarios()
            .into_iter()
            .filter(|(n, _)| ["b.dma.edu", "c.move_pages"].contains(n)),
    );
    v
}

fn open(ctx: &Ctx) -> Result<Pinner, String> {
    let p = e(
        Pinner::open_with(&ctx.device, Backend::Iommufd),
        "open via iommufd",
    )?;
    ensure!(p.backend() == Backend::Iommufd, "backend {:?}", p.backend());
    Ok(p)
}

fn vmpin() -> u64 {
    sys::pinned_bytes().expect("VmPin")
}

/// Auto picks iommufd on this kernel; the pinner reports the cdev, the
/// accounting mode and the counter; /dev/vfio/vfio is VFIO's own.
fn auto_backend(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open (auto)")?;
    ensure!(
        p.backend() == Backend::Iommufd,
        "Auto chose {:?} with /dev/iommu present",
        p.backend()
    );
    let info = p.iommufd_info().ok_or("no iommufd info")?;
    let dev = p.device_info().ok_or("no device info")?;
    ensure!(
        dev.cdev.is_some() && dev.cdev == info.cdev,
        "cdev {:?} vs {:?}",
        dev.cdev,
        info.cdev
    );
    ensure!(
        p.accounting() == Accounting::VmPin,
        "accounting {:?}",
        p.accounting()
    );
    // The edu registers answer through the cdev's device fd.
    edu(&p)?;
    Ok(format!(
        "{:?}: dev {:?}, IOAS {}, hwpt {:?}, {:?} accounting (counter {}), /dev/vfio/vfio by {:?}",
        info.cdev,
        info.dev_id,
        info.ioas_id,
        info.hwpt_id,
        info.rlimit_mode,
        p.accounting().counter(),
        dev.vfio_container
    ))
}

/// The allocator's ranges are the attached IOAS's: a fresh IOAS in another
/// context (no device) spans everything, the attached one excludes the x86
/// MSI window and ends at the IOMMU's aperture.
fn ranges_after_attach(ctx: &Ctx) -> Result<String, String> {
    let p = open(ctx)?;
    let info = p.iommufd_info().ok_or("no iommufd info")?;
    let fresh_ctx = std::sync::Arc::new(e(iommufd_ioctls::IommuFd::new(), "open /dev/iommu")?);
    let fresh = e(
        iommufd_ioctls::IommufdIoas::new(fresh_ctx.clone()),
        "IOAS alloc",
    )?;
    let fd = {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: fresh_ctx owns the fd and outlives this borrow.
        unsafe { BorrowedFd::borrow_raw(fresh_ctx.as_raw_fd()) }
    };
    let (empty, _) = e(
        numapin::iommufd::iova_ranges(fd, fresh.id()),
        "ranges of a fresh IOAS",
    )?;
    let msi = Iova(0xfee0_0000);
    let covers = |rs: &[numapin::iova::IovaRange], a: Iova| rs.iter().any(|r| r.contains(a));
    ensure!(
        covers(&empty, msi),
        "a fresh IOAS already excludes the MSI window: {empty:?}"
    );
    ensure!(
        !covers(&info.iova_ranges, msi),
        "the attached IOAS still covers {msi}: {:?}",
        info.iova_ranges
    );
    let top = |rs: &[numapin::iova::IovaRange]| rs.iter().map(|r| r.end).max();
    ensure!(
        top(&info.iova_ranges) < top(&empty),
        "the attached ranges end no lower than a fresh IOAS's"
    );
    let r = e(
        p.pin(&PinRequest::new(ctx.home, 2 << 20)),
        "pin in the attached ranges",
    )?;
    let iova = r.iova().ok_or("no IOVA")?;
    ensure!(
        covers(&info.iova_ranges, iova),
        "IOVA {iova} outside the ranges"
    );
    Ok(format!(
        "fresh IOAS {:?}; attached {:?} (alignment {:#x}); region at {iova}",
        empty, info.iova_ranges, info.iova_alignment
    ))
}

#[derive(Clone, Copy)]
enum Kind {
    /// 4 KiB pages: caller memory with THP off (pin_user).
    Small,
    /// Anonymous memory numapin allocates with MADV_HUGEPAGE.
    Thp,
    /// 2 MiB hugetlb.
    Huge,
}

/// AnonHugePages of this process's mappings overlapping `[addr, addr+len)`.
fn anon_huge_in(addr: u64, len: u64) -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut inside, mut total) = (false, 0);
    for l in s.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a < addr + len && addr < b;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = l.strip_prefix("AnonHugePages:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    << 10;
            }
        }
    }
    total
}

/// Every page on the node, VmPin +size (VmLck unchanged: as root the pages
/// are not charged to the memlock limit), verify intact, release returns
/// VmPin.
fn placement(ctx: &Ctx, node: NodeId, kind: Kind) -> Result<String, String> {
    let p = open(ctx)?;
    let (size, ps) = match kind {
        Kind::Small => (4 << 20, PageSize::Base),
        Kind::Thp => (16 << 20, PageSize::Base),
        Kind::Huge => (16 << 20, PageSize::Huge2M),
    };
    let control = match kind {
        Kind::Small => Some(control_region(node, size)?),
        _ => None,
    };
    let (pin0, lck0) = (vmpin(), vmlck());
    let r = match &control {
        // SAFETY: `control` outlives the region (dropped after it below).
        Some(m) => e(
            unsafe {
                p.pin_user(
                    m.as_ptr(),
                    &PinRequest {
                        page_size: ps,
                        ..PinRequest::new(node, size)
                    },
                )
            },
            "pin_user",
        )?,
        None => e(
            p.pin(&PinRequest {
                page_size: ps,
                ..PinRequest::new(node, size)
            }),
            "pin",
        )?,
    };
    let (grew, lck) = (vmpin() - pin0, vmlck() - lck0);
    ensure!(grew == size, "VmPin grew by {grew:#x}, expected {size:#x}");
    ensure!(lck == 0, "VmLck grew by {lck:#x} with CAP_IPC_LOCK");
    ensure!(
        r.pin_kind() == "iommufd-ioas-map",
        "pin kind {}",
        r.pin_kind()
    );
    let nodes = e(
        numa::nodes_of(r.vaddr().as_usize(), size as usize, ps.bytes()),
        "query nodes",
    )?;
    ensure!(
        on_node(&nodes, node) == nodes.len(),
        "{} of {} pages not on node {node}",
        nodes.len() - on_node(&nodes, node),
        nodes.len()
    );
    let v = e(r.verify(), "verify")?;
    ensure!(v.is_intact(), "verify: {v:?}");
    let thp = anon_huge_in(r.vaddr().raw(), size);
    match kind {
        Kind::Thp => ensure!(thp > 0, "no THP in the region (AnonHugePages 0)"),
        Kind::Small => ensure!(thp == 0, "THP in a 4K region: {thp:#x}"),
        Kind::Huge => {}
    }
    let iova = r.iova().ok_or("no IOVA")?;
    e(r.release(), "release")?;
    ensure!(
        vmpin() == pin0,
        "VmPin {:#x} after release, expected {pin0:#x}",
        vmpin()
    );
    drop(control);
    Ok(format!(
        "{} pages on node {node} at IOVA {iova}, VmPin +{size:#x} and back, VmLck +0, AnonHugePages {thp:#x}",
        nodes.len()
    ))
}

/// With a 32-bit mask every IOVA ends below 4 GiB and a fixed IOVA at 4 GiB
/// is refused; widening the mask again accepts that same IOVA (so the
/// refusal was the mask's), and the device reaches the top region by DMA.
fn dma_mask_32(ctx: &Ctx) -> Result<String, String> {
    let p = open(ctx)?;
    e(p.set_dma_mask(32), "set_dma_mask(32)")?;
    let four_g = Iova(1 << 32);
    let at = |iova: Iova| PinRequest {
        iova: Some(iova),
        ..PinRequest::new(ctx.home, 2 << 20)
    };
    match p.pin(&at(four_g)) {
        Err(Error::Iova(numapin::iova::IovaError::AboveDmaMask { bits: 32, .. })) => {}
        Err(other) => return Err(format!("IOVA 4 GiB with a 32-bit mask: {other}")),
        Ok(r) => {
            return Err(format!(
                "IOVA 4 GiB accepted at {:?} with a 32-bit mask",
                r.iova()
            ));
        }
    }
    let top = e(p.pin(&at(Iova(0xffe0_0000))), "pin at 0xffe00000")?;
    let mut regions = vec![];
    for _ in 0..4 {
        regions.push(e(p.pin(&PinRequest::new(ctx.away, 8 << 20)), "pin")?);
    }
    regions.push(top);
    for r in &regions {
        let i = r.iova().ok_or("no IOVA")?;
        ensure!(
            i.raw() + r.len() - 1 <= 0xffff_ffff,
            "region at {i}+{:#x} ends above 4 GiB",
            r.len()
        );
    }
    let edu = edu(&p)?;
    let top = regions.last().expect("five regions");
    let c = e(
        edu.round_trip(&regions[0], 0x1000, top, 0x1f_0000, 2048, 3),
        "DMA to 0xffe00000",
    )?;
    ensure!(c.ok(), "DMA: {} of {} bytes differ", c.mismatches, c.bytes);
    e(p.set_dma_mask(64), "set_dma_mask(64)")?;
    let above = e(p.pin(&at(four_g)), "pin at 4 GiB without the mask")?;
    Ok(format!(
        "IOVAs {:?} all below 4 GiB; 4 GiB refused under the mask, accepted without it ({:?}); {} bytes DMA'd to {}",
        regions.iter().filter_map(|r| r.iova()).collect::<Vec<_>>(),
        above.iova(),
        c.bytes,
        top.iova().map_or("?".into(), |i| i.to_string())
    ))
}

/// The three accounting cases of iommufd (pages.c, ioas.c in 6.12): with
/// CAP_IPC_LOCK nothing but VmPin; without it but with CAP_SYS_RESOURCE
/// numapin gets process mode, VmPin and VmLck; without either the per-user
/// default, VmPin only (the user's locked_vm is not in /proc/self/status).
fn accounting_modes(ctx: &Ctx) -> Result<String, String> {
    use numapin::iommufd::RlimitMode;
    let len = 1 << 20;
    let limit = e(sys::memlock_limit(), "RLIMIT_MEMLOCK")?;
    ensure!(
        limit >= 2 * len,
        "RLIMIT_MEMLOCK {limit:#x} is too low for the scenario"
    );
    let case = |lower: &[u32], mode: RlimitMode, acct: Accounting, lck_grows: bool| {
        let _caps = Effective::lower(lower)?;
        let p = open(ctx)?;
        let info = p.iommufd_info().ok_or("no iommufd info")?;
        ensure!(
            info.rlimit_mode == mode,
            "mode {:?}, expected {mode:?}",
            info.rlimit_mode
        );
        ensure!(p.accounting() == acct, "accounting {:?}", p.accounting());
        let (pin0, lck0) = (vmpin(), vmlck());
        let r = e(p.pin(&PinRequest::new(ctx.home, len)), "pin")?;
        let (pin, lck) = (vmpin() - pin0, vmlck() - lck0);
        ensure!(pin == len, "{mode:?}: VmPin +{pin:#x}, expected {len:#x}");
        let want = if lck_grows { len } else { 0 };
        ensure!(lck == want, "{mode:?}: VmLck +{lck:#x}, expected {want:#x}");
        e(r.release(), "release")?;
        ensure!(
            vmpin() == pin0 && vmlck() == lck0,
            "{mode:?}: VmPin {:#x}/VmLck {:#x} after release, expected {pin0:#x}/{lck0:#x}",
            vmpin(),
            vmlck()
        );
        Ok::<String, String>(format!("{mode:?}: VmPin +{pin:#x}, VmLck +{lck:#x}"))
    };
    let a = case(&[], RlimitMode::NotCharged, Accounting::VmPin, false)?;
    let b = case(
        &[CAP_IPC_LOCK],
        RlimitMode::Process,
        Accounting::VmPinAndVmLck,
        true,
    )?;
    let c = case(
        &[CAP_IPC_LOCK, CAP_SYS_RESOURCE],
        RlimitMode::User,
        Accounting::VmPin,
        false,
    )?;
    Ok(format!(
        "{a}; {b}; {c} (1 MiB each, back to 0 after release)"
    ))
}

/// Whether this kernel is 6.13 or newer (IOMMU_IOAS_MAP_FILE).
fn has_map_file() -> bool {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = r
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 13)
}

/// IOMMU_IOAS_MAP_FILE of a 2 MiB memfd: before 6.13 the kernel lacks it
/// and numapin says so; from 6.13 VmPin grows by 2 MiB, the device reads
/// the file's bytes through the IOVA (into a pinned region it then writes),
/// and release returns VmPin.
fn map_file(ctx: &Ctx) -> Result<String, String> {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    let p = open(ctx)?;
    let len: u64 = 2 << 20;
    // SAFETY: a plain memfd_create with a NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"numapin-map-file".as_ptr(), libc::MFD_CLOEXEC) };
    ensure!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own memfd.
    ensure!(
        unsafe { libc::ftruncate(raw, len as i64) } == 0,
        "ftruncate"
    );
    // SAFETY: a new shared mapping of our memfd; only raw pointers touch it.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    ensure!(m != libc::MAP_FAILED, "mmap memfd");
    let pattern = |i: u64| (i as u8).wrapping_mul(13) ^ 0xa5;
    for i in 0..len {
        // SAFETY: inside our mapping; volatile, the device may read it later.
        unsafe { std::ptr::write_volatile(m.cast::<u8>().add(i as usize), pattern(i)) };
    }
    let before = vmpin();
    // SAFETY: the file's pages are reached only through raw pointers here.
    let mapped = unsafe { p.map_memfd(fd.as_fd(), 0, len, None) };
    let result = if !has_map_file() {
        match mapped {
            Err(Error::IommufdUnavailable { reason, .. }) if reason.contains("6.13") => Ok(
                format!("kernel before 6.13: MAP_FILE refused as expected ({reason})"),
            ),
            Err(other) => Err(format!("before 6.13, expected IommufdUnavailable: {other}")),
            Ok(f) => Err(format!(
                "MAP_FILE worked on a kernel before 6.13 at {}",
                f.iova()
            )),
        }
    } else {
        (|| {
            let f = e(mapped, "map_memfd")?;
            let grew = vmpin() - before;
            ensure!(grew == len, "VmPin grew by {grew:#x}, expected {len:#x}");
            let dst = e(p.pin(&PinRequest::new(ctx.home, 2 << 20)), "pin dst")?;
            let edu = edu(&p)?;
            let off = 0x1000;
            e(
                edu.dma_to_device(f.iova().raw() + off, 2048),
                "DMA from the file",
            )?;
            e(
                edu.dma_from_device(dst.iova().ok_or("no IOVA")?.raw(), 2048),
                "DMA to dst",
            )?;
            let bad = (0..2048u64)
                // SAFETY: inside the pinned region, read volatile.
                .filter(|&i| unsafe { std::ptr::read_volatile(dst.as_ptr().add(i as usize)) } != pattern(off + i))
                .count();
            ensure!(bad == 0, "{bad} of 2048 bytes from the file differ");
            let iova = f.iova();
            e(f.release(), "release")?;
            drop(dst);
            ensure!(
                vmpin() == before,
                "VmPin {:#x} after release, expected {before:#x}",
                vmpin()
            );
            Ok(format!(
                "memfd at IOVA {iova}: VmPin +{len:#x} and back, 2048 bytes read by the device"
            ))
        })()
    };
    // SAFETY: our mapping, no references into it remain.
    unsafe { libc::munmap(m, len as usize) };
    result
}

/// A VMM's IOAS: the scenario opens /dev/iommu and the cdev itself, binds,
/// allocates an IOAS and attaches the device; numapin then only maps into
/// it (Pinner::with_iommufd_ioas): VmPin grows, the device DMAs through the
/// IOVAs, release returns VmPin. A second IOAS with no device attached is
/// refused by the proof (its mappings pin nothing).
fn caller_ioas(ctx: &Ctx) -> Result<String, String> {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    let info = e(numapin::vfio::describe(&ctx.device), "describe")?;
    let cdev_path = info.cdev.ok_or("no cdev")?;
    let rw = |p: &std::path::Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
    let cdev = e(rw(&cdev_path), "open the cdev")?;
    let iommu = std::sync::Arc::new(iommufd_ioctls::IommuFd::new_from_fd(e(
        rw(std::path::Path::new("/dev/iommu")),
        "open /dev/iommu",
    )?));
    // SAFETY: `iommu` owns the fd and outlives every borrow below.
    let ctx_fd = unsafe { BorrowedFd::borrow_raw(iommu.as_raw_fd()) };
    let dev_id = e(numapin::iommufd::bind(cdev.as_fd(), ctx_fd), "bind")?;
    let ioas = e(
        iommufd_ioctls::IommufdIoas::new(iommu.clone()),
        "IOAS alloc",
    )?;
    let idle = e(
        iommufd_ioctls::IommufdIoas::new(iommu.clone()),
        "second IOAS",
    )?;
    e(numapin::iommufd::attach(cdev.as_fd(), ioas.id()), "attach")?;
    let p = e(
        Pinner::with_iommufd_ioas(ctx_fd, ioas.id()),
        "with_iommufd_ioas",
    )?;
    ensure!(
        p.device_fd().is_none(),
        "a pinner on the caller's IOAS has a device"
    );
    let before = vmpin();
    let a = e(p.pin(&PinRequest::new(ctx.home, 2 << 20)), "pin a")?;
    let b = e(p.pin(&PinRequest::new(ctx.away, 2 << 20)), "pin b")?;
    let grew = vmpin() - before;
    ensure!(grew == 4 << 20, "VmPin grew by {grew:#x}, expected 4 MiB");
    // SAFETY: the cdev is the device fd and outlives `edu`.
    let fd = unsafe { numapin::vfio::DeviceFd::new(cdev.as_fd()) };
    let edu = e(numapin::edu::Edu::open(fd), "edu")?.with_dma_limit(1 << 40);
    let c = e(edu.round_trip(&a, 0x100, &b, 0x800, 2048, 5), "DMA a->b")?;
    ensure!(c.ok(), "DMA: {} of {} bytes differ", c.mismatches, c.bytes);
    let (ia, ib) = (a.iova(), b.iova());
    drop((a, b));
    ensure!(
        vmpin() == before,
        "VmPin {:#x} after release, expected {before:#x}",
        vmpin()
    );
    let q = e(
        Pinner::with_iommufd_ioas(ctx_fd, idle.id()),
        "pinner on the idle IOAS",
    )?;
    match q.pin(&PinRequest::new(ctx.home, 2 << 20)) {
        Err(Error::NotAccounted { grew: 0, .. }) => {}
        Err(other) => return Err(format!("idle IOAS: expected NotAccounted, got {other}")),
        Ok(r) => {
            return Err(format!(
                "idle IOAS: pinned at {:?} with no device attached",
                r.iova()
            ));
        }
    }
    ensure!(
        vmpin() == before,
        "the refused pin left VmPin at {:#x}",
        vmpin()
    );
    drop((p, q, edu));
    drop(cdev); // detach and unbind before the IOAS goes
    drop((ioas, idle));
    Ok(format!(
        "dev {dev_id}: IOVAs {ia:?} and {ib:?}, VmPin +4 MiB and back, {} bytes DMA'd; an IOAS without a device: NotAccounted (VmPin +0)",
        c.bytes
    ))
}

/// `numapin pin --backend`: iommufd through the cdev, type1 through the
/// group, each pinning and saying which in its JSON.
fn cli_backend(ctx: &Ctx) -> Result<String, String> {
    let mut seen = Vec::new();
    for (flag, interface, pin) in [
        ("iommufd", "iommufd", "iommufd-ioas-map"),
        ("type1", "type1", "vfio-map-dma"),
    ] {
        let (code, out, err) = run_cli(&[
            "pin",
            "--device",
            &ctx.bdf,
            "--backend",
            flag,
            "--json",
            "--hold",
            "0",
            "--region",
            "0:4M",
        ])?;
        ensure!(code == 0, "--backend {flag}: exit {code}: {err}");
        let doc: serde_json::Value = e(serde_json::from_str(&out), "parse pin --json")?;
        ensure!(doc["interface"] == interface, "--backend {flag}: {doc}");
        ensure!(doc["regions"][0]["pin"] == pin, "--backend {flag}: {doc}");
        seen.push(format!("{flag}: {pin}"));
    }
    let (code, _, err) = run_cli(&[
        "pin",
        "--device",
        &ctx.bdf,
        "--backend",
        "vfio2",
        "--region",
        "0:4M",
    ])?;
    ensure!(
        code == 2 && err.contains("vfio2"),
        "a bad backend: exit {code}: {err}"
    );
    Ok(seen.join(", "))
}

/// Mapping by file on the pin path: a memfd region numapin allocates
/// (`Backing::Memfd`, the service's) and caller memory with
/// `PinRequest::file` are mapped with `IOMMU_IOAS_MAP_FILE` on 6.13+ and
/// proven by `VmPin`; a `file` that does not back the memory is refused
/// before anything is mapped; a region mapped by address cannot be
/// suspended for a live update, and comes back intact.
fn by_file(ctx: &Ctx) -> Result<String, String> {
    use std::os::fd::AsFd;
    let p = open(ctx)?;
    let len: u64 = 4 << 20;
    let file_ok = has_map_file();
    let before = vmpin();
    let owned = e(
        p.pin(&PinRequest {
            backing: numapin::Backing::Memfd,
            ..PinRequest::new(ctx.home, len)
        }),
        "pin a memfd region",
    )?;
    ensure!(
        owned.is_file_mapping() == file_ok,
        "memfd region mapped by file: {}, kernel has MAP_FILE: {file_ok}",
        owned.is_file_mapping()
    );
    ensure!(
        vmpin() - before == len,
        "VmPin grew by {:#x}",
        vmpin() - before
    );
    ensure!(
        e(owned.verify(), "verify")?.is_intact(),
        "memfd region not intact"
    );
    let memfd = owned.memfd().ok_or("no memfd")?;
    // The same file mapped again: caller memory backed by it.
    // SAFETY: a new shared mapping of the region's memfd, raw pointers only.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            std::os::fd::AsRawFd::as_raw_fd(&memfd),
            0,
        )
    };
    ensure!(m != libc::MAP_FAILED, "mmap the memfd");
    let at_vmpin = vmpin();
    // A file that does not back this memory at that offset: refused.
    // SAFETY: the mapping stays until the munmap below, after the regions go.
    let wrong = unsafe {
        p.pin_user(
            m.cast(),
            &PinRequest {
                file: Some((memfd.as_fd(), 0x20_0000)),
                ..PinRequest::any_node(len)
            },
        )
    };
    let wrong_msg = match wrong {
        Err(Error::Invalid(m)) if m.contains("PinRequest::file") && m.contains("not 0x200000") => m,
        Err(other) => return Err(format!("wrong offset: expected Invalid, got {other}")),
        Ok(_) => return Err("a file at the wrong offset was accepted".into()),
    };
    ensure!(
        vmpin() == at_vmpin,
        "the refused pin left VmPin at {:#x}",
        vmpin()
    );
    // SAFETY: as above.
    let user = e(
        unsafe {
            p.pin_user(
                m.cast(),
                &PinRequest {
                    file: Some((memfd.as_fd(), 0)),
                    ..PinRequest::any_node(len)
                },
            )
        },
        "pin_user with its file",
    )?;
    ensure!(
        user.is_file_mapping() == file_ok,
        "caller memory mapped by file: {}",
        user.is_file_mapping()
    );
    ensure!(
        vmpin() - at_vmpin == len,
        "VmPin grew by {:#x}",
        vmpin() - at_vmpin
    );
    // Anonymous memory, mapped by address, cannot change process.
    let anon = e(p.pin(&PinRequest::new(ctx.home, 2 << 20)), "pin anon")?;
    ensure!(!anon.is_file_mapping(), "anonymous memory mapped by file");
    let refused = match anon.suspend() {
        Err(b) => {
            let (err, region) = *b;
            ensure!(
                e(region.verify(), "verify")?.is_intact(),
                "refused region broken"
            );
            e(region.release(), "release anon")?;
            err.to_string()
        }
        Ok(_) => return Err("an anonymous region was suspended".into()),
    };
    ensure!(
        refused.contains("cannot survive an exec"),
        "suspend refusal: {refused}"
    );
    // A file mapping made with CAP_IPC_LOCK (this runner is root) is
    // charged to no one; CHANGE_PROCESS would leave the next process's
    // VmPin short, so numapin refuses to suspend it.
    let user = if file_ok {
        match user.suspend() {
            Err(b) => {
                let (err, region) = *b;
                let msg = err.to_string();
                ensure!(msg.contains("CAP_IPC_LOCK"), "suspend refusal: {msg}");
                ensure!(
                    e(region.verify(), "verify")?.is_intact(),
                    "refused region broken"
                );
                region
            }
            Ok(_) => return Err("a mapping charged to no one was suspended".into()),
        }
    } else {
        user
    };
    e(user.release(), "release user")?;
    e(owned.release(), "release owned")?;
    // SAFETY: our mapping; no region uses it any more.
    unsafe { libc::munmap(m, len as usize) };
    ensure!(
        vmpin() == before,
        "VmPin {:#x} after release, expected {before:#x}",
        vmpin()
    );
    Ok(format!(
        "memfd region and caller memory mapped by file: {file_ok}, VmPin +{len:#x} each and back; \
         wrong offset refused ({wrong_msg}); anonymous and CAP_IPC_LOCK regions kept from suspend"
    ))
}

/// examples/vmm_guest_ram on iommufd: the VMM's own context and IOAS with
/// both edu devices attached, the memfd slots mapped by file and charged
/// once, DMA, hot-add and remove, discard, fork, and a live update where the
/// re-executed process takes the accounting over with
/// `IOMMU_IOAS_CHANGE_PROCESS` and no page moves (PFNs compared).
fn example_vmm(_: &Ctx) -> Result<String, String> {
    let mut wants = vec![
        "attached to IOAS",
        "VmPin +128 MiB",
        "guest RAM charged once",
        "DMA between GPAs 0x0 and 0x100000000: bytes equal",
        "hot-added slot GPA 0x200000000",
        "CPU and device both read zeroes",
        "forked and exec'd a helper",
        "released all slots",
    ];
    if has_map_file() {
        wants.extend([
            "mapped by file (IOMMU_IOAS_MAP_FILE)",
            "live update: 2 slots suspended (file mappings",
            "live update: re-executed, 2 slots adopted at their new addresses (IOMMU_IOAS_CHANGE_PROCESS); VmPin +128 MiB",
            "live update: no page moved (PFNs compared)",
        ]);
    }
    let text = run_example("vmm_guest_ram", &["--backend", "iommufd"], &wants)?;
    let devices = text
        .lines()
        .filter(|l| l.contains(": DMA between GPAs"))
        .count();
    ensure!(devices == 2, "expected both edu devices to DMA: {text}");
    let intact = text
        .lines()
        .filter(|l| l.ends_with(": intact") && l.contains("PFNs unchanged"))
        .count();
    ensure!(
        intact == 2,
        "expected two intact slots with unchanged PFNs: {text}"
    );
    Ok(text
        .lines()
        .filter(|l| l.starts_with("live update") || l.contains("charged once"))
        .collect::<Vec<_>>()
        .join("; "))
}

/// numapind on iommufd (Backend::Auto picks it on this kernel): the memfd
/// it serves an unprivileged client is mapped by file
/// (`iommufd-ioas-map-file` on 6.13+), the daemon's `VmPin` grows by the
/// region, and the client's frames are the ones the daemon pinned.
fn service_by_file(ctx: &Ctx) -> Result<String, String> {
    use crate::service::{CONFIG, Daemon, Holder};
    const LEN: u64 = 4 << 20;
    let d = Daemon::start(ctx, CONFIG)?;
    let status = |pid: u32| -> Result<u64, String> {
        let s = e(
            std::fs::read_to_string(format!("/proc/{pid}/status")),
            "daemon status",
        )?;
        sys::parse_status_kb(&s, "VmPin").ok_or_else(|| "no VmPin".to_string())
    };
    let pin0 = status(d.pid())?;
    let h = Holder::spawn(&d, &format!("{}:4M", ctx.away.0))?;
    let pin = h.doc["regions"][0]["pin"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let want = if has_map_file() {
        "iommufd-ioas-map-file"
    } else {
        "iommufd-ioas-map"
    };
    ensure!(
        pin == want,
        "the daemon pinned by {pin:?}, expected {want}: {}",
        h.doc
    );
    let grew = status(d.pid())? - pin0;
    ensure!(
        grew == LEN,
        "the daemon's VmPin grew by {grew:#x}, not {LEN:#x}"
    );
    let vaddr = h.hex("vaddr").ok_or("no vaddr")?;
    let theirs = d.pinned_pfns(h.pid())?;
    let mine = pfns_of(h.pid(), vaddr, LEN)?;
    ensure!(
        theirs.len() == mine.len(),
        "{} pinned PFNs, {} client PFNs",
        theirs.len(),
        mine.len()
    );
    let differ = changed(&theirs, &mine);
    ensure!(
        differ == 0,
        "{differ} of the client's frames are not the pinned ones"
    );
    drop(h);
    Ok(format!(
        "pinned by {pin}; daemon VmPin +{grew:#x}; the client's {} frames are the pinned ones",
        mine.len()
    ))
}
