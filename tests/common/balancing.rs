//! NUMA balancing switched on and made to scan quickly, for the guest
//! programs that measure it (the VM suite's scenario d and the bench).
//! Shared by path: `#[path = "../common/balancing.rs"] mod balancing;`.

/// Writes `v` to `path` and returns what was there, or `None` if either
/// failed.
fn write_knob(path: &str, v: &str) -> Option<String> {
    let old = std::fs::read_to_string(path).ok()?;
    std::fs::write(path, v).ok()?;
    Some(old.trim().to_string())
}

/// Runs `f` with `kernel.numa_balancing = 1` and the scanner at its
/// fastest (debugfs knobs since 5.10), then puts every setting back.
pub fn with_fast_balancing<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let nb = "/proc/sys/kernel/numa_balancing";
    let old_nb = write_knob(nb, "1")
        .ok_or("cannot enable kernel.numa_balancing (CONFIG_NUMA_BALANCING missing?)")?;
    let dbg = "/sys/kernel/debug/sched/numa_balancing";
    let mut restore = vec![];
    for (k, v) in [
        ("scan_delay_ms", "0"),
        ("scan_period_min_ms", "100"),
        ("scan_period_max_ms", "400"),
        ("scan_size_mb", "256"),
    ] {
        let path = format!("{dbg}/{k}");
        if let Some(old) = write_knob(&path, v) {
            restore.push((path, old));
        }
    }
    let result = f();
    let _ = std::fs::write(nb, old_nb);
    for (p, v) in restore {
        let _ = std::fs::write(p, v);
    }
    result
}
