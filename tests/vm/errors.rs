//! Scenario h: every failure names its true cause. Each scenario provokes
//! one input of a kind that used to get a wrong, a vague or no diagnosis,
//! and checks the message's key facts, the exit code of its class, and that
//! nothing was left behind.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use numapin::error::MisplacedCause;
use numapin::{Cancel, Error, NodeId, PageSize, PinRequest, Pinner, Proof};

use crate::Scenario;
use crate::bad_input::{DEVICE_STATE, RESOURCE, USAGE, as_pinner, as_user_1000, check_err};
use crate::ensure;
use crate::util::*;

/// The exit code of a run cancelled by SIGINT and by SIGTERM.
const BY_SIGINT: i32 = 128 + libc::SIGINT;
const BY_SIGTERM: i32 = 128 + libc::SIGTERM;

/// Scenarios for every suite whose device pins through VFIO type1.
pub fn type1() -> Vec<(&'static str, Scenario)> {
    let mut v: Vec<(&'static str, Scenario)> = vec![
        ("h.lib.misplaced-not-bound", misplaced_not_bound),
        ("h.lib.misplaced-moved-before-pin", misplaced_moved),
        ("h.lib.dma-entries", dma_entries),
        ("h.cli.numbers-that-differ", numbers_differ),
        ("h.cli.unbind-held", unbind_held),
    ];
    v.extend(common());
    v
}

/// Scenarios for every suite.
pub fn common() -> Vec<(&'static str, Scenario)> {
    vec![
        ("h.cli.device-strings", device_strings),
        ("h.lib.read-only-memory", read_only),
        ("h.lib.unmapped-memory", unmapped),
        ("h.cli.node-short", node_short),
        ("h.cli.bystander-survives", bystander),
        ("h.lib.hugepages-reserved", hugepages_reserved),
        ("h.cli.cgroup-limit", cgroup_limit),
        ("h.cli.cancel-sigint", |c| cancel_by(c, libc::SIGINT)),
        ("h.cli.cancel-sigterm", |c| cancel_by(c, libc::SIGTERM)),
        ("h.lib.cancel-handle", cancel_handle),
    ]
}

/// Scenarios for the io_uring pin (mdev-only and no-IOMMU).
pub fn uring() -> Vec<(&'static str, Scenario)> {
    vec![("h.cli.ring-fds", ring_fds)]
}

