//! One QEMU run: the machine (q35, TCG, the config's IOMMU, two edu devices,
//! two NUMA nodes of one socket each), the guest console captured to a file
//! (and streamed when asked), the results serial port written to another
//! file, and a hard timeout.
//!
//! - ttyS0 (`-serial stdio`, piped through us): the console, kept in
//!   `target/vm/<config>/console.log`;
//! - ttyS1 (`-serial file:`): the guest runner's JSON lines, `results.jsonl`;
//! - for the demo ([`quiet`]) the kernel console moves to ttyS2 (`-serial
//!   file:console.log`) and ttyS0 carries only the demo's own output, kept
//!   in `output.log`;
//! - QEMU's own stderr (e.g. a `hw_error` register dump): `qemu.stderr`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::thread::CpuSet;

use crate::cmd;
use crate::kernel::Kernel;
use crate::vmconfig::{Iommu, VmConfig};

const QEMU: &str = "qemu-system-x86_64";

/// The default hard timeout per VM: TCG is slow, and the scenarios pin and
/// touch a few hundred MiB. `NUMAPIN_VM_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What the guest's /init starts (`NUMAPIN_RUN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunMode {
    /// `numapin-vmtest --suite <suite> --results /dev/ttyS1`.
    Test,
    /// `numapin demo`.
    Demo,
    /// `numapin-bench --results /dev/ttyS1` (what `cargo xtask bench` boots).
    Bench,
}

impl RunMode {
    pub fn name(self) -> &'static str {
        match self {
            RunMode::Test => "test",
            RunMode::Demo => "demo",
            RunMode::Bench => "bench",
        }
    }
}

/// Where the guest console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// Only to console.log.
    Capture,
    /// To console.log and to our stdout as it comes.
    Stream,
    /// The terminal drives the console (and QEMU's monitor, Ctrl-A C).
    Interactive,
}

pub struct Run<'a> {
    pub config: &'a VmConfig,
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    /// `NUMAPIN_RUN`: test, demo, script or shell.
    pub run: &'a str,
    /// `target/vm/<config>`.
    pub dir: &'a Path,
    pub console: Console,
    /// `None`: wait as long as it takes (interactive shell).
    pub timeout: Option<Duration>,
    /// Kill the guest when neither its console nor its results channel has
    /// written anything for this long (a stalled TCG guest); `None`: never.
    pub silence: Option<Duration>,
    /// Extra `NUMAPIN_*=value` settings for /init (no spaces in values).
    pub env: &'a [String],
}

/// How QEMU ended.
#[derive(Debug)]
pub enum Exit {
    /// Exit status 0 (the guest powered off or rebooted under -no-reboot).
    Clean,
    /// Non-zero status or a signal (an edu `hw_error` aborts QEMU).
    Abnormal(ExitStatus),
    /// Killed by us at the hard timeout.
    TimedOut(Duration),
    /// Killed by us after this long without a byte on either serial line.
    Silent(Duration),
}

pub struct Outcome {
    pub exit: Exit,
    pub elapsed: Duration,
    /// The guest kernel's console (and, unless quiet, the program's output).
    pub console_log: PathBuf,
    /// What came out of ttyS0 when the kernel console was elsewhere ([`quiet`]).
    pub output_log: Option<PathBuf>,
    pub results: PathBuf,
    pub stderr: PathBuf,
}

