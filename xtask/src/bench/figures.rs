//! From samples to figures: medians, ratios to the floor measured in the
//! same run, and the targets (issue 5's, and issue 14's proof and
//! prefault ceiling).

use std::collections::BTreeMap;

use crate::results::Report;

/// Page modes in report order.
pub const MODES: [&str; 3] = ["base", "thp", "hugetlb-2M"];
/// The NUMA-balancing figures' `mode`.
pub const BALANCE: &str = "numa-balancing";

/// Pin-only must stay within this factor of one raw `MAP_DMA`…
pub const PIN_ONLY_MAX: f64 = 1.10;
/// …or, where the floor is below a millisecond or two, add at most this
/// many seconds to it (issue 14, item 6: judged by ratio or a stated
/// overhead). On a 0.4 ms floor (7.3's THP and hugetlb at 64 MiB) one
/// round's ratio spreads over 0.4–2x in the TCG VM, and 0.1 ms is what a
/// VMM pinning 64 MiB could never notice.
pub const PIN_ONLY_SLACK: f64 = 1e-4;
/// numapin's io_uring pin must stay within this factor of the raw
/// `IORING_REGISTER_BUFFERS` of as much base-page memory (issue 14).
pub const URING_PIN_MAX: f64 = 1.2;
/// Prefault with the node's threads must be this much faster than one thread…
pub const PREFAULT_MIN_SPEEDUP: f64 = 1.6;
/// …for regions of at least this size…
pub const PREFAULT_MIN_SIZE: u64 = 256 << 20;
/// …on a node with this many vCPUs.
pub const PREFAULT_THREADS: usize = 2;
/// The pin with its full proof (placement, PFN snapshot, accounting) must
/// stay within this factor of one raw `MAP_DMA`…
pub const PROOF_MAX: f64 = 1.30;
/// …or, where the floor is a few milliseconds, add at most this many
/// seconds to it (issue 14: judged by ratio or a stated overhead).
pub const PROOF_SLACK: f64 = 1e-3;
/// Prefault with the node's threads must reach this share of the same
/// split done without numapin (the ceiling), from [`PREFAULT_MIN_SIZE`].
pub const PREFAULT_CEILING: f64 = 0.95;
/// `vfio_iommu_type1`'s default `dma_entry_limit`.
pub const DEFAULT_DMA_ENTRIES: u64 = 65_535;
/// The pinning service's phase.
pub const SERVICE: &str = "service";
/// The service's latency figures, one mode per page size.
pub const SERVICE_MODES: [&str; 2] = ["service.4K", "service.2M"];
/// The 4 KiB memfd against THP-backed memory.
pub const SERVICE_THP: &str = "service.thp";
/// The 8 clients' requests per second.
pub const SERVICE_THROUGHPUT: &str = "service.throughput";
/// Allocating through numapind may take this factor of the library pinning
/// the same memfd in-process…
pub const SERVICE_FACTOR: f64 = 1.10;
/// …plus this many seconds.
pub const SERVICE_SLACK: f64 = 1e-3;

/// One figure: the samples of a metric for one mode and size.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub mode: String,
    pub size: u64,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The smallest and the largest of `v` (infinities for none).
fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// The median (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// Which floor a timed metric is compared with: unmapping, unregistering and
/// releasing against one raw `UNMAP_DMA`, everything else against one raw
/// `MAP_DMA`.
pub fn floor_of(metric: &str) -> &'static str {
    if metric.ends_with("unmap") || metric.ends_with("unregister") || metric.ends_with("release") {
        "floor.unmap"
    } else {
        "floor.map"
    }
}

/// A least-squares line `time = intercept + slope × size` through
/// `(bytes, seconds)` points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Seconds per byte.
    pub slope: f64,
    /// Seconds.
    pub intercept: f64,
    /// Coefficient of determination.
    pub r2: f64,
    /// The point farthest from the line, as a signed share of the point's
    /// own (measured) value: a line's value near the origin can be close
    /// to zero or below it, which would make any share meaningless.
    pub worst: f64,
    /// The slope of ln time against ln size from the smallest to the
    /// largest point: 1 for linear growth, 2 for quadratic.
    pub exponent: f64,
}

