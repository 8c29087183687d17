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
                eprintln!("numapind: SIGHUP: config reloaded from {}", c.source);
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
            }
            Err(e) => eprintln!("numapind: SIGHUP: {e}; keeping the old config"),
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
                eprintln!("numapind: signal {sig}: shutting down");
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
                eprintln!("numapind: accept: {e}");
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

fn error(kind: ErrorKind, message: String, hint: &str) -> ErrorBody {
    ErrorBody {
        kind,
        message,
        hint: (!hint.is_empty()).then(|| hint.to_string()),
    }
}

fn from_lib(e: &Error) -> ErrorBody {
    let (message, hint) = e.parts();
    ErrorBody {
        kind: e.kind(),
        message,
        hint,
    }
}

fn refuse(sock: BorrowedFd<'_>, b: ErrorBody) {
    let _ = wire::send(
        sock,
        &proto::encode(&Message::Event(Event::Refused(b))),
        &[],
    );
}

/// A region this connection holds.
struct Held {
    region: PinnedRegion,
    node: u32,
    /// Index in [`Shared::devices`].
    dev: usize,
}

struct Conn<'a> {
    shared: &'a Shared,
    id: u64,
    sock: OwnedFd,
    uid: u32,
    gid: u32,
    pid: i32,
    /// Held for the connection's life where the kernel has SO_PEERPIDFD.
    pidfd: Option<OwnedFd>,
    hello: bool,
    regions: BTreeMap<u64, Held>,
    next_region: u64,
}

