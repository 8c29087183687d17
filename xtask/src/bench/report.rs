//! The bench's outputs in text: the raw CSV and `docs/benchmarks.md`.

use std::fmt::Write as _;

use super::figures::{
    DEFAULT_DMA_ENTRIES, Figure, MODES, PIN_ONLY_MAX, PREFAULT_CEILING, PREFAULT_MIN_SIZE,
    PREFAULT_MIN_SPEEDUP, PROOF_MAX, PROOF_SLACK, Results, SERVICE_FACTOR, SERVICE_MODES,
    SERVICE_SLACK, SERVICE_THP, SERVICE_THROUGHPUT, URING_PIN_MAX, floor_of, linear_fit, size_name,
};
use super::{KernelRun, Machine};
use crate::vmconfig::Shape;

/// The timed rows of the result tables, in order, with their labels.
pub const ROWS: &[(&str, &str)] = &[
    ("floor.map", "**floor**: one raw `VFIO_IOMMU_MAP_DMA`"),
    ("floor.unmap", "**floor**: its `VFIO_IOMMU_UNMAP_DMA`"),
    (
        "numapin.pin-only",
        "numapin `pin_user`, `Proof::None`: pin only",
    ),
    (
        "numapin.pin-proved",
        "numapin `pin_user`, full proof, node checked",
    ),
    (
        "numapin.pin-only.no-node",
        "numapin `pin_user`, full proof, no node (no placement check)",
    ),
    (
        "numapin.pin-proved.unprivileged",
        "numapin `pin_user`, full proof, node checked, without CAP_SYS_ADMIN (`move_pages`)",
    ),
    (
        "step.pagemap-pfns",
        "… its step: PFN snapshot from `/proc/self/pagemap`",
    ),
    (
        "step.node-query",
        "… its step: `move_pages` node query of every page",
    ),
    (
        "step.vmlck-read",
        "… its step: one `VmLck` read (it does two)",
    ),
    ("numapin.release", "numapin `release` of that region"),
    (
        "numapin.alloc-pin-verify",
        "numapin `pin` + `verify`: allocate, prefault, pin, verify",
    ),
    ("numapin.verify", "… of which `verify`"),
    (
        "per-page.map",
        "one `MAP_DMA` per page (as DPDK per memseg)",
    ),
    ("per-page.unmap", "one `UNMAP_DMA` per page"),
    ("uring.register", "io_uring `REGISTER_BUFFERS` (raw)"),
    ("uring.unregister", "io_uring `UNREGISTER_BUFFERS` (raw)"),
    (
        "uring.register.rings-4M",
        "… raw, in rings of 4 MiB (bare rings, each ring's setup timed)",
    ),
    (
        "uring.register.rings-16M",
        "… raw, in rings of 16 MiB (bare rings, each ring's setup timed)",
    ),
    (
        "uring.register.rings-32M",
        "… raw, in rings of 32 MiB (bare rings, each ring's setup timed)",
    ),
    (
        "uring.register.rings-64M",
        "… raw, in rings of 64 MiB (bare rings, each ring's setup timed)",
    ),
    (
        "uring.unregister.rings-32M",
        "… their `UNREGISTER_BUFFERS`, 32 MiB rings one after the other",
    ),
    (
        "uring.register.base-pages",
        "io_uring `REGISTER_BUFFERS` (raw) of as much base-page memory (the io_uring target's reference)",
    ),
    (
        "numapin.uring-pin",
        "numapin's io_uring pin (mdev / no-IOMMU containers)",
    ),
    ("numapin.uring-release", "… its `release`"),
    ("prefault.1-thread", "prefault, 1 thread"),
    (
        "prefault.node-threads",
        "prefault, one thread per CPU of the node",
    ),
    (
        "prefault.raw-split",
        "prefault without numapin: threads made and bound beforehand, one share each (the VM's ceiling)",
    ),
];

/// `0.123 ms`, `45.6 ms`, `12.3 s`.
pub fn duration(secs: f64) -> String {
    let ms = secs * 1e3;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.2} ms")
    } else if secs < 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{secs:.1} s")
    }
}

/// Every figure of every kernel's run, one line each; samples
/// space-separated.
pub fn csv(runs: &[KernelRun]) -> String {
    let mut out = String::from(
        "kernel,mode,size_bytes,size,metric,unit,n,median,min,max,floor_metric,ratio_to_floor,samples\n",
    );
    let order = |mode: &str| MODES.iter().position(|m| *m == mode).unwrap_or(MODES.len());
    for run in runs {
        let r = &run.results;
        let mut figures: Vec<_> = r.figures.iter().collect();
        figures.sort_by(|a, b| {
            (order(&a.mode), a.size, &a.metric).cmp(&(order(&b.mode), b.size, &b.metric))
        });
        for f in figures {
            let ratio = r.ratio(f);
            let samples: Vec<String> = f.samples.iter().map(|s| format!("{s}")).collect();
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{}",
                run.release,
                f.mode,
                f.size,
                size_name(f.size),
                f.metric,
                f.unit,
                f.samples.len(),
                f.median,
                f.min,
                f.max,
                if ratio.is_some() {
                    floor_of(&f.metric)
                } else {
                    ""
                },
                ratio.map(|r| format!("{r:.4}")).unwrap_or_default(),
                samples.join(" ")
            );
        }
    }
    out
}

