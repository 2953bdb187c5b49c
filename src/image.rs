//! Image files: opening them read-only, their size, and the identity that tells whether an image
//! is still the one that was captured. Images are never opened for writing.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Size of a catalog block: the unit of hashing, sharing and redirection.
pub const BLOCK_SIZE: u64 = 4096;
/// Size of a device-mapper sector.
pub const SECTOR_SIZE: u64 = 512;

pub use crate::sys::{DeviceNumber, device_number};

/// What identifies one version of an image file: if any field differs, its content may have
/// changed and every map built from it is stale. `ctime` catches what `mtime` alone misses:
/// a writer that restores the modification time afterwards (`touch -d`) cannot set the
/// inode change time, which the kernel sets on every write.
///
/// Block devices (`ino` 0) are identified by their device number (`dev`, the node's rdev),
/// their size and `block_id`, what names the device itself (see [`block_device_id`]). Their
/// node's times are not compared: they belong to a node in devtmpfs that is made anew at
/// every boot and every LVM activation, and writes through any other path (a mounted file
/// system, a dm device above it) do not change them, so they would refuse every restore at
/// boot while catching almost no write.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ImageIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    /// Absent in records of catalogs written before vmar kept it; then not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime_ns: Option<i128>,
    /// Block devices only: a digest of what names the device whatever its number (see
    /// [`block_device_id`]); absent for files, for devices without such a name and in older
    /// records, and then not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_id: Option<u64>,
}

impl PartialEq for ImageIdentity {
    fn eq(&self, other: &ImageIdentity) -> bool {
        let same = |a: Option<i128>, b: Option<i128>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let block_same = match (self.block_id, other.block_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let times_same = if self.is_block_device() && other.is_block_device() {
            true
        } else {
            self.mtime_ns == other.mtime_ns && same(self.ctime_ns, other.ctime_ns)
        };
        self.dev == other.dev
            && self.ino == other.ino
            && self.size == other.size
            && times_same
            && block_same
    }
}

impl Eq for ImageIdentity {}

impl ImageIdentity {
    /// Whether it is a block device's: files always have an inode number, devices get 0.
    pub fn is_block_device(&self) -> bool {
        self.ino == 0
    }

    /// The (major, minor) of the block device it identifies, if it is one.
    pub fn block_device(&self) -> Option<DeviceNumber> {
        if self.is_block_device() {
            device_number(self.dev)
        } else {
            None
        }
    }

    /// Human description of how `now` differs from `self`, e.g. "size 4096 -> 8192".
    pub fn describe_change(&self, now: &ImageIdentity) -> String {
        let mut parts = Vec::new();
        let block = self.is_block_device() && now.is_block_device();
        if block {
            if let Some((major, minor)) = now.block_device()
                && self.dev != now.dev
            {
                parts.push(format!("another device number now ({major}:{minor})"));
            }
            if matches!((self.block_id, now.block_id), (Some(a), Some(b)) if a != b) {
                parts.push("it names another block device now".to_string());
            }
        } else if self.dev != now.dev || self.ino != now.ino {
            parts.push("it is a different file now".to_string());
        }
        if self.size != now.size {
            parts.push(format!("size {} -> {}", self.size, now.size));
        }
        if block {
            // A device node's times say nothing about its content (see the type's doc).
        } else if self.mtime_ns != now.mtime_ns {
            parts.push("modification time differs".to_string());
        } else if let (Some(a), Some(b)) = (self.ctime_ns, now.ctime_ns)
            && a != b
        {
            parts.push(
                "inode change time differs (written, or its owner, mode or links changed)"
                    .to_string(),
            );
        }
        if parts.is_empty() {
            parts.push("unchanged".to_string());
        }
        parts.join(", ")
    }
}

/// An image opened read-only, with its canonical path, size and identity at open time.
#[derive(Debug)]
pub struct ImageFile {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub identity: ImageIdentity,
    pub is_block_device: bool,
}

impl ImageFile {
    /// Opens `path` read-only and checks that it can be an image: a regular file or block
    /// device, not empty, whole 512-byte sectors.
    pub fn open(path: &Path) -> Result<ImageFile> {
        let image = ImageFile::open_unchecked(path)?;
        image.check_size()?;
        Ok(image)
    }

