//! numapin's guest-side test runner: `cargo xtask test` boots a VM and runs
//! this binary as `numapin-vmtest --suite SUITE --results /dev/ttyS1`.
//!
//! Every scenario checks numapin against the real kernel it runs on:
//! placement via `move_pages`, pins via migration attempts against an
//! unpinned control that must move, accounting via `VmLck`, DMA via QEMU's
//! edu device. Results go to the host as JSON lines: a `plan` naming every
//! scenario, one `result` each, then `done`.

#[path = "../common/args.rs"]
mod args;
mod bad_input;
#[path = "../common/balancing.rs"]
mod balancing;
#[path = "../common/caps.rs"]
mod caps;
mod compaction;
#[path = "../common/daemon.rs"]
mod daemon;
mod demo;
mod errors;
mod iommufd;
mod locality;
mod pinless;
#[path = "../common/procfs.rs"]
mod procfs;
mod proof;
mod service;
mod service_attack;
#[path = "../common/step.rs"]
mod step;
mod type1;
mod util;

use std::io::Write;

use serde_json::json;

/// A scenario: returns a one-line detail on success, the reason on failure.
pub type Scenario = fn(&util::Ctx) -> Result<String, String>;

fn suite(name: &str) -> Option<Vec<(&'static str, Scenario)>> {
    match name {
        "type1" => {
            let mut v = type1::scenarios();
            v.extend(bad_input::scenarios());
            v.extend(errors::type1());
            v.extend(locality::scenarios());
            v.extend(demo::scenarios());
            v.extend(service::scenarios());
            v.extend(service_attack::scenarios());
            v.extend(proof::scenarios());
            Some(v)
        }
        "mdev" => {
            let mut v = pinless::mdev();
            v.extend(errors::common());
            v.extend(errors::uring());
            v.push(("h.cli.mdev-info", errors::mdev_info));
            Some(v)
        }
        "noiommu" => {
            let mut v = pinless::noiommu();
            v.extend(errors::common());
            v.extend(errors::uring());
            v.extend(demo::scenarios());
            Some(v)
        }
        // What a kernel or an IOMMU model changes; the rest of the type1
        // suite runs on the stock 6.1 and the built kernel.
        "type1-core" => Some(type1::scenarios()),
        "iommufd" => Some(iommufd::scenarios()),
        _ => None,
    }
}

fn main() {
    let suite_name = args::value("--suite").unwrap_or_else(|| "type1".into());
    if suite_name == "type1" {
        // On a kernel with iommufd, Pinner::open (and the CLI) would choose
        // it: the type1 suite pins through type1, in this process and in
        // the CLI children that inherit the variable.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("NUMAPIN_BACKEND", "type1") };
    }
    let only = args::value("--only");
    let mut out: Box<dyn Write> = Box::new(args::open_results("numapin-vmtest"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let Some(mut scenarios) = suite(&suite_name) else {
        let _ = writeln!(
            out,
            "{}",
            json!({"type": "plan", "suite": suite_name, "kernel": kernel.trim(), "scenarios": ["suite-exists"]})
        );
        let _ = writeln!(
            out,
            "{}",
            json!({"type": "result", "name": "suite-exists", "status": "fail", "secs": 0.0, "detail": format!("unknown suite {suite_name}")})
        );
        let _ = writeln!(out, "{}", json!({"type": "done"}));
        std::process::exit(1);
    };
    if let Some(o) = &only {
        scenarios.retain(|(n, _)| n.contains(o.as_str()));
    }
    let names: Vec<&str> = scenarios.iter().map(|(n, _)| *n).collect();
    let _ = writeln!(
        out,
        "{}",
        json!({"type": "plan", "suite": suite_name, "kernel": kernel.trim(), "scenarios": names})
    );
    let _ = out.flush();
    let ctx = match util::Ctx::new(&suite_name) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("numapin-vmtest: setup failed: {e}");
            for n in &names {
                let _ = writeln!(
                    out,
                    "{}",
                    json!({"type": "result", "name": n, "status": "fail", "secs": 0.0, "detail": format!("setup failed: {e}")})
                );
            }
            None
        }
    };
    let mut failed = 0;
    if let Some(ctx) = ctx {
        for (name, f) in scenarios {
            eprintln!("numapin-vmtest: --- {name}");
            let (status, detail, secs) = step::run(|| f(&ctx));
            if status != "pass" {
                failed += 1;
            }
            eprintln!("numapin-vmtest: {name}: {status} ({secs:.1}s) {detail}");
            let _ = writeln!(
                out,
                "{}",
                json!({"type": "result", "name": name, "status": status, "secs": (secs * 100.0).round() / 100.0, "detail": detail})
            );
            let _ = out.flush();
        }
    }
    let _ = writeln!(out, "{}", json!({"type": "done"}));
    let _ = out.flush();
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
