//! The demo's figures (one serde document for `--json`) and the story
//! told around them. Every number printed is explained once, in words.

use serde::Serialize;

use numapin::ContainerKind;

use super::balancing::{Balancing, Counters};

/// One figure per region.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Three<T> {
    pub locked: T,
    pub plain: T,
    pub numapin: T,
}

impl<T> Three<T> {
    pub fn from_fn(f: impl Fn(usize) -> T) -> Three<T> {
        Three {
            locked: f(0),
            plain: f(1),
            numapin: f(2),
        }
    }
}

/// One phase: which mechanism, how long, what changed frame.
#[derive(Debug, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub secs: f64,
    /// Pages whose frame changed during the phase (PFN snapshots).
    pub moved: Three<u64>,
    /// Pages on the other node: at the end of phase 1, right after
    /// `move_pages` in phase 2, at the end of phase 3.
    pub on_away_node: Three<u64>,
    /// System-wide /proc/vmstat growth over the phase.
    pub counters: Counters,
    pub note: String,
}

/// The device's reads of numapin's region.
#[derive(Debug, Default, Serialize)]
pub struct DeviceCheck {
    /// `"iova"` behind an IOMMU, `"physical"` in no-IOMMU mode.
    pub through: &'static str,
    /// Page indices read (first and last included).
    pub sampled: Vec<u64>,
    /// The page of numapin's region the device wrote what it read into.
    pub mailbox_page: u64,
    pub bytes_per_page: u64,
    /// Sampled pages whose bytes, as the device read them, equal the CPU's.
    pub correct: u64,
    /// Sampled pages where they differ.
    pub wrong: Vec<u64>,
}

/// What the device read through a stale physical address.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Seen {
    /// What the CPU wrote after the phases.
    New,
    /// What the page held before the phases.
    Old,
    /// Neither: the frame holds other data now.
    Other,
}

#[derive(Debug, Serialize)]
pub struct StaleSample {
    pub region: &'static str,
    pub page: u64,
    /// The page's frame changed since before phase 1.
    pub moved: bool,
    pub pa_before: u64,
    pub pa_now: u64,
    /// `None` when the device did not read (behind an IOMMU).
    pub device_read: Option<Seen>,
}

/// The locked and plain regions through the addresses recorded before phase 1.
#[derive(Debug, Default, Serialize)]
pub struct StaleReads {
    /// The device read through them (no-IOMMU); otherwise addresses only.
    pub device_read: bool,
    /// numapin's page read through its physical address in the same batch:
    /// proves the reads reached memory.
    pub control_ok: Option<bool>,
    pub samples: Vec<StaleSample>,
}

#[derive(Debug, Serialize)]
pub struct BalancingSetup {
    /// `kernel.numa_balancing` before the demo.
    pub was: String,
    pub switched_on: bool,
    pub fast_scan: Vec<String>,
}

/// Everything `numapin demo` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub container: &'static str,
    pub kernel: String,
    pub region_bytes: u64,
    pub pages_per_region: u64,
    pub home_node: u32,
    pub away_node: u32,
    pub worker_cpus: Vec<u32>,
    pub numapin_dma: String,
    /// numapin's IOVA (`None` in no-IOMMU mode).
    pub numapin_iova: Option<u64>,
    pub balancing: BalancingSetup,
    pub phases: Vec<Phase>,
    /// numapin's pages on another frame than before phase 1.
    pub numapin_frames_changed: u64,
    /// ... than when numapin pinned it (`None`: PFNs hidden at pin time).
    pub numapin_frames_changed_since_pin: Option<u64>,
    /// numapin's pages not on the home node at the end.
    pub numapin_off_node: u64,
    pub device_check: DeviceCheck,
    pub stale: StaleReads,
    /// NUMA balancing moved at least one page of the mlocked region.
    pub locked_moved_by_balancing: bool,
    pub ok: bool,
    pub verdict: String,
}

