//! numapind's configuration (`numapind.toml`): who may connect, how much
//! each user may hold, the free-memory floor per node, who sees physical
//! addresses. Names resolve through `/etc/passwd` and `/etc/group` when the
//! file is loaded (and reloaded on SIGHUP); numeric ids need no lookup.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

/// A user or group: a name or a numeric id.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Who {
    Id(u32),
    Name(String),
}

/// A size: bytes, or a string such as `"64M"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, what: &str) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => numapin::addr::parse_size(t).map_err(|e| format!("{what}: {e}")),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    bytes_per_node: Option<Size>,
    regions: Option<u64>,
    #[serde(default)]
    users: BTreeMap<String, QuotaEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    bytes_per_node: Option<Size>,
    regions: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FloorFile {
    default: Option<Size>,
    #[serde(default)]
    nodes: BTreeMap<String, Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    users: Vec<Who>,
    #[serde(default)]
    groups: Vec<Who>,
    #[serde(default)]
    phys_users: Vec<Who>,
    #[serde(default)]
    selftest_users: Vec<Who>,
    #[serde(default)]
    quota: QuotaFile,
    #[serde(default)]
    floor: FloorFile,
}

/// Per-user limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub bytes_per_node: u64,
    pub regions: u64,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    users: HashSet<u32>,
    groups: HashSet<u32>,
    phys: HashSet<u32>,
    selftest: HashSet<u32>,
    quota: Quota,
    quotas: HashMap<u32, Quota>,
    floor: u64,
    floors: HashMap<u32, u64>,
    /// Where it came from, for messages.
    pub source: String,
}

/// Defaults when no file is given: 1 GiB per node and 64 regions per user,
/// a 64 MiB floor on every node, and only root and the `numapin` group.
const DEFAULT_QUOTA: Quota = Quota {
    bytes_per_node: 1 << 30,
    regions: 64,
};
const DEFAULT_FLOOR: u64 = 64 << 20;

impl Config {
    /// Loads `path`; a missing file is the defaults when `optional`.
    pub fn load(path: &Path, optional: bool) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                let mut c = Config::parse("groups = [\"numapin\"]", &Ids::read())?;
                c.source = format!("built-in defaults ({} does not exist)", path.display());
                return Ok(c);
            }
            Err(e) => return Err(format!("cannot read the config {}: {e}", path.display())),
        };
        let mut c = Config::parse(&text, &Ids::read())
            .map_err(|e| format!("config {}: {e}", path.display()))?;
        c.source = path.display().to_string();
        Ok(c)
    }

    fn parse(text: &str, ids: &Ids) -> Result<Config, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let users =
            |v: &[Who]| -> Result<HashSet<u32>, String> { v.iter().map(|w| ids.uid(w)).collect() };
        let mut groups = HashSet::new();
        for g in &f.groups {
            match ids.gid(g) {
                Ok(id) => {
                    groups.insert(id);
                }
                // The default group may not exist yet: no one is in it then.
                Err(_) if matches!(g, Who::Name(n) if n == "numapin") => {}
                Err(e) => return Err(e),
            }
        }
        let quota = Quota {
            bytes_per_node: match &f.quota.bytes_per_node {
                Some(s) => s.bytes("quota.bytes_per_node")?,
                None => DEFAULT_QUOTA.bytes_per_node,
            },
            regions: f.quota.regions.unwrap_or(DEFAULT_QUOTA.regions),
        };
        let mut quotas = HashMap::new();
        for (name, q) in &f.quota.users {
            let who = match name.parse::<u32>() {
                Ok(id) => Who::Id(id),
                Err(_) => Who::Name(name.clone()),
            };
            quotas.insert(
                ids.uid(&who)?,
                Quota {
                    bytes_per_node: match &q.bytes_per_node {
                        Some(s) => s.bytes(&format!("quota.users.{name}.bytes_per_node"))?,
                        None => quota.bytes_per_node,
                    },
                    regions: q.regions.unwrap_or(quota.regions),
                },
            );
        }
        let floor = match &f.floor.default {
            Some(s) => s.bytes("floor.default")?,
            None => DEFAULT_FLOOR,
        };
        let mut floors = HashMap::new();
        for (node, s) in &f.floor.nodes {
            let n: u32 = node
                .parse()
                .map_err(|_| format!("floor.nodes: `{node}` is not a node number"))?;
            floors.insert(n, s.bytes(&format!("floor.nodes.{node}"))?);
        }
        Ok(Config {
            users: users(&f.users)?,
            groups,
            phys: users(&f.phys_users)?,
            selftest: users(&f.selftest_users)?,
            quota,
            quotas,
            floor,
            floors,
            source: String::new(),
        })
    }

    /// Whether a peer with `uid`, primary `gid` and `groups` may connect.
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || self.users.contains(&uid)
            || self.groups.contains(&gid)
            || groups.iter().any(|g| self.groups.contains(g))
    }

    /// Whether replies to `uid` carry physical addresses.
    pub fn phys(&self, uid: u32) -> bool {
        uid == 0 || self.phys.contains(&uid)
    }

    /// Whether `uid` may ask for the DMA self-test.
    pub fn selftest(&self, uid: u32) -> bool {
        uid == 0 || self.selftest.contains(&uid)
    }

    /// `uid`'s quota.
    pub fn quota(&self, uid: u32) -> Quota {
        self.quotas.get(&uid).copied().unwrap_or(self.quota)
    }

    /// The free memory node `node` keeps.
    pub fn floor(&self, node: u32) -> u64 {
        self.floors.get(&node).copied().unwrap_or(self.floor)
    }
}

