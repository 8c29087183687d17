//! A VMM's guest RAM, pinned by numapin in the VMM's own VFIO container.
//!
//! The VMM here owns everything VFIO: one type1 container with every
//! passthrough device (QEMU's edu devices) opened into it with vfio-ioctls,
//! or, with `--backend iommufd`, one `/dev/iommu` context with one IOAS and
//! every device's cdev bound and attached to it.
//! Guest RAM is vm-memory's `GuestMemoryMmap`, two memfd-backed slots the
//! way vhost-user VMMs have it:
//!
//! | slot | GPA = IOVA      | size   | backing             | host node |
//! |------|-----------------|--------|---------------------|-----------|
//! | low  | `0x0`           | 64 MiB | memfd (shmem)       | first     |
//! | high | `0x1_0000_0000` | 64 MiB | memfd (hugetlb 2M)  | second    |
//!
//! The VMM binds each slot to its host node (`mbind`) and faults it in; then
//! [`numapin::guest::GuestRam`] pins every slot at IOVA = GPA, one mapping
//! each, through [`Pinner::with_type1_container`] (or
//! [`Pinner::with_iommufd_ioas`], which maps the memfd slots by file):
//! numapin maps, proves and unmaps; it never opens a device. Guest RAM is
//! charged once, however many devices share the container or IOAS.
//!
//! Then, as a guest would: every device copies bytes between GPAs of the two
//! slots; a slot is hot-added and a device writes into it, then it is
//! removed; a page is discarded through numapin (unmap, discard, pin again)
//! and the device reads the same zeroes as the CPU; the VMM forks and execs
//! a helper, and the device's view stays intact; last, a live update: the
//! VMM re-executes itself with every mapping kept (type1:
//! `VFIO_DMA_*_FLAG_VADDR`; iommufd: file mappings and
//! `IOMMU_IOAS_CHANGE_PROCESS`) and shows no page moved. Run it in the VM (`cargo
//! xtask test` does; `cargo xtask vm --config type1-stock --shell` gives a
//! shell).
//!
//! ```text
//! cargo run --example vmm_guest_ram --features tools,vm-memory -- [--backend type1|iommufd] [--device DEV]...
//! ```

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use numapin::addr::human_size;
use numapin::edu::Edu;
use numapin::guest::{Discard, GuestRam};
use numapin::vfio::DeviceFd;
use numapin::{Error, NodeId, Pinner, Proof, Result};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

// The capability guard the guest programs use (capget/capset by hand).
#[path = "../tests/common/caps.rs"]
mod caps;

const MIB: u64 = 1 << 20;
const LOW: u64 = 0;
const HIGH: u64 = 0x1_0000_0000;
const HOT: u64 = 0x2_0000_0000;

/// A memfd of `len` bytes (hugetlb 2 MiB when asked), as vm-memory's file.
fn memfd(name: &CStr, len: u64, huge: bool) -> Result<FileOffset> {
    let flags = libc::MFD_CLOEXEC
        | if huge {
            libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT)
        } else {
            0
        };
    // SAFETY: a valid C string; a new fd comes back.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::sys("memfd_create", "", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is new and ours.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(|e| Error::sys("ftruncate the memfd", "reserve 2 MiB hugepages", e))?;
    Ok(FileOffset::new(file, 0))
}

