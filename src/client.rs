//! The client of `numapind`, the pinning service: pinned, node-local
//! memory with IOVAs for a process that holds no device and no privilege.
//!
//! The daemon allocates a sealed memfd on the node, pins it through its
//! device and sends the fd; [`Client::allocate`] maps it `MAP_SHARED`, so
//! the caller's mapping shares the pinned frames. Dropping the
//! [`Region`] releases it; so does closing the connection, and the daemon's
//! death drops every pin (the next call reports it).
//!
//! ```no_run
//! # fn main() -> numapin::Result<()> {
//! let client = numapin::client::Client::connect(numapin::client::DEFAULT_SOCKET)?;
//! let region = client.allocate(&numapin::client::Allocate {
//!     node: 1,
//!     size: 64 << 20,
//!     ..numapin::client::Allocate::default()
//! })?;
//! println!("{:p} {} bytes, IOVA {:?}", region.as_ptr(), region.len(), region.iova());
//! # Ok(()) }
//! ```

pub mod proto;
pub mod wire;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use proto::{Event, Message, Op, Outcome, Request};

/// Where numapind listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/numapin/numapin.sock";

/// What to allocate (page size in bytes; 0 means 4 KiB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocate {
    /// The daemon's device to pin through (`None`: its first).
    pub device: Option<String>,
    /// NUMA node.
    pub node: u32,
    /// Bytes.
    pub size: u64,
    /// Page size in bytes (0: 4 KiB).
    pub page_size: u64,
    /// A fixed IOVA.
    pub iova: Option<u64>,
    /// The shortest physically contiguous extent accepted.
    pub min_extent: Option<u64>,
    /// Ask for the region's physical extents ([`Region::info`]'s `phys`;
    /// users in the daemon's `phys_users` only). A no-IOMMU device's
    /// extents come unasked: they are its DMA addresses.
    pub phys: bool,
}

struct Conn {
    sock: OwnedFd,
    next_id: u64,
    /// Set once the daemon said it stops or the connection ended.
    gone: Option<String>,
}

/// A connection to numapind. Cheap to share: regions hold it to release
/// themselves.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Mutex<Conn>>,
    hello: Arc<proto::Hello>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("hello", &self.hello)
            .finish()
    }
}

fn gone_error(why: &str) -> Error {
    Error::Service {
        kind: ErrorKind::DeviceState,
        message: format!("numapind {why}"),
        hint: Some(
            "every pin it held for this connection is gone; reconnect once the daemon runs (systemctl start numapin.socket)"
                .into(),
        ),
    }
}

