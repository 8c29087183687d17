//! Host packages: check with dpkg, install with apt-get as root, otherwise
//! say exactly what to run.
//!
//! Installing never removes a package. apt-get is asked first what it would
//! do (`apt-get install -s`); the real install runs with `--no-remove`, so
//! apt stops rather than remove something even if the two disagree. When
//! the plan removes packages, numapin looks for the missing packages in the
//! suite the doomed packages came from (a machine with `qemu-utils` from
//! bookworm-backports gets `qemu-system-x86` from there too, with that
//! suite as apt's default release so its dependencies come along, where
//! the two fit). If no such plan installs everything without a removal, it stops and
//! prints the command, with what it would remove, for the user to decide.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, layout};

/// Packages every VM run needs: QEMU (with SeaBIOS), a static busybox for the
/// initramfs, and the decompressors for kernel modules and source tarballs.
pub const VM: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "gzip",
    "xz-utils",
    "zstd",
];

/// Packages the stock kernel needs on top of [`VM`]: apt fetches it, dpkg unpacks it.
pub const STOCK_KERNEL: &[&str] = &["apt", "dpkg"];

/// Packages building the custom kernel needs (`make tinyconfig` … `bzImage`).
pub const KERNEL_BUILD: &[&str] = &[
    "make",
    "gcc",
    "libc6-dev",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "tar",
];

