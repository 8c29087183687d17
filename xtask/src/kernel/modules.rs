//! Kernel modules for the stock guest: find them in the unpacked .deb,
//! decompress them, and order them by their `depends=` so busybox `insmod`
//! (which resolves nothing) can load them one after another.
//!
//! Debian's .deb ships no `modules.dep` (depmod runs at install time), so the
//! dependencies come from each module's own `.modinfo` ELF section.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The module name as the kernel sees it (`vfio-pci-core` → `vfio_pci_core`).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Indexes every module file under `dir` by normalized name.
pub fn index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("could not list {}", d.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
                found.insert(normalize(name), path);
            }
        }
    }
    Ok(found)
}

/// `vfio-pci.ko.xz` → `vfio-pci`; `None` for files that are not modules.
fn module_name(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .filter(|n| !n.is_empty())
}

/// A module's bytes, decompressed with xz, zstd or gzip when its name says so.
pub fn read_decompressed(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("could not read {}", path.display()));
    };
    let mut c = Command::new(tool);
    c.arg("-dc").arg(path);
    let out = c
        .output()
        .with_context(|| format!("could not run `{}`", cmd::display(&c)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd::display(&c),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The `key=value` entries of an ELF64 little-endian object's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a 64-bit little-endian ELF object");
    }
    let truncated = || anyhow::anyhow!("truncated ELF section table");
    let shoff = u64_at(0x28).ok_or_else(truncated)?;
    let shentsize = u16_at(0x3a).ok_or_else(truncated)?;
    let shnum = u16_at(0x3c).ok_or_else(truncated)?;
    let shstrndx = u16_at(0x3e).ok_or_else(truncated)?;
    // (name offset, file offset, size) of section i.
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let bytes = |off: usize, size: usize| elf.get(off..off.checked_add(size)?);
    let (_, str_off, str_size) = section(shstrndx).ok_or_else(truncated)?;
    let names = bytes(str_off, str_size).ok_or_else(truncated)?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or_else(truncated)?;
        let name = names.get(name..).unwrap_or_default();
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name == b".modinfo" {
            let data = bytes(off, size).ok_or_else(truncated)?;
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|entry| {
                    let entry = String::from_utf8_lossy(entry);
                    let (k, v) = entry.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// The module names in `depends=` (normalized; empty when it has none).
pub fn depends(info: &[(String, String)]) -> Vec<String> {
    info.iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .filter(|d| !d.is_empty())
        .map(normalize)
        .collect()
}

/// Orders `roots` and everything they depend on so that each module comes
/// after its dependencies (roots keep their relative order where they can).
/// `deps_of` gives one module's direct dependencies.
pub fn load_order(
    roots: &[&str],
    mut deps_of: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        marks: &mut BTreeMap<String, Mark>,
        order: &mut Vec<String>,
        deps_of: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                bail!("module dependency cycle: {} -> {name}", path.join(" -> "))
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        path.push(name.to_owned());
        for dep in deps_of(name)? {
            visit(&dep, marks, order, deps_of, path)?;
        }
        path.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for root in roots {
        visit(
            &normalize(root),
            &mut marks,
            &mut order,
            &mut deps_of,
            &mut Vec::new(),
        )?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE object: null section, .shstrtab, .modinfo.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let info_off = elf.len();
        elf.extend_from_slice(modinfo);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut header = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        header(0, 0, 0);
        header(1, str_off, shstrtab.len());
        header(11, info_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_modinfo_and_depends() {
        let elf = elf_with_modinfo(
            b"license=GPL\0depends=vfio,vfio_virqfd,irqbypass\0name=vfio_pci_core\0\0",
        );
        let info = modinfo(&elf).unwrap();
        assert!(info.contains(&("name".into(), "vfio_pci_core".into())));
        assert_eq!(depends(&info), ["vfio", "vfio_virqfd", "irqbypass"]);
        let none = modinfo(&elf_with_modinfo(b"depends=\0name=irqbypass\0")).unwrap();
        assert!(depends(&none).is_empty());
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(modinfo(b"not an elf").is_err());
        let mut elf = elf_with_modinfo(b"depends=\0");
        elf.truncate(elf.len() - 50); // into the .modinfo header's offset and size
        assert!(modinfo(&elf).is_err());
    }

    #[test]
    fn module_file_names() {
        assert_eq!(module_name("vfio-pci.ko"), Some("vfio-pci"));
        assert_eq!(module_name("vfio.ko.xz"), Some("vfio"));
        assert_eq!(module_name("irqbypass.ko.zst"), Some("irqbypass"));
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name(".ko"), None);
    }

    fn debian_6_1(name: &str) -> Result<Vec<String>> {
        Ok(match name {
            "vfio_pci" => vec!["vfio_pci_core".into(), "vfio".into()],
            "vfio_pci_core" => vec!["vfio".into(), "vfio_virqfd".into(), "irqbypass".into()],
            "vfio_iommu_type1" => vec!["vfio".into()],
            "vfio" | "vfio_virqfd" | "irqbypass" => vec![],
            other => bail!("unknown module {other}"),
        })
    }

    #[test]
    fn orders_dependencies_first() {
        let order = load_order(&["vfio_iommu_type1", "vfio-pci"], debian_6_1).unwrap();
        assert_eq!(
            order,
            [
                "vfio",
                "vfio_iommu_type1",
                "vfio_virqfd",
                "irqbypass",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
        let pos = |m: &str| order.iter().position(|o| o == m).unwrap();
        for m in ["vfio_pci_core", "vfio_pci", "vfio_iommu_type1"] {
            for d in debian_6_1(m).unwrap() {
                assert!(pos(&d) < pos(m), "{d} must load before {m}");
            }
        }
    }

    #[test]
    fn detects_cycles_and_unknown_modules() {
        let cyclic = |n: &str| -> Result<Vec<String>> {
            Ok(vec![if n == "a" { "b".into() } else { "a".into() }])
        };
        let err = load_order(&["a"], cyclic).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
        assert!(load_order(&["nope"], debian_6_1).is_err());
    }
}
