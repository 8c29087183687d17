//! One step of a guest program (a scenario, a bench phase), run the same way
//! everywhere: timed, a panic turned into a failure with its message.
//! Shared by path: `#[path = "../common/step.rs"] mod step;`.

use std::time::Instant;

/// Runs `f`; returns `"pass"` or `"fail"`, the detail, and the seconds taken.
pub fn run(f: impl FnOnce() -> Result<String, String>) -> (&'static str, String, f64) {
    let t = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        ))
    });
    let secs = t.elapsed().as_secs_f64();
    match r {
        Ok(d) => ("pass", d, secs),
        Err(d) => ("fail", d, secs),
    }
}