/// One table cell: median and ratio to the floor, or why there is none.
fn cell(r: &Results, mode: &str, size: u64, metric: &str) -> String {
    if let Some(f) = r.get(mode, size, metric) {
        let range = if f.samples.len() > 1 {
            format!(
                " [{}–{}]",
                duration(f.min).trim_end_matches(" ms"),
                duration(f.max)
            )
        } else {
            String::new()
        };
        return match r.ratio(f) {
            Some(x) => format!("{} ({x:.2}×){range}", duration(f.median)),
            None => format!("{}{range}", duration(f.median)),
        };
    }
    let tag = format!("{mode}.{}", size_name(size));
    match metric {
        "per-page.map" | "per-page.unmap" if r.info(&format!("{tag}.per-page")).is_some() => {
            let n = r.median(mode, size, "entries.per-page").unwrap_or(0.0);
            format!("n/a: {n} entries > limit")
        }
        _ => "–".into(),
    }
}

/// The per-mode tables: metric rows, size columns.
pub fn result_tables(r: &Results) -> String {
    let mut out = String::new();
    for mode in MODES {
        let sizes = r.sizes(mode);
        if sizes.is_empty() {
            continue;
        }
        let title = match mode {
            "base" => "Base pages (4 KiB, THP off)",
            "thp" => "Transparent hugepages (THP `madvise`, `MADV_HUGEPAGE`)",
            _ => "2 MiB hugetlb pages",
        };
        let _ = writeln!(out, "### {title}\n");
        let _ = write!(out, "| median (× floor) [min–max] |");
        for s in &sizes {
            let _ = write!(out, " {} |", size_name(*s));
        }
        let _ = write!(out, "\n| --- |");
        for _ in &sizes {
            let _ = write!(out, " ---: |");
        }
        out.push('\n');
        for (metric, label) in ROWS {
            let _ = write!(out, "| {label} |");
            for s in &sizes {
                let _ = write!(out, " {} |", cell(r, mode, *s, metric));
            }
            out.push('\n');
        }
        for (label, metric) in [
            (
                "prefault speedup, node threads vs 1",
                "prefault.node-threads",
            ),
            (
                "… the ceiling: raw split vs numapin's 1 thread",
                "prefault.raw-split",
            ),
        ] {
            let _ = write!(out, "| {label} |");
            for s in &sizes {
                let one = r.median(mode, *s, "prefault.1-thread");
                let all = r.median(mode, *s, metric);
                let threads = r.median(mode, *s, "prefault.threads").unwrap_or(0.0);
                let c = match (one, all) {
                    (Some(o), Some(a)) if a > 0.0 => format!("{:.2}× ({threads} threads)", o / a),
                    _ => "–".into(),
                };
                let _ = write!(out, " {c} |");
            }
            out.push('\n');
        }
        for (label, metric) in [
            ("pin throughput, pin only (GB/s)", "numapin.pin-only"),
            ("pin throughput, full proof (GB/s)", "numapin.pin-proved"),
            ("raw `MAP_DMA` throughput (GB/s)", "floor.map"),
            (
                "prefault throughput, node threads (GB/s)",
                "prefault.node-threads",
            ),
        ] {
            let _ = write!(out, "| {label} |");
            for s in &sizes {
                let c = match r.median(mode, *s, metric) {
                    Some(t) if t > 0.0 => format!("{:.2}", *s as f64 / t / 1e9),
                    _ => "–".into(),
                };
                let _ = write!(out, " {c} |");
            }
            out.push('\n');
        }
        let _ = write!(
            out,
            "| numapin's io_uring rings (fds) per region, most per GiB |"
        );
        for s in &sizes {
            let c = match (
                r.median(mode, *s, "numapin.uring-rings"),
                r.median(mode, *s, "numapin.uring-fds-per-gib"),
            ) {
                (Some(n), Some(g)) => format!("{n} ({g}/GiB)"),
                _ => "–".into(),
            };
            let _ = write!(out, " {c} |");
        }
        out.push('\n');
        let _ = write!(out, "| THP-backed share of the caller memory |");
        for s in &sizes {
            let thp: f64 = r
                .info(&format!("{mode}.{}.thp_bytes", size_name(*s)))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let _ = write!(out, " {:.0} % |", 100.0 * thp / *s as f64);
        }
        out.push_str("\n\n");
    }
    out
}

/// `24 B`, `4.0 KiB`, `4.0 MiB`: a snapshot's heap.
fn bytes_name(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

/// DMA mappings per region, the heap its PFN snapshot holds, and the most
/// memory a container can pin.
fn entries_table(r: &Results) -> String {
    let mut out = String::from(
        "| mode | size | numapin: mappings per region | raw single `MAP_DMA` | one per page | PFN snapshot held |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for mode in MODES {
        for s in r.sizes(mode) {
            let n = |m: &str| {
                r.median(mode, s, m)
                    .map_or("–".to_string(), |v| format!("{v}"))
            };
            let held = r
                .median(mode, s, "numapin.snapshot-bytes")
                .map_or("–".to_string(), |b| bytes_name(b as u64));
            let _ = writeln!(
                out,
                "| {mode} | {} | {} | {} | {} | {held} |",
                size_name(s),
                n("entries.numapin"),
                n("entries.raw"),
                n("entries.per-page")
            );
        }
    }
    let avail: u64 = r
        .info("dma_avail.fresh")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_DMA_ENTRIES);
    let usable: u64 = r
        .info("iova.usable_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let _ = write!(
        out,
        "\nLargest total pinnable in one container with the {avail} DMA mappings a fresh \
         container has (the default `dma_entry_limit` is {DEFAULT_DMA_ENTRIES}):\n\n\
         - numapin, one mapping per region: not bounded by mappings. {avail} regions, each \
         as large as memory allows; the bound is the usable IOVA space, {:.1} GiB here \
         (the 39-bit aperture of QEMU's intel-iommu minus reserved ranges), and memory.\n\
         - one mapping per 2 MiB page (DPDK's hugepage memsegs): {avail} × 2 MiB = {:.1} GiB.\n\
         - one mapping per 4 KiB page: {avail} × 4 KiB = {:.1} MiB.\n",
        gib(usable),
        gib(avail * (2 << 20)),
        (avail * 4096) as f64 / (1u64 << 20) as f64
    );
    out
}

