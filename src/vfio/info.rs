//! Parsing the reply of `VFIO_IOMMU_GET_INFO` (type1 container).
//!
//! This module is pure: it decodes the bytes the kernel wrote and never calls
//! the kernel. The ioctl itself lives with the container; the expected use is
//! the two-call pattern:
//!
//! 1. call `VFIO_IOMMU_GET_INFO` with [`info_request`]`(INFO_HEADER_LEN)`;
//! 2. if [`needed_argsz`] returns `Some(n)`, the capability chain did not fit:
//!    call again with [`info_request`]`(n)`;
//! 3. [`IommuInfo::parse`] the buffer.
//!
//! Layout (`struct vfio_iommu_type1_info`, `include/uapi/linux/vfio.h`):
//! `argsz: u32, flags: u32, iova_pgsizes: u64, cap_offset: u32, pad: u32`,
//! then, when `flags` has `VFIO_IOMMU_INFO_CAPS`, a chain of capabilities.
//! Each starts with `struct vfio_info_cap_header { id: u16, version: u16,
//! next: u32 }`; `next` is an offset from the start of the buffer and 0 ends
//! the chain. Sizes and offsets come from the `vfio-bindings` structs; every
//! read is bounds-checked and little-endian, with no `unsafe`.

use std::mem::{offset_of, size_of};

use vfio_bindings::bindings::vfio::{
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, vfio_info_cap_header,
    vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_cap_migration, vfio_iommu_type1_info_dma_avail, vfio_iova_range,
};

use crate::addr::Iova;
use crate::iova::IovaRange;

/// Size of the fixed `struct vfio_iommu_type1_info` (24 bytes): the smallest
/// buffer `VFIO_IOMMU_GET_INFO` accepts with the capability chain.
pub const INFO_HEADER_LEN: usize = size_of::<vfio_iommu_type1_info>();
const CAP_HEADER_LEN: usize = size_of::<vfio_info_cap_header>();
const IOVA_CAP_LEN: usize = size_of::<vfio_iommu_type1_info_cap_iova_range>();
const IOVA_RANGE_LEN: usize = size_of::<vfio_iova_range>();
const MIGRATION_CAP_LEN: usize = size_of::<vfio_iommu_type1_info_cap_migration>();
const DMA_AVAIL_CAP_LEN: usize = size_of::<vfio_iommu_type1_info_dma_avail>();

/// The longest capability chain accepted. The kernel emits at most three
/// capabilities; a longer chain is corrupt.
pub const MAX_CAPS: usize = 64;

/// The migration capability (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`, cap id 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationCap {
    /// Capability flags (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION` flags field).
    pub flags: u32,
    /// Page sizes supported for dirty-page tracking.
    pub pgsize_bitmap: u64,
    /// The largest dirty bitmap, in bytes, the kernel will return.
    pub max_dirty_bitmap_size: u64,
}

/// What `VFIO_IOMMU_GET_INFO` reports about a type1 container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// The IOMMU page sizes (bit `n` set: `2^n` bytes), the AND over all
    /// domains of the container. Never 0 after [`IommuInfo::parse`].
    pub iova_pgsizes: u64,
    /// The usable IOVA ranges (cap id 1, Linux 5.4+): the aperture minus
    /// reserved regions such as the x86 MSI window. `None` when the kernel
    /// sent no such capability.
    pub iova_ranges: Option<Vec<IovaRange>>,
    /// How many more DMA mappings the container accepts (cap id 3, Linux
    /// 5.10+; bounded by the `dma_entry_limit` module parameter).
    pub dma_avail: Option<u32>,
    /// The migration capability (cap id 2), if present.
    pub migration: Option<MigrationCap>,
    /// Ids of capabilities numapin does not know, in chain order; they were
    /// skipped.
    pub unknown_caps: Vec<u16>,
}

