//! The `service` phase: numapind against the library doing the same in
//! this process.
//!
//! - latency: allocate (the region ready in the client: memfd received and
//!   mapped) and release through the daemon, for 4 KiB and 2 MiB pages at
//!   a few sizes, against `Pinner::pin` with the request the daemon makes
//!   (`Backing::Memfd`, `Proof::Full`, the node) and its release;
//! - throughput: 8 client processes doing allocate/release cycles of small
//!   regions at once;
//! - what a 4 KiB memfd costs against the library's default THP-backed
//!   anonymous region, and what a THP-backed shmem memfd would give.
//!
//! The library and the daemon cannot hold the device at once, so the
//! library's rounds and the daemon's run in alternating blocks
//! ([`BLOCKS`] of each), which spreads the VM's slow and fast spells over
//! both.

use std::io::{BufRead, BufReader, Write as _};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use numapin::client::{Allocate, Client};
use numapin::{Backing, PageSize, PinRequest, Pinner, Proof};

use crate::daemon::{self, Daemon, Files};
use crate::{Ctx, Out, THP_ENABLED, size_name};

/// The phase's name.
pub const PHASE: &str = "service";

/// Region sizes for the latency figures.
const SIZES: &[u64] = &[2 << 20, 64 << 20, 256 << 20];
/// Client processes in the throughput figure.
pub const CLIENTS: usize = 8;
/// Allocate/release cycles per client and run.
const CYCLES: usize = 40;
/// Throughput runs (the report gives their median).
const THROUGHPUT_RUNS: usize = 3;
/// Small regions for the throughput figure: (size, page size).
const SMALL: &[(u64, PageSize)] = &[
    (64 << 10, PageSize::Base),
    (2 << 20, PageSize::Base),
    (2 << 20, PageSize::Huge2M),
];

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

const CONFIG: &str = r#"
[quota]
bytes_per_node = "2G"
regions = 64
[floor]
default = "64M"
"#;

/// Blocks each for the library and the daemon, alternating: the VM's
/// slow and fast spells (the host is shared) fall on both.
const BLOCKS: usize = 4;

/// Timed rounds per block; one more untimed round warms up each block.
fn rounds(size: u64) -> usize {
    if size <= 2 << 20 { 4 } else { 2 }
}

/// The figures' mode for a page size: `service.4K`, `service.2M`.
pub fn mode(ps: PageSize) -> &'static str {
    match ps {
        PageSize::Base => "service.4K",
        _ => "service.2M",
    }
}

/// The mode of the 4 KiB-memfd-against-THP figures.
pub const THP_MODE: &str = "service.thp";

fn e<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|err| format!("{what}: {err}"))
}

fn secs(d: &[Duration]) -> Vec<f64> {
    d.iter().map(Duration::as_secs_f64).collect()
}

fn median(d: &[Duration]) -> f64 {
    let mut s = secs(d);
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// A sysfs knob set for the phase and put back on drop.
struct Knob {
    path: &'static str,
    old: Option<String>,
}

impl Knob {
    fn set(path: &'static str, value: &str) -> Result<Knob, String> {
        // "always [madvise] never": the bracketed word is the setting.
        let old = std::fs::read_to_string(path).ok().and_then(|s| {
            let a = s.find('[')?;
            let b = s[a..].find(']')?;
            Some(s[a + 1..a + b].to_string())
        });
        e(
            std::fs::write(path, value),
            &format!("write {value} to {path}"),
        )?;
        Ok(Knob { path, old })
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(self.path, old);
        }
    }
}

/// Bytes of this process's memory mapped by PMD: anonymous THP
/// (`AnonHugePages`) and shmem THP (`ShmemPmdMapped`).
fn pmd_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?.trim();
            v.strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// What the library pins in one round, and how.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lib {
    /// `Pinner::pin` as the daemon calls it: a sealed memfd.
    Memfd,
    /// `Pinner::pin` with its default backing: anonymous memory, THP.
    AnonThp,
    /// By hand: a sealed shmem memfd mapped shared, bound, prefaulted by
    /// the node's threads, `pin_user` with the full proof; 4 KiB pages.
    Shmem4K,
    /// The same with `MADV_HUGEPAGE` on the mapping (shmem THP `advise`).
    ShmemThp,
}

