//! The demo's memory: the locked region as a 2013 hypervisor kept guest RAM,
//! the plain control, page stamps the device checks, and PFN tracking that
//! attributes every frame change to the phase it happened in.

use std::ptr::NonNull;

use numapin::{Error, Result};

/// Bytes at the start of each page that identify it (region, page, data
/// generation): what the CPU writes and the device reads back.
pub const STAMP: usize = 32;
/// The base page size the demo works in.
pub const PAGE: usize = 4096;
/// Where in each page the worker thread writes (away from the stamp).
pub const TOUCH_OFFSET: usize = 2048;

/// Data generations: written before the phases, and after them.
pub const OLD: u8 = 1;
pub const NEW: u8 = 2;

/// Anonymous private memory of base pages (THP off), unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is private to this struct; it hands out only its
// address, never a reference to the bytes, and may be unmapped from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access exposes only the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(len: usize) -> Result<Mapping> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::sys("mmap", "", std::io::Error::last_os_error()));
        }
        let m = Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL"),
            len,
        };
        // Base pages, so that every page moves (or not) on its own, as the
        // pinned side is checked. Advice only: a kernel without THP ignores it.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Ok(m)
    }

    /// Memory as a 2013 hypervisor kept guest RAM: `mmap`, `MADV_DONTFORK`
    /// (a child must not share it), `mlock` (it stays resident: locked,
    /// not pinned). `mlock` faults every page in, on the calling thread's node.
    pub fn locked(len: usize) -> Result<Mapping> {
        let m = Self::map(len)?;
        // SAFETY: advice on, and locking of, the mapping this struct owns.
        unsafe {
            if libc::madvise(m.ptr.as_ptr().cast(), len, libc::MADV_DONTFORK) != 0 {
                return Err(Error::sys(
                    "madvise(MADV_DONTFORK)",
                    "",
                    std::io::Error::last_os_error(),
                ));
            }
            if libc::mlock(m.ptr.as_ptr().cast(), len) != 0 {
                return Err(Error::sys(
                    "mlock",
                    "raise RLIMIT_MEMLOCK (ulimit -l) or run the demo as root",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(m)
    }

    /// Plain memory with the default policy, faulted in by the calling
    /// thread (so on its node: the kernel allocates locally by default).
    pub fn plain(len: usize) -> Result<Mapping> {
        let m = Self::map(len)?;
        for off in (0..len).step_by(PAGE) {
            // SAFETY: inside the mapping; no Rust reference covers it.
            unsafe { std::ptr::write_volatile(m.ptr.as_ptr().add(off), 0) };
        }
        Ok(m)
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct made (munlock is implied).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The stamp of `page` of region `region` in generation `generation`: 32
/// bytes no other page, region or generation shares.
pub fn stamp(generation: u8, region: u8, page: u64) -> [u8; STAMP] {
    let mut x = (page << 16) | (u64::from(region) << 8) | u64::from(generation);
    let mut out = [0u8; STAMP];
    for chunk in out.chunks_mut(8) {
        // splitmix64: every input gives a different, well-mixed output.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    out
}

/// Writes generation `generation`'s stamp at the start of every page of
/// `[addr, addr + len)`.
pub fn write_stamps(addr: usize, len: usize, generation: u8, region: u8) {
    for page in 0..(len / PAGE) as u64 {
        let s = stamp(generation, region, page);
        for (i, b) in s.iter().enumerate() {
            // SAFETY: the caller owns the range, keeps it mapped, and holds no
            // Rust reference to it; volatile because a device may read it.
            unsafe { std::ptr::write_volatile((addr + page as usize * PAGE + i) as *mut u8, *b) };
        }
    }
}

/// The stamp bytes the CPU sees at `page` of the range at `addr`.
pub fn read_stamp(addr: usize, page: u64) -> Vec<u8> {
    (0..STAMP)
        // SAFETY: as in write_stamps.
        .map(|i| unsafe { std::ptr::read_volatile((addr + page as usize * PAGE + i) as *const u8) })
        .collect()
}

/// `count` page indices spread evenly over `pages`, first and last included.
pub fn spread(pages: u64, count: u64) -> Vec<u64> {
    let count = count.min(pages).max(1);
    if count == 1 {
        return vec![0];
    }
    let mut v: Vec<u64> = (0..count).map(|k| k * (pages - 1) / (count - 1)).collect();
    v.dedup();
    v
}

/// The PFN of every page of `[addr, addr + len)` (needs CAP_SYS_ADMIN). A
/// page that NUMA balancing is migrating at that instant has a migration
/// entry instead of a frame (not present): it is read again, a few
/// milliseconds later, until its new frame shows.
pub fn pfns(addr: usize, len: usize) -> Result<Vec<u64>> {
    let pages = len / PAGE;
    let entries = numapin::phys::read_pagemap(addr as u64, pages)?;
    let mut out = Vec::with_capacity(pages);
    for (i, e) in entries.iter().enumerate() {
        let mut pfn = e.pfn();
        let mut tries = 0;
        while pfn.is_none() && tries < 100 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            pfn = numapin::phys::read_pagemap((addr + i * PAGE) as u64, 1)?[0].pfn();
            tries += 1;
        }
        match pfn {
            Some(p) => out.push(p),
            // Still not there: the usual error, with the page's address.
            None => return Ok(numapin::phys::pfns(addr as u64, len as u64)?.to_vec()),
        }
    }
    Ok(out)
}

/// One region under observation: its frames when the demo started, and
/// which pages changed frame in the current phase.
pub struct Tracked {
    pub addr: usize,
    pub len: usize,
    /// PFNs before phase 1: the physical addresses a device would have been
    /// given at setup.
    pub at_start: Vec<u64>,
    last: Vec<u64>,
    moved: Vec<bool>,
}

impl Tracked {
    pub fn new(addr: usize, len: usize) -> Result<Tracked> {
        let at_start = pfns(addr, len)?;
        Ok(Tracked {
            addr,
            len,
            last: at_start.clone(),
            moved: vec![false; at_start.len()],
            at_start,
        })
    }

    pub fn pages(&self) -> u64 {
        self.at_start.len() as u64
    }

    /// Starts counting a new phase from the current frames.
    pub fn begin_phase(&mut self) {
        self.moved.iter_mut().for_each(|m| *m = false);
    }

    /// Takes a PFN snapshot: a page whose frame differs from the previous
    /// snapshot moved in the current phase.
    pub fn observe(&mut self) -> Result<()> {
        let now = pfns(self.addr, self.len)?;
        for ((m, a), b) in self.moved.iter_mut().zip(&self.last).zip(&now) {
            *m |= a != b;
        }
        self.last = now;
        Ok(())
    }

    /// Pages that changed frame in the current phase.
    pub fn moved_in_phase(&self) -> u64 {
        self.moved.iter().filter(|&&m| m).count() as u64
    }

    /// Pages whose frame now differs from the one before phase 1.
    pub fn off_start(&self) -> u64 {
        self.at_start
            .iter()
            .zip(&self.last)
            .filter(|(a, b)| a != b)
            .count() as u64
    }

    /// The frame of `page` at the last snapshot.
    pub fn now(&self, page: u64) -> u64 {
        self.last[page as usize]
    }

    /// Pages of the region on `node` (queried with `move_pages`).
    pub fn on_node(&self, node: u32) -> Result<u64> {
        let nodes = numapin::numa::nodes_of(self.addr, self.len, PAGE as u64)
            .map_err(|e| Error::sys("move_pages (query nodes)", "", e))?;
        Ok(nodes.iter().filter(|&&n| n == node as i32).count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ() {
        assert_ne!(stamp(OLD, 0, 5), stamp(NEW, 0, 5));
        assert_ne!(stamp(OLD, 0, 5), stamp(OLD, 1, 5));
        assert_ne!(stamp(OLD, 0, 5), stamp(OLD, 0, 6));
        assert_eq!(stamp(NEW, 2, 7), stamp(NEW, 2, 7));
    }

    #[test]
    fn spread_includes_ends() {
        let s = spread(2048, 64);
        assert_eq!(s.len(), 64);
        assert_eq!((s[0], s[63]), (0, 2047));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(spread(4, 64), vec![0, 1, 2, 3]);
        assert_eq!(spread(10, 1), vec![0]);
    }
}
