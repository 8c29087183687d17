//! What the host uses a device for, and who holds its VFIO group: the
//! facts [`super::bind`] and [`super::unbind`] refuse on.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Device, Roots, read_trim};
use crate::error::Error;

/// A reason the host is using the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InUse {
    /// A network interface of the device is up (`operstate` or `IFF_UP`).
    InterfaceUp {
        /// Interface name.
        iface: String,
        /// Its `operstate`.
        operstate: String,
        /// Its `flags`.
        flags: u32,
    },
    /// Routes go through a network interface of the device.
    Routes {
        /// Interface name.
        iface: String,
        /// IPv4 and IPv6 routes through it.
        routes: usize,
    },
    /// A block device of the device (or a partition) is mounted.
    Mounted {
        /// Block device name.
        dev: String,
        /// Where.
        mountpoint: String,
    },
    /// Another block device (device-mapper, md, bcache) is built on it.
    Held {
        /// Block device name.
        dev: String,
        /// The holder.
        holder: String,
    },
    /// A block device of the device is active swap.
    Swap {
        /// Block device name.
        dev: String,
    },
    /// The firmware's boot display (`boot_vga` = 1).
    BootDisplay,
    /// Processes hold the device's VFIO group or cdev open (for
    /// [`super::unbind`]: the kernel would block the unbind until they let
    /// go).
    GroupOpen {
        /// The group node.
        node: String,
        /// Their process ids.
        pids: Vec<u32>,
    },
}

impl fmt::Display for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InUse::InterfaceUp {
                iface,
                operstate,
                flags,
            } => write!(
                f,
                "network interface {iface} is up (operstate {operstate}, flags {flags:#x})"
            ),
            InUse::Routes { iface, routes } => write!(
                f,
                "{routes} {} through {iface}",
                if *routes == 1 {
                    "route goes"
                } else {
                    "routes go"
                }
            ),
            InUse::Mounted { dev, mountpoint } => {
                write!(f, "block device {dev} is mounted at {mountpoint}")
            }
            InUse::Held { dev, holder } => {
                write!(f, "block device {dev} is held by {holder}")
            }
            InUse::Swap { dev } => write!(f, "block device {dev} is active swap"),
            InUse::BootDisplay => write!(f, "it is the boot display (boot_vga = 1)"),
            InUse::GroupOpen { node, pids } => write!(
                f,
                "{node} is open in process{} {}",
                if pids.len() == 1 { "" } else { "es" },
                pids.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Entries of `class_dir` (`/sys/class/net`, `/sys/class/block`) whose
/// device lives under `dev`.
pub(super) fn class_members(class_dir: &Path, dev: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(class_dir) else {
        return out;
    };
    for e in rd.flatten() {
        if let Ok(real) = std::fs::canonicalize(e.path()) {
            if real.starts_with(dev) && real != dev {
                out.push((e.file_name().to_string_lossy().into_owned(), real));
            }
        }
    }
    out.sort();
    out
}

/// Routes in `/proc/net/route` and `/proc/net/ipv6_route` through `iface`.
pub(super) fn routes_through(proc: &Path, iface: &str) -> usize {
    let v4 = std::fs::read_to_string(proc.join("net/route")).unwrap_or_default();
    let v6 = std::fs::read_to_string(proc.join("net/ipv6_route")).unwrap_or_default();
    let n4 = v4
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().next() == Some(iface))
        .count();
    // ipv6_route has no header; the interface is the last column. `lo`
    // carries the kernel's own entries for every address.
    let n6 = v6
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(iface))
        .count();
    n4 + n6
}

/// Where a block device (`maj:min`, `/dev/NAME`) is mounted, from
/// `/proc/self/mountinfo`.
pub(super) fn mountpoints(proc: &Path, majmin: Option<&str>, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(proc.join("self/mountinfo")).unwrap_or_default();
    let source = format!("/dev/{name}");
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        // Optional fields end at `-`; then fstype and source.
        let src = f
            .iter()
            .position(|&x| x == "-")
            .and_then(|i| f.get(i + 2))
            .copied();
        if majmin.is_some_and(|m| m == f[2]) || src == Some(source.as_str()) {
            out.push(f[4].to_string());
        }
    }
    out
}