fn balance_table(r: &Results) -> String {
    let size = r.balance("numapin.pages-moved").map_or(0, |f| f.size);
    let interval = r.info("numa-balancing.interval_s").unwrap_or("?");
    let mut out = format!(
        "A {} region of base pages (THP off) on node 0, written one byte per page by a \
         thread on node 1 for {interval} s, after an idle interval of the same length in \
         which the same thread spins without touching it. `kernel.numa_balancing=1` with \
         the scanner at `scan_delay_ms=0`, `scan_period_min_ms=100`, \
         `scan_period_max_ms=400`, `scan_size_mb=256`. Counts are `/proc/vmstat` deltas; \
         medians over {} repetitions, each with a fresh region.\n\n\
         | region | hinting faults idle | touching | attributable | migrations idle | touching | attributable | pages moved |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        size_name(size),
        r.balance("numapin.pages-moved")
            .map_or(0, |f| f.samples.len())
    );
    for (who, label) in [
        ("numapin", "numapin (`mbind(MPOL_BIND)`, pinned)"),
        ("control", "default policy, unpinned"),
    ] {
        let m = |metric: &str| {
            r.balance(&format!("{who}.{metric}"))
                .map_or("–".to_string(), |f| format!("{}", f.median))
        };
        let a = |what: &str| {
            r.attributable(who, what)
                .map_or("–".to_string(), |(v, _)| format!("{v:+}"))
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            m("hint-faults.idle"),
            m("hint-faults.touch"),
            a("hint-faults"),
            m("migrations.idle"),
            m("migrations.touch"),
            a("migrations"),
            m("pages-moved"),
        );
    }
    out.push_str(
        "\n\"Pages moved\": for numapin, pages whose node or frame changed (`verify`); for \
         the control, pages found on node 1 afterwards.\n",
    );
    out
}

/// `12.3 ms (11.9–13.0 ms)`: a timed figure's median and spread.
fn spread(f: &Figure) -> String {
    format!(
        "{} ({}–{})",
        duration(f.median),
        duration(f.min).trim_end_matches(" ms"),
        duration(f.max)
    )
}

/// `64K`, `2M`: sizes below a MiB in KiB.
fn small_size(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{}K", bytes >> 10)
    } else {
        size_name(bytes)
    }
}

/// Whether the daemon should offer THP-backed shmem, from the by-hand
/// shmem figures: THP must have backed nearly all of the memfd and pinned
/// it in at most this share of the 4 KiB memfd's time at 64 MiB and up.
const SHMEM_THP_WORTH: f64 = 0.8;

