//! The side effects of prefetch: which blocks of a file are in the page cache (`mincore`
//! over a mapping of just the range asked about, so memory stays bounded whatever the file's
//! size), and reading planned requests at a low I/O priority with one reused buffer.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use memmap2::MmapOptions;

use crate::error::{Error, Result};
use crate::image::BLOCK_SIZE;
use crate::map::ImageId;
use crate::workset::{Canonical, ReadRequest};

/// Blocks asked of `mincore` at once: 256 MiB of address space, 64 KiB of vector.
const WINDOW_BLOCKS: u64 = 64 * 1024;

/// Bytes one read asks for; the one buffer a warm holds.
pub const READ_CHUNK: usize = 1 << 20;

/// `IOPRIO_CLASS_IDLE`: below the VMs' reads (best effort, the default) under the
/// schedulers that honour priorities. mq-deadline (Linux >= 5.14) has one queue per class and
/// no levels within one, so a lower best-effort level would change nothing there; it
/// dispatches an idle request that waited `prio_aging_expire` (10 s) anyway, and BFQ serves
/// the idle class at least every 200 ms, so a warm is slowed by busy VMs, never starved.
/// `none` and kyber ignore priorities.
const IOPRIO_IDLE: i32 = 3 << 13;
const IOPRIO_WHO_PROCESS: i32 = 1;

