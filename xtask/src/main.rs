//! numapin's task runner, in the cargo-xtask style: `cargo xtask <task>`.
//!
//! numapin's claims (node placement, long-term pins, DMA through the IOVA) can
//! only be checked against real kernels, and this machine has no IOMMU. The
//! tasks here build everything a QEMU guest needs and boot it:
//!
//! - [`deps`]: host packages (apt-get as root, else the exact command to run);
//! - [`kernel`]: the guest kernels at pinned versions (Debian's stock 6.1,
//!   6.12 and 7.3, and a self-built 7.3), cached outside the repo;
//! - [`initramfs`]: busybox, the project's binaries with their shared
//!   libraries, the stock kernels' VFIO modules and the short `/init`;
//! - [`vmconfig`]: the table of VM configurations the suite boots;
//! - [`qemu`]: one QEMU run with a hard timeout, console and results captured;
//! - [`results`]: the JSON-lines protocol the guest runner writes to ttyS1;
//! - [`bench`]: `cargo xtask bench`, the benchmark VM and its report.
//!
//! The guest-side checks are not here: they live in the project's guest
//! runner (`numapin-vmtest`), the guest benchmark (`numapin-bench`) and the
//! CLI (`numapin demo`).

mod bench;
mod cmd;
mod deps;
mod dist;
mod initramfs;
mod kernel;
mod layout;
mod qemu;
mod results;
mod tasks;
mod vmconfig;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::kernel::KernelKind;
use crate::qemu::RunMode;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "numapin's tasks: host tests, guest kernels and the QEMU test bed",
    arg_required_else_help = true,
    after_help = "Environment:\n  \
        NUMAPIN_CACHE       kernel cache (default /var/cache/numapin as root, else ~/.cache/numapin)\n  \
        NUMAPIN_VM_TIMEOUT  hard timeout per VM in seconds (default 1200)\n  \
        NUMAPIN_VM_SILENCE  a test VM silent this many seconds counts as stalled: killed, booted once more (default 240)\n  \
        NUMAPIN_DEBIAN_MIRROR  Debian archive for the pinned kernels (default http://deb.debian.org/debian)\n  \
        NUMAPIN_DEBIAN_SECURITY_MIRROR  its security archive (default http://deb.debian.org/debian-security)"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Host tests, then every VM configuration of the suite (what .ci/run calls).
    Test {
        /// Boot only this VM configuration (repeatable; default: the default set).
        #[arg(long = "vm", value_name = "NAME")]
        vms: Vec<String>,
        /// Skip `cargo test --workspace` (for iterating on the guest side).
        #[arg(long)]
        no_host_tests: bool,
        /// Stream each guest console to the terminal while it runs.
        #[arg(long)]
        console: bool,
        /// Run only the scenarios whose name contains this, e.g.
        /// `s.compaction` or `i.` (for iterating; the summary counts only
        /// those, a VM with none of them is listed, not failed, and a text
        /// that matches nothing anywhere fails).
        #[arg(long, value_name = "TEXT")]
        only: Option<String>,
    },
    /// Boot the VM and run `numapin demo` inside, streaming its output.
    Demo {
        /// Which guest kernel to boot.
        #[arg(long, value_enum, default_value_t = KernelKind::Stock)]
        kernel: KernelKind,
    },
    /// Benchmark pinning in the bench VM, on Debian's stock 6.1 and on 7.3
    /// (one boot each); writes docs/benchmarks.md, docs/benchmarks/bench.csv
    /// and bench.svg, and fails on missed targets. Not part of `test`.
    Bench {
        /// Only these region sizes, e.g. `64M,256M` (the report then goes to
        /// target/vm/bench-stock/, not docs/).
        #[arg(long, value_name = "LIST")]
        sizes: Option<String>,
        /// Only phases whose name contains this, e.g. `thp`,
        /// `numa-balancing` or `service` (report to target/vm/bench-stock/;
        /// only the targets of the phases run are judged).
        #[arg(long, value_name = "TEXT")]
        only: Option<String>,
        /// One guest kernel instead of both: `stock` (6.1) or `backports`
        /// (7.3); the report then goes to that VM's directory, not docs/.
        #[arg(long, value_enum)]
        kernel: Option<KernelKind>,
        /// Stream the guest console while it runs.
        #[arg(long)]
        console: bool,
        /// Do not boot: write docs/benchmarks.md, its CSV and plot again
        /// from the last full run's results under target/vm/bench-*/
        /// (after a change to the report's code).
        #[arg(long, conflicts_with_all = ["sizes", "only", "kernel", "console"])]
        render: bool,
    },
    /// Fetch and build every guest kernel into the cache, print where they are.
    Kernels,
    /// Boot one VM configuration for debugging.
    Vm {
        /// Configuration name (see `cargo xtask configs`).
        #[arg(long)]
        config: String,
        /// Start an interactive busybox shell instead of the runner
        /// (Ctrl-A X quits QEMU).
        #[arg(long, conflicts_with_all = ["script", "run"])]
        shell: bool,
        /// Copy this shell script into the guest and run it instead of the runner.
        #[arg(long, value_name = "FILE", conflicts_with = "run")]
        script: Option<PathBuf>,
        /// What the guest's /init starts.
        #[arg(long, value_enum)]
        run: Option<RunMode>,
        /// Do not rebuild the guest binaries first.
        #[arg(long)]
        no_build: bool,
    },
    /// List the VM configurations.
    Configs,
    /// Write shell completions and man pages into dist/ (from the CLI's
    /// clap definitions).
    Dist,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.task {
        Task::Test {
            vms,
            no_host_tests,
            console,
            only,
        } => tasks::test(&vms, !no_host_tests, console, only.as_deref()),
        Task::Demo { kernel } => tasks::demo(kernel),
        Task::Bench {
            sizes,
            only,
            console,
            kernel,
            render,
        } => bench::bench(&bench::Options {
            sizes,
            only,
            console,
            kernel,
            render,
        }),
        Task::Kernels => tasks::kernels(),
        Task::Vm {
            config,
            shell,
            script,
            run,
            no_build,
        } => {
            let mode = match (shell, script, run) {
                (true, _, _) => tasks::VmMode::Shell,
                (false, Some(path), _) => tasks::VmMode::Script(path),
                (false, None, Some(run)) => tasks::VmMode::Run(run),
                (false, None, None) => tasks::VmMode::Run(RunMode::Test),
            };
            tasks::vm(&config, mode, !no_build)
        }
        Task::Dist => dist::dist(),
        Task::Configs => {
            tasks::print_configs();
            Ok(ExitCode::SUCCESS)
        }
    }
}
