//! Binding a PCI device to vfio-pci through `driver_override`, and giving it
//! back to the driver it had, without doing harm.
//!
//! Before anything is written, [`bind`] looks at what the host uses the device
//! for and refuses a device in use ([`InUse`]: a network interface that is up
//! or carries routes, a block device that is mounted, held by another block
//! device or used as swap, the boot display) unless forced. It lists the other
//! members of the device's IOMMU group and what binding means for them. Every
//! change is a [`Step`], planned first: a dry run returns the plan without
//! writing. If a step fails, or vfio-pci does not take the device, the device
//! is rolled back to the driver (and `driver_override`) it had.
//!
//! The previous driver is remembered in `/run/numapin/bound/<BDF>` so that
//! [`unbind`] can restore it, even from another process.
//!
//! Every path is taken relative to a [`Roots`] (`/sys`, `/proc`, the state
//! directory), so the checks and the rollback run on a fake tree in tests.

use std::fmt;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

mod apply;
mod in_use;

use apply::{Apply, Files, execute};
pub use in_use::InUse;
use in_use::{holders, refuse_in_use, uses};

const VFIO_PCI: &str = "vfio-pci";

/// Where [`bind`] and [`unbind`] look and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
    /// Where the previous driver of each bound device is remembered
    /// (`/run/numapin/bound`).
    pub state: PathBuf,
}

impl Roots {
    /// The running system: `/sys`, `/proc`, `/run/numapin/bound`.
    pub fn system() -> Roots {
        Roots {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            state: PathBuf::from("/run/numapin/bound"),
        }
    }

    fn pci_devices(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    fn driver_dir(&self, driver: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(driver)
    }
}

/// How [`bind_with`] and [`unbind_with`] proceed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Go ahead although the device is in use.
    pub force: bool,
    /// Plan and check, but write nothing.
    pub dry_run: bool,
}

/// One change to the system, in the order it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Step {
    /// Write `value` to a sysfs attribute.
    Write {
        /// The attribute.
        path: PathBuf,
        /// What is written (a newline alone clears `driver_override`).
        value: String,
    },
    /// Remember `driver` as the driver to give the device back to.
    Record {
        /// The state file.
        path: PathBuf,
        /// The driver.
        driver: String,
    },
    /// Forget the remembered driver.
    Forget {
        /// The state file.
        path: PathBuf,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Write { path, value } => {
                let v = value.trim_end_matches('\n');
                if v.is_empty() {
                    write!(f, "write a newline (clears it) to {}", path.display())
                } else {
                    write!(f, "write `{v}` to {}", path.display())
                }
            }
            Step::Record { path, driver } => {
                write!(f, "record `{driver}` in {}", path.display())
            }
            Step::Forget { path } => write!(f, "remove {}", path.display()),
        }
    }
}

/// Another device of the same IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Its PCI address (or name).
    pub device: String,
    /// Its driver.
    pub driver: Option<String>,
    /// What binding the device means for this member.
    pub effect: String,
}

/// What [`bind`] or [`unbind`] did, or, for a dry run, would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindReport {
    /// The PCI address.
    pub device: String,
    /// Driver before the call.
    pub previous: Option<String>,
    /// Driver after the call (for a dry run: the driver it would have).
    pub current: Option<String>,
    /// Nothing was written.
    pub dry_run: bool,
    /// The changes made (or planned), in order.
    pub steps: Vec<Step>,
    /// Uses of the device found (non-empty only with `force`).
    pub in_use: Vec<InUse>,
    /// The device's IOMMU group, if it has one.
    pub group: Option<u32>,
    /// The other devices of the group.
    pub members: Vec<Member>,
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The driver a device is bound to.
fn driver(dev: &Path) -> Option<String> {
    link_name(&dev.join("driver"))
}

/// `driver_override`, `None` when unset (`(null)`).
fn driver_override(dev: &Path) -> Option<String> {
    read_trim(&dev.join("driver_override")).filter(|s| !s.is_empty() && s != "(null)")
}

/// A PCI device in sysfs.
struct Device {
    name: String,
    /// `bus/pci/devices/<BDF>` (a link in real sysfs).
    dir: PathBuf,
    /// Where the link points: the device in the `devices/` hierarchy.
    real: PathBuf,
}

