//! Scenario g: bad input gets its specific error, a non-zero exit, and
//! leaves nothing locked or mapped.

use std::os::unix::process::CommandExt;

use numapin::{Error, Iova, NodeId, PageSize, PinRequest, Pinner};

use crate::Scenario;
use crate::ensure;
use crate::util::*;

pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("g.cli.size-zero", |c| {
            cli_err(c, &["--region", "0:0"], "region size is 0")
        }),
        ("g.cli.unaligned-size", |c| {
            cli_err(
                c,
                &["--region", "0:3M:2M"],
                "is not a multiple of the 2M page size",
            )
        }),
        ("g.cli.unaligned-size-4K", |c| {
            cli_err(
                c,
                &["--region", "0:4097"],
                "is not a multiple of the 4K page size",
            )
        }),
        ("g.cli.offline-node", |c| {
            cli_err(
                c,
                &["--region", "7:4M"],
                "NUMA node 7 is not online; online nodes: 0, 1",
            )
        }),
        ("g.cli.msi-window", |c| {
            cli_err(
                c,
                &["--region", "0:1M@0xfee00000"],
                "is not inside the usable IOVA ranges",
            )
        }),
        ("g.cli.overlap", |c| {
            cli_err(
                c,
                &["--region", "0:4M@0x1000000", "--region", "1:4M@0x1200000"],
                "overlaps the existing mapping [0x1000000, 0x1400000)",
            )
        }),
        ("g.cli.memlock", g_memlock),
        ("g.cli.not-bound", g_not_bound),
        ("g.cli.missing-device", g_missing),
        ("g.lib.nothing-left", g_lib_nothing_left),
    ]
}

/// The CLI's exit codes per error class (`numapin::ErrorKind::exit_code`).
pub(crate) const USAGE: i32 = 2;
pub(crate) const RESOURCE: i32 = 4;
pub(crate) const DEVICE_STATE: i32 = 5;

/// Runs `numapin pin --device BDF ARGS`; wants the usage exit code, one stderr line
/// containing `want`, and no locked memory left in this process.
fn cli_err(ctx: &Ctx, args: &[&str], want: &str) -> Result<String, String> {
    let mut full = vec!["pin", "--device", ctx.bdf.as_str(), "--hold", "0"];
    full.extend_from_slice(args);
    let (code, out, err) = run_cli(&full)?;
    check_err(code, USAGE, &out, &err, want)?;
    // The group must be free again: a pin right after works.
    let p = e(Pinner::open(&ctx.bdf), "reopen after error")?;
    drop(p);
    Ok(err.trim().to_string())
}

pub(crate) fn check_err(
    code: i32,
    expected: i32,
    out: &str,
    err: &str,
    want: &str,
) -> Result<(), String> {
    ensure!(
        code == expected,
        "exit code {code}, expected {expected}; stderr: {err}"
    );
    ensure!(out.is_empty(), "stdout not empty on error: {out}");
    let lines: Vec<&str> = err.lines().collect();
    ensure!(
        lines.len() == 1,
        "expected one stderr line, got {}: {err}",
        lines.len()
    );
    ensure!(lines[0].starts_with("numapin: error: "), "stderr: {err}");
    ensure!(err.contains(want), "stderr lacks `{want}`: {err}");
    Ok(())
}