impl Client {
    /// Connects to the daemon's socket and says hello.
    ///
    /// # Errors
    /// [`Error::Sys`] when the socket cannot be reached, [`Error::Service`]
    /// when the daemon refuses this user or speaks another version.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let sock = wire::connect(path).map_err(|e| {
            Error::sys(
                format!("connect to numapind at {}", path.display()),
                "is numapind running (systemctl start numapin.socket), and is this user in the socket's group?",
                e,
            )
        })?;
        let conn = Arc::new(Mutex::new(Conn {
            sock,
            next_id: 1,
            gone: None,
        }));
        let (out, _) = call(
            &conn,
            Op::Hello {
                version: proto::VERSION,
            },
        )?;
        match out {
            Outcome::Hello(h) => Ok(Client {
                conn,
                hello: Arc::new(h),
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// What the daemon said at hello: devices, this user's quota, whether
    /// replies carry physical addresses.
    pub fn hello(&self) -> &proto::Hello {
        &self.hello
    }

    /// Allocates, pins and maps a region. The region is mapped shared and
    /// every page is mapped before this returns (no first-touch faults); a
    /// base-page region of 64 MiB or more is mapped by up to four
    /// short-lived threads. The client asks for the memfd early
    /// ([`proto::Allocate::early_memfd`]): it maps and populates the
    /// region while the daemon still pins and proves it, so the two costs
    /// overlap instead of adding up.
    ///
    /// # Errors
    /// The daemon's refusal ([`Error::Service`] with the library's class:
    /// quota, floor, node, sizes), or the mapping's failure. An early
    /// mapping of a region that then fails is unmapped and its fd closed.
    pub fn allocate(&self, req: &Allocate) -> Result<Region> {
        let op = Op::Allocate(proto::Allocate {
            device: req.device.clone(),
            node: req.node,
            size: req.size,
            page_size: if req.page_size == 0 {
                4096
            } else {
                req.page_size
            },
            iova: req.iova,
            min_extent: req.min_extent,
            phys: req.phys,
            early_memfd: true,
        });
        // The early mapping: (address or MAP_FAILED, length, fd).
        let mut early: Option<Mapped> = None;
        let got = call_with(&self.conn, op, &mut |o, fds| {
            if let (Outcome::Placed { len, page_size }, Some(fd)) = (o, fds.into_iter().next()) {
                let p = map_populated(fd.as_fd(), *len as usize, *page_size);
                early = Some(Mapped {
                    ptr: p,
                    len: *len,
                    fd,
                });
            }
        });
        let (out, fds) = match got {
            Ok(r) => r,
            Err(e) => {
                drop(early);
                return Err(e);
            }
        };
        let info = match out {
            Outcome::Allocated(a) => a,
            other => return Err(unexpected(&other)),
        };
        let release = |why: Error| {
            let _ = call(
                &self.conn,
                Op::Release {
                    region: info.region,
                },
            );
            why
        };
        // The early mapping serves if it is of the region's length; else
        // (an old daemon, or none came) the final reply's memfd is mapped.
        let m = match early.take() {
            Some(m) if m.len == info.len && m.ptr != libc::MAP_FAILED => m,
            other => {
                drop(other);
                let Some(fd) = fds.into_iter().next() else {
                    return Err(release(Error::Service {
                        kind: ErrorKind::Internal,
                        message: "numapind's allocate reply carried no memfd".into(),
                        hint: Some("report this; the region was released".into()),
                    }));
                };
                let ptr = map_populated(fd.as_fd(), info.len as usize, info.page_size);
                Mapped {
                    ptr,
                    len: info.len,
                    fd,
                }
            }
        };
        if m.ptr == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            return Err(release(Error::sys(
                format!("mmap of the {:#x}-byte region numapind sent", info.len),
                "",
                err,
            )));
        }
        let (ptr, memfd) = m.into_parts();
        Ok(Region {
            client: self.clone(),
            ptr: ptr.cast(),
            memfd,
            info,
            released: false,
        })
    }

    /// The daemon's status (own regions; root sees everyone's).
    ///
    /// # Errors
    /// The connection's or the daemon's errors.
    pub fn status(&self) -> Result<proto::Status> {
        match call(&self.conn, Op::Status)?.0 {
            Outcome::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Root only: the regions of `pid` (every region: `None`) with the
    /// daemon's mapping and its whole PFN snapshot (fetched in pages).
    ///
    /// # Errors
    /// [`Error::Service`] (`permission`) for anyone but root.
    pub fn inspect(&self, pid: Option<i32>) -> Result<Vec<proto::Inspected>> {
        let mut out: Vec<proto::Inspected> = Vec::new();
        let mut from = 0u64;
        loop {
            let page = match call(&self.conn, Op::Inspect { pid, from })?.0 {
                Outcome::Inspect(v) => v,
                other => return Err(unexpected(&other)),
            };
            let mut more = false;
            for r in page {
                more |= from + (proto::MAX_EXTENTS as u64) < r.total_extents;
                match out
                    .iter_mut()
                    .find(|o| o.pid == r.pid && o.region == r.region)
                {
                    Some(o) => {
                        if let (Some(a), Some(b)) = (o.pfns.as_mut(), r.pfns) {
                            a.extend(b);
                        }
                    }
                    None => out.push(r),
                }
            }
            if !more {
                return Ok(out);
            }
            from += proto::MAX_EXTENTS as u64;
        }
    }

    /// Sends any operation and returns the outcome (errors included as
    /// [`Outcome::Error`] are turned into [`Error::Service`]).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub fn request(&self, op: Op) -> Result<Outcome> {
        Ok(call(&self.conn, op)?.0)
    }
}

fn unexpected(o: &Outcome) -> Error {
    Error::Service {
        kind: ErrorKind::Internal,
        message: format!("numapind sent an unexpected reply: {o:?}"),
        hint: Some("the daemon and this client disagree on the protocol; update both".into()),
    }
}

/// Regions from this size on are populated by several threads.
const PARALLEL_POPULATE_MIN: usize = 64 << 20;
/// At most this many populating threads.
const POPULATE_THREADS_MAX: usize = 4;

/// Maps the region's memfd shared, read-write, and maps every page now (the
/// pages exist and are pinned: populating maps them, it allocates
/// nothing), so the first touch takes no fault. `MAP_FAILED` (with
/// `errno`) if the mmap fails.
///
/// Populating costs about what the daemon's own prefault of the same
/// region does per page in the bench VM (a read fault that maps 16 pages
/// at a time through the page cache's fault-around, and a page-table
/// walk per page); base-page regions from [`PARALLEL_POPULATE_MIN`] on run on up to
/// [`POPULATE_THREADS_MAX`] threads, each `MADV_POPULATE_READ` (Linux
/// 5.14) over its share. Read faults suffice: a shared shmem or hugetlb
/// mapping needs no write notification, so its PTEs come writable. Where
/// `MADV_POPULATE_READ` is refused (older kernels), the mapping falls back
/// to `MAP_POPULATE`, which takes the same read faults on one thread.
fn map_populated(fd: BorrowedFd<'_>, len: usize, page_size: u64) -> *mut libc::c_void {
    // Hugepages take one entry each: one thread maps them quickly.
    let threads = if len >= PARALLEL_POPULATE_MIN && page_size == crate::addr::base_page_size() {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(POPULATE_THREADS_MAX)
    } else {
        1
    };
    let map = |flags| {
        // SAFETY: a fresh shared mapping of the memfd at a kernel-chosen
        // address aliases nothing; the memfd's size is sealed at `len`.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | flags,
                fd.as_raw_fd(),
                0,
            )
        }
    };
    if threads < 2 {
        return map(libc::MAP_POPULATE);
    }
    let p = map(0);
    if p == libc::MAP_FAILED {
        return p;
    }
    if populate_in_threads(p as usize, len, threads) {
        return p;
    }
    // SAFETY: the mapping made above; nothing refers to it yet.
    unsafe { libc::munmap(p, len) };
    map(libc::MAP_POPULATE)
}

