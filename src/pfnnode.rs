//! Which NUMA node a physical frame is on, from sysfs's memory blocks.
//!
//! The kernel splits RAM into memory blocks of `block_size_bytes`
//! (`/sys/devices/system/memory/block_size_bytes`, hexadecimal without a
//! `0x`); block `M` holds the frames from `M * block_size / page_size` on,
//! and `/sys/devices/system/node/nodeN/memoryM` exists for each block `M`
//! of node `N` (see the kernel's
//! `Documentation/admin-guide/mm/memory-hotplug.rst`). Reading that once
//! turns every PFN of a pagemap read into a node without asking the kernel
//! per page (`move_pages(2)`). The map is cached per process and read again
//! when a frame falls outside every known block (memory hot-added since).
//! A kernel without memory block devices in sysfs (they come with memory
//! hotplug support) gives no map; the caller then asks `move_pages(2)`. A
//! block that spans a node boundary is listed under each of its nodes; it
//! is left out of the map, so its frames go to `move_pages(2)` too.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The memory-block → node map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockMap {
    /// Bytes per memory block.
    block_bytes: u64,
    /// Runs of consecutive blocks on one node: `(first block, blocks, node)`,
    /// sorted by first block.
    runs: Vec<(u64, u64, u32)>,
}

impl BlockMap {
    /// Reads the map from a sysfs tree rooted at `sys` (normally `/sys`).
    pub(crate) fn read(sys: &Path) -> io::Result<BlockMap> {
        let size_path = sys.join("devices/system/memory/block_size_bytes");
        let text = fs::read_to_string(&size_path)?;
        let block_bytes = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds {text:?}, not a hexadecimal size",
                        size_path.display()
                    ),
                )
            })?;
        let mut blocks: Vec<(u64, u32)> = Vec::new();
        for node_dir in fs::read_dir(sys.join("devices/system/node"))? {
            let node_dir = node_dir?;
            let name = node_dir.file_name();
            let Some(node) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            for entry in fs::read_dir(node_dir.path())? {
                let entry = entry?;
                let name = entry.file_name();
                if let Some(block) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("memory"))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    blocks.push((block, node));
                }
            }
        }
        blocks.sort_unstable();
        // A block that spans a node boundary is linked under every node it
        // holds frames of (`register_mem_block_under_node_early` in the
        // kernel's `drivers/base/node.c`): its frames' node cannot be told
        // from the block, so it is left out and its frames go to
        // `move_pages(2)`.
        let shared: Vec<u64> = blocks
            .windows(2)
            .filter(|w| w[0].0 == w[1].0)
            .map(|w| w[0].0)
            .collect();
        blocks.retain(|(b, _)| shared.binary_search(b).is_err());
        let mut runs: Vec<(u64, u64, u32)> = Vec::new();
        for (block, node) in blocks {
            match runs.last_mut() {
                Some((first, n, nd)) if *nd == node && *first + *n == block => *n += 1,
                _ => runs.push((block, 1, node)),
            }
        }
        Ok(BlockMap { block_bytes, runs })
    }

    /// The node of the frame `pfn` (of `page` bytes), if a known block
    /// holds it.
    pub(crate) fn node_of(&self, pfn: u64, page: u64) -> Option<u32> {
        self.run_of(pfn, page).map(|(_, _, node)| node)
    }

    /// The node of every frame, or `None` if one is outside every block.
    /// Consecutive frames in one block cost one compare.
    pub(crate) fn nodes_of(
        &self,
        pfns: impl IntoIterator<Item = u64>,
        page: u64,
    ) -> Option<Vec<i32>> {
        let mut out = Vec::new();
        // The block last found and its node.
        let mut last: Option<(u64, i32)> = None;
        for pfn in pfns {
            let block = pfn.checked_mul(page)? / self.block_bytes;
            let node = match last {
                Some((b, n)) if b == block => n,
                _ => {
                    let n = self.node_of(pfn, page)? as i32;
                    last = Some((block, n));
                    n
                }
            };
            out.push(node);
        }
        Some(out)
    }
}

impl BlockMap {
    /// The run of blocks holding frame `pfn` (of `page` bytes), as the
    /// frames it spans, `[first, end)`, and its node.
    fn run_of(&self, pfn: u64, page: u64) -> Option<(u64, u64, u32)> {
        let block = pfn.checked_mul(page)? / self.block_bytes;
        let i = self
            .runs
            .partition_point(|&(first, _, _)| first <= block)
            .checked_sub(1)?;
        let (first, n, node) = self.runs[i];
        if block - first >= n {
            return None;
        }
        // Frames per block; a block that is not a whole number of pages
        // (never seen) gives a run of this frame alone.
        let per = self.block_bytes / page;
        if per == 0 || self.block_bytes % page != 0 {
            return Some((pfn, pfn + 1, node));
        }
        let lo = first.checked_mul(per)?;
        let hi = (first + n).saturating_mul(per);
        Some((lo, hi, node))
    }

