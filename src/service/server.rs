//! The daemon's state and its connections.
//!
//! Each connection has its own thread and owns its regions: when it ends
//! (release, close, a crashed client, shutdown) the thread drops them, and
//! each drop unmaps the IOVA, unpins and frees at once. What all threads
//! share is behind one mutex: the per-user usage the quotas are checked
//! against, the bytes being pinned per node (for the floor), and a
//! directory of every region for `status` and `inspect`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use numapin::client::proto::{self, Allocate, ErrorBody, Event, Extent, Message, Op, Outcome};
use numapin::client::wire;
use numapin::{
    Backing, ContainerKind, Error, ErrorKind, Iova, NodeId, PageSize, PinRequest, PinnedRegion,
    Pinner, Proof,
};

use crate::config::Config;

mod alloc;
mod conn;

use conn::{Conn, error, refuse_connection};

/// Set when the listening socket came from systemd (it is not ours to
/// remove).
pub static ACTIVATED: AtomicBool = AtomicBool::new(false);

/// What one region is, for `status` and `inspect`.
#[derive(Debug, Clone)]
struct Entry {
    uid: u32,
    pid: i32,
    device: String,
    node: u32,
    len: u64,
    page_size: u64,
    iova: Option<u64>,
    vaddr: u64,
    pfns: Option<Vec<Extent>>,
}

#[derive(Debug, Default)]
struct State {
    /// (uid, node) → bytes held.
    bytes: HashMap<(u32, u32), u64>,
    /// uid → regions held.
    regions: HashMap<u32, u64>,
    /// node → bytes being pinned right now (not yet in MemFree's drop).
    pending: HashMap<u32, u64>,
    /// (connection, region) → what it is.
    directory: BTreeMap<(u64, u64), Entry>,
    connections: u64,
}

/// Everything the threads share.
pub struct Shared {
    devices: Vec<(String, Pinner)>,
    config: RwLock<Arc<Config>>,
    config_path: PathBuf,
    config_optional: bool,
    state: Mutex<State>,
    /// Signalled when a connection ends.
    ended: Condvar,
    max_connections: usize,
    pub shutdown: AtomicBool,
    next_conn: AtomicU64,
    /// One edu transfer at a time per daemon.
    dma: Mutex<()>,
}

impl Shared {
    pub fn new(
        devices: Vec<(String, Pinner)>,
        config: Config,
        config_path: PathBuf,
        config_optional: bool,
        max_connections: usize,
    ) -> Shared {
        Shared {
            devices,
            config: RwLock::new(Arc::new(config)),
            config_path,
            config_optional,
            state: Mutex::new(State::default()),
            ended: Condvar::new(),
            max_connections,
            shutdown: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            dma: Mutex::new(()),
        }
    }

    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every connection thread has released its regions.
    pub fn wait_for_connections(&self) {
        let mut s = self.state();
        while s.connections > 0 {
            s = self
                .ended
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn reload(&self) {
        match Config::load(&self.config_path, self.config_optional) {
            Ok(c) => {
                log::info!("SIGHUP: config reloaded from {}", c.source);
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
            }
            Err(e) => log::error!("SIGHUP: {e}; keeping the old config"),
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and the threads it
/// starts afterwards).
pub fn block_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the
    // calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("pthread_sigmask failed".into());
        }
        Ok(set)
    }
}

/// SIGTERM/SIGINT: stop; SIGHUP: reload the config.
pub fn spawn_signal_thread(shared: Arc<Shared>, set: libc::sigset_t) {
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: waiting on a set blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if sig == libc::SIGHUP {
                shared.reload();
            } else {
                log::info!("signal {sig}: shutting down");
                shared.shutdown.store(true, Ordering::SeqCst);
                return;
            }
        }
    });
}

/// `--socket-group`: chown to the group and chmod 0660; otherwise 0666.
pub fn set_socket_owner(path: &Path, group: Option<&str>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match group {
        Some(g) => {
            let gid = std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let mut f = l.split(':');
                    (f.next()? == g).then(|| f.nth(1)?.parse::<u32>().ok())?
                })
                .ok_or_else(|| format!("no group `{g}` in /etc/group"))?;
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
            0o660
        }
        None => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// Waits up to `ms` for `fd` to be readable; false on timeout.
fn readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Accepts until shutdown.
pub fn accept_loop(shared: &Arc<Shared>, listener: BorrowedFd<'_>) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        if !readable(listener, 200) {
            continue;
        }
        let sock = match wire::accept(listener) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        {
            let mut s = shared.state();
            if s.connections as usize >= shared.max_connections {
                drop(s);
                refuse_connection(
                    sock.as_fd(),
                    error(
                        ErrorKind::ResourceLimit,
                        format!(
                            "numapind serves {} connections at once and has that many",
                            shared.max_connections
                        ),
                        "retry later, or raise numapind's --max-connections",
                    ),
                );
                continue;
            }
            s.connections += 1;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let sh = shared.clone();
        std::thread::spawn(move || {
            Conn::serve(&sh, id, sock);
            let mut s = sh.state();
            s.connections -= 1;
            sh.ended.notify_all();
        });
    }
}

fn unaccount(s: &mut State, uid: u32, node: u32, size: u64) {
    if let Some(b) = s.bytes.get_mut(&(uid, node)) {
        *b = b.saturating_sub(size);
        if *b == 0 {
            s.bytes.remove(&(uid, node));
        }
    }
    if let Some(r) = s.regions.get_mut(&uid) {
        *r = r.saturating_sub(1);
        if *r == 0 {
            s.regions.remove(&uid);
        }
    }
}

/// A node's MemFree in bytes (0 if unreadable: nothing is allocated then).
/// One sysfs file, read under the state lock: the whole topology
/// (`Topology::read`, every node's files) took 3 ms per allocation in the
/// bench VM.
fn node_free(node: u32) -> u64 {
    std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/meminfo"))
        .ok()
        .and_then(|t| numapin::numa::parse_node_meminfo(&t, "MemFree"))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_free_reads_the_node_and_fails_closed() {
        // A NUMA kernel has node 0; no host has node 4095 (MAX_NUMNODES
        // is at most 1024).
        if std::path::Path::new("/sys/devices/system/node/node0").exists() {
            assert!(node_free(0) > 0);
        }
        assert_eq!(node_free(4095), 0);
    }
}