/// `2048` as `2,048`.
pub fn n(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpus(c: &[u32]) -> String {
    let s: Vec<String> = c.iter().map(u32::to_string).collect();
    format!("CPU{} {}", if c.len() == 1 { "" } else { "s" }, s.join(","))
}

/// Greedy word wrap of one paragraph at 80 columns; every line starts
/// with `indent`.
pub fn wrap(text: &str, indent: &str) -> String {
    wrap_hanging(text, indent, indent)
}

/// As [`wrap`], the first line starting with `first`, the others with `rest`.
pub fn wrap_hanging(text: &str, first: &str, rest: &str) -> String {
    let mut out = String::new();
    let mut line = String::from(first);
    let mut empty = true;
    for w in text.split_whitespace() {
        if !empty && line.len() + 1 + w.len() > 80 {
            out += line.trim_end();
            out.push('\n');
            line = String::from(rest);
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line += w;
        empty = false;
    }
    out += line.trim_end();
    out
}

pub fn phase1_intro(away: u32, away_cpus: &[u32], limit: u64) -> String {
    wrap(
        &format!(
            "Phase 1, NUMA balancing: a thread on {} (node {away}) writes to every page of \
             all three regions, over and over, as a guest's vCPU on the other node would. \
             It stops once plain memory has moved and the demo has waited as long again \
             (at most {limit} s)...",
            cpus(away_cpus)
        ),
        "",
    )
}

pub fn phase2_intro(home: u32, away: u32) -> String {
    wrap(
        &format!(
            "Phase 2, the explicit storm: move_pages(2) asks for every page of each region \
             on node {away}, then migrate_pages(2) moves everything of this process on node \
             {away} back to node {home}."
        ),
        "",
    )
}

pub fn phase3_intro(knob: Option<&str>) -> String {
    wrap(
        &match knob {
            Some(k) => format!(
                "Phase 3, compaction: writing 1 to {k} makes the kernel move movable pages \
                 to gather free memory into large blocks."
            ),
            None => {
                "Phase 3, compaction: not available on this kernel (no CONFIG_COMPACTION).".into()
            }
        },
        "",
    )
}

pub fn device_intro(samples: usize, iommu: bool) -> String {
    wrap(
        &format!(
            "The CPU writes new data into every page of the three regions; then the edu \
             device reads {samples} pages of numapin's region through their {} (edu takes \
             about 0.1 s per transfer)...",
            if iommu { "IOVAs" } else { "physical addresses" }
        ),
        "",
    )
}

const PHASE_TITLES: [&str; 3] = [
    "1 NUMA balancing",
    "2 move_pages, migrate_pages",
    "3 compaction",
];

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: &str,
        kind: ContainerKind,
        region_bytes: u64,
        pages: u64,
        home: u32,
        away: u32,
        worker_cpus: Vec<u32>,
        numapin_dma: String,
        bal: &Balancing,
    ) -> Report {
        Report {
            device: device.to_string(),
            container: kind.name(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            region_bytes,
            pages_per_region: pages,
            home_node: home,
            away_node: away,
            worker_cpus,
            numapin_dma,
            numapin_iova: None,
            balancing: BalancingSetup {
                was: bal.was.clone(),
                switched_on: bal.switched_on,
                fast_scan: bal.fast_scan.clone(),
            },
            phases: vec![],
            numapin_frames_changed: 0,
            numapin_frames_changed_since_pin: None,
            numapin_off_node: 0,
            device_check: DeviceCheck::default(),
            stale: StaleReads::default(),
            locked_moved_by_balancing: false,
            ok: false,
            verdict: String::new(),
        }
    }

    fn numapin_moved(&self) -> u64 {
        self.phases.iter().map(|p| p.moved.numapin).sum()
    }

    fn stale_new_on_moved(&self) -> usize {
        self.stale
            .samples
            .iter()
            .filter(|s| s.moved && s.device_read == Some(Seen::New))
            .count()
    }

    /// Why the outcome is not what numapin promises, if it is not.
    pub fn failure(&self) -> Option<String> {
        let mut why = vec![];
        if self.numapin_moved() > 0 {
            why.push(format!(
                "{} frame changes in numapin's region",
                self.numapin_moved()
            ));
        }
        if self.numapin_frames_changed > 0 || self.numapin_frames_changed_since_pin.unwrap_or(0) > 0
        {
            why.push(format!(
                "{} of numapin's pages are on another frame than before",
                self.numapin_frames_changed
                    .max(self.numapin_frames_changed_since_pin.unwrap_or(0))
            ));
        }
        if self.numapin_off_node > 0 {
            why.push(format!(
                "{} of numapin's pages left node {}",
                self.numapin_off_node, self.home_node
            ));
        }
        if !self.device_check.wrong.is_empty() {
            why.push(format!(
                "the device read wrong bytes on {} of {} sampled pages of numapin's region (pages {:?})",
                self.device_check.wrong.len(),
                self.device_check.sampled.len(),
                self.device_check.wrong
            ));
        }
        if self.stale_new_on_moved() > 0 {
            why.push(format!(
                "through the old physical addresses of {} moved pages the device read the new data, which contradicts the PFN snapshots",
                self.stale_new_on_moved()
            ));
        }
        if self.stale.control_ok == Some(false) {
            why.push("the device's read of numapin's page through its physical address (the control of the stale reads) was wrong".into());
        }
        let unpinned: u64 = self
            .phases
            .iter()
            .map(|p| p.moved.plain + p.moved.locked)
            .sum();
        if unpinned == 0 {
            why.push("no page of the plain or locked region moved in any phase, so the demo showed nothing".into());
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Fills the verdict.
    pub fn finish(&mut self) {
        let p1 = self.phases.first().map(|p| p.moved).unwrap_or_default();
        self.locked_moved_by_balancing = p1.locked > 0;
        self.ok = self.failure().is_none();
        let total = self.pages_per_region;
        let sum =
            |f: fn(&Three<u64>) -> u64| -> u64 { self.phases.iter().map(|p| f(&p.moved)).sum() };
        let locked = if p1.locked > 0 {
            format!(
                "NUMA balancing moved the mlocked region ({} of {} pages): locked is not pinned",
                n(p1.locked),
                n(total)
            )
        } else if sum(|m| m.locked) > 0 {
            format!(
                "NUMA balancing left the mlocked region in place on this kernel, but the storm moved it ({} page moves): locked is not pinned",
                n(sum(|m| m.locked))
            )
        } else {
            "nothing moved the mlocked region on this kernel".to_string()
        };
        self.verdict = match self.failure() {
            None => format!(
                "Verdict: numapin's region never moved and the device read it correctly; {locked}."
            ),
            Some(why) => format!("Verdict: FAILED: {why}."),
        };
    }

    pub fn setup_text(&self) -> String {
        let size = numapin::addr::human_size(self.region_bytes);
        let bal = if self.balancing.switched_on {
            format!(
                "Automatic NUMA balancing was off on this kernel (kernel.numa_balancing={}): \
                 the demo switched it on, and puts it back at the end.",
                self.balancing.was
            )
        } else {
            format!(
                "Automatic NUMA balancing is on (kernel.numa_balancing={}, as the kernel had it).",
                self.balancing.was
            )
        };
        let scan = if self.balancing.fast_scan.is_empty() {
            "Its scanner runs at the kernel's own speed (its knobs are not writable here)."
                .to_string()
        } else {
            format!(
                "Its scanner is made fast for the demo ({}) and restored afterwards.",
                self.balancing.fast_scan.join(", ")
            )
        };
        [
            format!(
                "numapin demo: memory that is locked is not memory that is pinned\n\
                 (kernel {}, device {}, {} container)\n",
                self.kernel, self.device, self.container
            ),
            format!(
                "Three regions of {size} each ({} pages of 4 KiB), all placed on node {} first:",
                n(self.pages_per_region),
                self.home_node
            ),
            "  locked   mmap + MADV_DONTFORK + mlock, as a 2013 hypervisor kept guest RAM:\n  \
             \x20        resident, but not pinned"
                .into(),
            "  plain    ordinary memory with the default policy: the control, free to move".into(),
            wrap_hanging(
                &format!(
                    "pinned by numapin through VFIO (a long-term pin); the device reaches \
                     it at {}",
                    self.numapin_dma
                ),
                "  numapin  ",
                "           ",
            ),
            wrap(&format!("{bal} {scan}"), ""),
            wrap(
                "A page \"moved\" when its physical frame changed: the demo reads every \
                 page's frame number (PFN) from /proc/self/pagemap before, during and after \
                 each phase.",
                "",
            ),
            String::new(),
        ]
        .join("\n")
    }

    pub fn results_text(&self) -> String {
        let mut s = String::new();
        let pages = n(self.pages_per_region);
        s += &format!("\nPages moved in each phase, of {pages} per region:\n");
        s += &format!(
            "  {:<28} {:>6} {:>7} {:>7} {:>8} {:>10} {:>8}\n",
            "phase", "secs", "locked", "plain", "numapin", "balancing", "all"
        );
        for (i, p) in self.phases.iter().enumerate() {
            s += &format!(
                "  {:<28} {:>6.1} {:>7} {:>7} {:>8} {:>10} {:>8}\n",
                PHASE_TITLES.get(i).copied().unwrap_or(p.name),
                p.secs,
                n(p.moved.locked),
                n(p.moved.plain),
                n(p.moved.numapin),
                format!("+{}", n(p.counters.numa_pages_migrated)),
                format!("+{}", n(p.counters.pgmigrate_success)),
            );
        }
        s += &wrap(
            "locked, plain, numapin: pages of that region whose frame changed during the \
             phase. balancing, all: the kernel's own counters over the same phase, for the \
             whole system (/proc/vmstat): pages NUMA balancing migrated \
             (numa_pages_migrated), and pages any mechanism migrated (pgmigrate_success).",
            "  ",
        );
        s.push('\n');
        if let Some(p) = self.phases.first() {
            s += &wrap(
                &format!(
                    "Phase 1: {}. Balancing took {} NUMA hinting faults (the faults it \
                     plants to learn which node touches a page); at the end node {} held \
                     locked {}, plain {}, numapin {} pages.",
                    p.note,
                    n(p.counters.numa_hint_faults),
                    self.away_node,
                    n(p.on_away_node.locked),
                    n(p.on_away_node.plain),
                    n(p.on_away_node.numapin),
                ),
                "  ",
            );
            s.push('\n');
        }
        if let Some(p) = self.phases.get(1) {
            s += &wrap(&format!("Phase 2: {}.", p.note), "  ");
            s.push('\n');
        }
        if self.phases.len() == 3
            && self.phases[1..]
                .iter()
                .all(|p| p.counters.numa_pages_migrated == 0)
        {
            s += &wrap(
                "In phases 2 and 3 the balancing counter stayed at +0: those moves are the \
                 storm's and compaction's own.",
                "  ",
            );
            s.push('\n');
        }
        if let Some(p) = self.phases.get(2) {
            let zero = p.moved.locked == 0 || p.moved.plain == 0;
            s += &wrap(
                &format!(
                    "Phase 3: {}; its scanners looked at {} pages. Compaction migrates only \
                     the pages it meets on its way up from the bottom of a memory zone \
                     before it meets its free-page scanner coming down from the top{}",
                    p.note,
                    n(p.counters.compact_migrate_scanned + p.counters.compact_free_scanned),
                    if zero {
                        ", so a 0 here means those pages were out of its way this time, not \
                         beyond its reach."
                    } else {
                        "."
                    }
                ),
                "  ",
            );
            s.push('\n');
        }

        let d = &self.device_check;
        s += "\nWhat the device saw\n";
        s += &wrap(
            &format!(
                "numapin: edu read the first {} bytes of {} pages spread over the region \
                 (first and last included) through their {}, and wrote them all into page {}; \
                 {} of {} pages read exactly what the CPU had written.",
                d.bytes_per_page,
                d.sampled.len(),
                if d.through == "iova" {
                    "IOVAs"
                } else {
                    "physical addresses"
                },
                d.mailbox_page,
                d.correct,
                d.sampled.len()
            ),
            "  ",
        );
        s.push('\n');
        s += &wrap(
            &format!(
                "On the CPU side, {} of numapin's {pages} pages are on another frame than \
                 before phase 1{}, and {} left node {}.",
                n(self.numapin_frames_changed),
                match self.numapin_frames_changed_since_pin {
                    Some(c) => format!(" ({} than when it was pinned)", n(c)),
                    None => String::new(),
                },
                n(self.numapin_off_node),
                self.home_node
            ),
            "  ",
        );
        s.push('\n');
        let st = &self.stale;
        if st.device_read {
            s += &wrap(
                "A device given the locked and plain regions' physical addresses before \
                 phase 1 still uses them. In no-IOMMU mode they are real DMA addresses, so \
                 edu read through them (reads only, never a write):",
                "  ",
            );
            s.push('\n');
            s += &format!(
                "    {:<8} {:>7} {:>6} {:>9} {:>9} {:>6}\n",
                "region", "sampled", "moved", "new data", "old data", "other"
            );
            for r in ["locked", "plain"] {
                let of: Vec<&StaleSample> = st.samples.iter().filter(|x| x.region == r).collect();
                let c = |w: Seen| of.iter().filter(|x| x.device_read == Some(w)).count();
                s += &format!(
                    "    {:<8} {:>7} {:>6} {:>9} {:>9} {:>6}\n",
                    r,
                    of.len(),
                    of.iter().filter(|x| x.moved).count(),
                    c(Seen::New),
                    c(Seen::Old),
                    c(Seen::Other)
                );
            }
            s += &wrap(
                "sampled: pages spread over the region; moved: on another frame than \
                 before phase 1; new data: the device read what the CPU wrote after the \
                 phases; old data: what the page held before them (the device works on \
                 stale bytes); other: the old frame now holds something else.",
                "    ",
            );
            s.push('\n');
            s += &wrap(
                match st.control_ok {
                    Some(true) => {
                        "In the same batch edu read one of numapin's pages through its \
                         physical address and got the new data: these reads did reach memory."
                    }
                    _ => {
                        "In the same batch edu read one of numapin's pages through its \
                         physical address and got WRONG data: the reads above prove nothing."
                    }
                },
                "    ",
            );
            s.push('\n');
        } else {
            s += &wrap(
                "Behind the IOMMU the device reaches only IOVAs numapin mapped, so the demo \
                 does not send it to the old physical addresses of the other two regions. \
                 Here they are, for pages spread over each region; a device given them at \
                 setup would use them still:",
                "  ",
            );
            s.push('\n');
            for r in ["locked", "plain"] {
                let of: Vec<&StaleSample> = st.samples.iter().filter(|x| x.region == r).collect();
                for x in of.iter().take(3) {
                    s += &format!(
                        "    {:<7} page {:>5}: {:#011x} before phase 1, {:#011x} now{}\n",
                        r,
                        x.page,
                        x.pa_before,
                        x.pa_now,
                        if x.moved { "" } else { " (same frame)" }
                    );
                }
                s += &format!(
                    "    {:<7} {} of {} sampled pages are no longer where the device was told\n",
                    r,
                    of.iter().filter(|x| x.moved).count(),
                    of.len()
                );
            }
        }
        s += &format!("\n{}", self.verdict);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands() {
        assert_eq!(n(0), "0");
        assert_eq!(n(999), "999");
        assert_eq!(n(2048), "2,048");
        assert_eq!(n(1234567), "1,234,567");
    }

    #[test]
    fn wraps() {
        let w = wrap(&"word ".repeat(40), "  ");
        assert!(w.lines().all(|l| l.len() <= 80 && l.starts_with("  word")));
        assert_eq!(w.split_whitespace().count(), 40);
        let h = wrap_hanging(&"word ".repeat(40), "  label  ", "         ");
        assert!(h.starts_with("  label  word "));
        assert!(h.lines().skip(1).all(|l| l.starts_with("         word")));
    }
}