    /// Counts the frames `pfns[0], pfns[stride], ..` that are not on
    /// `node`, and names the first: `(its index in the strided sequence,
    /// its node)`. `None` if a frame is outside every block. A frame in the
    /// run of blocks of the frame before costs two compares (no division,
    /// no search).
    fn off_node(&self, pfns: impl Iterator<Item = u64>, page: u64, node: u32) -> Option<OffNode> {
        let mut out = OffNode::default();
        // The run last found: its frames `[lo, hi)` and its node.
        let (mut lo, mut hi, mut n) = (1u64, 0u64, 0u32);
        for (i, pfn) in pfns.enumerate() {
            if pfn < lo || pfn >= hi {
                (lo, hi, n) = self.run_of(pfn, page)?;
            }
            out.pages += 1;
            if n != node {
                out.off += 1;
                out.first.get_or_insert((i, n));
            }
        }
        Some(out)
    }
}

/// What [`off_node`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OffNode {
    /// Frames looked at.
    pub(crate) pages: u64,
    /// Of them, not on the node.
    pub(crate) off: u64,
    /// The first of those: its index and its node.
    pub(crate) first: Option<(usize, u32)>,
}

/// The map of this machine, read on first use.
static CACHE: Mutex<Option<Arc<BlockMap>>> = Mutex::new(None);

fn sysfs() -> PathBuf {
    PathBuf::from("/sys")
}

/// The node of every frame (PFNs of `page` bytes, the base page size for
/// what `/proc/self/pagemap` reports), from the cached map, read again once
/// if a frame is outside it. `None`: sysfs has no memory blocks, or a frame
/// is in none of them even after the re-read (ask `move_pages(2)` instead).
pub fn nodes_of_pfns(pfns: &[u64], page: u64) -> Option<Vec<i32>> {
    let cached = CACHE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(map) = &cached
        && let Some(n) = map.nodes_of(pfns.iter().copied(), page)
    {
        return Some(n);
    }
    let map = Arc::new(BlockMap::read(&sysfs()).ok()?);
    *CACHE.lock().unwrap_or_else(|e| e.into_inner()) = Some(map.clone());
    map.nodes_of(pfns.iter().copied(), page)
}