/// The service section (`None` when the phase did not run).
pub fn service_section(r: &Results) -> Option<String> {
    let any = r.figures.iter().any(|f| f.mode.starts_with("service."));
    if !any {
        return None;
    }
    let mut out = String::new();
    let _ = write!(
        out,
        "numapind, the pinning service, started in the VM on the edu device with a TOML \
         config, ready on a `NOTIFY_SOCKET`; one client connection as root. **Allocate**: \
         the request until the region is ready in the client (numapind made the memfd, \
         bound it to node 0, prefaulted it on the node's CPUs, pinned it with the full \
         proof, and sent it; the client received it and mapped it with `MAP_POPULATE`). \
         **Release**: unmap, the request and its reply. The library figure is what the \
         daemon calls, in this process: `Pinner::pin` with `Backing::Memfd`, \
         `Proof::Full` and the node, then `release`. The library and the daemon cannot \
         hold the device at once, so they ran in alternating blocks (four of each, the \
         daemon started afresh for each of its blocks). The daemon's own `Pinner::pin` in \
         each of its rounds comes from its debug log, so each allocate is paired with the pin \
         inside it, at the same VM speed. Target: the median of the rounds' allocate − pin \
         (what the service adds) within {:.0} % of that pin plus {:.0} ms, i.e. allocate \
         within {SERVICE_FACTOR:.1}× the pin plus the millisecond with the VM's drift between \
         blocks taken out; the in-process library figure is beside it. Medians, min–max in \
         brackets.\n\n\
         | pages | size | library `pin` here | `pin` inside numapind | numapind allocate | ratio | limit | library `release` | numapind release | ratio |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        (SERVICE_FACTOR - 1.0) * 100.0,
        SERVICE_SLACK * 1e3
    );
    for mode in SERVICE_MODES {
        let page = mode.trim_start_matches("service.");
        for size in r.sizes_of(mode, "library.pin") {
            let get = |m: &str| r.get(mode, size, m);
            let ratio = |a: Option<&Figure>, b: Option<&Figure>| match (a, b) {
                (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}×", a.median / b.median),
                _ => "–".into(),
            };
            let show = |f: Option<&Figure>| f.map_or("–".into(), spread);
            let (lp, sa) = (get("library.pin"), get("service.allocate"));
            let dp = get("daemon.pin");
            let (lr, sr) = (get("library.release"), get("service.release"));
            // Judged against the pin inside the daemon where there is one.
            let judged = dp.or(lp);
            let limit = judged.map_or("–".into(), |f| {
                duration(SERVICE_FACTOR * f.median + SERVICE_SLACK)
            });
            let _ = writeln!(
                out,
                "| {page} | {} | {} | {} | {} | {} | {limit} | {} | {} | {} |",
                size_name(size),
                show(lp),
                show(dp),
                show(sa),
                ratio(sa, judged),
                show(lr),
                show(sr),
                ratio(sr, lr)
            );
        }
    }

    out.push_str(&service_breakdown(r));

    let clients = r.median(SERVICE_THROUGHPUT, 0, "clients").unwrap_or(0.0);
    let cycles = r
        .median(SERVICE_THROUGHPUT, 0, "cycles-per-client")
        .unwrap_or(0.0);
    let _ = write!(
        out,
        "\n**Requests per second**, {clients} client processes at once, each with its own \
         connection doing {cycles} allocate/release cycles on node 0 (two requests per \
         cycle), timed from the go to the last client's end after all had connected; \
         median of the runs, min–max in brackets:\n\n\
         | region | pages | requests/s | allocate/release cycles/s |\n| ---: | --- | ---: | ---: |\n"
    );
    let mut rows: Vec<&Figure> = r
        .figures
        .iter()
        .filter(|f| f.mode == SERVICE_THROUGHPUT && f.metric.ends_with(".requests-per-s"))
        .collect();
    rows.sort_by(|a, b| (a.size, &a.metric).cmp(&(b.size, &b.metric)));
    for f in rows {
        let page = f.metric.trim_end_matches(".requests-per-s");
        let _ = writeln!(
            out,
            "| {} | {page} | {:.0} ({:.0}–{:.0}) | {:.0} |",
            small_size(f.size),
            f.median,
            f.min,
            f.max,
            f.median / 2.0
        );
    }

    let was = r
        .info("service.shmem_thp")
        .and_then(|v| v.split_once("(was ")?.1.strip_suffix(')'))
        .unwrap_or("unknown");
    let _ = write!(
        out,
        "\n**A 4 KiB memfd against THP.** Library figures, in the same blocks as the \
         ones above: the daemon's memfd (shmem, 4 KiB pages: the guest's \
         `shmem_enabled` was `{was}`, Debian's default is `never`, and the daemon does not \
         ask for THP); the library's \
         default region (private anonymous memory with `MADV_HUGEPAGE`, THP `madvise`); \
         and a sealed memfd made by hand (memfd_create, seals, `mmap` shared, `mbind`, \
         `MADV_POPULATE_WRITE` by the node's threads, `pin_user` with the full proof), \
         once as it is and once with `MADV_HUGEPAGE` under `shmem_enabled=advise` (set for \
         the phase, restored after). \"THP\" is the share of the region mapped by PMD \
         while pinned (`AnonHugePages`, `ShmemPmdMapped`).\n\n\
         | size | memfd 4K (daemon's path) | anonymous THP | memfd ÷ THP | by hand: shmem 4K | shmem THP | THP | shmem THP ÷ 4K |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    let mut verdicts: Vec<(u64, f64, f64)> = Vec::new();
    for size in r.sizes_of(SERVICE_THP, "memfd-4k.pin") {
        let get = |m: &str| r.get(SERVICE_THP, size, m);
        let show = |f: Option<&Figure>| f.map_or("–".into(), spread);
        let ratio = |a: Option<&Figure>, b: Option<&Figure>| match (a, b) {
            (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
            _ => None,
        };
        let fmt = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}×"));
        let share = |m: &str| r.median(SERVICE_THP, size, m).map(|b| b / size as f64);
        let pct = |x: Option<f64>| x.map_or("–".into(), |x| format!("{:.0} %", 100.0 * x));
        let (memfd, anon) = (get("memfd-4k.pin"), get("anon-thp.pin"));
        let (s4, sthp) = (get("shmem-4k.by-hand"), get("shmem-thp.by-hand"));
        let thp_share = share("shmem-thp.pmd-bytes");
        let gain = ratio(sthp, s4);
        if let (Some(g), Some(t)) = (gain, thp_share) {
            verdicts.push((size, g, t));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} (THP {}) | {} | {} | {} | {} | {} |",
            size_name(size),
            show(memfd),
            show(anon),
            pct(share("anon-thp.pmd-bytes")),
            fmt(ratio(memfd, anon)),
            show(s4),
            show(sthp),
            pct(thp_share),
            fmt(gain)
        );
    }
    out.push('\n');
    out.push_str(&shmem_conclusion(r, &verdicts));
    Some(out)
}

