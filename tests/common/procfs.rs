//! Counters from procfs, for the guest programs (the VM suite and the
//! bench). Shared by path: `#[path = "../common/procfs.rs"] mod procfs;`.

/// A counter from /proc/vmstat (0 when absent).
pub fn vmstat(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == field).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}
