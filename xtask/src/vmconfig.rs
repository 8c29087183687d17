//! The VM configurations the suite boots, in one table. Add a row to add a
//! configuration; set `default` to make `cargo xtask test` boot it. The
//! benchmark VM ([`BENCH`]) is kept out of the table: `cargo xtask test`
//! never boots it.

use crate::kernel::KernelKind;

/// Boot-time hugepages: one 1 GiB and 64 × 2 MiB pages on each of the two
/// nodes (per-node syntax `node:count`, Linux 5.18+; both guest kernels take
/// it). The 1 GiB pages also need the memory layout of `qemu::args` and
/// `nokaslr`.
pub const HUGEPAGES: &str = "hugepagesz=1G hugepages=0:1,1:1 hugepagesz=2M hugepages=0:64,1:64";

/// The machine's CPUs and memory: two NUMA nodes, each with the same number
/// of vCPUs (node `n` has CPUs `n*k .. n*k+k-1`) and its own memory.
#[derive(Debug)]
pub struct Shape {
    /// vCPUs per node.
    pub cpus_per_node: u32,
    /// Memory of node 0 and node 1, in MiB.
    pub node_mib: [u32; 2],
    /// q35's `max-ram-below-4g`, when the layout needs it (see `qemu::args`).
    pub ram_below_4g: Option<&'static str>,
    /// Boot-time hugepage parameters.
    pub hugepages: &'static str,
    /// Back all guest RAM with host memory before the guest starts
    /// (`prealloc=on`), so that no host page fault lands inside a timing.
    pub prealloc: bool,
}

impl Shape {
    /// vCPUs of the whole VM: two nodes of `cpus_per_node`.
    pub fn vcpus(&self) -> u32 {
        self.cpus_per_node * 2
    }
}

/// The suite's machine: one vCPU and 2 GiB per node, 1 GiB and 2 MiB
/// hugepages on both (the 1 GiB pages need 512M below 4G and `nokaslr`).
pub const SUITE_SHAPE: Shape = Shape {
    cpus_per_node: 1,
    node_mib: [2048, 2048],
    ram_below_4g: Some("512M"),
    hugepages: HUGEPAGES,
    prealloc: false,
};

/// The benchmark's machine. Node 0, where every measured region lives, has
/// two vCPUs (parallel prefault is measured against one thread; TCG runs
/// them on the host's two cores) and room for a 2 GiB region of base pages
/// next to a 2 GiB pool of 2 MiB hugepages. Node 1 has the CPUs that touch
/// regions from afar for the NUMA-balancing measurement. The host backs all
/// of it before boot (6.5 GiB of the host's 24).
pub const BENCH_SHAPE: Shape = Shape {
    cpus_per_node: 2,
    node_mib: [5632, 1024],
    ram_below_4g: None,
    hugepages: "hugepagesz=2M hugepages=0:1040,1:16",
    prealloc: true,
};

/// Which IOMMU the VM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iommu {
    /// QEMU's intel-iommu (interrupt remapping, caching mode), `intel_iommu=on`.
    Intel,
    /// QEMU's amd-iommu (AMD-Vi, described by the ACPI IVRS table); the
    /// guest driver is built into every kernel here and on by default.
    Amd,
    /// QEMU's virtio-iommu-pci, described by the ACPI VIOT table; Debian
    /// builds its driver as a module (`virtio_iommu`), which /init loads.
    Virtio,
    /// None: only VFIO's unsafe no-IOMMU mode can drive the device.
    None,
}

impl Iommu {
    /// The QEMU device, as the reports name the model.
    pub fn model(self) -> &'static str {
        match self {
            Iommu::Intel => "intel-iommu",
            Iommu::Amd => "amd-iommu",
            Iommu::Virtio => "virtio-iommu-pci",
            Iommu::None => "none",
        }
    }
}

#[derive(Debug)]
pub struct VmConfig {
    pub name: &'static str,
    pub kernel: KernelKind,
    pub iommu: Iommu,
    /// What the guest runner runs (`numapin-vmtest --suite`).
    pub suite: &'static str,
    /// Kernel parameters on top of the common ones.
    pub extra_cmdline: &'static [&'static str],
    /// Booted by `cargo xtask test` without `--vm`.
    pub default: bool,
    /// CPUs, memory and hugepages.
    pub shape: &'static Shape,
}

