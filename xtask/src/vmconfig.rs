//! The VM configurations the suite boots, in one table. Add a row to add a
//! configuration; set `default` to make `cargo xtask test` boot it.

use crate::kernel::KernelKind;

/// Boot-time hugepages: one 1 GiB and 64 × 2 MiB pages on each of the two
/// nodes (per-node syntax `node:count`, Linux 5.18+; both guest kernels take
/// it). The 1 GiB pages also need the memory layout of `qemu::args` and
/// `nokaslr`.
pub const HUGEPAGES: &str = "hugepagesz=1G hugepages=0:1,1:1 hugepagesz=2M hugepages=0:64,1:64";

/// Which IOMMU the VM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iommu {
    /// QEMU's intel-iommu (interrupt remapping, caching mode), `intel_iommu=on`.
    Intel,
    /// None: only VFIO's unsafe no-IOMMU mode can drive the device.
    None,
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
}

pub const CONFIGS: &[VmConfig] = &[
    VmConfig {
        name: "type1-stock",
        kernel: KernelKind::Stock,
        iommu: Iommu::Intel,
        suite: "type1",
        extra_cmdline: &[],
        default: true,
    },
    VmConfig {
        name: "type1-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::Intel,
        suite: "type1",
        extra_cmdline: &[],
        default: true,
    },
    VmConfig {
        name: "noiommu-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::None,
        suite: "noiommu",
        extra_cmdline: &["vfio.enable_unsafe_noiommu_mode=1"],
        default: true,
    },
    VmConfig {
        name: "mdev-custom",
        kernel: KernelKind::Custom,
        iommu: Iommu::Intel,
        suite: "mdev",
        extra_cmdline: &[],
        default: true,
    },
];

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
        let mut parts = vec!["console=ttyS0", "panic=-1", "nokaslr"];
        if self.iommu == Iommu::Intel {
            parts.push("intel_iommu=on");
        }
        parts.push(HUGEPAGES);
        parts.extend(self.extra_cmdline);
        let run = format!("NUMAPIN_RUN={run}");
        let suite = format!("NUMAPIN_SUITE={}", self.suite);
        parts.push(&run);
        parts.push(&suite);
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
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
    fn default_set_is_every_suite() {
        let d: Vec<_> = defaults().map(|c| c.name).collect();
        assert_eq!(
            d,
            [
                "type1-stock",
                "type1-custom",
                "noiommu-custom",
                "mdev-custom"
            ]
        );
    }

    #[test]
    fn cmdline_follows_the_iommu() {
        let c = find("type1-stock").unwrap().cmdline("test");
        assert!(c.starts_with("console=ttyS0 panic=-1 nokaslr "));
        assert!(c.contains(" intel_iommu=on "));
        assert!(c.contains(HUGEPAGES));
        assert!(c.ends_with(" NUMAPIN_RUN=test NUMAPIN_SUITE=type1"));

        let n = find("noiommu-custom").unwrap().cmdline("test");
        assert!(!n.contains("intel_iommu"));
        assert!(n.contains("vfio.enable_unsafe_noiommu_mode=1"));
        assert!(n.ends_with("NUMAPIN_SUITE=noiommu"));
    }

    #[test]
    fn only_type1_stock_boots_stock() {
        for c in CONFIGS {
            if c.suite != "type1" {
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