impl Outcome {
    /// What went wrong with the machine itself (not with the scenarios).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.exit {
            Exit::Clean => {}
            Exit::Abnormal(status) => problems.push(format!(
                "QEMU ended abnormally ({status}); see {}",
                self.stderr.display()
            )),
            Exit::TimedOut(limit) => problems.push(format!(
                "timed out after {} (NUMAPIN_VM_TIMEOUT to change), QEMU killed",
                cmd::secs(*limit)
            )),
            Exit::Silent(quiet) => problems.push(format!(
                "the guest wrote nothing for {} (stalled; NUMAPIN_VM_SILENCE to change), QEMU killed; see {}",
                cmd::secs(*quiet),
                self.console_log.display()
            )),
        }
        let console = fs::read_to_string(&self.console_log).unwrap_or_default();
        if let Some(line) = console.lines().find(|l| l.contains("Kernel panic")) {
            problems.push(format!("guest kernel panicked: {}", line.trim()));
        }
        // A kernel WARNING (with its call trace) means the machine is not
        // what the kernel expects, e.g. two nodes sharing one socket.
        if let Some(line) = console.lines().find(|l| l.contains("] WARNING: ")) {
            problems.push(format!(
                "guest kernel warned: {} (see {})",
                line.trim(),
                self.console_log.display()
            ));
        }
        problems
    }

    /// What /init reported about the guest: its kernel release, its IOMMUs
    /// (`/sys/class/iommu`) and each edu device's node, group and driver.
    pub fn guest_facts(&self) -> Vec<String> {
        let console = fs::read_to_string(&self.console_log).unwrap_or_default();
        console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("numapin-init: "))
            .map(|l| l.trim().to_owned())
            .collect()
    }

    /// The last lines of the guest console and of QEMU's stderr, for reports.
    pub fn tails(&self, lines: usize) -> String {
        let console = fs::read(&self.console_log).unwrap_or_default();
        let mut text = format!(
            "--- last {lines} lines of {} ---\n{}\n",
            self.console_log.display(),
            cmd::tail(&String::from_utf8_lossy(&console), lines)
        );
        text.push_str(&self.stderr_tail());
        text
    }

    /// QEMU's stderr, shortened: its first lines (where a `hw_error` names
    /// the cause) and its last ones (empty when it said nothing).
    pub fn stderr_tail(&self) -> String {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        // Leave out the warning our memory layout always causes (see `args`).
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("max-ram-below-4g is not a multiple of 1G"))
            .collect();
        if lines.iter().all(|l| l.trim().is_empty()) {
            return String::new();
        }
        format!(
            "--- QEMU stderr ({}) ---\n{}\n",
            self.stderr.display(),
            head_and_tail(&lines, 6, 10)
        )
    }
}

/// The first `head` and last `tail` lines, with a marker for what is left out.
fn head_and_tail(lines: &[&str], head: usize, tail: usize) -> String {
    if lines.len() <= head + tail {
        return lines.join("\n");
    }
    let skipped = lines.len() - head - tail;
    let mut out: Vec<String> = lines[..head].iter().map(|l| l.to_string()).collect();
    out.push(format!("[... {skipped} lines ...]"));
    out.extend(lines[lines.len() - tail..].iter().map(|l| l.to_string()));
    out.join("\n")
}

/// How long a test guest may stay silent on both serial lines before it
/// counts as stalled: no scenario runs that long without a result line.
/// Under TCG a guest has been seen to stall for good (RCU stalls, a lost
/// timer wakeup) with no sign but silence. `NUMAPIN_VM_SILENCE` (seconds)
/// overrides it.
const DEFAULT_SILENCE: Duration = Duration::from_secs(240);

/// The silence watchdog's limit.
pub fn silence() -> Result<Duration> {
    match std::env::var("NUMAPIN_VM_SILENCE") {
        Ok(v) if !v.is_empty() => {
            Ok(Duration::from_secs(v.parse().with_context(|| {
                format!("NUMAPIN_VM_SILENCE={v:?} is not a number of seconds")
            })?))
        }
        _ => Ok(DEFAULT_SILENCE),
    }
}

/// The hard timeout per VM.
pub fn timeout() -> Result<Duration> {
    match std::env::var("NUMAPIN_VM_TIMEOUT") {
        Ok(v) if !v.trim().is_empty() => {
            let secs: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("NUMAPIN_VM_TIMEOUT={v:?} is not a number of seconds"))?;
            Ok(Duration::from_secs(secs))
        }
        _ => Ok(DEFAULT_TIMEOUT),
    }
}

