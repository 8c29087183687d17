//! Address and size newtypes, alignment arithmetic and the parsers for the
//! human forms the CLI accepts (`512M`, `0x1000_0000`, `2M`).
//!
//! IOVAs, physical addresses and NUMA node ids are distinct types so that an
//! IOVA can never be passed where a physical address is expected. All
//! arithmetic that can overflow is checked and lives here, in one place.

use std::fmt;
use std::str::FromStr;

/// Why a size, address or page size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is empty.
    #[error("empty value; expected a number such as 4096, 64K, 512M or 1G")]
    Empty,
    /// The text is not a number with an optional K/M/G/T suffix.
    #[error("`{text}` is not a size; use bytes or a K/M/G/T suffix (binary units), e.g. 512M")]
    BadSize {
        /// The text that was given.
        text: String,
    },
    /// The value does not fit in 64 bits.
    #[error("`{text}` is too large for a 64-bit size or address")]
    Overflow {
        /// The text that was given.
        text: String,
    },
    /// An address without the `0x` prefix or with non-hex digits.
    #[error("`{text}` is not an address; write addresses as 0x-prefixed hex, e.g. 0x100000000")]
    BadAddress {
        /// The text that was given.
        text: String,
    },
    /// A page size other than 4K, 2M or 1G.
    #[error("`{text}` is not a page size numapin supports; use 4K, 2M or 1G")]
    BadPageSize {
        /// The text that was given.
        text: String,
    },
}

macro_rules! addr_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// `self + off`, or `None` on overflow.
            pub fn checked_add(self, off: u64) -> Option<Self> {
                self.0.checked_add(off).map(Self)
            }
            /// `self - other` as a byte distance, or `None` if `other > self`.
            pub fn checked_offset_from(self, other: Self) -> Option<u64> {
                self.0.checked_sub(other.0)
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub fn is_aligned(self, align: u64) -> bool {
                is_aligned(self.0, align)
            }
            /// Rounds up to `align` (a power of two), or `None` on overflow.
            pub fn checked_align_up(self, align: u64) -> Option<Self> {
                align_up(self.0, align).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                parse_addr(s).map(Self)
            }
        }
    };
}

addr_newtype!(
    /// An I/O virtual address: what a device behind the IOMMU puts on the bus.
    Iova
);
addr_newtype!(
    /// A host physical address (what `/proc/self/pagemap` reveals).
    PhysAddr
);
addr_newtype!(
    /// A virtual address in this process (what `mmap` returns and what
    /// `VFIO_IOMMU_MAP_DMA` takes as `vaddr`).
    VirtAddr
);

impl VirtAddr {
    /// The address of `ptr`.
    pub fn of<T>(ptr: *const T) -> VirtAddr {
        VirtAddr(ptr as usize as u64)
    }

    /// The address as a pointer (never dereferenced by numapin unless the
    /// memory is its own).
    pub fn as_mut_ptr(self) -> *mut u8 {
        self.0 as usize as *mut u8
    }

    /// The address as `usize`, for system calls.
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

/// A page frame number: a physical address divided by the base page size,
/// as `/proc/self/pagemap` reports it (bits 0–54).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The raw frame number.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The physical address of the frame's first byte for `page`-byte base
    /// pages, or `None` on overflow.
    pub fn phys_addr(self, page: u64) -> Option<PhysAddr> {
        self.0.checked_mul(page).map(PhysAddr)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

/// A NUMA node id as the kernel numbers them (`/sys/devices/system/node/nodeN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        s.trim()
            .parse::<u32>()
            .map(NodeId)
            .map_err(|_| ParseError::BadSize {
                text: s.to_string(),
            })
    }
}

/// The page size backing a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PageSize {
    /// The base page size (4 KiB on x86-64), anonymous memory.
    #[default]
    Base,
    /// 2 MiB hugetlb pages.
    Huge2M,
    /// 1 GiB hugetlb pages.
    Huge1G,
}

/// 4 KiB.
pub const KIB4: u64 = 4 << 10;
/// 2 MiB.
pub const MIB2: u64 = 2 << 20;
/// 1 GiB.
pub const GIB1: u64 = 1 << 30;

impl PageSize {
    /// Every page size numapin supports, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Base, PageSize::Huge2M, PageSize::Huge1G];

    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Base => base_page_size(),
            PageSize::Huge2M => MIB2,
            PageSize::Huge1G => GIB1,
        }
    }

    /// Whether the pages come from a hugetlb pool.
    pub fn is_huge(self) -> bool {
        self != PageSize::Base
    }

    /// The page size with `bytes` bytes, if numapin supports it.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        PageSize::ALL.into_iter().find(|p| p.bytes() == bytes)
    }

    /// The short name used on the command line: `4K`, `2M`, `1G`.
    pub fn name(self) -> &'static str {
        match self {
            PageSize::Base => "4K",
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PageSize {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::BadPageSize {
            text: s.to_string(),
        };
        let bytes = parse_size(s).map_err(|_| bad())?;
        PageSize::from_bytes(bytes).ok_or_else(bad)
    }
}

/// The kernel's base page size.
pub fn base_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { KIB4 }
}