/// Name → id tables from `/etc/passwd` and `/etc/group`.
#[derive(Debug, Default)]
struct Ids {
    users: HashMap<String, u32>,
    groups: HashMap<String, u32>,
}

impl Ids {
    fn read() -> Ids {
        let table = |path: &str| -> HashMap<String, u32> {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((name.to_string(), id))
                })
                .collect()
        };
        Ids {
            users: table("/etc/passwd"),
            groups: table("/etc/group"),
        }
    }

    fn uid(&self, w: &Who) -> Result<u32, String> {
        match w {
            Who::Id(id) => Ok(*id),
            Who::Name(n) => self.users.get(n).copied().ok_or_else(|| {
                format!(
                    "no user `{n}` in /etc/passwd (give a numeric uid for users from other sources)"
                )
            }),
        }
    }

    fn gid(&self, w: &Who) -> Result<u32, String> {
        match w {
            Who::Id(id) => Ok(*id),
            Who::Name(n) => self.groups.get(n).copied().ok_or_else(|| {
                format!("no group `{n}` in /etc/group (give a numeric gid for groups from other sources)")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids {
            users: [("pinner".to_string(), 1000), ("alice".to_string(), 1001)].into(),
            groups: [("numapin".to_string(), 990)].into(),
        }
    }

    #[test]
    fn a_full_config_resolves() {
        let c = Config::parse(
            r#"
            users = ["pinner", 1002]
            groups = ["numapin"]
            phys_users = ["alice"]
            [quota]
            bytes_per_node = "256M"
            regions = 4
            [quota.users.pinner]
            bytes_per_node = "96M"
            [floor]
            default = "32M"
            nodes = { 1 = "200M" }
            "#,
            &ids(),
        )
        .unwrap();
        assert!(c.allows(1000, 1000, &[]));
        assert!(c.allows(1002, 1002, &[]));
        assert!(c.allows(1005, 1005, &[990]));
        assert!(c.allows(0, 0, &[]));
        assert!(!c.allows(1001, 1001, &[]));
        assert!(c.phys(1001) && !c.phys(1000));
        assert_eq!(
            c.quota(1000),
            Quota {
                bytes_per_node: 96 << 20,
                regions: 4
            }
        );
        assert_eq!(c.quota(1002).bytes_per_node, 256 << 20);
        assert_eq!((c.floor(0), c.floor(1)), (32 << 20, 200 << 20));
    }

    #[test]
    fn the_readme_example_is_a_valid_config() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n# /etc/numapin/numapind.toml")
            .expect("the README shows a numapind.toml")
            + "```toml\n".len();
        let text = &readme[start..];
        let text = &text[..text.find("```").expect("the block ends")];
        let c = Config::parse(text, &ids()).unwrap();
        assert!(c.allows(1001, 1001, &[]) && c.allows(1002, 1002, &[]));
        assert!(c.phys(1001));
        assert_eq!(c.quota(1001).bytes_per_node, 8 << 30);
        assert_eq!(c.quota(1000).bytes_per_node, 2 << 30);
        assert_eq!((c.floor(0), c.floor(1)), (64 << 20, 1 << 30));
    }

    #[test]
    fn mistakes_are_named() {
        let e = Config::parse("users = [\"nobody-here\"]", &ids()).unwrap_err();
        assert!(e.contains("nobody-here"), "{e}");
        let e = Config::parse("user = [\"pinner\"]", &ids()).unwrap_err();
        assert!(e.contains("user"), "{e}");
        let e = Config::parse("[quota]\nbytes_per_node = \"lots\"", &ids()).unwrap_err();
        assert!(e.contains("bytes_per_node"), "{e}");
        // The default group may be missing.
        assert!(Config::parse("groups = [\"numapin\"]", &Ids::default()).is_ok());
    }
}
