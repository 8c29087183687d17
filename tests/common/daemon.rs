//! Starting numapind from a guest program: the daemon binary next to the
//! program, a TOML config, readiness awaited on a `NOTIFY_SOCKET` the
//! caller listens on, SIGTERM and a bounded wait on drop. Shared by path:
//! `#[path = "../common/daemon.rs"] mod daemon;`.

#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Where a started daemon's files go.
pub struct Files {
    /// Its listening socket.
    pub socket: PathBuf,
    /// The `NOTIFY_SOCKET` this program binds.
    pub notify: PathBuf,
    /// Its stderr (appended to).
    pub log: PathBuf,
}

impl Files {
    /// `numapind.sock`, `notify` and `numapind.log` in `dir` (created).
    pub fn in_dir(dir: &Path) -> Files {
        let _ = std::fs::create_dir_all(dir);
        Files {
            socket: dir.join("numapind.sock"),
            notify: dir.join("notify"),
            log: dir.join("numapind.log"),
        }
    }
}

/// `name` next to the running program (the guest's /bin).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .with_file_name(name)
}

/// A numapind child.
pub struct Daemon {
    child: Option<Child>,
    /// Where it listens.
    pub socket: PathBuf,
    log: PathBuf,
}

/// Spawns `cmd` with `NOTIFY_SOCKET` set to `files.notify` and its stderr
/// appended to `files.log`, runs `before_ready` (which may return a
/// connection to hold until then: a socket-activated daemon starts at its
/// first one), and waits (up to `secs`) for `READY=1`.
pub fn launch(
    mut cmd: Command,
    files: &Files,
    secs: u64,
    before_ready: impl FnOnce(&Daemon) -> Result<Option<OwnedFd>, String>,
) -> Result<Daemon, String> {
    let _ = std::fs::remove_file(&files.notify);
    let ready =
        UnixDatagram::bind(&files.notify).map_err(|e| format!("bind NOTIFY_SOCKET: {e}"))?;
    ready
        .set_read_timeout(Some(Duration::from_secs(secs)))
        .map_err(|e| format!("NOTIFY_SOCKET timeout: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .map_err(|e| format!("open {}: {e}", files.log.display()))?;
    let child = cmd
        .env("NOTIFY_SOCKET", &files.notify)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn numapind: {e}"))?;
    let mut d = Daemon {
        child: Some(child),
        socket: files.socket.clone(),
        log: files.log.clone(),
    };
    let _held = before_ready(&d)?;
    let mut buf = [0u8; 256];
    let n = match ready.recv(&mut buf) {
        Ok(n) => n,
        Err(err) => {
            return Err(format!(
                "numapind sent no READY=1 in {secs} s ({err}): {}",
                d.kill_and_log()
            ));
        }
    };
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    if !msg.contains("READY=1") {
        return Err(format!("NOTIFY_SOCKET got {msg:?}, not READY=1"));
    }
    Ok(d)
}

/// Starts numapind on `device` with the config file `config`, listening
/// on `files.socket`.
pub fn start(device: &str, config: &Path, files: &Files) -> Result<Daemon, String> {
    launch(command(device, config, files), files, 60, |_| Ok(None))
}

/// [`start`] with `RUST_LOG=debug`: the log gets a line per request with
/// its timing (the bench reads them).
pub fn start_debug(device: &str, config: &Path, files: &Files) -> Result<Daemon, String> {
    let mut cmd = command(device, config, files);
    cmd.env("RUST_LOG", "debug");
    launch(cmd, files, 60, |_| Ok(None))
}

fn command(device: &str, config: &Path, files: &Files) -> Command {
    let mut cmd = Command::new(sibling("numapind"));
    cmd.args(["--device", device, "--config"])
        .arg(config)
        .arg("--socket")
        .arg(&files.socket);
    cmd
}

impl Daemon {
    /// The child's pid (0 once it was reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        if self.pid() != 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.pid() as i32, sig) };
        }
    }

    /// Waits (bounded) for the exit status.
    pub fn wait(&mut self, secs: u64) -> Result<std::process::ExitStatus, String> {
        let c = self.child.as_mut().ok_or("no child")?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = c.try_wait().map_err(|e| format!("wait numapind: {e}"))? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!("numapind did not exit within {secs} s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it and returns its log.
    pub fn kill_and_log(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait(30).is_err() {
                let _ = self.kill_and_log();
            }
        }
    }
}
