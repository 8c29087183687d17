//! `cargo xtask bench`: boots the bench VM ([`vmconfig::BENCH`]) once per
//! bench kernel ([`KERNELS`]: Debian's stock 6.1, then trixie-backports'
//! 7.3), runs `numapin-bench` in each, and turns their samples into
//! `docs/benchmarks/bench.csv`, `docs/benchmarks/bench.svg` and
//! `docs/benchmarks.md`, the kernels side by side. It fails, listing them
//! by name (`6.1:pin-only.base.64M`), when targets are missed.
//! `cargo xtask test` never runs it.
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
    /// One guest kernel instead of both bench kernels.
    pub kernel: Option<kernel::KernelKind>,
    /// Write the report again from the last full run's results
    /// ([`RUN_FILE`] and `results.jsonl` in each bench VM's directory)
    /// instead of booting.
    pub render: bool,
}

/// What a bench boot leaves beside its `results.jsonl` for `--render`:
/// `release=`, `origin=`, `vm_secs=`, `full=` (`true` unless the run
/// was partial) and `vcpus=` (where QEMU's vCPU threads ran), one per line.
pub const RUN_FILE: &str = "bench-run.txt";

/// The bench kernels, in report order: Debian 12's stock 6.1 and the
/// newest stock kernel the test bed boots (trixie-backports' 7.3).
pub const KERNELS: [kernel::KernelKind; 2] =
    [kernel::KernelKind::Stock, kernel::KernelKind::Backports];

/// How long one bench boot may run unless `NUMAPIN_VM_TIMEOUT` says
/// otherwise: a full run took 16–40 minutes per kernel under TCG on this
/// machine (6.1 is the slower; 39m33s on a slow day), so the test bed's
/// 20-minute default would cut it off.
const BENCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60 * 60);

impl Options {
    /// A partial run (some sizes, some phases or one kernel) writes its
    /// report next to the VM's logs, not to docs/.
    fn partial(&self) -> bool {
        self.sizes.is_some() || self.only.is_some() || self.kernel.is_some()
    }

    fn kernels(&self) -> Vec<kernel::KernelKind> {
        self.kernel.map_or(KERNELS.to_vec(), |k| vec![k])
    }
}

/// Where the machine's facts come from on the host.
pub struct Machine {
    pub host_cpu: String,
    pub host_cores: usize,
    pub host_mem_gib: f64,
    pub qemu: String,
}

impl Machine {
    fn read() -> Machine {
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
        }
    }
}

/// One kernel's boot of the bench VM and what it measured.
pub struct KernelRun {
    /// Short name for headings and target names: `6.1`, `7.3`.
    pub label: String,
    /// The guest's `uname -r`.
    pub release: String,
    /// Where the kernel came from (package and version).
    pub origin: String,
    pub results: Results,
    pub targets: Vec<figures::Target>,
    pub vm_secs: f64,
    /// Where QEMU's vCPU threads ran: `vCPU 0 on host CPU 0, …`, from
    /// the boot's `vcpu-affinity.txt` (see `qemu::pins_vcpus`).
    pub vcpus: String,
}

impl KernelRun {
    /// The run of `release` whose guest wrote `report`, its targets judged.
    fn new(
        release: String,
        origin: String,
        report: &Report,
        vm_secs: f64,
        vcpus: String,
    ) -> KernelRun {
        let results = Results::from_report(report);
        KernelRun {
            label: short_release(&release),
            release,
            origin,
            targets: figures::targets(&results),
            results,
            vm_secs,
            vcpus,
        }
    }
}

#[cfg(test)]
impl KernelRun {
    /// A run of `release` that measured `results`, its targets judged.
    pub fn for_test(release: &str, results: Results) -> KernelRun {
        KernelRun {
            label: short_release(release),
            release: release.into(),
            origin: "test".into(),
            targets: figures::targets(&results),
            results,
            vm_secs: 600.0,
            vcpus: "vCPU 0 on host CPU 0".into(),
        }
    }
}

/// Test runs on both bench kernels: the fixture report with pin-only at
/// `pin_61` and `pin_73` seconds.
#[cfg(test)]
pub fn two_test_runs(pin_61: f64, pin_73: f64) -> [KernelRun; 2] {
    use figures::tests::report;
    [
        KernelRun::for_test(
            "6.1.0-56-amd64",
            Results::from_report(&report(pin_61, 0.5, 6)),
        ),
        KernelRun::for_test(
            "7.3.4+deb13-amd64",
            Results::from_report(&report(pin_73, 0.5, 6)),
        ),
    ]
}