/// What the VMM does to a slot before handing it to numapin: bind to the
/// host node, keep it from fork's children, fault it in.
fn prepare(region: &impl GuestMemoryRegion, node: NodeId) -> Result<()> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| Error::Invalid(format!("no host address: {e}")))?;
    let len = region.len() as usize;
    numapin::sys::mbind(host as usize, len, node, 0)
        .map_err(|e| Error::sys(format!("mbind guest RAM to node {node}"), "", e))?;
    // SAFETY: advice on the VMM's own mapping of guest RAM.
    unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTFORK) };
    // SAFETY: populating the mapping allocates its pages; nothing reads them.
    if unsafe { libc::madvise(host.cast(), len, numapin::sys::MADV_POPULATE_WRITE) } != 0 {
        return Err(Error::sys(
            format!("faulting in guest RAM on node {node}"),
            "free memory or hugepages on that node",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The device copies `len` bytes from GPA `from` to GPA `to`; the CPU checks
/// them at `to`'s host address.
fn copy_check(edu: &Edu, ram: &GuestRam, from: u64, to: u64, len: u64, seed: u8) -> Result<()> {
    let (src, dst) = match (
        ram.gpa_to_host(GuestAddress(from)),
        ram.gpa_to_host(GuestAddress(to)),
    ) {
        (Some(s), Some(d)) => (s, d),
        _ => {
            return Err(Error::Invalid(format!(
                "GPA {from:#x} or {to:#x} is not guest RAM"
            )));
        }
    };
    for i in 0..len {
        // SAFETY: inside pinned guest RAM; raw volatile accesses only.
        unsafe {
            std::ptr::write_volatile(src.as_mut_ptr().add(i as usize), seed.wrapping_add(i as u8));
            std::ptr::write_volatile(dst.as_mut_ptr().add(i as usize), 0);
        }
    }
    edu.dma_to_device(from, len)?;
    edu.dma_from_device(to, len)?;
    // SAFETY: as above.
    let bad = (0..len)
        .filter(|&i| unsafe { std::ptr::read_volatile(dst.as_mut_ptr().add(i as usize)) } != seed.wrapping_add(i as u8))
        .count();
    if bad > 0 {
        return Err(Error::Invalid(format!(
            "{bad} of {len} bytes wrong after GPA {from:#x} -> {to:#x}"
        )));
    }
    Ok(())
}

/// `len` bytes at GPA `gpa`, as the CPU reads them.
fn read(ram: &GuestRam, gpa: u64, len: u64) -> Result<Vec<u8>> {
    let at = ram
        .gpa_to_host(GuestAddress(gpa))
        .ok_or_else(|| Error::Invalid(format!("GPA {gpa:#x} is not guest RAM")))?;
    // SAFETY: inside pinned guest RAM; raw volatile reads only.
    Ok((0..len)
        .map(|i| unsafe { std::ptr::read_volatile(at.as_mut_ptr().add(i as usize)) })
        .collect())
}

/// What the device reads at GPA `from`: it copies `len` bytes to GPA `to`
/// (first filled with 0xaa), where the CPU reads them back.
fn device_reads(edu: &Edu, ram: &GuestRam, from: u64, to: u64, len: u64) -> Result<Vec<u8>> {
    let dst = ram
        .gpa_to_host(GuestAddress(to))
        .ok_or_else(|| Error::Invalid(format!("GPA {to:#x} is not guest RAM")))?;
    for i in 0..len {
        // SAFETY: inside pinned guest RAM; raw volatile writes only.
        unsafe { std::ptr::write_volatile(dst.as_mut_ptr().add(i as usize), 0xaa) };
    }
    edu.dma_to_device(from, len)?;
    edu.dma_from_device(to, len)?;
    read(ram, to, len)
}

/// The VMM's VFIO: a type1 container or an iommufd context with one IOAS,
/// every device in it.
enum Vfio {
    Type1 {
        container: Arc<VfioContainer>,
        devices: Vec<(String, VfioDevice)>,
    },
    Iommufd {
        ctx: File,
        ioas: u32,
        devices: Vec<(String, File)>,
    },
}

impl Vfio {
    /// Opens every device into one new type1 container.
    fn type1(devices: &[String]) -> Result<Vfio> {
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| Error::Invalid(format!("open /dev/vfio/vfio: {e}")))?,
        );
        let mut opened = Vec::new();
        for d in devices {
            let sysfs = numapin::vfio::resolve_device(d)?;
            let dev = VfioDevice::new(&sysfs, container.clone(), false)
                .map_err(|e| Error::Invalid(format!("open {d} into the VMM's container: {e}")))?;
            opened.push((d.clone(), dev));
        }
        Ok(Vfio::Type1 {
            container,
            devices: opened,
        })
    }

    /// Opens `/dev/iommu`, allocates one IOAS, and binds and attaches every
    /// device's cdev to it, as an iommufd VMM does.
    fn iommufd(devices: &[String]) -> Result<Vfio> {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| Error::sys(format!("open {}", p.display()), "", e))
        };
        let ctx = open(Path::new("/dev/iommu"))?;
        let iommufd = iommufd_ioctls::IommuFd::new_from_fd(
            ctx.try_clone().map_err(|e| Error::sys("dup", "", e))?,
        );
        let mut alloc = iommufd_bindings::iommufd::iommu_ioas_alloc {
            size: std::mem::size_of::<iommufd_bindings::iommufd::iommu_ioas_alloc>() as u32,
            ..Default::default()
        };
        iommufd
            .alloc_iommu_ioas(&mut alloc)
            .map_err(|e| Error::Invalid(format!("IOMMU_IOAS_ALLOC: {e}")))?;
        let ioas = alloc.out_ioas_id;
        let mut opened = Vec::new();
        for d in devices {
            let sysfs = numapin::vfio::resolve_device(d)?;
            let cdev = numapin::vfio::sysfs::cdev_of(&sysfs).ok_or_else(|| {
                Error::Invalid(format!(
                    "{d} has no VFIO cdev (Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)"
                ))
            })?;
            let file = open(&cdev)?;
            numapin::iommufd::bind(file.as_fd(), ctx.as_fd())
                .map_err(|e| Error::sys(format!("bind {d} to /dev/iommu"), "", e))?;
            numapin::iommufd::attach(file.as_fd(), ioas)
                .map_err(|e| Error::sys(format!("attach {d} to IOAS {ioas}"), "", e))?;
            opened.push((d.clone(), file));
        }
        Ok(Vfio::Iommufd {
            ctx,
            ioas,
            devices: opened,
        })
    }

    fn pinner(&self) -> Result<Pinner> {
        match self {
            Vfio::Type1 { container, .. } => {
                // SAFETY: the container fd stays open (the Arc) while borrowed.
                let fd = unsafe { BorrowedFd::borrow_raw(container.as_raw_fd()) };
                Pinner::with_type1_container(fd, None)
            }
            Vfio::Iommufd { ctx, ioas, .. } => Pinner::with_iommufd_ioas(ctx.as_fd(), *ioas),
        }
    }

    fn devices(&self) -> Vec<(String, RawFd)> {
        match self {
            Vfio::Type1 { devices, .. } => devices
                .iter()
                .map(|(n, d)| (n.clone(), d.as_raw_fd()))
                .collect(),
            Vfio::Iommufd { devices, .. } => devices
                .iter()
                .map(|(n, f)| (n.clone(), f.as_raw_fd()))
                .collect(),
        }
    }

    /// The counter a pin grows here: type1 charges `VmLck`; iommufd grows
    /// `VmPin` (and, without CAP_IPC_LOCK, its user's locked memory, which
    /// `/proc` does not show).
    fn counter(&self) -> &'static str {
        match self {
            Vfio::Type1 { .. } => "VmLck",
            Vfio::Iommufd { .. } => "VmPin",
        }
    }

    /// What the re-executed process needs to find the context again.
    fn state(&self) -> String {
        let mut out = match self {
            Vfio::Type1 { container, .. } => format!("container {}\n", container.as_raw_fd()),
            Vfio::Iommufd { ctx, ioas, .. } => format!("iommufd {} {ioas}\n", ctx.as_raw_fd()),
        };
        for (_, fd) in self.devices() {
            out.push_str(&format!("device {fd}\n"));
        }
        out
    }
}

