//! `numapin check`: a preflight. Each check says what it found and, when it
//! fails, what to do. Reads only sysfs, procfs and this process's limits;
//! opens nothing.

use std::path::{Path, PathBuf};

use numapin::addr::human_size;
use numapin::numa::Topology;
use numapin::{ContainerKind, Error, Result};
use serde::Serialize;

use super::regions::{self, RegionArg};

/// Where the checks look.
pub struct Host {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
}

impl Host {
    pub fn system() -> Host {
        Host {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// numapin will fail here; see the fix.
    Fail,
    /// Worth knowing; not a fault.
    Info,
}

/// One line of the preflight.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn info(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Info,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// A library error as a failed check: numapin's messages are
/// `<what happened>; <what to do>`.
fn from_error(check: &'static str, e: &Error) -> Check {
    let text = e.to_string();
    match text.split_once("; ") {
        Some((what, fix)) => fail(check, what, fix),
        None => fail(check, text.clone(), "see the message"),
    }
}

/// The whole preflight.
#[derive(Debug, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the kernel has an IOMMU on, or VFIO's no-IOMMU mode.
pub fn iommu(host: &Host) -> Check {
    let mut units: Vec<String> = std::fs::read_dir(host.sys.join("class/iommu"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    units.sort();
    if !units.is_empty() {
        return ok("iommu", format!("on ({})", units.join(", ")));
    }
    let noiommu = read_trim(
        &host
            .sys
            .join("module/vfio/parameters/enable_unsafe_noiommu_mode"),
    );
    if matches!(noiommu.as_deref(), Some("Y") | Some("1")) {
        return ok(
            "iommu",
            "none, but VFIO's no-IOMMU mode is on: devices DMA to physical addresses \
             (numapin pins with io_uring and reports the physical extents)",
        );
    }
    fail(
        "iommu",
        "off: /sys/class/iommu is empty and VFIO's no-IOMMU mode is off",
        "boot with intel_iommu=on (AMD IOMMUs are on by default) and check \
         `dmesg | grep -i -e DMAR -e IOMMU`; without an IOMMU, \
         `modprobe vfio enable_unsafe_noiommu_mode=1` (unsafe: the device can DMA anywhere)",
    )
}

/// Whether vfio-pci is loaded.
pub fn vfio_pci(host: &Host, kind: Option<ContainerKind>) -> Check {
    let loaded = host.sys.join("bus/pci/drivers/vfio-pci").exists();
    match (loaded, kind) {
        (true, _) => ok("vfio-pci", "loaded"),
        (false, Some(ContainerKind::MdevOnly)) => {
            info("vfio-pci", "not loaded; an mdev device does not need it")
        }
        (false, _) => fail("vfio-pci", "not loaded", "`modprobe vfio-pci`"),
    }
}

/// Whether the device's group can be opened.
pub fn group(device: Option<&str>) -> (Check, Option<ContainerKind>) {
    let Some(dev) = device else {
        return (info("group", "no --device given"), None);
    };
    let desc = match numapin::vfio::describe(dev) {
        Ok(d) => d,
        Err(e) => return (from_error("group", &e), None),
    };
    let kind = Some(desc.kind);
    match desc.check_openable() {
        Ok(()) => {
            let others = desc.members.len().saturating_sub(1);
            (
                ok(
                    "group",
                    format!(
                        "{} ({}) is in group {} ({}){}: viable",
                        desc.name,
                        desc.kind.name(),
                        desc.group,
                        desc.group_node.display(),
                        match others {
                            0 => String::new(),
                            n => format!(" with {n} other device{}", if n == 1 { "" } else { "s" }),
                        }
                    ),
                ),
                kind,
            )
        }
        Err(e) => (from_error("group", &e), kind),
    }
}

/// `RLIMIT_MEMLOCK` against the bytes the regions pin. `limit`: `None` is
/// unlimited.
pub fn memlock(limit: Option<u64>, ipc_lock: bool, needed: Option<u64>) -> Check {
    let lim = limit.map_or("unlimited".to_string(), human_size);
    let Some(needed) = needed else {
        return info(
            "memlock",
            format!(
                "RLIMIT_MEMLOCK {lim}, CAP_IPC_LOCK {}; give --region to compare",
                if ipc_lock { "yes" } else { "no" }
            ),
        );
    };
    if ipc_lock {
        return ok(
            "memlock",
            format!(
                "CAP_IPC_LOCK: the limit ({lim}) does not apply to the {} asked for",
                human_size(needed)
            ),
        );
    }
    match limit {
        Some(l) if l < needed => fail(
            "memlock",
            format!(
                "RLIMIT_MEMLOCK is {lim} but the regions pin {}",
                human_size(needed)
            ),
            format!(
                "raise it (`ulimit -l {}` in KiB, LimitMEMLOCK= in systemd, \
                 /etc/security/limits.conf) or grant CAP_IPC_LOCK",
                needed.div_ceil(1024)
            ),
        ),
        _ => ok(
            "memlock",
            format!(
                "RLIMIT_MEMLOCK {lim} covers the {} asked for",
                human_size(needed)
            ),
        ),
    }
}

/// The hugepage pools against the regions' hugepages.
pub fn hugepages(topo: &Topology, regs: &[RegionArg]) -> Check {
    let demand = regions::pool_demand(regs);
    if demand.is_empty() {
        let pools: Vec<String> = topo
            .nodes
            .iter()
            .flat_map(|n| {
                n.hugepages.iter().filter(|p| p.total > 0).map(move |p| {
                    format!(
                        "node {}: {}/{} free of {}",
                        n.id,
                        p.free,
                        p.total,
                        human_size(p.page_size)
                    )
                })
            })
            .collect();
        return info(
            "hugepages",
            if pools.is_empty() {
                "no hugepages reserved; no region asks for any".to_string()
            } else {
                format!("no region asks for any; {}", pools.join(", "))
            },
        );
    }
    match regions::validate_pools(topo, regs) {
        Ok(()) => ok(
            "hugepages",
            demand
                .iter()
                .map(|(&(node, ps), &(pages, _))| {
                    let free = topo
                        .nodes
                        .iter()
                        .find(|n| n.id == node)
                        .and_then(|n| n.pool(ps))
                        .map_or(0, |p| p.free);
                    format!("node {node}: {pages} of {free} free {ps} pages")
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Err(e) => from_error("hugepages", &e),
    }
}

/// The regions against the topology (nodes, memory, sizes, alignment).
pub fn region_shapes(topo: &Topology, regs: &[RegionArg]) -> Check {
    if regs.is_empty() {
        return info("regions", "no --region given");
    }
    match regions::validate_shape(topo, regs) {
        Ok(()) => ok(
            "regions",
            format!(
                "{} fit the topology: {}",
                if regs.len() == 1 { "it" } else { "all" },
                regs.iter()
                    .map(|r| r.text.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ),
        Err(e) => from_error("regions", &e),
    }
}

/// Effective capabilities of this process (`CapEff` in `/proc/self/status`).
pub fn cap_eff(proc: &Path) -> u64 {
    read_trim(&proc.join("self/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;

/// The process's group ids (`Gid:` and `Groups:` of `/proc/self/status`).
fn gids(proc: &Path) -> Vec<u64> {
    let status = read_trim(&proc.join("self/status")).unwrap_or_default();
    let mut out = Vec::new();
    for l in status.lines() {
        if let Some(v) = l.strip_prefix("Groups:").or_else(|| l.strip_prefix("Gid:")) {
            out.extend(v.split_whitespace().filter_map(|g| g.parse::<u64>().ok()));
        }
    }
    out
}

/// Whether io_uring is allowed (`kernel.io_uring_disabled`, Linux 6.6).
/// `needed`: whether the device's kind pins through io_uring (`None`: no
/// device given).
pub fn io_uring(host: &Host, needed: Option<bool>) -> Check {
    let value = read_trim(&host.proc.join("sys/kernel/io_uring_disabled"));
    let found = match value.as_deref() {
        None => Ok("allowed (no kernel.io_uring_disabled: before Linux 6.6)".to_string()),
        Some("0") => Ok("allowed (kernel.io_uring_disabled = 0)".to_string()),
        Some("1") => {
            let caps = cap_eff(&host.proc);
            let group = read_trim(&host.proc.join("sys/kernel/io_uring_group"))
                .and_then(|g| g.parse::<i64>().ok());
            let in_group = group
                .and_then(|g| u64::try_from(g).ok())
                .is_some_and(|g| gids(&host.proc).contains(&g));
            if caps & (1 << CAP_SYS_ADMIN) != 0 {
                Ok("restricted (kernel.io_uring_disabled = 1), allowed with CAP_SYS_ADMIN".into())
            } else if in_group {
                Ok(
                    "restricted (kernel.io_uring_disabled = 1), allowed: in kernel.io_uring_group"
                        .into(),
                )
            } else {
                Err((
                    "restricted (kernel.io_uring_disabled = 1) and this process has neither \
                     CAP_SYS_ADMIN nor kernel.io_uring_group"
                        .to_string(),
                    "`sysctl -w kernel.io_uring_disabled=0`, or add the user to the group \
                     in kernel.io_uring_group",
                ))
            }
        }
        Some(v) => Err((
            format!("disabled (kernel.io_uring_disabled = {v})"),
            "`sysctl -w kernel.io_uring_disabled=0` (or 1 with kernel.io_uring_group)",
        )),
    };
    match (found, needed) {
        (r, Some(false)) => info(
            "io_uring",
            format!(
                "not needed for this device (VFIO's MAP_DMA pins); {}",
                match r {
                    Ok(d) | Err((d, _)) => d,
                }
            ),
        ),
        (Ok(d), _) => ok("io_uring", d),
        (Err((d, fix)), Some(true)) => fail("io_uring", d, fix),
        (Err((d, fix)), None) => fail(
            "io_uring",
            format!("{d}; mdev and no-IOMMU devices need it"),
            fix,
        ),
    }
}

/// Whether automatic NUMA balancing is on: information, since it is what
/// moves unpinned memory and what numapin's pins withstand.
pub fn numa_balancing(host: &Host) -> Check {
    let what = match read_trim(&host.proc.join("sys/kernel/numa_balancing")).as_deref() {
        None => "not in this kernel (no kernel.numa_balancing)".to_string(),
        Some("0") => "off (kernel.numa_balancing = 0)".to_string(),
        Some(v) => format!(
            "on (kernel.numa_balancing = {v}): the kernel moves unpinned pages toward the CPUs \
             that touch them, so their physical addresses change; pinned regions stay"
        ),
    };
    info("numa-balancing", what)
}

/// RLIMIT_MEMLOCK's soft limit (`None`: unlimited).
fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct passed.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_cur)
    }
}

/// Runs every check.
pub fn run(host: &Host, device: Option<&str>, regs: &[RegionArg]) -> Result<Report> {
    let topo = Topology::read()?;
    let (group, kind) = group(device);
    let needed: Option<u64> = (!regs.is_empty()).then(|| regs.iter().map(|r| r.req.size).sum());
    let checks = vec![
        iommu(host),
        vfio_pci(host, kind),
        group,
        region_shapes(&topo, regs),
        memlock(
            memlock_limit(),
            cap_eff(&host.proc) & (1 << CAP_IPC_LOCK) != 0,
            needed,
        ),
        hugepages(&topo, regs),
        io_uring(host, kind.map(|k| k != ContainerKind::Type1Iommu)),
        numa_balancing(host),
    ];
    Ok(Report {
        ok: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    })
}

/// The table.
pub fn print(r: &Report) {
    println!("{:<15} {:<6} detail", "check", "status");
    for c in &r.checks {
        let st = match c.status {
            Status::Ok => "ok",
            Status::Fail => "FAIL",
            Status::Info => "info",
        };
        println!("{:<15} {:<6} {}", c.check, st, c.detail);
        if let Some(f) = &c.fix {
            println!("{:<15} {:<6} fix: {f}", "", "");
        }
    }
}

/// The error `check` exits with when something failed.
pub fn failure(r: &Report) -> Option<Error> {
    let failed: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.check)
        .collect();
    (!failed.is_empty()).then(|| Error::ChecksFailed {
        failed: failed.iter().map(|c| c.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().unwrap();
        let h = Host {
            sys: tmp.path().join("sys"),
            proc: tmp.path().join("proc"),
        };
        (tmp, h)
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn iommu_on_off_and_noiommu() {
        let (_t, h) = host();
        let c = iommu(&h);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("intel_iommu=on"));
        write(
            &h.sys
                .join("module/vfio/parameters/enable_unsafe_noiommu_mode"),
            "Y\n",
        );
        let c = iommu(&h);
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.contains("no-IOMMU mode is on"), "{}", c.detail);
        std::fs::create_dir_all(h.sys.join("class/iommu/dmar0")).unwrap();
        let c = iommu(&h);
        assert_eq!((c.status, c.detail.as_str()), (Status::Ok, "on (dmar0)"));
    }

    #[test]
    fn vfio_pci_missing_fails_unless_mdev() {
        let (_t, h) = host();
        assert_eq!(vfio_pci(&h, None).status, Status::Fail);
        assert_eq!(
            vfio_pci(&h, Some(ContainerKind::MdevOnly)).status,
            Status::Info
        );
        std::fs::create_dir_all(h.sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        assert_eq!(vfio_pci(&h, None).status, Status::Ok);
    }

    #[test]
    fn memlock_compares_the_limit_with_the_regions() {
        assert_eq!(
            memlock(Some(8 << 20), false, Some(8 << 20)).status,
            Status::Ok
        );
        let c = memlock(Some(8 << 20), false, Some(9 << 20));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("is 8 MiB but the regions pin 9 MiB"),
            "{}",
            c.detail
        );
        assert!(c.fix.unwrap().contains("ulimit -l 9216"));
        assert_eq!(memlock(Some(0), true, Some(1 << 30)).status, Status::Ok);
        assert_eq!(memlock(None, false, Some(1 << 40)).status, Status::Ok);
        assert_eq!(memlock(Some(0), false, None).status, Status::Info);
    }

    #[test]
    fn io_uring_sysctl_values() {
        let (_t, h) = host();
        assert_eq!(io_uring(&h, Some(true)).status, Status::Ok);
        write(&h.proc.join("sys/kernel/io_uring_disabled"), "2\n");
        let c = io_uring(&h, Some(true));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("io_uring_disabled=0"));
        // Not needed for type1: only information.
        assert_eq!(io_uring(&h, Some(false)).status, Status::Info);
        write(&h.proc.join("sys/kernel/io_uring_disabled"), "1\n");
        write(&h.proc.join("sys/kernel/io_uring_group"), "-1\n");
        write(
            &h.proc.join("self/status"),
            "Gid:\t1000\t1000\t1000\t1000\nGroups:\t27 1000\nCapEff:\t0000000000000000\n",
        );
        assert_eq!(io_uring(&h, Some(true)).status, Status::Fail);
        write(&h.proc.join("sys/kernel/io_uring_group"), "27\n");
        assert_eq!(io_uring(&h, Some(true)).status, Status::Ok);
        write(&h.proc.join("sys/kernel/io_uring_group"), "-1\n");
        write(
            &h.proc.join("self/status"),
            "Gid:\t0\t0\t0\t0\nGroups:\nCapEff:\t000001ffffffffff\n",
        );
        assert_eq!(io_uring(&h, Some(true)).status, Status::Ok);
    }

    #[test]
    fn numa_balancing_is_information() {
        let (_t, h) = host();
        write(&h.proc.join("sys/kernel/numa_balancing"), "1\n");
        let c = numa_balancing(&h);
        assert_eq!(c.status, Status::Info);
        assert!(
            c.detail.starts_with("on (kernel.numa_balancing = 1)"),
            "{}",
            c.detail
        );
        write(&h.proc.join("sys/kernel/numa_balancing"), "0\n");
        assert!(numa_balancing(&h).detail.starts_with("off"));
    }

    #[test]
    fn a_failure_names_the_failed_checks() {
        let r = Report {
            ok: false,
            checks: vec![
                ok("iommu", "on"),
                fail("memlock", "low", "raise it"),
                fail("io_uring", "off", "turn on"),
            ],
        };
        let e = failure(&r).unwrap().to_string();
        assert_eq!(
            e,
            "2 checks failed (memlock, io_uring); apply the fixes shown with them"
        );
        assert!(
            failure(&Report {
                ok: true,
                checks: vec![ok("iommu", "on")]
            })
            .is_none()
        );
    }
}
