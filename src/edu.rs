//! A minimal user-space driver for QEMU's `edu` teaching device (PCI
//! `1234:11e8`), used to prove DMA through pinned IOVAs: the device copies
//! bytes from one IOVA into its 4 KiB buffer and back out to another IOVA,
//! and the CPU compares what landed.
//!
//! Register layout from QEMU's `docs/specs/edu.rst`: BAR0 `0x00` id
//! (`0x010000ed`), `0x80` DMA source, `0x88` destination, `0x90` count,
//! `0x98` command (bit 0 start, bit 1 direction edu→RAM). The buffer sits at
//! device address `0x40000`.

use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};

use crate::error::{Error, Result};
use crate::region::PinnedRegion;
use crate::vfio::DeviceFd;

/// PCI vendor id of the edu device.
pub const VENDOR: u16 = 0x1234;
/// PCI device id of the edu device.
pub const DEVICE: u16 = 0x11e8;
/// What the identification register reads.
pub const ID: u32 = 0x0100_00ed;
/// Device address of the DMA buffer.
pub const BUFFER: u64 = 0x40000;
/// Largest transfer numapin issues. QEMU 7.2 rejects a transfer that ends
/// exactly at the buffer's end with a fatal error, so stay below 4 KiB.
pub const MAX_TRANSFER: u64 = 2048;
/// Default DMA mask of the device: addresses above 256 MiB are clamped
/// (QEMU's `-device edu,dma_mask=…` raises it; tell [`Edu::with_dma_limit`]).
pub const DMA_LIMIT: u64 = 1 << 28;

const REG_ID: usize = 0x00;
const REG_SRC: usize = 0x80;
const REG_DST: usize = 0x88;
const REG_COUNT: usize = 0x90;
const REG_CMD: usize = 0x98;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

/// An opened edu device with BAR0 mapped through the VFIO region mmap.
///
/// It takes DMA addresses: IOVAs behind an IOMMU, physical addresses in
/// no-IOMMU mode ([`PinnedRegion::dma_addr`] gives the right one).
pub struct Edu<'a> {
    _dev: DeviceFd<'a>,
    bar: *mut u8,
    bar_len: usize,
    dma_limit: u64,
}

/// The outcome of a DMA round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DmaCheck {
    /// Bytes transferred each way.
    pub bytes: u64,
    /// Bytes at the destination that differ from the source pattern.
    pub mismatches: u64,
}

impl DmaCheck {
    /// True when every byte the device wrote matches.
    pub fn ok(&self) -> bool {
        self.mismatches == 0
    }
}

/// Finds the first PCI device with the edu ids in sysfs, as a PCI address.
pub fn find() -> Option<String> {
    find_all().into_iter().next()
}