/// Times one library round: (pin, release, PMD-mapped bytes while pinned).
fn lib_round(
    ctx: &Ctx,
    pinner: &Pinner,
    what: Lib,
    size: u64,
    ps: PageSize,
) -> Result<(Duration, Duration, u64), String> {
    match what {
        Lib::Memfd | Lib::AnonThp => {
            let (backing, field) = if what == Lib::Memfd {
                (Backing::Memfd, "ShmemPmdMapped")
            } else {
                (Backing::Anonymous, "AnonHugePages")
            };
            let pmd0 = pmd_bytes(field);
            let t = Instant::now();
            let r = e(
                pinner.pin(&PinRequest {
                    page_size: ps,
                    proof: Proof::Full,
                    backing,
                    ..PinRequest::new(ctx.home, size)
                }),
                "Pinner::pin",
            )?;
            let d = t.elapsed();
            let pmd = pmd_bytes(field).saturating_sub(pmd0);
            let t = Instant::now();
            e(r.release(), "release")?;
            Ok((d, t.elapsed(), pmd))
        }
        Lib::Shmem4K | Lib::ShmemThp => by_hand(ctx, pinner, size, what == Lib::ShmemThp),
    }
}

/// A sealed shmem memfd pinned by hand (see [`Lib::Shmem4K`]).
fn by_hand(
    ctx: &Ctx,
    pinner: &Pinner,
    size: u64,
    thp: bool,
) -> Result<(Duration, Duration, u64), String> {
    let len = size as usize;
    let pmd0 = pmd_bytes("ShmemPmdMapped");
    let t = Instant::now();
    let (p, fd) = e(
        numapin::memfd::map_sealed(len, PageSize::Base),
        "a sealed memfd",
    )?;
    let unmap = || {
        // SAFETY: the mapping made above, no longer pinned or used.
        unsafe { libc::munmap(p, len) };
    };
    if thp {
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
    }
    let r = (|| {
        e(
            numapin::sys::mbind(p as usize, len, ctx.home, numapin::sys::MPOL_MF_STRICT),
            "mbind",
        )?;
        prefault(p as usize, len, &ctx.home_cpus)?;
        let req = PinRequest {
            node: Some(ctx.home),
            proof: Proof::Full,
            ..PinRequest::any_node(size)
        };
        // SAFETY: the mapping stays until after the release below; nothing
        // holds a reference into it.
        e(unsafe { pinner.pin_user(p.cast(), &req) }, "pin_user")
    })();
    let region = match r {
        Ok(r) => r,
        Err(err) => {
            unmap();
            return Err(err);
        }
    };
    let d = t.elapsed();
    let pmd = pmd_bytes("ShmemPmdMapped").saturating_sub(pmd0);
    let t = Instant::now();
    let released = region.release();
    unmap();
    drop(fd);
    let rd = t.elapsed();
    e(released, "release")?;
    Ok((d, rd, pmd))
}

