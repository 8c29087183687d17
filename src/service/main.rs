//! `numapind`: the pinning service. It owns one or more VFIO devices and
//! serves pinned, node-local memory with IOVAs to unprivileged processes
//! over a Unix `SOCK_SEQPACKET` socket (`docs/protocol.md`): each region is
//! a sealed memfd the daemon pinned and passes to its client.
//!
//! Threads: the accept loop (this one), one per connection, and one that
//! takes SIGTERM/SIGINT (shut down) and SIGHUP (reload the config) with
//! `sigwait`, the signals blocked everywhere else.

mod config;
mod server;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;
use numapin::Pinner;
use numapin::client::wire;

/// The pinning service: pinned, node-local memory with IOVAs for
/// unprivileged processes.
#[derive(Debug, Parser)]
#[command(name = "numapind", version, about)]
struct Args {
    /// A device to serve (PCI address bound to vfio-pci, mdev UUID, sysfs
    /// path); repeat for several. The first is the default.
    #[arg(long, short, required = true)]
    device: Vec<String>,
    /// Where to listen (ignored under socket activation).
    #[arg(long, default_value = numapin::client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The configuration file (a missing default file means the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give the socket this group and mode 0660 (default: mode 0666; the
    /// config still decides who is served).
    #[arg(long)]
    socket_group: Option<String>,
    /// Connections served at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
}

const DEFAULT_CONFIG: &str = "/etc/numapin/numapind.toml";

fn main() -> ExitCode {
    let args = Args::parse();
    init_log();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The log on stderr (the journal under systemd): `info` and up unless
/// `RUST_LOG` says otherwise (`RUST_LOG=debug` adds a line per request
/// with its timing). Lines read `numapind: message`, with the level
/// before the message when it is not `info`.
fn init_log() {
    use std::io::Write as _;
    // vfio-ioctls warns about every IRQ index a device lacks (edu has no
    // MSI-X): not the operator's concern.
    // RUST_LOG adds to these defaults (a directive for the same module
    // replaces its default), so RUST_LOG=debug keeps vfio-ioctls quiet.
    env_logger::Builder::new()
        .parse_filters("info,vfio_ioctls=error")
        .parse_env(env_logger::Env::default())
        .format(|f, r| match r.level() {
            log::Level::Info => writeln!(f, "numapind: {}", r.args()),
            l => writeln!(f, "numapind: {}: {}", l.as_str().to_lowercase(), r.args()),
        })
        .init();
}

fn run(args: Args) -> Result<(), String> {
    let (config_path, optional) = match &args.config {
        Some(p) => (p.clone(), false),
        None => (PathBuf::from(DEFAULT_CONFIG), true),
    };
    let config = config::Config::load(&config_path, optional)?;
    log::info!("config from {}", config.source);
    // Block the signals before any thread starts: every thread inherits
    // the mask, and only the signal thread takes them.
    let set = server::block_signals()?;
    let mut devices = Vec::new();
    for d in &args.device {
        let p = Pinner::open(d).map_err(|e| format!("open {d}: {e}"))?;
        log::info!("serving {d} ({})", p.kind().name());
        devices.push((d.clone(), p));
    }
    let listener = listener(&args)?;
    let shared = Arc::new(server::Shared::new(
        devices,
        config,
        config_path,
        optional,
        args.max_connections,
    ));
    server::spawn_signal_thread(shared.clone(), set);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    log::info!("ready (pid {})", std::process::id());
    server::accept_loop(&shared, listener.as_fd());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shared.wait_for_connections();
    if !args.socket.as_os_str().is_empty() && !server::ACTIVATED.load(Ordering::Relaxed) {
        let _ = std::fs::remove_file(&args.socket);
    }
    log::info!("stopped, every region released");
    Ok(())
}

/// The socket systemd passed (`LISTEN_FDS`), or a new one at `--socket`.
fn listener(args: &Args) -> Result<OwnedFd, String> {
    let fds: Vec<_> = sd_notify::listen_fds()
        .map_err(|e| format!("LISTEN_FDS: {e}"))?
        .collect();
    if let Some(&fd) = fds.first() {
        log::info!("socket activation: listening on fd {fd}");
        server::ACTIVATED.store(true, Ordering::Relaxed);
        // SAFETY: systemd passed the fd to this process to own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let path = &args.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if wire::connect(path).is_ok() {
            return Err(format!(
                "another numapind answers at {}; stop it or pass another --socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("remove the stale socket {}: {e}", path.display()))?;
    }
    let fd = wire::listen(path, 64).map_err(|e| format!("listen on {}: {e}", path.display()))?;
    server::set_socket_owner(path, args.socket_group.as_deref())?;
    log::info!("listening on {}", path.display());
    Ok(fd)
}