/// Why a `VFIO_IOMMU_GET_INFO` reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// The buffer is shorter than `struct vfio_iommu_type1_info`.
    #[error(
        "VFIO_IOMMU_GET_INFO reply is {len} bytes, shorter than the 24-byte \
         vfio_iommu_type1_info header; pass a buffer of at least 24 bytes"
    )]
    TooShort {
        /// Length of the buffer.
        len: usize,
    },
    /// `argsz` in the reply is below the header size.
    #[error(
        "VFIO_IOMMU_GET_INFO reply has argsz {argsz}, below the 24-byte header; set argsz to \
         the buffer length before the call"
    )]
    ArgszTooSmall {
        /// The `argsz` field.
        argsz: u32,
    },
    /// The kernel needs a larger buffer to return the capability chain.
    #[error(
        "VFIO_IOMMU_GET_INFO needs {argsz} bytes but the buffer has {len}; call it again with a \
         buffer of argsz = {argsz} bytes"
    )]
    NeedsLargerBuffer {
        /// The size the kernel asked for.
        argsz: u32,
        /// Length of the buffer.
        len: usize,
    },
    /// No IOMMU page sizes: the PGSIZES flag is clear or `iova_pgsizes` is 0.
    #[error(
        "VFIO_IOMMU_GET_INFO reported no IOMMU page sizes (flags {flags:#x}, iova_pgsizes \
         {iova_pgsizes:#x}); the container cannot map DMA: attach an IOMMU-backed group and \
         set the type1 IOMMU before asking"
    )]
    NoPageSizes {
        /// The `flags` field.
        flags: u32,
        /// The `iova_pgsizes` field.
        iova_pgsizes: u64,
    },
    /// `cap_offset` points into the fixed header.
    #[error(
        "VFIO_IOMMU_GET_INFO cap_offset {offset:#x} points into the 24-byte header; the reply \
         is corrupt: report it with the kernel version (uname -r)"
    )]
    CapOffsetInHeader {
        /// The `cap_offset` field.
        offset: u32,
    },
    /// A capability header runs past the end of the buffer.
    #[error(
        "VFIO_IOMMU_GET_INFO capability header at offset {offset:#x} runs past the end of the \
         {len}-byte reply; the chain is truncated: retry with the argsz the kernel asks for"
    )]
    CapHeaderTruncated {
        /// Offset of the capability.
        offset: usize,
        /// Length of the (argsz-limited) buffer.
        len: usize,
    },
    /// A capability body runs past the end of the buffer.
    #[error(
        "VFIO_IOMMU_GET_INFO capability {id} at offset {offset:#x} needs {need} bytes but the \
         {len}-byte reply ends first; the chain is truncated: retry with the argsz the kernel asks for"
    )]
    CapBodyTruncated {
        /// The capability id.
        id: u16,
        /// Offset of the capability.
        offset: usize,
        /// Bytes the capability needs from `offset`.
        need: usize,
        /// Length of the (argsz-limited) buffer.
        len: usize,
    },
    /// A `next` pointer that points backwards or to its own capability.
    #[error(
        "VFIO_IOMMU_GET_INFO capability at offset {offset:#x} has next = {next:#x}, which does \
         not move forward, so the chain would loop; the reply is corrupt: report it with the \
         kernel version (uname -r)"
    )]
    ChainLoop {
        /// Offset of the capability.
        offset: usize,
        /// Its `next` field.
        next: u32,
    },
    /// More capabilities than [`MAX_CAPS`].
    #[error(
        "VFIO_IOMMU_GET_INFO capability chain is longer than {max} entries (stopped at offset \
         {offset:#x}); the reply is corrupt: report it with the kernel version (uname -r)"
    )]
    ChainTooLong {
        /// The bound ([`MAX_CAPS`]).
        max: usize,
        /// Offset of the first capability past the bound.
        offset: usize,
    },
    /// The same known capability appears twice.
    #[error(
        "VFIO_IOMMU_GET_INFO capability {id} appears twice (again at offset {offset:#x}); the \
         reply is corrupt: report it with the kernel version (uname -r)"
    )]
    DuplicateCap {
        /// The capability id.
        id: u16,
        /// Offset of the second occurrence.
        offset: usize,
    },
    /// The IOVA-range array does not fit in the buffer.
    #[error(
        "VFIO_IOMMU_GET_INFO IOVA-range capability at offset {offset:#x} claims {nr_iovas} \
         ranges, which do not fit in the {len}-byte reply; retry with the argsz the kernel asks for"
    )]
    IovaRangesTruncated {
        /// Offset of the capability.
        offset: usize,
        /// The `nr_iovas` field.
        nr_iovas: u32,
        /// Length of the (argsz-limited) buffer.
        len: usize,
    },
    /// An IOVA range whose end is below its start.
    #[error(
        "VFIO_IOMMU_GET_INFO IOVA range {index} at offset {offset:#x} ends ({end:#x}) before it \
         starts ({start:#x}); the reply is corrupt: report it with the kernel version (uname -r)"
    )]
    BadIovaRange {
        /// Index in the range array.
        index: u32,
        /// Offset of the range entry.
        offset: usize,
        /// Its start.
        start: u64,
        /// Its (inclusive) end.
        end: u64,
    },
}