/// `6.1` from `6.1.0-56-amd64`, `7.3` from `7.3.4+deb13-amd64`.
fn short_release(release: &str) -> String {
    release.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// Boots the bench VM on one kernel and reads what it measured.
fn run_kernel(opts: &Options, kind: kernel::KernelKind) -> Result<KernelRun> {
    let Some(config) = vmconfig::bench(kind) else {
        bail!(
            "the bench runs on the stock or backports kernel, not {}",
            kind.name()
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
    let timeout = match std::env::var_os("NUMAPIN_VM_TIMEOUT") {
        Some(_) => qemu::timeout()?,
        None => BENCH_TIMEOUT,
    };
    println!(
        "==> bench VM {} (kernel {}); a full run takes 16–40 minutes, stopped after {}",
        config.name,
        kernel.release,
        cmd::secs(timeout)
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
        timeout: Some(timeout),
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
        bail!(
            "the bench run on {} did not complete; no report written",
            kernel.release
        );
    }
    let release = report.kernel.clone().unwrap_or(kernel.release.clone());
    let vcpus = std::fs::read_to_string(dir.join(qemu::VCPU_FILE))
        .map_or_else(|_| "not recorded".into(), |t| t.trim().replace('\n', ", "));
    let run = KernelRun::new(
        release,
        kernel.origin.clone(),
        &report,
        outcome.elapsed.as_secs_f64(),
        vcpus,
    );
    std::fs::write(
        dir.join(RUN_FILE),
        format!(
            "release={}\norigin={}\nvm_secs={}\nfull={}\nvcpus={}\n",
            run.release,
            run.origin,
            run.vm_secs,
            !opts.partial(),
            run.vcpus
        ),
    )?;
    Ok(run)
}

/// The run of `kind` that the last full bench left in its VM directory.
fn rendered_run(kind: kernel::KernelKind) -> Result<KernelRun> {
    let Some(config) = vmconfig::bench(kind) else {
        bail!(
            "the bench runs on the stock or backports kernel, not {}",
            kind.name()
        );
    };
    let dir = layout::vm_dir(config.name);
    let path = dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no bench run to render: {} (run `cargo xtask bench` first)",
            path.display()
        )
    })?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("{} has no {key}=", path.display()))
    };
    if field("full")? != "true" {
        bail!(
            "{} is from a partial run; --render writes docs/ from full runs only",
            path.display()
        );
    }
    let vm_secs: f64 = field("vm_secs")?
        .parse()
        .with_context(|| format!("{}: vm_secs", path.display()))?;
    let results = dir.join("results.jsonl");
    let jsonl = std::fs::read(&results)
        .with_context(|| format!("no results file {}", results.display()))?;
    let report = Report::parse(&String::from_utf8_lossy(&jsonl));
    let failed: Vec<&str> = report
        .scenarios
        .iter()
        .filter(|s| s.outcome != Outcome::Pass)
        .map(|s| s.name.as_str())
        .collect();
    if !report.problems.is_empty() || !failed.is_empty() {
        bail!(
            "{} is not a complete run (problems: {:?}; phases not passed: {failed:?})",
            results.display(),
            report.problems
        );
    }
    Ok(KernelRun::new(
        field("release")?.into(),
        field("origin")?.into(),
        &report,
        vm_secs,
        field("vcpus").map_or_else(|_| "not recorded".into(), Into::into),
    ))
}

/// `cargo xtask bench`.
pub fn bench(opts: &Options) -> Result<ExitCode> {
    let start = Instant::now();
    let kinds = opts.kernels();
    if opts.render && opts.partial() {
        bail!(
            "--render writes docs/ from the last full run: it takes no --sizes, --only or --kernel"
        );
    }
    let mut runs = Vec::new();
    for kind in &kinds {
        runs.push(if opts.render {
            rendered_run(*kind)?
        } else {
            run_kernel(opts, *kind)?
        });
    }
    let machine = Machine::read();
    let (md_path, out_dir) = if opts.partial() {
        let dir = layout::vm_dir(vmconfig::bench(kinds[0]).map_or("bench", |c| c.name));
        (dir.join("benchmarks.md"), dir)
    } else {
        (
            layout::root().join("docs").join("benchmarks.md"),
            layout::root().join("docs").join("benchmarks"),
        )
    };
    std::fs::create_dir_all(&out_dir)?;
    let csv = out_dir.join("bench.csv");
    let svg = out_dir.join("bench.svg");
    std::fs::write(&csv, report::csv(&runs))?;
    plot::svg(&runs, &svg)?;
    let md = report::markdown(&report::Page {
        runs: &runs,
        machine: &machine,
        shape: vmconfig::bench(kinds[0]).map_or(&vmconfig::BENCH_SHAPE, |c| c.shape),
        svg: &relative(&md_path, &svg),
        csv: &relative(&md_path, &csv),
    });
    std::fs::write(&md_path, md)?;
    for run in &runs {
        println!(
            "### {} ({})
",
            run.label, run.release
        );
        println!("{}", report::table_for_terminal(&run.results));
    }
    println!(
        "wrote {}, {}, {}",
        md_path.display(),
        csv.display(),
        svg.display()
    );
    println!("bench: total {}", cmd::secs(start.elapsed()));
    let mut missed = Vec::new();
    let mut total = 0;
    for run in &runs {
        for t in &run.targets {
            total += 1;
            let name = format!("{}:{}", run.label, t.name);
            println!(
                "target {:<40} {}  {}",
                name,
                if t.met { "met   " } else { "MISSED" },
                t.detail
            );
            if !t.met {
                missed.push(name);
            }
        }
    }
    if missed.is_empty() {
        println!("bench: all {total} targets met");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("bench: missed targets: {}", missed.join(", "));
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

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_labels() {
        assert_eq!(super::short_release("6.1.0-56-amd64"), "6.1");
        assert_eq!(super::short_release("7.3.4+deb13-amd64"), "7.3");
    }
}