fn pci_device(roots: &Roots, spec: &str) -> Result<Device> {
    let name = match Path::new(spec).file_name() {
        Some(n) if spec.starts_with('/') => n.to_string_lossy().into_owned(),
        _ if spec.matches(':').count() == 1 => format!("0000:{spec}"),
        _ => spec.to_string(),
    };
    let dir = roots.pci_devices().join(&name);
    if !dir.exists() {
        return Err(Error::DeviceNotFound {
            spec: spec.to_string(),
            path: dir,
        });
    }
    if !dir.join("driver_override").exists() {
        return Err(Error::Invalid(format!(
            "{} is not a PCI device with driver_override (Linux 3.16 or later); bind and unbind \
             take a PCI address such as 0000:3b:00.0 (see `lspci -D`)",
            dir.display()
        )));
    }
    let real = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    Ok(Device { name, dir, real })
}

/// The device's IOMMU group number.
fn group_of(dev: &Device) -> Option<u32> {
    link_name(&dev.dir.join("iommu_group")).and_then(|n| n.parse().ok())
}

/// What binding `dev` to vfio-pci means for a group member on `driver`.
fn member_effect(dev: &str, member: &str, driver: Option<&str>) -> String {
    let shared = "shares the IOMMU context: memory mapped for one is reachable by both";
    match driver {
        None => format!("no driver: VFIO accepts it; it {shared}"),
        Some(d) if d.contains("vfio") => format!("on {d}: VFIO accepts it; it {shared}"),
        Some("pci-stub") => format!("on pci-stub: VFIO accepts it; it {shared}"),
        Some("pcieport") => "a PCIe port (bridge) on pcieport: VFIO accepts it and it stays".into(),
        Some(d) => format!(
            "stays on {d}; while it does, the group is not viable and {dev} cannot be opened: \
             bind it too (`numapin bind {member}`), which takes it from the host"
        ),
    }
}

fn members(roots: &Roots, dev: &Device, group: Option<u32>) -> Vec<Member> {
    let Some(g) = group else {
        return Vec::new();
    };
    let dir = roots.sys.join(format!("kernel/iommu_groups/{g}/devices"));
    let mut out: Vec<Member> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy() != dev.name)
        .map(|e| {
            let device = e.file_name().to_string_lossy().into_owned();
            let driver = driver(&e.path());
            Member {
                effect: member_effect(&dev.name, &device, driver.as_deref()),
                device,
                driver,
            }
        })
        .collect();
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

fn noiommu_mode(roots: &Roots) -> bool {
    matches!(
        read_trim(
            &roots
                .sys
                .join("module/vfio/parameters/enable_unsafe_noiommu_mode")
        )
        .as_deref(),
        Some("Y") | Some("1")
    )
}

fn driver_name(d: &Option<String>) -> &str {
    d.as_deref().unwrap_or("no driver")
}

/// Binds `spec` (a PCI address) to vfio-pci on the running system; see
/// [`bind_with`].
pub fn bind(spec: &str) -> Result<BindReport> {
    bind_with(&Roots::system(), spec, Options::default())
}

/// Binds `spec` (a PCI address such as `0000:3b:00.0`) to vfio-pci: records
/// its driver, sets `driver_override`, unbinds the driver and reprobes.
/// Binding a device that is already on vfio-pci changes nothing.
///
/// # Errors
/// [`Error::DeviceNotFound`]; [`Error::NoIommuGroup`] for a device without a
/// group when VFIO's no-IOMMU mode is off; [`Error::DeviceInUse`] when the
/// host uses the device (without `force`); [`Error::Invalid`] when vfio-pci
/// is not loaded or a step failed (the message says how the rollback ended).
pub fn bind_with(roots: &Roots, spec: &str, opts: Options) -> Result<BindReport> {
    bind_on(roots, spec, opts, &mut Files)
}