/// An unprivileged user (no CAP_IPC_LOCK) with RLIMIT_MEMLOCK = `limit`
/// pinning `regions` (the group node must be owned by uid 1000).
pub(crate) fn as_pinner(
    ctx: &Ctx,
    limit: u64,
    regions: &[&str],
) -> Result<(i32, String, String), String> {
    let mut cmd = numapin();
    cmd.args(["pin", "--device", &ctx.device, "--hold", "0"]);
    for r in regions {
        cmd.args(["--region", r]);
    }
    // SAFETY: between fork and exec only async-signal-safe calls run. The
    // limit is set while still root (raising the hard limit needs
    // CAP_SYS_RESOURCE), then the child drops to uid/gid 1000.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(1000) != 0
                || libc::setuid(1000) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = e(cmd.output(), "run numapin as uid 1000")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `f` with the device's group node owned by uid 1000, then gives it
/// back to root.
pub(crate) fn as_user_1000<T>(
    ctx: &Ctx,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let node = format!("/dev/vfio/{}", ctx.group);
    let chown = |uid: u32| {
        let c = std::ffi::CString::new(node.clone()).expect("path");
        // SAFETY: valid C string; chown has no memory-safety preconditions.
        unsafe { libc::chown(c.as_ptr(), uid, uid) }
    };
    ensure!(
        chown(1000) == 0,
        "chown {node}: {}",
        std::io::Error::last_os_error()
    );
    let res = f();
    chown(0);
    res
}

pub(crate) fn g_memlock(ctx: &Ctx) -> Result<String, String> {
    as_user_1000(ctx, || {
        // Control: the same user under a limit that fits succeeds.
        let (code, _, err) = as_pinner(ctx, 16 << 20, &["0:8M"])?;
        ensure!(
            code == 0,
            "uid 1000 with a 16 MiB limit could not pin 8 MiB: {err}"
        );
        let (code, out, err) = as_pinner(ctx, 1 << 20, &["0:8M"])?;
        check_err(
            code,
            RESOURCE,
            &out,
            &err,
            "RLIMIT_MEMLOCK is 1 MiB but pinning needs 8 MiB",
        )?;
        ensure!(
            err.contains("ulimit -l") && err.contains("CAP_IPC_LOCK"),
            "no remedy in: {err}"
        );
        Ok(err.trim().to_string())
    })
}

fn g_not_bound(ctx: &Ctx) -> Result<String, String> {
    let (code, out, err) = run_cli(&["unbind", &ctx.bdf])?;
    ensure!(code == 0, "unbind failed: {err}");
    ensure!(out.contains("vfio-pci -> no driver"), "unbind said: {out}");
    let res = (|| {
        let (code, out, err) = run_cli(&[
            "pin", "--device", &ctx.bdf, "--region", "0:4M", "--hold", "0",
        ])?;
        check_err(
            code,
            DEVICE_STATE,
            &out,
            &err,
            &format!(
                "device {} is not bound to any driver; bind it with `numapin bind {}`",
                ctx.bdf, ctx.bdf
            ),
        )?;
        Ok(err.trim().to_string())
    })();
    let (code, out, err) = run_cli(&["bind", &ctx.bdf])?;
    ensure!(
        code == 0 && out.contains("no driver -> vfio-pci"),
        "rebind failed: {out} {err}"
    );
    ensure!(
        std::path::Path::new(&format!("/dev/vfio/{}", ctx.group)).exists(),
        "group node missing after rebind"
    );
    let p = e(Pinner::open(&ctx.bdf), "open after rebind")?;
    drop(p);
    res
}

fn g_missing(_: &Ctx) -> Result<String, String> {
    let (code, out, err) = run_cli(&[
        "pin",
        "--device",
        "0000:00:1f.7",
        "--region",
        "0:4M",
        "--hold",
        "0",
    ])?;
    check_err(code, USAGE, &out, &err, "no device `0000:00:1f.7`")?;
    ensure!(err.contains("lspci -D"), "no remedy: {err}");
    Ok(err.trim().to_string())
}

/// Library: every bad request fails with its own variant and leaves VmLck
/// and the container's DMA mapping count exactly as they were.
fn g_lib_nothing_left(ctx: &Ctx) -> Result<String, String> {
    let p = e(Pinner::open(&ctx.bdf), "open")?;
    let avail = |p: &Pinner| p.refresh_info().ok().flatten().and_then(|i| i.dma_avail);
    let lck0 = vmlck();
    let avail0 = avail(&p);
    ensure!(avail0.is_some(), "kernel reports no DMA_AVAIL capability");
    let req = |node: u32, size: u64, page_size: PageSize, iova: Option<u64>| PinRequest {
        page_size,
        iova: iova.map(Iova),
        ..PinRequest::new(NodeId(node), size)
    };
    let free2m = numapin::numa::Topology::read()
        .ok()
        .and_then(|t| {
            t.node(ctx.home)
                .and_then(|n| n.pool(PageSize::Huge2M))
                .map(|p| p.free)
        })
        .unwrap_or(0);
    type Case = (&'static str, PinRequest<'static>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        ("zero", req(0, 0, PageSize::Base, None), |e| {
            matches!(e, Error::ZeroSize)
        }),
        ("unaligned", req(0, 3 << 20, PageSize::Huge2M, None), |e| {
            matches!(e, Error::UnalignedSize { .. })
        }),
        ("offline", req(9, 4 << 20, PageSize::Base, None), |e| {
            matches!(e, Error::NodeNotOnline { .. })
        }),
        (
            "msi",
            req(0, 1 << 20, PageSize::Base, Some(0xfee0_0000)),
            |e| {
                matches!(
                    e,
                    Error::Iova(numapin::iova::IovaError::OutsideRanges { .. })
                )
            },
        ),
        (
            "misaligned-iova",
            req(0, 2 << 20, PageSize::Huge2M, Some(0x100_1000)),
            |e| matches!(e, Error::UnalignedIova { .. }),
        ),
        (
            "hugepages",
            req(0, (free2m + 1) * (2 << 20), PageSize::Huge2M, None),
            |e| matches!(e, Error::NotEnoughHugepages { .. }),
        ),
    ];
    let mut seen = Vec::new();
    for (name, r, want) in cases {
        match p.pin(&r) {
            Ok(_) => return Err(format!("{name}: bad request was pinned")),
            Err(er) => ensure!(want(&er), "{name}: wrong error: {er}"),
        }
        ensure!(
            vmlck() == lck0,
            "{name}: VmLck {:#x} != {lck0:#x} after the error",
            vmlck()
        );
        ensure!(
            avail(&p) == avail0,
            "{name}: DMA_AVAIL {:?} != {avail0:?}: a mapping was left",
            avail(&p)
        );
        seen.push(name);
    }
    // Overlap: the first region stays, the second leaves nothing.
    let a = e(
        p.pin(&req(0, 4 << 20, PageSize::Base, Some(0x100_0000))),
        "first region",
    )?;
    let er = p
        .pin(&req(1, 4 << 20, PageSize::Base, Some(0x120_0000)))
        .err()
        .ok_or("overlap was pinned")?;
    ensure!(
        matches!(er, Error::Iova(numapin::iova::IovaError::Overlap { .. })),
        "overlap: wrong error {er}"
    );
    ensure!(
        vmlck() == lck0 + (4 << 20),
        "overlap: VmLck {:#x}, expected first region only",
        vmlck()
    );
    ensure!(
        avail(&p) == avail0.map(|v| v - 1),
        "overlap: DMA_AVAIL {:?}",
        avail(&p)
    );
    drop(a);
    ensure!(
        vmlck() == lck0 && avail(&p) == avail0,
        "after drop: VmLck {:#x} DMA_AVAIL {:?}",
        vmlck(),
        avail(&p)
    );
    // And the space is reusable: the same IOVA pins again.
    let b = e(
        p.pin(&req(1, 4 << 20, PageSize::Base, Some(0x120_0000))),
        "reuse IOVA",
    )?;
    drop(b);
    seen.push("overlap");
    Ok(format!(
        "{} errors, each with VmLck {lck0:#x} and DMA_AVAIL {} unchanged",
        seen.join(", "),
        avail0.unwrap_or(0)
    ))
}