    /// Opens `path` read-only without checking its size.
    fn open_unchecked(path: &Path) -> Result<ImageFile> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve", path, e))?;
        let file = open_read_only(&canonical)?;
        ImageFile::from_file_unchecked(canonical, file)
    }

    /// An image from a file already opened read-only at `path` (canonical), checked like
    /// [`ImageFile::open`].
    pub fn from_file(path: PathBuf, file: File) -> Result<ImageFile> {
        let image = ImageFile::from_file_unchecked(path, file)?;
        image.check_size()?;
        Ok(image)
    }

    fn from_file_unchecked(path: PathBuf, file: File) -> Result<ImageFile> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", &path, e))?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !ft.is_file() && !is_block_device {
            return Err(Error::NotAnImage { path });
        }
        // Opened without blocking (a FIFO must not hold a thread); reads block again.
        let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io("cannot read flags of", &path, e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::io("cannot set flags of", &path, e.into()))?;
        let mut image = ImageFile {
            identity: ImageIdentity {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: None,
                block_id: None,
            },
            path,
            file,
            size: 0,
            is_block_device,
        };
        image.identity = image.current_identity()?;
        image.size = image.identity.size;
        Ok(image)
    }

    fn check_size(&self) -> Result<()> {
        if self.size == 0 {
            return Err(Error::EmptyImage {
                path: self.path.clone(),
            });
        }
        if !self.size.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::UnalignedSize {
                path: self.path.clone(),
                size: self.size,
            });
        }
        Ok(())
    }

    /// Identity of the open file as it is now (fstat, and the device size for block devices).
    pub fn current_identity(&self) -> Result<ImageIdentity> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("cannot stat", &self.path, e))?;
        let size = if self.is_block_device {
            // st_size is 0 for block devices; seeking to the end gives the device size.
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("cannot size", &self.path, e))?
        } else {
            meta.len()
        };
        let (dev, ino, ctime_ns) = if self.is_block_device {
            (meta.rdev(), 0, None)
        } else {
            (
                meta.dev(),
                meta.ino(),
                Some(i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())),
            )
        };
        Ok(ImageIdentity {
            dev,
            ino,
            size,
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns,
            block_id: if self.is_block_device {
                block_device_id(&self.file, meta.rdev())
            } else {
                None
            },
        })
    }

    /// Number of catalog blocks, the last one possibly partial.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }
}

/// What names block device `file` (number `rdev`) independently of its number, which can
/// change at the next boot or activation: a device-mapper device's UUID (LVM's holds the VG
/// and LV UUIDs) or name, a loop device's backing file (device, inode, offset, size limit),
/// a disk's WWID or serial number (with the partition's number and start for a partition).
/// `None` when the device has none of them. Kept as a digest so identities stay small.
pub fn block_device_id(file: &File, rdev: u64) -> Option<u64> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    let name = block_device_name(file, &sys)?;
    let digest = blake3::hash(format!("vmar block device id v1\0{name}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    Some(u64::from_le_bytes(first))
}

/// The text [`block_device_id`] digests, from sysfs directory `sys` of the device.
fn block_device_name(file: &File, sys: &Path) -> Option<String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    if let Some(uuid) = read(&sys.join("dm/uuid")) {
        return Some(format!("dm-uuid:{uuid}"));
    }
    if let Some(name) = read(&sys.join("dm/name")) {
        return Some(format!("dm-name:{name}"));
    }
    if sys.join("loop").is_dir() {
        let status = crate::sys::loop_status(file)?;
        return Some(format!(
            "loop:{}:{}:{}:{}",
            status.device, status.inode, status.offset, status.size_limit
        ));
    }
    let disk_id = |disk: &Path| {
        ["wwid", "device/wwid", "serial", "device/serial"]
            .iter()
            .find_map(|f| read(&disk.join(f)))
    };
    if let Some(number) = read(&sys.join("partition")) {
        // A partition's sysfs directory lies inside its disk's.
        let disk = sys.canonicalize().ok()?.parent()?.to_path_buf();
        let start = read(&sys.join("start"))?;
        return Some(format!("part:{}:{number}:{start}", disk_id(&disk)?));
    }
    disk_id(sys).map(|id| format!("disk:{id}"))
}