/// Like [`nodes_of_pfns`], counting instead of listing: the frames
/// `pfns` (of `page` bytes; one per page looked at) not on `node`.
pub(crate) fn off_node(
    pfns: impl Iterator<Item = u64> + Clone,
    page: u64,
    node: u32,
) -> Option<OffNode> {
    let cached = CACHE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(map) = &cached
        && let Some(n) = map.off_node(pfns.clone(), page, node)
    {
        return Some(n);
    }
    let map = Arc::new(BlockMap::read(&sysfs()).ok()?);
    *CACHE.lock().unwrap_or_else(|e| e.into_inner()) = Some(map.clone());
    map.off_node(pfns, page, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: `block_size_bytes` and, per node, its blocks.
    fn fake(block_size: &str, nodes: &[(u32, &[u64])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let mem = d.path().join("devices/system/memory");
        fs::create_dir_all(&mem).unwrap();
        fs::write(mem.join("block_size_bytes"), block_size).unwrap();
        let node_root = d.path().join("devices/system/node");
        fs::create_dir_all(&node_root).unwrap();
        // Files that are not nodes or blocks are ignored.
        fs::write(node_root.join("possible"), "0-1\n").unwrap();
        for &(n, blocks) in nodes {
            let nd = node_root.join(format!("node{n}"));
            fs::create_dir_all(&nd).unwrap();
            fs::write(nd.join("cpumap"), "3\n").unwrap();
            fs::create_dir_all(nd.join("memory_side_cache")).unwrap();
            for b in blocks {
                // Real sysfs has symlinks to ../../memory/memoryM.
                let target = mem.join(format!("memory{b}"));
                fs::create_dir_all(&target).unwrap();
                std::os::unix::fs::symlink(&target, nd.join(format!("memory{b}"))).unwrap();
            }
        }
        d
    }

    #[test]
    fn a_block_under_two_nodes_is_unknown() {
        // Block 3 spans the boundary: the kernel links it under both nodes.
        let d = fake("8000000\n", &[(0, &[0, 1, 2, 3]), (1, &[3, 4, 5])]);
        let m = BlockMap::read(d.path()).unwrap();
        assert_eq!(m.runs, vec![(0, 3, 0), (4, 2, 1)]);
        let page = 4096;
        let per_block = (128 << 20) / page;
        assert_eq!(m.node_of(3 * per_block - 1, page), Some(0));
        assert_eq!(m.node_of(3 * per_block, page), None);
        assert_eq!(m.node_of(4 * per_block - 1, page), None);
        assert_eq!(m.node_of(4 * per_block, page), Some(1));
        assert_eq!(m.off_node([3 * per_block + 7].into_iter(), page, 1), None);
    }

    #[test]
    fn parses_blocks_into_runs() {
        // 128 MiB blocks: node 0 has blocks 0-3 and 8, node 1 blocks 4-7.
        let d = fake("8000000\n", &[(0, &[0, 1, 2, 3, 8]), (1, &[4, 5, 6, 7])]);
        let m = BlockMap::read(d.path()).unwrap();
        assert_eq!(m.block_bytes, 128 << 20);
        assert_eq!(m.runs, vec![(0, 4, 0), (4, 4, 1), (8, 1, 0)]);
        let page = 4096;
        let per_block = (128 << 20) / page;
        assert_eq!(m.node_of(0, page), Some(0));
        assert_eq!(m.node_of(4 * per_block - 1, page), Some(0));
        assert_eq!(m.node_of(4 * per_block, page), Some(1));
        assert_eq!(m.node_of(8 * per_block - 1, page), Some(1));
        assert_eq!(m.node_of(8 * per_block, page), Some(0));
        // A hole past the last block, and a PFN so large it overflows.
        assert_eq!(m.node_of(9 * per_block, page), None);
        assert_eq!(m.node_of(u64::MAX, page), None);
        assert_eq!(
            m.nodes_of([1, 2, 4 * per_block, 3, 8 * per_block], page),
            Some(vec![0, 0, 1, 0, 0])
        );
        assert_eq!(m.nodes_of([1, 9 * per_block], page), None);
        // Counting: five frames, then every second of them.
        let frames = [1, 4 * per_block, 2, 4 * per_block + 1, 8 * per_block];
        assert_eq!(
            m.off_node(frames.into_iter(), page, 0),
            Some(OffNode {
                pages: 5,
                off: 2,
                first: Some((1, 1))
            })
        );
        assert_eq!(
            m.off_node(frames.into_iter().step_by(2), page, 0),
            Some(OffNode {
                pages: 3,
                off: 0,
                first: None
            })
        );
        assert_eq!(m.off_node([9 * per_block].into_iter(), page, 0), None);
    }

    #[test]
    fn counting_by_runs_agrees_with_each_frame_looked_up() {
        let d = fake("8000000\n", &[(0, &[0, 1, 2, 3, 8]), (1, &[4, 5, 6, 7, 9])]);
        let m = BlockMap::read(d.path()).unwrap();
        let page = 4096;
        let per_block = (128 << 20) / page;
        // Frames at and around every block edge, up and down.
        let mut frames = Vec::new();
        for b in 0..10u64 {
            for d in [0, 1, per_block - 1] {
                frames.push(b * per_block + d);
            }
        }
        let mut down = frames.clone();
        down.reverse();
        frames.extend(down);
        for node in [0, 1] {
            for stride in [1, 2, 3] {
                let mut want = OffNode::default();
                for (i, &f) in frames.iter().step_by(stride).enumerate() {
                    let n = m.node_of(f, page).unwrap();
                    want.pages += 1;
                    if n != node {
                        want.off += 1;
                        want.first.get_or_insert((i, n));
                    }
                }
                let looked = frames.iter().step_by(stride).copied();
                assert_eq!(m.off_node(looked, page, node), Some(want));
            }
        }
        // A frame in the hole after the last block ends the count.
        let mut holed = frames.clone();
        holed.push(10 * per_block);
        assert_eq!(m.off_node(holed.into_iter(), page, 0), None);
    }

    #[test]
    fn holes_between_blocks_are_unknown() {
        // Block 2 is missing (a hole, or memory offlined and removed).
        let d = fake("0x8000000", &[(0, &[0, 1]), (1, &[3])]);
        let m = BlockMap::read(d.path()).unwrap();
        let per_block = (128 << 20) / 4096;
        assert_eq!(m.node_of(2 * per_block, 4096), None);
        assert_eq!(m.node_of(3 * per_block, 4096), Some(1));
    }

    #[test]
    fn bad_block_size_is_refused() {
        for bad in ["", "zz\n", "0\n"] {
            let d = fake(bad, &[(0, &[0])]);
            let e = BlockMap::read(d.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}");
            assert!(e.to_string().contains("block_size_bytes"), "{e}");
        }
    }

    #[test]
    fn missing_memory_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(BlockMap::read(d.path()).is_err());
    }
}