/// The paragraph on THP-backed shmem, from (size, shmem THP ÷ 4K, THP
/// share) of each size.
fn shmem_conclusion(r: &Results, v: &[(u64, f64, f64)]) -> String {
    let cost: Vec<String> = r
        .sizes_of(SERVICE_THP, "memfd-4k.pin")
        .into_iter()
        .filter_map(|s| {
            let m = r.median(SERVICE_THP, s, "memfd-4k.pin")?;
            let a = r.median(SERVICE_THP, s, "anon-thp.pin")?;
            (a > 0.0).then(|| format!("{:.2}× at {}", m / a, size_name(s)))
        })
        .collect();
    let mut out = format!(
        "**Conclusion.** What the daemon's 4 KiB memfd costs against the library's \
         THP-backed anonymous region of the same size, to allocate, prefault, pin and \
         prove: {}. ",
        if cost.is_empty() {
            "not measured".to_string()
        } else {
            cost.join(", ")
        }
    );
    let large: Vec<&(u64, f64, f64)> = v.iter().filter(|(s, _, _)| *s >= 64 << 20).collect();
    if large.is_empty() {
        out.push_str(
            "Shmem THP could not be measured in this guest (no `shmem_enabled`, or no \
             figure at 64 MiB or more), so this run says nothing on whether the daemon \
             should offer it.\n",
        );
        return out;
    }
    let each: Vec<String> = large
        .iter()
        .map(|(s, g, t)| {
            format!(
                "{g:.2}× the 4 KiB memfd's time at {} ({:.0} % in huge pages)",
                size_name(*s),
                100.0 * t
            )
        })
        .collect();
    let _ = write!(
        out,
        "The same memfd with shmem THP pinned in {}. ",
        each.join(", ")
    );
    let worth = large
        .iter()
        .all(|(_, g, t)| *g <= SHMEM_THP_WORTH && *t >= 0.9);
    if worth {
        let _ = writeln!(
            out,
            "That is worth offering: the daemon should accept a request for THP-backed \
             shmem (`MADV_HUGEPAGE` on its own mapping before the prefault) where the \
             administrator set `shmem_enabled` to `advise`, and report the share that \
             came in huge pages, since THP falls back to 4 KiB pages silently when no \
             huge page is free and the pin then holds what it got. 4 KiB stays the \
             default: it needs no system-wide setting, and hugetlb (2M) already gives \
             huge pages from a reserved pool."
        );
    } else {
        let _ = writeln!(
            out,
            "That is not enough to be worth a new kind of region (the rule: at most \
             {SHMEM_THP_WORTH:.1}× with 90 % or more in huge pages at 64 MiB and up): the \
             daemon should keep 4 KiB memfds and hugetlb (2M) pages, which come from a \
             reserved pool and need no system-wide THP setting."
        );
    }
    out
}

/// Everything `docs/benchmarks.md` is made of.
pub struct Page<'a> {
    /// One run per kernel, in report order.
    pub runs: &'a [KernelRun],
    pub machine: &'a Machine,
    pub shape: &'a Shape,
    /// Paths relative to the page.
    pub svg: &'a str,
    pub csv: &'a str,
}

/// The metrics whose growth with region size the fit table states.
const GROWTH: &[(&str, &str)] = &[
    ("floor.map", "raw `MAP_DMA` (the floor)"),
    ("numapin.pin-only", "numapin pin only"),
    ("numapin.pin-proved", "numapin pin, full proof"),
    ("numapin.uring-pin", "numapin io_uring pin"),
    ("prefault.node-threads", "prefault, node threads"),
];

/// How each kernel's times grow with region size: a least-squares line
/// through the medians, its slope as GB/s, and how far the medians stray
/// from it.
pub fn growth_table(runs: &[KernelRun]) -> String {
    let mut out = String::from(
        "| kernel | page mode | what | sizes | GB/s (slope) | fixed cost | R² | largest miss of the line | exponent |\n\
         | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for run in runs {
        for mode in MODES {
            for (metric, label) in GROWTH {
                let pts: Vec<(f64, f64)> = run
                    .results
                    .sizes_of(mode, metric)
                    .into_iter()
                    .filter_map(|s| Some((s as f64, run.results.median(mode, s, metric)?)))
                    .collect();
                let Some(fit) = linear_fit(&pts) else {
                    continue;
                };
                let sizes: Vec<String> = pts.iter().map(|p| size_name(p.0 as u64)).collect();
                let _ = writeln!(
                    out,
                    "| {} | {mode} | {label} | {} | {:.2} | {} | {:.4} | {:+.1} % | {:.2} |",
                    run.label,
                    sizes.join(", "),
                    1e-9 / fit.slope,
                    if fit.intercept >= 0.0 {
                        duration(fit.intercept)
                    } else {
                        "below 0".into()
                    },
                    fit.r2,
                    (1000.0 * fit.worst).round() / 10.0 + 0.0,
                    fit.exponent
                );
            }
        }
    }
    out.push_str(
        "\nEach line is fitted to the medians by least squares: time = fixed cost + size / \
         throughput. \"Largest miss\" is the median farthest from the line, as a share of the \
         measured median; \"exponent\" is the slope of log time against log size between \
         the smallest and largest region (1.00 is linear, 2.00 quadratic; a fixed cost pulls it \
         below 1). A fixed cost \"below 0\" means the times grow faster than a line. The \
         largest region is the largest that fits node 0 of the bench VM beside the bench's \
         other memory.\n",
    );
    out
}

