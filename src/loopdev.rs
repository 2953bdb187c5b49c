//! Loop devices: each image is attached once, read-only and buffered (no direct I/O), so the
//! page cache of the image *file* is what every dm device reading it shares. An existing
//! loop device over the same file with the same settings is reused. Devices are attached with
//! autoclear: the kernel detaches them when the last dm table using them goes away.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};

use crate::error::{Error, Result};
use crate::image::ImageFile;

/// A loop device serving one image, held open until the dm table that uses it is loaded.
#[derive(Debug)]
pub struct LoopAttachment {
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// Whether this call attached it (false: an existing device was reused).
    pub attached: bool,
    /// Keeps the device (and with autoclear, its attachment) alive.
    _holder: File,
}

impl LoopAttachment {
    /// `MAJOR:MINOR`, as dm tables name devices.
    pub fn dm_name(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

fn read_sys(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Loop devices whose backing file is `image`, read-only, buffered, whole file.
pub fn find_existing(image: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let sys = entry.path();
        // A backing file that was replaced shows as "PATH (deleted)" and does not match.
        let matches = read_sys(&sys.join("loop/backing_file")).as_deref()
            == Some(image.to_string_lossy().as_ref())
            && read_sys(&sys.join("ro")).as_deref() == Some("1")
            && read_sys(&sys.join("loop/dio")).as_deref() != Some("1")
            && read_sys(&sys.join("loop/offset")).as_deref().unwrap_or("0") == "0"
            && read_sys(&sys.join("loop/sizelimit"))
                .as_deref()
                .unwrap_or("0")
                == "0";
        if matches {
            found.push(PathBuf::from("/dev").join(name));
        }
    }
    found.sort();
    found
}

fn device_numbers(device: &Path) -> Result<(u32, u32)> {
    let meta = fs::metadata(device).map_err(|e| Error::io("cannot stat", device, e))?;
    let rdev = meta.rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// A read-only, buffered loop device over `image` (an image checked unchanged by the
/// caller): an existing one if there is one, else a new one attached to the open file.
pub fn attach(image: &ImageFile) -> Result<LoopAttachment> {
    for device in find_existing(&image.path) {
        // It may go away between the scan and the open (autoclear): then try the next.
        if let Ok(holder) = File::open(&device) {
            let (major, minor) = device_numbers(&device)?;
            return Ok(LoopAttachment {
                device,
                major,
                minor,
                attached: false,
                _holder: holder,
            });
        }
    }
    let control =
        LoopControl::open().map_err(|e| Error::io("cannot open", "/dev/loop-control", e))?;
    let mut last = None;
    // Another process may take the free device between the query and the attach.
    for _ in 0..8 {
        let device: LoopDevice = control
            .next_free()
            .map_err(|e| Error::io("cannot find a free loop device via", "/dev/loop-control", e))?;
        let path = device
            .path()
            .ok_or_else(|| Error::Protocol("loop device without a path".into()))?;
        match device
            .with()
            .read_only(true)
            .autoclear(true)
            .attach_fd(std::os::fd::AsRawFd::as_raw_fd(&image.file))
        {
            Ok(()) => {
                let holder = File::open(&path).map_err(|e| Error::io("cannot open", &path, e))?;
                drop(device);
                let (major, minor) = device_numbers(&path)?;
                return Ok(LoopAttachment {
                    device: path,
                    major,
                    minor,
                    attached: true,
                    _holder: holder,
                });
            }
            Err(e) if e.raw_os_error() == Some(libc_ebusy()) => last = Some(e),
            Err(e) => return Err(Error::io("cannot attach loop device for", &image.path, e)),
        }
    }
    Err(Error::io(
        "no loop device could be attached for",
        &image.path,
        last.unwrap_or_else(|| std::io::Error::other("busy")),
    ))
}

fn libc_ebusy() -> i32 {
    nix::errno::Errno::EBUSY as i32
}
