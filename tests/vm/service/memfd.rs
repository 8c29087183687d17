//! Memfds the daemon hands out: kept by a client after its region, and a
//! pin that fails after the early memfd.

use super::*;

/// The bytes a file holds (`st_blocks` × 512): a memfd's pages, shmem or
/// hugetlb.
pub(super) fn file_bytes(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, String> {
    // SAFETY: all-zero is a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a borrowed fd into a stat we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    Ok(st.st_blocks as u64 * 512)
}

/// A node's free 2 MiB hugepages.
pub(super) fn free_huge_2m(node: numapin::NodeId) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/free_hugepages",
        node.0
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// Waits up to a second for `done`; the time it took.
pub(super) fn within_a_second(mut done: impl FnMut() -> bool) -> Option<Duration> {
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
pub(super) fn kept_memfd(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn raw_hello(d: &Daemon) -> Result<OwnedFd, String> {
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
pub(super) fn failed_after_early_memfd(ctx: &Ctx, d: &Daemon, len: u64) -> Result<String, String> {
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
