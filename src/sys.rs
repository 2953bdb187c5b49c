//! Plain Linux calls that several modules need and that are not kernel *objects*: the
//! status of an open loop device (`LOOP_GET_STATUS64`), page-cache residency (`mincore`),
//! the page size, device numbers. A leaf: it imports nothing of vmar but errors, so the
//! kernel seam ([`crate::kernel`]), image identity ([`crate::image`]) and verify can all use
//! it without importing each other.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::MmapOptions;

use crate::error::{Error, Result};

/// A block device's (major, minor).
pub type DeviceNumber = (u32, u32);

/// (major, minor) of device number `dev` as `stat` gives it (Linux's are 12 and 20 bits
/// wide, so they always fit).
pub fn device_number(dev: u64) -> Option<DeviceNumber> {
    let major = u32::try_from(nix::sys::stat::major(dev)).ok()?;
    let minor = u32::try_from(nix::sys::stat::minor(dev)).ok()?;
    Some((major, minor))
}

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
pub(crate) struct LoopInfo64 {
    pub(crate) lo_device: u64,
    pub(crate) lo_inode: u64,
    pub(crate) lo_rdevice: u64,
    pub(crate) lo_offset: u64,
    pub(crate) lo_sizelimit: u64,
    pub(crate) lo_number: u32,
    pub(crate) lo_encrypt_type: u32,
    pub(crate) lo_encrypt_key_size: u32,
    pub(crate) lo_flags: u32,
    pub(crate) lo_file_name: [u8; 64],
    pub(crate) lo_crypt_name: [u8; 64],
    pub(crate) lo_encrypt_key: [u8; 32],
    pub(crate) lo_init: [u64; 2],
}

nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

/// What `LOOP_GET_STATUS64` says of a loop device's backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopStatus {
    /// Device of the file system holding the backing file (for a block device: the one
    /// holding the node it was opened through, e.g. devtmpfs).
    pub device: u64,
    /// Inode of the backing file (for a block device: of that node).
    pub inode: u64,
    /// (major, minor) of the backing block device; `None` for a regular file.
    pub rdev: Option<DeviceNumber>,
    pub offset: u64,
    pub size_limit: u64,
}

/// `LOOP_GET_STATUS64` of the loop device open as `file`; `None` if it is not one or is
/// detached.
pub fn loop_status(file: &File) -> Option<LoopStatus> {
    // SAFETY: LoopInfo64 is plain integers and arrays, valid when zeroed.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a `struct loop_info64` the kernel fills in; on anything but a loop
    // device the ioctl fails without touching it.
    unsafe { loop_get_status64(file.as_raw_fd(), &mut info) }.ok()?;
    // The kernel encodes rdev as huge_encode_dev, which glibc's major/minor decode.
    let rdev = if info.lo_rdevice == 0 {
        None
    } else {
        device_number(info.lo_rdevice)
    };
    Some(LoopStatus {
        device: info.lo_device,
        inode: info.lo_inode,
        rdev,
        offset: info.lo_offset,
        size_limit: info.lo_sizelimit,
    })
}

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

/// Residency of the first `size` bytes of the file at `path` (`mincore` over a read-only
/// shared mapping: mapping a file reads nothing and faults nothing in).
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
    let mut pages = vec![0u8; len.div_ceil(usize::try_from(page_size).unwrap_or(4096))];
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

/// The page size of this host.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |s| s as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_read_through_the_cache_are_resident_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let page = usize::try_from(page_size()).unwrap();
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

    #[test]
    fn loop_info_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
    }
}
