//! NUMA balancing on a served region: no hinting faults on the pinned
//! pages while an unpinned control takes them.

use super::*;

/// The client's mapping (file range and offset) that holds `vaddr`, from
/// `/proc/PID/maps`: `(start, end, file offset of start)`.
pub(super) fn vma_of(pid: u32, vaddr: u64) -> Result<(u64, u64, u64), String> {
    let maps = e(std::fs::read_to_string(format!("/proc/{pid}/maps")), "maps")?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let parse = |x: &str| u64::from_str_radix(x, 16).map_err(|e| format!("maps {line:?}: {e}"));
        let (a, b, off) = (parse(a)?, parse(b)?, parse(off)?);
        if (a..b).contains(&vaddr) {
            return Ok((a, b, off));
        }
    }
    Err(format!("no mapping of pid {pid} holds {vaddr:#x}"))
}

/// Hinting faults on memory of the client's node that a thread touching
/// only the client's memory may take (on its own TLS, where the parent
/// thread placed it): at most this many. One scan pass over the client's
/// 4096 pages would take up to 4096.
pub(super) const BOUND_FAULTS_MAX: u64 = 64;

/// NUMA balancing against a service region. The runner maps the client's
/// pinned memfd itself (through `/proc/PID/map_files`, as root), resets the
/// file's shared policy to the default with `mbind` on that mapping (so the
/// node binding no longer keeps balancing away: only the pin does), and
/// touches it, with an anonymous control and an unpinned memfd control
/// treated like the client's, from the other node's CPUs while the scanner
/// runs fast. The anonymous control must migrate and the client's frames
/// must not change; whether the memfd control migrated says whether this
/// kernel's balancing attacks shmem at all (reported: 7.3's does, 6.1's does
/// not). A twin run touching only the controls for as long gives the
/// hinting faults attributable to the client's memory under that reset
/// (reported: vmstat counts every process's).
///
/// Before the reset, as the daemon serves it (bound to its node), a thread
/// on the other node that touches only the client's memory counts its own
/// hinting faults (`/proc/thread-self/sched`), beside a thread touching an
/// anonymous control, whose pages must move or whose thread must take
/// thousands of faults (balancing ran). The
/// client thread's faults on the client's node must stay at the level a
/// toucher takes on its own pages.
pub(super) fn numa_balancing(ctx: &Ctx) -> Result<String, String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const LEN: u64 = 16 << 20;
    let d = Daemon::start(ctx, CONFIG)?;
    let h = Holder::spawn(&d, &format!("{}:16M", ctx.home.0))?;
    let vaddr = h.hex("vaddr").ok_or("no vaddr")?;
    let snap = pfns_of(h.pid(), vaddr, LEN)?;
    let (start, end, off) = vma_of(h.pid(), vaddr)?;
    ensure!(
        end - vaddr >= LEN,
        "the client's mapping is shorter than its region"
    );
    let file = e(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/map_files/{start:x}-{end:x}", h.pid())),
        "open the client's memfd through map_files",
    )?;
    // SAFETY: a new shared mapping of the client's memfd; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            (off + (vaddr - start)) as libc::off_t,
        )
    };
    ensure!(
        map != libc::MAP_FAILED,
        "mmap of the memfd: {}",
        std::io::Error::last_os_error()
    );
    let _unmap = Unmap(map, LEN as usize);
    let addr = map as usize;
    ensure!(
        changed(&snap, &pfns(addr, LEN)?) == 0,
        "the runner's mapping of the memfd does not share the client's frames"
    );
    // First as served: the memfd keeps the daemon's binding. One thread on
    // the other node touches only the client's memory, another only an
    // anonymous control; each counts its own hinting faults, in all and on
    // memory of the client's node. THP is off for this process meanwhile:
    // on 6.1 a thread's stack can be a transparent huge page (6.8 made
    // MAP_STACK VM_NOHUGEPAGE), and one hinting fault on it counts 512.
    let bound = crate::balancing::with_fast_balancing(|| {
        use crate::type1::counted_toucher;
        let _thp = ThpOff::set()?;
        let control = control_region(ctx.home, LEN)?;
        let stop = Arc::new(AtomicBool::new(false));
        let home = ctx.home.0;
        let client_t = counted_toucher(
            (addr, LEN as usize),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        let control_t = counted_toucher(
            (control.addr(), LEN as usize),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        // The same loop over one page of its own: what a toucher takes on
        // its own stack, TLS and that page, beside the others.
        let page = control_region(ctx.home, 4096)?;
        let base_t = counted_toucher(
            (page.addr(), 4096),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
            let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096).unwrap_or_default();
            if t.elapsed() > Duration::from_secs(4)
                && on_node(&n, ctx.away) * 2 >= n.len()
                && !n.is_empty()
            {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096).unwrap_or_default();
        let moved = on_node(&n, ctx.away);
        let (cp, cf) = client_t.join().map_err(|_| "the client toucher panicked")?;
        let (kp, kf) = control_t
            .join()
            .map_err(|_| "the control toucher panicked")?;
        let (_, bf) = base_t.join().map_err(|_| "the baseline toucher panicked")?;
        let (Some(cf), Some(kf), Some(bf)) = (cf, kf, bf) else {
            return Err("this kernel shows no total_numa_faults in /proc/thread-self/sched".into());
        };
        Ok(Bound {
            secs: t.elapsed().as_secs_f64(),
            client: cf,
            client_passes: cp,
            control: kf.0,
            control_passes: kp,
            base: bf,
            control_moved: moved,
        })
    })?;
    // The scanner must have reached the control: its pages moved to the
    // toucher's node, or its thread took thousands of faults. The count
    // alone cannot say so: the kernel folds a task's faults into
    // total_numa_faults only at its placement pass, halving the old ones,
    // so a thread whose pages moved in one scan can show a hundred.
    ensure!(
        bound.control_moved * 2 >= LEN as usize / 4096 || bound.control >= 1024,
        "the control thread took only {} hinting faults in {:.0}s ({} passes) and {} of its {} pages moved to node {}: balancing did not run, so the client figure proves nothing",
        bound.control,
        bound.secs,
        bound.control_passes,
        bound.control_moved,
        LEN / 4096,
        ctx.away
    );
    let policy = std::fs::read_to_string("/proc/self/numa_maps")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{addr:x} ")))
        .unwrap_or("not in numa_maps")
        .to_string();
    // The client's memory is all on the home node; the thread's stack is
    // on the other one. Faults on home-node memory beyond the handful a
    // toucher takes on its own TLS and one page are the client's.
    let bound_note = format!(
        "{} hinting faults, {} of them on node {} (the client's), the one-page baseline thread {} and {}",
        bound.client.0, bound.client.1, ctx.home, bound.base.0, bound.base.1
    );
    ensure!(
        bound.client.1 <= BOUND_FAULTS_MAX,
        "the thread touching only the client's memory took {bound_note}: the bound shmem mapping took hinting faults ({policy})"
    );
    e(
        numapin::sys::mbind_default(addr, LEN as usize),
        "mbind MPOL_DEFAULT on the memfd",
    )?;
    crate::balancing::with_fast_balancing(|| {
        let control = control_region(ctx.home, LEN)?;
        let control_before = pfns(control.addr(), LEN)?;
        let (_shm_fd, shm) = memfd_control(ctx.home, LEN as usize)?;
        let shm_before = pfns(shm.0 as usize, LEN)?;
        let run = |ranges: Vec<(usize, usize)>, limit: Duration, until_moved: bool| {
            let (f0, m0) = (vmstat("numa_hint_faults"), vmstat("numa_pages_migrated"));
            let stop = Arc::new(AtomicBool::new(false));
            let t = Instant::now();
            let th = crate::type1::toucher(ranges, ctx.away_cpus.clone(), stop.clone());
            while t.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(500));
                if until_moved && t.elapsed() > Duration::from_secs(4) {
                    let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096)
                        .unwrap_or_default();
                    if on_node(&n, ctx.away) * 2 >= n.len() && !n.is_empty() {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let passes = th.join().unwrap_or(0);
            (
                t.elapsed(),
                vmstat("numa_hint_faults") - f0,
                vmstat("numa_pages_migrated") - m0,
                passes,
            )
        };
        let both = vec![
            (addr, LEN as usize),
            (control.addr(), LEN as usize),
            (shm.0 as usize, LEN as usize),
        ];
        let (secs, faults, migrated, passes) = run(both, Duration::from_secs(60), true);
        let cc = changed(&control_before, &pfns(control.addr(), LEN)?);
        let sc = changed(&shm_before, &pfns(shm.0 as usize, LEN)?);
        let client_after = pfns_of(h.pid(), vaddr, LEN)?;
        let pc = changed(&snap, &client_after);
        ensure!(
            pc == 0,
            "{pc} of the client's pinned frames changed under NUMA balancing"
        );
        let nodes = nodes_of_pid(h.pid(), vaddr, LEN, 4096)?;
        ensure!(
            on_node(&nodes, ctx.home) == nodes.len(),
            "{} client pages left node {}",
            nodes.len() - on_node(&nodes, ctx.home),
            ctx.home
        );
        ensure!(
            cc > 0 && migrated > 0,
            "the unpinned control did not migrate ({cc} PFNs changed, numa_pages_migrated +{migrated}, {faults} hinting faults in {:.0}s, {passes} passes): the attack proves nothing",
            secs.as_secs_f64()
        );
        // The client's region is shmem: only where an unpinned memfd
        // treated the same way migrates does the run attack it. 6.1's
        // balancing migrates none (7.3's all): there the anonymous control
        // alone shows balancing ran, and the detail says so.
        let shm_note = if sc > 0 {
            format!("memfd {sc}/{} (the attack reached shmem)", shm_before.len())
        } else {
            format!(
                "memfd 0/{}: this kernel's balancing does not migrate shmem, so it never tried the client's region",
                shm_before.len()
            )
        };
        let (_, twin_faults, _, _) = run(
            vec![
                (control.addr(), LEN as usize),
                (shm.0 as usize, LEN as usize),
            ],
            secs,
            false,
        );
        // vmstat counts every process's faults, so only an excess over the
        // twin says anything about the client's memory.
        let excess = match faults.checked_sub(twin_faults) {
            Some(n) if n > 0 => format!("{n} more than the twin"),
            _ => "no excess over the twin".to_string(),
        };
        Ok(format!(
            "as served (the daemon's binding): in {:.0}s the thread touching only the client's memory ({} passes) took {bound_note}, the control's {} ({}/{} of its pages moved); binding reset to the default: {:.0}s from node {}: client 0/{} frames changed; controls changed: anonymous {cc}/{}, {shm_note}; numa_pages_migrated +{migrated}; hinting faults {faults}, twin run touching only the controls {twin_faults}: {excess}",
            bound.secs,
            bound.client_passes,
            bound.control,
            bound.control_moved,
            LEN / 4096,
            secs.as_secs_f64(),
            ctx.away,
            snap.len(),
            control_before.len(),
        ))
    })
}

/// What the bound phase of [`numa_balancing`] saw: fault counts are
/// `(total, on the client's node)` maxima of the scheduler's windows.
pub(super) struct Bound {
    secs: f64,
    client: (u64, u64),
    client_passes: u64,
    control: u64,
    control_passes: u64,
    base: (u64, u64),
    control_moved: usize,
}

/// THP off for this process (`PR_SET_THP_DISABLE`) until dropped.
pub(super) struct ThpOff;

impl ThpOff {
    fn set() -> Result<ThpOff, String> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        ensure!(
            rc == 0,
            "prctl(PR_SET_THP_DISABLE): {}",
            std::io::Error::last_os_error()
        );
        Ok(ThpOff)
    }
}