fn bind_on(roots: &Roots, spec: &str, opts: Options, w: &mut dyn Apply) -> Result<BindReport> {
    let dev = pci_device(roots, spec)?;
    let previous = driver(&dev.dir);
    let group = group_of(&dev);
    let mut report = BindReport {
        device: dev.name.clone(),
        previous: previous.clone(),
        current: previous.clone(),
        dry_run: opts.dry_run,
        steps: Vec::new(),
        in_use: Vec::new(),
        group,
        members: members(roots, &dev, group),
    };
    if previous.as_deref() == Some(VFIO_PCI) {
        return Ok(report);
    }
    if !roots.driver_dir(VFIO_PCI).exists() {
        return Err(Error::Invalid(
            "the vfio-pci driver is not loaded; load it with `modprobe vfio-pci`".into(),
        ));
    }
    if group.is_none() && !noiommu_mode(roots) {
        return Err(Error::NoIommuGroup {
            device: dev.name.clone(),
        });
    }
    if previous.is_some() {
        report.in_use = uses(roots, &dev);
        if !report.in_use.is_empty() && !opts.force {
            return Err(refuse_in_use(
                &dev.name,
                format!(
                    "unbinding {} would take it from its users",
                    driver_name(&previous)
                ),
                &report.in_use,
                0,
            ));
        }
    }
    let state = roots.state.join(&dev.name);
    if let Some(prev) = &previous {
        report.steps.push(Step::Record {
            path: state.clone(),
            driver: prev.clone(),
        });
    }
    // The override first: from then on only vfio-pci can take the device,
    // even if something reprobes it between the steps.
    report.steps.push(Step::Write {
        path: dev.dir.join("driver_override"),
        value: VFIO_PCI.into(),
    });
    if let Some(prev) = &previous {
        report.steps.push(Step::Write {
            path: roots.driver_dir(prev).join("unbind"),
            value: dev.name.clone(),
        });
    }
    report.steps.push(Step::Write {
        path: roots.sys.join("bus/pci/drivers_probe"),
        value: dev.name.clone(),
    });
    report.current = Some(VFIO_PCI.into());
    if opts.dry_run {
        return Ok(report);
    }
    let verify = |d: &Device| match driver(&d.dir) {
        Some(now) if now == VFIO_PCI => Ok(()),
        now => Err(format!(
            "vfio-pci did not take it (it is on {}; the device may lack an IOMMU group: boot \
             with intel_iommu=on)",
            driver_name(&now)
        )),
    };
    execute(roots, &dev, "binding", &report.steps, &state, verify, w)?;
    report.current = driver(&dev.dir);
    Ok(report)
}

/// Who holds `spec`'s VFIO group or cdev open, as [`unbind_with`] checks
/// before writing, and how many processes' open files numapin could not
/// read. For a `--wait` that polls before writing.
///
/// # Errors
/// [`Error::DeviceNotFound`] and the errors of finding the device.
pub fn unbind_holders(roots: &Roots, spec: &str) -> Result<(Vec<InUse>, usize)> {
    let dev = pci_device(roots, spec)?;
    let group = group_of(&dev);
    Ok(holders(roots, &dev, group))
}

/// Gives `spec` back on the running system; see [`unbind_with`].
pub fn unbind(spec: &str) -> Result<BindReport> {
    unbind_with(&Roots::system(), spec, Options::default())
}

/// Unbinds `spec` from vfio-pci, clears `driver_override`, and rebinds the
/// driver it had before [`bind`] (or lets the kernel probe one). Refuses
/// (unless forced) while a process holds the device's VFIO group open, since
/// the kernel would block the unbind until that process let go.
///
/// # Errors
/// [`Error::DeviceNotFound`]; [`Error::DeviceInUse`] when a process holds
/// it open, or numapin cannot read every process's open files (without
/// `force`); [`Error::Invalid`] when the device is not on vfio-pci or a
/// step failed.
pub fn unbind_with(roots: &Roots, spec: &str, opts: Options) -> Result<BindReport> {
    unbind_on(roots, spec, opts, &mut Files)
}