/// Anonymous memory this test maps itself (`prot`), unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, prot: i32) -> Result<Mapping, String> {
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure!(
            p != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Faults every page in from the calling thread.
    fn touch(&self) {
        for off in (0..self.len).step_by(4096) {
            // SAFETY: inside our own writable mapping; no references to it.
            unsafe { std::ptr::write_volatile(self.ptr.add(off), 1) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no region pins it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

const SMALL: u64 = 4 << 20;

/// Pins `m` as caller memory that must be on `node`; wants an error.
fn pin_user_err(p: &Pinner, m: &Mapping, node: Option<NodeId>) -> Result<Error, String> {
    let req = PinRequest {
        node,
        ..PinRequest::any_node(m.len as u64)
    };
    // SAFETY: `m` outlives the region (which is dropped at once if made).
    match unsafe { p.pin_user(m.ptr, &req) } {
        Ok(r) => {
            drop(r);
            Err("the pin succeeded".into())
        }
        Err(e) => Ok(e),
    }
}

/// A pinner, and caller memory bound to `node` and faulted in there.
fn bound_memory(ctx: &Ctx, node: NodeId) -> Result<(Pinner, Mapping), String> {
    let p = e(Pinner::open(&ctx.bdf), "open")?;
    let m = Mapping::new(SMALL as usize, libc::PROT_READ | libc::PROT_WRITE)?;
    e(
        numapin::sys::mbind(m.ptr as usize, m.len, node, 0),
        &format!("mbind to node {node}"),
    )?;
    m.touch();
    Ok((p, m))
}

/// Caller memory placed on the away node and not bound to the home node:
/// the cause is the policy, not ZONE_MOVABLE.
fn misplaced_not_bound(ctx: &Ctx) -> Result<String, String> {
    let (p, m) = bound_memory(ctx, ctx.away)?;
    let lck = vmlck();
    let err = pin_user_err(&p, &m, Some(ctx.home))?;
    ensure!(vmlck() == lck, "VmLck {lck} -> {}", vmlck());
    let Error::Misplaced { cause, .. } = &err else {
        return Err(format!("wanted Misplaced, got: {err}"));
    };
    ensure!(
        matches!(cause, MisplacedCause::NotBound { policy } if policy.contains(&format!("bind to node {}", ctx.away))),
        "cause: {cause:?}"
    );
    let msg = err.to_string();
    ensure!(
        msg.contains("not bound to that node") && !msg.contains("ZONE_MOVABLE/CMA while pinning"),
        "{msg}"
    );
    Ok(msg)
}

/// Memory bound to the home node that another call moved before the pin:
/// numapin cannot know who moved it and says so.
fn misplaced_moved(ctx: &Ctx) -> Result<String, String> {
    let (p, m) = bound_memory(ctx, ctx.home)?;
    let moved = e(
        numapin::numa::move_range(m.ptr as usize, m.len, 4096, ctx.away),
        "move_pages to away",
    )?;
    ensure!(moved.moved > 0, "move_pages moved nothing: {moved:?}");
    let err = pin_user_err(&p, &m, Some(ctx.home))?;
    let Error::Misplaced { cause, .. } = &err else {
        return Err(format!("wanted Misplaced, got: {err}"));
    };
    // The VM's nodes have no ZONE_MOVABLE or CMA: nothing a pin migrates.
    ensure!(
        *cause == MisplacedCause::Unknown,
        "cause {cause:?} (zones: {:?})",
        numapin::numa::movable_memory(ctx.home)
    );
    ensure!(err.to_string().contains("unknown to numapin"), "{err}");
    Ok(err.to_string())
}

fn device_strings(_: &Ctx) -> Result<String, String> {
    let cases: &[(&str, &str)] = &[
        ("", "the device argument is empty"),
        ("/sys/bus/pci/devices", "not in the sysfs device tree"),
        ("/etc/passwd", "/etc/passwd is not in the sysfs device tree"),
        ("../../..", "not in the sysfs device tree"),
        ("00:03", "is neither a PCI address"),
        (
            "/sys/devices/system/cpu/cpu0",
            "a `cpu` device, not a PCI function or an mdev",
        ),
    ];
    for (spec, want) in cases {
        let (code, out, err) = run_cli(&["info", "--device", spec])?;
        check_err(code, USAGE, &out, &err, want).map_err(|e| format!("`{spec}`: {e}"))?;
        ensure!(
            !err.contains("IOMMU group") && !err.contains("numapin bind"),
            "`{spec}` blames the IOMMU: {err}"
        );
    }
    Ok(format!(
        "{} strings, each named for what it is",
        cases.len()
    ))
}

/// `PROT_READ` memory: the kernel answers EFAULT, numapin says why.
fn read_only(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let m = Mapping::new(SMALL as usize, libc::PROT_READ)?;
    let before = ctx.pinned();
    let err = pin_user_err(&p, &m, None)?;
    ensure!(ctx.pinned() == before, "pinned memory grew");
    ensure!(
        matches!(err, Error::NotPinnable { .. }),
        "wanted NotPinnable, got: {err}"
    );
    let msg = err.to_string();
    ensure!(
        msg.contains("(r--p")
            && msg.contains("is not writable")
            && msg.contains("PROT_READ|PROT_WRITE"),
        "{msg}"
    );
    Ok(msg)
}

fn unmapped(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let m = Mapping::new(2 * SMALL as usize, libc::PROT_READ | libc::PROT_WRITE)?;
    // Unmap the second half: the range has a hole where it ends.
    // SAFETY: inside our own mapping; nothing refers to it.
    unsafe { libc::munmap(m.ptr.add(SMALL as usize).cast(), SMALL as usize) };
    let req = PinRequest::any_node(2 * SMALL);
    // SAFETY: the pin is refused (part of the range is not mapped).
    let err = match unsafe { p.pin_user(m.ptr, &req) } {
        Ok(_) => return Err("a half-unmapped range was pinned".into()),
        Err(e) => e,
    };
    let hole = m.ptr as u64 + SMALL;
    let msg = err.to_string();
    ensure!(
        msg.contains(&format!("nothing is mapped at {hole:#x}")),
        "{msg}"
    );
    // The first half stays ours; Drop unmaps the whole range (munmap of a
    // hole is harmless).
    Ok(msg)
}

/// More than the node has: refused before anything is allocated. More than
/// its memory in all is a usage error (exit 2); more than it can give now,
/// with the numbers, a resource limit (exit 4).
fn node_short(ctx: &Ctx) -> Result<String, String> {
    let pin = |size: &str| {
        run_cli(&[
            "pin",
            "--device",
            &ctx.device,
            "--hold",
            "0",
            "--region",
            &format!("{}:{size}", ctx.home.0),
        ])
    };
    let (code, out, err) = pin("3G")?;
    check_err(code, USAGE, &out, &err, "but it has")?;
    let free0 = node_mem_free_kb(ctx.home);
    // Within the node's memory, beyond what it has free (the hugepage pools
    // hold most of the VM's nodes).
    let (code, out, err) = pin("1200M")?;
    check_err(
        code,
        RESOURCE,
        &out,
        &err,
        &format!(
            "node {} cannot give 1.2 GiB more of 1.2 GiB without the OOM killer",
            ctx.home.0
        ),
    )?;
    ensure!(
        err.contains("free +") && err.contains("watermarks"),
        "no numbers: {err}"
    );
    let free1 = node_mem_free_kb(ctx.home);
    ensure!(
        free1 + (64 << 10) >= free0,
        "node free memory fell from {free0} kB to {free1} kB"
    );
    Ok(err.trim().to_string())
}

/// A bystander holds most of the node; numapin must refuse, and the
/// bystander must live.
fn bystander(ctx: &Ctx) -> Result<String, String> {
    let avail = node_mem_free_kb(ctx.home) << 10;
    // Leave about 96 MiB free on the node.
    let take = avail.saturating_sub(96 << 20) & !0xfff;
    ensure!(
        take > 64 << 20,
        "node {} has only {avail} bytes free",
        ctx.home
    );
    let home = ctx.home;
    // The bystander is a fork of this runner that never execs (exec would
    // drop its memory): it maps, binds to the node, faults in, and waits.
    // SAFETY: fork in a single-purpose child that only touches memory and
    // sleeps; it never returns into Rust code that could observe state.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain system calls on the child's own fresh mapping.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                take as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                let mask: libc::c_ulong = 1 << home.0;
                libc::syscall(libc::SYS_mbind, p, take as usize, 2, &mask, 64usize, 0u32);
                libc::madvise(p, take as usize, numapin::sys::MADV_POPULATE_WRITE);
            }
            libc::pause();
            libc::_exit(0);
        }
    }
    let res = (|| {
        // Wait until the bystander's memory is in.
        let deadline = Instant::now() + Duration::from_secs(30);
        while node_mem_free_kb(home) << 10 > avail - take / 2 {
            ensure!(
                Instant::now() < deadline,
                "the bystander never faulted its memory in"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        let (code, out, err) = run_cli(&[
            "pin",
            "--device",
            &ctx.device,
            "--hold",
            "0",
            "--region",
            &format!("{}:400M", home.0),
        ])?;
        check_err(code, RESOURCE, &out, &err, "without the OOM killer")?;
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        ensure!(alive, "the bystander (pid {pid}) died");
        Ok(format!(
            "bystander holding {} MiB lives; {}",
            take >> 20,
            err.trim()
        ))
    })();
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    res
}

/// Hugepages free on the node but reserved by another mapping.
fn hugepages_reserved(ctx: &Ctx) -> Result<String, String> {
    let topo = e(numapin::numa::Topology::read(), "topology")?;
    let free: u64 = topo
        .nodes
        .iter()
        .filter_map(|n| n.pool(PageSize::Huge2M).map(|p| p.free))
        .sum();
    let home_free = topo
        .node(ctx.home)
        .and_then(|n| n.pool(PageSize::Huge2M))
        .map_or(0, |p| p.free);
    ensure!(
        home_free >= 8 && free >= 16,
        "2M pools too small: {free} free, {home_free} on home"
    );
    // Reserve all but 4 pages without touching them (MAP_HUGETLB reserves
    // at mmap time).
    let hold = (free - 4) as usize * (2 << 20);
    // SAFETY: a fresh hugetlb mapping, never touched.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            hold,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_HUGETLB
                | (21 << libc::MAP_HUGE_SHIFT),
            -1,
            0,
        )
    };
    ensure!(
        r != libc::MAP_FAILED,
        "reserve: {}",
        std::io::Error::last_os_error()
    );
    let res = (|| {
        let p = e(Pinner::open(&ctx.device), "open")?;
        let req = PinRequest {
            page_size: PageSize::Huge2M,
            ..PinRequest::new(ctx.home, 16 << 20)
        };
        let err = match p.pin(&req) {
            Ok(_) => return Err("pinned hugepages that others hold in reserve".into()),
            Err(e) => e,
        };
        ensure!(
            matches!(err, Error::HugepagesReserved { needed: 8, .. }),
            "wanted HugepagesReserved, got: {err}"
        );
        Ok(err.to_string())
    })();
    // SAFETY: our own mapping.
    unsafe { libc::munmap(r, hold) };
    res
}

/// `memory.max` of a cgroup refuses what the node would give.
fn cgroup_limit(ctx: &Ctx) -> Result<String, String> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        std::fs::create_dir_all(root).ok();
        let (src, dst, ty) = (c"cgroup2", c"/sys/fs/cgroup", c"cgroup2");
        // SAFETY: valid C strings; mounting cgroup2 has no memory effects.
        let r =
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
        ensure!(r == 0, "mount cgroup2: {}", std::io::Error::last_os_error());
    }
    e(
        std::fs::write(root.join("cgroup.subtree_control"), "+memory"),
        "enable the memory controller",
    )?;
    let cg = root.join("numapin-h");
    let _ = std::fs::create_dir(&cg);
    let res = (|| {
        e(
            std::fs::write(cg.join("memory.max"), "33554432"),
            "memory.max",
        )?;
        let procs = cg.join("cgroup.procs");
        let mut cmd = numapin();
        cmd.args([
            "pin",
            "--device",
            &ctx.device,
            "--hold",
            "0",
            "--region",
            &format!("{}:64M", ctx.home.0),
        ]);
        let procs_c = std::ffi::CString::new(procs.to_str().unwrap_or_default()).expect("path");
        // SAFETY: between fork and exec only open/write/close run.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let out = e(cmd.output(), "run numapin in the cgroup")?;
        let (code, o, err) = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        check_err(
            code,
            RESOURCE,
            &o,
            &err,
            "the memory cgroup /numapin-h allows 32 MiB",
        )?;
        Ok(err.trim().to_string())
    })();
    let _ = std::fs::remove_dir(&cg);
    res
}