/// Every edu device (vendor 1234, device 11e8), by PCI address.
pub fn find_all() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    let mut found: Vec<String> = rd
        .flatten()
        .filter(|e| {
            let id = |f: &str| {
                std::fs::read_to_string(e.path().join(f))
                    .ok()
                    .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            };
            id("vendor") == Some(VENDOR) && id("device") == Some(DEVICE)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

impl<'a> Edu<'a> {
    /// Maps BAR0, checks the id register, and enables bus mastering in
    /// config space.
    pub fn open(dev: DeviceFd<'a>) -> Result<Edu<'a>> {
        let bar0 = dev.region(VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar0.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(Error::Invalid(
                "edu BAR0 cannot be mmapped through VFIO".into(),
            ));
        }
        let bar_len = bar0.size as usize;
        // SAFETY: mapping a device region through the VFIO device fd at the
        // offset VFIO reported; the mapping is private to this struct.
        let bar = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.fd().as_raw_fd(),
                bar0.offset as libc::off_t,
            )
        };
        if bar == libc::MAP_FAILED {
            return Err(Error::sys(
                "mmap edu BAR0",
                "",
                std::io::Error::last_os_error(),
            ));
        }
        let edu = Edu {
            _dev: dev,
            bar: bar.cast(),
            bar_len,
            dma_limit: DMA_LIMIT,
        };
        let id = edu.read32(REG_ID);
        if id != ID {
            return Err(Error::Invalid(format!(
                "device does not look like QEMU edu: id register reads {id:#x}, expected {ID:#x}"
            )));
        }
        let mut cmd = [0u8; 2];
        dev.read(VFIO_PCI_CONFIG_REGION_INDEX, 4, &mut cmd)?;
        let v = u16::from_le_bytes(cmd) | 0x4; // bus master enable
        dev.write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &v.to_le_bytes())?;
        Ok(edu)
    }

    /// Tells numapin the device's DMA mask is wider than the default
    /// 28 bits (QEMU `-device edu,dma_mask=MASK`): addresses below `limit`
    /// are then accepted. Physical addresses in no-IOMMU mode need this.
    pub fn with_dma_limit(mut self, limit: u64) -> Self {
        self.dma_limit = limit;
        self
    }

    fn read32(&self, reg: usize) -> u32 {
        assert!(reg + 4 <= self.bar_len);
        // SAFETY: reg is inside the mapped BAR; MMIO needs volatile access.
        unsafe { std::ptr::read_volatile(self.bar.add(reg).cast::<u32>()) }
    }

    fn read64(&self, reg: usize) -> u64 {
        assert!(reg + 8 <= self.bar_len);
        // SAFETY: as in read32; edu accepts 8-byte accesses from 0x80 on.
        unsafe { std::ptr::read_volatile(self.bar.add(reg).cast::<u64>()) }
    }

    fn write64(&self, reg: usize, v: u64) {
        assert!(reg + 8 <= self.bar_len);
        // SAFETY: as in read64.
        unsafe { std::ptr::write_volatile(self.bar.add(reg).cast::<u64>(), v) }
    }

    fn transfer(&self, src: u64, dst: u64, count: u64, to_ram: bool) -> Result<()> {
        if count == 0 || count > MAX_TRANSFER {
            return Err(Error::Invalid(format!(
                "edu transfer of {count} bytes: use 1..={MAX_TRANSFER}"
            )));
        }
        let addr = if to_ram { dst } else { src };
        if addr.saturating_add(count) > self.dma_limit {
            return Err(Error::Invalid(format!(
                "DMA address {addr:#x} is beyond edu's DMA mask (limit {:#x}); pin the region lower, \
                 or start QEMU with `-device edu,dma_mask=…` and call Edu::with_dma_limit",
                self.dma_limit
            )));
        }
        self.write64(REG_SRC, src);
        self.write64(REG_DST, dst);
        self.write64(REG_COUNT, count);
        self.write64(REG_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.read64(REG_CMD) & CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(Error::Invalid(
                    "edu DMA did not complete within 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Copies `count` bytes from DMA address `addr` into the device buffer.
    pub fn dma_to_device(&self, addr: u64, count: u64) -> Result<()> {
        self.transfer(addr, BUFFER, count, false)
    }

    /// Copies `count` bytes from the device buffer to DMA address `addr`.
    pub fn dma_from_device(&self, addr: u64, count: u64) -> Result<()> {
        self.transfer(BUFFER, addr, count, true)
    }

    /// Writes a pattern (from `seed`) at `src[src_off..]`, clears
    /// `dst[dst_off..]`, has the device copy it src → device → dst through
    /// their DMA addresses, and counts the bytes at the destination that
    /// differ. In no-IOMMU mode a transfer must not cross a physical
    /// discontinuity: it is refused unless both ranges are contiguous.
    pub fn round_trip(
        &self,
        src: &PinnedRegion,
        src_off: u64,
        dst: &PinnedRegion,
        dst_off: u64,
        count: u64,
        seed: u8,
    ) -> Result<DmaCheck> {
        if count == 0 || count > MAX_TRANSFER {
            return Err(Error::Invalid(format!(
                "edu transfer of {count} bytes: use 1..={MAX_TRANSFER}"
            )));
        }
        let fits =
            |off: u64, r: &PinnedRegion| off.checked_add(count).is_some_and(|end| end <= r.len());
        if !fits(src_off, src) || !fits(dst_off, dst) {
            return Err(Error::Invalid("round trip beyond the region".into()));
        }
        let src_addr = contiguous_dma(src, src_off, count)?;
        let dst_addr = contiguous_dma(dst, dst_off, count)?;
        let pattern = |i: u64| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0x5a;
        let s = src.as_ptr();
        let d = dst.as_ptr();
        for i in 0..count {
            // SAFETY: inside the pinned regions (checked above); volatile because a
            // device may access them; no Rust reference is created.
            unsafe {
                std::ptr::write_volatile(s.add((src_off + i) as usize), pattern(i));
                std::ptr::write_volatile(d.add((dst_off + i) as usize), !pattern(i));
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.dma_to_device(src_addr, count)?;
        self.dma_from_device(dst_addr, count)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mismatches = (0..count)
            // SAFETY: as above.
            .filter(|&i| unsafe { std::ptr::read_volatile(d.add((dst_off + i) as usize)) } != pattern(i))
            .count() as u64;
        Ok(DmaCheck {
            bytes: count,
            mismatches,
        })
    }
}

/// Size of the device's DMA buffer (device addresses `BUFFER..BUFFER + BUFFER_LEN`).
pub const BUFFER_LEN: u64 = 4096;

impl Edu<'_> {
    fn check_buffer_range(buf_off: u64, count: u64) -> Result<()> {
        // End strictly before the buffer's end: QEMU 7.2 rejects a transfer
        // that ends exactly there with a fatal error.
        if count == 0 || count > MAX_TRANSFER || buf_off.saturating_add(count) >= BUFFER_LEN {
            return Err(Error::Invalid(format!(
                "edu buffer range {buf_off:#x}+{count}: use 1..={MAX_TRANSFER} bytes ending before {BUFFER_LEN:#x}"
            )));
        }
        Ok(())
    }

    /// Copies `count` bytes from DMA address `src` into the device buffer at
    /// offset `buf_off`. A read: the device never writes to `src`.
    pub fn dma_to_buffer(&self, src: u64, buf_off: u64, count: u64) -> Result<()> {
        Self::check_buffer_range(buf_off, count)?;
        self.transfer(src, BUFFER + buf_off, count, false)
    }

    /// Copies `count` bytes of the device buffer from offset `buf_off` to DMA
    /// address `dst`.
    pub fn dma_from_buffer(&self, buf_off: u64, dst: u64, count: u64) -> Result<()> {
        Self::check_buffer_range(buf_off, count)?;
        self.transfer(BUFFER + buf_off, dst, count, true)
    }

    /// What the device reads at many DMA addresses, with one write-back:
    /// `into[off..off + n * slot]` (a pinned region) is zeroed and copied
    /// into the device buffer, then the device reads `slot` bytes from each
    /// of the `n` `sources` into consecutive slots of its buffer and writes
    /// all slots back into `into[off..]` with one transfer. Returns, slot by
    /// slot, the bytes the CPU then finds there. A slot whose read did not
    /// happen reads as zeros.
    ///
    /// Every source is only read. The cost is `n + 2` transfers, each of
    /// which edu starts from a 100 ms timer.
    pub fn gather(
        &self,
        sources: &[u64],
        slot: u64,
        into: &PinnedRegion,
        off: u64,
    ) -> Result<Vec<Vec<u8>>> {
        let total = slot.saturating_mul(sources.len() as u64);
        Self::check_buffer_range(0, total)?;
        if off.checked_add(total).is_none_or(|end| end > into.len()) {
            return Err(Error::Invalid("gather beyond the region".into()));
        }
        let dst = contiguous_dma(into, off, total)?;
        let p = into.as_ptr();
        for i in 0..total {
            // SAFETY: inside the pinned region (checked above); volatile because
            // the device accesses it; no Rust reference is created.
            unsafe { std::ptr::write_volatile(p.add((off + i) as usize), 0) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.dma_to_buffer(dst, 0, total)?;
        for (i, &src) in sources.iter().enumerate() {
            self.dma_to_buffer(src, i as u64 * slot, slot)?;
        }
        self.dma_from_buffer(0, dst, total)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok((0..sources.len() as u64)
            .map(|i| {
                (0..slot)
                    // SAFETY: as above.
                    .map(|j| unsafe {
                        std::ptr::read_volatile(p.add((off + i * slot + j) as usize))
                    })
                    .collect()
            })
            .collect())
    }
}

/// The DMA address of `region[off..off+count]`, if the device sees that
/// range as one contiguous run.
fn contiguous_dma(region: &PinnedRegion, off: u64, count: u64) -> Result<u64> {
    let missing = || {
        Error::Invalid(format!(
            "no DMA address for offset {off:#x} of the region: it has no IOVA and its PFNs are hidden (run with CAP_SYS_ADMIN)"
        ))
    };
    let first = region.dma_addr(off).ok_or_else(missing)?.raw();
    let last = region.dma_addr(off + count - 1).ok_or_else(missing)?.raw();
    if last.checked_sub(first) != Some(count - 1) {
        return Err(Error::Invalid(format!(
            "offset {off:#x}+{count} of the region is not physically contiguous; keep transfers inside one page"
        )));
    }
    Ok(first)
}

impl Drop for Edu<'_> {
    fn drop(&mut self) {
        // SAFETY: unmapping the BAR mapping this struct created.
        unsafe { libc::munmap(self.bar.cast(), self.bar_len) };
    }
}
