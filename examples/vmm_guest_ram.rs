//! Guest RAM laid out the way a VMM lays it out, pinned at IOVA = GPA.
//!
//! A VMM that passes a device through to its guest lets the guest program
//! guest-physical addresses (GPAs) into the device, so the IOMMU must map
//! IOVA = GPA onto the host memory that backs guest RAM, and that memory must
//! never move. This example plays such a VMM for a small two-node guest:
//!
//! | slot | GPA = IOVA      | size   | guest node | host node            |
//! |------|-----------------|--------|------------|----------------------|
//! | low  | `0x0`           | 64 MiB | 0          | first online node    |
//! | high | `0x1_0000_0000` | 64 MiB | 1          | second online node (or the first) |
//!
//! The low slot stands for the RAM below the 32-bit PCI hole (a real VMM maps
//! up to 3 GiB there, `0 .. 0xC000_0000`); the high slot for the RAM above
//! 4 GiB. Neither touches the x86 MSI window `0xfee00000-0xfeefffff`, which
//! the IOMMU reserves: an IOVA there is refused.
//!
//! The VMM owns the memory: it maps it (anonymous, `MAP_NORESERVE`), binds it
//! to the host node with `mbind(MPOL_BIND)` before the first touch, faults it
//! in, and only then hands it to [`Pinner::pin_user`], which takes the
//! long-term pin with one `VFIO_IOMMU_MAP_DMA` per slot and checks that every
//! page is on the node. At the end it verifies each slot, releases the pins
//! and unmaps.
//!
//! ```text
//! cargo run --example vmm_guest_ram -- [--device DEV]
//! ```
//!
//! `DEV` is a PCI address (or sysfs path) of a device bound to vfio-pci; the
//! default is QEMU's edu device. Run it in the VM: `cargo xtask demo` boots
//! one with a vIOMMU, the edu device and two NUMA nodes.

use std::ffi::c_void;
use std::io;
use std::process::ExitCode;
use std::ptr::NonNull;

use numapin::addr::human_size;
use numapin::{Error, Iova, NodeId, PageSize, PinRequest, PinnedRegion, Pinner, Result};

const MIB: u64 = 1 << 20;

/// One guest memory slot.
struct Slot {
    name: &'static str,
    /// Guest-physical address of the first byte; also its IOVA.
    gpa: u64,
    size: u64,
    /// The guest's (virtual) NUMA node.
    vnode: usize,
}

const SLOTS: [Slot; 2] = [
    Slot {
        name: "low",
        gpa: 0,
        size: 64 * MIB,
        vnode: 0,
    },
    Slot {
        name: "high",
        gpa: 0x1_0000_0000,
        size: 64 * MIB,
        vnode: 1,
    },
];

/// Anonymous memory the VMM mapped itself. Unmapped on drop.
struct GuestRam {
    ptr: NonNull<u8>,
    len: usize,
}

