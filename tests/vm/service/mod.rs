//! Scenario s: numapind, the pinning service. Each scenario starts the
//! daemon (as root, owning the edu device) with its own config, waits for
//! its readiness on a `NOTIFY_SOCKET` this runner listens on, and talks to
//! it as an unprivileged client (uid 1000, no capabilities, memlock 64 KiB)
//! or as root. Evidence is read from outside the daemon: the client's
//! pagemap and nodes, the daemon's VmLck and fds, DMA mappings left, node
//! free memory.
//!
//! This module holds the harness (the daemon, a client as another user, a
//! holder process); the scenarios are in `clients`, `memfd`, `lifecycle`
//! and `balance`.

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
use crate::daemon;
use crate::ensure;
use crate::util::*;

mod balance;
mod clients;
mod lifecycle;
mod memfd;

use balance::*;
use clients::*;
use lifecycle::*;
use memfd::*;

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