/// What the host is using the device for: its network interfaces, its block
/// devices, the boot display.
pub(super) fn uses(roots: &Roots, dev: &Device) -> Vec<InUse> {
    let mut found = Vec::new();
    if read_trim(&dev.dir.join("boot_vga")).as_deref() == Some("1") {
        found.push(InUse::BootDisplay);
    }
    let mut ifaces = class_members(&roots.sys.join("class/net"), &dev.real);
    // Also the device's own net/ directory, where class/net is missing.
    if let Ok(rd) = std::fs::read_dir(dev.dir.join("net")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !ifaces.iter().any(|(m, _)| *m == n) {
                ifaces.push((n, e.path()));
            }
        }
    }
    for (iface, dir) in &ifaces {
        let operstate = read_trim(&dir.join("operstate")).unwrap_or_default();
        let flags = read_trim(&dir.join("flags"))
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        const IFF_UP: u32 = 0x1;
        if operstate == "up" || flags & IFF_UP != 0 {
            found.push(InUse::InterfaceUp {
                iface: iface.clone(),
                operstate,
                flags,
            });
        }
        let routes = routes_through(&roots.proc, iface);
        if routes > 0 {
            found.push(InUse::Routes {
                iface: iface.clone(),
                routes,
            });
        }
    }
    let swaps = std::fs::read_to_string(roots.proc.join("swaps")).unwrap_or_default();
    for (name, dir) in class_members(&roots.sys.join("class/block"), &dev.real) {
        let majmin = read_trim(&dir.join("dev"));
        for m in mountpoints(&roots.proc, majmin.as_deref(), &name) {
            found.push(InUse::Mounted {
                dev: name.clone(),
                mountpoint: m,
            });
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("holders")) {
            let mut holders: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            holders.sort();
            for h in holders {
                found.push(InUse::Held {
                    dev: name.clone(),
                    holder: h,
                });
            }
        }
        let path = format!("/dev/{name}");
        if swaps
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(path.as_str()))
        {
            found.push(InUse::Swap { dev: name.clone() });
        }
    }
    found
}

/// Who holds the device's VFIO nodes open: processes with its group
/// (`/dev/vfio/<group>`, `/dev/vfio/noiommu-<group>`) or its cdev
/// (`/dev/vfio/devices/vfioN`) open, found in `/proc/*/fd`; and how many
/// processes' descriptors could not be read (then numapin cannot rule out
/// a holder it does not see).
pub(super) fn holders(roots: &Roots, dev: &Device, group: Option<u32>) -> (Vec<InUse>, usize) {
    let mut nodes: Vec<String> = Vec::new();
    if let Some(g) = group {
        nodes.push(format!("/dev/vfio/{g}"));
        nodes.push(format!("/dev/vfio/noiommu-{g}"));
    }
    for e in std::fs::read_dir(dev.real.join("vfio-dev"))
        .into_iter()
        .flatten()
        .flatten()
    {
        nodes.push(format!(
            "/dev/vfio/devices/{}",
            e.file_name().to_string_lossy()
        ));
    }
    let mut found: Vec<(String, u32)> = Vec::new();
    let mut unseen = 0;
    for p in std::fs::read_dir(&roots.proc)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let fds = match std::fs::read_dir(p.path().join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unseen += 1;
                continue;
            }
            // The process ended meanwhile.
            Err(_) => continue,
        };
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                let t = t.to_string_lossy();
                if let Some(n) = nodes.iter().find(|n| **n == t) {
                    if !found.iter().any(|(m, q)| m == n && *q == pid) {
                        found.push((n.clone(), pid));
                    }
                }
            }
        }
    }
    found.sort_by_key(|(n, pid)| (n.clone(), *pid));
    let mut out: Vec<InUse> = Vec::new();
    for (node, pid) in found {
        match out
            .iter_mut()
            .find(|u| matches!(u, InUse::GroupOpen { node: n, .. } if *n == node))
        {
            Some(InUse::GroupOpen { pids, .. }) => pids.push(pid),
            _ => out.push(InUse::GroupOpen {
                node,
                pids: vec![pid],
            }),
        }
    }
    (out, unseen)
}

/// The refusal: what uses the device, and what `action` would do to it.
pub(super) fn refuse_in_use(name: &str, action: String, found: &[InUse], unseen: usize) -> Error {
    Error::DeviceInUse {
        device: name.to_string(),
        action,
        uses: found.iter().map(|u| u.to_string()).collect(),
        unseen,
    }
}
