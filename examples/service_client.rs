//! A client of numapind: allocates pinned memory on a node as an ordinary
//! user (no device, no capability, any memlock limit), has the daemon's
//! device write into it by DMA through the IOVA, and checks the bytes here.
//!
//! `service_client [SOCKET] [NODE] [SIZE_MIB] [PAGE_SIZE_BYTES]`
//!
//! The DMA is numapind's `selftest-dma` request (QEMU's edu device copies a
//! page of the daemon's into this region): only root and the users the
//! daemon's config lists in `selftest_users` may ask for it. Anyone else
//! gets the region and its IOVA, and the example says the DMA was skipped.

use numapin::client::proto::{Op, Outcome, pattern};
use numapin::client::{Allocate, Client, DEFAULT_SOCKET};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let socket = args.first().map(String::as_str).unwrap_or(DEFAULT_SOCKET);
    let node: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mib: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let page_size: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4096);

    let client = Client::connect(socket)?;
    let region = client.allocate(&Allocate {
        node,
        size: mib << 20,
        page_size,
        ..Allocate::default()
    })?;
    println!(
        "region {}: {} MiB on node {} at {:p}, IOVA {:?}",
        region.id(),
        region.len() >> 20,
        region.node(),
        region.as_ptr(),
        region.iova().map(|i| format!("{i:#x}"))
    );
    // Something the device's pattern is not, at the offset it will write.
    let (off, len, seed) = (region.len() / 2, 2048u64, 0x3c);
    for i in 0..len {
        // SAFETY: inside the region's mapping; volatile because a device
        // writes it.
        unsafe {
            std::ptr::write_volatile(region.as_ptr().add((off + i) as usize), !pattern(seed, i))
        };
    }
    match client.request(Op::SelftestDma {
        region: region.id(),
        offset: off,
        len,
        seed,
    }) {
        Ok(Outcome::DmaDone { bytes }) => {
            let wrong = (0..bytes)
                // SAFETY: as above.
                .filter(|&i| unsafe { std::ptr::read_volatile(region.as_ptr().add((off + i) as usize)) } != pattern(seed, i))
                .count();
            println!("dma: {bytes} bytes written by the device at IOVA+{off:#x}, {wrong} wrong");
            if wrong != 0 {
                return Err(format!("{wrong} bytes differ from what the device wrote").into());
            }
        }
        Ok(other) => return Err(format!("unexpected reply {other:?}").into()),
        Err(e) if e.kind() == numapin::ErrorKind::Permission => println!("dma: skipped ({e})"),
        Err(e) => return Err(e.into()),
    }
    let v = region.verify()?;
    println!(
        "verify: {} pages, {} off node, frames changed {:?}, intact {}",
        v.pages, v.off_node, v.pfn_changed, v.intact
    );
    region.release()?;
    Ok(())
}