fn bytes_at<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    bytes_at(buf, off).map(u16::from_le_bytes)
}
fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    bytes_at(buf, off).map(u32::from_le_bytes)
}
fn u64_at(buf: &[u8], off: usize) -> Option<u64> {
    bytes_at(buf, off).map(u64::from_le_bytes)
}

/// A zeroed request buffer of `max(argsz, INFO_HEADER_LEN)` bytes with
/// `argsz` filled in, ready for `VFIO_IOMMU_GET_INFO`.
pub fn info_request(argsz: u32) -> Vec<u8> {
    let len = (argsz as usize).max(INFO_HEADER_LEN);
    let mut buf = vec![0u8; len];
    let at = offset_of!(vfio_iommu_type1_info, argsz);
    // `len` came from a u32 or is 24, so it fits.
    buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf
}

/// After a `VFIO_IOMMU_GET_INFO` call: `Some(argsz)` if the kernel asked for
/// a larger buffer than `buf` (call again with [`info_request`]`(argsz)`),
/// `None` if the reply is complete (or too short to tell).
pub fn needed_argsz(buf: &[u8]) -> Option<u32> {
    let argsz = u32_at(buf, offset_of!(vfio_iommu_type1_info, argsz))?;
    (argsz as usize > buf.len()).then_some(argsz)
}

impl IommuInfo {
    /// Whether an IOMMU-backed domain translates for the container, from
    /// what the kernel reports: a type1 container starts with
    /// `pgsize_bitmap = PAGE_MASK` (every size from the base page up) and
    /// an empty IOVA list, and only an IOMMU domain narrows the first and
    /// fills the second (`vfio_iommu_type1_open`, `vfio_iommu_iova_build_caps`
    /// in `drivers/vfio/vfio_iommu_type1.c`). A container holding only mdev
    /// groups keeps both: its `MAP_DMA` pins nothing.
    pub fn has_iommu_domain(&self) -> bool {
        let page = crate::addr::base_page_size();
        let page_mask = !(page - 1);
        !(self.iova_pgsizes == page_mask && self.iova_ranges.is_none())
    }

    /// The smallest IOMMU page size (the lowest set bit of `iova_pgsizes`):
    /// every IOVA and length given to `VFIO_IOMMU_MAP_DMA` must be a multiple
    /// of it. 0 only if `iova_pgsizes` is 0, which `parse` never returns.
    pub fn min_page_size(&self) -> u64 {
        self.iova_pgsizes & self.iova_pgsizes.wrapping_neg()
    }

    /// Every IOMMU page size, smallest first.
    pub fn page_sizes(&self) -> Vec<u64> {
        (0..64)
            .map(|bit| 1u64 << bit)
            .filter(|size| self.iova_pgsizes & size != 0)
            .collect()
    }

    /// Decodes a `VFIO_IOMMU_GET_INFO` reply.
    ///
    /// Only the first `argsz` bytes are read. Capabilities are read only when
    /// `flags` has `VFIO_IOMMU_INFO_CAPS` and `cap_offset` is non-zero;
    /// unknown capability ids are recorded in
    /// [`unknown_caps`](Self::unknown_caps) and skipped.
    ///
    /// # Errors
    /// See [`InfoError`]: short buffer, a buffer the kernel wants larger,
    /// no page sizes, truncated or looping capability chains, and malformed
    /// IOVA-range capabilities.
    pub fn parse(buf: &[u8]) -> Result<IommuInfo, InfoError> {
        let too_short = InfoError::TooShort { len: buf.len() };
        if buf.len() < INFO_HEADER_LEN {
            return Err(too_short);
        }
        let field32 = |off| u32_at(buf, off).ok_or(too_short.clone());
        let argsz = field32(offset_of!(vfio_iommu_type1_info, argsz))?;
        let flags = field32(offset_of!(vfio_iommu_type1_info, flags))?;
        let cap_offset = field32(offset_of!(vfio_iommu_type1_info, cap_offset))?;
        let iova_pgsizes = u64_at(buf, offset_of!(vfio_iommu_type1_info, iova_pgsizes))
            .ok_or(too_short.clone())?;
        if argsz as usize > buf.len() {
            return Err(InfoError::NeedsLargerBuffer {
                argsz,
                len: buf.len(),
            });
        }
        if (argsz as usize) < INFO_HEADER_LEN {
            return Err(InfoError::ArgszTooSmall { argsz });
        }
        if flags & VFIO_IOMMU_INFO_PGSIZES == 0 || iova_pgsizes == 0 {
            return Err(InfoError::NoPageSizes {
                flags,
                iova_pgsizes,
            });
        }
        let mut info = IommuInfo {
            iova_pgsizes,
            iova_ranges: None,
            dma_avail: None,
            migration: None,
            unknown_caps: Vec::new(),
        };
        if flags & VFIO_IOMMU_INFO_CAPS == 0 || cap_offset == 0 {
            return Ok(info);
        }
        if (cap_offset as usize) < INFO_HEADER_LEN {
            return Err(InfoError::CapOffsetInHeader { offset: cap_offset });
        }
        info.parse_chain(&buf[..argsz as usize], cap_offset as usize)?;
        Ok(info)
    }

