//! Reading an image through a memory mapping, so blocks are hashed straight from the page
//! cache instead of being copied into a buffer first (see [`super::Read`] for what that
//! saves and costs).
//!
//! A mapping has one hazard a read has not: touching a page past the end of a file that was
//! truncated meanwhile raises SIGBUS, which would kill the daemon. So every mapping is
//! registered here while it is read, and a SIGBUS handler maps a zero page over a faulting
//! page of a registered mapping and marks it: the read completes (with zeros), and the scan
//! reports the image as changed during capture. Faults elsewhere go to the handler that was
//! installed before (Rust's own, for stack overflows) or to the default action.

use std::fs::File;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::{Mmap, MmapOptions};
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Mappings read at once: one per hashing thread would do; more never block, they just read.
const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static REGISTERED: [Slot; SLOTS] = [FREE; SLOTS];
static PREVIOUS: OnceLock<SigAction> = OnceLock::new();
static INSTALL: Once = Once::new();

/// A read-only mapping of part of a file, guarded against SIGBUS while it lives.
pub struct Mapped {
    map: Mmap,
    slot: &'static Slot,
}

impl Mapped {
    /// Maps `len` bytes of `file` at `offset` (a multiple of the page size), populated.
    /// `None` when the mapping or the guard cannot be set up; the caller then reads instead.
    /// The pages leave this process's memory when it is dropped (munmap).
    pub fn new(file: &File, offset: u64, len: usize) -> Option<Mapped> {
        if len == 0 || !install() {
            return None;
        }
        // SAFETY: the mapping is read-only and private to this scan. Its contents may change
        // if the file is written meanwhile (then the digests are of whatever was read, as with
        // read(2), and the catalog's identity check catches the change); a truncation is
        // turned from SIGBUS into zeros plus `faulted()` by the handler below.
        // Populated at once: one call maps every page already in the page cache (and reads
        // the rest), instead of a page fault per few pages while hashing.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len)
                .populate()
                .map(file)
        }
        .ok()?;
        let start = map.as_ptr() as usize;
        let slot = REGISTERED.iter().find(|slot| {
            slot.start
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        slot.faulted.store(false, Ordering::Relaxed);
        slot.end.store(start + len, Ordering::Release);
        slot.start.store(start, Ordering::Release);
        Some(Mapped { map, slot })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// True when part of the mapping was past the end of the file when it was read.
    pub fn faulted(&self) -> bool {
        self.slot.faulted.load(Ordering::Acquire)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Unregister before `map` is unmapped (fields drop after this).
        self.slot.end.store(0, Ordering::Release);
        self.slot.start.store(0, Ordering::Release);
    }
}

/// Installs the SIGBUS handler once; false if that failed.
fn install() -> bool {
    INSTALL.call_once(|| {
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        // SAFETY: `on_sigbus` only does async-signal-safe work: atomic loads and stores,
        // mmap(2), sigaction(2), and calling the previous handler.
        if let Ok(previous) = unsafe { sigaction(Signal::SIGBUS, &action) } {
            let _ = PREVIOUS.set(previous);
        }
    });
    PREVIOUS.get().is_some()
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &REGISTERED {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start != usize::MAX && start <= addr && addr < end {
            let page = addr & !(4096 - 1);
            // SAFETY: replaces one page of a registered mapping (still mapped: it is
            // unregistered before it is unmapped) with a private zero page.
            let zero = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zero != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: whoever handled SIGBUS before does, or the default action (returning re-runs
    // the faulting access, which then terminates the process as it would have).
    match PREVIOUS.get().map(|p| p.handler()) {
        // SAFETY: calling the previously installed handler as the kernel would have.
        Some(SigHandler::SigAction(previous)) => previous(signal, info, context),
        Some(SigHandler::Handler(previous)) => previous(signal),
        _ => {
            // SAFETY: restoring the default action is async-signal-safe.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_file_reads_as_zeros_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut file = File::create(&path).unwrap();
        file.write_all(&[7u8; 4 * 4096]).unwrap();
        let file = File::open(&path).unwrap();
        let mapped = Mapped::new(&file, 0, 4 * 4096).unwrap();
        assert_eq!(mapped.bytes()[4096], 7);
        assert!(!mapped.faulted());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Pages past the new end fault; the process survives and sees zeros.
        let sum: u64 = mapped.bytes().iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 7 * 4096);
        assert!(mapped.faulted());
        drop(mapped);
        // The slot is free again and a new mapping starts clean.
        let again = Mapped::new(&file, 0, 4096).unwrap();
        assert!(!again.faulted());
        assert_eq!(again.bytes()[0], 7);
    }
}
