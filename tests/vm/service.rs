//! Scenario s: numapind, the pinning service. Each scenario starts the
//! daemon (as root, owning the edu device) with its own config, waits for
//! its readiness on a `NOTIFY_SOCKET` this runner listens on, and talks to
//! it as an unprivileged client (uid 1000, no capabilities, memlock 64 KiB)
//! or as root. Evidence is read from outside the daemon: the client's
//! pagemap and nodes, the daemon's VmLck and fds, DMA mappings left, node
//! free memory.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use numapin::client::proto::{self, Op, Outcome};
use numapin::client::{Allocate, Client, wire};
use serde_json::Value;

use crate::Scenario;

/// How often the attack's unpinned control is asked to move, and how far
/// apart: moving pages is best effort (see [`ask_until_moved`]).
const CONTROL_ASKS: usize = 10;
const CONTROL_PAUSE: Duration = Duration::from_millis(200);
use crate::daemon;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("s.unprivileged-4k", |c| logged(|| unprivileged(c, 4096))),
        ("s.unprivileged-2m", |c| logged(|| unprivileged(c, 2 << 20))),
        ("s.example-dma", |c| logged(|| example_dma(c))),
        ("s.refused-user", |c| logged(|| refused_user(c))),
        ("s.quota-floor-sighup", |c| logged(|| quota_floor(c))),
        ("s.client-sigkill", |c| logged(|| client_sigkill(c))),
        ("s.kept-memfd", |c| logged(|| kept_memfd(c))),
        ("s.daemon-sigkill-restart", |c| logged(|| daemon_sigkill(c))),
        ("s.sigterm", |c| logged(|| sigterm(c))),
        ("s.parallel", |c| logged(|| parallel(c))),
        ("s.fuzz", |c| logged(|| fuzz(c))),
        ("s.socket-activation", |c| logged(|| socket_activation(c))),
        ("s.peer-identity", |c| logged(|| peer_identity(c))),
        ("s.numa-balancing", |c| logged(|| numa_balancing(c))),
    ]
}

/// Where the scenario's daemons write their stderr.
const LOG: &str = "/tmp/numapind/numapind.log";

/// Runs a scenario with a fresh daemon log; a failure carries its tail.
pub(crate) fn logged(f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
    let _ = std::fs::create_dir_all("/tmp/numapind");
    let _ = std::fs::write(LOG, "");
    f().map_err(|err| {
        let log = std::fs::read_to_string(LOG).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{err} [numapind log: {}]", tail.join(" | "))
    })
}

pub(crate) const CONFIG: &str = r#"
users = ["pinner"]
selftest_users = ["pinner"]
[quota]
bytes_per_node = "200M"
regions = 16
[floor]
default = "16M"
"#;

/// A numapind child, ready (stopped with SIGTERM on drop).
pub(crate) struct Daemon {
    inner: daemon::Daemon,
    socket: PathBuf,
    config: PathBuf,
}

impl Daemon {
    pub(crate) fn start(ctx: &Ctx, config: &str) -> Result<Daemon, String> {
        let dir = PathBuf::from("/tmp/numapind");
        let _ = std::fs::create_dir_all(&dir);
        let cfg = dir.join("numapind.toml");
        e(std::fs::write(&cfg, config), "write config")?;
        Daemon::start_with(ctx, cfg, dir.join("numapind.sock"))
    }

