//! The custom kernel's config fragment (`xtask/guest/kernel.config`): the
//! options enabled over `tinyconfig`, and the check that `olddefconfig` kept
//! every one of them.

use std::collections::HashSet;

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

/// The parsed fragment: option names without the `CONFIG_` prefix, in file order.
#[derive(Debug, PartialEq, Eq)]
pub struct Fragment {
    pub options: Vec<String>,
}

impl Fragment {
    /// Parses `CONFIG_NAME=y` lines; blank lines and `#` comments are ignored.
    /// Anything else (`=m`, `=n`, values, duplicates) is an error naming the line:
    /// the guest kernel has no modules and every listed option must be on.
    pub fn parse(text: &str) -> Result<Fragment> {
        let mut options = Vec::new();
        let mut seen = HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some(name) = line
                .strip_prefix("CONFIG_")
                .and_then(|l| l.strip_suffix("=y"))
            else {
                bail!("kernel.config line {n}: expected `CONFIG_NAME=y`, found `{line}`");
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("kernel.config line {n}: `{name}` is not a config option name");
            }
            if !seen.insert(name) {
                bail!("kernel.config line {n}: CONFIG_{name} is listed twice");
            }
            options.push(name.to_owned());
        }
        if options.is_empty() {
            bail!("kernel.config enables no option");
        }
        Ok(Fragment { options })
    }

    /// Hex SHA-256 of the option list (comments and blank lines don't count),
    /// part of the cache key.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for opt in &self.options {
            h.update(format!("CONFIG_{opt}=y\n"));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Arguments for `scripts/config`: `-e NAME` per option.
    pub fn enable_args(&self) -> Vec<String> {
        self.options
            .iter()
            .flat_map(|o| ["-e".to_owned(), o.clone()])
            .collect()
    }

    /// The options that are not `=y` in a kernel `.config`.
    pub fn missing_in<'a>(&'a self, dotconfig: &str) -> Vec<&'a str> {
        let enabled: HashSet<&str> = dotconfig
            .lines()
            .filter_map(|l| l.strip_prefix("CONFIG_")?.strip_suffix("=y"))
            .collect();
        self.options
            .iter()
            .map(String::as_str)
            .filter(|o| !enabled.contains(o))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_and_skips_comments() {
        let f =
            Fragment::parse("# base\n\nCONFIG_NUMA=y\n  CONFIG_VFIO=y  \n# CONFIG_X is not set\n")
                .unwrap();
        assert_eq!(f.options, ["NUMA", "VFIO"]);
        assert_eq!(f.enable_args(), ["-e", "NUMA", "-e", "VFIO"]);
    }

    #[test]
    fn rejects_modules_values_and_duplicates() {
        let err = Fragment::parse("CONFIG_A=y\nCONFIG_VFIO=m\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(Fragment::parse("CONFIG_NR_CPUS=4\n").is_err());
        assert!(Fragment::parse("VFIO=y\n").is_err());
        assert!(Fragment::parse("CONFIG_=y\n").is_err());
        let err = Fragment::parse("CONFIG_A=y\nCONFIG_A=y\n").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert!(Fragment::parse("# nothing\n").is_err());
    }

    #[test]
    fn hash_ignores_comments_but_not_options() {
        let a = Fragment::parse("CONFIG_A=y\nCONFIG_B=y\n").unwrap();
        let b = Fragment::parse("# note\nCONFIG_A=y\n\nCONFIG_B=y\n").unwrap();
        let c = Fragment::parse("CONFIG_A=y\n").unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn missing_options_are_named() {
        let f = Fragment::parse("CONFIG_VFIO=y\nCONFIG_VFIO_NOIOMMU=y\nCONFIG_NUMA=y\n").unwrap();
        let dotconfig = "CONFIG_VFIO=y\n# CONFIG_VFIO_NOIOMMU is not set\nCONFIG_NUMA=m\nCONFIG_NUMA_BALANCING=y\n";
        assert_eq!(f.missing_in(dotconfig), ["VFIO_NOIOMMU", "NUMA"]);
    }

    #[test]
    fn the_repo_fragment_parses_and_has_the_required_options() {
        let text =
            std::fs::read_to_string(crate::layout::guest_dir().join("kernel.config")).unwrap();
        let f = Fragment::parse(&text).unwrap();
        for required in [
            "VFIO",
            "VFIO_IOMMU_TYPE1",
            "VFIO_PCI",
            "VFIO_NOIOMMU",
            "VFIO_MDEV",
            "SAMPLES",
            "SAMPLE_VFIO_MDEV_MTTY",
            "IOMMUFD",
            "VFIO_DEVICE_CDEV",
            "INTEL_IOMMU",
            "INTEL_IOMMU_DEBUGFS",
            "AMD_IOMMU",
            "VIRTIO_IOMMU",
            "NUMA",
            "NUMA_BALANCING",
            "MIGRATION",
            "COMPACTION",
            "HUGETLBFS",
            "TRANSPARENT_HUGEPAGE",
            "IO_URING",
            "VM_EVENT_COUNTERS",
        ] {
            assert!(
                f.options.iter().any(|o| o == required),
                "fragment lacks CONFIG_{required}"
            );
        }
    }
}