/// The keyring that signs Debian's suites (bookworm, its updates, security
/// and backports).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Makes sure every package in `wanted` is installed, without removing any.
///
/// As root, runs `apt-get update` and installs the missing ones (see the
/// module comment); otherwise fails with the exact command to run.
pub fn ensure(wanted: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for &pkg in wanted {
        if !missing.contains(&pkg) && !installed(pkg)? {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !layout::is_root() {
        bail!(
            "missing host packages: {list}\n\
             install them (as root) and run again:\n    \
             sudo apt-get update && sudo apt-get install -y --no-install-recommends --no-remove {list}\n\
             (--no-remove makes apt stop instead of removing a package; \
             `apt-get install -s --no-install-recommends {list}` shows what it would remove)"
        );
    }
    println!("==> installing host packages: {list}");
    cmd::run(Command::new("apt-get").args(["-q", "update"]))?;
    let targets: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
    let system = Apt::system();
    let removals = parse_removals(&system.simulate(&targets)?);
    if removals.is_empty() {
        system.install(&targets)?;
    } else {
        println!(
            "    apt-get would remove {} to install them; trying the suite those come from",
            names(&removals)
        );
        match same_suite_plan(&missing, &removals) {
            Ok(Plan::Fits {
                apt,
                targets,
                suite,
            }) => {
                println!(
                    "    installing {} from {suite}, which removes nothing",
                    targets.join(" ")
                );
                apt.install(&targets)?;
            }
            Ok(Plan::None(why)) => bail!(refusal(&list, &removals, &why)),
            Err(err) => bail!(refusal(&list, &removals, &format!("{err:#}"))),
        }
    }
    let still: Vec<&str> = missing
        .into_iter()
        .filter(|p| !installed(p).unwrap_or(false))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// One package apt would remove, as its simulation prints it.
#[derive(Debug, PartialEq, Eq)]
struct Removal {
    package: String,
    version: String,
}

fn names(removals: &[Removal]) -> String {
    removals
        .iter()
        .map(|r| r.package.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a second try came to.
enum Plan {
    /// `targets` (some as `pkg/suite`) install through `apt` without a removal.
    Fits {
        apt: Apt,
        targets: Vec<String>,
        suite: String,
    },
    /// No plan without a removal, and why.
    None(String),
}

/// Looks for the missing packages in `<codename>-backports` when what apt
/// would remove was installed from there, and keeps the plan only if its
/// simulation removes nothing.
fn same_suite_plan(missing: &[&str], removals: &[Removal]) -> Result<Plan> {
    let codename = codename(&fs::read_to_string("/etc/os-release").unwrap_or_default())
        .context("/etc/os-release names no VERSION_CODENAME")?;
    let suite = format!("{codename}-backports");
    let mirror = std::env::var("NUMAPIN_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    let apt = Apt::with_backports(layout::cache_dir()?.join("apt-host"), &mirror, &codename)?;
    apt.update()?;

    let doomed: Vec<&str> = removals.iter().map(|r| r.package.as_str()).collect();
    let policy = apt.policy(&doomed)?;
    let foreign: Vec<&str> = doomed
        .iter()
        .copied()
        .filter(|p| {
            !policy_block(&policy, p).is_some_and(|b| installed_suites(&b).contains(&suite))
        })
        .collect();
    if !foreign.is_empty() {
        return Ok(Plan::None(format!(
            "{} did not come from {suite}, so numapin has no suite to match",
            foreign.join(", ")
        )));
    }

    // `pkg/suite` takes only the named package from the suite; its
    // dependencies would still come from the release, where they do not fit
    // (qemu-system-x86 from backports needs qemu-system-common, -data and
    // seabios from backports too). The suite as default release
    // (`apt-get -t`) gives them the suite's versions as well.
    let apt = apt.with_default_release(&suite);
    let policy = apt.policy(missing)?;
    let targets: Vec<String> = missing
        .iter()
        .map(|p| match policy_block(&policy, p) {
            Some(block) if offers_suite(&block, &suite) => format!("{p}/{suite}"),
            _ => p.to_string(),
        })
        .collect();
    let left = parse_removals(&apt.simulate(&targets)?);
    if !left.is_empty() {
        return Ok(Plan::None(format!(
            "from {suite} apt-get would still remove {}",
            names(&left)
        )));
    }
    Ok(Plan::Fits {
        apt,
        targets,
        suite,
    })
}

/// The message when every plan removes a package: what, and the command
/// that would do it, for the user to decide.
fn refusal(list: &str, removals: &[Removal], why: &str) -> String {
    let mut text = format!("installing {list} would make apt-get remove installed packages:\n");
    for r in removals {
        text.push_str(&format!("    {} {}\n", r.package, r.version));
    }
    text.push_str(&format!(
        "numapin never removes packages, so it stopped ({why}).\n\
         Decide for yourself, then run again:\n  \
         - to install them and let apt remove the packages above, as root:\n        \
         apt-get install --no-install-recommends {list}\n  \
         - or install versions of {list} that fit the packages above \
         (see `apt-get install -s --no-install-recommends {list}`)"
    ));
    text
}

/// apt-get / apt-cache, either the system's or pointed at a private sources
/// list with its own lists and caches (the system's state stays untouched).
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn system() -> Apt {
        Apt {
            options: Vec::new(),
        }
    }

    /// Debian's `<codename>`, `-updates`, `-security` and `-backports`
    /// suites, with lists and caches in `dir`.
    fn with_backports(dir: PathBuf, mirror: &str, codename: &str) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("could not create {}", dir.join(sub).display()))?;
        }
        let list = dir.join("sources.list");
        fs::write(&list, sources_list(mirror, codename))
            .with_context(|| format!("could not write {}", list.display()))?;
        Ok(Apt {
            options: private_options(&dir),
        })
    }

    /// The same apt with `suite` as the default release (`-t suite`):
    /// apt prefers its versions for the targets' dependencies as well.
    fn with_default_release(mut self, suite: &str) -> Apt {
        self.options
            .extend(["-o".to_string(), format!("APT::Default-Release={suite}")]);
        self
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("LC_ALL", "C").args(&self.options);
        if !self.options.is_empty() {
            // Our directories are root's; apt's download sandbox user can't write them.
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c
    }

    fn update(&self) -> Result<()> {
        cmd::output(self.command("apt-get").args(["-q", "update"])).map(drop)
    }

    /// `apt-get install -s`: the plan, nothing done.
    fn simulate(&self, targets: &[String]) -> Result<String> {
        cmd::output(
            self.command("apt-get")
                .args(["-s", "-q", "--no-install-recommends", "install"])
                .args(targets),
        )
    }

    fn policy(&self, packages: &[&str]) -> Result<String> {
        cmd::output(self.command("apt-cache").arg("policy").args(packages))
    }

    /// The real install; `--no-remove` makes apt abort rather than remove.
    fn install(&self, targets: &[String]) -> Result<()> {
        cmd::run(
            self.command("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "-q",
                    "-y",
                    "--no-install-recommends",
                    "--no-remove",
                    "install",
                ])
                .args(targets),
        )
    }
}

fn sources_list(mirror: &str, codename: &str) -> String {
    let security = format!("{}-security", mirror.trim_end_matches('/'));
    let line =
        |uri: &str, suite: String| format!("deb [signed-by={DEBIAN_KEYRING}] {uri} {suite} main\n");
    [
        line(mirror, codename.to_string()),
        line(mirror, format!("{codename}-updates")),
        line(&security, format!("{codename}-security")),
        line(mirror, format!("{codename}-backports")),
    ]
    .concat()
}

fn private_options(dir: &Path) -> Vec<String> {
    let d = dir.display();
    [
        format!("Dir::Etc::sourcelist={d}/sources.list"),
        "Dir::Etc::sourceparts=-".into(),
        format!("Dir::State::Lists={d}/lists"),
        format!("Dir::Cache={d}/cache"),
        "APT::Get::List-Cleanup=0".into(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_string(), o])
    .collect()
}

/// `VERSION_CODENAME=bookworm` from `/etc/os-release`.
fn codename(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The packages an `apt-get install -s` plan removes: its `Remv` (and, with
/// `--purge`, `Purg`) lines, e.g. `Remv qemu-utils [1:10.0.2+ds-2]`.
fn parse_removals(simulation: &str) -> Vec<Removal> {
    simulation
        .lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix("Remv ")
                .or_else(|| line.strip_prefix("Purg "))?;
            let (package, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let version = tail
                .trim()
                .strip_prefix('[')
                .and_then(|t| t.split(']').next())
                .unwrap_or("")
                .to_string();
            Some(Removal {
                package: package.to_string(),
                version,
            })
        })
        .collect()
}

/// One package's part of `apt-cache policy a b c` output: its `name:` line
/// and the indented lines under it.
fn policy_block(policy: &str, package: &str) -> Option<String> {
    let header = format!("{package}:");
    let mut lines = policy.lines().skip_while(|l| *l != header);
    let first = lines.next()?;
    let body = lines.take_while(|l| l.starts_with(' '));
    Some(
        std::iter::once(first)
            .chain(body)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The suites (`bookworm-backports`, ...) the installed version (`***`) of a
/// policy block is offered by; empty if only dpkg's status knows it.
fn installed_suites(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_installed = false;
    for line in block.lines() {
        if let Some(version_line) = version_line(line) {
            in_installed = version_line;
        } else if let Some(suite) = source_suite(line).filter(|_| in_installed) {
            out.push(suite);
        }
    }
    out
}

/// Whether any version in a policy block comes from `suite`.
fn offers_suite(block: &str, suite: &str) -> bool {
    block
        .lines()
        .filter(|l| version_line(l).is_none())
        .filter_map(source_suite)
        .any(|s| s == suite)
}

/// For a version-table line (`     1:7.2 500` or ` *** 1:7.2 500`): whether
/// it is the installed one. `None` for any other line.
fn version_line(line: &str) -> Option<bool> {
    let installed = line.starts_with(" *** ");
    let plain = line.starts_with("     ") && !line.starts_with("      ");
    if !(installed || plain) {
        return None;
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let fields = if installed { &fields[1..] } else { &fields[..] };
    match fields {
        [_version, prio] if prio.parse::<i32>().is_ok() => Some(installed),
        _ => None,
    }
}

/// The suite of a source line (`  500 http://deb.debian.org/debian
/// bookworm-backports/main amd64 Packages`); `None` for dpkg's status.
fn source_suite(line: &str) -> Option<String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.as_slice() {
        [prio, _uri, dist, _arch, "Packages"] if prio.parse::<i32>().is_ok() => {
            Some(dist.split('/').next()?.to_string())
        }
        _ => None,
    }
}

/// Whether dpkg has `pkg` installed (status `ii`).
fn installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", pkg])
        .output();
    match out {
        Ok(out) => Ok(is_installed_status(&String::from_utf8_lossy(&out.stdout))),
        Err(err) => {
            bail!("could not run dpkg-query ({err}): numapin's VM tests need a Debian host")
        }
    }
}

/// Parses `dpkg-query -f '${db:Status-Abbrev}'`: `ii ` means installed;
/// `rc`, `un` or nothing (unknown package) mean not.
fn is_installed_status(abbrev: &str) -> bool {
    abbrev.starts_with("ii")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apt-get install -s --no-install-recommends qemu-utils/bookworm-backports`
    /// with bookworm's QEMU 7.2 installed (captured 2026-12-01, the
    /// autoremove list shortened): the 10.0 `qemu-utils` breaks
    /// `qemu-system-common` 7.2.
    const SIM_REMOVES: &str = "\
Reading package lists...
Building dependency tree...
Reading state information...
The following packages were automatically installed and are no longer required:
  ipxe-qemu libbrlapi0.8 libcacard0 libcapstone4 libdaxctl1 libepoxy0
  libvdeplug2 qemu-system-data seabios
Use 'apt autoremove' to remove them.
Recommended packages:
  qemu-block-extra
The following packages will be REMOVED:
  qemu-system-common qemu-system-x86
The following NEW packages will be installed:
  qemu-utils
0 upgraded, 1 newly installed, 2 to remove and 139 not upgraded.
Remv qemu-system-x86 [1:7.2+dfsg-7+deb12u18+b3]
Remv qemu-system-common [1:7.2+dfsg-7+deb12u18+b3]
Inst qemu-utils (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf qemu-utils (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
";

    /// The same machine, both from bookworm-backports (captured, shortened):
    /// upgrades, no removal.
    const SIM_UPGRADES: &str = "\
Reading package lists...
Building dependency tree...
Reading state information...
4 upgraded, 1 newly installed, 0 to remove and 139 not upgraded.
Inst qemu-system-x86 [1:7.2+dfsg-7+deb12u18+b3] (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64]) []
Inst qemu-system-common [1:7.2+dfsg-7+deb12u18+b3] (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64]) []
Inst seabios [1.16.2-1] (1.16.3-2~bpo12+1 Debian Backports:oldstable-backports [all])
Inst qemu-utils (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf qemu-utils (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
";

    /// `apt-get install -s --no-install-recommends` of bookworm's QEMU 7.2
    /// (`qemu-system-x86`, `-common`, `-data`, `seabios` at their bookworm
    /// versions) on this kind of machine, where `qemu-utils` 10.0 from
    /// bookworm-backports is installed (captured 2026-12-01): the plan removes
    /// `qemu-utils`, as the real install of `qemu-system-x86` did that day.
    const SIM_REMOVES_QEMU_UTILS: &str = "\
Reading package lists...
Building dependency tree...
Reading state information...
Suggested packages:
  samba vde2
Recommended packages:
  qemu-system-gui qemu-utils ovmf qemu-block-extra
The following packages will be REMOVED:
  qemu-utils
The following packages will be DOWNGRADED:
  qemu-system-common qemu-system-data qemu-system-x86 seabios
0 upgraded, 0 newly installed, 4 downgraded, 1 to remove and 139 not upgraded.
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst qemu-system-x86 [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64]) []
Inst seabios [1.16.3-2~bpo12+1] (1.16.2-1 Debian:12.15/oldstable [all]) []
Inst qemu-system-data [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18 Debian:12.15/oldstable [all]) []
Inst qemu-system-common [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Conf qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Conf seabios (1.16.2-1 Debian:12.15/oldstable [all])
Conf qemu-system-data (1:7.2+dfsg-7+deb12u18 Debian:12.15/oldstable [all])
Conf qemu-system-common (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
";

    /// `apt-cache policy qemu-utils qemu-block-extra busybox-static` with
    /// bookworm-backports in the sources (captured 2026-12-01).
    const POLICY: &str = "\
qemu-utils:
  Installed: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Candidate: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
        100 /var/lib/dpkg/status
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
qemu-block-extra:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
";

    /// The backports plan asks apt for the suite's dependencies too: with
    /// `qemu-utils` from backports and no QEMU system emulator, naming only
    /// `qemu-system-x86/bookworm-backports` leaves its `qemu-system-common`
    /// to bookworm, and apt finds no solution (seen on a fresh machine).
    #[test]
    fn the_backports_plan_prefers_the_suite_for_dependencies() {
        let apt = Apt {
            options: private_options(Path::new("/c")),
        }
        .with_default_release("bookworm-backports");
        let c = apt.command("apt-get");
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = args
            .iter()
            .position(|a| a == "APT::Default-Release=bookworm-backports")
            .expect("default release set");
        assert_eq!(args[at - 1], "-o");
        assert!(args.contains(&"Dir::Etc::sourcelist=/c/sources.list".to_string()));
    }

    #[test]
    fn removals_come_from_remv_lines_only() {
        assert_eq!(
            parse_removals(SIM_REMOVES),
            vec![
                Removal {
                    package: "qemu-system-x86".into(),
                    version: "1:7.2+dfsg-7+deb12u18+b3".into()
                },
                Removal {
                    package: "qemu-system-common".into(),
                    version: "1:7.2+dfsg-7+deb12u18+b3".into()
                },
            ]
        );
        assert_eq!(
            parse_removals(SIM_REMOVES_QEMU_UTILS),
            vec![Removal {
                package: "qemu-utils".into(),
                version: "1:10.0.2+ds-2+deb13u1~bpo12+1".into()
            }]
        );
        // The "will be REMOVED:" summary and the autoremove hint are not removals.
        assert!(parse_removals(SIM_UPGRADES).is_empty());
        assert!(parse_removals("0 upgraded, 0 newly installed, 0 to remove").is_empty());
        let purge = parse_removals("Purg libfoo:i386 [2.1-3]\n");
        assert_eq!(purge[0].package, "libfoo:i386");
        assert_eq!(purge[0].version, "2.1-3");
    }

    #[test]
    fn policy_blocks_split_by_package() {
        let utils = policy_block(POLICY, "qemu-utils").unwrap();
        assert!(utils.starts_with("qemu-utils:") && utils.contains("bookworm/main"));
        assert!(!utils.contains("qemu-block-extra"));
        let extra = policy_block(POLICY, "qemu-block-extra").unwrap();
        assert!(extra.contains("bookworm-security") && !extra.contains("busybox"));
        assert!(
            policy_block(POLICY, "busybox-static")
                .unwrap()
                .ends_with("status")
        );
        assert!(policy_block(POLICY, "qemu").is_none());
    }

    #[test]
    fn installed_version_suite() {
        let suites = |p| installed_suites(&policy_block(POLICY, p).unwrap());
        assert_eq!(suites("qemu-utils"), vec!["bookworm-backports"]);
        assert_eq!(suites("busybox-static"), vec!["bookworm"]);
        // Not installed: no `***` line, no suite.
        assert!(suites("qemu-block-extra").is_empty());
    }

    #[test]
    fn which_suites_offer_a_package() {
        let block = |p| policy_block(POLICY, p).unwrap();
        assert!(offers_suite(
            &block("qemu-block-extra"),
            "bookworm-backports"
        ));
        assert!(offers_suite(
            &block("qemu-block-extra"),
            "bookworm-security"
        ));
        assert!(!offers_suite(
            &block("busybox-static"),
            "bookworm-backports"
        ));
        // The installed-only line of dpkg's status is no suite.
        assert!(!offers_suite(&block("busybox-static"), "status"));
    }

    #[test]
    fn refusal_names_what_and_the_command() {
        let removals = parse_removals("Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n");
        let text = refusal("qemu-system-x86 flex", &removals, "no suite");
        assert!(text.contains("qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1"));
        assert!(text.contains("apt-get install --no-install-recommends qemu-system-x86 flex"));
        assert!(text.contains("never removes"));
    }

    #[test]
    fn private_sources_cover_the_release_and_backports() {
        let list = sources_list("http://deb.debian.org/debian/", "bookworm");
        for suite in ["bookworm ", "bookworm-updates ", "bookworm-backports "] {
            assert!(list.contains(&format!("debian/ {suite}main")), "{list}");
        }
        assert!(list.contains("http://deb.debian.org/debian-security bookworm-security main"));
        assert_eq!(
            codename("NAME=\"Debian\"\nVERSION_CODENAME=bookworm\n").as_deref(),
            Some("bookworm")
        );
        assert_eq!(codename("ID=debian\n"), None);
    }

    #[test]
    fn status_abbrev() {
        assert!(is_installed_status("ii "));
        assert!(!is_installed_status("rc "));
        assert!(!is_installed_status("un "));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn lists_have_no_blank_names() {
        for pkg in VM.iter().chain(STOCK_KERNEL).chain(KERNEL_BUILD) {
            assert!(!pkg.is_empty() && !pkg.contains(' '), "{pkg:?}");
        }
    }
}