/// Fits [`Fit`] to at least three points with distinct sizes and
/// positive times; `None` otherwise.
pub fn linear_fit(points: &[(f64, f64)]) -> Option<Fit> {
    if points.len() < 3 || points.iter().any(|p| p.0 <= 0.0 || p.1 <= 0.0) {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    if slope <= 0.0 {
        return None;
    }
    let intercept = my - slope * mx;
    let line = |x: f64| intercept + slope * x;
    let ss_res: f64 = points.iter().map(|p| (p.1 - line(p.0)).powi(2)).sum();
    let r2 = if syy > 0.0 { 1.0 - ss_res / syy } else { 1.0 };
    let worst = points
        .iter()
        .map(|p| (p.1 - line(p.0)) / p.1)
        .max_by(|a, b| a.abs().total_cmp(&b.abs()))
        .unwrap_or(0.0);
    let lo = points.iter().min_by(|a, b| a.0.total_cmp(&b.0))?;
    let hi = points.iter().max_by(|a, b| a.0.total_cmp(&b.0))?;
    let exponent = (hi.1 / lo.1).ln() / (hi.0 / lo.0).ln();
    Some(Fit {
        slope,
        intercept,
        r2,
        worst,
        exponent,
    })
}

/// Everything one bench run measured.
#[derive(Debug, Default)]
pub struct Results {
    pub figures: Vec<Figure>,
    pub info: BTreeMap<String, String>,
    /// The phases the run planned (`--only` leaves some out); empty means
    /// every phase is expected.
    pub phases: Vec<String>,
}

impl Results {
    pub fn from_report(report: &Report) -> Results {
        let figures = report
            .measurements
            .iter()
            .filter_map(|m| {
                let median = median(&m.samples)?;
                let (min, max) = min_max(&m.samples);
                Some(Figure {
                    mode: m.mode.clone(),
                    size: m.size,
                    metric: m.metric.clone(),
                    unit: m.unit.clone(),
                    samples: m.samples.clone(),
                    median,
                    min,
                    max,
                })
            })
            .collect();
        Results {
            figures,
            info: report.info.iter().cloned().collect(),
            phases: report.scenarios.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Whether the run planned a phase `matches` accepts (every phase
    /// counts as planned when the plan is unknown).
    pub fn planned(&self, matches: impl Fn(&str) -> bool) -> bool {
        self.phases.is_empty() || self.phases.iter().any(|p| matches(p))
    }

    /// Sizes with a `metric` figure in `mode`, ascending.
    pub fn sizes_of(&self, mode: &str, metric: &str) -> Vec<u64> {
        let mut s: Vec<u64> = self
            .figures
            .iter()
            .filter(|f| f.mode == mode && f.metric == metric)
            .map(|f| f.size)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    pub fn get(&self, mode: &str, size: u64, metric: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.mode == mode && f.size == size && f.metric == metric)
    }

    pub fn median(&self, mode: &str, size: u64, metric: &str) -> Option<f64> {
        self.get(mode, size, metric).map(|f| f.median)
    }

    /// Sizes measured in `mode`, ascending.
    pub fn sizes(&self, mode: &str) -> Vec<u64> {
        let mut s: Vec<u64> = self
            .figures
            .iter()
            .filter(|f| f.mode == mode && f.metric == "floor.map")
            .map(|f| f.size)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// A timed figure over the floor of the same mode and size: the median
    /// of the rounds' ratios for a figure timed in the floor's rounds
    /// ([`PAIRED`]; none if its rounds do not pair up), else the ratio of
    /// the medians.
    pub fn ratio(&self, f: &Figure) -> Option<f64> {
        if f.unit != "s" || !MODES.contains(&f.mode.as_str()) {
            return None;
        }
        self.versus(&f.mode, f.size, &f.metric, floor_of(&f.metric))
            .ok()
            .map(|v| v.ratio)
    }

    /// `metric` against `base` (of the same mode and size) round by round
    /// when the bench times both in the same rounds ([`timed_together`]),
    /// else by their medians.
    ///
    /// # Errors
    /// Why the two cannot be compared: one is not measured, or figures
    /// timed together do not have a sample per round each (a bench bug,
    /// not judged by their medians instead).
    pub fn versus(
        &self,
        mode: &str,
        size: u64,
        metric: &str,
        base: &str,
    ) -> Result<Versus, String> {
        let (Some(f), Some(b)) = (self.get(mode, size, metric), self.get(mode, size, base)) else {
            return Err("not measured".into());
        };
        if timed_together(metric, base) {
            Versus::rounds(f, b).ok_or_else(|| {
                format!(
                    "not judged: {metric} ({} samples) and {base} ({}) were timed in the same rounds but do not pair up",
                    f.samples.len(),
                    b.samples.len()
                )
            })
        } else {
            Versus::medians(f, b).ok_or_else(|| format!("not judged: {base} is not positive"))
        }
    }

    pub fn info(&self, key: &str) -> Option<&str> {
        self.info.get(key).map(String::as_str)
    }

    /// NUMA balancing: the median over repetitions of (touching interval −
    /// idle interval) for `who` (`numapin`, `control`) and `what`
    /// (`hint-faults`, `migrations`).
    pub fn attributable(&self, who: &str, what: &str) -> Option<(f64, u64)> {
        let idle = self.balance(&format!("{who}.{what}.idle"))?;
        let touch = self.balance(&format!("{who}.{what}.touch"))?;
        let diffs: Vec<f64> = idle
            .samples
            .iter()
            .zip(&touch.samples)
            .map(|(i, t)| t - i)
            .collect();
        Some((median(&diffs)?, idle.size))
    }

    /// How much `what` varied over every idle interval (numapin's and the
    /// control's): max − min.
    pub fn idle_spread(&self, what: &str) -> Option<f64> {
        let mut all = Vec::new();
        for who in ["numapin", "control"] {
            all.extend(&self.balance(&format!("{who}.{what}.idle"))?.samples);
        }
        let (min, max) = min_max(&all);
        Some(max - min)
    }

    /// A NUMA-balancing figure.
    pub fn balance(&self, metric: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.mode == BALANCE && f.metric == metric)
    }
}

/// Figures timed in the same rounds as their floor (`floor.map`, or
/// `floor.unmap` for the release), one sample per round in round order:
/// the bench's pin variants on the floor's own container.
pub const PAIRED: [&str; 5] = [
    "numapin.pin-only",
    "numapin.pin-proved",
    "numapin.pin-only.no-node",
    "numapin.pin-proved.unprivileged",
    "numapin.release",
];

/// Whether the bench times `metric` and `base` in the same rounds, one
/// sample of each per round in round order: the pin variants with the
/// floor, numapin's io_uring pin with the raw registration of the same
/// memory, and the three prefaults.
pub fn timed_together(metric: &str, base: &str) -> bool {
    (PAIRED.contains(&metric) && base == floor_of(metric))
        || matches!(
            (metric, base),
            ("numapin.uring-pin", "uring.register") | ("numapin.uring-release", "uring.unregister")
        )
        || (metric.starts_with("prefault.") && base.starts_with("prefault."))
}

/// One figure against another: their ratio and difference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Versus {
    /// The median of the rounds' ratios (or the ratio of the medians).
    pub ratio: f64,
    /// The smallest and largest round's ratio (both `ratio` by medians).
    pub spread: (f64, f64),
    /// The median of the rounds' differences, seconds.
    pub over: f64,
    /// Rounds paired; 0 when judged by medians.
    pub rounds: usize,
    /// The two medians.
    pub value: f64,
    pub base: f64,
}

impl Versus {
    /// Round by round: `None` unless both have as many samples, all of
    /// the base's positive.
    fn rounds(f: &Figure, base: &Figure) -> Option<Versus> {
        let n = f.samples.len();
        if n == 0 || n != base.samples.len() || base.samples.iter().any(|&b| b <= 0.0) {
            return None;
        }
        let rounds = f.samples.iter().zip(&base.samples);
        let ratios: Vec<f64> = rounds.clone().map(|(a, b)| a / b).collect();
        let diffs: Vec<f64> = rounds.map(|(a, b)| a - b).collect();
        Some(Versus {
            ratio: median(&ratios)?,
            spread: min_max(&ratios),
            over: median(&diffs)?,
            rounds: n,
            value: f.median,
            base: base.median,
        })
    }

    fn medians(f: &Figure, base: &Figure) -> Option<Versus> {
        (base.median > 0.0).then(|| {
            let ratio = f.median / base.median;
            Versus {
                ratio,
                spread: (ratio, ratio),
                over: f.median - base.median,
                rounds: 0,
                value: f.median,
                base: base.median,
            }
        })
    }

    /// `median of 9 rounds 0.98–1.12x` or `medians`.
    pub fn how(&self) -> String {
        if self.rounds == 0 {
            "ratio of medians".into()
        } else {
            format!(
                "median of {} rounds' ratios, {:.2}–{:.2}x",
                self.rounds, self.spread.0, self.spread.1
            )
        }
    }
}

/// `64M`, `1G`.
pub fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// One target of issue 5, judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub met: bool,
    pub detail: String,
}

fn target(name: String, met: bool, detail: String) -> Target {
    Target { name, met, detail }
}

/// Judges every target. A figure that should exist and does not is a miss.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for mode in MODES {
        let prefix = format!("{mode}.");
        if !r.planned(|p| p.starts_with(&prefix)) {
            continue;
        }
        let sizes = r.sizes(mode);
        if sizes.is_empty() {
            out.push(target(
                format!("measured.{mode}"),
                false,
                "no figures for this page mode".into(),
            ));
        }
        for size in sizes {
            let tag = format!("{mode}.{}", size_name(size));
            // 1. Pin-only within PIN_ONLY_MAX of the raw ioctl, or
            // PIN_ONLY_SLACK over it, round by round (the bench times the
            // floor in each round); 1b. the proved pin within PROOF_MAX, or
            // PROOF_SLACK over it.
            let ms = |f: f64| f * 1e3;
            let near_floor = |name: &str, metric: &str, what: &str, max: f64, slack: f64| {
                let name = format!("{name}.{tag}");
                match r.versus(mode, size, metric, "floor.map") {
                    Ok(v) => target(
                        name,
                        v.ratio <= max || v.over <= slack,
                        format!(
                            "{:.2}x raw MAP_DMA, {:+.3} ms ({}; {what} {:.3} ms, MAP_DMA {:.3} ms; limit {max:.2}x or {:+} ms)",
                            v.ratio,
                            ms(v.over),
                            v.how(),
                            ms(v.value),
                            ms(v.base),
                            // Whole tenths of a millisecond, as they read.
                            (ms(slack) * 10.0).round() / 10.0
                        ),
                    ),
                    Err(why) => target(name, false, why),
                }
            };
            out.push(near_floor(
                "pin-only",
                "numapin.pin-only",
                "pin_user",
                PIN_ONLY_MAX,
                PIN_ONLY_SLACK,
            ));
            out.push(near_floor(
                "proof",
                "numapin.pin-proved",
                "pin with the full proof",
                PROOF_MAX,
                PROOF_SLACK,
            ));
            // 2. One DMA mapping per region, whatever its size.
            out.push(match r.median(mode, size, "entries.numapin") {
                Some(n) => target(
                    format!("one-dma-entry.{tag}"),
                    n == 1.0,
                    format!("numapin's region took {n} DMA mapping(s)"),
                ),
                None => target(format!("one-dma-entry.{tag}"), false, "not measured".into()),
            });
            // 2b. numapin's io_uring pin within 1.2x of the raw registration
            // of as much base-page memory, measured in the same phase (in the
            // base phase that is the raw registration of the same memory).
            let reference = if mode == "base" {
                "uring.register"
            } else {
                "uring.register.base-pages"
            };
            let name = format!("uring-pin.{tag}");
            out.push(
                match r.versus(mode, size, "numapin.uring-pin", reference) {
                    Ok(v) => {
                        let rings = r
                            .median(mode, size, "numapin.uring-rings")
                            .map_or(String::new(), |n| format!(", {n} ring(s)"));
                        target(
                            name,
                            v.ratio <= URING_PIN_MAX,
                            format!(
                                "{:.2}x raw REGISTER_BUFFERS of base pages ({}; UringPin {:.3} ms{rings}, base-page register {:.3} ms; limit {URING_PIN_MAX:.1}x)",
                                v.ratio,
                                v.how(),
                                v.value * 1e3,
                                v.base * 1e3
                            ),
                        )
                    }
                    Err(why) => target(name, false, why),
                },
            );
            // 3. Parallel prefault, for 256 MiB and more. One thread, the
            // node's threads and the raw split run in the same rounds:
            // judged by the median of the rounds' ratios.
            if size >= PREFAULT_MIN_SIZE {
                let name = format!("parallel-prefault.{tag}");
                let threads = r.median(mode, size, "prefault.threads").unwrap_or(0.0) as usize;
                let speedup = r.versus(mode, size, "prefault.1-thread", "prefault.node-threads");
                out.push(match speedup {
                    _ if threads != PREFAULT_THREADS => target(
                        name,
                        false,
                        format!("node 0 has {threads} vCPU(s), the target is for {PREFAULT_THREADS}"),
                    ),
                    Ok(v) => {
                        let ceiling = r
                            .versus(mode, size, "prefault.1-thread", "prefault.raw-split")
                            .map_or(String::new(), |c| {
                                format!("; raw split without numapin {:.2}x", c.ratio)
                            });
                        target(
                            name,
                            v.ratio >= PREFAULT_MIN_SPEEDUP,
                            format!(
                                "{:.2}x faster with {threads} threads ({}; {:.0} ms vs {:.0} ms; at least {PREFAULT_MIN_SPEEDUP:.1}x{ceiling})",
                                v.ratio,
                                v.how(),
                                v.base * 1e3,
                                v.value * 1e3
                            ),
                        )
                    }
                    Err(why) => target(name, false, why),
                });
                // 3b. The node's threads with numapin against the same
                // split without it.
                let name = format!("prefault-ceiling.{tag}");
                out.push(
                    match r.versus(mode, size, "prefault.raw-split", "prefault.node-threads") {
                        Ok(v) => target(
                            name,
                            v.ratio >= PREFAULT_CEILING,
                            format!(
                                "{:.0} % of the ceiling ({}; numapin {:.0} ms, the same split without numapin {:.0} ms; at least {:.0} %)",
                                v.ratio * 100.0,
                                v.how(),
                                v.base * 1e3,
                                v.value * 1e3,
                                PREFAULT_CEILING * 100.0
                            ),
                        ),
                        Err(why) => target(name, false, why),
                    },
                );
            }
        }
    }
    if r.planned(|p| p == SERVICE) {
        out.extend(service_targets(r));
    }
    if !r.planned(|p| p == BALANCE) {
        return out;
    }
    // 4. No hinting faults or migrations attributable to numapin regions,
    // shown against a control that does take them. The process's other
    // mappings (stacks, heap) fault in idle and touching intervals alike;
    // how much that varies between idle intervals is the resolution of the
    // difference. A region whose VMA were scanned would fault once per
    // touched page per scan pass: thousands, not a handful.
    let faults = r.attributable("numapin", "hint-faults");
    let migrations = r.attributable("numapin", "migrations");
    let moved = r.balance("numapin.pages-moved").map(|f| f.max);
    let noise = r.idle_spread("hint-faults");
    out.push(match (faults, migrations, moved, noise) {
        (Some((f, _)), Some((m, _)), Some(moved), Some(noise)) => target(
            "numa-balancing.numapin".into(),
            f <= noise && m <= 0.0 && moved == 0.0,
            format!(
                "attributable: {f:+} hinting faults (median of touching minus idle; idle intervals vary by {noise}), {m:+} migrations; {moved} pinned pages changed node or frame"
            ),
        ),
        _ => target(
            "numa-balancing.numapin".into(),
            false,
            "not measured".into(),
        ),
    });
    let control = r.attributable("control", "migrations");
    out.push(match control {
        Some((m, size)) => target(
            "numa-balancing.control-migrates".into(),
            m > 0.0,
            format!(
                "the default-policy control had {m:+} migrations attributable to it ({} pages); without that the numapin figure proves nothing",
                size / 4096
            ),
        ),
        None => target(
            "numa-balancing.control-migrates".into(),
            false,
            "not measured".into(),
        ),
    });
    out
}