    fn parse_chain(&mut self, buf: &[u8], first: usize) -> Result<(), InfoError> {
        let mut offset = first;
        for _ in 0..MAX_CAPS {
            let header = offset
                .checked_add(CAP_HEADER_LEN)
                .and_then(|end| buf.get(offset..end))
                .ok_or(InfoError::CapHeaderTruncated {
                    offset,
                    len: buf.len(),
                })?;
            // The header is CAP_HEADER_LEN bytes, so these reads succeed.
            let id = u16_at(header, offset_of!(vfio_info_cap_header, id)).unwrap_or_default();
            let next = u32_at(header, offset_of!(vfio_info_cap_header, next)).unwrap_or_default();
            let duplicate = || InfoError::DuplicateCap { id, offset };
            match u32::from(id) {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    if self.iova_ranges.is_some() {
                        return Err(duplicate());
                    }
                    self.iova_ranges = Some(parse_iova_ranges(buf, offset, id)?);
                }
                VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION => {
                    if self.migration.is_some() {
                        return Err(duplicate());
                    }
                    let body = cap_body(buf, offset, id, MIGRATION_CAP_LEN)?;
                    type M = vfio_iommu_type1_info_cap_migration;
                    // The body is MIGRATION_CAP_LEN bytes, so these reads succeed.
                    self.migration = Some(MigrationCap {
                        flags: u32_at(body, offset_of!(M, flags)).unwrap_or_default(),
                        pgsize_bitmap: u64_at(body, offset_of!(M, pgsize_bitmap))
                            .unwrap_or_default(),
                        max_dirty_bitmap_size: u64_at(body, offset_of!(M, max_dirty_bitmap_size))
                            .unwrap_or_default(),
                    });
                }
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                    if self.dma_avail.is_some() {
                        return Err(duplicate());
                    }
                    let body = cap_body(buf, offset, id, DMA_AVAIL_CAP_LEN)?;
                    self.dma_avail =
                        u32_at(body, offset_of!(vfio_iommu_type1_info_dma_avail, avail));
                }
                _ => self.unknown_caps.push(id),
            }
            if next == 0 {
                return Ok(());
            }
            if next as usize <= offset {
                return Err(InfoError::ChainLoop { offset, next });
            }
            offset = next as usize;
        }
        Err(InfoError::ChainTooLong {
            max: MAX_CAPS,
            offset,
        })
    }
}

/// The `need` bytes of the capability at `offset` (header included).
fn cap_body(buf: &[u8], offset: usize, id: u16, need: usize) -> Result<&[u8], InfoError> {
    offset
        .checked_add(need)
        .and_then(|end| buf.get(offset..end))
        .ok_or(InfoError::CapBodyTruncated {
            id,
            offset,
            need,
            len: buf.len(),
        })
}