/// SIGINT/SIGTERM during a long prefault: stopped, released, one line,
/// exit 128 + signal, no JSON.
fn cancel_by(ctx: &Ctx, sig: i32) -> Result<String, String> {
    // Free memory counting the per-CPU lists, where freed pages land first.
    let free0 = free_bytes();
    let start = Instant::now();
    let child = e(
        numapin()
            .args([
                "pin",
                "--device",
                &ctx.device,
                "--json",
                "--threads",
                "1",
                "--region",
                &format!("{}:384M", ctx.home.0),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn(),
        "spawn numapin",
    )?;
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let out = e(child.wait_with_output(), "wait")?;
    let took = start.elapsed();
    let code = out.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = if sig == libc::SIGINT {
        BY_SIGINT
    } else {
        BY_SIGTERM
    };
    ensure!(code == want, "exit {code}, expected {want}; stderr: {err}");
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    let lines: Vec<&str> = err.lines().collect();
    ensure!(
        lines.len() == 1
            && lines[0].starts_with(&format!(
                "numapin: cancelled by {name}: cancelled during prefault after"
            )),
        "stderr: {err}"
    );
    ensure!(
        !stdout.contains("\"regions\""),
        "the pin document was printed: {stdout}"
    );
    // What the child faulted in comes back (allow 16 MiB of noise, as the
    // SIGKILL scenario does).
    let deadline = Instant::now() + Duration::from_secs(5);
    while free_bytes() + (16 << 20) < free0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let free1 = free_bytes();
    ensure!(
        free1 + (16 << 20) >= free0,
        "free memory {} MiB -> {} MiB after the cancel",
        free0 >> 20,
        free1 >> 20
    );
    Ok(format!("{} after {:.1}s", lines[0], took.as_secs_f64()))
}

/// The library's cancellation handle: a cancelled request stops at its
/// first chunk and leaves nothing.
fn cancel_handle(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.device), "open")?;
    let c = Cancel::new();
    c.cancel();
    let before = ctx.pinned();
    let req = PinRequest {
        cancel: Some(c),
        ..PinRequest::new(ctx.home, 64 << 20)
    };
    let err = match p.pin(&req) {
        Ok(_) => return Err("a cancelled request pinned".into()),
        Err(e) => e,
    };
    ensure!(matches!(err, Error::Cancelled { .. }), "got: {err}");
    ensure!(
        err.kind() == numapin::ErrorKind::Cancelled,
        "kind {:?}",
        err.kind()
    );
    ensure!(ctx.pinned() == before, "pinned memory grew");
    // The IOVA went back: the next pin gets a region at once.
    let r = e(p.pin(&PinRequest::new(ctx.home, SMALL)), "pin after cancel")?;
    drop(r);
    Ok(err.to_string())
}

