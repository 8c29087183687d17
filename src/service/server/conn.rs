//! One connection: its thread reads requests, answers them, and owns the
//! regions it allocated, so that they go when it ends.

use super::*;

pub(super) fn error(kind: ErrorKind, message: String, hint: &str) -> ErrorBody {
    ErrorBody {
        kind,
        message,
        hint: (!hint.is_empty()).then(|| hint.to_string()),
    }
}

pub(super) fn from_lib(e: &Error) -> ErrorBody {
    let (message, hint) = e.parts();
    ErrorBody {
        kind: e.kind(),
        message,
        hint,
    }
}

pub(super) fn refuse(sock: BorrowedFd<'_>, b: ErrorBody) {
    let _ = wire::send(
        sock,
        &proto::encode(&Message::Event(Event::Refused(b))),
        &[],
    );
}

/// A region this connection holds.
pub(super) struct Held {
    pub(super) region: PinnedRegion,
    pub(super) node: u32,
    /// Index in [`Shared::devices`].
    pub(super) dev: usize,
}

pub(super) struct Conn<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
    pub(super) sock: OwnedFd,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) pid: i32,
    /// Held for the connection's life where the kernel has SO_PEERPIDFD.
    pub(super) pidfd: Option<OwnedFd>,
    pub(super) hello: bool,
    pub(super) regions: BTreeMap<u64, Held>,
    pub(super) next_region: u64,
    /// The last allocation's times, for the debug log after its reply.
    pub(super) timing: Option<AllocTiming>,
    /// The id of the request being handled (an early reply carries it).
    pub(super) request: u64,
}

/// Where an allocation's time went, logged at debug level.
pub(super) struct AllocTiming {
    pub(super) region: u64,
    pub(super) size: u64,
    pub(super) node: u32,
    /// From the request to the pin: quota, floor, reservation.
    pub(super) checked: std::time::Duration,
    /// `Pinner::pin`.
    pub(super) pinned: std::time::Duration,
    /// From the pin's start to the reply ready.
    pub(super) ready: std::time::Duration,
}

impl Conn<'_> {
    pub(super) fn serve(shared: &Shared, id: u64, sock: OwnedFd) {
        let (pid, uid, gid) = match wire::peer_cred(sock.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("SO_PEERCRED: {e}");
                return;
            }
        };
        let groups = wire::peer_groups(sock.as_fd()).unwrap_or_default();
        let config = shared.config();
        if !config.allows(uid, gid, &groups) {
            log::warn!("refused uid {uid} (pid {pid}): not in {}", config.source);
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
            timing: None,
            request: 0,
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
                log::error!("releasing region {r} of pid {}: {}", c.pid, e.message);
            }
        }
    }

    pub(super) fn run(&mut self) {
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
            let started = std::time::Instant::now();
            let what = req.op.name();
            self.request = req.id;
            let (result, fd, close) = self.handle(req.op);
            let handled = started.elapsed();
            let mut bytes = proto::encode(&Message::Reply { id: req.id, result });
            if bytes.len() > proto::MAX_REPLY {
                bytes = proto::encode(&Message::Reply {
                    id: req.id,
                    result: Outcome::Error(error(
                        ErrorKind::Internal,
                        format!("the reply is over the {}-byte limit", proto::MAX_REPLY),
                        "report this to numapin's developers",
                    )),
                });
            }
            let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
            if wire::send(self.sock.as_fd(), &bytes, &fds).is_err() {
                return;
            }
            let answered = started.elapsed();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            if let Some(t) = self.timing.take() {
                log::debug!(
                    "pid {} region {}: {} on node {} checked in {:.3} ms, pinned in {:.3} ms, ready to send in {:.3} ms",
                    self.pid,
                    t.region,
                    numapin::addr::human_size(t.size),
                    t.node,
                    ms(t.checked),
                    ms(t.pinned),
                    ms(t.ready)
                );
            }
            log::debug!(
                "pid {} {what}: answered in {:.3} ms (handled in {:.3} ms, a {}-byte reply)",
                self.pid,
                ms(answered),
                ms(handled),
                bytes.len()
            );
            if close {
                return;
            }
        }
    }

    /// The outcome, the fd to send with it, and whether to close after.
    pub(super) fn handle(&mut self, op: Op) -> (Outcome, Option<OwnedFd>, bool) {
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

    pub(super) fn hello_reply(&self) -> proto::Hello {
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

    pub(super) fn device(&self, name: Option<&str>) -> Result<usize, ErrorBody> {
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

    pub(super) fn not_mine(&self, region: u64) -> ErrorBody {
        error(
            ErrorKind::Usage,
            format!("this connection holds no region {region}"),
            "name a region id this connection's allocate returned",
        )
    }

    pub(super) fn release(&mut self, region: u64) -> Result<(), ErrorBody> {
        let held = self
            .regions
            .remove(&region)
            .ok_or_else(|| self.not_mine(region))?;
        let len = held.region.len();
        // The client may keep its copy of the memfd, or a mapping of it,
        // after the region ends; without the hole those pages would live
        // on, charged to the daemon and outside every quota.
        let file = held.region.memfd().map(|f| f.try_clone_to_owned());
        let r = held.region.release();
        match file {
            Some(Ok(f)) => {
                if let Err(e) = numapin::memfd::discard(f.as_fd(), len) {
                    log::error!(
                        "region {region} of pid {}: punching its memfd failed ({e}); a client that kept the fd keeps its pages",
                        self.pid
                    );
                }
            }
            Some(Err(e)) => log::error!(
                "region {region} of pid {}: no fd to punch its memfd ({e}); a client that kept the fd keeps its pages",
                self.pid
            ),
            None => {}
        }
        let mut s = self.shared.state();
        s.directory.remove(&(self.id, region));
        unaccount(&mut s, self.uid, held.node, len);
        r.map_err(|e| from_lib(&e))
    }

    pub(super) fn verify(&self, region: u64) -> Result<proto::Verified, ErrorBody> {
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

    pub(super) fn status(&self) -> proto::Status {
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

    pub(super) fn inspect(&self, pid: Option<i32>, from: u64) -> Vec<proto::Inspected> {
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
}

/// Refuses a connection: waits (up to a second) for its first message so
/// that closing does not reset the connection over an unread hello (the
/// client would see ECONNRESET instead of the reason), then answers.
pub(super) fn refuse_connection(sock: BorrowedFd<'_>, b: ErrorBody) {
    if readable(sock, 1000) {
        let _ = wire::recv(sock, proto::MAX_REQUEST + 1);
    }
    refuse(sock, b);
}