fn unbind_on(roots: &Roots, spec: &str, opts: Options, w: &mut dyn Apply) -> Result<BindReport> {
    let dev = pci_device(roots, spec)?;
    let previous = driver(&dev.dir);
    if previous.as_deref() != Some(VFIO_PCI) {
        return Err(Error::Invalid(format!(
            "{} is not bound to vfio-pci (it is on {}); nothing to unbind",
            dev.name,
            driver_name(&previous)
        )));
    }
    let group = group_of(&dev);
    let mut report = BindReport {
        device: dev.name.clone(),
        previous: previous.clone(),
        current: previous.clone(),
        dry_run: opts.dry_run,
        steps: Vec::new(),
        in_use: Vec::new(),
        group,
        members: members(roots, &dev, group),
    };
    // Before any write: the kernel's unbind waits, uninterruptibly after a
    // first signal, until every open fd of the device is closed.
    let (held, unseen) = holders(roots, &dev, group);
    report.in_use = held;
    if (!report.in_use.is_empty() || unseen > 0) && !opts.force {
        return Err(refuse_in_use(
            &dev.name,
            "unbinding vfio-pci now would block in the kernel until every holder closes the device"
                .into(),
            &report.in_use,
            unseen,
        ));
    }
    let state = roots.state.join(&dev.name);
    let recorded = read_trim(&state).filter(|s| !s.is_empty());
    report.steps.push(Step::Write {
        path: roots.driver_dir(VFIO_PCI).join("unbind"),
        value: dev.name.clone(),
    });
    report.steps.push(Step::Write {
        path: dev.dir.join("driver_override"),
        value: "\n".into(),
    });
    match &recorded {
        Some(prev) => report.steps.push(Step::Write {
            path: roots.driver_dir(prev).join("bind"),
            value: dev.name.clone(),
        }),
        // No driver recorded: let the kernel pick one, if any matches.
        None => report.steps.push(Step::Write {
            path: roots.sys.join("bus/pci/drivers_probe"),
            value: dev.name.clone(),
        }),
    }
    if state.exists() {
        report.steps.push(Step::Forget {
            path: state.clone(),
        });
    }
    report.current = recorded.clone();
    if opts.dry_run {
        return Ok(report);
    }
    let verify = |d: &Device| match (&recorded, driver(&d.dir)) {
        (Some(want), now) if now.as_deref() != Some(want.as_str()) => Err(format!(
            "{want} did not take it back (it is on {})",
            driver_name(&now)
        )),
        _ => Ok(()),
    };
    // Rolling back here means back to vfio-pci, so the record is forgotten
    // only once the device is back on its driver.
    let (main, forget) = match report.steps.split_last() {
        Some((last @ Step::Forget { .. }, rest)) => (rest, Some(last)),
        _ => (&report.steps[..], None),
    };
    execute(roots, &dev, "unbinding", main, Path::new(""), verify, w)?;
    if let Some(f) = forget {
        w.apply(f).map_err(|e| {
            Error::sys(
                f.to_string(),
                "remove it by hand; the device is back on its driver",
                e,
            )
        })?;
    }
    report.current = driver(&dev.dir);
    Ok(report)
}

#[cfg(test)]
mod tests {
    //! A fake sysfs/procfs tree in a temporary directory, laid out as the
    //! kernel lays it out (devices under `devices/`, `bus/` and `class/`
    //! entries as links), and a fake kernel that reacts to the writes the
    //! way the PCI core does: `unbind` drops the `driver` link, `bind` and
    //! `drivers_probe` create it while respecting `driver_override`.

    use super::*;
    use std::io;
    use std::os::unix::fs::symlink;

    const BDF: &str = "0000:3b:00.0";

    struct Tree {
        _tmp: tempfile::TempDir,
        roots: Roots,
    }