/// The suite's VMs. Type1 runs on every stock kernel under intel-iommu and
/// once under each other IOMMU model QEMU 7.2 emulates for an emulated
/// device; no-IOMMU and mdev need the self-built kernel (Debian builds
/// neither `VFIO_NOIOMMU` nor the mtty sample).
pub const CONFIGS: &[VmConfig] = &[
    type1("type1-stock", KernelKind::Stock, Iommu::Intel),
    core("type1-trixie", KernelKind::Trixie, Iommu::Intel),
    core("type1-backports", KernelKind::Backports, Iommu::Intel),
    type1("type1-custom", KernelKind::Custom, Iommu::Intel),
    VmConfig {
        name: "noiommu-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::None,
        suite: "noiommu",
        extra_cmdline: &["vfio.enable_unsafe_noiommu_mode=1"],
        default: true,
        shape: &SUITE_SHAPE,
    },
    VmConfig {
        name: "mdev-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::Intel,
        suite: "mdev",
        extra_cmdline: &[],
        default: true,
        shape: &SUITE_SHAPE,
    },
    VmConfig {
        name: "iommufd-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::Intel,
        suite: "iommufd",
        extra_cmdline: &[],
        default: true,
        shape: &SUITE_SHAPE,
    },
    // Neither gives VFIO isolated MSIs: QEMU 7.2's IVRS table lists no
    // IOAPIC, so Linux turns AMD interrupt remapping off ("AMD-Vi: [Firmware
    // Bug]: No southbridge IOAPIC found"), and virtio-iommu has no interrupt
    // remapping on x86 at all. Type1 then refuses the container
    // (VFIO_SET_IOMMU fails with EPERM, "No interrupt remapping support")
    // unless allowed. The suite's edu is polled, never interrupts.
    // amd-iommu works under QEMU 7.2 only: under QEMU 10.0.2 the guest's
    // serial interrupts are lost and /init hangs on its first output line.
    VmConfig {
        extra_cmdline: &[UNSAFE_INTERRUPTS],
        // Not booted by default: the QEMU setup installs (10.0.2) hangs it.
        default: false,
        ..core("type1-amd", KernelKind::Backports, Iommu::Amd)
    },
    VmConfig {
        extra_cmdline: &[UNSAFE_INTERRUPTS],
        ..core("type1-virtio", KernelKind::Backports, Iommu::Virtio)
    },
];

/// Lets type1 take a group whose MSIs the IOMMU cannot isolate (/init hands
/// it to the module, as modprobe would).
const UNSAFE_INTERRUPTS: &str = "vfio_iommu_type1.allow_unsafe_interrupts=1";

/// A default configuration running the type1 suite.
const fn type1(name: &'static str, kernel: KernelKind, iommu: Iommu) -> VmConfig {
    VmConfig {
        name,
        kernel,
        iommu,
        suite: "type1",
        extra_cmdline: &[],
        default: true,
        shape: &SUITE_SHAPE,
    }
}

/// A default configuration running the type1 suite's core: what a kernel
/// or an IOMMU model changes (placement, DMA, migration, NUMA balancing,
/// compaction, release, proof levels). The scenarios of the error paths,
/// the demo, the service and the VMM example, whose subject is numapin
/// rather than the kernel, run on the stock 6.1 and the built kernel only:
/// the suite's time budget is shared.
const fn core(name: &'static str, kernel: KernelKind, iommu: Iommu) -> VmConfig {
    VmConfig {
        suite: "type1-core",
        ..type1(name, kernel, iommu)
    }
}

/// The VM `cargo xtask bench` boots: Debian's stock kernel on
/// [`BENCH_SHAPE`]. Not the self-built one: `tinyconfig` leaves it at
/// `NR_CPUS=2`, so it cannot give node 0 two vCPUs and node 1 any, and
/// below four CPUs the kernel has no split page-table locks, so parallel
/// faulting contends on one `page_table_lock` as no distribution kernel
/// does. The stock kernel has NUMA balancing with its debugfs knobs, its
/// `/proc/vmstat` counters, io_uring, THP and hugetlbfs.
pub const BENCH: VmConfig = VmConfig {
    name: "bench-stock",
    kernel: KernelKind::Stock,
    iommu: Iommu::Intel,
    suite: "bench",
    extra_cmdline: &[],
    default: false,
    shape: &BENCH_SHAPE,
};

/// The bench VM on the newest stock kernel (trixie-backports' 7.3), for
/// `cargo xtask bench --kernel backports`: the same machine as [`BENCH`].
pub const BENCH_BACKPORTS: VmConfig = VmConfig {
    name: "bench-backports",
    kernel: KernelKind::Backports,
    ..BENCH
};

/// The bench VM for a kernel: [`BENCH`] or [`BENCH_BACKPORTS`] (the
/// self-built kernel cannot give node 0 two vCPUs, see [`BENCH`]).
pub fn bench(kernel: KernelKind) -> Option<&'static VmConfig> {
    match kernel {
        KernelKind::Stock => Some(&BENCH),
        KernelKind::Backports => Some(&BENCH_BACKPORTS),
        KernelKind::Trixie | KernelKind::Custom => None,
    }
}

/// Looks a configuration up by name.
pub fn find(name: &str) -> Option<&'static VmConfig> {
    CONFIGS.iter().find(|c| c.name == name)
}

/// The configurations `cargo xtask test` boots by default.
pub fn defaults() -> impl Iterator<Item = &'static VmConfig> {
    CONFIGS.iter().filter(|c| c.default)
}

