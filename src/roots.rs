//! Image roots: the directories whose files a socket client may capture. vmard turns any
//! captured file into a block device, so without this a client could expose any host file
//! (a key, another tenant's disk) to a VM. A path is resolved once, and the file is then
//! opened with `openat2(RESOLVE_BENEATH)` relative to its root, so a symlink or `..` swapped
//! in between cannot lead the open out of the root.
//!
//! vmard starts with the roots that are there ([`ImageRoots::resolve`]): a missing or
//! unreadable one (an NFS share not mounted yet) is reported and looked at again, and the
//! devices whose images are on the others are restored meanwhile.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use crate::error::{Error, Result};
use crate::image::ImageFile;
pub use crate::protocol::RootHealth;

/// The configured image roots: those reachable, canonical, and those not.
#[derive(Clone, Debug, Default)]
pub struct ImageRoots {
    roots: Vec<PathBuf>,
    /// As configured, in order.
    configured: Vec<PathBuf>,
    /// Configured roots that cannot be used now, with the reason.
    missing: Vec<(PathBuf, String)>,
    /// Device and inode of each reachable root: a file system mounted on it later changes
    /// them.
    stamps: Vec<(u64, u64)>,
}

impl ImageRoots {
    /// Roots from configuration; each must exist.
    pub fn new(roots: &[PathBuf]) -> Result<ImageRoots> {
        let resolved = ImageRoots::resolve(roots);
        match resolved.missing.first() {
            Some((root, why)) => Err(Error::io(
                "cannot use image root",
                root,
                std::io::Error::other(why.clone()),
            )),
            None => Ok(resolved),
        }
    }