impl Conn<'_> {
    fn serve(shared: &Shared, id: u64, sock: OwnedFd) {
        let (pid, uid, gid) = match wire::peer_cred(sock.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("numapind: SO_PEERCRED: {e}");
                return;
            }
        };
        let groups = wire::peer_groups(sock.as_fd()).unwrap_or_default();
        let config = shared.config();
        if !config.allows(uid, gid, &groups) {
            eprintln!(
                "numapind: refused uid {uid} (pid {pid}): not in {}",
                config.source
            );
            refuse(
                sock.as_fd(),
                error(
                    ErrorKind::Permission,
                    format!(
                        "uid {uid} is not allowed to use numapind (not among the users or groups of {})",
                        config.source
                    ),
                    "ask the administrator to add the user or one of its groups to users/groups in numapind.toml",
                ),
            );
            return;
        }
        let mut c = Conn {
            shared,
            id,
            pidfd: wire::peer_pidfd(sock.as_fd()),
            sock,
            uid,
            gid,
            pid,
            hello: false,
            regions: BTreeMap::new(),
            next_region: 1,
        };
        c.run();
        if shared.shutdown.load(Ordering::SeqCst) {
            let m = Message::Event(Event::Shutdown {
                reason: "numapind received SIGTERM".into(),
            });
            let _ = wire::send(c.sock.as_fd(), &proto::encode(&m), &[]);
        }
        let ids: Vec<u64> = c.regions.keys().copied().collect();
        for r in ids {
            if let Err(e) = c.release(r) {
                eprintln!(
                    "numapind: releasing region {r} of pid {}: {}",
                    c.pid, e.message
                );
            }
        }
    }

    fn run(&mut self) {
        loop {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            if !readable(self.sock.as_fd(), 200) {
                continue;
            }
            let got = match wire::recv(self.sock.as_fd(), proto::MAX_REQUEST + 1) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(_) => return,
            };
            let refused = if !got.fds.is_empty() {
                Some(error(
                    ErrorKind::Usage,
                    format!(
                        "a request came with {} file descriptor(s); numapind accepts none and closed them",
                        got.fds.len()
                    ),
                    "send requests without SCM_RIGHTS",
                ))
            } else if got.control_truncated || got.other_control {
                Some(error(
                    ErrorKind::Usage,
                    "a request came with a truncated or unexpected control message and was refused"
                        .into(),
                    "send requests without ancillary data",
                ))
            } else if got.truncated || got.bytes.len() > proto::MAX_REQUEST {
                Some(error(
                    ErrorKind::Usage,
                    format!(
                        "a request is over the {}-byte limit and was refused",
                        proto::MAX_REQUEST
                    ),
                    "send one request per message, as docs/protocol.md describes",
                ))
            } else {
                None
            };
            // The fds, if any, close here.
            drop(got.fds);
            if let Some(b) = refused {
                refuse(self.sock.as_fd(), b);
                continue;
            }
            let req = match proto::decode_request(&got.bytes) {
                Ok(r) => r,
                Err(b) => {
                    refuse(self.sock.as_fd(), b);
                    continue;
                }
            };
            let (result, fd, close) = self.handle(req.op);
            let mut m = Message::Reply { id: req.id, result };
            if proto::encode(&m).len() > proto::MAX_REPLY {
                m = Message::Reply {
                    id: req.id,
                    result: Outcome::Error(error(
                        ErrorKind::Internal,
                        format!("the reply is over the {}-byte limit", proto::MAX_REPLY),
                        "report this to numapin's developers",
                    )),
                };
            }
            let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
            if wire::send(self.sock.as_fd(), &proto::encode(&m), &fds).is_err() {
                return;
            }
            if close {
                return;
            }
        }
    }

    /// The outcome, the fd to send with it, and whether to close after.
    fn handle(&mut self, op: Op) -> (Outcome, Option<OwnedFd>, bool) {
        let ok = |o| (o, None, false);
        if !self.hello && !matches!(op, Op::Hello { .. }) {
            return (
                Outcome::Error(error(
                    ErrorKind::Usage,
                    "the first request on a connection must be hello".into(),
                    "send {\"id\":1,\"op\":\"hello\",\"version\":1} first",
                )),
                None,
                true,
            );
        }
        match op {
            Op::Hello { version } => {
                if version != proto::VERSION {
                    return (
                        Outcome::Error(error(
                            ErrorKind::Usage,
                            format!(
                                "this numapind speaks protocol {}, the client {version}",
                                proto::VERSION
                            ),
                            "use a numapin client of the daemon's version",
                        )),
                        None,
                        true,
                    );
                }
                self.hello = true;
                ok(Outcome::Hello(self.hello_reply()))
            }
            Op::Allocate(a) => match self.allocate(&a) {
                Ok((info, fd)) => (Outcome::Allocated(info), Some(fd), false),
                Err(b) => ok(Outcome::Error(b)),
            },
            Op::Release { region } => ok(match self.release(region) {
                Ok(()) => Outcome::Released { region },
                Err(b) => Outcome::Error(b),
            }),
            Op::Verify { region } => ok(match self.verify(region) {
                Ok(v) => Outcome::Verified(v),
                Err(b) => Outcome::Error(b),
            }),
            Op::Status => ok(Outcome::Status(self.status())),
            Op::Inspect { pid, from } => ok(if self.uid == 0 {
                Outcome::Inspect(self.inspect(pid, from))
            } else {
                Outcome::Error(error(
                    ErrorKind::Permission,
                    "inspect is for root only".into(),
                    "run the inspection as root",
                ))
            }),
            Op::SelftestDma {
                region,
                offset,
                len,
                seed,
            } => ok(match self.selftest(region, offset, len, seed) {
                Ok(bytes) => Outcome::DmaDone { bytes },
                Err(b) => Outcome::Error(b),
            }),
        }
    }

    fn hello_reply(&self) -> proto::Hello {
        let config = self.shared.config();
        let q = config.quota(self.uid);
        proto::Hello {
            version: proto::VERSION,
            daemon: env!("CARGO_PKG_VERSION").into(),
            max_request: proto::MAX_REQUEST,
            max_reply: proto::MAX_REPLY,
            devices: self
                .shared
                .devices
                .iter()
                .map(|(n, p)| proto::Device {
                    name: n.clone(),
                    kind: p.kind().name().into(),
                })
                .collect(),
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
            peer_identity: if self.pidfd.is_some() { "pidfd" } else { "pid" }.into(),
            phys: config.phys(self.uid),
            quota: proto::Quota {
                bytes_per_node: q.bytes_per_node,
                regions: q.regions,
            },
        }
    }

    fn device(&self, name: Option<&str>) -> Result<usize, ErrorBody> {
        match name {
            None => Ok(0),
            Some(n) => self
                .shared
                .devices
                .iter()
                .position(|(d, _)| d == n)
                .ok_or_else(|| {
                    let names: Vec<&str> = self
                        .shared
                        .devices
                        .iter()
                        .map(|(d, _)| d.as_str())
                        .collect();
                    error(
                        ErrorKind::Usage,
                        format!("numapind serves no device `{n}`"),
                        &format!("name one of {} or none for the first", names.join(", ")),
                    )
                }),
        }
    }

    fn allocate(&mut self, a: &Allocate) -> Result<(proto::Allocated, OwnedFd), ErrorBody> {
        let dev = self.device(a.device.as_deref())?;
        let (dev_name, pinner) = &self.shared.devices[dev];
        let page_size = PageSize::ALL
            .into_iter()
            .find(|p| p.bytes() == a.page_size)
            .ok_or_else(|| {
                error(
                    ErrorKind::Usage,
                    format!(
                        "page size {} is none of 4096, 2097152, 1073741824",
                        a.page_size
                    ),
                    "ask for 4K, 2M or 1G pages",
                )
            })?;
        let config = self.shared.config();
        let phys = config.phys(self.uid);
        if pinner.kind() == ContainerKind::NoIommu && !phys {
            return Err(error(
                ErrorKind::Permission,
                format!(
                    "{dev_name} is a no-IOMMU device, whose DMA addresses are physical, and uid {} may not see physical addresses",
                    self.uid
                ),
                "ask the administrator to list the user in phys_users in numapind.toml",
            ));
        }
        let (node, size) = (a.node, a.size);
        let quota = config.quota(self.uid);
        let floor = config.floor(node);
        // Check and reserve under the lock, pin outside it.
        {
            let mut s = self.shared.state();
            let held = s.bytes.get(&(self.uid, node)).copied().unwrap_or(0);
            let count = s.regions.get(&self.uid).copied().unwrap_or(0);
            if count >= quota.regions {
                return Err(error(
                    ErrorKind::ResourceLimit,
                    format!("quota: uid {} holds {count} regions, its limit", self.uid),
                    "release a region, or ask the administrator to raise quota.regions in numapind.toml",
                ));
            }
            if held.saturating_add(size) > quota.bytes_per_node {
                return Err(error(
                    ErrorKind::ResourceLimit,
                    format!(
                        "quota: uid {} holds {} on node {node} and may hold {}; this region needs {} more",
                        self.uid,
                        numapin::addr::human_size(held),
                        numapin::addr::human_size(quota.bytes_per_node),
                        numapin::addr::human_size(size)
                    ),
                    "release regions, or ask the administrator to raise quota.bytes_per_node in numapind.toml",
                ));
            }
            // Hugetlb pages come from the reserved pool, not MemFree: the
            // floor guards base-page regions (the library checks the pool).
            if page_size == PageSize::Base {
                let free = node_free(node);
                let pending = s.pending.get(&node).copied().unwrap_or(0);
                if free.saturating_sub(pending).saturating_sub(size) < floor {
                    return Err(error(
                        ErrorKind::ResourceLimit,
                        format!(
                            "node {node} has {} free{}; pinning {} would take it below numapind's floor of {}",
                            numapin::addr::human_size(free),
                            if pending > 0 {
                                format!(
                                    " ({} of it being pinned now)",
                                    numapin::addr::human_size(pending)
                                )
                            } else {
                                String::new()
                            },
                            numapin::addr::human_size(size),
                            numapin::addr::human_size(floor)
                        ),
                        "use another node or a smaller region, or free memory on the node; the floor is floor in numapind.toml",
                    ));
                }
                *s.pending.entry(node).or_default() += size;
            }
            *s.bytes.entry((self.uid, node)).or_default() += size;
            *s.regions.entry(self.uid).or_default() += 1;
        }
        let req = PinRequest {
            page_size,
            iova: a.iova.map(Iova),
            min_extent: a.min_extent,
            proof: Proof::Full,
            backing: Backing::Memfd,
            ..PinRequest::new(NodeId(node), size)
        };
        let pinned = pinner.pin(&req);
        let mut s = self.shared.state();
        if page_size == PageSize::Base {
            if let Some(p) = s.pending.get_mut(&node) {
                *p -= size;
            }
        }
        let region = match pinned {
            Ok(r) => r,
            Err(e) => {
                unaccount(&mut s, self.uid, node, size);
                return Err(from_lib(&e));
            }
        };
        let fd = match region.memfd().map(|f| f.try_clone_to_owned()) {
            Some(Ok(fd)) => fd,
            other => {
                unaccount(&mut s, self.uid, node, size);
                drop(s);
                drop(region);
                return Err(error(
                    ErrorKind::Internal,
                    format!("the region has no memfd to send ({other:?})"),
                    "report this",
                ));
            }
        };
        let base = numapin::addr::base_page_size();
        let snapshot: Option<Vec<Extent>> = region.pinned_pfns().map(|p| {
            numapin::phys::merge_extents(p.iter().copied(), base)
                .iter()
                .map(|e| Extent {
                    addr: e.pa.raw(),
                    len: e.len,
                })
                .collect()
        });
        let id = self.next_region;
        self.next_region += 1;
        let info = proto::Allocated {
            region: id,
            device: dev_name.clone(),
            iova: region.iova().map(|i| i.raw()),
            phys: match &snapshot {
                Some(v) if phys && v.len() <= proto::MAX_EXTENTS => Some(v.clone()),
                _ => None,
            },
            phys_extents: snapshot.as_ref().filter(|_| phys).map(|v| v.len() as u64),
            len: region.len(),
            node,
            page_size: page_size.bytes(),
            pin: region.pin_kind().into(),
        };
        s.directory.insert(
            (self.id, id),
            Entry {
                uid: self.uid,
                pid: self.pid,
                device: dev_name.clone(),
                node,
                len: region.len(),
                page_size: page_size.bytes(),
                iova: info.iova,
                vaddr: region.vaddr().raw(),
                pfns: snapshot,
            },
        );
        drop(s);
        self.regions.insert(id, Held { region, node, dev });
        Ok((info, fd))
    }

    fn not_mine(&self, region: u64) -> ErrorBody {
        error(
            ErrorKind::Usage,
            format!("this connection holds no region {region}"),
            "name a region id this connection's allocate returned",
        )
    }

    fn release(&mut self, region: u64) -> Result<(), ErrorBody> {
        let held = self
            .regions
            .remove(&region)
            .ok_or_else(|| self.not_mine(region))?;
        let len = held.region.len();
        let r = held.region.release();
        let mut s = self.shared.state();
        s.directory.remove(&(self.id, region));
        unaccount(&mut s, self.uid, held.node, len);
        r.map_err(|e| from_lib(&e))
    }

    fn verify(&self, region: u64) -> Result<proto::Verified, ErrorBody> {
        let h = self
            .regions
            .get(&region)
            .ok_or_else(|| self.not_mine(region))?;
        let v = h.region.verify().map_err(|e| from_lib(&e))?;
        Ok(proto::Verified {
            region,
            pages: v.pages,
            off_node: v.off_node,
            pfn_changed: v.pfn_changed,
            intact: v.is_intact(),
        })
    }

    fn status(&self) -> proto::Status {
        let s = self.shared.state();
        let visible = |uid: u32| self.uid == 0 || uid == self.uid;
        let all: Vec<_> = s.directory.iter().filter(|(_, e)| visible(e.uid)).collect();
        let regions = all
            .iter()
            .take(proto::MAX_LISTED)
            .map(|((_, r), e)| proto::RegionStatus {
                region: *r,
                uid: e.uid,
                pid: e.pid,
                device: e.device.clone(),
                node: e.node,
                len: e.len,
                page_size: e.page_size,
                iova: e.iova,
            })
            .collect();
        let mut usage: Vec<proto::Usage> = Vec::new();
        for e in all.iter().map(|(_, e)| e) {
            match usage
                .iter_mut()
                .find(|u| u.uid == e.uid && u.node == e.node)
            {
                Some(u) => {
                    u.bytes += e.len;
                    u.regions += 1;
                }
                None => usage.push(proto::Usage {
                    uid: e.uid,
                    node: e.node,
                    bytes: e.len,
                    regions: 1,
                }),
            }
        }
        usage.sort_by_key(|u| (u.uid, u.node));
        let total_regions = all.len() as u64;
        let connections = s.connections;
        drop(s);
        proto::Status {
            regions,
            total_regions,
            usage,
            devices: self
                .shared
                .devices
                .iter()
                .map(|(n, p)| proto::DeviceStatus {
                    name: n.clone(),
                    dma_avail: p.refresh_info().ok().flatten().and_then(|i| i.dma_avail),
                })
                .collect(),
            connections,
            pid: std::process::id(),
        }
    }

    fn inspect(&self, pid: Option<i32>, from: u64) -> Vec<proto::Inspected> {
        let s = self.shared.state();
        let from = from.min(usize::MAX as u64) as usize;
        s.directory
            .iter()
            .filter(|(_, e)| pid.is_none_or(|p| p == e.pid))
            .take(8)
            .map(|((_, r), e)| proto::Inspected {
                pid: e.pid,
                region: *r,
                daemon_vaddr: e.vaddr,
                len: e.len,
                pfns: e.pfns.as_ref().map(|v| {
                    v.iter()
                        .skip(from)
                        .take(proto::MAX_EXTENTS)
                        .copied()
                        .collect()
                }),
                total_extents: e.pfns.as_ref().map_or(0, |v| v.len() as u64),
            })
            .collect()
    }

    fn selftest(&self, region: u64, offset: u64, len: u64, seed: u8) -> Result<u64, ErrorBody> {
        if !self.shared.config().selftest(self.uid) {
            return Err(error(
                ErrorKind::Permission,
                format!(
                    "the DMA self-test is for root and selftest_users; uid {} is neither",
                    self.uid
                ),
                "list the user in selftest_users in numapind.toml (test machines only)",
            ));
        }
        let h = self
            .regions
            .get(&region)
            .ok_or_else(|| self.not_mine(region))?;
        if len == 0
            || len > 2048
            || offset
                .checked_add(len)
                .is_none_or(|end| end > h.region.len())
        {
            return Err(error(
                ErrorKind::Usage,
                format!(
                    "a self-test of {len} bytes at {offset:#x} does not fit 1..=2048 bytes (the edu buffer) inside the region"
                ),
                "pick a smaller transfer",
            ));
        }
        let dst = h
            .region
            .iova()
            .ok_or_else(|| {
                error(
                    ErrorKind::Usage,
                    "the region has no IOVA (no-IOMMU device)".into(),
                    "the self-test needs an IOMMU-backed device",
                )
            })?
            .raw()
            + offset;
        let pinner = &self.shared.devices[h.dev].1;
        let _one = self.shared.dma.lock().unwrap_or_else(|p| p.into_inner());
        let fd = pinner
            .device_fd()
            .ok_or_else(|| error(ErrorKind::DeviceState, "the device has no fd".into(), ""))?;
        let edu = numapin::edu::Edu::open(fd)
            .map_err(|e| from_lib(&e))?
            .with_dma_limit(1 << 40);
        // The source: a page of the daemon's own, pinned on the same node,
        // filled by the CPU; the device copies it to the client's region.
        let src = pinner
            .pin(&PinRequest::new(
                NodeId(h.node),
                numapin::addr::base_page_size(),
            ))
            .map_err(|e| from_lib(&e))?;
        for i in 0..len {
            // SAFETY: inside the daemon's own pinned page; volatile for the device.
            unsafe {
                std::ptr::write_volatile(src.as_ptr().add(i as usize), proto::pattern(seed, i))
            };
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let src_iova = src.iova().map(|i| i.raw()).unwrap_or(0);
        edu.dma_to_device(src_iova, len).map_err(|e| from_lib(&e))?;
        edu.dma_from_device(dst, len).map_err(|e| from_lib(&e))?;
        Ok(len)
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
fn node_free(node: u32) -> u64 {
    numapin::numa::Topology::read()
        .ok()
        .and_then(|t| t.node(NodeId(node)).map(|n| n.mem_free))
        .unwrap_or(0)
}

/// Refuses a connection: waits (up to a second) for its first message so
/// that closing does not reset the connection over an unread hello (the
/// client would see ECONNRESET instead of the reason), then answers.
fn refuse_connection(sock: BorrowedFd<'_>, b: ErrorBody) {
    if readable(sock, 1000) {
        let _ = wire::recv(sock, proto::MAX_REQUEST + 1);
    }
    refuse(sock, b);
}