/// `MADV_POPULATE_WRITE` in equal shares by one thread per CPU of the node
/// (one thread below 64 MiB, as the library does).
fn prefault(addr: usize, len: usize, cpus: &[u32]) -> Result<(), String> {
    let populate = |a: usize, n: usize| -> Result<(), String> {
        // SAFETY: populating our own mapping.
        let r =
            unsafe { libc::madvise(a as *mut libc::c_void, n, numapin::sys::MADV_POPULATE_WRITE) };
        if r != 0 {
            return Err(format!(
                "MADV_POPULATE_WRITE: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if len < 64 << 20 || cpus.len() < 2 {
        return populate(addr, len);
    }
    let share = (len / cpus.len()).next_multiple_of(2 << 20);
    std::thread::scope(|s| {
        let hs: Vec<_> = cpus
            .iter()
            .enumerate()
            .filter(|(i, _)| i * share < len)
            .map(|(i, &cpu)| {
                let populate = &populate;
                s.spawn(move || {
                    let _ = numapin::sys::set_thread_affinity(&[cpu]);
                    let off = i * share;
                    populate(addr + off, share.min(len - off))
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().unwrap_or(Err("prefault thread panicked".into())))
    })
}

/// Samples of one (page size, size) cell, over both blocks.
#[derive(Default)]
struct Cell {
    lib_pin: Vec<Duration>,
    lib_release: Vec<Duration>,
    svc_alloc: Vec<Duration>,
    svc_release: Vec<Duration>,
    /// The daemon's own times (its debug log): the library pin inside it,
    /// and the request from its arrival to the reply sent.
    daemon_checks: Vec<Duration>,
    daemon_pin: Vec<Duration>,
    daemon_ready: Vec<Duration>,
    daemon_handled: Vec<Duration>,
    daemon_answer: Vec<Duration>,
    reply_bytes: Vec<f64>,
    /// A second `MAP_POPULATE` mapping of the region's memfd: what the
    /// client's own mapping costs inside `allocate`.
    map_populate: Vec<Duration>,
    anon_thp: Vec<Duration>,
    shmem_4k: Vec<Duration>,
    shmem_thp: Vec<Duration>,
    pmd_anon: u64,
    pmd_memfd: u64,
    pmd_shmem_4k: u64,
    pmd_shmem_thp: u64,
}

pub fn run(ctx: &Ctx, out: &mut Out) -> Result<String, String> {
    let dir = PathBuf::from("/tmp/numapind-bench");
    let files = Files::in_dir(&dir);
    let _ = std::fs::write(&files.log, "");
    measure(ctx, out, &dir, &files).map_err(|err| {
        let log = std::fs::read_to_string(&files.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{err} [numapind log: {}]", tail.join(" | "))
    })
}

fn measure(ctx: &Ctx, out: &mut Out, dir: &Path, files: &Files) -> Result<String, String> {
    let _thp = Knob::set(THP_ENABLED, "madvise")?;
    // Shmem THP only where a mapping asks for it (MADV_HUGEPAGE): the
    // library's and the daemon's memfds do not, so they stay on 4 KiB pages
    // (checked below).
    let shmem = Knob::set(SHMEM_ENABLED, "advise");
    out.info(
        "service.shmem_thp",
        match &shmem {
            Ok(k) => format!("advise (was {})", k.old.as_deref().unwrap_or("?")),
            Err(err) => format!("unavailable: {err}"),
        },
    );
    let pages = [PageSize::Base, PageSize::Huge2M];
    let mut cells: Vec<((PageSize, u64), Cell)> = Vec::new();
    for ps in pages {
        for &size in SIZES {
            cells.push(((ps, size), Cell::default()));
        }
    }
    let config = dir.join("numapind.toml");
    e(std::fs::write(&config, CONFIG), "write the daemon config")?;

    for block in 0..BLOCKS {
        // --- The library in this process. ---
        {
            let pinner = e(Pinner::open(&ctx.bdf), "Pinner::open")?;
            for ((ps, size), cell) in cells.iter_mut() {
                let (ps, size) = (*ps, *size);
                let mut kinds = vec![Lib::Memfd];
                if ps == PageSize::Base {
                    kinds.push(Lib::AnonThp);
                    kinds.push(Lib::Shmem4K);
                    if shmem.is_ok() {
                        kinds.push(Lib::ShmemThp);
                    }
                }
                for i in 0..=rounds(size) {
                    // Which kind goes first rotates with the round.
                    for k in 0..kinds.len() {
                        let what = kinds[(i + k) % kinds.len()];
                        let (pin, rel, pmd) = lib_round(ctx, &pinner, what, size, ps)?;
                        if i == 0 {
                            continue;
                        }
                        match what {
                            Lib::Memfd => {
                                cell.lib_pin.push(pin);
                                cell.lib_release.push(rel);
                                cell.pmd_memfd = cell.pmd_memfd.max(pmd);
                            }
                            Lib::AnonThp => {
                                cell.anon_thp.push(pin);
                                cell.pmd_anon = cell.pmd_anon.max(pmd);
                            }
                            Lib::Shmem4K => {
                                cell.shmem_4k.push(pin);
                                cell.pmd_shmem_4k = cell.pmd_shmem_4k.max(pmd);
                            }
                            Lib::ShmemThp => {
                                cell.shmem_thp.push(pin);
                                cell.pmd_shmem_thp = cell.pmd_shmem_thp.max(pmd);
                            }
                        }
                    }
                }
            }
        }
        // --- The same through the daemon. ---
        let d = daemon::start_debug(&ctx.bdf, &config, files)?;
        let client = e(Client::connect(&d.socket), "connect")?;
        let log_from = std::fs::metadata(&files.log).map_or(0, |m| m.len());
        for ((ps, size), cell) in cells.iter_mut() {
            for i in 0..=rounds(*size) {
                let t = Instant::now();
                let r = e(
                    client.allocate(&Allocate {
                        node: ctx.home.0,
                        size: *size,
                        page_size: ps.bytes(),
                        ..Allocate::default()
                    }),
                    "allocate through numapind",
                )?;
                let a = t.elapsed();
                // SAFETY: inside the client's mapping.
                unsafe { std::ptr::write_volatile(r.as_ptr(), i as u8) };
                let m = map_populate(r.memfd(), r.len())?;
                let t = Instant::now();
                e(r.release(), "release through numapind")?;
                let rd = t.elapsed();
                if i > 0 {
                    cell.svc_alloc.push(a);
                    cell.svc_release.push(rd);
                    cell.map_populate.push(m);
                }
            }
        }
        daemon_times(out, block, &files.log, log_from, &mut cells)?;
        if block == BLOCKS - 1 {
            throughput(out, &d, ctx.home.0)?;
        }
        drop(client);
        stop(d)?;
    }

    let mut summary = Vec::new();
    for ((ps, size), cell) in &cells {
        let m = mode(*ps);
        let size = *size;
        out.measure(m, size, "library.pin", "s", &secs(&cell.lib_pin));
        out.measure(m, size, "library.release", "s", &secs(&cell.lib_release));
        out.measure(m, size, "service.allocate", "s", &secs(&cell.svc_alloc));
        out.measure(m, size, "service.release", "s", &secs(&cell.svc_release));
        out.measure(m, size, "daemon.checks", "s", &secs(&cell.daemon_checks));
        out.measure(m, size, "daemon.pin", "s", &secs(&cell.daemon_pin));
        // Round by round: what the service added to the pin inside it.
        let overhead: Vec<f64> = cell
            .svc_alloc
            .iter()
            .zip(&cell.daemon_pin)
            .map(|(a, p)| a.as_secs_f64() - p.as_secs_f64())
            .collect();
        out.measure(m, size, "service.overhead", "s", &overhead);
        out.measure(
            m,
            size,
            "daemon.pin-to-reply",
            "s",
            &secs(&cell.daemon_ready),
        );
        out.measure(m, size, "daemon.handled", "s", &secs(&cell.daemon_handled));
        out.measure(m, size, "daemon.answer", "s", &secs(&cell.daemon_answer));
        out.measure(m, size, "daemon.reply", "bytes", &cell.reply_bytes);
        out.measure(
            m,
            size,
            "client.map-populate",
            "s",
            &secs(&cell.map_populate),
        );
        summary.push(format!(
            "{} {}: service {:.2} ms (daemon checks {:.2}, pin {:.2}, pin to reply {:.2}, handled {:.2}, answer {:.2}, reply {} B, map {:.2}) / library {:.2} ms",
            m,
            size_name(size),
            median(&cell.svc_alloc) * 1e3,
            median(&cell.daemon_checks) * 1e3,
            median(&cell.daemon_pin) * 1e3,
            median(&cell.daemon_ready) * 1e3,
            median(&cell.daemon_handled) * 1e3,
            median(&cell.daemon_answer) * 1e3,
            cell.reply_bytes.iter().copied().fold(0.0, f64::max),
            median(&cell.map_populate) * 1e3,
            median(&cell.lib_pin) * 1e3
        ));
        if *ps != PageSize::Base {
            continue;
        }
        out.measure(THP_MODE, size, "memfd-4k.pin", "s", &secs(&cell.lib_pin));
        out.measure(THP_MODE, size, "anon-thp.pin", "s", &secs(&cell.anon_thp));
        out.measure(
            THP_MODE,
            size,
            "shmem-4k.by-hand",
            "s",
            &secs(&cell.shmem_4k),
        );
        if !cell.shmem_thp.is_empty() {
            out.measure(
                THP_MODE,
                size,
                "shmem-thp.by-hand",
                "s",
                &secs(&cell.shmem_thp),
            );
        }
        for (metric, bytes) in [
            ("memfd-4k.pmd-bytes", cell.pmd_memfd),
            ("anon-thp.pmd-bytes", cell.pmd_anon),
            ("shmem-4k.pmd-bytes", cell.pmd_shmem_4k),
            ("shmem-thp.pmd-bytes", cell.pmd_shmem_thp),
        ] {
            out.measure(THP_MODE, size, metric, "bytes", &[bytes as f64]);
        }
        if cell.pmd_memfd > 0 || cell.pmd_shmem_4k > 0 {
            return Err(format!(
                "a 4 KiB memfd of {} came partly in shmem THP ({} / {} bytes)",
                size_name(size),
                cell.pmd_memfd,
                cell.pmd_shmem_4k
            ));
        }
    }
    Ok(summary.join("; "))
}

/// A `MAP_POPULATE` shared mapping of `fd` (`len` bytes), timed from the
/// call to its return, then unmapped.
fn map_populate(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> Result<Duration, String> {
    let t = Instant::now();
    // SAFETY: a fresh mapping at a kernel-chosen address, unmapped below
    // and never touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            0,
        )
    };
    let d = t.elapsed();
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len as usize) };
    Ok(d)
}

/// The milliseconds after `key` in `line` (`… key 1.234 ms …`).
fn ms_after(line: &str, key: &str) -> Option<Duration> {
    let rest = &line[line.find(key)? + key.len()..];
    let v: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(v / 1e3))
}

/// Reads the daemon's debug lines from byte `from` of its log: one
/// `pinned in` and one `allocate: answered in` line per allocation, in
/// the order of the latency loop (warm-up rounds included, dropped here
/// as there).
fn daemon_times(
    out: &mut Out,
    block: usize,
    log: &Path,
    from: u64,
    cells: &mut [((PageSize, u64), Cell)],
) -> Result<(), String> {
    let text = e(std::fs::read(log), "read the daemon log")?;
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    // (checked, pinned, ready) from the pin lines; (answered, handled,
    // reply bytes) from the answer lines.
    let pins: Vec<(Duration, Duration, Duration)> = text
        .lines()
        .filter_map(|l| {
            Some((
                ms_after(l, "checked in")?,
                ms_after(l, "pinned in")?,
                ms_after(l, "ready to send in")?,
            ))
        })
        .collect();
    let answers: Vec<(Duration, Duration, f64)> = text
        .lines()
        .filter(|l| l.contains("allocate: answered in"))
        .filter_map(|l| {
            let bytes = l.rsplit("a ").next()?.split('-').next()?.parse().ok()?;
            Some((
                ms_after(l, "answered in")?,
                ms_after(l, "handled in")?,
                bytes,
            ))
        })
        .collect();
    let want: usize = cells.iter().map(|((_, size), _)| rounds(*size) + 1).sum();
    if pins.len() != want || answers.len() != want {
        return Err(format!(
            "the daemon log has {} pin and {} answer lines for {want} allocations",
            pins.len(),
            answers.len()
        ));
    }
    // The last pin line of each cell, whole, for the record.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ready to send in"))
        .collect();
    let mut k = 0;
    for ((ps, size), cell) in cells.iter_mut() {
        if let Some(l) = lines.get(k + rounds(*size)) {
            out.info(
                &format!("{}.{}.daemon-log.{block}", mode(*ps), size_name(*size)),
                l.trim(),
            );
        }
        for i in 0..=rounds(*size) {
            if i > 0 {
                cell.daemon_checks.push(pins[k].0);
                cell.daemon_pin.push(pins[k].1);
                // From the pin's end to the reply ready.
                cell.daemon_ready.push(pins[k].2.saturating_sub(pins[k].1));
                cell.daemon_answer.push(answers[k].0);
                cell.daemon_handled.push(answers[k].1);
                cell.reply_bytes.push(answers[k].2);
            }
            k += 1;
        }
    }
    Ok(())
}

/// SIGTERM, and a clean exit within 30 s.
fn stop(mut d: Daemon) -> Result<(), String> {
    d.signal(libc::SIGTERM);
    let st = d.wait(30)?;
    if !st.success() {
        return Err(format!("numapind exited with {st} at SIGTERM"));
    }
    Ok(())
}

/// [`CLIENTS`] processes, each with its own connection, doing [`CYCLES`]
/// allocate/release cycles at once; wall time from the go to the last
/// one's end.
fn throughput(out: &mut Out, d: &Daemon, node: u32) -> Result<(), String> {
    for &(size, ps) in SMALL {
        let mut runs = Vec::new();
        for _ in 0..THROUGHPUT_RUNS {
            runs.push(one_run(&d.socket, node, size, ps)?);
        }
        let tag = match ps {
            PageSize::Base => "4K",
            _ => "2M",
        };
        // Two requests (allocate, release) per cycle.
        let rps: Vec<f64> = runs
            .iter()
            .map(|s| (2 * CLIENTS * CYCLES) as f64 / s)
            .collect();
        out.measure(
            "service.throughput",
            size,
            &format!("{tag}.requests-per-s"),
            "1/s",
            &rps,
        );
        out.measure(
            "service.throughput",
            size,
            &format!("{tag}.run"),
            "s",
            &runs,
        );
    }
    out.measure(
        "service.throughput",
        0,
        "clients",
        "count",
        &[CLIENTS as f64],
    );
    out.measure(
        "service.throughput",
        0,
        "cycles-per-client",
        "count",
        &[CYCLES as f64],
    );
    Ok(())
}

/// One throughput run: seconds from the go to the last client's end.
fn one_run(socket: &Path, node: u32, size: u64, ps: PageSize) -> Result<f64, String> {
    let mut kids: Vec<Child> = Vec::new();
    let kill = |kids: &mut Vec<Child>| {
        for k in kids.iter_mut() {
            let _ = k.kill();
            let _ = k.wait();
        }
    };
    for _ in 0..CLIENTS {
        let child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("--service-client")
            .arg(socket)
            .args([
                "--node",
                &node.to_string(),
                "--cycles",
                &CYCLES.to_string(),
                "--size",
                &size.to_string(),
                "--page",
                &ps.bytes().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        match child {
            Ok(c) => kids.push(c),
            Err(err) => {
                kill(&mut kids);
                return Err(format!("spawn a client: {err}"));
            }
        }
    }
    let mut readers: Vec<_> = kids
        .iter_mut()
        .map(|k| BufReader::new(k.stdout.take().expect("piped")))
        .collect();
    // Every client connected before the clock starts.
    for r in readers.iter_mut() {
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        if line.trim() != "ready" {
            kill(&mut kids);
            return Err(format!("a client did not connect: {}", line.trim()));
        }
    }
    let t = Instant::now();
    for k in kids.iter_mut() {
        if let Some(stdin) = k.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
        }
    }
    let mut failed = Vec::new();
    for r in readers.iter_mut() {
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        if line.trim() != "done" {
            failed.push(line.trim().to_string());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for k in kids.iter_mut() {
        let _ = k.wait();
    }
    if !failed.is_empty() {
        return Err(format!("clients failed: {}", failed.join("; ")));
    }
    Ok(secs)
}

/// `numapin-bench --service-client SOCKET --node N --cycles N --size BYTES
/// --page BYTES`: one throughput client. Connects, says `ready`, waits for a line
/// on stdin, runs its cycles and says `done` (or `error: …`).
pub fn client_main(socket: &str) -> ! {
    let num = |k: &str| {
        crate::args::value(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (cycles, size, page, node) = (
        num("--cycles"),
        num("--size"),
        num("--page"),
        num("--node") as u32,
    );
    let r = (|| -> Result<(), String> {
        let c = e(Client::connect(socket), "connect")?;
        println!("ready");
        let _ = std::io::stdout().flush();
        let mut go = String::new();
        let _ = std::io::stdin().read_line(&mut go);
        for k in 0..cycles {
            let r = e(
                c.allocate(&Allocate {
                    node,
                    size,
                    page_size: page,
                    ..Allocate::default()
                }),
                &format!("cycle {k}"),
            )?;
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(r.as_ptr(), k as u8) };
            e(r.release(), "release")?;
        }
        Ok(())
    })();
    match r {
        Ok(()) => {
            println!("done");
            std::process::exit(0)
        }
        Err(err) => {
            println!("error: {err}");
            std::process::exit(1)
        }
    }
}
