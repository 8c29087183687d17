//! The tasks behind `cargo xtask test | demo | kernels | vm | configs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::kernel::{self, Kernel, KernelKind};
use crate::qemu::{self, Console, RunMode};
use crate::results::{NO_SCENARIO, Outcome as ScenarioOutcome, Report};
use crate::vmconfig::{self, Iommu, VmConfig};
use crate::{cmd, deps, initramfs, layout};

/// The guest binaries: the CLI (package `numapin`, feature `cli`) and the
/// two guest runners (workspace members `numapin-vmtest`, `numapin-bench`).
const GUEST_BINARIES: &[&str] = &["numapin", "numapind", "numapin-vmtest", "numapin-bench"];
/// Examples the suite runs in the guest (installed in /bin next to the runner).
const GUEST_EXAMPLES: &[&str] = &[
    "vmm_guest_ram",
    "bind_noiommu",
    "bind_mdev",
    "service_client",
];

/// What `cargo xtask vm` starts in the guest.
pub enum VmMode {
    Run(RunMode),
    Shell,
    Script(PathBuf),
}

/// Pass/fail/skip totals over the VM suite.
#[derive(Default)]
struct Tally {
    passed: usize,
    /// Each failure (a scenario that failed or gave no result, a VM that
    /// failed) as [`failure_line`] words it, so the closing lines name
    /// them even when only the log's tail is kept.
    failures: Vec<String>,
    /// Each skipped scenario, worded the same way.
    skips: Vec<String>,
    /// VMs in which no scenario matched `--only` (booted, nothing run).
    unmatched: Vec<&'static str>,
    /// VMs that stalled (silent) and were booted once more, with where.
    stalls: Vec<String>,
}

impl Tally {
    fn failed(&self) -> usize {
        self.failures.len()
    }

    fn skipped(&self) -> usize {
        self.skips.len()
    }

    /// The closing line CI reads: `vm: N passed, N failed[, N skipped]`,
    /// then each failure and each skip on a line of its own, then any VM
    /// that stalled and was booted again.
    fn summary(&self) -> String {
        let mut line = format!("vm: {} passed, {} failed", self.passed, self.failed());
        if self.skipped() > 0 {
            line.push_str(&format!(", {} skipped", self.skipped()));
        }
        for (what, list) in [("failed", &self.failures), ("skipped", &self.skips)] {
            for f in list {
                line.push_str(&format!("\n  {what}: {f}"));
            }
        }
        if !self.stalls.is_empty() {
            line.push_str(&format!(
                "\nvm stalled and booted again: {}",
                self.stalls.join(", ")
            ));
        }
        line
    }
}