    impl Tree {
        fn sys(&self, rel: &str) -> PathBuf {
            self.roots.sys.join(rel)
        }
        fn proc_(&self, rel: &str) -> PathBuf {
            self.roots.proc.join(rel)
        }
        fn dev_real(&self, bdf: &str) -> PathBuf {
            self.sys(&format!("devices/pci0000:00/{bdf}"))
        }
        fn dev(&self, bdf: &str) -> PathBuf {
            self.sys(&format!("bus/pci/devices/{bdf}"))
        }
        fn write(&self, path: &Path, text: &str) {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        fn driver_dir(&self, drv: &str) {
            std::fs::create_dir_all(self.sys(&format!("bus/pci/drivers/{drv}"))).unwrap();
        }
        /// A PCI device on `drv`, in IOMMU group `group`.
        fn pci(&self, bdf: &str, drv: Option<&str>, group: Option<u32>) {
            let real = self.dev_real(bdf);
            std::fs::create_dir_all(&real).unwrap();
            self.write(&real.join("driver_override"), "(null)\n");
            std::fs::create_dir_all(self.sys("bus/pci/devices")).unwrap();
            symlink(&real, self.dev(bdf)).unwrap();
            if let Some(d) = drv {
                self.driver_dir(d);
                symlink(
                    self.sys(&format!("bus/pci/drivers/{d}")),
                    real.join("driver"),
                )
                .unwrap();
            }
            if let Some(g) = group {
                let gdir = self.sys(&format!("kernel/iommu_groups/{g}/devices"));
                std::fs::create_dir_all(&gdir).unwrap();
                symlink(&real, gdir.join(bdf)).unwrap();
                symlink(gdir.parent().unwrap(), real.join("iommu_group")).unwrap();
            }
        }
        /// A network interface of `bdf`, as virtio-net nests it.
        fn iface(&self, bdf: &str, name: &str, operstate: &str, flags: &str) {
            let dir = self.dev_real(bdf).join(format!("virtio0/net/{name}"));
            self.write(&dir.join("operstate"), operstate);
            self.write(&dir.join("flags"), flags);
            std::fs::create_dir_all(self.sys("class/net")).unwrap();
            symlink(&dir, self.sys(&format!("class/net/{name}"))).unwrap();
        }
        /// A block device of `bdf` (NVMe layout), with `maj:min`.
        fn disk(&self, bdf: &str, rel: &str, majmin: &str) -> PathBuf {
            let dir = self.dev_real(bdf).join(rel);
            self.write(&dir.join("dev"), majmin);
            std::fs::create_dir_all(dir.join("holders")).unwrap();
            std::fs::create_dir_all(self.sys("class/block")).unwrap();
            let name = dir.file_name().unwrap().to_owned();
            symlink(&dir, self.sys("class/block").join(name)).unwrap();
            dir
        }
        fn driver_of(&self, bdf: &str) -> Option<String> {
            driver(&self.dev(bdf))
        }
        fn override_of(&self, bdf: &str) -> Option<String> {
            driver_override(&self.dev(bdf))
        }
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            sys: tmp.path().join("sys"),
            proc: tmp.path().join("proc"),
            state: tmp.path().join("run/numapin/bound"),
        };
        let t = Tree { _tmp: tmp, roots };
        t.driver_dir(VFIO_PCI);
        t.write(&t.sys("bus/pci/drivers_probe"), "");
        t.write(&t.proc_("net/route"), "Iface\tDestination\tGateway\n");
        t.write(&t.proc_("self/mountinfo"), "");
        t.write(&t.proc_("swaps"), "Filename\tType\tSize\tUsed\tPriority\n");
        t
    }

    /// The PCI core, as far as binding goes. `fail_at`: the write (0-based,
    /// rollback writes included) that fails with EIO. `vfio_refuses`: vfio-pci's
    /// probe fails (as without an IOMMU group).
    struct FakeKernel {
        sys: PathBuf,
        writes: Vec<Step>,
        fail_at: Option<usize>,
        vfio_refuses: bool,
    }

    impl FakeKernel {
        fn new(t: &Tree) -> FakeKernel {
            FakeKernel {
                sys: t.roots.sys.clone(),
                writes: Vec::new(),
                fail_at: None,
                vfio_refuses: false,
            }
        }
        fn dev(&self, bdf: &str) -> PathBuf {
            self.sys.join("bus/pci/devices").join(bdf)
        }
        fn attach(&self, bdf: &str, drv: &str) -> io::Result<()> {
            let dev = self.dev(bdf);
            if dev.join("driver").exists() {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            let ov = driver_override(&dev);
            if ov.as_deref().is_some_and(|o| o != drv) || (drv == VFIO_PCI && self.vfio_refuses) {
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            symlink(
                self.sys.join("bus/pci/drivers").join(drv),
                dev.join("driver"),
            )
        }
    }

    impl Apply for FakeKernel {
        fn apply(&mut self, step: &Step) -> io::Result<()> {
            let n = self.writes.len();
            self.writes.push(step.clone());
            if self.fail_at == Some(n) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let Step::Write { path, value } = step else {
                return Files.apply(step);
            };
            let file = path.file_name().unwrap().to_str().unwrap();
            let parent = path.parent().unwrap();
            let bdf = value.trim();
            match file {
                "driver_override" => {
                    let v = value.trim();
                    std::fs::write(path, if v.is_empty() { "(null)\n" } else { v })
                }
                "unbind" => {
                    let drv = parent.file_name().unwrap().to_str().unwrap();
                    if driver(&self.dev(bdf)).as_deref() != Some(drv) {
                        return Err(io::Error::from_raw_os_error(libc::ENODEV));
                    }
                    std::fs::remove_file(self.dev(bdf).join("driver"))
                }
                "bind" => {
                    let drv = parent.file_name().unwrap().to_str().unwrap();
                    self.attach(bdf, drv)
                }
                "drivers_probe" => {
                    // Only the override matters here: no other driver of
                    // the fake matches by id.
                    match driver_override(&self.dev(bdf)) {
                        Some(o) => self.attach(bdf, &o).or(Ok(())),
                        None => Ok(()),
                    }
                }
                other => panic!("unexpected write to {other}"),
            }
        }
    }

    fn force() -> Options {
        Options {
            force: true,
            dry_run: false,
        }
    }

    #[test]
    fn binds_records_and_unbinds_back() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        let mut k = FakeKernel::new(&t);
        let r = bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
        assert_eq!(r.previous.as_deref(), Some("ixgbe"));
        assert_eq!(t.driver_of(BDF).as_deref(), Some(VFIO_PCI));
        assert_eq!(r.current.as_deref(), Some(VFIO_PCI));
        assert_eq!(
            std::fs::read_to_string(t.roots.state.join(BDF)).unwrap(),
            "ixgbe"
        );
        assert_eq!(k.writes, r.steps);
        // Binding again changes nothing.
        let again = bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
        assert!(again.steps.is_empty());
        let u = unbind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
        assert_eq!(u.current.as_deref(), Some("ixgbe"));
        assert_eq!(t.driver_of(BDF).as_deref(), Some("ixgbe"));
        assert_eq!(t.override_of(BDF), None);
        assert!(!t.roots.state.join(BDF).exists());
    }