/// Whether `v` is a multiple of `align`. `align` must be a power of two.
pub fn is_aligned(v: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    v & (align - 1) == 0
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

/// Rounds `v` down to a multiple of `align` (a power of two).
pub fn align_down(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    v & !(align - 1)
}

/// Parses a size: plain bytes (`4096`), a binary suffix (`64K`, `512M`, `1G`,
/// `1T`, optionally followed by `iB` or `B`), or `0x` hex bytes.
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    if t.starts_with("0x") || t.starts_with("0X") {
        return parse_addr(t);
    }
    let bad = || ParseError::BadSize {
        text: s.to_string(),
    };
    let digits_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let num: String = num.chars().filter(|&c| c != '_').collect();
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| ParseError::Overflow {
        text: s.to_string(),
    })?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or(ParseError::Overflow {
        text: s.to_string(),
    })
}

/// Parses a `0x`-prefixed hex address (underscores allowed).
pub fn parse_addr(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    let bad = || ParseError::BadAddress {
        text: s.to_string(),
    };
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .ok_or_else(bad)?;
    let hex: String = hex.chars().filter(|&c| c != '_').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    if hex.trim_start_matches('0').len() > 16 {
        return Err(ParseError::Overflow {
            text: s.to_string(),
        });
    }
    u64::from_str_radix(&hex, 16).map_err(|_| bad())
}

/// Formats a byte count the way people read it: `4 KiB`, `1.5 GiB`.
/// Two sizes for a message that compares them, each as [`human_size`]
/// unless that would print them alike although they differ (`8 MiB` against
/// `8.0 MiB`): then both in the largest unit that shows them exactly.
///
/// ```
/// use numapin::addr::human_sizes;
/// assert_eq!(human_sizes(8 << 20, 16 << 20), ["8 MiB".to_string(), "16 MiB".to_string()]);
/// assert_eq!(human_sizes(8 << 20, (8 << 20) + 4096), ["8192 KiB".to_string(), "8196 KiB".to_string()]);
/// assert_eq!(human_sizes(1000, 1001), ["1000 B".to_string(), "1001 B".to_string()]);
/// ```
pub fn human_sizes(a: u64, b: u64) -> [String; 2] {
    let (ha, hb) = (human_size(a), human_size(b));
    let alike = ha.replace(".0 ", " ") == hb.replace(".0 ", " ");
    if a == b || !alike {
        return [ha, hb];
    }
    for (unit, scale) in [("MiB", 1u64 << 20), ("KiB", 1 << 10)] {
        if a % scale == 0 && b % scale == 0 {
            return [
                format!("{} {unit}", a / scale),
                format!("{} {unit}", b / scale),
            ];
        }
    }
    [format!("{a} B"), format!("{b} B")]
}

/// A byte count for messages: exact in the largest unit that divides it,
/// else to one decimal (`8 MiB`, `1.5 GiB`, `512 B`). Compare two sizes
/// with [`human_sizes`].
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return if bytes % scale == 0 {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{:.1} {unit}", bytes as f64 / scale as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0x2000"), Ok(0x2000));
        assert_eq!(parse_size("1_024"), Ok(1024));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(""), Err(ParseError::Empty));
        assert!(matches!(parse_size("12Q"), Err(ParseError::BadSize { .. })));
        assert!(matches!(parse_size("K"), Err(ParseError::BadSize { .. })));
        assert!(matches!(parse_size("-1"), Err(ParseError::BadSize { .. })));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(ParseError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(ParseError::Overflow { .. })
        ));
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("0x1000"), Ok(0x1000));
        assert_eq!(parse_addr("0X1_0000_0000"), Ok(0x1_0000_0000));
        assert_eq!(parse_addr("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_addr("0x00000000000000000001"), Ok(1));
        assert!(matches!(
            parse_addr("4096"),
            Err(ParseError::BadAddress { .. })
        ));
        assert!(matches!(
            parse_addr("0x"),
            Err(ParseError::BadAddress { .. })
        ));
        assert!(matches!(
            parse_addr("0xfeeg"),
            Err(ParseError::BadAddress { .. })
        ));
        assert!(matches!(
            parse_addr("0x1ffffffffffffffff"),
            Err(ParseError::Overflow { .. })
        ));
        assert_eq!("0x10".parse::<Iova>(), Ok(Iova(0x10)));
        assert_eq!(Iova(0xfee00000).to_string(), "0xfee00000");
        assert_eq!(PhysAddr(0).to_string(), "0x0");
    }

    #[test]
    fn page_sizes() {
        assert_eq!("4K".parse::<PageSize>(), Ok(PageSize::Base));
        assert_eq!("2m".parse::<PageSize>(), Ok(PageSize::Huge2M));
        assert_eq!("1G".parse::<PageSize>(), Ok(PageSize::Huge1G));
        assert_eq!("2097152".parse::<PageSize>(), Ok(PageSize::Huge2M));
        assert!(matches!(
            "8K".parse::<PageSize>(),
            Err(ParseError::BadPageSize { .. })
        ));
        assert!(matches!(
            "huge".parse::<PageSize>(),
            Err(ParseError::BadPageSize { .. })
        ));
        for p in PageSize::ALL {
            assert_eq!(p.name().parse::<PageSize>(), Ok(p));
        }
    }

    #[test]
    fn alignment() {
        assert_eq!(align_up(0, 4096), Some(0));
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(align_down(4097, 4096), 4096);
        assert!(Iova(0x200000).is_aligned(MIB2));
        assert!(!Iova(0x201000).is_aligned(MIB2));
        assert_eq!(Iova(0x201000).checked_align_up(MIB2), Some(Iova(0x400000)));
        assert_eq!(Iova(u64::MAX).checked_add(1), None);
        assert_eq!(Iova(10).checked_offset_from(Iova(4)), Some(6));
        assert_eq!(Iova(4).checked_offset_from(Iova(10)), None);
    }

    #[test]
    fn human() {
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(12), "12 B");
    }
}