/// `VmLck` or `VmPin` of this process, in bytes.
fn counter(name: &str) -> u64 {
    match name {
        "VmPin" => numapin::sys::pinned_bytes().unwrap_or(0),
        _ => numapin::sys::locked_bytes().unwrap_or(0),
    }
}

fn run(devices: &[String], backend: &str) -> Result<()> {
    // On iommufd, a process with CAP_IPC_LOCK maps pages charged to no one
    // (IOPT_PAGES_ACCOUNT_NONE), and IOMMU_IOAS_CHANGE_PROCESS moves such
    // pages without charging the new process, whose VmPin then goes below
    // zero when they are unmapped (Linux 7.3: need_charge_update in
    // drivers/iommu/iommufd/ioas.c, iopt_pages_update_pinned in pages.c).
    // So this VMM maps guest RAM as an unprivileged VMM would: without
    // CAP_IPC_LOCK, charged to its user's locked memory (the limit raised
    // first), which the live update moves to the new process.
    let _accounted = if backend == "iommufd" {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
            return Err(Error::sys(
                "raise RLIMIT_MEMLOCK",
                "",
                io::Error::last_os_error(),
            ));
        }
        Some(caps::Effective::lower(&[caps::CAP_IPC_LOCK]).map_err(Error::Invalid)?)
    } else {
        None
    };
    // The VMM's container or IOAS, every device in it.
    let vfio = match backend {
        "iommufd" => Vfio::iommufd(devices)?,
        _ => Vfio::type1(devices)?,
    };
    let pinner = vfio.pinner()?;
    let nodes = pinner.topology().ids();
    let first = *nodes
        .first()
        .ok_or_else(|| Error::Invalid("no online node".into()))?;
    let second = nodes.get(1).copied().unwrap_or(first);
    let ctr = vfio.counter();
    match &vfio {
        Vfio::Type1 { .. } => println!(
            "VMM container: {} device(s) ({}), kind {} (found from VFIO_IOMMU_GET_INFO)",
            devices.len(),
            devices.join(", "),
            pinner.kind().name()
        ),
        Vfio::Iommufd { ioas, .. } => println!(
            "VMM iommufd: {} device(s) ({}) attached to IOAS {ioas}",
            devices.len(),
            devices.join(", "),
        ),
    }

    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([
        (
            GuestAddress(LOW),
            (64 * MIB) as usize,
            Some(memfd(c"guest-low", 64 * MIB, false)?),
        ),
        (
            GuestAddress(HIGH),
            (64 * MIB) as usize,
            Some(memfd(c"guest-high", 64 * MIB, true)?),
        ),
    ])
    .map_err(|e| Error::Invalid(format!("guest memory: {e}")))?;
    let node_of = |gpa: GuestAddress| Some(if gpa.0 == LOW { first } else { second });
    for r in mem.iter() {
        prepare(r, node_of(r.start_addr()).expect("every slot has a node"))?;
    }

    let lck0 = counter(ctr);
    let mut ram = GuestRam::new(pinner, Proof::Full);
    // SAFETY: `mem` outlives `ram` (released below before `mem` drops), and
    // guest RAM is only touched through raw pointers and the device.
    unsafe { ram.pin_all(&mem, node_of) }?;
    let grew = counter(ctr) - lck0;
    println!(
        "pinned {} slots at IOVA = GPA; {ctr} +{} for {} device(s): guest RAM charged once",
        ram.slots().len(),
        human_size(grew),
        devices.len()
    );
    if grew != 128 * MIB {
        return Err(Error::Invalid(format!(
            "{ctr} grew by {grew:#x}, not by the 128 MiB of guest RAM"
        )));
    }
    for s in ram.slots() {
        println!(
            "  slot GPA {:#x}: {} of {} pages on node {}, {}{}",
            s.gpa().0,
            human_size(s.len()),
            s.page_size(),
            s.node().map_or("-".into(), |n| n.to_string()),
            if s.file().is_some() {
                "memfd-backed"
            } else {
                "anonymous"
            },
            if s.region().is_file_mapping() {
                ", mapped by file (IOMMU_IOAS_MAP_FILE)"
            } else {
                ""
            }
        );
    }

    let edus: Vec<Edu> = vfio
        .devices()
        .iter()
        .map(|&(_, d)| {
            // SAFETY: the VMM's device fd, open for as long as `vfio`.
            let fd = unsafe { DeviceFd::new(BorrowedFd::borrow_raw(d)) };
            Edu::open(fd).map(|e| e.with_dma_limit(1 << 40))
        })
        .collect::<Result<_>>()?;
    for (i, edu) in edus.iter().enumerate() {
        copy_check(edu, &ram, LOW + 0x1000, HIGH + 0x2000, 256, 7 + i as u8)?;
        copy_check(edu, &ram, HIGH + 0x3000, LOW + 0x4000, 256, 9 + i as u8)?;
        println!(
            "device {}: DMA between GPAs {:#x} and {:#x}: bytes equal",
            devices[i], LOW, HIGH
        );
    }

    // Hot-add a 32 MiB anonymous slot, DMA into it, remove it.
    let hot: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(HOT), (32 * MIB) as usize)])
            .map_err(|e| Error::Invalid(format!("hot slot: {e}")))?;
    let hot_region = hot.iter().next().expect("one region");
    prepare(hot_region, first)?;
    // SAFETY: `hot` outlives the slot, which is removed below.
    unsafe { ram.add(hot_region, Some(first)) }?;
    copy_check(&edus[0], &ram, LOW + 0x5000, HOT + 0x1000, 512, 3)?;
    ram.remove(GuestAddress(HOT))?;
    println!(
        "hot-added slot GPA {HOT:#x} (32 MiB), device wrote into it, removed it: {} slots, {ctr} +{}",
        ram.slots().len(),
        human_size(counter(ctr) - lck0)
    );

    // Discard a page through numapin: the device then reads the zeroes the
    // CPU reads, not the old page the IOMMU would still point at.
    let page = LOW + 0x10000;
    copy_check(&edus[0], &ram, HIGH + 0x6000, page, 256, 5)?;
    ram.discard(GuestAddress(page), 0x1000, Discard::Remove)?;
    let cpu = read(&ram, page, 256)?;
    let dev = device_reads(&edus[0], &ram, page, HIGH + 0x7000, 256)?;
    if cpu.iter().any(|&b| b != 0) || dev != cpu {
        return Err(Error::Invalid(format!(
            "after the discard the CPU reads {:?}.. and the device {:?}..",
            &cpu[..8],
            &dev[..8]
        )));
    }
    println!(
        "discarded GPA {page:#x} (4 KiB) through numapin (unmap, discard, pin again): CPU and device both read zeroes"
    );

    // Fork and exec a helper, as a VMM does: the device's view stays.
    let child = std::process::Command::new("/bin/true")
        .status()
        .map_err(|e| Error::sys("fork+exec /bin/true", "", e))?;
    if !child.success() {
        return Err(Error::Invalid("/bin/true failed".into()));
    }
    copy_check(&edus[0], &ram, LOW + 0x8000, HIGH + 0x9000, 256, 11)?;
    println!("forked and exec'd a helper: DMA between the slots still lands where the CPU reads");

    for (gpa, v) in ram.verify()? {
        if !v.is_intact() {
            return Err(Error::Invalid(format!(
                "slot at GPA {:#x} moved while pinned: {v:?}",
                gpa.0
            )));
        }
    }

    // Live update: keep every mapping while this process re-executes.
    if matches!(vfio, Vfio::Iommufd { .. })
        && ram.slots().iter().any(|s| !s.region().is_file_mapping())
    {
        println!(
            "live update: skipped, the slots are mapped by address (this kernel has no IOMMU_IOAS_MAP_FILE, Linux 6.13+)"
        );
        return verify_and_release(ram, ctr, lck0);
    }
    let mut state = vfio.state();
    for (r, s) in mem.iter().zip(ram.slots()) {
        let (fd, off) = s
            .file()
            .ok_or_else(|| Error::Invalid("anonymous slot".into()))?;
        let pfns = numapin::phys::pfns(s.host_addr().raw(), s.len())?;
        state.push_str(&format!(
            "slot {:#x} {:#x} {fd} {off} {} {} {}\n",
            r.start_addr().0,
            s.len(),
            s.node().map_or(-1, |n| n.0 as i64),
            s.page_size().bytes(),
            pfns.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    keep_vfio_fds_across_exec()?;
    drop(edus);
    let suspended = ram.suspend().map_err(|b| b.0)?;
    for s in &suspended {
        state.push_str(&format!(
            "suspended {:#x} {:#x}\n",
            s.gpa,
            s.mapping.iova.raw()
        ));
    }
    std::fs::write(STATE, &state).map_err(|e| Error::sys("write the live-update state", "", e))?;
    println!(
        "live update: {} slots suspended ({}), re-executing",
        suspended.len(),
        match vfio {
            Vfio::Type1 { .. } => "VFIO_DMA_UNMAP_FLAG_VADDR",
            Vfio::Iommufd { .. } => "file mappings, nothing to forget",
        }
    );
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::sys("current_exe", "", e))?;
    // The memory, the container or context and the devices must outlive
    // this image.
    std::mem::forget(mem);
    std::mem::forget(vfio);
    let e = std::process::Command::new(exe).arg("--resume").exec();
    Err(Error::sys("exec for the live update", "", e))
}

/// Where the first process leaves what the re-executed one needs.
const STATE: &str = "/tmp/numapin-vmm-live-update";

/// Clears FD_CLOEXEC on every VFIO and iommufd fd (container, groups,
/// devices and cdevs, `/dev/iommu`) and every memfd: they keep the IOMMU
/// domain and the guest RAM alive.
fn keep_vfio_fds_across_exec() -> Result<()> {
    let rd =
        std::fs::read_dir("/proc/self/fd").map_err(|e| Error::sys("read /proc/self/fd", "", e))?;
    for e in rd.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        if t.starts_with("/dev/vfio/")
            || t.contains("[vfio-device]")
            || t == "/dev/iommu"
            || t.starts_with("/memfd:")
        {
            // SAFETY: fcntl on an fd of this process.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
    }
    Ok(())
}

/// The re-executed VMM: maps the same memfds again, adopts the suspended
/// mappings, checks that no page moved and that the device still works.
fn resume() -> Result<()> {
    let state = std::fs::read_to_string(STATE)
        .map_err(|e| Error::sys("read the live-update state", "", e))?;
    let field = |l: &str, i: usize| l.split_whitespace().nth(i).unwrap_or("").to_string();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(0);
    let mut container = -1;
    let mut iommufd = None;
    let mut devices = Vec::new();
    let mut slots = Vec::new();
    let mut suspended = Vec::new();
    for l in state.lines() {
        match l.split_whitespace().next() {
            Some("container") => container = field(l, 1).parse().unwrap_or(-1),
            Some("iommufd") => {
                iommufd = Some((
                    field(l, 1).parse::<i32>().unwrap_or(-1),
                    field(l, 2).parse::<u32>().unwrap_or(0),
                ))
            }
            Some("device") => devices.push(field(l, 1).parse::<i32>().unwrap_or(-1)),
            Some("slot") => slots.push((
                hex(&field(l, 1)),
                hex(&field(l, 2)),
                field(l, 3).parse::<i32>().unwrap_or(-1),
                field(l, 4).parse::<u64>().unwrap_or(0),
                field(l, 5).parse::<i64>().unwrap_or(-1),
                field(l, 6).parse::<u64>().unwrap_or(4096),
                field(l, 7)
                    .split(',')
                    .filter_map(|p| p.parse::<u64>().ok())
                    .collect::<Vec<_>>(),
            )),
            Some("suspended") => suspended.push((hex(&field(l, 1)), hex(&field(l, 2)))),
            _ => {}
        }
    }
    let ctr = if iommufd.is_some() { "VmPin" } else { "VmLck" };
    let lck0 = counter(ctr);
    // SAFETY: the fds crossed the exec for exactly this use.
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(slots.iter().map(|s| {
        (
            GuestAddress(s.0),
            s.1 as usize,
            Some(FileOffset::new(unsafe { File::from_raw_fd(s.2) }, s.3)),
        )
    }))
    .map_err(|e| Error::Invalid(format!("map guest RAM again: {e}")))?;
    let pinner = match iommufd {
        // SAFETY: the context fd crossed the exec and stays open.
        Some((fd, ioas)) => Pinner::with_iommufd_ioas(unsafe { BorrowedFd::borrow_raw(fd) }, ioas)?,
        // SAFETY: the container fd crossed the exec and stays open.
        None => Pinner::with_type1_container(unsafe { BorrowedFd::borrow_raw(container) }, None)?,
    };
    let plan: Vec<numapin::guest::SuspendedSlot> = slots
        .iter()
        .map(|s| numapin::guest::SuspendedSlot {
            gpa: s.0,
            offset: s.3,
            mapping: numapin::Suspended {
                iova: numapin::Iova(suspended.iter().find(|x| x.0 == s.0).map_or(s.0, |x| x.1)),
                len: s.1,
                node: (s.4 >= 0).then_some(NodeId(s.4 as u32)),
                page_size: numapin::PageSize::from_bytes(s.5).unwrap_or(numapin::PageSize::Base),
            },
        })
        .collect();
    // SAFETY: `mem` maps the same files at the same offsets and outlives `ram`.
    let ram = unsafe { GuestRam::resume(pinner, Proof::Full, &mem, &plan) }?;
    let grew = counter(ctr).saturating_sub(lck0);
    println!(
        "live update: re-executed, {} slots adopted at their new addresses ({}); {ctr} +{}",
        ram.slots().len(),
        if iommufd.is_some() {
            "IOMMU_IOAS_CHANGE_PROCESS"
        } else {
            "VFIO_DMA_MAP_FLAG_VADDR"
        },
        human_size(grew)
    );
    let total: u64 = slots.iter().map(|s| s.1).sum();
    if grew != total {
        return Err(Error::Invalid(format!(
            "{ctr} of the new process grew by {grew:#x}, not by the {total:#x} bytes it took over"
        )));
    }
    let mut moved = 0;
    for (s, old) in ram.slots().iter().zip(&slots) {
        let now = numapin::phys::pfns(s.host_addr().raw(), s.len())?.to_vec();
        moved += now.iter().zip(&old.6).filter(|(a, b)| a != b).count();
        if now.len() != old.6.len() {
            return Err(Error::Invalid("the PFN snapshots differ in length".into()));
        }
    }
    if moved > 0 {
        return Err(Error::Invalid(format!(
            "{moved} pages moved across the live update"
        )));
    }
    for (i, &d) in devices.iter().enumerate() {
        // SAFETY: the device fd crossed the exec and stays open.
        let fd = unsafe { DeviceFd::new(BorrowedFd::borrow_raw(d)) };
        let edu = Edu::open(fd)?.with_dma_limit(1 << 40);
        copy_check(&edu, &ram, LOW + 0x20000, HIGH + 0x21000, 256, 13 + i as u8)?;
    }
    println!(
        "live update: no page moved (PFNs compared), and every device still DMAs between the slots"
    );
    verify_and_release(ram, ctr, lck0)?;
    drop(mem);
    let _ = std::fs::remove_file(STATE);
    Ok(())
}

/// Verifies every slot, releases them all, and checks the counter `ctr`
/// comes back to `lck0`.
fn verify_and_release(ram: GuestRam, ctr: &str, lck0: u64) -> Result<()> {
    println!("verify:");
    for (gpa, v) in ram.verify()? {
        let pfns = match v.pfn_changed {
            Some(0) => "PFNs unchanged".to_string(),
            Some(n) => format!("{n} PFNs CHANGED"),
            None => "PFNs hidden".to_string(),
        };
        println!(
            "  GPA {:#x}: {} pages, {} off node, {pfns}: {}",
            gpa.0,
            v.pages,
            v.off_node,
            if v.is_intact() { "intact" } else { "BROKEN" }
        );
        if !v.is_intact() {
            return Err(Error::Invalid(format!(
                "slot at GPA {:#x} moved while pinned",
                gpa.0
            )));
        }
    }
    ram.release()?;
    println!(
        "released all slots: {ctr} back to {}",
        human_size(counter(ctr))
    );
    if counter(ctr) != lck0 {
        return Err(Error::Invalid(format!("{ctr} did not come back")));
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--resume") {
        return match resume() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm_guest_ram: error after the live update: {e}");
                ExitCode::from(e.kind().exit_code())
            }
        };
    }
    let mut devices = Vec::new();
    let mut backend = "type1".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--device" | "-d", Some(d)) => devices.push(d),
            ("--backend", Some(b)) if b == "type1" || b == "iommufd" => backend = b,
            _ => {
                eprintln!(
                    "usage: vmm_guest_ram [--backend type1|iommufd] [--device DEV]...  (default: type1, every QEMU edu device)"
                );
                return ExitCode::from(2);
            }
        }
    }
    if devices.is_empty() {
        devices = numapin::edu::find_all();
    }
    let dev_node = if backend == "iommufd" {
        "/dev/iommu"
    } else {
        "/dev/vfio/vfio"
    };
    if devices.is_empty() || !Path::new(dev_node).exists() {
        eprintln!(
            "vmm_guest_ram: error: no QEMU edu device bound to vfio-pci; run it in the VM (`cargo xtask test`)"
        );
        return ExitCode::from(2);
    }
    match run(&devices, &backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm_guest_ram: error: {e}");
            ExitCode::from(e.kind().exit_code())
        }
    }
}
