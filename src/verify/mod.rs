//! The correctness oracle: reads every block of an image through its map, from the canonical
//! copies, and proves it equals the image itself. Used by tests and by operators before they
//! trust a map with a VM.
//!
//! It reads only what can differ: blocks mapped to the image's own copy are equal by
//! construction, and zero-mapped blocks inside holes read as zeros by definition, so only
//! written zero-mapped blocks and redirected blocks (both ends) are read. What it reads that
//! was not in the page cache before is dropped from it afterwards, so that verifying does not
//! evict the shared pages vmar exists to keep cached.
//!
//! `oracle.rs` reads and compares; this file holds what it reports, which `verify` requests
//! answer as it is (the protocol re-exports it).

use serde::{Deserialize, Serialize};

use crate::map::Source;

#[cfg(feature = "daemon")]
mod oracle;

#[cfg(feature = "daemon")]
pub use oracle::verify;

/// The first block whose mapped content differs from the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub block: u64,
    /// Byte offset of the first differing byte in the image.
    pub offset: u64,
    pub source: Source,
    /// Name of the image the block was read from (for redirects).
    pub source_image: Option<String>,
}

/// Outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub name: String,
    pub blocks: u64,
    pub bytes_compared: u64,
    pub ok: bool,
    pub mismatch: Option<Mismatch>,
    /// Bytes read from the image and the images it redirects to (holes and own blocks are
    /// not read).
    #[serde(default)]
    pub bytes_read: u64,
    /// Of those, bytes that were not in the page cache before and were dropped after.
    #[serde(default)]
    pub bytes_dropped: u64,
    /// Wall time of the verification, in microseconds.
    #[serde(default)]
    pub micros: u64,
}

impl VerifyReport {
    /// Bytes read per second.
    pub fn read_rate(&self) -> f64 {
        self.bytes_read as f64 / (self.micros.max(1) as f64 / 1e6)
    }
}