/// QEMU's arguments for `run`, with the results port written to `results`.
pub fn args(run: &Run, results: &Path) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let shape = run.config.shape;
    let cpus = shape.vcpus();
    let memory = qemu_size(shape.node_mib.iter().sum());
    // TCG only: this machine's KVM hangs guests after SeaBIOS.
    push(&["-accel", "tcg", "-cpu", "max"]);
    // One socket per node. With both vCPUs in one socket (QEMU's default
    // topology) on two nodes, the guest's scheduler finds CPUs sharing a
    // last-level cache across nodes and warns with a call trace
    // (`sched: CPU #1's llc-sibling CPU #0 is not on the same node!`).
    push(&[
        "-smp",
        &format!("{cpus},sockets=2,cores={},threads=1", shape.cpus_per_node),
        "-m",
        &memory,
    ]);
    // The suite's shape has a 1 GiB hugepage on each node. Each node needs a
    // whole, free, 1 GiB-aligned gigabyte for it. With q35's default 2 GiB
    // below 4G, node 0 is [0, 2G) with the BIOS hole and ACPI tables in both
    // gigabytes. With 512 MiB below 4G, node 0 is [0, 512M) + [4G, 5.5G) and
    // node 1 is [5.5G, 7.5G): memblock's top-down early allocations land in
    // [5G, 5.5G) and [7G, 7.5G), leaving [4G, 5G) and [6G, 7G) free
    // (`nokaslr` keeps the kernel image out of them). QEMU warns that 512M is
    // not a multiple of 1G; that matters only under KVM.
    let mut machine = String::from("q35,kernel-irqchip=split");
    if let Some(below) = shape.ram_below_4g {
        machine.push_str(&format!(",max-ram-below-4g={below}"));
    }
    push(&["-machine", &machine]);
    for (node, mib) in shape.node_mib.iter().enumerate() {
        let m = format!("m{node}");
        push(&[
            "-object",
            &format!(
                "memory-backend-ram,id={m},size={}{}",
                qemu_size(*mib),
                if shape.prealloc { ",prealloc=on" } else { "" }
            ),
        ]);
        push(&["-numa", &format!("node,nodeid={node},memdev={m}")]);
        push(&["-numa", &format!("cpu,node-id={node},socket-id={node}")]);
    }
    // The IOMMU comes before the devices it translates.
    match run.config.iommu {
        Iommu::Intel => push(&["-device", "intel-iommu,intremap=on,caching-mode=on"]),
        Iommu::Amd => push(&["-device", AMD_IOMMU]),
        Iommu::Virtio => push(&["-device", VIRTIO_IOMMU]),
        Iommu::None => {}
    }
    // 40-bit DMA: in no-IOMMU mode edu DMAs to physical addresses, which sit
    // anywhere in the guest's memory.
    push(&["-device", EDU]);
    // A second edu behind a PCIe expander bridge on node 1, so that a device
    // has a `numa_node` (q35's root bus has none). Its bus number sorts it
    // after the root-bus edu in /sys/bus/pci/devices (0000:00:03.0 before
    // 0000:81:00.0): whoever takes the first edu keeps the root-bus one.
    push(&[
        "-device",
        "pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0",
        "-device",
        "pcie-root-port,id=rp1,bus=pxb1,chassis=1",
        "-device",
        &format!("{EDU},bus=rp1"),
    ]);
    push(&["-net", "none", "-display", "none", "-no-reboot"]);
    // Thread names (`CPU 0/TCG`) for `/proc/<pid>/task/*/comm`, where the
    // bench finds the vCPU threads to pin.
    push(&["-name", &format!("{},debug-threads=on", run.config.name)]);
    push(&["-kernel", &run.kernel.image.to_string_lossy()]);
    push(&["-initrd", &run.initrd.to_string_lossy()]);
    let mut cmdline = run.config.cmdline(run.run);
    for kv in run.env {
        cmdline.push(' ');
        cmdline.push_str(kv);
    }
    push(&["-append", &cmdline]);
    match run.console {
        Console::Interactive => push(&["-serial", "mon:stdio"]),
        Console::Capture | Console::Stream => push(&["-monitor", "none", "-serial", "stdio"]),
    }
    push(&["-serial", &format!("file:{}", results.display())]);
    if quiet(run.run) {
        push(&[
            "-serial",
            &format!("file:{}", run.dir.join("console.log").display()),
        ]);
    }
    a
}

/// Whether a run pins QEMU's vCPU threads to host CPUs: the bench does.
/// Its VM has more vCPUs than this host has cores; left to the host's
/// scheduler, a vCPU thread can wait behind the others long enough for the
/// guest to report RCU stalls (measured: 68 stall reports, and one bench
/// phase 12 times slower than pinned).
pub fn pins_vcpus(run: &str) -> bool {
    run == "bench"
}

/// Pins vCPU `n` of a QEMU process to the `n % k`-th of the `k` host CPUs
/// this process may run on, once QEMU has started its vCPU threads (named
/// `CPU <n>/TCG` under `-name …,debug-threads=on`), and writes what it did
/// to `vcpu-affinity.txt` in the run's directory.
struct VcpuPins {
    pid: u32,
    /// How many vCPU threads the VM has (`-smp`).
    count: usize,
    file: PathBuf,
}