/// Allocate through numapind (the region mapped in the client) against
/// the library pinning the same memfd, for every page size and size
/// measured: within [`SERVICE_FACTOR`] × the library plus
/// [`SERVICE_SLACK`].
///
/// Judged round by round where the daemon's own `Pinner::pin` time is in
/// the run (its debug log): the median of `allocate − pin` of each round
/// (`service.overhead`) must stay within `(SERVICE_FACTOR − 1)` × the
/// daemon's pin plus the slack, so the VM's speed, which differs between
/// the library's and the daemon's blocks, does not decide the verdict.
/// `Pinner::pin` in the bench process (alternating blocks) is given
/// beside it, and judged where the daemon's figures are missing.
fn service_targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for mode in SERVICE_MODES {
        let page = mode.trim_start_matches("service.");
        let sizes = r.sizes_of(mode, "library.pin");
        if sizes.is_empty() {
            out.push(target(
                format!("service-latency.{page}"),
                false,
                "not measured".into(),
            ));
        }
        for size in sizes {
            let name = format!("service-latency.{page}.{}", size_name(size));
            let m = |k: &str| r.median(mode, size, k);
            let (svc, here) = (m("service.allocate"), m("library.pin"));
            out.push(match (svc, m("service.overhead"), m("daemon.pin"), here) {
                (Some(svc), Some(over), Some(pin), Some(here)) if pin > 0.0 && here > 0.0 => {
                    let limit = (SERVICE_FACTOR - 1.0) * pin + SERVICE_SLACK;
                    target(
                        name,
                        over <= limit,
                        format!(
                            "numapind adds {:.2} ms to the pin inside it (median of the rounds' allocate − pin; allocate {:.2} ms, pin {:.2} ms, {:.2}x; limit {:.0} % of the pin + {:.0} ms = {:.2} ms); Pinner::pin in this process in alternating blocks {:.2} ms, allocate {:.2}x that",
                            over * 1e3,
                            svc * 1e3,
                            pin * 1e3,
                            svc / pin,
                            (SERVICE_FACTOR - 1.0) * 100.0,
                            SERVICE_SLACK * 1e3,
                            limit * 1e3,
                            here * 1e3,
                            svc / here
                        ),
                    )
                }
                (Some(svc), _, _, Some(lib)) if lib > 0.0 => {
                    let limit = SERVICE_FACTOR * lib + SERVICE_SLACK;
                    target(
                        name,
                        svc <= limit,
                        format!(
                            "{:.2}x the library (numapind allocate {:.2} ms, Pinner::pin of the memfd in this process {:.2} ms; limit {SERVICE_FACTOR:.1}x + {:.0} ms = {:.2} ms)",
                            svc / lib,
                            svc * 1e3,
                            lib * 1e3,
                            SERVICE_SLACK * 1e3,
                            limit * 1e3
                        ),
                    )
                }
                _ => target(name, false, "not measured".into()),
            });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::results::Report;

    /// A report with the figures of one size in every mode and the NUMA
    /// balancing figures; `pin` is the pin-only median, `par` the parallel
    /// prefault time (one thread takes 1.0 s).
    pub fn report(pin: f64, par: f64, numapin_touch_faults: u64) -> Report {
        report_with_service(pin, par, numapin_touch_faults, 0.105)
    }

    /// [`report`] with numapin's io_uring pin taking `uring` seconds in
    /// every mode (base's raw register 30 ms, the base-page reference of
    /// the THP and hugetlb phases 25 ms).
    pub fn report_with_uring(uring: f64) -> Report {
        report_full(0.0105, 0.5, 6, 0.105, uring)
    }

    /// The phases of a full run with one size.
    const PHASES: [&str; 5] = [
        "base.256M",
        "thp.256M",
        "hugetlb-2M.256M",
        "numa-balancing",
        "service",
    ];

    /// [`report`] with the service's 4K 64M allocate taking `svc_4k`
    /// seconds against the library's 0.1 s (2M: 11.5 ms against 10 ms).
    pub fn report_with_service(
        pin: f64,
        par: f64,
        numapin_touch_faults: u64,
        svc_4k: f64,
    ) -> Report {
        report_full(pin, par, numapin_touch_faults, svc_4k, 0.027)
    }

    fn report_full(
        pin: f64,
        par: f64,
        numapin_touch_faults: u64,
        svc_4k: f64,
        uring: f64,
    ) -> Report {
        let mut lines = vec![
            format!(
                r#"{{"type":"plan","suite":"bench","kernel":"6.12.95","scenarios":{:?}}}"#,
                PHASES
            ),
            r#"{"type":"info","key":"dma_avail.fresh","value":"65535"}"#.to_string(),
            r#"{"type":"info","key":"iova.usable_bytes","value":"549751619584"}"#.to_string(),
        ];
        let size = 256u64 << 20;
        for mode in MODES {
            for (metric, unit, samples) in [
                ("floor.map", "s", vec![0.010, 0.011, 0.009]),
                ("floor.unmap", "s", vec![0.020, 0.020, 0.020]),
                ("numapin.pin-only", "s", vec![pin, pin, pin]),
                (
                    "numapin.pin-proved",
                    "s",
                    vec![pin + 0.002, pin + 0.002, pin + 0.002],
                ),
                ("numapin.release", "s", vec![0.021, 0.021, 0.021]),
                ("per-page.map", "s", vec![0.5]),
                ("prefault.1-thread", "s", vec![1.0, 1.0, 1.0]),
                ("prefault.node-threads", "s", vec![par, par, par]),
                ("prefault.raw-split", "s", vec![0.6, 0.6, 0.6]),
                ("prefault.threads", "count", vec![2.0]),
                ("entries.numapin", "count", vec![1.0]),
                ("uring.register", "s", vec![0.030, 0.031, 0.029]),
                ("uring.register.base-pages", "s", vec![0.025, 0.025, 0.026]),
                ("numapin.uring-pin", "s", vec![uring, uring, uring]),
                ("numapin.uring-rings", "count", vec![16.0]),
                ("entries.per-page", "count", vec![128.0]),
            ] {
                lines.push(format!(
                    r#"{{"type":"measure","mode":"{mode}","size":{size},"metric":"{metric}","unit":"{unit}","samples":{samples:?}}}"#
                ));
            }
        }
        for (metric, samples) in [
            ("numapin.hint-faults.idle", vec![5, 7, 6]),
            (
                "numapin.hint-faults.touch",
                vec![numapin_touch_faults, numapin_touch_faults, 5],
            ),
            ("numapin.migrations.idle", vec![0, 0, 0]),
            ("numapin.migrations.touch", vec![0, 0, 0]),
            ("numapin.pages-moved", vec![0, 0, 0]),
            ("control.hint-faults.idle", vec![4, 4, 4]),
            ("control.hint-faults.touch", vec![16000, 16001, 15000]),
            ("control.migrations.idle", vec![0, 0, 0]),
            ("control.migrations.touch", vec![16384, 16384, 16000]),
            ("control.pages-moved", vec![16384, 16384, 16000]),
        ] {
            lines.push(format!(
                r#"{{"type":"measure","mode":"numa-balancing","size":67108864,"metric":"{metric}","unit":"count","samples":{samples:?}}}"#
            ));
        }
        let size = 64u64 << 20;
        for (mode, metric, unit, samples) in [
            ("service.4K", "library.pin", "s", vec![0.1, 0.1, 0.1]),
            ("service.4K", "daemon.pin", "s", vec![0.1, 0.1, 0.1]),
            ("service.4K", "service.overhead", "s", vec![svc_4k - 0.1; 3]),
            ("service.4K", "service.allocate", "s", vec![svc_4k; 3]),
            ("service.4K", "library.release", "s", vec![0.02]),
            ("service.4K", "service.release", "s", vec![0.021]),
            ("service.2M", "library.pin", "s", vec![0.010]),
            ("service.2M", "daemon.pin", "s", vec![0.010]),
            ("service.2M", "service.overhead", "s", vec![0.0015]),
            ("service.2M", "service.allocate", "s", vec![0.0115]),
            ("service.thp", "memfd-4k.pin", "s", vec![0.1]),
            ("service.thp", "anon-thp.pin", "s", vec![0.05]),
            ("service.thp", "shmem-4k.by-hand", "s", vec![0.1]),
            ("service.thp", "shmem-thp.by-hand", "s", vec![0.04]),
            (
                "service.thp",
                "anon-thp.pmd-bytes",
                "bytes",
                vec![size as f64],
            ),
            (
                "service.thp",
                "shmem-thp.pmd-bytes",
                "bytes",
                vec![size as f64],
            ),
            (
                "service.throughput",
                "4K.requests-per-s",
                "1/s",
                vec![400.0, 420.0, 410.0],
            ),
            ("service.throughput", "clients", "count", vec![8.0]),
            (
                "service.throughput",
                "cycles-per-client",
                "count",
                vec![40.0],
            ),
        ] {
            let size = match (mode, metric) {
                ("service.throughput", "clients" | "cycles-per-client") => 0,
                ("service.throughput", _) => 64 << 10,
                _ => size,
            };
            lines.push(format!(
                r#"{{"type":"measure","mode":"{mode}","size":{size},"metric":"{metric}","unit":"{unit}","samples":{samples:?}}}"#
            ));
        }
        for p in PHASES {
            lines.push(format!(
                r#"{{"type":"result","name":"{p}","status":"pass","secs":1}}"#
            ));
        }
        lines.push(r#"{"type":"done"}"#.into());
        Report::parse(&lines.join("\n"))
    }

    #[test]
    fn a_linear_fit_finds_throughput_fixed_cost_and_growth() {
        // 1 ms fixed plus 1 GB/s.
        let pts: Vec<(f64, f64)> = [64e6, 256e6, 1e9, 2e9]
            .iter()
            .map(|&b| (b, 1e-3 + b / 1e9))
            .collect();
        let f = linear_fit(&pts).unwrap();
        assert!((1e-9 / f.slope - 1.0).abs() < 1e-9, "{f:?}");
        assert!((f.intercept - 1e-3).abs() < 1e-9, "{f:?}");
        assert!((f.r2 - 1.0).abs() < 1e-9 && f.worst.abs() < 1e-9, "{f:?}");
        assert!((f.exponent - 1.0).abs() < 0.02, "{f:?}");
        // Quadratic growth shows in the exponent and in the misses.
        let q: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0].iter().map(|&x| (x, x * x)).collect();
        let f = linear_fit(&q).unwrap();
        assert!((f.exponent - 2.0).abs() < 1e-9, "{f:?}");
        // The worst point, (1, 1), lies 5.217 above the line's -4.217
        // there: as a share of the measured 1, +5.217.
        assert!((f.worst - 5.2174).abs() < 1e-3, "{f:?}");
        assert_eq!(linear_fit(&pts[..2]), None);
        assert_eq!(linear_fit(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn ratios_use_the_floor_of_the_same_mode_and_size() {
        let r = Results::from_report(&report(0.0105, 0.5, 6));
        let f = r.get("thp", 256 << 20, "numapin.pin-only").unwrap();
        assert!((r.ratio(f).unwrap() - 1.05).abs() < 1e-9);
        let f = r.get("thp", 256 << 20, "numapin.release").unwrap();
        assert!(
            (r.ratio(f).unwrap() - 1.05).abs() < 1e-9,
            "release is against UNMAP"
        );
        let f = r.get("thp", 256 << 20, "entries.numapin").unwrap();
        assert_eq!(r.ratio(f), None, "counts have no ratio");
        assert_eq!(r.sizes("base"), [256 << 20]);
        assert_eq!(r.info("dma_avail.fresh"), Some("65535"));
    }

    #[test]
    fn all_targets_met() {
        let t = targets(&Results::from_report(&report(0.0105, 0.5, 6)));
        let missed: Vec<_> = t.iter().filter(|t| !t.met).collect();
        assert!(missed.is_empty(), "{missed:#?}");
        // 3 modes x (pin-only, proof, one entry, io_uring pin, prefault,
        // its ceiling) + 2 balancing targets + the service's latency for 4K
        // and 2M pages.
        assert_eq!(t.len(), 22);
    }

    #[test]
    fn the_uring_pin_is_judged_against_base_pages_of_the_same_phase() {
        // 27 ms: 0.90x base's own raw register (30 ms), 1.08x the 25 ms
        // base-page reference of THP and hugetlb: all met.
        let t = targets(&Results::from_report(&report_with_uring(0.027)));
        assert!(t.iter().all(|t| t.met), "{t:#?}");
        let thp = t.iter().find(|t| t.name == "uring-pin.thp.256M").unwrap();
        assert!(
            thp.detail.starts_with(
                "1.08x raw REGISTER_BUFFERS of base pages (ratio of medians; UringPin 27.000 ms, 16 ring(s), base-page register 25.000 ms"
            ),
            "{}",
            thp.detail
        );
        // 31 ms: 1.03x in base, 1.24x in THP and hugetlb.
        let t = targets(&Results::from_report(&report_with_uring(0.031)));
        let missed: Vec<&str> = t
            .iter()
            .filter(|t| !t.met)
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(missed, ["uring-pin.thp.256M", "uring-pin.hugetlb-2M.256M"]);
        // Without the reference the target is missed, not skipped.
        let text = [
            r#"{"type":"plan","suite":"bench","kernel":"6.1","scenarios":["thp.64M"]}"#,
            r#"{"type":"measure","mode":"thp","size":67108864,"metric":"floor.map","unit":"s","samples":[0.01]}"#,
            r#"{"type":"measure","mode":"thp","size":67108864,"metric":"numapin.uring-pin","unit":"s","samples":[0.01]}"#,
            r#"{"type":"done"}"#,
        ]
        .join("\n");
        let t = targets(&Results::from_report(&Report::parse(&text)));
        let u = t.iter().find(|t| t.name == "uring-pin.thp.64M").unwrap();
        assert!(!u.met && u.detail == "not measured", "{u:?}");
    }

    #[test]
    fn the_service_is_judged_against_the_library_plus_a_millisecond() {
        // 0.1 s pin inside the daemon: it may add 10 % + 1 ms = 11 ms.
        let t = targets(&Results::from_report(&report_with_service(
            0.0105, 0.5, 6, 0.112,
        )));
        let svc = t
            .iter()
            .find(|t| t.name == "service-latency.4K.64M")
            .unwrap();
        assert!(!svc.met, "{svc:?}");
        assert!(
            svc.detail
                .starts_with("numapind adds 12.00 ms to the pin inside it"),
            "{}",
            svc.detail
        );
        let t = targets(&Results::from_report(&report_with_service(
            0.0105, 0.5, 6, 0.110,
        )));
        assert!(t.iter().all(|t| t.met), "{t:#?}");
    }

    #[test]
    fn the_service_is_judged_round_by_round_against_the_pin_inside_it() {
        let run = |overhead: Option<&str>| {
            let mut text = vec![
                r#"{"type":"plan","suite":"bench","kernel":"6.1","scenarios":["service"]}"#.to_string(),
                // A slow block for the in-process library.
                r#"{"type":"measure","mode":"service.4K","size":2097152,"metric":"library.pin","unit":"s","samples":[0.030]}"#.to_string(),
                r#"{"type":"measure","mode":"service.4K","size":2097152,"metric":"service.allocate","unit":"s","samples":[0.025]}"#.to_string(),
            ];
            if let Some(o) = overhead {
                text.push(r#"{"type":"measure","mode":"service.4K","size":2097152,"metric":"daemon.pin","unit":"s","samples":[0.020]}"#.to_string());
                text.push(format!(r#"{{"type":"measure","mode":"service.4K","size":2097152,"metric":"service.overhead","unit":"s","samples":{o}}}"#));
            }
            text.push(r#"{"type":"done"}"#.to_string());
            targets(&Results::from_report(&Report::parse(&text.join("\n"))))
                .into_iter()
                .find(|t| t.name == "service-latency.4K.2M")
                .unwrap()
        };
        // 20 ms pin: the limit is 10 % of it + 1 ms = 3 ms.
        let t = run(Some("[0.0035, 0.0031, 0.004]"));
        assert!(!t.met, "{t:?}");
        assert!(
            t.detail
                .starts_with("numapind adds 3.50 ms to the pin inside it"),
            "{}",
            t.detail
        );
        assert!(
            t.detail
                .contains("in alternating blocks 30.00 ms, allocate 0.83x that"),
            "{}",
            t.detail
        );
        assert!(run(Some("[0.0029, 0.0025, 0.004]")).met);
        // Without the daemon's figures the in-process one is judged.
        let t = run(None);
        assert!(
            t.met && t.detail.contains("in this process 30.00 ms"),
            "{t:?}"
        );
    }

    #[test]
    fn a_partial_run_judges_only_its_phases() {
        let text = [
            r#"{"type":"plan","suite":"bench","kernel":"6.1","scenarios":["service"]}"#,
            r#"{"type":"measure","mode":"service.4K","size":2097152,"metric":"library.pin","unit":"s","samples":[0.01]}"#,
            r#"{"type":"measure","mode":"service.4K","size":2097152,"metric":"service.allocate","unit":"s","samples":[0.01]}"#,
            r#"{"type":"result","name":"service","status":"pass","secs":1}"#,
            r#"{"type":"done"}"#,
        ]
        .join("\n");
        let t = targets(&Results::from_report(&Report::parse(&text)));
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["service-latency.4K.2M", "service-latency.2M"]);
        assert!(t[0].met && !t[1].met);
    }

    #[test]
    fn misses_are_named() {
        let t = targets(&Results::from_report(&report(0.0125, 0.7, 500)));
        let missed: Vec<&str> = t
            .iter()
            .filter(|t| !t.met)
            .map(|t| t.name.as_str())
            .collect();
        assert!(missed.contains(&"pin-only.base.256M"), "{missed:?}");
        assert!(
            missed.contains(&"parallel-prefault.hugetlb-2M.256M"),
            "{missed:?}"
        );
        assert!(missed.contains(&"numa-balancing.numapin"), "{missed:?}");
        assert!(!missed.contains(&"one-dma-entry.thp.256M"), "{missed:?}");
        // 14.5 ms proved against a 10 ms floor: 1.45x and 4.5 ms over.
        assert!(missed.contains(&"proof.base.256M"), "{missed:?}");
        // 0.7 s against a 0.6 s split without numapin: 86 %.
        let ceil = t
            .iter()
            .find(|t| t.name == "prefault-ceiling.thp.256M")
            .unwrap();
        assert!(
            !ceil.met && ceil.detail.starts_with("86 % of the ceiling"),
            "{ceil:?}"
        );
        let pre = t
            .iter()
            .find(|t| t.name == "parallel-prefault.base.256M")
            .unwrap();
        assert!(
            pre.detail
                .ends_with("at least 1.6x; raw split without numapin 1.67x)"),
            "{}",
            pre.detail
        );
        let pin = t.iter().find(|t| t.name == "pin-only.thp.256M").unwrap();
        assert!(
            pin.detail.starts_with("1.25x raw MAP_DMA"),
            "{}",
            pin.detail
        );
    }

    #[test]
    fn a_small_floor_is_judged_by_the_overhead() {
        let run = |metric: &str, secs: f64, target: &str| {
            let text = [
                r#"{"type":"plan","suite":"bench","kernel":"6.1","scenarios":["hugetlb-2M.64M"]}"#.to_string(),
                r#"{"type":"measure","mode":"hugetlb-2M","size":67108864,"metric":"floor.map","unit":"s","samples":[0.0006]}"#.to_string(),
                format!(r#"{{"type":"measure","mode":"hugetlb-2M","size":67108864,"metric":"{metric}","unit":"s","samples":[{secs}]}}"#),
                r#"{"type":"done"}"#.to_string(),
            ]
            .join("\n");
            targets(&Results::from_report(&Report::parse(&text)))
                .into_iter()
                .find(|t| t.name == target)
                .unwrap()
        };
        let proof = |secs| run("numapin.pin-proved", secs, "proof.hugetlb-2M.64M");
        // 2.33x, but 0.8 ms over: met; 1.6 ms over: missed.
        let t = proof(0.0014);
        assert!(
            t.met && t.detail.starts_with("2.33x raw MAP_DMA, +0.800 ms"),
            "{t:?}"
        );
        assert!(!proof(0.0022).met);
        // Pin-only: 1.15x but 0.09 ms over: met; 1.33x, 0.2 ms over: missed.
        let pin = |secs| run("numapin.pin-only", secs, "pin-only.hugetlb-2M.64M");
        let t = pin(0.00069);
        assert!(
            t.met && t.detail.starts_with("1.15x raw MAP_DMA, +0.090 ms"),
            "{t:?}"
        );
        let t = pin(0.0008);
        assert!(
            !t.met && t.detail.contains("limit 1.10x or +0.1 ms"),
            "{t:?}"
        );
    }

    #[test]
    fn the_pin_is_judged_against_the_floor_of_its_own_round() {
        // The VM ran fast in the first rounds and slow in the last: by
        // medians the pin looks 2.1x the floor, round by round it is 1.05x.
        let floor = [0.010, 0.010, 0.010, 0.020, 0.020];
        let pin = [0.0105, 0.0105, 0.021, 0.021, 0.021];
        let text = [
            r#"{"type":"plan","suite":"bench","kernel":"6.1","scenarios":["base.64M"]}"#.to_string(),
            format!(r#"{{"type":"measure","mode":"base","size":67108864,"metric":"floor.map","unit":"s","samples":{floor:?}}}"#),
            format!(r#"{{"type":"measure","mode":"base","size":67108864,"metric":"numapin.pin-only","unit":"s","samples":{pin:?}}}"#),
            // The io_uring registration is not timed in the floor's rounds.
            format!(r#"{{"type":"measure","mode":"base","size":67108864,"metric":"uring.register","unit":"s","samples":{pin:?}}}"#),
            r#"{"type":"done"}"#.to_string(),
        ]
        .join("\n");
        let r = Results::from_report(&Report::parse(&text));
        let t = targets(&r);
        let pin = t.iter().find(|t| t.name == "pin-only.base.64M").unwrap();
        assert!(pin.met, "{pin:?}");
        assert!(
            pin.detail.starts_with(
                "1.05x raw MAP_DMA, +1.000 ms (median of 5 rounds' ratios, 1.05–2.10x;"
            ),
            "{}",
            pin.detail
        );
        let f = r.get("base", 64 << 20, "numapin.pin-only").unwrap();
        assert!((r.ratio(f).unwrap() - 1.05).abs() < 1e-9);
        let u = r.get("base", 64 << 20, "uring.register").unwrap();
        assert!((r.ratio(u).unwrap() - 2.1).abs() < 1e-9, "by medians");
        // A round lost from one side is a bench bug: named, not judged by
        // the medians instead.
        let text = text.replace("0.0105, 0.0105, 0.021,", "0.0105, 0.021,");
        let r = Results::from_report(&Report::parse(&text));
        let f = r.get("base", 64 << 20, "numapin.pin-only").unwrap();
        assert_eq!(r.ratio(f), None);
        let t = targets(&r);
        let pin = t.iter().find(|t| t.name == "pin-only.base.64M").unwrap();
        assert!(!pin.met, "{pin:?}");
        assert_eq!(
            pin.detail,
            "not judged: numapin.pin-only (4 samples) and floor.map (5) were timed in the same rounds but do not pair up"
        );
    }

    #[test]
    fn nothing_measured_is_a_miss() {
        let t = targets(&Results::default());
        assert!(t.iter().all(|t| !t.met));
        assert!(t.iter().any(|t| t.name == "measured.base"));
        assert!(t.iter().any(|t| t.name == "numa-balancing.numapin"));
    }
}
