//! The service's clients: an unprivileged client's pin and its proof from
//! outside, the example's DMA, refused users, quotas, a client killed.

use super::*;

/// How often the attack's unpinned control is asked to move, and how far
/// apart: moving pages is best effort (see [`ask_until_moved`]).
const CONTROL_ASKS: usize = 10;
const CONTROL_PAUSE: Duration = Duration::from_millis(200);

/// uid 1000 (memlock 64 KiB) gets 64 MiB on node 1: its frames are the
/// daemon's pinned snapshot, an outside move_pages moves none of them while
/// an unpinned control moves, and the client's own memlock stays untouched.
pub(super) fn unprivileged(ctx: &Ctx, page: u64) -> Result<String, String> {
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
pub(super) fn example_dma(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn refused_user(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn quota_floor(ctx: &Ctx) -> Result<String, String> {
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
pub(super) fn client_sigkill(ctx: &Ctx) -> Result<String, String> {
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
