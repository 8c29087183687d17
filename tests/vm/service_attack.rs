//! Scenario s, attacks from outside the daemon on a region numapind serves
//! an unprivileged client: compaction of the region's node. (move_pages,
//! migrate_pages and NUMA balancing are in `service.rs`.)

use crate::Scenario;
use crate::compaction::{Filler, short_pcp_lists};
use crate::ensure;
use crate::service::{CONFIG, Daemon, Holder, logged};
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![("s.compaction", |c| logged(|| compaction(c)))]
}

/// The client's region.
const LEN: u64 = 4 << 20;
/// The filler that lays out the node around it.
const FILL: u64 = 128 << 20;

/// Compaction of node 1 while uid 1000 holds a 4 MiB region numapind
/// pinned there. Compaction's migrate scanner walks upwards from the bottom
/// of a zone and meets the free scanner somewhere: the client's frames must
/// lie below that point, or the run never tries them. The runner cannot
/// choose the daemon's frames, but it can choose what the allocator hands
/// out next: it frees every even frame of the lowest 16 MiB of a 128 MiB
/// filler (single free pages, their neighbours still in use, so they stay
/// order-0 and are the first an order-0 allocation takes), on every CPU
/// with short per-CPU lists, so that each CPU's list holds only these
/// pages, in the order that serves the lowest first. The daemon's prefault
/// then lands among the odd frames left. Above the client's highest frame
/// the filler is cut into holes and a control as in e.compaction. Passes
/// only if none of the client's frames (read from its pagemap, and first
/// matched against the daemon's own snapshot) changed and control pages
/// moved above at least nine in ten of them (a few frames the allocator
/// took from elsewhere may lie beyond the scanners' meeting point; how
/// many the scanner passed is reported).
fn compaction(ctx: &Ctx) -> Result<String, String> {
    let node = ctx.away;
    let d = Daemon::start(ctx, CONFIG)?;
    let filler = Filler::new(node, FILL)?;
    let low = filler.lowest(4 * (LEN / 4096) as usize);
    let is_bait = |i: &usize| filler.before[*i] % 2 == 0;
    let mut bait: Vec<usize> = low.iter().copied().filter(is_bait).collect();
    // Freed pages are served last in, first out: the lowest goes last.
    bait.sort_by_key(|&i| std::cmp::Reverse(filler.before[i]));
    let bait_top = bait.first().map_or(0, |&i| filler.before[i]);
    ensure!(
        bait.len() as u64 >= 3 * LEN / 4096 / 2,
        "only {} even frames among the filler's {} lowest in zone {} of node {}",
        bait.len(),
        low.len(),
        filler.zone.name,
        node
    );
    let pcp = short_pcp_lists()?;
    let cpus: Vec<u32> = ctx
        .home_cpus
        .iter()
        .chain(&ctx.away_cpus)
        .copied()
        .collect();
    std::thread::scope(|s| {
        let threads: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(k, &cpu)| {
                let (filler, bait, n) = (&filler, &bait, cpus.len());
                s.spawn(move || {
                    e(
                        numapin::sys::set_thread_affinity(&[cpu]),
                        "pin a freeing thread to its CPU",
                    )?;
                    for &i in bait.iter().skip(k).step_by(n) {
                        filler.free(i);
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| {
            t.join()
                .map_err(|_| "a freeing thread panicked".to_string())?
        })
    })?;
    let h = Holder::spawn(&d, &format!("{}:4M", node.0))?;
    drop(pcp);
    let vaddr = h.hex("vaddr").ok_or("no vaddr")?;
    let snap = d.pinned_pfns(h.pid())?;
    let mine = pfns_of(h.pid(), vaddr, LEN)?;
    ensure!(
        snap.len() == mine.len() && changed(&snap, &mine) == 0,
        "{} of the client's {} frames are not the {} the daemon pinned",
        changed(&snap, &mine),
        mine.len(),
        snap.len()
    );
    let zone = &filler.zone;
    let outside = mine.iter().filter(|&&f| !zone.contains(f)).count();
    ensure!(
        outside == 0,
        "{outside} of the client's {} frames are outside zone {} of node {node}, where the filler is",
        mine.len(),
        zone.name
    );
    // A few of the daemon's frames may come from elsewhere (3 of 1024 seen
    // on 6.1): the layout is made above the highest one among the freed
    // low frames, and the run says how many of the client's frames lie
    // below where the scanner demonstrably got.
    let top = mine
        .iter()
        .copied()
        .filter(|&f| f <= bait_top)
        .max()
        .ok_or_else(|| {
            format!("none of the client's frames is among the freed low frames (which end at {bait_top:#x})")
        })?;
    let bottom = mine.iter().copied().min().unwrap_or(0);
    let stray = mine.iter().filter(|&&f| f > top).count();
    let control = filler.punch_above(top).map_err(|err| {
        format!("{err} (the client's frames reach {top:#x} among the freed low frames, {stray} above them)")
    })?;
    // The filler's odd frames among the client's: in the same pageblocks.
    let between: Vec<usize> = low
        .iter()
        .copied()
        .filter(|i| !is_bait(i) && filler.before[*i] <= top)
        .collect();
    let watched: Vec<usize> = control.iter().chain(&between).copied().collect();
    let run = filler.compact(node, &watched)?;
    let after = pfns_of(h.pid(), vaddr, LEN)?;
    let pc = changed(&mine, &after);
    ensure!(
        pc == 0,
        "{pc} of the client's {} pinned frames changed under compaction (pgmigrate_success +{})",
        mine.len(),
        run.migrated
    );
    let above: Vec<u64> = run.moved.iter().copied().filter(|&f| f > top).collect();
    let among = run.moved.len() - above.len();
    let reach = above.iter().copied().max().unwrap_or(0);
    let passed = mine.iter().filter(|&&f| f < reach).count();
    ensure!(
        !above.is_empty() && passed * 10 >= mine.len() * 9,
        "compaction's scanner demonstrably passed only {passed} of the client's {} frames: {} of the {} control pages above PFN {top:#x} moved, up to {reach:#x} (zone {} of node {node}; pgmigrate_success +{}, {} scanned; {among}/{} filler pages among the client's frames moved; {stray} client frames above {top:#x}, lowest {bottom:#x})",
        mine.len(),
        above.len(),
        control.len(),
        zone.name,
        run.migrated,
        run.scanned,
        between.len()
    );
    Ok(format!(
        "node {node} zone {}: uid 1000's region, {} pinned frames (PFN {bottom:#x}..={top:#x}, {stray} elsewhere), 0 changed, {passed} demonstrably passed by the scanner; control above them moved {}/{} (up to PFN {reach:#x}), filler among them {among}/{}; pgmigrate_success +{}, pgmigrate_fail +{}, compact_migrate_scanned +{}",
        zone.name,
        mine.len(),
        above.len(),
        control.len(),
        between.len(),
        run.migrated,
        run.failed,
        run.scanned
    ))
}