/// `cargo xtask test`: host tests, guest binaries, kernels, then each VM.
pub fn test(
    names: &[String],
    host_tests: bool,
    console: bool,
    only: Option<&str>,
) -> Result<ExitCode> {
    if let Some(o) = only
        && (o.is_empty() || o.contains(char::is_whitespace))
    {
        anyhow::bail!("--only {o:?}: give part of a scenario name, without spaces");
    }
    let env: Vec<String> = only
        .map(|o| format!("NUMAPIN_ONLY={o}"))
        .into_iter()
        .collect();
    let start = Instant::now();
    let configs = select(names)?;
    ensure_packages(configs.iter().map(|c| c.kernel))?;

    let host_ok = if host_tests {
        let ok = cmd::timed("host tests: cargo test --workspace --all-features", || {
            let mut c = Command::new(layout::cargo());
            c.current_dir(layout::root())
                .args(["test", "--workspace", "--all-features"]);
            Ok(cmd::run(&mut c).map_err(|e| eprintln!("{e:#}")).is_ok())
        })?;
        if !ok {
            eprintln!("host tests FAILED; the VM suite runs anyway");
        }
        ok
    } else {
        true
    };

    let binaries = build_guest_binaries()?;
    let mut kernels: HashMap<&'static str, Result<Kernel>> = HashMap::new();
    for config in &configs {
        let kind = config.kernel;
        if !kernels.contains_key(kind.name()) {
            let prepared = kernel::prepare(kind);
            if let Err(err) = &prepared {
                eprintln!("kernel {} FAILED: {err:#}", kind.name());
            }
            kernels.insert(kind.name(), prepared);
        }
    }

    let timeout = qemu::timeout()?;
    let silence = qemu::silence()?;
    let mut tally = Tally::default();
    let mut timings = Vec::new();
    for config in &configs {
        let kernel = match &kernels[config.kernel.name()] {
            Ok(k) => k,
            Err(err) => {
                println!(
                    "[{}] (vm)  FAIL  kernel {} unavailable: {err:#}",
                    config.name,
                    config.kernel.name()
                );
                tally.failures.push(failure_line(
                    config.name,
                    "(vm)",
                    "FAIL",
                    &format!("kernel {} unavailable", config.kernel.name()),
                ));
                continue;
            }
        };
        println!(
            "==> vm {} (kernel {} {}, IOMMU {}, suite {})",
            config.name,
            config.kernel.name(),
            kernel.release,
            config.iommu.model(),
            config.suite
        );
        let dir = layout::vm_dir(config.name);
        let _lock = layout::lock_vm_dir(config.name)?;
        let initrd = make_initramfs(&dir, kernel, &binaries, None)?;
        let boot = || {
            qemu::boot(&qemu::Run {
                config,
                kernel,
                initrd: &initrd,
                run: RunMode::Test.name(),
                dir: &dir,
                console: if console {
                    Console::Stream
                } else {
                    Console::Capture
                },
                timeout: Some(timeout),
                silence: Some(silence),
                env: &env,
            })
        };
        let mut outcome = boot()?;
        if let qemu::Exit::Silent(quiet) = outcome.exit {
            // A TCG guest that stalls writes nothing more, ever; one more
            // boot tells a stall of the emulation from a hang of ours,
            // which stalls again. Both runs are reported.
            let text = std::fs::read_to_string(&outcome.results).unwrap_or_default();
            let last = Report::parse(&text)
                .scenarios
                .last()
                .map_or("before the first result".to_string(), |s| {
                    format!("after {}", s.name)
                });
            println!(
                "[{}] (vm)  STALLED  no output for {} {last}; booting it once more",
                config.name,
                cmd::secs(quiet)
            );
            tally.stalls.push(format!("{} ({last})", config.name));
            let stalled = dir.join("console.stalled.log");
            let _ = std::fs::rename(&outcome.console_log, &stalled);
            outcome = boot()?;
        }
        timings.push(format!("{} {}", config.name, cmd::secs(outcome.elapsed)));
        report_run(config, &outcome, only.is_some(), &mut tally);
    }

    println!(
        "timings: total {}; {}",
        cmd::secs(start.elapsed()),
        timings.join(", ")
    );
    if !host_ok {
        println!("host tests: FAILED (see above)");
    }
    let mut none_matched = false;
    if let Some(o) = only
        && !tally.unmatched.is_empty()
    {
        println!(
            "no scenario matches --only {o} in: {}",
            tally.unmatched.join(", ")
        );
        none_matched = tally.passed + tally.failed() + tally.skipped() == 0;
        if none_matched {
            println!("--only {o} matches no scenario in any VM: nothing was tested");
        }
    }
    println!("{}", tally.summary());
    let ok = host_ok && tally.failed() == 0 && tally.skipped() == 0 && !none_matched;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One failure for the closing summary: `vm scenario LABEL: detail`, the
/// detail cut to 200 characters (the full text is printed above it).
fn failure_line(vm: &str, scenario: &str, label: &str, detail: &str) -> String {
    let mut line = format!("{vm} {scenario} {label}");
    let detail = detail.trim();
    if !detail.is_empty() {
        line.push_str(": ");
        match detail.char_indices().nth(200) {
            Some((cut, _)) => {
                line.push_str(&detail[..cut]);
                line.push('…');
            }
            None => line.push_str(detail),
        }
    }
    line
}

/// Whether a VM ran nothing because `--only` matched none of its
/// scenarios: a filtered run, an empty plan, and no problem but that one.
fn nothing_matched(filtered: bool, no_scenarios: bool, problems: &[String]) -> bool {
    filtered && no_scenarios && problems.iter().all(|p| p == NO_SCENARIO)
}

/// Prints one VM's scenarios and problems, and adds them to `tally`. With
/// `filtered` (`--only`), a VM whose plan came empty and that had no other
/// problem ran nothing that matched: it is listed, not failed.
fn report_run(config: &VmConfig, outcome: &qemu::Outcome, filtered: bool, tally: &mut Tally) {
    let text = std::fs::read(&outcome.results).unwrap_or_default();
    let report = Report::parse(&String::from_utf8_lossy(&text));
    let width = report
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for s in &report.scenarios {
        let mut line = format!(
            "[{}] {:width$}  {:<9} {:>6.1}s",
            config.name,
            s.name,
            s.outcome.label(),
            s.secs
        );
        if s.outcome != ScenarioOutcome::Pass && !s.detail.is_empty() {
            line.push_str("  ");
            line.push_str(&s.detail);
        }
        println!("{line}");
        let named = failure_line(config.name, &s.name, s.outcome.label(), &s.detail);
        match s.outcome {
            ScenarioOutcome::Pass => tally.passed += 1,
            ScenarioOutcome::Skip => tally.skips.push(named),
            ScenarioOutcome::Fail | ScenarioOutcome::NoResult => tally.failures.push(named),
        }
    }

    let facts = outcome.guest_facts();
    for fact in &facts {
        println!("    guest: {fact}");
    }
    let mut problems = outcome.problems();
    if config.iommu != Iommu::None
        && facts
            .iter()
            .any(|f| f.starts_with("kernel ") && f.trim_end().ends_with("iommu:"))
    {
        problems.push(format!(
            "the guest lists no IOMMU in /sys/class/iommu, but {} has {}",
            config.name,
            config.iommu.model()
        ));
    }
    problems.extend(report.problems.iter().cloned());
    if nothing_matched(filtered, report.scenarios.is_empty(), &problems) {
        println!("    {}: no scenario matches --only", config.name);
        tally.unmatched.push(config.name);
        return;
    }
    let kernel = report.kernel.as_deref().unwrap_or("?");
    if problems.is_empty() {
        println!(
            "    {}: {} in {} (guest kernel {kernel})",
            config.name,
            if report.passed() { "passed" } else { "failed" },
            cmd::secs(outcome.elapsed)
        );
        return;
    }
    // The VM itself failed, whatever its scenarios said.
    tally.failures.push(failure_line(
        config.name,
        "(vm)",
        "FAIL",
        &problems.join("; "),
    ));
    println!(
        "[{}] (vm)  FAIL  after {}",
        config.name,
        cmd::secs(outcome.elapsed)
    );
    for p in &problems {
        println!("    {p}");
    }
    print!("{}", outcome.tails(40));
}

/// `cargo xtask demo`: the demo in a type1 VM, its output streamed.
pub fn demo(kind: KernelKind) -> Result<ExitCode> {
    let config = vmconfig::CONFIGS
        .iter()
        .find(|c| c.kernel == kind && c.suite.starts_with("type1"))
        .context("no type1 configuration for this kernel")?;
    ensure_packages([kind])?;
    let binaries = build_guest_binaries()?;
    let kernel = kernel::prepare(kind)?;
    let name = format!("demo-{}", kind.name());
    let dir = layout::vm_dir(&name);
    let _lock = layout::lock_vm_dir(&name)?;
    let initrd = make_initramfs(&dir, &kernel, &binaries, None)?;
    println!(
        "==> booting {} (kernel {}, IOMMU {}); the demo's output follows, the guest \
         kernel console goes to {}",
        config.name,
        kernel.release,
        config.iommu.model(),
        dir.join("console.log").display()
    );
    let outcome = qemu::boot(&qemu::Run {
        config,
        kernel: &kernel,
        initrd: &initrd,
        run: RunMode::Demo.name(),
        dir: &dir,
        console: Console::Stream,
        timeout: Some(qemu::timeout()?),
        silence: None,
        env: &[],
    })?;
    finish_program_run("numapin demo", &outcome)
}

/// Judges a demo or script run by the exit status /init reported.
fn finish_program_run(what: &str, outcome: &qemu::Outcome) -> Result<ExitCode> {
    let text = std::fs::read(&outcome.results).unwrap_or_default();
    let report = Report::parse(&String::from_utf8_lossy(&text));
    let problems = outcome.problems();
    println!("\n==> VM ran {}", cmd::secs(outcome.elapsed));
    match (report.exit_code, problems.is_empty()) {
        (Some(0), true) => {
            println!("{what} succeeded");
            Ok(ExitCode::SUCCESS)
        }
        (code, _) => {
            for p in &problems {
                eprintln!("    {p}");
            }
            match code {
                Some(code) => eprintln!("{what} FAILED: exit status {code}"),
                None => {
                    eprintln!(
                        "{what} FAILED: no exit status came back (the VM stopped before the program ended)"
                    )
                }
            }
            // The output was streamed already: only say where it is kept.
            eprintln!("guest console: {}", outcome.console_log.display());
            if let Some(output) = &outcome.output_log {
                eprintln!("program output: {}", output.display());
            }
            eprint!("{}", outcome.stderr_tail());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `cargo xtask kernels`: prepare every kernel and say where they are.
pub fn kernels() -> Result<ExitCode> {
    ensure_packages(KernelKind::ALL.iter().copied())?;
    for &kind in KernelKind::ALL {
        let k = kernel::prepare(kind)?;
        println!(
            "{:<9} {}  {}  ({})",
            k.kind.name(),
            k.release,
            k.image.display(),
            k.origin
        );
        for m in &k.modules {
            println!("        module {}", m.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask vm --config NAME`: one VM, for debugging.
pub fn vm(name: &str, mode: VmMode, build: bool) -> Result<ExitCode> {
    let config = vmconfig::find(name)
        .with_context(|| format!("no VM configuration {name:?}; known: {}", vmconfig::names()))?;
    ensure_packages([config.kernel])?;
    let binaries = if build {
        build_guest_binaries()?
    } else {
        guest_binary_paths()
    };
    let kernel = kernel::prepare(config.kernel)?;
    let dir = layout::vm_dir(config.name);
    let _lock = layout::lock_vm_dir(config.name)?;
    let (run, console, probe) = match &mode {
        VmMode::Run(r) => (r.name(), Console::Stream, None),
        VmMode::Shell => ("shell", Console::Interactive, None),
        VmMode::Script(path) => ("script", Console::Stream, Some(path.as_path())),
    };
    let initrd = make_initramfs(&dir, &kernel, &binaries, probe)?;
    if console == Console::Interactive {
        println!(
            "==> busybox shell in {}; `poweroff -f` or Ctrl-A X to leave",
            config.name
        );
    }
    let outcome = qemu::boot(&qemu::Run {
        config,
        kernel: &kernel,
        initrd: &initrd,
        run,
        dir: &dir,
        console,
        timeout: if console == Console::Interactive {
            None
        } else {
            Some(qemu::timeout()?)
        },
        silence: None,
        env: &[],
    })?;
    match mode {
        VmMode::Run(RunMode::Test) => {
            let mut tally = Tally::default();
            report_run(config, &outcome, false, &mut tally);
            println!("{}", tally.summary());
            Ok(if tally.failed() + tally.skipped() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        VmMode::Run(RunMode::Demo) => finish_program_run("numapin demo", &outcome),
        VmMode::Run(RunMode::Bench) => finish_program_run("numapin-bench", &outcome),
        VmMode::Script(path) => finish_program_run(&path.display().to_string(), &outcome),
        VmMode::Shell => Ok(ExitCode::SUCCESS),
    }
}

pub fn print_configs() {
    for c in vmconfig::CONFIGS {
        let pin = kernel::pins::of(c.kernel);
        println!(
            "{:<16} kernel {:<9} iommu {:<16} suite {:<8} {}{}",
            c.name,
            c.kernel.name(),
            c.iommu.model(),
            c.suite,
            pin.version,
            if c.default { " (default)" } else { "" }
        );
    }
}

/// The configurations named with `--vm`, or the default set.
fn select(names: &[String]) -> Result<Vec<&'static VmConfig>> {
    if names.is_empty() {
        return Ok(vmconfig::defaults().collect());
    }
    let mut out: Vec<&'static VmConfig> = Vec::new();
    for name in names {
        let Some(config) = vmconfig::find(name) else {
            bail!("no VM configuration {name:?}; known: {}", vmconfig::names());
        };
        if !out.iter().any(|c| c.name == config.name) {
            out.push(config);
        }
    }
    Ok(out)
}

/// Host packages for VMs booting these kernels.
pub(crate) fn ensure_packages(kinds: impl IntoIterator<Item = KernelKind>) -> Result<()> {
    let mut wanted: Vec<&str> = deps::VM.to_vec();
    for kind in kinds {
        wanted.extend(if kind.is_stock() {
            deps::STOCK_KERNEL
        } else {
            deps::KERNEL_BUILD
        });
    }
    deps::ensure(&wanted)
}

fn guest_binary_paths() -> Vec<PathBuf> {
    let release = layout::target_dir().join("release");
    let bins = GUEST_BINARIES.iter().map(|b| release.join(b));
    let examples = GUEST_EXAMPLES
        .iter()
        .map(|e| release.join("examples").join(e));
    bins.chain(examples).collect()
}

/// `cargo build --release --features numapin/cli,numapin/vm-memory -p numapin -p numapin-vmtest
/// -p numapin-bench --bin ... --example ...`.
pub(crate) fn build_guest_binaries() -> Result<Vec<PathBuf>> {
    cmd::timed(
        "guest binaries: cargo build --release --features numapin/cli,numapin/vm-memory",
        || {
            let mut c = Command::new(layout::cargo());
            c.current_dir(layout::root()).args([
                "build",
                "--release",
                "--package",
                "numapin",
                "--package",
                "numapin-vmtest",
                "--package",
                "numapin-bench",
                "--features",
                "numapin/cli,numapin/vm-memory,numapin/service",
            ]);
            for b in GUEST_BINARIES {
                c.args(["--bin", b]);
            }
            for e in GUEST_EXAMPLES {
                c.args(["--example", e]);
            }
            cmd::run(&mut c)
        },
    )?;
    Ok(guest_binary_paths())
}

/// Builds `dir/initramfs.cpio.gz` for `kernel` (its modules go in).
pub(crate) fn make_initramfs(
    dir: &Path,
    kernel: &Kernel,
    binaries: &[PathBuf],
    probe: Option<&Path>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join("initramfs.cpio.gz");
    let start = Instant::now();
    initramfs::build(
        &initramfs::Spec {
            binaries,
            modules: &kernel.modules,
            probe,
        },
        &out,
    )?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "    initramfs: {} ({:.1} MiB, {})",
        out.display(),
        size as f64 / (1 << 20) as f64,
        cmd::secs(start.elapsed())
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_format() {
        let mut t = Tally {
            passed: 2,
            ..Tally::default()
        };
        assert_eq!(t.summary(), "vm: 2 passed, 0 failed");
        t.skips
            .push(failure_line("type1-amd", "a.lib.node0-1G", "SKIP", ""));
        assert_eq!(
            t.summary(),
            "vm: 2 passed, 0 failed, 1 skipped\n  skipped: type1-amd a.lib.node0-1G SKIP"
        );
        t.stalls
            .push("type1-backports (after a.cli.info-topology)".into());
        assert_eq!(
            t.summary(),
            "vm: 2 passed, 0 failed, 1 skipped\n  skipped: type1-amd a.lib.node0-1G SKIP\nvm stalled and booted again: type1-backports (after a.cli.info-topology)"
        );
        t.stalls.clear();
        t.failures.push(failure_line(
            "type1-stock",
            "c.move_pages",
            "FAIL",
            " moved none \n",
        ));
        assert_eq!(
            t.summary(),
            "vm: 2 passed, 1 failed, 1 skipped\n  failed: type1-stock c.move_pages FAIL: moved none\n  skipped: type1-amd a.lib.node0-1G SKIP"
        );
        let long = failure_line("v", "s", "FAIL", &"é".repeat(300));
        assert_eq!(long.chars().count(), "v s FAIL: ".len() + 200 + 1);
    }

    #[test]
    fn an_empty_plan_fails_unless_only_filtered_it_out() {
        let empty = [NO_SCENARIO.to_string()];
        assert!(nothing_matched(true, true, &empty));
        // Without --only an empty plan is a broken runner.
        assert!(!nothing_matched(false, true, &empty));
        // Any other problem (a crash, a timeout) still fails the VM.
        let crashed = [NO_SCENARIO.to_string(), "exit code 101".to_string()];
        assert!(!nothing_matched(true, true, &crashed));
        // A plan with scenarios is judged by them.
        assert!(!nothing_matched(true, false, &[]));
    }

    #[test]
    fn select_defaults_and_named() {
        let d: Vec<_> = select(&[]).unwrap().iter().map(|c| c.name).collect();
        assert_eq!(d, vmconfig::tests::DEFAULT_SET);
        let n: Vec<_> = select(&["mdev-custom".into(), "mdev-custom".into()])
            .unwrap()
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(n, ["mdev-custom"]);
        let err = select(&["bogus".into()]).unwrap_err().to_string();
        assert!(err.contains("type1-stock"), "{err}");
    }
}