pub fn markdown(p: &Page) -> String {
    let m = p.machine;
    let kernels: Vec<String> = p
        .runs
        .iter()
        .map(|r| format!("{} ({})", r.label, r.release))
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        "# numapin benchmarks\n\n\
         <!-- Generated by `cargo xtask bench` (xtask/src/bench/report.rs); do not edit by hand. -->\n\n\
         What pinning costs with numapin, against the floor: one raw \
         `VFIO_IOMMU_MAP_DMA` ioctl on memory that is already faulted in. The bench VM \
         boots once per kernel ({}); every figure is the median of repeated runs in that \
         boot, with its spread (min–max) beside it in brackets, and every time \
         is also given as a ratio to the floor measured in the same run on the same kernel, \
         for the same page mode and region size (unmapping, unregistering and releasing \
         against the floor's `UNMAP_DMA`). Where a row is timed in the floor's own rounds \
         (numapin's pins and release), the ratio is the median of the rounds' ratios, \
         so it can differ from the median shown divided by the floor's. Run it with \
         `cargo xtask bench`.\n\n",
        kernels.join(", ")
    );

    out.push_str("## Targets\n\n| kernel | target | | result |\n| --- | --- | --- | --- |\n");
    for run in p.runs {
        for t in &run.targets {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} |",
                run.label,
                t.name,
                if t.met { "met" } else { "**missed**" },
                t.detail
            );
        }
    }
    let _ = write!(
        out,
        "\nThe targets, on each kernel: pin-only (`pin_user` with `Proof::None` on caller memory) within {PIN_ONLY_MAX:.2}× of \
         the raw ioctl; the pin with its full proof within {PROOF_MAX:.1}× of it or at most {:.0} ms over it; \
         one DMA mapping per region whatever its size; prefault with the \
         node's two vCPUs at least {PREFAULT_MIN_SPEEDUP:.1}× faster than one thread, and at least \
         {:.0} % of the same split done without numapin, for {} or more; numapin's io_uring pin within {URING_PIN_MAX:.1}× of raw `IORING_REGISTER_BUFFERS` \
         of as much base-page memory in the same phase; no hinting faults or migrations attributable to numapin regions; allocating \
         through numapind within {SERVICE_FACTOR:.1}× the daemon's own pin plus {:.0} ms. \
         `cargo xtask bench` exits non-zero and names each missed target.\n\n",
        PROOF_SLACK * 1e3,
        PREFAULT_CEILING * 100.0,
        size_name(PREFAULT_MIN_SIZE),
        SERVICE_SLACK * 1e3
    );

    out.push_str("## Machine and VM\n\n");
    let shape = p.shape;
    let cpus = |node: u32| {
        let first = node * shape.cpus_per_node;
        format!("{}–{}", first, first + shape.cpus_per_node - 1)
    };
    let _ = write!(
        out,
        "| | |\n| --- | --- |\n\
         | host CPU | {} ({} cores) |\n\
         | host memory | {:.1} GiB |\n\
         | QEMU | {} |\n\
         | acceleration | TCG (`-accel tcg -cpu max`), multi-threaded, each vCPU thread pinned to one host CPU (per kernel below); never KVM |\n\
         | machine | q35, `intel-iommu` (interrupt remapping, caching mode), QEMU `edu` DMA device bound to vfio-pci |\n\
         | NUMA | node 0: vCPUs {}, {} MiB; node 1: vCPUs {}, {} MiB |\n\
         | hugepages | `{}` |\n\
         | regions | on node 0; IOVA 0x100000000 for the raw mappings |\n",
        m.host_cpu,
        m.host_cores,
        m.host_mem_gib,
        m.qemu,
        cpus(0),
        shape.node_mib[0],
        cpus(1),
        shape.node_mib[1],
        shape.hugepages,
    );
    for run in p.runs {
        let _ = writeln!(
            out,
            "| guest kernel {} | {} ({}); VM ran {:.0} s; vCPU threads: {} |",
            run.label, run.release, run.origin, run.vm_secs, run.vcpus
        );
    }
    out.push('\n');
    for run in p.runs {
        if let Some(left) = run.results.info("sizes.left-out").filter(|s| !s.is_empty()) {
            let _ = writeln!(
                out,
                "Sizes left out on {} (they do not fit the VM): {left}.\n",
                run.label
            );
        }
    }
    out.push_str(
        "Under TCG every guest instruction is emulated, so absolute times are far above \
         bare metal; the ratios to the floor, measured in the same VM, are the figures \
         to compare.\n\n",
    );

    out.push_str("## Plot\n\n");
    let _ = writeln!(
        out,
        "![time relative to one raw MAP_DMA, per kernel, page mode and region size]({})\n",
        p.svg
    );

    out.push_str("## How the time grows with region size\n\n");
    out.push_str(&growth_table(p.runs));
    out.push('\n');

    out.push_str("## What the rows measure\n\n");
    out.push_str(
        "- **floor**: one `VFIO_IOMMU_MAP_DMA` of the whole region on memory bound to \
         node 0 and faulted in, through a type1v2 container opened with vfio-ioctls \
         (no numapin), then its `UNMAP_DMA`.\n\
         - **pin only**: numapin's `Pinner::pin_user` on that same memory with \
         `Proof::None` (the VMM fast path: the pin call and its bookkeeping); beside it \
         `pin_user` with the default full proof (accounting, node query, PFN snapshot), \
         with the node to check and without one. numapin works on the floor's own \
         container (`Pinner::with_type1_container`, as a VMM hands it its container), so \
         both make the same ioctl; each round times the floor and the four pins, in an \
         order that rotates from round to round and runs backwards every other round, and their ratio is the median of the \
         rounds' ratios (the VM's speed drifts between rounds, not within one). All at \
         the floor's IOVA, as a VMM passes its guest-physical address: the IOMMU's \
         superpages depend on the IOVA, which is not numapin's cost.\n\
         - **allocate + prefault + pin + verify**: `Pinner::pin` followed by \
         `PinnedRegion::verify`, numapin's whole path on memory of its own.\n\
         - **one `MAP_DMA` per page**: 4 KiB pages for base pages, 2 MiB for THP and \
         hugetlb (DPDK maps one entry per hugepage memseg). Left out where the region \
         needs more mappings than a container has.\n\
         - **io_uring**: `IORING_REGISTER_BUFFERS` of the same memory in buffers of at \
         most 1 GiB (the io_uring long-term pin), then `UNREGISTER`; and numapin's own \
         io_uring pin (`uring::UringPin`, used for mdev and no-IOMMU containers) on the \
         same memory, the two alternating in the same rounds (in the base-page phase \
         the io_uring target is the median of those rounds' ratios; in the THP and \
         hugetlb phases it is the ratio of medians against the base-page registration \
         below, timed just before). Beside them the raw registration in rings of 4, 16, 32 and 64 MiB \
         (where registering compound pages stops costing more per byte on kernels \
         whose accounting scans the ring), and, in the THP and hugetlb phases, the raw \
         registration of as much base-page memory on the same node (THP off while it is \
         allocated), the reference of the io_uring target.\n\
         - **prefault**: `NodeMemory::allocate` (mmap, `mbind`, `MADV_POPULATE_WRITE`) \
         with one thread, and with one thread per CPU of node 0. Beside them, the \
         ceiling of this VM without numapin's prefault code: one thread per CPU of \
         node 0, created and bound before the clock starts, each faulting an equal \
         share with one `MADV_POPULATE_WRITE`; its ratio to numapin's one thread is \
         what two vCPUs on this host can give at all.\n\n",
    );

    for run in p.runs {
        let r = &run.results;
        let _ = writeln!(out, "## Results on {} ({})\n", run.label, run.release);
        out.push_str(&result_tables(r));

        out.push_str("### DMA mappings and the PFN snapshot\n\n");
        out.push_str(&entries_table(r));
        out.push('\n');

        if r.balance("numapin.pages-moved").is_some() {
            out.push_str("### NUMA balancing\n\n");
            out.push_str(&balance_table(r));
            out.push('\n');
        }

        if let Some(service) = service_section(r) {
            out.push_str("### The pinning service\n\n");
            out.push_str(&service);
            out.push('\n');
        }
    }

    let _ = writeln!(
        out,
        "## Raw data\n\n[{}]({}): one line per figure (kernel, mode, size, metric, unit, samples, \
         median, min, max, the floor it is compared with, and the ratio).",
        p.csv, p.csv
    );
    out
}

