//! `numapin pin --service [SOCKET]` and `numapin status`: the CLI as a
//! client of numapind. The daemon owns the device; this process only maps
//! the memfds it is sent.

use std::io::Write;
use std::path::Path;

use numapin::Result;
use numapin::addr::human_size;
use numapin::client::{Allocate, Client};
use serde_json::json;

use super::PinArgs;
use super::hold;

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Allocates every `--region` through the daemon, prints where each is
/// mapped here, holds them until a signal or `--hold`, then releases.
pub(super) fn pin(args: PinArgs, socket: &Path) -> Result<()> {
    let signals = hold::SignalSet::block_termination()?.watch();
    let client = Client::connect(socket)?;
    let mut regions = Vec::new();
    for spec in &args.regions {
        let r = &spec.req;
        regions.push(client.allocate(&Allocate {
            device: args.device.clone(),
            node: r.node.map(|n| n.0).unwrap_or(0),
            size: r.size,
            page_size: r.page_size.bytes(),
            iova: r.iova.map(|i| i.raw()),
            min_extent: args.min_extent,
            phys: args.phys,
        })?);
    }
    let docs: Vec<_> = regions
        .iter()
        .map(|r| {
            let i = r.info();
            json!({
                "region": i.region,
                "device": i.device,
                "vaddr": hex(r.as_ptr() as u64),
                "iova": i.iova.map(hex),
                "len": i.len,
                "page_size": i.page_size,
                "node": i.node,
                "pin": i.pin,
                "phys": i.phys.as_ref().map(|v| v.iter().map(|e| json!({"pa": hex(e.addr), "len": e.len})).collect::<Vec<_>>()),
            })
        })
        .collect();
    if args.json {
        let doc = json!({
            "service": socket.display().to_string(),
            "pid": std::process::id(),
            "regions": docs,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        println!("through numapind at {}", socket.display());
        for r in &regions {
            let i = r.info();
            println!(
                "region {}: {} on node {} ({} pages) at {:p}, IOVA {}, pinned by {} via {}",
                i.region,
                human_size(i.len),
                i.node,
                human_size(i.page_size),
                r.as_ptr(),
                i.iova.map(hex).unwrap_or_else(|| "none (physical)".into()),
                i.device,
                i.pin
            );
            match (&i.phys, i.phys_extents) {
                (Some(v), _) => {
                    for e in v {
                        println!("  phys {} + {:#x}", hex(e.addr), e.len);
                    }
                }
                (None, Some(n)) => println!(
                    "  phys: {n} extents, more than one reply carries (ask for hugepages or --min-extent)"
                ),
                (None, None) if args.phys => println!(
                    "  phys: not sent (numapind gives physical addresses only to the users in its phys_users)"
                ),
                _ => {}
            }
        }
    }
    std::io::stdout().flush().ok();
    signals.hold(args.hold);
    for r in regions {
        r.release()?;
    }
    Ok(())
}

/// Prints the daemon's status.
pub(super) fn status(socket: &Path, json_out: bool) -> Result<()> {
    let client = Client::connect(socket)?;
    let s = client.status()?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    let h = client.hello();
    println!(
        "numapind {} (pid {}) at {}: {} connection(s), {} region(s) visible to uid {}",
        h.daemon,
        s.pid,
        socket.display(),
        s.connections,
        s.total_regions,
        h.uid
    );
    for d in &s.devices {
        println!(
            "device {}: DMA mappings left {}",
            d.name,
            d.dma_avail
                .map(|n| n.to_string())
                .unwrap_or_else(|| "not reported".into())
        );
    }
    for u in &s.usage {
        println!(
            "uid {} node {}: {} in {} region(s)",
            u.uid,
            u.node,
            human_size(u.bytes),
            u.regions
        );
    }
    for r in &s.regions {
        println!(
            "  region {} of pid {}: {} on node {} ({} pages), IOVA {}",
            r.region,
            r.pid,
            human_size(r.len),
            r.node,
            human_size(r.page_size),
            r.iova.map(hex).unwrap_or_else(|| "none".into())
        );
    }
    Ok(())
}
