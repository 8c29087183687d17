//! Cancelling and holding on SIGINT/SIGTERM, without signal handlers: the
//! signals are blocked in every thread and taken with `sigtimedwait` by one
//! watcher thread. While numapin pins, the first signal cancels the work
//! (the CLI then exits 128 + the signal); once the pins are held, it ends
//! the hold (the pins are released and the CLI exits 0).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use numapin::{Cancel, Error, Result};

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
}

/// The signal that cancelled the run, if one did (0: none).
static CANCELLED_BY: AtomicI32 = AtomicI32::new(0);

/// The signal that cancelled the run, if any.
pub fn cancelling_signal() -> Option<i32> {
    match CANCELLED_BY.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGINT` or `SIGTERM`, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// A thread that takes SIGINT/SIGTERM while numapin works: the first one
/// cancels the work (through [`Watcher::cancel`]) and is handed to
/// [`Watcher::wait`].
pub struct Watcher {
    /// Cancelled by the first signal.
    pub cancel: Cancel,
    signals: mpsc::Receiver<i32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalSet {
    /// Starts the watcher thread. The signals stay blocked in every thread,
    /// so only its `sigtimedwait` takes them.
    pub fn watch(self) -> Watcher {
        let cancel = Cancel::new();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cancel.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("numapin-signals".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 100_000_000,
                    };
                    // SAFETY: valid set and timespec; siginfo may be null.
                    let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
                    if sig > 0 {
                        let _ = CANCELLED_BY.compare_exchange(
                            0,
                            sig,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        c.cancel();
                        let _ = tx.send(sig);
                    }
                }
            })
            .ok();
        Watcher {
            cancel,
            signals: rx,
            stop,
            thread,
        }
    }
}

impl Watcher {
    /// Holds for `--hold SECS` (`None`: until a signal): returns at once for
    /// `--hold 0`, otherwise as [`Watcher::wait`].
    pub fn hold(&self, secs: Option<u64>) {
        match secs.map(Duration::from_secs) {
            Some(Duration::ZERO) => {}
            timeout => self.wait(timeout),
        }
    }

    /// Waits for a signal, or until `timeout` passes (`None`: forever).
    /// Returns at once if one already came.
    pub fn wait(&self, timeout: Option<Duration>) {
        if self.cancel.is_cancelled() {
            return;
        }
        let _ = match timeout {
            Some(t) => self.signals.recv_timeout(t).ok(),
            None => self.signals.recv().ok(),
        };
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