    /// Roots from configuration, whatever is there: those that cannot be resolved or read
    /// now are kept in [`ImageRoots::missing`] and allow nothing.
    pub fn resolve(configured: &[PathBuf]) -> ImageRoots {
        let mut resolved = ImageRoots {
            configured: configured.to_vec(),
            ..ImageRoots::default()
        };
        for root in configured {
            let usable = root.canonicalize().and_then(|canonical| {
                // Listing it proves it is a directory vmard can read (an unreadable one
                // would fail every capture and restore under it).
                std::fs::read_dir(&canonical)?;
                let meta = std::fs::metadata(&canonical)?;
                Ok((canonical, (meta.dev(), meta.ino())))
            });
            match usable {
                Ok((canonical, stamp)) => {
                    resolved.roots.push(canonical);
                    resolved.stamps.push(stamp);
                }
                Err(e) => resolved.missing.push((root.clone(), e.to_string())),
            }
        }
        resolved
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The roots as configured.
    pub fn configured(&self) -> &[PathBuf] {
        &self.configured
    }

    /// Configured roots that cannot be used, with the reason.
    pub fn missing(&self) -> &[(PathBuf, String)] {
        &self.missing
    }

    /// Whether `other` (the same configuration resolved again) differs: a root appeared or
    /// went, or a file system was mounted on one.
    pub fn changed(&self, other: &ImageRoots) -> bool {
        self.roots != other.roots || self.stamps != other.stamps || self.missing != other.missing
    }

    /// Each configured root and whether it can be used, for `ping` and `check`.
    pub fn health(&self) -> Vec<RootHealth> {
        self.configured
            .iter()
            .map(|root| RootHealth {
                path: root.clone(),
                error: self
                    .missing
                    .iter()
                    .find(|(r, _)| r == root)
                    .map(|(_, why)| why.clone()),
            })
            .collect()
    }

    /// Opens the image at `path` read-only if it lies inside a root.
    pub fn open(&self, path: &Path) -> Result<ImageFile> {
        self.open_held(path, None)
    }

    /// [`ImageRoots::open`], allowing the one extra link that is vmar's own hold in `holds`.
    pub fn open_held(&self, path: &Path, holds: Option<&crate::holds::Holds>) -> Result<ImageFile> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve", path, e))?;
        let outside = || Error::OutsideImageRoots {
            path: canonical.clone(),
            roots: self.roots.clone(),
        };
        let root = self
            .roots
            .iter()
            .filter(|r| canonical.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .ok_or_else(outside)?;
        let relative = canonical.strip_prefix(root).map_err(|_| outside())?;
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        let dir = File::open(root).map_err(|e| Error::io("cannot open image root", root, e))?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(dir.as_raw_fd(), relative, how).map_err(|e| match e {
            nix::errno::Errno::EXDEV => outside(),
            e => Error::io("cannot open", &canonical, e.into()),
        })?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let image = ImageFile::from_file(canonical, file)?;
        image.check_links(|dev, ino| holds.map_or(0, |h| h.hold_links(&image.path, dev, ino)))?;
        Ok(image)
    }

    /// Whether `path`, taken as written (`.` and `..` folded, nothing resolved), lies in a
    /// root: a check that reveals nothing about the file system.
    pub fn contains_lexically(&self, path: &Path) -> bool {
        let mut folded = PathBuf::new();
        for part in path.components() {
            match part {
                std::path::Component::ParentDir => {
                    folded.pop();
                }
                std::path::Component::CurDir => {}
                other => folded.push(other),
            }
        }
        self.roots.iter().any(|r| folded.starts_with(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_inside_roots_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        let other = dir.path().join("secret");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(root.join("sub/a.raw"), [1u8; 4096]).unwrap();
        std::fs::write(other.join("key"), [2u8; 4096]).unwrap();
        std::os::unix::fs::symlink(other.join("key"), root.join("link.raw")).unwrap();
        std::os::unix::fs::symlink("../a.raw", root.join("sub/up.raw")).unwrap();
        let roots = ImageRoots::new(std::slice::from_ref(&root)).unwrap();

        assert!(roots.open(&root.join("sub/a.raw")).is_ok());
        // .. inside the root stays inside; a symlink inside the root to a file inside is fine.
        assert!(roots.open(&root.join("sub/../sub/a.raw")).is_ok());
        for escape in [
            other.join("key"),
            root.join("link.raw"),
            root.join("../secret/key"),
        ] {
            let err = roots.open(&escape).unwrap_err();
            assert_eq!(err.kind(), "outside-image-roots", "{escape:?}: {err}");
        }
        let none = ImageRoots::default();
        assert_eq!(
            none.open(&root.join("sub/a.raw")).unwrap_err().kind(),
            "outside-image-roots"
        );
        assert!(ImageRoots::new(&[dir.path().join("missing")]).is_err());
        // Resolved leniently, a missing root is kept aside and the others work.
        let missing = dir.path().join("missing");
        let some = ImageRoots::resolve(&[missing.clone(), root.clone()]);
        assert_eq!(some.roots(), [root.canonicalize().unwrap()]);
        assert_eq!(some.missing().len(), 1);
        assert!(some.open(&root.join("sub/a.raw")).is_ok());
        let health = some.health();
        assert_eq!(health[0].path, missing);
        assert!(health[0].error.as_deref().unwrap().contains("No such file"));
        assert_eq!(health[1].error, None);
        assert!(!some.changed(&ImageRoots::resolve(&[missing.clone(), root.clone()])));
        std::fs::create_dir(&missing).unwrap();
        let again = ImageRoots::resolve(&[missing.clone(), root.clone()]);
        assert!(some.changed(&again));
        assert!(again.missing().is_empty());
    }

    #[test]
    fn hard_links_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(&root).unwrap();
        let outside = dir.path().join("secret.raw");
        std::fs::write(&outside, [2u8; 4096]).unwrap();
        std::fs::hard_link(&outside, root.join("linked.raw")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo.raw"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let roots = ImageRoots::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(
            roots.open(&root.join("linked.raw")).unwrap_err().kind(),
            "hard-linked"
        );
        assert_eq!(
            roots.open(&root.join("fifo.raw")).unwrap_err().kind(),
            "not-an-image"
        );
        assert!(roots.contains_lexically(&root.join("a/../b.raw")));
        assert!(!roots.contains_lexically(&root.join("../secret.raw")));
    }

    /// Two vmards (two hosts over NFS, or two state dirs on one host) hold one image beside
    /// it: each its own link, both accepted by capture's link check, each released alone.
    #[test]
    fn two_state_dirs_hold_one_image_beside_it_each_with_its_own_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir(&root).unwrap();
        let path = root.join("img.raw");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        // The state dirs on another file system than the image: /dev/shm (tmpfs).
        let shm = Path::new("/dev/shm");
        if !std::fs::metadata(shm).is_ok_and(|m| m.dev() != std::fs::metadata(&root).unwrap().dev())
        {
            eprintln!("/dev/shm is on the test directory's file system: not tested");
            return;
        }
        let states = tempfile::tempdir_in(shm).unwrap();
        let a = crate::holds::Holds::of(&states.path().join("a"));
        let b = crate::holds::Holds::of(&states.path().join("b"));
        let roots = ImageRoots::new(std::slice::from_ref(&root)).unwrap();
        let image = roots.open_held(&path, Some(&a)).unwrap();
        let id = image.identity;
        assert_eq!(a.hold(&image).unwrap(), crate::holds::Held::Yes(true));
        // b finds a's link beside the image, vmar's, and captures all the same.
        let image_b = roots.open_held(&path, Some(&b)).unwrap();
        assert_eq!(b.hold(&image_b).unwrap(), crate::holds::Held::Yes(true));
        assert_ne!(a.location(id.dev, id.ino), b.location(id.dev, id.ino));
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 3);
        assert_eq!(a.hold_links(&path, id.dev, id.ino), 2);
        assert!(roots.open_held(&path, Some(&a)).is_ok());
        assert!(roots.open_held(&path, Some(&b)).is_ok());
        // A link anyone else makes is still refused.
        let theirs = dir.path().join("theirs");
        std::fs::hard_link(&path, &theirs).unwrap();
        assert_eq!(
            roots.open_held(&path, Some(&a)).unwrap_err().kind(),
            "hard-linked"
        );
        std::fs::remove_file(&theirs).unwrap();
        // a lets go; b still holds it.
        assert!(a.release(id.dev, id.ino).unwrap());
        assert!(!a.holds(id.dev, id.ino) && b.holds(id.dev, id.ino));
        assert!(roots.open_held(&path, Some(&b)).is_ok());
    }