/// A container with no DMA entries left: refused before MAP_DMA.
fn dma_entries(ctx: &Ctx) -> Result<String, String> {
    let knob = Knob::set(
        "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit",
        "2",
    )?;
    let res = (|| {
        let p = e(Pinner::open(&ctx.bdf), "open")?;
        let a = e(p.pin(&PinRequest::new(ctx.home, SMALL)), "first")?;
        let b = e(p.pin(&PinRequest::new(ctx.home, SMALL)), "second")?;
        let lck = vmlck();
        let err = match p.pin(&PinRequest {
            proof: Proof::None,
            ..PinRequest::new(ctx.home, SMALL)
        }) {
            Ok(_) => return Err("a third mapping fit under dma_entry_limit=2".into()),
            Err(e) => e,
        };
        ensure!(vmlck() == lck, "VmLck changed");
        ensure!(
            matches!(err, Error::DmaEntriesExhausted { avail: 0 }),
            "got: {err}"
        );
        ensure!(err.to_string().contains("dma_entry_limit"), "{err}");
        drop((a, b));
        Ok(err.to_string())
    })();
    drop(knob);
    res
}

/// Two sizes that print alike must not: 8 MiB against 8 MiB + 4 KiB.
fn numbers_differ(ctx: &Ctx) -> Result<String, String> {
    as_user_1000(ctx, || {
        let (code, out, err) = as_pinner(ctx, 8 << 20, &["0:4K", "0:8M"])?;
        check_err(
            code,
            RESOURCE,
            &out,
            &err,
            "RLIMIT_MEMLOCK is 8192 KiB but pinning needs 8196 KiB",
        )?;
        Ok(err.trim().to_string())
    })
}

