//! Carrying out the planned steps, and rolling back when one fails.

use std::io;
use std::path::Path;

use super::{Device, Roots, Step, driver, driver_name, driver_override};
use crate::error::{Error, Result};

/// Applies steps: the real system, or a fake kernel in tests.
pub(super) trait Apply {
    fn apply(&mut self, step: &Step) -> io::Result<()>;
}

/// Writes to the files named by the steps.
pub(super) struct Files;

impl Apply for Files {
    fn apply(&mut self, step: &Step) -> io::Result<()> {
        match step {
            Step::Write { path, value } => std::fs::write(path, value),
            Step::Record { path, driver } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(path, driver)
            }
            Step::Forget { path } => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// The state to return to if a step fails: the device's driver and
/// `driver_override` before the first step.
pub(super) struct Before {
    driver: Option<String>,
    override_: Option<String>,
}

/// Puts `dev` back on `before.driver` with `before.override_`, from
/// whatever state the failed steps left. Returns the steps it took.
pub(super) fn roll_back(
    roots: &Roots,
    dev: &Device,
    before: &Before,
    state: &Path,
    recorded: bool,
    w: &mut dyn Apply,
) -> std::result::Result<Vec<Step>, (Step, io::Error)> {
    let mut done = Vec::new();
    let mut run = |s: Step, w: &mut dyn Apply| match w.apply(&s) {
        Ok(()) => {
            done.push(s);
            Ok(())
        }
        Err(e) => Err((s, e)),
    };
    let now = driver(&dev.dir);
    if now != before.driver {
        if let Some(cur) = &now {
            run(
                Step::Write {
                    path: roots.driver_dir(cur).join("unbind"),
                    value: dev.name.clone(),
                },
                w,
            )?;
        }
    }
    // The override goes back before the old driver binds: with it set to
    // vfio-pci, the kernel would not match the old driver.
    if driver_override(&dev.dir) != before.override_ {
        run(
            Step::Write {
                path: dev.dir.join("driver_override"),
                value: before.override_.clone().unwrap_or_else(|| "\n".into()),
            },
            w,
        )?;
    }
    if now != before.driver {
        if let Some(prev) = &before.driver {
            run(
                Step::Write {
                    path: roots.driver_dir(prev).join("bind"),
                    value: dev.name.clone(),
                },
                w,
            )?;
        }
    }
    if recorded {
        run(
            Step::Forget {
                path: state.to_path_buf(),
            },
            w,
        )?;
    }
    Ok(done)
}

/// Runs `steps`, then `verify`; on a failure rolls back and says how it
/// ended.
pub(super) fn execute(
    roots: &Roots,
    dev: &Device,
    what: &str,
    steps: &[Step],
    state: &Path,
    verify: impl Fn(&Device) -> std::result::Result<(), String>,
    w: &mut dyn Apply,
) -> Result<()> {
    let before = Before {
        driver: driver(&dev.dir),
        override_: driver_override(&dev.dir),
    };
    let mut recorded = false;
    let mut failure = None;
    for s in steps {
        if let Err(e) = w.apply(s) {
            let hint = match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    " (run as root: drivers are the whole machine's)"
                }
                _ => "",
            };
            failure = Some(format!("{s} failed: {e}{hint}"));
            break;
        }
        recorded |= matches!(s, Step::Record { .. });
    }
    if failure.is_none() {
        failure = verify(dev).err();
    }
    let Some(failure) = failure else {
        return Ok(());
    };
    let back = |d: &Option<String>| match d {
        Some(d) => format!("echo {} > /sys/bus/pci/drivers/{d}/bind", dev.name),
        None => format!("echo {} > /sys/bus/pci/drivers_probe", dev.name),
    };
    match roll_back(roots, dev, &before, state, recorded, w) {
        Ok(_) if driver(&dev.dir) == before.driver => Err(Error::Invalid(format!(
            "{what} {} failed: {failure}; rolled back, it is on {} again: check `dmesg` for the \
             kernel's reason",
            dev.name,
            driver_name(&before.driver)
        ))),
        Ok(_) => Err(Error::Invalid(format!(
            "{what} {} failed: {failure}; rolling back left it on {} instead of {}: \
             give it back with `{}`",
            dev.name,
            driver_name(&driver(&dev.dir)),
            driver_name(&before.driver),
            back(&before.driver)
        ))),
        Err((s, e)) => Err(Error::Invalid(format!(
            "{what} {} failed: {failure}; rolling back failed too ({s}: {e}), it is now on {}: \
             give it back with `{}`",
            dev.name,
            driver_name(&driver(&dev.dir)),
            back(&before.driver)
        ))),
    }
}
