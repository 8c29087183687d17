//! The guest's initramfs: a gzip'd newc cpio with busybox and its applet
//! links, the project's binaries and the shared libraries they load (found
//! with `ldd`, placed at the same paths), the stock kernel's modules with
//! their load order, `/etc/passwd` with root and the unprivileged `pinner`
//! (uid/gid 1000), and `/init` from `xtask/guest/init`.
//!
//! The archive is written here rather than by `cpio` from a staging tree so
//! that it can hold `/dev/console` and root-owned files without root on the
//! host; `gzip` compresses it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cmd, layout};

/// busybox-static's binary.
const BUSYBOX: &str = "/bin/busybox";

/// systemd's `systemd-socket-activate` (Debian package `systemd`).
const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// The unprivileged user scenarios drop to (memlock limits bite only without
/// CAP_IPC_LOCK).
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\npinner:x:1000:1000:numapin tests:/tmp:/bin/sh\n";
const GROUP: &str = "root:x:0:\npinner:x:1000:\n";

/// What goes into one initramfs.
pub struct Spec<'a> {
    /// Executables copied to `/bin/<file name>`, with their libraries.
    pub binaries: &'a [PathBuf],
    /// Kernel modules in load order, copied to `/lib/modules/` with `load-order`.
    pub modules: &'a [PathBuf],
    /// A shell script copied to `/probe` (`NUMAPIN_RUN=script`).
    pub probe: Option<&'a Path>,
}

/// Builds the initramfs at `out` (gzip'd newc cpio).
pub fn build(spec: &Spec, out: &Path) -> Result<()> {
    let mut archive = Archive::default();
    for dir in [
        "dev", "proc", "sys", "tmp", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        archive.dir(dir);
    }
    archive.char_dev("dev/console", 5, 1, 0o600);

    archive.file(
        BUSYBOX.trim_start_matches('/'),
        read(Path::new(BUSYBOX))?,
        0o755,
    );
    add_libraries(&mut archive, Path::new(BUSYBOX))?;
    let list = cmd::output(Command::new(BUSYBOX).arg("--list-full"))?;
    // The list names busybox itself (`bin/busybox`): a link there would loop.
    for applet in list.lines().map(str::trim) {
        if !applet.is_empty() && applet != BUSYBOX.trim_start_matches('/') {
            archive.symlink(applet, BUSYBOX);
        }
    }

    for bin in spec.binaries {
        let name = bin.file_name().context("binary path has no file name")?;
        if !bin.exists() {
            bail!(
                "{} is missing: build it first (cargo xtask builds it)",
                bin.display()
            );
        }
        let data = stripped(bin)?;
        archive.file(&format!("bin/{}", name.to_string_lossy()), data, 0o755);
        add_libraries(&mut archive, bin)?;
    }

    // systemd's socket activator, for the service's socket-activation
    // scenario (it fails with a clear message where the host lacks it).
    let activate = Path::new(SOCKET_ACTIVATE);
    if activate.exists() {
        archive.file("bin/systemd-socket-activate", read(activate)?, 0o755);
        add_libraries(&mut archive, activate)?;
    }

    if !spec.modules.is_empty() {
        let mut order = String::new();
        for module in spec.modules {
            let name = module.file_name().unwrap().to_string_lossy().into_owned();
            archive.file(&format!("lib/modules/{name}"), read(module)?, 0o644);
            order.push_str(&name);
            order.push('\n');
        }
        archive.file("lib/modules/load-order", order.into_bytes(), 0o644);
    }

    if let Some(probe) = spec.probe {
        archive.file("probe", read(probe)?, 0o755);
    }
    archive.file("etc/passwd", PASSWD.into(), 0o644);
    archive.file("etc/group", GROUP.into(), 0o644);
    archive.file("init", read(&layout::guest_dir().join("init"))?, 0o755);

    let file = File::create(out).with_context(|| format!("could not create {}", out.display()))?;
    let mut gzip = Command::new("gzip");
    gzip.args(["-n", "-6", "-c"]);
    let mut child = gzip
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("could not start gzip")?;
    archive.write_newc(&mut io::BufWriter::new(child.stdin.take().unwrap()))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("gzip failed ({status}) writing {}", out.display());
    }
    Ok(())
}

/// The binary without its debug sections (`strip --strip-debug` into a
/// temporary file): the guest's root file system lives in RAM, and the
/// release builds' line tables would take tens of MiB of a node the
/// scenarios measure (compaction's scanners meet where free memory runs
/// out). Symbols stay, for readable backtraces.
fn stripped(bin: &Path) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!(
        "numapin-strip-{}-{}",
        std::process::id(),
        bin.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let data = if ok { read(&tmp)? } else { read(bin)? };
    let _ = fs::remove_file(&tmp);
    Ok(data)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("could not read {}", path.display()))
}