    #[test]
    fn vmars_own_hold_is_the_only_extra_link_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(&root).unwrap();
        let image = root.join("base.raw");
        std::fs::write(&image, [3u8; 4096]).unwrap();
        let holds = crate::holds::Holds::of(&dir.path().join("state"));
        let roots = ImageRoots::new(std::slice::from_ref(&root)).unwrap();
        let opened = roots.open_held(&image, Some(&holds)).unwrap();
        assert_eq!(holds.hold(&opened).unwrap(), crate::holds::Held::Yes(true));
        // Held by vmar: still capturable, by vmar; a plain open (no holds known) refuses.
        assert!(roots.open_held(&image, Some(&holds)).is_ok());
        assert_eq!(roots.open(&image).unwrap_err().kind(), "hard-linked");
        // Anyone else's link on top of vmar's hold is refused.
        std::fs::hard_link(&image, dir.path().join("theirs")).unwrap();
        assert_eq!(
            roots.open_held(&image, Some(&holds)).unwrap_err().kind(),
            "hard-linked"
        );
        // And a file linked by someone else is not vmar's however the hold directory looks.
        let other = root.join("other.raw");
        std::fs::write(&other, [4u8; 4096]).unwrap();
        std::fs::hard_link(&other, dir.path().join("elsewhere")).unwrap();
        assert_eq!(
            roots.open_held(&other, Some(&holds)).unwrap_err().kind(),
            "hard-linked"
        );
    }
}
