//! The daemon's life: killed and restarted, SIGTERM, clients in
//! parallel, hostile bytes, socket activation, the peer's identity.

use super::*;

/// SIGKILL of the daemon: the client's next call says so, the kernel drops
/// the pins, and a restarted daemon serves at once on the same socket.
pub(super) fn daemon_sigkill(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn sigterm(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn parallel(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn fuzz(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn socket_activation(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn peer_identity(ctx: &Ctx) -> Result<String, String> {
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
