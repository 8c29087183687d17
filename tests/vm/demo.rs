//! `numapin demo --json` in the guest, its figures asserted: the plain
//! control moved under NUMA balancing, numapin's region moved in no phase,
//! the device read every sampled page of it correctly, and (no-IOMMU) the
//! device's reads through the stale physical addresses of moved pages are
//! not the new data. The mlocked region is reported as measured; what is
//! asserted of it is what the kernel does consistently (see `demo`). The
//! demo starts with balancing off, so its switching balancing on (and back)
//! is checked too.

use serde_json::Value;

use crate::Scenario;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![("i.cli.demo", demo)]
}

fn u(v: &Value, what: &str) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("demo JSON: `{what}` is not a number: {v}"))
}

const SYSCTL: &str = "/proc/sys/kernel/numa_balancing";
const SCAN_DELAY: &str = "/sys/kernel/debug/sched/numa_balancing/scan_delay_ms";

fn demo(ctx: &Ctx) -> Result<String, String> {
    // Balancing off first: the demo must switch it on, say so, and put it
    // back (and its scanner knobs) when it ends.
    let off = Knob::set(SYSCTL, "0")?;
    let delay_before = std::fs::read_to_string(SCAN_DELAY).ok();
    // 40 bits: xtask starts edu with dma_mask=0xffffffffff (no-IOMMU DMA
    // goes to physical addresses above 256 MiB).
    let (code, out, err) = run_cli(&[
        "demo",
        "--device",
        &ctx.bdf,
        "--json",
        "--dma-mask-bits",
        "40",
    ])?;
    let sysctl_after = std::fs::read_to_string(SYSCTL).unwrap_or_default();
    let delay_after = std::fs::read_to_string(SCAN_DELAY).ok();
    drop(off);
    let doc: Value = serde_json::from_str(&out)
        .map_err(|e| format!("demo printed no JSON ({e}); exit {code}: {out}{err}"))?;
    ensure!(doc["error"].is_null(), "demo failed (exit {code}): {err}");
    ensure!(
        doc["balancing"]["was"] == "0" && doc["balancing"]["switched_on"] == true,
        "with kernel.numa_balancing=0 the demo did not report switching it on: {}",
        doc["balancing"]
    );
    ensure!(
        sysctl_after.trim() == "0" && delay_after == delay_before,
        "the demo did not restore balancing: kernel.numa_balancing {:?} (was 0), scan_delay_ms {:?} (was {:?})",
        sysctl_after.trim(),
        delay_after,
        delay_before
    );
    ensure!(
        code == 0 && doc["ok"] == Value::Bool(true),
        "demo exit {code}: {}; stderr {err}",
        doc["verdict"]
    );
    let pages = u(&doc["pages_per_region"], "pages_per_region")?;
    let phases = doc["phases"]
        .as_array()
        .filter(|p| p.len() == 3)
        .ok_or("demo JSON: `phases` is not three phases")?;
    let moved = |i: usize, r: &str| u(&phases[i]["moved"][r], &format!("phases[{i}].moved.{r}"));

    // The control: NUMA balancing moved plain memory in phase 1.
    let plain1 = moved(0, "plain")?;
    ensure!(
        plain1 > 0,
        "plain memory did not move under NUMA balancing in {} s ({} hinting faults)",
        phases[0]["secs"],
        phases[0]["counters"]["numa_hint_faults"]
    );
    // numapin's region: no frame change in any phase, none at the end.
    for (i, p) in phases.iter().enumerate() {
        ensure!(
            moved(i, "numapin")? == 0,
            "numapin's region moved in phase {} ({}): {} pages",
            i + 1,
            p["name"],
            p["moved"]["numapin"]
        );
    }
    ensure!(
        u(&doc["numapin_frames_changed"], "numapin_frames_changed")? == 0
            && doc["numapin_frames_changed_since_pin"] == 0
            && u(&doc["numapin_off_node"], "numapin_off_node")? == 0,
        "numapin's frames: {} changed since phase 1, {} since the pin, {} off node",
        doc["numapin_frames_changed"],
        doc["numapin_frames_changed_since_pin"],
        doc["numapin_off_node"]
    );
    // The device read every sampled page, first and last included.
    let dc = &doc["device_check"];
    let sampled: Vec<u64> = dc["sampled"]
        .as_array()
        .ok_or("demo JSON: device_check.sampled missing")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    ensure!(
        sampled.len() >= 64 && sampled.first() == Some(&0) && sampled.last() == Some(&(pages - 1)),
        "device sampled {} pages ({:?}..{:?}), want >= 64 from 0 to {}",
        sampled.len(),
        sampled.first(),
        sampled.last(),
        pages - 1
    );
    ensure!(
        u(&dc["correct"], "device_check.correct")? == sampled.len() as u64,
        "device read wrong bytes on pages {}",
        dc["wrong"]
    );
    // The locked region. Measured on both suite kernels (6.1 stock, 6.12):
    // NUMA balancing moves mlocked pages like plain ones, and move_pages /
    // migrate_pages always do. The storm is asserted; balancing only when
    // it moved the control completely (then it had every chance).
    let locked1 = moved(0, "locked")?;
    let locked2 = moved(1, "locked")?;
    ensure!(locked2 > 0, "the storm moved no page of the mlocked region");
    ensure!(
        plain1 < pages || locked1 > 0,
        "NUMA balancing moved all {pages} plain pages but none of the mlocked region"
    );
    // Stale physical addresses.
    let stale = &doc["stale"];
    let samples = stale["samples"]
        .as_array()
        .ok_or("demo JSON: stale.samples missing")?;
    let moved_samples: Vec<&Value> = samples.iter().filter(|s| s["moved"] == true).collect();
    ensure!(
        !moved_samples.is_empty(),
        "no sampled page of the plain or locked region is on another frame than before phase 1"
    );
    for s in &moved_samples {
        ensure!(
            s["pa_before"] != s["pa_now"],
            "a moved sample kept its address: {s}"
        );
    }
    let stale_detail = if ctx.kind == numapin::ContainerKind::NoIommu {
        ensure!(
            stale["device_read"] == true && stale["control_ok"] == true,
            "no-IOMMU: the device did not read through the stale addresses, or its control read of numapin's page failed: {stale}"
        );
        let new = moved_samples
            .iter()
            .filter(|s| s["device_read"] == "new")
            .count();
        let old = moved_samples
            .iter()
            .filter(|s| s["device_read"] == "old")
            .count();
        ensure!(
            new == 0,
            "through the stale addresses of {new} moved pages the device read the new data"
        );
        format!(
            "stale PAs of {} moved pages: device read old data on {old}, new on 0",
            moved_samples.len()
        )
    } else {
        ensure!(
            stale["device_read"] == false,
            "behind an IOMMU the demo must not DMA to stale physical addresses"
        );
        format!("{} sampled pages have stale PAs", moved_samples.len())
    };
    let row = |i: usize| -> Result<String, String> {
        Ok(format!(
            "{}/{}/{}",
            moved(i, "locked")?,
            moved(i, "plain")?,
            moved(i, "numapin")?
        ))
    };
    Ok(format!(
        "balancing switched on from 0 and restored; moved locked/plain/numapin of {pages}: balancing {} in {}s, storm {}, compaction {}; device {} of {} pages ok; {stale_detail}",
        row(0)?,
        phases[0]["secs"],
        row(1)?,
        row(2)?,
        dc["correct"],
        sampled.len()
    ))
}