    #[test]
    fn dry_run_lists_every_write_in_order_and_writes_nothing() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        let mut k = FakeKernel::new(&t);
        let opts = Options {
            force: false,
            dry_run: true,
        };
        let r = bind_on(&t.roots, BDF, opts, &mut k).unwrap();
        let want = vec![
            Step::Record {
                path: t.roots.state.join(BDF),
                driver: "ixgbe".into(),
            },
            Step::Write {
                path: t.dev(BDF).join("driver_override"),
                value: "vfio-pci".into(),
            },
            Step::Write {
                path: t.sys("bus/pci/drivers/ixgbe/unbind"),
                value: BDF.into(),
            },
            Step::Write {
                path: t.sys("bus/pci/drivers_probe"),
                value: BDF.into(),
            },
        ];
        assert_eq!(r.steps, want);
        assert!(k.writes.is_empty());
        assert_eq!(t.driver_of(BDF).as_deref(), Some("ixgbe"));
        assert_eq!(t.override_of(BDF), None);
        assert!(!t.roots.state.exists());
        assert_eq!(r.current.as_deref(), Some(VFIO_PCI));
    }

    #[test]
    fn an_interface_that_is_up_or_routed_is_refused_unless_forced() {
        for (operstate, flags, routed) in [("up", "0x1003", false), ("down", "0x1002", true)] {
            let t = tree();
            t.pci(BDF, Some("virtio-pci"), Some(3));
            t.iface(BDF, "ens3", operstate, flags);
            if routed {
                t.write(
                    &t.proc_("net/route"),
                    "Iface\tDestination\tGateway\nens3\t00000000\t0102A8C0\nlo\t0000007F\t0\n",
                );
            }
            let mut k = FakeKernel::new(&t);
            let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
                .unwrap_err()
                .to_string();
            let why = if routed {
                "1 route goes through ens3"
            } else {
                "network interface ens3 is up"
            };
            assert!(e.contains(why), "{e}");
            assert!(e.contains("--force"), "{e}");
            assert!(k.writes.is_empty(), "refusal wrote {:?}", k.writes);
            assert_eq!(t.driver_of(BDF).as_deref(), Some("virtio-pci"));
            let r = bind_on(&t.roots, BDF, force(), &mut k).unwrap();
            assert_eq!(r.in_use.len(), 1, "{:?}", r.in_use);
            assert_eq!(t.driver_of(BDF).as_deref(), Some(VFIO_PCI));
        }
    }

    #[test]
    fn an_idle_interface_is_not_in_use() {
        let t = tree();
        t.pci(BDF, Some("virtio-pci"), Some(3));
        t.iface(BDF, "ens3", "down", "0x1002");
        t.write(
            &t.proc_("net/route"),
            "Iface\tDestination\tGateway\neth9\t00000000\t0102A8C0\n",
        );
        let mut k = FakeKernel::new(&t);
        let r = bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
        assert!(r.in_use.is_empty(), "{:?}", r.in_use);
    }

