//! Automatic NUMA balancing for the demo: switched on if it is off, its
//! scanner made fast, everything put back on drop; the worker thread that
//! plays a guest's vCPU on the other node; the kernel's migration counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use numapin::{Error, Result};

use super::memory::{PAGE, TOUCH_OFFSET};

const SYSCTL: &str = "/proc/sys/kernel/numa_balancing";

/// NUMA balancing as the demo set it up.
pub struct Balancing {
    /// `kernel.numa_balancing` before the demo.
    pub was: String,
    /// The demo switched it on (it was 0).
    pub switched_on: bool,
    /// The scanner knobs the demo sped up (name = value).
    pub fast_scan: Vec<String>,
    restore: Vec<(String, String)>,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

impl Balancing {
    /// Switches automatic NUMA balancing on (if it is off) and makes its
    /// scanner start at once and scan often: debugfs knobs since Linux 5.10,
    /// `kernel.numa_balancing_scan_*` sysctls before. Knobs that are absent
    /// keep the kernel's speed.
    pub fn enable() -> Result<Balancing> {
        let was = read_trim(SYSCTL).ok_or_else(|| {
            Error::Invalid(format!(
                "{SYSCTL} is missing: this kernel has no automatic NUMA balancing \
                 (CONFIG_NUMA_BALANCING), the mechanism the demo shows; run it in the VM: `cargo xtask demo`"
            ))
        })?;
        let mut b = Balancing {
            switched_on: was == "0",
            was: was.clone(),
            fast_scan: vec![],
            restore: vec![],
        };
        if b.switched_on {
            std::fs::write(SYSCTL, "1").map_err(|e| {
                Error::sys(
                    format!("switch NUMA balancing on (write 1 to {SYSCTL})"),
                    "run the demo as root",
                    e,
                )
            })?;
            b.restore.push((SYSCTL.into(), was));
        }
        for (name, v) in [
            ("scan_delay_ms", "0"),
            ("scan_period_min_ms", "100"),
            ("scan_period_max_ms", "400"),
            ("scan_size_mb", "256"),
        ] {
            for path in [
                format!("/sys/kernel/debug/sched/numa_balancing/{name}"),
                format!("/proc/sys/kernel/numa_balancing_{name}"),
            ] {
                if let Some(old) = read_trim(&path) {
                    if std::fs::write(&path, v).is_ok() {
                        b.restore.push((path, old));
                        b.fast_scan.push(format!("{name}={v}"));
                        break;
                    }
                }
            }
        }
        Ok(b)
    }
}

impl Drop for Balancing {
    fn drop(&mut self) {
        for (path, old) in self.restore.iter().rev() {
            let _ = std::fs::write(path, old);
        }
    }
}

/// A thread on the other node's CPUs that writes one byte in every page of
/// every range, over and over, as a guest's vCPU running there would.
///
/// Dropping it stops and joins the thread, so that an early return (an
/// error between start and stop) never leaves it writing to ranges that are
/// unmapped next.
pub struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Worker {
    /// Starts the worker on `cpus`. The ranges must stay mapped until
    /// [`Worker::stop`] returns.
    pub fn start(ranges: Vec<(usize, usize)>, cpus: Vec<u32>) -> Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let placed = numapin::sys::set_thread_affinity(&cpus);
            let ok = placed.is_ok();
            let _ = tx.send(placed);
            let mut passes = 0;
            while ok && !flag.load(Ordering::Relaxed) {
                for &(addr, len) in &ranges {
                    for off in (TOUCH_OFFSET..len).step_by(PAGE) {
                        // SAFETY: the ranges stay mapped until the worker is
                        // joined (caller's contract); volatile, no reference.
                        unsafe {
                            let p = (addr + off) as *mut u8;
                            std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                        }
                    }
                }
                passes += 1;
            }
            passes
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(Worker {
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(Error::sys("sched_setaffinity (worker thread)", "", e))
            }
            Err(_) => Err(Error::Invalid("the worker thread died at start".into())),
        }
    }

    /// Stops the worker; returns how many passes over all ranges it made.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| Error::Invalid("the worker thread panicked".into()))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }
}

/// The kernel's migration counters, from /proc/vmstat (0 when absent:
/// kernels without CONFIG_VM_EVENT_COUNTERS have none).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    /// NUMA hinting faults taken (any process).
    pub numa_hint_faults: u64,
    /// Pages NUMA balancing migrated (any process).
    pub numa_pages_migrated: u64,
    /// Pages any mechanism migrated (any process).
    pub pgmigrate_success: u64,
    /// Pages a migration attempt failed on (any process).
    pub pgmigrate_fail: u64,
    /// Pages compaction's migrate scanner looked at.
    pub compact_migrate_scanned: u64,
    /// Pages compaction's free scanner looked at.
    pub compact_free_scanned: u64,
    /// Pages compaction isolated (to migrate, or as free targets).
    pub compact_isolated: u64,
}

impl Counters {
    pub fn read() -> Counters {
        let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        let get = |field: &str| {
            s.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == field).then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0)
        };
        Counters {
            numa_hint_faults: get("numa_hint_faults"),
            numa_pages_migrated: get("numa_pages_migrated"),
            pgmigrate_success: get("pgmigrate_success"),
            pgmigrate_fail: get("pgmigrate_fail"),
            compact_migrate_scanned: get("compact_migrate_scanned"),
            compact_free_scanned: get("compact_free_scanned"),
            compact_isolated: get("compact_isolated"),
        }
    }

    /// The growth since `earlier`.
    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            numa_hint_faults: self
                .numa_hint_faults
                .saturating_sub(earlier.numa_hint_faults),
            numa_pages_migrated: self
                .numa_pages_migrated
                .saturating_sub(earlier.numa_pages_migrated),
            pgmigrate_success: self
                .pgmigrate_success
                .saturating_sub(earlier.pgmigrate_success),
            pgmigrate_fail: self.pgmigrate_fail.saturating_sub(earlier.pgmigrate_fail),
            compact_migrate_scanned: self
                .compact_migrate_scanned
                .saturating_sub(earlier.compact_migrate_scanned),
            compact_free_scanned: self
                .compact_free_scanned
                .saturating_sub(earlier.compact_free_scanned),
            compact_isolated: self
                .compact_isolated
                .saturating_sub(earlier.compact_isolated),
        }
    }
}