impl Drop for ThpOff {
    fn drop(&mut self) {
        // SAFETY: as in `set`.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
    }
}

/// A mapping this runner made, unmapped on drop: `(address, length)`.
pub(super) struct Unmap(*mut libc::c_void, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: a mapping this runner made and no longer uses.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// An unpinned shmem memfd of `len` bytes mapped shared, faulted in on
/// `node` under `MPOL_BIND`, then with its shared policy reset to the
/// default: the client's region as numapind makes it, without the pin.
pub(super) fn memfd_control(node: numapin::NodeId, len: usize) -> Result<(OwnedFd, Unmap), String> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create returns a new fd this function then owns.
    let fd = unsafe { libc::memfd_create(c"numapin-control".as_ptr(), libc::MFD_CLOEXEC) };
    ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is open and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes the memfd this function owns.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    ensure!(r == 0, "ftruncate: {}", std::io::Error::last_os_error());
    // SAFETY: a new shared mapping of that memfd, owned by the `Unmap`.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    ensure!(
        p != libc::MAP_FAILED,
        "mmap memfd control: {}",
        std::io::Error::last_os_error()
    );
    let m = Unmap(p, len);
    e(
        numapin::sys::mbind(p as usize, len, node, 0),
        "mbind the memfd control",
    )?;
    for off in (0..len).step_by(4096) {
        // SAFETY: inside the mapping just made; volatile, no reference.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(off), 1) };
    }
    e(
        numapin::sys::mbind_default(p as usize, len),
        "mbind MPOL_DEFAULT on the memfd control",
    )?;
    let nodes = e(
        numapin::numa::nodes_of(p as usize, len, 4096),
        "memfd control nodes",
    )?;
    ensure!(
        on_node(&nodes, node) == nodes.len(),
        "memfd control: {} of {} pages on node {node}",
        on_node(&nodes, node),
        nodes.len()
    );
    Ok((fd, m))
}
