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

thread_local! {
    /// Set on a connection's thread when its client went away: its capture stops at the next
    /// batch, before anything is committed.
    static CANCELLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Cancels the long operation running on this thread (its client closed the connection).
pub fn cancel_current() {
    CANCELLED.with(|c| c.set(true));
}

/// Whether the operation on this thread was cancelled.
pub fn cancelled() -> bool {
    CANCELLED.with(std::cell::Cell::get)
}