/// io_uring regions under a low open-file limit: the ring fds are named,
/// not a failed read of /proc.
fn ring_fds(ctx: &Ctx) -> Result<String, String> {
    let mut cmd = numapin();
    cmd.args(["pin", "--device", &ctx.device, "--hold", "0"]);
    for _ in 0..12 {
        cmd.args(["--region", &format!("{}:64K", ctx.home.0)]);
    }
    // SAFETY: only setrlimit runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 14,
                rlim_max: 14,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = e(cmd.output(), "run numapin")?;
    let (code, o, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    check_err(code, RESOURCE, &o, &err, "too many open files")?;
    ensure!(
        err.contains("ring fd") && err.contains("ulimit -n") && !err.contains("read VmPin"),
        "{err}"
    );
    Ok(err.trim().to_string())
}

/// `numapin info` on an mdev: no IOMMU domain, so no page sizes or IOVA
/// ranges decoded as if there were one, and no kernel version blamed.
pub fn mdev_info(ctx: &Ctx) -> Result<String, String> {
    let (code, out, err) = run_cli(&["info", "--device", &ctx.device])?;
    ensure!(code == 0, "info failed: {err}");
    ensure!(out.contains("no IOMMU domain"), "{out}");
    ensure!(
        !out.lines().any(|l| l.starts_with("page sizes"))
            && !out.contains("before 5.4")
            && !out.contains("8589934592G"),
        "{out}"
    );
    let (code, json, err) = run_cli(&["info", "--device", &ctx.device, "--json"])?;
    ensure!(code == 0, "info --json failed: {err}");
    let doc: serde_json::Value = e(serde_json::from_str(&json), "parse info --json")?;
    ensure!(doc["iommu"]["domain"] == false, "{doc}");
    ensure!(doc["iommu"]["page_sizes"].is_null(), "{doc}");
    Ok(out
        .lines()
        .find(|l| l.contains("no IOMMU domain"))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// `unbind` while another process holds the device: refused at once with
/// the holder's pid (the kernel would sleep until it lets go); `--wait`
/// polls before writing and goes ahead once the holder is gone.
fn unbind_held(ctx: &Ctx) -> Result<String, String> {
    let holder = PinChild::spawn(ctx, &["--region", &format!("{}:2M", ctx.home.0)])?;
    let pid = holder.pid();
    let mut holder = Some(holder);
    let res = (|| {
        let t = Instant::now();
        let (code, out, err) = run_cli(&["unbind", &ctx.bdf])?;
        check_err(
            code,
            DEVICE_STATE,
            &out,
            &err,
            &format!("is open in process {pid}"),
        )?;
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "the refusal took {:?}",
            t.elapsed()
        );
        ensure!(err.contains("would block in the kernel"), "{err}");
        // --wait with the holder still there: it says what it waits for,
        // then refuses as before, still bound to vfio-pci.
        let (code, out, err) = run_cli(&["unbind", &ctx.bdf, "--wait", "1"])?;
        ensure!(code == DEVICE_STATE, "exit {code}: {err}");
        ensure!(
            err.lines().next().is_some_and(
                |l| l.contains("waiting up to 1 s for") && l.contains(&pid.to_string())
            ),
            "{err}"
        );
        ensure!(out.is_empty(), "{out}");
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{}/driver", ctx.bdf))
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        ensure!(
            driver == "vfio-pci",
            "driver after a refused unbind: {driver}"
        );
        // The holder goes while --wait polls: the unbind then goes ahead.
        let waiter = e(
            numapin()
                .args(["unbind", &ctx.bdf, "--wait", "20"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn(),
            "spawn unbind --wait",
        )?;
        std::thread::sleep(Duration::from_millis(500));
        if let Some(mut h) = holder.take() {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
        let out = e(waiter.wait_with_output(), "wait for unbind")?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(0), "unbind --wait: {err}");
        ensure!(err.contains(&format!("{} is free after", ctx.bdf)), "{err}");
        Ok(format!(
            "refused while pid {pid} held it; --wait went ahead once it closed"
        ))
    })();
    if let Some(mut h) = holder {
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
    // Back to vfio-pci for the scenarios after this one.
    let (code, out, err) = run_cli(&["bind", &ctx.bdf])?;
    ensure!(code == 0, "rebind: {out} {err}");
    res
}
