//! The `NODE:SIZE[:PAGESIZE][@IOVA]` grammar of `--region`.

use std::str::FromStr;

use numapin::addr::{ParseError, parse_size};
use numapin::{Error, Iova, NodeId, PageSize, PinRequest, Result};

/// A region as the CLI describes it: `NODE:SIZE[:PAGESIZE][@IOVA]`, e.g.
/// `0:512M`, `1:1G:2M`, `0:64M:4K@0x100000000`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSpec(pub PinRequest<'static>);

impl FromStr for RegionSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let usage = |why: String| {
            Error::Invalid(format!(
                "bad region `{s}`: {why}; expected NODE:SIZE[:PAGESIZE][@IOVA], e.g. 0:512M, 1:1G:2M or 0:64M@0x100000000"
            ))
        };
        let (body, iova) = match s.split_once('@') {
            Some((b, i)) => (
                b,
                Some(i.parse::<Iova>().map_err(|e| usage(e.to_string()))?),
            ),
            None => (s, None),
        };
        let parts: Vec<&str> = body.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(usage("wrong number of `:` fields".into()));
        }
        let node = parts[0]
            .trim()
            .parse::<u32>()
            .map(NodeId)
            .map_err(|_| usage(format!("`{}` is not a node number", parts[0])))?;
        let size = parse_size(parts[1]).map_err(|e: ParseError| usage(e.to_string()))?;
        let page_size = match parts.get(2) {
            Some(p) => p.parse::<PageSize>().map_err(|e| usage(e.to_string()))?,
            None => PageSize::Base,
        };
        Ok(RegionSpec(PinRequest {
            page_size,
            iova,
            ..PinRequest::new(node, size)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<PinRequest<'static>> {
        s.parse::<RegionSpec>().map(|r| r.0)
    }

    #[test]
    fn region_specs() {
        assert_eq!(
            spec("0:512M").unwrap(),
            PinRequest::new(NodeId(0), 512 << 20)
        );
        assert_eq!(
            spec("1:1G:2M@0x100000000").unwrap(),
            PinRequest {
                page_size: PageSize::Huge2M,
                iova: Some(Iova(0x1_0000_0000)),
                ..PinRequest::new(NodeId(1), 1 << 30)
            }
        );
        assert_eq!(spec("0:4096:4K").unwrap().page_size, PageSize::Base);
        // Size 0 parses; the pinner rejects it with its own error.
        assert_eq!(spec("0:0").unwrap().size, 0);
        for bad in [
            "",
            "0",
            "x:1M",
            "0:1M:3M",
            "0:1Q",
            "0:1M@4096",
            "0:1M:2M:x",
            "-1:4K",
        ] {
            let e = spec(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected NODE:SIZE[:PAGESIZE][@IOVA]"),
                "{bad}: {e}"
            );
        }
        assert!(
            spec("0:1M:3M")
                .unwrap_err()
                .to_string()
                .contains("use 4K, 2M or 1G")
        );
        assert!(
            spec("0:1M@4096")
                .unwrap_err()
                .to_string()
                .contains("0x-prefixed hex")
        );
    }
}