/// What [`VcpuPins`] did, in the run's directory.
pub const VCPU_FILE: &str = "vcpu-affinity.txt";

/// How long QEMU may take to start its vCPU threads.
const VCPU_WAIT: Duration = Duration::from_secs(20);

impl VcpuPins {
    fn new(pid: u32, count: usize, dir: &Path) -> VcpuPins {
        VcpuPins {
            pid,
            count,
            file: dir.join(VCPU_FILE),
        }
    }

    /// One try; `true` when done (pinned, or given up: said so in the
    /// file and on stderr).
    fn step(&self, elapsed: Duration) -> bool {
        let vcpus = vcpu_threads(self.pid);
        if vcpus.len() < self.count && elapsed < VCPU_WAIT {
            return false;
        }
        let host = allowed_cpus();
        if vcpus.is_empty() || host.is_empty() {
            let why = format!(
                "not pinned: no vCPU threads in /proc/{}/task after {}s, or no host CPUs",
                self.pid,
                VCPU_WAIT.as_secs()
            );
            eprintln!("warning: {why}");
            let _ = fs::write(&self.file, why + "\n");
            return true;
        }
        let mut lines = Vec::new();
        for (n, tid) in vcpus {
            let cpu = host[n % host.len()];
            match set_affinity(tid, cpu) {
                Ok(()) => lines.push(format!("vCPU {n} (thread {tid}) on host CPU {cpu}")),
                Err(e) => {
                    eprintln!("warning: pinning vCPU {n} to host CPU {cpu}: {e}");
                    lines.push(format!("vCPU {n} (thread {tid}) not pinned: {e}"));
                }
            }
        }
        let _ = fs::write(&self.file, lines.join("\n") + "\n");
        true
    }
}

/// QEMU's vCPU threads: (vCPU index, thread id), by index.
fn vcpu_threads(pid: u32) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm
            .trim()
            .strip_prefix("CPU ")
            .and_then(|r| r.strip_suffix("/TCG"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            out.push((n, tid));
        }
    }
    out.sort_unstable();
    out
}

/// The host CPUs this process may run on (`sched_getaffinity(2)`).
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = rustix::thread::sched_getaffinity(None) else {
        return Vec::new();
    };
    (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect()
}

/// `sched_setaffinity(2)` of thread `tid` to one CPU.
fn set_affinity(tid: i32, cpu: usize) -> io::Result<()> {
    let pid = rustix::process::Pid::from_raw(tid)
        .ok_or_else(|| io::Error::other(format!("thread id {tid}")))?;
    let mut set = CpuSet::new();
    set.set(cpu);
    Ok(rustix::thread::sched_setaffinity(Some(pid), &set)?)
}

/// The edu device; both copies take the same options.
const EDU: &str = "edu,dma_mask=0xffffffffff";
/// QEMU 7.2's AMD-Vi. `intremap=on` needs `kernel-irqchip=split` (set for
/// every machine here).
const AMD_IOMMU: &str = "amd-iommu,intremap=on";
/// QEMU 7.2's virtio-iommu on q35, announced to the guest by ACPI VIOT.
const VIRTIO_IOMMU: &str = "virtio-iommu-pci";

/// Whether `run` (`NUMAPIN_RUN`) keeps the kernel console off the terminal:
/// the demo does, so its screen shows only what the demo prints. Its kernel
/// console still goes, whole, to console.log.
pub fn quiet(run: &str) -> bool {
    run == "demo"
}

/// A size in MiB as QEMU takes it: `4G`, or `5632M` when not whole GiB.
fn qemu_size(mib: u32) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

