//! `cargo xtask bench`: boots the bench VM ([`vmconfig::BENCH`]), runs
//! `numapin-bench` in it, and turns its samples into
//! `docs/benchmarks/bench.csv`, `docs/benchmarks/bench.svg` and
//! `docs/benchmarks.md`. It fails, listing them by name, when targets are
//! missed. `cargo xtask test` never runs it.
//!
//! - [`figures`]: medians, ratios to the floor, the targets;
//! - [`report`]: the CSV and the Markdown page;
//! - [`plot`]: the SVG.

mod figures;
mod plot;
mod report;

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::kernel;
use crate::qemu::{self, Console, RunMode};
use crate::results::{Outcome, Report};
use crate::{cmd, layout, tasks, vmconfig};

pub use figures::Results;

/// What `cargo xtask bench` was asked for.
pub struct Options {
    /// Region sizes (`64M,256M`) instead of the default set.
    pub sizes: Option<String>,
    /// Only phases whose name contains this.
    pub only: Option<String>,
    /// Stream the guest console.
    pub console: bool,
    /// The guest kernel.
    pub kernel: kernel::KernelKind,
}

impl Options {
    /// A partial run, or one on another kernel than the stock one, writes
    /// its report next to the VM's logs, not to docs/.
    fn partial(&self) -> bool {
        self.sizes.is_some() || self.only.is_some() || self.kernel != kernel::KernelKind::Stock
    }
}

/// Where the machine's facts come from on the host.
pub struct Machine {
    pub host_cpu: String,
    pub host_cores: usize,
    pub host_mem_gib: f64,
    pub qemu: String,
    pub guest_kernel: String,
    pub kernel_origin: String,
}

impl Machine {
    fn read(kernel: &kernel::Kernel, guest_release: Option<&str>) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let host_cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let qemu = cmd::output(Command::new("qemu-system-x86_64").arg("--version"))
            .ok()
            .and_then(|o| o.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            host_cpu,
            host_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            host_mem_gib: kb / (1 << 20) as f64,
            qemu,
            guest_kernel: guest_release.unwrap_or(&kernel.release).to_string(),
            kernel_origin: kernel.origin.clone(),
        }
    }
}

/// `cargo xtask bench`.
pub fn bench(opts: &Options) -> Result<ExitCode> {
    let start = Instant::now();
    let Some(config) = vmconfig::bench(opts.kernel) else {
        bail!(
            "the bench runs on the stock or backports kernel, not {}",
            opts.kernel.name()
        );
    };
    tasks::ensure_packages([config.kernel])?;
    let binaries = tasks::build_guest_binaries()?;
    let kernel = kernel::prepare(config.kernel)?;
    let dir = layout::vm_dir(config.name);
    let _lock = layout::lock_vm_dir(config.name)?;
    let initrd = tasks::make_initramfs(&dir, &kernel, &binaries, None)?;
    let mut env = Vec::new();
    for (key, value) in [("SIZES", &opts.sizes), ("ONLY", &opts.only)] {
        if let Some(v) = value {
            if v.is_empty() || v.contains(char::is_whitespace) {
                bail!("--{} takes a value without spaces", key.to_lowercase());
            }
            env.push(format!("NUMAPIN_BENCH_{key}={v}"));
        }
    }
    println!(
        "==> bench VM {} (kernel {}); this takes about 10 minutes",
        config.name, kernel.release
    );
    let outcome = qemu::boot(&qemu::Run {
        config,
        kernel: &kernel,
        initrd: &initrd,
        run: RunMode::Bench.name(),
        dir: &dir,
        console: if opts.console {
            Console::Stream
        } else {
            Console::Capture
        },
        timeout: Some(qemu::timeout()?),
        silence: None,
        env: &env,
    })?;
    let text = std::fs::read(&outcome.results)
        .with_context(|| format!("no results file {}", outcome.results.display()))?;
    let report = Report::parse(&String::from_utf8_lossy(&text));
    println!("    VM ran {}", cmd::secs(outcome.elapsed));

    let mut problems = outcome.problems();
    problems.extend(report.problems.iter().cloned());
    for s in &report.scenarios {
        let mut line = format!(
            "    {:<20} {:<9} {:>6.1}s",
            s.name,
            s.outcome.label(),
            s.secs
        );
        if !s.detail.is_empty() {
            line.push_str("  ");
            line.push_str(&s.detail);
        }
        println!("{line}");
        if s.outcome != Outcome::Pass {
            problems.push(format!("phase {} did not pass", s.name));
        }
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("    {p}");
        }
        eprint!("{}", outcome.tails(40));
        bail!("the bench run did not complete; no report written");
    }

    let results = Results::from_report(&report);
    let machine = Machine::read(&kernel, report.kernel.as_deref());
    let targets = figures::targets(&results);
    let (md_path, out_dir) = if opts.partial() {
        (dir.join("benchmarks.md"), dir.clone())
    } else {
        (
            layout::root().join("docs").join("benchmarks.md"),
            layout::root().join("docs").join("benchmarks"),
        )
    };
    std::fs::create_dir_all(&out_dir)?;
    let csv = out_dir.join("bench.csv");
    let svg = out_dir.join("bench.svg");
    std::fs::write(&csv, report::csv(&results))?;
    plot::svg(&results, &svg)?;
    let elapsed = start.elapsed();
    let md = report::markdown(&report::Page {
        results: &results,
        targets: &targets,
        machine: &machine,
        shape: config.shape,
        svg: &relative(&md_path, &svg),
        csv: &relative(&md_path, &csv),
        vm_secs: outcome.elapsed.as_secs_f64(),
    });
    std::fs::write(&md_path, md)?;
    println!("{}", report::table_for_terminal(&results));
    println!(
        "wrote {}, {}, {}",
        md_path.display(),
        csv.display(),
        svg.display()
    );
    println!("bench: total {}", cmd::secs(elapsed));
    let missed: Vec<_> = targets.iter().filter(|t| !t.met).collect();
    for t in &targets {
        println!(
            "target {:<32} {}  {}",
            t.name,
            if t.met { "met   " } else { "MISSED" },
            t.detail
        );
    }
    if missed.is_empty() {
        println!("bench: all {} targets met", targets.len());
        Ok(ExitCode::SUCCESS)
    } else {
        let names: Vec<&str> = missed.iter().map(|t| t.name.as_str()).collect();
        eprintln!("bench: missed targets: {}", names.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

/// `to` relative to the directory of `from` (both under the repository, or
/// both in the VM directory).
fn relative(from: &std::path::Path, to: &std::path::Path) -> String {
    let base = from.parent().unwrap_or(from);
    to.strip_prefix(base)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| to.display().to_string())
}
