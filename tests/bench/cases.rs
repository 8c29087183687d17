//! One phase per page mode and region size: the floor, numapin's two paths,
//! per-page mapping, io_uring, prefault with one and with several threads,
//! and the DMA mappings a region costs.

use std::time::{Duration, Instant};

use numapin::numa::{NodeMemory, Topology};
use numapin::{PinRequest, Pinner};

use crate::raw::{self, IOVA_BASE, RawVfio, Uring};
use crate::{Ctx, Mode, Out, size_name};

/// Repetitions: `fast` for figures of a few ioctls, `slow` for those that
/// fault the whole region in or map it page by page.
struct Reps {
    fast: usize,
    slow: usize,
    /// Rounds of prefault runs (one thread, node threads, the raw split):
    /// their ratio is a target, and on this host two busy vCPUs run in one
    /// of two speeds (about 260 or 315 ms for base 256M) by chance.
    prefault: usize,
}

fn reps(size: u64) -> Reps {
    // The round-by-round ratios of a few-millisecond pin spread over
    // 0.8-1.4x in the TCG VM: small regions, which cost little, take more
    // rounds for a median that holds from run to run.
    match size {
        s if s <= 64 << 20 => Reps {
            fast: 21,
            slow: 4,
            prefault: 11,
        },
        s if s <= 256 << 20 => Reps {
            fast: 15,
            slow: 4,
            prefault: 11,
        },
        _ => Reps {
            fast: 7,
            slow: 4,
            prefault: 7,
        },
    }
}

/// Bytes of this process's anonymous memory in transparent hugepages.
fn anon_huge_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let v = l.strip_prefix("AnonHugePages:")?.trim();
            v.strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

fn e<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|err| format!("{what}: {err}"))
}