/// Opens `path` read-only without following it into a FIFO's wait for a writer.
fn open_read_only(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))
}

/// Container formats that `qemu-img` recognises by their first bytes, which a raw-only
/// tool must refuse rather than serve as disk bytes.
pub fn container_format(head: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(usize, &[u8], &str)] = &[
        (0, b"QFI\xfb", "qcow2"),
        (0, b"QED\0", "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc (vhd)"),
        (64, b"\x7f\x10\xda\xbe", "vdi"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
        (0, b"LUKS\xba\xbe", "luks"),
    ];
    MAGICS
        .iter()
        .find(|(at, magic, _)| head.get(*at..*at + magic.len()) == Some(*magic))
        .map(|(_, _, format)| *format)
}

impl ImageFile {
    /// Refuses an image whose first bytes are those of a container format (see
    /// [`container_format`]).
    pub fn check_raw(&self) -> Result<()> {
        let mut head = [0u8; 512];
        let n = std::os::unix::fs::FileExt::read_at(&self.file, &mut head, 0)
            .map_err(|e| Error::io("cannot read", &self.path, e))?;
        match container_format(&head[..n]) {
            Some(format) => Err(Error::ImageFormat {
                path: self.path.clone(),
                format: format.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a regular file with more than one hard link: a link planted inside an image
    /// root could otherwise expose a file from outside it.
    pub fn check_single_link(&self) -> Result<()> {
        self.check_links(|_, _| 0)
    }

    /// [`ImageFile::check_single_link`], also allowing the links `holds` counts as vmar's
    /// holds on the file (device, inode; see [`crate::holds`]). A link made by anyone else
    /// is still refused.
    pub fn check_links(&self, holds: impl Fn(u64, u64) -> u64) -> Result<()> {
        if self.is_block_device {
            return Ok(());
        }
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("cannot stat", &self.path, e))?;
        let links = meta.nlink();
        if links > 1 && links != 1 + holds(meta.dev(), meta.ino()) {
            return Err(Error::HardLinked {
                path: self.path.clone(),
                links,
            });
        }
        Ok(())
    }
}

/// Opens a captured image again and fails with [`Error::ImageChanged`] unless it is still the
/// same version that was captured.
pub fn open_unchanged(name: &str, path: &Path, captured: &ImageIdentity) -> Result<ImageFile> {
    let changed = |what: String| Error::ImageChanged {
        name: name.to_string(),
        path: path.to_path_buf(),
        what,
    };
    let image = match ImageFile::open_unchecked(path) {
        Ok(image) => image,
        Err(Error::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(changed("it no longer exists".to_string()));
        }
        Err(e) => return Err(e),
    };
    if image.identity != *captured {
        return Err(changed(captured.describe_change(&image.identity)));
    }
    Ok(image)
}

/// Checks an image or device name (see [`crate::name`], whose types carry checked names).
pub use crate::name::check as validate_name;

/// Default image name: the file name without its extension, with other characters replaced.
pub fn default_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name = name.trim_start_matches(['.', '-']).to_string();
    name.truncate(64);
    if name.is_empty() {
        name.push_str("image");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["web", "db-1.raw", "A_b.c-9", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-opt",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(65),
            "../x",
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn default_names_are_valid() {
        for (path, want) in [
            ("/img/web.raw", "web"),
            ("/img/my disk.img", "my_disk"),
            ("/img/.x.raw", "x"),
            ("/img/--", "image"),
        ] {
            let name = default_name(Path::new(path));
            assert_eq!(name, want);
            validate_name(&name).unwrap();
        }
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ImageFile::open(dir.path()),
            Err(Error::NotAnImage { .. })
        ));
        assert!(matches!(
            ImageFile::open(&dir.path().join("missing")),
            Err(Error::Io { .. })
        ));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            ImageFile::open(&empty),
            Err(Error::EmptyImage { .. })
        ));
        let odd = dir.path().join("odd");
        std::fs::write(&odd, vec![1u8; 1000]).unwrap();
        assert!(matches!(
            ImageFile::open(&odd),
            Err(Error::UnalignedSize { size: 1000, .. })
        ));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, vec![1u8; 4096 + 512]).unwrap();
        let image = ImageFile::open(&ok).unwrap();
        assert_eq!(image.size, 4608);
        assert_eq!(image.block_count(), 2);
    }

    #[test]
    fn changes_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let captured = ImageFile::open(&path).unwrap().identity;
        assert!(open_unchanged("img", &path, &captured).is_ok());
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let err = open_unchanged("img", &path, &captured).unwrap_err();
        assert!(matches!(err, Error::ImageChanged { .. }), "{err}");
        assert!(err.to_string().contains("size 8192 -> 4096"), "{err}");
        // A size no image may have is still reported as a change, not as a bad image.
        std::fs::write(&path, vec![7u8; 8193]).unwrap();
        let err = open_unchanged("img", &path, &captured).unwrap_err();
        assert!(err.to_string().contains("size 8192 -> 8193"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = open_unchanged("img", &path, &captured).unwrap_err();
        assert!(err.to_string().contains("no longer exists"), "{err}");
    }

    #[test]
    fn container_formats_are_recognised() {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(512, 0);
        assert_eq!(container_format(&qcow2), Some("qcow2"));
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(container_format(&vdi), Some("vdi"));
        assert_eq!(container_format(b"vhdxfile"), Some("vhdx"));
        // An MBR, an ext4 superblock area, zeros: raw.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(container_format(&mbr), None);
        assert_eq!(container_format(&[]), None);
        assert_eq!(container_format(b"QF"), None);
    }

    #[test]
    fn restored_mtime_does_not_hide_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let captured = ImageFile::open(&path).unwrap().identity;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, &[8u8; 4096], 0).unwrap();
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(u64::try_from(captured.mtime_ns).unwrap());
        file.set_modified(mtime).unwrap();
        drop(file);
        let now = ImageFile::open(&path).unwrap().identity;
        assert_eq!(now.mtime_ns, captured.mtime_ns);
        let err = open_unchanged("img", &path, &captured).unwrap_err();
        assert!(err.to_string().contains("inode change time"), "{err}");
    }

    #[test]
    fn block_devices_are_identified_by_number_size_and_what_they_are() {
        use std::process::Command;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a loop device");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        std::fs::write(&one, vec![1u8; 8192]).unwrap();
        std::fs::write(&two, vec![2u8; 8192]).unwrap();
        let attach = |args: &[&Path]| {
            let out = Command::new("losetup")
                .args(["--read-only", "--show"])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let node = attach(&[Path::new("--find"), &one]);
        if node.is_empty() {
            eprintln!("skipped: no loop device");
            return;
        }
        let detach = |node: &str| {
            let _ = Command::new("losetup").args(["-d", node]).status();
        };
        let captured = ImageFile::open(Path::new(&node)).unwrap().identity;
        assert!(captured.is_block_device());
        assert!(captured.block_id.is_some(), "{captured:?}");
        // Another node of the same device, made later (as devtmpfs makes one at every boot):
        // other times, same identity.
        let rdev = std::fs::metadata(&node).unwrap().rdev();
        let alias = dir.path().join("alias");
        nix::sys::stat::mknod(
            &alias,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            rdev,
        )
        .unwrap();
        let through_alias = open_unchanged("one", &alias, &captured).map(|_| ());
        // The same number now names a loop device over another file of the same size.
        detach(&node);
        let reattached = attach(&[Path::new(&node), &two]);
        let other = open_unchanged("one", Path::new(&node), &captured);
        detach(&node);
        assert!(through_alias.is_ok(), "{:?}", through_alias.err());
        assert_eq!(reattached, node, "reattached {node} over {}", two.display());
        let err = other.unwrap_err();
        assert!(
            err.to_string().contains("names another block device"),
            "{err}"
        );
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.raw");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            ImageFile::open(&fifo),
            Err(Error::NotAnImage { .. })
        ));
    }
}