/// All names, for error messages.
pub fn names() -> String {
    CONFIGS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl VmConfig {
    /// The kernel command line. `run` is what /init starts (`test`, `demo`,
    /// `shell`, `script`); `NUMAPIN_*` reach /init as environment variables
    /// because the kernel hands it every unknown `KEY=value` without a dot.
    pub fn cmdline(&self, run: &str) -> String {
        // nokaslr: a randomly placed kernel image can sit in the gigabyte a
        // node's 1 GiB hugepage needs.
        // The demo's kernel console is ttyS2, a file (see `qemu::quiet`).
        let console = if crate::qemu::quiet(run) {
            "console=ttyS2"
        } else {
            "console=ttyS0"
        };
        let mut parts = vec![console, "panic=-1", "nokaslr"];
        if self.iommu == Iommu::Intel {
            parts.push("intel_iommu=on");
        }
        parts.push(self.shape.hugepages);
        parts.extend(self.extra_cmdline);
        let run = format!("NUMAPIN_RUN={run}");
        let suite = format!("NUMAPIN_SUITE={}", self.suite);
        parts.push(&run);
        parts.push(&suite);
        parts.join(" ")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, c) in CONFIGS.iter().enumerate() {
            assert!(
                CONFIGS[i + 1..].iter().all(|d| d.name != c.name),
                "{} twice",
                c.name
            );
            assert_eq!(find(c.name).unwrap().name, c.name);
        }
        assert!(find("nope").is_none());
    }

    #[test]
    fn default_set_is_the_whole_matrix() {
        let d: Vec<_> = defaults().map(|c| c.name).collect();
        assert_eq!(d, DEFAULT_SET);
        // Type1 on every kernel; every IOMMU model; every suite.
        for kind in KernelKind::ALL {
            assert!(
                defaults().any(|c| c.kernel == *kind && c.suite.starts_with("type1")),
                "no default type1 VM on {kind:?}"
            );
        }
        // amd-iommu is in the table but not booted by default (it hangs
        // under the QEMU 10.0.2 the setup installs; see CONFIGS).
        for iommu in [Iommu::Intel, Iommu::Virtio, Iommu::None] {
            assert!(defaults().any(|c| c.iommu == iommu), "{iommu:?}");
        }
        assert!(find("type1-amd").is_some_and(|c| !c.default));
        for suite in ["type1", "noiommu", "mdev", "iommufd"] {
            assert!(defaults().any(|c| c.suite == suite), "{suite}");
        }
    }

    #[test]
    fn unsafe_interrupts_only_where_no_msi_isolation() {
        for c in CONFIGS {
            let allowed = c.cmdline("test").contains(UNSAFE_INTERRUPTS);
            assert_eq!(
                allowed,
                matches!(c.iommu, Iommu::Amd | Iommu::Virtio),
                "{}",
                c.name
            );
        }
    }

    /// What `cargo xtask test` boots, in order.
    pub const DEFAULT_SET: [&str; 8] = [
        "type1-stock",
        "type1-trixie",
        "type1-backports",
        "type1-custom",
        "noiommu-custom",
        "mdev-custom",
        "iommufd-custom",
        "type1-virtio",
    ];

    #[test]
    fn cmdline_follows_the_iommu() {
        let c = find("type1-stock").unwrap().cmdline("test");
        assert!(c.starts_with("console=ttyS0 panic=-1 nokaslr "));
        assert!(c.contains(" intel_iommu=on "));
        assert!(c.contains(HUGEPAGES));
        assert!(c.ends_with(" NUMAPIN_RUN=test NUMAPIN_SUITE=type1"));

        for name in ["type1-amd", "type1-virtio", "noiommu-custom"] {
            let c = find(name).unwrap().cmdline("test");
            assert!(!c.contains("intel_iommu"), "{c}");
        }
        assert!(
            find("type1-stock")
                .unwrap()
                .cmdline("demo")
                .starts_with("console=ttyS2 ")
        );
        let n = find("noiommu-custom").unwrap().cmdline("test");
        assert!(n.contains("vfio.enable_unsafe_noiommu_mode=1"));
        assert!(n.ends_with("NUMAPIN_SUITE=noiommu"));
    }

    #[test]
    fn bench_is_not_in_the_suite_and_has_its_own_shape() {
        assert!(find(BENCH.name).is_none());
        assert!(CONFIGS.iter().all(|c| c.shape.cpus_per_node == 1));
        let c = BENCH.cmdline("bench");
        assert!(c.contains("hugepagesz=2M hugepages=0:1040,1:16"), "{c}");
        assert!(!c.contains("hugepagesz=1G"), "{c}");
        assert!(c.ends_with(" NUMAPIN_RUN=bench NUMAPIN_SUITE=bench"), "{c}");
    }

    #[test]
    fn only_type1_boots_stock_kernels() {
        for c in CONFIGS {
            if !c.suite.starts_with("type1") {
                assert_eq!(
                    c.kernel,
                    KernelKind::Custom,
                    "{} needs the self-built kernel",
                    c.name
                );
            }
        }
    }
}
