//! Holding pins until SIGINT/SIGTERM or a timeout, without signal handlers:
//! the signals are blocked in every thread and taken with `sigtimedwait`.

use std::io;
use std::time::{Duration, Instant};

use numapin::{Error, Result};

/// SIGINT and SIGTERM, blocked in the calling thread (and every thread it
/// starts afterwards).
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    /// Blocks SIGINT and SIGTERM.
    pub fn block_termination() -> Result<SignalSet> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        let ok = unsafe {
            libc::sigemptyset(&mut set) == 0
                && libc::sigaddset(&mut set, libc::SIGINT) == 0
                && libc::sigaddset(&mut set, libc::SIGTERM) == 0
                && libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0
        };
        if !ok {
            return Err(Error::sys(
                "pthread_sigmask",
                "",
                io::Error::last_os_error(),
            ));
        }
        Ok(SignalSet(set))
    }

    /// Waits for one of the signals, or until `timeout` passes (`None`: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return Ok(()),
                },
                None => Duration::from_secs(3600),
            };
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: valid set and timespec; siginfo may be null.
            let r = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
            if r > 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(Error::sys("sigtimedwait", "", e)),
            }
        }
    }
}
