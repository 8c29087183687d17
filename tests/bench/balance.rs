//! NUMA-balancing cost: hinting faults and migrations attributable to a
//! region on node 0 that a thread on node 1 keeps touching — a numapin
//! region against default-policy memory of the same size.
//!
//! `/proc/vmstat` counts for the whole machine, so a region's share is found
//! by difference: each repetition runs the same toucher thread in the same
//! process for two equal intervals, first spinning without touching
//! anything, then writing one byte per page of the region. The second
//! interval's counts minus the first's are what the region caused; the
//! process's other mappings (stacks, heap) take a few faults in both.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use numapin::numa::{self, NodeMemory, Topology};
use numapin::{PageSize, PinRequest, Pinner, sys};

use crate::{Ctx, Mode, Out};

pub const PHASE: &str = "numa-balancing";
/// Region size: base pages, THP off, so that every page is a hinting fault
/// and a migration of its own.
const LEN: u64 = 64 << 20;
const REPS: usize = 5;
const INTERVAL: Duration = Duration::from_secs(4);

const IDLE: u8 = 0;
const TOUCH: u8 = 1;
const STOP: u8 = 2;

/// (hinting faults, pages migrated by NUMA balancing) so far.
fn counters() -> [u64; 2] {
    [
        crate::procfs::vmstat("numa_hint_faults"),
        crate::procfs::vmstat("numa_pages_migrated"),
    ]
}

/// Counter deltas of one idle and one touching interval.
struct Pair {
    idle: [u64; 2],
    touch: [u64; 2],
}

/// Runs the toucher on the away node's CPUs: `INTERVAL` idle, then
/// `INTERVAL` writing one byte per page of `[addr, addr+len)`.
fn interval_pair(ctx: &Ctx, addr: usize, len: usize) -> Result<Pair, String> {
    let state = Arc::new(AtomicU8::new(IDLE));
    let s = state.clone();
    let cpus = ctx.away_cpus.clone();
    let h = std::thread::spawn(move || {
        let _ = sys::set_thread_affinity(&cpus);
        loop {
            match s.load(Ordering::Relaxed) {
                IDLE => std::hint::spin_loop(),
                TOUCH => {
                    for off in (0..len).step_by(4096) {
                        // SAFETY: the region outlives this thread (joined
                        // below); volatile access, no references.
                        unsafe {
                            let p = (addr + off) as *mut u8;
                            std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                        }
                    }
                }
                _ => return,
            }
        }
    });
    // Let the thread settle on its CPU before counting.
    std::thread::sleep(Duration::from_millis(300));
    let c0 = counters();
    std::thread::sleep(INTERVAL);
    let c1 = counters();
    state.store(TOUCH, Ordering::Relaxed);
    std::thread::sleep(INTERVAL);
    let c2 = counters();
    state.store(STOP, Ordering::Relaxed);
    h.join().map_err(|_| "toucher panicked".to_string())?;
    Ok(Pair {
        idle: [c1[0] - c0[0], c1[1] - c0[1]],
        touch: [c2[0] - c1[0], c2[1] - c1[1]],
    })
}

pub fn run(ctx: &Ctx, out: &mut Out) -> Result<String, String> {
    Mode::Base.apply()?;
    crate::balancing::with_fast_balancing(|| measure(ctx, out))
}

fn measure(ctx: &Ctx, out: &mut Out) -> Result<String, String> {
    let pinner = Pinner::open(&ctx.bdf).map_err(|e| format!("Pinner::open: {e}"))?;
    let topo = Topology::read().map_err(|e| e.to_string())?;
    let mut numapin_pairs = Vec::new();
    let mut control_pairs = Vec::new();
    let mut pinned_changed = Vec::new();
    let mut control_moved = Vec::new();
    for _ in 0..REPS {
        let r = pinner
            .pin(&PinRequest::new(ctx.home, LEN))
            .map_err(|e| format!("pin: {e}"))?;
        numapin_pairs.push(interval_pair(ctx, r.vaddr().as_usize(), r.len() as usize)?);
        let v = r.verify().map_err(|e| format!("verify: {e}"))?;
        pinned_changed.push((v.off_node + v.pfn_changed.unwrap_or(0)) as f64);
        r.release().map_err(|e| format!("release: {e}"))?;

        // The control: the same size on the same node, then back to the
        // default policy, so that balancing may scan and move it.
        let c = NodeMemory::allocate(&topo, ctx.home, LEN, PageSize::Base, 1, None, None)
            .map_err(|e| format!("allocate control: {e}"))?;
        sys::mbind_default(c.addr(), c.len()).map_err(|e| format!("mbind default: {e}"))?;
        control_pairs.push(interval_pair(ctx, c.addr(), c.len())?);
        let nodes = numa::nodes_of(c.addr(), c.len(), 4096).map_err(|e| e.to_string())?;
        control_moved.push(nodes.iter().filter(|&&n| n == ctx.away.0 as i32).count() as f64);
    }
    let mut send = |who: &str, pairs: &[Pair]| {
        for (i, what) in ["hint-faults", "migrations"].into_iter().enumerate() {
            let idle: Vec<f64> = pairs.iter().map(|p| p.idle[i] as f64).collect();
            let touch: Vec<f64> = pairs.iter().map(|p| p.touch[i] as f64).collect();
            out.measure(PHASE, LEN, &format!("{who}.{what}.idle"), "count", &idle);
            out.measure(PHASE, LEN, &format!("{who}.{what}.touch"), "count", &touch);
        }
    };
    send("numapin", &numapin_pairs);
    send("control", &control_pairs);
    out.measure(PHASE, LEN, "numapin.pages-moved", "count", &pinned_changed);
    out.measure(PHASE, LEN, "control.pages-moved", "count", &control_moved);
    out.info("numa-balancing.interval_s", INTERVAL.as_secs_f64());
    let fmt = |p: &[Pair]| {
        p.iter()
            .map(|p| {
                format!(
                    "{}/{} faults, {}/{} migrated",
                    p.idle[0], p.touch[0], p.idle[1], p.touch[1]
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    Ok(format!(
        "idle/touch: numapin {}; control {}",
        fmt(&numapin_pairs),
        fmt(&control_pairs)
    ))
}
