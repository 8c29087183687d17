//! Cancelling long work: a shared flag that numapin checks at chunk
//! boundaries of a prefault (every 4 MiB per thread) and between steps of
//! a pin. What cannot be interrupted once started: one `VFIO_IOMMU_MAP_DMA`
//! or `IORING_REGISTER_BUFFERS` call, and the zeroing of one huge page.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cancellation handle. Clones share the flag; [`Cancel::cancel`] from
/// any thread (or a signal handler: it only stores to an atomic) makes the
/// work that holds a clone stop with [`crate::Error::Cancelled`] and
/// release what it took.
///
/// ```
/// let c = numapin::Cancel::new();
/// let worker = c.clone();
/// c.cancel();
/// assert!(worker.is_cancelled());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A handle that is not cancelled.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the work to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for a signal handler that may only touch an atomic.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.0
    }
}
