//! Which pages of an image file the host page cache holds: `mincore(2)` over a read-only,
//! shared mapping of the file. Mapping a file reads nothing and faults nothing in; the
//! mapping is dropped before returning.

use std::fs::File;
use std::path::Path;

use memmap2::MmapOptions;

use crate::error::{Error, Result};

/// Resident-page vector of one file: one byte per page, bit 0 set when the page is cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Residency {
    pub page_size: u64,
    pub pages: Vec<u8>,
}

impl Residency {
    /// Bytes of the file in the page cache.
    pub fn cached_bytes(&self) -> u64 {
        self.pages.iter().filter(|p| *p & 1 == 1).count() as u64 * self.page_size
    }
}

/// The page size of this host.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |s| s as u64)
}

/// Residency of the first `size` bytes of the file at `path`.
pub fn residency(path: &Path, size: u64) -> Result<Residency> {
    let page_size = page_size();
    if size == 0 {
        return Ok(Residency {
            page_size,
            pages: Vec::new(),
        });
    }
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let len = usize::try_from(size)
        .map_err(|_| Error::io("cannot map", path, std::io::Error::other("file too large")))?;
    // SAFETY: the mapping is read-only and never dereferenced here: only its address range
    // is handed to mincore, so a file changing underneath cannot cause undefined behaviour.
    let map = unsafe { MmapOptions::new().len(len).map(&file) }
        .map_err(|e| Error::io("cannot map", path, e))?;
    let mut pages = vec![0u8; len.div_ceil(page_size as usize)];
    // SAFETY: `map` is a live mapping of `len` bytes at a page-aligned address, and `pages`
    // has one byte for each of its pages, as mincore requires.
    let rc = unsafe {
        nix::libc::mincore(
            map.as_ptr() as *mut nix::libc::c_void,
            len,
            pages.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "cannot query the page cache (mincore) of",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(Residency { page_size, pages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_read_through_the_cache_are_resident_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let page = page_size() as usize;
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![7u8; page * 8]).unwrap();
        file.sync_all().unwrap();
        drop(file);
        std::fs::read(&path).unwrap();
        let resident = residency(&path, (page * 8) as u64).unwrap();
        assert_eq!(resident.pages.len(), 8);
        assert_eq!(resident.cached_bytes(), (page * 8) as u64);
        assert_eq!(residency(&path, 0).unwrap().cached_bytes(), 0);
        assert_eq!(
            residency(&dir.path().join("missing"), 4096)
                .unwrap_err()
                .kind(),
            "io"
        );
    }
}