impl GuestRam {
    /// Maps `len` bytes, binds them to `node` and faults every page in there.
    fn new(len: u64, node: NodeId) -> Result<GuestRam> {
        let len = usize::try_from(len).map_err(|_| Error::Invalid("slot too large".into()))?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks overlaps nothing else in the process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::sys(
                format!("mmap of {len:#x} bytes of guest RAM"),
                "free memory or use smaller slots",
                io::Error::last_os_error(),
            ));
        }
        let ram = GuestRam {
            ptr: NonNull::new(p.cast()).expect("mmap returned a null mapping"),
            len,
        };
        // Like QEMU with VFIO: a fork()ed helper must not get copies of guest RAM.
        // SAFETY: advice on our own fresh mapping; it changes no contents.
        unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        // Bind before the first touch, so that every page is allocated on the node.
        numapin::sys::mbind(ram.addr(), len, node, 0).map_err(|e| {
            Error::sys(format!("mbind(MPOL_BIND, node {node}) of guest RAM"), "", e)
        })?;
        ram.fault_in().map_err(|e| {
            Error::sys(
                format!("faulting in guest RAM on node {node}"),
                "free memory on that node",
                e,
            )
        })?;
        Ok(ram)
    }

    /// Writes every page once (`MADV_POPULATE_WRITE`, Linux 5.14+; touching
    /// each page on older kernels).
    fn fault_in(&self) -> io::Result<()> {
        let p = self.ptr.as_ptr().cast::<c_void>();
        // SAFETY: populating our own mapping only allocates zeroed pages.
        if unsafe { libc::madvise(p, self.len, numapin::sys::MADV_POPULATE_WRITE) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        let page = numapin::addr::base_page_size() as usize;
        for off in (0..self.len).step_by(page) {
            // SAFETY: the byte is inside our mapping, no Rust reference covers
            // it, and writing 0 to fresh anonymous memory changes nothing.
            unsafe { self.ptr.as_ptr().add(off).write_volatile(0) };
        }
        Ok(())
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Gives up the mapping without unmapping it.
    fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers into it any more.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            eprintln!(
                "vmm_guest_ram: munmap of guest RAM failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// A slot's memory and its pin. The pin always goes first: the memory is
/// unmapped only after the pin is released, and leaked if the release fails
/// (the device could still reach it).
struct PinnedSlot {
    slot: &'static Slot,
    host: NodeId,
    region: Option<PinnedRegion>,
    ram: Option<GuestRam>,
}

impl PinnedSlot {
    fn new(pinner: &Pinner, slot: &'static Slot, host: NodeId) -> Result<PinnedSlot> {
        let ram = GuestRam::new(slot.size, host)?;
        // SAFETY: `ram` is a mapping this process made and owns. It stays
        // mapped until the region is released: `PinnedSlot::teardown` releases
        // the region before it drops `ram`, and leaks `ram` if the release
        // fails. No Rust reference to the memory is ever created; the example
        // only passes its address to system calls.
        let region = unsafe {
            pinner.pin_user(
                ram.ptr.as_ptr(),
                &PinRequest {
                    iova: Some(Iova(slot.gpa)),
                    page_size: PageSize::Base,
                    ..PinRequest::new(host, slot.size)
                },
            )
        }?;
        Ok(PinnedSlot {
            slot,
            host,
            region: Some(region),
            ram: Some(ram),
        })
    }

    fn region(&self) -> &PinnedRegion {
        self.region.as_ref().expect("region present until teardown")
    }

    fn release(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(region) = self.region.take() {
            if let Err(e) = region.release() {
                if let Some(ram) = self.ram.take() {
                    ram.leak();
                }
                return Err(e);
            }
        }
        drop(self.ram.take());
        Ok(())
    }
}

impl Drop for PinnedSlot {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("vmm_guest_ram: slot {} leaked: {e}", self.slot.name);
        }
    }
}

fn run(device: &str) -> Result<()> {
    let pinner = Pinner::open(device)?;
    let online = pinner.topology().ids();
    let first = *online
        .first()
        .ok_or_else(|| Error::Invalid("no online NUMA node".into()))?;
    let mut slots = Vec::with_capacity(SLOTS.len());
    for slot in &SLOTS {
        // Guest node n lives on the n-th online host node, or on the first.
        let host = online.get(slot.vnode).copied().unwrap_or(first);
        slots.push(PinnedSlot::new(&pinner, slot, host)?);
    }

    println!(
        "guest RAM pinned through {} ({}), {} online host node(s)",
        pinner.device_info().map_or("?", |d| d.name.as_str()),
        pinner.kind().name(),
        online.len()
    );
    println!(
        "{:<5} {:<14} {:>8} {:>5} {:>5}  vaddr",
        "slot", "GPA = IOVA", "size", "vnode", "host"
    );
    for s in &slots {
        let r = s.region();
        println!(
            "{:<5} {:<14} {:>8} {:>5} {:>5}  {:#018x}",
            s.slot.name,
            r.iova().map_or("-".into(), |i| i.to_string()),
            human_size(r.len()),
            s.slot.vnode,
            s.host.to_string(),
            r.vaddr()
        );
    }

    println!("verify:");
    for s in &slots {
        let r = s.region();
        // What the guest sees: the last page of the slot at GPA + offset.
        let off = r.len() - numapin::addr::base_page_size();
        let last = r.vaddr().checked_add(off).expect("inside the slot");
        let want = Iova(s.slot.gpa + off);
        if r.iova_of(last) != Some(want) {
            return Err(Error::Invalid(format!(
                "slot {}: vaddr {last:#x} translates to {:?}, expected IOVA {want}",
                s.slot.name,
                r.iova_of(last)
            )));
        }
        let v = r.verify()?;
        let pfns = match v.pfn_changed {
            Some(0) => "PFNs unchanged".to_string(),
            Some(n) => format!("{n} PFNs CHANGED"),
            None => "PFNs hidden (no CAP_SYS_ADMIN)".to_string(),
        };
        println!(
            "{:<5} {} pages, {} off node {}, {pfns}: {}",
            s.slot.name,
            v.pages,
            v.off_node,
            s.host,
            if v.is_intact() { "intact" } else { "BROKEN" }
        );
        if !v.is_intact() {
            return Err(Error::Invalid(format!(
                "slot {} moved while pinned: {} pages off node {}, {pfns}",
                s.slot.name, v.off_node, s.host
            )));
        }
    }

    for s in slots {
        s.release()?;
    }
    println!("released both slots");
    Ok(())
}

fn usage() -> &'static str {
    "usage: vmm_guest_ram [--device DEV]  (default: QEMU's edu device, 1234:11e8)"
}

/// `Ok(Some(dev))`, `Ok(None)` for the default, or `Err(message)`.
fn parse_args() -> std::result::Result<Option<String>, String> {
    let mut args = std::env::args().skip(1);
    let mut device = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" | "-d" => {
                device = Some(args.next().ok_or("--device needs a value")?);
            }
            "--help" | "-h" => return Err(String::new()),
            _ => match a.strip_prefix("--device=") {
                Some(d) => device = Some(d.to_string()),
                None => return Err(format!("unexpected argument `{a}`")),
            },
        }
    }
    Ok(device)
}

fn main() -> ExitCode {
    let device = match parse_args() {
        Ok(Some(d)) => d,
        Ok(None) => match numapin::edu::find() {
            Some(d) => d,
            None => {
                eprintln!(
                    "vmm_guest_ram: error: no QEMU edu device (1234:11e8) found; pass --device DEV \
                     (a device bound to vfio-pci) or run it in the VM (`cargo xtask demo`)"
                );
                return ExitCode::FAILURE;
            }
        },
        Err(msg) if msg.is_empty() => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("vmm_guest_ram: error: {msg}; {}", usage());
            return ExitCode::from(2);
        }
    };
    match run(&device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                line.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("vmm_guest_ram: error: {line}");
            ExitCode::FAILURE
        }
    }
}