/// The result tables, for the terminal.
pub fn table_for_terminal(r: &Results) -> String {
    let mut out = result_tables(r);
    if r.balance("numapin.pages-moved").is_some() {
        out.push_str("### NUMA balancing\n\n");
        out.push_str(&balance_table(r));
    }
    if let Some(service) = service_section(r) {
        out.push_str("\n### The pinning service\n\n");
        out.push_str(&service);
    }
    out
}

/// Where numapind's allocate goes: the daemon's own times (its debug log)
/// and the client's mapping, medians of the same rounds as the latency
/// table.
fn service_breakdown(r: &Results) -> String {
    let mut out = String::from(
        "\n**Where the time goes.** From numapind's debug log (`RUST_LOG=debug`): the \
         checks before the pin (quota, the floor's read of the node's `MemFree`), the \
         library pin inside the daemon, from the pin to the reply ready (the PFN \
         snapshot as extents, the region's entry), the request handled, and the reply \
         sent (JSON encoding, `sendmsg` with the memfd); then, in the client, a second \
         `MAP_POPULATE` mapping of the region's memfd on one thread, timed alone (the \
         client's own mapping inside allocate populates base-page regions of 64 MiB and \
         more on up to four threads), and the rest of allocate (the client's request, \
         receive, decode, and its mapping). Medians.\n\n\
         | pages | size | checks | daemon pin | pin to reply | handled | sent | reply bytes | client `MAP_POPULATE` | client rest |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for mode in SERVICE_MODES {
        let page = mode.trim_start_matches("service.");
        for size in r.sizes_of(mode, "daemon.pin") {
            let m = |k: &str| r.median(mode, size, k);
            let ms = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.2} ms", v * 1e3));
            let rest = match (m("service.allocate"), m("daemon.answer")) {
                (Some(a), Some(d)) => Some(a - d),
                _ => None,
            };
            let _ = writeln!(
                out,
                "| {page} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                size_name(size),
                ms(m("daemon.checks")),
                ms(m("daemon.pin")),
                ms(m("daemon.pin-to-reply")),
                ms(m("daemon.handled")),
                ms(m("daemon.answer")),
                r.get(mode, size, "daemon.reply")
                    .map_or("–".into(), |f| format!("{:.0}", f.max)),
                ms(m("client.map-populate")),
                ms(rest)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmconfig::BENCH_SHAPE;

    fn machine() -> Machine {
        Machine {
            host_cpu: "AMD EPYC".into(),
            host_cores: 2,
            host_mem_gib: 23.4,
            qemu: "QEMU emulator version 7.2.22".into(),
        }
    }

    #[test]
    fn growth_is_fitted_per_kernel_and_mode() {
        let fig = |metric: &str, size: u64, t: f64| Figure {
            mode: "base".into(),
            size,
            metric: metric.into(),
            unit: "s".into(),
            samples: vec![t],
            median: t,
            min: t,
            max: t,
        };
        // 2 ms fixed plus 4 GB/s; the proof grows quadratically.
        let mut figures = Vec::new();
        for size in [64u64 << 20, 256 << 20, 1 << 30] {
            figures.push(fig("floor.map", size, 2e-3 + size as f64 / 4e9));
            figures.push(fig(
                "numapin.pin-proved",
                size,
                (size as f64 / (64u64 << 20) as f64).powi(2),
            ));
        }
        let run = KernelRun::for_test(
            "7.3.4+deb13-amd64",
            Results {
                figures,
                ..Results::default()
            },
        );
        let t = growth_table(&[run]);
        assert!(
            t.contains("| 7.3 | base | raw `MAP_DMA` (the floor) | 64M, 256M, 1G | 4.00 | 2.00 ms | 1.0000 | +0.0 % | 0.96 |"),
            "{t}"
        );
        assert!(
            t.contains("| 7.3 | base | numapin pin, full proof | 64M, 256M, 1G |")
                && t.contains("| 2.00 |"),
            "{t}"
        );
        assert!(!t.contains("prefault"), "{t}");
    }

    #[test]
    fn snapshot_bytes() {
        assert_eq!(bytes_name(48), "48 B");
        assert_eq!(bytes_name(24 * 1024), "24.0 KiB");
        assert_eq!(bytes_name(4 << 20), "4.0 MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0.000_123_4), "0.123 ms");
        assert_eq!(duration(0.045_67), "45.67 ms");
        assert_eq!(duration(1.5), "1500 ms");
        assert_eq!(duration(12.34), "12.3 s");
    }

    #[test]
    fn csv_has_a_line_per_figure_with_ratios() {
        let runs = crate::bench::two_test_runs(0.0105, 0.0105);
        let text = csv(&runs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 2 * runs[0].results.figures.len());
        assert!(lines[0].starts_with("kernel,mode,size_bytes,size,metric"));
        let pin = lines
            .iter()
            .find(|l| l.starts_with("7.3.4+deb13-amd64,base,268435456,256M,numapin.pin-only,s,3,"))
            .unwrap();
        assert!(
            pin.ends_with(",floor.map,1.0500,0.0105 0.0105 0.0105"),
            "{pin}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("6.1.0-56-amd64,numa-balancing,"))
        );
    }

    #[test]
    fn markdown_has_targets_machine_plot_tables_and_raw_data() {
        let runs = crate::bench::two_test_runs(0.0125, 0.0105);
        let md = markdown(&Page {
            runs: &runs,
            machine: &machine(),
            shape: &BENCH_SHAPE,
            svg: "benchmarks/bench.svg",
            csv: "benchmarks/bench.csv",
        });
        for want in [
            "| 6.1 | `pin-only.base.256M` | **missed** | 1.25x raw MAP_DMA",
            "| 7.3 | `pin-only.base.256M` | met | 1.05x raw MAP_DMA",
            "| 6.1 | `one-dma-entry.thp.256M` | met |",
            "| guest kernel 7.3 | 7.3.4+deb13-amd64 (test); VM ran 600 s; vCPU threads: vCPU 0 on host CPU 0 |",
            "## Results on 6.1 (6.1.0-56-amd64)",
            "## Results on 7.3 (7.3.4+deb13-amd64)",
            "## How the time grows with region size",
            "| pin throughput, pin only (GB/s) |",
            "| host CPU | AMD EPYC (2 cores) |",
            "| QEMU | QEMU emulator version 7.2.22 |",
            "node 0: vCPUs 0–1, 5632 MiB",
            "![time relative to one raw MAP_DMA",
            "(benchmarks/bench.svg)",
            "| numapin `pin_user`, `Proof::None`: pin only | 12.50 ms (1.25×) [12.50–12.50 ms] |",
            "| prefault speedup, node threads vs 1 | 2.00× (2 threads) |",
            "65535 × 2 MiB = 128.0 GiB",
            "| numapin (`mbind(MPOL_BIND)`, pinned) | 6 | 6 | -1 |",
            "[benchmarks/bench.csv](benchmarks/bench.csv)",
            "| 6.1 | `service-latency.4K.64M` | met | numapind adds 5.00 ms to the pin inside it",
            "## The pinning service",
            "| 4K | 64M | 100 ms (100–100 ms) | 100 ms (100–100 ms) | 105 ms (105–105 ms) | 1.05× | 111 ms |",
            "| 64K | 4K | 410 (400–420) | 205 |",
            "| 64M | 100 ms (100–100 ms) | 50.00 ms (50.00–50.00 ms) (THP 100 %) | 2.00× |",
            "**Requests per second**, 8 client processes at once, each with its own connection doing 40 allocate/release cycles",
            "0.40× the 4 KiB memfd's time at 64M (100 % in huge pages). That is worth offering",
        ] {
            assert!(md.contains(want), "missing {want:?} in\n{md}");
        }
    }
}