    #[test]
    fn mounted_held_and_swap_block_devices_are_in_use() {
        let t = tree();
        t.pci(BDF, Some("nvme"), Some(5));
        let disk = t.disk(BDF, "nvme/nvme0/nvme0n1", "259:0");
        t.disk(BDF, "nvme/nvme0/nvme0n1/nvme0n1p1", "259:1");
        t.disk(BDF, "nvme/nvme0/nvme0n1/nvme0n1p2", "259:2");
        t.disk(BDF, "nvme/nvme0/nvme0n1/nvme0n1p3", "259:3");
        // Another controller's disk, mounted: not this device's business.
        t.pci("0000:00:17.0", Some("ahci"), Some(6));
        t.disk("0000:00:17.0", "ata1/host0/block/sda", "8:0");
        t.write(
            &t.proc_("self/mountinfo"),
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n\
             23 1 8:0 / /data rw - ext4 /dev/sda rw\n",
        );
        t.write(
            &t.proc_("swaps"),
            "Filename\tType\tSize\tUsed\tPriority\n/dev/nvme0n1p2 partition 1024 0 -2\n",
        );
        std::fs::create_dir_all(disk.join("nvme0n1p3/holders/dm-0")).unwrap();
        let mut k = FakeKernel::new(&t);
        let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        for want in [
            "block device nvme0n1p1 is mounted at /",
            "block device nvme0n1p2 is active swap",
            "block device nvme0n1p3 is held by dm-0",
        ] {
            assert!(e.contains(want), "lacks `{want}`: {e}");
        }
        assert!(!e.contains("sda"), "{e}");
        assert!(k.writes.is_empty());
        // The other controller has its own disk mounted, and only that.
        let e = bind_on(&t.roots, "00:17.0", Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block device sda is mounted at /data"), "{e}");
        assert!(!e.contains("nvme"), "{e}");
    }

    #[test]
    fn a_btrfs_style_mount_is_found_by_its_source() {
        let t = tree();
        t.pci(BDF, Some("nvme"), Some(5));
        t.disk(BDF, "nvme/nvme0/nvme0n1", "259:0");
        // btrfs reports an anonymous device number; the source names the disk.
        t.write(
            &t.proc_("self/mountinfo"),
            "30 1 0:35 / /home rw shared:2 - btrfs /dev/nvme0n1 rw\n",
        );
        let e = bind_on(&t.roots, BDF, Options::default(), &mut FakeKernel::new(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvme0n1 is mounted at /home"), "{e}");
    }

    #[test]
    fn the_boot_display_is_refused() {
        let t = tree();
        t.pci(BDF, Some("amdgpu"), Some(9));
        t.write(&t.dev_real(BDF).join("boot_vga"), "1\n");
        let e = bind_on(&t.roots, BDF, Options::default(), &mut FakeKernel::new(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("it is the boot display (boot_vga = 1)"), "{e}");
        t.write(&t.dev_real(BDF).join("boot_vga"), "0\n");
        bind_on(&t.roots, BDF, Options::default(), &mut FakeKernel::new(&t)).unwrap();
    }

    #[test]
    fn group_members_are_listed_with_what_binding_means() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        t.pci("0000:3b:00.1", Some("ixgbe"), Some(12));
        t.pci("0000:3a:00.0", Some("pcieport"), Some(12));
        t.pci("0000:3b:00.2", None, Some(12));
        t.pci("0000:5e:00.0", Some("nvme"), Some(13));
        let opts = Options {
            force: false,
            dry_run: true,
        };
        let r = bind_on(&t.roots, BDF, opts, &mut FakeKernel::new(&t)).unwrap();
        let names: Vec<&str> = r.members.iter().map(|m| m.device.as_str()).collect();
        assert_eq!(names, ["0000:3a:00.0", "0000:3b:00.1", "0000:3b:00.2"]);
        assert!(r.members[0].effect.contains("VFIO accepts it"));
        let m = &r.members[1];
        assert_eq!(m.driver.as_deref(), Some("ixgbe"));
        assert!(
            m.effect.contains("not viable") && m.effect.contains("numapin bind 0000:3b:00.1"),
            "{}",
            m.effect
        );
        assert!(r.members[2].effect.starts_with("no driver"));
        assert_eq!(r.group, Some(12));
    }

    #[test]
    fn every_failing_step_rolls_back_to_the_previous_driver() {
        // Fail each of the four bind writes in turn: the device must end on
        // its driver with no override and no record.
        for fail in 0..4 {
            let t = tree();
            t.pci(BDF, Some("ixgbe"), Some(12));
            let mut k = FakeKernel::new(&t);
            k.fail_at = Some(fail);
            let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("rolled back, it is on ixgbe again"),
                "step {fail}: {e}"
            );
            assert_eq!(t.driver_of(BDF).as_deref(), Some("ixgbe"), "step {fail}");
            assert_eq!(t.override_of(BDF), None, "step {fail}");
            assert!(!t.roots.state.join(BDF).exists(), "step {fail}");
        }
    }

    #[test]
    fn vfio_refusing_the_device_rolls_back() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        let mut k = FakeKernel::new(&t);
        k.vfio_refuses = true;
        let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vfio-pci did not take it"), "{e}");
        assert!(e.contains("on ixgbe again"), "{e}");
        assert_eq!(t.driver_of(BDF).as_deref(), Some("ixgbe"));
        assert_eq!(t.override_of(BDF), None);
        // The rollback cleared the override before binding ixgbe: the other
        // order fails in the kernel (driver_override names vfio-pci).
        let tail: Vec<String> = k.writes[4..].iter().map(|s| s.to_string()).collect();
        assert!(tail[0].contains("driver_override"), "{tail:?}");
        assert!(tail[1].contains("drivers/ixgbe/bind"), "{tail:?}");
    }

    #[test]
    fn a_failing_rollback_says_how_to_finish_it() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        let mut k = FakeKernel::new(&t);
        k.vfio_refuses = true;
        // Writes 0-3 are the bind; 4 clears the override; 5 binds ixgbe.
        k.fail_at = Some(5);
        let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rolling back failed too"), "{e}");
        assert!(
            e.contains(&format!("echo {BDF} > /sys/bus/pci/drivers/ixgbe/bind")),
            "{e}"
        );
        assert_eq!(t.driver_of(BDF), None);
    }