/// Boots the VM and waits for it to power off, crash or time out.
pub fn boot(run: &Run) -> Result<Outcome> {
    fs::create_dir_all(run.dir)?;
    let console_log = run.dir.join("console.log");
    let output_log = run.dir.join("output.log");
    let results = run.dir.join("results.jsonl");
    let stderr = run.dir.join("qemu.stderr");
    // A file of an earlier boot must not pass for this one's.
    let affinity = run.dir.join(VCPU_FILE);
    for f in [&console_log, &output_log, &results, &affinity] {
        let _ = fs::remove_file(f);
    }
    let quiet = quiet(run.run);
    // What ttyS0 is copied to: the console, or only the program's output.
    let stdout_log = if quiet { &output_log } else { &console_log };
    let mut qemu = Command::new(QEMU);
    qemu.args(args(run, &results));
    fs::write(run.dir.join("qemu.cmdline"), cmd::display(&qemu) + "\n")?;
    qemu.stderr(File::create(&stderr)?);
    if run.console == Console::Interactive {
        qemu.stdin(Stdio::inherit()).stdout(Stdio::inherit());
    } else {
        qemu.stdin(Stdio::null()).stdout(Stdio::piped());
    }

    let start = Instant::now();
    // Milliseconds since `start` of the last byte on the console.
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut child = qemu
        .spawn()
        .with_context(|| format!("could not start {QEMU} (package qemu-system-x86)"))?;
    let copier = child.stdout.take().map(|mut out| {
        let mut log = File::create(stdout_log);
        let stream = run.console == Console::Stream;
        let heard = heard.clone();
        std::thread::spawn(move || -> io::Result<()> {
            let log = log
                .as_mut()
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            let mut buf = [0u8; 8192];
            loop {
                let n = out.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                heard.store(
                    start.elapsed().as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                log.write_all(&buf[..n])?;
                if stream {
                    let mut stdout = io::stdout().lock();
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
            }
        })
    });

    let (mut results_len, mut results_at) = (0u64, Duration::ZERO);
    let mut vcpus = pins_vcpus(run.run).then(|| {
        let count = run.config.shape.vcpus() as usize;
        VcpuPins::new(child.id(), count, run.dir)
    });
    let exit = loop {
        if let Some(p) = &vcpus
            && p.step(start.elapsed())
        {
            vcpus = None;
        }
        if let Some(status) = child.try_wait()? {
            break if status.success() {
                Exit::Clean
            } else {
                Exit::Abnormal(status)
            };
        }
        if let Some(limit) = run.timeout
            && start.elapsed() > limit
        {
            let _ = child.kill();
            let _ = child.wait();
            break Exit::TimedOut(limit);
        }
        if let Some(quiet) = run.silence {
            let len = fs::metadata(&results).map_or(0, |m| m.len());
            if len != results_len {
                (results_len, results_at) = (len, start.elapsed());
            }
            let console = Duration::from_millis(heard.load(std::sync::atomic::Ordering::Relaxed));
            if start.elapsed().saturating_sub(console.max(results_at)) > quiet {
                let _ = child.kill();
                let _ = child.wait();
                break Exit::Silent(quiet);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    if let Some(copier) = copier {
        match copier.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("warning: copying the guest console failed: {err}"),
            Err(_) => eprintln!("warning: the console copier panicked"),
        }
    }
    Ok(Outcome {
        exit,
        elapsed,
        console_log,
        output_log: quiet.then_some(output_log),
        results,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelKind;
    use crate::vmconfig;

    fn kernel() -> Kernel {
        Kernel {
            kind: KernelKind::Custom,
            image: "/cache/vmlinuz".into(),
            release: "6.12.95".into(),
            origin: "test".into(),
            modules: vec![],
        }
    }

    fn joined(config: &str, console: Console) -> String {
        let k = kernel();
        let run = Run {
            config: vmconfig::find(config).unwrap(),
            kernel: &k,
            initrd: Path::new("/t/initramfs.cpio.gz"),
            run: "test",
            dir: Path::new("/t"),
            console,
            timeout: None,
            silence: None,
            env: &[],
        };
        args(&run, Path::new("/t/results.jsonl")).join(" ")
    }

    #[test]
    fn machine_has_the_recipe_devices() {
        let a = joined("type1-custom", Console::Capture);
        for want in [
            "-accel tcg -cpu max -smp 2,sockets=2,cores=1,threads=1 -m 4G",
            "-machine q35,kernel-irqchip=split,max-ram-below-4g=512M",
            "memory-backend-ram,id=m0,size=2G",
            "-numa node,nodeid=0,memdev=m0 -numa cpu,node-id=0,socket-id=0",
            "-numa node,nodeid=1,memdev=m1 -numa cpu,node-id=1,socket-id=1",
            "-device intel-iommu,intremap=on,caching-mode=on -device edu,dma_mask=0xffffffffff",
            "-device pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0",
            "-device pcie-root-port,id=rp1,bus=pxb1,chassis=1",
            "-device edu,dma_mask=0xffffffffff,bus=rp1 -net none -display none -no-reboot",
            "-kernel /cache/vmlinuz -initrd /t/initramfs.cpio.gz",
            "-monitor none -serial stdio -serial file:/t/results.jsonl",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(!a.contains("kvm"));
    }

    #[test]
    fn bench_shape_has_two_cpus_per_node_and_extra_env() {
        let k = kernel();
        let env = vec!["NUMAPIN_BENCH_SIZES=64M".to_string()];
        let run = Run {
            config: &vmconfig::BENCH,
            kernel: &k,
            initrd: Path::new("/t/i.gz"),
            run: "bench",
            dir: Path::new("/t"),
            console: Console::Capture,
            timeout: None,
            silence: None,
            env: &env,
        };
        let a = args(&run, Path::new("/t/r.jsonl")).join(" ");
        for want in [
            "-smp 4,sockets=2,cores=2,threads=1 -m 6656M",
            "-machine q35,kernel-irqchip=split -object",
            "memory-backend-ram,id=m0,size=5632M,prealloc=on",
            "-numa node,nodeid=0,memdev=m0 -numa cpu,node-id=0,socket-id=0",
            "-numa node,nodeid=1,memdev=m1 -numa cpu,node-id=1,socket-id=1",
            "NUMAPIN_RUN=bench NUMAPIN_SUITE=bench NUMAPIN_BENCH_SIZES=64M",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(!a.contains("max-ram-below-4g"));
    }

    #[test]
    fn each_iommu_model_has_its_device_before_the_edus() {
        for (config, device) in [
            ("type1-stock", "intel-iommu,intremap=on,caching-mode=on"),
            ("type1-amd", "amd-iommu,intremap=on"),
            ("type1-virtio", "virtio-iommu-pci"),
        ] {
            let a = joined(config, Console::Capture);
            let at = a.find(&format!("-device {device} ")).expect(device);
            assert!(at < a.find("-device edu").unwrap(), "{a}");
            assert_eq!(a.matches("-device edu").count(), 2, "{a}");
            let models = ["intel-iommu", "amd-iommu", "virtio-iommu-pci"];
            assert_eq!(models.iter().filter(|m| a.contains(*m)).count(), 1, "{a}");
        }
        let a = joined("noiommu-custom", Console::Capture);
        assert!(!a.contains("-iommu"), "{a}");
        assert!(a.contains("-device edu,dma_mask=0xffffffffff"));
    }

    #[test]
    fn the_demo_moves_the_kernel_console_to_a_file() {
        let k = kernel();
        let run = |what| Run {
            config: vmconfig::find("type1-stock").unwrap(),
            kernel: &k,
            initrd: Path::new("/t/i.gz"),
            run: what,
            dir: Path::new("/t"),
            console: Console::Stream,
            timeout: None,
            silence: None,
            env: &[],
        };
        let demo = args(&run("demo"), Path::new("/t/r.jsonl")).join(" ");
        assert!(
            demo.contains("-serial stdio -serial file:/t/r.jsonl -serial file:/t/console.log"),
            "{demo}"
        );
        assert!(demo.contains("console=ttyS2 "), "{demo}");
        let test = args(&run("test"), Path::new("/t/r.jsonl")).join(" ");
        assert!(
            test.ends_with("-serial stdio -serial file:/t/r.jsonl"),
            "{test}"
        );
        assert!(test.contains("console=ttyS0 "), "{test}");
    }

    #[test]
    fn long_stderr_keeps_its_first_and_last_lines() {
        let lines: Vec<String> = (1..=30).map(|i| format!("l{i}")).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = head_and_tail(&lines, 2, 3);
        assert_eq!(out, "l1\nl2\n[... 25 lines ...]\nl28\nl29\nl30");
        assert_eq!(head_and_tail(&lines[..4], 2, 3), "l1\nl2\nl3\nl4");
    }

    #[test]
    fn interactive_console_multiplexes_the_monitor() {
        let a = joined("type1-custom", Console::Interactive);
        assert!(a.contains("-serial mon:stdio -serial file:"));
        assert!(!a.contains("-monitor none"));
    }
}