/// `MADV_POPULATE_READ` over `[base, base+len)` in `threads` shares
/// (2 MiB-aligned), one thread each; false if any thread could not be
/// created or any share failed.
fn populate_in_threads(base: usize, len: usize, threads: usize) -> bool {
    let share = (len / threads).next_multiple_of(2 << 20);
    // No thread populates before all exist: creating a thread maps its
    // stack, which needs the mmap lock for writing and so would wait for a
    // sibling's whole MADV_POPULATE_READ, which holds it for reading (the
    // library's prefault gates its threads for the same reason). The gate
    // holds (threads ready, open, abandon).
    let gate = (
        Mutex::new((0usize, false, false)),
        std::sync::Condvar::new(),
    );
    std::thread::scope(|s| {
        let gate = &gate;
        // A thread that cannot be created (RLIMIT_NPROC, pids.max) fails
        // the threaded populate: the mapping is made again with
        // MAP_POPULATE below.
        let hs: Vec<_> = (0..threads)
            .filter(|i| i * share < len)
            .map(|i| {
                std::thread::Builder::new().spawn_scoped(s, move || {
                    let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
                    g.0 += 1;
                    gate.1.notify_all();
                    while !g.1 {
                        g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    if g.2 {
                        return false;
                    }
                    drop(g);
                    let off = i * share;
                    // SAFETY: advice on a part of the mapping made above.
                    let r = unsafe {
                        libc::madvise(
                            (base + off) as *mut libc::c_void,
                            share.min(len - off),
                            crate::sys::MADV_POPULATE_READ,
                        )
                    };
                    r == 0
                })
            })
            .collect();
        let started = hs.iter().filter(|h| h.is_ok()).count();
        let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 < started {
            g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.1 = true;
        g.2 = started < hs.len();
        gate.1.notify_all();
        drop(g);
        // The scope joins any thread left when this stops at a failure.
        hs.into_iter()
            .all(|h| h.is_ok_and(|h| h.join().unwrap_or(false)))
    })
}

/// A mapping of a region's memfd (unmapped and closed on drop unless
/// taken apart).
struct Mapped {
    /// The address, or `MAP_FAILED`.
    ptr: *mut libc::c_void,
    len: u64,
    fd: OwnedFd,
}

impl Mapped {
    fn into_parts(self) -> (*mut libc::c_void, OwnedFd) {
        let m = std::mem::ManuallyDrop::new(self);
        // SAFETY: `m` is never dropped, so the fd is moved out once.
        (m.ptr, unsafe { std::ptr::read(&m.fd) })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.ptr != libc::MAP_FAILED {
            // SAFETY: the mapping map_populated made; nothing refers to it.
            unsafe { libc::munmap(self.ptr, self.len as usize) };
        }
    }
}

/// One request, its reply (and any fds that came with it).
fn call(conn: &Mutex<Conn>, op: Op) -> Result<(Outcome, Vec<OwnedFd>)> {
    call_with(conn, op, &mut |_, _| {})
}

/// [`call`], handing an early reply to the same request
/// ([`Outcome::Placed`]) and its fds to `early` before waiting on for the
/// final one.
fn call_with(
    conn: &Mutex<Conn>,
    op: Op,
    early: &mut dyn FnMut(&Outcome, Vec<OwnedFd>),
) -> Result<(Outcome, Vec<OwnedFd>)> {
    let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = &c.gone {
        return Err(gone_error(why));
    }
    let id = c.next_id;
    c.next_id += 1;
    let bytes = proto::encode(&Request { id, op });
    if let Err(e) = wire::send(c.sock.as_fd(), &bytes, &[]) {
        // The daemon may have said why before it closed (a shutdown, a
        // refusal): that message is still queued here.
        let mut why = format!("cannot be reached any more ({e})");
        if let Ok(Some(m)) = wire::recv(c.sock.as_fd(), proto::MAX_REPLY) {
            match proto::decode_message(&m.bytes) {
                Ok(Message::Event(Event::Shutdown { reason })) => {
                    why = format!("is shutting down ({reason})");
                }
                Ok(Message::Event(Event::Refused(b))) => {
                    c.gone = Some(b.message.clone());
                    return Err(Error::Service {
                        kind: b.kind,
                        message: b.message,
                        hint: b.hint,
                    });
                }
                _ => {}
            }
        }
        c.gone = Some(why.clone());
        return Err(gone_error(&why));
    }
    loop {
        let got = match wire::recv(c.sock.as_fd(), proto::MAX_REPLY) {
            Ok(Some(m)) => m,
            Ok(None) => {
                let why = "closed the connection".to_string();
                c.gone = Some(why.clone());
                return Err(gone_error(&why));
            }
            Err(e) => {
                let why = format!("connection failed ({e})");
                c.gone = Some(why.clone());
                return Err(gone_error(&why));
            }
        };
        let msg = proto::decode_message(&got.bytes).map_err(|e| Error::Service {
            kind: ErrorKind::Internal,
            message: format!("numapind sent a message this client cannot read: {e}"),
            hint: Some("update numapin and numapind to the same version".into()),
        })?;
        match msg {
            Message::Reply {
                id: rid,
                result: result @ Outcome::Placed { .. },
            } if rid == id => early(&result, got.fds),
            Message::Reply { id: rid, result } if rid == id => {
                return match result {
                    Outcome::Error(b) => Err(Error::Service {
                        kind: b.kind,
                        message: b.message,
                        hint: b.hint,
                    }),
                    ok => Ok((ok, got.fds)),
                };
            }
            // A reply to an earlier, abandoned request: skip it.
            Message::Reply { .. } => {}
            Message::Event(Event::Shutdown { reason }) => {
                let why = format!("is shutting down ({reason})");
                c.gone = Some(why.clone());
                return Err(gone_error(&why));
            }
            Message::Event(Event::Refused(b)) => {
                return Err(Error::Service {
                    kind: b.kind,
                    message: b.message,
                    hint: b.hint,
                });
            }
        }
    }
}

/// A region pinned by the daemon and mapped here. Dropping it unmaps it
/// and asks the daemon to release it.
pub struct Region {
    client: Client,
    ptr: *mut u8,
    memfd: OwnedFd,
    info: proto::Allocated,
    released: bool,
}

// SAFETY: the region is a plain shared mapping and an fd; nothing in it
// is tied to the thread that made it.
unsafe impl Send for Region {}
// SAFETY: shared access hands out only the raw pointer and copies.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("ptr", &self.ptr)
            .field("info", &self.info)
            .finish()
    }
}