    #[test]
    fn a_device_without_a_group_is_refused_before_any_write() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), None);
        let mut k = FakeKernel::new(&t);
        let e = bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap_err();
        assert!(matches!(e, Error::NoIommuGroup { .. }), "{e}");
        assert!(k.writes.is_empty());
        // In no-IOMMU mode vfio-pci makes a group of its own: allowed.
        t.write(
            &t.sys("module/vfio/parameters/enable_unsafe_noiommu_mode"),
            "Y\n",
        );
        bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
    }

    #[test]
    fn vfio_pci_not_loaded_is_refused_before_any_write() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(1));
        std::fs::remove_dir(t.sys("bus/pci/drivers/vfio-pci")).unwrap();
        let mut k = FakeKernel::new(&t);
        let e = bind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modprobe vfio-pci"), "{e}");
        assert!(k.writes.is_empty());
    }

    #[test]
    fn unbind_refuses_an_open_group_and_rolls_back_a_failed_rebind() {
        let t = tree();
        t.pci(BDF, Some("ixgbe"), Some(12));
        let mut k = FakeKernel::new(&t);
        bind_on(&t.roots, BDF, Options::default(), &mut k).unwrap();
        std::fs::create_dir_all(t.proc_("4242/fd")).unwrap();
        symlink("/dev/vfio/12", t.proc_("4242/fd/7")).unwrap();
        symlink("/dev/vfio/13", t.proc_("4242/fd/8")).unwrap();
        let e = unbind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/vfio/12 is open in process 4242"), "{e}");
        assert_eq!(t.driver_of(BDF).as_deref(), Some(VFIO_PCI));
        std::fs::remove_file(t.proc_("4242/fd/7")).unwrap();
        // ixgbe's bind fails: back on vfio-pci, the record kept.
        let mut k = FakeKernel::new(&t);
        k.fail_at = Some(2);
        let e = unbind_on(&t.roots, BDF, Options::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rolled back, it is on vfio-pci again"), "{e}");
        assert_eq!(t.driver_of(BDF).as_deref(), Some(VFIO_PCI));
        assert_eq!(t.override_of(BDF).as_deref(), Some(VFIO_PCI));
        assert!(t.roots.state.join(BDF).exists());
    }

    #[test]
    fn missing_and_non_pci_devices_are_named() {
        let t = tree();
        let e = bind_on(
            &t.roots,
            "ff:1f.7",
            Options::default(),
            &mut FakeKernel::new(&t),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::DeviceNotFound { path, .. } if path.ends_with("0000:ff:1f.7")),
            "{e}"
        );
        t.pci(BDF, None, Some(1));
        std::fs::remove_file(t.dev_real(BDF).join("driver_override")).unwrap();
        let e = bind_on(&t.roots, BDF, Options::default(), &mut FakeKernel::new(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a PCI device with driver_override"), "{e}");
    }
}