    fn start_with(ctx: &Ctx, config: PathBuf, socket: PathBuf) -> Result<Daemon, String> {
        let mut cmd = Command::new(sibling("numapind"));
        cmd.args(["--device", &ctx.bdf, "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(&socket);
        Daemon::launch(cmd, config, socket, |_| Ok(None))
    }

    /// Starts `cmd` (numapind, or systemd-socket-activate running it) with
    /// a NOTIFY_SOCKET this runner listens on, runs `before_ready` (which
    /// may return a connection to hold until then), and waits for READY=1.
    fn launch(
        cmd: Command,
        config: PathBuf,
        socket: PathBuf,
        before_ready: impl FnOnce(&Path) -> Result<Option<OwnedFd>, String>,
    ) -> Result<Daemon, String> {
        let files = daemon::Files {
            socket: socket.clone(),
            notify: PathBuf::from("/tmp/numapind/notify"),
            log: PathBuf::from(LOG),
        };
        let inner = daemon::launch(cmd, &files, 60, |d| before_ready(&d.socket))?;
        Ok(Daemon {
            inner,
            socket,
            config,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.inner.pid()
    }

    pub(crate) fn client(&self) -> Result<Client, String> {
        e(Client::connect(&self.socket), "connect as root")
    }

    fn sock(&self) -> String {
        self.socket.display().to_string()
    }

    fn signal(&self, sig: i32) {
        self.inner.signal(sig);
    }

    /// Waits (bounded) for the exit status.
    fn wait(&mut self, secs: u64) -> Result<std::process::ExitStatus, String> {
        self.inner.wait(secs)
    }

    /// Kills it and returns what the scenario's daemons printed.
    fn stderr(&mut self) -> String {
        self.inner.kill_and_log()
    }

    fn vmlck(&self) -> Result<u64, String> {
        let s = e(
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())),
            "daemon status",
        )?;
        numapin::sys::parse_status_kb(&s, "VmLck").ok_or_else(|| "no VmLck".into())
    }

    /// The PFNs the daemon pinned for `pid`'s region, one per base page,
    /// from its own snapshot (asked for as root).
    pub(crate) fn pinned_pfns(&self, pid: u32) -> Result<Vec<u64>, String> {
        let inspected = e(self.client()?.inspect(Some(pid as i32)), "inspect")?;
        let snap = inspected
            .iter()
            .find(|r| r.pid == pid as i32)
            .and_then(|r| r.pfns.clone())
            .ok_or_else(|| format!("no PFN snapshot for pid {pid}'s region"))?;
        Ok(expand(&snap))
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Runs `cmd` as uid/gid 1000 without capabilities, memlock `limit`.
fn as_user(cmd: &mut Command, uid: u32, limit: u64) -> &mut Command {
    // SAFETY: between fork and exec only async-signal-safe calls run.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// `numapin pin --service` as uid 1000 holding `region`; its JSON document.
pub(crate) struct Holder {
    child: Child,
    /// The client's `--json` report.
    pub(crate) doc: Value,
}

impl Holder {
    pub(crate) fn spawn(d: &Daemon, region: &str) -> Result<Holder, String> {
        let mut cmd = numapin();
        cmd.args([
            "pin",
            "--service",
            &d.sock(),
            "--region",
            region,
            "--json",
            "--hold-forever",
            // Asked for, and still refused to uid 1000 (not in phys_users).
            "--phys",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = e(as_user(&mut cmd, 1000, 64 << 10).spawn(), "spawn client")?;
        let mut text = String::new();
        for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
            let line = e(line, "read client")?;
            text.push_str(&line);
            if line == "}" {
                break;
            }
        }
        match serde_json::from_str(&text) {
            Ok(doc) => Ok(Holder { child, doc }),
            Err(err) => {
                let _ = child.kill();
                let o = child.wait_with_output().ok();
                Err(format!(
                    "client printed no JSON ({err}): {text:?} {:?}",
                    o.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                ))
            }
        }
    }

    pub(crate) fn hex(&self, k: &str) -> Option<u64> {
        let s = self.doc["regions"][0][k].as_str()?;
        u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn expand(extents: &[proto::Extent]) -> Vec<u64> {
    extents
        .iter()
        .flat_map(|x| (0..x.len / 4096).map(move |i| x.addr / 4096 + i))
        .collect()
}

/// A node's free memory in kB including its zones' per-CPU free lists
/// (freed pages land there first; MemFree alone misses them).
fn node_free_kb(node: numapin::NodeId) -> u64 {
    let mut pcp = 0u64;
    let mut here = false;
    for l in std::fs::read_to_string("/proc/zoneinfo")
        .unwrap_or_default()
        .lines()
    {
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("Node ") {
            here = rest
                .split(',')
                .next()
                .and_then(|n| n.trim().parse::<u32>().ok())
                == Some(node.0);
        } else if here {
            if let Some(v) = t.strip_prefix("count:") {
                pcp += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    node_mem_free_kb(node) + pcp * 4
}

fn dma_avail(c: &Client) -> Result<Option<u32>, String> {
    Ok(e(c.status(), "status")?.devices[0].dma_avail)
}

/// uid 1000 (memlock 64 KiB) gets 64 MiB on node 1: its frames are the
/// daemon's pinned snapshot, an outside move_pages moves none of them while
/// an unpinned control moves, and the client's own memlock stays untouched.
fn unprivileged(ctx: &Ctx, page: u64) -> Result<String, String> {
    const LEN: u64 = 64 << 20;
    let _pool = if page > 4096 {
        Some(Knob::set(
            &format!(
                "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/nr_hugepages",
                ctx.away.0
            ),
            "40",
        )?)
    } else {
        None
    };
    let d = Daemon::start(ctx, CONFIG)?;
    let lck0 = d.vmlck()?;
    let spec = if page > 4096 {
        format!("{}:64M:2M", ctx.away.0)
    } else {
        format!("{}:64M", ctx.away.0)
    };
    let h = Holder::spawn(&d, &spec)?;
    let vaddr = h.hex("vaddr").ok_or("no vaddr")?;
    ensure!(h.hex("iova").is_some(), "no IOVA: {}", h.doc);
    ensure!(
        h.doc["regions"][0]["len"].as_u64() == Some(LEN),
        "len: {}",
        h.doc
    );
    ensure!(
        h.doc["regions"][0]["phys"].is_null(),
        "uid 1000 was sent physical addresses: {}",
        h.doc
    );
    // Root gets the extents when it asks, they are its mapping's frames,
    // and a reply without the ask has none.
    let root = d.client()?;
    let ask = |phys| {
        e(
            root.allocate(&Allocate {
                node: ctx.away.0,
                size: 2 << 20,
                page_size: page,
                phys,
                ..Allocate::default()
            }),
            "root's allocate",
        )
    };
    let asked = ask(true)?;
    let ext = asked
        .info()
        .phys
        .clone()
        .ok_or("root asked for physical extents and got none")?;
    let frames = numapin::phys::merge_extents(pfns(asked.as_ptr() as usize, 2 << 20)?, 4096);
    ensure!(
        ext.len() == frames.len()
            && ext
                .iter()
                .zip(&frames)
                .all(|(x, f)| x.addr == f.pa.raw() && x.len == f.len),
        "the extents sent ({ext:?}) are not root's mapping's frames ({frames:?})"
    );
    let plain = ask(false)?;
    ensure!(
        plain.info().phys.is_none() && plain.info().phys_extents.is_none(),
        "extents came unasked: {:?}",
        plain.info()
    );
    drop((asked, plain));
    let lck = d.vmlck()? - lck0;
    ensure!(
        lck == LEN,
        "the daemon's VmLck grew by {lck:#x}, not 64 MiB"
    );
    ensure!(
        ctx.pinned_of(h.pid())? == 0,
        "the client has locked memory of its own"
    );
    // The client's frames are the ones the daemon pinned.
    let snap = d.pinned_pfns(h.pid())?;
    let mine = pfns_of(h.pid(), vaddr, LEN)?;
    ensure!(
        snap.len() == mine.len(),
        "{} snapshot PFNs, {} client PFNs",
        snap.len(),
        mine.len()
    );
    let differ = changed(&snap, &mine);
    ensure!(
        differ == 0,
        "{differ} of the client's frames are not the pinned ones"
    );
    // An outside attack: move the client's pages to node 0.
    let control = control_region(ctx.away, 4 << 20)?;
    // Keep the kernel's per-page answers of the last ask for the error.
    let mut status = vec![0i32; control.len() / 4096];
    let ctl_moved = ask_until_moved(CONTROL_ASKS, CONTROL_PAUSE, || {
        e(
            numapin::sys::move_pages(
                std::process::id() as i32,
                &(0..control.len())
                    .step_by(4096)
                    .map(|o| control.addr() + o)
                    .collect::<Vec<_>>(),
                Some(&vec![ctx.home.0 as i32; control.len() / 4096]),
                &mut status,
            ),
            "move control",
        )?;
        let ctl = e(
            numapin::numa::nodes_of(control.addr(), control.len(), 4096),
            "control nodes",
        )?;
        Ok(on_node(&ctl, ctx.home))
    })?;
    let mut counts = std::collections::BTreeMap::new();
    for st in &status {
        *counts.entry(*st).or_insert(0) += 1;
    }
    ensure!(
        ctl_moved > 0,
        "the unpinned control did not move in {CONTROL_ASKS} asks (last per-page answers, node or -errno: {counts:?}; node {} MemFree {} kB): the attack proves nothing",
        ctx.home,
        node_mem_free_kb(ctx.home)
    );
    let _ = move_pid_range(h.pid(), vaddr, LEN, ctx.home)?;
    let nodes = nodes_of_pid(h.pid(), vaddr, LEN, page)?;
    ensure!(
        on_node(&nodes, ctx.away) == nodes.len(),
        "{} of {} client pages left node {}",
        nodes.len() - on_node(&nodes, ctx.away),
        nodes.len(),
        ctx.away
    );
    let after = pfns_of(h.pid(), vaddr, LEN)?;
    ensure!(
        changed(&snap, &after) == 0,
        "{} frames changed under move_pages",
        changed(&snap, &after)
    );
    // migrate_pages on the whole client: its region stays. The control
    // (now on the home node) must follow migrate_pages of this runner.
    e(
        numapin::sys::migrate_pages(h.pid() as i32, ctx.away, ctx.home),
        "migrate_pages of the client",
    )?;
    let nodes = nodes_of_pid(h.pid(), vaddr, LEN, page)?;
    ensure!(
        on_node(&nodes, ctx.away) == nodes.len(),
        "migrate_pages moved {} of {} client pages",
        nodes.len() - on_node(&nodes, ctx.away),
        nodes.len()
    );
    let after = pfns_of(h.pid(), vaddr, LEN)?;
    ensure!(
        changed(&snap, &after) == 0,
        "{} frames changed under migrate_pages",
        changed(&snap, &after)
    );
    // migrate_pages is best effort too (CI on 6.1 once saw it move none of
    // the control in one call): keep the kernel's count of pages it could
    // not move, per ask, for the error.
    let mut not_moved = Vec::new();
    let ctl_back = ask_until_moved(CONTROL_ASKS, CONTROL_PAUSE, || {
        not_moved.push(e(
            numapin::sys::migrate_pages(0, ctx.home, ctx.away),
            "migrate_pages of the control",
        )?);
        let ctl = e(
            numapin::numa::nodes_of(control.addr(), control.len(), 4096),
            "control nodes",
        )?;
        Ok(on_node(&ctl, ctx.away))
    })?;
    // The runner's pages go home again for the scenarios that follow.
    let _ = numapin::sys::migrate_pages(0, ctx.away, ctx.home);
    ensure!(
        ctl_back > 0,
        "migrate_pages moved none of the unpinned control in {} asks (pages the kernel could not move, per ask: {not_moved:?}; node {} MemFree {} kB): the attack proves nothing",
        not_moved.len(),
        ctx.away,
        node_mem_free_kb(ctx.away)
    );
    Ok(format!(
        "{} PFNs match the daemon's snapshot; move_pages and migrate_pages moved 0 of {} pages (control: {ctl_moved} and {ctl_back} of {} moved); daemon VmLck +64 MiB, client VmLck 0 under memlock 64 KiB",
        mine.len(),
        nodes.len(),
        control.len() / 4096
    ))
}

/// examples/service_client as uid 1000: the edu device writes into its
/// region through the IOVA, and the client reads the bytes.
fn example_dma(ctx: &Ctx) -> Result<String, String> {
    let d = Daemon::start(ctx, CONFIG)?;
    let node = ctx.away.0.to_string();
    let mut cmd = Command::new(sibling("service_client"));
    cmd.args([d.sock().as_str(), &node, "8"]);
    let out = e(
        as_user(&mut cmd, 1000, 64 << 10).output(),
        "run service_client",
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "service_client: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("dma: 2048 bytes written by the device") && text.contains(", 0 wrong"),
        "{text}"
    );
    ensure!(text.contains("intact true"), "{text}");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("dma"))
        .collect::<Vec<_>>()
        .join("; "))
}

/// uid 1001 is in no list of the config: refused with a permission error.
fn refused_user(ctx: &Ctx) -> Result<String, String> {
    let d = Daemon::start(ctx, CONFIG)?;
    let mut cmd = numapin();
    cmd.args(["status", "--socket", &d.sock()]);
    let out = e(as_user(&mut cmd, 1001, 64 << 10).output(), "status as 1001")?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(3),
        "exit {:?}, expected 3 (permission): {err}",
        out.status.code()
    );
    ensure!(
        err.contains("uid 1001 is not allowed") && err.contains("numapind.toml"),
        "{err}"
    );
    // Control: uid 1000 is served.
    let mut cmd = numapin();
    cmd.args(["status", "--socket", &d.sock()]);
    let ok = e(as_user(&mut cmd, 1000, 64 << 10).output(), "status as 1000")?;
    ensure!(
        ok.status.success(),
        "uid 1000 refused: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    Ok(err.trim().to_string())
}

/// A 96 MiB quota refuses the second 64 MiB; SIGHUP raises it without
/// dropping the region held; a floor above the node's memory refuses.
fn quota_floor(ctx: &Ctx) -> Result<String, String> {
    let n = ctx.away.0;
    let d = Daemon::start(
        ctx,
        "users = [\"pinner\"]\n[quota]\nbytes_per_node = \"96M\"\nregions = 2\n[floor]\ndefault = \"16M\"\n",
    )?;
    let c = d.client()?;
    let a = Allocate {
        node: n,
        size: 64 << 20,
        ..Allocate::default()
    };
    let first = e(c.allocate(&a), "first 64 MiB")?;
    // Per user: uid 1000 has its own 96 MiB (root's 64 MiB is not its).
    let mut cmd = numapin();
    cmd.args(["pin", "--service", &d.sock(), "--hold", "0"])
        .args([
            "--region",
            &format!("{n}:64M"),
            "--region",
            &format!("{n}:64M"),
        ]);
    let out = e(
        as_user(&mut cmd, 1000, 64 << 10).output(),
        "pin as uid 1000",
    )?;
    let user_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(
        out.status.code() == Some(4) && user_err.contains("quota: uid 1000 holds 64 MiB on node"),
        "uid 1000's second 64 MiB: exit {:?}, {user_err}",
        out.status.code()
    );
    let err = match c.allocate(&a) {
        Ok(_) => return Err("a second 64 MiB passed a 96 MiB quota".into()),
        Err(err) => err,
    };
    ensure!(
        err.kind() == numapin::ErrorKind::ResourceLimit,
        "kind {:?}: {err}",
        err.kind()
    );
    let quota_msg = err.to_string();
    ensure!(
        quota_msg.contains("quota") && quota_msg.contains("bytes_per_node"),
        "{quota_msg}"
    );
    // SIGHUP: a bigger quota, a floor no node can keep.
    e(
        std::fs::write(
            &d.config,
            "users = [\"pinner\"]\n[quota]\nbytes_per_node = \"512M\"\nregions = 2\n[floor]\ndefault = \"16M\"\nnodes = { 0 = \"100G\" }\n",
        ),
        "rewrite config",
    )?;
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    let second = e(c.allocate(&a), "64 MiB more after SIGHUP")?;
    ensure!(
        e(first.verify(), "verify first")?.intact,
        "the first region broke over SIGHUP"
    );
    let regions = match c.allocate(&Allocate {
        node: n,
        size: 4 << 20,
        ..Allocate::default()
    }) {
        Ok(_) => return Err("a third region passed regions = 2".into()),
        Err(err) => err.to_string(),
    };
    ensure!(regions.contains("2 regions"), "{regions}");
    drop(second);
    let floor = match c.allocate(&Allocate {
        node: ctx.home.0,
        size: 4 << 20,
        ..Allocate::default()
    }) {
        Ok(_) => return Err("node 0 went below a 100G floor".into()),
        Err(err) => err,
    };
    ensure!(
        floor.kind() == numapin::ErrorKind::ResourceLimit
            && floor.to_string().contains("floor of 100 GiB"),
        "{floor}"
    );
    Ok(format!("{user_err} | {quota_msg} | {regions} | {floor}"))
}

/// SIGKILL of a client holding 64 MiB: within a second the daemon's
/// VmLck, the DMA mappings left and node 1's free memory are back.
fn client_sigkill(ctx: &Ctx) -> Result<String, String> {
    let d = Daemon::start(ctx, CONFIG)?;
    let root = d.client()?;
    let (lck0, avail0, free0) = (d.vmlck()?, dma_avail(&root)?, node_free_kb(ctx.away));
    let mut h = Holder::spawn(&d, &format!("{}:64M", ctx.away.0))?;
    ensure!(d.vmlck()? == lck0 + (64 << 20), "not pinned");
    let held_free = node_free_kb(ctx.away);
    e(h.child.kill(), "SIGKILL client")?;
    let _ = h.child.wait();
    let t = Instant::now();
    loop {
        let back = d.vmlck()? == lck0
            && dma_avail(&root)? == avail0
            && e(root.status(), "status")?.total_regions == 0
            && node_free_kb(ctx.away) + 8 * 1024 >= free0;
        if back {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "1 s after SIGKILL: VmLck {} (was {lck0}), DMA avail {:?} (was {avail0:?}), node free {} kB (was {free0}, {held_free} while held)",
            d.vmlck()?,
            dma_avail(&root)?,
            node_free_kb(ctx.away)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(format!(
        "all returned {:.0} ms after SIGKILL (node {} free {} → {} → {} kB)",
        t.elapsed().as_secs_f64() * 1000.0,
        ctx.away,
        free0,
        held_free,
        node_free_kb(ctx.away)
    ))
}

/// The bytes a file holds (`st_blocks` × 512): a memfd's pages, shmem or
/// hugetlb.
fn file_bytes(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, String> {
    // SAFETY: all-zero is a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a borrowed fd into a stat we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    Ok(st.st_blocks as u64 * 512)
}

/// A node's free 2 MiB hugepages.
fn free_huge_2m(node: numapin::NodeId) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/free_hugepages",
        node.0
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// Waits up to a second for `done`; the time it took.
fn within_a_second(mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > Duration::from_secs(1) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(t.elapsed())
}

/// A client that keeps its copy of the memfd, and a mapping of it, after
/// its region ends keeps no memory: numapind punches the file when the
/// region ends. Released through the protocol (4K: node free memory back,
/// the kept mapping reads a fresh zero page) and by a client's SIGKILL
/// after another process took its memfd (2M: the node's free hugepages
/// back). The control: while the region lives the file holds every page.
fn kept_memfd(ctx: &Ctx) -> Result<String, String> {
    const LEN: u64 = 32 << 20;
    let _pool = Knob::set(
        &format!(
            "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/nr_hugepages",
            ctx.away.0
        ),
        "24",
    )?;
    let d = Daemon::start(ctx, CONFIG)?;
    let c = d.client()?;
    let free0 = node_free_kb(ctx.away);
    let r = e(
        c.allocate(&Allocate {
            node: ctx.away.0,
            size: LEN,
            ..Allocate::default()
        }),
        "allocate",
    )?;
    let kept = e(r.memfd().try_clone_to_owned(), "dup the memfd")?;
    // SAFETY: a fresh shared mapping of the kept memfd, LEN long, unmapped
    // below; only raw accesses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            kept.as_raw_fd(),
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "mmap the kept memfd");
    let p = p.cast::<u8>();
    // SAFETY: inside the mapping.
    unsafe { std::ptr::write_bytes(p, 0x5a, LEN as usize) };
    let held = file_bytes(kept.as_fd())?;
    let held_free = node_free_kb(ctx.away);
    ensure!(
        held == LEN,
        "the live region's file holds {held} bytes, not {LEN}"
    );
    ensure!(
        held_free + (LEN >> 10) <= free0 + 8 * 1024,
        "node {} free {free0} → {held_free} kB while a {LEN}-byte region lives there: the check below would prove nothing",
        ctx.away
    );
    e(r.release(), "release")?;
    let took = within_a_second(|| {
        file_bytes(kept.as_fd()).is_ok_and(|b| b == 0) && node_free_kb(ctx.away) + 8 * 1024 >= free0
    });
    // SAFETY: inside the mapping, which is still there; then unmapped.
    let byte = unsafe { std::ptr::read_volatile(p.add(LEN as usize / 2)) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p.cast(), LEN as usize) };
    let Some(took) = took else {
        return Err(format!(
            "1 s after release the kept memfd holds {} bytes, node {} free {} kB (was {free0}, {held_free} while held)",
            file_bytes(kept.as_fd())?,
            ctx.away,
            node_free_kb(ctx.away)
        ));
    };
    ensure!(
        byte == 0,
        "the kept mapping still reads {byte:#x} after release"
    );
    drop(kept);

    // 2M, the client SIGKILLed after another process (this runner) took
    // its memfd through /proc.
    let huge0 = free_huge_2m(ctx.away);
    let mut h = Holder::spawn(&d, &format!("{}:{}M:2M", ctx.away.0, LEN >> 20))?;
    let mut taken = None;
    for fd in e(
        std::fs::read_dir(format!("/proc/{}/fd", h.pid())),
        "client fds",
    )?
    .flatten()
    {
        if std::fs::read_link(fd.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:numapin"))
        {
            taken = Some(e(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(fd.path()),
                "open the client's memfd",
            )?);
        }
    }
    let taken = taken.ok_or("the client holds no memfd:numapin")?;
    let huge_held = free_huge_2m(ctx.away);
    ensure!(
        huge0 >= huge_held + (LEN >> 21) && file_bytes(taken.as_fd())? == LEN,
        "node {} free 2M pages {huge0} → {huge_held} and the file holds {} bytes with a {LEN}-byte 2M region live",
        ctx.away,
        file_bytes(taken.as_fd())?
    );
    e(h.child.kill(), "SIGKILL client")?;
    let _ = h.child.wait();
    let huge_took = within_a_second(|| {
        file_bytes(taken.as_fd()).is_ok_and(|b| b == 0) && free_huge_2m(ctx.away) == huge0
    })
    .ok_or_else(|| {
        format!(
            "1 s after the client's SIGKILL the taken memfd holds {:?} bytes, node {} free 2M pages {} (was {huge0}, {huge_held} while held)",
            file_bytes(taken.as_fd()),
            ctx.away,
            free_huge_2m(ctx.away)
        )
    })?;
    drop(taken);
    let huge_after = free_huge_2m(ctx.away);
    let failed = failed_after_early_memfd(ctx, &d, LEN)?;
    Ok(format!(
        "4K: kept fd and mapping, release: node {} free {free0} → {held_free} → {} kB, file {held} → 0 bytes in {:.0} ms, the mapping reads 0; 2M: memfd taken, client SIGKILLed: free 2M pages {huge0} → {huge_held} → {huge_after} in {:.0} ms; {failed}",
        ctx.away,
        node_free_kb(ctx.away),
        took.as_secs_f64() * 1e3,
        huge_took.as_secs_f64() * 1e3
    ))
}

/// A raw connection to `d` past its hello (for messages the client
/// library would not send).
fn raw_hello(d: &Daemon) -> Result<OwnedFd, String> {
    let sock = e(wire::connect(&d.socket), "connect")?;
    let hello = proto::encode(&proto::Request {
        id: 1,
        op: Op::Hello {
            version: proto::VERSION,
        },
    });
    e(wire::send(sock.as_fd(), &hello, &[]), "hello")?;
    e(wire::recv(sock.as_fd(), proto::MAX_REPLY), "hello reply")?;
    Ok(sock)
}

/// A pin that fails after the early memfd went out (a minimum extent of
/// the whole 4K region, which scattered base pages do not meet): on the
/// wire, the `placed` reply's memfd held the region's pages, and after the
/// final error it holds none; through `numapin::client`, the failed
/// allocate leaves no memfd and no mapping in this process; the daemon's
/// VmLck and the node's free memory come back.
fn failed_after_early_memfd(ctx: &Ctx, d: &Daemon, len: u64) -> Result<String, String> {
    let sock = raw_hello(d)?;
    let (lck0, free0) = (d.vmlck()?, node_free_kb(ctx.away));
    let ask = proto::Allocate {
        device: None,
        node: ctx.away.0,
        size: len,
        page_size: 4096,
        iova: None,
        min_extent: Some(len),
        phys: false,
        early_memfd: true,
    };
    let req = proto::encode(&proto::Request {
        id: 2,
        op: Op::Allocate(ask),
    });
    e(wire::send(sock.as_fd(), &req, &[]), "allocate")?;
    let mut first = e(wire::recv(sock.as_fd(), proto::MAX_REPLY), "first reply")?
        .ok_or("the daemon closed the connection")?;
    let placed = proto::decode_message(&first.bytes).map_err(|b| b.to_string())?;
    ensure!(
        matches!(
            placed,
            proto::Message::Reply {
                id: 2,
                result: Outcome::Placed { len: l, page_size: 4096 }
            } if l == len
        ) && first.fds.len() == 1,
        "the first reply to an early_memfd allocate is {placed:?} with {} fd(s), not placed with the memfd",
        first.fds.len()
    );
    let early = first.fds.pop().expect("one fd");
    let at_placed = file_bytes(early.as_fd())?;
    let last = e(wire::recv(sock.as_fd(), proto::MAX_REPLY), "final reply")?
        .ok_or("the daemon closed the connection")?;
    let why = match proto::decode_message(&last.bytes).map_err(|b| b.to_string())? {
        proto::Message::Reply {
            id: 2,
            result: Outcome::Error(b),
        } => b.message,
        other => {
            return Err(format!(
                "a {len}-byte minimum extent of 4K pages was met ({other:?}): this check needs a pin that fails after placement"
            ));
        }
    };
    ensure!(
        at_placed == len,
        "the early memfd held {at_placed} bytes when it came, not {len}"
    );
    ensure!(last.fds.is_empty(), "the error came with an fd");
    let punched = file_bytes(early.as_fd())?;
    ensure!(
        punched == 0,
        "after the failed pin ({why}) the early memfd still holds {punched} bytes"
    );
    drop((early, last, sock));
    // The same through the client library.
    let c = d.client()?;
    let err = match c.allocate(&Allocate {
        node: ctx.away.0,
        size: len,
        min_extent: Some(len),
        ..Allocate::default()
    }) {
        Ok(_) => return Err("the client's allocate with an unmeetable extent succeeded".into()),
        Err(err) => err.to_string(),
    };
    let fds: Vec<String> = e(std::fs::read_dir("/proc/self/fd"), "own fds")?
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("/memfd:numapin"))
        .collect();
    let maps = e(std::fs::read_to_string("/proc/self/maps"), "own maps")?;
    let mapped = maps
        .lines()
        .filter(|l| l.contains("/memfd:numapin"))
        .count();
    ensure!(
        fds.is_empty() && mapped == 0,
        "after the failed allocate ({err}) this process holds {fds:?} and {mapped} mapping(s) of a numapin memfd"
    );
    let back = within_a_second(|| {
        d.vmlck().is_ok_and(|l| l == lck0) && node_free_kb(ctx.away) + 8 * 1024 >= free0
    });
    ensure!(
        back.is_some(),
        "1 s after the failed allocations: VmLck {:?} (was {lck0}), node free {} kB (was {free0})",
        d.vmlck(),
        node_free_kb(ctx.away)
    );
    Ok(format!(
        "a pin failing after the early memfd ({why}): its memfd {at_placed} → 0 bytes; through the client: nothing left ({err})"
    ))
}

/// SIGKILL of the daemon: the client's next call says so, the kernel drops
/// the pins, and a restarted daemon serves at once on the same socket.
fn daemon_sigkill(ctx: &Ctx) -> Result<String, String> {
    let mut d = Daemon::start(ctx, CONFIG)?;
    let c = d.client()?;
    let r = e(
        c.allocate(&Allocate {
            node: ctx.away.0,
            size: 32 << 20,
            ..Allocate::default()
        }),
        "allocate",
    )?;
    d.signal(libc::SIGKILL);
    e(d.wait(10), "wait for the killed daemon")?;
    let err = match c.status() {
        Ok(_) => return Err("status answered after the daemon died".into()),
        Err(err) => err.to_string(),
    };
    ensure!(
        err.contains("closed the connection") || err.contains("cannot be reached"),
        "{err}"
    );
    drop(r);
    let t = Instant::now();
    let d2 = Daemon::start_with(ctx, d.config.clone(), d.socket.clone())?;
    let ready = t.elapsed();
    let c2 = d2.client()?;
    let r2 = match c2.allocate(&Allocate {
        node: ctx.away.0,
        size: 32 << 20,
        ..Allocate::default()
    }) {
        Ok(r) => r,
        Err(err) => {
            let mut d2 = d2;
            return Err(format!(
                "allocate after restart: {err}; numapind said: {}",
                d2.stderr()
            ));
        }
    };
    ensure!(e(r2.verify(), "verify")?.intact, "not intact");
    Ok(format!(
        "client: {err}; restarted and ready in {:.2} s, serving",
        ready.as_secs_f64()
    ))
}

/// SIGTERM with a client connected: the client hears of the shutdown,
/// the daemon releases and exits 0.
fn sigterm(ctx: &Ctx) -> Result<String, String> {
    let mut d = Daemon::start(ctx, CONFIG)?;
    let c = d.client()?;
    let _r = e(
        c.allocate(&Allocate {
            node: ctx.away.0,
            size: 16 << 20,
            ..Allocate::default()
        }),
        "allocate",
    )?;
    d.signal(libc::SIGTERM);
    let st = d.wait(30)?;
    ensure!(st.code() == Some(0), "numapind exited {st} on SIGTERM");
    let err = match c.status() {
        Ok(_) => return Err("status answered after shutdown".into()),
        Err(err) => err.to_string(),
    };
    ensure!(
        err.contains("shutting down"),
        "the client was not told: {err}"
    );
    ensure!(!d.socket.exists(), "the socket file is left behind");
    Ok(format!("exit 0; client: {err}"))
}

/// 8 clients × CYCLES allocate/release in parallel: nothing leaks.
fn parallel(ctx: &Ctx) -> Result<String, String> {
    // 8 clients × 100 cycles: about 3.5 s under TCG (8 × 40 ran at
    // 239 cycles/s on 6.1).
    const CYCLES: usize = 100;
    let d = Daemon::start(ctx, CONFIG)?;
    let root = d.client()?;
    let (lck0, avail0, fds0) = (d.vmlck()?, dma_avail(&root)?, d.fds());
    let t = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let d = &d;
                s.spawn(move || -> Result<(), String> {
                    let c = d.client()?;
                    for k in 0..CYCLES {
                        let r = e(
                            c.allocate(&Allocate {
                                node: (i % 2) as u32,
                                size: 64 << 10,
                                ..Allocate::default()
                            }),
                            &format!("client {i} cycle {k}"),
                        )?;
                        // SAFETY: inside the mapping.
                        unsafe { std::ptr::write_volatile(r.as_ptr(), k as u8) };
                        e(r.release(), "release")?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Err("panic".into())))
            .collect()
    });
    for r in results {
        r?;
    }
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let s = e(root.status(), "status")?;
    ensure!(s.total_regions == 0, "{} regions left", s.total_regions);
    ensure!(
        d.vmlck()? == lck0,
        "VmLck {} after, {lck0} before",
        d.vmlck()?
    );
    ensure!(
        dma_avail(&root)? == avail0,
        "DMA avail {:?}, was {avail0:?}",
        dma_avail(&root)?
    );
    ensure!(
        d.fds() <= fds0,
        "daemon fds {} after, {fds0} before",
        d.fds()
    );
    Ok(format!(
        "{} allocate/release cycles in {secs:.1} s ({:.0}/s); VmLck, DMA mappings, fds as before",
        8 * CYCLES,
        8.0 * CYCLES as f64 / secs
    ))
}

/// ≥ 10,000 malformed, truncated, oversized, fd-carrying and out-of-order
/// messages: every one gets an answer, fds are closed, the daemon serves.
fn fuzz(ctx: &Ctx) -> Result<String, String> {
    let d = Daemon::start(ctx, CONFIG)?;
    let fds0 = d.fds();
    let sock = raw_hello(&d)?;
    let devnull: OwnedFd = e(std::fs::File::open("/dev/null"), "open /dev/null")?.into();
    // Size 0: a mutation that still parses is refused quickly, or (a digit
    // changed) allocates a small region, which is released below.
    let valid = br#"{"id":7,"op":"allocate","node":1,"size":0,"page_size":4096}"#;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut sent, mut answered, mut with_fds, mut allocated) = (0u32, 0u32, 0u32, 0u32);
    // Batches of 16 in flight (a fuzzer need not keep the one-request rule;
    // the daemon answers in order either way), then every answer is read.
    for batch in 0..625u32 {
        for k in 0..16u32 {
            let i = batch * 16 + k;
            let msg: Vec<u8> = match i % 6 {
                0 => (0..(rng() % 300 + 1)).map(|_| rng() as u8).collect(),
                1 => valid[..(rng() as usize % valid.len()).max(1)].to_vec(),
                2 => vec![b'{'; proto::MAX_REQUEST + 1 + (rng() % 8000) as usize],
                3 => {
                    let mut m = valid.to_vec();
                    let at = rng() as usize % m.len();
                    m[at] = rng() as u8;
                    m
                }
                4 => format!(r#"{{"id":{i},"op":"release","region":{}}}"#, rng()).into_bytes(),
                _ => br#"{"id":1,"op":"verify","region":1}"#.to_vec(),
            };
            let fds: Vec<_> = if i % 5 == 0 {
                vec![devnull.as_fd(), devnull.as_fd()]
            } else {
                vec![]
            };
            with_fds += !fds.is_empty() as u32;
            if wire::send(sock.as_fd(), &msg, &fds).is_err() {
                return Err(format!(
                    "the daemon hung up at message {i}: {}",
                    String::from_utf8_lossy(&msg[..msg.len().min(80)])
                ));
            }
            sent += 1;
        }
        let mut release = Vec::new();
        for _ in 0..16 {
            // Every message is answered: a reply, a refusal, or (a mutated
            // allocate that still parses) an allocation with its memfd.
            match e(wire::recv(sock.as_fd(), proto::MAX_REPLY), "reply")? {
                Some(r) => {
                    answered += 1;
                    if let Ok(proto::Message::Reply {
                        result: Outcome::Allocated(a),
                        id,
                    }) = proto::decode_message(&r.bytes)
                    {
                        release.push((id, a.region));
                    }
                }
                None => return Err(format!("connection closed in batch {batch}")),
            }
        }
        for (id, region) in release {
            allocated += 1;
            let rel = proto::encode(&proto::Request {
                id,
                op: Op::Release { region },
            });
            e(wire::send(sock.as_fd(), &rel, &[]), "release")?;
            e(wire::recv(sock.as_fd(), proto::MAX_REPLY), "release reply")?;
        }
    }
    // A message before hello closes only that connection.
    let other = e(wire::connect(&d.socket), "connect")?;
    e(
        wire::send(other.as_fd(), br#"{"id":1,"op":"status"}"#, &[]),
        "status before hello",
    )?;
    let _ = wire::recv(other.as_fd(), proto::MAX_REPLY);
    drop(other);
    let root = d.client()?;
    let s = e(root.status(), "status after fuzz")?;
    ensure!(s.total_regions == 0, "{} regions left", s.total_regions);
    std::thread::sleep(Duration::from_millis(300));
    let fds = d.fds();
    // The fuzz connection and root's are open (each with a pidfd where
    // the kernel has SO_PEERPIDFD): at most four more than before.
    ensure!(
        fds <= fds0 + 4,
        "the daemon holds {fds} fds, {fds0} before: sent fds were kept"
    );
    let _ = sock.as_raw_fd();
    Ok(format!(
        "{sent} messages ({with_fds} carrying 2 fds), {answered} answered, {allocated} parsed allocates released; daemon alive with {fds} fds (before {fds0})"
    ))
}

/// systemd's own `systemd-socket-activate` listens (SOCK_SEQPACKET) and
/// execs numapind with LISTEN_FDS: the daemon serves on the socket it was
/// given, and reports readiness on the NOTIFY_SOCKET this runner holds.
fn socket_activation(ctx: &Ctx) -> Result<String, String> {
    let tool = PathBuf::from("/bin/systemd-socket-activate");
    ensure!(
        tool.exists(),
        "{} is not in the initramfs: install systemd on the host (xtask copies its systemd-socket-activate)",
        tool.display()
    );
    let dir = PathBuf::from("/tmp/numapind");
    let config = dir.join("numapind.toml");
    e(std::fs::write(&config, CONFIG), "write config")?;
    let socket = dir.join("activated.sock");
    let _ = std::fs::remove_file(&socket);
    let mut tool_cmd = Command::new(&tool);
    tool_cmd
        .arg("--seqpacket")
        .arg(format!("--listen={}", socket.display()));
    let mut d = Daemon::launch_activated(tool_cmd, ctx, config, socket.clone())?;
    let c = d.client()?;
    let r = e(
        c.allocate(&Allocate {
            node: ctx.away.0,
            size: 4 << 20,
            ..Allocate::default()
        }),
        "allocate through the activated socket",
    )?;
    ensure!(e(r.verify(), "verify")?.intact, "not intact");
    drop(r);
    drop(c);
    d.signal(libc::SIGTERM);
    let st = d.wait(30)?;
    ensure!(st.code() == Some(0), "exit {st}");
    let log = std::fs::read_to_string(LOG).unwrap_or_default();
    ensure!(
        log.contains("socket activation: listening on fd 3"),
        "numapind did not take the passed socket: {log}"
    );
    ensure!(
        socket.exists(),
        "numapind removed a socket it did not create"
    );
    Ok("READY=1 on NOTIFY_SOCKET; served a 4 MiB region on fd 3 from systemd-socket-activate; exit 0 on SIGTERM".into())
}

impl Daemon {
    fn launch_activated(
        mut tool: Command,
        ctx: &Ctx,
        config: PathBuf,
        socket: PathBuf,
    ) -> Result<Daemon, String> {
        let notify = PathBuf::from("/tmp/numapind/notify");
        // systemd-socket-activate's options, then the program it execs.
        tool.arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
            .arg(sibling("numapind"))
            .args(["--device", &ctx.bdf, "--config"])
            .arg(&config);
        // systemd-socket-activate execs the program at the first
        // connection: make one once the socket listens. Its file exists
        // from bind(2) on, and a connection before listen(2) is refused.
        Daemon::launch(tool, config, socket, |path| {
            let t = Instant::now();
            loop {
                let within = t.elapsed() < Duration::from_secs(20);
                match wire::connect(path) {
                    Ok(fd) => return Ok(Some(fd)),
                    Err(err)
                        if within
                            && matches!(
                                err.kind(),
                                std::io::ErrorKind::NotFound
                                    | std::io::ErrorKind::ConnectionRefused
                            ) =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(err) => {
                        return Err(format!(
                            "first connection to {} (after {:.1} s): {err}",
                            path.display(),
                            t.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
        })
    }
}

/// The peer is identified by a pidfd where the kernel has SO_PEERPIDFD
/// (Linux 6.5, commit 7b26952a91cf), by its pid on older kernels.
fn peer_identity(ctx: &Ctx) -> Result<String, String> {
    let d = Daemon::start(ctx, CONFIG)?;
    let c = d.client()?;
    let h = c.hello();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    let want = if (major, minor) >= (6, 5) {
        "pidfd"
    } else {
        "pid"
    };
    ensure!(
        h.peer_identity == want,
        "kernel {}: peer identity {}, expected {want}",
        release.trim(),
        h.peer_identity
    );
    ensure!(
        h.pid == std::process::id() as i32 && h.uid == 0,
        "SO_PEERCRED says pid {} uid {}, this is pid {} uid 0",
        h.pid,
        h.uid,
        std::process::id()
    );
    Ok(format!(
        "kernel {}: {} (pid {})",
        release.trim(),
        h.peer_identity,
        h.pid
    ))
}

/// The client's mapping (file range and offset) that holds `vaddr`, from
/// `/proc/PID/maps`: `(start, end, file offset of start)`.
fn vma_of(pid: u32, vaddr: u64) -> Result<(u64, u64, u64), String> {
    let maps = e(std::fs::read_to_string(format!("/proc/{pid}/maps")), "maps")?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let parse = |x: &str| u64::from_str_radix(x, 16).map_err(|e| format!("maps {line:?}: {e}"));
        let (a, b, off) = (parse(a)?, parse(b)?, parse(off)?);
        if (a..b).contains(&vaddr) {
            return Ok((a, b, off));
        }
    }
    Err(format!("no mapping of pid {pid} holds {vaddr:#x}"))
}

/// Hinting faults on memory of the client's node that a thread touching
/// only the client's memory may take (on its own TLS, where the parent
/// thread placed it): at most this many. One scan pass over the client's
/// 4096 pages would take up to 4096.
const BOUND_FAULTS_MAX: u64 = 64;

/// NUMA balancing against a service region. The runner maps the client's
/// pinned memfd itself (through `/proc/PID/map_files`, as root), resets the
/// file's shared policy to the default with `mbind` on that mapping (so the
/// node binding no longer keeps balancing away: only the pin does), and
/// touches it, with an anonymous control and an unpinned memfd control
/// treated like the client's, from the other node's CPUs while the scanner
/// runs fast. The anonymous control must migrate and the client's frames
/// must not change; whether the memfd control migrated says whether this
/// kernel's balancing attacks shmem at all (reported: 7.3's does, 6.1's does
/// not). A twin run touching only the controls for as long gives the
/// hinting faults attributable to the client's memory under that reset
/// (reported: vmstat counts every process's).
///
/// Before the reset, as the daemon serves it (bound to its node), a thread
/// on the other node that touches only the client's memory counts its own
/// hinting faults (`/proc/thread-self/sched`), beside a thread touching an
/// anonymous control, whose pages must move or whose thread must take
/// thousands of faults (balancing ran). The
/// client thread's faults on the client's node must stay at the level a
/// toucher takes on its own pages.
fn numa_balancing(ctx: &Ctx) -> Result<String, String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const LEN: u64 = 16 << 20;
    let d = Daemon::start(ctx, CONFIG)?;
    let h = Holder::spawn(&d, &format!("{}:16M", ctx.home.0))?;
    let vaddr = h.hex("vaddr").ok_or("no vaddr")?;
    let snap = pfns_of(h.pid(), vaddr, LEN)?;
    let (start, end, off) = vma_of(h.pid(), vaddr)?;
    ensure!(
        end - vaddr >= LEN,
        "the client's mapping is shorter than its region"
    );
    let file = e(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/map_files/{start:x}-{end:x}", h.pid())),
        "open the client's memfd through map_files",
    )?;
    // SAFETY: a new shared mapping of the client's memfd; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            (off + (vaddr - start)) as libc::off_t,
        )
    };
    ensure!(
        map != libc::MAP_FAILED,
        "mmap of the memfd: {}",
        std::io::Error::last_os_error()
    );
    let _unmap = Unmap(map, LEN as usize);
    let addr = map as usize;
    ensure!(
        changed(&snap, &pfns(addr, LEN)?) == 0,
        "the runner's mapping of the memfd does not share the client's frames"
    );
    // First as served: the memfd keeps the daemon's binding. One thread on
    // the other node touches only the client's memory, another only an
    // anonymous control; each counts its own hinting faults, in all and on
    // memory of the client's node. THP is off for this process meanwhile:
    // on 6.1 a thread's stack can be a transparent huge page (6.8 made
    // MAP_STACK VM_NOHUGEPAGE), and one hinting fault on it counts 512.
    let bound = crate::balancing::with_fast_balancing(|| {
        use crate::type1::counted_toucher;
        let _thp = ThpOff::set()?;
        let control = control_region(ctx.home, LEN)?;
        let stop = Arc::new(AtomicBool::new(false));
        let home = ctx.home.0;
        let client_t = counted_toucher(
            (addr, LEN as usize),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        let control_t = counted_toucher(
            (control.addr(), LEN as usize),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        // The same loop over one page of its own: what a toucher takes on
        // its own stack, TLS and that page, beside the others.
        let page = control_region(ctx.home, 4096)?;
        let base_t = counted_toucher(
            (page.addr(), 4096),
            ctx.away_cpus.clone(),
            home,
            stop.clone(),
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
            let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096).unwrap_or_default();
            if t.elapsed() > Duration::from_secs(4)
                && on_node(&n, ctx.away) * 2 >= n.len()
                && !n.is_empty()
            {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096).unwrap_or_default();
        let moved = on_node(&n, ctx.away);
        let (cp, cf) = client_t.join().map_err(|_| "the client toucher panicked")?;
        let (kp, kf) = control_t
            .join()
            .map_err(|_| "the control toucher panicked")?;
        let (_, bf) = base_t.join().map_err(|_| "the baseline toucher panicked")?;
        let (Some(cf), Some(kf), Some(bf)) = (cf, kf, bf) else {
            return Err("this kernel shows no total_numa_faults in /proc/thread-self/sched".into());
        };
        Ok(Bound {
            secs: t.elapsed().as_secs_f64(),
            client: cf,
            client_passes: cp,
            control: kf.0,
            control_passes: kp,
            base: bf,
            control_moved: moved,
        })
    })?;
    // The scanner must have reached the control: its pages moved to the
    // toucher's node, or its thread took thousands of faults. The count
    // alone cannot say so: the kernel folds a task's faults into
    // total_numa_faults only at its placement pass, halving the old ones,
    // so a thread whose pages moved in one scan can show a hundred.
    ensure!(
        bound.control_moved * 2 >= LEN as usize / 4096 || bound.control >= 1024,
        "the control thread took only {} hinting faults in {:.0}s ({} passes) and {} of its {} pages moved to node {}: balancing did not run, so the client figure proves nothing",
        bound.control,
        bound.secs,
        bound.control_passes,
        bound.control_moved,
        LEN / 4096,
        ctx.away
    );
    let policy = std::fs::read_to_string("/proc/self/numa_maps")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{addr:x} ")))
        .unwrap_or("not in numa_maps")
        .to_string();
    // The client's memory is all on the home node; the thread's stack is
    // on the other one. Faults on home-node memory beyond the handful a
    // toucher takes on its own TLS and one page are the client's.
    let bound_note = format!(
        "{} hinting faults, {} of them on node {} (the client's), the one-page baseline thread {} and {}",
        bound.client.0, bound.client.1, ctx.home, bound.base.0, bound.base.1
    );
    ensure!(
        bound.client.1 <= BOUND_FAULTS_MAX,
        "the thread touching only the client's memory took {bound_note}: the bound shmem mapping took hinting faults ({policy})"
    );
    e(
        numapin::sys::mbind_default(addr, LEN as usize),
        "mbind MPOL_DEFAULT on the memfd",
    )?;
    crate::balancing::with_fast_balancing(|| {
        let control = control_region(ctx.home, LEN)?;
        let control_before = pfns(control.addr(), LEN)?;
        let (_shm_fd, shm) = memfd_control(ctx.home, LEN as usize)?;
        let shm_before = pfns(shm.0 as usize, LEN)?;
        let run = |ranges: Vec<(usize, usize)>, limit: Duration, until_moved: bool| {
            let (f0, m0) = (vmstat("numa_hint_faults"), vmstat("numa_pages_migrated"));
            let stop = Arc::new(AtomicBool::new(false));
            let t = Instant::now();
            let th = crate::type1::toucher(ranges, ctx.away_cpus.clone(), stop.clone());
            while t.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(500));
                if until_moved && t.elapsed() > Duration::from_secs(4) {
                    let n = numapin::numa::nodes_of(control.addr(), LEN as usize, 4096)
                        .unwrap_or_default();
                    if on_node(&n, ctx.away) * 2 >= n.len() && !n.is_empty() {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let passes = th.join().unwrap_or(0);
            (
                t.elapsed(),
                vmstat("numa_hint_faults") - f0,
                vmstat("numa_pages_migrated") - m0,
                passes,
            )
        };
        let both = vec![
            (addr, LEN as usize),
            (control.addr(), LEN as usize),
            (shm.0 as usize, LEN as usize),
        ];
        let (secs, faults, migrated, passes) = run(both, Duration::from_secs(60), true);
        let cc = changed(&control_before, &pfns(control.addr(), LEN)?);
        let sc = changed(&shm_before, &pfns(shm.0 as usize, LEN)?);
        let client_after = pfns_of(h.pid(), vaddr, LEN)?;
        let pc = changed(&snap, &client_after);
        ensure!(
            pc == 0,
            "{pc} of the client's pinned frames changed under NUMA balancing"
        );
        let nodes = nodes_of_pid(h.pid(), vaddr, LEN, 4096)?;
        ensure!(
            on_node(&nodes, ctx.home) == nodes.len(),
            "{} client pages left node {}",
            nodes.len() - on_node(&nodes, ctx.home),
            ctx.home
        );
        ensure!(
            cc > 0 && migrated > 0,
            "the unpinned control did not migrate ({cc} PFNs changed, numa_pages_migrated +{migrated}, {faults} hinting faults in {:.0}s, {passes} passes): the attack proves nothing",
            secs.as_secs_f64()
        );
        // The client's region is shmem: only where an unpinned memfd
        // treated the same way migrates does the run attack it. 6.1's
        // balancing migrates none (7.3's all): there the anonymous control
        // alone shows balancing ran, and the detail says so.
        let shm_note = if sc > 0 {
            format!("memfd {sc}/{} (the attack reached shmem)", shm_before.len())
        } else {
            format!(
                "memfd 0/{}: this kernel's balancing does not migrate shmem, so it never tried the client's region",
                shm_before.len()
            )
        };
        let (_, twin_faults, _, _) = run(
            vec![
                (control.addr(), LEN as usize),
                (shm.0 as usize, LEN as usize),
            ],
            secs,
            false,
        );
        // vmstat counts every process's faults, so only an excess over the
        // twin says anything about the client's memory.
        let excess = match faults.checked_sub(twin_faults) {
            Some(n) if n > 0 => format!("{n} more than the twin"),
            _ => "no excess over the twin".to_string(),
        };
        Ok(format!(
            "as served (the daemon's binding): in {:.0}s the thread touching only the client's memory ({} passes) took {bound_note}, the control's {} ({}/{} of its pages moved); binding reset to the default: {:.0}s from node {}: client 0/{} frames changed; controls changed: anonymous {cc}/{}, {shm_note}; numa_pages_migrated +{migrated}; hinting faults {faults}, twin run touching only the controls {twin_faults}: {excess}",
            bound.secs,
            bound.client_passes,
            bound.control,
            bound.control_moved,
            LEN / 4096,
            secs.as_secs_f64(),
            ctx.away,
            snap.len(),
            control_before.len(),
        ))
    })
}

/// What the bound phase of [`numa_balancing`] saw: fault counts are
/// `(total, on the client's node)` maxima of the scheduler's windows.
struct Bound {
    secs: f64,
    client: (u64, u64),
    client_passes: u64,
    control: u64,
    control_passes: u64,
    base: (u64, u64),
    control_moved: usize,
}

/// THP off for this process (`PR_SET_THP_DISABLE`) until dropped.
struct ThpOff;

impl ThpOff {
    fn set() -> Result<ThpOff, String> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        ensure!(
            rc == 0,
            "prctl(PR_SET_THP_DISABLE): {}",
            std::io::Error::last_os_error()
        );
        Ok(ThpOff)
    }
}

impl Drop for ThpOff {
    fn drop(&mut self) {
        // SAFETY: as in `set`.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
    }
}

/// A mapping this runner made, unmapped on drop: `(address, length)`.
struct Unmap(*mut libc::c_void, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: a mapping this runner made and no longer uses.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// An unpinned shmem memfd of `len` bytes mapped shared, faulted in on
/// `node` under `MPOL_BIND`, then with its shared policy reset to the
/// default: the client's region as numapind makes it, without the pin.
fn memfd_control(node: numapin::NodeId, len: usize) -> Result<(OwnedFd, Unmap), String> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create returns a new fd this function then owns.
    let fd = unsafe { libc::memfd_create(c"numapin-control".as_ptr(), libc::MFD_CLOEXEC) };
    ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is open and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes the memfd this function owns.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    ensure!(r == 0, "ftruncate: {}", std::io::Error::last_os_error());
    // SAFETY: a new shared mapping of that memfd, owned by the `Unmap`.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    ensure!(
        p != libc::MAP_FAILED,
        "mmap memfd control: {}",
        std::io::Error::last_os_error()
    );
    let m = Unmap(p, len);
    e(
        numapin::sys::mbind(p as usize, len, node, 0),
        "mbind the memfd control",
    )?;
    for off in (0..len).step_by(4096) {
        // SAFETY: inside the mapping just made; volatile, no reference.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(off), 1) };
    }
    e(
        numapin::sys::mbind_default(p as usize, len),
        "mbind MPOL_DEFAULT on the memfd control",
    )?;
    let nodes = e(
        numapin::numa::nodes_of(p as usize, len, 4096),
        "memfd control nodes",
    )?;
    ensure!(
        on_node(&nodes, node) == nodes.len(),
        "memfd control: {} of {} pages on node {node}",
        on_node(&nodes, node),
        nodes.len()
    );
    Ok((fd, m))
}