/// Adds the shared libraries and dynamic loader `exe` needs, at their paths.
fn add_libraries(archive: &mut Archive, exe: &Path) -> Result<()> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("could not run ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // ldd exits 1 for static executables ("not a dynamic executable").
    if !out.status.success() {
        return Ok(());
    }
    for lib in parse_ldd(&text).with_context(|| format!("ldd {}", exe.display()))? {
        let data = read(&lib)?;
        archive.file(lib.to_string_lossy().trim_start_matches('/'), data, 0o755);
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `name => /path (addr)` and the loader's
/// `/path (addr)`. The vDSO has no path; `not found` is an error.
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("shared library {} not found", name.trim());
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32, mode: u32 },
}

/// An in-memory tree written as a newc cpio archive. Paths are relative
/// (`bin/sh`); parents are added as directories. Sorted order puts every
/// directory before its contents.
#[derive(Default)]
struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.nodes
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            parent = p.parent();
        }
        self.nodes.insert(path.to_owned(), node);
    }

    fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.insert(path, Node::File { data, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()));
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        self.insert(path, Node::CharDev { major, minor, mode });
    }

    /// Writes the archive in the "new ASCII" (newc, magic 070701) format the
    /// kernel unpacks: a 110-byte hex header, the NUL-terminated name, the
    /// data, each padded to 4 bytes, then `TRAILER!!!`. Everything is owned by
    /// root with mtime 0, so the archive depends only on its contents.
    fn write_newc(&self, w: &mut impl Write) -> io::Result<()> {
        for (ino, (path, node)) in (1..).zip(&self.nodes) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir => (0o040_755, 2, &[], (0, 0)),
                Node::File { data, mode } => (0o100_000 | mode, 1, data, (0, 0)),
                Node::Symlink(target) => (0o120_777, 1, target.as_bytes(), (0, 0)),
                Node::CharDev { major, minor, mode } => {
                    (0o020_000 | mode, 1, &[], (*major, *minor))
                }
            };
            write_entry(w, ino, mode, nlink, rdev, path, data)?;
        }
        write_entry(w, 0, 0, 1, (0, 0), "TRAILER!!!", &[])?;
        w.flush()
    }
}

fn write_entry(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rmajor, rminor): (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(data.len()).map_err(|_| io::Error::other("file over 4 GiB"))?,
        0, // devmajor
        0, // devminor
        rmajor,
        rminor,
        name.len() as u32 + 1,
        0, // check
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.write_all(&[0; 3][..pad4(110 + name.len() + 1)])?;
    w.write_all(data)?;
    w.write_all(&[0; 3][..pad4(data.len())])
}

/// Bytes needed to reach the next multiple of 4.
fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc5a9e2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c6a0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1c4bf000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1c72f000)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let err = parse_ldd("\tlibnuma.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libnuma.so.1"));
    }

    /// One archive member as read back: name, mode, rdev (major, minor), data.
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Reads back the members of a newc archive.
    fn read_newc(mut bytes: &[u8]) -> Vec<Member> {
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (mode, size, rdev, namesize) = (
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
            );
            let name = String::from_utf8(bytes[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = 110 + namesize + pad4(110 + namesize);
            let data = bytes[data_start..data_start + size].to_vec();
            bytes = &bytes[data_start + size + pad4(size)..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn newc_round_trip() {
        let mut a = Archive::default();
        a.file("bin/numapin", b"hello".to_vec(), 0o755);
        a.symlink("usr/bin/[", "/bin/busybox");
        a.char_dev("dev/console", 5, 1, 0o600);
        a.file("init", b"#!/bin/sh\n".to_vec(), 0o755);
        let mut bytes = Vec::new();
        a.write_newc(&mut bytes).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_newc(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/numapin",
                "dev",
                "dev/console",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/["
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("bin").1, 0o040_755);
        assert_eq!(get("bin/numapin").1, 0o100_755);
        assert_eq!(get("bin/numapin").3, b"hello");
        assert_eq!(get("usr/bin/[").1, 0o120_777);
        assert_eq!(get("usr/bin/[").3, b"/bin/busybox");
        assert_eq!(
            (get("dev/console").1, get("dev/console").2),
            (0o020_600, (5, 1))
        );
    }

    #[test]
    fn later_files_replace_earlier_links() {
        let mut a = Archive::default();
        a.symlink("init", "/bin/busybox");
        a.file("init", b"x".to_vec(), 0o755);
        let mut bytes = Vec::new();
        a.write_newc(&mut bytes).unwrap();
        let entries = read_newc(&bytes);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1, 0o100_755);
    }
}