pub fn run(ctx: &Ctx, out: &mut Out, mode: Mode, size: u64) -> Result<String, String> {
    mode.apply()?;
    let reps = reps(size);
    let len = size as usize;
    let ps = mode.page_size();
    let topo = e(Topology::read(), "topology")?;
    let tag = format!("{}.{}", mode.name(), size_name(size));
    if mode != Mode::Base {
        base_page_register(out, mode, size, ctx, reps.fast)?;
        mode.apply()?;
    }
    let thp0 = anon_huge_bytes();
    // The caller memory every "on prefaulted memory" figure maps.
    let mem = e(
        NodeMemory::allocate(&topo, ctx.home, size, ps, 0, None, None),
        "allocate caller memory",
    )?;
    let thp = anon_huge_bytes().saturating_sub(thp0);
    out.info(&format!("{tag}.thp_bytes"), thp);
    match mode {
        Mode::Thp if thp < size / 2 => {
            return Err(format!(
                "THP mode, but only {} of {} MiB came in transparent hugepages",
                thp >> 20,
                size >> 20
            ));
        }
        Mode::Base if thp > 0 => {
            return Err(format!(
                "base-page mode, but {} MiB came in transparent hugepages",
                thp >> 20
            ));
        }
        _ => {}
    }

    // --- io_uring's long-term pin of the same memory: the raw
    // registration and numapin's `UringPin` in the same rounds, the order
    // alternating, round 0 a warm-up. ---
    {
        let ring = Uring::new()?;
        let mut reg = Vec::new();
        let mut unreg = Vec::new();
        let mut pin = Vec::new();
        let mut unpin = Vec::new();
        let mut rings = 0;
        for i in 0..=reps.fast {
            for step in [i % 2, 1 - i % 2] {
                if step == 0 {
                    // SAFETY: `mem` outlives the calls.
                    let (r, u) = unsafe { ring.register_unregister(mem.addr(), len) }?;
                    if i > 0 {
                        reg.push(r);
                        unreg.push(u);
                    }
                } else {
                    let (p, r, n) = numapin_uring_pin(mode, size, &mem)?;
                    rings = n;
                    if i > 0 {
                        pin.push(p);
                        unpin.push(r);
                    }
                }
            }
        }
        out.seconds(mode, size, "uring.register", &reg);
        out.seconds(mode, size, "uring.unregister", &unreg);
        out.seconds(mode, size, "numapin.uring-pin", &pin);
        out.seconds(mode, size, "numapin.uring-release", &unpin);
        out.count(mode, size, "numapin.uring-rings", rings as f64);
        out.count(
            mode,
            size,
            "numapin.uring-fds-per-gib",
            numapin::uring::fds_per_gib(mode.page_size()) as f64,
        );
        // The same registration in rings of a fixed size, each ring set up
        // inside the timing: where the cost per byte stops depending on
        // the bytes per ring.
        // At one size only: on 6.1 every ring's unregister waits a grace
        // period (about 18 ms), so the sweep at every size would take the
        // full bench past its VM's time limit.
        for ring_bytes in RING_SWEEP {
            if ring_bytes >= size || size != RING_SWEEP_SIZE {
                continue;
            }
            let mut reg = Vec::new();
            let mut unreg = Vec::new();
            for i in 0..=reps.fast {
                // SAFETY: as above.
                let (r, u) = unsafe { register_in_rings(mem.addr(), len, ring_bytes as usize) }?;
                if i > 0 {
                    reg.push(r);
                    unreg.push(u);
                }
            }
            let name = size_name(ring_bytes);
            out.seconds(mode, size, &format!("uring.register.rings-{name}"), &reg);
            out.seconds(
                mode,
                size,
                &format!("uring.unregister.rings-{name}"),
                &unreg,
            );
        }
    }

    // --- Without numapin and with it, on one container: the raw ioctls
    // and numapin's pin on the same container, timed side by side. ---
    let mut floor_map = Vec::new();
    let mut floor_unmap = Vec::new();
    let mut pin_only = Vec::new();
    let mut release = Vec::new();
    let mut pin_proved = Vec::new();
    let mut pin_nonode = Vec::new();
    let mut pin_unpriv = Vec::new();
    let mut entries = 0;
    // Heap the full proof's PFN snapshot holds for the region's life.
    let mut snapshot_bytes = 0;
    {
        let raw = RawVfio::open(&ctx.sysfs)?;
        let avail0 = raw.dma_avail()?;
        // SAFETY (all maps below): `mem` stays mapped until after the unmaps,
        // and this code holds no references into it.
        // Warm-up (first-touch effects in the IOMMU page tables).
        unsafe { raw.map(IOVA_BASE, mem.addr(), len) }?;
        let raw_entries = avail0 - raw.dma_avail()?;
        raw.unmap(IOVA_BASE, len)?;
        out.count(mode, size, "entries.raw", raw_entries as f64);

        // One MAP_DMA per page, as DPDK maps one per memseg.
        let page = mode.dma_page();
        let n = size / page;
        out.count(mode, size, "entries.per-page", n as f64);
        if n > u64::from(avail0) {
            out.info(
                &format!("{tag}.per-page"),
                format!(
                    "not measured: {n} pages of {} KiB need {n} DMA mappings, the container has {avail0}",
                    page >> 10
                ),
            );
        } else {
            let mut map = Vec::new();
            let mut unmap = Vec::new();
            for _ in 0..reps.slow {
                let t = Instant::now();
                for i in 0..n {
                    let off = i * page;
                    unsafe { raw.map(IOVA_BASE + off, mem.addr() + off as usize, page as usize) }?;
                }
                map.push(t.elapsed());
                let t = Instant::now();
                for i in 0..n {
                    raw.unmap(IOVA_BASE + i * page, page as usize)?;
                }
                unmap.push(t.elapsed());
            }
            out.seconds(mode, size, "per-page.map", &map);
            out.seconds(mode, size, "per-page.unmap", &unmap);
        }

        // numapin on the raw figures' own container (a VMM's container,
        // `Pinner::with_type1_container`): the same ioctl on the same
        // container, so what is left between the two is numapin's.
        let pinner = e(
            Pinner::with_type1_container(raw.container_fd(), None),
            "Pinner::with_type1_container",
        )?;
        let avail = |p: &Pinner| -> Result<u32, String> {
            e(p.refresh_info(), "GET_INFO")?
                .and_then(|i| i.dma_avail)
                .ok_or_else(|| "no DMA_AVAIL".to_string())
        };
        // Each round times the raw MAP_DMA/UNMAP_DMA pair (the floor) and
        // four numapin pins of the same memory: `Proof::None` (the pin call
        // alone, the VMM fast path), the default full proof with the node
        // checked, the full proof without a node, and the full proof as a
        // caller without CAP_SYS_ADMIN. The floor is in every round, so a
        // round's ratio does not depend on how fast the VM ran in another
        // (the verdicts take the median of the rounds' ratios); the order
        // in a round rotates, and runs backwards every other round, so that
        // none always follows the same one.
        // Every pin maps at the floor's IOVA, as a VMM passes its
        // guest-physical address: how the IOMMU can lay out a range
        // depends on the IOVA (superpages need it to agree with the
        // physical address), and that is not numapin's cost.
        const STEPS: usize = 5;
        for i in 0..=reps.fast {
            for k in 0..STEPS {
                let k = if i % 2 == 1 { STEPS - 1 - k } else { k };
                let step = (k + i) % STEPS;
                if step == 0 {
                    let m = unsafe { raw.map(IOVA_BASE, mem.addr(), len) }?;
                    let u = raw.unmap(IOVA_BASE, len)?;
                    // Round 0 warms up.
                    if i > 0 {
                        floor_map.push(m);
                        floor_unmap.push(u);
                    }
                    continue;
                }
                let variant = step - 1;
                let (node, proof) = match variant {
                    0 => (None, numapin::Proof::None),
                    1 | 3 => (Some(ctx.home), numapin::Proof::Full),
                    _ => (None, numapin::Proof::Full),
                };
                let m = numapin::PinRequest {
                    node,
                    page_size: ps,
                    proof,
                    iova: Some(numapin::Iova(IOVA_BASE)),
                    ..numapin::PinRequest::any_node(size)
                };
                let before = avail(&pinner)?;
                // Variant 3: the same proof as a caller without
                // CAP_SYS_ADMIN, whose pagemap shows no frames (the proof
                // asks move_pages; capabilities are per thread, and pagemap
                // checks its opener's at open).
                let _unprivileged = if variant == 3 {
                    Some(crate::caps::Effective::lower(&[
                        crate::caps::CAP_SYS_ADMIN,
                    ])?)
                } else {
                    None
                };
                let t = Instant::now();
                // SAFETY: `mem` stays mapped until after the release below
                // and is not referenced while pinned.
                let r = unsafe { pinner.pin_user(mem.as_ptr(), &m) };
                let d = t.elapsed();
                drop(_unprivileged);
                let r = e(r, "pin_user")?;
                if variant == 3 && r.pinned_frames().is_some() {
                    return Err(
                        "the unprivileged pin saw the frames: CAP_SYS_ADMIN was not dropped".into(),
                    );
                }
                if variant == 0 {
                    entries = before - avail(&pinner)?;
                }
                if variant == 1 {
                    snapshot_bytes = r.pinned_frames().map_or(0, |f| f.heap_bytes());
                }
                let t = Instant::now();
                e(r.release(), "release")?;
                let rd = t.elapsed();
                if i > 0 {
                    match variant {
                        0 => {
                            pin_only.push(d);
                            release.push(rd);
                        }
                        1 => pin_proved.push(d),
                        2 => pin_nonode.push(d),
                        _ => pin_unpriv.push(d),
                    }
                }
            }
        }
        // The pinner's duplicate of the container fd goes before the
        // group: nothing of this container is left for `Pinner::open`.
        drop(pinner);
    }
    out.seconds(mode, size, "floor.map", &floor_map);
    out.seconds(mode, size, "floor.unmap", &floor_unmap);
    out.count(mode, size, "entries.numapin", entries as f64);
    out.count(mode, size, "numapin.snapshot-bytes", snapshot_bytes as f64);
    out.seconds(mode, size, "numapin.pin-only", &pin_only);
    out.seconds(mode, size, "numapin.pin-proved", &pin_proved);
    out.seconds(mode, size, "numapin.pin-only.no-node", &pin_nonode);
    out.seconds(mode, size, "numapin.pin-proved.unprivileged", &pin_unpriv);
    out.seconds(mode, size, "numapin.release", &release);
    // What pin-only does besides the ioctl, each step timed alone on the
    // same memory: the PFN snapshot from pagemap as the proof reads it (one
    // entry per hugetlb page), the move_pages node query
    // at the region's page size, and one VmLck read (it reads two).
    let (mut pfns, mut nodes, mut vmlck) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps.fast {
        let t = Instant::now();
        e(
            numapin::phys::pfns_by_page(mem.addr() as u64, size, ps.bytes()),
            "pagemap",
        )?;
        pfns.push(t.elapsed());
        let t = Instant::now();
        e(
            numapin::numa::nodes_of(mem.addr(), len, ps.bytes()),
            "nodes_of",
        )?;
        nodes.push(t.elapsed());
        let t = Instant::now();
        e(numapin::sys::locked_bytes(), "VmLck")?;
        vmlck.push(t.elapsed());
    }
    out.seconds(mode, size, "step.pagemap-pfns", &pfns);
    out.seconds(mode, size, "step.node-query", &nodes);
    out.seconds(mode, size, "step.vmlck-read", &vmlck);
    drop(mem);

    // Allocate + prefault + pin + verify, numapin's own memory, on a
    // device numapin opens (the backend `Pinner::open` chooses).
    let pinner = e(Pinner::open(&ctx.bdf), "Pinner::open")?;
    let mut full = Vec::new();
    let mut verify = Vec::new();
    for _ in 0..reps.slow {
        let t = Instant::now();
        let r = e(
            pinner.pin(&PinRequest {
                page_size: ps,
                ..PinRequest::new(ctx.home, size)
            }),
            "pin",
        )?;
        let tv = Instant::now();
        let v = e(r.verify(), "verify")?;
        verify.push(tv.elapsed());
        full.push(t.elapsed());
        if !v.is_intact() || r.len() != size {
            return Err(format!("pinned region not intact: {v:?}"));
        }
        e(r.release(), "release")?;
    }
    out.seconds(mode, size, "numapin.alloc-pin-verify", &full);
    out.seconds(mode, size, "numapin.verify", &verify);
    drop(pinner);

    // Prefault with one thread against one per CPU of the node; which goes
    // first alternates, so that neither always finds the other's leftovers.
    let mut one = Vec::new();
    let mut all = Vec::new();
    let mut split = Vec::new();
    for i in 0..reps.prefault {
        split.push(raw::prefault_split(ctx.home, &ctx.home_cpus, len, ps)?);
        let order = if i % 2 == 0 { [1, 0] } else { [0, 1] };
        for threads in order {
            let t = Instant::now();
            let m = e(
                NodeMemory::allocate(&topo, ctx.home, size, ps, threads, None, None),
                "allocate",
            )?;
            let d = t.elapsed();
            drop(m);
            if threads == 1 {
                one.push(d)
            } else {
                all.push(d)
            }
        }
    }
    out.seconds(mode, size, "prefault.1-thread", &one);
    out.seconds(mode, size, "prefault.node-threads", &all);
    out.seconds(mode, size, "prefault.raw-split", &split);
    out.count(mode, size, "prefault.threads", ctx.home_cpus.len() as f64);

    let med = |v: &[Duration]| {
        let mut s: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    Ok(format!(
        "floor {:.2} ms, pin-only {:.2} ms, alloc+pin+verify {:.0} ms, prefault 1/{} threads {:.0}/{:.0} ms, {entries} DMA mapping(s)",
        med(&floor_map) * 1e3,
        med(&pin_only) * 1e3,
        med(&full) * 1e3,
        ctx.home_cpus.len(),
        med(&one) * 1e3,
        med(&all) * 1e3,
    ))
}

/// Ring sizes the raw registration is also measured in.
const RING_SWEEP: [u64; 4] = [4 << 20, 16 << 20, 32 << 20, 64 << 20];
/// The one region size the ring sweep runs at.
const RING_SWEEP_SIZE: u64 = 1 << 30;

/// Raw `IORING_REGISTER_BUFFERS` of `[addr, addr+len)` in rings of `ring`
/// bytes (buffers of at most 1 GiB), each ring's `io_uring_setup` timed
/// with its registration: bare rings (the fd only, no SQ/CQ mapped), as
/// numapin makes them. Then every ring unregisters, one after the other,
/// and closes: (register, unregister).
///
/// # Safety
/// The memory must stay mapped until this returns.
unsafe fn register_in_rings(
    addr: usize,
    len: usize,
    ring: usize,
) -> Result<(Duration, Duration), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let register = |fd: &OwnedFd, opcode: u32, arg: *const libc::iovec, n: u32| {
        // SAFETY: opcode 0 (IORING_REGISTER_BUFFERS) reads `n` iovecs at
        // `arg`, 1 (UNREGISTER) reads nothing.
        let rc =
            unsafe { libc::syscall(libc::SYS_io_uring_register, fd.as_raw_fd(), opcode, arg, n) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let t = Instant::now();
    let mut rings = Vec::new();
    let mut off = 0;
    while off < len {
        let n = ring.min(len - off);
        let iovecs: Vec<libc::iovec> = (off..off + n)
            .step_by(1 << 30)
            .map(|o| libc::iovec {
                iov_base: (addr + o) as *mut libc::c_void,
                iov_len: (1usize << 30).min(off + n - o),
            })
            .collect();
        // struct io_uring_params: 120 bytes, zero asks for defaults.
        let mut params = [0u32; 30];
        // SAFETY: params is as large as the kernel's struct.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if fd < 0 {
            return Err(format!(
                "io_uring_setup: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh fd of our own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The caller keeps the memory mapped; unregistered below.
        register(&fd, 0, iovecs.as_ptr(), iovecs.len() as u32)
            .map_err(|e| format!("IORING_REGISTER_BUFFERS of {n:#x} bytes: {e}"))?;
        rings.push(fd);
        off += n;
    }
    let reg = t.elapsed();
    let t = Instant::now();
    for fd in &rings {
        register(fd, 1, std::ptr::null(), 0)
            .map_err(|e| format!("IORING_UNREGISTER_BUFFERS: {e}"))?;
    }
    let unreg = t.elapsed();
    Ok((reg, unreg))
}

/// The figure every io_uring pin is judged against: raw
/// `IORING_REGISTER_BUFFERS` (buffers of at most 1 GiB, one ring) of the
/// same amount of base-page memory on the same node, with transparent
/// hugepages off while it is allocated (the caller restores the mode).
/// Not measured (and said so) when the node has no room for it.
fn base_page_register(
    out: &mut Out,
    mode: Mode,
    size: u64,
    ctx: &Ctx,
    reps: usize,
) -> Result<(), String> {
    let tag = format!("{}.{}", mode.name(), size_name(size));
    let topo = e(Topology::read(), "topology")?;
    let free = topo.require(ctx.home).map_or(0, |n| n.mem_free);
    if free < size + (512 << 20) {
        out.info(
            &format!("{tag}.uring.register.base-pages"),
            format!(
                "not measured: needs {} MiB free, node has {} MiB",
                (size + (512 << 20)) >> 20,
                free >> 20
            ),
        );
        return Ok(());
    }
    Mode::Base.apply()?;
    let thp0 = anon_huge_bytes();
    let mem = e(
        NodeMemory::allocate(&topo, ctx.home, size, Mode::Base.page_size(), 0, None, None),
        "allocate base-page memory",
    )?;
    let thp = anon_huge_bytes().saturating_sub(thp0);
    if thp > 0 {
        return Err(format!(
            "the base-page reference memory came with {} MiB in transparent hugepages",
            thp >> 20
        ));
    }
    let ring = Uring::new()?;
    // SAFETY: `mem` outlives the calls.
    unsafe { ring.register_unregister(mem.addr(), size as usize) }?;
    let mut reg = Vec::new();
    for _ in 0..reps {
        // SAFETY: as above.
        reg.push(unsafe { ring.register_unregister(mem.addr(), size as usize) }?.0);
    }
    out.seconds(mode, size, "uring.register.base-pages", &reg);
    Ok(())
}

/// numapin's own io_uring long-term pin (the path for mdev and no-IOMMU
/// containers, which `MAP_DMA` does not pin) of `mem`, once: the library's
/// `UringPin`, its release, and the rings (descriptors) it kept.
fn numapin_uring_pin(
    mode: Mode,
    size: u64,
    mem: &NodeMemory,
) -> Result<(Duration, Duration, usize), String> {
    let t = Instant::now();
    // SAFETY: `mem` stays mapped until after the release below.
    let p = e(
        unsafe { numapin::uring::UringPin::new(mem.as_ptr(), size, mode.page_size()) },
        "UringPin::new",
    )?;
    let pin = t.elapsed();
    let rings = p.rings();
    let t = Instant::now();
    e(p.release(), "UringPin::release")?;
    Ok((pin, t.elapsed(), rings))
}