/// Gives the calling thread the idle I/O priority class (`ioprio_set(2)` on the
/// thread itself).
pub fn lower_priority() -> std::io::Result<()> {
    // SAFETY: ioprio_set takes three integers; `who` 0 is the calling thread.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_IDLE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The I/O priority of the calling thread (`ioprio_get(2)`), for tests and reports.
pub fn priority() -> std::io::Result<i32> {
    // SAFETY: as in lower_priority.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    if rc >= 0 {
        Ok(i32::try_from(rc).unwrap_or(i32::MAX))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Residency of blocks `start..start + blocks` of `file` (`size` bytes, at `path` for
/// errors): one flag per block, true when every page of it that lies in the file is cached.
/// Blocks past the end of the file are not cached.
pub fn resident_blocks(
    file: &File,
    path: &Path,
    size: u64,
    start: u64,
    blocks: u64,
) -> Result<Vec<bool>> {
    let mut out = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
    let page = crate::sys::page_size().max(1);
    let mut at = start;
    let end = start.saturating_add(blocks);
    while at < end {
        let n = (end - at).min(WINDOW_BLOCKS);
        let lo = at.saturating_mul(BLOCK_SIZE);
        let hi = (at + n).saturating_mul(BLOCK_SIZE).min(size);
        if lo >= hi {
            out.resize(out.len() + usize::try_from(end - at).unwrap_or(0), false);
            break;
        }
        let map_lo = lo / page * page;
        let map_hi = hi.div_ceil(page) * page;
        let pages = mincore(file, path, map_lo, map_hi - map_lo)?;
        for b in at..at + n {
            let b_lo = b * BLOCK_SIZE;
            let b_hi = ((b + 1) * BLOCK_SIZE).min(size);
            let cached = b_lo < b_hi
                && (b_lo / page..b_hi.div_ceil(page))
                    .all(|p| pages.get(usize_of(p - map_lo / page)) == Some(&true));
            out.push(cached);
        }
        at += n;
    }
    Ok(out)
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `mincore` of `len` bytes of `file` from page-aligned `offset`.
fn mincore(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<bool>> {
    let page = crate::sys::page_size().max(1);
    let len_usize = usize::try_from(len)
        .map_err(|_| Error::io("cannot map", path, std::io::Error::other("range too large")))?;
    // SAFETY: a read-only shared mapping that is never dereferenced: only its address range
    // goes to mincore, so a file changing underneath cannot cause undefined behaviour.
    let map = unsafe { MmapOptions::new().offset(offset).len(len_usize).map(file) }
        .map_err(|e| Error::io("cannot map", path, e))?;
    let mut vec = vec![0u8; usize_of(len.div_ceil(page))];
    // SAFETY: `map` is a live mapping of `len` bytes at a page-aligned address; `vec` has a
    // byte for each of its pages.
    let rc = unsafe {
        nix::libc::mincore(
            map.as_ptr() as *mut nix::libc::c_void,
            len_usize,
            vec.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "cannot query the page cache (mincore) of",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(vec.into_iter().map(|p| p & 1 == 1).collect())
}

/// The cached parts of `extents` (all of image file `file`), as canonical runs.
pub fn cached_runs(
    file: &File,
    path: &Path,
    size: u64,
    extents: &[Canonical],
) -> Result<Vec<Canonical>> {
    let mut out: Vec<Canonical> = Vec::new();
    for e in extents {
        let mut at = e.start;
        while at < e.end() {
            let n = (e.end() - at).min(WINDOW_BLOCKS);
            let flags = resident_blocks(file, path, size, at, n)?;
            for (i, cached) in flags.into_iter().enumerate() {
                if !cached {
                    continue;
                }
                let block = at + i as u64;
                match out.last_mut() {
                    Some(last) if last.image == e.image && last.end() == block => last.len += 1,
                    _ => out.push(Canonical {
                        image: e.image,
                        start: block,
                        len: 1,
                    }),
                }
            }
            at += n;
        }
    }
    Ok(out)
}

/// `struct fiemap` of `<linux/fiemap.h>` with room for one extent.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extent: FiemapExtent,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, Fiemap);

/// Where byte `offset` of `file` lies on its device (`FS_IOC_FIEMAP`), if the file system
/// says: the key that puts requests of several files in disk order.
pub fn physical_offset(file: &File, offset: u64) -> Option<u64> {
    let mut map = Fiemap {
        start: offset,
        length: 1,
        flags: 0,
        mapped_extents: 0,
        extent_count: 1,
        reserved: 0,
        extent: FiemapExtent::default(),
    };
    // SAFETY: `map` is a `struct fiemap` followed by room for the one extent it asks for.
    unsafe { fs_ioc_fiemap(file.as_raw_fd(), &mut map) }.ok()?;
    if map.mapped_extents == 0 || offset < map.extent.logical {
        return None;
    }
    Some(map.extent.physical + (offset - map.extent.logical))
}

/// What reading a plan did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadOutcome {
    /// Requests read whole.
    pub requests: u64,
    /// `pread` calls made.
    pub reads: u64,
    /// Bytes read.
    pub bytes: u64,
    pub seconds: f64,
    /// Requests skipped: cached whole when their turn came (another warm read them).
    pub skipped: u64,
    /// Stopped by `stop` before the end.
    pub cancelled: bool,
    /// Requests that failed, with the reason (the rest are still read).
    pub errors: Vec<String>,
}

/// Opens an image file for prefetch reads: read-only, readahead off (`POSIX_FADV_RANDOM`),
/// so what is read is exactly what the plan asks for.
pub fn open_for_reading(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    // Advice only: a file system without it still reads the right bytes.
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    );
    Ok(file)
}

/// Whether bytes `offset..offset + len` of `file` are all cached (false when unknown).
fn all_cached(file: &File, offset: u64, len: u64) -> bool {
    let page = crate::sys::page_size().max(1);
    let lo = offset / page * page;
    let hi = (offset + len).div_ceil(page) * page;
    mincore(file, Path::new(""), lo, hi - lo).is_ok_and(|pages| pages.iter().all(|p| *p))
}

/// Reads `requests` in order into one reused buffer of [`READ_CHUNK`] bytes (the page cache
/// keeps what was read); `file(image)` gives each image's file. A request cached whole when
/// its turn comes is skipped. Checks `stop` before every read, and tells `progress` the
/// bytes done so far.
pub fn read_requests(
    file: &dyn Fn(ImageId) -> Option<(File, String)>,
    requests: &[ReadRequest],
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64),
) -> ReadOutcome {
    let started = Instant::now();
    let mut outcome = ReadOutcome::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut open: Option<(ImageId, File, String)> = None;
    'requests: for r in requests {
        if open.as_ref().is_none_or(|(id, _, _)| *id != r.image) {
            open = file(r.image).map(|(f, name)| (r.image, f, name));
        }
        let Some((_, f, name)) = &open else {
            outcome
                .errors
                .push(format!("image {} cannot be opened", r.image));
            continue;
        };
        if all_cached(f, r.offset, r.len) {
            outcome.skipped += 1;
            continue;
        }
        let mut at = r.offset;
        let end = r.offset + r.len;
        while at < end {
            if stop() {
                outcome.cancelled = true;
                break 'requests;
            }
            let want = usize_of((end - at).min(READ_CHUNK as u64));
            match f.read_at(&mut buf[..want], at) {
                Ok(0) => break,
                Ok(n) => {
                    outcome.reads += 1;
                    outcome.bytes += n as u64;
                    at += n as u64;
                    progress(outcome.bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    outcome.errors.push(format!("{name}: read at {at}: {e}"));
                    continue 'requests;
                }
            }
        }
        outcome.requests += 1;
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

/// Drops the cached pages of `path` (`POSIX_FADV_DONTNEED`; pages mapped or dirty stay), so
/// a measurement can start from a cold cache.
pub fn drop_cache(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(|e| Error::io("cannot drop the page cache of", path, e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn residency_is_per_block_and_bounded_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![1u8; 8 * 4096 + 100]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let size = 8 * BLOCK_SIZE + 100;
        let file = File::open(&path).unwrap();
        drop_cache(&path).unwrap();
        let cold = resident_blocks(&file, &path, size, 0, 12).unwrap();
        assert_eq!(cold.len(), 12);
        // tmpfs keeps everything resident; elsewhere the dropped pages are gone.
        let mut buf = vec![0u8; 2 * 4096];
        file.read_at(&mut buf, 2 * BLOCK_SIZE).unwrap();
        file.read_at(&mut buf[..100], 8 * BLOCK_SIZE).unwrap();
        let warm = resident_blocks(&file, &path, size, 0, 12).unwrap();
        assert!(warm[2] && warm[3] && warm[8], "{warm:?}");
        assert!(!warm[9] && !warm[10] && !warm[11], "past the end: {warm:?}");
        let runs = cached_runs(
            &file,
            &path,
            size,
            &[Canonical {
                image: 4,
                start: 2,
                len: 2,
            }],
        )
        .unwrap();
        assert_eq!(
            runs,
            vec![Canonical {
                image: 4,
                start: 2,
                len: 2
            }]
        );
        assert_eq!(
            resident_blocks(&file, &path, size, 20, 3).unwrap(),
            vec![false; 3]
        );
    }

    #[test]
    fn requests_are_read_whole_in_chunks_and_stop_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 3 * READ_CHUNK + 10]).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        drop_cache(&path).unwrap();
        let open = |id: ImageId| (id == 1).then(|| (open_for_reading(&path).unwrap(), "f".into()));
        let requests = [
            ReadRequest {
                image: 1,
                offset: 0,
                len: 2 * READ_CHUNK as u64 + 5,
                wanted: 0,
            },
            ReadRequest {
                image: 2,
                offset: 0,
                len: 10,
                wanted: 0,
            },
            ReadRequest {
                image: 1,
                offset: 3 * READ_CHUNK as u64,
                len: 4096,
                wanted: 0,
            },
        ];
        let mut seen = 0;
        let out = read_requests(&open, &requests, &|| false, &mut |done| seen = done);
        assert_eq!(out.requests + out.skipped, 2, "{out:?}");
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(seen, out.bytes);
        // Unless the cache could not be dropped (tmpfs), both were read, in 1 MiB reads.
        if out.skipped == 0 {
            assert_eq!(out.reads, 4);
            assert_eq!(out.bytes, 2 * READ_CHUNK as u64 + 5 + 10);
        }
        assert!(!out.cancelled);
        // Read again, everything is cached: skipped (unless the cache dropped it meanwhile).
        let again = read_requests(&open, &requests, &|| false, &mut |_| {});
        assert_eq!(again.skipped + again.requests, 2, "{again:?}");
        drop_cache(&path).unwrap();
        let calls = std::cell::Cell::new(0);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > 2
        };
        let out = read_requests(&open, &requests, &stop, &mut |_| {});
        if out.skipped == 0 {
            assert!(out.cancelled, "{out:?}");
            assert_eq!(out.reads, 2);
        }
    }

    #[test]
    fn physical_offsets_follow_the_file_where_the_file_system_tells() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        // tmpfs and others have no FIEMAP: then nothing is claimed.
        if let (Some(a), Some(b)) = (physical_offset(&file, 0), physical_offset(&file, 4096)) {
            assert!(b != a, "two blocks at one place");
        }
        assert_eq!(physical_offset(&file, 10 << 20), None, "past the end");
    }

    #[test]
    fn the_thread_priority_is_lowered() {
        std::thread::spawn(|| {
            lower_priority().unwrap();
            assert_eq!(priority().unwrap(), IOPRIO_IDLE);
        })
        .join()
        .unwrap();
    }
}