impl Region {
    /// The first byte of this process's mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> u64 {
        self.info.len
    }

    /// Never: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.info.len == 0
    }

    /// The IOVA of byte 0 (`None` for a no-IOMMU device).
    pub fn iova(&self) -> Option<u64> {
        self.info.iova
    }

    /// The node.
    pub fn node(&self) -> u32 {
        self.info.node
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.info.page_size
    }

    /// The region's id on this connection.
    pub fn id(&self) -> u64 {
        self.info.region
    }

    /// Everything the daemon said about the region.
    pub fn info(&self) -> &proto::Allocated {
        &self.info
    }

    /// The memfd (e.g. to pass on to another process).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Asks the daemon to re-check nodes and frames.
    ///
    /// # Errors
    /// The connection's or the daemon's errors.
    pub fn verify(&self) -> Result<proto::Verified> {
        match self.client.request(Op::Verify {
            region: self.info.region,
        })? {
            Outcome::Verified(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Unmaps and releases, reporting the daemon's answer.
    ///
    /// # Errors
    /// The connection's or the daemon's errors.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.unmap();
        match self.client.request(Op::Release {
            region: self.info.region,
        })? {
            Outcome::Released { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the mapping `allocate` made; no reference into it
            // outlives the region.
            unsafe { libc::munmap(self.ptr.cast(), self.info.len as usize) };
            self.ptr = std::ptr::null_mut();
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.unmap();
        if !self.released {
            if let Err(e) = self.client.request(Op::Release {
                region: self.info.region,
            }) {
                log::warn!("releasing region {}: {e}", self.info.region);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Rss` of the mapping that starts at `addr`, in bytes.
    fn rss_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines.next().expect("the mapping is listed");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    #[test]
    fn threads_populate_every_share() {
        let len = 9usize << 20;
        let (p, _fd) = crate::memfd::map_sealed(len, crate::PageSize::Base).unwrap();
        // Four 4 MiB shares over 9 MiB: the last thread has none, the third
        // a short one. MADV_POPULATE_READ is Linux 5.14; the host runs 6.1.
        assert!(populate_in_threads(p as usize, len, 4));
        assert_eq!(rss_at(p as usize), len as u64);
        // A range that is not mapped fails rather than passing silently.
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert!(!populate_in_threads(p as usize, len, 2));
    }

    #[test]
    fn a_mapped_region_is_populated_on_one_thread_and_on_several() {
        for len in [2usize << 20, PARALLEL_POPULATE_MIN + (6 << 20)] {
            let (p, fd) = crate::memfd::map_sealed(len, crate::PageSize::Base).unwrap();
            // SAFETY: the daemon's side of the test: its own mapping, unmapped.
            unsafe { libc::munmap(p, len) };
            let q = map_populated(fd.as_fd(), len, crate::addr::base_page_size());
            assert_ne!(q, libc::MAP_FAILED);
            assert_eq!(rss_at(q as usize), len as u64, "{len:#x} bytes");
            // A write through the mapping lands in the file.
            // SAFETY: inside the mapping made above.
            unsafe { std::ptr::write_volatile(q.cast::<u8>().add(len - 1), 7) };
            let mut b = [0u8; 1];
            // SAFETY: pread into a local buffer.
            let n =
                unsafe { libc::pread(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, (len - 1) as i64) };
            assert_eq!((n, b[0]), (1, 7));
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(q, len) };
        }
    }
}