fn parse_iova_ranges(buf: &[u8], offset: usize, id: u16) -> Result<Vec<IovaRange>, InfoError> {
    type C = vfio_iommu_type1_info_cap_iova_range;
    let body = cap_body(buf, offset, id, IOVA_CAP_LEN)?;
    let nr_iovas = u32_at(body, offset_of!(C, nr_iovas)).unwrap_or_default();
    let array = offset + offset_of!(C, iova_ranges);
    let fits = (nr_iovas as usize)
        .checked_mul(IOVA_RANGE_LEN)
        .and_then(|n| n.checked_add(array))
        .is_some_and(|end| end <= buf.len());
    if !fits {
        return Err(InfoError::IovaRangesTruncated {
            offset,
            nr_iovas,
            len: buf.len(),
        });
    }
    (0..nr_iovas)
        .map(|index| {
            let at = array + index as usize * IOVA_RANGE_LEN;
            // The array was checked to fit.
            let start = u64_at(buf, at + offset_of!(vfio_iova_range, start)).unwrap_or_default();
            let end = u64_at(buf, at + offset_of!(vfio_iova_range, end)).unwrap_or_default();
            IovaRange::new(Iova(start), Iova(end)).ok_or(InfoError::BadIovaRange {
                index,
                offset: at,
                start,
                end,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PGSIZES: u64 = 0x4000_0000 | 0x20_0000 | 0x1000; // 4K | 2M | 1G
    const ALL_FLAGS: u32 = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;

    /// Builds `VFIO_IOMMU_GET_INFO` replies byte by byte.
    struct Fixture {
        buf: Vec<u8>,
        /// Offsets of the capabilities, in chain order.
        caps: Vec<usize>,
    }

    impl Fixture {
        fn new(flags: u32, pgsizes: u64) -> Self {
            let mut buf = vec![0u8; INFO_HEADER_LEN];
            buf[4..8].copy_from_slice(&flags.to_le_bytes());
            buf[8..16].copy_from_slice(&pgsizes.to_le_bytes());
            Fixture { buf, caps: vec![] }
        }
        fn put32(&mut self, at: usize, v: u32) {
            self.buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        /// Appends a capability (8-byte aligned, as the kernel lays them out)
        /// and links it from the previous one or from `cap_offset`.
        fn cap(mut self, id: u16, body: &[u8]) -> Self {
            while self.buf.len() % 8 != 0 {
                self.buf.push(0);
            }
            let at = self.buf.len();
            let link = self.caps.last().map_or(16, |&prev| prev + 4);
            self.put32(link, at as u32);
            self.buf.extend_from_slice(&id.to_le_bytes());
            self.buf.extend_from_slice(&1u16.to_le_bytes());
            self.buf.extend_from_slice(&0u32.to_le_bytes());
            self.buf.extend_from_slice(body);
            self.caps.push(at);
            self
        }
        fn iova_ranges(self, ranges: &[(u64, u64)]) -> Self {
            self.iova_ranges_n(ranges.len() as u32, ranges)
        }
        fn iova_ranges_n(self, nr: u32, ranges: &[(u64, u64)]) -> Self {
            let mut body = nr.to_le_bytes().to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            for &(s, e) in ranges {
                body.extend_from_slice(&s.to_le_bytes());
                body.extend_from_slice(&e.to_le_bytes());
            }
            self.cap(1, &body)
        }
        fn dma_avail(self, n: u32) -> Self {
            self.cap(3, &n.to_le_bytes())
        }
        fn migration(self, flags: u32, bitmap: u64, max: u64) -> Self {
            let mut body = flags.to_le_bytes().to_vec();
            body.extend_from_slice(&[0; 4]); // padding before the u64
            body.extend_from_slice(&bitmap.to_le_bytes());
            body.extend_from_slice(&max.to_le_bytes());
            self.cap(2, &body)
        }
        /// Sets `next` of capability `i` (in chain order).
        fn next_of(mut self, i: usize, next: u32) -> Self {
            let at = self.caps[i] + 4;
            self.put32(at, next);
            self
        }
        /// The finished reply, with `argsz` = its length.
        fn bytes(mut self) -> Vec<u8> {
            let len = self.buf.len() as u32;
            self.put32(0, len);
            self.buf
        }
    }

    const MSI_SPLIT: [(u64, u64); 2] = [(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)];

    fn ranges(v: &[(u64, u64)]) -> Vec<IovaRange> {
        v.iter()
            .map(|&(s, e)| IovaRange::new(Iova(s), Iova(e)).unwrap())
            .collect()
    }

    #[test]
    fn layout_matches_bindings() {
        assert_eq!(INFO_HEADER_LEN, 24);
        assert_eq!(CAP_HEADER_LEN, 8);
        assert_eq!(IOVA_CAP_LEN, 16);
        assert_eq!(MIGRATION_CAP_LEN, 32);
        assert_eq!(
            offset_of!(vfio_iommu_type1_info_cap_migration, pgsize_bitmap),
            16
        );
        assert_eq!(DMA_AVAIL_CAP_LEN, 12);
    }

    #[test]
    fn no_caps_flag() {
        // A cap_offset without the CAPS flag is ignored.
        let mut f = Fixture::new(VFIO_IOMMU_INFO_PGSIZES, PGSIZES).dma_avail(7);
        f.put32(16, 24);
        let info = IommuInfo::parse(&f.bytes()).unwrap();
        assert_eq!(
            info,
            IommuInfo {
                iova_pgsizes: PGSIZES,
                iova_ranges: None,
                dma_avail: None,
                migration: None,
                unknown_caps: vec![]
            }
        );
        assert_eq!(info.min_page_size(), 0x1000);
        assert_eq!(info.page_sizes(), vec![0x1000, 0x20_0000, 0x4000_0000]);
        // CAPS set but cap_offset 0: no chain.
        let info = IommuInfo::parse(&Fixture::new(ALL_FLAGS, PGSIZES).bytes()).unwrap();
        assert_eq!(info.iova_ranges, None);
    }

    #[test]
    fn iova_ranges_around_msi_window() {
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .iova_ranges(&MSI_SPLIT)
            .bytes();
        let info = IommuInfo::parse(&b).unwrap();
        assert_eq!(info.iova_ranges, Some(ranges(&MSI_SPLIT)));
        assert_eq!(info.dma_avail, None);
    }

    #[test]
    fn an_mdev_only_container_has_no_iommu_domain() {
        // What an mdev-only container reports (seen on 6.12): every page
        // size from 4K up, a DMA_AVAIL, no IOVA ranges.
        let page_mask = !(crate::addr::base_page_size() - 1);
        let mdev =
            IommuInfo::parse(&Fixture::new(ALL_FLAGS, page_mask).dma_avail(65535).bytes()).unwrap();
        assert!(!mdev.has_iommu_domain());
        // An IOMMU domain narrows the sizes and brings the ranges.
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .iova_ranges(&MSI_SPLIT)
            .bytes();
        assert!(IommuInfo::parse(&b).unwrap().has_iommu_domain());
        // A kernel before the range capability (5.4) with a domain: the page
        // sizes alone tell.
        assert!(
            IommuInfo::parse(&Fixture::new(ALL_FLAGS, PGSIZES).bytes())
                .unwrap()
                .has_iommu_domain()
        );
    }

    #[test]
    fn dma_avail() {
        let b = Fixture::new(ALL_FLAGS, 0x1000).dma_avail(65535).bytes();
        assert_eq!(IommuInfo::parse(&b).unwrap().dma_avail, Some(65535));
    }

    #[test]
    fn migration() {
        let b = Fixture::new(ALL_FLAGS, 0x1000)
            .migration(1, 0x1000, 0x1_0000_0000)
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b).unwrap().migration,
            Some(MigrationCap {
                flags: 1,
                pgsize_bitmap: 0x1000,
                max_dirty_bitmap_size: 0x1_0000_0000
            })
        );
    }

    #[test]
    fn all_three_in_any_order() {
        type Add = fn(Fixture) -> Fixture;
        let adders: [Add; 3] = [
            |f| f.iova_ranges(&MSI_SPLIT),
            |f| f.dma_avail(42),
            |f| f.migration(1, 0x1000, 0x40),
        ];
        for order in [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ] {
            let mut f = Fixture::new(ALL_FLAGS, PGSIZES);
            for i in order {
                f = adders[i](f);
            }
            let info = IommuInfo::parse(&f.bytes()).unwrap();
            assert_eq!(info.iova_ranges, Some(ranges(&MSI_SPLIT)), "{order:?}");
            assert_eq!(info.dma_avail, Some(42));
            assert_eq!(info.migration.map(|m| m.max_dirty_bitmap_size), Some(0x40));
            assert!(info.unknown_caps.is_empty());
        }
    }

    #[test]
    fn unknown_cap_in_the_middle_is_skipped() {
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .iova_ranges(&MSI_SPLIT)
            .cap(0x99, &[0xab; 20])
            .cap(0, &[])
            .dma_avail(3)
            .bytes();
        let info = IommuInfo::parse(&b).unwrap();
        assert_eq!(info.unknown_caps, vec![0x99, 0]);
        assert_eq!(info.iova_ranges, Some(ranges(&MSI_SPLIT)));
        assert_eq!(info.dma_avail, Some(3));
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            IommuInfo::parse(&[0; 20]),
            Err(InfoError::TooShort { len: 20 })
        );
        assert_eq!(IommuInfo::parse(&[]), Err(InfoError::TooShort { len: 0 }));
        let mut b = Fixture::new(ALL_FLAGS, PGSIZES).bytes();
        b[0..4].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::ArgszTooSmall { argsz: 16 })
        );
        let b = Fixture::new(ALL_FLAGS, 0).bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::NoPageSizes {
                flags: ALL_FLAGS,
                iova_pgsizes: 0
            })
        );
        let b = Fixture::new(VFIO_IOMMU_INFO_CAPS, PGSIZES).bytes();
        assert!(matches!(
            IommuInfo::parse(&b),
            Err(InfoError::NoPageSizes { .. })
        ));
        let mut f = Fixture::new(ALL_FLAGS, PGSIZES);
        f.put32(16, 8);
        assert_eq!(
            IommuInfo::parse(&f.bytes()),
            Err(InfoError::CapOffsetInHeader { offset: 8 })
        );
    }

    #[test]
    fn two_call_pattern() {
        // First call: the kernel saw argsz 24, set the CAPS flag and asked
        // for 72 bytes without writing the chain.
        let mut first = info_request(INFO_HEADER_LEN as u32);
        assert_eq!(first.len(), 24);
        assert_eq!(needed_argsz(&first), None);
        first[0..4].copy_from_slice(&72u32.to_le_bytes());
        first[4..8].copy_from_slice(&ALL_FLAGS.to_le_bytes());
        first[8..16].copy_from_slice(&PGSIZES.to_le_bytes());
        assert_eq!(needed_argsz(&first), Some(72));
        assert_eq!(
            IommuInfo::parse(&first),
            Err(InfoError::NeedsLargerBuffer { argsz: 72, len: 24 })
        );
        let second = info_request(72);
        assert_eq!((second.len(), needed_argsz(&second)), (72, None));
        assert_eq!(&second[0..4], &72u32.to_le_bytes());
        assert_eq!(needed_argsz(&[1, 2]), None);
        assert_eq!(info_request(0).len(), INFO_HEADER_LEN);
    }

    #[test]
    fn bytes_past_argsz_are_ignored() {
        // A larger buffer than argsz: trailing garbage is not read.
        let mut b = Fixture::new(ALL_FLAGS, PGSIZES).dma_avail(5).bytes();
        let argsz = b.len();
        b.extend_from_slice(&[0xff; 64]);
        b[argsz - 12 + 4..argsz - 12 + 8].copy_from_slice(&(argsz as u32).to_le_bytes());
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::CapHeaderTruncated {
                offset: argsz,
                len: argsz
            })
        );
    }

    #[test]
    fn truncated_header() {
        let mut b = Fixture::new(ALL_FLAGS, PGSIZES).dma_avail(1).bytes();
        b.truncate(24 + 6);
        b[0..4].copy_from_slice(&30u32.to_le_bytes());
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::CapHeaderTruncated {
                offset: 24,
                len: 30
            })
        );
        // A next pointing past the end.
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .dma_avail(1)
            .next_of(0, 0x1000)
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::CapHeaderTruncated {
                offset: 0x1000,
                len: 36
            })
        );
    }

    #[test]
    fn truncated_body() {
        for (f, id, need) in [
            (Fixture::new(ALL_FLAGS, PGSIZES).dma_avail(1), 3, 12),
            (Fixture::new(ALL_FLAGS, PGSIZES).migration(0, 0, 0), 2, 32),
            (Fixture::new(ALL_FLAGS, PGSIZES).iova_ranges(&[]), 1, 16),
        ] {
            let mut b = f.bytes();
            b.truncate(b.len() - 1);
            let len = b.len();
            b[0..4].copy_from_slice(&(len as u32).to_le_bytes());
            assert_eq!(
                IommuInfo::parse(&b),
                Err(InfoError::CapBodyTruncated {
                    id,
                    offset: 24,
                    need,
                    len
                })
            );
        }
    }

    #[test]
    fn looping_chains() {
        // Self-loop.
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .dma_avail(1)
            .next_of(0, 24)
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::ChainLoop {
                offset: 24,
                next: 24
            })
        );
        // Backward pointer into the first cap.
        let f = Fixture::new(ALL_FLAGS, PGSIZES)
            .iova_ranges(&MSI_SPLIT)
            .cap(9, &[])
            .cap(10, &[]);
        let third = f.caps[2];
        let b = f.next_of(2, 28).bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::ChainLoop {
                offset: third,
                next: 28
            })
        );
        // Cycle of two: A -> B -> A (caught as a backward pointer, before A
        // would be read twice).
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .cap(9, &[])
            .cap(10, &[])
            .next_of(1, 24)
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::ChainLoop {
                offset: 32,
                next: 24
            })
        );
        // Forward-only but absurdly long: 8-byte caps each pointing 8 bytes on.
        let mut f = Fixture::new(ALL_FLAGS, PGSIZES);
        for _ in 0..MAX_CAPS + 1 {
            f = f.cap(0x77, &[]);
        }
        let last = f.caps[MAX_CAPS];
        assert_eq!(
            IommuInfo::parse(&f.bytes()),
            Err(InfoError::ChainTooLong {
                max: MAX_CAPS,
                offset: last
            })
        );
    }

    #[test]
    fn duplicate_cap() {
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .dma_avail(1)
            .dma_avail(2)
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::DuplicateCap { id: 3, offset: 40 })
        );
    }

    #[test]
    fn nr_iovas_too_large() {
        for nr in [3, u32::MAX] {
            let b = Fixture::new(ALL_FLAGS, PGSIZES)
                .iova_ranges_n(nr, &MSI_SPLIT)
                .bytes();
            assert_eq!(
                IommuInfo::parse(&b),
                Err(InfoError::IovaRangesTruncated {
                    offset: 24,
                    nr_iovas: nr,
                    len: 24 + 16 + 32
                })
            );
        }
    }

    #[test]
    fn bad_iova_range() {
        let b = Fixture::new(ALL_FLAGS, PGSIZES)
            .iova_ranges(&[(0, 0xfff), (0x2000, 0x1fff)])
            .bytes();
        assert_eq!(
            IommuInfo::parse(&b),
            Err(InfoError::BadIovaRange {
                index: 1,
                offset: 24 + 16 + 16,
                start: 0x2000,
                end: 0x1fff
            })
        );
    }

    #[test]
    fn messages_name_offsets_and_remedies() {
        let m = InfoError::ChainLoop {
            offset: 0x30,
            next: 0x18,
        }
        .to_string();
        assert!(
            m.contains("offset 0x30") && m.contains("next = 0x18"),
            "{m}"
        );
        let m = InfoError::NeedsLargerBuffer { argsz: 72, len: 24 }.to_string();
        assert!(m.contains("argsz = 72"), "{m}");
        let m = InfoError::IovaRangesTruncated {
            offset: 0x18,
            nr_iovas: 9,
            len: 40,
        }
        .to_string();
        assert!(m.contains("offset 0x18") && m.contains("9 ranges"), "{m}");
    }

    proptest! {
        /// Arbitrary bytes never panic.
        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = IommuInfo::parse(&b);
            let _ = needed_argsz(&b);
        }

        /// A plausible header followed by random bytes (so the chain walk
        /// is exercised) never panics, and success implies sane output.
        #[test]
        fn random_chains_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..300),
            cap_offset in 20u32..120,
            pgsizes in 1u64..,
        ) {
            let mut f = Fixture::new(ALL_FLAGS, pgsizes);
            f.put32(16, cap_offset);
            f.buf.extend_from_slice(&tail);
            if let Ok(info) = IommuInfo::parse(&f.bytes()) {
                prop_assert!(info.min_page_size().is_power_of_two());
                for r in info.iova_ranges.unwrap_or_default() {
                    prop_assert!(r.start <= r.end);
                }
            }
        }

        /// Flipping any byte of a valid reply never panics.
        #[test]
        fn mutated_fixture_never_panics(at in any::<prop::sample::Index>(), v in any::<u8>()) {
            let mut b = Fixture::new(ALL_FLAGS, PGSIZES)
                .iova_ranges(&MSI_SPLIT)
                .cap(0x55, &[1, 2, 3])
                .migration(1, 2, 3)
                .dma_avail(4)
                .bytes();
            let i = at.index(b.len());
            b[i] = v;
            let _ = IommuInfo::parse(&b);
        }
    }
}
