//! vmard's shutdown flag: set by SIGTERM/SIGINT, read by long operations so that they stop
//! at the next safe point (a capture between two batches: nothing is committed).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks long operations to stop.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether shutdown was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
